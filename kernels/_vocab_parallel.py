"""Vocabulary parallelism for the fused log-prob/entropy: the LM-head weight split by rows over a group.

Rank r of `process_group` holds rows [start_r, start_r + V_r) of the full [V, H] weight (contiguous,
disjoint, covering the vocabulary); hidden states, targets (GLOBAL vocabulary ids) and upstream gradients
are the same on every rank. Each rank sweeps only its own columns and keeps the same per-row statistics as
the unsharded kernels (m_r = max, s_r = sum exp(z - m_r), t_r = sum exp(z - m_r) (z - m_r), the target
logit where the target is one of its rows); they merge exactly like the kernels' vocabulary splits:

    M = max_r m_r                                         # all_reduce(MAX)      (N,) fp32
    s = sum_r s_r exp(m_r - M)                            # one all_reduce(SUM) of (4, N) fp32:
    t = sum_r exp(m_r - M) (t_r + s_r (m_r - M))          #   s, t, target logit, target hit count
    lse = M + log s,  E[z] = M + t / s,  entropy = log s - t / s,  logp = z_target - lse

Backward: each rank forms dlogits of its own columns from the global lse and E[z] (the one-hot term only
where it owns the target), computes its dW shard locally (no communication) and all-reduces dX (SUM, fp32).
Traffic per call: 5 * N fp32 forward, N * H fp32 backward - independent of V.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_vocab_start(weight, process_group, vocab_start):
    """First global vocabulary id of this rank's shard: `vocab_start`, or rank * V_local (even shards)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given but torch.distributed is not initialised")
    if vocab_start is None:
        return dist.get_rank(process_group) * weight.shape[0]
    if int(vocab_start) != vocab_start or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0; got {vocab_start!r}")
    return int(vocab_start)


def local_targets(targets, ignore_index, vocab_start, v_local):
    """(local target ids, -1 where this rank does not own the target or the row is ignored; owned mask)."""
    local = targets.long() - vocab_start
    owned = (targets != ignore_index) & (local >= 0) & (local < v_local)
    return torch.where(owned, local, -1), owned


def merge_row_stats(m, s, t, z_target, owned, valid, group):
    """Merge per-rank row statistics (each (N,) fp32, relative to the local max m) over `group`.

    z_target: the raw target logit where `owned`, 0 elsewhere. Returns the global (M, s, t, z_target), t
    relative to M. Raises IndexError on every rank alike if a valid row's target is owned by no rank or
    by several (an out-of-range target or overlapping shards): one host sync, like the unsharded check.
    """
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    shift = m - m_all
    scale = torch.exp(shift)
    stats = torch.stack([scale * s, scale * (t + s * shift), torch.where(owned, z_target, 0.0), owned.float()])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    s_all, t_all, zt_all, hits = stats.unbind(0)
    bad = valid & (hits != 1)
    if bad.any():  # host sync; identical on every rank (hits is all-reduced), so all ranks raise together
        raise IndexError(f"targets not owned by exactly one vocabulary shard (out of range, or shards overlap "
                         f"or leave gaps): rows {bad.nonzero()[:5, 0].tolist()}")
    return m_all, s_all, t_all, zt_all


def all_reduce_sum_(x, group):
    """In-place SUM over the group (dX: each rank holds the contribution of its own vocabulary columns)."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x
