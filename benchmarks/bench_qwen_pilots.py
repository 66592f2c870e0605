"""Qwen2.5-Coder-0.5B RL pilots on val (issue 30, part 2): which learning rate and recipe move the val set
without collapsing the policy, before any long run or held-out evaluation.

    python benchmarks/bench_qwen_pilots.py run                   # unfinished arms in order; finished ones skipped
    python benchmarks/bench_qwen_pilots.py run --arms lr5e-7 lr5e-7-pairs
    python benchmarks/bench_qwen_pilots.py report                # table, paired changes and the plot
    python benchmarks/bench_qwen_pilots.py heldout --commit      # the kept final policies on (a)/(b)/(c)
    python benchmarks/bench_qwen_pilots.py val-irr --commit      # kept policies on val_irr, (c)'s kind, for choosing
    python benchmarks/bench_qwen_pilots.py run --arms long-rl long-sft --piece-s 5400 --commit   # a piece each
    python benchmarks/bench_qwen_pilots.py rebuild --arms sft-start-s0 --commit   # a kept policy back, new machine

Every arm is `python -m fctrain.run --preset qwen0.5b-cpu` (as it was when the pilots ran: lr 2e-6 with
a cosine schedule, overridden here; the preset now holds what these pilots chose: 1e-6, constant) (16 prompts
x 4 samples, T 0.7, beta 1e-3,
python format with the think optional, no SFT) with a run-length-free schedule (`--lr_schedule constant`,
2 warm-up steps) plus the arm's own options, from the same seed and the raw model. The trainer evaluates
greedily on `split:val` (60 call-needing, 30 live_irrelevance and 30 swapped-tool no-call prompts) every
EVAL_EVERY steps; the first arm also evaluates the untrained model (step 0), which every arm's later
evaluations are paired with (the same greedy engine on the same weights: one evaluation serves all).
The held-out sets are never looked at here.

An arm is finished when RESULTS/<arm>.metrics.jsonl exists; an interrupted one resumes from its last
checkpoint under runs/qwen_pilots/<arm> (save_every = EVAL_EVERY). A finished arm keeps its final policy
(weights only) in runs/qwen_pilots/<arm>/final for a later held-out evaluation. Each finished arm's metrics are copied
to RESULTS and committed at once (`--commit`), since a session can end at any moment.

`heldout` (issue 30, part 3's last step) evaluates, once each and only after the arms were chosen on val,
the untrained model and the final policy of each arm in HELDOUT_ARMS on the held-out sets (a) test_in,
(b) test_ood, (c) test_irr (BFCL irrelevance), and on val again: the same trainer evaluation
(`--steps 0`), so its val verdicts must repeat the arm's own last val evaluation, which the report counts.
It reports each set's accuracy (Wilson 95% CI), the call / no-call decisions, and paired changes (bootstrap
over the set's prompts): each policy against the untrained model, and the RL arm against the SFT control.

`val-irr` evaluates kept policies (VAL_IRR_ARMS) the same way on `val_irr`: the 120 BFCL `irrelevance` examples
that (c) leaves unused. Val's own no-call prompts are another kind (live_irrelevance, swapped tools), so a
setting aimed at the irrelevance target is chosen on val + val_irr, never on (c).

The long arms (issue 30, part 3: the curve until it flattens or 150 RL steps, against the SFT control at the
same training seconds) outlast a session, so they run in pieces: `--piece-s S` interrupts an arm's trainer
after S wall seconds (Ctrl-C: it finishes the step, checkpoints and exits), copies its curve so far to
RESULTS/<arm>.partial.metrics.jsonl, commits it, and goes on to the next arm; the next `run` resumes each from
its checkpoint. A control of an unfinished RL arm trains up to the RL arm's training seconds so far and is
finished only once its RL arm is. A checkpoint lives under runs/, which a new machine does not have: there `run`
refuses an arm with a committed curve and no checkpoint unless given `--restart`, which trains it again from
step 0 (on the same kind of machine it repeats the curve: the evaluations both reached are compared, prompt by
prompt, in RESULTS/<arm>.runs.jsonl), keeping the committed curve until the new one has gone past it.

The report gives, per arm and evaluation: training seconds (the trainer's summed step times), val accuracy
overall and on call-needing / no-call prompts, how often the answer is a call, no call or unparsable on each,
and the paired change since step 0 with a 95% bootstrap CI over val's prompts; and per arm the training
curve (reward, mixed groups, completion length, KL, entropy).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import power  # noqa: E402
from fctrain.eval import paired_change, wilson_interval  # noqa: E402  (the trainer's own CIs)

REPO = common.REPO
RESULTS = common.RESULTS / "qwen_pilots_cpu"
WORK = REPO / "runs" / "qwen_pilots"
STEPS, EVAL_EVERY = 10, 5
COMMON = ["--preset", "qwen0.5b-cpu", "--lr_schedule", "constant", "--warmup_steps", "2", "--seed", "0",
          "--eval_data", "split:val", "--eval_every", str(EVAL_EVERY), "--save_every", str(EVAL_EVERY),
          "--keep_last", "1", "--steps", str(STEPS)]
SFT_START = "runs/qwen_pilots/sft-control-s1/final"  # sft-control-s1's kept final policy (run_arm keeps it)
SFT_START0 = "runs/qwen_pilots/sft-start-s0/final"  # sft-start-s0's: the seed-0 start (26 SFT steps, as seed 1's)
SFT_START2 = "runs/qwen_pilots/sft-start-s2/final"  # sft-start-s2's: the seed-2 start (26 SFT steps)
SELF_THINK = "benchmarks/results/qwen_pilots_cpu/self_think/train.jsonl"  # bench_self_think.py: the model's own thinks
SELF_THINK_HINT = "benchmarks/results/qwen_pilots_cpu/self_think_hint/train.jsonl"  # --hint: reasoned toward the gold
THINK_START = "runs/qwen_pilots/think-sft-start-s1/final"  # think-sft-start-s1's: SFT on them, from inside the think
THINK_ANS_START = "runs/qwen_pilots/think-ans-sft-start-s1/final"  # the think start that abstains (--sft_loss answer)
SELF_THINK_REFUSE = "benchmarks/results/qwen_pilots_cpu/self_think_hint_refuse/train.jsonl"  # --hint --refuse 8
VAL_AND_IRR = "split:val+split:val_irr"  # the long near-miss arms: both validation sets at each evaluation


def long_nm(start: str, seed: str, steps: str) -> list[str]:
    """A long near-miss RL arm: sft-rl-nm's recipe from `start` for up to `steps`, val + val_irr every 10 steps,
    the best of them kept (--keep_best: the policy held out)."""
    return ["--model", start, "--lr", "1e-6", "--seed", seed, "--train_data", "split:train_nm", "--steps", steps,
            "--eval_every", "10", "--save_every", "5", "--eval_data", VAL_AND_IRR, "--eval_at_start", "true",
            "--keep_best", "true"]


def long_nm_more(start: str, seed: str) -> list[str]:
    """Its control: SFT going on from the same start (sft-more's recipe) for the RL arm's training seconds."""
    return ["--model", start, "--sft_steps", "100000", "--steps", "0", "--sft_think", "none", "--sft_lr", "2e-5",
            "--sft_batch_size", "8", "--beta", "0", "--eval_every", "20", "--save_every", "10", "--seed", seed,
            "--eval_data", VAL_AND_IRR, "--keep_best", "true"]


# In the order they run. The 5-step run at lr up to 2e-6 (results/qwen_5step_cpu) collapsed to short
# no-call answers after 3 updates, so the sweep starts at the paper's 1e-6 and goes down.
ARMS = {
    "lr5e-7": ["--lr", "5e-7", "--eval_at_start", "true"],
    # the abstain collapse is a global push: pair each swapped-tool negative with its own question
    "lr5e-7-pairs": ["--lr", "5e-7", "--contrast_pairs", "true"],
    "lr1e-6": ["--lr", "1e-6"],
    # The SFT-only control (issue 30, part 3): the same raw start and training pool, gold answers in the
    # model's own answer-only form (`<answer>[...]</answer>`, what the think-optional reward pays), 8 per step
    # at sft_lr 2e-5 (one value, not swept: the middle of the usual full fine-tune range for small Qwen2.5
    # models), for the training seconds of the RL arm named in CONTROL_OF, evaluated every 10 SFT steps.
    "sft-control": ["--sft_steps", "100000", "--steps", "0", "--sft_think", "none", "--sft_lr", "2e-5",
                    "--sft_batch_size", "8", "--beta", "0", "--eval_every", "10", "--save_every", "10"],
    # the best arm on val so far, again with another seed (prompt order and samples): how much of its gain
    # is the seed's
    "lr1e-6-s1": ["--lr", "1e-6", "--seed", "1"],
    # DAPO / Dr. GRPO: no std division, refill zero-variance groups, wider upper clip
    "lr5e-7-dapo": ["--lr", "5e-7", "--adv_norm", "none", "--dynamic_sampling", "2", "--eps_high", "0.28"],
    "lr2e-7": ["--lr", "2e-7"],
    # lr1e-6-s1 fell to calling on every prompt (val 37.5 against seed 0's 78.3): the control of that seed,
    # more seeds, and the issue's balanced mix (half the step's prompts no-call, binary reward so a call-needing
    # prompt's partial credit does not outweigh the no-call ones)
    "sft-control-s1": ["--sft_steps", "100000", "--steps", "0", "--sft_think", "none", "--sft_lr", "2e-5",
                       "--sft_batch_size", "8", "--beta", "0", "--eval_every", "10", "--save_every", "10",
                       "--seed", "1"],
    "lr1e-6-s2": ["--lr", "1e-6", "--seed", "2"],
    "lr1e-6-bal": ["--lr", "1e-6", "--no_call_share", "0.5", "--reward", "binary"],
    "lr1e-6-bal-s1": ["--lr", "1e-6", "--no_call_share", "0.5", "--reward", "binary", "--seed", "1"],
    # lr1e-6-bal abstained on everything by step 5 (a 0.5 reward for free on the balanced mix), seed 1 called on
    # everything: the SFT term beside the RL loss (LUFFY / SRFT) keeps both answers' gold in every update.
    # Seed 1, the seed that collapsed; coefficient 1, one value, not swept.
    "lr1e-6-sft1-s1": ["--lr", "1e-6", "--sft_coef", "1.0", "--sft_think", "none", "--seed", "1"],
    # Three of four RL runs fell into one global answer (calling or abstaining on every prompt): the step's net
    # push toward calling set to zero (--decision_balance), so only a per-prompt decision can be learned.
    # Seed 1 first: the seed that fell to calling, with and without the SFT term.
    "lr1e-6-dbal-s1": ["--lr", "1e-6", "--decision_balance", "true", "--seed", "1"],
    "lr1e-6-dbal": ["--lr", "1e-6", "--decision_balance", "true"],
    # lr1e-6-dbal-s1 abstained on everything from step 3: it zeroed the push toward calling but left the push
    # from unparsable answers to `[]` on no-call prompts free. --answer_balance pushes the two right answers
    # (a call where one is needed, `[]` where none fits) with equal mass in every step instead.
    "lr1e-6-abal-s1": ["--lr", "1e-6", "--answer_balance", "true", "--seed", "1"],
    "lr1e-6-abal": ["--lr", "1e-6", "--answer_balance", "true"],
    # a third seed of the answer balance, and of plain RL beside it (lr1e-6-s2 above): how often each collapses
    "lr1e-6-abal-s2": ["--lr", "1e-6", "--answer_balance", "true", "--seed", "2"],
    # The decision probe: RL policies that collapsed still rank call against no-call prompts nearly as well as
    # SFT (AUC 0.96, 0.92 against 0.97); what they lose is the offset. --decision_anchor pins the step's mean
    # log-odds log P(no call) - log P(call) at `<answer` to the reference's and leaves each prompt's free.
    # Seed 1 first: plain RL on it fell to calling on everything. Coefficient 1 (a guess) swamped the RL gradient
    # (grad norm 1075 and 4829 at steps 2-3 against RL's ~8, all clipped to 1: the update was the anchor's alone)
    # and overshot (shift -0.58, then +2.93 nats); stopped after step 4. The measured |d mean(s)/dθ| (~900 per
    # nat) sets the next value: C = 0.005 makes a 1-nat drift pull with about RL's own gradient norm (2 C 900 ~ 9).
    "lr1e-6-anchor-s1": ["--lr", "1e-6", "--decision_anchor", "1.0", "--seed", "1"],
    "lr1e-6-anchor5e-3-s1": ["--lr", "1e-6", "--decision_anchor", "0.005", "--seed", "1"],
    "lr1e-6-anchor5e-3": ["--lr", "1e-6", "--decision_anchor", "0.005"],
    "lr1e-6-anchor5e-3-s2": ["--lr", "1e-6", "--decision_anchor", "0.005", "--seed", "2"],
    # The anchor is a penalty on the offset's state: it acts only after a drift, and one update jumped 2.3 nats.
    # --decision_project constrains each update instead: the step's first-order move of the mean log-odds is taken
    # out in Adam's metric before the next rollout. Seed 1 first (plain RL on it fell to calling on everything).
    "lr1e-6-proj-s1": ["--lr", "1e-6", "--decision_project", "true", "--seed", "1"],
    "lr1e-6-proj": ["--lr", "1e-6", "--decision_project", "true"],
    "lr1e-6-proj-s2": ["--lr", "1e-6", "--decision_project", "true", "--seed", "2"],
    # RL from an SFT start (LUFFY / SRFT's other half; the probe: SFT spreads the two kinds of prompt 6.3 nats
    # apart, RL at this budget 3x slower): sft-control-s1's kept final policy (26 SFT steps, val 71.7, not chosen
    # on val: the end of its budget) trained on by plain RL, against SFT going on from the same weights for the
    # same training seconds (sft-more-s1). Both with fresh optimizers and a fresh seed (11: neither replays the
    # prompt order the start was trained on); the KL reference is the SFT start.
    "sft-rl-s1": ["--model", SFT_START, "--lr", "1e-6", "--seed", "11", "--eval_at_start", "true"],
    "sft-more-s1": ["--model", SFT_START, "--sft_steps", "100000", "--steps", "0", "--sft_think", "none",
                    "--sft_lr", "2e-5", "--sft_batch_size", "8", "--beta", "0", "--eval_every", "10",
                    "--save_every", "10", "--seed", "11"],
    # The same design on a second SFT start, for seeds over starts: seed 0's SFT control (sft-control) was not
    # kept, and its budget came from lr1e-6's seconds on another kind of machine, so the start is 26 SFT steps
    # at seed 0 (as many as seed 1's start took), evaluated once at its end; then RL (seed 10) against SFT going
    # on (seed 10) from it, exactly as sft-rl-s1 / sft-more-s1.
    "sft-start-s0": ["--sft_steps", "26", "--steps", "0", "--sft_think", "none", "--sft_lr", "2e-5",
                     "--sft_batch_size", "8", "--beta", "0", "--eval_every", "1000", "--save_every", "13"],
    "sft-rl-s0": ["--model", SFT_START0, "--lr", "1e-6", "--seed", "10", "--eval_at_start", "true"],
    "sft-more-s0": ["--model", SFT_START0, "--sft_steps", "100000", "--steps", "0", "--sft_think", "none",
                    "--sft_lr", "2e-5", "--sft_batch_size", "8", "--beta", "0", "--eval_every", "10",
                    "--save_every", "10", "--seed", "10"],
    # RL from the SFT start kept irrelevance at the start's ~70% (held out 71.7, target 80): the same arm with half
    # of each step's prompts no-call (--no_call_share 0.5), chosen against sft-rl-s1 on val only. Its start's
    # step-0 evaluation is sft-rl-s1's (the same weights).
    "sft-rl-bal-s1": ["--model", SFT_START, "--lr", "1e-6", "--seed", "11", "--no_call_share", "0.5"],
    # chosen on validation (val +0.8 [+0.0, +2.5], val_irr +9.2 [+4.2, +15.0] against sft-rl-s1): its seed 0
    "sft-rl-bal-s0": ["--model", SFT_START0, "--lr", "1e-6", "--seed", "10", "--no_call_share", "0.5"],
    # ... and its seed 2 (the start that collapsed to abstaining); three seeds of the balanced mix
    "sft-rl-bal-s2": ["--model", SFT_START2, "--lr", "1e-6", "--seed", "12", "--no_call_share", "0.5"],
    # A third SFT start (seed 2), exactly as seed 0's: three starts give a spread over seeds, which two cannot
    "sft-start-s2": ["--sft_steps", "26", "--steps", "0", "--sft_think", "none", "--sft_lr", "2e-5",
                     "--sft_batch_size", "8", "--beta", "0", "--eval_every", "1000", "--save_every", "13",
                     "--seed", "2"],
    "sft-rl-s2": ["--model", SFT_START2, "--lr", "1e-6", "--seed", "12", "--eval_at_start", "true"],
    "sft-more-s2": ["--model", SFT_START2, "--sft_steps", "100000", "--steps", "0", "--sft_think", "none",
                    "--sft_lr", "2e-5", "--sft_batch_size", "8", "--beta", "0", "--eval_every", "10",
                    "--save_every", "10", "--seed", "12"],
    # The held-out irrelevance set (c) offers a function on the question's topic that cannot answer it; the
    # training pool's 160 swapped-tool negatives offer one from another field (13 of 160 share a topic word with
    # their question). The same questions beside near-miss tools instead (split:train_nm, data.near_miss_candidates:
    # 141 of 160 share one), everything else as sft-rl-s1; chosen against it on val_irr and val.
    "sft-rl-nm-s1": ["--model", SFT_START, "--lr", "1e-6", "--seed", "11", "--train_data", "split:train_nm"],
    # chosen on val_irr (+7.5 [+3.3, +12.5] against sft-rl-s1) and val (+0.8): its seeds 0 and 2, as sft-rl-s0/-s2.
    # Their starts were rebuilt on another machine (`rebuild`: a sibling of the committed start, not a copy), so
    # each evaluates its own start at step 0.
    "sft-rl-nm-s0": ["--model", SFT_START0, "--lr", "1e-6", "--seed", "10", "--train_data", "split:train_nm",
                     "--eval_at_start", "true"],
    "sft-rl-nm-s2": ["--model", SFT_START2, "--lr", "1e-6", "--seed", "12", "--train_data", "split:train_nm",
                     "--eval_at_start", "true"],
    # Irrelevance, the other lever: a group none of whose 4 samples is right teaches nothing (zero variance), so a
    # near-miss negative the policy always calls on is never pushed toward `[]`. LUFFY's gold answer in such a
    # group (--gold_in_group; the gold in the model's own answer-only form, --sft_think none): sft-rl-nm-s1 with
    # it, chosen against it on val + val_irr.
    "sft-rl-nm-gold-s1": ["--model", SFT_START, "--lr", "1e-6", "--seed", "11", "--train_data", "split:train_nm",
                          "--gold_in_group", "true", "--sft_think", "none"],
    # EGPO vs GRPO where the think is the model's own (issue 30): asked for a think, raw Qwen writes none (10 of
    # 1,920 samples open one; the SFT starts answer without one), so EGPO's H was 0 and EGPO = GRPO by
    # construction. Handed an opened think (--think prefill) the raw model reasons in its own words but closed
    # it in 0 of 12 probe samples, and seed 0's SFT start skips it (`<think>\n<answer>...`): no reward to learn
    # from either way. So an SFT start learns the format from the model's own thinks (bench_self_think.py:
    # one T 0.7 sample per training prompt, the gold answer after it), seed 1 as the other starts, and then
    # EGPO and GRPO from it, same seed: their first rollouts coincide, and then only EGPO's term differs.
    "think-sft-start-s1": ["--think", "prefill", "--sft_think", "data", "--train_data", SELF_THINK,
                           "--sft_steps", "26", "--steps", "0", "--sft_lr", "2e-5", "--sft_batch_size", "8",
                           "--beta", "0", "--eval_every", "1000", "--save_every", "13", "--seed", "1"],
    # think-sft-start-s1 called on 87% of val's no-call prompts: its thinks restate every request as a task. The
    # same start from thinks sampled with the gold answer named (bench_self_think.py --hint, STaR's rationalization;
    # the hint is not in the SFT prompt), so a think can say that no function fits before answering `[]`.
    "think-hint-sft-start-s1": ["--think", "prefill", "--sft_think", "data", "--train_data", SELF_THINK_HINT,
                                "--sft_steps", "26", "--steps", "0", "--sft_lr", "2e-5", "--sft_batch_size", "8",
                                "--beta", "0", "--eval_every", "1000", "--save_every", "13", "--seed", "1"],
    # Neither think start answers `[]` on val. The probe after the think (bench_decision_probe.py think,
    # think-hint-sft-start-s1) says why: P(no call) at the answer is 0.33 on every prompt, after its own think,
    # after a fixed "None of the available functions can..." think, and teacher-forced on its own SFT data (0.34 on
    # no-call rows, 0.33 on call rows; 0.33 after the data's refusing thinks): the data's share of `[]` (37%), not
    # conditioned on anything. 26 SFT steps of token-mean loss over ~55-token targets give the one decision token
    # ~1/55 of each example's weight (~1/20 in the answer-only start, which separates at AUC 0.97). So: the same
    # start with the think as context and only `</think>` + the answer trained (--sft_loss answer); and on thinks
    # that agree with their answer (bench_self_think.py --hint --refuse 8: one that disagrees is resampled).
    "think-ans-sft-start-s1": ["--think", "prefill", "--sft_think", "data", "--train_data", SELF_THINK_HINT,
                               "--sft_loss", "answer", "--sft_steps", "26", "--steps", "0", "--sft_lr", "2e-5",
                               "--sft_batch_size", "8", "--beta", "0", "--eval_every", "1000", "--save_every", "13",
                               "--seed", "1"],
    "think-refuse-sft-start-s1": ["--think", "prefill", "--sft_think", "data", "--train_data", SELF_THINK_REFUSE,
                                  "--sft_loss", "answer", "--sft_steps", "26", "--steps", "0", "--sft_lr", "2e-5",
                                  "--sft_batch_size", "8", "--beta", "0", "--eval_every", "1000", "--save_every",
                                  "13", "--seed", "1"],
    "think-egpo-s1": ["--model", THINK_START, "--think", "prefill", "--algo", "egpo", "--lr", "1e-6", "--seed", "11",
                      "--eval_at_start", "true"],
    "think-grpo-s1": ["--model", THINK_START, "--think", "prefill", "--algo", "grpo", "--lr", "1e-6", "--seed", "11"],
    # EGPO against GRPO was never measured on a think start that reaches both answers (think-egpo-s1's start
    # called on 87% of no-call prompts; its GRPO twin never ran). think-ans-sft-start-s1 answers `[]` on 91.7% of
    # val's no-call prompts after its own think (val 72.5): the pair again from it, same seed, EGPO's step-0
    # evaluation the start of both.
    "think-ans-egpo-s1": ["--model", THINK_ANS_START, "--think", "prefill", "--algo", "egpo", "--lr", "1e-6",
                          "--seed", "11", "--eval_at_start", "true"],
    "think-ans-grpo-s1": ["--model", THINK_ANS_START, "--think", "prefill", "--algo", "grpo", "--lr", "1e-6",
                          "--seed", "11"],
    # Part 3's long curves, in pieces (--piece-s): the val recipe for up to 150 steps, evaluated every 10 (~50
    # training minutes), and its SFT control evaluated every 30 SFT steps (about as many training minutes)
    "long-rl": ["--lr", "1e-6", "--steps", "150", "--eval_every", "10", "--save_every", "5"],
    "long-sft": ["--sft_steps", "100000", "--steps", "0", "--sft_think", "none", "--sft_lr", "2e-5",
                 "--sft_batch_size", "8", "--beta", "0", "--eval_every", "30", "--save_every", "10"],
    # ... and the long curve of the closest recipe (sft-rl-nm-s1, held out (a) met, irrelevance 1.1 points short at
    # 10 steps, val_irr 53.3 -> 65.0 in those 10): the same arm, same seed, for up to 150 steps, val and val_irr
    # evaluated every 10 (the best mean of the two is kept, --keep_best: the policy held out, never chosen on
    # (a)-(c)); SFT going on from the same start for
    # the same training seconds (sft-more-s1's recipe and seed), evaluated every 20 SFT steps (~as many seconds).
    "long-nm-s1": long_nm(SFT_START, "11", "150"),
    "long-nm-more-s1": long_nm_more(SFT_START, "11"),
    # long-nm-s1 rose on val + val_irr to step 50 and was flat for 30 steps after (stopped at 80), its kept policy
    # held out at (c) 83.3: seeds 0 and 2 of the same design, fixed before they run at 80 steps (the best of the
    # evaluations every 10 kept and held out), each with its equal-seconds SFT control (sft-more-s0 / -s2's seeds)
    "long-nm-s0": long_nm(SFT_START0, "10", "80"),
    "long-nm-more-s0": long_nm_more(SFT_START0, "10"),
    # seed 2 also keeps its best on val alone (--keep_best_on, 2026-12-06: from the RL arm's step 13 on, the control
    # from its start): the other reading's policy without a rebuild (VAL_KEPT)
    "long-nm-s2": long_nm(SFT_START2, "12", "80") + ["--keep_best_on", "split:val"],
    "long-nm-more-s2": long_nm_more(SFT_START2, "12") + ["--keep_best_on", "split:val"],
    # The rule's other reading (issue 30, 2026-12-06): the mean of val and val_irr kept long-nm-more-s1's step 40,
    # which abstains almost everywhere (val_irr 99.2, val 56.7) by 2 of 240 examples over step 80 (73.3 / 80.8).
    # The choice on val alone (val_best_step) keeps step 80 for the control and step 50, the same policy, for the
    # RL arm. Its step-80 checkpoint is not kept (--keep_best keeps one): SFT again from the same start, seed and
    # order, stopped at 80 (the same curve: its evaluations at 40 and 80 repeat the committed ones, prompt by
    # prompt, or it is a sibling and said so). For seeds 0 and 2, the same: each arm's val_best_step, rebuilt.
    "long-nm-more-s1-val": long_nm_more(SFT_START, "11") + ["--sft_steps", "80", "--eval_every", "40",
                                                                     "--keep_best", "false"],
    # long-nm-s0 kept step 80 by the rule (val 81.7, val_irr 82.5); on val alone steps 70 and 80 tie at 81.7 and the
    # earliest, 70, is its val_best_step (the tie-break fixed before it ran). Step 70's checkpoint went when the arm
    # finished: the same arm again, stopped at 70 and evaluated there (each step's sampling seed is the step's, so
    # the evaluations skipped do not move it: its step-70 verdicts repeat the committed ones, or it is a sibling).
    "long-nm-s0-val": long_nm(SFT_START0, "10", "70") + ["--eval_every", "70", "--eval_at_start", "false",
                                                         "--keep_best", "false"],
    # long-nm-more-s0 kept step 20 by the rule (70.8 / 82.5); on val alone its best is step 100 (71.7 / 50.0), whose
    # checkpoint went on (--keep_best keeps one): SFT again from the same start, seed and order, stopped at 100 and
    # evaluated there only (its step-100 verdicts repeat the committed ones, or it is a sibling and said so)
    "long-nm-more-s0-val": long_nm_more(SFT_START0, "10") + ["--sft_steps", "100", "--eval_every", "100",
                                                             "--keep_best", "false"],
}
START_ARM = "lr5e-7"  # its step-0 evaluation is everyone's baseline
# ... except an arm that starts from a kept policy (--model): the arm whose step-0 evaluation is that start
START_OF = {"sft-rl-s1": "sft-rl-s1", "sft-more-s1": "sft-rl-s1", "sft-rl-s0": "sft-rl-s0", "sft-more-s0": "sft-rl-s0",
            "sft-rl-bal-s1": "sft-rl-s1", "sft-rl-bal-s0": "sft-rl-s0", "sft-rl-s2": "sft-rl-s2", "sft-more-s2": "sft-rl-s2",
            "sft-rl-bal-s2": "sft-rl-s2", "think-egpo-s1": "think-egpo-s1", "think-grpo-s1": "think-egpo-s1",
            "think-ans-egpo-s1": "think-ans-egpo-s1", "think-ans-grpo-s1": "think-ans-egpo-s1",
            "sft-rl-nm-s1": "sft-rl-s1", "sft-rl-nm-s0": "sft-rl-nm-s0", "sft-rl-nm-s2": "sft-rl-nm-s2",
            "long-nm-s1": "long-nm-s1", "long-nm-more-s1": "long-nm-s1", "sft-rl-nm-gold-s1": "sft-rl-s1",
            "long-nm-s0": "long-nm-s0", "long-nm-more-s0": "long-nm-s0", "long-nm-s2": "long-nm-s2",
            "long-nm-more-s2": "long-nm-s2", "long-nm-more-s1-val": "long-nm-s1",
            "long-nm-s0-val": "long-nm-s0", "long-nm-more-s0-val": "long-nm-s0"}
# an SFT control gets the training seconds of this RL arm (the pilots': finished; the long ones': so far)
CONTROL_OF = {"sft-control": "lr1e-6", "sft-control-s1": "lr1e-6-s1", "long-sft": "long-rl",
              "sft-more-s1": "sft-rl-s1", "sft-more-s0": "sft-rl-s0", "sft-more-s2": "sft-rl-s2",
              "long-nm-more-s1": "long-nm-s1", "long-nm-more-s0": "long-nm-s0", "long-nm-more-s2": "long-nm-s2"}
LONG_ARMS = ("long-rl", "long-sft", "long-nm-s1", "long-nm-more-s1", "long-nm-s0", "long-nm-more-s0", "long-nm-s2",
             "long-nm-more-s2")
# a long arm's best on val alone (val_best_step), kept by the arm itself (--keep_best_on split:val): policy -> arm
VAL_KEPT = {"long-nm-s2-val": "long-nm-s2", "long-nm-more-s2-val": "long-nm-more-s2"}
# Held out: the policies compared (in evaluation order; "untrained" is the raw model) and the comparisons.
# lr1e-6 itself was finished before arms kept their final policy; lr1e-6-s1 is the same recipe, seed 1.
# Val comparisons of final policies, paired by prompt (a, b): a - b. A tuple of arms on a side is its mean over
# seeds, prompt by prompt (the interval then covers the examples, not the spread between those seeds).
# three seeds side by side (the start of seed 1 is sft-control-s1's kept policy)
RL3, MORE3 = ("sft-rl-s0", "sft-rl-s1", "sft-rl-s2"), ("sft-more-s0", "sft-more-s1", "sft-more-s2")
START3, BAL3 = ("sft-start-s0", "sft-control-s1", "sft-start-s2"), ("sft-rl-bal-s0", "sft-rl-bal-s1", "sft-rl-bal-s2")
NM3 = ("sft-rl-nm-s0", "sft-rl-nm-s1", "sft-rl-nm-s2")
LONG3, LONG_MORE3 = ("long-nm-s0", "long-nm-s1", "long-nm-s2"), ("long-nm-more-s0", "long-nm-more-s1", "long-nm-more-s2")
# the same test read on val alone: each seed's val-best policies (seed 1's RL arm keeps its val-best by the rule too)
LONG3_VAL = ("long-nm-s0-val", "long-nm-s1", "long-nm-s2-val")
LONG_MORE3_VAL = ("long-nm-more-s0-val", "long-nm-more-s1-val", "long-nm-more-s2-val")
VAL_PAIRS = (("lr1e-6", "sft-control"), ("lr1e-6-s1", "sft-control-s1"),
             (("lr1e-6", "lr1e-6-s1"), ("sft-control", "sft-control-s1")),
             ("lr1e-6-dbal-s1", "lr1e-6-s1"), ("lr1e-6-dbal-s1", "sft-control-s1"),
             ("lr1e-6-dbal", "lr1e-6"), ("lr1e-6-dbal", "sft-control"),
             ("lr1e-6-abal-s1", "lr1e-6-s1"), ("lr1e-6-abal-s1", "sft-control-s1"),
             ("lr1e-6-abal", "lr1e-6"), ("lr1e-6-abal", "sft-control"),
             ("lr1e-6-abal-s2", "lr1e-6-s2"),
             ("lr1e-6-anchor5e-3-s1", "lr1e-6-s1"), ("lr1e-6-anchor5e-3-s1", "sft-control-s1"),
             ("lr1e-6-anchor5e-3", "lr1e-6"), ("lr1e-6-anchor5e-3", "sft-control"),
             ("lr1e-6-anchor5e-3-s2", "lr1e-6-s2"),
             ("lr1e-6-proj-s1", "lr1e-6-s1"), ("lr1e-6-proj-s1", "sft-control-s1"),
             ("lr1e-6-proj", "lr1e-6"), ("lr1e-6-proj-s2", "lr1e-6-s2"),
             ("sft-rl-s1", "sft-more-s1"), ("sft-rl-s1", "sft-control-s1"), ("sft-more-s1", "sft-control-s1"),
             ("sft-rl-s0", "sft-more-s0"), ("sft-rl-s0", "sft-start-s0"), ("sft-more-s0", "sft-start-s0"),
             (("sft-rl-s0", "sft-rl-s1"), ("sft-more-s0", "sft-more-s1")),
             (("sft-rl-s0", "sft-rl-s1"), ("sft-start-s0", "sft-control-s1")),
             ("sft-rl-s2", "sft-more-s2"), ("sft-rl-s2", "sft-start-s2"), ("sft-more-s2", "sft-start-s2"),
             (RL3, MORE3),
             (RL3, START3),
             ("sft-rl-bal-s1", "sft-rl-s1"), ("sft-rl-bal-s1", "sft-more-s1"),
             ("sft-rl-bal-s0", "sft-rl-s0"), ("sft-rl-bal-s0", "sft-more-s0"),
             ("sft-rl-bal-s2", "sft-rl-s2"), ("sft-rl-bal-s2", "sft-more-s2"),
             (BAL3, RL3),
             (BAL3, MORE3),
             (BAL3, START3),
             (("lr1e-6-abal", "lr1e-6-abal-s1"), ("lr1e-6", "lr1e-6-s1")),
             (("lr1e-6-abal", "lr1e-6-abal-s1"), ("sft-control", "sft-control-s1")),
             ("think-egpo-s1", "think-grpo-s1"), ("think-ans-egpo-s1", "think-ans-grpo-s1"),
             ("think-ans-sft-start-s1", "think-hint-sft-start-s1"),
             ("think-refuse-sft-start-s1", "think-ans-sft-start-s1"),
             ("sft-rl-nm-s1", "sft-rl-s1"), ("sft-rl-nm-s1", "sft-more-s1"),
             ("sft-rl-nm-s0", "sft-rl-s0"), ("sft-rl-nm-s0", "sft-more-s0"),
             ("sft-rl-nm-s2", "sft-rl-s2"), ("sft-rl-nm-s2", "sft-more-s2"),
             (NM3, RL3), (NM3, MORE3), ("sft-rl-nm-gold-s1", "sft-rl-nm-s1"))
HELDOUT_SETS = ("test_in", "test_ood", "test_irr", "val")
# sft-control-s1: the control of lr1e-6-s1's own seed (2026-12-04, on the Zen 4 kind both ran on)
# sft-rl-s1 / sft-more-s1: RL from the SFT start against SFT going on, the first RL arm above its control on val
# (+13.3 [+5.0, +21.7], 2026-12-04, the Zen 4); evaluated held out in the same session
HELDOUT_ARMS = ("sft-control", "lr1e-6-s1", "untrained", "sft-control-s1", "sft-rl-s1", "sft-more-s1",
                "sft-rl-s0", "sft-more-s0", "sft-start-s0", "sft-rl-s2", "sft-more-s2", "sft-start-s2",
                "sft-rl-bal-s1", "sft-rl-bal-s0", "sft-rl-bal-s2", "sft-rl-nm-s0", "sft-rl-nm-s1", "sft-rl-nm-s2",
                # the long near-miss curve's best on val + val_irr (kept_policy), once 3 evaluations in a row (30
                # steps) found no better one: does the budget lift (c) where 10 steps did not? One seed
                "long-nm-s1",
                # its equal-seconds SFT control: its best on val + val_irr, or its start if none beat it (evaluated_as)
                "long-nm-more-s1",
                # seeds 0 and 2 of both, fixed before they ran (2026-12-05)
                "long-nm-s0", "long-nm-more-s0", "long-nm-s2", "long-nm-more-s2",
                # long-nm-more-s1's best on val alone (step 80): the control that does not abstain everywhere
                "long-nm-more-s1-val",
                # long-nm-s0's best on val alone (step 70; it kept step 80 by the rule), and its control's (step
                # 100; it kept step 20 by the rule)
                "long-nm-s0-val", "long-nm-more-s0-val",
                # seed 2's, kept by the arms (VAL_KEPT; evaluated as the rule's or the start's policy where the same)
                "long-nm-s2-val", "long-nm-more-s2-val")
HELDOUT_PAIRS = (("lr1e-6-s1", "sft-control"), ("lr1e-6-s1", "sft-control-s1"),  # (RL, control): RL - control
                 ("sft-rl-s1", "sft-more-s1"), ("sft-rl-s1", "sft-control-s1"), ("sft-more-s1", "sft-control-s1"),
                 ("sft-rl-s0", "sft-more-s0"), ("sft-rl-s0", "sft-start-s0"), ("sft-more-s0", "sft-start-s0"),
                 # a side of seeds: each prompt's mean over them; RL from SFT against SFT going on, and against
                 # its start (SFT's best-on-val kept policy when SFT going on loses on val)
                 (("sft-rl-s0", "sft-rl-s1"), ("sft-more-s0", "sft-more-s1")),
                 (("sft-rl-s0", "sft-rl-s1"), ("sft-start-s0", "sft-control-s1")),
                 ("sft-rl-s2", "sft-more-s2"), ("sft-rl-s2", "sft-start-s2"), ("sft-more-s2", "sft-start-s2"),
                 (RL3, MORE3),
                 (RL3, START3),
                 # half the step's prompts no-call, chosen on val + val_irr
                 ("sft-rl-bal-s1", "sft-rl-s1"), ("sft-rl-bal-s1", "sft-more-s1"), ("sft-rl-bal-s1", "sft-control-s1"),
                 # its seeds 0 and 2 (the choice made on seed 1), then three seeds
                 ("sft-rl-bal-s0", "sft-rl-s0"), ("sft-rl-bal-s0", "sft-more-s0"),
                 ("sft-rl-bal-s2", "sft-rl-s2"), ("sft-rl-bal-s2", "sft-more-s2"),
                 (BAL3, RL3),
                 (BAL3, MORE3),
                 (BAL3, START3),
                 # the swapped-tool negatives beside near-miss tools (split:train_nm), chosen on val + val_irr (seed 1;
                 # policies of seeds 0 and 1 rebuilt on another machine than their plain-RL siblings: see `rebuild`)
                 ("sft-rl-nm-s0", "sft-rl-s0"), ("sft-rl-nm-s0", "sft-more-s0"), ("sft-rl-nm-s0", "sft-start-s0"),
                 ("sft-rl-nm-s1", "sft-rl-s1"), ("sft-rl-nm-s1", "sft-more-s1"), ("sft-rl-nm-s1", "sft-control-s1"),
                 ("sft-rl-nm-s2", "sft-rl-s2"), ("sft-rl-nm-s2", "sft-more-s2"), ("sft-rl-nm-s2", "sft-start-s2"),
                 (NM3, RL3),
                 (NM3, MORE3),
                 (NM3, START3),
                 # the same recipe and seed, longer (not an equal-time control: long-nm-more-s1 is that)
                 ("long-nm-s1", "sft-rl-nm-s1"), ("long-nm-s1", "sft-control-s1"), ("long-nm-s1", "long-nm-more-s1"),
                 ("long-nm-s0", "long-nm-more-s0"), ("long-nm-s0", "sft-start-s0"), ("long-nm-s0", "sft-rl-nm-s0"),
                 ("long-nm-s2", "long-nm-more-s2"), ("long-nm-s2", "sft-start-s2"), ("long-nm-s2", "sft-rl-nm-s2"),
                 # issue 30's test: RL against its equal-seconds control over three seeds, (a) +5 and (c) >= 80
                 (LONG3, LONG_MORE3),
                 (LONG3, START3),
                 (LONG3, NM3),
                 # each arm's best on val alone (val_best_step): long-nm-s1's is its kept step 50. Fixed before
                 # seeds 0 and 2 run (2026-12-06): the three-seed test is read both ways, the rule's (above) and on
                 # val alone (each seed's val-best policies, rebuilt where not kept), and the target counts as met
                 # only if it is met both ways
                 ("long-nm-s1", "long-nm-more-s1-val"), ("long-nm-more-s1-val", "sft-control-s1"),
                 ("long-nm-more-s1", "long-nm-more-s1-val"), ("long-nm-s0", "long-nm-s0-val"),
                 ("long-nm-s0-val", "long-nm-more-s0-val"), ("long-nm-more-s0-val", "sft-start-s0"),
                 ("long-nm-more-s0", "long-nm-more-s0-val"),
                 ("long-nm-s2", "long-nm-s2-val"), ("long-nm-s2-val", "long-nm-more-s2-val"),
                 ("long-nm-more-s2-val", "sft-start-s2"), ("long-nm-more-s2", "long-nm-more-s2-val"),
                 (LONG3_VAL, LONG_MORE3_VAL))
# val_irr: BFCL `irrelevance` examples of (c)'s own kind, disjoint from it and never trained on (bench_rl's
# build_sets). Val's no-call prompts (live_irrelevance, swapped tools) sit at 95% for RL from SFT, while (c) is at
# ~72%: the irrelevance target cannot be chosen on them. Kept policies evaluated on it, each once; no choice made
# on it is reported on it (the held-out (c) stays the report).
VAL_IRR_ARMS = ("sft-control-s1", "sft-rl-s1", "sft-rl-bal-s1", "sft-start-s0", "sft-rl-s0", "sft-rl-bal-s0",
                "sft-start-s2", "sft-rl-s2", "sft-rl-bal-s2", "sft-rl-nm-s1", "sft-rl-nm-s0", "sft-rl-nm-s2",
                "sft-rl-nm-gold-s1",
                # the think start that abstains on val (91.7% of its no-call prompts), and EGPO / GRPO from it: does a
                # think of its own help on (c)'s kind? (each with its --think prefill, eval_options)
                "think-ans-sft-start-s1", "think-ans-egpo-s1", "think-ans-grpo-s1")
VAL_IRR_PAIRS = (("sft-rl-bal-s1", "sft-rl-s1"), ("sft-rl-s1", "sft-control-s1"), ("sft-rl-bal-s1", "sft-control-s1"),
                 ("sft-rl-bal-s0", "sft-rl-s0"), ("sft-rl-s0", "sft-start-s0"), ("sft-rl-bal-s0", "sft-start-s0"),
                 (("sft-rl-bal-s0", "sft-rl-bal-s1"), ("sft-rl-s0", "sft-rl-s1")),
                 ("sft-rl-bal-s2", "sft-rl-s2"), ("sft-rl-s2", "sft-start-s2"), ("sft-rl-bal-s2", "sft-start-s2"),
                 (BAL3, RL3),
                 (BAL3, START3),
                 ("sft-rl-nm-s1", "sft-rl-s1"), ("sft-rl-nm-s1", "sft-control-s1"),
                 ("sft-rl-nm-s0", "sft-rl-s0"), ("sft-rl-nm-s0", "sft-start-s0"),
                 ("sft-rl-nm-s2", "sft-rl-s2"), ("sft-rl-nm-s2", "sft-start-s2"),
                 (NM3, RL3), ("sft-rl-nm-gold-s1", "sft-rl-nm-s1"),
                 ("think-ans-sft-start-s1", "sft-control-s1"), ("think-ans-egpo-s1", "think-ans-grpo-s1"),
                 ("think-ans-egpo-s1", "think-ans-sft-start-s1"), ("think-ans-egpo-s1", "sft-rl-nm-s1"))
# suite (its folder under RESULTS and WORK): (its sets, the policies it may evaluate, its comparisons)
SUITES = {"heldout": (HELDOUT_SETS, HELDOUT_ARMS, HELDOUT_PAIRS),
          "val_irr": (("val_irr",), VAL_IRR_ARMS, VAL_IRR_PAIRS)}



def metrics_path(arm: str) -> Path:
    return RESULTS / f"{arm}.metrics.jsonl"


def partial_path(arm: str) -> Path:
    return RESULTS / f"{arm}.partial.metrics.jsonl"


def runs_path(arm: str) -> Path:
    """One row per trainer run of the arm (a whole arm or a piece): the machine, the exit, how far it got."""
    return RESULTS / f"{arm}.runs.jsonl"


def machines(arm: str) -> set[str]:
    """The machines (common.device_name) an arm trained on, from its runs and its finished meta."""
    found = {json.loads(line)["device"] for line in open(runs_path(arm))} if runs_path(arm).exists() else set()
    meta = RESULTS / f"{arm}.meta.json"
    if meta.exists():
        found.add(json.loads(meta.read_text())["device"])
    return found


def check_machine(arm: str, here: str) -> None:
    """Equal training seconds are equal work only on one kind of machine, and this workplace lends several
    (Zen 3 without AVX-512, Zen 4 with it, Xeons with AMX): an SFT control runs only where its RL arm ran,
    and a long arm's pieces stay on the kind of machine its curve started on (its x axis is seconds)."""
    for other in ([arm] if arm in LONG_ARMS else []) + ([CONTROL_OF[arm]] if arm in CONTROL_OF else []):
        seen = machines(other)
        if seen and seen != {here}:
            raise SystemExit(
                f"{arm}: {other} trained on {' and '.join(sorted(seen))}, this machine is {here}; training "
                f"seconds do not compare across machines. Run it on that kind of machine, or pass --any-machine "
                f"(and say so beside its numbers).")


def commit_results(message: str, folder: Path | None = None) -> None:
    """Commit the folder's files (not its subfolders): new, changed, and gone (a partial curve a finished one
    replaced)."""
    files = f":(glob){(folder or RESULTS).relative_to(REPO)}/*"  # glob's * stops at a /
    subprocess.run(["git", "add", "-A", "--", files], cwd=REPO, check=False)
    subprocess.run(["git", "commit", "-q", "-m", message, "--", files], cwd=REPO, check=False)


def train(args: list[str], piece_s: float | None) -> int:
    """The trainer's exit code; after piece_s wall seconds it gets a Ctrl-C (finish the step, checkpoint: 130)."""
    proc = subprocess.Popen([sys.executable, "-m", "fctrain.run"] + args, cwd=REPO)
    try:
        return proc.wait(timeout=piece_s)
    except subprocess.TimeoutExpired:
        print(f"[qwen_pilots] piece of {piece_s:.0f} s over: interrupting (the trainer checkpoints)", flush=True)
        proc.send_signal(signal.SIGINT)
        return proc.wait()
    except BaseException:  # our own Ctrl-C or kill: the trainer checkpoints too
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def eval_agreement(committed: list[dict], new: list[dict]) -> dict:
    """{step: [same verdicts, prompts]} for each step both curves evaluated: a long arm started again from step 0
    (its checkpoint lost with the machine) repeats the committed curve or is a sibling of it."""
    evals = lambda h: {r["step"]: r["verdicts"] for r in h if r.get("phase") == "eval" and "verdicts" in r}
    a, b = evals(committed), evals(new)
    return {str(s): [sum(a[s][i] == b[s].get(i) for i in a[s]), len(a[s])] for s in sorted(set(a) & set(b))}


def last_step(history: list[dict]) -> int:
    return max((r["step"] for r in history if "step" in r), default=0)


def run_arm(arm: str, commit: bool, piece_s: float | None = None, any_machine: bool = False,
            restart: bool = False) -> None:
    from fctrain.run import training_seconds  # what --time_budget_s counts
    here = common.device_name("cpu")
    if not any_machine:
        check_machine(arm, here)
    out = WORK / arm
    # a long arm's committed curve without its checkpoint (a new machine): resuming is impossible, and starting
    # again from step 0 must be asked for; the committed curve stays until the new one reaches its last step
    committed = [json.loads(line) for line in open(partial_path(arm))] if partial_path(arm).exists() else None
    lost = committed is not None and not any(out.glob("ckpt-*"))
    if lost and not restart:
        raise SystemExit(f"{arm}: its curve to step {last_step(committed)} is committed but its checkpoint is not "
                         f"here (a new machine): pass --restart to train it again from step 0 (the repeated "
                         f"evaluations are compared with the committed ones in {runs_path(arm).name})")
    args = COMMON + ARMS[arm] + ["--out_dir", str(out)]
    rl_done = True
    if arm in CONTROL_OF:
        rl = CONTROL_OF[arm]
        rl_done = metrics_path(rl).exists()
        if not rl_done and rl not in LONG_ARMS:
            raise SystemExit(f"{arm} needs the finished RL arm {rl} (its training seconds are the budget)")
        budget = training_seconds(load(rl) or [])
        if not budget:
            raise SystemExit(f"{arm} needs training seconds of its RL arm {rl}: run {rl} first")
        own = load(arm)  # not finished (main skips finished arms): its curve so far, if any
        if own and training_seconds(own) >= budget:
            print(f"[qwen_pilots] {arm}: caught up with {rl} ({budget:.0f} s of training); waits for more of it",
                  flush=True)
            return
        args += ["--time_budget_s", f"{budget:.1f}"]
    if any(out.glob("ckpt-*")):
        args += ["--resume", str(out)]
    print(f"[qwen_pilots] {arm}: {' '.join(args)}", flush=True)
    t0 = time.time()
    rc = train(args, piece_s)
    if rc not in (0, 130):
        raise SystemExit(f"{arm}: the trainer failed (exit {rc}); rerun resumes from its last checkpoint")
    RESULTS.mkdir(parents=True, exist_ok=True)
    history = [json.loads(line) for line in open(out / "metrics.jsonl")]
    run = {"date": common.run_metadata("cpu")["date"], "device": here, "exit": rc, "to_step": last_step(history),
           "train_s": round(training_seconds(history), 1)}
    behind = committed is not None and last_step(history) < last_step(committed)  # started again, not there yet
    if lost or behind:
        run["restarted"] = {"committed_to_step": last_step(committed),
                            "same_verdicts": eval_agreement(committed, history)}
    with open(runs_path(arm), "a") as f:
        f.write(json.dumps(run) + "\n")
    if rc == 130 or not rl_done:  # a piece: the curve so far, committed; the checkpoint stays for the next
        if behind:
            print(f"[qwen_pilots] {arm}: started again, at step {last_step(history)} of the committed "
                  f"{last_step(committed)}: the committed curve stays", flush=True)
            if commit:
                commit_results(f"qwen pilots: arm {arm}, started again (to step {last_step(history)})")
            return
        shutil.copy(out / "metrics.jsonl", partial_path(arm))
        steps = last_step(load(arm))
        print(f"[qwen_pilots] {arm}: piece ended at step {steps}; resume with the same command", flush=True)
        report()
        if commit:
            commit_results(f"qwen pilots: arm {arm}, a piece (to step {steps}, val only)")
        return
    shutil.copy(out / "metrics.jsonl", metrics_path(arm))
    partial_path(arm).unlink(missing_ok=True)
    meta = common.run_metadata("cpu") | {"arm": arm, "args": args, "wall_s": time.time() - t0,
                                          "load_avg_end": common.load_avg()}
    (RESULTS / f"{arm}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    keep_final(out)
    report()
    if commit:
        commit_results(f"qwen pilots: arm {arm} finished (val only)")


def keep_final(out: Path) -> None:
    """A finished trainer's last checkpoint becomes out/final (weights only, 2 GB) for later arms and held-out
    evaluations; the others go (~6 GB each with the optimizer; the metrics are the result)."""
    ckpts = sorted(out.glob("ckpt-*"), key=lambda c: int(c.name.split("-")[1]))
    for ckpt in ckpts[:-1]:
        shutil.rmtree(ckpt, ignore_errors=True)
    if ckpts:
        (ckpts[-1] / "trainer_state.pt").unlink(missing_ok=True)
        shutil.rmtree(out / "final", ignore_errors=True)
        ckpts[-1].rename(out / "final")


# ------------------------------------------------------------------------------------------------ rebuild
# Kept policies (2 GB each) live under runs/, which a new machine does not have: only the recipe and the metrics
# are committed. `rebuild` runs a finished arm's trainer again, with the same options, to put its kept policy
# back for the arms that start from it and for held-out evaluations, and says how closely it repeats the
# committed run: its last val verdicts and call decisions, prompt by prompt. Sampling, fp32 kernels and thread
# scheduling differ across kinds of machine, so a rebuilt policy is a sibling of the committed one, not a copy;
# its own metrics go to RESULTS/rebuilt and never replace the arm's.

def rebuilt_path(arm: str) -> Path:
    return RESULTS / "rebuilt" / f"{arm}.metrics.jsonl"


def rebuild_args(arm: str) -> list[str]:
    """The arm's trainer options as it ran; an SFT control's time budget becomes the SFT steps it reached (the
    seconds of one machine are another number of steps on another), an RL arm keeps its step count."""
    history = load(arm) if metrics_path(arm).exists() else None
    if history is None:
        raise SystemExit(f"{arm} has not finished: nothing to rebuild (run it)")
    args = COMMON + ARMS[arm] + ["--out_dir", str(WORK / arm)]
    if arm in CONTROL_OF:
        args += ["--sft_steps", str(sum(r.get("phase") == "sft" for r in history))]
    return args


def agreement(committed: list[dict], rebuilt: list[dict]) -> dict:
    """The last val evaluation of each, prompt by prompt: how many verdicts and call decisions are the same."""
    last = lambda h: [r for r in h if r.get("phase") == "eval" and "verdicts" in r][-1]
    a, b = last(committed), last(rebuilt)
    ids = sorted(set(a["verdicts"]) & set(b["verdicts"]))
    same_decision = sum(a.get("decisions", {}).get(i) == b.get("decisions", {}).get(i) for i in ids)
    return {"n": len(ids), "committed_acc": sum(a["verdicts"][i] for i in ids) / len(ids),
            "rebuilt_acc": sum(b["verdicts"][i] for i in ids) / len(ids),
            "same_verdicts": sum(a["verdicts"][i] == b["verdicts"][i] for i in ids), "same_decisions": same_decision}


def rebuild_arm(arm: str, commit: bool) -> dict:
    out = WORK / arm
    if (out / "final" / "config.json").exists():
        print(f"[qwen_pilots] {arm}: kept policy present, nothing to rebuild", flush=True)
        return {}
    args = rebuild_args(arm)
    if any(out.glob("ckpt-*")):
        args += ["--resume", str(out)]
    print(f"[qwen_pilots] rebuild {arm}: {' '.join(args)}", flush=True)
    t0 = time.time()
    if train(args, None) != 0:
        raise SystemExit(f"rebuild {arm}: the trainer failed; rerun resumes from its last checkpoint")
    from fctrain.run import training_seconds
    history = [json.loads(line) for line in open(out / "metrics.jsonl")]
    same = agreement(load(arm), history)
    rebuilt_path(arm).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "metrics.jsonl", rebuilt_path(arm))
    meta = common.run_metadata("cpu") | {"arm": arm, "args": args, "wall_s": time.time() - t0,
                                          "train_s": round(training_seconds(history), 1), "agreement": same}
    (RESULTS / "rebuilt" / f"{arm}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    keep_final(out)
    print(f"[qwen_pilots] rebuild {arm}: last val {100 * same['rebuilt_acc']:.1f} (committed "
          f"{100 * same['committed_acc']:.1f}); the same verdict on {same['same_verdicts']}/{same['n']} prompts, "
          f"the same call decision on {same['same_decisions']}/{same['n']}", flush=True)
    if commit:
        commit_results(f"qwen pilots: {arm} rebuilt on {meta['device']}", RESULTS / "rebuilt")
    return same


# ------------------------------------------------------------------------------------------------ report

def load(arm: str) -> list[dict] | None:
    path = metrics_path(arm)
    if not path.exists():  # an arm running or between pieces: its curve so far
        path = next((p for p in (WORK / arm / "metrics.jsonl", partial_path(arm)) if p.exists()), None)
    return [json.loads(line) for line in open(path)] if path else None


def val_kinds() -> dict:
    """Each validation id's kind: "call" or "no_call" (val), "val_irr" (val_irr, evaluated by the long arms)."""
    from fctrain import data, reward
    return {e.id: ("no_call" if (reward.is_irrelevance(e.category) or e.id.startswith("neg:")) else "call")
            for e in data.load_split("val")} | {e.id: "val_irr" for e in data.load_split("val_irr")}


def eval_rows(arm: str, history: list[dict], start: dict | None, kinds: dict) -> list[dict]:
    rows, trained_s = [], 0.0
    for rec in history:
        if rec.get("phase") in ("sft", "rl"):
            trained_s += rec.get("step_s", 0.0)
        if rec.get("phase") != "eval" or "verdicts" not in rec or (rows and rows[-1]["step"] == rec["step"]):
            continue
        dec = rec.get("decisions", {})
        v = {i: x for i, x in rec["verdicts"].items() if kinds[i] != "val_irr"}  # val; val_irr on its own
        row = {"arm": arm, "step": rec["step"], "train_s": round(trained_s), "val": sum(v.values()) / len(v)}
        irr = [i for i in rec["verdicts"] if kinds[i] == "val_irr"]
        if irr:
            row["val_irr"] = sum(rec["verdicts"][i] for i in irr) / len(irr)
            row["val_irr_says_call"] = sum(dec.get(i) == "call" for i in irr) / len(irr) if dec else None
        for kind in ("call", "no_call"):
            ids = [i for i in v if kinds[i] == kind]
            row[f"{kind}_acc"] = sum(v[i] for i in ids) / len(ids)
            for d in ("call", "none", "bad"):
                row[f"{kind}_says_{d}"] = sum(dec.get(i) == d for i in ids) / len(ids) if dec else None
        if start is not None and rec["step"] > 0:
            ids = sorted(set(v) & set(start["verdicts"]))  # val's prompts only
            diff, lo, hi = paired_change([start["verdicts"][i] for i in ids], [v[i] for i in ids])
            row["change"], row["change_lo"], row["change_hi"] = diff, lo, hi
        rows.append(row)
    return rows


def train_summary(history: list[dict]) -> dict:
    rl = [r for r in history if r.get("phase") == "rl"]
    sft = [r for r in history if r.get("phase") == "sft"]
    if sft and not rl:
        return {"sft_steps": len(sft), "loss": [round(r["loss"], 4) for r in sft],
                "step_s": [round(r["step_s"], 1) for r in sft]}
    if not rl:
        return {}
    def series(key):
        return [None if r.get(key) is None else round(r[key], 4) for r in rl]
    out = {"steps": len(rl), "reward": series("reward"), "mixed_groups": [r["groups"] - r["zero_var_groups"] for r in rl],
           "completion_len": series("completion_len"), "kl": series("kl"), "entropy": series("entropy"),
           "grad_norm": series("grad_norm"), "step_s": series("step_s")}
    if any(r.get("think_entropy") is not None for r in rl):  # EGPO's H: the think tokens' mean entropy (nats)
        out["think_entropy"] = series("think_entropy")
    if any("scale_call_needing" in r for r in rl):  # --decision_balance / --answer_balance
        pushes = ("push_call_needing", "push_no_call", "push_right_call_needing", "push_right_no_call")
        out |= {k: series(k) for k in pushes + ("scale_call_needing", "scale_no_call") if any(k in r for r in rl)}
        out["emptied_groups"] = [r.get("emptied_groups") for r in rl]
    if any("decision_shift" in r for r in rl):  # --decision_anchor: the mean log-odds and its shift, before each step
        out |= {"decision_log_odds": series("decision_log_odds"), "decision_shift": series("decision_shift")}
    if any("decision_move" in r for r in rl):  # --decision_project: the mean log-odds, the first-order move removed
        out |= {"decision_log_odds": series("decision_log_odds"), "decision_move": series("decision_move")}
        if any("decision_log_odds_after" in r for r in rl):  # the same prompts after the step: the realized move
            out["decision_log_odds_after"] = series("decision_log_odds_after")
    return out


def signal_by_window(history: list[dict], width: int = 10) -> list[dict]:
    """A long RL curve's learning signal, `width` steps at a time: the mean reward, the groups with mixed rewards
    (the only ones GRPO learns from) and the tokens trained per step, and the step KL's median and max (a mean
    over the few trained tokens of a step with one mixed group is where k3's heavy tail shows)."""
    rl = [r for r in history if r.get("phase") == "rl"]
    out = []
    for first in range(1, max((r["step"] for r in rl), default=0) + 1, width):
        seg = [r for r in rl if first <= r["step"] < first + width]
        if not seg:
            continue
        kl = sorted(r["kl"] for r in seg if r.get("kl") is not None)
        out.append({"steps": f"{first}-{seg[-1]['step']}", "reward": sum(r["reward"] for r in seg) / len(seg),
                    "mixed_groups": sum(r["groups"] - r["zero_var_groups"] for r in seg) / len(seg),
                    "groups": seg[0]["groups"], "trained_tokens": sum(r["trained_tokens"] for r in seg) / len(seg),
                    "kl_median": kl[(len(kl) - 1) // 2] if kl else None, "kl_max": kl[-1] if kl else None})
    return out


def val_pairs() -> list[dict]:
    """VAL_PAIRS whose arms have finished: the final val verdicts of a minus b, paired by prompt."""
    finals = {arm: last_val_verdicts(arm) for arm in ARMS if metrics_path(arm).exists()}
    side = lambda x: x if isinstance(x, tuple) else (x,)
    out = []
    for a, b in VAL_PAIRS:
        if not all(finals.get(arm) for arm in side(a) + side(b)):
            continue
        ids = sorted(set.intersection(*(set(finals[arm]) for arm in side(a) + side(b))))
        mean = lambda arms: [sum(finals[arm][i] for arm in arms) / len(arms) for i in ids]
        diff, lo, hi = paired_change(mean(side(b)), mean(side(a)))
        per_seed = [[finals[x][i] - finals[y][i] for i in ids] for x, y in zip(side(a), side(b))]
        out.append({"a": " + ".join(side(a)), "b": " + ".join(side(b)), "n": len(ids), "diff": diff, "lo": lo, "hi": hi,
                    **(seed_interval(per_seed) if len(side(a)) == len(side(b)) > 1 else {})})
    return out


def report() -> str:
    kinds = val_kinds()

    def step0(arm):
        return next((r for r in load(arm) or [] if r.get("phase") == "eval" and r["step"] == 0), None)
    lines, all_rows, curves = [], [], {}
    head = ("| arm | step | train s | val | call acc | call: call/none/bad | no-call acc | no-call: call/none/bad "
            "| change since step 0 (its start; 95% CI) | val_irr (calls) |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in ARMS:
        history = load(arm)
        if history is None:
            continue
        first = START_OF.get(arm, START_ARM)
        start = step0(first)
        rows = eval_rows(arm, history, start, kinds)
        if arm != first and start is not None and not any(r["step"] == 0 for r in rows):
            rows = eval_rows(first, [start], None, kinds) + rows  # the same starting model and engine
            rows[0]["arm"] = arm
        all_rows += rows
        curves[arm] = train_summary(history)
        for r in rows:
            pct = lambda x: "-" if x is None else f"{100 * x:.1f}"
            split = lambda k: "/".join(pct(r[f"{k}_says_{d}"]) for d in ("call", "none", "bad"))
            change = (f"{100 * r['change']:+.1f} [{100 * r['change_lo']:+.1f}, {100 * r['change_hi']:+.1f}]"
                      if "change" in r else "")
            irr = f"{pct(r['val_irr'])} ({pct(r['val_irr_says_call'])})" if "val_irr" in r else ""
            lines.append(f"| {arm} | {r['step']} | {r['train_s']} | {pct(r['val'])} | {pct(r['call_acc'])} | "
                         f"{split('call')} | {pct(r['no_call_acc'])} | {split('no_call')} | {change} | {irr} |")
    for arm, c in curves.items():
        if c.get("sft_steps"):
            lines.append(f"\n{arm}: {c['sft_steps']} SFT steps; loss {c['loss']}; step s {c['step_s']}")
        elif c:
            lines.append(f"\n{arm}: {c['steps']} RL steps; reward {c['reward']}; mixed groups {c['mixed_groups']}; "
                         f"completion tokens {c['completion_len']}; KL {c['kl']}; grad norm {c['grad_norm']}; "
                         f"step s {c['step_s']}" + (f"; balance: scales (call-needing) "
                                                    f"{c['scale_call_needing']}, (no-call) {c['scale_no_call']}, "
                                                    f"emptied groups {c['emptied_groups']}"
                                                    if "scale_call_needing" in c else "")
                         + (f"; decision log-odds {c['decision_log_odds']}, shift from the reference "
                            f"{c['decision_shift']}" if "decision_shift" in c else "")
                         + (f"; decision log-odds {c['decision_log_odds']}, first-order move removed "
                            f"{c['decision_move']}" if "decision_move" in c else "")
                         + (f"; the same prompts' log-odds after the step {c['decision_log_odds_after']}"
                            if "decision_log_odds_after" in c else "")
                         + (f"; think entropy {c['think_entropy']}" if "think_entropy" in c else ""))
    for arm in LONG_ARMS:
        windows = signal_by_window(load(arm) or [])
        if windows:
            kl = lambda x: "-" if x is None else f"{x:.3f}"
            lines += ["", f"{arm}, ten RL steps at a time | reward | mixed groups | tokens trained per step | "
                          "KL median / max", "|---|---|---|---|---|"]
            lines += [f"| {w['steps']} | {w['reward']:.3f} | {w['mixed_groups']:.1f} of {w['groups']} | "
                      f"{w['trained_tokens']:.0f} | {kl(w['kl_median'])} / {kl(w['kl_max'])} |" for w in windows]
    pairs = val_pairs()
    if pairs:
        lines += ["", "| final val, a - b (a side of several seeds: their mean per prompt) | n | points (95% CI, "
                  "paired bootstrap over prompts) | " + SEEDS_HEAD + " |", "|---|---|---|---|"]
        lines += [f"| {q['a']} - {q['b']} | {q['n']} | {100 * q['diff']:+.1f} [{100 * q['lo']:+.1f}, "
                  f"{100 * q['hi']:+.1f}] | {seeds_cell(q)} |" for q in pairs]
    text = "\n".join(lines)
    if all_rows:
        RESULTS.mkdir(parents=True, exist_ok=True)
        summary = {"rows": all_rows, "curves": curves, "val_pairs": pairs, "common_args": COMMON, "arms": ARMS,
                   "meta": common.run_metadata("cpu")}
        (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (RESULTS / "summary.md").write_text(text + "\n")
        plot(all_rows)
    print(text, flush=True)
    return text


def plot(rows: list[dict]) -> None:
    """val_curves.png: the pilots; long_curves.png: the long arms (both against training minutes)."""
    for name, keep in (("val_curves", lambda arm: arm not in LONG_ARMS), ("long_curves", lambda arm: arm in LONG_ARMS)):
        mine = [r for r in rows if keep(r["arm"])]
        if mine:
            plot_curves(mine, RESULTS / f"{name}.png")


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("val", "val"), ("call_acc", "call-needing"), ("no_call_acc", "no-call")]
    panels += [("val_irr", "val_irr")] if any("val_irr" in r for r in rows) else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = [r for r in rows if r["arm"] == arm and key in r]
            ax.plot([r["train_s"] / 60 for r in pts], [100 * r[key] for r in pts], "o-", label=arm)
        ax.set_title(f"Qwen2.5-Coder-0.5B, {title} accuracy (greedy)")
        ax.set_xlabel("training minutes (CPU)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ held out

def heldout_path(name: str, suite: str = "heldout") -> Path:
    return RESULTS / suite / f"{name}.metrics.jsonl"


def kept_policy(name: str) -> str:
    """The model a policy name stands for: "untrained" = the raw Qwen, else the arm's kept final policy."""
    if name == "untrained":
        return "qwen2.5-coder-0.5b"
    if name in VAL_KEPT:
        return val_kept_policy(name)
    if name in LONG_ARMS:  # the best on validation (--keep_best), not the last
        best = WORK / name / "best"
        if name in CONTROL_OF and control_keeps_its_start(name):
            return start_model(name)
        if not (best / "config.json").exists():
            raise SystemExit(f"{best} missing: no evaluation of {name} beat its first (then its start is the best)")
        return str(best)
    final = WORK / name / "final"
    if not (final / "config.json").exists():
        raise SystemExit(f"{final} missing (run the arm first: a finished arm keeps it)")
    return str(final)


def mean_accuracy(record: dict) -> float:
    """An evaluation's mean accuracy over its sets (what --keep_best ranks)."""
    accuracies = [v["accuracy"] for v in record["eval_sets"].values()]
    return sum(accuracies) / len(accuracies)


def start_eval(name: str) -> dict:
    """The evaluation of an arm's start: its START_OF arm's at step 0."""
    rows = load(START_OF.get(name, START_ARM)) or []
    found = next((r for r in rows if r.get("phase") == "eval" and r["step"] == 0 and "eval_sets" in r), None)
    if found is None:
        raise SystemExit(f"{START_OF.get(name, START_ARM)} has no evaluation at step 0: {name}'s start is not scored")
    return found


def control_keeps_its_start(name: str) -> bool:
    """A long SFT control is not evaluated at its start, its RL arm is (the same model on the same sets, its
    step 0): the control keeps its start, as --keep_best would with that evaluation, unless one of its own
    evaluations beats it (a strictly higher mean; the RL arm's best had to beat the same number)."""
    own = [mean_accuracy(r) for r in load(name) or [] if r.get("phase") == "eval" and "eval_sets" in r]
    return not own or max(own) <= mean_accuracy(start_eval(name))


def val_best_step(name: str) -> int:
    """The other reading of "best on validation": the step of the arm's evaluation with the highest accuracy on
    val alone (the earliest of equals), or 0, its start, when none beats its start's val (the START_OF arm's
    step 0; an RL arm's own)."""
    val = lambda r: r["eval_sets"]["split:val"]["accuracy"]
    step, best = 0, val(start_eval(name))
    for r in load(name) or []:
        if r.get("phase") == "eval" and "eval_sets" in r and val(r) > best:
            step, best = r["step"], val(r)
    return step


def start_model(arm: str) -> str:
    """The model an arm starts from (its --model)."""
    return ARMS[arm][ARMS[arm].index("--model") + 1]


def start_arm(arm: str) -> str:
    """The arm whose kept final policy is that start (runs/qwen_pilots/<arm>/final)."""
    return Path(start_model(arm)).parent.name


def val_kept_policy(name: str) -> str:
    """A VAL_KEPT policy's model: its finished arm's start when no evaluation beat the start on val alone, else the
    arm's best-on-set, which must be the evaluation at val_best_step (a checkpoint kept before --keep_best_on was
    on cannot be: then rebuild it as an arm, as long-nm-s0-val)."""
    arm = VAL_KEPT[name]
    if not metrics_path(arm).exists():
        raise SystemExit(f"{name}: {arm} has not finished (its best on val is not known yet)")
    step = val_best_step(arm)
    if step == 0:
        return start_model(arm)
    kept = WORK / arm / "best-on-set"
    found = json.loads((kept / "best.json").read_text())["step"] if (kept / "best.json").exists() else None
    if found != step or not (kept / "config.json").exists():
        raise SystemExit(f"{name}: {arm}'s best on val alone is step {step}, {kept} holds "
                         f"{'nothing' if found is None else f'step {found}'}: rebuild it as an arm stopped at {step}")
    return str(kept)


def rule_step(arm: str) -> int:
    """The step of the policy a long arm keeps by the rule (--keep_best), read from its curve: the evaluation with
    the highest mean over the eval sets, the earliest of equals (an RL arm's step 0 is its start), or 0 for a
    control that keeps its start."""
    if arm in CONTROL_OF and control_keeps_its_start(arm):
        return 0
    evals = [r for r in load(arm) or [] if r.get("phase") == "eval" and "eval_sets" in r]
    return max(evals, key=lambda r: (mean_accuracy(r), -r["step"]))["step"]


EVAL_OPTIONS = ("--think", "--fmt")  # an arm's options that change how it is prompted and scored, not trained


def eval_options(name: str) -> list[str]:
    """The arm's own prompt and answer form (a --think prefill policy answers after the think it is handed)."""
    args = ARMS.get(name, [])
    return [x for i, key in enumerate(args) if key in EVAL_OPTIONS for x in (key, args[i + 1])]


def heldout_args(name: str, suite: str = "heldout") -> list[str]:
    """The trainer's own evaluation, nothing trained: the raw model or the arm's kept final policy, prompted and
    scored as the arm trained and validated it."""
    return ["--preset", "qwen0.5b-cpu", "--model", kept_policy(name), "--seed", "0", "--steps", "0", "--save_every", "0",
            *eval_options(name), "--eval_data", "+".join(f"split:{s}" for s in SUITES[suite][0]),
            "--out_dir", str(WORK / suite / name)]


def evaluated_as(name: str) -> str:
    """The policy whose held-out evaluation stands for `name`: a long control that has judged itself (an
    evaluation of its own in its curve so far, long arms stay in pieces, or its curve finished) and keeps its start
    is its start's arm (that arm's kept final policy, evaluated once), as is a finished long RL arm whose best was
    its step 0; a VAL_KEPT policy that is its arm's rule policy or its start is that one's; any other policy itself
    (a control running before its first evaluation has kept nothing yet)."""
    if name in VAL_KEPT and metrics_path(VAL_KEPT[name]).exists():  # the same weights are evaluated once
        arm, step = VAL_KEPT[name], val_best_step(VAL_KEPT[name])
        if step == rule_step(arm):  # both readings keep one policy
            return evaluated_as(arm)
        return start_arm(arm) if step == 0 else name
    if name in LONG_ARMS and name not in CONTROL_OF and metrics_path(name).exists() and rule_step(name) == 0:
        return start_arm(name)  # its best/ is a copy of its start
    if name not in LONG_ARMS or name not in CONTROL_OF:
        return name
    judged = metrics_path(name).exists() or any(r.get("phase") == "eval" for r in load(name) or [])
    if judged and control_keeps_its_start(name):
        return Path(kept_policy(name)).parent.name
    return name


def run_heldout(names, commit: bool, suite: str = "heldout") -> None:
    for name in names:
        if (same := evaluated_as(name)) != name:
            print(f"[qwen_pilots] {suite} {name}: kept {same}'s policy (its start, or the same step): evaluated as "
                  f"{same}", flush=True)
            name = same
        if heldout_path(name, suite).exists():
            print(f"[qwen_pilots] {suite} {name}: finished, skipped", flush=True)
            continue
        args = heldout_args(name, suite)
        out = WORK / suite / name
        shutil.rmtree(out, ignore_errors=True)  # an interrupted evaluation restarts (nothing to resume)
        print(f"[qwen_pilots] {suite} {name}: {' '.join(args)}", flush=True)
        t0 = time.time()
        if train(args, None) != 0:
            raise SystemExit(f"{suite} {name}: the evaluation failed; rerun restarts it")
        heldout_path(name, suite).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "metrics.jsonl", heldout_path(name, suite))
        meta = common.run_metadata("cpu") | {"policy": name, "args": args, "wall_s": time.time() - t0,
                                              "load_avg_end": common.load_avg()}
        (RESULTS / suite / f"{name}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        heldout_report(suite)
        if commit:
            commit_results(f"qwen pilots: {suite} evaluation of {name}", RESULTS / suite)


def heldout_eval(name: str, suite: str = "heldout") -> dict | None:
    path = heldout_path(evaluated_as(name), suite)
    if not path.exists():
        return None
    return next(r for r in map(json.loads, open(path)) if r.get("phase") == "eval")


def heldout_rows(evals: dict, sets_of: dict, arm_val: dict, compare=None) -> tuple[list[dict], list[dict]]:
    """(per policy and set: accuracy, Wilson CI and decision shares; paired comparisons).
    evals: {policy: eval record}; sets_of: {set: [ids]}; arm_val: {policy: the arm's own last val verdicts};
    compare: the comparisons besides each policy against "untrained" (default HELDOUT_PAIRS)."""
    rows, pairs = [], []
    for name, rec in evals.items():
        v, dec = rec["verdicts"], rec.get("decisions", {})
        for s, ids in sets_of.items():
            ids = [i for i in ids if i in v]
            correct = sum(v[i] for i in ids)
            lo, hi = wilson_interval(correct, len(ids))
            row = {"policy": name, "set": s, "n": len(ids), "acc": correct / len(ids), "lo": lo, "hi": hi}
            for d in ("call", "none", "bad"):
                row[f"says_{d}"] = sum(dec.get(i) == d for i in ids) / len(ids)
            if s == "val" and name in arm_val:  # the same policy's val verdicts, logged when it was trained
                own = arm_val[name]
                row["val_repeat"] = [sum(own[i] == v[i] for i in ids if i in own), sum(i in own for i in ids)]
            rows.append(row)
    comparisons = [(n, "untrained") for n in evals if n != "untrained" and "untrained" in evals] + list(
        HELDOUT_PAIRS if compare is None else compare)
    side = lambda x: x if isinstance(x, tuple) else (x,)
    for a, b in comparisons:
        if not all(n in evals for n in side(a) + side(b)):
            continue
        verdicts = lambda names: [evals[n]["verdicts"] for n in names]
        for s, ids in sets_of.items():
            ids = [i for i in ids if all(i in v for v in verdicts(side(a) + side(b)))]
            # a side of several seeds: each prompt's mean verdict over them (the CI covers the examples only)
            va, vb = ({i: sum(v[i] for v in verdicts(side(x))) / len(side(x)) for i in ids} for x in (a, b))
            diff, lo, hi = paired_change([vb[i] for i in ids], [va[i] for i in ids])
            # the smallest true difference this design detects (80% power), seeds paired side by side when the
            # two sides have as many: a lower bound, seeds vary too
            per_seed = [[ra[i] - rb[i] for i in ids] for ra, rb in zip(verdicts(side(a)), verdicts(side(b)))]
            paired = len(side(a)) == len(side(b))
            mde = power.mde(power.se_discordance(per_seed)) if paired else None
            pairs.append({"a": " + ".join(side(a)), "b": " + ".join(side(b)), "set": s, "n": len(ids),
                          "diff": diff, "lo": lo, "hi": hi, "same": sum(va[i] == vb[i] for i in ids), "mde80": mde,
                          **(seed_interval(per_seed) if paired and len(per_seed) > 1 else {})})
    return rows, pairs


def seed_interval(per_seed) -> dict:
    """Seeds paired side by side (d[s][i] = a_s - b_s on prompt i): each seed's mean difference, and the 95%
    two-level bootstrap interval (seeds, then prompts, resampled with replacement each rep: the CI "over seeds
    and examples"). With S seeds the percentile bootstrap sees S-1 of S parts of the between-seed variance and
    only C(2S-1, S) seed draws (10 at S = 3): optimistic, and the per-seed values are printed beside it."""
    d = np.asarray(per_seed, dtype=float)
    lo, hi = np.percentile(power.bootstrap_seeds_stats(d, reps=10000, same_stream=False), [2.5, 97.5])
    return {"per_seed": [float(x) for x in d.mean(1)], "seeds_lo": float(lo), "seeds_hi": float(hi)}


SEEDS_HEAD = "seeds paired in order: each seed's change; 95% CI over seeds and prompts (two-level bootstrap)"


def seeds_cell(p: dict) -> str:
    if "per_seed" not in p:
        return ""
    return (", ".join(f"{100 * x:+.1f}" for x in p["per_seed"])
            + f"; [{100 * p['seeds_lo']:+.1f}, {100 * p['seeds_hi']:+.1f}]")


def last_val_verdicts(arm: str) -> dict | None:
    """The val verdicts of the policy an arm keeps: its last evaluation, the untrained model's first, a long
    arm's evaluation at the step of its best policy (best.json; None when that is not known here), and a long
    control's start's (the RL arm's step 0) when it keeps its start."""
    if arm in VAL_KEPT:  # the evaluation at its arm's val_best_step (0: its start's)
        step = val_best_step(VAL_KEPT[arm])
        if step == 0:
            return start_eval(VAL_KEPT[arm])["verdicts"]
        return next(r for r in load(VAL_KEPT[arm]) if r.get("phase") == "eval" and r["step"] == step)["verdicts"]
    if arm in LONG_ARMS and arm in CONTROL_OF and control_keeps_its_start(arm):
        return start_eval(arm)["verdicts"]  # its kept policy is its start: the RL arm's evaluation at step 0
    history = load(arm if arm != "untrained" else START_ARM) or []
    evals = [r for r in history if r.get("phase") == "eval" and "verdicts" in r]
    if arm in LONG_ARMS:
        best = WORK / arm / "best" / "best.json"
        step = json.loads(best.read_text())["step"] if best.exists() else None
        evals = [r for r in evals if r["step"] == step]
    if not evals:
        return None
    return (evals[0] if arm == "untrained" else evals[-1])["verdicts"]


def heldout_report(suite: str = "heldout") -> str:
    from fctrain import data
    sets, names, compare = SUITES[suite]
    evals = {n: e for n in names if (e := heldout_eval(n, suite)) is not None}
    if not evals:
        return ""
    sets_of = {s: [e.id for e in data.load_split(s)] for s in sets}
    arm_val = {n: v for n in evals if (v := last_val_verdicts(n)) is not None}
    rows, pairs = heldout_rows(evals, sets_of, arm_val, compare)
    pct = lambda x: f"{100 * x:.1f}"
    lines = ["| policy | set | n | accuracy (95% CI) | answers: call / none / unparsable | val repeats the arm's own |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rep = f"{r['val_repeat'][0]}/{r['val_repeat'][1]} verdicts" if "val_repeat" in r else ""
        lines.append(f"| {r['policy']} | {r['set']} | {r['n']} | {pct(r['acc'])} [{pct(r['lo'])}, {pct(r['hi'])}] | "
                     f"{pct(r['says_call'])} / {pct(r['says_none'])} / {pct(r['says_bad'])} | {rep} |")
    lines += ["", "| comparison (a side of several seeds: their mean per prompt) | set | n | change, points (95% CI, "
              "paired bootstrap over prompts) | same verdict | detectable at 80% power (lower bound) | "
              + SEEDS_HEAD + " |", "|---|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['a']} - {p['b']} | {p['set']} | {p['n']} | {100 * p['diff']:+.1f} "
                     f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}] | {p['same']}/{p['n']} | "
                     + (f"{100 * p['mde80']:.1f} |" if p["mde80"] is not None else "|") + f" {seeds_cell(p)} |")
    text = "\n".join(lines)
    out = RESULTS / suite
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "pairs": pairs, "sets": sets,
                                                  "policies": list(evals)}, indent=1) + "\n")
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--arms", nargs="+", default=None, help=f"default: all, in order: {' '.join(ARMS)}")
    r.add_argument("--commit", action="store_true", help="git-commit RESULTS after each finished arm or piece")
    r.add_argument("--piece-s", type=float, default=None,
                   help="interrupt each arm after this many wall seconds (it checkpoints), commit its curve so "
                        "far, go on to the next arm; run again to resume")
    r.add_argument("--any-machine", action="store_true",
                   help="run an SFT control (or resume a long arm) on another kind of machine than its RL arm's "
                        "(its training seconds then are not equal work)")
    r.add_argument("--restart", action="store_true",
                   help="train a long arm again from step 0 when its committed curve's checkpoint is not here")
    sub.add_parser("report")
    h = sub.add_parser("heldout", help="the untrained model and the arms' kept final policies on the held-out sets")
    h.add_argument("--policies", nargs="+", default=list(HELDOUT_ARMS), choices=HELDOUT_ARMS)
    h.add_argument("--commit", action="store_true", help="git-commit the held-out results after each policy")
    h.add_argument("--report", action="store_true", help="only the report of what was evaluated")
    v = sub.add_parser("val-irr", help="kept policies on val_irr: BFCL irrelevance of (c)'s kind, for choosing")
    v.add_argument("--policies", nargs="+", default=list(VAL_IRR_ARMS), choices=VAL_IRR_ARMS)
    v.add_argument("--commit", action="store_true", help="git-commit the results after each policy")
    v.add_argument("--report", action="store_true", help="only the report of what was evaluated")
    b = sub.add_parser("rebuild", help="run finished arms again to put back their kept policies (a new machine)")
    b.add_argument("--arms", nargs="+", required=True)
    b.add_argument("--commit", action="store_true", help="git-commit RESULTS/rebuilt after each arm")
    args = p.parse_args(argv)
    if args.cmd == "rebuild":
        for arm in args.arms:
            if arm not in ARMS:
                raise SystemExit(f"unknown arm {arm!r}; known: {list(ARMS)}")
            rebuild_arm(arm, args.commit)
        return 0
    if args.cmd == "report":
        report()
        return 0
    if args.cmd == "heldout":
        heldout_report() if args.report else run_heldout(args.policies, args.commit)
        return 0
    if args.cmd == "val-irr":
        heldout_report("val_irr") if args.report else run_heldout(args.policies, args.commit, "val_irr")
        return 0
    for arm in args.arms or list(ARMS):
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; known: {list(ARMS)}")
        if metrics_path(arm).exists():
            print(f"[qwen_pilots] {arm}: finished, skipped", flush=True)
            continue
        run_arm(arm, args.commit, args.piece_s, args.any_machine, args.restart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
