"""Reward throughput on BFCL-sized completions: is scoring ever the bottleneck of a training step?

    python benchmarks/bench_reward.py [--n 40000] [--kind binary] [--fmt python] [--out benchmarks/results/reward_cpu.csv]

Completions are the rendered ground truth of every BFCL v4 single-turn example (think + answer, ~100-600
characters), a third of them corrupted (a wrong value, or a cut-off answer) so that the error paths are timed
too. Rows: in-process on one core, and RewardScorer with 1 and 2 worker processes (pool started and warmed
before timing, as in training where it lives for the whole run). Wall-clock rates are best-of-N and median;
the CPU microseconds per completion (main process + workers) are the load-independent cost: on a machine
shared with other jobs the wall rate moves with the load average, which each row records. GRPO batches repeat each example
`--group` times, which the scorer exploits by sending each example once per chunk.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version as _version
from pathlib import Path

from fctrain.data import BFCL_CATEGORIES, BFCL_WHEEL, load_bfcl, render_target
from fctrain.reward import RewardScorer, score


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_cpu.csv"))
    args = ap.parse_args()

    texts, exs = workload(args.n, args.group, args.fmt, min(args.distinct, args.group))
    mean_chars = sum(map(len, texts)) / len(texts)
    rows = []

    def record(mode: str, processes: int, timings: list[tuple[float, float]], results) -> None:
        seconds, cpu_seconds = min(timings)
        median_seconds = sorted(t for t, _ in timings)[len(timings) // 2]
        rate = len(texts) / seconds
        rows.append({"mode": mode, "processes": processes, "n": len(texts), "group": args.group,
                     "distinct_texts": len(set(zip(texts, map(id, exs)))), "kind": args.kind, "fmt": args.fmt,
                     "mean_chars": round(mean_chars), "seconds": round(seconds, 4), "completions_per_s": round(rate),
                     "completions_per_s_median": round(len(texts) / median_seconds), "repeats": len(timings),
                     "cpu_us_per_completion": round(cpu_seconds / len(texts) * 1e6, 2),
                     "load_avg_1min": round(os.getloadavg()[0], 2),
                     "correct_fraction": round(sum(r.correct for r in results) / len(results), 4)})
        print(f"{mode:12s} processes={processes} | {rate:10,.0f} completions/s wall (best of {len(timings)}; "
              f"median {len(texts) / median_seconds:,.0f}) | "
              f"{cpu_seconds / len(texts) * 1e6:6.1f} us CPU each | load {os.getloadavg()[0]:.1f}")

    timings, results = [], None
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        results = [score(t, e, args.kind, args.fmt) for t, e in zip(texts, exs)]
        timings.append((time.perf_counter() - t0, time.process_time() - c0))
    record("in_process", 1, timings, results)

    for processes in (1, 2):
        with RewardScorer(args.kind, args.fmt, processes=processes, min_parallel=0) as scorer:
            scorer(texts[:2000], exs[:2000])  # start and warm the workers
            timings = []
            for _ in range(args.repeats):
                t0, c0, w0 = time.perf_counter(), time.process_time(), scorer.worker_cpu_s
                results = scorer(texts, exs)
                # CPU of the main process (dedupe, slimming, pickling) plus that of the workers
                timings.append((time.perf_counter() - t0, time.process_time() - c0 + scorer.worker_cpu_s - w0))
        record("pool", processes, timings, results)

    meta = {"machine": f"{cpu_name()} ({os.cpu_count()} cores, {platform.machine()})",
            "python": platform.python_version(), "fctrain": _version("fctrain"), "bfcl_data": BFCL_WHEEL,
            "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
