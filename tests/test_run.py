"""The training loop: unit pieces (advantages, config, batching, think mask) and real end-to-end runs."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fctrain import checkpoint, data, packing, prompts, run
from fctrain.config import Config, parse_config
from fctrain.run import egpo_advantages, group_advantages, mean_think_entropy


def test_group_and_egpo_advantages_match_hand_computed_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv, zero_var = group_advantages(rewards)
    a_pos, a_neg = 0.75 / math.sqrt(0.1875), -0.25 / math.sqrt(0.1875)  # population std of [1,0,0,0]
    assert torch.allclose(adv[0], torch.tensor([a_pos, a_neg, a_neg, a_neg]), atol=1e-6)
    assert zero_var.tolist() == [False, True] and (adv[1] == 0).all()
    think_h = torch.tensor([0.5, 2.0, 0.1, 0.0])
    got = egpo_advantages(adv[0], think_h, lam=0.4, alpha=2.0)
    # A' = A + 0.4 * clip(H, -|A|/2, |A|/2), by hand:
    want = [a_pos + 0.4 * 0.5, a_neg + 0.4 * (abs(a_neg) / 2), a_neg + 0.4 * 0.1, a_neg + 0.0]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_mean_think_entropy_averages_each_sequences_think_tokens():
    entropy = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0, 7.0], requires_grad=True)
    think = torch.tensor([True, True, False, False, False, True])
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 2])
    h, has_think = mean_think_entropy(entropy, think, seq_ids, 4)
    assert h.tolist() == [2.0, 0.0, 7.0, 0.0] and has_think.tolist() == [True, False, True, False]
    assert not h.requires_grad  # EGPO's term is detached: no gradient through the entropy

def test_answer_kind_reads_the_call_decision_in_the_runs_format():
    required, optional = Config(think="required"), Config(think="optional")
    assert run.answer_kind("<think>x</think><answer>[f(a=1)]</answer>", required) == "call"
    assert run.answer_kind("<think>x</think><answer>[]</answer>", required) == "none"
    assert run.answer_kind("<answer>[]</answer>", required) == "bad"  # the think is required
    assert run.answer_kind("<answer>[]</answer>", optional) == "none"
    assert run.answer_kind("<answer>[f(a=</answer>", optional) == "bad"
    assert run.answer_kind('<tool_call>{"name": "f", "arguments": {}}</tool_call>', Config(fmt="hermes")) == "call"
    assert run.answer_kind("no tool fits", Config(fmt="hermes")) == "none"
    prefill = Config(think="prefill")  # the whole answer: the prefill (an opened think) + the completion
    assert run.answer_kind(prefill.prefill + "x</think><answer>[]</answer>", prefill) == "none"
    assert run.answer_kind("x</think><answer>[]</answer>", prefill) == "bad"
    assert prefill.think_required and Config(think="required").think_required and not optional.think_required
    assert Config().prefill == optional.prefill == ""


def test_lr_schedule():
    cfg = Config(sft_steps=2, steps=10, warmup_steps=2, lr=1e-5, sft_lr=5e-5, min_lr_ratio=0.1)
    lrs = [run.lr_at(cfg, s) for s in range(12)]
    assert lrs[:2] == [5e-5, 5e-5] and lrs[2] == pytest.approx(0.5e-5) and lrs[3] == pytest.approx(1e-5)
    assert lrs[-1] < lrs[4] and min(lrs[2:]) >= 0.1e-5 - 1e-12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fctrain.models import build_tiny_model
    root = tmp_path_factory.mktemp("run")
    model_dir = build_tiny_model(root / "tiny", hidden_size=64, num_layers=2, num_heads=2)
    examples = data.load_bfcl("simple_python", limit=4)
    data.save_jsonl(examples[:2], root / "train.jsonl")
    data.save_jsonl(examples[2:], root / "eval.jsonl")
    return root, model_dir


def test_usage_errors_are_one_error_line(tiny, tmp_path):
    root, model_dir = tiny
    (tmp_path / "bad.jsonl").write_text("not json\n")
    cases = [(dict(model="/no/such/model"), "model '/no/such/model': no model directory"),
             (dict(model=tmp_path), "model .* not a Hugging Face model directory"),
             (dict(train_data="bfcl:nope"), "train_data 'bfcl:nope': unknown BFCL category"),
             (dict(train_data=tmp_path / "missing.jsonl"), "train_data .*No such file"),
             (dict(train_data=tmp_path / "bad.jsonl"), "train_data .*bad.jsonl: 1 of 1 lines malformed.*line 1"),
             (dict(eval_data=f"{root / 'eval.jsonl'}+split:nope"), "eval_data 'split:nope': .* no set 'nope'"),
             (dict(out_dir=root / "train.jsonl"), "out_dir .*train.jsonl"),
             (dict(no_call_share=0.5), "no_call_share=0.5 needs training examples with no call")]  # before SFT
    for over, message in cases:
        with pytest.raises(SystemExit, match="^error: " + message) as info:
            run.main(_args(root, model_dir, tmp_path / "out", **over))
        assert "\n" not in str(info.value.code), str(info.value.code)
    proc = subprocess.run([sys.executable, "-m", "fctrain.run", "--model", "./no/such/dir"], text=True,
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: model './no/such/dir': no model directory no/such/dir"], proc.stderr


def test_malformed_training_rows_are_skipped_and_reported(tiny, tmp_path, capsys):
    root, model_dir = tiny
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((root / "train.jsonl").read_text() + '{"id": "broken"}\n')  # 1 of 3 lines malformed
    args = _args(root, model_dir, tmp_path / "out", train_data=mixed, eval_data="none", sft_steps=1, steps=0)
    with pytest.raises(SystemExit, match="1 of 3 lines malformed, more than 1.0%: line 3: ValueError"):
        run.main(args)  # the default bound, max_bad_rows 0.01
    assert run.main(args + ["--max_bad_rows", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "mixed.jsonl: skipped 1 of 3 malformed lines (lines 3)" in captured.err
    assert "data: 2 train examples" in captured.out and "skipped 1 malformed rows" in captured.out


def test_think_token_mask(tiny):
    from fctrain.models import load_tokenizer
    tok = load_tokenizer(tiny[1])
    text = "<think>call f now</think><answer>[f(a=1)]</answer>"
    ids = tok.encode(text, add_special_tokens=False)
    mask = run.think_token_mask(tok, ids, text, "python")
    inside = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "call f now" in inside and "answer" not in inside
    # --think prefill: the completion starts inside the think the prompt opened; its first tokens are think
    # tokens, and the prefill's own characters shift nothing
    text = " call f now</think><answer>[f(a=1)]</answer>"
    ids = tok.encode(text, add_special_tokens=False)
    mask = run.think_token_mask(tok, ids, text, "python", prefill="<think>\n")
    inside = tok.decode([t for t, m in zip(ids, mask) if m])
    assert mask[0] and "call f now" in inside and "answer" not in inside and "think" not in inside
    assert run.think_token_mask(tok, ids, text, "python") == [False] * len(ids)  # without it: no think


def test_think_prefill_end_to_end_trains_on_the_models_own_think(tiny):
    """--think prefill: every prompt ends with the opened think, SFT goes on from inside it, and the rollouts,
    scored as prefill + completion, parse and give the think entropy a think to measure."""
    from fctrain.models import load_tokenizer
    root, model_dir = tiny
    tok = load_tokenizer(model_dir)
    cfg = Config(model=str(model_dir), train_data=str(root / "train.jsonl"), eval_data="none", think="prefill",
                 sft_think="plan")
    extra = tok.encode(cfg.prefill, add_special_tokens=False)
    ids = run.load_data(cfg, tok, lambda *a: None).prompt_ids
    assert ids and all(p[-len(extra):] == extra for p in ids.values())
    out = root / "prefill"
    # GRPO: its think entropy is measured too (EGPO's term on it: test_packing's grpo_reports_the_think_entropy)
    assert run.main(_args(root, model_dir, out, think="prefill", algo="grpo", sft_steps=30, steps=1, save_every=0,
                          eval_limit=2)) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    rl = next(r for r in rows if r["phase"] == "rl")
    # the tiny model learnt to close the think it was handed: without the prefill in front no completion parses
    assert rl["format_rate"] > 0 and rl["think_entropy"] is not None and rl["think_entropy"] > 0
    assert rows[-1]["phase"] == "eval" and rows[-1]["eval_format_ok"] > 0


def test_think_prefill_config():
    for bad, match in [(dict(fmt="hermes"), "python format"),
                       (dict(sft_think="none", sft_steps=1), "sft_think"),
                       (dict(decision_anchor=0.01), "inside the think"),
                       (dict(decision_project=True), "inside the think")]:
        with pytest.raises(ValueError, match=match):
            Config(think="prefill", **bad)
    with pytest.raises(ValueError, match="think must be one of"):
        Config(think="forced")


def _args(root, model_dir, out, **over):
    cfg = dict(model=model_dir, engine="hf", train_data=root / "train.jsonl", eval_data=root / "eval.jsonl",
               eval_limit=1, sft_steps=30, sft_batch_size=2, sft_lr=5e-3, steps=2, prompts_per_step=2,
               group_size=4, max_new_tokens=40, reward="partial", lr=1e-3, temperature=1.0, warmup_steps=1,
               save_every=1, keep_last=4, eval_every=0, beta=0.001, out_dir=out,
               sft_think="plan")  # short targets that fit max_new_tokens 40 (the default think needs ~90)
    cfg.update(over)
    return [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


@pytest.mark.slow
def test_end_to_end_hf_engine_trains_and_resumes_exactly(tiny):
    root, model_dir = tiny
    out_a, out_b = root / "a", root / "b"
    eval_data = f"{root / 'eval.jsonl'}+split:test_irr"  # two held-out sets, each reported on its own
    assert run.main(_args(root, model_dir, out_a, eval_data=eval_data)) == 0
    rows = [json.loads(line) for line in open(out_a / "metrics.jsonl")]
    evals = [r for r in rows if r["phase"] == "eval"]
    assert evals and all(list(r["eval_sets"]) == [str(root / "eval.jsonl"), "split:test_irr"] for r in evals)
    assert all(v["total"] == 1 and v["ci95"][0] <= v["accuracy"] <= v["ci95"][1]
               for r in evals for v in r["eval_sets"].values())
    assert [r["tag"] for r in evals] == ["after-sft", "after"]
    assert all("change_since_after-sft" in v for v in evals[1]["eval_sets"].values())  # paired with the SFT checkpoint
    assert all(r["decisions"].keys() == r["verdicts"].keys() and set(r["decisions"].values()) <= {"call", "none", "bad"}
               for r in evals)
    rl = [r for r in rows if r["phase"] == "rl"]
    sft = [r for r in rows if r["phase"] == "sft"]
    assert len(rl) == 2 and len(sft) == 30 and sft[-1]["loss"] < sft[0]["loss"] / 3
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in rl) and all(r["nan_loss"] == 0 for r in rl)
    assert sum(r["trained_seqs"] for r in rl) > 0, "the warm-started tiny model should give reward variance"
    assert any(r["phase"] == "eval" and r["tag"] == "after" for r in rows)
    assert (out_a / "curves.png").exists()
    ckpts = sorted(p.name for p in out_a.glob("ckpt-*"))
    assert ckpts == ["ckpt-000029", "ckpt-000030", "ckpt-000031", "ckpt-000032"]

    # Resume from step 31 (an RL step) in a copy: the next step must equal the uninterrupted run's.
    shutil.copytree(out_a, out_b, ignore=shutil.ignore_patterns("ckpt-000032", "curves.png"))
    assert run.main(["--resume", str(out_b)]) == 0
    from safetensors.torch import load_file
    a = load_file(out_a / "ckpt-000032" / "model.safetensors")
    b = load_file(out_b / "ckpt-000032" / "model.safetensors")
    base = load_file(Path(model_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs at {k}"
    assert any(not torch.equal(a[k], base[k].to(a[k].dtype)) for k in a)  # training changed the weights


@pytest.mark.slow
def test_end_to_end_vllm_engine_and_ctrl_c(tiny):
    pytest.importorskip("vllm")
    root, model_dir = tiny
    out = root / "v"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = _args(root, model_dir, out, engine="vllm", engine_dtype="float32", sft_steps=30, steps=50,
                 eval_limit=0, save_every=0)
    proc = subprocess.Popen([sys.executable, "-m", "fctrain.run", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:  # wait for two RL steps, then Ctrl-C
        if metrics.exists() and sum('"phase": "rl"' in line for line in open(metrics)) >= 2:
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-3000:]
    rows = [json.loads(line) for line in open(metrics)]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in rl), output[-3000:]
    assert sum(r["trained_seqs"] for r in rl) > 0, output[-3000:]
    assert any(r["sync_s"] > 0 for r in rl)  # weights were pushed into vLLM after the updates
    saved = sorted(out.glob("ckpt-*"))
    assert saved and int(saved[-1].name.split("-")[1]) == rows[-1]["step"], output[-3000:]
    assert "resume with" in output


def test_time_budget_stops_after_the_step_that_spends_it_and_checkpoints(tiny):
    root, model_dir = tiny
    out = root / "budget"
    args = _args(root, model_dir, out, eval_data="none", sft_steps=30, steps=2, save_every=0,
                 time_budget_s=1e-3, sft_think="restate")
    assert run.main(args) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["phase"] for r in rows] == ["sft"]  # one step, no evaluation (eval_data none)
    assert [p.name for p in out.glob("ckpt-*")] == ["ckpt-000001"]
    with pytest.raises(SystemExit, match="sft_think"):
        parse_config(["--sft_think", "long"])


def test_sft_is_evaluated_every_eval_every_steps_and_when_the_budget_ends_it(tiny):
    root, model_dir = tiny  # an SFT-only control (issue 30) needs its curve and its final policy evaluated
    curve, budget = root / "sft_curve", root / "sft_budget"
    assert run.main(_args(root, model_dir, curve, sft_steps=3, steps=0, eval_every=2, save_every=0)) == 0
    rows = [json.loads(line) for line in open(curve / "metrics.jsonl")]
    assert [(r["phase"], r.get("tag"), r["step"]) for r in rows] == [
        ("sft", None, 1), ("sft", None, 2), ("eval", "sft-2", 2), ("sft", None, 3), ("eval", "after-sft", 3)]
    assert run.main(_args(root, model_dir, budget, sft_steps=30, steps=2, save_every=0, time_budget_s=1e-3)) == 0
    rows = [json.loads(line) for line in open(budget / "metrics.jsonl")]
    assert [(r["phase"], r.get("tag"), r["step"]) for r in rows] == [("sft", None, 1), ("eval", "after-sft", 1)]
    assert rows[1]["verdicts"] and [p.name for p in budget.glob("ckpt-*")] == ["ckpt-000001"]


def test_steps_0_evaluates_a_kept_policy_once_and_saves_nothing(tiny):
    # the held-out evaluation of a finished arm's policy (bench_qwen_pilots heldout). The tiny model's verdicts
    # are mostly 0, so their equality below is weak; the real check is the report's val repeat on Qwen.
    root, model_dir = tiny
    trained, again = root / "kept", root / "kept_eval"
    assert run.main(_args(root, model_dir, trained, sft_steps=3, steps=0, eval_limit=2, save_every=3)) == 0
    logged = [json.loads(line) for line in open(trained / "metrics.jsonl")][-1]
    assert logged["tag"] == "after-sft"
    ckpt = trained / "ckpt-000003"
    assert run.main(_args(root, ckpt, again, sft_steps=0, steps=0, eval_limit=2, save_every=0)) == 0
    rows = [json.loads(line) for line in open(again / "metrics.jsonl")]
    assert [(r["phase"], r["tag"], r["step"]) for r in rows] == [("eval", "before", 0)]  # evaluated once
    assert rows[0]["verdicts"] == logged["verdicts"] and rows[0]["decisions"] == logged["decisions"]
    assert not list(again.glob("ckpt-*"))  # nothing trained, nothing saved


# ---- faults: a run SIGKILLed anywhere resumes to the uninterrupted run's weights and metrics

REPO = Path(__file__).resolve().parents[1]
TIMINGS = ("peak_mem_mb",)  # with every key ending in _s: the only fields that differ between equal runs


def _train(args, fault=None, timeout=600):
    """`python -m fctrain.run args` in a subprocess importing this checkout; FCTRAIN_FAULT=fault."""
    env = {k: v for k, v in os.environ.items() if k != "FCTRAIN_FAULT"}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               **({"FCTRAIN_FAULT": fault} if fault else {}))
    return subprocess.Popen([sys.executable, "-m", "fctrain.run", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    output = proc.communicate(timeout=timeout)[0]
    return proc.returncode, output


def _metrics(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k not in TIMINGS} for r in rows]


def _weights(ckpt):
    from safetensors.torch import load_file
    return load_file(ckpt / "model.safetensors")


def _fault_args(root, model_dir, out, **over):
    # 4 SFT + 3 RL steps, checkpoints at 3, 6 and 7, evaluations after SFT (step 4) and at the end
    return _args(root, model_dir, out, **{**dict(sft_steps=4, steps=3, save_every=3, keep_last=10), **over})


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    root, model_dir = tiny
    out = root / "whole"
    code, output = _finish(_train(_fault_args(root, model_dir, out)))
    assert code == 0, output[-3000:]
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000003", "ckpt-000006", "ckpt-000007"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fault, resumes_at", [
    ("step:5", 3),         # inside the first RL step, after its update; step 4 is logged past ckpt-3
    ("ckpt_write:2", 3),   # between ckpt-6's weights and its state file: a partial .tmp-ckpt-000006
    ("eval:1", 3),         # inside the evaluation after SFT (step 4)
    ("eval:2", 7),         # inside the final evaluation, after the last checkpoint
    ("random", None),      # an outside SIGKILL at a random moment after the first checkpoint
])
def test_sigkill_anywhere_then_resume_equals_the_uninterrupted_run(tiny, uninterrupted, fault, resumes_at):
    root, model_dir = tiny
    out = root / f"killed-{fault.replace(':', '-')}"
    args = _fault_args(root, model_dir, out)
    if fault == "random":
        delay = random.Random().uniform(0, 4)
        proc = _train(args)
        deadline = time.time() + 600
        while not (out / "ckpt-000003").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()  # SIGKILL; a no-op if it has already finished
        code, output = _finish(proc)
        assert code in (-signal.SIGKILL, 0), output[-3000:]
        fault = f"random ({delay:.2f} s after ckpt-000003: {'killed' if code else 'finished first'})"
    else:
        code, output = _finish(_train(args, fault))
        assert code == -signal.SIGKILL, output[-3000:]
    ckpt = checkpoint.latest_checkpoint(out)  # the latest complete checkpoint loads
    assert ckpt is not None and checkpoint.load_trainer_state(ckpt)["step"] == (resumes_at or ckpt_step(ckpt)), fault
    if not fault.startswith("random"):  # a random kill may also land inside a checkpoint write
        assert (out / ".tmp-ckpt-000006").exists() == (fault == "ckpt_write:2")  # the write it cut short
    logged = [r["step"] for r in _metrics(out) if r["phase"] in ("sft", "rl")]
    if resumes_at == 3 and fault != "eval:1":
        assert max(logged) > 3  # steps were logged after the checkpoint: resuming must drop them
    code, output = _finish(_train(["--resume", str(out)]))
    assert code == 0, output[-3000:]
    assert f"from {ckpt.name}: saved config, unchanged" in output
    steps = [(r["phase"], r["step"]) for r in _metrics(out) if r["phase"] in ("sft", "rl")]
    assert len(steps) == len(set(steps)) == 7, (fault, steps)  # no step twice
    assert _metrics(out) == _metrics(uninterrupted), fault
    final, reference = _weights(out / "ckpt-000007"), _weights(uninterrupted / "ckpt-000007")
    assert final.keys() == reference.keys()
    for k in final:
        assert torch.equal(final[k], reference[k]), f"{fault}: resumed run differs at {k}"
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_engine_failure_mid_rollout_checkpoints_and_resumes(tiny, uninterrupted):
    """The engine raising in the second RL step's rollout: one error line naming the step and the checkpoint
    of steps 1-5 (the failed step's prompts not consumed), and a resume equal to the uninterrupted run."""
    root, model_dir = tiny
    out = root / "engine-failed"
    code, output = _finish(_train(_fault_args(root, model_dir, out), "rollout:2"))
    assert code == 1, output[-3000:]
    assert "RuntimeError: injected engine failure" in output  # the engine's traceback is kept
    assert output.rstrip().splitlines()[-1] == (
        f"error: the rollout engine failed in step 6 (RuntimeError: injected engine failure (FCTRAIN_FAULT)); "
        f"steps 1-5 saved in {out / 'ckpt-000005'}; resume with: python -m fctrain.run --resume {out}")
    assert checkpoint.load_trainer_state(out / "ckpt-000005")["step"] == 5
    code, output = _finish(_train(["--resume", str(out)]))
    assert code == 0, output[-3000:]
    assert _metrics(out) == _metrics(uninterrupted)
    final, reference = _weights(out / "ckpt-000007"), _weights(uninterrupted / "ckpt-000007")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def ckpt_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


@pytest.mark.slow
def test_resume_extends_a_finished_run_with_more_steps(tiny, uninterrupted, capsys):
    root, model_dir = tiny
    out = root / "extended"
    shutil.copytree(uninterrupted, out)
    with pytest.raises(SystemExit, match="cannot change lr"):
        run.main(["--resume", str(out), "--lr", "1e-4", "--steps", "4"])
    assert run.main(["--resume", str(out), "--steps", "4"]) == 0
    assert "from ckpt-000007: steps 3 -> 4" in capsys.readouterr().out
    rows = _metrics(out)
    assert [r["step"] for r in rows if r["phase"] in ("sft", "rl")] == list(range(1, 9))
    assert [(r["tag"], r["step"]) for r in rows if r["phase"] == "eval"] == [("after-sft", 4), ("after", 8)]
    assert rows[:8] == _metrics(uninterrupted)[:8]  # steps 1-7 and the SFT evaluation: the run's own
    assert json.loads((out / "ckpt-000008" / "fctrain_config.json").read_text())["steps"] == 4


def test_recipe_options_dr_grpo_advantage_and_constant_lr():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.2, 1.0, 0.2, 0.2]])
    adv, zero_var = group_advantages(rewards, "none")  # Dr. GRPO: r - mean, no division by the group's std
    assert torch.allclose(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.0] * 4, [-0.2, 0.6, -0.2, -0.2]]))
    assert zero_var.tolist() == [False, True, False]
    std_adv, _ = group_advantages(rewards)
    assert torch.allclose(std_adv[2] * rewards[2].std(unbiased=False), adv[2], atol=1e-6)
    cfg = Config(sft_steps=2, steps=10, warmup_steps=2, lr=1e-5, lr_schedule="constant")
    assert [run.lr_at(cfg, s) for s in range(2, 12)] == pytest.approx([0.5e-5] + [1e-5] * 9)
    longer = Config(sft_steps=2, steps=100, warmup_steps=2, lr=1e-5, lr_schedule="constant")
    assert [run.lr_at(longer, s) for s in range(12)] == [run.lr_at(cfg, s) for s in range(12)]  # length-free
    for bad in (["--adv_norm", "mad"], ["--lr_schedule", "linear"], ["--dynamic_sampling", "-1"], ["--think", "maybe"],
                ["--dynamic_sampling", "2", "--contrast_pairs", "true", "--prompts_per_step", "2"]):
        with pytest.raises(SystemExit):
            parse_config(bad)


