"""Plain-PyTorch log-prob + entropy from hidden states and an LM-head weight.

Two implementations of the op that `kernels.logprob_entropy` fuses in Triton:

- `naive_logprob_entropy`: the specification, materialising the full [N, V] logits. Tests run it in
  float64 as the reference; benchmarks run it in the input dtype as the baseline a user would write.
- `chunked_logprob_entropy`: the same math over chunks of tokens, with a hand-written backward that
  recomputes each chunk's logits, so memory is bounded by `chunk_size * V` floats instead of `N * V`.
  This is what `impl="auto"` runs on machines without a GPU.

Both follow the same contract as the Triton kernel (see `kernels.fused_linear_logprob_entropy`).
"""
from __future__ import annotations

import torch

from . import _vocab_parallel as vp
from .objective import GRPOLossConfig, grpo_objective

# Rows per chunk are picked so that one chunk's fp32 logits stay near this many elements (16 MiB):
# measured on CPU, 2**22 costs no time against 2**24 and 2**20 is far slower.
CHUNK_ELEMENTS = 1 << 22


def naive_logprob_entropy(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Full-logits reference: the specification of `fused_linear_logprob_entropy`, whose docstring quotes this
    body. Logits in fp32 (fp64 for fp64 input), then log_softmax, gather, entropy; ignored rows 0."""
    z = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    valid = targets != ignore_index
    logp = z.log_softmax(-1).gather(-1, targets.where(valid, 0)[:, None])[:, 0].where(valid, 0.0)
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1).where(valid, 0.0)
    return logp, entropy


def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, chunk_size)
    return max(1, min(max(n_rows, 1), CHUNK_ELEMENTS // max(vocab, 1)))


class _ChunkedLogprobEntropy(torch.autograd.Function):
    # Two fp32 (rows, V) buffers live at a time, forward and backward; element-wise work is in place.
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, chunk_size, group, vocab_start):
        n = hidden.shape[0]
        rows = _chunk_rows(n, weight.shape[0], chunk_size)
        valid = targets != ignore_index
        if group is None:
            safe_targets, owned = torch.where(valid, targets, 0).long(), valid
        else:  # vocabulary shard: rows whose target another rank owns gather a dummy column 0
            local, owned = vp.local_targets(targets, ignore_index, vocab_start, weight.shape[0])
            safe_targets = local.clamp(min=0)
        # Shifted row statistics: entropy = log s - t / s with s = sum e^(z-m), t = sum e^(z-m) (z-m);
        # lse - E[z] on raw logits would cancel catastrophically on peaky rows.
        row_max, s, t, z_target = (hidden.new_zeros(n, dtype=torch.float32) for _ in range(4))
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            zc = (hidden[sl] @ weight.T).float().div_(temperature)  # (rows, V) fp32: z
            row_max[sl] = zc.max(-1).values
            zc.sub_(row_max[sl, None])  # z - m
            e = zc.exp()
            s[sl] = e.sum(-1)
            z_target[sl] = zc.gather(-1, safe_targets[sl, None])[:, 0]  # z_t - m
            t[sl] = e.mul_(zc).sum(-1)
        if group is not None:  # merge the shards' statistics (see kernels._vocab_parallel)
            row_max, s, t, z_target = vp.merge_row_stats(row_max, s, t, z_target + row_max, owned, valid, group)
            z_target = z_target - row_max
        log_s = torch.log(s)
        logp = torch.where(valid, z_target - log_s, 0.0)
        entropy = torch.where(valid, log_s - t / s, 0.0)
        lse = row_max + log_s  # per-row log-sum-exp, saved for backward
        ctx.save_for_backward(hidden, weight, safe_targets, valid, owned, lse, entropy)
        ctx.args = (temperature, rows, group)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, valid, owned, lse, entropy = ctx.saved_tensors
        temperature, rows, group = ctx.args
        n = hidden.shape[0]
        g_logp = torch.where(valid, grad_logp.float(), 0.0) if grad_logp is not None else None
        g_ent = torch.where(valid, grad_entropy.float(), 0.0) if grad_entropy is not None else None
        # one-hot term only where this rank owns the target (every valid row when unsharded)
        g_onehot = g_logp if group is None or g_logp is None else torch.where(owned, g_logp, 0.0)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # sharded: dX is a sum over ranks, accumulated and reduced in fp32
        grad_hidden = (torch.zeros_like(hidden) if group is None else
                       torch.zeros_like(hidden, dtype=torch.float32)) if need_x else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            buf = (hidden[sl] @ weight.T).float().div_(temperature)  # recomputed z (rows, V)
            buf.sub_(lse[sl, None])  # log p, as z - lse (finite even where p underflows to 0)
            p = buf.exp()
            # dz = g_logp * (onehot(t) - p) - g_ent * p * (z - E[z]),  with z - E[z] = (z - lse) + H
            if g_ent is not None:
                buf.add_(entropy[sl, None]).mul_(g_ent[sl, None])
                if g_logp is not None:
                    buf.add_(g_logp[sl, None])
            else:
                buf.copy_(g_logp[sl, None].expand_as(buf))
            dz = buf.mul_(p).neg_()
            del p
            if g_logp is not None:
                dz.scatter_add_(-1, targets[sl, None], g_onehot[sl, None])
            if temperature != 1.0:
                dz.div_(temperature)
            dlogits = dz.to(hidden.dtype)  # (rows, V), matmul operands in the input dtype
            if need_x:
                grad_hidden[sl] = dlogits @ weight
            if need_w:
                grad_weight.addmm_(dlogits.T, hidden[sl]) if dlogits.dtype == torch.float32 else \
                    grad_weight.add_((dlogits.T @ hidden[sl]).float())
        if need_x and group is not None:
            grad_hidden = vp.all_reduce_sum_(grad_hidden, group).to(hidden.dtype)
        grad_weight = grad_weight.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_logprob_entropy(hidden, weight, targets, temperature=1.0, ignore_index=-100, chunk_size=None,
                            process_group=None, vocab_start=None):
    """Token-chunked log-prob + entropy: same outputs as `naive_logprob_entropy`, memory O(chunk * V).

    Peak extra memory is about 2.5 fp32 (chunk, V) buffers plus an fp32 grad accumulator for the weight
    [V, H]; `chunk_size=None` picks chunk * V ~= 2**22.
    `process_group`: `weight` is this rank's vocabulary shard (see `kernels.fused_linear_logprob_entropy`).
    """
    if process_group is not None:
        vocab_start = vp.resolve_vocab_start(weight, process_group, vocab_start)
    return _ChunkedLogprobEntropy.apply(hidden, weight, targets, float(temperature), ignore_index, chunk_size,
                                        process_group, vocab_start)


def naive_grpo_loss(hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None, rollout_logp=None,
                    is_weight=None, seq_ids=None, *, config: GRPOLossConfig = GRPOLossConfig(), temperature=1.0):
    """Full-logits GRPO loss: the specification of `fused_linear_grpo_loss`, whose docstring quotes this body.

    Same arguments, layouts and returns (loss, metrics); runs in float64 when given float64.
    """
    z = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    logp = z.log_softmax(-1).gather(-1, targets.where(mask.bool(), 0)[..., None]).squeeze(-1)
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    return grpo_objective(logp, entropy, advantages, mask, old_logp, ref_logp, rollout_logp, is_weight,
                          seq_ids, config=config)
