"""Parse model completions into function calls and score them with BFCL's matching rules (no torch).

Three output formats (`FORMATS`):
  python  the paper's   <think>...</think><answer>[f(a=1), g(b='x')]</answer>
  hermes  Hermes/Qwen   <think>...</think> (optional) then <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...
  bfcl    BFCL's default prompting output: a bare call list [f(a=1)], decoded the way BFCL decodes it

Untagged JSON calls in hermes (`parse(text, "hermes", untagged_json=True)`, what fctrain.eval does by default):
Qwen2.5-Coder-0.5B-Instruct, asked for <tool_call> blocks, mostly writes the JSON call bare, often in a
```json fence. With untagged_json the whole answer (after an optional <think> block) may instead be one or
more such call objects, or JSON lists of them, each bare or in its own ``` / ```json fence, separated by
whitespace only: `{"name": "f", "arguments": {"a": 1}}`, "```json\n[{...}, {...}]\n```". Each object must be
exactly {"name": str, "arguments": object or JSON string}, as inside a tag. Anything else stays what it was:
prose around or between the JSON (an explanation, "Sure:"), a JSON object of another shape, or broken JSON is
a plain-text reply, i.e. no call. This is how BFCL reads JSON-emitting models: its Hammer and xLAM handlers
json.loads the whole output after removing ``` and take a list of {"name", "arguments"}; its Llama 3.1 handler
reads JSON objects separated by ";"; its Phi handler drops a leading ```json. (BFCL's QwenFCHandler, written
for Qwen3's tagged calls, reads only <tool_call>\n...\n</tool_call> blocks and would count these answers as no
call; eval summaries report how many answers were read untagged, and the count with tags required.)
Without untagged_json (the training reward, RewardScorer), a whole-answer untagged JSON call is malformed
(reward 0), neither a call nor a decline: the policy is rewarded only for the template's tagged calls, and a
wrong call on an irrelevance prompt cannot pass as a "plain-text" decline by leaving out the tags.

    parsed = parse(text, "python")            # Parsed(calls=[{"f": {"a": 1}}], think="...", ...)
    check(parsed.calls, ex.tools, ex.ground_truth, ex.category)   # {"valid", "error_type", "error"}
    score(text, ex, kind="binary")            # RewardResult(reward=1.0, ...)
    RewardScorer("binary", "python")(texts, examples)    # [RewardResult], identical pairs scored once

Model text is untrusted: nothing is eval'ed. `ast.parse` builds a tree and only literal nodes (numbers, signed
numbers, strings, booleans, None, lists, tuples, dicts, sets are refused) are converted, with limits on input
length, nesting depth and number of calls.

`check` follows `ast_checker` of the bfcl-eval wheel (Apache-2.0; the per-parameter rules below are a port of
bfcl_eval/eval_checker/ast_eval/ast_checker.py, Python language only) with the same error types, plus:
  * irrelevance categories: valid iff no call; relevance categories: valid iff at least one call.
  * parallel categories: BFCL matches ground-truth calls first-fit (each ground-truth call takes the first
    unmatched output call that satisfies it). That can reject a correct answer when one output call satisfies
    two ground-truth calls, e.g. truth [f(a in {1,2}), f(a in {1})] and output [f(a=1), f(a=2)]: first-fit
    gives f(a=1) to the first truth call and then finds nothing for the second. The default here finds a
    perfect matching if one exists (augmenting paths); `bfcl_compat=True` reproduces first-fit exactly. The
    two differ only in such ambiguous cases; report BFCL numbers with bfcl_compat=True.
"""
from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fctrain.example import Example

FORMATS = ("python", "hermes", "bfcl")
KINDS = ("binary", "partial", "format")

# Limits on untrusted text. A BFCL completion is a few hundred characters; these leave a wide margin.
MAX_TEXT_CHARS = 32_768      # whole completion
MAX_CALLS = 64               # calls in one answer
MAX_DEPTH = 24               # nesting of literal containers inside one argument
MAX_NODES = 20_000           # AST nodes in one answer (bounds the conversion work)


