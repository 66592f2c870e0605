"""verl's fused-kernel path on fctrain's kernels (tested with verl 0.9.1 on CPU).

With `actor_rollout_ref.model.use_fused_kernels=True` and `fused_kernels_backend="triton"`, verl replaces
the model's forward with `verl.models.transformers.dense_common.forward_with_triton_backend` (and its
Qwen-VL / GLM-4V variants), which looks up and calls, at every forward,

    verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature, "none")
        -> (log_probs, entropy)

`linear_cross_entropy` below has that signature and contract; `use_fctrain_kernels()` puts it in verl's
module for the calling process (verl's Ray workers are processes of their own: call it in each, e.g. from
a module named in VERL_USE_EXTERNAL_MODULES, which every process imports with verl). verl is not imported
by this module, only by `use_fctrain_kernels`.
"""
from __future__ import annotations

import torch

from .logprob_entropy import fused_linear_logprob_entropy


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None):
    """verl's `linear_cross_entropy` contract on `fused_linear_logprob_entropy`:

        hidden [..., H], weight [V, H] (same dtype), labels [...] (int, all in [0, V))
        logp, entropy = fused_linear_logprob_entropy(hidden.reshape(-1, H), weight, labels.reshape(-1), temperature)
        returns (logp [N] fp32 (reduction "none"), or logp.sum() / logp.mean() ("sum" / "mean"), entropy [N] fp32)

    flattened like verl's Triton kernel. Gradients flow to hidden and weight through both outputs.
    A vocabulary-parallel `dist_process_group` raises: verl's convention for the hidden-state gradient
    across the group is untested here.
    """
    if dist_process_group is not None:
        raise NotImplementedError("dist_process_group (vocabulary-parallel LM head) is not supported by the fctrain "
                                  "adapter for verl")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean'; got {reduction!r}")
    logp, entropy = fused_linear_logprob_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                                 temperature=float(temperature))
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


def use_fctrain_kernels():
    """Make verl's fused-kernel ("triton" backend) forward call fctrain's kernels in this process."""
    import verl.utils.kernel.linear_cross_entropy as verl_lce

    verl_lce.linear_cross_entropy = linear_cross_entropy
