"""Fused linear GRPO/EGPO loss: hidden states + LM-head weight -> clipped policy loss, KL, entropy bonus.

The O(N * V * H) part (logits, log-softmax, entropy and their gradients) runs in the vocabulary-tiled
kernel of `kernels.logprob_entropy`; what remains is O(N) element-wise math on per-token vectors, left to
PyTorch autograd. Its per-token gradients d loss / d logp and d loss / d entropy arrive in the tiled
backward as the two upstream vectors, which is where they are folded into dlogits on chip: no [N, V]
tensor exists, forward or backward.

FLOPs: 8 * N * H * V with impl="triton" (2 forward, 6 backward: recompute the logit tile, dX, dW). A
6-FLOP design forms dlogits while the tile is still on chip in the forward pass; that needs the upstream
gradient at that moment, but d loss / d logp depends on the row's log-sum-exp, known only after the whole
vocabulary sweep (the clipped ratio exp(logp - old) needs the final logp). Keeping the row on chip instead
is impossible at V = 152k, so the tile is recomputed in the backward.
"""
from __future__ import annotations

import torch

from .logprob_entropy import fused_linear_logprob_entropy

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _flatten(hidden, targets, mask, advantages, per_token, seq_ids):
    """Bring [B, T, H] or packed [N, H] inputs to the packed form; returns per-token tensors on valid rows."""
    if hidden.dim() == 3:
        b, t, h = hidden.shape
        if mask.shape != (b, t) or targets.shape != (b, t):
            raise ValueError(f"with hidden [B, T, H]={tuple(hidden.shape)}, targets and mask must be [B, T]; "
                             f"got {tuple(targets.shape)} and {tuple(mask.shape)}")
        if seq_ids is not None:
            raise ValueError("seq_ids is for packed [N, H] input; the [B, T, H] layout already defines sequences")
        seq_ids = torch.arange(b, device=hidden.device).repeat_interleave(t)
        num_seqs = b
        hidden = hidden.reshape(b * t, h)
        targets, mask = targets.reshape(-1), mask.reshape(-1)
        per_token = [None if x is None else x.reshape(-1) for x in per_token]
        if advantages.shape == (b, t):
            advantages = advantages.reshape(-1)
        elif advantages.shape == (b,):
            advantages = advantages[seq_ids]
        else:
            raise ValueError(f"advantages must be [B]={b} or [B, T]={b, t}; got {tuple(advantages.shape)}")
    elif hidden.dim() == 2:
        n = hidden.shape[0]
        if mask.shape != (n,) or targets.shape != (n,):
            raise ValueError(f"with packed hidden [N, H], targets and mask must be [N]={n}; "
                             f"got {tuple(targets.shape)} and {tuple(mask.shape)}")
        if seq_ids is None:
            seq_ids = torch.zeros(n, dtype=torch.long, device=hidden.device)  # one sequence
        if seq_ids.shape != (n,):
            raise ValueError(f"seq_ids must be [N]={n}; got {tuple(seq_ids.shape)}")
        num_seqs = int(seq_ids.max()) + 1 if n else 0  # host sync: sequence count of a packed batch
        if advantages.shape == (n,):
            pass
        elif advantages.dim() == 1 and advantages.shape[0] == num_seqs:
            advantages = advantages[seq_ids]
        else:
            raise ValueError(f"advantages must be per token [N]={n} or per sequence [{num_seqs}]; "
                             f"got {tuple(advantages.shape)}")
    else:
        raise ValueError(f"hidden must be [N, H] or [B, T, H]; got {tuple(hidden.shape)}")
    for x in per_token:
        if x is not None and x.shape != targets.shape:
            raise ValueError(f"per-token inputs must match targets {tuple(targets.shape)}; got {tuple(x.shape)}")
    return hidden, targets, mask.bool(), advantages, per_token, seq_ids, num_seqs


