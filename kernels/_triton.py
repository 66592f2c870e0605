"""Optional Triton import shared by the kernel files, so `import kernels` works where Triton is absent.

Kernels are declared with `jit`/`autotune` from here; without Triton they stay plain (never launched)
functions and the torch paths serve every call.
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    HAVE_TRITON = False

    class _TL:
        constexpr = object

    tl = _TL()

# The interpreter computes bf16 tiles wrongly (raw bits); kernels upcast loaded tiles when it runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability
# major*10+minor: a config asking for more cannot launch there (A100 163 KB, H100/H200 227 KB).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def jit(fn):
    return triton.jit(fn) if HAVE_TRITON else fn


def autotune(configs, key, **kwargs):
    if not HAVE_TRITON:
        return lambda fn: fn
    return triton.autotune(configs=configs(), key=key, **kwargs)


def config(**kw):
    """triton.Config; `operand_bytes` (optional) = the element size of the inputs the config is tuned for."""
    warps, stages, width = kw.pop("num_warps", 4), kw.pop("num_stages", 2), kw.pop("operand_bytes", None)
    cfg = triton.Config(kw, num_warps=warps, num_stages=stages)
    cfg.operand_bytes = width
    return cfg


def shared_memory_limit(device):
    """(compute capability as major * 10 + minor, opt-in dynamic shared memory per block in bytes) of a
    CUDA device; (0, None) for any other device (the interpreter has no limit)."""
    if device.type != "cuda":
        return 0, None
    import torch

    props = torch.cuda.get_device_properties(device)
    cc = props.major * 10 + props.minor
    return cc, getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_LIMIT.get(cc)


def prune_configs(configs, operand_bytes, cc, limit, shared_bytes):
    """The autotune configs worth timing for inputs of `operand_bytes` on a device of compute capability
    `cc` with `limit` bytes of shared memory per block (None: unknown, no limit).

    Keeps the configs tuned for this operand width (a config without one serves every width) whose
    `shared_bytes(config)` fits the limit: a launch asking for more fails with OutOfResources. Never
    empty: if nothing fits, the config asking least is kept (so the error names a real config).
    """
    same_width = [c for c in configs if getattr(c, "operand_bytes", None) in (None, operand_bytes)] or list(configs)
    if limit is None:
        return same_width
    fits = [c for c in same_width if shared_bytes(c) <= limit]
    return fits or [min(same_width, key=shared_bytes)]


def autotune_enabled() -> bool:
    """Tuning on a GPU unless FCTRAIN_AUTOTUNE=0; never in the interpreter (multi-config fails there)."""
    return not INTERPRET and os.environ.get("FCTRAIN_AUTOTUNE", "1") != "0"


def n_bucket(n: int) -> int:
    """Power-of-two bucket of the token count: RL's varying N must not retrigger tuning every call."""
    return 1 << max(n - 1, 0).bit_length()


def check_device(*tensors):
    for t in tensors:
        if not (t.is_cuda or INTERPRET):
            raise RuntimeError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported); "
                "use impl='torch' or impl='auto' on this machine")
