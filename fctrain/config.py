"""The run's configuration: one frozen dataclass, its presets, and the command line generated from it.

    cfg, resume = parse_config(["--preset", "paper-7b", "--steps", "50"])   # defaults < preset < file < CLI
    cfg, resume = parse_config(["--resume", "runs/mine", "--steps", "80"])  # the saved config, rescheduled

Every field is a `--name value` option, type-checked against its annotation; `--config FILE` (.json or
.toml) and `--preset NAME` set several at once. A run's config is printed at its start and saved in every
checkpoint (fctrain_config.json); `--resume` starts from that copy and may change only RESUME_OVERRIDES.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import kernels
from fctrain import packing
from fctrain import prompts
from fctrain import reward as freward
from fctrain.checkpoint import latest_checkpoint


@dataclass(frozen=True)
class Config:
    # model and data
    model: str = ""                        # local HF dir, hub id or offline name (qwen2.5-coder-0.5b); "" = offline
                                           # SmolLM2-135M-Instruct
    train_data: str = "split:train"        # bfcl:<categories>, split:<set> (fctrain/splits), an xLAM file, our
                                           # JSONL, or several joined by "+"
    eval_data: str = "split:test_in+split:test_irr"  # held out, never trained on, each "+"-part reported with
                                           # its 95% CI ("none" = no evaluation)
    eval_limit: int = 0                    # eval examples per "+"-part of eval_data (0 = all)
    fmt: str = "python"                    # output format: python (<think><answer>[calls]) | hermes
    think: str = "required"                # python format: required (the paper: <think> first) | optional (an
                                           # <answer> alone also counts, in the reward and the evaluation) |
                                           # prefill (every prompt ends with an opened `<think>` that the model
                                           # goes on writing: its own think, never a template; scored as
                                           # required on the prefill + completion; EGPO's H is that think's)
    max_prompt_tokens: int = 512           # longer prompts are dropped
    max_new_tokens: int = 160              # completion budget per sample
    max_bad_rows: float = 0.01             # malformed rows of a JSONL/xLAM file are skipped, counted and reported by
                                           # line; more than this fraction of a file's rows stops the run
    # algorithm
    algo: str = "egpo"                     # egpo | grpo
    reward: str = "partial"                # binary (1 iff every call is right: the paper) | partial (credit per
                                           # right function and argument) | format (well-formed output)
    egpo_lambda: float = 0.4               # EGPO entropy weight
    egpo_alpha: float = 2.0                # EGPO clip: |H term| <= |A| / alpha
    group_size: int = 8                    # completions per prompt (G)
    prompts_per_step: int = 4              # prompts per RL step (P)
    no_call_share: float = -1.0            # share of each RL step's prompts whose answer is no call (-1 = the data's
                                           # own mix, drawn in one shuffled order)
    contrast_pairs: bool = False           # each RL step's prompts are pairs: a swapped-tool negative ("neg:Q|T",
                                           # no call) and its question Q beside its own tools (a call), so the
                                           # call / no-call push of one cancels the other's except where they differ
    steps: int = 10                        # RL steps (after the SFT warm start)
    temperature: float = 0.7               # sampling temperature (also used for trainer log-probs)
    top_p: float = 1.0                     # nucleus sampling of the rollouts
    beta: float = 0.0                      # k3 KL weight to the frozen reference (0 = no reference model, no
                                           # reference pass; the paper: 0.001)
    eps_low: float = 0.2                   # ratio clip range
    eps_high: float = 0.2
    entropy_coef: float = 0.0              # entropy bonus
    rollout_is_cap: float = 2.0            # truncated importance weight cap (0 = off)
    loss_agg: str = "token-mean"           # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    updates_per_batch: int = 1             # optimizer passes over each rollout batch
    adv_norm: str = "std"                  # std: A = (r - mean) / std within each group (GRPO) | none: A = r - mean
                                           # (Dr. GRPO: a group that is nearly all right or all wrong gets small pushes)
    dynamic_sampling: int = 0              # DAPO: up to this many extra rollout rounds per step, each on newly drawn
                                           # prompts, until prompts_per_step groups have mixed rewards (0 = off)
    decision_balance: bool = False         # the step's net push toward calling is zero: the call / no-call part of the
                                           # advantages of call-needing and of no-call prompts is scaled down (never
                                           # up) until their pushes cancel, so the decision learned is per prompt, not
                                           # one global answer; credit within a decision is kept (run.balance_decision)
                                           # (measured: collapsed to abstaining; the abstain push was left free)
    answer_balance: bool = False           # each step pushes the two right answers (a call where one is needed, no
                                           # call where none fits) with equal mass: each group's push toward or away
                                           # from each answer as a whole is scaled down on the kind that pushes more;
                                           # credit within one answer is kept (run.balance_answers)
    decision_anchor: float = 0.0           # each RL step also descends decision_anchor x m^2, m the mean over the
                                           # step's prompts of the shift, from the frozen reference, of the log-odds
                                           # log P(no call) - log P(call) at the answer's opening (`<answer`, no
                                           # think): the global call / no-call offset stays the reference's while
                                           # each prompt's decision moves freely (run.decision_log_odds; 0 = off)
                                           # (measured on Qwen, seed 1: 1 swamps RL; 0.005 did not stop a collapse)
    decision_project: bool = False         # a constraint instead of a penalty: after each AdamW step, the step's
                                           # first-order move of that mean log-odds (the policy's own, over the
                                           # step's prompts) is taken out of the update in Adam's metric, so the
                                           # offset cannot drift while each prompt's decision moves
                                           # (run.project_decision_move; no reference model needed)
    # optimisation
    lr: float = 2e-5                       # RL learning rate
    warmup_steps: int = 2                  # RL steps of linear warm-up
    min_lr_ratio: float = 0.1              # cosine decay floor
    lr_schedule: str = "cosine"            # cosine: warm-up, then cosine to min_lr_ratio * lr at `steps` | constant:
                                           # warm-up, then lr (independent of run length: curves of runs compare)
    weight_decay: float = 0.0
    grad_clip: float = 1.0                 # global gradient norm bound
    micro_batch_tokens: int = 4096         # tokens computed per forward/backward (padding included)
    packing: str = "auto"                  # shared | packed | padded; auto = shared (SDPA) or packed (flash-attn)
    sft_steps: int = 40                    # cold-start SFT steps before RL (0 = none)
    sft_batch_size: int = 8                # examples per SFT step
    sft_lr: float = 5e-5                   # SFT learning rate (constant)
    sft_think: str = "evidence"            # SFT target's think: evidence (restates the request and what each tool
                                           # does, then decides) | plan (names function + parameters) | restate
                                           # (spells out the whole answer)
    sft_loss: str = "all"                  # the SFT target's tokens trained: all | answer (the think's own words are
                                           # context, not targets: `</think>` and the answer are trained)
    gold_in_group: bool = False            # LUFFY-style: a group with no right completion gets the prompt's gold
                                           # answer (the SFT target, sft_think) in place of its last sample
    sft_coef: float = 0.0                  # RL steps also descend sft_coef x the mean -log p of the reference
                                           # completions (sft_think) of the step's prompts: an SFT term beside the
                                           # RL loss (LUFFY / SRFT-style mixed objective; 0 = off)
    time_budget_s: float = 0.0             # stop after the step that brings the training time (sum of step
                                           # times, evaluation excluded) to this many seconds (0 = no limit)
    # system
    engine: str = "auto"                   # vllm | hf | auto (vllm if installed)
    engine_dtype: str = "auto"             # vLLM weights/compute dtype; auto = bfloat16 on GPU, float32 on CPU
    engine_memory: float = 0.0             # share of the GPU vLLM may take (its gpu_memory_utilization); 0 = what is
                                           # free beside the trainer's models, gradients and optimizer state
    engine_check: bool = True              # at engine start and after the first weight sync, compare the engine's
                                           # log-probs with the trainer's fp32 forward (rollout.check_engine);
                                           # refuse (or, with engine_dtype auto, fall back to float32) if off
    train_dtype: str = "float32"           # float32 | bfloat16 (pure: half the memory, bf16 rounding in
                                           # AdamW) | amp-bf16 (fp32 master weights, bf16 autocast compute)
    attn_impl: str = "auto"                # sdpa | flash_attention_2 | auto (flash-attn on CUDA when installed and
                                           # training in bf16 / amp-bf16; SDPA otherwise: flash-attn refuses fp32)
    liger: str = "auto"                    # Liger-Kernel RMSNorm/RoPE/SwiGLU: on | off | auto (CUDA + installed)
    grad_checkpointing: bool = False       # recompute decoder layers in the backward (less activation memory)
    impl: str = "auto"                     # fused loss implementation: auto | triton | torch | naive
    seed: int = 0                          # data order, sampling and initial RNG state
    out_dir: str = "runs/default"          # checkpoints, metrics.jsonl, curves.png
    eval_every: int = 0                    # SFT or RL steps between evaluations (0 = after SFT and at the end)
    eval_at_start: bool = False            # also evaluate the untrained model
    save_every: int = 10                   # steps between checkpoints
    keep_last: int = 2                     # checkpoints kept
    keep_best: bool = False                # out_dir/best: the evaluated policy with the highest mean accuracy over
                                           # the eval sets so far (weights only; an earlier one wins a tie)
    keep_best_on: str = ""                 # one of eval_data's "+"-parts (e.g. split:val): also keep out_dir/best-on-set,
                                           # the evaluated policy with the highest accuracy on that set alone (ties alike)
    tensorboard: bool = False              # also log to <out_dir>/tb
    wandb: bool = False                    # also log to Weights & Biases (project fctrain)

    def __post_init__(self):
        checks = [
            (self.algo in ("egpo", "grpo"), f"algo must be egpo or grpo, got {self.algo!r}"),
            (self.reward in freward.KINDS, f"reward must be one of {freward.KINDS}, got {self.reward!r}"),
            (self.fmt in ("python", "hermes"), f"fmt must be python or hermes, got {self.fmt!r}"),
            (self.think in prompts.THINK_MODES, f"think must be one of {prompts.THINK_MODES}, got {self.think!r}"),
            (not (self.think == "prefill" and self.fmt != "python"), "think prefill is for the python format"),
            (not (self.think == "prefill" and self.sft_think == "none"
                  and (self.sft_steps or self.sft_coef or self.gold_in_group)),
             "think prefill opens a think the SFT target must go on with: give --sft_think plan|restate|evidence|data"),
            (not (self.think == "prefill" and (self.decision_anchor or self.decision_project)),
             "decision_anchor / decision_project read the decision right after the prompt; with think prefill "
             "the prompt ends inside the think"),
            (self.sft_think in prompts.THINK_STYLES, f"sft_think must be one of {prompts.THINK_STYLES}"),
            (self.sft_loss in ("all", "answer"), f"sft_loss must be all or answer, got {self.sft_loss!r}"),
            (not (self.sft_loss == "answer" and self.sft_think == "none"),
             "sft_loss answer trains the answer after the think: sft_think none has no think"),
            (self.time_budget_s >= 0, "time_budget_s must be >= 0"),
            (self.sft_coef >= 0, "sft_coef must be >= 0"),
            (not (self.sft_think == "none" and self.fmt == "python" and self.think == "required"
                  and (self.sft_steps or self.sft_coef or self.gold_in_group)),
             "sft_think none writes answers without a think block: give --think optional"),
            (self.no_call_share == -1 or 0 <= self.no_call_share <= 1, "no_call_share must be -1 or in [0, 1]"),
            (not self.contrast_pairs or (self.prompts_per_step % 2 == 0 and self.no_call_share == -1),
             "contrast_pairs needs an even prompts_per_step and no no_call_share"),
            (0 <= self.max_bad_rows <= 1, "max_bad_rows must be a fraction in [0, 1]"),
            (self.loss_agg in kernels.LOSS_AGGREGATIONS, f"loss_agg must be one of {kernels.LOSS_AGGREGATIONS}"),
            (self.engine in ("vllm", "hf", "auto"), f"engine must be vllm, hf or auto, got {self.engine!r}"),
            (0 <= self.engine_memory < 1, "engine_memory must be a share of the GPU in [0, 1)"),
            (self.train_dtype in ("float32", "bfloat16", "amp-bf16"), "train_dtype must be float32, bfloat16 or amp-bf16"),
            (self.packing in ("auto",) + packing.LAYOUTS, f"packing must be auto or one of {packing.LAYOUTS}"),
            (self.attn_impl in ("auto", "sdpa", "flash_attention_2"), "attn_impl must be auto, sdpa or flash_attention_2"),
            (not (self.attn_impl == "flash_attention_2" and self.packing == "shared"),
             "packing=shared needs an attention mask; flash_attention_2 cannot share prompts (use packed)"),
            (self.liger in ("auto", "on", "off"), "liger must be auto, on or off"),
            (self.group_size >= 2, "group_size must be >= 2 (advantages are relative within a group)"),
            (self.prompts_per_step >= 1 and self.steps >= 0 and self.sft_steps >= 0, "steps must be >= 0"),
            (self.temperature > 0, "temperature must be > 0 (sampling)"),
            (self.lr > 0 and self.sft_lr > 0, "learning rates must be > 0"),
            (self.beta >= 0 and self.egpo_alpha > 0, "beta must be >= 0 and egpo_alpha > 0"),
            (self.updates_per_batch >= 1, "updates_per_batch must be >= 1"),
            (self.adv_norm in ("std", "none"), f"adv_norm must be std or none, got {self.adv_norm!r}"),
            (self.dynamic_sampling >= 0, "dynamic_sampling must be >= 0 (extra rollout rounds)"),
            (not (self.decision_balance and self.answer_balance),
             "decision_balance and answer_balance exclude each other"),
            (self.decision_anchor >= 0, "decision_anchor must be >= 0"),
            (not ((self.decision_anchor or self.decision_project) and self.fmt != "python"),
             "decision_anchor / decision_project read the `<answer>[` decision of the python format: give --fmt python"),
            (not (self.decision_anchor and self.decision_project),
             "decision_anchor and decision_project exclude each other (a penalty on the offset, or a constraint)"),
            (not (self.dynamic_sampling and self.contrast_pairs), "dynamic_sampling cannot keep contrast pairs together"),
            (self.lr_schedule in ("cosine", "constant"), f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}"),
            (not self.keep_best_on or self.keep_best_on in [x.strip() for x in self.eval_data.split("+")],
             f"keep_best_on must be one of eval_data's \"+\"-parts ({self.eval_data!r}), got {self.keep_best_on!r}"),
            (self.micro_batch_tokens >= self.max_prompt_tokens + self.max_new_tokens,
             "micro_batch_tokens must hold at least one full sequence (max_prompt_tokens + max_new_tokens)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad config: {message}")

    @property
    def prefill(self) -> str:
        """The text every prompt ends with and every completion is scored after: an opened think for
        think="prefill", else nothing."""
        return prompts.think_prefill(self.think)

    @property
    def think_required(self) -> bool:
        """Whether the reward and the evaluation need the <think> block (in the prefill + completion)."""
        return self.think != "optional"


PRESETS = {
    # The paper's run: Qwen2.5-Coder-7B-Instruct, lr 1e-6, beta 0.001, T 0.7, binary reward, EGPO.
    "paper-7b": dict(model="Qwen/Qwen2.5-Coder-7B-Instruct", lr=1e-6, beta=0.001, reward="binary", sft_steps=0, group_size=8,
                     prompts_per_step=32, steps=500, max_prompt_tokens=2048, max_new_tokens=1024,
                     micro_batch_tokens=32768, train_dtype="bfloat16", engine="vllm",
                     train_data="bfcl:live_simple,live_multiple,live_parallel,live_parallel_multiple",
                     eval_data="bfcl:simple_python,multiple,parallel,parallel_multiple", eval_limit=0),
    # Qwen2.5-Coder-0.5B-Instruct (offline, fctrain.models.QWEN_CODER_05B) on a CPU: the paper's family at
    # 0.5B. Literature settings as a start (tool-calling RL runs use lr 1e-6; 2e-6 for 0.5B, to be chosen
    # on val), beta 0.001, T 0.7, 16 prompts x 4 samples; no SFT warm start. Asked for the python format it
    # answers <answer>[...]</answer> without <think>: with the think required its val pass@16 is 1.7% (no
    # signal), with `think="optional"` pass@1 15.9 / pass@16 57.5 and 43% of groups of 8 mixed (binary),
    # benchmarks/results/headroom_cpu/; so the think is optional here. Prompts <= 768 tokens and 256 new tokens to keep a step affordable on
    # 2 cores; fp32 weights + gradients + AdamW moments take 7.9 GB, the reference and vLLM 2 GB each, so
    # activation checkpointing and 2048-token micro-batches keep activations small on a shared 24 GB machine.
    # lr 1e-6, constant after 2 warm-up steps: chosen on val (benchmarks/results/qwen_pilots_cpu/)
    "qwen0.5b-cpu": dict(model="qwen2.5-coder-0.5b", lr=1e-6, lr_schedule="constant", warmup_steps=2, beta=0.001,
                         temperature=0.7, prompts_per_step=16, group_size=4, fmt="python", think="optional", sft_steps=0, max_prompt_tokens=768,
                         max_new_tokens=256,
                         micro_batch_tokens=2048, grad_checkpointing=True, train_dtype="float32"),
}


# What a resumed run may change: its length, evaluation, checkpointing and logging. Anything else (model,
# data, format, algorithm, batch shape, optimiser, seed...) would make it another run, so it is refused.
RESUME_OVERRIDES = ("steps", "eval_every", "eval_at_start", "eval_limit", "save_every", "keep_last", "keep_best",
                    "keep_best_on",
                    "time_budget_s", "tensorboard", "wandb", "max_bad_rows", "engine_memory", "engine_check")

# Fields that are gone, each with why: a checkpoint saved while it existed still resumes (the key is dropped).
RETIRED = {"reward_processes": "rewards are scored in-process (reward.RewardScorer)"}


ADAMW_BETAS = (0.9, 0.99)  # the trainer's AdamW betas (the benchmarks use the same)


def parse_config(argv: list[str], usage: str = "") -> tuple[Config, bool]:
    """`--key value` overrides generated from Config's fields (type-checked), plus --config FILE (.json or
    .toml), --preset NAME and --resume OUT_DIR; precedence: defaults < preset < file < command line.
    --resume starts from the config saved in OUT_DIR's latest checkpoint instead of the defaults; a preset,
    file or option may then change only RESUME_OVERRIDES (a value equal to the saved one is no change, so
    the command that started a run, plus --resume, continues it). --help prints `usage` and the options.
    Returns (config, resume)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values, args = {}, list(argv)
    if "--help" in args or "-h" in args:
        print(usage + "\nOptions:\n" + "\n".join(f"  --{n} ({f.type}, default {f.default!r})"
                                                  for n, f in fields.items()))
        sys.exit(0)
    pairs = {}
    while args:
        key = args.pop(0)
        if not key.startswith("--") or not args:
            raise SystemExit(f"error: expected `--key value`, got {key!r}")
        pairs[key[2:].replace("-", "_")] = args.pop(0)
    if "preset" in pairs:
        name = pairs.pop("preset")
        if name not in PRESETS:
            raise SystemExit(f"error: unknown preset {name!r}; known: {sorted(PRESETS)}")
        values.update(PRESETS[name])
    if "config" in pairs:
        path = Path(pairs.pop("config"))
        try:
            if path.suffix == ".toml":
                import tomllib
                values.update(tomllib.loads(path.read_text()))
            else:
                values.update(json.loads(path.read_text()))
        except (OSError, ValueError) as e:  # missing file, bad TOML/JSON
            raise SystemExit(f"error: --config {path}: {e}") from None
    resume = pairs.pop("resume", None)
    for key, raw in pairs.items():
        if key not in fields:
            raise SystemExit(f"error: unknown option --{key}; see --help")
        kind = fields[key].type
        try:
            if kind == "bool":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                values[key] = raw.lower() in ("true", "1")
            else:
                values[key] = {"int": int, "float": float, "str": str}[kind](raw)
        except ValueError:
            raise SystemExit(f"error: --{key} expects {kind}, got {raw!r}") from None
    unknown = set(values) - set(fields)
    if unknown:
        raise SystemExit(f"error: unknown config keys {sorted(unknown)}")
    if resume:
        values = resumed_values(Path(resume), values, fields)
    try:
        cfg = Config(**values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return cfg, resume is not None


def resumed_values(out: Path, given: dict, fields: dict) -> dict:
    """The config values of the run in `out` (its latest checkpoint's) with the `given` changes that
    RESUME_OVERRIDES allow; refuses any other change, prints the ones made."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise SystemExit(f"error: --resume {out}: no checkpoint found there")
    try:
        saved = json.loads((ckpt / "fctrain_config.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --resume {out}: cannot read {ckpt.name}/fctrain_config.json: {e}") from None
    saved = {k: v for k, v in saved.items() if k not in RETIRED}
    if set(saved) - set(fields):
        raise SystemExit(f"error: --resume {out}: its config has keys this fctrain does not know: "
                         f"{sorted(set(saved) - set(fields))}")
    if "out_dir" in given and Path(given["out_dir"]) != out:
        raise SystemExit(f"error: --out_dir {given['out_dir']} and --resume {out} disagree; a run resumes in place")
    was = {name: saved.get(name, f.default) for name, f in fields.items()}  # fields added since: defaults
    changes = {k: v for k, v in given.items() if k != "out_dir" and v != was[k]}
    refused = [k for k in changes if k not in RESUME_OVERRIDES]
    if refused:
        raise SystemExit(f"error: --resume continues the run as configured; cannot change "
                         f"{', '.join(f'{k} ({was[k]!r} -> {changes[k]!r})' for k in refused)} mid-run "
                         f"(may change: {', '.join(RESUME_OVERRIDES)})")
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 alone prints
        print(f"resume {out} from {ckpt.name}: " + (", ".join(f"{k} {was[k]!r} -> {v!r}" for k, v in changes.items())
                                                    or "saved config, unchanged"))
    return {**was, **changes, "out_dir": str(out)}

