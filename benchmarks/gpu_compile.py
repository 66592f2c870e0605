"""Build every Triton kernel x autotune config x dtype x target for a GPU on this CPU; report resources.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole
pipeline down to a cubin with the ptxas shipped in the triton wheel, and `cuobjdump --dump-resource-usage`
reads its registers (REG) and local-memory stack (STACK > 0 means spilled registers); `.metadata.shared`
is the dynamic shared memory a launch asks for. A config whose shared memory exceeds the target's limit
cannot launch there (`kernels._triton.SHARED_MEMORY_LIMIT`; the autotuners prune it, `prune_configs`).

    python benchmarks/gpu_compile.py                       # all builds -> results/gpu_compile_cpu.csv
    python benchmarks/gpu_compile.py --kernels fwd --dtypes bf16 --targets sm_90 --configs 0 --json

Specialisation follows a real launch on contiguous tensors: pointers and multiples of 16 (H, V, strides)
carry tt.divisibility=16, unit strides become the constant 1, N does not (RL's token counts vary). The
launchers make hidden and weight unit-stride so that this holds. `--generic` builds without any of it, as
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

os.environ.pop("TRITON_INTERPRET", None)  # before anything imports triton
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"bf16": "*bf16", "fp32": "*fp32"}
WIDTH = {"bf16": 2, "fp32": 4}
KERNEL_NAMES = ("fwd", "bwd")  # the GRPO loss runs on these two kernels (kernels/grpo_loss.py)
COLUMNS = common.META_COLUMNS + ["kernel", "config", "BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages",
                                 "tuned_for", "dtype", "target", "specialized", "registers", "spill_bytes", "shared_bytes",
                                 "shared_estimate", "shared_limit", "fits", "kept", "build_s", "status"]
# Specialisation values of a typical launch (Qwen-like shape: H, V and strides multiples of 16).
_DIVISIBLE = {"N_BUCKET", "V", "H", "V_PER_SPLIT", "v_lo", "v_hi", "stride_xn", "stride_wv"}
_UNIT = {"stride_xh", "stride_wh"}
_FP32_POINTERS = {"STATS", "LSE", "MEAN_Z", "G_LOGP", "G_ENT", "DX", "DW"}


def _kernels():
    from kernels import logprob_entropy as le

    return {"fwd": le._fwd_kernel, "bwd": le._bwd_kernel}


def _signature(jit_fn, ptr_type, meta, specialize=True):
    """(signature, constexprs, attrs) for `jit_fn` with float pointers of `ptr_type`, meta-params `meta`;
    specialize=False: no unit strides and no divisibility (a launch on strided, unaligned tensors)."""
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
        elif name in ("X", "W"):
            signature[name] = ptr_type
        elif name in _FP32_POINTERS:  # work buffers and per-row vectors
            signature[name] = "*fp32"
        elif name == "inv_temp":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if specialize and (signature[name].startswith("*") or name in _DIVISIBLE):
            attrs[(i,)] = BaseBackend.parse_attr("D")
    return signature, constexprs, attrs


def _meta(kernel_name, dtype, config):
    meta = dict(config.kwargs, UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    if kernel_name == "bwd":
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


def build(kernel_name: str, config, dtype: str, target: str, specialize: bool = True) -> dict:
    """Build one config (an index into the autotuner's list, or a triton.Config); returns registers,
    spill_bytes (stack), shared_bytes, shared_limit, fits, build_s."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import _triton as _t

    kernel = _kernels()[kernel_name]
    config = kernel.configs[config] if isinstance(config, int) else config
    cc = TARGETS[target]
    signature, constexprs, attrs = _signature(kernel.fn, DTYPES[dtype], _meta(kernel_name, dtype, config),
                                               specialize)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    build_s = time.perf_counter() - t0
    registers, spill = _resource_usage(compiled.asm["cubin"])
    shared, limit = int(compiled.metadata.shared), _t.SHARED_MEMORY_LIMIT[cc]
    return {"registers": registers, "spill_bytes": spill, "shared_bytes": shared, "shared_limit": limit,
            "fits": shared <= limit, "build_s": build_s}


def pruning(kernel_name: str, config_index: int, dtype: str, target: str) -> dict:
    """What the kernel's autotune pruning decides for this config on `target`: the shared-memory
    estimate it uses, and whether the config is kept (tuned for this dtype's width, fits the limit)."""
    from kernels import _triton as _t
    from kernels import logprob_entropy as le

    configs = _kernels()[kernel_name].configs
    config, cc, width = configs[config_index], TARGETS[target], WIDTH[dtype]
    estimate = lambda c: le.shared_memory_bytes(c, width, cc, kernel_name == "bwd")  # noqa: E731
    kept = _t.prune_configs(configs, width, cc, _t.SHARED_MEMORY_LIMIT[cc], estimate)
    return {"shared_estimate": estimate(config), "kept": any(c is config for c in kept)}


def _config_row(kernel_name, index):
    config = _kernels()[kernel_name].configs[index]
    tuned_for = {None: "any", 2: "16-bit", 4: "fp32"}[getattr(config, "operand_bytes", None)]
    return {"kernel": kernel_name, "config": index, **{k: config.kwargs[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")},
            "num_warps": config.num_warps, "num_stages": config.num_stages, "tuned_for": tuned_for}


def markdown_summary(rows: list[dict]) -> str:
    lines = ["| kernel | config (BN, BV, BH, warps, stages) | tuned for | dtype | target | REG | STACK (spill) "
             "| shared KB (estimate) | fits | kept by pruning |", "|" + " --- |" * 10]
    for r in rows:
        cfg = f"{r['config']}: {r['BLOCK_N']}, {r['BLOCK_V']}, {r['BLOCK_H']}, {r['num_warps']}, {r['num_stages']}"
        head = f"| {r['kernel']} | {cfg} | {r['tuned_for']} | {r['dtype']} | {r['target']} |"
        if r["status"] != "ok":
            lines.append(f"{head} | | | | | {r['status']} |")
            continue
        lines.append(f"{head} {r['registers']} | {r['spill_bytes']} | {int(r['shared_bytes']) / 1024:.0f} "
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
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--configs", default="", help="comma-separated config indices (default: all)")
    parser.add_argument("--out", default=str(common.RESULTS / "gpu_compile_cpu.csv"))
    parser.add_argument("--generic", action="store_true",
                        help="build as for strided, unaligned tensors (no unit strides, no divisibility by 16)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of writing a CSV")
    args = parser.parse_args(argv)

    import torch

    meta = common.run_metadata("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for kernel_name in args.kernels.split(","):
        n_configs = len(_kernels()[kernel_name].configs)
        indices = [int(i) for i in args.configs.split(",")] if args.configs else range(n_configs)
        for index in indices:
            for dtype in args.dtypes.split(","):
                for target in args.targets.split(","):
                    row = {**meta, "load_avg": common.load_avg(), **_config_row(kernel_name, index),
                           "dtype": dtype, "target": target, "specialized": not args.generic,
                           **pruning(kernel_name, index, dtype, target)}
                    try:
                        row.update(build(kernel_name, index, dtype, target, not args.generic), status="ok")
                    except Exception as e:  # noqa: BLE001 - a failing build is a result, not a crash
                        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    print(f"{kernel_name} cfg{index} {dtype} {target}: {row.get('registers')} reg, "
                          f"{row.get('spill_bytes')} B stack, {row.get('shared_bytes')} B shared, {row['status']}",
                          file=sys.stderr, flush=True)
                    rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        common.write_csv(Path(args.out), rows, COLUMNS)
        print(markdown_summary(rows))
    return rows


if __name__ == "__main__":
    main()
