"""EGPO/GRPO training for function calling: one file, read top to bottom.

    python -m fctrain.run                                   # SmolLM2-135M-Instruct on BFCL, this CPU
    python -m fctrain.run --preset paper-7b --model Qwen/Qwen2.5-Coder-7B-Instruct   # the paper, GPU
    python -m fctrain.run --steps 50 --lr 2e-6 --config my.toml --out_dir runs/mine
    python -m fctrain.run --resume runs/mine --steps 80   # the saved config; only steps, eval_every, ... may change
    torchrun --standalone --nproc-per-node 8 -m fctrain.run --preset paper-7b   # FSDP2 data parallel, 8 GPUs

Algorithm (arXiv 2508.05118, FunRL/EGPO), per step:
 1. Rollout: sample `prompts_per_step` prompts; the engine (vLLM, or transformers) samples `group_size`
    completions each at `temperature`, returning each sampled token's log-prob.
 2. Reward r_i (fctrain.reward): `binary` = 1 iff the format is right and every call is correct (the
    paper); `partial` / `format` give a small model denser signal.
 3. Advantage A_i = (r_i - mean(r)) / std(r) within the group; groups with zero variance are counted
    and left out of the loss. EGPO: A_i' = A_i + lambda * clip(H_i, -|A_i|/alpha, |A_i|/alpha), H_i the
    mean (detached) entropy of completion i's <think> tokens, from step 4's first forward pass.
    `algo=grpo` keeps A_i (and logs H_i, the measure EGPO adds).
 4. Loss and update: the two layers of kernels.fused_linear_grpo_loss, fused_linear_logprob_entropy then
    grpo_objective (clipped ratio, k3 KL to a frozen reference when beta > 0, truncated importance weight
    for the engine/trainer mismatch), micro-batched by a token budget, never materialising [tokens x vocab]
    logits; one LM-head pass per micro-batch gives the old log-probs, the EGPO entropy and the loss. AdamW,
    gradient clipping, warm-up + cosine LR.
 5. Sync: push the new weights into the engine (no files).
 6. Log, evaluate (every `eval_every` steps), checkpoint (every `save_every` steps).
main() runs these as one call each, in its RL loop; the sections below follow the same numbers.
Under torchrun (docs/distributed.md) every rank runs this loop on its share of the prompts with its own
vLLM engine; the policy is sharded by FSDP2 and the loss normalised by all-reduced counts, so K ranks make
the update one process makes on the whole batch. Without torchrun nothing of that runs.
An optional SFT warm start (`sft_steps`) teaches the output format first: SmolLM2-135M answers BFCL in
prose (0% with BFCL's own prompt), so without it a binary reward is all zero and GRPO gets no signal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kernels
from fctrain import data as fdata
from fctrain import dist as fdist
from fctrain import models
from fctrain import packing
from fctrain import prompts
from fctrain import reward as freward
from fctrain import rollout
from fctrain.checkpoint import (fault_point, latest_checkpoint, load_optimizer_state, load_trainer_state,
                                save_checkpoint, save_policy, set_rng_state)
from fctrain.config import ADAMW_BETAS, Config, parse_config
from fctrain.data import TrainData
from fctrain.eval import generate_records, paired_change, summarize, wilson_interval
from fctrain.metrics import MetricsLog, peak_memory_mb


# ------------------------------------------------------------------------------------------------ setup

@dataclass
class Trainer:
    """What setup builds and every step uses. `step` counts SFT and RL steps together."""
    cfg: Config
    ctx: fdist.DistContext
    out: Path
    tokenizer: object
    model: torch.nn.Module
    ref_model: torch.nn.Module | None  # frozen reference (beta > 0: the KL term; decision_anchor > 0: its offset)
    optimizer: torch.optim.Optimizer
    engine: rollout.Engine             # VLLMEngine, or HFEngine sharing `model`
    scorer: freward.RewardScorer
    data: TrainData
    log: MetricsLog
    layout: str                        # packing layout of the micro-batches
    varlen: bool                       # flash-attn variable-length attention
    step: int
    syncs: int = 0                     # weight pushes to the engine so far in this process
    sync_checked: bool = False         # the engine was checked after its first weight sync
    decision: tuple | None = None      # --decision_anchor / --decision_project: prompts.decision_tokens (prefix,
                                       # no-call ids, call ids)


def choose_engine(cfg: Config, ctx: fdist.DistContext) -> bool:
    """True for vLLM, False for the transformers engine; refuses what torchrun cannot run."""
    import importlib.util
    use_vllm = cfg.engine == "vllm" or (cfg.engine == "auto" and importlib.util.find_spec("vllm") is not None)
    if ctx.distributed:
        if not use_vllm:  # the HF engine would generate on the sharded policy: uneven, rank-local collectives
            raise SystemExit(f"error: engine={cfg.engine} means the transformers engine, which cannot run under "
                             f"torchrun (world_size {ctx.world_size}); install vLLM and use --engine vllm")
        if cfg.prompts_per_step < ctx.world_size or (cfg.sft_steps and cfg.sft_batch_size < ctx.world_size):
            raise SystemExit(f"error: prompts_per_step ({cfg.prompts_per_step}) and sft_batch_size "
                             f"({cfg.sft_batch_size}) must be >= world_size ({ctx.world_size}): every rank needs "
                             "a share of the batch")
        if cfg.dynamic_sampling:  # ranks would refill different numbers of groups: uneven collectives
            raise SystemExit("error: dynamic_sampling is not supported under torchrun")
    return use_vllm


def load_models(cfg: Config, ctx: fdist.DistContext, model_path: Path, base_path: Path, out: Path, say):
    """The tokenizer and the policy from `model_path` (and, when beta > 0 or decision_anchor > 0, the frozen
    reference: the starting policy, or the warm-started one saved after SFT) on this rank's device, sharded by
    FSDP2 under torchrun.
    Returns (tokenizer, model, ref_model, layout, varlen)."""
    device_type = torch.device(ctx.device).type  # "cuda" for "cuda:3"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "amp-bf16": torch.float32}[cfg.train_dtype]
    attn, layout = models.attention_choice(cfg, device_type)
    with usage_error(f"model {model_path}"):  # a directory without weights or tokenizer files
        tokenizer = models.load_tokenizer(model_path)
        model = models.load_model(model_path, dtype=dtype, device=ctx.device, attn_implementation=attn)
    model.config.use_cache = False
    switches = models.setup_model_kernels(cfg, model, device_type)
    ref_model = None
    if cfg.beta > 0 or cfg.decision_anchor > 0:
        ref_path = out / "reference" if (out / "reference" / "config.json").exists() else base_path
        ref_model = models.load_model(ref_path, dtype=dtype, device=ctx.device, attn_implementation=attn)
        ref_model.eval().requires_grad_(False)
        if switches["liger"]:
            models.setup_model_kernels(dataclasses.replace(cfg, grad_checkpointing=False), ref_model, device_type)
    if ctx.distributed:  # FSDP2 data parallel: each rank keeps 1/world_size of the weights, gradients summed
        for m in (model, ref_model):
            if m is not None:
                fdist.shard_model(m, bf16=cfg.train_dtype == "amp-bf16")
    say(f"trainer: {ctx.device} | weights {cfg.train_dtype} | attention {attn} | layout {layout} | "
        f"liger {'on' if switches['liger'] else 'off'} | activation checkpointing "
        f"{'on' if cfg.grad_checkpointing else 'off'} | loss kernel impl={cfg.impl} | "
        f"micro-batch {cfg.micro_batch_tokens} tokens")
    if ctx.distributed:
        say(f"torchrun: {ctx.world_size} ranks, FSDP2 data parallel, one vLLM engine per rank")
    return tokenizer, model, ref_model, layout, attn == "flash_attention_2"


def load_data(cfg: Config, tokenizer, say) -> TrainData:
    """train_data and each "+"-part of eval_data, without prompts over max_prompt_tokens; refuses an
    evaluation set that overlaps the training set."""
    skipped = Counter()  # malformed rows skipped (each file printed them with their line numbers)
    with usage_error(f"train_data {cfg.train_data!r}"):
        examples = fdata.load_any(cfg.train_data, on_error="skip", skipped=skipped, max_bad=cfg.max_bad_rows)
    examples = prompts.filter_by_length(examples, tokenizer, cfg.max_prompt_tokens, cfg.fmt, cfg.prefill)
    eval_sets = {}
    for part in ([] if cfg.eval_data.lower() in ("", "none") else cfg.eval_data.split("+")):
        with usage_error(f"eval_data {part.strip()!r}"):
            found = fdata.load_any(part.strip(), on_error="skip", skipped=skipped, max_bad=cfg.max_bad_rows)
        found = prompts.filter_by_length(found, tokenizer, cfg.max_prompt_tokens, cfg.fmt, cfg.prefill)
        eval_sets[part.strip()] = fdata.shuffle(found, cfg.seed)[:cfg.eval_limit or None]
    data = TrainData(examples, {}, eval_sets, cfg.seed)
    train_ids = {e.id for e in examples}
    if any(e.id in train_ids for e in data.eval_examples):
        raise SystemExit("error: eval_data overlaps train_data; evaluation must be held out")
    if not examples:
        raise SystemExit(f"error: no training examples in {cfg.train_data!r} within {cfg.max_prompt_tokens} tokens")
    if cfg.sft_think == "data" and (cfg.sft_steps or cfg.sft_coef):
        missing = [e.id for e in examples if e.think is None]
        if missing:
            raise SystemExit(f"error: sft_think data: {len(missing)} of {len(examples)} training examples have no "
                             f"think of their own (first: {missing[0]}); give them one (a `think` field) or "
                             "choose another --sft_think")
    if cfg.steps:
        data.check_share(cfg.prompts_per_step, cfg.no_call_share)
        if cfg.contrast_pairs:
            data.check_pairs()
    data.prompt_ids = {e.id: prompts.build_prompt_ids(e, tokenizer, cfg.fmt, cfg.prefill) for e in examples}
    say(f"data: {len(examples)} train examples ({cfg.train_data}), {len(data.eval_examples)} eval ({cfg.eval_data})"
        + (f"; skipped {sum(skipped.values())} malformed rows (listed above)" if skipped else ""))
    return data


def restore(ckpt: Path, ctx: fdist.DistContext, model, optimizer, data: TrainData, say) -> tuple[int, list]:
    """Load a checkpoint's optimizer state, data position and RNG state; returns (step, history)."""
    # torchrun: mmap, as only rank 0 reads the optimizer tensors (load_optimizer_state broadcasts them)
    state = load_trainer_state(ckpt, mmap=ctx.distributed)
    load_optimizer_state(model, optimizer, state["optimizer"] if ctx.is_main else {})
    data.position = state["data"]
    set_rng_state(state["rng"])
    say(f"resumed from {ckpt} at step {state['step']}")
    return state["step"], state["history"]


