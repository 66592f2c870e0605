"""The paper's two-stage data cleaning: rule/AST validation, then an LLM judge; and its command line.

    python -m fctrain.cleaning validate --input data.jsonl|bfcl:simple_python,multiple --output clean.jsonl \
        --report validate.json
    python -m fctrain.cleaning judge --input clean.jsonl --output judged.jsonl --report judge.json [--model DIR]

    kept, report = validate(examples)                       # stage 1, no model
    kept, report = llm_judge(kept, engine, tokenizer)       # stage 2, through a fctrain.rollout engine

`validate` checks every ground-truth call against its schema with the reward module's own type rules, repairs
what is unambiguous (a number written as a string, a bare value not wrapped in a list, JSON-schema type
aliases) and drops the rest, counting every reason. `llm_judge` asks an LLM to evaluate each example, to
correct the ones it rejects, and evaluates the corrections once more. (`python -m fctrain.data` is the same
command line under its old name, kept as an alias for one release.)
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

from fctrain import reward
from fctrain.data import load_any, save_jsonl
from fctrain.example import Example
from fctrain.prompts import chat_prompt_ids, render_target

# ---------------------------------------------------------------------------------------------------------
# stage 1: rule/AST validation

_TYPE_ALIASES = {"object": "dict", "number": "float", "list": "array", "str": "string", "int": "integer",
                 "bool": "boolean", "double": "float"}


class _Drop(Exception):
    pass


def _repair_value(value, spec: dict):
    """A value of the schema's type equal to `value` written differently (numbers/booleans as strings)."""
    t = spec.get("type")
    if isinstance(value, str):
        s = value.strip()
        if t == "integer" and re.fullmatch(r"[+-]?\d{1,18}", s):
            return int(s)
        if t == "float" and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
            return float(s)
        if t == "boolean" and s.lower() in ("true", "false"):
            return s.lower() == "true"
    if t == "integer" and isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    return None


def _value_ok(p: str, value, spec: dict) -> bool:
    """Whether an allowed value has the schema's type (dict parameters hold {key: [allowed]} per key).

    Stricter than the checker's type rule, which accepts any value whose type matches the possible answer's
    ("variables"), so checking a value against itself would always pass. Ints pass for floats at any depth
    (the checker compares them equal).
    """
    t = spec.get("type")
    if t in ("string", "any"):
        return isinstance(value, str)
    if t == "integer":
        return type(value) is int
    if t == "float":
        return type(value) in (int, float)
    if t == "boolean":
        return type(value) is bool
    if t == "dict":
        return isinstance(value, dict) and all(isinstance(v, list) for v in value.values())
    if t in ("array", "tuple"):
        items = spec.get("items", {})
        if items.get("type") == "dict":
            return isinstance(value, list) and all(isinstance(v, dict) for v in value)
        return isinstance(value, (list, tuple)) and all(_value_ok(p, v, items) for v in value)
    return False


