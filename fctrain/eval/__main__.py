"""The BFCL evaluation command line, `python -m fctrain.eval`: any model or checkpoint, a leaderboard-style
table, BFCL-format result files, a before/after comparison; scoring and aggregates are the fctrain.eval
library's (fctrain/eval/__init__.py).

    python -m fctrain.eval --model M [--categories ...] [--format python|hermes|bfcl] [--limit K]
                           [--think required|optional|prefill] [--engine vllm|hf|auto] [--max-tokens N] [--out DIR]
    python -m fctrain.eval --compare runs/eval/before runs/eval/after      # two summaries (files or run dirs)
    python -m fctrain.eval --rescore runs/eval/before                       # recount its result files
    python -m fctrain.eval ... --resume                                     # continue an interrupted run

What it does, in order:
1. Loads the BFCL v4 single-turn categories (fctrain.data.load_bfcl; `--limit K` keeps the first K of each)
   and renders each prompt in the chosen format: `python` (the paper's <think>/<answer> python-call list),
   `hermes` (<tool_call> JSON blocks) or `bfcl` (BFCL's own default prompting format).
2. Generates greedily (temperature 0, one completion per prompt) with the rollout engine.
3. Scores each completion with BFCL's rules (fctrain.eval.judge; its docstring says how, per category).
4. Writes `summary.json`, `table.txt` and BFCL result files `result/<name>/{non_live,live}/
   BFCL_v4_<category>_result.json` (one `{"id", "result"}` object per line, BFCL's layout; see
   fctrain.eval for what "result" holds), and `progress.json` for `--resume`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from fctrain import data
from fctrain.eval import (SINGLE_TURN, Record, bfcl_group_dir, compare_table, format_table, generate_records, judge,
                          load_summary, normalize_format, read_result_files, rescore, summarize,
                          write_result_files)
from fctrain.prompts import THINK_MODES, build_prompt_ids, think_prefill

def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _default_name(model: str | None) -> str:
    if model is None:
        from fctrain.models import DEFAULT_MODEL
        return DEFAULT_MODEL
    return Path(str(model).rstrip("/")).name.replace("/", "_") or "model"


def _model_context_length(model_path: Path) -> int | None:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def _make_engine(kind: str, model_path: Path, dtype: str | None, max_model_len: int,
                 kv_cache_gib: float | None = None):
    from fctrain import rollout

    hf_kw = {"dtype": dtype} if dtype else {}
    vllm_kw = hf_kw | {"max_model_len": max_model_len, "kv_cache_gib": kv_cache_gib}
    if kind == "hf":
        return rollout.make_engine("hf", model_path, **hf_kw)
    if kind == "vllm":
        return rollout.make_engine("vllm", model_path, **vllm_kw)
    try:
        return rollout.make_engine("vllm", model_path, **vllm_kw)
    except rollout.EngineUnavailableError as exc:
        print(f"[fctrain.eval] vLLM unavailable, using the transformers engine: {exc}", file=sys.stderr)
        return rollout.make_engine("hf", model_path, **hf_kw)


def _check_low_precision_engine(engine, model_path: Path, prompt_ids: list[list[int]]):
    """A vLLM engine below float32 is checked against a float32 transformers forward of the same weights
    (fctrain.rollout.check_engine): scores from a wrong engine would look like a bad model."""
    from fctrain import models, rollout

    import torch

    result = rollout.check_engine(engine, models.load_model(model_path, dtype=torch.float32), prompt_ids)
    print(f"[fctrain.eval] engine check: vLLM {result.dtype} {'ok' if result.ok else 'FAILED'}: {result.describe()}",
          file=sys.stderr)
    if not result.ok:
        engine.close()
        raise UsageError(f"the vLLM engine ({result.dtype}, CPU {rollout.cpu_summary() or 'unknown'}) computes "
                         f"log-probs {result.engine_error:.3f} nats from the model's weights on average (budget "
                         f"{result.budget:.3f}): its answers would be garbage. Fix: --dtype float32")


class UsageError(ValueError):
    """A bad input from the user (a path, a model, settings that do not match a run): main prints it as one
    `error:` line instead of a traceback."""


# What must match for `--resume` to continue a run: the same model, prompts and generation settings.
RESUME_KEYS = ("model_path", "name", "format", "max_tokens", "think")
RESUME_DEFAULTS = {"think": "required"}  # what a run recorded before the key existed used


def _resume_records(out: Path, name: str, meta: dict, examples, fmt: str) -> tuple[list[Record], float]:
    """The records a previous run of the same settings in `out` finished, re-judged from its result files
    (the raw text under "fctrain"."raw", else "result"), and the generation seconds it had spent."""
    state_path = out / "progress.json"
    if not state_path.exists():
        return [], 0.0
    state = json.loads(state_path.read_text())
    diff = {k: (state.get(k, RESUME_DEFAULTS.get(k)), meta[k]) for k in RESUME_KEYS
            if state.get(k, RESUME_DEFAULTS.get(k)) != meta[k]}
    if diff:
        raise UsageError(f"--resume: {out} holds a run with other settings "
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items()))
    by_id = {ex.id: ex for ex in examples}
    records = []
    result_dir = out / "result" / name
    for cat, entries in (read_result_files(result_dir) if result_dir.exists() else {}).items():
        for entry in entries:
            ex = by_id.get(entry.get("id"))
            if ex is None:  # a category or example outside this run's selection: left as it is
                continue
            ours = entry.get("fctrain") or {}
            rec = judge(ours.get("raw", entry["result"]), ex, fmt, think_required=meta["think"] != "optional")
            rec.prompt_tokens = int(entry.get("input_token_count") or 0)
            rec.output_tokens = int(entry.get("output_token_count") or 0)
            rec.finish_reason = str(ours.get("finish_reason", ""))
            records.append(rec)
    return records, float(state.get("generate_s", 0.0))


def run_cli(args) -> dict:
    from fctrain import models

    fmt = normalize_format(args.format)
    categories = args.categories or list(SINGLE_TURN)
    for cat in categories:
        bfcl_group_dir(cat)  # a clear error for a non-single-turn category
    name = args.name or _default_name(args.model)
    out = Path(args.out or Path("runs") / "eval" / f"{name}-{fmt}")
    if not args.resume and (out / "progress.json").exists():
        raise UsageError(f"{out} already holds an evaluation (progress.json); pass --resume to continue it, "
                         "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[fctrain.eval] {name} | format {fmt} | engine {args.engine} | max_tokens {args.max_tokens} | "
          f"categories {','.join(categories)} | limit {args.limit} | out {out}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        model_path = models.resolve_model(args.model)
        tokenizer = models.load_tokenizer(model_path)
    except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: no such model on an unreachable hub
        raise UsageError(f"--model {args.model}: {exc}") from None
    examples = data.load_bfcl(categories, limit=args.limit)
    if not examples:
        raise ValueError(f"no BFCL examples for categories {categories}")
    meta = {"model": str(args.model) if args.model else name, "model_path": str(model_path), "name": name,
            "format": fmt, "engine": args.engine, "max_tokens": args.max_tokens, "limit": args.limit,
            "think": args.think,
            "command": " ".join(["python -m fctrain.eval"] + sys.argv[1:]), "machine": _machine()}
    done, previous_s = _resume_records(out, name, meta, examples, fmt) if args.resume else ([], 0.0)
    if done:
        print(f"[fctrain.eval] resuming: {len(done)} of {len(examples)} examples already evaluated "
              f"({previous_s:.0f} s)", file=sys.stderr, flush=True)
    index = {ex.id: i for i, ex in enumerate(examples)}
    done_ids = {r.id for r in done}
    todo = [ex for ex in examples if ex.id not in done_ids]
    prefill = think_prefill(args.think)
    prompts = [build_prompt_ids(ex, tokenizer, fmt=fmt, prefill=prefill) for ex in examples]
    # Context: room for the longest prompt plus max_tokens, within the model's own limit. Prompts that do
    # not fit the model at all are scored as empty outputs (generate_records).
    context = _model_context_length(model_path) or 2048
    max_model_len = args.max_model_len or min(context, max(map(len, prompts)) + args.max_tokens)
    prompts = {ex.id: p for ex, p in zip(examples, prompts)}
    engine = _make_engine(args.engine, model_path, args.dtype, max_model_len, args.kv_cache_gib) if todo else None
    if engine is not None and getattr(engine, "dtype", "float32") != "float32" and hasattr(engine, "llm"):
        _check_low_precision_engine(engine, model_path, list(prompts.values())[:2])
    t_load = time.perf_counter() - t0
    meta |= {"engine_class": type(engine).__name__ if engine else None,
             "dtype": engine.dtype if engine else args.dtype, "max_model_len": max_model_len}
    records: list[Record] = list(done)

    def save_progress(generate_s):
        (out / "progress.json").write_text(json.dumps(meta | {"generate_s": generate_s,
                                                              "done": len(records)}, indent=2) + "\n")

    t_gen = 0.0
    try:
        t1 = time.perf_counter()
        # Batches span categories (vLLM is fastest with many prompts in flight); after each batch the
        # result files of the categories touched are rewritten and progress.json is updated, so an
        # interrupted run keeps what was finished and `--resume` continues it.
        step = max(args.batch_size, 1)
        for start in range(0, len(todo), step):
            batch = todo[start:start + step]
            recs = generate_records(engine, tokenizer, batch, fmt=fmt,
                                    max_tokens=args.max_tokens, batch_size=step,
                                    max_prompt_tokens=max_model_len - 1, progress=True,
                                    prompts=[prompts[ex.id] for ex in batch],
                                    think_required=args.think != "optional", prefill=prefill)
            records.extend(recs)
            records.sort(key=lambda r: index[r.id])
            touched = {r.category for r in recs}
            write_result_files([r for r in records if r.category in touched], out, name)
            t_gen = time.perf_counter() - t1
            save_progress(previous_s + t_gen)
            print(f"[fctrain.eval] {len(records)}/{len(examples)} examples, {sum(r.valid for r in records)} "
                  f"right, {previous_s + t_gen:.0f} s", file=sys.stderr, flush=True)
    finally:
        if engine is not None:
            engine.close()
    summary = meta | summarize(records)
    t_gen += previous_s
    summary["timing"] = {"load_s": t_load, "generate_and_score_s": t_gen,
                         "total_s": time.perf_counter() - t0 + previous_s,
                         "resumed_examples": len(done),
                         "generated_tokens_per_s": summary["tokens"]["generated"] / t_gen if t_gen else None}
    table = format_table(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"\n{summary['total']} examples in {summary['timing']['total_s']:.0f} s "
          f"({summary['tokens']['generated']} generated tokens); wrote {out}/summary.json, table.txt, "
          f"result/{name}/", file=sys.stderr)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fctrain.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir, checkpoint, hub id or offline name: qwen2.5-coder-0.5b "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--categories", nargs="+", default=None, metavar="CAT",
                   help=f"BFCL v4 single-turn categories (default: all {len(SINGLE_TURN)})")
    p.add_argument("--format", default="python", help="python (paper <think>/<answer>) | hermes | bfcl")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first K examples of each category")
    p.add_argument("--think", default="required", choices=THINK_MODES,
                   help="python format: the <think> block required (the paper), optional, or prefill (each prompt "
                        "ends with an opened <think>, as the trainer's --think prefill; judged on prefill + completion)")
    p.add_argument("--engine", default="auto", choices=("vllm", "hf", "auto"))
    p.add_argument("--max-tokens", type=int, default=256, help="generation cap per completion")
    p.add_argument("--batch-size", type=int, default=256, help="prompts per engine.generate call")
    p.add_argument("--dtype", default=None, help="engine dtype (default: the engine's)")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM context length (default: the engine's)")
    p.add_argument("--kv-cache-gib", type=float, default=4.0,
                   help="vLLM KV cache size on a CPU (GiB; long BFCL prompts need room to batch)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (same model, format and max tokens)")
    p.add_argument("--name", default=None, help="model name in the result folder (default: the model dir name)")
    p.add_argument("--out", default=None, help="output dir (default runs/eval/<name>-<format>)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print a before/after table of two summaries")
    p.add_argument("--rescore", metavar="DIR", help="recount a run's result files and print its table")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.max_tokens < 1 or args.batch_size < 1:
        p.error("--max-tokens and --batch-size must be >= 1")
    try:
        normalize_format(args.format)
        for cat in args.categories or ():
            bfcl_group_dir(cat)
    except ValueError as exc:
        p.error(str(exc))
    try:
        if args.compare:
            a, b = (load_summary(x) for x in args.compare)
            print(compare_table(a, b, Path(args.compare[0]).name, Path(args.compare[1]).name))
            return 0
        if args.rescore:
            print(format_table(rescore(args.rescore)))
            return 0
    except (ValueError, OSError) as exc:  # a missing or foreign summary / run directory
        raise SystemExit(f"error: {exc}") from None
    try:
        run_cli(args)
    except UsageError as exc:  # bad paths, models or settings: one line; anything else keeps its traceback
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