def engine_share(cfg: Config, ctx: fdist.DistContext, model) -> float | None:
    """vLLM's share of this rank's GPU (None off a GPU): --engine_memory, else what is free now that the
    trainer's models are loaded, less the gradients and AdamW moments it will still allocate."""
    if torch.device(ctx.device).type != "cuda":
        return None
    if cfg.engine_memory:
        return cfg.engine_memory
    free, total = torch.cuda.mem_get_info(ctx.device)
    return rollout.colocated_memory_share(free, total, rollout.trainer_state_bytes(model))


def start_engine(cfg: Config, ctx: fdist.DistContext, use_vllm: bool, model, tokenizer, model_path: Path,
                 data: TrainData, say) -> rollout.Engine:
    if not use_vllm:
        return rollout.HFEngine(model, tokenizer=tokenizer)  # shares the policy: nothing to sync or check

    def start(dtype):  # one engine per rank under torchrun, each with its own sampling seed
        return rollout.VLLMEngine(model_path, dtype=dtype, seed=cfg.seed * ctx.world_size + ctx.rank,
                                  max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
                                  gpu_memory_utilization=engine_share(cfg, ctx, model))

    engine = start(cfg.engine_dtype)
    if not check_engine(cfg, ctx, engine, model, data, say, "at start"):
        say(f"engine: vLLM {engine.dtype} failed its check, so engine_dtype auto falls back to float32")
        engine.close()
        engine = start("float32")
        check_engine(cfg, ctx, engine, model, data, say, "at start")
    return engine


def check_engine(cfg: Config, ctx: fdist.DistContext, engine, model, data: TrainData, say, when: str) -> bool:
    """rollout.check_engine on two training prompts (the first ids in sorted order). True when it passes or
    is off; False when it fails with engine_dtype auto on a non-float32 engine (the caller falls back);
    otherwise exits with one error line. Skipped under torchrun (the check's forwards are rank-local)."""
    if not cfg.engine_check or not isinstance(engine, rollout.VLLMEngine):
        return True
    if ctx.distributed:
        say(f"engine check {when}: skipped under torchrun (the check's forwards are rank-local)")
        return True
    ids = sorted(data.prompt_ids)[:2]
    result = rollout.check_engine(engine, model, [data.prompt_ids[i] for i in ids], seed=cfg.seed)
    say(f"engine check {when}: vLLM {result.dtype} {'ok' if result.ok else 'FAILED'}: {result.describe()}")
    if result.ok or (cfg.engine_dtype == "auto" and result.dtype != "float32"):
        return result.ok
    raise SystemExit(f"error: the vLLM engine ({result.dtype}, CPU {rollout.cpu_summary() or 'unknown'}"
                     f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}) computes "
                     f"log-probs {result.engine_error:.3f} nats from the trainer's weights on average (budget "
                     f"{result.budget:.3f}): its rollouts would be garbage. Fix: --engine_dtype float32 "
                     f"(the engine's bfloat16 kernels are off on this machine), or --engine hf")


# ------------------------------------------------------------------------------------------------ 1. rollout

@dataclass
class Rollout:
    completions: list       # (P * G) rollout.Completion, prompt-major: group p is completions[p*G:(p+1)*G]
    owners: list            # the example each completion answers
    gen_s: float


