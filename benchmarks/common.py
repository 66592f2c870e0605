"""Shared benchmark plumbing: run metadata, timing, peak memory, process isolation, CSV output.

Every benchmark in this folder writes rows with the same leading metadata columns (`META_COLUMNS`: date,
git sha, device, versions, CPU load) so results from different scripts and machines can be put side by
side. Timings are reported as a median with a 20th-80th percentile spread; memory as the peak *extra*
bytes one call needs above what was live before it:

- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the bytes allocated
  before the call (one process is fine: the caching allocator's counters are exact).
- CPU: the process's peak resident set (VmHWM) after resetting it to the current RSS through
  /proc/self/clear_refs (Linux >= 4.0), minus the RSS before the call. RSS is all a CPU process has, so
  each provider must run in its own process (`run_isolated`), or one provider's freed-but-kept heap
  pages would be counted against the next.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# (N, H, V) shapes of the LM-head kernels that bench_kernels.py measures and traffic_model.py predicts
SMOLLM2 = (4096, 576, 49152)  # issue 3's CPU target: SmolLM2-135M's hidden size and vocabulary
TARGET = (16384, 4096, 151936)  # issues 2 and 3's H100 target (Qwen-sized vocabulary)
META_COLUMNS = ["date", "git_sha", "device", "torch", "triton", "liger_kernel", "cut_cross_entropy",
                "python", "load_avg"]
_WORKER_TAG = "BENCH_WORKER_RESULT "


# ---------------------------------------------------------------------------- metadata

def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_sha() -> str:
    """Short sha of HEAD, with "+dirty" when tracked files differ from it; outside a git checkout (a copy of
    the tree on a GPU machine) the FCTRAIN_GIT_SHA environment variable, else ""."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FCTRAIN_GIT_SHA", "")


CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")  # the features that decide a CPU's fp32/bf16 kernels


def cpu_flags(names=CPU_FLAGS) -> dict:
    """{flag: bool} from /proc/cpuinfo (all False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        flags = set()
    return {name: name in flags for name in names}


def device_name(device: str) -> str:
    """"NVIDIA H100 80GB HBM3" on CUDA; "cpu: <model> [avx512f +, avx512_bf16 -, amx_bf16 -], <n> cores, <t>
    torch threads" on CPU. The flags are part of the name: two "AMD EPYC" machines of this workplace differ
    by them (Zen 3 without AVX-512, Zen 4 with), and so do their speeds."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = ", ".join(f"{k} {'+' if v else '-'}" for k, v in cpu_flags().items())
    return f"cpu: {model} [{flags}], {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def run_metadata(device: str) -> dict:
    """The META_COLUMNS values for rows measured now on `device` (load_avg is filled per row)."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
        "python": platform.python_version(),
        "load_avg": "",
    }


def load_avg() -> str:
    """1-minute load average: on a shared CPU, a reader can see how busy the machine was per row."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


# ---------------------------------------------------------------------------- CPU peak memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS; returns the current RSS in bytes. Freed heap pages go
    back to the OS first (glibc malloc_trim): glibc raises its mmap threshold after a large block is freed, so
    a warm-up's freed tensors would otherwise stay resident and the measured call would reuse them unseen."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then read low, never high
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak RSS (VmHWM) in bytes since the process started or the last `reset_peak_rss()`."""
    return _status_kib("VmHWM") * 1024


# ---------------------------------------------------------------------------- timing

def spread(times_ms: list[float]) -> dict:
    """median and 20th / 80th percentiles (inclusive method: exact for 3+ samples, min/max for fewer)."""
    if len(times_ms) >= 3:
        q = statistics.quantiles(times_ms, n=5, method="inclusive")
        p20, p80 = q[0], q[3]
    else:
        p20, p80 = min(times_ms), max(times_ms)
    return {"time_ms": statistics.median(times_ms), "time_p20_ms": p20, "time_p80_ms": p80}


def measure_cpu(call, warmup: int = 1, min_reps: int = 3, max_reps: int = 20, min_time_s: float = 2.0) -> dict:
    """Time `call(i)` (i rotates the inputs) on CPU with perf_counter, and its peak extra RSS.

    `warmup` untimed calls, then enough timed calls to fill `min_time_s` (between min_reps and max_reps).
    The peak is read on the first timed call, after the warm-up has done any one-time allocation.
    """
    t_warm = 0.0
    for i in range(warmup):
        t0 = time.perf_counter()
        call(i)
        t_warm = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(min_time_s / max(t_warm, 1e-6)) + 1)) if warmup else min_reps
    times = []
    for r in range(reps):
        if r == 0:
            rss0 = reset_peak_rss()
        t0 = time.perf_counter()
        out = call(warmup + r)
        times.append((time.perf_counter() - t0) * 1e3)
        if r == 0:
            peak = peak_rss() - rss0
        del out
    return {**spread(times), "reps": reps, "peak_mem_mb": max(peak, 0) / 2**20}


def measure_cuda(call, device: str = "cuda") -> dict:
    """Time `call(i)` with triton.testing.do_bench (L2 flushed between calls) and its peak extra memory."""
    import torch
    import triton.testing

    call(0)  # warm-up: Triton compile / autotune, torch.compile
    torch.cuda.synchronize(device)
    out = None
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = call(1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call(2)
    end.record()
    torch.cuda.synchronize(device)
    est_ms = start.elapsed_time(end)
    counter = iter(range(3, 1 << 62))
    # about 10-20 timed calls, but not fewer than do_bench's default nor more than 1.5 s per configuration
    rep_ms = min(max(100.0, 20 * est_ms), 1500.0)
    p20, p50, p80 = triton.testing.do_bench(lambda: call(next(counter)), warmup=max(25.0, 2 * est_ms),
                                            rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return {"time_ms": p50, "time_p20_ms": p20, "time_p80_ms": p80, "reps": max(1, int(rep_ms / max(est_ms, 1e-3))),
            "peak_mem_mb": max(peak, 0) / 2**20}


# ---------------------------------------------------------------------------- process isolation

def run_isolated(script: Path, spec: dict, env: dict | None = None, timeout_s: float = 1800) -> dict:
    """Run `script --worker '<json spec>'` in a fresh interpreter and return the dict it reports.

    The worker prints one line `BENCH_WORKER_RESULT <json>` (see `report_from_worker`). A crash, a
    timeout or a missing line becomes {"status": "error: ..."} rather than an exception, so one failing
    provider does not stop a benchmark run.
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})}, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"error: timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(_WORKER_TAG):
            return json.loads(line[len(_WORKER_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: worker exited {proc.returncode}: {tail[:300]}"}


def report_from_worker(result: dict) -> None:
    print(_WORKER_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- CSV

def add_ratios(rows: list[dict], base: dict | None, columns: dict[str, str]) -> None:
    """Side-by-side ratios: for every finished row, row[name] = row[col] / base[col] for {name: col}."""
    for r in rows:
        if base and r.get("status") == "ok":
            r.update({name: r[col] / base[col] for name, col in columns.items()})


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """Write rows (missing keys -> empty cells; unknown keys are an error) to `path`, replacing it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value