def test_decision_balance_hand_computed():
    """A call-needing group rewarding its one caller (push +sqrt(3)) against a no-call group rewarding its two
    abstainers (push -2): the larger push is scaled to the smaller, the smaller side is untouched."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    calls = torch.tensor([[True, False, False, False], [False, False, True, True]])
    adv, _ = group_advantages(rewards)
    got, stats = run.balance_decision(adv, calls, torch.tensor([True, False]))
    assert stats["push_call_needing"] == pytest.approx(math.sqrt(3)) and stats["push_no_call"] == pytest.approx(-2)
    assert stats["scale_call_needing"] == 1.0 and stats["scale_no_call"] == pytest.approx(math.sqrt(3) / 2)
    assert torch.allclose(got[0], adv[0])  # the smaller push keeps its advantages
    assert torch.allclose(got[1], math.sqrt(3) / 2 * torch.tensor([1.0, 1.0, -1.0, -1.0]))  # all its credit was offset
    # one-sided: no no-call group pushes back, so the call-needing offset goes and what is left is within calls
    rewards = torch.tensor([[1.0, 0.2, 0.0, 0.0]])  # a right call, a wrong call, two abstentions
    adv, _ = group_advantages(rewards)
    got, stats = run.balance_decision(adv, torch.tensor([[True, True, False, False]]), torch.tensor([True]))
    assert stats["scale_call_needing"] == 0.0 and stats["scale_no_call"] == 0.0
    assert torch.allclose(got[0], torch.tensor([0.4, -0.4, 0.0, 0.0]) / rewards[0].std(unbiased=False), atol=1e-6)


def test_decision_balance_properties_on_random_steps():
    """Float64, fresh random steps (rewards, who calls, which prompts need a call): the step's net push toward
    calling is zero, every group still sums to zero, every difference between two completions of one group that
    made the same decision is kept, scales lie in [0, 1] and the side with the smaller push keeps scale 1."""
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    for case in range(300):
        P, G = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen))
        rewards = torch.randint(0, 4, (P, G), generator=gen, dtype=torch.float64) / 3
        calls = torch.rand(P, G, generator=gen) < torch.rand(P, 1, generator=gen)
        needs_call = torch.rand(P, generator=gen) < 0.6
        adv, _ = group_advantages(rewards, "std" if case % 2 else "none")
        got, st = run.balance_decision(adv, calls, needs_call)
        msg = f"seed {seed} case {case}"
        tol = 1e-9 * (1 + adv.abs().sum().item())
        assert abs((got * calls).sum().item()) <= tol, msg
        assert torch.allclose(got.sum(1), adv.sum(1), atol=tol), msg
        same = calls[:, :, None] == calls[:, None, :]
        diff = lambda a: a[:, :, None] - a[:, None, :]
        assert torch.allclose(diff(got)[same], diff(adv)[same], atol=tol), msg
        s_call, s_none = st["scale_call_needing"], st["scale_no_call"]
        assert 0 <= s_call <= 1 and 0 <= s_none <= 1, msg
        c_call, c_none = st["push_call_needing"], st["push_no_call"]
        if c_call * c_none < 0:
            assert (s_call == 1.0 if abs(c_call) <= abs(c_none) else s_none == 1.0), msg
        else:
            assert s_call == s_none == 0.0 and torch.allclose((got * calls).sum(1), torch.zeros(P, dtype=got.dtype),
                                                              atol=tol), msg
    assert parse_config(["--decision_balance", "true"])[0].decision_balance and not Config().decision_balance


def test_answer_balance_hand_computed():
    """Call-needing: a right call, a wrong call (partial credit), two unparsable answers; no-call: one abstention
    against three calls. Each group's answer means carry its pushes; the larger right-answer push is scaled to
    the smaller; the difference between the two calls is kept."""
    rewards = torch.tensor([[1.0, 0.6, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    answer = torch.tensor([[0, 0, 2, 2], [1, 0, 0, 0]])  # run.ANSWERS: call, none, bad
    adv, _ = group_advantages(rewards, "none")  # r - mean: [.6, .2, -.4, -.4], [.75, -.25, -.25, -.25]
    got, stats = run.balance_answers(adv, answer, torch.tensor([True, False]))
    assert stats["push_right_call_needing"] == pytest.approx(0.8) and stats["push_right_no_call"] == pytest.approx(0.75)
    s = 0.75 / 0.8
    assert stats["scale_call_needing"] == pytest.approx(s) and stats["scale_no_call"] == 1.0
    # call-needing: answer means [.4, .4, -.4, -.4], the rest [.2, -.2, 0, 0]
    want = torch.tensor([0.2 + s * 0.4, -0.2 + s * 0.4, -s * 0.4, -s * 0.4])
    assert torch.allclose(got[0], want, atol=1e-6) and torch.allclose(got[1], adv[1])
    got, stats = run.balance_answers(adv[:1], answer[:1], torch.tensor([True]))  # one side only: both means go
    assert stats["scale_call_needing"] == 0.0 and torch.allclose(got[0], torch.tensor([0.2, -0.2, 0.0, 0.0]))


def test_answer_balance_properties_on_random_steps():
    """Float64, fresh random steps: the pushes toward the two right answers come out equal, every group still
    sums to zero, every difference within one answer of a group is kept, no answer's mean push within a group
    grows, and the side with the smaller push keeps scale 1."""
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    for case in range(300):
        P, G = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen))
        rewards = torch.randint(0, 4, (P, G), generator=gen, dtype=torch.float64) / 3
        answer = torch.randint(0, 3, (P, G), generator=gen)
        needs_call = torch.rand(P, generator=gen) < 0.6
        adv, _ = group_advantages(rewards, "std" if case % 2 else "none")
        got, st = run.balance_answers(adv, answer, needs_call)
        msg = f"seed {seed} case {case}"
        tol = 1e-9 * (1 + adv.abs().sum().item())
        push = lambda a, k: (a * (answer == k)).sum(1)
        right = lambda a: (push(a, 0)[needs_call].sum().item(), push(a, 1)[~needs_call].sum().item())
        c_call, c_none = right(got)
        assert (c_call == pytest.approx(c_none, abs=tol)) if min(right(adv)) > 0 else \
            (abs(c_call) <= tol and abs(c_none) <= tol), msg
        assert torch.allclose(got.sum(1), adv.sum(1), atol=tol), msg
        same = answer[:, :, None] == answer[:, None, :]
        diff = lambda a: a[:, :, None] - a[:, None, :]
        assert torch.allclose(diff(got)[same], diff(adv)[same], atol=tol), msg
        for k in range(3):
            assert (push(got, k).abs() <= push(adv, k).abs() + tol).all(), msg
        s_call, s_none = st["scale_call_needing"], st["scale_no_call"]
        assert 0 <= s_call <= 1 and 0 <= s_none <= 1 and (max(s_call, s_none) == 1.0 or s_call == s_none == 0), msg
    assert parse_config(["--answer_balance", "true"])[0].answer_balance
    with pytest.raises(SystemExit):
        parse_config(["--answer_balance", "true", "--decision_balance", "true"])


@pytest.mark.slow
@pytest.mark.parametrize("option", ["decision_balance", "answer_balance"])
def test_balance_end_to_end_logs_a_balanced_step(tiny, tmp_path, option):
    """A real run on calls and no-call prompts with --decision_balance (the scaled pushes toward calling cancel)
    or --answer_balance (the scaled pushes toward the two right answers are equal): each RL step logs them."""
    root, model_dir = tiny
    mixed = tmp_path / "mixed.jsonl"
    data.save_jsonl(data.load_bfcl("simple_python", limit=2) + data.load_bfcl("irrelevance", limit=2), mixed)
    out = tmp_path / "bal"
    assert run.main(_args(root, model_dir, out, train_data=mixed, eval_data="none", steps=3, save_every=0,
                          **{option: "true"})) == 0
    rl = [r for r in _metrics(out) if r["phase"] == "rl"]
    assert len(rl) == 3
    for r in rl:
        s_call, s_none = r["scale_call_needing"], r["scale_no_call"]
        assert 0 <= s_call <= 1 and 0 <= s_none <= 1 and r["emptied_groups"] >= 0
        if option == "decision_balance":
            assert s_call * r["push_call_needing"] + s_none * r["push_no_call"] == pytest.approx(0, abs=1e-6)
        else:
            assert s_call * r["push_right_call_needing"] == pytest.approx(s_none * r["push_right_no_call"], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decision_log_odds_matches_a_float64_softmax(dtype):
    """log P(no call) - log P(call) from the two token sets' logits alone equals the float64 full softmax's, on
    fresh random rows and an odd vocabulary; the budget is the fp32 dot products' rounding (inputs are exact in
    fp32 after the cast), |dz| <= H u |h| |w| (u = 2^-24), which moves each logsumexp by at most max |dz|, plus
    the logsumexps' own rounding."""
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    m, hdim, vocab = 7, 37, 211
    h, w = (3 * torch.randn(n, hdim, generator=g, dtype=torch.float64) for n in (m, vocab))
    perm = torch.randperm(vocab, generator=g).tolist()
    nones, calls = perm[:3], perm[3:40]
    h, w = h.to(dtype), w.to(dtype)
    got = run.decision_log_odds(h, w, nones, calls)
    assert got.dtype == torch.float32 and got.shape == (m,)
    logp = (h.double() @ w.double().T).log_softmax(-1)
    want = logp[:, nones].logsumexp(-1) - logp[:, calls].logsumexp(-1)
    u = 2.0**-24
    dz = hdim * u * (h.double().abs() @ w.double().abs().T).amax(-1)
    z_max = (h.double() @ w.double().T).abs().amax(-1)
    budget = 2 * dz + 8 * u * (z_max + math.log(vocab))
    assert ((got.double() - want).abs() <= budget).all(), f"seed {seed}"
    assert torch.equal(run.decision_log_odds(h.double(), w.double(), nones, calls),
                       run.decision_log_odds(h.double(), w.double(), nones, calls))  # float64 stays float64


