"""benchmarks/bench_qwen_pilots.py (issue 30): the report's rows and the SFT control's budget, on synthetic
metrics. The arms themselves are the benchmark (an hour each on a CPU), not a test."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("_bench_qwen_pilots", BENCH / "bench_qwen_pilots.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

KINDS = {"c1": "call", "c2": "call", "c3": "call", "n1": "no_call"}


def _eval(step, tag, verdicts, decisions):
    return {"step": step, "phase": "eval", "tag": tag, "verdicts": verdicts, "decisions": decisions}


def test_eval_rows_sum_training_seconds_pair_with_step_0_and_skip_a_second_evaluation_of_one_step():
    start = _eval(0, "before", {"c1": 1, "c2": 0, "c3": 0, "n1": 0}, {"c1": "call", "c2": "bad", "c3": "call",
                                                                      "n1": "call"})
    history = [start, {"step": 1, "phase": "sft", "step_s": 90.0}, {"step": 2, "phase": "sft", "step_s": 95.5},
               _eval(2, "sft-2", {"c1": 1, "c2": 1, "c3": 0, "n1": 1}, {"c1": "call", "c2": "call", "c3": "none",
                                                                         "n1": "none"}),
               _eval(2, "after-sft", {"c1": 0, "c2": 0, "c3": 0, "n1": 0}, {})]  # the same policy again: skipped
    rows = bench.eval_rows("arm", history, start, KINDS)
    assert [(r["step"], r["train_s"]) for r in rows] == [(0, 0), (2, 186)]
    assert "change" not in rows[0]
    r = rows[1]
    assert r["val"] == 0.75 and r["call_acc"] == pytest.approx(2 / 3) and r["no_call_acc"] == 1.0
    assert (r["call_says_call"], r["call_says_none"], r["call_says_bad"]) == pytest.approx((2 / 3, 1 / 3, 0))
    assert r["change"] == 0.5  # (0 + 1 + 0 + 1) / 4, paired with step 0
    assert r["change_lo"] <= 0.5 <= r["change_hi"] and 0 <= r["change_lo"] and r["change_hi"] <= 1


def test_the_sft_control_gets_its_rl_arms_training_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    rl = bench.CONTROL_OF["sft-control"]
    rows = [{"step": 0, "phase": "eval", "eval_s": 300.0}, {"step": 1, "phase": "rl", "step_s": 310.5},
            {"step": 2, "phase": "rl", "step_s": 200.0}, {"step": 2, "phase": "eval", "eval_s": 250.0}]
    (tmp_path / f"{rl}.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    monkeypatch.setattr(bench, "train", lambda args, piece_s: calls.append(args) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        bench.run_arm("sft-control", commit=False)
    args = calls[0]
    last = lambda key: args[len(args) - 1 - args[::-1].index(key) + 1]  # argparse keeps an option's last value
    assert last("--time_budget_s") == "510.5" and last("--steps") == "0" and last("--sft_think") == "none"
    (tmp_path / f"{rl}.metrics.jsonl").unlink()
    with pytest.raises(SystemExit, match="needs the finished RL arm"):
        bench.run_arm("sft-control", commit=False)


def test_heldout_rows_count_each_set_pair_policies_by_prompt_and_check_the_val_repeat(monkeypatch):
    monkeypatch.setattr(bench, "HELDOUT_PAIRS", (("rl", "sft"),))
    ev = lambda v, d: {"verdicts": v, "decisions": d}
    evals = {"rl": ev({"a1": 1, "a2": 1, "i1": 1, "v1": 1, "v2": 0}, {"a1": "call", "a2": "call", "i1": "none",
                                                                        "v1": "call", "v2": "bad"}),
             "sft": ev({"a1": 1, "a2": 0, "i1": 1, "v1": 1, "v2": 1}, {"a1": "call", "a2": "bad", "i1": "none"}),
             "untrained": ev({"a1": 0, "a2": 0, "i1": 0, "v1": 0, "v2": 0}, {})}
    sets_of = {"test_in": ["a1", "a2", "a3"], "test_irr": ["i1"], "val": ["v1", "v2"]}  # a3: over the prompt limit
    rows, pairs = bench.heldout_rows(evals, sets_of, {"rl": {"v1": 1, "v2": 1}, "untrained": {"v1": 0, "v2": 0}})
    by = {(r["policy"], r["set"]): r for r in rows}
    r = by["sft", "test_in"]
    assert (r["n"], r["acc"], r["says_call"], r["says_bad"]) == (2, 0.5, 0.5, 0.5) and r["lo"] < 0.5 < r["hi"]
    assert by["rl", "val"]["val_repeat"] == [1, 2] and by["untrained", "val"]["val_repeat"] == [2, 2]
    assert "val_repeat" not in by["sft", "val"] and "val_repeat" not in by["rl", "test_in"]
    pair = {(p["a"], p["b"], p["set"]): p for p in pairs}
    assert ("sft", "untrained", "val") in pair and ("untrained", "untrained", "val") not in pair
    p = pair["rl", "untrained", "test_in"]
    assert (p["n"], p["diff"], p["same"]) == (2, 1.0, 0)
    p = pair["rl", "sft", "test_in"]  # RL - control, paired by prompt
    assert (p["n"], p["diff"], p["same"]) == (2, 0.5, 1) and p["lo"] <= 0.5 <= p["hi"]
    # one of two pairs differs: var(d) = 1/2 - 1/4, SE = sqrt(1/4 / 2), MDE = (1.96 + 0.84) SE
    assert p["mde80"] == pytest.approx((1.959964 + 0.841621) * (0.25 / 2) ** 0.5, rel=1e-5)


def test_heldout_rows_pool_a_side_of_seeds_prompt_by_prompt(monkeypatch):
    """A tuple on a side of HELDOUT_PAIRS: each prompt's mean verdict over those policies; prompts missing from
    any of them are left out; the power bound pairs the seeds side by side."""
    monkeypatch.setattr(bench, "HELDOUT_PAIRS", ((("r0", "r1"), ("c0", "c1")), (("r0", "r1"), "c0")))
    ev = lambda v: {"verdicts": v, "decisions": {}}
    evals = {"r0": ev({"p": 1, "q": 1, "s": 0}), "r1": ev({"p": 0, "q": 1, "s": 0, "t": 1}),
             "c0": ev({"p": 0, "q": 1, "s": 1, "t": 0}), "c1": ev({"p": 0, "q": 0, "s": 1, "t": 1})}
    _, pairs = bench.heldout_rows(evals, {"test_in": ["p", "q", "s", "t"]}, {})
    pair = {(p["a"], p["b"]): p for p in pairs}
    p = pair["r0 + r1", "c0 + c1"]
    # t is missing from r0: left out. p: .5 - 0, q: 1 - .5, s: 0 - 1
    assert p["n"] == 3 and p["diff"] == pytest.approx((0.5 + 0.5 - 1) / 3) and p["same"] == 0
    assert p["lo"] <= p["diff"] <= p["hi"]
    # seeds paired: d = [[1, 0, -1], [0, 1, -1]]: discordance 4/6, mean 0, var 2/3 over 6 pairs
    assert p["mde80"] == pytest.approx((1.959964 + 0.841621) * (2 / 3 / 6) ** 0.5, rel=1e-5)
    assert p["per_seed"] == [0.0, 0.0] and p["seeds_lo"] <= 0 <= p["seeds_hi"]
    p = pair["r0 + r1", "c0"]
    assert p["diff"] == pytest.approx((0.5 + 0 - 1) / 3) and p["mde80"] is None  # unequal sides: no pairing
    assert "per_seed" not in p


def test_seed_interval_resamples_seeds_as_well_as_prompts():
    """Hand-computed: seeds whose change is 1, 0, 1 on every prompt. Over prompts alone the interval would be
    the single point 2/3; resampling seeds gives means in {0, 1/3, 2/3, 1} with P(0) = 1/27 > 2.5% and
    P(1) = 8/27, so the two-level interval is [0, 1]."""
    q = bench.seed_interval([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert q["per_seed"] == [1.0, 0.0, 1.0] and (q["seeds_lo"], q["seeds_hi"]) == (0.0, 1.0)
    # identical seeds: only the prompts vary, 2 prompts with changes 1 and 0: means 0, 1/2, 1, P(0) = 1/4
    q = bench.seed_interval([[1, 0], [1, 0], [1, 0]])
    assert q["per_seed"] == [0.5, 0.5, 0.5] and (q["seeds_lo"], q["seeds_hi"]) == (0.0, 1.0)


def test_heldout_args_evaluate_without_training_and_need_the_kept_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "WORK", tmp_path)
    args = bench.heldout_args("untrained")
    last = lambda key: args[len(args) - 1 - args[::-1].index(key) + 1]
    assert last("--steps") == "0" and last("--model") == "qwen2.5-coder-0.5b"
    assert last("--eval_data") == "split:test_in+split:test_ood+split:test_irr+split:val"
    with pytest.raises(SystemExit, match="final missing"):
        bench.heldout_args("sft-control")
    (tmp_path / "sft-control" / "final").mkdir(parents=True)
    (tmp_path / "sft-control" / "final" / "config.json").write_text("{}")
    assert bench.heldout_args("sft-control")[3] == str(tmp_path / "sft-control" / "final")
    assert "--think" not in bench.heldout_args("sft-control")
    (tmp_path / "think-ans-egpo-s1" / "final").mkdir(parents=True)
    (tmp_path / "think-ans-egpo-s1" / "final" / "config.json").write_text("{}")
    args = bench.heldout_args("think-ans-egpo-s1", "val_irr")  # validated with the opened think: evaluated with it
    assert last("--think") == "prefill" and last("--eval_data") == "split:val_irr"


def test_eval_rows_keep_val_irr_out_of_val_and_report_it_beside(tmp_path):
    """The long near-miss arms evaluate val + val_irr at once: val, its kinds and the change since step 0 stay
    val's alone; val_irr is its own column (accuracy and call share), and a curve can plot it."""
    kinds = KINDS | {"i1": "val_irr", "i2": "val_irr", "i3": "val_irr", "i4": "val_irr"}
    start = _eval(0, "before", {"c1": 1, "c2": 0, "c3": 0, "n1": 0, "i1": 0, "i2": 0, "i3": 0, "i4": 1},
                  {"c1": "call", "c2": "call", "c3": "call", "n1": "call", "i1": "call", "i2": "call", "i3": "call",
                   "i4": "none"})
    later = _eval(10, "rl-10", {"c1": 1, "c2": 1, "c3": 0, "n1": 1, "i1": 1, "i2": 1, "i3": 0, "i4": 1},
                  {"c1": "call", "c2": "call", "c3": "bad", "n1": "none", "i1": "none", "i2": "none", "i3": "call",
                   "i4": "none"})
    rows = bench.eval_rows("arm", [start, {"step": 1, "phase": "rl", "step_s": 60.0}, later], start, kinds)
    assert [r["val"] for r in rows] == [0.25, 0.75] and rows[1]["no_call_acc"] == 1.0
    assert [r["val_irr"] for r in rows] == [0.25, 0.75] and [r["val_irr_says_call"] for r in rows] == [0.75, 0.25]
    assert rows[1]["change"] == 0.5  # val's 4 prompts only: (0 + 1 + 0 + 1) / 4
    assert "val_irr" not in bench.eval_rows("arm", [_eval(0, "before", dict.fromkeys(KINDS, 1), {})], None, KINDS)[0]
    bench.plot_curves(rows, tmp_path / "curves.png")  # a fourth panel
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_long_arms_run_in_pieces_and_the_control_follows_its_rl_arms_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench, "report", lambda: "")
    trained = []  # the trainer's part is tested in tests/test_run.py (Ctrl-C checkpoints, --time_budget_s)

    def fake_train(args, piece_s):  # writes the curve the trainer would have written, exits as told
        arm_dir = Path(args[len(args) - 1 - args[::-1].index("--out_dir") + 1])
        arm_dir.mkdir(parents=True, exist_ok=True)
        rows = {"long-rl": [{"step": 1, "phase": "rl", "step_s": 300.0}, {"step": 2, "phase": "rl", "step_s": 310.0}],
                "long-sft": [{"step": 1, "phase": "sft", "step_s": 400.0}, {"step": 2, "phase": "sft", "step_s": 300.0}]}
        (arm_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[arm_dir.name]))
        (arm_dir / "ckpt-000002").mkdir(exist_ok=True)
        trained.append(args)
        return 130 if arm_dir.name == "long-rl" else 0  # RL: the piece ran out; SFT: its budget was spent

    monkeypatch.setattr(bench, "train", fake_train)
    with pytest.raises(SystemExit, match="run long-rl first"):
        bench.run_arm("long-sft", commit=False)  # no RL seconds yet
    bench.run_arm("long-rl", commit=False, piece_s=60)
    assert bench.partial_path("long-rl").exists() and not bench.metrics_path("long-rl").exists()
    bench.run_arm("long-sft", commit=False, piece_s=60)
    last = lambda key: trained[-1][len(trained[-1]) - 1 - trained[-1][::-1].index(key) + 1]
    assert last("--time_budget_s") == "610.0" and "--resume" not in trained[-1]
    # the control exited 0 (its budget spent) but its RL arm goes on: a piece, not finished
    assert bench.partial_path("long-sft").exists() and not bench.metrics_path("long-sft").exists()
    n = len(trained)
    bench.run_arm("long-sft", commit=False)  # 700 s >= 610 s: nothing to train until RL has more
    assert len(trained) == n
    bench.run_arm("long-rl", commit=False, piece_s=60)  # the next piece resumes
    assert last("--resume").endswith("long-rl")
    # a piece's curve outlives the working folder (a new machine): load reads the committed partial
    shutil.rmtree(tmp_path / "work")
    assert [r["step_s"] for r in bench.load("long-rl")] == [300.0, 310.0]


