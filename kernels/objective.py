"""GRPO / EGPO objectives as plain PyTorch functions of per-token values.

The second layer of `fused_linear_grpo_loss`: the fused op gives per-token log-probs and entropies
(`kernels.fused_linear_logprob_entropy`), these functions turn them into the clipped policy loss. They
know nothing about hidden states or kernels, so a trainer that computes log-probs its own way (an HF
forward, vLLM, another fused head) can use them as they are. O(N) element-wise work, left to autograd.

    config = GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.001, loss_agg="token-mean")
    loss, metrics = grpo_objective(logp, entropy, advantages, mask, old_logp, ref_logp, config=config)

is `grpo_token_loss` on the valid tokens, reduced by `AGGREGATIONS[config.loss_agg]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# Aggregations of the valid tokens' losses loss_t (n,), each token's sequence seq (n,) in [0, num_seqs).
# A new normalisation is a new function here, not a new branch.

def token_mean(loss_t, seq, num_seqs, max_len):
    """sum_t loss_t / n (DAPO; TRL's bnpo): every token weighs the same."""
    return loss_t.sum() / max(loss_t.shape[0], 1)


def seq_mean_token_mean(loss_t, seq, num_seqs, max_len):
    """mean over sequences of each one's token mean (GRPO); all num_seqs sequences count in the divisor."""
    per_seq = loss_t.new_zeros(num_seqs).index_add_(0, seq, loss_t)
    counts = loss_t.new_zeros(num_seqs).index_add_(0, seq, torch.ones_like(loss_t))
    return (per_seq / counts.clamp(min=1)).sum() / max(num_seqs, 1)


def seq_mean_token_sum_norm(loss_t, seq, num_seqs, max_len):
    """sum_t loss_t / (num_seqs * max_len) (Dr. GRPO): no length bias."""
    return loss_t.sum() / (max(num_seqs, 1) * max_len)


AGGREGATIONS = {"token-mean": token_mean, "seq-mean-token-mean": seq_mean_token_mean,
                "seq-mean-token-sum-norm": seq_mean_token_sum_norm}


@dataclass(frozen=True)
class GRPOLossConfig:
    """The loss options of `grpo_objective` and `fused_linear_grpo_loss` (defaults: GRPO, no KL, DAPO mean)."""
    eps_low: float = 0.2                # ratio clip: r in [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2
    beta: float = 0.0                   # k3 KL weight to the reference policy (> 0 needs ref_logp)
    kl_times_ratio: bool = False        # weight the KL term by r: DeepSeek-V3.2's unbiased reverse-KL gradient
                                        # (TRL's and Liger's use_bias_correction_kl)
    entropy_coef: float = 0.0           # entropy bonus: - entropy_coef * H per token
    rollout_is_cap: float | None = None  # truncated importance weight min(exp(old - rollout), cap) for the
                                        # engine/trainer mismatch (needs rollout_logp); None = off
    loss_agg: str = "token-mean"        # one of AGGREGATIONS
    max_len: int | None = None          # Dr. GRPO's divisor (seq-mean-token-sum-norm); None = T of a [B, T] batch

    def __post_init__(self):
        if self.loss_agg not in AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {tuple(AGGREGATIONS)}; got {self.loss_agg!r}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0; got {self.eps_low}, {self.eps_high}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0; got {self.beta}")
        if self.rollout_is_cap is not None and not self.rollout_is_cap > 0:
            raise ValueError(f"rollout_is_cap must be > 0 or None; got {self.rollout_is_cap}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None; got {self.max_len}")


def grpo_token_loss(logp, entropy, advantages, old_logp=None, ref_logp=None, is_weight=None,
                    config: GRPOLossConfig = GRPOLossConfig()):
    """Per-token clipped GRPO loss, element-wise on tensors of one shape. Returns (loss_t, ratio, kl or None).

    old_logp None means logp.detach() (one update per batch: the ratio is 1, its gradient A * dlogp).
    `is_weight` multiplies the policy term as a constant; kl is the KL term as weighted in the loss.
    """
    c = config
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - c.eps_low, 1 + c.eps_high) * advantages)
    if is_weight is not None:
        loss = loss * is_weight.detach()
    kl = None
    if c.beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3 estimator of KL(policy || reference), >= 0
        if c.kl_times_ratio:
            kl = kl * ratio
        loss = loss + c.beta * kl
    if c.entropy_coef:
        loss = loss - c.entropy_coef * entropy
    return loss, ratio, kl


