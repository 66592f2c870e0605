"""TRL's GRPOTrainer on fctrain's kernels, with one call (tested with TRL 1.16):

    trainer = use_fctrain_kernels(GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...)))
    trainer.train()

Two things then run through `kernels` instead of TRL's own chunked LM head:
1. the loss: `_compute_loss` becomes one `fused_linear_grpo_loss` call from the policy's hidden states and
   `lm_head.weight` (clipped ratio with epsilon / epsilon_high, k3 KL to the reference times beta, weighted
   by the ratio under use_bias_correction_kl, TRL's vLLM importance-sampling ratio, the entropy bonus),
   followed by TRL's normalisation of its loss type:

       grpo      mean over sequences of (sum_t loss_t m_t / sum_t m_t)   / accumulation  (seq-mean-token-mean)
       bnpo      sum loss_t m_t / sum m_t                                / accumulation  (token-mean)
       dr_grpo   sum loss_t m_t / (B * max_completion_length)            / accumulation  (seq-mean-token-sum-norm)
       luspo     sum loss_t m_t / B                                      / accumulation  (the same, max_len 1)
       dapo      sum loss_t m_t / (num_items_in_batch / processes * accumulation / steps_per_generation)

   (accumulation = gradient accumulation steps in training, 1 in evaluation; TRL's grpo_trainer.py);
2. the per-token log-prob / entropy pass for the old and reference policies (`_get_per_token_logps_and_
   entropies`, which calls `model(..., labels=labels, fused_lm_head=True)`): the policy's and the
   reference model's fused-head forward is replaced by `fused_linear_logprob_entropy` on the scored rows.

No [tokens x vocab] logits exist on a GPU (Triton); elsewhere the kernels' chunked PyTorch path runs.
A GRPOConfig option these kernels cannot honour raises NotImplementedError naming it, here and at every
loss call (see `unsupported_options`). TRL is imported only when `use_fctrain_kernels` is called.
"""
from __future__ import annotations

import functools
import types
import warnings

import torch

from .grpo_loss import fused_linear_grpo_loss
from .logprob_entropy import fused_linear_logprob_entropy
from .objective import GRPOLossConfig, grpo_token_loss

# TRL loss type -> (our aggregation, max_len): the per-token loss is the same clipped GRPO term for all five
AGGREGATION = {"grpo": ("seq-mean-token-mean", None), "bnpo": ("token-mean", None), "dapo": ("token-mean", None),
               "dr_grpo": ("seq-mean-token-sum-norm", "max_completion_length"),
               "luspo": ("seq-mean-token-sum-norm", 1)}
# Model configs that post-process the logits (TRL's fused head reads the same attributes); ours does not
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                        "logits_scaling")
VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "image_position_ids")


def unsupported_options(trainer) -> list[str]:
    """The trainer's settings that fctrain's kernels cannot reproduce exactly, as 'option=value: why'."""
    args, bad = trainer.args, []
    if trainer.loss_type not in AGGREGATION:
        bad.append(f"loss_type={trainer.loss_type!r}: supported are {sorted(AGGREGATION)}")
    if trainer.importance_sampling_level != "token":
        bad.append(f"importance_sampling_level={trainer.importance_sampling_level!r}: only 'token'")
    if args.delta is not None:
        bad.append(f"delta={args.delta}: the two-sided ratio clip is not implemented")
    if trainer.top_entropy_quantile < 1.0:
        bad.append(f"top_entropy_quantile={trainer.top_entropy_quantile}: no high-entropy token mask")
    if trainer.off_policy_mask_threshold is not None:
        bad.append(f"off_policy_mask_threshold={trainer.off_policy_mask_threshold}: no off-policy sequence mask")
    if trainer.use_adaptive_entropy:
        bad.append("use_adaptive_entropy=True: only a constant entropy_coef")
    if trainer.entropy_coef != 0 and trainer.loss_type == "grpo":
        bad.append(f"entropy_coef={trainer.entropy_coef} with loss_type='grpo': TRL's bonus is a token mean, "
                   "the grpo loss a mean of sequence means; one fused loss cannot hold both")
    if trainer.beta < 0:
        bad.append(f"beta={trainer.beta}: the KL term is added only for beta > 0")
    if trainer.aux_loss_enabled:
        bad.append(f"router_aux_loss_coef={trainer.router_aux_loss_coef}: no MoE load-balancing loss")
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        bad.append("FSDP / DeepSpeed: the sharded LM-head weight is not gathered")
    from accelerate.utils import is_peft_model

    if is_peft_model(trainer.model):
        bad.append("a PEFT model: not verified with these kernels")
    for model in _models(trainer):
        config = model.config.get_text_config()
        for attr in LOGIT_POSTPROCESSING:
            if getattr(config, attr, None) not in (None, 1, 1.0):
                bad.append(f"model config {attr}={getattr(config, attr)}: logits are post-processed")
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            bad.append("an LM head with a bias")
    return list(dict.fromkeys(bad))