def validate_example(example: Example) -> tuple[Example, list[str]]:
    """A checked (possibly repaired) copy and the list of repairs; raises _Drop(reason) if unusable."""
    ex = copy.deepcopy(example)
    repairs: list[str] = []
    if not any(m["role"] == "user" and m["content"].strip() for m in ex.messages):
        raise _Drop("no_user_message")
    if not ex.tools and not reward.is_irrelevance(ex.category):
        raise _Drop("no_tools")
    names = [t["name"] for t in ex.tools]
    if len(set(names)) != len(names):
        raise _Drop("duplicate_function_name")
    for t in ex.tools:
        params = t.get("parameters")
        if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
            raise _Drop("schema_without_parameters")
        if params.get("type") != "dict":
            params["type"] = "dict"
            repairs.append("schema_parameters_type")
        params.setdefault("properties", {})
        if "required" not in params:
            params["required"] = []
            repairs.append("schema_required_missing")
        for p in params["required"]:
            if p not in params["properties"]:
                raise _Drop("schema_required_not_a_property")
        for p, spec in params["properties"].items():
            if not isinstance(spec, dict):
                raise _Drop("schema_param_not_object")
            for s in (spec, spec.get("items") if isinstance(spec.get("items"), dict) else None):
                if s is not None and s.get("type") in _TYPE_ALIASES:
                    s["type"] = _TYPE_ALIASES[s["type"]]
                    repairs.append("schema_type_alias")
            if spec.get("type") not in reward.PY_TYPES:
                raise _Drop("schema_unsupported_type")
            if spec["type"] in ("array", "tuple") and spec.get("items", {}).get("type") not in reward.PY_TYPES:
                raise _Drop("schema_array_without_item_type")
    if reward.is_irrelevance(ex.category) or (reward.is_relevance(ex.category) and not ex.ground_truth):
        if ex.ground_truth and reward.is_irrelevance(ex.category):
            raise _Drop("irrelevance_with_ground_truth")
        return ex, repairs
    if not ex.ground_truth:
        raise _Drop("no_ground_truth")
    if "parallel" not in ex.category and len(ex.ground_truth) != 1:
        raise _Drop("call_count_does_not_match_category")
    by_name = {t["name"]: t for t in ex.tools}
    for answer in ex.ground_truth:
        (name, allowed_by_param), = answer.items()
        if name not in by_name:
            raise _Drop("unknown_function")
        params = by_name[name]["parameters"]
        for p in params["required"]:
            if p not in allowed_by_param:
                raise _Drop("missing_required_param")
        for p in list(allowed_by_param):
            allowed = allowed_by_param[p]
            if not isinstance(allowed, list):
                allowed_by_param[p] = allowed = [allowed]
                repairs.append("allowed_values_not_a_list")
            if p not in params["properties"]:
                if "" in allowed:  # omittable anyway, and a model passing it fails either way
                    del allowed_by_param[p]
                    repairs.append("removed_omittable_unknown_param")
                    continue
                raise _Drop("unknown_param")
            if not allowed or all(a == "" for a in allowed) and p in params["required"]:
                raise _Drop("required_param_without_value")
            spec = params["properties"][p]
            kept_values = []
            for value in allowed:
                if value == "" or _value_ok(p, value, spec):  # "" = may be omitted
                    kept_values.append(value)
                    continue
                fixed = _repair_value(value, spec)
                if fixed is not None and _value_ok(p, fixed, spec):
                    kept_values.append(fixed)
                    repairs.append("value_type_repaired")
                elif isinstance(value, str):
                    # BFCL accepts a string where the schema wants another type as a variable name
                    # (e.g. x="data['sales']" for an array); its checker then compares it as given.
                    kept_values.append(value)
                    repairs.append("note:string_as_variable")
                else:
                    repairs.append("removed_mistyped_alternative")
            if not kept_values or (p in params["required"] and all(v == "" for v in kept_values)):
                raise _Drop("value_type_mismatch")
            allowed[:] = kept_values
    for fmt in ("python", "hermes"):  # the reward must be able to pay 1 for this example
        parsed = reward.parse(render_target(ex, fmt), fmt)
        if not parsed.ok or not reward.check(parsed.calls, ex.tools, ex.ground_truth, ex.category)["valid"]:
            raise _Drop(f"target_does_not_check_{fmt}")
    return ex, repairs


def validate(examples: Iterable[Example]) -> tuple[list[Example], dict]:
    """Stage 1: (kept examples, report with counts of dropped and repaired reasons and sample ids)."""
    kept, dropped, repaired, samples, n_in = [], Counter(), Counter(), {}, 0
    for ex in examples:
        n_in += 1
        try:
            fixed, repairs = validate_example(ex)
        except (_Drop, KeyError, TypeError, AttributeError, ValueError) as e:
            reason = str(e) if isinstance(e, _Drop) else f"malformed:{type(e).__name__}"
            dropped[reason] += 1
            ids = samples.setdefault(reason, [])
            if len(ids) < 5:
                ids.append(ex.id)
            continue
        repaired.update(set(repairs))  # counted once per example
        kept.append(fixed)
    report = {"stage": "validate", "n_in": n_in, "n_out": len(kept), "dropped": dict(dropped),
              "repaired_examples": dict(repaired), "sample_ids": samples}
    return kept, report


