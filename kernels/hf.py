"""Per-token log-prob + entropy for a Hugging Face causal LM, without ever calling its LM head.

Duck-typed (no transformers import): any model with `get_decoder()` returning the base model and
`get_output_embeddings()` returning a bias-free linear LM head (tied embeddings included) works.
"""
from __future__ import annotations

from .logprob_entropy import fused_linear_logprob_entropy


def hf_logprob_entropy(model, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None,
                       temperature=1.0, impl="auto", **model_kwargs):
    """(logp, entropy), each fp32 [B, K]: for the last K tokens of `input_ids` (K = logits_to_keep, the
    completion length, as in TRL's `_get_per_token_logps`; all T-1 next tokens when None), the log-prob
    of that token and the entropy of the distribution that predicted it, from the base model's hidden
    states and `lm_head.weight` through `fused_linear_logprob_entropy`.
    """
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"models with {attr}={getattr(config, attr)} post-process their logits; "
                                      "the fused LM head does not reproduce that")
    lm_head = model.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise NotImplementedError("an LM head with a bias is not supported")
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
    b, t = input_ids.shape
    k = t - 1 if logits_to_keep is None else int(logits_to_keep)
    if not 0 < k < t:
        raise ValueError(f"logits_to_keep must be in [1, T-1]={t - 1}; got {k}")
    h = hidden[:, t - k - 1: t - 1].reshape(b * k, -1)  # position i predicts token i + 1
    targets = input_ids[:, t - k:].reshape(-1)
    logp, ent = fused_linear_logprob_entropy(h, lm_head.weight, targets, temperature=temperature, impl=impl)
    return logp.view(b, k), ent.view(b, k)
