"""Does a policy tell call-needing from no-call prompts, whatever its threshold? (issue 30, part 1's
threshold-free separation score, on the Qwen pilots' kept final policies)

    python benchmarks/bench_decision_probe.py run --policies untrained lr1e-6-abal-s1 ... [--commit]
    python benchmarks/bench_decision_probe.py report
    python benchmarks/bench_decision_probe.py think --policies think-hint-sft-start-s1 [--commit]

For each val prompt (the trainer's `split:val`, prompts over 768 tokens dropped as the trainer drops them),
one forward pass over the prompt followed by the opening of an answer, `<answer` (Qwen answers without a
think). The next token decides: its tokenizer writes a no-call answer as `>[]` and a call's opening as `>[`
(BPE merges; found from the tokenizer itself, `decision_tokens`). So

    score = log P(no call) - log P(call),

each P summed over the vocabulary's tokens of its kind (P(other): everything else, reported).
- AUC, no-call prompts positive (rank-sum, ties 1/2): the share of (no-call, call-needing) prompt pairs the
  score orders the right way; 0.5 = no separation. A global shift toward calling or abstaining moves every
  score alike and leaves the AUC where it was: a policy that learned only an offset keeps the untrained AUC.
- At the policy's own threshold: mean P(no call) on each kind and the balanced accuracy of "no call when
  P(no call) > P(call)".
- CIs: bootstrap over prompts, stratified by kind; policies compared paired by prompt.

One forward per prompt in float32 on CPU, logits of the last position only (on the 2-core Zen 4: 2.7 s each
on two threads, 6.5-7 s on one beside a training arm; one thread by default so such an arm keeps its cores).
Each policy's per-prompt scores go to results/qwen_pilots_cpu/decision_probe/<policy>.json (a policy already there is skipped); `report` writes summary.md there.

`think`: the same decision for a policy that thinks first (`--think prefill`, the think starts of EGPO vs GRPO).
Each val prompt ends with the opened think; the policy's own greedy think is generated (up to the trainer's
160 tokens, stopped at `</think>`), and the decision is read after three leads, each tokenized with the answer
as the SFT target is: its own think + `</think>` (what the evaluation sees), a fixed no-call think (NO_CALL_THINK:
does a think that says "no call" lead to `[]`?), and on the SFT data it was trained on, the data's own think
(teacher-forced: did SFT fit its no-call targets?). Results: decision_probe/think/<policy>.json and summary.md.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_headroom  # noqa: E402
import bench_qwen_pilots  # noqa: E402
import common  # noqa: E402
from bench_headroom import auc  # noqa: E402
from fctrain import prompts  # noqa: E402

REPO = common.REPO
RESULTS = common.RESULTS / "qwen_pilots_cpu" / "decision_probe"
DATA, MAX_PROMPT_TOKENS = "split:val", 768
ANSWER_OPEN = "<answer"
# (a, b): policy a's AUC minus b's, paired by prompt
PAIRS = (("sft-control-s1", "untrained"), ("lr1e-6-abal-s1", "untrained"), ("lr1e-6-dbal-s1", "untrained"),
         ("lr1e-6-abal", "untrained"), ("lr1e-6-abal-s2", "untrained"), ("lr1e-6-s2", "untrained"),
         ("lr1e-6-abal-s1", "sft-control-s1"), ("lr1e-6-anchor5e-3-s1", "untrained"),
         ("lr1e-6-anchor5e-3-s1", "sft-control-s1"), ("lr1e-6-anchor5e-3", "untrained"),
         ("lr1e-6-s2", "lr1e-6-abal-s1"),
         # RL from an SFT start against its start and against SFT going on from it (seeds 1 and 0)
         ("sft-rl-s1", "sft-control-s1"), ("sft-more-s1", "sft-control-s1"), ("sft-rl-s1", "sft-more-s1"),
         ("sft-rl-s0", "sft-start-s0"), ("sft-more-s0", "sft-start-s0"), ("sft-rl-s0", "sft-more-s0"))


@torch.inference_mode()
def probe(model, tokenizer, examples, prompt_ids, no_call: set[str]) -> list[dict]:
    """Per prompt: id, no_call (bool: the prompt needs no call), log P(no call), log P(call), P(other)."""
    prefix, nones, calls = prompts.decision_tokens(tokenizer)
    nones_t, calls_t = torch.tensor(nones), torch.tensor(calls)
    rows = []
    for e, ids in zip(examples, prompt_ids):
        logits = model(torch.tensor([ids + prefix]), logits_to_keep=1).logits[0, -1].double()
        logp = logits.log_softmax(-1)
        lp_none, lp_call = logp[nones_t].logsumexp(0).item(), logp[calls_t].logsumexp(0).item()
        rows.append({"id": e.id, "no_call": e.id in no_call, "logp_none": lp_none,
                     "logp_call": lp_call, "p_other": max(0.0, 1.0 - math.exp(lp_none) - math.exp(lp_call))})
    return rows


def summarize(rows: list[dict]) -> dict:
    pos = [r["logp_none"] - r["logp_call"] for r in rows if r["no_call"]]
    neg = [r["logp_none"] - r["logp_call"] for r in rows if not r["no_call"]]
    p_none = lambda side: sum(math.exp(r["logp_none"]) for r in rows if r["no_call"] == side) / max(
        1, sum(r["no_call"] == side for r in rows))
    right = lambda side: sum((r["logp_none"] > r["logp_call"]) == side for r in rows if r["no_call"] == side) / max(
        1, sum(r["no_call"] == side for r in rows))
    return {"n_no_call": len(pos), "n_call": len(neg), "auc": auc(pos, neg),
            "mean_s_no_call": sum(pos) / max(1, len(pos)), "mean_s_call": sum(neg) / max(1, len(neg)),
            "p_none_on_no_call": p_none(True), "p_none_on_call": p_none(False),
            "balanced_acc": (right(True) + right(False)) / 2,
            "p_other": sum(r["p_other"] for r in rows) / max(1, len(rows))}


def offset(summary: dict, no_call_share: float) -> float:
    """The policy's mean score on a mix with this share of no-call prompts (its global offset there)."""
    return no_call_share * summary["mean_s_no_call"] + (1 - no_call_share) * summary["mean_s_call"]


