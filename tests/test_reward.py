"""fctrain.reward against BFCL's own decoder and checker (tests/bfcl_ref.py), on every BFCL v4 single-turn
possible answer, systematic perturbations of them, and hostile text (hypothesis)."""
from __future__ import annotations

import copy
import json
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fctrain import reward
from fctrain.cleaning import validate
from fctrain.data import BFCL_CATEGORIES, Example, load_bfcl
from fctrain.prompts import call_text, render_target
from fctrain.reward import FORMATS, Parsed, RewardScorer, check, parse, score
from tests.bfcl_ref import bfcl_ast_check, bfcl_decode_python, bfcl_verdict


@pytest.fixture(scope="module")
def bfcl_examples() -> list[Example]:
    return load_bfcl(BFCL_CATEGORIES)


@pytest.fixture(scope="module")
def unsolvable(bfcl_examples) -> set[str]:
    """Ids whose possible answer contradicts its own schema (the validate stage drops them)."""
    kept, _ = validate(bfcl_examples)
    kept_ids = {e.id for e in kept}
    return {e.id for e in bfcl_examples} - kept_ids


def _gt_examples(examples):
    return [e for e in examples if e.ground_truth]


# ------------------------------------------------------------------------------------------ BFCL answers

@pytest.mark.parametrize("fmt", ["python", "hermes", "bfcl"])
def test_every_bfcl_answer_renders_parses_and_checks(bfcl_examples, unsolvable, fmt):
    assert len(bfcl_examples) == 3491
    failures = []
    for ex in bfcl_examples:
        parsed = parse(render_target(ex, fmt), fmt)
        assert parsed.ok, (ex.id, parsed.error)
        for compat in (False, True):
            if not check(parsed.calls, ex.tools, ex.ground_truth, ex.category, bfcl_compat=compat)["valid"]:
                failures.append(ex.id)
    # The only failures are answers that contradict their own schema; BFCL's checker rejects those as well.
    assert set(failures) <= unsolvable, set(failures) - unsolvable
    assert len(set(failures)) <= 6
    for ex in bfcl_examples:
        if ex.id in set(failures):
            assert not bfcl_verdict(render_target(ex, "bfcl"), ex.tools, ex.ground_truth, ex.category), ex.id


def test_rendered_answers_agree_with_bfcl_pipeline(bfcl_examples):
    """Our bfcl-format verdict == BFCL's decode + ast_checker verdict on every rendered answer."""
    for ex in bfcl_examples:
        text = render_target(ex, "bfcl")
        assert score(text, ex, "binary", "bfcl").correct == bfcl_verdict(text, ex.tools, ex.ground_truth,
                                                                         ex.category), ex.id
        if ex.ground_truth:
            assert parse(text, "bfcl").calls == bfcl_decode_python(text), ex.id


# ------------------------------------------------------------------------------------------ perturbations

def _other_value(value, spec):
    t = spec.get("type")
    if t == "boolean":
        return not value
    if t == "integer":
        return value + 1 if type(value) is int else 7
    if t == "float":
        return (value + 0.5) if type(value) in (int, float) else 2.5
    if t in ("string", "any"):
        return (value + " x") if isinstance(value, str) else "zzz"
    if t in ("array", "tuple"):
        return (list(value) + list(value[:1])) if isinstance(value, list) and value else ["zzz"]
    if t == "dict":
        return {**value, "zzz_key": 1} if isinstance(value, dict) else {"zzz_key": 1}
    return "zzz"


def _wrong_type(value, spec):
    t = spec.get("type")
    return {"boolean": 1, "integer": True, "float": "1.5", "string": 5, "any": 5, "array": "a, b",
            "tuple": "a, b", "dict": "k=v"}.get(t, None)