def sample_rollouts(tr: Trainer, batch: list, round: int = 0) -> Rollout:
    """group_size completions of each prompt in `batch`, with each sampled token's log-prob. The sampling
    seed differs per step, per rank and per dynamic-sampling round."""
    cfg, ctx = tr.cfg, tr.ctx
    t0 = time.perf_counter()
    fault_point("rollout")
    groups = tr.engine.generate([tr.data.prompt_ids[ex.id] for ex in batch], n=cfg.group_size,
                                temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                seed=(cfg.seed * 1_000_003 + tr.step) * ctx.world_size + ctx.rank + round * 7_919_777)
    completions = [c for g in groups for c in g]
    owners = [ex for ex in batch for _ in range(cfg.group_size)]
    return Rollout(completions, owners, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ 2. reward

def score_rollouts(tr: Trainer, roll: Rollout) -> tuple[list, torch.Tensor, float]:
    """(reward.RewardResult per completion, rewards (P, G), seconds). A failing scorer gives 0, counted."""
    t0 = time.perf_counter()
    results = tr.scorer([tr.cfg.prefill + c.text for c in roll.completions], roll.owners)
    rewards = torch.tensor([r.reward for r in results], dtype=torch.float32).view(-1, tr.cfg.group_size)
    return results, rewards, time.perf_counter() - t0


def refill_groups(tr: Trainer, roll: Rollout, results: list, rewards: torch.Tensor, reward_s: float):
    """DAPO's dynamic sampling: while fewer than prompts_per_step groups have mixed rewards, sample groups of
    that many newly drawn prompts (at most dynamic_sampling more rounds) and append them. Groups whose
    rewards are all equal stay in the batch and are logged (the reward mean stays a mean over sampled
    prompts) but, as always, carry no advantage."""
    cfg = tr.cfg
    for round in range(1, cfg.dynamic_sampling + 1):
        missing = cfg.prompts_per_step - int((~group_advantages(rewards)[1]).sum())
        if missing <= 0:
            break
        more = sample_rollouts(tr, tr.data.next_batch(missing, cfg.no_call_share), round)
        more_results, more_rewards, more_s = score_rollouts(tr, more)
        roll = Rollout(roll.completions + more.completions, roll.owners + more.owners, roll.gen_s + more.gen_s)
        results, rewards, reward_s = results + more_results, torch.cat([rewards, more_rewards]), reward_s + more_s
    return roll, results, rewards, reward_s


def gold_in_group(tr: Trainer, roll: Rollout, results: list, rewards: torch.Tensor):
    """LUFFY's off-policy guidance, simplified (--gold_in_group): a group none of whose completions is right
    gets the prompt's gold answer (gold_text) in place of its last sample, scored by the same reward, so a prompt
    the policy always gets wrong still has a mixed group to learn from: the gold pushed up, the wrong answers
    down. The gold is not sampled: its log-probs are None and its importance weight against the sampler is 1
    (train_on_rollouts). A gold answer the reward does not pay in full is not put in. Returns (the rollout and
    rewards to train on, how many groups got the gold); `roll`, `results` and `rewards` are not changed."""
    cfg, tok, G = tr.cfg, tr.tokenizer, tr.cfg.group_size
    completions, rewards, n = list(roll.completions), rewards.clone(), 0
    for p in range(rewards.shape[0]):
        if any(r.correct for r in results[p * G:(p + 1) * G]):
            continue
        ex, text = roll.owners[p * G], gold_text(cfg, roll.owners[p * G])
        (scored,) = tr.scorer([cfg.prefill + text], [ex])
        if not scored.correct or scored.reward < 1.0:
            continue
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        completions[(p + 1) * G - 1] = rollout.Completion(ids, None, text, "stop")
        rewards[p, G - 1] = scored.reward
        n += 1
    return Rollout(completions, roll.owners, roll.gen_s), rewards, n


# ------------------------------------------------------------------------------------------------ 3. advantage

def group_advantages(rewards: torch.Tensor, norm: str = "std"):
    """rewards (P, G) -> (A (P, G), zero-variance mask (P,)): A = (r - mean) / std within each group
    (population std; norm "none": A = r - mean, Dr. GRPO); zero-variance groups get A = 0 and are left out
    of the loss by the caller."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, unbiased=False, keepdim=True)
    zero_var = std[:, 0] < 1e-6
    scale = std.clamp(min=1e-6) if norm == "std" else 1.0
    return torch.where(zero_var[:, None], 0.0, (rewards - mean) / scale), zero_var


def egpo_advantages(adv: torch.Tensor, think_entropy: torch.Tensor, lam: float = 0.4, alpha: float = 2.0):
    """EGPO: A' = A + lam * clip(H, -|A|/alpha, |A|/alpha), H the detached mean <think> entropy."""
    bound = adv.abs() / alpha
    return adv + lam * torch.maximum(torch.minimum(think_entropy, bound), -bound)


ANSWERS = ("call", "none", "bad")  # answer_kind's values, coded 0, 1, 2


def answer_means(adv: torch.Tensor, answer: torch.Tensor, n: int):
    """adv (P, G), answer (P, G) in [0, n) -> (push (P, n): the sum of each answer's advantages in each group,
    D (P, G): each completion's answer mean in its group). D carries every push toward or away from an answer
    as a whole and sums to zero over a group; A - D keeps the differences within one answer and pushes none."""
    onehot = torch.nn.functional.one_hot(answer, n).to(adv.dtype)                # (P, G, n)
    push = (adv[:, :, None] * onehot).sum(1)
    return push, (onehot * (push / onehot.sum(1).clamp(min=1))[:, None, :]).sum(2)


def _scaled(adv, d, needs_call, s_call: float, s_none: float):
    scale = (needs_call.to(adv.dtype) * s_call + (~needs_call).to(adv.dtype) * s_none)[:, None]
    return adv - (1 - scale) * d


def balance_decision(adv: torch.Tensor, calls: torch.Tensor, needs_call: torch.Tensor, reduce=lambda x: x):
    """Take the global call / no-call offset out of a step's advantages (--decision_balance).

    adv (P, G) group advantages; calls (P, G) bool, the completion makes a call (a parsed answer with calls;
    "none" and unparsable answers do not); needs_call (P,) bool, the prompt's right answer is a call. A group's
    push toward calling is the sum of its calling completions' advantages; its two answer means (call, not
    call: answer_means) carry that whole push, the rest keeps every difference within a decision (a right call
    against a wrong one, an abstention against an unparsable answer). Over the step (summed over ranks by
    `reduce`), call-needing prompts push toward calling by C_call and no-call prompts by C_none; scaling their
    answer means by s_call, s_none in [0, 1], the largest with s_call C_call + s_none C_none = 0, leaves no net
    push toward calling. When the two do not pull against each other (one is 0: every no-call group, say,
    already agrees), both go (s = 0). Returns (A', {push_call_needing, push_no_call, scale_call_needing,
    scale_no_call})."""
    push, d = answer_means(adv, (~calls).long(), 2)
    c_call, c_none = reduce(push[needs_call, 0].sum().item()), reduce(push[~needs_call, 0].sum().item())
    if c_call * c_none < 0:
        s_call, s_none = min(1.0, -c_none / c_call), min(1.0, -c_call / c_none)
    else:
        s_call = s_none = 0.0
    stats = {"push_call_needing": c_call, "push_no_call": c_none, "scale_call_needing": s_call, "scale_no_call": s_none}
    return _scaled(adv, d, needs_call, s_call, s_none), stats


def balance_answers(adv: torch.Tensor, answer: torch.Tensor, needs_call: torch.Tensor, reduce=lambda x: x):
    """Push the two right answers equally in each step (--answer_balance): a call where one is needed, no call
    where none fits.

    adv (P, G) group advantages; answer (P, G) the index in ANSWERS of each completion's answer; needs_call (P,)
    bool. A group's push toward an answer is the sum of the advantages of its completions that gave it; the
    answer means D (answer_means) carry every such push, A - D keeps the differences within one answer (a right
    call against a wrong one). Over the step (summed over ranks by `reduce`), call-needing groups push toward
    calling by C_call and no-call groups toward abstaining by C_none; their D are scaled by s_call, s_none in
    [0, 1] (down, never up), the largest with s_call C_call = s_none C_none; when either push is <= 0 both D go.
    Returns (A', {push_right_call_needing, push_right_no_call, scale_call_needing, scale_no_call})."""
    push, d = answer_means(adv, answer, len(ANSWERS))
    right = torch.where(needs_call, push[:, 0], push[:, 1])
    c_call, c_none = reduce(right[needs_call].sum().item()), reduce(right[~needs_call].sum().item())
    if c_call > 0 and c_none > 0:
        s_call, s_none = min(1.0, c_none / c_call), min(1.0, c_call / c_none)
    else:
        s_call = s_none = 0.0
    stats = {"push_right_call_needing": c_call, "push_right_no_call": c_none, "scale_call_needing": s_call,
             "scale_no_call": s_none}
    return _scaled(adv, d, needs_call, s_call, s_none), stats


def mean_think_entropy(entropy: torch.Tensor, think: torch.Tensor, seq_ids: torch.Tensor, n_seqs: int):
    """EGPO's H: the mean (detached) entropy of each sequence's <think> tokens. Per token: `entropy` (N,) fp32,
    `think` (N,) bool, `seq_ids` (N,) its sequence. Returns (H (n_seqs,), 0 where a sequence has no <think>
    token; has_think (n_seqs,) bool)."""
    total = torch.zeros(n_seqs, device=entropy.device).index_add_(0, seq_ids, entropy.detach() * think)
    count = torch.zeros(n_seqs, device=entropy.device).index_add_(0, seq_ids, think.float())
    return total / count.clamp(min=1), count > 0


def think_token_mask(tokenizer, token_ids: list[int], text: str, fmt: str, prefill: str = "") -> list[bool]:
    """Which completion tokens lie inside the <think>...</think> span of `prefill` + `text` (by character offsets
    accumulated over single-token decodes; exact for text that decodes token by token). `text` is the
    completion's; `prefill`, what the prompt ended with (--think prefill), is not among its tokens."""
    parsed = freward.parse(prefill + text, fmt)
    if parsed.think_span is None:
        return [False] * len(token_ids)
    lo, hi = (i - len(prefill) for i in parsed.think_span)
    mask, pos = [], 0
    for tok in token_ids:
        piece = len(tokenizer.decode([tok]))
        mask.append(pos < hi and pos + piece > lo)
        pos += piece
    return mask


@dataclass
class Advantages:
    adv: torch.Tensor                 # (P * G,) group-normalised advantages
    zero_var: torch.Tensor            # (P,) groups whose rewards are all equal: no signal, not trained on
    keep: list[int]                   # the completions trained on (not zero-variance, not empty, not emptied by
                                      # --decision_balance / --answer_balance)
    seqs: list[packing.Seq]           # their prompt + completion tokens
    think: list[list[bool]] | None    # each kept completion's <think> tokens (EGPO's term; logged for GRPO)
    balance: dict | None = None       # --decision_balance / --answer_balance: the step's pushes and their scales
    gold_groups: int | None = None    # --gold_in_group: the groups (all ranks) given their gold answer


def compute_advantages(tr: Trainer, roll: Rollout, rewards: torch.Tensor) -> Advantages:
    """Group-relative advantages and the sequences to train on. EGPO's entropy term needs the policy's
    entropy of each <think> token: step 4 adds it in its first forward pass (mean_think_entropy,
    egpo_advantages)."""
    cfg = tr.cfg
    adv, zero_var = group_advantages(rewards, cfg.adv_norm)
    comps = roll.completions
    skip, balance = zero_var, None
    if cfg.decision_balance or cfg.answer_balance:
        answer = torch.tensor([ANSWERS.index(answer_kind(cfg.prefill + c.text, cfg)) for c in comps]).view_as(adv)
        needs_call = torch.tensor([not freward.is_irrelevance(ex.category) for ex in roll.owners[::cfg.group_size]])
        if cfg.decision_balance:
            adv, balance = balance_decision(adv, answer == 0, needs_call, fdist.all_reduce_sum)
        else:
            adv, balance = balance_answers(adv, answer, needs_call, fdist.all_reduce_sum)
        emptied = ~zero_var & (adv.abs().amax(1) < 1e-6)  # its only difference was the offset: nothing left to learn
        balance["emptied_groups"] = fdist.all_reduce_sum(int(emptied.sum()))
        skip = zero_var | emptied
    keep = [i for i in range(len(comps)) if not skip[i // cfg.group_size] and len(comps[i].token_ids) > 0]
    seqs = [packing.Seq(tr.data.prompt_ids[roll.owners[i].id], comps[i].token_ids, i // cfg.group_size)
            for i in keep]
    # every completion's <think> tokens: EGPO's term, and the think's entropy logged under GRPO too (the measure
    # EGPO - GRPO is reported beside)
    think = [think_token_mask(tr.tokenizer, comps[i].token_ids, comps[i].text, cfg.fmt, cfg.prefill) for i in keep]
    return Advantages(adv.flatten(), zero_var, keep, seqs, think, balance)


# ------------------------------------------------------------------------------------------------ 4. loss and update

def lr_at(cfg: Config, step: int) -> float:
    """SFT steps use sft_lr; RL steps warm up linearly, then stay at lr (lr_schedule constant) or decay by
    cosine to min_lr_ratio * lr at the last step."""
    if step < cfg.sft_steps:
        return cfg.sft_lr
    s = step - cfg.sft_steps
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast(cfg: Config, device: str):
    if cfg.train_dtype == "amp-bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_head(cfg: Config, model):
    """The LM-head weight as the fused kernel should see it (bf16 under amp; gradients reach the fp32 master)."""
    w = model.get_output_embeddings().weight
    return w.to(torch.bfloat16) if cfg.train_dtype == "amp-bf16" else w


def micro_batches(cfg: Config, model, ref_model, seqs: list[packing.Seq], layout: str, varlen: bool, device):
    """This rank's token-budget micro-batches of `seqs`, built one at a time. Under FSDP every rank must run
    as many forward/backward passes: a rank with fewer runs dummy passes (fdist.dummy_pass) after its own."""
    plan = packing.plan(seqs, cfg.micro_batch_tokens, layout)
    for k in range(fdist.all_reduce_max(len(plan))):
        if k < len(plan):
            yield packing.build(seqs, plan[k], layout, device, varlen)
        else:
            fdist.dummy_pass(model, ref_model, device)


def sft_loss_backward(cfg: Config, model, seqs: list[packing.Seq], layout: str, varlen: bool, device,
                      scale: float = 1.0) -> float:
    """Accumulate d(scale * mean -log p of the completion tokens)/dθ over token-budget micro-batches; returns
    the (unscaled) loss. Under torchrun `seqs` are this rank's (possibly none); the mean and the returned loss
    are global."""
    n_tokens = fdist.all_reduce_sum(sum(len(s.completion) for s in seqs))  # every rank's tokens
    total = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches(cfg, model, None, seqs, layout, varlen, device):
        with autocast(cfg, device):
            h = packing.hidden_rows(model, mb)
        w = lm_head(cfg, model)  # after the forward: under FSDP it is gathered there
        logp, _ = kernels.fused_linear_logprob_entropy(h.to(w.dtype), w, mb.targets, impl=cfg.impl)
        loss = -logp.sum() / n_tokens
        (loss * scale).backward()
        total += loss.detach().double()
    return fdist.all_reduce_sum(total.item())  # host sync, once per step


def decision_log_odds(h: torch.Tensor, w: torch.Tensor, nones: list[int], calls: list[int]) -> torch.Tensor:
    """(M,) log P(no call) - log P(call) from hidden rows h (M, H) and the LM head w (V, H), in fp32 or wider: the
    softmax's normaliser cancels, so only the logits of the two token sets (prompts.decision_tokens) are formed."""
    dtype = torch.promote_types(h.dtype, torch.float32)  # fp32 at least; float64 stays float64
    z = h.to(dtype) @ w[nones + calls].to(dtype).T
    return z[:, :len(nones)].logsumexp(-1) - z[:, len(nones):].logsumexp(-1)


def decision_means(cfg: Config, models: tuple, seqs: list[packing.Seq], nones: list[int], calls: list[int],
                   layout: str, varlen: bool, device) -> list[float]:
    """Each model's mean decision_log_odds over the Seqs of every rank (decision_anchor_seqs), without gradients:
    every rank runs the same passes (FSDP collectives); one host sync."""
    plan = packing.plan(seqs, cfg.micro_batch_tokens, layout)
    sums = torch.zeros(len(models), dtype=torch.float64, device=device)
    with torch.no_grad():
        for k in range(fdist.all_reduce_max(len(plan))):
            mb = packing.build(seqs, plan[k], layout, device, varlen) if k < len(plan) else None
            for i, m in enumerate(models):
                with autocast(cfg, device):
                    h = packing.hidden_rows(m, mb) if mb is not None else fdist.dummy_forward(m, device)
                if mb is not None:
                    sums[i] += decision_log_odds(h, lm_head(cfg, m), nones, calls).double().sum()
                fdist.reshard(m)
    n = max(fdist.all_reduce_sum(len(seqs)), 1)
    return [x / n for x in fdist.all_reduce_sum(sums).tolist()]


def decision_anchor_backward(cfg: Config, model, ref_model, seqs: list[packing.Seq], nones: list[int],
                             calls: list[int], layout: str, varlen: bool, device) -> dict:
    """The --decision_anchor term: accumulate d(c m^2)/dθ, c = cfg.decision_anchor, m = the mean over the step's
    prompts (every rank's) of s - s_ref, s = decision_log_odds at the answer's opening (each Seq: prompt +
    decision prefix, one placeholder completion token). Only the mean is pinned: the prompts' differences, the
    ranking of call against no-call prompts, get no gradient. Two passes: without gradients, s and s_ref for m;
    then per micro-batch the gradient 2 c m ds/dθ / n, m fixed. Returns {decision_log_odds (the policy's mean s),
    decision_shift (m), decision_anchor_loss (c m^2)}, before the update."""
    s_mean, ref_mean = decision_means(cfg, (model, ref_model), seqs, nones, calls, layout, varlen, device)
    n = fdist.all_reduce_sum(len(seqs))
    shift = s_mean - ref_mean
    for mb in micro_batches(cfg, model, None, seqs, layout, varlen, device):
        with autocast(cfg, device):
            h = packing.hidden_rows(model, mb)
        s = decision_log_odds(h, lm_head(cfg, model), nones, calls)
        (2 * cfg.decision_anchor * shift / n * s.sum()).backward()
    return {"decision_log_odds": s_mean, "decision_shift": shift,
            "decision_anchor_loss": cfg.decision_anchor * shift ** 2}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly FSDP2-sharded) tensor; the tensor itself when not sharded."""
    return t.to_local() if hasattr(t, "to_local") else t


def _dot(xs, ys) -> float:
    """sum_i <xs_i, ys_i> in float64 over every rank's shards, in chunks (no float64 copy of a whole weight): a
    float32 product is exact in float64, so g . theta before and after a step of lr 1e-6 differ by the step."""
    total = None
    for x, y in zip(xs, ys):
        x, y = _local(x).reshape(-1), _local(y).reshape(-1)
        if total is None:
            total = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, x.numel(), 1 << 22):
            total += torch.dot(x[i:i + (1 << 22)].double(), y[i:i + (1 << 22)].double())
    return fdist.all_reduce_sum(total if total is not None else torch.zeros((), dtype=torch.float64)).item()


def decision_gradient(cfg: Config, model, seqs: list[packing.Seq], nones: list[int], calls: list[int],
                      layout: str, varlen: bool, device) -> tuple[list[torch.Tensor], float]:
    """(d mean(s)/dθ per trainable parameter, mean s): s = decision_log_odds at the answer's opening of each of
    the step's prompts (every rank's; the Seqs of decision_anchor_seqs), the policy as it is. The gradient is
    taken out of .grad, which is left empty for the loss."""
    n = fdist.all_reduce_sum(len(seqs))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches(cfg, model, None, seqs, layout, varlen, device):
        with autocast(cfg, device):
            h = packing.hidden_rows(model, mb)
        s = decision_log_odds(h, lm_head(cfg, model), nones, calls)
        (s.sum() / n).backward()
        total += s.detach().double().sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p in params:
        p.grad = None
    return grads, fdist.all_reduce_sum(total).item() / max(n, 1)


def project_decision_move(optimizer, params: list, grads: list, before: float) -> tuple[float, float]:
    """After an AdamW step: take the step's first-order move of mean s, g . Δθ (g = decision_gradient's,
    `before` = g . θ before the step), out of the update in Adam's own metric. With P = 1/(sqrt(v_hat) + eps) per
    element (the step's preconditioner: Adam's step is -lr P m_hat), the nearest update in the norm Δᵀ P⁻¹ Δ
    that keeps g . Δ = 0 is Δ - (g . Δ / gᵀ P g) P g: the offset's direction is removed, every other direction
    Adam chose is kept. Returns (the move removed, the move left after the correction; both in nats, first order);
    a parameter without AdamW state (never stepped) is not corrected."""
    move = _dot(grads, [p.detach() for p in params]) - before
    group_of = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    precond = []
    for p in params:
        state, group = optimizer.state.get(p, {}), group_of[id(p)]
        if "exp_avg_sq" not in state:
            precond.append(None)
            continue
        step = float(state["step"])
        v_hat = _local(state["exp_avg_sq"]) / (1 - group["betas"][1] ** step)
        precond.append(1 / (v_hat.sqrt() + group["eps"]))
    keep = [i for i, pc in enumerate(precond) if pc is not None]
    gpg = _dot([_local(grads[i]) * precond[i] for i in keep], [grads[i] for i in keep])
    if gpg > 0:
        c = move / gpg
        with torch.no_grad():
            for i in keep:
                _local(params[i]).sub_(c * precond[i] * _local(grads[i]))
    left = _dot(grads, [p.detach() for p in params]) - before
    return move, left


@dataclass
class Update:
    stats: dict                   # loss, kl, entropy, clip fractions, importance weights, grad norm; {}: none
    adv: torch.Tensor             # (S,) each trained sequence's advantage as trained (EGPO's term added)
    think_entropy: torch.Tensor   # (S,) each trained sequence's mean <think> entropy (nan: none)
    trained: bool = True          # some rank trained on some sequence
    train_s: float = 0.0


def train_on_rollouts(cfg: Config, model, ref_model, optimizer, lr: float, seqs: list[packing.Seq],
                      adv: torch.Tensor, rollout_logps: list[list[float]], thinks: list[list[bool]] | None,
                      layout: str, varlen: bool, device, gold: list[packing.Seq] | None = None,
                      anchor: tuple | None = None, project: tuple | None = None) -> Update:
    """The RL training phase on one rollout batch: old log-probs and <think> entropy (EGPO), reference
    log-probs, the fused clipped loss with global normalisation, backward, clipping and the AdamW step,
    `updates_per_batch` times. `adv` (S,) is per sequence; `thinks` marks each completion's <think> tokens
    (None: not measured; EGPO adds its term, GRPO only reports their entropy). `gold` (sft_coef > 0):
    reference completions whose mean -log p, times sft_coef, is added to every update (an SFT term beside the
    RL loss). `anchor` (decision_anchor > 0): (the step's prompts as decision Seqs, no-call ids, call ids) for
    decision_anchor_backward in every update. `project` (decision_project; the same form): the mean decision
    log-odds' gradient, taken before the first update, whose first-order move is taken out of every update
    (project_decision_move). Returns the metrics, the final
    (EGPO) advantages and the think entropies.

    Under torchrun each rank passes its own sequences (possibly none) and all ranks call this together:
    normalisers are all-reduced and every rank runs the same number of forward/backward passes, so the
    update equals one process's on all ranks' sequences; the metrics are global, `adv` and the think
    entropies this rank's."""
    adv = adv.to(device)
    final_adv = adv.clone()
    think_h = torch.full((len(seqs),), float("nan"), device=device)
    n_total = fdist.all_reduce_sum(sum(len(s.completion) for s in seqs))  # every rank's tokens
    n_seqs = fdist.all_reduce_sum(len(seqs))
    loss_config = kernels.GRPOLossConfig(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                                         entropy_coef=cfg.entropy_coef, rollout_is_cap=cfg.rollout_is_cap or None,
                                         loss_agg=cfg.loss_agg, max_len=cfg.max_new_tokens)
    # the metrics stay on the device, in float64 (as Python floats would add them), until the end of the step
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums = {key: zero.clone() for key in ("loss", "kl", "clip_low", "clip_high", "entropy", "is_mean")}
    is_min, is_max, n_nonfinite = zero + float("inf"), zero.clone(), zero.clone()
    computed_tokens, grad_norm, old_logps, sft_total, decision_stats = 0, float("nan"), {}, 0.0, {}
    kl_ref = ref_model if cfg.beta > 0 else None  # a reference kept for the decision anchor alone takes no KL pass
    if project is not None:  # the offset's gradient at the policy that sampled (a host sync)
        g_s, s_mean = decision_gradient(cfg, model, *project, layout, varlen, device)
        params = [p for p in model.parameters() if p.requires_grad]
        decision_stats = {"decision_log_odds": s_mean, "decision_move": 0.0, "decision_move_left": 0.0}
        n_nonfinite += not math.isfinite(s_mean)
    for update in range(cfg.updates_per_batch):
        for k, mb in enumerate(micro_batches(cfg, model, kl_ref, seqs, layout, varlen, device)):
            ref_lp = None
            if kl_ref is not None:  # before the policy's forward, as in dummy_pass (same FSDP collectives)
                with torch.no_grad(), autocast(cfg, device):
                    hr = packing.hidden_rows(ref_model, mb)
                    rw = lm_head(cfg, ref_model)
                    ref_lp, _ = kernels.fused_linear_logprob_entropy(
                        hr.to(rw.dtype), rw, mb.targets, temperature=cfg.temperature, impl=cfg.impl)
                fdist.reshard(ref_model)
                computed_tokens += mb.num_tokens
            with autocast(cfg, device):
                h = packing.hidden_rows(model, mb)
            w = lm_head(cfg, model)  # after the forward: under FSDP it is gathered there
            computed_tokens += mb.num_tokens
            # The loss's two layers, split so that one LM-head pass serves the old log-probs, EGPO's entropy
            # and the loss: before the first optimizer step the policy is the one that sampled.
            logp, ent = kernels.fused_linear_logprob_entropy(h.to(w.dtype), w, mb.targets,
                                                             temperature=cfg.temperature, impl=cfg.impl)
            if update == 0:
                old_logps[k] = logp.detach()  # old log-probs of the policy that sampled
                if thinks is not None:  # the think's mean entropy; EGPO: A' = A + lambda * clip(H) (no think: H = 0)
                    think = packing.per_token(thinks, mb, torch.bool)
                    h_think, has_think = mean_think_entropy(ent, think, mb.seq_ids, len(mb.seqs))
                    think_h[mb.seqs] = torch.where(has_think, h_think, float("nan"))
                    if cfg.algo == "egpo":
                        final_adv[mb.seqs] = egpo_advantages(adv[mb.seqs], h_think, cfg.egpo_lambda, cfg.egpo_alpha)
            loss, m = kernels.grpo_objective(
                logp, ent, final_adv[mb.seqs], torch.ones_like(mb.targets, dtype=torch.bool),
                old_logp=old_logps[k], ref_logp=ref_lp,
                rollout_logp=sampler_logps(rollout_logps, seqs, mb, old_logps[k]) if cfg.rollout_is_cap > 0 else None,
                seq_ids=mb.seq_ids, config=loss_config)
            n_mb = len(mb.targets)
            share = n_mb / n_total if cfg.loss_agg == "token-mean" else len(mb.seqs) / n_seqs
            loss = loss * share  # global normalisation over the whole batch
            # a NaN/inf loss skips the update (below) and its micro-batch's metrics; its backward still runs
            # (FSDP's collectives need it on every rank, and the skip clears its gradients)
            loss.backward()
            finite = torch.isfinite(loss)
            n_nonfinite += ~finite
            sums["loss"] += torch.where(finite, loss.detach().double(), 0.0)
            for key, mk in [("kl", "kl_mean"), ("clip_low", "clip_low_frac"), ("clip_high", "clip_high_frac"),
                            ("entropy", "entropy_mean"), ("is_mean", "is_weight_mean")]:
                sums[key] += torch.where(finite, m[mk].double() * n_mb / n_total / cfg.updates_per_batch, 0.0)
            is_min = torch.fmin(is_min, torch.where(finite, m["is_weight_min"].double(), float("nan")))
            is_max = torch.fmax(is_max, torch.where(finite, m["is_weight_max"].double(), float("nan")))
        if gold is not None:  # the SFT term (its loss is a host sync; gold is not None on every rank or none)
            sft_loss = sft_loss_backward(cfg, model, gold, layout, varlen, device, scale=cfg.sft_coef)
            sft_total += sft_loss / cfg.updates_per_batch
            n_nonfinite += not math.isfinite(sft_loss)
        if anchor is not None:  # the decision anchor (its mean is a host sync; on every rank or none)
            stats_now = decision_anchor_backward(cfg, model, ref_model, *anchor, layout, varlen, device)
            decision_stats = decision_stats or stats_now  # the policy before the step's first update
            n_nonfinite += not math.isfinite(stats_now["decision_shift"])
        # host sync, once per update: a NaN on any rank skips the update on all
        n_nan = int(fdist.all_reduce_sum(n_nonfinite).item())
        if n_nan:
            optimizer.zero_grad(set_to_none=True)
            if fdist.is_main():
                print(f"non-finite loss in {n_nan} micro-batch(es); update skipped")
        elif project is None:
            grad_norm = clip_and_step(cfg, model, optimizer, lr)
        else:
            before = _dot(g_s, [p.detach() for p in params])
            grad_norm = clip_and_step(cfg, model, optimizer, lr)
            if math.isfinite(grad_norm):  # a skipped step moved nothing
                move, left = project_decision_move(optimizer, params, g_s, before)
                decision_stats["decision_move"] += move
                decision_stats["decision_move_left"] += left
    if project is not None:  # what the step did to the offset, on the same prompts (the move removed is first order)
        decision_stats["decision_log_odds_after"] = decision_means(cfg, (model,), *project, layout, varlen, device)[0]
    values = torch.stack([*sums.values(), is_min, is_max, n_nonfinite]).tolist()  # host sync, once per step
    stats = dict(zip([*sums, "is_min", "is_max"], values), nan_loss=int(values[-1]), grad_norm=grad_norm,
                 computed_tokens=computed_tokens)
    stats = fdist.reduce_metrics(  # the metrics of the whole batch, on every rank
        stats, ("loss", "kl", "clip_low", "clip_high", "entropy", "is_mean", "nan_loss", "computed_tokens"),
        minimised=("is_min",), maximised=("is_max",), device=device)
    if gold is not None:
        stats["sft_loss"] = sft_total
    stats.update(decision_stats)
    if gold is not None or anchor is not None or project is not None:
        if n_seqs == 0:  # the SFT term or the anchor alone: no RL metrics
            stats.update(dict.fromkeys(("loss", "kl", "clip_low", "clip_high", "entropy", "is_mean", "is_min",
                                        "is_max"), None))
    return Update(stats, final_adv.cpu(), think_h.cpu())


def sampler_logps(rollout_logps: list, seqs: list[packing.Seq], mb: packing.MicroBatch,
                  old: torch.Tensor) -> torch.Tensor:
    """The sampler's log-prob of each of the micro-batch's tokens, for the rollout importance weight; a sequence
    it did not sample (None: --gold_in_group's gold answer) takes the trainer's old log-probs: weight 1."""
    if all(lp is not None for lp in rollout_logps):
        return packing.per_token(rollout_logps, mb)
    unsampled = [[lp is None] * len(s.completion) for lp, s in zip(rollout_logps, seqs)]
    filled = [[0.0] * len(s.completion) if lp is None else lp for lp, s in zip(rollout_logps, seqs)]
    return torch.where(packing.per_token(unsampled, mb, torch.bool), old, packing.per_token(filled, mb))


def clip_and_step(cfg: Config, model, optimizer, lr: float) -> float:
    """Clip the global gradient norm and step; a NaN/inf gradient skips the update (returns nan)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = fdist.clip_grad_norm_(model, cfg.grad_clip)  # the global norm over every rank's shards
    if not torch.isfinite(grad_norm):  # host sync: a NaN/inf gradient must not reach the weights
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()


def gold_seqs(tr: Trainer, examples: list) -> list[packing.Seq]:
    """Each example's prompt + its reference completion (prompts.render_target with sft_think) + EOS. With
    --think prefill the prompt already opened the think: the completion goes on from inside it. With --sft_loss
    answer the think's own words join the prompt (context, not targets): `</think>`, the answer and EOS are
    trained, so the one call / no-call token is not outweighed by a think many times its length."""
    cfg, tok = tr.cfg, tr.tokenizer
    seqs = []
    for ex in examples:
        text = gold_text(cfg, ex)
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        n = think_tokens(tok, ids, text[:text.index("</think>")]) if cfg.sft_loss == "answer" else 0
        seqs.append(packing.Seq(tr.data.prompt_ids[ex.id] + ids[:n], ids[n:]))
    return seqs


def gold_text(cfg: Config, ex) -> str:
    """The example's reference completion as the policy would write it (prompts.render_target with sft_think),
    from inside the think when the prompt opened it (--think prefill)."""
    text = prompts.render_target(ex, cfg.fmt, cfg.sft_think)
    return text.removeprefix("<think>") if cfg.prefill else text


def think_tokens(tokenizer, ids: list[int], think: str) -> int:
    """How many leading tokens of `ids` decode to a part of `think` (the target's text before `</think>`): a
    token that straddles the think's end (`.</`) is not one of them, so it stays trained."""
    n = 0
    while n < len(ids) and think.startswith(tokenizer.decode(ids[:n + 1])):
        n += 1
    return n


def decision_anchor_seqs(tr: Trainer, examples: list) -> tuple:
    """(Seqs: each example's prompt + the decision prefix, with a placeholder completion token whose hidden row
    is the decision's; no-call ids; call ids) for decision_anchor_backward."""
    prefix, nones, calls = tr.decision
    return [packing.Seq(tr.data.prompt_ids[ex.id] + prefix, nones[:1]) for ex in examples], nones, calls


def policy_update(tr: Trainer, roll: Rollout, adv: Advantages, lr: float) -> Update:
    """train_on_rollouts on the kept sequences (every rank joins, even one without any); with sft_coef > 0
    also on the reference completions of every prompt of the step, all-wrong and all-right groups included, and
    with decision_anchor > 0 on every prompt's decision."""
    tr.engine.sleep()  # vLLM frees its GPU memory for the update (sleep mode); the next sync or rollout wakes it
    t0 = time.perf_counter()
    examples = list({ex.id: ex for ex in roll.owners}.values())
    gold = gold_seqs(tr, examples) if tr.cfg.sft_coef > 0 else None
    decision = decision_anchor_seqs(tr, examples) if tr.decision is not None else None
    anchor = decision if tr.cfg.decision_anchor > 0 else None
    project = decision if tr.cfg.decision_project else None
    if gold is not None or anchor is not None or fdist.all_reduce_sum(len(adv.keep)) > 0:  # every rank joins
        update = train_on_rollouts(tr.cfg, tr.model, tr.ref_model, tr.optimizer, lr, adv.seqs, adv.adv[adv.keep],
                                   [roll.completions[i].logprobs for i in adv.keep], adv.think, tr.layout,
                                   tr.varlen, tr.ctx.device, gold, anchor, project)
    else:  # no rank has a group with signal: nothing to train
        update = Update({}, torch.empty(0), torch.empty(0), trained=False)
    update.train_s = time.perf_counter() - t0
    return update


def sft_step(tr: Trainer):
    """One cold-start SFT step: mean -log p of reference completions, through the same fused kernel."""
    cfg, ctx = tr.cfg, tr.ctx
    t_step, lr = time.perf_counter(), lr_at(cfg, tr.step)
    tr.model.train()
    batch = fdist.split_for_rank(tr.data.next_batch(cfg.sft_batch_size), ctx.rank, ctx.world_size)  # my share
    loss = sft_loss_backward(cfg, tr.model, gold_seqs(tr, batch), tr.layout, tr.varlen, ctx.device)
    grad_norm = clip_and_step(cfg, tr.model, tr.optimizer, lr)
    fault_point("step")
    tr.step += 1
    record = {"step": tr.step, "phase": "sft", "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "step_s": time.perf_counter() - t_step, "peak_mem_mb": peak_memory_mb()}
    tr.log.add(record)
    tr.log.progress(phase="sft", loss=f"{loss:.3f}")
    tr.log.say(f"step {tr.step}/{cfg.sft_steps + cfg.steps} | sft | loss {loss:.4f} | lr {lr:.2e} | "
               f"grad {grad_norm:.2f} | {record['step_s']:.1f}s")


def save_reference(tr: Trainer):
    """The KL reference takes the policy's weights and is saved as out/reference for --resume, atomically: written
    to .tmp-reference, fsynced, then renamed, so a run killed mid-write resumes without a half-written reference
    (load_models would take a directory with config.json but no weights). Collective."""
    import os
    import shutil

    from fctrain.checkpoint import fsync_tree
    final, tmp = tr.out / "reference", tr.out / ".tmp-reference"
    if tr.ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    fdist.barrier()
    fdist.copy_weights(tr.model, tr.ref_model, tmp)
    fdist.barrier()  # every rank has read its shards from tmp
    if tr.ctx.is_main:
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_tree(tr.out, files=False)
    fdist.barrier()


def evaluated_now(tr: Trainer) -> bool:
    """Whether the policy of this step has been evaluated already."""
    last = next((r for r in reversed(tr.log.history) if r.get("phase") == "eval"), None)
    return last is not None and last["step"] == tr.step


def evaluate_sft(tr: Trainer, tag: str):
    """An evaluation during SFT (every eval_every SFT steps, and when the time budget ends SFT early): the
    engine gets the current policy first, unless this step was just evaluated."""
    if evaluated_now(tr):
        return
    sync_engine(tr)
    evaluate(tr, tag)


def start_rl(tr: Trainer):
    """The switch from SFT to RL, after the last SFT step: the engine gets the warm-started policy, which becomes
    the KL reference (saved for --resume) and is evaluated."""
    tr.log.say(f"sft -> rl: weights pushed into the engine in {sync_engine(tr):.1f}s")
    if tr.ref_model is not None:
        save_reference(tr)
    if tr.data.eval_examples:
        evaluate(tr, "after-sft")


# ------------------------------------------------------------------------------------------------ 5. sync

def sync_engine(tr: Trainer) -> float:
    """Push the policy's weights into the rollout engine (no files; a no-op for the HF engine, which shares
    the policy); returns the seconds it took. Under torchrun every rank gathers each parameter in turn (a
    collective) and streams it into its own engine."""
    t0 = time.perf_counter()
    tr.engine.update_weights(fdist.full_parameters(tr.model))
    tr.syncs += 1
    return time.perf_counter() - t0


def check_first_sync(tr: Trainer):
    """The engine check again once weights were first pushed (weight sync repacks them on a CPU); called
    between steps, so its seconds count in no step time."""
    if tr.syncs and not tr.sync_checked:
        tr.sync_checked = True
        if not check_engine(tr.cfg, tr.ctx, tr.engine, tr.model, tr.data, tr.log.say, "after the first sync"):
            raise SystemExit(f"error: the vLLM engine ({tr.engine.dtype}) passed its check at start but not after "
                             "the first weight sync; use --engine_dtype float32")


# ------------------------------------------------------------------------------------------------ 6. log and evaluate

def log_rl_step(tr: Trainer, lr: float, t_step: float, roll: Rollout, results: list, adv: Advantages,
                update: Update, reward_s: float, sync_s: float):
    """One record and one console line for an RL step, over every rank's share (timings are rank 0's)."""
    cfg, stats = tr.cfg, update.stats
    seqs = adv.seqs
    my_adv = adv.adv.clone()  # (P * G,) as trained: EGPO's term added to the completions trained on
    my_adv[adv.keep] = update.adv
    my_think = torch.full((len(roll.completions),), float("nan"))  # (P * G,) nan: not trained on, or no think
    my_think[adv.keep] = update.think_entropy
    mine = dict(results=results, lengths=[len(c.token_ids) for c in roll.completions],
                truncated=[c.finish_reason == "length" for c in roll.completions], zero_var=adv.zero_var.tolist(),
                final_adv=my_adv.tolist(), think_entropy=my_think.tolist(),
                counts=[(len(adv.zero_var), len(adv.keep), sum(len(s.completion) for s in seqs))])
    every = fdist.concat_over_ranks(mine)  # rank order = prompt order
    results, lengths, truncated = every["results"], every["lengths"], every["truncated"]
    rewards = torch.tensor([r.reward for r in results], dtype=torch.float32).view(-1, cfg.group_size)
    zero_var, final_adv, think_entropy = (torch.tensor(every[k]) for k in ("zero_var", "final_adv", "think_entropy"))
    n_groups, n_trained, trained_tokens = map(sum, zip(*every["counts"]))
    record = {
        "step": tr.step, "phase": "rl", "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
        "accuracy": float(np.mean([r.correct for r in results])),
        "format_rate": float(np.mean([r.format_ok for r in results])),
        "reward_failures": sum(r.failed for r in results),
        "zero_var_groups": int(zero_var.sum()), "groups": n_groups, "trained_seqs": n_trained,
        "think_entropy": think_entropy.nanmean().item() if (~think_entropy.isnan()).any() else None,
        "adv_abs_mean": final_adv.abs().mean().item(),
        **{k: stats.get(k) for k in ("loss", "kl", "entropy", "clip_low", "clip_high", "is_min", "is_mean",
                                     "is_max", "grad_norm", "computed_tokens")},  # None: nothing trained
        "trained_tokens": trained_tokens, "lr": lr,
        "nan_loss": stats.get("nan_loss", 0), "completion_len": float(np.mean(lengths)),
        "gen_tokens": int(sum(lengths)),
        "truncated": float(np.mean(truncated)),
        "gen_s": roll.gen_s, "reward_s": reward_s, "train_s": update.train_s, "sync_s": sync_s,
        "gen_tokens_per_s": sum(lengths) / roll.gen_s, "step_s": time.perf_counter() - t_step,
        "peak_mem_mb": peak_memory_mb(),
    }
    if cfg.sft_coef > 0:
        record["sft_loss"] = stats.get("sft_loss")
    if cfg.decision_anchor > 0:
        record.update({k: stats.get(k) for k in ("decision_log_odds", "decision_shift", "decision_anchor_loss")})
    if cfg.decision_project:
        record.update({k: stats.get(k) for k in ("decision_log_odds", "decision_move", "decision_move_left",
                                                 "decision_log_odds_after")})
    if adv.balance is not None:
        record.update(adv.balance)
    if adv.gold_groups is not None:  # reward, accuracy and lengths above are the sampled completions'
        record["gold_groups"] = adv.gold_groups
    tr.log.add(record)
    tr.log.progress(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
    trained = (f"ent {stats['entropy']:.2f} | kl {stats['kl']:.4f} | clip "
               f"{stats['clip_low'] + stats['clip_high']:.3f}") if stats.get("loss") is not None else "nothing trained"
    if stats.get("sft_loss") is not None:
        trained += f" | sft {stats['sft_loss']:.3f}"
    if stats.get("decision_shift") is not None:
        trained += f" | decision shift {stats['decision_shift']:+.3f}"
    if stats.get("decision_move") is not None:
        trained += (f" | decision log-odds {stats['decision_log_odds']:+.3f} -> {stats['decision_log_odds_after']:+.3f}"
                    f", move removed {stats['decision_move']:+.4f}")
    tr.log.say(f"step {tr.step}/{cfg.sft_steps + cfg.steps} | reward {record['reward']:.3f} | acc "
               f"{record['accuracy']:.2f} | fmt {record['format_rate']:.2f} | {trained} | zero-var "
               f"{record['zero_var_groups']}/{n_groups} | gen {roll.gen_s:.1f}s | train {update.train_s:.1f}s")


def answer_kind(text: str, cfg: Config) -> str:
    """"call" (a parsed answer with calls), "none" (a parsed answer without) or "bad" (unparsable). `text` is
    the whole answer: with --think prefill, the prefill + the completion."""
    parsed = freward.parse(text, cfg.fmt, think_required=cfg.think_required)
    return "bad" if not parsed.ok else "call" if parsed.calls else "none"


def evaluate(tr: Trainer, tag: str) -> dict:
    """Greedy accuracy on each held-out set, with its 95% CI; after the first evaluation also the change since
    the SFT checkpoint's (or the first) evaluation, paired by example. Under torchrun each rank evaluates
    its share with its own engine and the records are gathered."""
    cfg, ctx, eval_sets = tr.cfg, tr.ctx, tr.data.eval_sets
    t0 = time.perf_counter()
    share = fdist.split_for_rank(tr.data.eval_examples, ctx.rank, ctx.world_size)
    records = fdist.all_gather_list(generate_records(tr.engine, tr.tokenizer, share, fmt=cfg.fmt,
                                                     max_tokens=cfg.max_new_tokens,
                                                     think_required=cfg.think_required, prefill=cfg.prefill))
    fault_point("eval")
    summary = summarize(records)
    set_of = {e.id: name for name, exs in eval_sets.items() for e in exs}
    per_set = {}
    for name in eval_sets:
        mine = [r for r in records if set_of[r.id] == name]
        correct = sum(r.valid for r in mine)
        per_set[name] = {"correct": correct, "total": len(mine), "accuracy": correct / max(1, len(mine)),
                         "ci95": list(wilson_interval(correct, len(mine)))}
    record = {"step": tr.step, "phase": "eval", "tag": tag, "eval_accuracy": summary["micro_accuracy"],
              "eval_correct": summary["correct"], "eval_total": summary["total"],
              "eval_format_ok": sum(c["format_ok"] for c in summary["categories"].values())
              / max(1, summary["total"]), "eval_sets": per_set, "eval_s": time.perf_counter() - t0}
    tr.log.say(f"eval {tag} step {tr.step} | " + " | ".join(
        f"{name} {v['accuracy']:.3f} ({v['correct']}/{v['total']}, 95% CI {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f})"
        for name, v in per_set.items()) + f" | format {record['eval_format_ok']:.2f}")
    # tag -> {example id: 0/1} of every evaluation so far, this one included
    verdicts = {r["tag"]: r["verdicts"] for r in tr.log.history if r.get("phase") == "eval" and "verdicts" in r}
    verdicts[tag] = record["verdicts"] = {r.id: int(r.valid) for r in records}
    record["decisions"] = {r.id: answer_kind(r.text, cfg) for r in records}  # the call / no-call decision
    first = "after-sft" if "after-sft" in verdicts else next(iter(verdicts))
    if first != tag:  # the change since the SFT checkpoint (or the first evaluation), paired by example
        for name, exs in eval_sets.items():
            exs = [e for e in exs if e.id in verdicts[first]]  # a resume may have raised eval_limit
            diff, lo, hi = paired_change([verdicts[first][e.id] for e in exs], [verdicts[tag][e.id] for e in exs])
            record["eval_sets"][name]["change_since_" + first] = [diff, lo, hi]
            tr.log.say(f"  {name}: {first} -> {tag}: {100 * diff:+.1f} points (95% CI {100 * lo:+.1f} to "
                       f"{100 * hi:+.1f}, paired bootstrap over its {len(exs)} examples)")
    tr.log.add(record)
    if cfg.keep_best:
        keep_best(tr, record)
    if cfg.keep_best_on:
        keep_best(tr, record, cfg.keep_best_on)
    return record


def keep_best(tr: Trainer, record: dict, on: str = ""):
    """--keep_best: the policy of an evaluation whose mean accuracy over the eval sets beats every earlier one's
    (those before a resume included) is saved to out_dir/best, with best.json naming its step. on="<set>"
    (--keep_best_on): the same, ranked by that set's accuracy alone, in out_dir/best-on-set."""
    mean = lambda r: float(np.mean([v["accuracy"] for v in r["eval_sets"].values()]))
    score = (lambda r: float(r["eval_sets"][on]["accuracy"])) if on else mean
    earlier = [score(r) for r in tr.log.history if r.get("phase") == "eval" and "eval_sets" in r and r is not record
               and (not on or on in r["eval_sets"])]
    if earlier and score(record) <= max(earlier):
        return
    folder, ranked = tr.out / ("best-on-set" if on else "best"), (f"accuracy on {on}" if on else "mean accuracy")
    save_policy(tr.model, tr.tokenizer, folder)
    if fdist.is_main():
        (folder / "best.json").write_text(json.dumps(
            {"step": record["step"], "tag": record["tag"], "mean_accuracy": mean(record),
             **({"on": on, "accuracy": score(record)} if on else {}),
             "eval_sets": {k: v["accuracy"] for k, v in record["eval_sets"].items()}}, indent=1) + "\n")
    tr.log.say(f"best so far by {ranked}: step {record['step']} ({score(record):.3f}) -> {folder}")


# ------------------------------------------------------------------------------------------------ checkpoint

def training_seconds(history: list[dict]) -> float:
    """The run's training time: its SFT and RL steps' summed times (loading and evaluation excluded)."""
    return sum(r.get("step_s", 0.0) for r in history if r.get("phase") in ("sft", "rl"))


def finish_step(tr: Trainer, interrupt: Interrupt) -> bool:
    """After every step: all ranks agree whether to stop (Ctrl-C, time budget), and a checkpoint is written
    when one is due. Returns True to stop."""
    cfg, total = tr.cfg, tr.cfg.sft_steps + tr.cfg.steps
    interrupt.requested = fdist.any_rank(interrupt.requested)  # Ctrl-C may reach some ranks only
    trained_s = training_seconds(tr.log.history)
    # step times are each rank's own: all stop after the same step
    out_of_time = fdist.any_rank(bool(cfg.time_budget_s) and trained_s >= cfg.time_budget_s)
    if out_of_time and tr.step < total:
        tr.log.say(f"time budget spent: {trained_s:.0f} s of training >= time_budget_s {cfg.time_budget_s:.0f}; "
                   f"stopping at step {tr.step}")
    if interrupt.requested or out_of_time or tr.step == total or (cfg.save_every and tr.step % cfg.save_every == 0):
        path = save_checkpoint(cfg, tr.out, tr.step, tr.model, tr.tokenizer, tr.optimizer, tr.data.position,
                               tr.log.history)
        tr.log.say(f"checkpoint: {path}")
    return interrupt.requested or out_of_time


# ------------------------------------------------------------------------------------------------ errors and signals

def engine_failed(tr: Trainer, position: dict, error: Exception):
    """The rollout engine raised: checkpoint the steps trained so far (with the data position before the
    failed step's prompts, so a resume draws them again), then end with the traceback and one error line.
    Under torchrun the failing rank cannot checkpoint alone (saving is collective): the error propagates and
    torchrun stops the job; resume from the last periodic checkpoint."""
    if tr.ctx.world_size > 1:
        raise error
    traceback.print_exception(error)
    tr.data.position = position
    tr.log.end_progress()
    path = save_checkpoint(tr.cfg, tr.out, tr.step, tr.model, tr.tokenizer, tr.optimizer, tr.data.position,
                           tr.log.history)
    with contextlib.suppress(Exception):  # a broken engine may fail to close too
        tr.engine.close()
    tr.log.close()
    raise SystemExit(f"error: the rollout engine failed in step {tr.step + 1} ({type(error).__name__}: {error}); "
                     f"{f'steps 1-{tr.step}' if tr.step else 'the start'} saved in {path}; resume with: "
                     f"python -m fctrain.run --resume {tr.out}")


@contextlib.contextmanager
def usage_error(what: str, *also: type[Exception]):
    """A bad user input (a path, a model, a data spec) ends the run with one `error:` line: the ValueError or
    OSError (or `also`) raised while reading it. Other exceptions, bugs, keep their traceback."""
    try:
        yield
    except (ValueError, OSError, *also) as e:
        raise SystemExit(f"error: {what}: {e}") from None


class Interrupt:
    """Ctrl-C: the first one finishes the step, checkpoints and exits (code 130); a second one aborts."""

    def __init__(self, say):
        self.requested, self.say = False, say
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.requested = True
        self.say("\ninterrupt: finishing this step, then checkpointing and exiting (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_config(sys.argv[1:] if argv is None else argv, usage=__doc__)  # fails before any load
    ctx = fdist.init()  # torchrun's world (rank, world_size, this rank's device); one process without it
    say = print if ctx.is_main else (lambda *args, **kwargs: None)  # rank 0 alone prints
    out = Path(cfg.out_dir)
    with usage_error(f"out_dir {out}"):
        out.mkdir(parents=True, exist_ok=True)
    say("config:", json.dumps(dataclasses.asdict(cfg)))

    # -------------------------------------------------------------------------------------------- setup
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    use_vllm = choose_engine(cfg, ctx)
    with usage_error(f"model {cfg.model!r}", RuntimeError):  # RuntimeError: not a directory, no hub
        base_path = models.resolve_model(cfg.model or None)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise SystemExit(f"error: --resume {out}: no checkpoint found there")
    model_path = ckpt or base_path
    tokenizer, model, ref_model, layout, varlen = load_models(cfg, ctx, model_path, base_path, out, say)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=ADAMW_BETAS,
                                  weight_decay=cfg.weight_decay, foreach=True)
    data = load_data(cfg, tokenizer, say)
    step, history = restore(ckpt, ctx, model, optimizer, data, say) if ckpt is not None else (0, [])
    engine = start_engine(cfg, ctx, use_vllm, model, tokenizer, model_path, data, say)
    scorer = freward.RewardScorer(cfg.reward, cfg.fmt, think_required=cfg.think_required)
    log = MetricsLog(cfg, out, history, ctx.is_main, step)
    tr = Trainer(cfg, ctx, out, tokenizer, model, ref_model, optimizer, engine, scorer, data, log, layout, varlen,
                 step, decision=prompts.decision_tokens(tokenizer)
                 if cfg.decision_anchor > 0 or cfg.decision_project else None)
    interrupt = Interrupt(say)
    if step == 0 and data.eval_examples and (cfg.eval_at_start or cfg.sft_steps == 0):
        evaluate(tr, "before")
    stop = interrupt.requested

    # -------------------------------------------------------------------------------------------- SFT warm start
    while tr.step < cfg.sft_steps and not stop:
        sft_step(tr)
        if tr.step == cfg.sft_steps:
            start_rl(tr)  # the engine, the KL reference and an evaluation get the warm-started policy
        elif cfg.eval_every and tr.step % cfg.eval_every == 0 and data.eval_examples:
            evaluate_sft(tr, f"sft-{tr.step}")
        stop = finish_step(tr, interrupt)
        if stop and not interrupt.requested and tr.step < cfg.sft_steps and data.eval_examples:
            evaluate_sft(tr, "after-sft")  # the time budget ended SFT (an SFT-only control): its final policy
        check_first_sync(tr)

    # -------------------------------------------------------------------------------------------- RL loop
    total_steps = cfg.sft_steps + cfg.steps
    while tr.step < total_steps and not stop:
        t_step, lr = time.perf_counter(), lr_at(cfg, tr.step)
        model.train()
        # every rank draws the same prompts and keeps its share of whole groups (advantages stay local)
        position = dict(data.position)
        batch = fdist.split_for_rank(data.next_batch(cfg.prompts_per_step, cfg.no_call_share, cfg.contrast_pairs),
                                     ctx.rank, ctx.world_size)
        try:
            roll = sample_rollouts(tr, batch)                                   # 1. rollout
        except Exception as e:  # the engine failed (out of memory, a vLLM error): keep what was trained
            engine_failed(tr, position, e)
        results, rewards, reward_s = score_rollouts(tr, roll)                   # 2. reward
        if cfg.dynamic_sampling:                                                #    (DAPO: refill groups)
            try:
                roll, results, rewards, reward_s = refill_groups(tr, roll, results, rewards, reward_s)
            except Exception as e:
                engine_failed(tr, position, e)
        trained, train_rewards, gold = (gold_in_group(tr, roll, results, rewards) if cfg.gold_in_group
                                        else (roll, rewards, None))             #    (LUFFY: gold in all-wrong groups)
        adv = compute_advantages(tr, trained, train_rewards)                    # 3. advantage
        adv.gold_groups = None if gold is None else fdist.all_reduce_sum(gold)
        update = policy_update(tr, trained, adv, lr)                            # 4. loss and update
        fault_point("step")
        sync_s = sync_engine(tr) if update.trained else 0.0                     # 5. sync
        tr.step += 1
        log_rl_step(tr, lr, t_step, roll, results, adv, update, reward_s, sync_s)  # 6. log, evaluate,
        if cfg.eval_every and (tr.step - cfg.sft_steps) % cfg.eval_every == 0 and tr.step < total_steps:
            evaluate(tr, f"step-{tr.step}")
        stop = finish_step(tr, interrupt)                                       #    checkpoint
        check_first_sync(tr)

    log.end_progress()
    if interrupt.requested:
        say(f"interrupted at step {tr.step}; resume with: python -m fctrain.run --resume {out}")
    elif data.eval_examples and cfg.steps > 0 and not evaluated_now(tr):
        evaluate(tr, "after")
    engine.close()
    log.close()
    fdist.shutdown()
    return 130 if interrupt.requested else 0


if __name__ == "__main__":
    sys.exit(main())