def train_no_call_share() -> float:
    """The share of no-call prompts in the trainer's training pool (split:train after its prompt-length cut):
    --decision_anchor pins the mean score over steps drawn from it."""
    from fctrain import models, reward
    tokenizer = models.load_tokenizer(models.resolve_model(bench_qwen_pilots.kept_policy("untrained")))
    examples, _, _ = bench_headroom.load_examples("split:train", tokenizer, MAX_PROMPT_TOKENS, None)
    return sum(reward.is_irrelevance(e.category) for e in examples) / len(examples)


def auc_ci(rows_a: list[dict], rows_b: list[dict] | None = None, reps: int = 2000, seed: int = 0):
    """(AUC of a [minus b's], 95% bootstrap interval): prompts resampled within each kind, the same prompts for
    both policies (b's rows matched to a's by id)."""
    if rows_b is not None:
        by_id = {r["id"]: r for r in rows_b}
        rows_a = [r for r in rows_a if r["id"] in by_id]
        rows_b = [by_id[r["id"]] for r in rows_a]
    score = lambda r: r["logp_none"] - r["logp_call"]
    stat = lambda idx_pos, idx_neg: (
        auc([score(rows_a[i]) for i in idx_pos], [score(rows_a[i]) for i in idx_neg])
        - (auc([score(rows_b[i]) for i in idx_pos], [score(rows_b[i]) for i in idx_neg]) if rows_b else 0.0))
    pos = [i for i, r in enumerate(rows_a) if r["no_call"]]
    neg = [i for i, r in enumerate(rows_a) if not r["no_call"]]
    rng = random.Random(seed)
    draws = sorted(stat(rng.choices(pos, k=len(pos)), rng.choices(neg, k=len(neg))) for _ in range(reps))
    return stat(pos, neg), draws[int(0.025 * reps)], draws[int(0.975 * reps) - 1]


