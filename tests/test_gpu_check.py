"""scripts/gpu_check.sh: the dry run goes through every stage on this CPU and leaves the promised folder; the
budget skips stages; GPU mode without a GPU stops at once with a clear message.

The dry run takes 1-3 minutes on a quiet 2-core machine (mostly starting Python eight times).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGES = ["env", "wheels", "bench_target", "tests_target", "tests", "bench_tuned", "compile"]
FILES = {"summary.md", "env.json", "compile.csv", "kernels_target.csv", "kernels_tuned.csv", "logs.tar.gz"}


def run_check(out: Path, *args, timeout=1800, **env):
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def logs(out: Path) -> dict[str, str]:
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_dry_run_leaves_every_stage_result_in_one_flat_folder(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all stages ok" in proc.stdout
    # the GPU plan (printed in either mode) fits 8 minutes: stage caps plus the reserve within the 470 s budget
    plan = re.search(r"GPU plan: (.*)reserve (\d+) s = (\d+) of (\d+) s", proc.stdout)
    caps = dict((name, int(s)) for name, s in re.findall(r"(\w+) (\d+) s, ", plan.group(1)))
    reserve, total, budget = (int(plan.group(i)) for i in (2, 3, 4))
    assert list(caps) == STAGES and sum(caps.values()) + reserve == total <= budget <= 480

    # the device tool brings back at most 8 plain files, named in letters, digits, '.', '_' and '-'
    assert {p.name for p in out.iterdir()} == FILES
    assert all(p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in out.iterdir())

    env = json.loads((out / "env.json").read_text())
    assert env["mode"] == "dry-run" and env["torch"] == torch.__version__ and env["triton"]
    assert env["triton_tools"] == {"ptxas": True, "cuobjdump": True}
    blob = subprocess.run(["git", "hash-object", "kernels/logprob_entropy.py"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    if blob:  # the fingerprint is the git blob id: `git ls-tree -r SHA` finds the commit's files
        assert blob.startswith(env["fingerprint"]["kernels/logprob_entropy.py"])

    log = logs(out)
    stages = [line.split("\t") for line in log["stages.tsv"].splitlines()]
    assert [(s[0], s[1]) for s in stages] == [(name, "ok") for name in STAGES]
    assert {f"{name}.log" for name in STAGES} <= set(log)
    imported = [line.split() for line in log["wheels.log"].splitlines()
                if line.startswith(("liger-kernel ", "cut-cross-entropy "))]
    assert [(dist, version) for dist, version, _ in imported] == [("liger-kernel", "0.8.5"),
                                                                  ("cut-cross-entropy", "25.1.1")], log["wheels.log"]
    assert all("/site/" in path for *_, path in imported)  # from the offline install, not the venv
    for name in ("tests_target", "tests"):
        assert re.search(r"\d+ passed", log[f"{name}.log"]) and " failed" not in log[f"{name}.log"], log[f"{name}.log"]
    assert "skipped" not in log["tests.log"]  # test_parity_with_liger ran: Liger came from the wheels

    builds = rows(out / "compile.csv")
    assert [(r["kernel"], r["target"], r["dtype"], r["status"]) for r in builds] == \
        [("fwd", "sm_90", "bf16", "ok"), ("dz", "sm_90", "bf16", "ok")]
    assert all(int(r["registers"]) > 0 and r["spill_bytes"] == "0" for r in builds)

    bench = rows(out / "kernels_target.csv")
    assert {r["provider"] for r in bench} == {"lm-head-matmul", "fctrain-torch", "liger-grpo"}
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 for r in bench), bench
    assert {r["liger_kernel"] for r in bench} == {"0.8.5"}
    fwd = rows(out / "kernels_tuned.csv")
    assert fwd and all(r["status"] == "ok" and r["mode"] == "fwd" for r in fwd)

    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in STAGES), summary
    assert "## not measured in this run" in summary and "torch.compile" in summary
    assert any("vLLM" in why for why in env["skipped"]) == (importlib.util.find_spec("vllm") is None)


def test_budget_skips_stages_and_the_run_fails(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, "--dry-run", timeout=300, GPU_CHECK_BUDGET_S="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "env             skipped" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"summary.md", "logs.tar.gz"}
    assert "| env | skipped |" in (out / "summary.md").read_text()

    again = run_check(out, "--dry-run", timeout=60)  # never mixes two runs in one folder
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_mode_without_a_gpu_stops_at_the_first_stage(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = logs(out)
    assert "torch sees no CUDA GPU" in log["env.log"] and "--dry-run" in log["env.log"]
    assert [line.split("\t")[0] for line in log["stages.tsv"].splitlines()] == ["env"]


def test_preflight_stops_without_pytest(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else real(name, *a))
    with pytest.raises(SystemExit):
        gpu_check.main(["env", "--mode", "dry-run", "--out", str(tmp_path / "env.json")])
    assert "pytest is not installed" in capsys.readouterr().err and not (tmp_path / "env.json").exists()


def test_gpu_extra_keeps_the_gpu_machines_torch_and_triton():
    """`.[gpu]` must not replace the GPU machine's torch 2.11 / triton 3.6 / transformers 5.17 (vLLM, which pins
    newer ones, is its own extra), and setup.sh removes torchvision & co only from CPU environments."""
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu = {r.name: r for r in map(Requirement, extras["gpu"])}
    assert "vllm" not in gpu and "flash-attn" not in gpu
    for name, there in {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}.items():
        assert gpu[name].specifier.contains(there), gpu[name]
    assert [Requirement(r).name for r in extras["vllm"]] == ["vllm"]
    setup = (REPO / "scripts" / "setup.sh").read_text().splitlines()
    uninstall = [line for line in setup if "uninstall" in line and not line.lstrip().startswith("#")]
    assert uninstall and all("*,cpu,*)" in line for line in uninstall)


def test_summary_reads_a_pytest_log_cut_off_by_its_limit(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    log = tmp_path / "tests.log"
    log.write_text("tests/a.py::test_x[0] PASSED [ 1%]\ntests/a.py::test_x[1] FAILED [ 2%]\n"
                   "tests/a.py::test_y PASSED [ 3%]\n")
    assert gpu_check._pytest_lines(log) == ["FAILED tests/a.py::test_x[1]", "(cut off: 2 passed, 1 failed so far)"]
    log.write_text(log.read_text() + "FAILED tests/a.py::test_x[1] - AssertionError\n"
                   "==== 1 failed, 2 passed in 3.00s ====\n")
    assert gpu_check._pytest_lines(log) == ["FAILED tests/a.py::test_x[1] - AssertionError",
                                            "==== 1 failed, 2 passed in 3.00s ===="]