# ---------------------------------------------------------------------------------------------------------
# stage 2: LLM judge (evaluate -> correct -> final evaluation), through fctrain.rollout's engine

_JUDGE_SYSTEM = (
    "You review training data for a function-calling assistant. You get the available functions (JSON), a "
    "conversation, and a proposed answer: the function calls the assistant should make. Decide whether the "
    "answer is correct: the right functions, every required argument present, every argument value taken "
    "from or implied by the conversation (nothing invented), and no call when no function fits. Reply with "
    "one or two sentences of reasoning, then a last line that is exactly VERDICT: CORRECT or VERDICT: INCORRECT."
)
_CORRECT_SYSTEM = (
    "You fix training data for a function-calling assistant. You get the available functions (JSON), a "
    "conversation, a proposed answer and a reviewer's objection. Write the correct function calls as a Python "
    "list of calls with keyword arguments inside <answer>...</answer>, e.g. <answer>[get_weather(city='Paris')]"
    "</answer>, or <answer>[]</answer> if no function should be called. Write nothing else."
)
_VERDICT_RE = re.compile(r"VERDICT:\s*(CORRECT|INCORRECT)", re.IGNORECASE)
_ANSWER_ONLY_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _conversation(ex: Example) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in ex.messages)


def _judge_messages(ex: Example, answer: str) -> list[dict]:
    user = (f"Functions:\n{json.dumps(ex.tools, ensure_ascii=False)}\n\nConversation:\n{_conversation(ex)}\n\n"
            f"Proposed answer: {answer}")
    return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}]


