"""What the model sees and what it should answer: chat prompts with the tools, and SFT target completions.

    ids = build_prompt_ids(example, tokenizer, fmt="python")     # system prompt with tools + user turns
    render_target(example, "python")                             # '<think>...</think><answer>[f(a=1)]</answer>'
    decision_tokens(tokenizer)    # where `<answer>[]` and `<answer>[f(` part: the call / no-call decision token

Three output formats (reward.FORMATS): python (the paper's <think><answer>[calls]), hermes (<tool_call> JSON
blocks) and bfcl (BFCL's own prompt and bare call list, for leaderboard numbers). No torch or transformers
import; tokenizers are passed in.
"""
from __future__ import annotations

import copy
import functools
import json

from fctrain import reward
from fctrain.example import Example

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


# --think prefill: the assistant turn opens with this, so the model writes its own think from the first token
# (as R1-style chat templates do). The completion is scored after it: prefill + completion.
THINK_PREFILL = "<think>\n"
THINK_MODES = ("required", "optional", "prefill")  # the python format's think: --think (trainer and fctrain.eval)


def think_prefill(think: str) -> str:
    """What each prompt ends with for a --think mode: THINK_PREFILL for "prefill", else nothing."""
    return THINK_PREFILL if think == "prefill" else ""


def build_prompt_ids(example: Example, tokenizer, fmt: str = "python", prefill: str = "") -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant generation prompt and then `prefill`
    (the first words of the assistant's answer, e.g. THINK_PREFILL; tokenized on its own)."""
    ids = chat_prompt_ids(tokenizer, build_messages(example, fmt))
    return ids + tokenizer.encode(prefill, add_special_tokens=False) if prefill else ids


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, with the assistant generation prompt."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys") and "input_ids" in ids:  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def filter_by_length(examples: list[Example], tokenizer, max_prompt_tokens: int, fmt: str = "python",
                     prefill: str = "") -> list[Example]:
    """Examples whose prompt (`prefill` included) is at most `max_prompt_tokens` tokens."""
    return [ex for ex in examples if len(build_prompt_ids(ex, tokenizer, fmt, prefill)) <= max_prompt_tokens]


# ---------------------------------------------------------------------------------------------------------
# targets for the SFT warm start

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
            ok = default is not None and reward.check_param(p, default, spec, [default])[0] if spec else False
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


def call_text(name: str, args: dict) -> str:
    return f"{name}(" + ", ".join(f"{p}={_py(v)}" for p, v in args.items()) + ")"


THINK_STYLES = ("plan", "restate", "evidence", "none", "data")
EVIDENCE_WORDS, EVIDENCE_TOOLS = 10, 3  # "evidence" think: words kept of the request and of each description


def _words(text: str, n: int) -> str:
    """The first n words of text as a phrase ending in "." (or "..." when cut)."""
    words = " ".join(str(text).split()).split(" ")
    return " ".join(words[:n]).rstrip(".,;:") + ("..." if len(words) > n else ".")


def evidence(example: Example, called: list[str]) -> str:
    """The evidence a call / no-call decision rests on, restated next to it: the request (its first words)
    and what each tool does (up to EVIDENCE_TOOLS, the called ones first)."""
    request = next((m["content"] for m in reversed(example.messages) if m["role"] == "user"), "")
    names = list(dict.fromkeys(called + [t["name"] for t in example.tools]))[:EVIDENCE_TOOLS]
    by_name = {t["name"]: t for t in example.tools}
    tools = " ".join(f"{n}: {_words(by_name[n].get('description', ''), EVIDENCE_WORDS)}"
                     for n in sorted(names, key=[t["name"] for t in example.tools].index))
    return f"The user asks: {_words(request, EVIDENCE_WORDS)} Tools: {tools} "


def _and(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)


