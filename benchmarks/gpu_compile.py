"""Build every Triton kernel x autotune config x dtype x target for a GPU on this CPU; report resources.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole
pipeline down to a cubin with the ptxas shipped in the triton wheel, and `cuobjdump --dump-resource-usage`
reads its registers (REG) and local-memory stack (STACK > 0 means spilled registers); `.metadata.shared`
is the dynamic shared memory a launch asks for. A config whose shared memory exceeds the target's limit
cannot launch there (`kernels._triton.SHARED_MEMORY_LIMIT`; the autotuners prune it, `prune_configs`).

    python benchmarks/gpu_compile.py                       # all builds -> results/gpu_compile_cpu.csv
    python benchmarks/gpu_compile.py --kernels fwd --dtypes bf16 --targets sm_90 --configs 0 --json
    python3 benchmarks/gpu_compile.py --targets native --driver --dtypes bf16 --jobs 16 --out DIR/compile.csv  # GPU

On a GPU, `--targets native` builds for the device's own compute capability and `--driver` loads each cubin
through the CUDA driver (Triton's `CompiledKernel._init_handles`): `driver_registers` and
`driver_spill_bytes` are what the driver reports (CU_FUNC_ATTRIBUTE_NUM_REGS and LOCAL_SIZE_BYTES), next
to cuobjdump's REG and STACK, and a config the device cannot launch gets a `driver:` status.

Specialisation follows the launches at the target shape (H 4096, V 151936) on contiguous tensors: the integer
arguments are computed by the launchers' own plans (`launch_values`: the forward's vocabulary split for
every token count from 1 to 65536 on a 132-SM H200, the atomic backward's dW slabs), and an argument is built
with tt.divisibility=16 only when every such launch passes a multiple of 16 (Triton's rule); pointers carry
it, unit strides become the constant 1, N never does (RL's token counts vary). The launchers make hidden
and weight unit-stride so that this holds. `--generic` builds without any of it, as
for strided or unaligned tensors: the loads are then neither vectorised nor pipelined through shared
memory, and the 16-bit tiles spill (results/gpu_compile_cpu_generic.csv; issue 17's first measurement).
TRITON_INTERPRET is removed from this process before triton is imported (builds need the real compiler).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # run as the script: builds need the real compiler, so before anything imports triton
    os.environ.pop("TRITON_INTERPRET", None)  # (imported by a test, it must leave the interpreter of that process on)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"bf16": "*bf16", "fp32": "*fp32"}
WIDTH = {"bf16": 2, "fp32": 4}
KERNEL_NAMES = ("fwd", "dz", "bwd_atomic")  # the GRPO loss runs on these (kernels/grpo_loss.py): fwd, then dz
                                             # (the default backward) or bwd_atomic (the opt-in atomic backward)
COLUMNS = common.META_COLUMNS + ["kernel", "config", "BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages",
                                 "tuned_for", "dtype", "target", "specialized", "divisible", "registers",
                                 "spill_bytes", "shared_bytes", "shared_estimate", "shared_limit", "fits", "kept",
                                 "build_s", "driver_registers", "driver_spill_bytes", "status"]
# The launches the report specialises for: the benchmark's target shape on an H200, every token count an RL
# step may bring (powers of two and neighbours, 1 to 65536).
TARGET_H, TARGET_V, TARGET_SMS = 4096, 151936, 132
TOKEN_COUNTS = sorted({max(1, (1 << k) + d) for k in range(17) for d in (-1, 0, 1)})
_UNIT = {"stride_xh", "stride_wh"}
_FP32_POINTERS = {"STATS", "LSE", "MEAN_Z", "G_LOGP", "G_ENT", "DX", "DW"}


def _kernels():
    from kernels import logprob_entropy as le

    return {"fwd": le._fwd_kernel, "dz": le._dz_kernel, "bwd_atomic": le._bwd_atomic_kernel}


def launch_values(kernel_name: str, h: int = TARGET_H, v: int = TARGET_V, sms: int = TARGET_SMS,
                  token_counts=TOKEN_COUNTS) -> dict[str, list[int]]:
    """Every value each integer size/stride argument of `kernel_name` takes in the launches at hidden size
    h and vocabulary v on a GPU with `sms` SMs, over `token_counts` (N itself excluded), from the
    launchers' own plans (kernels.logprob_entropy: _split_plan, _dw_slabs, n_bucket)."""
    from kernels import _triton as _t
    from kernels import logprob_entropy as le

    values = {"V": [v], "H": [h], "N_BUCKET": sorted({_t.n_bucket(n) for n in token_counts}),
              "stride_xn": [h], "stride_wv": [h]}
    if kernel_name == "fwd":
        values["V_PER_SPLIT"] = sorted({le._split_plan(n, v, sms)[1] for n in token_counts})
    elif kernel_name == "dz":
        values["stride_dzn"] = [v]  # the dz buffer [rows, V]
    else:
        slabs = le._dw_slabs(v, h)
        values.update(v_lo=sorted({lo for lo, _ in slabs}), v_hi=sorted({hi for _, hi in slabs}))
    return values