def test_a_control_and_a_long_arms_pieces_stay_on_the_machine_their_seconds_came_from(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench, "report", lambda: "")
    here = bench.common.device_name("cpu")
    assert "avx512f" in here and "amx_bf16" in here  # the flags that tell this workplace's CPUs apart
    zen4 = "cpu: AMD EPYC [avx512f +, avx512_bf16 +, amx_bf16 -], 2 cores, 2 torch threads"
    # the same model name, other flags: another machine (here's flags are read, whichever they are)
    other = zen4 if here != zen4 else zen4.replace("amx_bf16 -", "amx_bf16 +")
    (tmp_path / "results").mkdir()
    rl = bench.CONTROL_OF["sft-control"]
    bench.metrics_path(rl).write_text(json.dumps({"step": 1, "phase": "rl", "step_s": 100.0}) + "\n")
    (tmp_path / "results" / f"{rl}.meta.json").write_text(json.dumps({"device": other}))
    trained = []

    def fake_train(args, piece_s):
        arm_dir = Path(args[len(args) - 1 - args[::-1].index("--out_dir") + 1])
        arm_dir.mkdir(parents=True, exist_ok=True)
        (arm_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "phase": "rl", "step_s": 50.0}) + "\n")
        trained.append(arm_dir.name)
        return 130

    monkeypatch.setattr(bench, "train", fake_train)
    with pytest.raises(SystemExit, match="do not compare across machines"):
        bench.run_arm("sft-control", commit=False)
    assert trained == []
    bench.run_arm("sft-control", commit=False, piece_s=1, any_machine=True)  # asked for: runs, and says where
    assert trained == ["sft-control"] and bench.machines("sft-control") == {here}
    # a long arm records each piece's machine and resumes only on that kind
    bench.run_arm("long-rl", commit=False, piece_s=1)
    row = json.loads(bench.runs_path("long-rl").read_text())
    assert row["device"] == here and row["exit"] == 130 and row["to_step"] == 1 and row["train_s"] == 50.0
    bench.runs_path("long-rl").write_text(json.dumps(row | {"device": other}) + "\n")
    with pytest.raises(SystemExit, match="do not compare across machines"):
        bench.run_arm("long-rl", commit=False, piece_s=1)
    with pytest.raises(SystemExit, match="do not compare across machines"):
        bench.run_arm("long-sft", commit=False, piece_s=1)  # its RL arm's seconds came from the other machine