def test_decision_anchor_gradient_is_that_of_the_squared_mean_shift(tmp_path):
    """--decision_anchor's two-pass gradient equals autograd of c * mean(s - s_ref)^2 through full forwards and a
    full softmax, on a tiny real model in float64 (the policy: the reference plus fresh random noise), prompts of
    odd lengths split over several micro-batches; only rounding separates the two (float64)."""
    from fctrain.models import build_tiny_model, load_model, load_tokenizer
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    path = build_tiny_model(tmp_path / "tiny")
    tok = load_tokenizer(path)
    ref, policy, direct = (load_model(path, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        for p, q in zip(policy.parameters(), direct.parameters()):
            p.add_(0.05 * torch.randn_like(p))
            q.copy_(p)
    prefix, nones, calls = prompts.decision_tokens(tok)
    prompts_ids = [torch.randint(0, 1000, (n,)).tolist() for n in (5, 11, 3, 8)]
    seqs = [packing.Seq(ids + prefix, nones[:1]) for ids in prompts_ids]
    cfg = Config(decision_anchor=0.7, micro_batch_tokens=24, max_prompt_tokens=8, max_new_tokens=16)
    stats = run.decision_anchor_backward(cfg, policy, ref, seqs, nones, calls, "padded", False, "cpu")

    def s(model, ids):
        logp = model(torch.tensor([ids + prefix])).logits[0, -1].log_softmax(-1)
        return logp[nones].logsumexp(0) - logp[calls].logsumexp(0)
    with torch.no_grad():
        s_ref = torch.stack([s(ref, ids) for ids in prompts_ids])
    s_pol = torch.stack([s(direct, ids) for ids in prompts_ids])
    shift = (s_pol - s_ref).mean()
    (0.7 * shift**2).backward()
    assert stats["decision_shift"] == pytest.approx(shift.item(), rel=1e-9, abs=1e-12), f"seed {seed}"
    assert stats["decision_anchor_loss"] == pytest.approx(0.7 * shift.item() ** 2, rel=1e-9)
    assert stats["decision_log_odds"] == pytest.approx(s_pol.mean().item(), rel=1e-9, abs=1e-12)
    assert abs(shift.item()) > 1e-3  # the noise moved the decision: a real gradient is compared
    for (name, p), q in zip(policy.named_parameters(), direct.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12 * max(1.0, q.grad.abs().max().item()),
                                   msg=lambda m: f"{name} (seed {seed}): {m}")
    assert all(p.grad is None for p in ref.parameters())


def test_decision_anchor_needs_the_python_format():
    assert parse_config(["--decision_anchor", "1"])[0].decision_anchor == 1 and Config().decision_anchor == 0
    with pytest.raises(SystemExit):
        parse_config(["--decision_anchor", "1", "--fmt", "hermes"])
    with pytest.raises(SystemExit):
        parse_config(["--decision_anchor", "-1"])


@pytest.mark.slow
def test_decision_anchor_end_to_end_adds_nothing_until_the_policy_moves(tiny, tmp_path):
    """A real run with --decision_anchor beside an SFT term (which moves the policy: the tiny model's groups
    carry no RL signal): at step 1 the policy is the reference, the shift is exactly 0 and the update is the
    same, bit for bit, as without the anchor; at step 2 the shift is the SFT step's move and the anchor acts."""
    root, model_dir = tiny
    mixed = tmp_path / "mixed.jsonl"
    data.save_jsonl(data.load_bfcl("simple_python", limit=2) + data.load_bfcl("irrelevance", limit=2), mixed)
    common = dict(train_data=mixed, eval_data="none", sft_steps=0, steps=2, save_every=1, sft_coef=1.0,
                  reward="binary", max_new_tokens=8)
    with_anchor, without = tmp_path / "anchor", tmp_path / "plain"
    assert run.main(_args(root, model_dir, with_anchor, decision_anchor=1.0, **common)) == 0
    assert run.main(_args(root, model_dir, without, **common)) == 0
    rl = [r for r in _metrics(with_anchor) if r["phase"] == "rl"]
    assert rl[0]["decision_shift"] == 0.0 and rl[0]["decision_anchor_loss"] == 0.0
    assert math.isfinite(rl[1]["decision_shift"]) and rl[1]["decision_shift"] != 0.0
    assert all(math.isfinite(r["decision_log_odds"]) for r in rl)
    a, b = (_weights(out / "ckpt-000001") for out in (with_anchor, without))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (_weights(out / "ckpt-000002") for out in (with_anchor, without))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert not any("decision_shift" in r for r in _metrics(without))  # the default run's records are unchanged


def test_decision_gradient_is_that_of_the_mean_log_odds(tmp_path):
    """decision_gradient (--decision_project) equals autograd of mean(s) through full forwards and a full softmax
    on a tiny real model in float64, prompts of odd lengths over several micro-batches, and leaves .grad empty."""
    from fctrain.models import build_tiny_model, load_model, load_tokenizer
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    path = build_tiny_model(tmp_path / "tiny")
    tok = load_tokenizer(path)
    policy, direct = (load_model(path, dtype=torch.float64) for _ in range(2))
    prefix, nones, calls = prompts.decision_tokens(tok)
    prompts_ids = [torch.randint(0, 1000, (n,)).tolist() for n in (5, 11, 3, 8)]
    seqs = [packing.Seq(ids + prefix, nones[:1]) for ids in prompts_ids]
    cfg = Config(decision_project=True, micro_batch_tokens=24, max_prompt_tokens=8, max_new_tokens=16)
    grads, s_mean = run.decision_gradient(cfg, policy, seqs, nones, calls, "padded", False, "cpu")
    assert len(packing.plan(seqs, 24, "padded")) > 1

    def s(ids):
        logp = direct(torch.tensor([ids + prefix])).logits[0, -1].log_softmax(-1)
        return logp[nones].logsumexp(0) - logp[calls].logsumexp(0)
    mean = torch.stack([s(ids) for ids in prompts_ids]).mean()
    mean.backward()
    assert s_mean == pytest.approx(mean.item(), rel=1e-9, abs=1e-12), f"seed {seed}"
    assert all(p.grad is None for p in policy.parameters())
    for (name, _), g, q in zip(policy.named_parameters(), grads, direct.parameters()):
        torch.testing.assert_close(g, q.grad, rtol=1e-8, atol=1e-12 * max(1.0, q.grad.abs().max().item()),
                                   msg=lambda m: f"{name} (seed {seed}): {m}")


def test_project_decision_move_is_adams_nearest_update_without_the_move(tmp_path):
    """After real AdamW steps on float32 weights (fresh random weights, gradients and a direction g; weight decay
    on), project_decision_move's result equals, in float64, θ_step - (g . Δ / gᵀPg) P g with Δ the step actually
    taken and P = 1/(sqrt(v_hat) + eps) from the optimizer's state; g . (θ_new - θ_before) is left at the float32
    rounding of the weights; a parameter the optimizer never stepped is left alone."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes] + [torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    u = 2.0 ** -24  # float32 unit roundoff
    for step in range(3):
        for p in params[:3]:  # the last one never gets a gradient: AdamW has no state for it
            p.grad = torch.randn_like(p) * 10.0 ** random.uniform(-3, 1)
        grads = [torch.randn_like(p) for p in params]
        before = sum(torch.dot(g.double().flatten(), p.detach().double().flatten()) for g, p in zip(grads, params))
        theta0 = [p.detach().double().clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        theta1 = [p.detach().double().clone() for p in params]
        move, left = run.project_decision_move(opt, params, grads, before.item())

        delta = [b - a for a, b in zip(theta0, theta1)]
        want_move = sum(torch.dot(g.double().flatten(), d.flatten()) for g, d in zip(grads, delta)).item()
        assert move == pytest.approx(want_move, rel=1e-9, abs=1e-15), f"seed {seed} step {step}"
        precond = []
        for p in params[:3]:
            st = opt.state[p]
            v_hat = st["exp_avg_sq"].double() / (1 - 0.99 ** float(st["step"]))
            precond.append(1 / (v_hat.sqrt() + 1e-8))
        gpg = sum((pc * g.double() ** 2).sum() for pc, g in zip(precond, grads)).item()
        c = want_move / gpg
        for i, p in enumerate(params[:3]):
            corr = c * precond[i] * grads[i].double()
            want = theta1[i] - corr
            # the float32 product c P g and the float32 subtraction each round once (c and P themselves:
            # float32 inputs to float64/float32 arithmetic, within a few u of the float64 values)
            budget = 4 * u * (theta1[i].abs() + corr.abs()) + 1e-30
            assert ((p.detach().double() - want).abs() <= budget).all(), f"seed {seed} step {step} param {i}"
        assert torch.equal(params[3].detach().double(), theta0[3]), "no state: not corrected"
        # the move left: the float32 rounding of the corrected weights, at most u |θ| per element, times |g|
        new = [p.detach().double() for p in params]
        got_left = sum(torch.dot(g.double().flatten(), (b - a).flatten()) for g, a, b in zip(grads, theta0, new))
        bound = sum((g.double().abs() * 2 * u * (a.abs() + b.abs())).sum() for g, a, b in zip(grads, theta0, new))
        assert abs(got_left.item()) <= bound.item(), f"seed {seed} step {step}"
        assert left == pytest.approx(got_left.item(), rel=1e-6, abs=1e-12)
        assert abs(want_move) > 10 * bound.item()  # the test moves something real


def test_decision_project_config():
    assert parse_config(["--decision_project", "true"])[0].decision_project and not Config().decision_project
    with pytest.raises(SystemExit):
        parse_config(["--decision_project", "true", "--fmt", "hermes"])
    with pytest.raises(SystemExit):
        parse_config(["--decision_project", "true", "--decision_anchor", "0.1"])


@pytest.mark.slow
def test_decision_project_end_to_end_removes_the_first_order_move(tiny, tmp_path):
    """A real run with --decision_project beside an SFT term (the tiny model's groups carry no RL signal): every
    step logs the policy's mean log-odds and a removed move; the weights differ from the same run without it from
    step 1 on (the constraint acts on the first update), and the default run logs none of it."""
    root, model_dir = tiny
    mixed = tmp_path / "mixed.jsonl"
    data.save_jsonl(data.load_bfcl("simple_python", limit=2) + data.load_bfcl("irrelevance", limit=2), mixed)
    common = dict(train_data=mixed, eval_data="none", sft_steps=0, steps=2, save_every=1, sft_coef=1.0,
                  reward="binary", max_new_tokens=8, beta=0)
    with_project, without = tmp_path / "project", tmp_path / "plain"
    assert run.main(_args(root, model_dir, with_project, decision_project="true", **common)) == 0
    assert run.main(_args(root, model_dir, without, **common)) == 0
    rl = [r for r in _metrics(with_project) if r["phase"] == "rl"]
    assert len(rl) == 2
    for r in rl:
        assert math.isfinite(r["decision_log_odds"]) and r["decision_move"] != 0.0
        assert math.isfinite(r["decision_log_odds_after"])  # the same prompts after the step (decision_means)
        assert abs(r["decision_move_left"]) < abs(r["decision_move"])
    a, b = (_weights(out / "ckpt-000001") for out in (with_project, without))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert not any("decision_move" in r for r in _metrics(without))


@pytest.mark.slow
def test_sft_term_alone_is_exactly_one_sft_step_on_the_same_prompts(tiny):
    """--sft_coef: an untrained tiny model's groups all score 0 (no RL signal), so an RL step with sft_coef 1
    is the SFT term alone, on the step's prompts: the same update, bit for bit, as one SFT step on the same
    prompts at the same learning rate. The term is logged, and RL metrics are not (nothing RL-trained)."""
    from safetensors.torch import load_file
    root, model_dir = tiny
    common = dict(eval_data="none", save_every=1, reward="binary", max_new_tokens=8, sft_batch_size=2,
                  prompts_per_step=2, lr=1e-3, sft_lr=1e-3, warmup_steps=1, beta=0.0)
    mixed, sft = root / "sft_term", root / "sft_only"
    assert run.main(_args(root, model_dir, mixed, sft_steps=0, steps=1, sft_coef=1.0, **common)) == 0
    assert run.main(_args(root, model_dir, sft, sft_steps=1, steps=0, **common)) == 0
    rl = [r for r in _metrics(mixed) if r["phase"] == "rl"]
    assert rl[0]["trained_seqs"] == 0 and rl[0]["loss"] is None and math.isfinite(rl[0]["grad_norm"])
    assert rl[0]["sft_loss"] == pytest.approx([r for r in _metrics(sft) if r["phase"] == "sft"][0]["loss"], rel=1e-12)
    a, b = (load_file(out / "ckpt-000001" / "model.safetensors") for out in (mixed, sft))
    base = load_file(Path(model_dir) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], base[k].to(a[k].dtype)) for k in a)
    assert "sft_loss" not in _metrics(sft)[0]  # the default run's records are unchanged


@pytest.mark.parametrize("text, think", [("abc</think><answer>[]</answer>", "abc"),
                                         ("pi is 3.14.</think><answer>[f(x=1)]</answer>", "pi is 3.14."),
                                         ("call f(x).</think>", "call f(x)."), ("é</think>", "é"), ("</think>", "")])
def test_think_tokens_stop_before_the_first_token_that_leaves_the_think(tiny, text, think):
    from fctrain.models import load_tokenizer
    tok = load_tokenizer(tiny[1])
    ids = tok.encode(text, add_special_tokens=False)
    n = run.think_tokens(tok, ids, think)
    assert think.startswith(tok.decode(ids[:n])) and not think.startswith(tok.decode(ids[:n + 1]))
    assert len(tok.decode(ids[:n])) >= len(think) - max(len(tok.decode([i])) for i in ids)  # at most one token short


def test_sft_loss_answer_moves_the_think_into_the_prompt_and_trains_the_rest(tiny):
    """--sft_loss answer: the same tokens as --sft_loss all, split later: the think's words are context (the
    prompt), `</think>` + the answer + EOS are trained. An SFT step with it trains, on a different loss."""
    from types import SimpleNamespace
    from fctrain.models import load_tokenizer
    root, model_dir = tiny
    tok = load_tokenizer(model_dir)
    exs = data.load_bfcl("simple_python", limit=2)
    exs[0].think, exs[1].think = "The user wants the area, so f fits.", "I need f with base 10 and height 5."
    seqs = {}
    for loss in ("all", "answer"):
        cfg = Config(model=str(model_dir), think="prefill", sft_think="data", sft_loss=loss)
        ids = {e.id: prompts.build_prompt_ids(e, tok, cfg.fmt, cfg.prefill) for e in exs}
        seqs[loss] = run.gold_seqs(SimpleNamespace(cfg=cfg, tokenizer=tok, data=SimpleNamespace(prompt_ids=ids)), exs)
    for ex, a, b in zip(exs, seqs["all"], seqs["answer"]):
        assert a.prompt + a.completion == b.prompt + b.completion and b.prompt[:len(a.prompt)] == a.prompt
        assert ex.think.startswith(tok.decode(b.prompt[len(a.prompt):])) and len(b.prompt) > len(a.prompt) + 3
        trained = tok.decode(b.completion)
        assert "</think><answer>[" in trained and len(trained) < len(tok.decode(a.completion)) - 20
    data.save_jsonl(exs, root / "thinks.jsonl")
    losses = {}
    for loss in ("all", "answer"):
        out = root / f"sft_loss_{loss}"
        assert run.main(_args(root, model_dir, out, train_data=root / "thinks.jsonl", eval_data="none", sft_steps=1,
                              steps=0, save_every=0, think="prefill", sft_think="data", sft_loss=loss)) == 0
        losses[loss] = [r for r in _metrics(out) if r["phase"] == "sft"][0]["loss"]
    assert all(math.isfinite(x) for x in losses.values()) and losses["all"] != losses["answer"]
    with pytest.raises(ValueError, match="sft_think none has no think"):
        Config(sft_think="none", think="optional", sft_loss="answer")


def test_gold_in_group_replaces_the_last_sample_of_an_all_wrong_group_only(tiny):
    """--gold_in_group: a group with no right completion gets the gold answer (scored, not sampled: log-probs
    None) in place of its last sample; a group with a right one, the inputs, and a gold the reward would not pay
    in full are left alone."""
    from types import SimpleNamespace
    from fctrain import reward as freward
    from fctrain.models import load_tokenizer
    from fctrain.rollout import Completion
    tok = load_tokenizer(tiny[1])
    exs = data.load_bfcl("simple_python", limit=2)
    cfg = Config(model=str(tiny[1]), group_size=3, think="optional", sft_think="none", reward="binary")
    scorer = freward.RewardScorer(cfg.reward, cfg.fmt, think_required=cfg.think_required)
    right = prompts.render_target(exs[1], "python", "none")
    texts = ["<answer>[]</answer>", "no answer", "<answer>[f(x=1)]</answer>"] + [right, "nope", "nope"]
    comps = [Completion(tok.encode(t, add_special_tokens=False), [-1.0] * len(tok.encode(t, add_special_tokens=False)),
                        t, "stop") for t in texts]
    owners = [exs[0]] * 3 + [exs[1]] * 3
    results = scorer(texts, owners)
    rewards = torch.tensor([r.reward for r in results]).view(2, 3)
    roll = run.Rollout(comps, owners, 1.0)
    tr = SimpleNamespace(cfg=cfg, tokenizer=tok, scorer=scorer)
    trained, trained_rewards, n = run.gold_in_group(tr, roll, results, rewards)
    assert n == 1 and trained_rewards.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    gold = trained.completions[2]
    assert gold.logprobs is None and gold.text == prompts.render_target(exs[0], "python", "none")
    assert gold.token_ids[-1] == tok.eos_token_id and tok.decode(gold.token_ids[:-1]) == gold.text
    assert trained.completions[:2] + trained.completions[3:] == comps[:2] + comps[3:]
    assert roll.completions == comps and rewards[0].tolist() == [0.0, 0.0, 0.0]  # the inputs are not changed
    unpaid = SimpleNamespace(cfg=cfg, tokenizer=tok, scorer=lambda t, e: [freward.RewardResult(0.5, True, False, None)])
    assert run.gold_in_group(unpaid, roll, results, rewards)[2] == 0


def test_an_unsampled_sequence_takes_importance_weight_one():
    """sampler_logps: a sequence with no sampler log-probs (the gold answer) gets the trainer's old ones, so
    min(exp(old - rollout), cap) = 1 on its tokens; sampled sequences keep the sampler's."""
    seqs = [packing.Seq([1, 2], [3, 4, 5]), packing.Seq([1, 2], [6, 7])]
    mb = packing.build(seqs, [[0, 1]], "padded")
    old = torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5])
    assert run.sampler_logps([[-1.0, -2.0, -3.0], [-4.0, -5.0]], seqs, mb, old).tolist() == [-1, -2, -3, -4, -5]
    got = run.sampler_logps([[-1.0, -2.0, -3.0], None], seqs, mb, old)
    assert got.tolist() == pytest.approx([-1.0, -2.0, -3.0, -0.4, -0.5])


