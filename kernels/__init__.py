"""fctrain kernels: fused LM-head + log-prob + entropy + GRPO loss, never materialising [N, V] logits.

Importable on its own (nothing from `fctrain` inside). Triton on CUDA; chunked PyTorch elsewhere.
"""
from .logprob_entropy import fused_linear_logprob_entropy
from .reference import chunked_logprob_entropy, naive_logprob_entropy

__all__ = ["fused_linear_logprob_entropy", "naive_logprob_entropy", "chunked_logprob_entropy"]
