"""Backward tile skipping (`filter_eps`): the fraction of (BLOCK_N, BLOCK_V) tiles skipped and the gradient
error it adds, measured on CPU by emulating the kernel's rule in float64 (no Triton, no GPU needed).

Rule (kernels/logprob_entropy.py, _bwd_atomic_kernel): a tile is skipped when every |dz[n, v]| <= eps * s[n],
s[n] = (|g_logp[n]| + |g_ent[n]|) / T. A skipped tile saves 4 * BLOCK_N * BLOCK_V * H of the backward's
8 * BLOCK_N * BLOCK_V * H FLOPs (the logit tile is recomputed before the test) and all its atomics, so
predicted backward time ~ (1 - skipped / 2) of the unfiltered one when compute-bound, and the atomic
traffic ~ (1 - skipped) of it.

Cases:
- smollm2: SmolLM2-135M-Instruct's own completions sampled at T = 0.7 (what RL rollouts are), final
  hidden states of the completion tokens, the tied LM head (H 576, V 49152).
- qwen-synthetic: Qwen2.5-shaped (H 896, V 151936), Gaussian logits whose scale gives the smollm2
  case's mean entropy (a stand-in: the tail shape of real logits decides the skip rate).

Upstream gradients as in the token-mean GRPO loss with an entropy bonus: g_logp = -A / N with A = +-1 per
sequence, g_ent = -0.01 / N. Errors: max |delta| over max |exact| of grad hidden and grad weight, next to
the error of rounding dz to bf16 (what the kernel's bf16 tensor-core operand does anyway).

    python benchmarks/bench_tile_skip.py        # -> results/tile_skip_cpu.csv + a markdown table
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

COLUMNS = common.META_COLUMNS + ["case", "N", "H", "V", "temperature", "mean_entropy", "BLOCK_N", "BLOCK_V",
                                 "filter_eps", "tiles_skipped_frac", "dx_rel_err", "dw_rel_err",
                                 "dx_rel_err_bf16_dz", "dw_rel_err_bf16_dz", "pred_bwd_time_frac"]
PROMPTS = [
    "What's the weather like in Paris today? You can call get_weather(city: str).",
    "Book a table for two at 7pm at an Italian restaurant near me.",
    "Convert 250 US dollars to euros using the tool convert_currency(amount, from, to).",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Find flights from Berlin to Tokyo next Monday; tools: search_flights(origin, destination, date).",
    "Explain in two sentences why the sky is blue.",
    "Send an email to alice@example.com saying the meeting moved to Thursday. Tool: send_email(to, body).",
    "List three prime numbers greater than 100.",
]


def smollm2_case(n_tokens: int, temperature: float, seed: int):
    """(hidden (N, H) fp32, weight (V, H) fp32, targets (N,), seq id (N,)) from sampled completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fctrain.models import resolve_model

    path = resolve_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    torch.manual_seed(seed)
    hidden, targets, seq = [], [], []
    per_prompt = max(8, n_tokens // len(PROMPTS))
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            out = model.generate(ids, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=per_prompt, pad_token_id=tok.eos_token_id)
            h = model.model(out).last_hidden_state[0]  # (T, H), after the final norm
            start = ids.shape[1] - 1  # positions whose next token is a completion token
            hidden.append(h[start:-1])
            targets.append(out[0, start + 1:])
            seq.append(torch.full((out.shape[1] - 1 - start,), i))
    return torch.cat(hidden), model.lm_head.weight.detach().float(), torch.cat(targets), torch.cat(seq)


def synthetic_case(n: int, h: int, v: int, logit_std: float, temperature: float, seed: int, n_seqs: int = 8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * logit_std
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    # targets sampled from the model itself at the temperature (as in a rollout), in row chunks
    targets = torch.empty(n, dtype=torch.long)
    for i in range(0, n, 256):
        z = hidden[i:i + 256] @ weight.T
        targets[i:i + 256] = torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=g)[:, 0]
    return hidden, weight, targets, torch.arange(n) * n_seqs // n


def measure(hidden, weight, targets, seq, temperature, eps_list, block_n, block_v, seed):
    n, h = hidden.shape
    v = weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    adv = torch.where(torch.rand(int(seq.max()) + 1, generator=g) < 0.5, -1.0, 1.0)
    g_logp = (-adv[seq] / n).double()
    g_ent = torch.full((n,), -0.01 / n, dtype=torch.float64)
    scale = (g_logp.abs() + g_ent.abs()) / temperature  # (N,)
    w64, w32, x32 = weight.double(), weight.float(), hidden.float()
    # fp32 products of the exact gradient and of the parts each error removes (deltas), fp64 decisions
    exact_dx, exact_dw = torch.zeros(n, h), torch.zeros(v, h)
    bf16_dx, bf16_dw = torch.zeros(n, h), torch.zeros(v, h)
    delta_dx = {e: torch.zeros(n, h) for e in eps_list}
    delta_dw = {e: torch.zeros(v, h) for e in eps_list}
    skipped = {e: 0 for e in eps_list}
    n_tiles, entropy_sum = 0, 0.0
    n_vt = -(-v // block_v)
    for i in range(0, n, block_n):
        rows = slice(i, min(n, i + block_n))
        z = (hidden[rows].double() @ w64.T) / temperature
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        mean_z = (p * z).sum(-1, keepdim=True)
        entropy_sum += float(-(p * logp).sum())
        dz = -p * (g_logp[rows, None] + g_ent[rows, None] * (z - mean_z))
        del z, logp, p
        dz[torch.arange(dz.shape[0]), targets[rows]] += g_logp[rows]
        dz /= temperature  # d loss / d (hidden @ weight.T)
        dz32 = dz.float()
        exact_dx[rows] = dz32 @ w32
        exact_dw += dz32.T @ x32[rows]
        rounding = (dz.to(torch.bfloat16).double() - dz).float()
        bf16_dx[rows] = rounding @ w32
        bf16_dw += rounding.T @ x32[rows]
        ratio = torch.nn.functional.pad(dz.abs() / scale[rows, None], (0, n_vt * block_v - v))
        tile_max = ratio.reshape(dz.shape[0], n_vt, block_v).amax(dim=(0, 2))  # (n_vt,)
        n_tiles += n_vt
        for e in eps_list:
            skip = (tile_max <= e).repeat_interleave(block_v)[:v]
            skipped[e] += int((tile_max <= e).sum())
            removed = dz32 * skip[None, :]
            delta_dx[e][rows] = removed @ w32
            delta_dw[e] += removed.T @ x32[rows]

    def rel(delta, exact):
        return float(delta.abs().max() / exact.abs().max())

    out = []
    for e in eps_list:
        frac = skipped[e] / n_tiles
        out.append({"filter_eps": e, "tiles_skipped_frac": frac, "dx_rel_err": rel(delta_dx[e], exact_dx),
                    "dw_rel_err": rel(delta_dw[e], exact_dw), "dx_rel_err_bf16_dz": rel(bf16_dx, exact_dx),
                    "dw_rel_err_bf16_dz": rel(bf16_dw, exact_dw), "pred_bwd_time_frac": 1 - frac / 2,
                    "mean_entropy": entropy_sum / n})
    return out


def markdown(rows):
    lines = ["| case | N | H | V | mean entropy | eps | tiles skipped | dX err | dW err | dX err (bf16 dz) "
             "| dW err (bf16 dz) | predicted bwd time |", "|" + " --- |" * 12]
    for r in rows:
        lines.append(f"| {r['case']} | {r['N']} | {r['H']} | {r['V']} | {r['mean_entropy']:.2f} | 2^{r['log2_eps']} "
                     f"| {r['tiles_skipped_frac']:.1%} | {r['dx_rel_err']:.2e} | {r['dw_rel_err']:.2e} "
                     f"| {r['dx_rel_err_bf16_dz']:.2e} | {r['dw_rel_err_bf16_dz']:.2e} | {r['pred_bwd_time_frac']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="smollm2,qwen-synthetic")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--log2-eps", default="-12,-16,-20")
    parser.add_argument("--block", default="64,128", help="BLOCK_N,BLOCK_V (the default bwd tile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(common.RESULTS / "tile_skip_cpu.csv"))
    args = parser.parse_args(argv)
    block_n, block_v = (int(x) for x in args.block.split(","))
    log2_eps = [int(x) for x in args.log2_eps.split(",")]
    meta = common.run_metadata("cpu")
    rows, entropy = [], None
    for case in args.cases.split(","):
        if case == "smollm2":
            hidden, weight, targets, seq = smollm2_case(args.tokens, args.temperature, args.seed)
        elif case == "qwen-synthetic":
            # logit scale giving the smollm2 case's mean entropy (found by bisection on a row sample)
            hidden, weight, targets, seq = synthetic_case(args.tokens, 896, 151936,
                                                          _std_for_entropy(entropy or 1.0, args.temperature),
                                                          args.temperature, args.seed)
        else:
            raise ValueError(f"unknown case {case!r}")
        for r in measure(hidden, weight, targets, seq, args.temperature, [2.0 ** e for e in log2_eps], block_n,
                         block_v, args.seed):
            rows.append({**meta, "load_avg": common.load_avg(), "case": case, "N": hidden.shape[0],
                         "H": hidden.shape[1], "V": weight.shape[0], "temperature": args.temperature,
                         "BLOCK_N": block_n, "BLOCK_V": block_v, **r})
            entropy = r["mean_entropy"] if case == "smollm2" else entropy
        print(f"{case}: done", file=sys.stderr, flush=True)
    common.write_csv(Path(args.out), rows, COLUMNS)
    for r in rows:
        r["log2_eps"] = round(torch.log2(torch.tensor(r["filter_eps"])).item())
    print(markdown(rows))


def _std_for_entropy(target: float, temperature: float, v: int = 151936, rows: int = 64) -> float:
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(rows, v, generator=g, dtype=torch.float64)
    lo, hi = 0.1, 20.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        logp = torch.log_softmax(z0 * mid / temperature, -1)
        ent = float(-(logp.exp() * logp).sum(-1).mean())
        lo, hi = (mid, hi) if ent > target else (lo, mid)
    return (lo * hi) ** 0.5


if __name__ == "__main__":
    main()
