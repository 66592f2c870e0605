"""fctrain.data: loaders (BFCL wheel, xLAM, JSONL), prompts (BFCL's own system prompt), targets, validation
stage and the judge stage through the real rollout engine on a tiny model."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from fctrain import prompts, reward
from fctrain.cleaning import calls_to_ground_truth, main, parse_verdict, validate
from fctrain.config import Config, parse_config
from fctrain.data import (BFCL_CATEGORIES, Example, TrainData, load_any, load_bfcl, load_jsonl, load_xlam, save_jsonl,
                          shuffle, split, swapped_tools_negative)
from fctrain.prompts import THINK_PREFILL, build_messages, build_prompt_ids, filter_by_length, render_target
from tests.bfcl_ref import bfcl_system_prompt, bfcl_verdict

EXPECTED_COUNTS = {"simple_python": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200,
                   "irrelevance": 240, "live_simple": 258, "live_multiple": 1053, "live_parallel": 16,
                   "live_parallel_multiple": 24, "live_irrelevance": 884, "live_relevance": 16}


@pytest.fixture(scope="module")
def bfcl():
    return load_bfcl(BFCL_CATEGORIES)


@pytest.fixture(scope="module")
def tokenizer():
    from fctrain.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model())


def test_load_bfcl(bfcl):
    assert Counter(e.category for e in bfcl) == EXPECTED_COUNTS
    assert len({e.id for e in bfcl}) == len(bfcl)
    for e in bfcl:
        assert e.messages and all(m["role"] in ("system", "user", "assistant") for m in e.messages)
        assert bool(e.ground_truth) == (e.category not in ("irrelevance", "live_irrelevance", "live_relevance"))
    assert [e.id for e in load_bfcl("parallel, multiple", limit=2)] == ["parallel_0", "parallel_1",
                                                                       "multiple_0", "multiple_1"]
    with pytest.raises(ValueError, match="multi_turn_base"):
        load_bfcl(["multi_turn_base"])


def test_example_json_round_trip(bfcl, tmp_path):
    sample = bfcl[::50]
    for e in sample:
        assert Example.from_json(e.to_json()) == e == Example.from_json(json.loads(e.to_json()))
    path = tmp_path / "x.jsonl"
    save_jsonl(sample, path)
    assert load_jsonl(path) == sample
    for bad, msg in [({"id": 1}, "lacks"), ({**sample[0].to_dict(), "extra": 1}, "unknown"),
                     ({**sample[0].to_dict(), "messages": [{"role": "bot", "content": "x"}]}, "messages"),
                     ({**sample[0].to_dict(), "ground_truth": [{"f": [1]}]}, "ground_truth"), ([1], "object")]:
        with pytest.raises(ValueError, match=msg):
            Example.from_json(bad)


def test_load_jsonl_broken_lines(bfcl, tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [bfcl[0].to_json(), "{not json", bfcl[1].to_json(), json.dumps({"id": "x"}), "", bfcl[2].to_json()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2: JSONDecodeError"):
        load_jsonl(path)
    skipped = Counter()
    assert [e.id for e in load_jsonl(path, on_error="skip", skipped=skipped)] == [e.id for e in bfcl[:3]]
    assert sum(skipped.values()) == 2 and any("lacks" in k for k in skipped)


def test_malformed_rows_are_skipped_with_line_numbers_up_to_a_threshold(bfcl, tmp_path, capsys):
    good = [e.to_json() for e in bfcl[:3]] * 66  # 198 good lines
    hostile = ["{not json", "[" * 100_000 + "]" * 100_000]  # broken JSON; nesting deeper than the parser's stack
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(good[:50] + hostile[:1] + good[50:120] + hostile[1:] + good[120:]) + "\n")
    skipped = Counter()
    kept = load_any(str(path), on_error="skip", skipped=skipped, max_bad=0.01)  # 2 of 200 bad: 1%, allowed
    assert len(kept) == 198 and sum(skipped.values()) == 2
    assert "big.jsonl: skipped 2 of 200 malformed lines (lines 51, 122): " in capsys.readouterr().err
    path.write_text(path.read_text() + json.dumps({"id": "x"}) + "\n")  # 3 of 201: over 1%
    with pytest.raises(ValueError, match=r"big.jsonl: 3 of 201 lines malformed, more than 1.0%: line 51: "
                                         r"JSONDecodeError; line 122: RecursionError.*; line 201: ValueError"):
        load_any(str(path), on_error="skip", max_bad=0.01)
    assert len(load_any(str(path), on_error="skip", max_bad=0.02)) == 198


def test_hostile_tool_schemas_are_broken_rows_or_handled(bfcl, tmp_path):
    deep = {}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}
    tools = {"no_parameters": [{"name": "f"}], "parameters_not_object": [{"name": "f", "parameters": "x"}],
             "properties_not_object": [{"name": "f", "parameters": {"type": "object", "properties": [1]}}],
             "deep": [{"name": "f", "parameters": deep}],
             "recursive_ref": [{"name": "f", "parameters": {"type": "object", "required": ["a"],
                                                            "properties": {"a": {"$ref": "#/parameters"}}}}],
             "huge": [{"name": "f", "description": "x" * 1_000_000, "parameters": {
                 "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}}]}
    path = tmp_path / "hostile.jsonl"
    rows = [{**bfcl[0].to_dict(), "id": name, "tools": t} for name, t in tools.items()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept = load_jsonl(path, on_error="skip")
    assert [e.id for e in kept] == ["recursive_ref", "huge"]  # lines 1-4 are broken rows, counted and skipped
    for e in kept:  # what the loop does with an example: prompt, reward, validation
        for fmt in reward.FORMATS:
            assert system_prompt_len(e, fmt) > 0
            assert reward.score("<think>x</think><answer>[f(a=1)]</answer>", e, fmt=fmt).reward >= 0
        assert validate([e])[0] == []  # neither can be checked: dropped by validation, not a crash


def system_prompt_len(example, fmt):
    from fctrain.prompts import system_prompt
    return len(system_prompt(example.tools, fmt))


XLAM_ROWS = [
    {"id": 1, "query": "What is the weather in Paris in celsius?",
     "tools": json.dumps([{"name": "get_weather", "description": "Weather now.",
                           "parameters": {"city": {"type": "str", "description": "City"},
                                          "unit": {"type": "str, optional", "description": "Unit", "default": "F"}}}]),
     "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}])},
    {"id": 2, "query": "Sum [1,2] and [3,4].",
     "tools": json.dumps([{"name": "add", "description": "Sum a list.",
                           "parameters": {"nums": {"type": "List[int]", "description": "Numbers"},
                                          "scale": {"type": "float, optional", "description": "", "default": 1.0}}},
                          {"name": "noop", "description": "", "parameters": {}}]),
     "answers": json.dumps([{"name": "add", "arguments": {"nums": [1, 2]}},
                            {"name": "add", "arguments": {"nums": [3, 4], "scale": "2"}}])},
    {"id": 3, "query": "Tell me a joke.", "tools": json.dumps([{"name": "add", "description": "",
                                                                 "parameters": {"n": {"type": "int"}}}]),
     "answers": "[]"},
]


def test_load_xlam(tmp_path):
    path = tmp_path / "xlam_sample.json"
    path.write_text(json.dumps(XLAM_ROWS))
    exs = load_xlam(path)
    assert [e.category for e in exs] == ["simple", "parallel_multiple", "irrelevance"]
    weather = exs[0]
    props = weather.tools[0]["parameters"]
    assert props["required"] == ["city"] and props["properties"]["unit"]["type"] == "string"
    assert weather.ground_truth == [{"get_weather": {"city": ["Paris"], "unit": ["C"]}}]
    add = exs[1]
    assert add.tools[0]["parameters"]["properties"]["nums"] == {"type": "array", "items": {"type": "integer"},
                                                                "description": "Numbers"}
    assert add.ground_truth[0] == {"add": {"nums": [[1, 2]], "scale": ["", 1.0]}}
    # The stringly-typed "2" for a float is repaired by the validation stage, and every target then checks.
    kept, report = validate(exs)
    assert report["n_out"] == 3 and report["repaired_examples"].get("value_type_repaired") == 1
    assert kept[1].ground_truth[1]["add"]["scale"] == [2.0]
    for e in kept:
        for fmt in reward.FORMATS:
            assert reward.score(render_target(e, fmt), e, fmt=fmt).correct, (e.id, fmt)
    # JSONL form, with a broken row
    jsonl = tmp_path / "xlam_rows.jsonl"
    jsonl.write_text("\n".join([json.dumps(XLAM_ROWS[0]), json.dumps({"id": 9, "query": "q"})]) + "\n")
    with pytest.raises(ValueError, match="line 2: KeyError"):
        load_xlam(jsonl)
    assert len(load_xlam(jsonl, on_error="skip")) == 1


def test_split_and_shuffle(bfcl):
    train, evals = split(bfcl, 0.1, seed=3)
    assert len(evals) == round(0.1 * len(bfcl)) and len(train) + len(evals) == len(bfcl)
    assert not {e.id for e in train} & {e.id for e in evals}
    assert split(bfcl, 0.1, seed=3) == (train, evals) and split(bfcl, 0.1, seed=4)[1] != evals
    assert shuffle(bfcl, 0) == shuffle(bfcl, 0) != bfcl and sorted(e.id for e in shuffle(bfcl, 0)) == sorted(e.id for e in bfcl)
    with pytest.raises(ValueError):
        split(bfcl, 1.5, 0)


def test_bfcl_prompt_is_bfcls_own(bfcl):
    """fmt="bfcl" reproduces BFCL's default system prompt exactly (built here by BFCL's own functions)."""
    with_system = [e for e in bfcl if e.messages[0]["role"] == "system"]
    assert with_system
    for e in bfcl[::25] + with_system[:5]:
        msgs = build_messages(e, "bfcl")
        expected = bfcl_system_prompt(e.tools)
        if e.messages[0]["role"] == "system":  # BFCL appends the example's own system message
            expected += "\n\n" + e.messages[0]["content"]
        assert msgs[0] == {"role": "system", "content": expected}
        assert msgs[1:] == [m for m in e.messages if m["role"] != "system" or m is not e.messages[0]]


def test_prompts_state_format_and_tools(bfcl):
    e = bfcl[0]
    for fmt, marker in (("python", "<answer>"), ("hermes", "<tool_call>"), ("bfcl", "[func_name1(")):
        msgs = build_messages(e, fmt)
        assert msgs[0]["role"] == "system" and marker in msgs[0]["content"]
        assert e.tools[0]["name"] in msgs[0]["content"] and msgs[-1] == e.messages[-1]
    with pytest.raises(ValueError):
        build_messages(e, "xml")


def test_prompt_ids_and_length_filter(bfcl, tokenizer):
    e = bfcl[0]
    ids = build_prompt_ids(e, tokenizer, "python")
    assert all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and e.messages[0]["content"] in text
    assert "<answer>" in text
    sample = bfcl[:40]
    lengths = [len(build_prompt_ids(x, tokenizer)) for x in sample]
    cut = sorted(lengths)[len(lengths) // 2]
    kept = filter_by_length(sample, tokenizer, cut)
    assert [x.id for x in kept] == [x.id for x, n in zip(sample, lengths) if n <= cut]
    # --think prefill: the prompt goes on with the opened think, tokenized on its own, and the length filter
    # counts it
    opened = build_prompt_ids(e, tokenizer, "python", prefill=THINK_PREFILL)
    extra = tokenizer.encode(THINK_PREFILL, add_special_tokens=False)
    assert extra and opened == ids + extra and tokenizer.decode(opened).endswith("assistant\n<think>\n")
    assert [x.id for x in filter_by_length(sample, tokenizer, cut, prefill=THINK_PREFILL)] == \
        [x.id for x, n in zip(sample, lengths) if n + len(extra) <= cut]


def test_render_target_matches_bfcl(bfcl):
    """A rendered target is right by our checker and by BFCL's pipeline (bfcl format), for every example
    whose answer is consistent with its schema."""
    kept, _ = validate(bfcl)
    for e in kept[::4]:
        assert bfcl_verdict(render_target(e, "bfcl"), e.tools, e.ground_truth, e.category), e.id
    e = next(x for x in bfcl if x.category == "irrelevance")
    assert render_target(e, "python").endswith("<answer>[]</answer>")
    assert reward.parse(render_target(e, "hermes"), "hermes").calls == []


def test_evidence_think_states_request_and_tools_before_deciding(bfcl):
    """think="evidence": the request's first words and each tool's description come before the decision,
    the targets stay correct in every format, and a cut phrase says so."""
    kept, _ = validate(bfcl)
    for e in kept[::7]:
        for fmt in ("python", "hermes"):
            assert reward.score(render_target(e, fmt, "evidence"), e, fmt=fmt).correct, (e.id, fmt)
    e = next(x for x in kept if x.category == "multiple")
    think = reward.parse(render_target(e, "python", "evidence"), "python").think
    names = [t["name"] for t in e.tools][:prompts.EVIDENCE_TOOLS]
    called = next(iter(e.ground_truth[0]))
    decision = think.index(f"{called} fits, so I call {called} with ")
    assert think.startswith("The user asks: ") and all(0 < think.index(f"{n}: ") < decision for n in names)
    question = next(m["content"] for m in e.messages if m["role"] == "user").split()
    assert " ".join(question[:prompts.EVIDENCE_WORDS]).rstrip(".,;:") in think
    assert ("..." in think) == (len(question) > prompts.EVIDENCE_WORDS or any(
        len(t.get("description", "").split()) > prompts.EVIDENCE_WORDS for t in e.tools[:prompts.EVIDENCE_TOOLS]))
    neg = next(x for x in bfcl if x.category == "irrelevance")
    assert render_target(neg, "python", "evidence").endswith("None of them fits, so I make no call.</think>"
                                                             "<answer>[]</answer>")


def test_answer_only_target_has_no_think_and_needs_think_optional(bfcl):
    """think="none": the same answer as every other style with no think block; correct when the think is
    optional, malformed for the python format's strict reading."""
    kept, _ = validate(bfcl)
    for e in kept[::7] + [x for x in bfcl if x.category == "irrelevance"][:3]:
        for fmt in ("python", "hermes"):
            bare = render_target(e, fmt, "none")
            assert "<think>" not in bare and bare.strip() == bare
            assert reward.score(bare, e, fmt=fmt, think_required=False).correct, (e.id, fmt)
            assert bare in render_target(e, fmt, "plan")  # the same answer, after the think
        assert not reward.parse(render_target(e, "python", "none"), "python").ok
    with pytest.raises(SystemExit, match="think optional"):
        parse_config(["--sft_think", "none"])  # python format, think required, SFT steps by default
    assert parse_config(["--sft_think", "none", "--think", "optional"])[0].sft_think == "none"
    assert parse_config(["--sft_think", "none", "--sft_steps", "0"])[0].sft_coef == 0  # never used: allowed