@dataclass
class Parsed:
    calls: list[dict] | None          # [{name: {param: value}}], [] = well-formed answer with no call
    think: str | None                 # text inside <think>...</think>
    think_span: tuple[int, int] | None  # (start, end) character offsets of `think` in the original text;
                                        # set whenever a closed <think>...</think> opens the text, even if
                                        # the answer after it is broken (then calls is None)
    error: str | None                 # why the text did not parse; None when it did
    untagged: bool = False            # hermes: the calls were read as untagged JSON (untagged_json=True)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RewardResult:
    reward: float
    format_ok: bool
    correct: bool
    error: str | None
    failed: bool = False              # the scorer itself raised; reward is 0 then


# ---------------------------------------------------------------------------------------------------------
# parse

class _ParseError(ValueError):
    pass


_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER_RE = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TOOL_CALL_RE = re.compile(r"\s*<tool_call>(.*?)</tool_call>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>")


def _literal(node: ast.AST, depth: int, lenient: bool) -> Any:
    """Python value of a literal node. `lenient` adds BFCL decoder extras (names as strings, nested calls)."""
    if depth > MAX_DEPTH:
        raise _ParseError(f"argument nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        value = node.value
        if value is Ellipsis:
            if lenient:
                return "..."
            raise _ParseError("'...' is not a value")
        if isinstance(value, (bytes, complex)):
            raise _ParseError(f"unsupported literal {type(value).__name__}")
        return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
            # BFCL's decoder negates the operand of ANY unary operator (so +5 -> -5); lenient mode keeps that.
            return -operand.value if (lenient or isinstance(node.op, ast.USub)) else operand.value
        raise _ParseError("a sign may only precede a number")
    if isinstance(node, ast.List):
        return [_literal(v, depth + 1, lenient) for v in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(v, depth + 1, lenient) for v in node.elts)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise _ParseError("'**' in a dict is not a value")
            key = _literal(k, depth + 1, lenient)
            if isinstance(key, (list, dict)):
                raise _ParseError("dict keys must be hashable literals")
            out[key] = _literal(v, depth + 1, lenient)
        return out
    if lenient:
        # BFCL's resolve_ast_by_type: a bare name is taken as a string, a call without keywords as its source
        # text, a call with keywords as a nested {name: {kw: value}}. (BFCL also evals arithmetic and lambdas;
        # we never evaluate anything, so those stay errors.)
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Call):
            if not node.keywords:
                return ast.unparse(node)
            return _call(node, depth + 1, lenient)
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            return ast.unparse(node)
    raise _ParseError(f"argument is not a literal ({type(node).__name__})")