def divisible_args(kernel_name: str, specialize: bool = True) -> set[str]:
    """The integer arguments built with divisibility 16: those a multiple of 16 in every launch."""
    if not specialize:
        return set()
    return {name for name, vals in launch_values(kernel_name).items() if all(x % 16 == 0 for x in vals)}


def _signature(jit_fn, ptr_type, meta, specialize=True, divisible=frozenset()):
    """(signature, constexprs, attrs) for `jit_fn` with float pointers of `ptr_type`, meta-params `meta` and
    the integer arguments `divisible` marked as multiples of 16; specialize=False: no unit strides and no
    divisibility (a launch on strided, unaligned tensors)."""
    from triton.backends.compiler import BaseBackend

    names = jit_fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        param = jit_fn.params[i]
        if param.is_constexpr or (specialize and name in _UNIT):
            signature[name] = "constexpr"
            constexprs[(i,)] = 1 if name in _UNIT else meta[name]
        elif name == "TARGETS":
            signature[name] = "*i64"
        elif name in ("X", "W", "DZ"):  # dz is written in the input dtype
            signature[name] = ptr_type
        elif name in _FP32_POINTERS:  # work buffers and per-row vectors
            signature[name] = "*fp32"
        elif name == "inv_temp":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if specialize and (signature[name].startswith("*") or name in divisible):
            attrs[(i,)] = BaseBackend.parse_attr("D")
    return signature, constexprs, attrs


