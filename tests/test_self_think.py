"""The model's own think for SFT: the `think` field of an example, --sft_think data, and the script that samples
it (benchmarks/bench_self_think.py) on a tiny real model."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fctrain import data, run
from fctrain.example import Example
from fctrain.prompts import render_target

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH.parent))
_spec = importlib.util.spec_from_file_location("_bench_self_think", BENCH / "bench_self_think.py")
st = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(st)


def test_own_think_keeps_finished_sentences_of_a_cut_sample():
    assert st.own_think("  I need f. Then I", "length") == "I need f."
    assert st.own_think("First line\nsecond li", "length") == "First line"
    assert st.own_think("I need f. Then I", "stop") == "I need f. Then I"  # stopped at a tag: all of it
    assert st.own_think("no end in sight", "length") == "no end in sight"  # nothing finished: kept whole
    assert st.own_think(" \n ", "stop") == "" and st.own_think("", "length") == ""


def test_example_think_round_trips_and_is_checked():
    ex = data.load_bfcl("simple_python", limit=1)[0]
    assert "think" not in json.loads(ex.to_json())  # rows without one keep their format
    ex.think = "The user wants the area, so f fits."
    back = Example.from_json(ex.to_json())
    assert back == ex and back.think == ex.think
    for bad in (3, "a <think> b", "a </think>"):
        with pytest.raises(ValueError, match="think must be"):
            Example.from_dict(json.loads(ex.to_json()) | {"think": bad})
    target = render_target(back, "python", "data")
    assert target.startswith(f"<think>{ex.think}</think><answer>[") and target.endswith("]</answer>")
    back.think = None
    with pytest.raises(ValueError, match="has none"):
        render_target(back, "python", "data")


def test_hinted_names_the_gold_answer_in_the_last_user_turn_only():
    ex = data.load_bfcl("simple_python", limit=1)[0]
    before = ex.to_json()
    h = st.hinted(ex)
    assert ex.to_json() == before  # the example itself keeps its prompt
    gold = render_target(ex, "python", "none")
    assert gold.startswith("<answer>[") and gold != "<answer>[]</answer>"
    assert h.messages[-1]["content"] == ex.messages[-1]["content"] + st.HINT.format(answer=f"`{gold}`")
    assert h.messages[:-1] == ex.messages[:-1] and h.tools == ex.tools and h.ground_truth == ex.ground_truth
    neg = data.swapped_tools_negative(ex, data.load_bfcl("simple_python", limit=2)[1])
    assert st.NO_CALL in st.hinted(neg).messages[-1]["content"]
    with pytest.raises(ValueError, match="no user turn"):
        st.hinted(Example("x", "simple_python", [{"role": "system", "content": "s"}], ex.tools, ex.ground_truth))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fctrain.models import build_tiny_model
    root = tmp_path_factory.mktemp("self_think")
    model_dir = build_tiny_model(root / "tiny", hidden_size=64, num_layers=2, num_heads=2)
    examples = data.load_bfcl("simple_python", limit=6)
    data.save_jsonl(examples[:4], root / "train.jsonl")
    data.save_jsonl(examples[4:], root / "eval.jsonl")
    return root, model_dir


def test_make_samples_a_think_per_prompt_and_sft_trains_on_it(tiny):
    root, model_dir = tiny
    out = root / "made"
    meta = st.make(str(model_dir), str(root / "train.jsonl"), out, max_think_tokens=12, seed=0, engine_kind="hf")
    rows = data.load_jsonl(out / "train.jsonl")
    assert meta["examples"] == 4 and meta["kept"] == len(rows) and meta["kept"] + meta["dropped_empty"] == 4
    assert rows and all(r.think and "<think>" not in r.think for r in rows)
    assert json.loads((out / "meta.json").read_text())["kept"] == len(rows)
    # the rationalization: thinks sampled beside the gold answer, kept on the plain prompt
    hinted_meta = st.make(str(model_dir), str(root / "train.jsonl"), root / "hinted", max_think_tokens=12, seed=0,
                          engine_kind="hf", hint=True)
    hinted_rows = data.load_jsonl(root / "hinted" / "train.jsonl")
    assert hinted_meta["prompt_tokens_median"] > meta["prompt_tokens_median"] + 20  # the hint is in the prompt
    assert hinted_meta["hint"] and hinted_meta["kept"] + hinted_meta["dropped_empty"] + hinted_meta["dropped_hint"] == 4
    plain = {e.id: e.messages for e in data.load_jsonl(root / "train.jsonl")}
    assert all(r.messages == plain[r.id] and not any(w in r.think.lower() for w in st.HINT_WORDS) for r in hinted_rows)
    # SFT from inside the opened think on the model's own words; a training set without them is refused
    args = ["--model", str(model_dir), "--engine", "hf", "--eval_data", str(root / "eval.jsonl"), "--eval_limit", "1",
            "--sft_steps", "2", "--sft_batch_size", "2", "--steps", "0", "--max_new_tokens", "16",
            "--think", "prefill", "--sft_think", "data", "--save_every", "0"]
    assert run.main(args + ["--train_data", str(out / "train.jsonl"), "--out_dir", str(root / "sft")]) == 0
    logged = [json.loads(line) for line in open(root / "sft" / "metrics.jsonl")]
    assert [r["phase"] for r in logged] == ["sft", "sft", "eval"]
    with pytest.raises(SystemExit, match="sft_think data: 4 of 4 training examples have no think"):
        run.main(args + ["--train_data", str(root / "train.jsonl"), "--out_dir", str(root / "refused")])


@pytest.mark.parametrize("think,no_call", [
    ("None of the functions given can fetch the weather.", True),
    ("There is no suitable function for this request.", True),
    ("I'm sorry, but I can't assist with that request.", True),
    ("The tools provided do not support booking flights.", True),
    ("Booking a flight is not possible with these tools.", True),
    ("I need the area of a triangle with base 10 and height 5, so calculate_triangle_area fits.", False),
    ("Call get_weather with city='Paris' and unit='celsius'.", False),
    ("The nonexistent key is not a concern; sort the list by name.", False),
])
def test_says_no_call_reads_a_refusal_not_a_task(think, no_call):
    assert st.says_no_call(think) is no_call


def test_refuse_keeps_for_each_example_the_first_think_that_agrees_with_its_answer(tiny, monkeypatch):
    """--refuse K: a think must say no call fits exactly when the answer is []; the others are resampled. The tiny
    model writes no refusals, so the test reads 'says no call' as an even-length think: about half of its samples."""
    root, model_dir = tiny
    calls = data.load_bfcl("simple_python", limit=4)
    negs = [data.swapped_tools_negative(calls[0], calls[1]), data.swapped_tools_negative(calls[2], calls[3])]
    data.save_jsonl(calls + negs, root / "mixed.jsonl")
    hinted_meta = st.make(str(model_dir), str(root / "mixed.jsonl"), root / "mixed_hint", max_think_tokens=12,
                          seed=0, engine_kind="hf", hint=True)
    first = {r.id: r.think for r in data.load_jsonl(root / "mixed_hint" / "train.jsonl")}
    monkeypatch.setattr(st, "says_no_call", lambda think: len(think) % 2 == 0)
    meta = st.make(str(model_dir), str(root / "mixed.jsonl"), root / "mixed_refuse", max_think_tokens=12, seed=0,
                   engine_kind="hf", hint=True, refuse=6)
    rows = data.load_jsonl(root / "mixed_refuse" / "train.jsonl")
    assert hinted_meta["dropped_disagreeing"] == 0 and hinted_meta["agreed_at"] == {}  # off without --refuse
    assert rows and all((len(r.think) % 2 == 0) == (not r.ground_truth) for r in rows)  # each agrees
    assert meta["kept"] == len(rows) == sum(meta["agreed_at"].values())
    assert meta["kept"] + meta["dropped_empty"] + meta["dropped_hint"] + meta["dropped_disagreeing"] == 6
    again = [r for r in rows if r.think != first.get(r.id)]  # resampled: a later sample, kept only if it agrees
    agreed_first = [i for i, t in first.items() if (len(t) % 2 == 0) == i.startswith("neg:")]
    assert {r.id for r in rows} - {r.id for r in again} == set(agreed_first)  # first-pass agreement kept as it was
    assert meta["agreed_at"].get("0", 0) == len(agreed_first) and len(again) == meta["kept"] - len(agreed_first)
    assert meta["no_call_kept"] == sum(not r.ground_truth for r in rows)
    with pytest.raises(SystemExit):
        st.main(["--refuse", "4", "--data", str(root / "mixed.jsonl")])  # refusing needs the hint