def _call_name(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise _ParseError("function name must be a dotted name")
    parts.append(func.id)
    return ".".join(reversed(parts))


def _call(node: ast.AST, depth: int, lenient: bool) -> dict:
    if not isinstance(node, ast.Call):
        raise _ParseError(f"answer element is not a function call ({type(node).__name__})")
    name = _call_name(node.func)
    if node.args and not lenient:
        raise _ParseError(f"positional arguments in call to {name}; use keyword arguments")
    args = {}
    for kw in node.keywords:  # BFCL's decoder drops positional arguments; so does the lenient mode
        if kw.arg is None:
            raise _ParseError(f"'**' in call to {name}")
        args[kw.arg] = _literal(kw.value, depth, lenient)
    return {name: args}


def _parse_call_list(src: str, lenient: bool) -> list[dict]:
    try:
        with warnings.catch_warnings():  # model text: "invalid escape sequence" and the like are its problem, not the log's
            warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
            tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: null bytes, huge ints
        raise _ParseError(f"not a python call list: {type(e).__name__}: {str(e)[:200]}") from None
    body = tree.body
    if isinstance(body, ast.Call) and lenient:
        elts = [body]
    elif isinstance(body, ast.List):
        elts = body.elts
    else:
        raise _ParseError(f"answer is not a list of calls ({type(body).__name__})")
    if len(elts) > MAX_CALLS:
        raise _ParseError(f"more than {MAX_CALLS} calls")
    # Bound the conversion work before walking (a 32 KB answer can hold ~10k tiny nodes, which is fine).
    n_nodes = sum(1 for _ in ast.walk(body)) if len(src) > 2048 else 0
    if n_nodes > MAX_NODES:
        raise _ParseError(f"answer has more than {MAX_NODES} syntax nodes")
    try:
        return [_call(e, 0, lenient) for e in elts]
    except RecursionError:
        raise _ParseError("answer nested too deeply") from None


def _json_value(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise _ParseError(f"argument nested deeper than {MAX_DEPTH}")
    if isinstance(value, list):
        return [_json_value(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v, depth + 1) for k, v in value.items()}
    return value


def _parse_tool_call(body: str) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError and huge ints
        raise _ParseError(f"tool_call is not JSON: {str(e)[:200]}") from None
    return _tool_call_object(obj)


def _tool_call_object(obj: Any) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise _ParseError('tool_call must be a JSON object with a string "name"')
    extra = set(obj) - {"name", "arguments"}
    if extra:
        raise _ParseError(f"unexpected keys in tool_call: {sorted(extra)}")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models emit the arguments as a JSON string (OpenAI style)
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            raise _ParseError("tool_call arguments string is not JSON") from None
    if not isinstance(args, dict):
        raise _ParseError("tool_call arguments must be a JSON object")
    try:
        return {obj["name"]: _json_value(args)}
    except RecursionError:
        raise _ParseError("tool_call nested too deeply") from None


def _split_think(text: str, required: bool) -> tuple[str | None, tuple[int, int] | None, int]:
    """(think, span, end of the think block); the think block must open the text (after whitespace)."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("<think>", start):
        if required:
            raise _ParseError("missing <think>...</think> at the start")
        return None, None, 0
    m = _THINK_RE.match(text, start)
    if m is None:
        raise _ParseError("unclosed <think>")
    think = m.group(1)
    if "<think>" in think:
        raise _ParseError("nested <think>")
    return think, (m.start(1), m.end(1)), m.end()


def _parse_python(text: str, pos: int) -> list[dict]:
    m = _ANSWER_RE.match(text, pos)
    if m is None:
        raise _ParseError("expected <answer>...</answer> right after </think>")
    if m.end() != len(text):
        raise _ParseError("text after </answer>")
    body = m.group(1)
    for tag in _TAGS:
        if tag in body:
            raise _ParseError(f"{tag} inside <answer>")
    return _parse_call_list(body, lenient=False)


_FENCE_RE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)
_JSON = json.JSONDecoder()


def _json_values(src: str) -> list | None:
    """The JSON values that make up all of `src`, separated by whitespace only; None if anything else is there."""
    values, i = [], 0
    while True:
        while i < len(src) and src[i].isspace():
            i += 1
        if i == len(src):
            return values
        try:
            value, i = _JSON.raw_decode(src, i)
        except (ValueError, RecursionError):
            return None
        values.append(value)


def _untagged_calls(rest: str) -> list[dict] | None:
    """The calls if all of `rest` is untagged JSON calls (module docstring), else None (a plain-text reply)."""
    objects, i = [], 0
    while True:  # bare JSON values and ```/```json fenced blocks of them, separated by whitespace only
        while i < len(rest) and rest[i].isspace():
            i += 1
        if i == len(rest):
            break
        if rest.startswith("```", i):
            m = _FENCE_RE.match(rest, i)
            values = _json_values(m.group(1)) if m else None
            if not values:
                return None
            i = m.end()
        else:
            try:
                value, i = _JSON.raw_decode(rest, i)
            except (ValueError, RecursionError):
                return None
            values = [value]
        for value in values:
            objects.extend(value if isinstance(value, list) else [value])
        if len(objects) > MAX_CALLS:
            return None
    if not objects:
        return None
    try:
        return [_tool_call_object(obj) for obj in objects]
    except _ParseError:  # JSON of another shape: not a call
        return None


def _parse_hermes(text: str, pos: int, untagged_json: bool = False) -> list[dict]:
    rest = text[pos:]
    if "<tool_call>" not in rest:
        # A plain-text reply (no call): how a Hermes model declines. Tags here mean a broken attempt.
        for tag in _TAGS:
            if tag in rest:
                raise _ParseError(f"stray {tag}")
        calls = _untagged_calls(rest) if "{" in rest else None
        if calls is None:
            return []
        if untagged_json:
            return calls
        raise _ParseError("a JSON call without <tool_call> tags")
    calls = []
    i = pos
    while i < len(text):
        m = _TOOL_CALL_RE.match(text, i)
        if m is None:
            raise _ParseError("text outside <tool_call>...</tool_call> blocks")
        if len(calls) >= MAX_CALLS:
            raise _ParseError(f"more than {MAX_CALLS} calls")
        calls.append(_parse_tool_call(m.group(1)))
        i = m.end()
    return calls


def _parse_bfcl(text: str, pos: int) -> list[dict]:
    # BFCL default_decode_ast_prompting + ast_parse for python: strip, wrap in [], strip quotes, parse.
    src = text.strip("`\n ")
    if not src.startswith("["):
        src = "[" + src
    if not src.endswith("]"):
        src = src + "]"
    return _parse_call_list(src.strip().strip("'"), lenient=True)


_PARSERS = {"python": _parse_python, "hermes": _parse_hermes, "bfcl": _parse_bfcl}


def parse(text: str, fmt: str = "python", untagged_json: bool = False, think_required: bool = True) -> Parsed:
    """Parse one completion. Never raises on bad text (only on a bad `fmt`); never evaluates it.
    `untagged_json` (hermes only) also reads an answer made only of untagged JSON calls (module docstring).
    `think_required=False` (python only) also accepts an answer with no <think> block in front (a closed
    one is still split off and reported); hermes never requires one."""
    if fmt not in _PARSERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(text, str):
        return Parsed(None, None, None, f"completion is {type(text).__name__}, not str")
    if len(text) > MAX_TEXT_CHARS:
        return Parsed(None, None, None, f"completion longer than {MAX_TEXT_CHARS} characters")
    think, span, pos = None, None, 0
    try:
        if fmt != "bfcl":
            think, span, pos = _split_think(text, required=(fmt == "python" and think_required))
        if fmt == "hermes":
            calls = _parse_hermes(text, pos, untagged_json)
            untagged = bool(calls) and "<tool_call>" not in text
            return Parsed(calls, think, span, None, untagged)
        calls = _PARSERS[fmt](text, pos)
    except _ParseError as e:
        # A closed think block is reported even when the answer is broken: the trainer's EGPO entropy
        # term needs the think tokens of every completion.
        return Parsed(None, think, span, str(e))
    except RecursionError:
        return Parsed(None, think, span, "completion nested too deeply")
    return Parsed(calls, think, span, None)


# ---------------------------------------------------------------------------------------------------------
# check: port of BFCL's ast_checker (Python), same verdicts and error types

# schema type -> the Python type BFCL's checker accepts for it (cleaning.validate refuses other types)
PY_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
            "dict": dict, "any": str}
_NESTED_TYPES = ("array", "tuple")
_STD_RE = re.compile(r"[ ,./\-_*^]")


@lru_cache(maxsize=1 << 16)  # ground-truth strings recur on every completion of an example
def _std(s: str) -> str:
    """BFCL's standardize_string: drop spaces and ,./-_*^ , lowercase, single quotes -> double quotes."""
    return _STD_RE.sub("", s).lower().replace("'", '"')


def _answer_type(allowed: list):
    for a in allowed:
        if a != "":
            return type(a)
    return None


def _type_check(param, value, allowed, type_desc, expected, nested):
    """BFCL type_checker: (valid, is_variable, error_type, error)."""
    answer_type = _answer_type(allowed)
    is_variable = answer_type is not None and answer_type != expected
    if type(value) == expected:
        if nested is None:
            return True, is_variable, None, None
        for item in allowed:
            ok = True
            if type(item) == list:
                for v in value:
                    if not _type_check(param, v, item, str(nested), nested, None)[0]:
                        ok = False
                        break
            if ok:
                return True, is_variable, None, None
        return (False, False, "type_error:nested",
                f"Nested type checking failed for parameter {param!r}. Expected outer type {type_desc} with "
                f"inner type {nested}. Parameter value: {value!r}.")
    if answer_type is not None and type(value) == answer_type:
        return True, True, None, None
    return (False, False, "type_error:simple",
            f"Incorrect type for parameter {param!r}. Expected type {type_desc}, got {type(value).__name__}. "
            f"Parameter value: {value!r}.")


def _dict_check(param, value: dict, allowed: list):
    error_type, error = "dict_checker:unclear", None
    for answer in allowed:
        if answer == "":
            continue
        error_type, error, ok = "dict_checker:unclear", None, True
        for key, v in value.items():
            if key not in answer:
                error_type, error, ok = "value_error:dict_key", f"Unexpected dict key parameter: '{key}'.", False
                break
            sv = _std(v) if type(v) == str else v
            std_allowed = [_std(a) if type(a) == str else a for a in answer[key]]
            if sv not in std_allowed:
                error_type, ok = "value_error:dict_value", False
                error = f"Invalid value for parameter {key!r}: {v!r}. Expected one of {std_allowed}."
                break
        for key, v in answer.items():
            if key not in value and "" not in v:
                error_type, error, ok = "value_error:dict_key", f"Missing dict key parameter: '{key}'.", False
                break
        if ok:
            return True, None, None
    return False, error_type, error


def _list_dict_check(param, value: list, allowed: list):
    error_type, error = "list_dict_checker:unclear", None
    for answer in allowed:
        if len(value) != len(answer):
            error_type, error = "value_error:list_dict_count", "Wrong number of dictionaries in the list."
            continue
        ok = True
        for v, a in zip(value, answer):
            ok, error_type, error = _dict_check(param, v, [a])
            if not ok:
                break
        if ok:
            return True, None, None
    return False, error_type, error


def check_param(param: str, value, spec: dict, allowed: list):
    """One argument against its schema entry and allowed values: (valid, error_type, error)."""
    type_desc = spec.get("type")
    if type_desc not in PY_TYPES:
        return False, "checker:unsupported_type", f"Schema type {type_desc!r} of {param!r} is not a BFCL type."
    expected = PY_TYPES[type_desc]
    nested = None
    if type_desc in _NESTED_TYPES:
        nested = PY_TYPES.get(spec.get("items", {}).get("type"))
        if nested is None:
            return False, "checker:unsupported_type", f"Array parameter {param!r} has no BFCL items type."
    if type_desc == "tuple" and type(value) == tuple:
        value = list(value)
    if type_desc == "float" and type(value) == int:  # python's int -> float, top level only
        value = float(value)
    ok, is_variable, error_type, error = _type_check(param, value, allowed, type_desc, expected, nested)
    if not ok:
        return False, error_type, error
    if not is_variable:
        if expected == dict:
            return _dict_check(param, value, allowed)
        if expected == list and nested == dict:
            return _list_dict_check(param, value, allowed)
        if expected == str:
            if _std(value) in [_std(a) for a in allowed if type(a) == str]:
                return True, None, None
            return (False, "value_error:string", f"Invalid value for parameter {param!r}: {value!r}. "
                    f"Expected one of {allowed}. Case insensitive.")
        if expected == list:
            std_value = [_std(v) if type(v) == str else v for v in value]
            # BFCL iterates each allowed entry; "" (optional) becomes [] and so matches an empty list.
            std_allowed = [[_std(a) if type(a) == str else a for a in answer] for answer in allowed]
            if std_value in std_allowed:
                return True, None, None
            return (False, "value_error:list/tuple",
                    f"Invalid value for parameter {param!r}: {value!r}. Expected one of {allowed}.")
    if value not in allowed:
        return (False, "value_error:others",
                f"Invalid value for parameter {param!r}: {value!r}. Expected one of {allowed}.")
    return True, None, None


def _check_one(function: dict, call: dict, answer: dict) -> dict:
    """BFCL simple_function_checker: one output call against one schema and one ground-truth call."""
    allowed_by_param = next(iter(answer.values()))
    name = function["name"]
    params = function["parameters"]
    properties = params["properties"]
    if name not in call:
        return _invalid("simple_function_checker:wrong_func_name",
                        f"Function name {name!r} not found in model output.")
    args = call[name]
    for p in params.get("required", []):
        if p not in args:
            return _invalid("simple_function_checker:missing_required", f"Missing required parameter: {p!r}.")
    for p, value in args.items():
        if p not in properties or p not in allowed_by_param:
            return _invalid("simple_function_checker:unexpected_param", f"Unexpected parameter: {p!r}.")
        ok, error_type, error = check_param(p, value, properties[p], allowed_by_param[p])
        if not ok:
            return _invalid(error_type, error)
    for p, allowed in allowed_by_param.items():
        if p not in args and "" not in allowed:
            return _invalid("simple_function_checker:missing_optional",
                            f"Optional parameter {p!r} not provided and not marked as optional.")
    return _valid()


def _valid() -> dict:
    return {"valid": True, "error_type": "", "error": []}  # fresh each time: callers may annotate it


def _invalid(error_type: str, error) -> dict:
    return {"valid": False, "error_type": error_type, "error": error if isinstance(error, list) else [error]}


def _find_function(functions: list[dict], name: str) -> dict | None:
    for f in functions:
        if f["name"] == name:
            return f
    return None


def _max_matching(ok: list[list[bool]]) -> bool:
    """Whether the bipartite graph ok[truth][output] has a perfect matching (Kuhn's augmenting paths)."""
    n = len(ok)
    owner = [-1] * n  # output index -> truth index

    def augment(i: int, seen: list[bool]) -> bool:
        for j in range(n):
            if ok[i][j] and not seen[j]:
                seen[j] = True
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, [False] * n) for i in range(n))