def _perturbations(ex: Example):
    """(name, calls) pairs derived from the rendered answer: each a systematic error or an equivalent form."""
    base = reward.parse(render_target(ex, "bfcl"), "bfcl").calls
    specs = {t["name"]: t["parameters"] for t in ex.tools}
    out = []
    for k, call in enumerate(base):
        (name, args), = call.items()
        params = specs.get(name, {"properties": {}, "required": []})
        for p, v in args.items():
            spec = params["properties"].get(p, {})
            for label, nv in (("wrong_value", _other_value(v, spec)), ("wrong_type", _wrong_type(v, spec)),
                              ("int_for_float", int(v) if type(v) is float and v.is_integer() else None),
                              ("list_order", list(reversed(v)) if isinstance(v, list) and len(set(map(repr, v))) > 1
                               else None),
                              ("case_and_spaces", v.upper() + " " if isinstance(v, str) else None)):
                if nv is not None:
                    calls = copy.deepcopy(base)
                    calls[k][name][p] = nv
                    out.append((label, calls))
            calls = copy.deepcopy(base)
            del calls[k][name][p]
            out.append(("missing_param", calls))
        calls = copy.deepcopy(base)
        calls[k][name]["zzz_extra"] = 1
        out.append(("extra_unknown_param", calls))
        for p in params["properties"]:
            if p not in args:
                spec = params["properties"][p]
                calls = copy.deepcopy(base)
                calls[k][name][p] = spec.get("default", _other_value(None, spec))
                out.append(("extra_schema_param", calls))
                break
        calls = copy.deepcopy(base)
        calls[k] = {name + "_x": args}
        out.append(("wrong_name", calls))
        other = [t["name"] for t in ex.tools if t["name"] != name]
        if other:
            calls = copy.deepcopy(base)
            calls[k] = {other[0]: args}
            out.append(("other_function", calls))
    if len(base) > 1:
        out.append(("swapped_order", list(reversed(base))))
        out.append(("dropped_call", base[:-1]))
    if base:
        out.append(("duplicated_call", base + base[:1]))
    out.append(("no_call", []))
    return out


def _text(calls):
    return "[" + ", ".join(call_text(*next(iter(c.items()))) for c in calls) + "]"


def test_perturbations_match_bfcl_checker(bfcl_examples):
    """check(bfcl_compat=True) gives BFCL's verdict AND error type on every perturbation; the default
    (optimal matching) mode gives the same verdict except where first-fit rejects a valid assignment."""
    kinds, disagree_optimal, n = Counter(), [], 0
    for ex in _gt_examples(bfcl_examples):
        for label, calls in _perturbations(ex):
            ref = bfcl_ast_check(ex.tools, copy.deepcopy(calls), ex.ground_truth, ex.category)
            ours = check(calls, ex.tools, ex.ground_truth, ex.category, bfcl_compat=True)
            assert ours["valid"] == ref["valid"], (ex.id, label, calls, ours, ref)
            assert ours["valid"] or ours["error_type"] == ref["error_type"], (ex.id, label, ours, ref)
            optimal = check(calls, ex.tools, ex.ground_truth, ex.category)
            if optimal["valid"] != ref["valid"]:
                assert optimal["valid"] and "parallel" in ex.category, (ex.id, label)
                disagree_optimal.append((ex.id, label))
            kinds[(label, ref["valid"])] += 1
            n += 1
    assert n > 30_000
    # Every kind of perturbation occurred, and the error kinds were rejected.
    for label in ("wrong_value", "wrong_type", "missing_param", "extra_unknown_param", "extra_schema_param",
                  "wrong_name", "other_function", "swapped_order", "list_order", "dropped_call", "no_call"):
        assert kinds[(label, False)] + kinds[(label, True)] > 0, label
    assert kinds[("wrong_name", True)] == 0 and kinds[("extra_unknown_param", True)] == 0
    # Order-free, except BFCL's first-fit rejecting a reordered correct answer: parallel_178 (its first truth
    # call allows Microsoft or Apple, takes Apple's call and leaves nothing for the Apple-only one).
    swapped_rejected = [i for i, label in disagree_optimal if label == "swapped_order"]
    assert kinds[("swapped_order", True)] > 400 and kinds[("swapped_order", False)] == len(swapped_rejected)
    assert "parallel_178" in swapped_rejected
    assert kinds[("case_and_spaces", True)] > 0  # BFCL's string normalisation
    assert len(disagree_optimal) <= 5, disagree_optimal