def _meta(kernel_name, dtype, config):
    meta = dict(config.kwargs, UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    if kernel_name == "bwd_atomic":
        meta.update(HAS_DX=True, HAS_DW=True)
    return meta


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    from triton.backends.nvidia import compiler as nv

    cuobjdump = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return int(reg.group(1)), int(stack.group(1))


def build(kernel_name: str, config, dtype: str, target: str, specialize: bool = True, driver: bool = False) -> dict:
    """Build one config (an index into the autotuner's list, or a triton.Config); returns registers,
    spill_bytes (stack), shared_bytes, shared_limit, fits, build_s; with driver=True (a CUDA device of
    this target's compute capability) also driver_registers and driver_spill_bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import _triton as _t

    kernel = _kernels()[kernel_name]
    config = kernel.configs[config] if isinstance(config, int) else config
    cc = TARGETS[target]
    signature, constexprs, attrs = _signature(kernel.fn, DTYPES[dtype], _meta(kernel_name, dtype, config),
                                               specialize, divisible_args(kernel_name, specialize))
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    build_s = time.perf_counter() - t0
    registers, spill = _resource_usage(compiled.asm["cubin"])
    shared, limit = int(compiled.metadata.shared), _t.SHARED_MEMORY_LIMIT[cc]
    result = {"registers": registers, "spill_bytes": spill, "shared_bytes": shared, "shared_limit": limit,
              "fits": shared <= limit, "build_s": build_s}
    if driver:  # cuModuleLoadData + cuFuncGetAttribute (NUM_REGS, LOCAL_SIZE_BYTES / 4 as n_spills)
        try:
            compiled._init_handles()
            result.update(driver_registers=compiled.n_regs, driver_spill_bytes=4 * compiled.n_spills)
        except Exception as e:  # noqa: BLE001 - e.g. OutOfResources: this device cannot launch the config
            result["status"] = _error_status(e, "driver: ")
    return result


def native_target() -> str:
    """The CUDA device's compute capability as a target name ("sm_90" on an H100/H200), registered in
    TARGETS, with the device's own shared-memory limit where the table lacks it."""
    import torch

    from kernels import _triton as _t

    cc, limit = _t.shared_memory_limit(torch.device("cuda"))
    TARGETS[f"sm_{cc}"] = cc
    _t.SHARED_MEMORY_LIMIT.setdefault(cc, limit)
    return f"sm_{cc}"


def pruning(kernel_name: str, config_index: int, dtype: str, target: str) -> dict:
    """What the kernel's autotune pruning decides for this config on `target`: the shared-memory
    estimate it uses, and whether the config is kept (tuned for this dtype's width, fits the limit)."""
    from kernels import _triton as _t
    from kernels import logprob_entropy as le

    configs = _kernels()[kernel_name].configs
    config, cc, width = configs[config_index], TARGETS[target], WIDTH[dtype]
    estimate = lambda c: le.shared_memory_bytes(c, width, cc, kernel_name == "bwd_atomic")  # noqa: E731
    kept = _t.prune_configs(configs, width, cc, _t.SHARED_MEMORY_LIMIT[cc], estimate)
    return {"shared_estimate": estimate(config), "kept": any(c is config for c in kept)}


def _error_status(e: Exception, prefix: str) -> str:
    return f"{prefix}{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _build_job(job) -> dict:
    """One build as a result dict (status "ok" or the error); a process pool's unit of work."""
    kernel_name, index, dtype, target, specialize, driver = job
    if target not in TARGETS:  # a spawned worker: register the GPU's own target as the parent did
        native_target()
    try:
        return {"status": "ok", **build(kernel_name, index, dtype, target, specialize, driver)}
    except Exception as e:  # noqa: BLE001 - a failing build is a result, not a crash
        return {"status": _error_status(e, "error: ")}


def _run_builds(jobs: list, workers: int):
    """(job, result) in the order of `jobs`, built `workers` at a time (fresh `spawn` processes: CUDA and
    Triton state are not forked)."""
    if workers <= 1:
        yield from ((job, _build_job(job)) for job in jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from zip(jobs, pool.map(_build_job, jobs))


def _config_row(kernel_name, index):
    config = _kernels()[kernel_name].configs[index]
    tuned_for = {None: "any", 2: "16-bit", 4: "fp32"}[getattr(config, "operand_bytes", None)]
    return {"kernel": kernel_name, "config": index, **{k: config.kwargs[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")},
            "num_warps": config.num_warps, "num_stages": config.num_stages, "tuned_for": tuned_for}


def markdown_summary(rows: list[dict]) -> str:
    driver = any(r.get("driver_registers") not in (None, "") for r in rows)
    lines = ["| kernel | config (BN, BV, BH, warps, stages) | tuned for | dtype | target | REG | STACK (spill) "
             + ("| driver REG / spill B " if driver else "") + "| shared KB (estimate) | fits | kept by pruning |",
             "|" + " --- |" * (11 if driver else 10)]
    for r in rows:
        cfg = f"{r['config']}: {r['BLOCK_N']}, {r['BLOCK_V']}, {r['BLOCK_H']}, {r['num_warps']}, {r['num_stages']}"
        head = f"| {r['kernel']} | {cfg} | {r['tuned_for']} | {r['dtype']} | {r['target']} |"
        if r["status"] != "ok":
            lines.append(f"{head}{' |' * (5 if driver else 4)} {r['status']} |")
            continue
        by_driver = f" {r['driver_registers']} / {r['driver_spill_bytes']} |" if driver else ""
        lines.append(f"{head} {r['registers']} | {r['spill_bytes']} |{by_driver} {int(r['shared_bytes']) / 1024:.0f} "
                     f"({int(r['shared_estimate']) / 1024:.0f}) | {'yes' if r['fits'] else 'NO'} "
                     f"| {'yes' if r['kept'] else 'no'} |")
    ok = [r for r in rows if r["status"] == "ok"]
    kept = [r for r in ok if r["kept"]]
    clean = [r for r in kept if int(r["spill_bytes"]) == 0 and r["fits"]]
    lines.append(f"\n{len(rows)} builds, {len(rows) - len(ok)} failed; autotuning keeps {len(kept)} "
                 f"(dtype width and shared memory), of which {len(clean)} are spill-free and fit.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", default=",".join(KERNEL_NAMES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, or 'native' (the GPU's own)")
    parser.add_argument("--configs", default="", help="comma-separated config indices (default: all)")
    parser.add_argument("--out", default=str(common.RESULTS / "gpu_compile_cpu.csv"))
    parser.add_argument("--generic", action="store_true",
                        help="build as for strided, unaligned tensors (no unit strides, no divisibility by 16)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of writing a CSV")
    parser.add_argument("--driver", action="store_true", help="also load each cubin on this machine's GPU and "
                        "record the registers and spills the driver reports (needs --targets native)")
    parser.add_argument("--jobs", type=int, default=1, help="builds in parallel processes (a build is "
                        "single-threaded: one per core; rows keep their order)")
    args = parser.parse_args(argv)

    import torch

    if (args.driver or args.targets == "native") and not torch.cuda.is_available():
        parser.error("--driver and --targets native need a CUDA GPU (torch sees none)")
    if args.targets == "native":
        args.targets = native_target()
    elif args.driver:
        parser.error("--driver needs --targets native: the driver loads only cubins built for its GPU")
    meta = common.run_metadata("cuda" if torch.cuda.is_available() else "cpu")
    jobs = []
    for kernel_name in args.kernels.split(","):
        n_configs = len(_kernels()[kernel_name].configs)
        indices = [int(i) for i in args.configs.split(",")] if args.configs else range(n_configs)
        jobs += [(kernel_name, index, dtype, target, not args.generic, args.driver)
                 for index in indices for dtype in args.dtypes.split(",") for target in args.targets.split(",")]
    rows = []
    for job, result in _run_builds(jobs, args.jobs):
        kernel_name, index, dtype, target, specialize, _ = job
        row = {**meta, "load_avg": common.load_avg(), **_config_row(kernel_name, index), "dtype": dtype,
               "target": target, "specialized": specialize,
               "divisible": " ".join(sorted(divisible_args(kernel_name, specialize))),
               **pruning(kernel_name, index, dtype, target), **result}
        driver = f" (driver: {row['driver_registers']} reg, {row['driver_spill_bytes']} B spilled)" \
            if "driver_registers" in row else ""
        print(f"{kernel_name} cfg{index} {dtype} {target}: {row.get('registers')} reg, "
              f"{row.get('spill_bytes')} B stack, {row.get('shared_bytes')} B shared{driver}, "
              f"{row['status']}", file=sys.stderr, flush=True)
        rows.append(row)
        if not args.json:  # after every build: a run stopped early keeps what it built
            common.write_csv(Path(args.out), rows, COLUMNS)
    if args.json:
        print(json.dumps(rows))
    else:
        print(markdown_summary(rows))
    return rows


if __name__ == "__main__":
    main()