def _first_fit(calls: list[dict], descs: list[dict], ground_truth: list[dict]) -> dict:
    """BFCL parallel_function_checker_no_order: each truth call takes the first unmatched call it accepts."""
    matched: set[int] = set()
    for i, answer in enumerate(ground_truth):
        errors, result = [], None
        for j, call in enumerate(calls):
            if j in matched:
                continue
            result = _check_one(descs[i], call, answer)
            if result["valid"]:
                matched.add(j)
                break
            errors.append({f"Model Result Index {j}": {"sub_error": result["error"],
                                                      "sub_error_type": result["error_type"]}})
        if result is None or not result["valid"]:
            left = [j for j in range(len(calls)) if j not in matched]
            return _invalid("parallel_function_checker_no_order:cannot_find_match",
                            [f"Could not find a matching function among index {left} of model output "
                             f"for index {i} of possible answers."] + errors)
    return _valid()


def is_irrelevance(category: str) -> bool:
    return "irrelevance" in category


def is_relevance(category: str) -> bool:
    return "relevance" in category and "irrelevance" not in category


def check(calls: list[dict], functions: list[dict], ground_truth: list[dict], category: str,
          bfcl_compat: bool = False) -> dict:
    """Whether `calls` (parsed model output) answer the example: {"valid", "error_type", "error"}.

    BFCL semantics (ast_checker, Python): "parallel" in the category -> order-free matching of all calls;
    else "multiple" -> exactly one call checked against the first ground-truth call; else exactly one call
    checked against functions[0]. Irrelevance: valid iff no call. Relevance: valid iff some call.
    """
    if is_irrelevance(category):
        if calls:
            return _invalid("irrelevance_error:decoder_success",
                            "Valid syntax. Successfully decode AST when it should not.")
        return _valid()
    if is_relevance(category):
        if not calls:
            return _invalid("relevance_error:decoder_failed", "No function call when one was expected.")
        return _valid()
    if "parallel" in category:
        if len(calls) != len(ground_truth):
            return _invalid("parallel_function_checker_no_order:wrong_count", "Wrong number of functions.")
        descs = []
        for answer in ground_truth:
            name = next(iter(answer))
            desc = _find_function(functions, name)
            if desc is None:
                return _invalid("checker:unknown_function", f"Ground truth names {name!r}, not in functions.")
            descs.append(desc)
        first_fit = _first_fit(calls, descs, ground_truth)
        if bfcl_compat or first_fit["valid"]:  # a first-fit match is a perfect matching
            return first_fit
        ok = [[_check_one(descs[i], call, answer)["valid"] for call in calls]
              for i, answer in enumerate(ground_truth)]
        if _max_matching(ok):
            return _valid()
        return first_fit
    if "multiple" in category:
        if len(calls) != len(ground_truth):
            return _invalid("multiple_function_checker:wrong_count", "Wrong number of functions.")
        name = next(iter(ground_truth[0]))
        desc = _find_function(functions, name)
        if desc is None:
            return _invalid("checker:unknown_function", f"Ground truth names {name!r}, not in functions.")
        return _check_one(desc, calls[0], ground_truth[0])
    if len(calls) != 1:
        return _invalid("simple_function_checker:wrong_count", "Wrong number of functions.")
    return _check_one(functions[0], calls[0], ground_truth[0])


