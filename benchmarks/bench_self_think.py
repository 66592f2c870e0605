"""The model's own think, for an SFT start whose think is not a template (issue 30: EGPO vs GRPO).

    .venv/bin/python benchmarks/bench_self_think.py [--model qwen2.5-coder-0.5b] [--data split:train]
        [--out benchmarks/results/qwen_pilots_cpu/self_think] [--max_think_tokens 64] [--seed 0] [--hint] [--commit]

EGPO's term is the entropy of the completion's think. Raw Qwen2.5-Coder-0.5B asked for
`<think>...</think><answer>[...]</answer>` writes no think (10 of 1,920 samples open one), so its H is 0 and
EGPO = GRPO by construction; an SFT start trained on a templated think (`--sft_think evidence`) writes that
template back with near-zero entropy (SmolLM2: 0.02-0.06 nats per token), the same tie. Handed an opened
`<think>` (the trainer's `--think prefill`), the raw model does reason in its own words, but seldom closes the
think: it runs on into prose, code or an answer of its own (0 of 12 samples parsed in a probe). So the think an
SFT start learns is taken from the model and the answer from the data (STaR's rationale without the hint; the
think is not checked against the answer, which the reward alone judges):

1. Each training prompt + the opened think (`fctrain.prompts.THINK_PREFILL`), one sample at T 0.7 (seeded), at
   most max_think_tokens tokens, stopped before the first `</think>`, `<answer`, `</answer>`, `<tool_call>`
   or a code fence.
2. The think is that text, cut back to its last finished sentence or line when the sample ran out of tokens
   (`own_think`); an example whose think comes out empty is dropped and counted.
3. Written as our JSONL (the `think` field) to OUT/train.jsonl, with OUT/meta.json: model, settings, counts,
   the thinks' length in tokens, git sha, machine.

With `--hint` (STaR's rationalization), step 1's prompt also names the gold answer at the end of the last user
turn (`hinted`), so the model reasons towards it; the think is kept, the hint is not (the SFT target's prompt is
the plain one), and a think that mentions the hint ("note", "hint") is dropped and counted. Without it, the
seed-1 start learned from the model's unguided thinks called on 87% of val's no-call prompts: those thinks
restate the request as a task ("Add a new player profile with ...") even where no function fits.

With `--refuse K` (and `--hint`), an example whose think disagrees with its answer is sampled K more times from
the same hinted prompt, and the first think that agrees is kept; one that never does is dropped and counted. A
think agrees when it says that no function fits (`says_no_call`: "none of the functions", "no suitable function",
"cannot", "I'm sorry", ...) exactly when the answer is `[]`. In the hinted data only 52 of 236 no-call thinks say
so (the rest restate the request as a task, as call thinks do, so after such a think the data says `[]` about 1
time in 3), and 26 of 399 call thinks do, then call ("I'm sorry, but I can't assist with that request.").

An SFT start then trains with `--think prefill --sft_think data --train_data OUT/train.jsonl`: the prompt opens
the think, the target goes on in the model's own words and closes it before the gold answer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import REPO, RESULTS, device_name, git_sha  # noqa: E402
from fctrain import data, models, prompts, rollout  # noqa: E402
from fctrain.example import Example  # noqa: E402

OUT = RESULTS / "qwen_pilots_cpu" / "self_think"
STOPS = ["</think>", "<answer", "</answer>", "<tool_call>", "```"]
ENDS = (".\n", ". ", "\n")


def own_think(text: str, finish_reason: str) -> str:
    """The think kept from one sample's `text` (the engine already cut it before any stop string): whitespace
    trimmed; a sample that ran out of tokens ("length") is cut back to its last finished sentence or line,
    when it has one. Empty when nothing is left."""
    if finish_reason == "length":
        cut = max(text.rfind(end) for end in ENDS)
        if cut > 0:
            text = text[:cut + 1]
    text = text.strip()
    return "" if any(tag in text for tag in ("<think>", "</think>")) else text


HINT = ("\n\n(A note for your reasoning only: the right answer here is {answer}. Think your way to it in your "
        "own words and do not mention this note.)")
NO_CALL = "no function call, `<answer>[]</answer>`, because none of the functions given can do this"
HINT_WORDS = ("note", "hint")
# a think that says no call fits: no function / none of them fits, it cannot be done, an apology
REFUSAL = re.compile(
    r"\bno (?:suitable |relevant |appropriate |available |matching |such |single |specific |existing |given )?"
    r"(?:function|tool|api|method)s?\b|\bnone of (?:the|these|those|them)\b|\bno function call"
    r"|\b(?:cannot|can ?not|can't|unable to|not able to)\b|\bi'?m sorry\b|\bi apologi[sz]e\b"
    r"|\b(?:does not|doesn't|do not|don't|is not|isn't|are not|aren't) (?:seem to )?(?:have|provide|support|include"
    r"|offer|contain|exist|match|fit|apply|relate|cover|available|relevant|applicable|possible|related)\b"
    r"|\bnot (?:possible|available|supported|provided|applicable|relevant|related)\b"
    r"|\bnot (?:something|a task|a question) (?:that )?(?:the |any )?(?:given |provided |available )?"
    r"(?:function|tool)s?\b", re.IGNORECASE)


def says_no_call(think: str) -> bool:
    """Whether `think` says that no call fits (REFUSAL: no function fits, none of them, it cannot be done, an
    apology). A plain text test, for choosing among sampled thinks; it reads no answer."""
    return REFUSAL.search(think) is not None


def hinted(example: Example) -> Example:
    """`example` with its gold answer named at the end of its last user turn (HINT): the prompt a rationalization
    samples its think from. The example itself is not changed."""
    target = prompts.render_target(example, "python", "none")
    answer = f"`{target}`" if example.ground_truth else NO_CALL
    messages = [dict(m) for m in example.messages]
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError(f"example {example.id} has no user turn to hint")
    messages[last]["content"] = str(messages[last]["content"]) + HINT.format(answer=answer)
    return dataclasses.replace(example, messages=messages)


def make(model: str, data_spec: str, out: Path, max_think_tokens: int, seed: int, engine_kind: str,
         temperature: float = 0.7, batch: int = 64, hint: bool = False, refuse: int = 0) -> dict:
    path = models.resolve_model(model)
    tokenizer = models.load_tokenizer(path)
    examples = data.load_any(data_spec)
    prompt_ids = [prompts.build_prompt_ids(hinted(ex) if hint else ex, tokenizer, "python", prompts.THINK_PREFILL)
                  for ex in examples]
    kw = dict(dtype="float32", max_model_len=max(map(len, prompt_ids)) + max_think_tokens) if engine_kind == "vllm" else {}
    t0 = time.perf_counter()
    engine = rollout.make_engine(engine_kind, path, **kw)
    kept, lengths, dropped, dropped_hint, dropped_disagreeing, agreed_at = [], [], [], [], [], {}

    def names_hint(think: str) -> bool:
        return hint and any(w in think.lower() for w in HINT_WORDS)

    def usable(c) -> str:
        """The think kept from completion `c`: "" when nothing is left or it names the hint."""
        think = own_think(c.text, c.finish_reason)
        return "" if names_hint(think) else think

    try:
        thinks: dict[int, str] = {}
        for start in range(0, len(examples), batch):
            outs = engine.generate(prompt_ids[start:start + batch], n=1, temperature=temperature, top_p=1.0,
                                   max_tokens=max_think_tokens, stop=STOPS, seed=seed + start)
            for i, (c,) in enumerate(outs, start):
                think = own_think(c.text, c.finish_reason)
                if not think:
                    dropped.append(examples[i].id)
                elif names_hint(think):
                    dropped_hint.append(examples[i].id)
                else:
                    thinks[i] = think
            print(f"[self_think] {min(start + batch, len(examples))}/{len(examples)} prompts, {len(thinks)} kept",
                  file=sys.stderr, flush=True)
        if refuse:  # a think must say no call fits exactly when the answer is []: resample the others
            def agrees(i: int, think: str) -> bool:
                return bool(think) and says_no_call(think) == (not examples[i].ground_truth)
            redo = [i for i, ex in enumerate(examples) if i in thinks and not agrees(i, thinks[i])
                    or i not in thinks and not ex.ground_truth]  # a no-call example's empty think too
            agreed_at.update((examples[i].id, 0) for i in set(thinks) - set(redo))
            for start in range(0, len(redo), max(1, batch // refuse)):
                part = redo[start:start + max(1, batch // refuse)]
                outs = engine.generate([prompt_ids[i] for i in part], n=refuse, temperature=temperature, top_p=1.0,
                                       max_tokens=max_think_tokens, stop=STOPS, seed=seed + len(examples) + start * refuse)
                for i, samples in zip(part, outs):
                    j = next((j for j, c in enumerate(samples, 1) if agrees(i, usable(c))), None)
                    if j is None:
                        thinks.pop(i, None)
                        dropped_disagreeing.append(examples[i].id)
                    else:
                        thinks[i] = usable(samples[j - 1])
                        agreed_at[examples[i].id] = j
                print(f"[self_think] resampled {min(start + len(part), len(redo))}/{len(redo)} prompts",
                      file=sys.stderr, flush=True)
            resampled = {examples[i].id for i in redo}  # counted once: kept, or dropped as disagreeing
            dropped[:] = [x for x in dropped if x not in resampled]
            dropped_hint[:] = [x for x in dropped_hint if x not in resampled]
    finally:
        engine.close()
    for i in sorted(thinks):
        ex = examples[i]
        ex.think = thinks[i]
        kept.append(ex)
        lengths.append(len(tokenizer.encode(ex.think, add_special_tokens=False)))
    out.mkdir(parents=True, exist_ok=True)
    data.save_jsonl(kept, out / "train.jsonl")
    meta = {"model": model, "model_path": str(path), "data": data_spec, "examples": len(examples),
            "kept": len(kept), "dropped_empty": len(dropped), "dropped_ids": dropped[:50], "hint": hint,
            "dropped_hint": len(dropped_hint), "dropped_hint_ids": dropped_hint[:50], "refuse": refuse,
            "dropped_disagreeing": len(dropped_disagreeing), "dropped_disagreeing_ids": dropped_disagreeing[:50],
            # with --refuse, how many kept thinks agreed with their answer at each sample (0: the first pass)
            "agreed_at": {str(k): sum(v == k for v in agreed_at.values()) for k in sorted(set(agreed_at.values()))},
            "no_call_kept": sum(not ex.ground_truth for ex in kept),
            "no_call_says_no_call": sum(not ex.ground_truth and says_no_call(ex.think) for ex in kept),
            "call_says_no_call": sum(bool(ex.ground_truth) and says_no_call(ex.think) for ex in kept),
            "prompt_tokens_median": statistics.median(map(len, prompt_ids)) if prompt_ids else None,
            "temperature": temperature, "max_think_tokens": max_think_tokens, "stops": STOPS, "seed": seed,
            "engine": engine_kind, "think_tokens": {"median": statistics.median(lengths) if lengths else None,
                                                    "min": min(lengths, default=None), "max": max(lengths, default=None)},
            "seconds": round(time.perf_counter() - t0, 1), "git_sha": git_sha(),
            "machine": device_name("cpu"),
            "command": " ".join(["python benchmarks/bench_self_think.py"] + sys.argv[1:])}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--data", default="split:train", help="the training prompts (never val or test)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--max_think_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="vllm", choices=rollout.ENGINE_KINDS)
    p.add_argument("--hint", action="store_true", help="name the gold answer in the prompt the think is sampled "
                   "from (STaR's rationalization); default OUT then ends in _hint")
    p.add_argument("--refuse", type=int, default=0, metavar="K", help="with --hint: resample an example whose "
                   "think disagrees with its answer (says no function fits, or not, when it calls) up to K times, "
                   "keep the first that agrees (default OUT then ends in _refuse)")
    p.add_argument("--commit", action="store_true", help="commit OUT's two files")
    args = p.parse_args(argv)
    if args.max_think_tokens < 1:
        p.error("--max_think_tokens must be >= 1")
    if args.refuse < 0 or (args.refuse and not args.hint):
        p.error("--refuse K needs K >= 0 and --hint (the no-call answer named is what a think can refuse by)")
    if args.hint and args.out == OUT:
        args.out = OUT.with_name(OUT.name + "_hint" + ("_refuse" if args.refuse else ""))
    meta = make(args.model, args.data, args.out, args.max_think_tokens, args.seed, args.engine, hint=args.hint,
                refuse=args.refuse)
    print(json.dumps({k: meta[k] for k in ("examples", "kept", "dropped_empty", "dropped_hint", "dropped_disagreeing",
                                           "agreed_at", "no_call_says_no_call", "think_tokens", "seconds")}))
    if args.commit:
        paths = [str(args.out / "train.jsonl"), str(args.out / "meta.json")]
        subprocess.run(["git", "add", "--"] + paths, cwd=REPO, check=False)
        subprocess.run(["git", "commit", "-q", "-m", f"self_think: the model's own think for {meta['kept']} of "
                        f"{meta['examples']} training prompts", "--"] + paths, cwd=REPO, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
