"""benchmarks/bench_rl.py (issue 16's protocol): the fixed sets, the statistics and the report, on synthetic
cell results. The training and evaluation cells themselves are the benchmark (minutes each), not a test."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("_bench_rl", BENCH / "bench_rl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_sets_are_fixed_disjoint_and_large_enough():
    from fctrain import models
    tok = models.load_tokenizer(models.resolve_model(None))
    sets = bench.build_sets(tok)
    again = bench.build_sets(tok)
    assert {k: [e.id for e in v] for k, v in sets.items()} == {k: [e.id for e in v] for k, v in again.items()}
    ids = {k: {e.id for e in v} for k, v in sets.items()}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert {a, b} == {"train", "train_nm"} or not ids[a] & ids[b], (a, b)
    assert len(ids["test_in"]) >= 150 and len(ids["test_ood"]) >= 200 and len(ids["test_irr"]) >= 100
    cats = lambda k: {e.category for e in sets[k]}  # noqa: E731
    assert cats("test_in") <= {"live_simple", "simple_python"} and cats("test_ood") == {"multiple"}
    assert cats("test_irr") == {"irrelevance"} and "irrelevance" not in cats("train")
    assert cats("val_irr") == {"irrelevance"} and len(ids["val_irr"]) == 120  # (c)'s kind, disjoint from it (above)
    # negatives are trained on: live_irrelevance and questions beside another example's tools
    assert cats("train") == {"live_simple", "simple_python", "live_irrelevance", "synthetic_irrelevance"}
    for name in ("train", "val", "train_nm"):  # built from that set's own questions and tools: nothing of a test set
        for e in sets[name]:
            if e.category == "synthetic_irrelevance":
                q, t = e.id[len("neg:"):].split("|")
                assert q in ids[name] and t in ids[name] and q != t and not e.ground_truth, e.id
    assert not cats("train") & {"multiple", "irrelevance"}
    from fctrain import data
    # train_nm: train with the same swapped-tool questions, each beside its nearest-topic tools that pass the rules
    synthetic = lambda k: [e for e in sets[k] if e.category == "synthetic_irrelevance"]  # noqa: E731
    assert ids["train"] - {e.id for e in synthetic("train")} == ids["train_nm"] - {e.id for e in synthetic("train_nm")}
    question = lambda e: e.id[len("neg:"):].split("|")[0]  # noqa: E731
    assert sorted(map(question, synthetic("train"))) == sorted(map(question, synthetic("train_nm")))
    by_id = {e.id: e for e in sets["train"]}
    pool = [e for e in sets["train"] if e.ground_truth]
    for e in synthetic("train_nm"):
        assert e.id.split("|")[1] in {c.id for c in data.near_miss_candidates(by_id[question(e)], pool)}, e.id
    # the committed manifest the trainer reads as split:<set> is exactly these sets
    committed = json.loads((data.SPLITS_DIR / f"{data.DEFAULT_SPLITS}.json").read_text())
    assert committed == bench.manifest(sets)
    assert [e.id for e in data.load_any("split:test_in+split:test_irr")] == \
        [e.id for e in sets["test_in"] + sets["test_irr"]]
    with pytest.raises(ValueError, match="no set 'nope'"):
        data.load_split("nope")
    with pytest.raises(ValueError, match="not found"):
        data.load_split("other_manifest:train")


def test_bootstrap_paired_difference():
    ones, zeros = [[1] * 50, [1] * 50], [[0] * 50, [0] * 50]
    assert bench.bootstrap(ones, zeros) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=(3, 400))
    m, lo, hi = bench.bootstrap(a)
    assert m == pytest.approx(a.mean()) and lo < m < hi
    # the percentile interval of a mean of 400 seed-means: about +-1.96 * sd / sqrt(400)
    half = 1.96 * a.mean(0).std() / np.sqrt(400)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # pairing: identical arms differ by exactly 0
    assert bench.bootstrap(a, a) == (0.0, 0.0, 0.0)


def _cell(cell, arm, seed, valid, base_sha="b1", train_s=100.0):
    sets = {}
    for name, v in valid.items():
        sets[name] = {"accuracy": float(np.mean(v)), "n": len(v), "format_ok": 1.0,
                      "ids": [f"{name}_{i}" for i in range(len(v))], "valid": list(v)}
    return {"cell": cell, "arm": arm, "seed": seed, "base_sha": base_sha,
            "train": {"train_s": train_s, "steps": 3, "gen_tokens": 10, "checkpoint": "x"},
            "eval": {"eval_s": 1.0, "sets": sets}, "meta": {"device": "cpu: test", "git_sha": "abc"},
            "arm_version": bench.ARM_VERSION}


def test_report_and_sft_budget_on_synthetic_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    (tmp_path / "cells" / "bases").mkdir(parents=True)
    n = 40
    zero, one = [0] * n, [1] * n
    half = [i % 2 for i in range(n)]

    def write(c, where="cells"):
        name = c["base_sha"] if where.endswith("bases") else c["cell"]
        (tmp_path / where / f"{name}.json").write_text(json.dumps(c))
    sets = lambda v: {"test_in": v, "test_ood": v, "test_irr": v}  # noqa: E731  (the arms skip val)
    # two bases of this recipe (say, retrained on a fresh machine for seed 1), one of an older recipe
    write(_cell("sft-base", "sft-base", 0, sets(zero) | {"val": half}) | {"recipe": bench.recipe()}, "cells/bases")
    write(_cell("sft-base", "sft-base", 0, sets(half) | {"val": half}, base_sha="b2") | {"recipe": bench.recipe()},
          "cells/bases")
    write(_cell("sft-base", "sft-base", 0, sets(one), base_sha="old") | {"recipe": "another"}, "cells/bases")
    for s, sha in ((0, "b1"), (1, "b2")):
        write(_cell(f"grpo-s{s}", "grpo", s, sets(one), base_sha=sha, train_s=100.0 + 20 * s))
        write(_cell(f"egpo-s{s}", "egpo", s, sets(half), base_sha=sha, train_s=110.0))
        write(_cell(f"sft-s{s}", "sft", s, sets(zero), base_sha=sha))
    write(_cell("grpo-s2", "grpo", 2, sets(zero), base_sha="old"))  # another recipe's base: never pooled
    write(_cell("egpo-s2", "egpo", 2, sets(zero)) | {"arm_version": bench.ARM_VERSION - 1})  # older arms: neither
    assert bench.load_cell("egpo-s2") is None and bench.load_cell("egpo-s1") is not None  # skipped nor pooled
    assert bench.sft_budget(0, "b1") == pytest.approx(105.0) and bench.sft_budget(1, "b2") == pytest.approx(115.0)
    assert bench.sft_budget(2, "b1") == pytest.approx((100 + 120 + 110 + 110) / 4)  # no cell of its own seed
    assert bench.sft_budget(1, "b1") == pytest.approx(bench.sft_budget(2, "b1"))  # seed 1 ran on another base
    with pytest.raises(RuntimeError):
        monkeypatch.setattr(bench, "recipe", lambda: "nothing finished")
        bench.sft_budget(0, "b1")
    monkeypatch.undo()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    text = bench.report()
    assert "| grpo - sft | +100.0 [+100.0, +100.0]; seeds too [+100.0, +100.0] (2 seeds)" in text
    assert "| egpo - grpo | -50.0 [" in text
    # each arm is paired with its own base: grpo vs b1 (0%) and b2 (50%) = +75 points
    assert "| grpo - SFT checkpoint | +75.0 [" in text
    assert "| sft-base | 2 |" in text and "| 50.0 [" in text.split("| sft-base |")[1].splitlines()[0]
    assert text.split("| grpo | 2 |")[1].splitlines()[0].rstrip().endswith("| - |")  # no val for the arms
    rows = {r["arm"]: r for r in __import__("csv").DictReader(open(tmp_path / "summary.csv"))}
    assert rows["grpo"]["seeds"] == "2" and float(rows["egpo"]["test_in_acc"]) == 0.5
    assert (tmp_path / "heldout_vs_time.png").stat().st_size > 0


def test_bootstrap_over_seeds_widens_when_seeds_disagree():
    n = 40
    a, b = [[1] * n, [0] * n], [[0] * n, [0] * n]  # seed 0: +100 points, seed 1: 0
    m, lo, hi = bench.bootstrap(a, b)
    assert (m, lo, hi) == pytest.approx((0.5, 0.5, 0.5))  # examples alone see no uncertainty
    m2, lo2, hi2 = bench.bootstrap_seeds(a, b)
    assert m2 == pytest.approx(0.5) and lo2 == pytest.approx(0.0) and hi2 == pytest.approx(1.0)
    assert bench.bootstrap_seeds(a[:1], b[:1]) is None


def test_base_cell_reuses_a_run_that_trained_exactly_its_arguments(tmp_path, monkeypatch):
    """A scratch pilot that ran the base recipe (saving options aside, later options winning) stands in for
    the base; one training option different, or an arm's --model, does not."""
    monkeypatch.setattr(bench, "WORK", tmp_path)
    base = bench.SFT_BASE_ARGS

    (tmp_path / "train.jsonl").write_text("{}\n")
    data_sha = bench.sha256(tmp_path / "train.jsonl")

    def finished(name, args, steps, train_sha=data_sha):
        (tmp_path / name / f"ckpt-{steps:06d}").mkdir(parents=True)
        summary = {"checkpoint": str(tmp_path / name / f"ckpt-{steps:06d}"), "steps": steps}
        (tmp_path / name / "train_done.json").write_text(json.dumps({"key": [4, args], "args": args,
                                                                     "summary": summary, "train_sha": train_sha}))

    finished("pilot-other-data", base, int(base[1]), train_sha="0" * 64)  # trained on another train.jsonl

    finished("pilot-other-lr", base + ["--sft_lr", "1e-4"], 90)
    finished("pilot-same", [*base[:1], "60", *base[2:], "--sft_steps", base[1], "--save_every", "10",
                            "--keep_last", "20"], int(base[1]))
    found = bench.same_run("sft-base", base)
    assert found is not None and found["reused_from"] == "pilot-same" and found["steps"] == int(base[1])
    assert bench.same_run("sft-base", base + ["--seed", "1"]) is None
    assert bench.same_run("grpo-s0", ["--model", str(tmp_path), "--seed", "0"] + bench.RL_ARGS) is None
