"""Helpers of scripts/gpu_check.sh (read that first): the environment record, the offline wheel install, the summary.

    python scripts/gpu_check.py env --mode gpu|dry-run --out OUT/env.json   # versions, device, sha; preflight
    python scripts/gpu_check.py wheels --site DIR                           # peers from benchmarks/wheels, offline
    python scripts/gpu_check.py summary --out OUT --logs LOGS               # OUT/summary.md from what is there

Each subcommand exits non-zero with one clear line when something the GPU run needs is missing, so that it
fails within seconds, not after minutes of device time.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `kernels` when the project is not pip-installed
WHEELS = REPO / "benchmarks" / "wheels"
PEERS = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}  # module -> distribution
# What benchmarks/bench_kernels.py and the tests import from them (on CPU the benchmark imports only Liger's GRPO).
PEER_IMPORTS = ("from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss\n"
                "from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss\n"
                "from cut_cross_entropy import linear_cross_entropy\n")
# What the stages run; a missing one must fail here, not after the machine has started.
NEEDED = ["benchmarks/gpu_compile.py", "benchmarks/bench_kernels.py", "benchmarks/common.py", "conftest.py",
          "tests/test_logprob_entropy.py", "tests/test_grpo_loss.py", "tests/kernel_utils.py"]
# Optional packages the check does not install: absent ones are recorded with what goes unmeasured.
OPTIONAL = {"vllm": "the vLLM rollout engine (trainer and engine tests are CPU-tested only)",
            "flash_attn": "flash-attention (attn_impl auto = SDPA; packed layout untested on GPU)"}
# Left out by design, to fit the budget (run them by hand with more time: benchmarks/README.md).
NOT_MEASURED = ["torch.compile provider (naive-compile: about a minute of compiling per shape)",
                "the N/H/V sweeps of bench_kernels.py (--plan sweep)",
                "fp32 builds in the compile report, and the fp32 / atomic / torch cases of the float64-reference "
                "test at the largest shape"]
# Files whose git blob ids are recorded: `git ls-tree -r SHA` matches them when the tree has no .git.
FINGERPRINT = ["kernels", "benchmarks/gpu_compile.py", "benchmarks/bench_kernels.py", "benchmarks/common.py",
               "tests/test_logprob_entropy.py", "tests/test_grpo_loss.py", "scripts/gpu_check.sh"]


def fail(message: str) -> None:
    print(f"[gpu_check] ERROR: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()[:12]


def fingerprint() -> dict:
    files = []
    for name in FINGERPRINT:
        path = REPO / name
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return {str(p.relative_to(REPO)): git_blob(p) for p in files if p.is_file()}


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                               "power.limit", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"


# ---------------------------------------------------------------------------- env (preflight)

def cmd_env(args) -> None:
    missing = [name for name in NEEDED if not (REPO / name).is_file()]
    if missing:
        fail(f"missing in {REPO}: {', '.join(missing)} (is this the repository root?)")
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        fail(f"pytest is not installed for {sys.executable}: the tests stages need it (bring its wheel, or set "
             "PYTHON to an interpreter that has it)")
    import torch
    import triton

    env = {"mode": args.mode, "git_sha": os.environ.get("FCTRAIN_GIT_SHA", ""), "python": platform.python_version(),
           "executable": sys.executable, "torch": torch.__version__, "torch_cuda": torch.version.cuda or "",
           "triton": triton.__version__, "transformers": version("transformers"), "numpy": version("numpy"),
           "pytest": version("pytest"), "cpu_count": os.cpu_count(), "nvidia_smi": nvidia_smi(),
           "skipped": [why for module, why in OPTIONAL.items() if importlib.util.find_spec(module) is None]
           + NOT_MEASURED, "fingerprint": fingerprint()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None))
    else:
        env["device"] = "cpu: " + (platform.processor() or platform.machine())
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    env["triton_tools"] = {t: (tools / t).is_file() for t in ("ptxas", "cuobjdump")}
    Path(args.out).write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps({k: v for k, v in env.items() if k != "fingerprint"}, indent=1))

    if args.mode == "gpu" and not torch.cuda.is_available():
        fail("torch sees no CUDA GPU: on a CPU machine run `bash scripts/gpu_check.sh --dry-run`")
    if not all(env["triton_tools"].values()):
        fail(f"ptxas/cuobjdump missing under {tools}: the compile report needs them")
    import kernels  # noqa: F401 - the kernels must import under this torch and triton

    if not env["git_sha"]:
        print("[gpu_check] warning: no git sha (no .git here and FCTRAIN_GIT_SHA unset); the fingerprint in "
              "env.json still identifies the files", file=sys.stderr)


# ---------------------------------------------------------------------------- wheels

def cmd_wheels(args) -> None:
    """Install the peers' wheels with pip --isolated --no-index --no-deps (no network, no pip config) into
    `site` and check that each imports from there."""
    wheels = {module: sorted(WHEELS.glob(f"{module}-*.whl")) for module in PEERS}
    for module, found in wheels.items():
        if len(found) != 1:
            fail(f"want exactly one {module}-*.whl in {WHEELS}, found {len(found)}; refresh with "
                 f"`python benchmarks/bench_kernels.py --fetch-wheels {WHEELS.relative_to(REPO)}`")
    site = Path(args.site)
    cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--upgrade", "--target", str(site), *(str(w[0]) for w in wheels.values())]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        fail("offline wheel install failed (see above)")
    check = ("import importlib, importlib.metadata as m\n" + PEER_IMPORTS +
             f"for mod, dist in {PEERS!r}.items():\n"
             "    print(dist, m.version(dist), importlib.import_module(mod).__file__)\n")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])})
    print(proc.stdout + proc.stderr, end="")
    if proc.returncode != 0:
        fail("the installed peers do not import (see above)")
    if proc.stdout.count(str(site.resolve())) != len(PEERS):
        fail(f"a peer imported from elsewhere than {site}")


# ---------------------------------------------------------------------------- summary

def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tail(path: Path, n: int) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else []


def _pytest_lines(path: Path) -> list[str]:
    """The FAILED/ERROR lines and the closing line of a `pytest -v -rfE` log; for a run cut off before its
    closing line, the failures and a count of the tests that passed."""
    lines = _tail(path, 5000)
    closing = [x for x in lines if re.match(r"=* ?(\d+ (passed|failed|errors?|skipped|deselected)|no tests ran)", x)]
    if closing:
        return [x for x in lines if x.startswith(("FAILED", "ERROR"))][:30] + closing[-1:]
    failed = [x.split(" ")[0] for x in lines if " FAILED" in x or " ERROR" in x]
    passed = sum(" PASSED" in x for x in lines)
    return [f"FAILED {x}" for x in failed[:30]] + [f"(cut off: {passed} passed, {len(failed)} failed so far)"]


def _num(value: str, fmt: str) -> str:
    try:
        return format(float(value), fmt)
    except ValueError:
        return value or "-"


def cmd_summary(args) -> None:
    out, logs = Path(args.out), Path(args.logs)
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    stages = [line.split("\t") for line in _tail(logs / "stages.tsv", 100)]
    md = [f"# GPU check ({env.get('mode', '?')}): {env.get('device', '?')}", "",
          f"git {env.get('git_sha') or 'unknown'} | torch {env.get('torch')} (CUDA {env.get('torch_cuda') or '-'}) | "
          f"triton {env.get('triton')} | transformers {env.get('transformers') or '-'} | python {env.get('python')}",
          f"nvidia-smi: {env.get('nvidia_smi', '-')}", "",
          "| stage | status | seconds | limit s | command |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {name} | {status} | {secs} | {limit} | `{cmd}` |" for name, status, secs, limit, cmd in stages]
    for name in ("tests_target", "tests"):
        if (logs / f"{name}.log").is_file():
            md += ["", f"## {name}", "", "```", *_pytest_lines(logs / f"{name}.log"), "```"]
    compile_rows = _rows(out / "compile.csv")
    if compile_rows:
        md += ["", "## compile report (compile.csv)", "",
               "| kernel | cfg | dtype | target | REG | STACK B | driver REG | driver spill B | shared KB | status |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        md += [f"| {r['kernel']} | {r['config']}: {r['BLOCK_N']}x{r['BLOCK_V']}x{r['BLOCK_H']} w{r['num_warps']} "
               f"s{r['num_stages']} | {r['dtype']} | {r['target']} | {r['registers']} | {r['spill_bytes']} | "
               f"{r['driver_registers'] or '-'} | {r['driver_spill_bytes'] or '-'} | "
               f"{int(r['shared_bytes'] or 0) / 1024:.0f} | {r['status']} |" for r in compile_rows]
    for name in ("kernels_target", "kernels_tuned"):
        rows = _rows(out / f"{name}.csv")
        if rows:
            md += ["", f"## {name}.csv", "", "| op | mode | entropy | provider | N, H, V | ms | x floor | peak MB | status |",
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            md += [f"| {r['op']} | {r['mode']} | {r['entropy']} | {r['provider']} | {r['N']}, {r['H']}, {r['V']} | "
                   f"{_num(r['time_ms'], '.4g')} | {_num(r['ratio_floor'], '.2f')} | {_num(r['peak_mem_mb'], '.1f')} | "
                   f"{r['status']} |" for r in rows]
    if env.get("skipped"):
        md += ["", "## not measured in this run", ""] + [f"- {why}" for why in env["skipped"]]
    failed = [s for s in stages if s[1] != "ok"]
    for name, *_ in failed:
        md += ["", f"## last lines of {name}.log", "", "```", *_tail(logs / f"{name}.log", 25), "```"]
    (out / "summary.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("wheels")
    p.add_argument("--site", required=True)
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    p.add_argument("--logs", required=True)
    args = parser.parse_args(argv)
    {"env": cmd_env, "wheels": cmd_wheels, "summary": cmd_summary}[args.command](args)


if __name__ == "__main__":
    main()
