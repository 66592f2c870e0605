"""Examples, loaders (BFCL v4 from its wheel, xLAM-60k, our JSONL), prompts, and the two-stage data pipeline.

    examples = load_bfcl(["simple_python", "multiple"])           # read from the bfcl-eval wheel, offline
    train, evals = split(examples, eval_fraction=0.1, seed=0)
    ids = build_prompt_ids(train[0], tokenizer, fmt="python")     # system prompt with tools + user turns
    render_target(train[0], "python")                             # '<think>...</think><answer>[f(a=1)]</answer>'

Pipeline (the paper's data cleaning), as commands:

    python -m fctrain.data validate --input data.jsonl|bfcl:simple_python,multiple --output clean.jsonl \
        --report validate.json
    python -m fctrain.data judge --input clean.jsonl --output judged.jsonl --report judge.json [--model DIR]

`validate` checks every ground-truth call against its schema with the reward module's own type rules, repairs
what is unambiguous (a number written as a string, a bare value not wrapped in a list, JSON-schema type
aliases) and drops the rest, counting every reason. `judge` asks an LLM (through fctrain.rollout) to evaluate
each example, to correct the ones it rejects, and evaluates the corrections once more.

No torch or transformers import at module level; tokenizers are passed in.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fctrain import reward
from fctrain.assets import cache_dir, extract_from_wheel, fetch_wheel

BFCL_WHEEL = "bfcl-eval==2026.3.23"
BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
                   "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
                   "live_irrelevance", "live_relevance")
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    id: str
    category: str                 # BFCL category name; decides how `reward.check` matches calls
    messages: list[dict]          # [{"role": "user"|"assistant"|"system", "content": str}]
    tools: list[dict]             # BFCL function schemas {"name", "description", "parameters": {"type": "dict", ...}}
    ground_truth: list[dict] = field(default_factory=list)  # [{name: {param: [allowed values]}}]; "" = may omit

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Any) -> "Example":
        if not isinstance(obj, dict):
            raise ValueError(f"example must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("id", "category", "messages", "tools") if k not in obj]
        if missing:
            raise ValueError(f"example lacks {missing}")
        extra = set(obj) - {"id", "category", "messages", "tools", "ground_truth"}
        if extra:
            raise ValueError(f"unknown example keys {sorted(extra)}")
        ex = cls(str(obj["id"]), obj["category"], obj["messages"], obj["tools"], obj.get("ground_truth", []))
        if not isinstance(ex.category, str):
            raise ValueError("category must be a string")
        if not isinstance(ex.messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                for m in ex.messages):
            raise ValueError(f"messages must be a list of {{role in {ROLES}, content: str}}")
        if not isinstance(ex.tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                     for t in ex.tools):
            raise ValueError("tools must be a list of objects with a string 'name'")
        for t in ex.tools:  # the prompt, target and reward read these: a broken schema is a broken row
            params = t.get("parameters")
            if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
                raise ValueError(f"tool {t['name'][:60]!r}: parameters must be an object with object 'properties'")
            if _depth(params) > MAX_SCHEMA_DEPTH:
                raise ValueError(f"tool {t['name'][:60]!r}: schema nested deeper than {MAX_SCHEMA_DEPTH}")
        if not isinstance(ex.ground_truth, list) or not all(
                isinstance(c, dict) and len(c) == 1 and isinstance(next(iter(c.values())), dict)
                for c in ex.ground_truth):
            raise ValueError("ground_truth must be a list of {name: {param: [allowed values]}}")
        return ex

    @classmethod
    def from_json(cls, obj: str | dict) -> "Example":
        return cls.from_dict(json.loads(obj) if isinstance(obj, str) else obj)


MAX_SCHEMA_DEPTH = 32  # JSON levels in a tool's parameters; deeper ones are refused (recursive walks below)


def _depth(value, limit: int = MAX_SCHEMA_DEPTH + 1) -> int:
    """Nesting depth of a JSON value, counted no further than `limit` (iteratively: no recursion limit)."""
    depth, level = 0, [value]
    while level and depth < limit:
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        depth += 1
    return depth


# ---------------------------------------------------------------------------------------------------------
# loaders

def bfcl_root() -> Path:
    """The extracted `bfcl_eval/` package of the pinned wheel (data/ and eval_checker/), fetched once."""
    wheel = fetch_wheel(BFCL_WHEEL)
    dest = cache_dir("bfcl")
    return extract_from_wheel(wheel, "bfcl_eval/", dest)  # the marker is per prefix: data/ alone won't hide it


def _read_json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
    return rows


def load_bfcl(categories: Iterable[str] | str, limit: int | None = None) -> list[Example]:
    """BFCL v4 single-turn examples of `categories` (names or a comma-separated string), `limit` per category.

    Tools are the raw BFCL schemas (the "Python 3 syntax" hint BFCL appends is added by build_messages for
    fmt="bfcl"). Irrelevance and relevance categories have no possible answers: ground_truth = [].
    """
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    data = bfcl_root() / "data"
    out = []
    for cat in categories:
        if cat not in BFCL_CATEGORIES:
            raise ValueError(f"unknown BFCL category {cat!r}; single-turn categories are {BFCL_CATEGORIES}")
        entries = _read_json_lines(data / f"BFCL_v4_{cat}.json")
        answer_file = data / "possible_answer" / f"BFCL_v4_{cat}.json"
        answers = {a["id"]: a["ground_truth"] for a in _read_json_lines(answer_file)} if answer_file.exists() else {}
        if limit is not None:
            entries = entries[:limit]
        for e in entries:
            if len(e["question"]) != 1:
                raise ValueError(f"{e['id']}: {len(e['question'])} turns; only single-turn categories are supported")
            if answers and e["id"] not in answers:
                raise ValueError(f"{e['id']}: no possible answer in {answer_file}")
            messages = [{"role": m["role"], "content": m["content"]} for m in e["question"][0]]
            out.append(Example(e["id"], cat, messages, e["function"], answers.get(e["id"], [])))
    return out


_XLAM_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "float",
               "number": "float", "bool": "boolean", "boolean": "boolean", "list": "array", "array": "array",
               "dict": "dict", "object": "dict", "tuple": "tuple", "set": "array", "any": "any"}


def _xlam_param(spec: dict) -> tuple[dict, bool]:
    """xLAM parameter {"type": "List[int], optional", "description", "default"} -> (BFCL schema, optional)."""
    raw = str(spec.get("type", "any")).strip()
    optional = raw.endswith(", optional") or "default" in spec
    raw = raw.removesuffix(", optional").strip()
    if "," in raw and "[" not in raw:  # "int, default=5"
        head, tail = raw.split(",", 1)
        optional = optional or "default" in tail or "optional" in tail
        raw = head.strip()
    m = re.fullmatch(r"(\w+)(?:\[(.*)\])?", raw)
    if m and m.group(1).lower() == "optional" and m.group(2):  # Optional[X] = X, may be omitted
        optional, raw = True, m.group(2).strip()
        m = re.fullmatch(r"(\w+)(?:\[(.*)\])?", raw)
    outer = m.group(1).lower() if m else "any"
    out = {"type": _XLAM_TYPES.get(outer, "any"), "description": spec.get("description", "")}
    if out["type"] in ("array", "tuple"):
        inner = (m.group(2) or "any").split(",")[0].strip() if m else "any"
        inner = re.fullmatch(r"(\w+)", inner.split("[")[0])
        out["items"] = {"type": _XLAM_TYPES.get(inner.group(1).lower(), "any") if inner else "any"}
    if "default" in spec:
        out["default"] = spec["default"]
    return out, optional


def xlam_to_example(row: dict, index: int) -> Example:
    """One xLAM-function-calling-60k row (query, tools and answers as JSON strings) as an Example."""
    tools_raw = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
    answers = json.loads(row["answers"]) if isinstance(row["answers"], str) else row["answers"]
    tools = []
    for t in tools_raw:
        props, required = {}, []
        for name, spec in (t.get("parameters") or {}).items():
            props[name], optional = _xlam_param(spec if isinstance(spec, dict) else {})
            if not optional:
                required.append(name)
        tools.append({"name": t["name"], "description": t.get("description", ""),
                      "parameters": {"type": "dict", "properties": props, "required": required}})
    by_name = {t["name"]: t for t in tools}
    truth = []
    for a in answers:
        args = a.get("arguments") or {}
        allowed = {p: [v] for p, v in args.items()}
        schema = by_name.get(a["name"], {"parameters": {"properties": {}}})["parameters"]["properties"]
        for p, spec in schema.items():
            if p not in allowed and p not in by_name[a["name"]]["parameters"]["required"]:
                allowed[p] = [""]
                default = spec.get("default")
                if default not in (None, "") and reward._check_param(p, default, spec, [default])[0]:
                    allowed[p].append(default)
        truth.append({a["name"]: allowed})
    names = {next(iter(c)) for c in truth}
    if not truth:
        category = "irrelevance"
    elif len(truth) == 1:
        category = "simple" if len(tools) == 1 else "multiple"
    else:
        category = "parallel" if len(names) == 1 and len(tools) == 1 else "parallel_multiple"
    return Example(f"xlam_{row.get('id', index)}", category, [{"role": "user", "content": row["query"]}],
                   tools, truth)


def _load_rows(path: Path, convert, on_error: str, skipped: Counter | None, max_bad: float = 1.0) -> list[Example]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON array file (how the xLAM dataset ships)
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON array: {e}") from None
        where = "row"
    else:
        rows = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        where = "line"
    out, bad = [], []  # bad: (row or line number, reason)
    for n, row in rows:
        try:
            obj = json.loads(row) if isinstance(row, str) else row
            out.append(convert(obj, n))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            reason = f"{type(e).__name__}: {str(e)[:120]}"
            if on_error == "raise":
                raise ValueError(f"{path}: {where} {n}: {reason}") from None
            bad.append((n, reason.split(":")[0] if isinstance(e, json.JSONDecodeError) else reason))
    if len(bad) > max_bad * len(rows):
        raise ValueError(f"{path}: {len(bad)} of {len(rows)} {where}s malformed, more than {max_bad:.1%}: "
                         + "; ".join(f"{where} {n}: {reason}" for n, reason in bad[:5])
                         + ("; ..." if len(bad) > 5 else ""))
    if bad:
        reasons = Counter(reason for _, reason in bad)
        numbers = ", ".join(str(n) for n, _ in bad[:20]) + (", ..." if len(bad) > 20 else "")
        print(f"[fctrain.data] {path}: skipped {len(bad)} of {len(rows)} malformed {where}s ({where}s {numbers}): "
              f"{dict(reasons)}", file=sys.stderr)
        if skipped is not None:
            skipped.update(reasons)
    return out


def load_xlam(path, on_error: str = "raise", skipped: Counter | None = None, max_bad: float = 1.0) -> list[Example]:
    """xLAM-function-calling-60k (JSON array or JSONL of {id, query, tools, answers}) as Examples.

    Broken rows raise ValueError naming the row, or with on_error="skip" are skipped and counted by reason
    (printed with their row numbers, and added to `skipped` when given); more than `max_bad` (a fraction of
    the file's rows) broken raises ValueError naming the first ones.
    """
    return _load_rows(path, lambda obj, n: xlam_to_example(obj, n), on_error, skipped, max_bad)


def load_jsonl(path, on_error: str = "raise", skipped: Counter | None = None, max_bad: float = 1.0) -> list[Example]:
    """Our own JSONL (one Example.to_json() per line). Broken lines: see load_xlam."""
    return _load_rows(path, lambda obj, n: Example.from_dict(obj), on_error, skipped, max_bad)


def save_jsonl(examples: Iterable[Example], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(ex.to_json() + "\n")
    tmp.replace(path)


SYNTHETIC_IRRELEVANCE = "synthetic_irrelevance"


def swapped_tools_negative(question: Example, tools_from: Example) -> Example:
    """A negative example: `question`'s turns offered `tools_from`'s tools only, so the right answer is no
    call (BFCL's `irrelevance` category is built the same way: a question beside a function that cannot
    answer it). Refused when the two share a function name. Its id "neg:<question id>|<tools id>" is what a
    split manifest stores."""
    if {t["name"] for t in question.tools} & {t["name"] for t in tools_from.tools}:
        raise ValueError(f"{question.id} and {tools_from.id} share a function; not a negative")
    return Example(f"neg:{question.id}|{tools_from.id}", SYNTHETIC_IRRELEVANCE, [dict(m) for m in question.messages],
                   copy.deepcopy(tools_from.tools), [])


SPLITS_DIR = Path(__file__).resolve().parent / "splits"
DEFAULT_SPLITS = "bfcl_v4_seed16"  # written by benchmarks/bench_rl.py (its build_sets), checked by its test


def load_split(spec: str) -> list[Example]:
    """`<set>` or `<manifest>:<set>`: the BFCL examples listed under "sets"/<set> in
    fctrain/splits/<manifest>.json (default DEFAULT_SPLITS), in the listed order. A manifest holds ids only:
    fixed train / validation / held-out sets that every run and benchmark can name."""
    manifest, _, name = spec.rpartition(":")
    path = SPLITS_DIR / f"{manifest or DEFAULT_SPLITS}.json"
    if not path.exists():
        raise ValueError(f"split manifest {path} not found; known: {sorted(p.stem for p in SPLITS_DIR.glob('*.json'))}")
    info = json.loads(path.read_text())
    if name not in info["sets"]:
        raise ValueError(f"{path.name} has no set {name!r}; its sets: {sorted(info['sets'])}")
    ids = info["sets"][name]
    by_id = {e.id: e for e in load_bfcl(info["categories"])}
    sources = [i for i in ids if not i.startswith("neg:")]
    sources += [part for i in ids if i.startswith("neg:") for part in i[len("neg:"):].split("|", 1)]
    missing = [i for i in sources if i not in by_id]
    if missing:
        raise ValueError(f"{path.name}:{name}: {len(missing)} ids not in BFCL {BFCL_WHEEL}, e.g. {missing[:3]}")
    return [swapped_tools_negative(*(by_id[x] for x in i[len("neg:"):].split("|", 1))) if i.startswith("neg:")
            else by_id[i] for i in ids]


def load_any(spec: str, on_error: str = "raise", skipped: Counter | None = None,
             max_bad: float = 1.0) -> list[Example]:
    """`bfcl:<cat,...>`, `split:[<manifest>:]<set>` (load_split), an xLAM file (its name contains "xlam"),
    our JSONL, or several of these joined by `+` (concatenated in order). `on_error`, `skipped` and
    `max_bad` apply to the files (see load_xlam)."""
    if "+" in spec:
        return [e for part in spec.split("+") for e in load_any(part.strip(), on_error, skipped, max_bad)]
    if spec.startswith("split:"):
        return load_split(spec[len("split:"):])
    if spec.startswith("bfcl:"):
        return load_bfcl(spec[len("bfcl:"):])
    if "xlam" in Path(spec).name.lower():
        return load_xlam(spec, on_error=on_error, skipped=skipped, max_bad=max_bad)
    return load_jsonl(spec, on_error=on_error, skipped=skipped, max_bad=max_bad)


def shuffle(examples: list[Example], seed: int) -> list[Example]:
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval) after a seeded shuffle; eval gets round(eval_fraction * n) examples."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    shuffled = shuffle(examples, seed)
    n_eval = round(eval_fraction * len(shuffled))
    return shuffled[n_eval:], shuffled[:n_eval]


# ---------------------------------------------------------------------------------------------------------
# prompts

# BFCL's default system prompt for prompting models, assembled exactly as bfcl_eval.model_handler.utils.
# formulate_system_prompt does for DEFAULT_SYSTEM_PROMPT_FORMAT ("ret_fmt=python&tool_call_tag=False&
# func_doc_fmt=json&prompt_fmt=plaintext&style=classic"); note BFCL's missing space after the persona and
# the double space where its empty param_types goes.
_BFCL_SYSTEM_PROMPT = (
    "You are an expert in composing functions."
    "You are given a question and a set of possible functions. Based on the question, you will need to make one "
    "or more function/tool calls to achieve the purpose. If none of the functions can be used, point it out. If "
    "the given question lacks the parameters required by the function, also point it out."
    "\n\n"
    "You should only return the function calls in your response.\n\nIf you decide to invoke any of the "
    "function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, "
    "params_name2=params_value2...), func_name2(params)].  You SHOULD NOT include any other text in the response."
    "\n\n"
    "At each turn, you should try your best to complete the tasks requested by the user within the current "
    "turn. Continue to output functions to call until you have fulfilled the user's request to the best of "
    "your ability. Once you have no more functions to call, the system will consider the current turn complete "
    "and proceed to the next turn or task."
    "\n\n"
    "Here is a list of functions in json format that you can invoke.\n{functions}\n"
)
BFCL_PYTHON_HINT = " Note that the provided function is in Python 3 syntax."

_PYTHON_SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, make one or more function calls to achieve the purpose. If none of the functions "
    "can be used, or the question lacks parameters a function requires, make no call.\n\n"
    "First think step by step inside <think>...</think>, then give the calls inside <answer>...</answer> as a "
    "Python list of calls with keyword arguments:\n"
    "<think>reasoning</think><answer>[func_name1(param1=value1, param2=value2), func_name2(param=value)]</answer>\n"
    "If no function should be called, answer <answer>[]</answer>. Write nothing after </answer>.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n{functions}\n"
)

_HERMES_SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, make one or more function calls to achieve the purpose. If none of the functions "
    "can be used, or the question lacks parameters a function requires, make no call and say why.\n\n"
    "First think step by step inside <think>...</think>. Then, for each function call, return a JSON object "
    "with the function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>\n\n"
    "You may call one or more functions. Here are the available tools:\n<tools>\n{functions}\n</tools>\n"
)


def system_prompt(tools: list[dict], fmt: str = "python") -> str:
    if fmt == "bfcl":
        hinted = copy.deepcopy(tools)
        for t in hinted:
            t["description"] = t.get("description", "") + BFCL_PYTHON_HINT
        return _BFCL_SYSTEM_PROMPT.format(functions=json.dumps(hinted, indent=4))
    if fmt == "python":
        return _PYTHON_SYSTEM_PROMPT.format(functions="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if fmt == "hermes":
        return _HERMES_SYSTEM_PROMPT.format(functions="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    raise ValueError(f"unknown format {fmt!r}; expected one of {reward.FORMATS}")


def build_messages(example: Example, fmt: str = "python") -> list[dict]:
    """System prompt (tools + output format) then the example's turns. An example's own system message is
    appended to ours after a blank line, as BFCL does."""
    sys_prompt = system_prompt(example.tools, fmt)
    turns = [dict(m) for m in example.messages]
    if turns and turns[0]["role"] == "system":
        sys_prompt = sys_prompt + "\n\n" + turns.pop(0)["content"]
    return [{"role": "system", "content": sys_prompt}] + turns


def build_prompt_ids(example: Example, tokenizer, fmt: str = "python") -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant generation prompt."""
    ids = tokenizer.apply_chat_template(build_messages(example, fmt), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys") and "input_ids" in ids:  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def filter_by_length(examples: list[Example], tokenizer, max_prompt_tokens: int, fmt: str = "python") -> list[Example]:
    """Examples whose prompt is at most `max_prompt_tokens` tokens."""
    return [ex for ex in examples if len(build_prompt_ids(ex, tokenizer, fmt)) <= max_prompt_tokens]


# ---------------------------------------------------------------------------------------------------------
# targets for SFT warm-start

_PLACEHOLDER = {"string": "example", "integer": 1, "float": 1.0, "boolean": True, "array": [], "tuple": [],
                "dict": {}, "any": "example"}


def _target_calls(example: Example) -> list[tuple[str, dict]]:
    """(name, args) per ground-truth call: first allowed value per parameter, optional ones omitted."""
    if reward.is_irrelevance(example.category):
        return []
    if reward.is_relevance(example.category) and not example.ground_truth:
        # No reference answer: any call counts, so call the first tool with its required parameters.
        tool = example.tools[0]
        props = tool["parameters"].get("properties", {})
        args = {}
        for p in tool["parameters"].get("required", []):
            spec = props.get(p, {})
            default = spec.get("default")
            ok = default is not None and reward._check_param(p, default, spec, [default])[0] if spec else False
            args[p] = default if ok else _PLACEHOLDER.get(spec.get("type"), "example")
        return [(tool["name"], args)]
    by_name = {t["name"]: t["parameters"] for t in example.tools}
    calls = []
    for answer in example.ground_truth:
        (name, allowed_by_param), = answer.items()
        params = by_name.get(name, {})
        required = params.get("required", [])
        args = {}
        for p, allowed in allowed_by_param.items():
            values = [a for a in allowed if a != ""]
            # "" marks an omittable parameter, but BFCL checks the schema's required list first.
            if not values or ("" in allowed and p not in required):
                continue
            args[p] = _pick(values[0], params.get("properties", {}).get(p, {}))
        calls.append((name, args))
    return calls


def _pick(value, spec: dict):
    """A concrete value from a possible-answer entry. Dict parameters hold {key: [allowed]} per key (BFCL's
    dict_checker), lists of dicts hold such dicts per element; everything else is the value itself."""
    t = spec.get("type")
    if t == "dict" and isinstance(value, dict):
        return {k: v[0] for k, v in value.items() if isinstance(v, list) and v and "" not in v}
    if t in ("array", "tuple") and spec.get("items", {}).get("type") == "dict" and isinstance(value, list):
        return [_pick(v, {"type": "dict"}) for v in value]
    return value


def _py(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    return repr(value)


def _call_text(name: str, args: dict) -> str:
    return f"{name}(" + ", ".join(f"{p}={_py(v)}" for p, v in args.items()) + ")"


THINK_STYLES = ("plan", "restate")


def _and(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def render_target(example: Example, fmt: str = "python", think: str = "plan") -> str:
    """A correct completion in `fmt` (a short think, then the ground-truth calls) for SFT warm-start.

    think="plan": the think names the function(s) chosen and the parameters to fill, leaving the values to
    the answer ("I call f with a and b."): short (about half the tokens of "restate") and a decision, not
    a copy. think="restate": the think spells out the whole answer ("I need to call f with a=1, b='x'.")."""
    if think not in THINK_STYLES:
        raise ValueError(f"unknown think style {think!r}; expected one of {THINK_STYLES}")
    calls = _target_calls(example)
    if calls and think == "plan":
        think = "I call " + ", then ".join(
            f"{name} with " + (_and(list(args)) or "no arguments") for name, args in calls) + "."
    elif calls:
        think = "I need to call " + ", then ".join(
            f"{name} with " + (", ".join(f"{p}={_py(v)}" for p, v in args.items()) or "no arguments")
            for name, args in calls) + "."
    else:
        think = "None of the available functions can do what the user asks, so I make no call."
    if fmt == "python":
        return f"<think>{think}</think><answer>[" + ", ".join(_call_text(n, a) for n, a in calls) + "]</answer>"
    if fmt == "hermes":
        if not calls:
            return f"<think>{think}</think>\nNone of the available functions can be used for this request."
        blocks = "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n</tool_call>"
                           for n, a in calls)
        return f"<think>{think}</think>\n{blocks}"
    if fmt == "bfcl":
        return "[" + ", ".join(_call_text(n, a) for n, a in calls) + "]"
    raise ValueError(f"unknown format {fmt!r}; expected one of {reward.FORMATS}")


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
            if spec.get("type") not in reward._PY_TYPES:
                raise _Drop("schema_unsupported_type")
            if spec["type"] in ("array", "tuple") and spec.get("items", {}).get("type") not in reward._PY_TYPES:
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


def judge(examples: list[Example], engine, tokenizer, max_tokens: int = 256, batch_size: int = 64,
          seed: int = 0) -> tuple[list[Example], dict]:
    """Stage 2: evaluate every example with the LLM; correct the rejected ones; evaluate corrections again.

    Kept: examples judged correct at once, and corrections that parse, pass stage 1 and are then judged
    correct. Greedy decoding (temperature 0) so that a rerun gives the same data.
    """
    def run(message_lists: list[list[dict]]) -> list[str]:
        texts = []
        for lo in range(0, len(message_lists), batch_size):
            ids = [_template_ids(tokenizer, m) for m in message_lists[lo:lo + batch_size]]
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


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    ids = list(ids)
    return [int(i) for i in (ids[0] if ids and isinstance(ids[0], list) else ids)]


# ---------------------------------------------------------------------------------------------------------
# command line

def _write_report(report: dict, path: str | None) -> None:
    text = json.dumps(report, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fctrain.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="stage 1: rule/AST validation of ground truth against schemas")
    j = sub.add_parser("judge", help="stage 2: LLM evaluate -> correct -> final evaluation")
    for p in (v, j):
        p.add_argument("--input", required=True, help="X.jsonl, an xLAM file, or bfcl:<category,...>")
        p.add_argument("--output", required=True)
        p.add_argument("--report", default=None)
        p.add_argument("--on-error", default="raise", choices=("raise", "skip"))
    j.add_argument("--model", default=None, help="model dir or hub id (default: fctrain.rollout.resolve_model())")
    j.add_argument("--engine", default="auto", help="engine kind for fctrain.rollout.make_engine")
    j.add_argument("--max-tokens", type=int, default=256)
    j.add_argument("--batch-size", type=int, default=64)
    j.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)

    skipped = Counter()
    examples = load_any(args.input, on_error=args.on_error, skipped=skipped)

    if args.cmd == "validate":
        kept, report = validate(examples)
    else:
        from fctrain import models, rollout  # heavy (torch, transformers, vLLM): only the judge needs them
        resolve = getattr(rollout, "resolve_model", None) or models.resolve_model
        model_path = resolve(args.model)
        tokenizer = models.load_tokenizer(model_path)
        engine = rollout.make_engine(args.engine, model_path)
        try:
            kept, report = judge(examples[:args.limit] if args.limit else examples, engine, tokenizer,
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