def fused_linear_grpo_loss(hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None,
                           rollout_logp=None, *, eps_low=0.2, eps_high=0.2, beta=0.0, entropy_coef=0.0,
                           temperature=1.0, rollout_is_cap=None, loss_agg="token-mean", seq_ids=None,
                           max_len=None, is_weight=None, kl_times_ratio=False, impl="auto", process_group=None,
                           vocab_start=None, filter_eps=None):
    """Clipped GRPO loss straight from hidden states. Returns (loss: fp32 scalar, metrics: dict).

    Specification (runnable PyTorch on packed inputs; `kernels.reference.naive_grpo_loss`):

        logp, H = fused_linear_logprob_entropy(hidden, weight, targets, temperature)   # (N,) fp32
        old = old_logp if old_logp is not None else logp.detach()
        r = exp(logp - old)
        pg = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        w = min(exp(old - rollout_logp), rollout_is_cap).detach()    # if both given, else 1
        kl = exp(ref_logp - logp) - (ref_logp - logp) - 1            # k3, only when beta > 0
        kl = kl * r                                                   # if kl_times_ratio
        loss_t = w * pg + beta * kl - entropy_coef * H
        token-mean:               sum(loss_t * m) / sum(m)                       (DAPO)
        seq-mean-token-mean:      mean over sequences of sum(loss_t * m) / sum(m) (GRPO; S in the divisor)
        seq-mean-token-sum-norm:  sum(loss_t * m) / (S * max_len)                 (Dr. GRPO)

    Shapes: hidden [N, H] (packed; `seq_ids` [N] names each token's sequence 0..S-1) or [B, T, H] with
    targets/mask/old/ref/rollout [B, T]; advantages per token or per sequence ([B] / [S]); weight [V, H].
    `is_weight`: a precomputed per-token importance weight (e.g. TRL's vllm_is_ratio) used instead of w.
    `kl_times_ratio`: weight the KL term by the (differentiable) ratio r, DeepSeek-V3.2's unbiased
    reverse-KL gradient (TRL's and Liger's use_bias_correction_kl).
    `max_len` (Dr. GRPO): defaults to T for [B, T] input and is required for packed input.
    Only rows with mask=1 are computed. Gradients flow to hidden and weight.
    `process_group` / `vocab_start`: `weight` is this rank's vocabulary shard (tensor-parallel LM head);
    every other input is the same on all ranks, as are loss and metrics; see fused_linear_logprob_entropy.
    `filter_eps`: the backward's tile skipping (impl "triton"), with its error bound; see
    fused_linear_logprob_entropy.

    metrics (all detached): logp, entropy (per token, input layout, 0 where masked), entropy_mean,
    kl_mean (of the KL term as weighted in the loss), clip_low_frac, clip_high_frac, ratio_mean, is_weight_min/mean/max, num_tokens.
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}; got {loss_agg!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's per-token log-probs)")
    if rollout_is_cap is not None and rollout_logp is None:
        raise ValueError("rollout_is_cap needs rollout_logp (the rollout engine's per-token log-probs)")
    if is_weight is not None and rollout_is_cap is not None:
        raise ValueError("give either is_weight or rollout_logp + rollout_is_cap, not both")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0; got {eps_low}, {eps_high}")
    layout = mask.shape
    if loss_agg == "seq-mean-token-sum-norm" and max_len is None:
        if hidden.dim() != 3:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' with packed input needs max_len")
        max_len = hidden.shape[1]

    hidden, targets, mask, adv, (old_logp, ref_logp, rollout_logp, is_weight), seq_ids, num_seqs = _flatten(
        hidden, targets, mask, advantages, [old_logp, ref_logp, rollout_logp, is_weight], seq_ids)
    rows = mask.nonzero().squeeze(1)  # compute only valid rows (padding costs nothing)
    pick = lambda x: None if x is None else x.index_select(0, rows).float()  # noqa: E731
    logp, ent = fused_linear_logprob_entropy(hidden.index_select(0, rows), weight, targets.index_select(0, rows),
                                             temperature=temperature, impl=impl, process_group=process_group,
                                             vocab_start=vocab_start, filter_eps=filter_eps)
    adv, old, ref, rollout, isw = pick(adv), pick(old_logp), pick(ref_logp), pick(rollout_logp), pick(is_weight)
    seq = seq_ids.index_select(0, rows)

    old = logp.detach() if old is None else old
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if isw is None and rollout_is_cap is not None:
        isw = torch.clamp(torch.exp(old - rollout), max=rollout_is_cap)
    loss_t = pg if isw is None else pg * isw.detach()
    kl = None
    if beta > 0:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        if kl_times_ratio:
            kl = kl * ratio
        loss_t = loss_t + beta * kl
    if entropy_coef:
        loss_t = loss_t - entropy_coef * ent

    n_valid = loss_t.shape[0]
    if loss_agg == "token-mean":
        loss = loss_t.sum() / max(n_valid, 1)
    elif loss_agg == "seq-mean-token-mean":
        per_seq = torch.zeros(num_seqs, device=loss_t.device).index_add_(0, seq, loss_t)
        counts = torch.zeros(num_seqs, device=loss_t.device).index_add_(0, seq, torch.ones_like(loss_t))
        loss = (per_seq / counts.clamp(min=1)).sum() / max(num_seqs, 1)
    else:
        loss = loss_t.sum() / (max(num_seqs, 1) * max_len)

    with torch.no_grad():
        def scatter(x):  # per-token values back to the input layout, 0 where masked
            return torch.zeros(mask.shape[0], device=x.device).index_copy_(0, rows, x).reshape(layout)

        mean = lambda x: x.mean() if x.numel() else x.new_zeros(())  # noqa: E731
        metrics = {
            "logp": scatter(logp.detach()), "entropy": scatter(ent.detach()),
            "entropy_mean": mean(ent.detach()),
            "kl_mean": mean(kl.detach()) if kl is not None else ent.new_zeros(()),
            "clip_low_frac": mean(((ratio < 1 - eps_low) & (adv < 0)).float()),
            "clip_high_frac": mean(((ratio > 1 + eps_high) & (adv > 0)).float()),
            "ratio_mean": mean(ratio.detach()),
            "num_tokens": torch.tensor(n_valid),
        }
        w = isw if isw is not None else torch.ones_like(ratio)
        metrics.update(is_weight_min=w.min() if n_valid else w.new_ones(()), is_weight_mean=mean(w),
                       is_weight_max=w.max() if n_valid else w.new_ones(()))
    return loss, metrics


class FusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in for Liger-Kernel's `LigerFusedLinearGRPOLoss` (same constructor and forward arguments).

    Supported: beta, epsilon_low/high, temperature, loss_type in {"dapo", "bnpo", "grpo", "dr_grpo"}
    (mapped to token-mean / token-mean / seq-mean-token-mean / seq-mean-token-sum-norm),
    max_completion_length, ref_per_token_logps or (ref_input, ref_weight), old_per_token_logps,
    vllm_is_ratio ([B, T] or [B, 1]), num_items_in_batch (dapo normaliser), use_bias_correction_kl.
    Not supported (raises NotImplementedError): loss types cispo/sapo/luspo/vespo, sequence-level
    importance sampling, delta, a bias on the LM head.
    `compiled` and `chunk_size` are accepted and ignored (our kernel needs neither).
    Returns (loss, [kl_mean if beta != 0, clip_ratio]) like Liger.
    """

    _LOSS_TYPES = {"dapo": "token-mean", "bnpo": "token-mean", "grpo": "seq-mean-token-mean",
                   "dr_grpo": "seq-mean-token-sum-norm"}

    def __init__(self, beta=0.04, compiled=True, use_ref_model=True, chunk_size=1, epsilon_low=0.2,
                 epsilon_high=0.2, loss_type="dapo", max_completion_length=None, importance_sampling_level="token",
                 temperature=1.0, delta=None, use_bias_correction_kl=False, impl="auto", **unsupported):
        super().__init__()
        if loss_type not in self._LOSS_TYPES:
            raise NotImplementedError(f"loss_type={loss_type!r} is not supported; use one of {list(self._LOSS_TYPES)}")
        if importance_sampling_level != "token" or delta is not None:
            raise NotImplementedError("sequence-level importance sampling and delta are not supported")
        if unsupported:
            raise NotImplementedError(f"unsupported options: {sorted(unsupported)}")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        self.beta, self.use_ref_model, self.temperature, self.impl = beta, use_ref_model, temperature, impl
        self.eps_low, self.eps_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length = max_completion_length
        self.use_bias_correction_kl = use_bias_correction_kl

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None):
        if bias is not None or ref_bias is not None:
            raise NotImplementedError("an LM-head bias is not supported")
        b, t = selected_token_ids.shape
        hidden = _input.reshape(b, t, -1)
        beta = self.beta if self.use_ref_model else 0.0
        if beta and ref_per_token_logps is None:
            if ref_input is None or ref_weight is None:
                raise ValueError("beta != 0 needs ref_per_token_logps or ref_input and ref_weight")
            with torch.no_grad():
                ref_per_token_logps, _ = fused_linear_logprob_entropy(
                    ref_input.reshape(b * t, -1), ref_weight, selected_token_ids.reshape(-1),
                    temperature=self.temperature, impl=self.impl)
                ref_per_token_logps = ref_per_token_logps.reshape(b, t)
        if vllm_is_ratio is not None:
            vllm_is_ratio = vllm_is_ratio.expand(b, t)
        loss, m = fused_linear_grpo_loss(
            hidden, lin_weight, selected_token_ids, advantages, attention_mask,
            old_logp=old_per_token_logps, ref_logp=ref_per_token_logps if beta else None,
            eps_low=self.eps_low, eps_high=self.eps_high, beta=beta, temperature=self.temperature,
            loss_agg=self._LOSS_TYPES[self.loss_type], max_len=self.max_completion_length,
            is_weight=vllm_is_ratio, kl_times_ratio=self.use_bias_correction_kl, impl=self.impl)
        if self.loss_type == "dapo" and num_items_in_batch is not None:
            loss = loss * m["num_tokens"].to(loss.device) / num_items_in_batch
        clip_ratio = m["clip_low_frac"] + m["clip_high_frac"]
        return loss, ([m["kl_mean"]] if beta else []) + [clip_ratio]
