"""Fused LM-head + log-prob + entropy over vocabulary tiles (Triton), forward and backward.

The specification is the runnable PyTorch in `fused_linear_logprob_entropy`'s docstring (one copy; a test
runs it against this file). The implementation never forms the [N, V] logits z = hidden @ weight.T / T.

Forward: grid (N / BLOCK_N, SPLITS). Each program sweeps its share of the vocabulary in BLOCK_V tiles,
computes the (BLOCK_N, BLOCK_V) logit tile on chip and keeps three fp32 online statistics per row:
m = running max, s = sum exp(z - m), t = sum exp(z - m) * (z - m), plus the target logit. The host
merges the SPLITS partials (O(SPLITS * N)): lse = m + log s, E[z] = m + t / s, entropy = log s - t / s.
Tracking (z - m) instead of z keeps peaky rows (entropy ~ 0) exact in fp32. FLOPs 2NHV; traffic
~ (N/BLOCK_N) * V * H reads of W plus N * H of X. SPLITS > 1 only when row blocks are too few to fill the
GPU; each split is a multiple of the widest BLOCK_V.

Backward: recompute each logit tile (2NHV; the loss gradient needs lse, known only after the full sweep,
so 8NHV in all instead of 6) and form dz = g_logp * (onehot(t) - p) - g_ent * p * (z - E[z]), p = exp(z - lse).
`_backward` (default, "chunked") writes dz per chunk of rows and leaves dX and dW to two GEMMs;
`_backward_atomic` (opt-in, "atomic"; tile skipping needs it) adds each tile's share with fp32 atomics.

Workspace (no [N, V] tensor ever): fp32 dX [N, H], [SPLITS, N] stats; chunked: the dz buffer
(<= DZ_CHUNK_BYTES) and, with several chunks, an fp32 dW [V, H] plus one chunk's dW product in the input
dtype; atomic: one fp32 dW slab [V_slab, H] with V_slab * H <= 2**25 when weight is not fp32.
docs/gpu_kernels.md has the build reports and what a GPU has (and has not yet) measured.
"""
from __future__ import annotations

import torch

from . import _triton as _t
from . import _vocab_parallel as vp
from ._triton import jit, tl, triton
from .reference import chunked_logprob_entropy, naive_logprob_entropy

POISON_OUTPUTS = False  # tests set this: work buffers start as NaN so an unwritten element shows up
DW_SLAB_ELEMENTS = 1 << 25  # fp32 dW slab bound: 128 MiB (atomic backward)
DZ_CHUNK_BYTES = 1 << 30  # dz buffer bound of the chunked backward: 1 GiB (3533 rows at V 151936 in bf16)
BACKWARDS = ("auto", "chunked", "atomic")


# Autotune tiles (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) per operand width in bytes. Every one
# builds for sm_80 and sm_90 without spilling registers (benchmarks/gpu_compile.py writes
# results/gpu_compile_cpu.csv). fp32 operands (ieee dot, no tensor cores) need thin BLOCK_H tiles: the
# bf16 tiles spill 0.2-13 KB there. `_prune` keeps the tiles of the call's width that fit in shared memory.
_FWD_TILES = {2: [(64, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 256, 64, 8, 3), (128, 64, 64, 8, 4)],
              4: [(64, 128, 16, 8, 4), (64, 128, 32, 8, 3)]}