def _models(trainer):
    """The policy and (when beta != 0) the reference model, unwrapped from the accelerator."""
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    return [trainer.accelerator.unwrap_model(m) for m in models]


def _check(trainer):
    bad = unsupported_options(trainer)
    if bad:
        raise NotImplementedError("fctrain's kernels cannot honour these GRPOTrainer settings:\n  " + "\n  ".join(bad))


def use_fctrain_kernels(trainer, impl: str = "auto"):
    """Route a TRL `GRPOTrainer`'s loss and its old / reference log-prob passes through fctrain's kernels.

    Call it after constructing the trainer and before `train()`; returns the trainer. `impl` is passed to
    the kernels ("auto": Triton on CUDA, chunked PyTorch elsewhere). Raises NotImplementedError naming
    every GRPOConfig setting the kernels cannot honour (`unsupported_options`).
    """
    import trl
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"use_fctrain_kernels needs a trl.GRPOTrainer; got {type(trainer).__name__}")
    if not trl.__version__.startswith("1.16."):
        warnings.warn(f"kernels.trl was tested with TRL 1.16; this is {trl.__version__}", stacklevel=2)
    _check(trainer)
    fp32_head = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    for model in _models(trainer):
        _add_fused_head(model, trainer.temperature, fp32_head, impl)
    trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer


