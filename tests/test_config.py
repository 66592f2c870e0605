"""The config: the generated, type-checked command line, presets and files, and what a resume may change."""
import dataclasses
import json
from pathlib import Path

import pytest

from fctrain.config import Config, parse_config


def test_config_cli_is_generated_and_type_checked(tmp_path):
    cfg, resume = parse_config(["--lr", "3e-6", "--group_size", "4", "--tensorboard", "true", "--algo", "grpo"])
    assert (cfg.lr, cfg.group_size, cfg.tensorboard, cfg.algo, resume) == (3e-6, 4, True, "grpo", False)
    (tmp_path / "c.toml").write_text('lr = 2e-6\nreward = "partial"\n')
    cfg, _ = parse_config(["--config", str(tmp_path / "c.toml"), "--reward", "format"])
    assert cfg.lr == 2e-6 and cfg.reward == "format"  # the command line wins over the file
    cfg, _ = parse_config(["--preset", "paper-7b"])
    assert (cfg.lr, cfg.beta, cfg.temperature, cfg.algo, cfg.reward) == (1e-6, 0.001, 0.7, "egpo", "binary")
    for argv, message in [(["--lr", "fast"], "expects float"), (["--nope", "1"], "unknown option"),
                          (["--group_size", "1"], "group_size"), (["--tensorboard", "maybe"], "expects bool"),
                          (["--reward", "dense"], "reward must be"), (["--preset", "x"], "unknown preset")]:
        with pytest.raises(SystemExit, match=message):
            parse_config(argv)
    with pytest.raises(Exception):
        Config().lr = 1.0  # frozen


def _saved_run(out: Path, **values) -> Path:
    """A run directory whose latest checkpoint holds Config(**values) (the files parse_config reads)."""
    for step in (2, 3):
        ckpt = out / f"ckpt-{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "fctrain_config.json").write_text(json.dumps(dataclasses.asdict(Config(**values, steps=step))))
        (ckpt / "trainer_state.pt").write_bytes(b"")
    return out


def test_resume_starts_from_the_saved_config_and_allows_only_scheduling_changes(tmp_path, capsys):
    out = _saved_run(tmp_path / "old_place", lr=1e-5, reward="binary", sft_steps=4, out_dir="elsewhere")
    cfg, resume = parse_config(["--resume", str(out), "--steps", "28", "--eval_every", "2"])
    assert resume and (cfg.lr, cfg.reward, cfg.sft_steps) == (1e-5, "binary", 4)  # the run's, not the defaults
    assert (cfg.steps, cfg.eval_every, cfg.out_dir) == (28, 2, str(out))  # out_dir: where it is now
    printed = capsys.readouterr().out
    assert "from ckpt-000003" in printed and "steps 3 -> 28" in printed and "eval_every 0 -> 2" in printed
    cfg, _ = parse_config(["--resume", str(out)])
    assert cfg == Config(lr=1e-5, reward="binary", sft_steps=4, steps=3, out_dir=str(out))
    assert "unchanged" in capsys.readouterr().out
    # the command that started the run, plus --resume, continues it: equal values are no change
    cfg, _ = parse_config(["--lr", "1e-5", "--reward", "binary", "--sft_steps", "4", "--resume", str(out)])
    assert cfg.steps == 3
    for argv, message in [
            (["--lr", "2e-5"], r"cannot change lr \(1e-05 -> 2e-05\) mid-run"),
            (["--reward", "partial", "--group_size", "4", "--steps", "9"], "cannot change reward .*, group_size"),
            (["--preset", "paper-7b"], "cannot change model .* lr"),  # a preset obeys the same rule
            (["--out_dir", str(tmp_path / "new")], "disagree")]:
        with pytest.raises(SystemExit, match=message):
            parse_config(["--resume", str(out), *argv])
    (tmp_path / "same.toml").write_text('lr = 1e-5\nreward = "binary"\nsteps = 40\n')
    (tmp_path / "other.toml").write_text('lr = 1e-5\nmodel = "Qwen/Qwen2.5-Coder-7B-Instruct"\n')
    assert parse_config(["--config", str(tmp_path / "same.toml"), "--resume", str(out)])[0].steps == 40
    with pytest.raises(SystemExit, match="cannot change model"):
        parse_config(["--config", str(tmp_path / "other.toml"), "--resume", str(out)])
    with pytest.raises(SystemExit, match="no checkpoint found"):
        parse_config(["--resume", str(tmp_path / "empty")])
    (tmp_path / "bad.toml").write_text("lr = = 1")
    for argv in (["--config", str(tmp_path / "bad.toml")], ["--config", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit, match="^error: --config"):
            parse_config(argv)


def test_a_checkpoint_with_a_retired_key_still_resumes(tmp_path, capsys):
    out = _saved_run(tmp_path / "old", lr=1e-5)
    for ckpt in out.glob("ckpt-*"):  # saved while Config still had reward_processes
        saved = json.loads((ckpt / "fctrain_config.json").read_text())
        (ckpt / "fctrain_config.json").write_text(json.dumps({**saved, "reward_processes": 2}))
    cfg, resume = parse_config(["--resume", str(out), "--steps", "5"])
    assert resume and (cfg.lr, cfg.steps) == (1e-5, 5) and not hasattr(cfg, "reward_processes")
    assert "reward_processes" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown option --reward_processes"):  # gone from the command line
        parse_config(["--reward_processes", "2"])
    ckpt = sorted(out.glob("ckpt-*"))[-1]
    (ckpt / "fctrain_config.json").write_text(json.dumps({**saved, "gpus": 8}))  # an unknown key is refused
    with pytest.raises(SystemExit, match=r"keys this fctrain does not know: \['gpus'\]"):
        parse_config(["--resume", str(out)])