def test_text_perturbations_match_bfcl_pipeline(bfcl_examples):
    """Raw-text errors (prose around the list, broken brackets, code fences) through both decoders."""
    edits = {
        "prose_before": lambda t: "Sure! Here you go: " + t,
        "prose_after": lambda t: t + " Let me know if you need more.",
        "missing_close_bracket": lambda t: t[:-1],
        "missing_open_bracket": lambda t: t[1:],
        "extra_paren": lambda t: t[:-1] + ")]",
        "code_fence": lambda t: "```\n" + t + "\n```",
        "wrapping_quotes": lambda t: "'" + t + "'",
        "truncated": lambda t: t[: len(t) // 2],
        "newlines": lambda t: "\n" + t + "\n",
    }
    seen = Counter()
    for ex in bfcl_examples[::3]:
        base = render_target(ex, "bfcl")
        for label, edit in edits.items():
            text = edit(base)
            ref = bfcl_verdict(text, ex.tools, ex.ground_truth, ex.category)
            assert score(text, ex, "binary", "bfcl").correct == ref, (ex.id, label, text)
            seen[(label, ref)] += 1
    assert seen[("prose_before", False)] > 0 and seen[("code_fence", True)] > 0


def test_first_fit_vs_optimal_matching():
    tools = [{"name": "f", "description": "", "parameters": {"type": "dict", "required": ["a"],
                                                           "properties": {"a": {"type": "integer"}}}}]
    truth = [{"f": {"a": [1, 2]}}, {"f": {"a": [1]}}]
    calls = [{"f": {"a": 1}}, {"f": {"a": 2}}]
    assert not bfcl_ast_check(tools, calls, truth, "parallel")["valid"]
    assert not check(calls, tools, truth, "parallel", bfcl_compat=True)["valid"]
    assert check(calls, tools, truth, "parallel")["valid"]
    assert check([{"f": {"a": 1}}, {"f": {"a": 1}}], tools, truth, "parallel")["valid"]
    assert not check([{"f": {"a": 2}}, {"f": {"a": 2}}], tools, truth, "parallel")["valid"]


# ------------------------------------------------------------------------------------------ parse

def test_parse_python_format():
    text = "  <think>call f, then m.g</think>\n<answer>[f(a=1, b=-2.5), m.g(s='x', l=[1, (2, 3)], d={'k': None})]</answer>\n"
    p = parse(text)
    assert p.ok and p.calls == [{"f": {"a": 1, "b": -2.5}}, {"m.g": {"s": "x", "l": [1, (2, 3)], "d": {"k": None}}}]
    assert text[p.think_span[0]:p.think_span[1]] == p.think == "call f, then m.g"
    assert parse("<think></think><answer>[]</answer>").calls == []
    broken = parse("<think>plan</think><answer>[f(a=</answer>")  # think span kept for the EGPO entropy
    assert not broken.ok and broken.think == "plan" and broken.think_span == (7, 11)
    assert parse("<think>truncated by max_tokens").think_span is None
    for bad, why in [("<answer>[f(a=1)]</answer>", "think"), ("<think>x</think>[f(a=1)]", "answer"),
                     ("<think>x</think><answer>[f(a=1)]</answer> done", "after"),
                     ("<think>x</think><answer>[f(1)]</answer>", "positional"),
                     ("<think>x</think><answer>[f(a=b)]</answer>", "literal"),
                     ("<think>x</think><answer>[f(a=1+1)]</answer>", "literal"),
                     ("<think>x</think><answer>[f(a=1)</answer>", "python"),
                     ("<think>x<think>y</think></think><answer>[]</answer>", "nested"),
                     ("<think>x</think><answer>f(a=1)</answer>", "list")]:
        p = parse(bad)
        assert not p.ok and p.calls is None and why in p.error, (bad, p.error)


def test_parse_never_evaluates(tmp_path):
    marker = tmp_path / "pwned"
    for payload in [f"__import__('os').system('touch {marker}')", "exec('x=1')", "(lambda: 1)()",
                    f"open('{marker}', 'w').write('x')", "2**10**10"]:
        assert not parse(f"<think>x</think><answer>[f(a={payload})]</answer>").ok
        assert parse(f"[f(a={payload})]", "hermes").calls == []  # prose to a Hermes parser: no call
        p = parse(f"[f(a={payload})]", "bfcl")
        # bfcl mode keeps a call without keywords as its source text, as BFCL does; arithmetic is refused
        assert p.calls == [{"f": {"a": payload}}] if "**" not in payload else not p.ok
    assert not marker.exists()


def test_parse_hermes_format():
    text = ('<think>two calls</think>\n<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": [1.5, "x"]}}\n'
            '</tool_call>\n<tool_call>{"name": "g.h", "arguments": "{\\"c\\": true}"}</tool_call>')
    p = parse(text, "hermes")
    assert p.ok and p.calls == [{"f": {"a": 1, "b": [1.5, "x"]}}, {"g.h": {"c": True}}]
    assert text[slice(*p.think_span)] == "two calls"
    assert parse("I cannot help with that.", "hermes").calls == []
    assert parse("<think>no tool fits</think>Sorry.", "hermes").calls == []
    for bad in ['<tool_call>{"name": "f"</tool_call>', '<tool_call>[1]</tool_call>',
                'Sure: <tool_call>{"name": "f", "arguments": {}}</tool_call>',
                '<tool_call>{"name": "f", "arguments": {}}', '<think>x</think></tool_call>',
                '<tool_call>{"name": "f", "arguments": {}, "x": 1}</tool_call>']:
        assert not parse(bad, "hermes").ok, bad


def test_parse_hermes_untagged_json_calls():
    """What Qwen2.5-Coder-0.5B writes instead of <tool_call> blocks: read as calls only with untagged_json
    (the evaluation's reading); the training reward's strict parse calls it malformed, not a decline."""
    call_f, call_g = '{"name": "f", "arguments": {"a": 1}}', '{"name": "g.h", "arguments": "{\\"b\\": [2, \\"x\\"]}"}'
    f, g = {"f": {"a": 1}}, {"g.h": {"b": [2, "x"]}}
    accepted = {
        call_f: [f],                                                       # bare (simple_python_0's form)
        f"```json\n{call_f}\n```": [f],                                   # fenced, the most frequent form
        f"```\n{call_f}\n```\n": [f],
        f"  \n```json\n[{call_f}, {call_g}]\n```": [f, g],                # a list of calls in one fence
        f"```json\n{call_f}\n```\n\n```json\n{call_g}\n```": [f, g],     # one fence per call
        f"{call_f}\n{call_g}": [f, g],
        f"<think>f fits</think>\n```json\n{call_f}\n```": [f],
    }
    for text, calls in accepted.items():
        p = parse(text, "hermes", untagged_json=True)
        assert p.ok and p.calls == calls and p.untagged, (text, p)
        strict = parse(text, "hermes")
        assert not strict.ok and "without <tool_call> tags" in strict.error, text
    # Everything else without tags stays a plain-text reply (no call), with or without untagged_json:
    for text in [f"Sure: {call_f}", f"```json\n{call_f}\n```\nThis calls f.", f"{call_f} and {call_g}",
                 '{"name": "f", "parameters": {"a": 1}}', '{"name": "f", "arguments": {"a": 1}, "id": 3}',
                 '{"name": "f", "arguments": {"a": 1}', '{"name": 3, "arguments": {}}', '{"result": 3}',
                 "[]", "[1, 2]", '"f"', "```python\nf(a=1)\n```", f"```json\n{call_f}", "I cannot help."]:
        for lenient in (True, False):
            p = parse(text, "hermes", untagged_json=lenient)
            assert p.ok and p.calls == [] and not p.untagged, (text, lenient, p)
    # Tagged answers read the same either way, and are not "untagged"; tags still rule out loose text.
    tagged = f"<tool_call>\n{call_f}\n</tool_call>"
    assert parse(tagged, "hermes", untagged_json=True) == parse(tagged, "hermes")
    assert not parse(tagged, "hermes", untagged_json=True).untagged
    assert not parse(f"{call_g}\n{tagged}", "hermes", untagged_json=True).ok
    many = "\n".join([call_f] * (reward.MAX_CALLS + 1))
    assert parse(many, "hermes", untagged_json=True).calls == []
    assert not parse("```json\n{\"name\": \"f\", \"arguments\": {\"a\": " + "[" * 5000 + "]" * 5000 + "}}\n```",
                     "hermes", untagged_json=True).calls


def test_untagged_calls_earn_no_training_reward(small_set):
    """The training reward stays strict: an untagged call scores 0 on a call-needing prompt AND on an
    irrelevance prompt (it is no decline); only a plain-text reply declines."""
    ex = small_set["simple_python"][0]
    tagged = render_target(ex, "hermes")
    assert score(tagged, ex, "binary", "hermes").reward == 1.0
    body = tagged[tagged.index("<tool_call>") + len("<tool_call>"):tagged.index("</tool_call>")].strip()
    for kind in ("binary", "partial", "format"):
        r = score(f"```json\n{body}\n```", ex, kind, "hermes")
        assert r.reward == 0.0 and not r.format_ok, (kind, r)
    irr = small_set["irrelevance"][0]
    wrong = json.dumps({"name": irr.tools[0]["name"], "arguments": {}})
    for kind in ("binary", "partial"):
        assert score(wrong, irr, kind, "hermes").reward == 0.0
        assert score("None of these tools fits.", irr, kind, "hermes").reward == 1.0
    assert RewardScorer("binary", "hermes")([wrong], [irr])[0].reward == 0.0


def test_parse_bfcl_format_follows_bfcl_decoder():
    for text in ["[f(a=1)]", "f(a=1)", "f(a=1), g(b='x')", "```\n[f(a=1)]\n```",
                 "[f(a=x, b=g(), c=h(k=1), d=-3, e=+4, z=...)]", "[a.b.c(q=[1, {'k': (1, 2)}])]", "[f(1, a=2)]"]:
        assert parse(text, "bfcl").calls == bfcl_decode_python(text), text
    for text in ["I think [f(a=1)]", "[f(a=1)] done", "[1, 2]", "[f(a=1", "f(a=1))", "'[f(a=1)]'", "'f(a=1)'"]:
        assert not parse(text, "bfcl").ok
        with pytest.raises(Exception):
            bfcl_decode_python(text)


def test_parse_limits():
    assert "longer" in parse("<think>" + "a" * 40_000 + "</think><answer>[]</answer>").error
    deep = "[" * 30 + "1" + "]" * 30
    assert "deeper" in parse(f"<think></think><answer>[f(a={deep})]</answer>").error
    many = ", ".join(["f()"] * (reward.MAX_CALLS + 1))
    assert "calls" in parse(f"<think></think><answer>[{many}]</answer>").error
    assert not parse("<think></think><answer>[f(a=" + "9" * 5000 + ")]</answer>").ok
    deep_json = '<tool_call>{"name": "f", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}</tool_call>"
    assert not parse(deep_json, "hermes").ok
    with pytest.raises(ValueError):
        parse("x", "xml")


hostile_atoms = st.sampled_from(["[", "]", "(", ")", "{", "}", ",", "=", "'", '"', "\\", "<think>", "</think>",
                                 "<answer>", "</answer>", "<tool_call>", "</tool_call>", "f(", "a=", "1e999",
                                 "9" * 50, "-", "...", "lambda", "**", "\x00", "\ud7ff", "\U0001F600", "\n"])
hostile_text = st.one_of(
    st.text(max_size=300),
    st.lists(hostile_atoms, max_size=200).map("".join),
    st.builds(lambda n, c: c * n, st.integers(0, 200_000), st.sampled_from(["[", "(", "{", "a", "9", "é"])),
    st.builds(lambda n, s: "<think>" + s + "</think><answer>[f(a=" + "[" * n + s + "]" * n + ")]</answer>",
              st.integers(0, 300), st.text(max_size=50)),
    st.builds(lambda n: '<tool_call>{"name": "f", "arguments": {"a": ' + "[" * n + "]" * n + "}}</tool_call>",
              st.integers(0, 3000)),
    st.builds(lambda n: "<think>x</think><answer>[f(a=" + "1" * n + ")]</answer>", st.integers(1, 10_000)),
    st.builds(lambda n, s: "```json\n" + '{"name": "f", "arguments": {"a": ' + "[" * n + s + "]" * n + "}}\n```",
              st.integers(0, 3000), st.text(max_size=20)),
    st.builds(lambda n: '{"name": "f", "arguments": {}}' * n + "```" * n, st.integers(0, 3000)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.large_base_example,
                                                                  HealthCheck.data_too_large])
@given(text=hostile_text, fmt=st.sampled_from(FORMATS), untagged_json=st.booleans())
def test_parse_fuzz_never_crashes_or_hangs(text, fmt, untagged_json):
    t0 = time.thread_time()  # CPU time of this thread: a hang guard that a busy machine cannot trip
    p = parse(text, fmt, untagged_json=untagged_json)
    assert time.thread_time() - t0 < 0.25
    assert isinstance(p, Parsed) and (p.ok == (p.calls is not None))
    if p.ok:
        assert all(isinstance(c, dict) and len(c) == 1 for c in p.calls)
        json.dumps(p.calls, default=repr)  # plain data only


def test_megabyte_string_is_rejected_fast():
    t0 = time.thread_time()
    for fmt in FORMATS:
        assert not parse("<think>" + "x" * 2_000_000, fmt).ok
    assert time.thread_time() - t0 < 0.1


# ------------------------------------------------------------------------------------------ rewards

@pytest.fixture(scope="module")
def small_set(bfcl_examples):
    by_cat = {}
    for e in bfcl_examples:
        by_cat.setdefault(e.category, []).append(e)
    return {c: v[:5] for c, v in by_cat.items()}


def test_score_kinds(small_set):
    ex = small_set["simple_python"][0]
    good = render_target(ex)
    assert score(good, ex) == reward.RewardResult(1.0, True, True, None)
    assert score(good, ex, "partial").reward == 1.0 and score(good, ex, "format").reward == 1.0
    calls = parse(good).calls
    (name, args), = calls[0].items()
    p = next(iter(args))
    wrong = f"<think>x</think><answer>[{call_text(name, {**args, p: 'zzz'})}]</answer>"
    r = score(wrong, ex, "partial")
    assert not r.correct and r.format_ok and reward.FORMAT_CREDIT < r.reward < 1.0
    assert score(wrong, ex).reward == 0.0 and score(wrong, ex, "format").reward == 1.0
    misnamed = f"<think>x</think><answer>[{call_text(name + '_x', args)}]</answer>"
    assert score(misnamed, ex, "partial").reward == pytest.approx(reward.FORMAT_CREDIT)
    assert score(misnamed, ex, "partial").reward < r.reward
    for kind in reward.KINDS:
        bad = score("no tags at all", ex, kind)
        assert bad.reward == 0.0 and not bad.format_ok and bad.error
    with pytest.raises(ValueError):
        score(good, ex, "dense")
    # the wrong decision earns nothing, however well-formed: no call where one is needed, a call where none fits
    abstain = "<think>None fits.</think><answer>[]</answer>"
    r = score(abstain, ex, "partial")
    assert r.format_ok and not r.correct and r.reward == 0.0 and score(abstain, ex, "format").reward == 1.0
    irr = small_set["irrelevance"][0]
    assert score(abstain, irr, "partial").reward == 1.0
    call = f"<think>x</think><answer>[{call_text(irr.tools[0]['name'], {})}]</answer>"
    r = score(call, irr, "partial")
    assert r.format_ok and not r.correct and r.reward == 0.0


def test_score_irrelevance_and_relevance(small_set):
    ex = small_set["irrelevance"][0]
    assert score("<think>none fits</think><answer>[]</answer>", ex).reward == 1.0
    assert score("No function fits.", ex, fmt="hermes").reward == 1.0
    call = f"[{ex.tools[0]['name']}(x=1)]"
    assert score(f"<think>x</think><answer>{call}</answer>", ex).reward == 0.0
    # BFCL semantics for the bfcl format: prose is "no call", hence correct for irrelevance.
    assert score("I cannot answer that with these tools.", ex, fmt="bfcl").correct
    assert not score(call, ex, fmt="bfcl").correct
    rel = small_set["live_relevance"][0]
    assert score(render_target(rel), rel).correct and not score("<think></think><answer>[]</answer>", rel).correct


def test_scorer_scores_each_pair_once_and_isolates_failures(bfcl_examples):
    examples = [e for e in bfcl_examples[::7]][:400]
    texts = []
    for i, ex in enumerate(examples):
        t = render_target(ex)
        texts.append(t if i % 3 else t.replace("</answer>", ""))  # a third malformed
    broken = Example("broken", "simple_python", [], None, [{"f": {"a": [1]}}])  # tools=None: check raises
    texts.append("<think>x</think><answer>[f(a=1)]</answer>")
    examples = examples + [broken]
    one_by_one = [score(t, e) if e is not broken else None for t, e in zip(texts, examples)]
    scored = RewardScorer("binary", "python")(texts + texts[:2], examples + examples[:2])  # two repeated pairs
    assert scored[:-3] == one_by_one[:-1] and scored[-2:] == scored[:2] and scored[-2] is scored[0]
    assert scored[-3].failed and scored[-3].reward == 0.0 and "scorer raised" in scored[-3].error
    assert sum(r.correct for r in scored[:-2]) == len(examples) - 1 - len(range(0, len(examples) - 1, 3))
    partial = RewardScorer("partial", "python")
    assert partial(texts[:4], examples[:4]) == [score(t, e, "partial") for t, e in zip(texts[:4], examples[:4])]
    with pytest.raises(ValueError):
        partial(texts[:2], examples[:3])


def test_parse_is_silent_on_warnings_in_model_text():
    """Invalid escapes in model text make ast.parse warn (SyntaxWarning from 3.12); the parse stays quiet."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = parse('<think>x</think><answer>[f(a="\\d", b=1 is 1)]</answer>', "python")
        ok = parse('<think>x</think><answer>[f(a="\\d")]</answer>', "python")
    assert parsed.calls is None and ok.calls == [{"f": {"a": "\\d"}}]
    assert not caught, [str(w.message) for w in caught]


def test_think_optional_accepts_an_answer_without_think_and_nothing_else():
    """--think optional (raw Qwen2.5-Coder answers <answer>[...]</answer> with no think): the answer alone
    scores as it would after a think; malformed text stays malformed; a think, when there, is still split
    off (EGPO's entropy span)."""
    from fctrain import data as fdata
    from fctrain.eval import judge
    from fctrain.prompts import render_target

    ex = fdata.load_bfcl("simple_python", limit=1)[0]
    full = render_target(ex, "python", think="plan")
    bare = full[full.index("<answer>"):]
    assert not reward.parse(bare, "python").ok
    loose = reward.parse(bare, "python", think_required=False)
    assert loose.ok and loose.calls and loose.think is None
    both = reward.parse(full, "python", think_required=False)
    assert both.ok and both.think and both.calls == loose.calls and both.think_span is not None
    for kind in ("binary", "partial"):
        assert reward.score(bare, ex, kind).reward == 0.0
        assert reward.score(bare, ex, kind, think_required=False).reward == 1.0
    for bad in ("[f(a=1)]", "<answer>[f(a=1)", "prose <answer>[]</answer>", "<think>x<answer>[]</answer>"):
        assert not reward.parse(bad, "python", think_required=False).ok, bad
    scorer = reward.RewardScorer("binary", "python", think_required=False)
    assert [r.reward for r in scorer([bare, full, "no"], [ex] * 3)] == [1.0, 1.0, 0.0]
    assert not judge(bare, ex, "python").valid and judge(bare, ex, "python", think_required=False).valid
