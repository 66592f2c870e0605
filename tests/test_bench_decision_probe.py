"""benchmarks/bench_decision_probe.py (issue 30): the decision tokens from a real tokenizer, the probe on a tiny
real model, and the AUC's indifference to a global offset."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fctrain import models, prompts

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("_bench_decision_probe", BENCH / "bench_decision_probe.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(models.resolve_model(None))  # SmolLM2's, offline


def test_decision_tokens_split_the_two_answers_where_they_differ(tokenizer):
    prefix, nones, calls = prompts.decision_tokens(tokenizer)
    none_ids = tokenizer.encode("<answer>[]</answer>", add_special_tokens=False)
    call_ids = tokenizer.encode("<answer>[get_weather(city='Paris')]</answer>", add_special_tokens=False)
    assert none_ids[: len(prefix)] == prefix == call_ids[: len(prefix)]
    assert none_ids[len(prefix)] in nones and call_ids[len(prefix)] in calls
    assert not set(nones) & set(calls)
    assert all("]" in tokenizer.decode([i]) for i in nones)
    assert not any(tokenizer.decode([i]).lstrip(">[").startswith("]") for i in calls)


@pytest.mark.parametrize("lead", ["<think>\nNo tool fits.</think>", "x</think>", " ok >", "<think>a\n\n</think>\n"])
def test_decision_tokens_after_a_lead_are_tokenized_with_it(tokenizer, lead):
    """With a think before the answer, the split is found on lead + answer tokenized together (as the SFT target
    is), so a BPE merge across `</think><answer` cannot hide the decision token."""
    prefix, nones, calls = prompts.decision_tokens(tokenizer, lead)
    for answer, kind in (("[]</answer>", nones), ("[get_weather(city='Paris')]</answer>", calls)):
        ids = tokenizer.encode(lead + "<answer>" + answer, add_special_tokens=False)
        assert ids[: len(prefix)] == prefix and ids[len(prefix)] in kind
    assert tokenizer.decode(prefix).startswith(lead.rstrip(">")) and not set(nones) & set(calls)
    assert (prompts.decision_tokens(tokenizer, "")[1:]) == (nones, calls)  # the token kinds do not depend on it


def test_probe_on_a_tiny_real_model(tmp_path, tokenizer):
    path = models.build_tiny_model(tmp_path / "tiny")
    model = models.load_model(path)
    prefix, nones, calls = prompts.decision_tokens(tokenizer)
    examples = [SimpleNamespace(id=f"e{i}") for i in range(3)]
    prompt_ids = [tokenizer.encode(t, add_special_tokens=False) for t in ("What is the weather?", "Hi", "Sort [3, 1]")]
    rows = bench.probe(model, tokenizer, examples, prompt_ids, no_call={"e1"})
    assert [r["no_call"] for r in rows] == [False, True, False]
    head = model.get_output_embeddings().weight
    for r, ids in zip(rows, prompt_ids):  # against a float64 softmax of a full forward's last logits
        with torch.no_grad():
            out = model(torch.tensor([ids + prefix]), output_hidden_states=True)
        p = out.logits[0, -1].double().softmax(-1)
        # the probe's LM head sees the last row alone: its fp32 logits may differ by the dot products' rounding,
        # |dz| <= H u (|h| |W|^T) (u = 2^-24), and a probability sum by a factor within exp(+-2 max |dz|)
        h = out.hidden_states[-1][0, -1].double()
        dz = h.numel() * 2.0**-24 * float((h.abs() @ head.double().abs().T).max())
        rel = math.expm1(2 * dz)
        assert math.exp(r["logp_none"]) == pytest.approx(float(p[nones].sum()), rel=rel, abs=1e-300)
        assert math.exp(r["logp_call"]) == pytest.approx(float(p[calls].sum()), rel=rel, abs=1e-300)
        assert r["p_other"] == pytest.approx(1 - float(p[nones].sum() + p[calls].sum()), abs=rel + 1e-15)


def _rows(n, shift, seed, separation=1.0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        no_call = i % 2 == 0
        s = rng.gauss(separation / 2 if no_call else -separation / 2, 1.0) + shift
        rows.append({"id": f"p{i}", "no_call": no_call, "logp_none": math.log(1 / (1 + math.exp(-s))),
                     "logp_call": math.log(1 / (1 + math.exp(s))), "p_other": 0.0})
    return rows


def test_a_global_offset_moves_the_threshold_not_the_auc():
    seed = random.randrange(10**6)
    base, shifted = _rows(80, 0.0, seed), _rows(80, -6.0, seed)  # the same prompts, all pushed toward calling
    a, b = bench.summarize(base), bench.summarize(shifted)
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-12), seed
    assert b["p_none_on_no_call"] < a["p_none_on_no_call"] and b["balanced_acc"] <= a["balanced_acc"], seed
    for share in (0.0, 0.373, 1.0):  # the offset moves by the shift itself, on any mix
        assert bench.offset(b, share) - bench.offset(a, share) == pytest.approx(-6.0, abs=1e-9), seed
    d, lo, hi = bench.auc_ci(shifted, base)
    assert abs(d) < 1e-12 and abs(lo) < 1e-12 and abs(hi) < 1e-12, seed


def test_auc_and_interval_on_planted_separations():
    seed = random.randrange(10**6)
    apart = bench.summarize(_rows(60, 0.0, seed, separation=100.0))
    assert apart["auc"] == 1.0 and apart["balanced_acc"] == 1.0, seed
    # no separation: a 95% interval misses 0.5 for ~5% of seeds, so this one is fixed
    a, lo, hi = bench.auc_ci(_rows(400, 0.0, 0, separation=0.0))
    assert lo < 0.5 < hi and lo <= a <= hi


def test_the_offset_weighs_each_kind_by_its_share():
    rows = [{"id": "n", "no_call": True, "logp_none": math.log(0.75), "logp_call": math.log(0.25), "p_other": 0.0},
            {"id": "c", "no_call": False, "logp_none": math.log(0.2), "logp_call": math.log(0.8), "p_other": 0.0}]
    s = bench.summarize(rows)
    assert s["mean_s_no_call"] == pytest.approx(math.log(3)) and s["mean_s_call"] == pytest.approx(-math.log(4))
    assert bench.offset(s, 0.25) == pytest.approx(0.25 * math.log(3) - 0.75 * math.log(4))


def test_decision_after_each_lead_equals_a_fresh_forward(tmp_path, tokenizer):
    """The think probe runs the prompt once and cuts its cache back before each lead: each score must be the one a
    fresh forward over prompt + lead + answer opening gives (float64: only rounding, ~1e-16 relative, apart)."""
    model = models.load_model(models.build_tiny_model(tmp_path / "tiny"), dtype=torch.float64)
    ids = tokenizer.encode("Book a table for two.<think>\n", add_special_tokens=False)
    leads = ["I call book with people.</think>", bench.NO_CALL_THINK + "</think>", "</think>"]
    got = bench.decision_after(model, tokenizer, ids, leads)
    for lead, (lp_none, lp_call) in zip(leads, got):
        prefix, nones, calls = prompts.decision_tokens(tokenizer, lead)
        with torch.no_grad():
            logp = model(torch.tensor([ids + prefix])).logits[0, -1].log_softmax(-1)
        assert lp_none == pytest.approx(float(logp[nones].logsumexp(0)), rel=1e-9)
        assert lp_call == pytest.approx(float(logp[calls].logsumexp(0)), rel=1e-9)


def test_think_probe_rows_on_a_tiny_real_model(tmp_path, tokenizer):
    from fctrain.rollout import HFEngine
    model = models.load_model(models.build_tiny_model(tmp_path / "tiny"))
    examples = [SimpleNamespace(id=f"e{i}") for i in range(3)]
    ids = [tokenizer.encode(t + "<think>\n", add_special_tokens=False) for t in ("Weather?", "Hi", "Sort [3, 1]")]
    rows = bench.think_probe(model, tokenizer, HFEngine(model, tokenizer, batch_size=2), examples, ids, {"e1"})
    assert [r["no_call"] for r in rows] == [False, True, False]
    for r, prompt in zip(rows, ids):
        assert "</think>" not in r["think"] and isinstance(r["closed"], bool)
        ((n, c), (nn, nc)) = bench.decision_after(model, tokenizer, prompt, [r["think"] + "</think>",
                                                                             bench.NO_CALL_THINK + "</think>"])
        assert (r["logp_none"], r["logp_call"], r["nc_logp_none"], r["nc_logp_call"]) == pytest.approx((n, c, nn, nc))
    s = bench.think_summary(rows, [dict(r) for r in rows])
    assert 0 <= s["closed_no_call"] <= 1 and s["sft_fit_auc"] == pytest.approx(s["auc"])


def test_probe_policies_writes_each_policy_once(tmp_path, monkeypatch):
    """Both subcommands' loop: each policy loaded, evaluated and written with its metadata; one already written
    is skipped, not overwritten."""
    path = models.build_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(bench.bench_qwen_pilots, "kept_policy", lambda name: str(path))
    seen = []

    def evaluate(model):
        seen.append(type(model).__name__)
        return {"summary": {"auc": 0.5}, "rows": []}, "words"
    (tmp_path / "b.json").write_text("kept")
    args = SimpleNamespace(policies=["a", "b"], threads=1, commit=False)
    bench.probe_policies(args, tmp_path, "t", "w", evaluate, lambda: None, {"data": "split:val"})
    assert len(seen) == 1 and (tmp_path / "b.json").read_text() == "kept"
    out = json.loads((tmp_path / "a.json").read_text())
    assert out["summary"] == {"auc": 0.5} and out["meta"]["policy"] == "a" and out["meta"]["data"] == "split:val"
