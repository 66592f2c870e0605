"""fctrain kernels: fused LM-head + log-prob + entropy + GRPO loss, never materialising [N, V] logits.

Two layers: the fused op `fused_linear_logprob_entropy` (hidden, weight, targets) -> (logp, entropy), and
the plain-PyTorch objectives of per-token values in `kernels.objective` (GRPOLossConfig, grpo_objective);
`fused_linear_grpo_loss` is the one call that chains them.
Importable on its own (nothing from `fctrain` inside). Triton on CUDA; chunked PyTorch elsewhere.
"""
from .grpo_loss import LOSS_AGGREGATIONS, FusedLinearGRPOLoss, fused_linear_grpo_loss
from .hf import hf_logprob_entropy
from .logprob_entropy import fused_linear_logprob_entropy
from .objective import GRPOLossConfig, grpo_objective, grpo_token_loss
from .reference import chunked_logprob_entropy, naive_grpo_loss, naive_logprob_entropy

__all__ = [
    "fused_linear_logprob_entropy", "fused_linear_grpo_loss", "FusedLinearGRPOLoss", "hf_logprob_entropy",
    "GRPOLossConfig", "grpo_objective", "grpo_token_loss", "LOSS_AGGREGATIONS", "naive_logprob_entropy",
    "chunked_logprob_entropy", "naive_grpo_loss",
]
