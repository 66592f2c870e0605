"""benchmarks/bench_headroom.py's pure functions against brute force on small cases, and its report on a
synthetic result file (no model, no engine; nothing depends on timing)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("_bench_headroom", BENCH / "bench_headroom.py")
hr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hr)


def brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert hr.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert hr.pass_at_k(16, 0, 16) == 0.0 and hr.pass_at_k(16, 1, 16) == 1.0
    assert hr.pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            hr.pass_at_k(*bad)


def test_mixed_share_uses_the_first_values_of_each_group():
    groups = [[1, 1, 1, 1, 0], [0, 1, 0, 0], [0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.6, 0.2]]
    assert hr.mixed_share(groups, 4) == 0.5
    assert hr.mixed_share(groups, 2) == 0.25
    assert hr.mixed_share([[1, 1, 1, 1, 0]], 5) == 1.0
    assert math.isnan(hr.mixed_share([], 4))
    with pytest.raises(ValueError):
        hr.mixed_share([[1, 0, 1]], 4)


def brute_auc(pos, neg):
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))


def test_auc_matches_pairwise_count_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        pos = [rng.choice([0, 0.25, 0.5, 0.75, 1.0]) for _ in range(rng.randint(1, 9))]
        neg = [rng.choice([0, 0.25, 0.5, 0.75, 1.0]) for _ in range(rng.randint(1, 9))]
        assert hr.auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)
    assert hr.auc([1, 1], [0, 0]) == 1.0 and hr.auc([0], [1]) == 0.0
    assert hr.auc([0.3] * 4, [0.3] * 5) == 0.5  # a constant call rate (a global offset) separates nothing
    assert math.isnan(hr.auc([], [1.0]))


def test_majority_decision_counts_a_tie_half():
    d = hr.majority_decision([1.0, 0.75, 0.5, 0.25], [0.0, 0.5, 1.0])
    assert d["calls_on_call"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert d["abstains_on_no_call"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert d["decision"] == pytest.approx((d["calls_on_call"] + d["abstains_on_no_call"]) / 2)


def _prompt(pid, needs_call, binary, calls, n):
    scored = {"binary": binary, "partial": [0.2 + 0.8 * b if needs_call else b for b in binary], "calls": calls,
              "format_ok": [1] * n}
    return {"id": pid, "category": "simple_python" if needs_call else "live_irrelevance", "needs_call": needs_call,
            "strict": {k: [0] * n for k in scored}, "think_optional": scored, "tokens": [10] * n, "cut": [0] * n,
            "prompt_tokens": 100, "gen_s": 1.0}


def _synthetic(n=8):
    rng = random.Random(1)
    prompts = []
    for i in range(6):
        needs = i < 3
        binary = [float(rng.random() < 0.4) for _ in range(n)]
        calls = [int(b) if not needs else 1 for b in binary] if needs else [int(not b) for b in binary]
        prompts.append(_prompt(f"p{i}", needs, binary, calls, n))
    return prompts


def test_summarize_is_the_mean_over_prompts():
    n = 8
    prompts = _synthetic(n)
    s = hr.summarize(prompts, n, "think_optional")
    assert hr.summarize(prompts, n, "strict")["all"]["pass@8"] == 0.0
    prompts = [{**p, **p["think_optional"]} for p in prompts]
    call = [p for p in prompts if p["needs_call"]]
    assert s["call"]["prompts"] == 3 and s["no_call"]["prompts"] == 3 and s["all"]["prompts"] == 6
    assert s["call"]["pass@1"] == pytest.approx(sum(sum(p["binary"]) / n for p in call) / 3)
    assert s["all"]["pass@8"] == pytest.approx(sum(any(p["binary"]) for p in prompts) / 6)
    assert "pass@16" not in s["all"]  # k > n is not estimable
    rates_pos = [sum(p["calls"]) / n for p in prompts if p["needs_call"]]
    rates_neg = [sum(p["calls"]) / n for p in prompts if not p["needs_call"]]
    assert s["all"]["auc_call_rate"] == pytest.approx(brute_auc(rates_pos, rates_neg))
    assert s["all"]["mixed8_binary"] == pytest.approx(sum(len(set(p["binary"])) > 1 for p in prompts) / 6)


def test_report_writes_csv_and_plot(tmp_path):
    n = 8
    prompts = _synthetic(n)
    settings = {"model": "tiny", "data": "split:val", "n": n, "temperature": 0.7, "max_new_tokens": 32}
    result = {"date": "2026-12-03T00:00:00Z", "git_sha": "abc", "device": "cpu: test", "avx512_bf16": False,
              "amx_bf16": False, "torch": "x", "vllm": "y", "transformers": "z", "python": "3",
              "load_avg_end": "0.1", "settings": settings, "gen_s": 2.0, "tokens_per_s": 10.0,
              "prompts": prompts}
    path = hr.result_path("tiny", 0.7, tmp_path)
    assert path.name == "tiny_T0.7.json"
    path.write_text(json.dumps(result))
    hr.main(["report", "--results", str(tmp_path)])
    rows = hr.common.read_csv(tmp_path / "summary.csv")
    assert [(r["scoring"], r["subset"]) for r in rows] == [(c, s) for c in hr.SCORINGS for s in hr.SUBSETS]
    assert list(rows[0]) == hr.SUMMARY_COLUMNS
    assert rows[0]["pass@16"] == "" and float(rows[2]["pass@8"]) == 0.0
    assert float(rows[5]["pass@8"]) == pytest.approx(sum(any(p["think_optional"]["binary"]) for p in prompts) / 6)
    assert (tmp_path / "pass_at_k.png").stat().st_size > 0


def test_think_optional_scoring_judges_the_answer_alone():
    from fctrain.data import Example

    ex = Example("t1", "simple_python", [{"role": "user", "content": "weather in Paris"}],
                 [{"name": "get_weather", "description": "weather", "parameters": {
                     "type": "dict", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
                 [{"get_weather": {"city": ["Paris"]}}])
    texts = ["<answer>[get_weather(city='Paris')]</answer>", "<think>x</think><answer>[get_weather(city='Paris')]</answer>",
             "<answer>[]</answer>", "Paris is sunny."]
    strict = hr.score_texts(ex, texts)
    lenient = hr.score_texts(ex, texts, think_required=False)
    assert strict["binary"] == [0.0, 1.0, 0.0, 0.0] and strict["format_ok"] == [0, 1, 0, 0]
    assert lenient["binary"] == [1.0, 1.0, 0.0, 0.0] and lenient["format_ok"] == [1, 1, 1, 0]
    assert lenient["calls"] == [1, 1, 0, 0] and lenient["partial"][2] == 0.0  # no call where one is needed


def test_model_tag():
    assert hr.model_tag(None) == "smollm2-135m-instruct"
    assert hr.model_tag("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert hr.model_tag("/some/dir/My Model/") == "My-Model"
