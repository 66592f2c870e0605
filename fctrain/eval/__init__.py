"""BFCL evaluation as a library: greedy generation, BFCL-compatible scoring, leaderboard aggregates and
tables, BFCL-format result files, and the statistics of a change (Wilson interval, paired bootstrap). Its
command line is fctrain/eval/__main__.py: `python -m fctrain.eval ...`.

    records = generate_records(engine, tokenizer, examples, fmt="python")   # greedy, one per prompt, scored
    summary = summarize(records)                                             # per category and per group
    print(format_table(summary))

`judge` scores a completion with fctrain.reward in BFCL-compatible mode, per category exactly as
`bfcl evaluate` does: AST categories with the AST checker (first-fit parallel matching, bfcl_compat=True);
irrelevance and live_irrelevance are right iff no function call decodes from the output; live_relevance
is right iff at least one call decodes (BFCL does not check it against its ground truth).
A malformed output therefore counts as "no call": right for irrelevance, wrong everywhere else (the
training reward is stricter: fctrain.reward.score gives a malformed python/hermes answer 0 everywhere).
`hermes` is judged with untagged_json=True (fctrain.reward's docstring: an answer made only of JSON calls
without <tool_call> tags, bare or in ```json fences, is read as those calls, as BFCL's handlers for
JSON-emitting models read them); each category's "untagged" counts such answers and "correct_tags_only" is
its score with the tags required (BFCL's QwenFCHandler reading: an untagged answer is no call).
The table's "format %" column is the share of outputs that parsed in the prompted format. A prompt
longer than the model's context is not generated and scores as an empty output ("prompt_too_long").

Aggregates (BFCL v4's eval_runner_helper.generate_leaderboard_csv, restricted to Python):
- Non-Live AST = UNWEIGHTED mean of simple_python, multiple, parallel, parallel_multiple accuracies.
  (BFCL's "simple" is itself the unweighted mean of simple_python, simple_java and simple_javascript; we
  evaluate Python only, so our simple is simple_python.)
- Live AST = mean of live_simple, live_multiple, live_parallel, live_parallel_multiple WEIGHTED by their
  example counts (BFCL's calculate_weighted_accuracy), i.e. correct / total over the four.
- Overall = mean of Non-Live AST and Live AST (the paper's definition; not BFCL v4's weighted total, which
  also needs multi-turn and agentic categories).
- Irrelevance = unweighted mean of irrelevance and live_irrelevance (BFCL's "total_irrelevance");
  Relevance = live_relevance.
A group whose categories were only partly evaluated is the same mean over the categories present, listed
under "missing" in the summary and marked with * in the table (BFCL's leaderboard would count a missing
category as 0). With `--limit K` the Live AST weights are the subset counts.

Result files and BFCL: the "result" field is what BFCL's default prompting decoder
(`default_decode_ast_prompting`) reads. For `--format bfcl` it is the raw model text, exactly what BFCL's
own generation writes. For `python` and `hermes`, BFCL's decoder cannot read <answer>/<tool_call> text, so
"result" is our decoded calls rendered as a BFCL python-call list (`[f(a=1), g(b='x')]`), or "" when the
output did not parse (BFCL decodes "" as no call); the raw text is kept under "fctrain"."raw". Every entry
also carries our verdict under "fctrain" (BFCL ignores extra keys). To rescore with BFCL itself:
copy/rename `result/<name>` to a BFCL-registered prompting model whose handler uses the default decoder
(for example `result/Qwen_Qwen3-0.6B`), then `bfcl evaluate --model Qwen/Qwen3-0.6B --result-dir ...`
(add `--partial-eval` after `--limit`).

The trainer's periodic evaluation calls `evaluate(engine, tokenizer, examples, fmt, max_tokens)`, the same
generation, scoring and summary code as the CLI (any categories; groups absent from `examples` are None).
"""
from __future__ import annotations

import json
import keyword
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fctrain import data, reward
from fctrain.prompts import build_prompt_ids

# ----------------------------------------------------------------------------------------------------------
# categories and aggregation rules

