"""fctrain kernels: fused LM-head + log-prob + entropy + GRPO loss, never materialising [N, V] logits.

Importable on its own (nothing from `fctrain` inside). Triton on CUDA; chunked PyTorch elsewhere.
"""
from .grpo_loss import LOSS_AGGREGATIONS, FusedLinearGRPOLoss, fused_linear_grpo_loss
from .hf import hf_logprob_entropy
from .logprob_entropy import fused_linear_logprob_entropy
from .reference import chunked_logprob_entropy, naive_grpo_loss, naive_logprob_entropy

__all__ = [
    "fused_linear_logprob_entropy", "fused_linear_grpo_loss", "FusedLinearGRPOLoss", "hf_logprob_entropy",
    "LOSS_AGGREGATIONS", "naive_logprob_entropy", "chunked_logprob_entropy", "naive_grpo_loss",
]