def test_gold_in_group_gives_an_all_wrong_step_something_to_learn(tiny):
    """An untrained tiny model's groups all score 0: without the gold nothing is trained; with it every group
    is mixed (the gold right, the samples wrong) and trained, and the record counts the groups given gold while
    its reward stays the sampled completions'."""
    root, model_dir = tiny
    common = dict(eval_data="none", save_every=0, reward="binary", max_new_tokens=8, sft_steps=0, steps=1,
                  prompts_per_step=2, think="optional", sft_think="none")
    assert run.main(_args(root, model_dir, root / "no_gold", **common)) == 0
    assert run.main(_args(root, model_dir, root / "gold", gold_in_group="true", **common)) == 0
    plain, gold = ([r for r in _metrics(root / out) if r["phase"] == "rl"][0] for out in ("no_gold", "gold"))
    assert plain["trained_seqs"] == 0 and "gold_groups" not in plain
    assert gold["gold_groups"] == 2 and gold["zero_var_groups"] == 0 and gold["trained_seqs"] == 8
    assert gold["reward"] == 0.0 and math.isfinite(gold["loss"]) and gold["is_max"] <= 2.0
    with pytest.raises(ValueError, match="think prefill opens a think"):
        Config(think="prefill", sft_think="none", sft_steps=0, gold_in_group=True)