# ---------------------------------------------------------------------------------------------------------
# rewards

def _param_ok(function: dict | None, name: str, value, allowed: list) -> bool:
    if function is None or name not in function["parameters"]["properties"]:
        return False
    try:
        return check_param(name, value, function["parameters"]["properties"][name], allowed)[0]
    except (KeyError, TypeError):
        return False


def _call_credit(call: dict, answer: dict, functions: list[dict]) -> float:
    """Partial credit of one output call against one ground-truth call: (name + keys + values) / 3."""
    (name, args), = call.items()
    (gt_name, gt_args), = answer.items()
    if name != gt_name:
        return 0.0
    function = _find_function(functions, gt_name)
    expected = {p for p, allowed in gt_args.items() if "" not in allowed}  # must be present
    keys = set(args)
    scope = keys | expected  # extra keys and missing expected keys both lower the scores
    if not scope:
        return 1.0
    key_score = len(keys & set(gt_args)) / len(scope)
    value_score = sum(_param_ok(function, p, v, gt_args[p]) for p, v in args.items() if p in gt_args) / len(scope)
    return (1.0 + key_score + value_score) / 3.0


def _partial_credit(calls: list[dict], example: Example) -> float:
    """Mean call credit under a greedy one-to-one pairing, divided by max(#calls, #truth calls)."""
    truth = example.ground_truth
    if not truth or not calls:
        return 0.0
    pairs = sorted(((_call_credit(c, a, example.tools), i, j) for j, c in enumerate(calls)
                    for i, a in enumerate(truth)), reverse=True)
    used_i, used_j, total = set(), set(), 0.0
    for credit, i, j in pairs:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            total += credit
    return total / max(len(calls), len(truth))


