"""Smoke test of benchmarks/bench_kernels.py in CPU mode at a tiny shape: it runs, and the CSV has the
agreed schema and self-consistent derived columns. Timings are never asserted (the CPU is shared)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench_kernels")
common = _load("common")
plot = _load("plot")


def _num(row, key):
    value = float(row[key])
    assert math.isfinite(value), f"{key}={row[key]!r} in {row}"
    return value


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "kernels.csv"
    bench.main(["--device", "cpu", "--shapes", "48,32,123", "--no-isolate", "--min-reps", "2",
                "--min-time", "0", "--providers", "lm-head-matmul,fctrain-torch,naive-eager,liger-grpo",
                "--modes", "fwd+bwd", "--out", str(out)])
    with open(out) as f:
        header = f.readline().strip().split(",")
    assert header == bench.COLUMNS
    assert out.with_suffix(".png").stat().st_size > 0
    table = plot.markdown_table(out).splitlines()
    rows = common.read_csv(out)
    assert table[0].startswith("Device: cpu: ") and len(table) == 4 + len(rows)
    return rows


def test_schema_and_metadata(rows):
    expected = {(p, op, mode, ent) for p, op in [("fctrain-torch", "logprob"), ("naive-eager", "logprob"),
                                                 ("fctrain-torch", "grpo"), ("naive-eager", "grpo")]
                for mode in ("fwd+bwd",) for ent in ("on", "off")}
    expected |= {("lm-head-matmul", "lm-head-matmul", "fwd+bwd", "n/a")}
    expected |= {("liger-grpo", "grpo", "fwd+bwd", "off")}
    assert {(r["provider"], r["op"], r["mode"], r["entropy"]) for r in rows} == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["N"], r["H"], r["V"], r["dtype"]) == ("48", "32", "123", "bfloat16")
        assert r["device"].startswith("cpu: ") and r["torch"] and r["date"].endswith("Z")
        assert r["git_sha"] and r["liger_kernel"]
        assert int(r["reps"]) >= 2
        assert 0 < _num(r, "time_p20_ms") <= _num(r, "time_ms") <= _num(r, "time_p80_ms")
        assert _num(r, "peak_mem_mb") >= 0
        flops = (6 if r["mode"] == "fwd+bwd" else 2) * 48 * 32 * 123
        assert _num(r, "tflops") == pytest.approx(flops / (_num(r, "time_ms") * 1e-3) / 1e12, rel=1e-3)


def test_derived_ratios(rows):
    floor = {r["mode"]: _num(r, "time_ms") for r in rows if r["provider"] == "lm-head-matmul"}
    for r in rows:
        assert _num(r, "ratio_floor") == pytest.approx(_num(r, "time_ms") / floor[r["mode"]], rel=1e-3)
        if r["provider"] == "naive-eager" and _num(r, "peak_mem_mb") > 0:
            assert _num(r, "mem_ratio_naive") == pytest.approx(1.0)


def test_isolated_worker_reports_peak_memory():
    """One configuration in its own process: the CPU peak-RSS path that the real CPU mode uses."""
    spec = {"provider": "naive-eager", "op": "logprob", "mode": "fwd+bwd", "entropy": "on", "N": 256, "H": 32,
            "V": 4096, "dtype": "float32", "device": "cpu", "timing": {"min_reps": 1, "min_time_s": 0}}
    result = common.run_isolated(BENCH / "bench_kernels.py", spec)
    assert result["status"] == "ok", result
    # naive fwd+bwd keeps several fp32 [256, 4096] tensors (4 MiB each) alive at once
    assert result["peak_mem_mb"] >= 8, result


def test_plan_covers_issue_targets():
    cpu = bench.expand(bench.CPU_PLAN, "cpu", "bfloat16", {})
    at = {(s["provider"], s["op"], s["mode"], s["entropy"]) for s in cpu if (s["N"], s["H"], s["V"]) == common.SMOLLM2}
    assert {("fctrain-torch", "grpo", "fwd+bwd", "on"), ("naive-eager", "grpo", "fwd+bwd", "on"),
            ("lm-head-matmul", "lm-head-matmul", "fwd+bwd", "n/a")} <= at
    assert not any(s["provider"] in ("fctrain-triton", "fctrain-triton-atomic", "cce", "liger-flce") for s in cpu)
    gpu = bench.expand(bench.GPU_PLAN, "cuda", "bfloat16", {})
    target = {(s["provider"], s["op"], s["mode"], s["entropy"]) for s in gpu if (s["N"], s["H"], s["V"]) == common.TARGET}
    assert {("fctrain-triton", "grpo", "fwd+bwd", "on"), ("fctrain-triton", "logprob", "fwd+bwd", "on"),
            ("fctrain-triton-atomic", "grpo", "fwd+bwd", "on"), ("liger-grpo", "grpo", "fwd+bwd", "off"), ("lm-head-matmul", "lm-head-matmul", "fwd+bwd", "n/a"),
            ("cce", "logprob", "fwd+bwd", "off"), ("liger-flce", "logprob", "fwd+bwd", "off")} <= target


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "1,2"])


@pytest.mark.slow
def test_bench_train_fctrain_and_trl_do_identical_work(tmp_path):
    """bench_train.py end to end on a tiny real Llama: both trainers run in their own processes, and on the
    identical batch their first-step losses agree (same DAPO/token-mean loss, KL and advantages), so the
    timing comparison compares the same computation."""
    pytest.importorskip("trl")
    from fctrain.models import build_tiny_model
    train = _load("bench_train")
    model_dir = build_tiny_model(tmp_path / "tiny", hidden_size=64, num_layers=2, num_heads=2)
    out = tmp_path / "train.csv"
    sys.argv = ["bench_train.py", "--model", str(model_dir), "--prompts", "2", "--group", "2",
                "--max-new-tokens", "12", "--steps", "1", "--providers", "trl,fctrain,fctrain-padded", "--out", str(out)]
    train.main()
    rows = {r["provider"]: r for r in common.read_csv(out)}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    loss = {k: float(r["loss_first_step"]) for k, r in rows.items()}
    assert loss["fctrain"] == pytest.approx(loss["trl"], rel=1e-3, abs=1e-6), loss
    assert loss["fctrain-padded"] == pytest.approx(loss["trl"], rel=1e-3, abs=1e-6), loss
    assert int(rows["fctrain"]["computed_tokens"]) < int(rows["fctrain-padded"]["computed_tokens"])
    assert float(rows["trl"]["time_vs_trl"]) == 1.0 and float(rows["fctrain"]["time_vs_trl"]) > 0
    assert plot.plot_train(out).stat().st_size > 0


def test_parser_fuzz_benchmark_runs(tmp_path):
    """The fuzzing benchmark's plumbing (a few inputs per generator and format; the 1M run is a benchmark)."""
    import bench_parser_fuzz
    assert bench_parser_fuzz.main(["--n", "105", "--out", str(tmp_path / "fuzz.csv")]) == 0
    rows = (tmp_path / "fuzz.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 * 3 and (tmp_path / "fuzz.json").exists()


def test_traffic_model_bounds_and_design_choice():
    """The model's arithmetic at the target shape: the floor is FLOP-bound at 2NHV (6NHV with backward),
    the fused forward equals it, the backward's atomics are counted per tile and shrink with skipping, and
    the atomic-free chunked backward (bf16 dz per row chunk, then GEMMs) costs its FLOPs, 8NHV / 6NHV of the
    floor."""
    tm = _load("traffic_model")
    n, h, v = common.TARGET
    peak = tm.DEVICES["H100-SXM"]["bf16_tflops"] * 1e12
    floor = tm.predict("lm-head-matmul", "lm-head-matmul", "fwd", "off", n, h, v, "H100-SXM")
    assert floor["bound"] == "flop" and floor["pred_ms"] == pytest.approx(1e3 * 2 * n * h * v / peak)
    floor_bwd = tm.predict("lm-head-matmul", "lm-head-matmul", "fwd+bwd", "off", n, h, v, "H100-SXM")["pred_ms"]
    assert floor_bwd == pytest.approx(3 * floor["pred_ms"])
    fused = tm.predict("fctrain-triton", "grpo", "fwd", "on", n, h, v, "H100-SXM")
    assert fused["pred_ms"] == pytest.approx(floor["pred_ms"]) and fused["l2_atomic_bytes"] == 0
    bn, bv = tm.TILES["fctrain-triton-atomic"]
    full = tm.count("fctrain-triton-atomic", "grpo", "fwd+bwd", "on", n, h, v, skip=0.0)["l2_atomic_bytes"]
    assert full == 2 * 4 * (n * h * -(-v // bv) + v * h * (n // bn))  # fp32 read + write per atomic add
    assert tm.count("fctrain-triton-atomic", "grpo", "fwd+bwd", "on", n, h, v, skip=0.25)["l2_atomic_bytes"] == 0.75 * full
    chunked = tm.predict("fctrain-triton", "grpo", "fwd+bwd", "on", n, h, v, "H200-SXM")  # FLOP-bound GEMMs
    assert chunked["l2_atomic_bytes"] == 0 and chunked["pred_ms"] == pytest.approx(floor_bwd * 8 / 6)
    naive = tm.predict("naive-eager", "grpo", "fwd", "on", n, h, v, "H100-SXM")  # + 52 B per logit, HBM-bound
    assert naive["pred_ms"] > floor["pred_ms"] and naive["hbm_bytes"] >= tm.EAGER_FWD["on"] * n * v
    assert tm.device_key("NVIDIA H100 80GB HBM3") == "H100-SXM" and tm.device_key("NVIDIA H200") == "H200-SXM"
    assert tm.device_key("NVIDIA A100-SXM4-80GB") is None