def _add_fused_head(model, temperature, fp32_head, impl):
    """Wrap `model.forward` (TRL's fused-head forward): `fused_lm_head=True` calls go to our kernels,
    every other call (generation) to the forward it replaces."""
    if getattr(model, "_fctrain_fused_head", False):
        return
    previous = model.forward
    from trl.trainer.utils import FusedCausalLMOutput

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, grpo_loss=None, **kwargs):
        if not fused_lm_head:
            return previous(*args, **kwargs) if labels is None else previous(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # (B, T, H): position t predicts token t+1
        weight = self.get_output_embeddings().weight
        device = hidden.device.type
        # the LM head in the dtype TRL's head would use: autocast's, unless cast_lm_head_to_fp32
        dtype = torch.float32 if fp32_head else (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype)
        with torch.autocast(device, enabled=False):
            if grpo_loss is not None:  # the policy loss over the last K positions (the completion)
                k = grpo_loss["mask"].shape[1]
                loss, metrics = fused_linear_grpo_loss(hidden[:, -k - 1:-1].to(dtype), weight.to(dtype),
                                                       temperature=temperature, impl=impl, **grpo_loss)
                return FusedCausalLMOutput(loss=loss, log_probs=metrics["logp"], entropy=metrics["entropy"])
            targets = labels[:, 1:]  # (B, T-1), -100 = not scored
            scored = targets != -100
            logp, entropy = fused_linear_logprob_entropy(hidden[:, :-1][scored].to(dtype), weight.to(dtype),
                                                         targets[scored], temperature=temperature, impl=impl)
        # masked_scatter keeps an all-masked batch connected to the graph (as TRL's head does)
        logp, entropy = (x.new_zeros(scored.shape).masked_scatter(scored, x) for x in (logp, entropy))
        return FusedCausalLMOutput(log_probs=logp, entropy=entropy, label_mask=scored)

    model.forward = types.MethodType(forward, model)
    model._fctrain_fused_head = True


def _compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss (TRL 1.16) with the loss computed by `fused_linear_grpo_loss`."""
    _check(self)
    vision = [k for k in VISION_INPUTS if inputs.get(k) is not None]
    if vision:
        raise NotImplementedError(f"vision-language inputs ({', '.join(vision)}) are not supported")
    from trl.trainer.utils import nanmax, nanmin

    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    b, k = completion_ids.shape
    advantages = inputs["advantages"]  # (B,) or (B, K)
    old = inputs.get("old_per_token_logps")
    ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
    is_weight = None
    if self.use_vllm and self.vllm_importance_sampling_correction:
        is_weight = inputs["importance_sampling_ratio"].expand(b, k)  # (B, K) or per sequence (B, 1)

    agg, max_len = AGGREGATION[self.loss_type]
    max_len = self.max_completion_length if max_len == "max_completion_length" else max_len
    n_tokens = mask.sum().clamp(min=1)
    if self.loss_type == "dapo":  # token-mean -> sum / TRL's normaliser
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        scale = n_tokens / normalizer
    else:
        scale = 1.0 / accumulation
    entropy_coef = 0.0
    if self._entropy_bonus_enabled:
        # TRL's bonus is -coef * (masked mean entropy) / accumulation whatever the loss type; inside our loss
        # each token's term is weighted w = scale / n (token-mean) or scale / (B * max_len), hence coef':
        w = scale / (n_tokens if agg == "token-mean" else b * max_len)
        entropy_coef = float(self.entropy_coef / (n_tokens * accumulation * w))  # host sync

    config = GRPOLossConfig(eps_low=self.epsilon_low, eps_high=self.epsilon_high, beta=self.beta,
                            kl_times_ratio=self.args.use_bias_correction_kl, entropy_coef=entropy_coef,
                            loss_agg=agg, max_len=max_len)
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    extra = {key: inputs[key] for key in ("token_type_ids", "mm_token_type_ids") if inputs.get(key) is not None}
    with self.accelerator.autocast():
        out = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True, **extra,
                    grpo_loss=dict(targets=completion_ids, advantages=advantages, mask=mask, old_logp=old,
                                   ref_logp=ref, is_weight=is_weight, config=config))
    loss = out.loss * scale

    # ---- TRL's metrics, from the per-token log-probs and entropies the loss computed (detached)
    valid = mask.bool()
    per_token_logps = out.log_probs
    old = per_token_logps if old is None else old

    def global_masked_mean(x):
        x = torch.where(valid, x, 0.0)
        totals = self.accelerator.reduce(torch.stack([x.sum(), mask.sum().float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def masked_seq_mean(x):
        return torch.where(valid, x, 0.0).sum(-1) / mask.sum(-1)

    if self._entropy_bonus_enabled:
        bonus = self.entropy_coef * out.entropy.sum() / n_tokens / accumulation  # what TRL subtracted (0 off mask)
        policy_loss = (loss.detach() + bonus) * (1.0 if self.loss_type == "dapo" else accumulation)
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    masked = lambda x: None if x is None else torch.where(valid, x, 0.0)  # noqa: E731
    _, ratio, kl = grpo_token_loss(masked(per_token_logps), out.entropy, adv, masked(old), masked(ref), config=config)
    if kl is not None:  # the KL term as weighted in the loss (times the ratio under use_bias_correction_kl)
        self._metrics[mode]["kl"].append(global_masked_mean(kl))
    self._metrics[mode]["entropy"].append(global_masked_mean(out.entropy))
    is_low_clipped = (ratio < 1 - self.epsilon_low) & (adv < 0)
    is_high_clipped = (ratio > 1 + self.epsilon_high) & (adv > 0)
    self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(is_low_clipped.float()))
    self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(is_high_clipped.float()))
    self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean((is_low_clipped | is_high_clipped).float()))
    self._metrics[mode]["clip_ratio/low_min"].append(
        nanmin(self.accelerator.gather(masked_seq_mean(is_low_clipped.float()))).item())
    self._metrics[mode]["clip_ratio/high_max"].append(
        nanmax(self.accelerator.gather(masked_seq_mean(is_high_clipped.float()))).item())
    return loss