def render_target(example: Example, fmt: str = "python", think: str = "plan") -> str:
    """A correct completion in `fmt` (a short think, then the ground-truth calls) for SFT warm-start.

    think="plan": the think names the function(s) chosen and the parameters to fill, leaving the values to
    the answer ("I call f with a and b."): short (about half the tokens of "restate") and a decision, not
    a copy. think="restate": the think spells out the whole answer ("I need to call f with a=1, b='x'.").
    think="evidence": the think first restates the request and what each tool does, so the call / no-call
    decision ("f fits, so I call f with a and b." / "None of them fits, so I make no call.") is taken next to
    its evidence rather than on the first token. think="none": the answer alone, no think block (the python
    format then needs the trainer's --think optional). think="data": the example's own `think` (e.g. the
    model's own reasoning, sampled by benchmarks/bench_self_think.py); an example without one is refused."""
    if think not in THINK_STYLES:
        raise ValueError(f"unknown think style {think!r}; expected one of {THINK_STYLES}")
    calls = _target_calls(example)
    style = think
    if style == "evidence":
        names = list(dict.fromkeys(n for n, _ in calls))
        think = evidence(example, names) + (
            f"{_and(names)} {'fits' if len(names) == 1 else 'fit'}, so I call " + ", then ".join(
                f"{name} with " + (_and(list(args)) or "no arguments") for name, args in calls) + "."
            if calls else "None of them fits, so I make no call.")
    elif calls and style == "plan":
        think = "I call " + ", then ".join(
            f"{name} with " + (_and(list(args)) or "no arguments") for name, args in calls) + "."
    elif calls and style == "restate":
        think = "I need to call " + ", then ".join(
            f"{name} with " + (", ".join(f"{p}={_py(v)}" for p, v in args.items()) or "no arguments")
            for name, args in calls) + "."
    elif style == "data":
        if example.think is None:
            raise ValueError(f"example {example.id}: sft_think data needs the example's own think; it has none")
        think = example.think
    elif style != "none":
        think = "None of the available functions can do what the user asks, so I make no call."
    head = "" if style == "none" else f"<think>{think}</think>"
    if fmt == "python":
        return head + "<answer>[" + ", ".join(call_text(n, a) for n, a in calls) + "]</answer>"
    if fmt == "hermes":
        if not calls:
            return (head + "\n" if head else "") + "None of the available functions can be used for this request."
        blocks = "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n</tool_call>"
                           for n, a in calls)
        return (head + "\n" if head else "") + blocks
    if fmt == "bfcl":
        return "[" + ", ".join(call_text(n, a) for n, a in calls) + "]"
    raise ValueError(f"unknown format {fmt!r}; expected one of {reward.FORMATS}")


def decision_tokens(tokenizer, lead: str = "") -> tuple[list[int], list[int], list[int]]:
    """(prefix ids, no-call token ids, call token ids) at the answer's decision point.

    The prefix is the tokens that `lead<answer>[]</answer>` and `lead<answer>[f()]</answer>` share (`lead`, what
    comes before the answer in the completion, e.g. a think and its `</think>`, tokenized with it as the SFT
    target is, since BPE may merge across the edge); after it the two
    texts still share `c` (`>[` for Qwen, whose BPE merges `>[]` and `>[`; empty where `[` ends the prefix). A
    token is no-call if its text starts with `c]`, call if it starts with `c` followed by a function name's
    first letter (or by nothing but whitespace, when `c` is not empty); any other token is neither."""
    none_text = lead + "<answer>[]</answer>"
    none_ids = tokenizer.encode(none_text, add_special_tokens=False)
    call_ids = tokenizer.encode(lead + "<answer>[f()]</answer>", add_special_tokens=False)
    k = 0
    while k < min(len(none_ids), len(call_ids)) and none_ids[k] == call_ids[k]:
        k += 1
    prefix = none_ids[:k]
    rest_none, rest_call = tokenizer.decode(none_ids[k:]), tokenizer.decode(call_ids[k:])
    if tokenizer.decode(prefix) + rest_none != none_text or "]" not in rest_none:
        raise ValueError(f"decision_tokens: the tokenizer does not split {none_text!r} at a token edge")
    c = rest_none[: rest_none.index("]")]  # the text both answers still share
    if not rest_call.startswith(c):
        raise ValueError(f"decision_tokens: {rest_none!r} and {rest_call!r} do not share {c!r}")
    nones, calls = (list(ids) for ids in _decision_kinds(tokenizer, c))
    if none_ids[k] not in nones or call_ids[k] not in calls:
        raise ValueError(f"decision_tokens: the answers' own next tokens are not classified ({c!r})")
    return prefix, nones, calls


@functools.lru_cache(maxsize=4)
def _decision_kinds(tokenizer, c: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(no-call ids, call ids) of the whole vocabulary for the shared text `c` (decision_tokens' rule): decoded once
    per tokenizer, since a probe asks again for every lead."""
    def kind(text: str) -> str:
        if text.startswith(c + "]"):
            return "none"
        after = text[len(c):].lstrip() if text.startswith(c) else None
        if after is not None and ((after and (after[0].isalpha() or after[0] == "_")) or (not after and c)):
            return "call"
        return "other"

    kinds = [kind(t) for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])]
    return (tuple(i for i, k in enumerate(kinds) if k == "none"), tuple(i for i, k in enumerate(kinds) if k == "call"))