# The dz kernel keeps one logit tile live, like the forward, and stores it: the forward's bf16 tiles; of its
# fp32 tiles, (64, 128, 16) spills 16 B on sm_90 there.
_DZ_TILES = {2: _FWD_TILES[2], 4: [(64, 128, 32, 8, 3)]}
_BWD_ATOMIC_TILES = {2: [(64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (128, 64, 32, 8, 4)],
                     4: [(64, 128, 16, 8, 4)]}
# Vocabulary splits (forward) and dW slabs (atomic backward) start at multiples of the widest BLOCK_V: no
# tile crosses a boundary, and V_PER_SPLIT / v_lo / v_hi reach the kernels as multiples of 16 (the
# specialisation the compile report builds).
VOCAB_ALIGN = max(tile[1] for tiles in (_FWD_TILES, _DZ_TILES, _BWD_ATOMIC_TILES)
                  for shapes in tiles.values() for tile in shapes)


def _configs(tiles):
    if not _t.autotune_enabled():  # one default for every dtype (the interpreter cannot tune)
        block = (32, 128, 64) if _t.INTERPRET else (64, 128, 64)
        return [_t.config(BLOCK_N=block[0], BLOCK_V=block[1], BLOCK_H=block[2], num_warps=8, num_stages=3)]
    return [_t.config(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=w, num_stages=s, operand_bytes=width)
            for width, shapes in tiles.items() for bn, bv, bh, w, s in shapes]


def shared_memory_bytes(config, operand_bytes: int, cc: int, backward: bool) -> int:
    """Upper bound of the dynamic shared memory a build of `config` asks for (checked against every build
    in results/gpu_compile_cpu.csv by tests/test_gpu_compile.py).

    The logit-tile loop keeps `buffers` pipeline stages of one X tile and one W tile; sm_90's wgmma
    pipeline (16-bit operands) holds num_stages of them, the cp.async pipeline (sm_80, and fp32's FMA
    dot everywhere) num_stages - 1. The atomic backward's dX/dW loop (`backward`) stages the dz tile
    (BLOCK_N, BLOCK_V) and its own X and W tiles on top.
    """
    kw = config.kwargs
    bn, bv, bh = kw["BLOCK_N"], kw["BLOCK_V"], kw["BLOCK_H"]
    buffers = config.num_stages if (cc >= 90 and operand_bytes == 2) else config.num_stages - 1
    total = buffers * (bn + bv) * bh * operand_bytes
    if backward:
        total += bn * bv * operand_bytes + buffers * (bn + bv) * bh * operand_bytes
    return total


def _prune(backward):
    def prune(configs, named_args, **kwargs):
        x = named_args["X"]
        cc, limit = _t.shared_memory_limit(x.device)
        return _t.prune_configs(configs, x.element_size(), cc, limit,
                                lambda c: shared_memory_bytes(c, x.element_size(), cc, backward))
    return prune


# ---------------------------------------------------------------------------- tile helpers (inlined)

@jit
def _logit_tile(X, W, offs_n, offs_v, n_mask, v_mask, H, stride_xn, stride_xh, stride_wv, stride_wh,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """The (BLOCK_N, BLOCK_V) tile of hidden @ weight.T, accumulated in fp32 over H in BLOCK_H steps:
    2 * BLOCK_N * BLOCK_V * H FLOPs, reads (BLOCK_N + BLOCK_V) * H elements. Masked rows/columns give 0."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        x = tl.load(X + offs_n[:, None] * stride_xn + offs_h[None, :] * stride_xh,
                    mask=n_mask[:, None] & h_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
        w = tl.load(W + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                    mask=v_mask[:, None] & h_mask[None, :], other=0.0)  # (BLOCK_V, BLOCK_H)
        if UPCAST:  # the interpreter computes bf16 dots wrongly
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@jit
def _dz_tile(X, W, TARGETS, LSE, MEAN_Z, G_LOGP, G_ENT, offs_n, offs_v, n_mask, v_mask, H,
             stride_xn, stride_xh, stride_wv, stride_wh, inv_temp,
             DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """The (BLOCK_N, BLOCK_V) tile of dz = d loss / d (hidden @ weight.T) in fp32: the logit tile
    recomputed, then dz = (g_logp * (onehot(t) - p) - g_ent * p * (z - E[z])) / T; 0 in masked columns."""
    tgt = tl.load(TARGETS + offs_n, mask=n_mask, other=-1).to(tl.int64)
    lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
    mean_z = tl.load(MEAN_Z + offs_n, mask=n_mask, other=0.0)
    g_logp = tl.load(G_LOGP + offs_n, mask=n_mask, other=0.0)  # 0 on ignored rows (host)
    g_ent = tl.load(G_ENT + offs_n, mask=n_mask, other=0.0)
    z = _logit_tile(X, W, offs_n, offs_v, n_mask, v_mask, H, stride_xn, stride_xh, stride_wv, stride_wh,
                    DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H) * inv_temp
    p = tl.where(v_mask[None, :], tl.exp(z - lse[:, None]), 0.0)  # (BLOCK_N, BLOCK_V)
    dz = -p * (g_logp[:, None] + g_ent[:, None] * (z - mean_z[:, None]))
    dz += tl.where((offs_v[None, :] == tgt[:, None]) & v_mask[None, :], g_logp[:, None], 0.0)
    return dz * inv_temp


# ---------------------------------------------------------------------------- kernels

@_t.autotune(configs=lambda: _configs(_FWD_TILES), key=["H", "V", "N_BUCKET"],
             prune_configs_by={"early_config_prune": _prune(False)})
@jit
def _fwd_kernel(
    # pointers
    X, W, TARGETS, STATS,  # STATS: (4, SPLITS, N) fp32 = m, s, t, target logit
    # sizes
    N, V, H, V_PER_SPLIT, N_BUCKET,
    # strides
    stride_xn, stride_xh, stride_wv, stride_wh,
    # runtime scalars
    inv_temp,
    # meta-parameters
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_mask = offs_n < N
    tgt = tl.load(TARGETS + offs_n, mask=n_mask, other=-1).to(tl.int64)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < v_hi
        acc = _logit_tile(X, W, offs_n, offs_v, n_mask, v_mask, H, stride_xn, stride_xh, stride_wv, stride_wh,
                          DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(v_mask[None, :], acc * inv_temp, float("-inf"))  # padded columns: -inf, never 0
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)  # first tile: nothing to rescale
        alpha = tl.exp(shift)
        zc = tl.where(v_mask[None, :], z - m_new[:, None], 0.0)
        e = tl.where(v_mask[None, :], tl.exp(zc), 0.0)
        t = alpha * (t + shift * s) + tl.sum(e * zc, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
        # the target's raw logit, not z: past v_hi the tile holds the next split's ids, where z is -inf but acc
        # is 0 (their W rows load as 0), so a match there adds nothing (cheaper in registers than a mask)
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), 1) * inv_temp

    row = pid_s * N + offs_n
    plane = n_splits * N
    tl.store(STATS + row, m, mask=n_mask)
    tl.store(STATS + plane + row, s, mask=n_mask)
    tl.store(STATS + 2 * plane + row, t, mask=n_mask)
    tl.store(STATS + 3 * plane + row, zt, mask=n_mask)


@_t.autotune(configs=lambda: _configs(_DZ_TILES), key=["H", "V", "N_BUCKET"],
             prune_configs_by={"early_config_prune": _prune(False)})
@jit
def _dz_kernel(
    # pointers
    X, W, TARGETS, LSE, MEAN_Z, G_LOGP, G_ENT, DZ,  # X etc. start at the chunk's first row; DZ (rows, V)
    # sizes
    N, V, H, N_BUCKET,
    # strides
    stride_xn, stride_xh, stride_wv, stride_wh, stride_dzn,
    # runtime scalars
    inv_temp,
    # meta-parameters
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The default backward's first half: dz of a chunk of rows, written in the input dtype (the GEMMs
    dX = dz W and dW += dz^T X follow on the host). No atomics, no tile skipping."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    n_mask = offs_n < N
    v_mask = offs_v < V
    dz = _dz_tile(X, W, TARGETS, LSE, MEAN_Z, G_LOGP, G_ENT, offs_n, offs_v, n_mask, v_mask, H,
                  stride_xn, stride_xh, stride_wv, stride_wh, inv_temp, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    tl.store(DZ + offs_n[:, None] * stride_dzn + offs_v[None, :], dz.to(DZ.dtype.element_ty),
             mask=n_mask[:, None] & v_mask[None, :])


@_t.autotune(configs=lambda: _configs(_BWD_ATOMIC_TILES), key=["H", "V", "N_BUCKET"], reset_to_zero=["DX", "DW"],
             prune_configs_by={"early_config_prune": _prune(True)})
@jit
def _bwd_atomic_kernel(
    # pointers
    X, W, TARGETS, LSE, MEAN_Z, G_LOGP, G_ENT, DX, DW,  # DX (N, H) fp32, DW (v_hi - v_lo, H) fp32
    # sizes
    N, V, H, v_lo, v_hi, N_BUCKET,
    # strides
    stride_xn, stride_xh, stride_wv, stride_wh,
    # runtime scalars
    inv_temp, filter_eps,
    # meta-parameters
    HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_v = (v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    n_mask = offs_n < N
    v_mask = offs_v < v_hi
    dz = _dz_tile(X, W, TARGETS, LSE, MEAN_Z, G_LOGP, G_ENT, offs_n, offs_v, n_mask, v_mask, H,
                  stride_xn, stride_xh, stride_wv, stride_wh, inv_temp, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    g_logp = tl.load(G_LOGP + offs_n, mask=n_mask, other=0.0)
    g_ent = tl.load(G_ENT + offs_n, mask=n_mask, other=0.0)
    if UPCAST:
        dz_op = dz
    else:
        dz_op = dz.to(X.dtype.element_ty)  # tensor-core operand in the input dtype, fp32 accumulation

    # Tile skipping (Cut Cross-Entropy's gradient filter, on the computed dz, relative to each row's
    # upstream scale s = (|g_logp| + |g_ent|) / T so that eps means "p < eps" whatever the loss
    # normalisation): when every |dz| <= filter_eps * s, the tile's 4 * BLOCK_N * BLOCK_V * H FLOPs and
    # (BLOCK_N + BLOCK_V) * H atomics are skipped. filter_eps = 0 skips only all-zero tiles (exact).
    thr = filter_eps * inv_temp * (tl.abs(g_logp) + tl.abs(g_ent))  # (BLOCK_N,)
    excess = tl.max(tl.max(tl.abs(dz) - thr[:, None], 1), 0)
    if excess > 0:
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            if HAS_DX:
                w = tl.load(W + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                            mask=v_mask[:, None] & h_mask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dx = tl.dot(dz_op, w, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
                tl.atomic_add(DX + offs_n[:, None] * H + offs_h[None, :], dx,
                              mask=n_mask[:, None] & h_mask[None, :])
            if HAS_DW:
                x = tl.load(X + offs_n[:, None] * stride_xn + offs_h[None, :] * stride_xh,
                            mask=n_mask[:, None] & h_mask[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), x, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                tl.atomic_add(DW + (offs_v - v_lo)[:, None] * H + offs_h[None, :], dw,
                              mask=v_mask[:, None] & h_mask[None, :])


# ---------------------------------------------------------------------------- host launchers

def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact like torch's default


def _sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter runs programs in turn)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _num_splits(n: int, v: int, sms: int) -> int:
    """Vocabulary splits wanted when N / 64 row blocks cannot fill `sms` SMs with 2 programs each (1 when
    sms = 0). Tests replace this function to force splits under the interpreter."""
    if sms == 0:
        return 1
    row_blocks = max(1, triton.cdiv(n, 64))
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(v, 2048)))


def _split_plan(n: int, v: int, sms: int) -> tuple[int, int]:
    """(SPLITS, V_PER_SPLIT) of the forward: V_PER_SPLIT rounded up to a multiple of VOCAB_ALIGN; every
    split holds at least one column."""
    v_per_split = triton.cdiv(triton.cdiv(v, _num_splits(n, v, sms)), VOCAB_ALIGN) * VOCAB_ALIGN
    return triton.cdiv(v, v_per_split), v_per_split


def _dw_slabs(v: int, h: int) -> list[tuple[int, int]]:
    """(v_lo, v_hi) of the atomic backward's vocabulary slabs: fp32 dW slab of <= DW_SLAB_ELEMENTS (or one
    VOCAB_ALIGN block), starting at multiples of VOCAB_ALIGN."""
    slab = max(VOCAB_ALIGN, DW_SLAB_ELEMENTS // max(h, 1) // VOCAB_ALIGN * VOCAB_ALIGN)
    return [(v_lo, min(v, v_lo + slab)) for v_lo in range(0, v, slab)]


def _dz_chunk_rows(n: int, v: int, element_size: int) -> int:
    """Rows per chunk of the chunked backward: its dz buffer [rows, V] stays within DZ_CHUNK_BYTES."""
    return max(1, min(n, DZ_CHUNK_BYTES // max(v * element_size, 1)))


def _alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device) if POISON_OUTPUTS else \
        torch.empty(shape, dtype=dtype, device=device)


def _forward(hidden, weight, targets, temperature, ignore_index, group=None, kernel_targets=None, owned=None):
    # check constraints -> allocate -> grid -> launch
    # group: `weight` is a vocabulary shard; kernel_targets are then local ids (-1 = not owned)
    _t.check_device(hidden, weight, targets)
    kernel_targets = targets if kernel_targets is None else kernel_targets
    n, h = hidden.shape
    v = weight.shape[0]
    splits, v_per_split = _split_plan(n, v, _sm_count(hidden.device))
    stats = _alloc((4, splits, n), torch.float32, hidden.device)
    if n > 0:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        _fwd_kernel[grid](
            hidden, weight, kernel_targets, stats,
            n, v, h, v_per_split, _t.n_bucket(n),
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature,
            DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_t.INTERPRET,
        )
    m, s, t, zt = stats.unbind(0)  # each (splits, n)
    m_all = m.max(0).values  # merge the vocabulary splits
    scale = torch.exp(m - m_all)
    s_all = (scale * s).sum(0)
    t_all = (scale * (t + s * (m - m_all))).sum(0)
    zt = zt.sum(0)
    valid = targets != ignore_index
    if group is not None:  # then merge the ranks' shards the same way (kernels._vocab_parallel)
        m_all, s_all, t_all, zt = vp.merge_row_stats(m_all, s_all, t_all, zt, owned, valid, group)
    log_s = torch.log(s_all)
    lse = m_all + log_s
    mean_z = m_all + t_all / s_all
    logp = torch.where(valid, zt - lse, 0.0)
    entropy = torch.where(valid, log_s - t_all / s_all, 0.0)
    return logp, entropy, lse, mean_z


def _backward(hidden, weight, targets, lse, mean_z, g_logp, g_ent, temperature, need_x, need_w):
    """The default ("chunked") backward: per chunk of rows, `_dz_kernel` writes dz in the input dtype, then
    two GEMMs (cuBLAS on a GPU) form dX[chunk] = dz W and dW += dz^T X[chunk]. Traffic: dz written and read
    twice per element instead of (N/BLOCK_N) V H + (V/BLOCK_V) N H fp32 atomic adds
    (benchmarks/traffic_model.py, provider fctrain-triton). dW of several chunks is summed in fp32 (each
    chunk's product rounded once to the input dtype by the GEMM)."""
    n, h = hidden.shape
    v = weight.shape[0]
    dx = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_x else None
    dw = None
    rows = _dz_chunk_rows(n, v, hidden.element_size())
    dz = _alloc((min(rows, n), v), hidden.dtype, hidden.device) if n else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = hidden[r0:r1]
        dz_c = dz[:r1 - r0]
        grid = lambda meta: (triton.cdiv(r1 - r0, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"]))  # noqa: E731
        _dz_kernel[grid](
            x, weight, targets[r0:r1], lse[r0:r1], mean_z[r0:r1], g_logp[r0:r1], g_ent[r0:r1], dz_c,
            r1 - r0, v, h, _t.n_bucket(r1 - r0),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), dz_c.stride(0),
            1.0 / temperature,
            DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_t.INTERPRET,
        )
        if need_x:
            dx[r0:r1] = dz_c @ weight
        if need_w:
            part = dz_c.T @ x
            if dw is None:
                dw = part if r1 == n else part.float()
            else:
                dw += part
    if need_w:
        dw = torch.zeros_like(weight) if dw is None else dw.to(weight.dtype)
    return dx, dw  # dx in fp32


def _backward_atomic(hidden, weight, targets, lse, mean_z, g_logp, g_ent, temperature, need_x, need_w,
                     filter_eps=0.0):
    """The opt-in backward: fp32 atomics per tile, one dW slab at a time, tile skipping by `filter_eps`."""
    n, h = hidden.shape
    dx = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_x else None
    dw = torch.empty_like(weight) if need_w else None
    # A gradient that is not needed still takes a pointer argument: a buffer of its own, since the
    # autotuner's reset_to_zero zeroes DX and DW before it times each config.
    unused = torch.zeros(1, dtype=torch.float32, device=hidden.device)
    for v_lo, v_hi in _dw_slabs(weight.shape[0], h):
        dw_slab = None
        if need_w:
            dw_slab = dw[v_lo:v_hi] if dw.dtype == torch.float32 else \
                torch.zeros((v_hi - v_lo, h), dtype=torch.float32, device=hidden.device)
            dw_slab.zero_()
        if n > 0:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v_hi - v_lo, meta["BLOCK_V"]))  # noqa: E731
            _bwd_atomic_kernel[grid](
                hidden, weight, targets, lse, mean_z, g_logp, g_ent,
                dx if need_x else unused, dw_slab if need_w else unused,
                n, weight.shape[0], h, v_lo, v_hi, _t.n_bucket(n),
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                1.0 / temperature, float(filter_eps),
                HAS_DX=need_x, HAS_DW=need_w,
                DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_t.INTERPRET,
            )
        if need_w and dw_slab.data_ptr() != dw[v_lo:v_hi].data_ptr():
            dw[v_lo:v_hi] = dw_slab
    return dx, dw  # dx in fp32


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, group, vocab_start, filter_eps, backward):
        kernel_targets, owned = targets, None
        # unit inner strides: the kernels then build with vectorised, pipelined loads and no spills
        # (benchmarks/gpu_compile.py --generic shows the strided builds spilling)
        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        if group is not None:
            kernel_targets, owned = vp.local_targets(targets, ignore_index, vocab_start, weight.shape[0])
        logp, entropy, lse, mean_z = _forward(hidden, weight, targets, temperature, ignore_index,
                                              group, kernel_targets, owned)
        ctx.save_for_backward(hidden, weight, targets, kernel_targets, lse, mean_z)
        ctx.args = (temperature, ignore_index, group, filter_eps, backward)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, kernel_targets, lse, mean_z = ctx.saved_tensors
        temperature, ignore_index, group, filter_eps, backward = ctx.args
        valid = targets != ignore_index
        zeros = torch.zeros_like(lse)
        g_logp = torch.where(valid, grad_logp.float(), 0.0).contiguous() if grad_logp is not None else zeros
        g_ent = torch.where(valid, grad_entropy.float(), 0.0).contiguous() if grad_entropy is not None else zeros
        args = (hidden, weight, kernel_targets, lse, mean_z, g_logp, g_ent, temperature,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dx, dw = _backward(*args) if backward == "chunked" else _backward_atomic(*args, filter_eps)
        if dx is not None:
            dx = (dx if group is None else vp.all_reduce_sum_(dx, group)).to(hidden.dtype)
        return dx, dw, None, None, None, None, None, None, None


def _check_inputs(hidden, weight, targets, temperature):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has H={hidden.shape[1]}, weight has H={weight.shape[1]}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}; got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point:
        raise TypeError(f"targets must be an integer tensor; got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _check_targets(targets, vocab, ignore_index):
    # One host-device sync per call: an out-of-range target would silently read garbage otherwise.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.numel() and bool(bad.any()):
        raise IndexError(f"targets out of range [0, {vocab}) (and not ignore_index={ignore_index}): "
                         f"{targets[bad][:5].tolist()}")


def fused_linear_logprob_entropy(hidden, weight, targets, temperature=1.0, ignore_index=-100, impl="auto",
                                 process_group=None, vocab_start=None, filter_eps=None, backward="auto"):
    """Per-token log p(target) and entropy straight from hidden states, without [N, V] logits.

    Specification: the outputs and gradients of this runnable PyTorch, which forms the [N, V] logits that
    the implementation never does (`kernels.reference.naive_logprob_entropy` is this code; a test runs it
    against this function):

        z = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
        valid = targets != ignore_index
        logp = z.log_softmax(-1).gather(-1, targets.where(valid, 0)[:, None])[:, 0].where(valid, 0.0)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1).where(valid, 0.0)
        return logp, entropy

    Shapes: hidden [N, H] and weight [V, H] of one dtype (bf16, fp16, fp32), targets [N] int64 in [0, V) or
    ignore_index (those rows: 0 and no gradient); logp and entropy [N] fp32. Differentiable w.r.t. hidden
    and weight through both outputs.
    impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (token-chunked, bounded memory),
    "naive" (full logits), or "auto" = triton on CUDA, torch elsewhere.
    filter_eps (impl "triton" only; None = 0 = exact): the backward skips every (BLOCK_N, BLOCK_V) tile whose
    dlogits dz[n, v] = d loss / d (hidden @ weight.T) all satisfy |dz[n, v]| <= filter_eps * s[n], with
    s[n] = (|grad_logp[n]| + |grad_entropy[n]|) / temperature (without entropy gradient: p[n, v] <= eps off
    the target). Error bound: grad hidden[n, h] moves by at most filter_eps * s[n] * sum_v |weight[v, h]|,
    grad weight[v, h] by at most filter_eps * sum_n s[n] |hidden[n, h]|. Cut Cross-Entropy's "auto" filter
    is finfo(dtype).eps / 32 (2**-12 for bf16) on the softmax.
    backward (impl "triton" only): "chunked" = per chunk of rows (dz buffer <= DZ_CHUNK_BYTES) a kernel writes
    dz in the input dtype and two GEMMs form dX and dW, no atomics; "atomic" = each tile adds its dX/dW share
    with fp32 atomics, no dz buffer, and can skip tiles (filter_eps); "auto" = atomic when filter_eps is
    set, else chunked (docs/gpu_kernels.md: the traffic model's prediction and the GPU measurements).

    Vocabulary parallel (tensor-parallel LM head): with `process_group`, `weight` is this rank's
    contiguous shard [V_local, H] = full_weight[vocab_start : vocab_start + V_local] (default
    vocab_start = rank * V_local, i.e. even shards in rank order); hidden, targets (GLOBAL ids) and the
    upstream gradients must be identical on every rank. Outputs equal the unsharded spec on every rank;
    grad hidden is the full gradient (all-reduced), grad weight is this shard's rows. Collective: every
    rank of the group must call it with the same N (see kernels._vocab_parallel). impl "triton"/"torch".
    """
    _check_inputs(hidden, weight, targets, temperature)
    if process_group is None:
        _check_targets(targets, weight.shape[0], ignore_index)
    else:  # target range is checked after the merge (no rank knows the full vocabulary size)
        vocab_start = vp.resolve_vocab_start(weight, process_group, vocab_start)
        if weight.shape[0] == 0:
            raise ValueError("a vocabulary shard must hold at least one row")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}; got {backward!r}")
    if backward == "chunked" and filter_eps:
        raise ValueError("filter_eps (tile skipping) needs backward='atomic' (the chunked backward's GEMMs are dense)")
    targets = targets.contiguous()
    if impl == "auto":
        impl = "triton" if (hidden.is_cuda and _t.HAVE_TRITON) else "torch"
    if impl == "triton":
        if not _t.HAVE_TRITON:
            raise RuntimeError("impl='triton' needs the triton package; use impl='torch'")
        backward = backward if backward != "auto" else ("atomic" if filter_eps else "chunked")
        return _LogprobEntropy.apply(hidden, weight, targets, float(temperature), int(ignore_index),
                                     process_group, vocab_start, float(filter_eps or 0.0), backward)
    if impl == "torch":
        return chunked_logprob_entropy(hidden, weight, targets, temperature, ignore_index,
                                       process_group=process_group, vocab_start=vocab_start)
    if process_group is not None:
        raise ValueError(f"process_group (vocabulary parallel) needs impl 'triton' or 'torch'; got {impl!r}")
    if impl == "naive":
        return naive_logprob_entropy(hidden, weight, targets, temperature, ignore_index)
    raise ValueError(f"impl must be 'auto', 'triton', 'torch' or 'naive'; got {impl!r}")