def test_keep_best_saves_the_policy_of_each_evaluation_that_beats_every_earlier_one(tiny, tmp_path):
    """--keep_best: out/best is rewritten only when an evaluation's mean accuracy over its sets beats every earlier
    one (a tie keeps the earlier), evaluations from before a resume included; best.json names the step."""
    from types import SimpleNamespace
    from safetensors.torch import load_file
    from fctrain.models import load_tokenizer
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny[1])
    history, said = [], []
    tr = SimpleNamespace(model=model, tokenizer=load_tokenizer(tiny[1]), out=tmp_path,
                         log=SimpleNamespace(history=history, say=said.append))
    saved = []
    for step, (a, b) in enumerate([(0.5, 0.5), (0.6, 0.3), (0.2, 0.8), (0.9, 0.7), (0.8, 0.8)]):
        with torch.no_grad():
            next(model.parameters()).fill_(step)  # a weight that says which step's policy was saved
        record = {"step": step, "phase": "eval", "tag": f"step-{step}",
                  "eval_sets": {"v": {"accuracy": a}, "w": {"accuracy": b}}}
        history.append(record)
        run.keep_best(tr, record)
        best = json.loads((tmp_path / "best" / "best.json").read_text())
        saved.append(best["step"])
        first = next(model.named_parameters())[0]
        assert float(load_file(tmp_path / "best" / "model.safetensors")[first].flatten()[0]) == best["step"]
    assert saved == [0, 0, 0, 3, 3] and len(said) == 2  # 0.45 < 0.5 = 0.5 (tie: the earlier) < 0.8 = 0.8
    assert (tmp_path / "best" / "config.json").exists() and not list(tmp_path.glob(".tmp-*"))