def test_val_pairs_compare_final_verdicts_by_prompt_and_average_a_side_of_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench, "ARMS", {"r0": [], "r1": [], "c0": [], "c1": [], "running": []})
    monkeypatch.setattr(bench, "VAL_PAIRS", (("r0", "c0"), (("r0", "r1"), ("c0", "c1")), ("running", "c0")))
    finals = {"r0": {"p": 1, "q": 1, "s": 0}, "r1": {"p": 0, "q": 1, "s": 0},
              "c0": {"p": 0, "q": 1, "s": 1}, "c1": {"p": 0, "q": 0, "s": 1, "t": 1}}
    for arm, v in finals.items():  # an earlier evaluation, then the final one
        rows = [_eval(0, "before", {i: 0 for i in v}, {}), _eval(10, "after", v, {})]
        (tmp_path / f"{arm}.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "work" / "running").mkdir(parents=True)  # not finished: no comparison yet
    (tmp_path / "work" / "running" / "metrics.jsonl").write_text(json.dumps(_eval(5, "step-5", {"p": 1}, {})) + "\n")
    pairs = bench.val_pairs()
    assert [(q["a"], q["b"], q["n"]) for q in pairs] == [("r0", "c0", 3), ("r0 + r1", "c0 + c1", 3)]
    assert pairs[0]["diff"] == pytest.approx((1 + 0 - 1) / 3)
    # per prompt, mean over seeds: p (1+0)/2 - 0 = .5, q 1 - .5 = .5, s 0 - 1 = -1 (t is only in c1: left out)
    assert pairs[1]["diff"] == pytest.approx((0.5 + 0.5 - 1) / 3)
    assert pairs[1]["lo"] <= pairs[1]["diff"] <= pairs[1]["hi"]


def test_train_summary_carries_the_decision_anchor_series_only_when_logged():
    rl = lambda step, **extra: {"step": step, "phase": "rl", "reward": 0.5, "groups": 16, "zero_var_groups": 4,
                                "completion_len": 30.0, "kl": 0.01, "entropy": 0.2, "grad_norm": 3.0,
                                "step_s": 100.0, **extra}
    plain = bench.train_summary([rl(1), rl(2)])
    assert "decision_shift" not in plain and plain["mixed_groups"] == [12, 12]
    anchored = bench.train_summary([rl(1, decision_log_odds=-2.5, decision_shift=0.0),
                                    rl(2, decision_log_odds=-2.25, decision_shift=0.25)])
    assert anchored["decision_shift"] == [0.0, 0.25] and anchored["decision_log_odds"] == [-2.5, -2.25]
    projected = bench.train_summary([rl(1, decision_log_odds=-2.5, decision_move=0.125, decision_move_left=0.0),
                                     rl(2, decision_log_odds=-2.25, decision_move=-0.5, decision_move_left=0.0)])
    assert projected["decision_move"] == [0.125, -0.5] and projected["decision_log_odds"] == [-2.5, -2.25]
    assert "decision_shift" not in projected and "decision_move" not in anchored
    assert "decision_log_odds_after" not in projected  # runs before the realized move was logged
    resumed = bench.train_summary([rl(1, decision_log_odds=-2.5, decision_move=0.125, decision_move_left=0.0),
                                   rl(2, decision_log_odds=-2.25, decision_move=-0.5, decision_move_left=0.0,
                                      decision_log_odds_after=-2.0)])
    assert resumed["decision_log_odds_after"] == [None, -2.0]
    assert "think_entropy" not in bench.train_summary([rl(1, think_entropy=None), rl(2)])  # no think: nothing
    assert bench.train_summary([rl(1, think_entropy=None), rl(2, think_entropy=0.25)])["think_entropy"] == [None, 0.25]


def test_an_arm_from_a_kept_policy_starts_at_that_policy_not_the_untrained_model(tmp_path, monkeypatch):
    """START_OF: an arm trained from another arm's kept policy (--model) is paired with that start's step-0
    evaluation (its own, or the arm that evaluated it), never with the untrained model's."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench, "ARMS", {"raw": [], "rl": [], "more": []})
    monkeypatch.setattr(bench, "START_ARM", "raw")
    monkeypatch.setattr(bench, "START_OF", {"rl": "rl", "more": "rl"})
    monkeypatch.setattr(bench, "VAL_PAIRS", ())
    monkeypatch.setattr(bench, "val_kinds", lambda: KINDS)
    monkeypatch.setattr(bench, "plot", lambda rows: None)
    zero, sft = dict.fromkeys(KINDS, 0), {"c1": 1, "c2": 1, "c3": 0, "n1": 1}
    hist = {"raw": [_eval(0, "before", zero, {}), _eval(10, "after", sft, {})],
            "rl": [_eval(0, "before", sft, {}), _eval(10, "after", dict(sft, c3=1), {})],
            "more": [_eval(10, "sft-10", dict(sft, c1=0), {})]}
    for arm, rows in hist.items():
        (tmp_path / f"{arm}.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.report()
    rows = {(r["arm"], r["step"]): r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert rows[("raw", 10)]["change"] == pytest.approx(0.75)  # against the untrained model
    assert rows[("rl", 0)]["val"] == pytest.approx(0.75) and rows[("rl", 10)]["change"] == pytest.approx(0.25)
    assert rows[("more", 0)]["val"] == pytest.approx(0.75)  # the start's evaluation, not the untrained model's
    assert rows[("more", 10)]["change"] == pytest.approx(-0.25)


def test_the_tables_name_only_defined_arms_once():
    """Every arm a comparison, a start or a control names is defined (a typo would silently drop a row), and no
    comparison is listed twice."""
    side = lambda x: x if isinstance(x, tuple) else (x,)
    suites = [(pairs, set(arms)) for _, arms, pairs in bench.SUITES.values()]
    for pairs, known in [(bench.VAL_PAIRS, set(bench.ARMS))] + suites:
        assert len(set(pairs)) == len(pairs)
        assert {arm for pair in pairs for x in pair for arm in side(x)} <= known
    for _, arms, _ in bench.SUITES.values():
        assert set(arms) - {"untrained"} <= set(bench.ARMS) | set(bench.VAL_KEPT)  # VAL_KEPT: kept by an arm
    assert set(bench.VAL_KEPT.values()) <= set(bench.LONG_ARMS) and not set(bench.VAL_KEPT) & set(bench.ARMS)
    assert bench.SUITES["heldout"] == (bench.HELDOUT_SETS, bench.HELDOUT_ARMS, bench.HELDOUT_PAIRS)
    assert set(bench.START_OF) | set(bench.START_OF.values()) | set(bench.CONTROL_OF) <= set(bench.ARMS)
    assert set(bench.CONTROL_OF.values()) <= set(bench.ARMS)


def test_rebuild_reruns_a_finished_arm_keeps_its_policy_and_counts_what_repeats(tmp_path, monkeypatch):
    """rebuild: the arm's own options (an SFT control's seconds become the steps it reached), the policy kept
    as final, its metrics beside the committed ones (never over them), and the agreement prompt by prompt."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    committed = [_eval(0, "before", dict.fromkeys(KINDS, 0), {}), {"step": 1, "phase": "sft", "step_s": 50.0},
                 {"step": 2, "phase": "sft", "step_s": 50.0},
                 _eval(2, "after", {"c1": 1, "c2": 1, "c3": 0, "n1": 1},
                       {"c1": "call", "c2": "call", "c3": "none", "n1": "none"})]
    arm = "sft-control-s1"  # a control: its budget was seconds
    (tmp_path / f"{arm}.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in committed))
    calls = []

    def fake_train(args, piece_s):
        calls.append(args)
        out = Path(args[args.index("--out_dir") + 1])
        for step in (1, 2):
            (out / f"ckpt-{step:06d}").mkdir(parents=True)
            (out / f"ckpt-{step:06d}" / "config.json").write_text("{}")
            (out / f"ckpt-{step:06d}" / "trainer_state.pt").write_text("optimizer")
        rebuilt = committed[:3] + [_eval(2, "after", {"c1": 1, "c2": 0, "c3": 0, "n1": 1},
                                         {"c1": "call", "c2": "bad", "c3": "none", "n1": "none"})]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rebuilt))
        return 0

    monkeypatch.setattr(bench, "train", fake_train)
    same = bench.rebuild_arm(arm, commit=False)
    args = calls[0]
    last = lambda key: args[len(args) - 1 - args[::-1].index(key) + 1]
    assert last("--sft_steps") == "2" and "--time_budget_s" not in args and "--resume" not in args
    assert same == {"n": 4, "committed_acc": 0.75, "rebuilt_acc": 0.5, "same_verdicts": 3, "same_decisions": 3}
    final = tmp_path / "work" / arm / "final"
    assert (final / "config.json").exists() and not (final / "trainer_state.pt").exists()
    assert not list((tmp_path / "work" / arm).glob("ckpt-*"))
    assert len(open(tmp_path / f"{arm}.metrics.jsonl").readlines()) == 4  # the committed run untouched
    assert json.loads((tmp_path / "rebuilt" / f"{arm}.meta.json").read_text())["agreement"] == same
    assert bench.rebuild_arm(arm, commit=False) == {} and len(calls) == 1  # kept: nothing to do
    with pytest.raises(SystemExit, match="has not finished"):
        bench.rebuild_arm("sft-rl-s1", commit=False)


