"""The RL training phase, fctrain against TRL's GRPOTrainer, on identical work.

    python benchmarks/bench_train.py [--prompts 4] [--group 4] [--max-new-tokens 96] [--steps 3]
                                     [--providers trl,fctrain,fctrain-packed,fctrain-padded,fctrain-naive]
                                     [--model DIR] [--out benchmarks/results/train_cpu.csv]

Work: SmolLM2-135M-Instruct (fp32 master weights, AdamW, the default run's settings), `--prompts` BFCL
prompts from the default training split x `--group` completions each, sampled once from the model at
T=0.7 by fctrain's transformers engine (with their sampling log-probs) and shared by every provider, with
fixed binary rewards (every group has reward variance, so every sequence is trained). One step of the
training phase = what both trainers do between rollout and weight sync:
  old log-probs (no grad) + reference log-probs (no grad, beta=0.001) + clipped loss forward/backward over
  micro-batches + gradient clipping + AdamW step.
TRL is driven through its own code: `GRPOTrainer._get_per_token_logps_and_entropies` for the old and
reference passes (as GRPOTrainer does with vLLM rollouts) and `GRPOTrainer.compute_loss` + the accelerator's
backward (what its training_step does after rollout; DAPO loss = fctrain's token-mean; TRL's own chunked
fused LM head, so TRL never materialises full logits either) per micro-batch of
`per_device_train_batch_size` sequences, padded the way TRL pads (prompts left, completions right, across
the generation batch), the largest divisor of the batch whose padded tokens fit fctrain's 4096-token
micro-batch budget. TRL's per-token vLLM importance ratio (one multiply) is not applied.
Providers: fctrain (default: shared-prompt packing, chunked torch loss on CPU), fctrain-packed,
fctrain-padded, fctrain-naive (default layout, loss with full [tokens x vocab] logits), fctrain-amp-bf16
(fp32 master weights, bf16 autocast).

Each provider runs in its own process: the median step time over `--steps` timed steps after one warm-up
step, and memory as the process peak RSS and as the peak above the RSS with both models loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = common.META_COLUMNS + [
    "provider", "transformers", "trl", "prompts", "group", "sequences", "prompt_tokens_mean", "completion_tokens_mean",
    "micro_batches", "computed_tokens", "steps", "step_s", "step_p20_s", "step_p80_s", "rss_loaded_mb",
    "peak_rss_mb", "train_peak_extra_mb", "loss_first_step", "time_vs_trl", "peak_rss_vs_trl", "train_mem_vs_trl",
    "status"]
PROVIDERS = ("trl", "fctrain", "fctrain-packed", "fctrain-padded", "fctrain-naive", "fctrain-amp-bf16")

# The trainer settings this benchmark was measured with (results/train_cpu.csv), pinned so that changing the
# trainer's defaults does not silently change what it measures: a KL reference pass (beta 0.001) included.
SETTINGS = dict(train_data="bfcl:live_simple,simple_python", beta=0.001, lr=5e-5)


def make_workload(model_dir: str, prompts: int, group: int, max_new_tokens: int, seed: int = 0) -> dict:
    """BFCL prompts + completions sampled from the model itself (T=0.7) + binary rewards with variance."""
    import random

    import torch

    from fctrain import data, models, rollout
    from fctrain.config import Config
    from fctrain.prompts import build_prompt_ids, filter_by_length
    cfg = Config(**SETTINGS)
    tok = models.load_tokenizer(model_dir)
    examples = filter_by_length(data.load_any(cfg.train_data), tok, cfg.max_prompt_tokens, cfg.fmt)
    examples = data.shuffle(examples, seed)[:prompts]
    prompt_ids = [build_prompt_ids(e, tok, cfg.fmt) for e in examples]
    engine = rollout.HFEngine(models.load_model(model_dir), tokenizer=tok)
    groups = engine.generate(prompt_ids, n=group, temperature=cfg.temperature, top_p=1.0,
                             max_tokens=max_new_tokens, seed=seed)
    rng = random.Random(seed)
    seqs = []
    for g, (p, comps) in enumerate(zip(prompt_ids, groups)):
        rewards = [1.0, 0.0] + [float(rng.random() < 0.5) for _ in range(group - 2)]
        rng.shuffle(rewards)
        for c, r in zip(comps, rewards):
            c_ids = c.token_ids or [tok.eos_token_id]
            lps = c.logprobs or [0.0]
            seqs.append({"group": g, "prompt": p, "completion": c_ids, "logprobs": lps, "text": c.text, "reward": r})
    del engine
    torch.manual_seed(0)
    return {"model": str(model_dir), "group": group, "max_new_tokens": max_new_tokens, "seqs": seqs}


def _advantages(work):
    import torch

    from fctrain import run
    rewards = torch.tensor([s["reward"] for s in work["seqs"]]).view(-1, work["group"])
    adv, zero_var = run.group_advantages(rewards)
    assert not zero_var.any()
    return adv.flatten()


def _time_steps(step, steps: int) -> dict:
    rss_loaded = common.reset_peak_rss()
    times, first = [], None
    for i in range(steps + 1):  # the first step is a warm-up (allocates AdamW's state)
        t0 = time.perf_counter()
        loss = step()
        if i == 0:
            first = loss
        else:
            times.append(time.perf_counter() - t0)
    sp = common.spread(times)
    return {"step_s": sp["time_ms"], "step_p20_s": sp["time_p20_ms"], "step_p80_s": sp["time_p80_ms"],
            "steps": steps, "rss_loaded_mb": rss_loaded / 2**20, "train_peak_extra_mb": (common.peak_rss() - rss_loaded) / 2**20,
            "loss_first_step": first}


def worker_fctrain(spec: dict, work: dict) -> dict:
    import dataclasses

    import torch

    from fctrain import models, packing, run
    from fctrain.config import ADAMW_BETAS, Config
    layout = {"fctrain-packed": "packed", "fctrain-padded": "padded"}.get(spec["provider"], "shared")
    cfg = dataclasses.replace(Config(**SETTINGS), impl="naive" if spec["provider"] == "fctrain-naive" else "auto",
                              max_new_tokens=work["max_new_tokens"],
                              train_dtype="amp-bf16" if spec["provider"] == "fctrain-amp-bf16" else "float32")
    model = models.load_model(work["model"]).train()
    model.config.use_cache = False
    ref = models.load_model(work["model"]).eval().requires_grad_(False)
    tok = models.load_tokenizer(work["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=ADAMW_BETAS, weight_decay=cfg.weight_decay,
                            foreach=True)
    seqs = [packing.Seq(s["prompt"], s["completion"], s["group"]) for s in work["seqs"]]
    thinks = [run.think_token_mask(tok, s["completion"], s["text"], cfg.fmt) for s in work["seqs"]]
    adv = _advantages(work)
    rollout = [s["logprobs"] for s in work["seqs"]]
    info = {}

    def step():
        res = run.train_on_rollouts(cfg, model, ref, opt, cfg.lr, seqs, adv, rollout, thinks, layout, False, "cpu")
        info["computed_tokens"] = res.stats["computed_tokens"]
        return res.stats["loss"]

    out = _time_steps(step, spec["steps"])
    out["micro_batches"] = len(packing.plan(seqs, cfg.micro_batch_tokens, layout))
    out["computed_tokens"] = info["computed_tokens"]
    return out


def worker_trl(spec: dict, work: dict) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fctrain import models
    from fctrain.config import ADAMW_BETAS, Config
    cfg = Config(**SETTINGS)
    seqs = work["seqs"]
    n, group = len(seqs), work["group"]
    p_len = max(len(s["prompt"]) for s in seqs)
    c_len = max(len(s["completion"]) for s in seqs)
    per_device = max([b for b in range(1, n + 1) if n % b == 0 and b * (p_len + c_len) <= cfg.micro_batch_tokens]
                     or [1])
    args = GRPOConfig(output_dir=str(Path(spec["tmp"]) / "trl"), per_device_train_batch_size=per_device,
                      gradient_accumulation_steps=n // per_device, num_generations=group,
                      max_completion_length=work["max_new_tokens"], temperature=cfg.temperature, beta=cfg.beta,
                      epsilon=cfg.eps_low, loss_type="dapo", learning_rate=cfg.lr, max_grad_norm=cfg.grad_clip,
                      use_cpu=True, bf16=False, report_to=[], logging_steps=10**9, save_strategy="no")
    model = models.load_model(work["model"])
    dataset = Dataset.from_dict({"prompt": ["unused"] * n})
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    opt, model = trainer.optimizer, trainer.model
    for g in opt.param_groups:  # same AdamW as fctrain's (betas, constant lr)
        g["betas"], g["lr"] = ADAMW_BETAS, cfg.lr
    trainer.current_gradient_accumulation_steps = n // per_device  # set by Trainer's own loop otherwise
    model.train()
    pad = trainer.processing_class.pad_token_id or 0
    prompt_ids = torch.full((n, p_len), pad)
    prompt_mask = torch.zeros(n, p_len, dtype=torch.long)
    comp_ids = torch.full((n, c_len), pad)
    comp_mask = torch.zeros(n, c_len, dtype=torch.long)
    for i, s in enumerate(seqs):  # TRL's layout: prompts left-padded, completions right-padded
        prompt_ids[i, p_len - len(s["prompt"]):] = torch.tensor(s["prompt"])
        prompt_mask[i, p_len - len(s["prompt"]):] = 1
        comp_ids[i, :len(s["completion"])] = torch.tensor(s["completion"])
        comp_mask[i, :len(s["completion"])] = 1
    adv = _advantages(work)
    ids, attn = torch.cat([prompt_ids, comp_ids], 1), torch.cat([prompt_mask, comp_mask], 1)
    num_items = comp_mask.sum()

    def step():
        with torch.no_grad():  # old and reference log-probs, as GRPOTrainer computes them after a vLLM rollout
            old, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, c_len, batch_size=per_device)
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, attn, c_len,
                                                                    batch_size=per_device)
        total = 0.0
        for lo in range(0, n, per_device):
            sl = slice(lo, lo + per_device)
            inputs = {"prompt_ids": prompt_ids[sl], "prompt_mask": prompt_mask[sl], "completion_ids": comp_ids[sl],
                      "completion_mask": comp_mask[sl], "advantages": adv[sl], "num_items_in_batch": num_items,
                      "old_per_token_logps": old[sl], "ref_per_token_logps": ref[sl]}
            loss = trainer.compute_loss(model, inputs)  # GRPOTrainer.training_step minus its rollout
            trainer.accelerator.backward(loss)
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    out = _time_steps(step, spec["steps"])
    out["micro_batches"] = n // per_device
    out["computed_tokens"] = 3 * ids.numel()  # old + reference + policy forwards, padded tokens
    return out


def worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    work = json.loads(Path(spec["workload"]).read_text())
    fn = worker_trl if spec["provider"] == "trl" else worker_fctrain
    out = fn(spec, work)
    out["peak_rss_mb"] = common._status_kib("VmHWM") / 1024
    out["status"] = "ok"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--steps", type=int, default=3, help="timed steps per provider (after one warm-up step)")
    p.add_argument("--model", default="", help="model dir (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "train_cpu.csv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        common.report_from_worker(worker(json.loads(args.worker)))
        return
    providers = args.providers.split(",")
    bad = [x for x in providers if x not in PROVIDERS]
    if bad or args.prompts < 1 or args.group < 2 or args.steps < 1:
        p.error(f"unknown providers {bad} (choose from {PROVIDERS}), or --prompts < 1, --group < 2, --steps < 1")

    import tempfile

    from fctrain import models
    model_dir = str(models.resolve_model(args.model or None))
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    print(f"sampling the workload: {args.prompts} prompts x {args.group} completions ...", flush=True)
    work = make_workload(model_dir, args.prompts, args.group, args.max_new_tokens)
    (tmp / "work.json").write_text(json.dumps(work))
    seqs = work["seqs"]
    meta = common.run_metadata("cpu")
    meta.update(transformers=common.package_version("transformers"), trl=common.package_version("trl"))
    shape = {"prompts": args.prompts, "group": args.group, "sequences": len(seqs),
             "prompt_tokens_mean": statistics.mean(len(s["prompt"]) for s in seqs),
             "completion_tokens_mean": statistics.mean(len(s["completion"]) for s in seqs)}
    print(f"  prompt tokens mean {shape['prompt_tokens_mean']:.0f}, completion tokens mean "
          f"{shape['completion_tokens_mean']:.1f}", flush=True)
    rows = []
    for name in providers:
        spec = {"provider": name, "workload": str(tmp / "work.json"), "steps": args.steps, "tmp": str(tmp)}
        print(f"{name} ...", flush=True)
        result = common.run_isolated(Path(__file__), spec, env={"TRANSFORMERS_VERBOSITY": "error"}, timeout_s=3600)
        row = {**meta, **shape, "provider": name, **result}
        rows.append(row)
        print("   ", {k: row.get(k) for k in ("step_s", "peak_rss_mb", "train_peak_extra_mb", "computed_tokens",
                                               "loss_first_step", "load_avg", "status")}, flush=True)
        trl = next((r for r in rows if r["provider"] == "trl" and r.get("status") == "ok"), None)
        common.add_ratios(rows, trl, {"time_vs_trl": "step_s", "peak_rss_vs_trl": "peak_rss_mb",
                                      "train_mem_vs_trl": "train_peak_extra_mb"})
        common.write_csv(args.out, rows, COLUMNS)  # after every provider: a killed run keeps what it measured
    import plot
    print(f"wrote {args.out} and {plot.plot_train(args.out)}")


if __name__ == "__main__":
    main()