def test_keep_best_on_one_set_ranks_by_that_set_alone_beside_the_mean(tiny, tmp_path):
    """--keep_best_on w: out/best-on-set keeps the policy of each evaluation whose accuracy on w alone beats every
    earlier one's (a tie keeps the earlier; an evaluation without w, from before, does not count), while out/best
    keeps ranking by the mean: the two readings of "best on validation" each keep their own policy."""
    from types import SimpleNamespace
    from safetensors.torch import load_file
    from fctrain.models import load_tokenizer
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny[1])
    history, said = [], []
    tr = SimpleNamespace(model=model, tokenizer=load_tokenizer(tiny[1]), out=tmp_path,
                         log=SimpleNamespace(history=history, say=said.append))
    history.append({"step": 0, "phase": "eval", "tag": "other", "eval_sets": {"v": {"accuracy": 0.4}}})
    first = next(model.named_parameters())[0]
    kept = {"best": [], "best-on-set": []}
    for step, (a, b) in enumerate([(0.5, 0.5), (0.9, 0.3), (0.2, 0.8), (0.1, 0.8), (0.9, 0.7)], start=1):
        with torch.no_grad():
            next(model.parameters()).fill_(step)
        record = {"step": step, "phase": "eval", "tag": f"step-{step}",
                  "eval_sets": {"v": {"accuracy": a}, "w": {"accuracy": b}}}
        history.append(record)
        run.keep_best(tr, record)
        run.keep_best(tr, record, "w")
        for folder in kept:
            best = json.loads((tmp_path / folder / "best.json").read_text())
            assert float(load_file(tmp_path / folder / "model.safetensors")[first].flatten()[0]) == best["step"]
            kept[folder].append(best["step"])
    assert kept["best-on-set"] == [1, 1, 3, 3, 3]  # w: 0.5, 0.3, 0.8, 0.8 (tie: the earlier), 0.7
    assert kept["best"] == [1, 2, 2, 2, 5]  # the mean: 0.4 (step 0's, v only), 0.5, 0.6, 0.5, 0.45, 0.8
    on_set = json.loads((tmp_path / "best-on-set" / "best.json").read_text())
    assert on_set["on"] == "w" and on_set["accuracy"] == 0.8 and on_set["mean_accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="keep_best_on must be one of eval_data"):
        Config(eval_data="split:val+split:val_irr", keep_best_on="split:test_in")
    assert Config(eval_data="split:val + split:val_irr", keep_best_on="split:val_irr").keep_best_on == "split:val_irr"


def test_keep_best_in_a_run_and_on_resume(tiny):
    root, model_dir = tiny
    out = root / "best_run"
    args = _args(root, model_dir, out, sft_steps=0, steps=1, eval_every=1, eval_at_start="true", keep_best="true",
                 max_new_tokens=8, think="optional", sft_think="none")
    assert run.main(args) == 0
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("phase") == "eval"]
    scores = [sum(v["accuracy"] for v in r["eval_sets"].values()) / len(r["eval_sets"]) for r in evals]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == evals[scores.index(max(scores))]["step"]
    # allowed overrides; the evaluations before the resume count for best-on-set too (it is kept only if beaten)
    on = str(root / "eval.jsonl")
    assert run.main(["--resume", str(out), "--steps", "2", "--keep_best", "true", "--keep_best_on", on]) == 0
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("phase") == "eval"]
    beaten = evals[-1]["eval_sets"][on]["accuracy"] > max(r["eval_sets"][on]["accuracy"] for r in evals[:-1])
    assert (out / "best-on-set" / "best.json").exists() == beaten and evals[-1]["step"] == 2


@pytest.mark.slow
def test_dynamic_sampling_refills_zero_variance_groups(tiny):
    """DAPO: an untrained tiny model's groups all score 0 (no variance), so each step samples the extra
    rounds, each on newly drawn prompts (the data position moves by prompts_per_step per round)."""
    root, model_dir = tiny
    out = root / "dapo"
    args = _args(root, model_dir, out, eval_data="none", sft_steps=0, steps=2, save_every=0, dynamic_sampling=2,
                 reward="binary", max_new_tokens=8)
    assert run.main(args) == 0
    rl = [r for r in _metrics(out) if r["phase"] == "rl"]
    assert [r["groups"] for r in rl] == [6, 6]  # 2 prompts + 2 rounds of 2 new ones, per step
    assert all(r["zero_var_groups"] == 6 and r["trained_seqs"] == 0 for r in rl)
