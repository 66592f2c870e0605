"""Fused linear GRPO/EGPO loss: hidden states + LM-head weight -> clipped policy loss, KL, entropy bonus.

Two layers: the O(N * V * H) part (logits, log-softmax, entropy and their gradients) runs in the
vocabulary-tiled kernel of `kernels.logprob_entropy`; what remains is `kernels.objective.grpo_objective`,
O(N) element-wise PyTorch on per-token vectors, left to autograd. Its per-token gradients d loss / d logp
and d loss / d entropy arrive in the tiled backward as the two upstream vectors, which is where they are
folded into dlogits on chip: no [N, V] tensor exists, forward or backward.

FLOPs: 8 * N * H * V with impl="triton" (2 forward, 6 backward: recompute the logit tile, dX, dW). A
6-FLOP design forms dlogits while the tile is still on chip in the forward pass; that needs the upstream
gradient at that moment, but d loss / d logp depends on the row's log-sum-exp, known only after the whole
vocabulary sweep (the clipped ratio exp(logp - old) needs the final logp). Keeping the row on chip instead
is impossible at V = 152k, so the tile is recomputed in the backward.
"""
from __future__ import annotations

import torch

from .logprob_entropy import fused_linear_logprob_entropy
from .objective import AGGREGATIONS, GRPOLossConfig, grpo_objective

LOSS_AGGREGATIONS = tuple(AGGREGATIONS)


def fused_linear_grpo_loss(hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None,
                           rollout_logp=None, is_weight=None, seq_ids=None, *,
                           config: GRPOLossConfig = GRPOLossConfig(), temperature=1.0, impl="auto",
                           process_group=None, vocab_start=None, filter_eps=None, backward="auto"):
    """Clipped GRPO/EGPO loss straight from hidden states. Returns (loss: scalar, metrics: dict).

    Specification: the loss, metrics and gradients of this runnable PyTorch, which forms the [..., V]
    logits that the implementation never does (`kernels.reference.naive_grpo_loss` is this code; a test
    runs it against this function):

        z = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
        logp = z.log_softmax(-1).gather(-1, targets.where(mask.bool(), 0)[..., None]).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        return grpo_objective(logp, entropy, advantages, mask, old_logp, ref_logp, rollout_logp, is_weight,
                              seq_ids, config=config)

    Shapes: hidden [B, T, H] with targets / mask / old / ref / rollout / is_weight [B, T] and advantages
    [B] or [B, T]; or packed, hidden [N, H], the per-token inputs [N], `seq_ids` [N] naming each token's
    sequence 0..S-1 and advantages [N] or [S]. weight [V, H] in hidden's dtype; targets in [0, V) where
    mask is 1. The loss options are `config` (see `kernels.objective`, which also defines the metrics).
    Only rows with mask=1 reach the fused op (padding costs nothing); gradients flow to hidden and weight.
    `temperature`, `impl`, `process_group` / `vocab_start` (`weight` is this rank's vocabulary shard of a
    tensor-parallel LM head; every other input, the loss and the metrics are the same on all ranks) and
    `filter_eps` (the Triton backward's tile skipping, with its error bound) and `backward` ("chunked" /
    "atomic" / "auto", the Triton backward's scheme) go to
    `fused_linear_logprob_entropy`.
    """
    if hidden.shape[:-1] != mask.shape or targets.shape != mask.shape or mask.dim() not in (1, 2):
        raise ValueError(f"hidden must be [B, T, H] or [N, H] with targets and mask [B, T] or [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(targets.shape)} and {tuple(mask.shape)}")
    n = mask.numel()
    rows = mask.reshape(-1).nonzero().squeeze(1)  # compute only valid rows
    logp, entropy = fused_linear_logprob_entropy(
        hidden.reshape(n, -1).index_select(0, rows), weight, targets.reshape(-1).index_select(0, rows),
        temperature=temperature, impl=impl, process_group=process_group, vocab_start=vocab_start,
        filter_eps=filter_eps, backward=backward)
    # back to the input layout (0 where masked) for the objective: O(N), differentiable
    logp, entropy = (x.new_zeros(n).index_copy(0, rows, x).reshape(mask.shape) for x in (logp, entropy))
    return grpo_objective(logp, entropy, advantages, mask, old_logp, ref_logp, rollout_logp, is_weight, seq_ids,
                          config=config)


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
        self.loss_type = loss_type
        self.config = GRPOLossConfig(eps_low=epsilon_low, eps_high=epsilon_high, beta=beta if use_ref_model else 0.0,
                                     kl_times_ratio=use_bias_correction_kl, loss_agg=self._LOSS_TYPES[loss_type],
                                     max_len=max_completion_length)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None):
        if bias is not None or ref_bias is not None:
            raise NotImplementedError("an LM-head bias is not supported")
        b, t = selected_token_ids.shape
        hidden = _input.reshape(b, t, -1)
        beta = self.config.beta
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
            hidden, lin_weight, selected_token_ids, advantages, attention_mask, old_logp=old_per_token_logps,
            ref_logp=ref_per_token_logps if beta else None, is_weight=vllm_is_ratio, config=self.config,
            temperature=self.temperature, impl=self.impl)
        if self.loss_type == "dapo" and num_items_in_batch is not None:
            loss = loss * m["num_tokens"].to(loss.device) / num_items_in_batch
        clip_ratio = m["clip_low_frac"] + m["clip_high_frac"]
        return loss, ([m["kl_mean"]] if beta else []) + [clip_ratio]
