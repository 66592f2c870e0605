"""Reward throughput on BFCL-sized completions: is scoring ever the bottleneck of a training step?

    python benchmarks/bench_reward.py [--n 40000] [--kind binary] [--fmt python] [--out benchmarks/results/reward_cpu.csv]

Completions are the rendered ground truth of every BFCL v4 single-turn example (think + answer, ~100-600
characters), a third of them corrupted (a wrong value, or a cut-off answer) so that the error paths are timed
too. Rows: `score` called once per completion, and the trainer's `RewardScorer` (each identical (text,
example) pair scored once; GRPO batches repeat each example `--group` times, `--distinct` of them differ).
Both run in this process: the trainer has no process pool (results/reward_cpu_pool.csv, from before it was
removed, measured a 2-worker pool slower than one process). Wall-clock rates are best-of-N and median; the
CPU microseconds per completion are the load-independent cost: on a machine shared with other jobs the wall
rate moves with the load average, which each row records.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fctrain.data import BFCL_CATEGORIES, BFCL_WHEEL, load_bfcl  # noqa: E402
from fctrain.prompts import render_target  # noqa: E402
from fctrain.reward import RewardScorer, score  # noqa: E402

COLUMNS = common.META_COLUMNS + [
    "bfcl_data", "mode", "n", "group", "distinct_texts", "kind", "fmt", "mean_chars", "seconds", "completions_per_s",
    "completions_per_s_median", "repeats", "cpu_us_per_completion", "correct_fraction"]


def workload(n: int, group: int, fmt: str, distinct_per_group: int):
    """`n` completions, `group` per example, of which `distinct_per_group` differ (the rest repeat one of
    them, as identical samples do in a GRPO group). Texts differ in their think (python/hermes) or spacing."""
    examples = load_bfcl(BFCL_CATEGORIES)
    texts, exs = [], []
    i = 0
    while len(texts) < n:
        ex = examples[i % len(examples)]
        good = render_target(ex, fmt)
        variants = []
        for g in range(distinct_per_group):
            uid = i * group + g
            text = good.replace("<think>", f"<think>Sample {uid}. ", 1) if "<think>" in good else good + " " * (uid % 97)
            k = uid % 3  # a third corrupted: a wrong value or a cut-off answer
            variants.append(text if k else (text[: len(text) * 2 // 3] if uid % 2 else text.replace("1", "2")))
        for g in range(group):
            texts.append(variants[g % distinct_per_group])
            exs.append(ex)
        i += 1
    return texts[:n], exs[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--group", type=int, default=8, help="completions per example (GRPO group size)")
    ap.add_argument("--distinct", type=int, default=8, help="distinct completions per group (8 = all unique)")
    ap.add_argument("--kind", default="binary")
    ap.add_argument("--fmt", default="python")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(common.RESULTS / "reward_cpu.csv"))
    args = ap.parse_args()

    texts, exs = workload(args.n, args.group, args.fmt, min(args.distinct, args.group))
    meta = common.run_metadata("cpu")
    modes = {"score": lambda: [score(t, e, args.kind, args.fmt) for t, e in zip(texts, exs)],
             "RewardScorer": lambda: RewardScorer(args.kind, args.fmt)(texts, exs)}
    rows = []
    for mode, call in modes.items():
        timings, results = [], None
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            results = call()
            timings.append((time.perf_counter() - t0, time.process_time() - c0))
        seconds, cpu_seconds = min(timings)
        median_seconds = sorted(t for t, _ in timings)[len(timings) // 2]
        rows.append({**meta, "load_avg": common.load_avg(), "bfcl_data": BFCL_WHEEL, "mode": mode, "n": len(texts),
                     "group": args.group, "distinct_texts": len(set(zip(texts, map(id, exs)))), "kind": args.kind,
                     "fmt": args.fmt, "mean_chars": round(sum(map(len, texts)) / len(texts)),
                     "seconds": seconds, "completions_per_s": round(len(texts) / seconds),
                     "completions_per_s_median": round(len(texts) / median_seconds), "repeats": len(timings),
                     "cpu_us_per_completion": cpu_seconds / len(texts) * 1e6,
                     "correct_fraction": sum(r.correct for r in results) / len(results)})
        print(f"{mode:12s} | {len(texts) / seconds:10,.0f} completions/s wall (best of {len(timings)}; median "
              f"{len(texts) / median_seconds:,.0f}) | {cpu_seconds / len(texts) * 1e6:6.1f} us CPU each | "
              f"load {common.load_avg()}")
    print(f"wrote {common.write_csv(Path(args.out), rows, COLUMNS)}", file=sys.stderr)


if __name__ == "__main__":
    main()
