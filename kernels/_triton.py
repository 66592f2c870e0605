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
    warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 2)
    return triton.Config(kw, num_warps=warps, num_stages=stages)


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
