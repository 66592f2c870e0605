"""GPU builds on this CPU: the default bf16 tile of each kernel compiles for sm_90 without spilling registers
and within the shared-memory limit; autotune pruning by operand width and shared memory; the committed
compile report (benchmarks/results/gpu_compile_cpu.csv) matches today's tile lists and bounds the estimate.

The GRPO loss has no kernel of its own (kernels/grpo_loss.py runs on the two log-prob/entropy kernels).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernels import _triton as _t
from kernels import logprob_entropy as le

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "benchmarks" / "results" / "gpu_compile_cpu.csv"


def _build_default_tiles(target):
    """Build config 0 (the default tile) of every kernel for bf16 in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_compile.py"), "--kernels", "fwd,dz,bwd_atomic", "--dtypes", "bf16",
           "--targets", target, "--configs", "0", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def test_default_bf16_tiles_build_spill_free_for_sm90():
    rows, seconds = _build_default_tiles("sm_90")
    print(f"3 sm_90 builds in {seconds:.1f} s")
    assert [r["kernel"] for r in rows] == ["fwd", "dz", "bwd_atomic"]
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["BLOCK_N"], r["BLOCK_V"], r["BLOCK_H"], r["num_warps"], r["num_stages"]) == (64, 128, 64, 8, 3)
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} B ({r['registers']} registers)"
        assert r["shared_bytes"] <= r["shared_limit"] == _t.SHARED_MEMORY_LIMIT[90], r
        assert r["shared_bytes"] <= r["shared_estimate"], r  # the pruning estimate is an upper bound
        assert r["kept"], r


# ---------------------------------------------------------------------------- pruning

def _cfg(bn, bv, bh, warps, stages, width=None):
    return _t.config(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages, operand_bytes=width)


def test_prune_configs_by_width_and_shared_memory():
    small, big, wide, any_width = _cfg(64, 64, 32, 4, 2, 2), _cfg(128, 256, 64, 8, 4, 2), _cfg(64, 128, 16, 8, 4, 4), \
        _cfg(32, 32, 32, 4, 2)
    configs = [small, big, wide, any_width]
    size = {id(small): 10, id(big): 300, id(wide): 50, id(any_width): 5}
    shared = lambda c: size[id(c)]  # noqa: E731
    assert _t.prune_configs(configs, 2, 90, None, shared) == [small, big, any_width]  # no limit known
    assert _t.prune_configs(configs, 2, 90, 100, shared) == [small, any_width]
    assert _t.prune_configs(configs, 4, 80, 100, shared) == [wide, any_width]
    assert _t.prune_configs([big], 2, 80, 100, shared) == [big]  # never empty: the config asking least
    assert _t.prune_configs([big, small], 2, 80, 1, shared) == [small]
    assert _t.prune_configs([wide], 2, 90, 100, shared) == [wide]  # no config of this width: all of them


def test_prune_hook_picks_the_tiles_of_the_input_width():
    configs = [_cfg(*tile, width) for width, tiles in le._BWD_ATOMIC_TILES.items() for tile in tiles]
    for dtype, width in [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)]:
        kept = le._prune(True)(configs, {"X": torch.empty(4, 8, dtype=dtype)})  # CPU: no shared-memory limit
        assert kept == [c for c in configs if c.operand_bytes == width]


@pytest.mark.parametrize("backward,cc,expected", [
    (False, 86, [(64, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 256, 64, 8, 3), (128, 64, 64, 8, 4)]),
    (True, 86, [(128, 128, 32, 8, 3), (128, 64, 32, 8, 4)]),  # RTX 30xx (99 KB): the 112 KB tiles go
    (True, 90, [(64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (128, 64, 32, 8, 4)]),
])
def test_prune_by_shared_memory_of_a_smaller_gpu(backward, cc, expected):
    tiles = le._BWD_ATOMIC_TILES if backward else le._FWD_TILES
    configs = [_cfg(*tile, width) for width, shapes in tiles.items() for tile in shapes]
    kept = _t.prune_configs(configs, 2, cc, _t.SHARED_MEMORY_LIMIT[cc],
                            lambda c: le.shared_memory_bytes(c, 2, cc, backward))
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages)
            for c in kept] == expected


# ---------------------------------------------------------------------------- the committed report

def _report():
    import csv

    with open(REPORT, newline="") as f:
        return [r for r in csv.DictReader(f)]


def test_builds_specialise_like_the_launches_at_the_target_shape():
    """Every integer size the launchers pass at H 4096, V 151936 is a multiple of 16 for every token count
    (the forward's V_PER_SPLIT included: splits are rounded to the widest tile), so the report builds
    them as such; a size that some launch passes unaligned would be built without divisibility."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    interpret = os.environ.get("TRITON_INTERPRET")
    import gpu_compile
    assert os.environ.get("TRITON_INTERPRET") == interpret  # importing it must not turn this process's interpreter off

    fwd = gpu_compile.launch_values("fwd")
    assert len(fwd["V_PER_SPLIT"]) > 5 and all(x % le.VOCAB_ALIGN == 0 for x in fwd["V_PER_SPLIT"])
    assert gpu_compile.divisible_args("fwd") == {"V", "H", "stride_xn", "stride_wv", "V_PER_SPLIT"}
    assert gpu_compile.divisible_args("dz") == {"V", "H", "stride_xn", "stride_wv", "stride_dzn"}
    assert {"v_lo", "v_hi"} <= gpu_compile.divisible_args("bwd_atomic")
    odd = gpu_compile.launch_values("fwd", v=50257)  # GPT-2's vocabulary: V itself unaligned, the splits still are
    assert odd["V"] == [50257] and all(x % 16 == 0 for x in odd["V_PER_SPLIT"])
    assert gpu_compile.divisible_args("fwd", specialize=False) == set()
    for r in _report():
        assert r["divisible"] == " ".join(sorted(gpu_compile.divisible_args(r["kernel"]))), r


def test_report_covers_todays_tiles():
    rows = _report()
    for kernel, tiles in [("fwd", le._FWD_TILES), ("dz", le._DZ_TILES), ("bwd_atomic", le._BWD_ATOMIC_TILES)]:
        want = {(tile, dtype, target) for shapes in tiles.values() for tile in shapes
                for dtype in ("bf16", "fp32") for target in ("sm_80", "sm_90")}
        got = {(tuple(int(r[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages")),
                r["dtype"], r["target"]) for r in rows if r["kernel"] == kernel}
        assert got == want, f"{kernel}: rerun benchmarks/gpu_compile.py (the tile lists changed)"


def test_report_estimate_bounds_every_build_and_prunes_exactly_the_misfits():
    rows = [r for r in _report() if r["status"] == "ok"]
    assert rows
    for r in rows:
        width, cc = {"bf16": 2, "fp32": 4}[r["dtype"]], int(r["target"][3:])
        config = _cfg(*(int(r[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages")))
        estimate = le.shared_memory_bytes(config, width, cc, r["kernel"] == "bwd_atomic")
        assert estimate == int(r["shared_estimate"]) >= int(r["shared_bytes"]), r
        if r["tuned_for"] in ("any", {"bf16": "16-bit", "fp32": "fp32"}[r["dtype"]]):  # what pruning sizes up
            assert (estimate <= int(r["shared_limit"])) == (int(r["shared_bytes"]) <= int(r["shared_limit"])), r
        if r["kept"] == "True":  # what autotuning may pick: spill-free and launchable
            assert int(r["spill_bytes"]) == 0 and r["fits"] == "True", r