NON_LIVE_AST = ("simple_python", "multiple", "parallel", "parallel_multiple")
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
IRRELEVANCE = ("irrelevance", "live_irrelevance")
RELEVANCE = ("live_relevance",)
SINGLE_TURN = NON_LIVE_AST + ("irrelevance",) + LIVE_AST + ("live_irrelevance", "live_relevance")
NON_LIVE = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
FORMATS = ("python", "hermes", "bfcl")
VERSION_PREFIX = "BFCL_v4"  # BFCL's file-name prefix (bfcl_eval.constants.category_mapping)

# name -> (categories, how they are averaged, label)
GROUPS = {
    "non_live_ast": (NON_LIVE_AST, "unweighted", "Non-Live AST"),
    "live_ast": (LIVE_AST, "weighted", "Live AST"),
    "irrelevance": (IRRELEVANCE, "unweighted", "Irrelevance"),
    "relevance": (RELEVANCE, "unweighted", "Relevance"),
}


def bfcl_group_dir(category: str) -> str:
    """BFCL's result sub-folder for a single-turn category (bfcl_eval.utils.get_general_grouping)."""
    if category in NON_LIVE:
        return "non_live"
    if category.startswith("live_"):
        return "live"
    raise ValueError(f"{category!r} is not a BFCL single-turn category; choose from {', '.join(SINGLE_TURN)}")