def _correct_messages(ex: Example, answer: str, objection: str) -> list[dict]:
    user = (f"Functions:\n{json.dumps(ex.tools, ensure_ascii=False)}\n\nConversation:\n{_conversation(ex)}\n\n"
            f"Proposed answer: {answer}\n\nReviewer: {objection.strip()[-1000:]}")
    return [{"role": "system", "content": _CORRECT_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> bool | None:
    """True/False for the last VERDICT line, None when there is none."""
    found = _VERDICT_RE.findall(text)
    return found[-1].upper() == "CORRECT" if found else None


def calls_to_ground_truth(calls: list[dict], tools: list[dict]) -> list[dict]:
    """Concrete calls -> possible-answer form; schema-optional parameters left out become omittable."""
    by_name = {t["name"]: t for t in tools}
    truth = []
    for call in calls:
        (name, args), = call.items()
        allowed = {p: [v] for p, v in args.items()}
        params = by_name.get(name, {}).get("parameters", {})
        for p in params.get("properties", {}):
            if p not in allowed and p not in params.get("required", []):
                allowed[p] = [""]
        truth.append({name: allowed})
    return truth


def _answer_text(ex: Example) -> str:
    return render_target(ex, "bfcl") if not reward.is_irrelevance(ex.category) else "[] (no call)"


def llm_judge(examples: list[Example], engine, tokenizer, max_tokens: int = 256, batch_size: int = 64,
              seed: int = 0) -> tuple[list[Example], dict]:
    """Stage 2: evaluate every example with the LLM; correct the rejected ones; evaluate corrections again.

    Kept: examples judged correct at once, and corrections that parse, pass stage 1 and are then judged
    correct. Greedy decoding (temperature 0) so that a rerun gives the same data.
    """
    def run(message_lists: list[list[dict]]) -> list[str]:
        texts = []
        for lo in range(0, len(message_lists), batch_size):
            ids = [chat_prompt_ids(tokenizer, m) for m in message_lists[lo:lo + batch_size]]
            out = engine.generate(ids, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, stop=None, seed=seed)
            texts.extend(o[0].text for o in out)
        return texts

    counts = Counter()
    first = run([_judge_messages(ex, _answer_text(ex)) for ex in examples])
    kept, to_fix = [], []
    for ex, text in zip(examples, first):
        verdict = parse_verdict(text)
        counts["evaluate:" + {True: "correct", False: "incorrect", None: "no_verdict"}[verdict]] += 1
        if verdict:
            kept.append(ex)
        else:
            to_fix.append((ex, text))
    fixes = run([_correct_messages(ex, _answer_text(ex), why) for ex, why in to_fix])
    candidates = []
    for (ex, _), text in zip(to_fix, fixes):
        m = _ANSWER_ONLY_RE.search(text)
        parsed = reward.parse(f"<think></think><answer>{m.group(1)}</answer>", "python") if m else None
        if parsed is None or not parsed.ok:
            counts["correct:unparsable"] += 1
            continue
        if not parsed.calls:
            fixed = Example(ex.id, "irrelevance" if "live" not in ex.category else "live_irrelevance",
                            ex.messages, ex.tools, [])
        else:
            fixed = Example(ex.id, ex.category, ex.messages, ex.tools, calls_to_ground_truth(parsed.calls, ex.tools))
            if len(parsed.calls) > 1 and "parallel" not in fixed.category:
                fixed.category = "parallel_multiple" if len({next(iter(c)) for c in parsed.calls}) > 1 else "parallel"
        try:
            fixed, _ = validate_example(fixed)
        except _Drop as d:
            counts[f"correct:invalid:{d}"] += 1
            continue
        candidates.append(fixed)
    final = run([_judge_messages(ex, _answer_text(ex)) for ex in candidates])
    for ex, text in zip(candidates, final):
        verdict = parse_verdict(text)
        counts["final:" + {True: "correct", False: "incorrect", None: "no_verdict"}[verdict]] += 1
        if verdict:
            kept.append(ex)
    order = {ex.id: i for i, ex in enumerate(examples)}
    kept.sort(key=lambda ex: order.get(ex.id, len(order)))
    report = {"stage": "judge", "n_in": len(examples), "n_out": len(kept), "counts": dict(counts),
              "corrected": len(kept) - counts["evaluate:correct"]}
    return kept, report



# ---------------------------------------------------------------------------------------------------------
# command line

def _write_report(report: dict, path: str | None) -> None:
    text = json.dumps(report, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fctrain.cleaning", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="stage 1: rule/AST validation of ground truth against schemas")
    j = sub.add_parser("judge", help="stage 2: LLM evaluate -> correct -> final evaluation")
    for p in (v, j):
        p.add_argument("--input", required=True, help="X.jsonl, an xLAM file, or bfcl:<category,...>")
        p.add_argument("--output", required=True)
        p.add_argument("--report", default=None)
        p.add_argument("--on-error", default="skip", choices=("raise", "skip"),
                       help="malformed rows: skip them (counted, with their line numbers, in the report) or stop")
        p.add_argument("--max-bad-rows", type=float, default=0.01,
                       help="with --on-error skip: fail when more than this fraction of a file's rows is malformed")
    j.add_argument("--model", default=None, help="model dir or hub id (default: fctrain.rollout.resolve_model())")
    j.add_argument("--engine", default="auto", help="engine kind for fctrain.rollout.make_engine")
    j.add_argument("--max-tokens", type=int, default=256)
    j.add_argument("--batch-size", type=int, default=64)
    j.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)

    if not 0 <= args.max_bad_rows <= 1:
        ap.error("--max-bad-rows must be a fraction in [0, 1]")
    skipped = Counter()
    try:
        examples = load_any(args.input, on_error=args.on_error, skipped=skipped, max_bad=args.max_bad_rows)
    except (OSError, ValueError) as e:  # a missing file, too many malformed rows, an unknown category
        raise SystemExit(f"error: --input {args.input}: {e}") from None

    if args.cmd == "validate":
        kept, report = validate(examples)
    else:
        from fctrain import models, rollout  # heavy (torch, transformers, vLLM): only the judge needs them
        model_path = models.resolve_model(args.model)
        tokenizer = models.load_tokenizer(model_path)
        engine = rollout.make_engine(args.engine, model_path)
        try:
            kept, report = llm_judge(examples[:args.limit] if args.limit else examples, engine, tokenizer,
                                     max_tokens=args.max_tokens, batch_size=args.batch_size)
        finally:
            if hasattr(engine, "close"):
                engine.close()
        report["model"] = str(model_path)
    report["input"] = args.input
    report["skipped_rows"] = dict(skipped)
    save_jsonl(kept, args.output)
    _write_report(report, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