def run(args) -> None:
    from fctrain import models

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(models.resolve_model(bench_qwen_pilots.kept_policy("untrained")))
    # the trainer's cut
    examples, prompt_ids, _ = bench_headroom.load_examples(DATA, tokenizer, MAX_PROMPT_TOKENS, None)
    no_call = {i for i, kind in bench_qwen_pilots.val_kinds().items() if kind == "no_call"}  # the pilots' kinds

    def evaluate(model):
        rows = probe(model, tokenizer, examples, prompt_ids, no_call)
        return {"summary": summarize(rows), "rows": rows}, f"AUC {summarize(rows)['auc']:.3f} on val"
    probe_policies(args, RESULTS, "probe", "decision probe", evaluate, report_md,
                   {"data": DATA, "max_prompt_tokens": MAX_PROMPT_TOKENS})


def probe_policies(args, out_dir: Path, tag: str, what: str, evaluate, report, meta: dict) -> None:
    """Each of args.policies not yet in out_dir (untrained, or an arm with a kept final policy): loaded,
    `evaluate(model)` -> (result dict, a few words for the log), written with the run's metadata to
    out_dir/<policy>.json; with args.commit, `report()` and a commit after each."""
    from fctrain import models

    for name in args.policies:
        out = out_dir / f"{name}.json"
        if out.exists():
            print(f"[{tag}] {out.name} exists: skipped", flush=True)
            continue
        path = models.resolve_model(bench_qwen_pilots.kept_policy(name))
        t0 = time.perf_counter()
        result, words = evaluate(models.load_model(path))
        result = {"meta": common.run_metadata("cpu") | meta | {
            "policy": name, "path": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name,
            "threads": args.threads, "seconds": round(time.perf_counter() - t0, 1)}} | result
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"[{tag}] {name}: {json.dumps(result['summary'])} ({result['meta']['seconds']} s)", flush=True)
        if args.commit:
            report()
            bench_qwen_pilots.commit_results(f"{what}: {name} ({words})", out_dir)


THINK_RESULTS = RESULTS / "think"
NO_CALL_THINK = "None of the available functions can do what the user asks, so I make no call."
THINK_MAX_TOKENS, THINK_TRAIN_ROWS = 160, 40  # the trainer's completion budget; SFT rows probed (half no-call)