def normalize_format(fmt: str) -> str:
    fmt = {"bfcl-default": "bfcl", "paper": "python"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return fmt


# ----------------------------------------------------------------------------------------------------------
# scoring one completion


@dataclass
class Record:
    """One evaluated example: what the model wrote, what goes into BFCL's result file, and our verdict."""
    id: str
    category: str
    text: str                 # the raw completion
    result: str               # the BFCL result-file "result" field (see the module docstring)
    valid: bool               # our verdict, BFCL-compatible
    format_ok: bool           # the output parsed in the prompted format
    error_type: str = ""
    error: list = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    untagged: bool = False    # hermes: read as calls only because untagged JSON calls are accepted


def _renderable_name(name: str) -> bool:
    return bool(name) and all(p.isidentifier() and not keyword.iskeyword(p) for p in name.split("."))


def _render_value(value) -> str:
    """A python literal that BFCL's AST decoder (resolve_ast_by_type) reads back as `value`."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "(1e999 - 1e999)"  # no literal exists for nan; compares unequal to everything anyway
        return "1e999" if value > 0 else "-1e999"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_render_value(k)}: {_render_value(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise TypeError(f"cannot render a {type(value).__name__} as a BFCL python literal")


def render_calls(calls: list[dict]) -> str:
    """Calls `[{name: {param: value}}]` as BFCL's python-call list text, e.g. `[f(a=1), m.g(b='x')]`.

    BFCL's decoder can only read dotted identifiers as names and identifiers as keywords; every BFCL v4
    single-turn function and parameter name is one. A model-made name that is not (say "get-weather" from a
    Hermes call) can match no BFCL function, so it is written as a placeholder that is still a call and
    still matches nothing: the verdict (wrong call / a call was made) stays the same for BFCL and for us.
    """
    rendered = []
    for i, call in enumerate(calls):
        (name, args), = call.items()
        if not _renderable_name(name):
            name = f"fctrain_unrenderable_name_{i}"
        parts = []
        for j, (param, value) in enumerate(args.items()):
            if not (isinstance(param, str) and param.isidentifier() and not keyword.iskeyword(param)):
                param = f"fctrain_unrenderable_param_{j}"
            parts.append(f"{param}={_render_value(value)}")
        rendered.append(f"{name}({', '.join(parts)})")
    return "[" + ", ".join(rendered) + "]"


def judge(text: str, example, fmt: str, untagged_json: bool = True, think_required: bool = True) -> Record:
    """Score one completion of `example` prompted in `fmt`, exactly as `bfcl evaluate` scores its result.
    `untagged_json` (hermes): also read untagged JSON calls (module docstring). `think_required=False`
    (python): an answer without a <think> block in front also counts (the trainer's `--think optional`)."""
    fmt = normalize_format(fmt)
    parsed = reward.parse(text, fmt, untagged_json=untagged_json and fmt == "hermes", think_required=think_required)
    calls = parsed.calls if parsed.ok else None
    if fmt == "bfcl":
        result = text
    else:
        result = render_calls(calls) if calls is not None else ""
    category = example.category
    rec = Record(id=example.id, category=category, text=text, result=result, valid=False,
                 format_ok=bool(parsed.ok), untagged=parsed.untagged)
    if calls is None:
        # BFCL: an output that does not decode holds no call - right for irrelevance, wrong otherwise.
        rec.valid = category in IRRELEVANCE
        if not rec.valid:
            rec.error_type = ("relevance_error:decoder_failed" if category in RELEVANCE
                              else "ast_decoder:decoder_failed")
            rec.error = [f"Invalid syntax. Failed to decode AST. {parsed.error}"]
        return rec
    verdict = reward.check(calls, example.tools, example.ground_truth, category, bfcl_compat=True)
    rec.valid = bool(verdict["valid"])
    if not rec.valid:
        rec.error_type = verdict.get("error_type") or "checker:invalid"
        error = verdict.get("error") or []
        rec.error = list(error) if isinstance(error, (list, tuple)) else [str(error)]
    return rec


# ----------------------------------------------------------------------------------------------------------
# generation


def engine_context_length(engine) -> int | None:
    """The longest sequence (prompt + completion) `engine` accepts, when it can tell."""
    value = getattr(engine, "max_model_len", None)
    return value if isinstance(value, int) and value > 0 else None


def generate_records(engine, tokenizer, examples, fmt: str = "python", max_tokens: int = 256,
                     batch_size: int = 64, max_prompt_tokens: int | None = None, progress: bool = False,
                     prompts: list[list[int]] | None = None, think_required: bool = True,
                     prefill: str = "") -> list[Record]:
    """Greedy completions for `examples` (one per prompt) scored with `judge`, in the order given.

    A prompt longer than `max_prompt_tokens` (default: the engine's context length minus one) is not sent:
    it scores as an empty output (finish_reason "prompt_too_long"), as an inference error does in BFCL.
    `prompts` are the examples' prompt token ids when already built (`prefill` included). `prefill`: the text
    each prompt ends with (the trainer's --think prefill: an opened think); the record's text, judged, is
    `prefill` + the completion.
    """
    fmt = normalize_format(fmt)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_prompt_tokens is None:
        context = engine_context_length(engine)
        max_prompt_tokens = context - 1 if context else None
    if prompts is not None and len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts for {len(examples)} examples")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(examples), desc=f"eval {fmt}", unit="ex", file=sys.stderr)
    records: list[Record] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        batch_prompts = (prompts[start:start + batch_size] if prompts is not None
                         else [build_prompt_ids(ex, tokenizer, fmt=fmt, prefill=prefill) for ex in batch])
        fits = [max_prompt_tokens is None or len(p) <= max_prompt_tokens for p in batch_prompts]
        sent = [p for p, ok in zip(batch_prompts, fits) if ok]
        outputs = iter(engine.generate(sent, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                       stop=None, seed=0) if sent else [])
        for ex, prompt, ok in zip(batch, batch_prompts, fits):
            if ok:
                completion = next(outputs)[0]
                rec = judge(prefill + completion.text, ex, fmt, think_required=think_required)
                rec.output_tokens = len(completion.token_ids)
                rec.finish_reason = str(completion.finish_reason or "")
            else:
                rec = judge("", ex, fmt)
                rec.finish_reason = "prompt_too_long"
            rec.prompt_tokens = len(prompt)
            records.append(rec)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix_str(f"acc {sum(r.valid for r in records) / len(records):.3f}")
    if bar is not None:
        bar.close()
    return records


# ----------------------------------------------------------------------------------------------------------
# summary


def _group_accuracy(per_category: dict, categories, rule: str) -> dict | None:
    present = [c for c in categories if c in per_category and per_category[c]["total"] > 0]
    if not present:
        return None
    if rule == "weighted":
        correct = sum(per_category[c]["correct"] for c in present)
        total = sum(per_category[c]["total"] for c in present)
        accuracy = correct / total
    else:
        accuracy = sum(per_category[c]["accuracy"] for c in present) / len(present)
    return {"accuracy": accuracy, "rule": rule, "categories": present,
            "missing": [c for c in categories if c not in present],
            "total": sum(per_category[c]["total"] for c in present)}


def aggregate(per_category: dict) -> dict:
    """The table's aggregates from {category: {"correct", "total"}} (rules in the module docstring)."""
    per_category = {c: {"correct": int(v["correct"]), "total": int(v["total"]),
                        "accuracy": v["correct"] / v["total"] if v["total"] else 0.0}
                    | {k: v[k] for k in v if k not in ("correct", "total", "accuracy")}
                    for c, v in per_category.items()}
    groups = {name: _group_accuracy(per_category, cats, rule) for name, (cats, rule, _) in GROUPS.items()}
    ast = [groups[g]["accuracy"] for g in ("non_live_ast", "live_ast") if groups[g] is not None]
    correct = sum(v["correct"] for v in per_category.values())
    total = sum(v["total"] for v in per_category.values())
    return {
        "categories": per_category,
        "groups": groups,
        "non_live_ast": groups["non_live_ast"]["accuracy"] if groups["non_live_ast"] else None,
        "live_ast": groups["live_ast"]["accuracy"] if groups["live_ast"] else None,
        # The paper's Overall: the mean of Non-Live AST and Live AST (of the one present, if only one is).
        "overall": sum(ast) / len(ast) if ast else None,
        "irrelevance": groups["irrelevance"]["accuracy"] if groups["irrelevance"] else None,
        "relevance": groups["relevance"]["accuracy"] if groups["relevance"] else None,
        "micro_accuracy": correct / total if total else None,
        "correct": correct,
        "total": total,
    }


def summarize(records: list[Record]) -> dict:
    """Per-category counts, error types, format rate and the aggregates of `records`."""
    order = [c for c in SINGLE_TURN if any(r.category == c for r in records)]
    order += sorted({r.category for r in records} - set(order))
    per_category = {}
    for cat in order:
        recs = [r for r in records if r.category == cat]
        untagged = [r for r in recs if r.untagged]
        per_category[cat] = {
            "correct": sum(r.valid for r in recs),
            "total": len(recs),
            "format_ok": sum(r.format_ok for r in recs),
            # hermes: answers read as untagged JSON calls, and the score were tags required (they would be
            # no call: right for irrelevance, wrong elsewhere)
            "untagged": len(untagged),
            "correct_tags_only": sum(r.valid for r in recs) - sum(r.valid for r in untagged)
            + (len(untagged) - sum(r.valid for r in untagged) if cat in IRRELEVANCE else 0),
            "error_types": dict(Counter(r.error_type for r in recs if not r.valid).most_common()),
        }
    summary = aggregate(per_category)
    if any(v["untagged"] for v in per_category.values()):  # hermes: the same aggregates with tags required
        strict = aggregate({c: {"correct": v["correct_tags_only"], "total": v["total"]}
                            for c, v in per_category.items()})
        summary["tags_only"] = {k: strict[k] for k in ("non_live_ast", "live_ast", "overall", "irrelevance",
                                                       "relevance", "correct")}
    summary["finish_reasons"] = dict(Counter(r.finish_reason for r in records).most_common())
    summary["tokens"] = {"prompt": sum(r.prompt_tokens for r in records),
                         "generated": sum(r.output_tokens for r in records)}
    return summary


def evaluate(engine, tokenizer, examples, fmt: str = "python", max_tokens: int = 256,
             batch_size: int = 64, max_prompt_tokens: int | None = None, progress: bool = False) -> dict:
    """Greedy BFCL-compatible evaluation of `examples` (fctrain.data.Example) with a rollout engine.

    The trainer's periodic evaluation on a held-out subset. Returns the same summary the CLI writes:
    {"categories": {cat: {"correct", "total", "accuracy", "format_ok", "error_types"}}, "non_live_ast",
    "live_ast", "overall", "irrelevance", "relevance" (None when no category of the group was given),
    "micro_accuracy", "correct", "total", "groups", "finish_reasons", "tokens", "elapsed_s"}.
    """
    t0 = time.perf_counter()
    records = generate_records(engine, tokenizer, examples, fmt=fmt, max_tokens=max_tokens,
                               batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                               progress=progress)
    summary = summarize(records)
    summary["elapsed_s"] = time.perf_counter() - t0
    return summary


# ----------------------------------------------------------------------------------------------------------
# tables


def _pct(x) -> str:
    return "   n/a" if x is None else f"{100 * x:6.2f}"


def _group_rows(summary: dict):
    for name, (cats, rule, label) in GROUPS.items():
        group = summary["groups"].get(name)
        how = {"unweighted": "mean of categories", "weighted": "weighted by count"}[rule]
        mark = "*" if group and group["missing"] else ""
        yield name, f"{label}{mark} ({how})", group["accuracy"] if group else None
    ast_groups = [summary["groups"].get(g) for g in ("non_live_ast", "live_ast")]
    mark = "*" if any(g is None or g["missing"] for g in ast_groups) else ""
    yield "overall", f"Overall{mark} (mean of Non-Live AST, Live AST)", summary.get("overall")


def format_table(summary: dict) -> str:
    """The leaderboard-style table of one summary."""
    lines = [f"{'category':<44}{'correct':>8}{'total':>7}{'acc %':>8}{'format %':>10}"]
    lines.append("-" * len(lines[0]))
    for cat, v in summary["categories"].items():
        fmt_ok = f"{100 * v['format_ok'] / v['total']:10.1f}" if "format_ok" in v and v["total"] else " " * 10
        lines.append(f"{cat:<44}{v['correct']:>8}{v['total']:>7}{_pct(v['accuracy']):>8}{fmt_ok}")
    lines.append("-" * len(lines[0]))
    for _, label, acc in _group_rows(summary):
        lines.append(f"{label:<59}{_pct(acc):>8}")
    if any("*" in label for _, label, _ in _group_rows(summary)):
        lines.append("* not all categories of this group were evaluated; the mean is over those present")
    if summary.get("tags_only"):
        n = sum(v.get("untagged", 0) for v in summary["categories"].values())
        strict = summary["tags_only"]
        lines.append(f"hermes: {n} answers were untagged JSON calls, read as calls; with <tool_call> tags required "
                     f"(no call): Overall {_pct(strict['overall']).strip()}, Irrelevance "
                     f"{_pct(strict['irrelevance']).strip()}")
    return "\n".join(lines)


def load_summary(path: str | os.PathLike) -> dict:
    """A summary from a summary.json file or from a run directory that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"no evaluation summary at {path} (pass a summary.json or an eval run dir)")
    summary = json.loads(path.read_text())
    if "categories" not in summary or "groups" not in summary:
        raise ValueError(f"{path} is not an fctrain.eval summary (no 'categories'/'groups')")
    return summary


def compare_table(a: dict, b: dict, label_a: str = "A", label_b: str = "B") -> str:
    """A before/after table: per category and aggregate accuracy of `a` and `b` and the difference."""
    width = 44
    lines = [f"{'':<{width}}{label_a[:18]:>20}{label_b[:18]:>20}{'delta pp':>10}"]
    lines.append("-" * len(lines[0]))
    cats = list(a["categories"]) + [c for c in b["categories"] if c not in a["categories"]]
    mismatched = []

    def cell(v):
        return f"{_pct(v['accuracy'])} ({v['total']:>4})" if v else f"{'n/a':>13}"

    for cat in cats:
        va, vb = a["categories"].get(cat), b["categories"].get(cat)
        delta = f"{100 * (vb['accuracy'] - va['accuracy']):+10.2f}" if va and vb else f"{'':>10}"
        if va and vb and va["total"] != vb["total"]:
            mismatched.append(cat)
        lines.append(f"{cat:<{width}}{cell(va):>20}{cell(vb):>20}{delta}")
    lines.append("-" * len(lines[0]))
    for (name, label, acc_a), (_, _, acc_b) in zip(_group_rows(a), _group_rows(b)):
        delta = f"{100 * (acc_b - acc_a):+10.2f}" if acc_a is not None and acc_b is not None else ""
        lines.append(f"{label:<{width}}{_pct(acc_a):>20}{_pct(acc_b):>20}{delta}")
    for key in ("format", "max_tokens", "model"):
        if a.get(key) != b.get(key):
            lines.append(f"note: {key} differs: {a.get(key)!r} vs {b.get(key)!r}")
    if mismatched:
        lines.append(f"note: different example counts in {', '.join(mismatched)} (different --limit?)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# BFCL result files


def result_file(out_dir: str | os.PathLike, name: str, category: str) -> Path:
    """BFCL's path for a category's result file: <out>/result/<name>/<group>/BFCL_v4_<cat>_result.json."""
    return Path(out_dir) / "result" / name / bfcl_group_dir(category) / f"{VERSION_PREFIX}_{category}_result.json"


def write_result_files(records: list[Record], out_dir: str | os.PathLike, name: str) -> list[Path]:
    """Write `records` as BFCL result files (one per category, entries in the order given)."""
    by_category: dict[str, list[Record]] = {}
    for r in records:
        by_category.setdefault(r.category, []).append(r)
    paths = []
    for cat, recs in by_category.items():
        path = result_file(out_dir, name, cat)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            for r in recs:
                ours = {"valid": r.valid, "error_type": r.error_type, "error": r.error,
                        "format_ok": r.format_ok, "finish_reason": r.finish_reason}
                if r.untagged:
                    ours["untagged"] = True
                if r.result != r.text:
                    ours["raw"] = r.text
                entry = {"id": r.id, "result": r.result, "input_token_count": r.prompt_tokens,
                         "output_token_count": r.output_tokens, "fctrain": ours}
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def read_result_files(out_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """{category: [entries]} from every BFCL result file under `out_dir` (a run dir or its result/<name>)."""
    found: dict[str, list[dict]] = {}
    for path in sorted(Path(out_dir).rglob(f"{VERSION_PREFIX}_*_result.json")):
        category = path.name[len(VERSION_PREFIX) + 1:-len("_result.json")]
        with open(path) as f:
            found.setdefault(category, []).extend(json.loads(line) for line in f if line.strip())
    if not found:
        raise FileNotFoundError(f"no {VERSION_PREFIX}_*_result.json files under {out_dir}")
    return found


def rescore(out_dir: str | os.PathLike) -> dict:
    """Recount a run's result files from their "result" fields alone, with BFCL's decoder semantics.

    Every "result" is BFCL-decodable text (module docstring), so this re-decodes it as `bfcl` format and
    re-checks it; it must reproduce the run's own summary.
    """
    entries = read_result_files(out_dir)
    examples = {ex.id: ex for ex in data.load_bfcl(list(entries))}
    records = []
    for cat, items in entries.items():
        for item in items:
            if item["id"] not in examples:
                raise ValueError(f"result id {item['id']!r} is not in BFCL's {cat} data")
            records.append(judge(item["result"], examples[item["id"]], "bfcl"))
    return summarize(records)


# ------------------------------------------------------------------------------------------------ statistics

def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound at 0 and 1 correct, unlike p +- 1.96 se)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_change(before, after, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of after - before over the same examples (0/1 verdicts, or their means over seeds) and its 95%
    paired-bootstrap interval (examples resampled with replacement)."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if d.size == 0:
        return 0.0, 0.0, 0.0
    boots = d[np.random.default_rng(seed).integers(0, d.size, size=(reps, d.size))].mean(1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