def test_validate_bfcl_report(bfcl):
    kept, report = validate(bfcl)
    assert report["n_in"] == len(bfcl) and report["n_out"] == len(kept)
    assert sum(report["dropped"].values()) == len(bfcl) - len(kept) < 30
    # The known contradictions between BFCL answers and their schemas are caught:
    dropped_ids = {i for ids in report["sample_ids"].values() for i in ids}
    assert {"live_multiple_964-207-0", "live_multiple_862-181-3"} <= dropped_ids
    assert report["dropped"]["missing_required_param"] >= 1


def _tool(name="f", props=None, required=("a",)):
    return {"name": name, "description": "", "parameters": {
        "type": "dict", "required": list(required), "properties": props or {"a": {"type": "integer"}}}}


def test_validate_repairs_and_drops(tmp_path):
    user = [{"role": "user", "content": "do it"}]
    cases = {
        "ok": (Example("ok", "simple", user, [_tool()], [{"f": {"a": [1]}}]), None),
        "str_int": (Example("str_int", "simple", user, [_tool()], [{"f": {"a": ["3"]}}]), "repaired"),
        "bare": (Example("bare", "simple", user, [_tool()], [{"f": {"a": 3}}]), "repaired"),
        "alias": (Example("alias", "simple", user, [_tool(props={"a": {"type": "number"}})], [{"f": {"a": [1.5]}}]),
                  "repaired"),
        "unknown_fn": (Example("unknown_fn", "simple", user, [_tool()], [{"g": {"a": [1]}}]), "unknown_function"),
        "unknown_p": (Example("unknown_p", "simple", user, [_tool()], [{"f": {"a": [1], "b": [2]}}]), "unknown_param"),
        "missing": (Example("missing", "simple", user, [_tool()], [{"f": {}}]), "missing_required_param"),
        "bad_type": (Example("bad_type", "simple", user, [_tool()], [{"f": {"a": [[1]]}}]), "value_type_mismatch"),
        "two_calls": (Example("two_calls", "simple", user, [_tool()], [{"f": {"a": [1]}}, {"f": {"a": [2]}}]),
                      "call_count_does_not_match_category"),
        "irr_gt": (Example("irr_gt", "irrelevance", user, [_tool()], [{"f": {"a": [1]}}]),
                   "irrelevance_with_ground_truth"),
        "no_user": (Example("no_user", "simple", [], [_tool()], [{"f": {"a": [1]}}]), "no_user_message"),
        "dup": (Example("dup", "simple", user, [_tool(), _tool()], [{"f": {"a": [1]}}]), "duplicate_function_name"),
        "bad_schema": (Example("bad_schema", "simple", user, [_tool(props={"a": {"type": "complex"}})],
                               [{"f": {"a": [1]}}]), "schema_unsupported_type"),
    }
    src = tmp_path / "in.jsonl"
    save_jsonl([c[0] for c in cases.values()], src)
    out, rep = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert main(["validate", "--input", str(src), "--output", str(out), "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    kept = {e.id: e for e in load_jsonl(out)}
    assert set(kept) == {k for k, (_, why) in cases.items() if why in (None, "repaired")}
    assert kept["str_int"].ground_truth == [{"f": {"a": [3]}}] == kept["bare"].ground_truth
    assert kept["alias"].tools[0]["parameters"]["properties"]["a"]["type"] == "float"
    expected_drops = Counter(why for _, why in cases.values() if why not in (None, "repaired"))
    assert report["dropped"] == dict(expected_drops)
    assert report["repaired_examples"] == {"value_type_repaired": 1, "allowed_values_not_a_list": 1,
                                           "schema_type_alias": 1}


def test_data_cli_skips_malformed_rows_within_the_bound(tmp_path, capsys):
    good = Example("g", "simple", [{"role": "user", "content": "q"}], [_tool()], [{"f": {"a": [1]}}])
    src, out, rep = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "report.json"
    save_jsonl([good, good], src)
    src.write_text(src.read_text() + '{"id": "broken"\n')
    with pytest.raises(SystemExit, match=r"^error: --input .*in.jsonl: .*1 of 3 lines malformed, more than 1.0%"):
        main(["validate", "--input", str(src), "--output", str(out)])  # the default bound: 1%
    assert not out.exists()
    assert main(["validate", "--input", str(src), "--output", str(out), "--report", str(rep),
                 "--max-bad-rows", "0.5"]) == 0
    assert json.loads(rep.read_text())["skipped_rows"] == {"JSONDecodeError": 1} and len(load_jsonl(out)) == 2
    assert "(lines 3)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: --input .*missing.jsonl"):
        main(["validate", "--input", str(tmp_path / "missing.jsonl"), "--output", str(out)])


def test_validate_cli_on_bfcl(tmp_path):
    out, rep = tmp_path / "o.jsonl", tmp_path / "r.json"
    assert main(["validate", "--input", "bfcl:simple_python,live_multiple", "--output", str(out),
                 "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["n_in"] == 1453 and report["n_out"] == len(load_jsonl(out)) > 1400


def test_judge_helpers():
    assert parse_verdict("looks fine\nVERDICT: CORRECT") is True
    assert parse_verdict("VERDICT: CORRECT ... on reflection VERDICT: incorrect") is False
    assert parse_verdict("no idea") is None
    tools = [_tool(props={"a": {"type": "integer"}, "b": {"type": "string"}})]
    assert calls_to_ground_truth([{"f": {"a": 1}}], tools) == [{"f": {"a": [1], "b": [""]}}]


def test_judge_stage_with_real_engine(tmp_path, bfcl):
    """The judge command end to end through fctrain.rollout's transformers engine on a tiny random model.
    A random model gives no verdicts, so nothing survives; the point is the plumbing and the report."""
    from fctrain.models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", hidden_size=64, num_heads=2, num_layers=1)
    src, out, rep = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "judge.json"
    save_jsonl(bfcl[:3], src)
    assert main(["judge", "--input", str(src), "--output", str(out), "--report", str(rep), "--model",
                 str(model_dir), "--engine", "hf", "--max-tokens", "4"]) == 0
    report = json.loads(rep.read_text())
    counts = report["counts"]
    assert report["n_in"] == 3 and report["n_out"] == len(load_jsonl(out))
    assert sum(v for k, v in counts.items() if k.startswith("evaluate:")) == 3
    n_rejected = 3 - counts.get("evaluate:correct", 0)
    assert sum(v for k, v in counts.items() if k.startswith("correct:") or k.startswith("final:")) == n_rejected


@pytest.mark.parametrize("xlam_type, schema, optional", [
    ("str", {"type": "string"}, False),
    ("str, optional", {"type": "string"}, True),
    ("int, default=5", {"type": "integer"}, True),
    ("List[int]", {"type": "array", "items": {"type": "integer"}}, False),
    ("Optional[List[str]]", {"type": "array", "items": {"type": "string"}}, True),
    ("Dict[str, Any]", {"type": "dict"}, False),
    ("Tuple[float, float]", {"type": "tuple", "items": {"type": "float"}}, False),
    ("Union[int, str]", {"type": "any"}, False),
])
def test_xlam_types(xlam_type, schema, optional):
    from fctrain.data import _xlam_param

    got, got_optional = _xlam_param({"type": xlam_type, "description": "d"})
    assert got == {**schema, "description": "d"} and got_optional == optional


def test_swapped_tools_negative_is_scored_as_irrelevance():
    from fctrain import data
    a, b = load_bfcl("simple_python", limit=2)
    neg = data.swapped_tools_negative(a, b)
    assert neg.id == f"neg:{a.id}|{b.id}" and neg.messages == a.messages and neg.tools == b.tools
    assert neg.ground_truth == [] and reward.is_irrelevance(neg.category)
    assert reward.score(render_target(neg), neg).correct and render_target(neg).endswith("<answer>[]</answer>")
    assert not reward.score(render_target(a), neg, kind="binary").correct  # calling the question's own tool: wrong
    with pytest.raises(ValueError, match="share a function"):
        data.swapped_tools_negative(a, a)


def test_near_miss_candidates_rank_by_topic_and_leave_out_renamed_copies():
    from fctrain import data

    def ex(i, question, name, description):
        return Example(id=f"e{i}", category="simple_python", messages=[{"role": "user", "content": question}],
                       tools=[{"name": name, "description": description, "parameters": {}}])
    q = ex(0, "Who won the NBA Most Valuable Player award in 2020?", "sports_stats.get_mvp",
           "Get the most valuable player of a sports league season.")
    pool = [ex(1, "x", "recipe.find", "Find a recipe by its ingredients."),
            ex(2, "x", "basketball.team_ranking", "Retrieve the NBA ranking of a basketball team."),
            ex(3, "x", "get_player_awards", "Retrieve the awards a player won in a season."),
            ex(4, "x", "sportsStats.getMVP", "Returns the MVP of a sports league."),       # renamed copy: name words
            ex(5, "x", "league.best_player", "Get the most valuable player of a sports league season."),  # description
            ex(6, "x", "sports_stats.get_mvp", "A different text."),                       # the same function name
            q]
    got = [e.id for e in data.near_miss_candidates(q, pool)]
    assert got[:2] == ["e3", "e2"] and set(got) == {"e1", "e2", "e3"}  # on the topic first, the unrelated last
    assert got == [e.id for e in data.near_miss_candidates(q, list(reversed(pool)))]  # order of the pool: no matter
    # filler words and plurals do not count as topic: "Find" / "the" are filler, "awards" is "award"
    assert data._topic_words("Find the getPlayerAwards of NBA") == {"player", "award", "nba"}
    neg = data.swapped_tools_negative(q, pool[2])
    assert neg.ground_truth == [] and neg.tools == pool[2].tools


def test_no_call_share_draws_each_kind_in_its_own_order_and_resumes_from_plain_ints():
    def ex(i, category):
        return Example(id=f"{category}_{i}", category=category, messages=[{"role": "user", "content": "q"}],
                            tools=[])
    examples = [ex(i, "simple_python") for i in range(7)] + [ex(i, "live_irrelevance") for i in range(3)]
    d = TrainData(examples=examples, prompt_ids={}, eval_sets={}, seed=5)
    batches = [d.next_batch(4, 0.5) for _ in range(6)]
    for b in batches:  # every step: 2 with a call, then 2 without
        assert [e.category for e in b] == ["simple_python"] * 2 + ["live_irrelevance"] * 2
    calls = [e.id for b in batches for e in b[:2]]
    negs = [e.id for b in batches for e in b[2:]]
    assert sorted(calls[:7]) == sorted(e.id for e in examples[:7])  # one epoch of each kind covers it once
    assert sorted(negs[:3]) == sorted(negs[3:6]) == sorted(e.id for e in examples[7:])
    assert all(type(v) is int for v in d.position.values())  # saved with torch.load(weights_only=True)
    resumed = TrainData(examples=examples, prompt_ids={}, eval_sets={}, seed=5, position=dict(d.position))
    assert [e.id for e in resumed.next_batch(4, 0.5)] == [e.id for e in d.next_batch(4, 0.5)]
    assert [e.category for e in d.next_batch(4, 0.0)] == ["simple_python"] * 4
    plain = TrainData(examples=examples, prompt_ids={}, eval_sets={}, seed=5)  # -1: the mixed stream
    assert sorted(e.id for e in plain.next_batch(10)) == sorted(e.id for e in examples)
    only_calls = TrainData(examples=examples[:7], prompt_ids={}, eval_sets={}, seed=5)
    with pytest.raises(SystemExit, match="no_call_share=0.5 needs training examples with no call"):
        only_calls.next_batch(4, 0.5)
    with pytest.raises(ValueError, match="no_call_share"):
        Config(no_call_share=1.5)


def test_contrast_pairs_put_each_swapped_tool_negative_next_to_its_own_question():
    def ex(i):
        return Example(id=f"simple_python_{i}", category="simple_python",
                            messages=[{"role": "user", "content": f"q{i}"}], tools=[{"name": f"f{i}"}], ground_truth=[])
    calls = [ex(i) for i in range(5)]
    negs = [swapped_tools_negative(calls[i], calls[(i + 1) % 5]) for i in range(3)]
    orphan = swapped_tools_negative(ex(9), calls[0])  # its question is not a training example: never drawn
    d = TrainData(examples=calls + negs + [orphan], prompt_ids={}, eval_sets={}, seed=3)
    batches = [d.next_batch(4, pairs=True) for _ in range(3)]
    drawn = [e for b in batches for e in b]
    for neg, q in zip(drawn[::2], drawn[1::2]):
        assert neg.id.startswith("neg:") and neg.id[4:].split("|")[0] == q.id and neg.messages == q.messages
        assert not q.id.startswith("neg:") and q.tools != neg.tools
    assert sorted(e.id for e in drawn[:6:2]) == sorted(e.id for e in negs)  # one epoch covers every pair once
    resumed = TrainData(examples=d.examples, prompt_ids={}, eval_sets={}, seed=3, position=dict(d.position))
    assert [e.id for e in resumed.next_batch(4, pairs=True)] == [e.id for e in d.next_batch(4, pairs=True)]
    with pytest.raises(SystemExit, match="contrast_pairs needs swapped-tool negatives"):
        TrainData(examples=calls, prompt_ids={}, eval_sets={}, seed=3).next_batch(4, pairs=True)
    for bad in ({"prompts_per_step": 3}, {"no_call_share": 0.5}):
        with pytest.raises(ValueError, match="contrast_pairs"):
            Config(contrast_pairs=True, **bad)