def _sequences(mask, advantages, seq_ids):
    """Each token's sequence id (flat), the sequence count and per-token advantages (flat), for either layout."""
    if mask.dim() == 2:  # padded [B, T]: row b is sequence b
        b, t = mask.shape
        if seq_ids is not None:
            raise ValueError("seq_ids is for packed [N] input; the [B, T] layout already defines sequences")
        seq_ids, num_seqs = torch.arange(b, device=mask.device).repeat_interleave(t), b
        if advantages.shape not in ((b,), (b, t)):
            raise ValueError(f"advantages must be [B]={b} or [B, T]={b, t}; got {tuple(advantages.shape)}")
    elif mask.dim() == 1:  # packed [N]
        n = mask.shape[0]
        if seq_ids is None:
            seq_ids = torch.zeros(n, dtype=torch.long, device=mask.device)  # one sequence
        if seq_ids.shape != (n,):
            raise ValueError(f"seq_ids must be [N]={n}; got {tuple(seq_ids.shape)}")
        num_seqs = int(seq_ids.max()) + 1 if n else 0  # host sync: sequence count of a packed batch
        if advantages.shape != (n,) and advantages.shape != (num_seqs,):
            raise ValueError(f"advantages must be per token [N]={n} or per sequence [{num_seqs}]; "
                             f"got {tuple(advantages.shape)}")
    else:
        raise ValueError(f"mask must be [B, T] or packed [N]; got {tuple(mask.shape)}")
    per_token = advantages.shape == mask.shape
    return seq_ids, num_seqs, advantages.reshape(-1) if per_token else advantages[seq_ids]


def grpo_objective(logp, entropy, advantages, mask, old_logp=None, ref_logp=None, rollout_logp=None,
                   is_weight=None, seq_ids=None, *, config: GRPOLossConfig = GRPOLossConfig()):
    """The GRPO/EGPO loss of per-token log-probs and entropies. Returns (loss: scalar, metrics: dict).

    Layouts: padded, logp / entropy / mask / old / ref / rollout / is_weight [B, T] and advantages [B] or
    [B, T] (row b is sequence b); or packed, all [N] with `seq_ids` [N] naming each token's sequence
    0..S-1 (None: one sequence) and advantages [N] or [S]. Only tokens with mask=1 are used (the others
    may hold anything, even inf). The loss is `AGGREGATIONS[config.loss_agg]` of `grpo_token_loss` over
    those tokens, with is_weight, if not given, = min(exp(old - rollout_logp), rollout_is_cap) when
    config.rollout_is_cap is set. Gradients flow to logp and entropy only. Computed in logp's dtype,
    at least fp32.

    metrics (detached): logp, entropy (input layout, 0 where masked), entropy_mean, kl_mean (of the KL
    term as weighted in the loss), clip_low_frac, clip_high_frac, ratio_mean, is_weight_min/mean/max,
    num_tokens.
    """
    c = config
    if c.beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's per-token log-probs)")
    if c.rollout_is_cap is not None and rollout_logp is None:
        raise ValueError("rollout_is_cap needs rollout_logp (the rollout engine's per-token log-probs)")
    if is_weight is not None and c.rollout_is_cap is not None:
        raise ValueError("give either is_weight or rollout_logp + rollout_is_cap, not both")
    for x in (logp, entropy, old_logp, ref_logp, rollout_logp, is_weight):
        if x is not None and x.shape != mask.shape:
            raise ValueError(f"per-token inputs must match mask {tuple(mask.shape)}; got {tuple(x.shape)}")
    max_len = c.max_len if c.max_len is not None or mask.dim() == 1 else mask.shape[1]
    if c.loss_agg == "seq-mean-token-sum-norm" and max_len is None:
        raise ValueError("loss_agg='seq-mean-token-sum-norm' with packed input needs config.max_len")
    seq_ids, num_seqs, adv = _sequences(mask, advantages, seq_ids)

    dtype = torch.promote_types(logp.dtype, torch.float32)
    rows = mask.reshape(-1).nonzero().squeeze(1)  # the valid tokens
    pick = lambda x: None if x is None else x.reshape(-1).index_select(0, rows).to(dtype)  # noqa: E731
    lp, ent, adv, old, ref, rollout, isw = map(pick, (logp, entropy, adv, old_logp, ref_logp, rollout_logp,
                                                       is_weight))
    if c.rollout_is_cap is not None:
        isw = torch.clamp(torch.exp((lp.detach() if old is None else old) - rollout), max=c.rollout_is_cap)
    loss_t, ratio, kl = grpo_token_loss(lp, ent, adv, old, ref, isw, c)
    loss = AGGREGATIONS[c.loss_agg](loss_t, seq_ids.index_select(0, rows), num_seqs, max_len)

    with torch.no_grad():
        n = loss_t.shape[0]
        mean = lambda x: x.mean() if n else x.new_zeros(())  # noqa: E731
        w = isw if isw is not None else torch.ones_like(ratio)
        metrics = {
            "logp": torch.where(mask.bool(), logp.detach(), 0).to(dtype),
            "entropy": torch.where(mask.bool(), entropy.detach(), 0).to(dtype),
            "entropy_mean": mean(ent.detach()),
            "kl_mean": mean(kl.detach()) if kl is not None else ent.new_zeros(()),
            "clip_low_frac": mean(((ratio < 1 - c.eps_low) & (adv < 0)).to(dtype)),
            "clip_high_frac": mean(((ratio > 1 + c.eps_high) & (adv > 0)).to(dtype)),
            "ratio_mean": mean(ratio.detach()),
            "is_weight_min": w.min() if n else w.new_ones(()), "is_weight_mean": mean(w),
            "is_weight_max": w.max() if n else w.new_ones(()),
            "num_tokens": torch.tensor(n),
        }
    return loss, metrics