FORMAT_CREDIT = 0.2  # share of the partial reward paid for a well-formed answer of the right kind


def wrong_kind(calls: list[dict], category: str) -> bool:
    """A well-formed answer that makes the wrong decision: a call where none fits (irrelevance), or no call
    where one is needed. The partial reward gives it nothing: were it paid the format credit, a policy that
    abstains everywhere would earn 1 on every negative and lose nothing on a call-needing prompt it gets
    wrong anyway (bench_rl seed 1 collapsed to "no call" on every prompt within four steps that way)."""
    return bool(calls) if is_irrelevance(category) else not calls


def score(text: str, example: Example, kind: str = "binary", fmt: str = "python",
          think_required: bool = True) -> RewardResult:
    """Reward of one completion for one example.

    binary:  1 iff the text parses in `fmt` and `check` says valid (the paper's reward). With fmt="bfcl" the
             verdict is BFCL's own: for irrelevance a text that does not decode counts as "no call" (correct).
    partial: 1.0 when correct; 0 if malformed or the wrong kind of answer (a call where none fits, no call
             where one is needed: `wrong_kind`); else FORMAT_CREDIT + (1 - FORMAT_CREDIT) * call credit, where
             call credit averages, over a greedy pairing of output and truth calls, (name + keys + values) / 3.
    format:  1 iff the text parses in `fmt`.
    `think_required=False`: the python format's <think> block may be left out (see `parse`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {KINDS}")
    parsed = parse(text, fmt, think_required=think_required)
    if not parsed.ok:
        # BFCL counts an undecodable output as "no call", which is the right answer for irrelevance.
        bfcl_no_call = fmt == "bfcl" and is_irrelevance(example.category)
        reward = 1.0 if bfcl_no_call and kind != "format" else 0.0
        return RewardResult(reward, False, bfcl_no_call, None if bfcl_no_call else parsed.error)
    verdict = check(parsed.calls, example.tools, example.ground_truth, example.category,
                    bfcl_compat=(fmt == "bfcl"))
    correct = verdict["valid"]
    error = None if correct else f"{verdict['error_type']}: {str(verdict['error'])[:300]}"
    if kind == "format":
        return RewardResult(1.0, True, correct, error)
    if kind == "binary" or correct or wrong_kind(parsed.calls, example.category):
        return RewardResult(1.0 if correct else 0.0, True, correct, error)
    credit = 0.0 if (is_irrelevance(example.category) or is_relevance(example.category)) \
        else _partial_credit(parsed.calls, example)
    return RewardResult(FORMAT_CREDIT + (1.0 - FORMAT_CREDIT) * min(credit, 0.999), True, False, error)


def _score_safe(text, example, kind, fmt, think_required=True) -> RewardResult:
    try:
        return score(text, example, kind, fmt, think_required)
    except Exception as e:  # a scorer bug must cost one sample, not the training step
        return RewardResult(0.0, False, False, f"scorer raised {type(e).__name__}: {str(e)[:300]}", True)


class RewardScorer:
    """Scores batches of completions in this process. Identical (text, example) pairs, frequent within a
    GRPO group, are scored once. Any exception while scoring one item gives that item a `failed` result
    (reward 0), so a scorer bug costs one sample, not the training step.

    There is no process pool: at ~25 us of CPU per BFCL-sized completion a training step's batch (32
    completions by default, 256 in preset paper-7b) scores in milliseconds, and even at 20,000 completions
    a pool of 2 workers was slower than this process alone (13.4k against 16.4k completions/s on 2 cores,
    benchmarks/results/reward_cpu_pool.csv): pickling the examples costs more than it saves.
    """

    def __init__(self, kind: str = "binary", fmt: str = "python", think_required: bool = True):
        if kind not in KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {KINDS}")
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        self.kind, self.fmt, self.think_required = kind, fmt, think_required

    def __call__(self, texts: list[str], examples: list[Example]) -> list[RewardResult]:
        if len(texts) != len(examples):
            raise ValueError(f"{len(texts)} texts but {len(examples)} examples")
        scored: dict[tuple[str, int], RewardResult] = {}
        for t, e in zip(texts, examples):
            if (t, id(e)) not in scored:
                scored[t, id(e)] = _score_safe(t, e, self.kind, self.fmt, self.think_required)
        return [scored[t, id(e)] for t, e in zip(texts, examples)]
