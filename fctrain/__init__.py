"""fctrain: EGPO/GRPO training for function calling on top of the fused kernels in `kernels`."""

__version__ = "0.1.0"