@torch.inference_mode()
def decision_after(model, tokenizer, ids: list[int], leads: list[str]) -> list[tuple[float, float]]:
    """(log P(no call), log P(call)) at the answer's opening after each lead, all after the same prompt `ids`:
    the prompt is run once and its cache cut back to it before each lead."""
    out = model(torch.tensor([ids]), use_cache=True)
    cache, scores = out.past_key_values, []
    for lead in leads:
        prefix, nones, calls = prompts.decision_tokens(tokenizer, lead)
        cache.crop(len(ids))
        logp = model(torch.tensor([prefix]), past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits[0, -1].double().log_softmax(-1)
        scores.append((logp[nones].logsumexp(0).item(), logp[calls].logsumexp(0).item()))
    return scores


def think_probe(model, tokenizer, engine, examples, prompt_ids, no_call: set[str]) -> list[dict]:
    """Per val prompt (its ids end with the opened think): the policy's greedy think, whether it closed, and the
    decision after it and after NO_CALL_THINK."""
    outs = engine.generate(prompt_ids, n=1, temperature=0.0, top_p=1.0, max_tokens=THINK_MAX_TOKENS,
                           stop=["</think>"], seed=0)
    rows = []
    for e, ids, (c,) in zip(examples, prompt_ids, outs):
        think = c.text.split("</think>")[0]
        (own_n, own_c), (neg_n, neg_c) = decision_after(model, tokenizer, ids, [think + "</think>",
                                                                                 NO_CALL_THINK + "</think>"])
        rows.append({"id": e.id, "no_call": e.id in no_call, "think": think,
                     "closed": "</think>" in tokenizer.decode(c.token_ids), "logp_none": own_n, "logp_call": own_c,
                     "p_other": max(0.0, 1 - math.exp(own_n) - math.exp(own_c)),
                     "nc_logp_none": neg_n, "nc_logp_call": neg_c})
    return rows


def think_summary(rows: list[dict], fit: list[dict]) -> dict:
    mean = lambda xs: sum(xs) / max(1, len(xs))
    side = lambda no_call: [r for r in rows if r["no_call"] == no_call]
    return summarize(rows) | {
        "closed_no_call": mean([r["closed"] for r in side(True)]),
        "closed_call": mean([r["closed"] for r in side(False)]),
        "think_words_no_call": mean([len(r["think"].split()) for r in side(True)]),
        "nc_think_p_none_on_no_call": mean([math.exp(r["nc_logp_none"]) for r in side(True)]),
        "nc_think_p_none_on_call": mean([math.exp(r["nc_logp_none"]) for r in side(False)]),
        "sft_fit_p_none_on_no_call": mean([math.exp(r["logp_none"]) for r in fit if r["no_call"]]),
        "sft_fit_p_none_on_call": mean([math.exp(r["logp_none"]) for r in fit if not r["no_call"]]),
        "sft_fit_auc": auc([r["logp_none"] - r["logp_call"] for r in fit if r["no_call"]],
                           [r["logp_none"] - r["logp_call"] for r in fit if not r["no_call"]])}


def run_think(args) -> None:
    from fctrain import data as fdata
    from fctrain import models, reward
    from fctrain.rollout import HFEngine

    torch.set_num_threads(args.threads)
    THINK_RESULTS.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(models.resolve_model(bench_qwen_pilots.kept_policy("untrained")))
    pre = prompts.THINK_PREFILL
    val = [(e, prompts.build_prompt_ids(e, tokenizer, "python", pre)) for e in fdata.load_split("val")]
    examples = [e for e, ids in val if len(ids) <= MAX_PROMPT_TOKENS]  # the trainer's cut
    prompt_ids = [ids for _, ids in val if len(ids) <= MAX_PROMPT_TOKENS]
    no_call = {i for i, kind in bench_qwen_pilots.val_kinds().items() if kind == "no_call"}
    sft = [e for e in fdata.load_any(bench_qwen_pilots.SELF_THINK_HINT)
           if len(prompts.build_prompt_ids(e, tokenizer, "python", pre)) <= MAX_PROMPT_TOKENS]
    half = THINK_TRAIN_ROWS // 2
    sft = ([e for e in sft if reward.is_irrelevance(e.category)][:half]
           + [e for e in sft if not reward.is_irrelevance(e.category)][:half])

    def evaluate(model):
        rows = think_probe(model, tokenizer, HFEngine(model, tokenizer, batch_size=8), examples, prompt_ids, no_call)
        fit = []
        for e in sft:  # teacher-forced: the SFT target's own think before the answer
            ((n, c),) = decision_after(model, tokenizer, prompts.build_prompt_ids(e, tokenizer, "python", pre),
                                       [prompts.render_target(e, "python", "data").removeprefix("<think>")
                                        .split("<answer>")[0]])
            fit.append({"id": e.id, "no_call": reward.is_irrelevance(e.category), "logp_none": n, "logp_call": c})
        s = think_summary(rows, fit)
        return {"summary": s, "rows": rows, "sft_fit": fit}, f"P(no call) on no-call {s['p_none_on_no_call']:.3f}"
    probe_policies(args, THINK_RESULTS, "think probe", "decision probe after the think", evaluate, think_report_md,
                   {"data": DATA, "max_prompt_tokens": MAX_PROMPT_TOKENS,
                    "sft_data": bench_qwen_pilots.SELF_THINK_HINT})


def think_report_md() -> str:
    lines = ["# Decision after the policy's own think (val, --think prefill)", "",
             "P(no call): the probability of `[]` at the answer's opening. Own think: the policy's greedy think "
             f"(<= {THINK_MAX_TOKENS} tokens). Fixed no-call think: \"{NO_CALL_THINK}\". SFT fit: the SFT data's "
             f"own thinks, teacher-forced ({THINK_TRAIN_ROWS} rows, half no-call).", "",
             "| policy | think closed: no-call / call | AUC after own think "
             "| P(no call) after own think: no-call / call | balanced acc "
             "| P(no call) after the fixed no-call think: no-call / call "
             "| SFT fit: P(no call) no-call / call, AUC | machine |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(THINK_RESULTS.glob("*.json")):
        r = json.loads(p.read_text())
        s, (a, lo, hi) = r["summary"], auc_ci(r["rows"])
        lines.append(f"| {p.stem} | {100 * s['closed_no_call']:.0f}% / {100 * s['closed_call']:.0f}% "
                     f"| {a:.3f} [{lo:.3f}, {hi:.3f}] | {s['p_none_on_no_call']:.3f} / {s['p_none_on_call']:.3f} "
                     f"| {100 * s['balanced_acc']:.1f} "
                     f"| {s['nc_think_p_none_on_no_call']:.3f} / {s['nc_think_p_none_on_call']:.3f} "
                     f"| {s['sft_fit_p_none_on_no_call']:.3f} / {s['sft_fit_p_none_on_call']:.3f}, "
                     f"{s['sft_fit_auc']:.3f} | {r['meta']['device']} |")
    text = "\n".join(lines) + "\n"
    (THINK_RESULTS / "summary.md").write_text(text)
    return text


def load_all() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def report_md() -> str:
    res = load_all()
    share = train_no_call_share()
    base = summarize(res["untrained"]["rows"]) if "untrained" in res else None
    lines = ["# Decision probe on val: log P(no call) - log P(call) at the answer's opening", "",
             f"Mean score s on each kind of val prompt, and the offset: the mean s on a mix with the training pool's "
             f"share of no-call prompts ({100 * share:.1f}%), what `--decision_anchor` pins (its shift from the "
             f"untrained model's in brackets).", "",
             "| policy | no-call / call prompts | AUC (95% CI) | P(no call) on no-call | P(no call) on call "
             "| balanced acc at its own threshold | mean s: no-call / call | offset at the training mix | P(other) "
             "| machine |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        s, (a, lo, hi) = summarize(r["rows"]), auc_ci(r["rows"])
        shift = f" ({offset(s, share) - offset(base, share):+.2f})" if base else ""
        lines.append(f"| {name} | {s['n_no_call']} / {s['n_call']} | {a:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{s['p_none_on_no_call']:.3f} | {s['p_none_on_call']:.3f} | {100 * s['balanced_acc']:.1f} | "
                     f"{s['mean_s_no_call']:+.2f} / {s['mean_s_call']:+.2f} | {offset(s, share):+.2f}{shift} | "
                     f"{s['p_other']:.3f} | {r['meta']['device']} |")
    pairs = [(a, b) for a, b in PAIRS if a in res and b in res]
    if pairs:
        lines += ["", "| AUC, a - b (paired by prompt) | difference (95% CI) |", "|---|---|"]
        for a, b in pairs:
            d, lo, hi = auc_ci(res[a]["rows"], res[b]["rows"])
            lines.append(f"| {a} - {b} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.md").write_text(text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="probe policies (untrained, or arms with a kept final policy)")
    r.add_argument("--policies", nargs="+", required=True)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--commit", action="store_true", help="commit each policy's result and the summary")
    sub.add_parser("report", help="write summary.md from the stored results")
    t = sub.add_parser("think", help="the decision after a thinking policy's own think (--think prefill)")
    t.add_argument("--policies", nargs="+", required=True)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--commit", action="store_true", help="commit each policy's result and the summary")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args)
    elif args.cmd == "think":
        run_think(args)
    else:
        print(report_md(), end="")


if __name__ == "__main__":
    main()