def test_a_long_arm_repeats_the_val_verdicts_of_the_policy_it_keeps(tmp_path, monkeypatch):
    """A long arm holds out its best policy (--keep_best), not its last: its val verdicts to repeat are those of
    the evaluation at best.json's step, and none when the kept policy's step is not known on this machine."""
    monkeypatch.setattr(bench, "WORK", tmp_path)
    history = [{"phase": "eval", "step": s, "verdicts": {"q": s == 50}} for s in (0, 50, 60)]
    monkeypatch.setattr(bench, "load", lambda arm: history)
    assert bench.last_val_verdicts("sft-rl-nm-s1") == {"q": False}  # a pilot arm: its last evaluation
    assert bench.last_val_verdicts("long-nm-s1") is None
    (tmp_path / "long-nm-s1" / "best").mkdir(parents=True)
    (tmp_path / "long-nm-s1" / "best" / "best.json").write_text(json.dumps({"step": 50}))
    assert bench.last_val_verdicts("long-nm-s1") == {"q": True}


def test_a_long_control_keeps_its_start_unless_one_of_its_evaluations_beats_it(tmp_path, monkeypatch):
    """A long SFT control is not evaluated at step 0, its RL arm is, on the same start: the control keeps that
    start (its model, the RL arm's step-0 verdicts, the start arm's held-out evaluation once it has finished)
    until an evaluation of its own has a strictly higher mean over the eval sets, as --keep_best ranks them."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    acc = lambda val, irr: {"split:val": {"accuracy": val}, "split:val_irr": {"accuracy": irr}}
    rl = [{"phase": "eval", "step": 0, "eval_sets": acc(0.75, 0.5), "verdicts": {"q": "start"}},
          {"phase": "eval", "step": 10, "eval_sets": acc(0.9, 0.9), "verdicts": {"q": "rl"}}]
    control = [{"phase": "sft", "step": 1}, {"phase": "eval", "step": 20, "eval_sets": acc(0.875, 0.25),
                                             "verdicts": {"q": "sft-20"}}]
    logs = {"long-nm-s1": rl, "long-nm-more-s1": control}
    monkeypatch.setattr(bench, "load", lambda arm: logs.get(arm))
    assert bench.START_OF["long-nm-more-s1"] == "long-nm-s1"
    assert bench.control_keeps_its_start("long-nm-more-s1")  # 0.5625 < the start's 0.625
    start_model = bench.ARMS["long-nm-more-s1"][bench.ARMS["long-nm-more-s1"].index("--model") + 1]
    assert bench.kept_policy("long-nm-more-s1") == start_model == bench.SFT_START
    assert bench.last_val_verdicts("long-nm-more-s1") == {"q": "start"}
    assert bench.evaluated_as("long-nm-more-s1") == "sft-control-s1"
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "sft-control-s1.metrics.jsonl").write_text(json.dumps({"phase": "eval", "n": 1}) + "\n")
    assert bench.heldout_eval("long-nm-more-s1") == {"phase": "eval", "n": 1}
    control[1]["eval_sets"] = acc(0.5, 0.75)  # a mean of 0.625 (exact in binary): equal, not better
    assert bench.control_keeps_its_start("long-nm-more-s1")
    control[1]["eval_sets"] = acc(0.5, 0.875)
    assert not bench.control_keeps_its_start("long-nm-more-s1")
    assert bench.evaluated_as("long-nm-more-s1") == "long-nm-more-s1" and bench.heldout_eval("long-nm-more-s1") is None
    logs["long-nm-more-s1"] = None  # not run yet: its start, but held out as nothing yet
    assert bench.control_keeps_its_start("long-nm-more-s1")
    assert bench.evaluated_as("long-nm-more-s1") == "long-nm-more-s1"
    logs["long-nm-more-s1"] = control[:1]  # running, before its first evaluation: nothing kept, nothing held out
    assert bench.evaluated_as("long-nm-more-s1") == "long-nm-more-s1" and bench.heldout_eval("long-nm-more-s1") is None
    bench.metrics_path("long-nm-more-s1").write_text("")  # finished with no evaluation of its own: its start
    assert bench.evaluated_as("long-nm-more-s1") == "sft-control-s1"
    bench.metrics_path("long-nm-more-s1").unlink()
    logs["long-nm-more-s1"], logs["long-nm-s1"] = control, rl[1:]
    with pytest.raises(SystemExit, match="no evaluation at step 0"):
        bench.control_keeps_its_start("long-nm-more-s1")


def test_the_choice_on_val_alone_takes_the_first_best_and_keeps_the_start_when_nothing_beats_it(monkeypatch):
    acc = lambda val: {"split:val": {"accuracy": val}, "split:val_irr": {"accuracy": 1 - val}}
    rl = [{"phase": "eval", "step": 0, "eval_sets": acc(0.5)}, {"phase": "rl", "step": 1},
          {"phase": "eval", "step": 10, "eval_sets": acc(0.75)}, {"phase": "eval", "step": 20, "eval_sets": acc(0.75)}]
    control = [{"phase": "eval", "step": 20, "eval_sets": acc(0.25)}, {"phase": "eval", "step": 40, "eval_sets": acc(0.5)}]
    logs = {"long-nm-s1": rl, "long-nm-more-s1": control}
    monkeypatch.setattr(bench, "load", lambda arm: logs.get(arm))
    assert bench.val_best_step("long-nm-s1") == 10  # the earliest of two equal
    assert bench.val_best_step("long-nm-more-s1") == 0  # 0.5 equals its start's (the RL arm's step 0): the start
    control[1]["eval_sets"] = acc(0.625)
    assert bench.val_best_step("long-nm-more-s1") == 40


def test_the_controls_rebuilt_val_best_stops_where_the_committed_curve_had_it():
    """long-nm-more-s1-val is long-nm-more-s1 stopped at its best step on val alone (the committed curve says
    which), from the same start and seed, evaluated on the same sets, with no time budget and its last policy kept."""
    args = bench.ARMS["long-nm-more-s1-val"]
    last = lambda key: args[len(args) - 1 - args[::-1].index(key) + 1]
    assert int(last("--sft_steps")) == bench.val_best_step("long-nm-more-s1") == 80
    assert bench.val_best_step("long-nm-s1") == 50  # the RL arm's best on val alone is the policy it keeps
    assert int(last("--sft_steps")) % int(last("--eval_every")) == 0 and last("--keep_best") == "false"
    control = bench.ARMS["long-nm-more-s1"]
    for key in ("--model", "--seed", "--sft_lr", "--sft_batch_size", "--eval_data", "--sft_think", "--save_every"):
        assert last(key) == control[control.index(key) + 1]
    assert "long-nm-more-s1-val" not in bench.CONTROL_OF and bench.START_OF["long-nm-more-s1-val"] == "long-nm-s1"


def test_seed_0s_control_rebuilt_at_its_val_best_step_is_the_control_stopped_there():
    """long-nm-more-s0 kept step 20 by the rule (the best mean of val and val_irr) and step 100 on val alone:
    long-nm-more-s0-val is the control stopped at 100, evaluated there, from the same start, seed and sets."""
    args = bench.ARMS["long-nm-more-s0-val"]
    last = lambda key: args[len(args) - 1 - args[::-1].index(key) + 1]
    assert int(last("--sft_steps")) == bench.val_best_step("long-nm-more-s0") == 100
    evals = {r["step"]: r for r in bench.load("long-nm-more-s0") if r.get("phase") == "eval"}
    assert max(evals, key=lambda s: (bench.mean_accuracy(evals[s]), -s)) == 20  # the rule's choice: not the same
    assert int(last("--sft_steps")) % int(last("--eval_every")) == 0 and last("--keep_best") == "false"
    control = bench.ARMS["long-nm-more-s0"]
    for key in ("--model", "--seed", "--sft_lr", "--sft_batch_size", "--eval_data", "--sft_think", "--save_every"):
        assert last(key) == control[control.index(key) + 1]
    assert "long-nm-more-s0-val" not in bench.CONTROL_OF and bench.START_OF["long-nm-more-s0-val"] == "long-nm-s0"


def test_the_rl_arms_rebuilt_val_best_stops_at_the_earliest_of_its_tied_best_steps():
    """long-nm-s0 kept step 80 by the rule; on val alone 70 and 80 tie and the earliest counts: long-nm-s0-val is
    the same arm stopped at 70 (the committed curve says so), evaluated there on the same sets, its last policy kept."""
    args = bench.ARMS["long-nm-s0-val"]
    last = lambda key: args[len(args) - 1 - args[::-1].index(key) + 1]
    assert int(last("--steps")) == bench.val_best_step("long-nm-s0") == 70
    val = {r["step"]: r["eval_sets"]["split:val"]["accuracy"] for r in bench.load("long-nm-s0") if r.get("phase") == "eval"}
    assert val[70] == val[80] == max(val.values())  # a tie, broken the way fixed in advance
    assert int(last("--steps")) % int(last("--eval_every")) == 0 and last("--keep_best") == "false"
    rl = bench.ARMS["long-nm-s0"]
    for key in ("--model", "--seed", "--lr", "--train_data", "--eval_data", "--save_every"):
        assert last(key) == rl[rl.index(key) + 1]
    assert "long-nm-s0-val" not in bench.LONG_ARMS and bench.START_OF["long-nm-s0-val"] == "long-nm-s0"


def test_the_rules_step_read_from_the_committed_curves_is_the_policy_each_long_arm_kept():
    """rule_step: the best mean of val and val_irr, the earliest of equals, a control's start (0) unless one of its
    own beats it: the steps the finished arms' --keep_best kept (the notes of 2026-12-05 and -06)."""
    kept = {"long-nm-s1": 50, "long-nm-more-s1": 40, "long-nm-s0": 80, "long-nm-more-s0": 20}
    assert {arm: bench.rule_step(arm) for arm in kept} == kept


