"""Parser fuzzing at scale: hostile completions through fctrain.reward.parse and score, counting crashes.

    python benchmarks/bench_parser_fuzz.py [--n 1000000] [--seed 0]

Model output is untrusted text. `reward.parse` must never raise (it returns a Parsed with an error) and never
evaluate what it reads, and `reward.score` must never raise on any parse result. This feeds both at least
--n inputs from generators of hostile text (random characters, mutations of correct answers, deep nesting,
huge literals, many calls, tag soup, JSON bombs, control characters and lone surrogates) in all three formats,
and writes per generator x format: inputs, crashes, and the CPU time per input (mean, p99, max; thread CPU
time, so a busy machine does not inflate it). A crash is any exception; the first few are printed with their
input. Results: results/parser_fuzz_cpu.csv (+ .json with metadata and the slowest inputs' descriptions).
"""
from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fctrain import data, reward  # noqa: E402
from fctrain.prompts import render_target  # noqa: E402

FORMATS = ("python", "hermes", "bfcl")
ALPHABET = string.printable + "\x00\x1b\u00e9\u4e2d\U0001f600\ud800\u202e<>[](){}'\"=,.:_\\"


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 400)))


def _mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        op, i = rng.randrange(5), rng.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op == 1:
            chars.insert(i, rng.choice(ALPHABET))
        elif op == 2 and chars:  # duplicate a slice
            j = rng.randrange(len(chars))
            chars[i:i] = chars[j:j + rng.randint(1, 40)]
        elif op == 3:
            chars = chars[:i]  # truncation, as at max_new_tokens
        else:
            chars.insert(i, rng.choice(["<think>", "</think>", "<answer>", "</answer>", "<tool_call>",
                                        "</tool_call>", "[", "]", "(", ")", "{", "}", "'", '"', "\\", ","]))
    return "".join(chars)


def _nested(rng: random.Random, fmt: str) -> str:
    depth = rng.choice([30, 200, 5000, 50_000])
    if fmt == "hermes":
        body = '{"name": "f", "arguments": {"a": ' + "[" * depth + "]" * depth + "}}"
        return f"<think>x</think><tool_call>{body}</tool_call>"
    arg = rng.choice(["[", "{'k': ", "(", "f("]) * depth
    return f"<think>x</think><answer>[f(a={arg})]</answer>"


def _huge(rng: random.Random, fmt: str) -> str:
    value = rng.choice(["9" * rng.randint(100, 30_000), "'" + "x" * rng.randint(1000, 40_000) + "'",
                        "1e999999", "-" * 5000 + "1", "0x" + "f" * 20_000, "1_0" * 3000])
    if fmt == "hermes":
        return f'<think>x</think><tool_call>{{"name": "f", "arguments": {{"a": {value}}}}}</tool_call>'
    return f"<think>x</think><answer>[f(a={value})]</answer>"


def _many_calls(rng: random.Random, fmt: str) -> str:
    n = rng.choice([65, 500, 5000])
    if fmt == "hermes":
        return "<think>x</think>" + "".join(
            f'<tool_call>{{"name": "f{i}", "arguments": {{}}}}</tool_call>' for i in range(n))
    return "<think>x</think><answer>[" + ", ".join(f"f{i}(a={i})" for i in range(n)) + "]</answer>"


def _tag_soup(rng: random.Random, fmt: str) -> str:
    tags = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "[f()]", "{}", "\n"]
    return "".join(rng.choice(tags) for _ in range(rng.randint(1, 300)))


def _code(rng: random.Random, fmt: str) -> str:
    # things a naive parser would run: none of it may be evaluated
    snippet = rng.choice(["__import__('os').system('echo pwned')", "open('/etc/passwd').read()",
                          "(lambda: 1)()", "[x for x in range(10**9)]", "f(**{'a': 1})", "f(*[1, 2])",
                          "a.b.c.d(e=f.g)", "f(a=b'bytes')", "f(a={1, 2})", "f(a=1 if True else 2)",
                          "f(a=-(-(-1)))", "f(a=not True)", "f(a=...)", "f(a=1j)", "f(a=f'{x}')"])
    if fmt == "hermes":
        return f'<think>x</think><tool_call>{{"name": "{snippet}", "arguments": "{snippet}"}}</tool_call>'
    return f"<think>x</think><answer>[{snippet}]</answer>"


def generators(examples):
    targets = {fmt: [render_target(e, fmt) for e in examples] for fmt in FORMATS}
    return {
        "random": lambda rng, fmt: _random_text(rng),
        "mutated_answer": lambda rng, fmt: _mutate(rng, rng.choice(targets[fmt])),
        "deep_nesting": _nested,
        "huge_literal": _huge,
        "many_calls": _many_calls,
        "tag_soup": _tag_soup,
        "code_not_data": _code,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="total inputs (split over generators x formats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(common.RESULTS / "parser_fuzz_cpu.csv"))
    args = ap.parse_args(argv)

    examples = data.load_bfcl("simple_python,multiple,parallel,irrelevance,live_simple", limit=None)
    gens = generators(examples)
    per_cell = -(-args.n // (len(gens) * len(FORMATS)))
    rows, slowest, crashes = [], [], []
    t_start = time.time()
    for g, (gname, make) in enumerate(gens.items()):
        for f, fmt in enumerate(FORMATS):
            rng = random.Random(args.seed * 1000 + g * 10 + f)
            times, n_crash, n_ok = [], 0, 0
            for _ in range(per_cell):
                text = make(rng, fmt)
                ex = rng.choice(examples)
                t0 = time.thread_time_ns()
                try:
                    parsed = reward.parse(text, fmt)
                    reward.score(text, ex, "partial", fmt)
                    n_ok += parsed.ok
                except Exception as e:  # the finding this benchmark exists for
                    n_crash += 1
                    if len(crashes) < 5:
                        crashes.append({"generator": gname, "fmt": fmt, "error": repr(e)[:300], "input": text[:300]})
                dt = time.thread_time_ns() - t0
                times.append(dt)
                if len(slowest) < 5 or dt > slowest[-1][0]:
                    slowest = sorted(slowest + [(dt, gname, fmt, len(text), text[:80])], reverse=True)[:5]
            times.sort()
            rows.append({"generator": gname, "fmt": fmt, "inputs": per_cell, "parsed_ok": n_ok, "crashes": n_crash,
                         "mean_us": sum(times) / len(times) / 1e3, "p99_us": times[int(0.99 * (len(times) - 1))] / 1e3,
                         "max_ms": times[-1] / 1e6})
            print(f"{gname:15s} {fmt:7s} {per_cell} inputs, {n_ok} parsed, {n_crash} crashes, "
                  f"max {times[-1] / 1e6:.2f} ms", flush=True)
    out = Path(args.out)
    common.write_csv(out, rows, list(rows[0]))
    total = sum(r["inputs"] for r in rows)
    meta = common.run_metadata("cpu") | {
        "inputs": total, "crashes": sum(r["crashes"] for r in rows), "wall_s": time.time() - t_start,
        "worst_ms": max(r["max_ms"] for r in rows), "first_crashes": crashes,
        "slowest": [{"cpu_ms": t / 1e6, "generator": g, "fmt": f, "chars": n, "head": h} for t, g, f, n, h in slowest],
        "load_avg_end": common.load_avg()}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{total} inputs, {meta['crashes']} crashes, worst {meta['worst_ms']:.1f} ms CPU per input "
          f"({meta['wall_s']:.0f} s wall) -> {out}")
    return 1 if meta["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