def test_seed_2_keeps_both_readings_policies_and_the_val_alone_test_pairs_seeds_in_order():
    for arm in ("long-nm-s2", "long-nm-more-s2"):
        args = bench.ARMS[arm]
        on = args[args.index("--keep_best_on") + 1]
        assert on == "split:val" and on in args[args.index("--eval_data") + 1].split("+")
        assert bench.VAL_KEPT[arm + "-val"] == arm
    seed = lambda name: name.replace("-val", "").rsplit("-", 1)[1]
    for side in (bench.LONG3_VAL, bench.LONG_MORE3_VAL, bench.LONG3, bench.LONG_MORE3):
        assert [seed(n) for n in side] == ["s0", "s1", "s2"]
    assert (bench.LONG3_VAL, bench.LONG_MORE3_VAL) in bench.HELDOUT_PAIRS
    assert all(n in bench.HELDOUT_ARMS for n in bench.LONG3_VAL + bench.LONG_MORE3_VAL)


def test_a_policy_kept_on_val_alone_is_its_arms_best_on_set_or_the_same_weights_evaluated_once(tmp_path, monkeypatch):
    """VAL_KEPT: the RL arm's val-best policy is its best-on-set checkpoint, which must hold val_best_step (else
    a rebuild is asked for); where both readings keep one step it is evaluated as the arm itself, and a control
    whose evaluations never beat its start on val alone is its start, evaluated as the start's arm."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    (tmp_path / "results").mkdir()
    acc = lambda val, irr: {"split:val": {"accuracy": val}, "split:val_irr": {"accuracy": irr}}
    rl = [{"phase": "eval", "step": 0, "eval_sets": acc(0.5, 0.875), "verdicts": {"q": 0}},
          {"phase": "eval", "step": 10, "eval_sets": acc(0.75, 0.5), "verdicts": {"q": 10}},
          {"phase": "eval", "step": 20, "eval_sets": acc(0.625, 1.0), "verdicts": {"q": 20}}]
    control = [{"phase": "eval", "step": 20, "eval_sets": acc(0.25, 1.0), "verdicts": {"q": "sft-20"}}]
    logs = {"long-nm-s2": rl, "long-nm-more-s2": control}
    monkeypatch.setattr(bench, "load", lambda arm: logs.get(arm))
    assert bench.evaluated_as("long-nm-s2-val") == "long-nm-s2-val"  # not finished: not known yet
    with pytest.raises(SystemExit, match="has not finished"):
        bench.kept_policy("long-nm-s2-val")
    for arm in logs:
        bench.metrics_path(arm).write_text("")
    assert bench.rule_step("long-nm-s2") == 20 and bench.val_best_step("long-nm-s2") == 10
    assert bench.evaluated_as("long-nm-s2-val") == "long-nm-s2-val"
    assert bench.last_val_verdicts("long-nm-s2-val") == {"q": 10}
    with pytest.raises(SystemExit, match="best on val alone is step 10.*holds nothing: rebuild"):
        bench.kept_policy("long-nm-s2-val")
    kept = tmp_path / "work" / "long-nm-s2" / "best-on-set"
    kept.mkdir(parents=True)
    (kept / "config.json").write_text("{}")
    (kept / "best.json").write_text(json.dumps({"step": 20}))
    with pytest.raises(SystemExit, match="holds step 20"):
        bench.kept_policy("long-nm-s2-val")
    (kept / "best.json").write_text(json.dumps({"step": 10}))
    assert bench.kept_policy("long-nm-s2-val") == str(kept)
    rl[2]["eval_sets"] = acc(0.75, 1.0)  # both readings: step 20 by the mean; val ties 10 and 20, the earliest
    assert bench.evaluated_as("long-nm-s2-val") == "long-nm-s2-val"
    rl[1]["eval_sets"] = acc(0.75, 1.0)  # now both keep step 10: the same weights
    assert bench.rule_step("long-nm-s2") == 10 and bench.evaluated_as("long-nm-s2-val") == "long-nm-s2"
    # the control: 0.25 on val never beats its start's 0.5, and its mean 0.625 does not beat the start's 0.6875
    assert bench.val_best_step("long-nm-more-s2") == 0 and bench.rule_step("long-nm-more-s2") == 0
    assert bench.evaluated_as("long-nm-more-s2-val") == "sft-start-s2"  # the control's own evaluated_as
    control[0]["eval_sets"] = acc(0.5, 1.0)  # its mean 0.75 beats the start's, its val ties: the rule keeps 20
    assert bench.rule_step("long-nm-more-s2") == 20 and bench.val_best_step("long-nm-more-s2") == 0
    assert bench.kept_policy("long-nm-more-s2-val") == bench.SFT_START2
    assert bench.evaluated_as("long-nm-more-s2-val") == "sft-start-s2"
    assert bench.last_val_verdicts("long-nm-more-s2-val") == {"q": 0}  # the RL arm's step 0: the start's
    rl[1]["eval_sets"] = rl[2]["eval_sets"] = acc(0.5, 0.5)  # nothing beats the RL arm's start either way
    assert bench.rule_step("long-nm-s2") == 0 and bench.evaluated_as("long-nm-s2") == "sft-start-s2"
    assert bench.evaluated_as("long-nm-s2-val") == "sft-start-s2"
    assert bench.evaluated_as("long-nm-s1") == "long-nm-s1"  # not finished here: itself


def test_a_long_arm_whose_checkpoint_was_lost_starts_again_only_when_asked_and_keeps_the_committed_curve(
        tmp_path, monkeypatch):
    """A new machine has a long arm's committed curve but not its checkpoint: `run` refuses to resume from
    nothing; with --restart it trains from step 0, records how the repeated evaluations agree with the
    committed ones, and replaces the committed curve only once the new one has gone past it."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench, "report", lambda: "")
    ev = lambda step, v: {"step": step, "phase": "eval", "verdicts": {"p": v, "q": 1}}
    rl = lambda step: {"step": step, "phase": "rl", "step_s": 60.0}
    committed = [ev(0, 1), rl(1), rl(2), ev(2, 1), rl(3), rl(4), ev(4, 0)]
    bench.RESULTS.mkdir()
    bench.partial_path("long-nm-s0").write_text("".join(json.dumps(r) + "\n" for r in committed))
    pieces = [[ev(0, 1), rl(1), rl(2), ev(2, 0)], [ev(0, 1), rl(1), rl(2), ev(2, 0), rl(3), rl(4), ev(4, 0), rl(5)]]
    calls = []

    def fake_train(args, piece_s):
        out = Path(args[args.index("--out_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        rows = pieces[len(calls)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"ckpt-{last_step(rows)}").mkdir()
        calls.append(args)
        return 130

    last_step = bench.last_step
    monkeypatch.setattr(bench, "train", fake_train)
    monkeypatch.setattr(bench, "check_machine", lambda arm, here: None)
    with pytest.raises(SystemExit, match="--restart"):
        bench.run_arm("long-nm-s0", commit=False, piece_s=60)
    assert not calls
    bench.run_arm("long-nm-s0", commit=False, piece_s=60, restart=True)
    assert "--resume" not in calls[0]
    assert bench.partial_path("long-nm-s0").read_text().count("\n") == len(committed)  # the committed curve stays
    run = json.loads(bench.runs_path("long-nm-s0").read_text().splitlines()[-1])
    assert run["restarted"] == {"committed_to_step": 4, "same_verdicts": {"0": [2, 2], "2": [1, 2]}}
    bench.run_arm("long-nm-s0", commit=False, piece_s=60)  # its own checkpoint now: resumes, no --restart needed
    assert "--resume" in calls[1]
    assert [json.loads(x) for x in bench.partial_path("long-nm-s0").read_text().splitlines()] == pieces[1]
    run = json.loads(bench.runs_path("long-nm-s0").read_text().splitlines()[-1])
    assert "restarted" not in run and run["to_step"] == 5


def test_the_signal_windows_average_mixed_groups_and_tokens_and_take_the_kl_median_and_max():
    rl = lambda step, reward, zero, tokens, kl: {"step": step, "phase": "rl", "reward": reward, "groups": 16,
                                                 "zero_var_groups": zero, "trained_tokens": tokens, "kl": kl}
    history = [_eval(0, "before", {}, {}), rl(1, 0.5, 10, 600, 0.01), rl(2, 0.7, 12, 400, 0.03),
               rl(3, 0.9, 16, 0, None), rl(4, 0.8, 15, 50, 9.0), _eval(4, "x", {}, {}), rl(5, 1.0, 16, 0, None)]
    w = bench.signal_by_window(history, width=4)
    assert [x["steps"] for x in w] == ["1-4", "5-5"]
    assert w[0]["reward"] == pytest.approx(0.725) and w[0]["mixed_groups"] == pytest.approx((6 + 4 + 0 + 1) / 4)
    assert w[0]["trained_tokens"] == pytest.approx(262.5) and w[0]["groups"] == 16
    assert (w[0]["kl_median"], w[0]["kl_max"]) == (0.03, 9.0)  # a step that trained nothing has no KL
    assert w[1]["mixed_groups"] == 0 and w[1]["kl_median"] is None and w[1]["kl_max"] is None
    assert bench.signal_by_window([_eval(0, "before", {}, {})]) == []


def test_committing_results_takes_new_changed_and_gone_files_of_the_folder_and_nothing_else(tmp_path, monkeypatch):
    """A finished long arm replaces its partial curve: the commit removes it too, and leaves other work alone."""
    import subprocess
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    git("config", "user.email", "t@t"), git("config", "user.name", "t")
    results = tmp_path / "results"
    (results / "heldout").mkdir(parents=True)
    for name in ("arm.partial.metrics.jsonl", "old.md", "heldout/x.md"):
        (results / name).write_text("a\n")
    (tmp_path / "code.py").write_text("a\n")
    git("add", "-A"), git("commit", "-qm", "start")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", results)
    (results / "arm.partial.metrics.jsonl").unlink()
    (results / "arm.metrics.jsonl").write_text("b\n")
    (results / "old.md").write_text("b\n")
    (results / "heldout" / "x.md").write_text("b\n")
    (tmp_path / "code.py").write_text("b\n")
    bench.commit_results("finished")
    assert sorted(git("show", "--name-status", "--format=", "HEAD").splitlines()) == [
        "A\tresults/arm.metrics.jsonl", "D\tresults/arm.partial.metrics.jsonl", "M\tresults/old.md"]
    assert sorted(git("status", "--porcelain").splitlines()) == [" M code.py", " M results/heldout/x.md"]
