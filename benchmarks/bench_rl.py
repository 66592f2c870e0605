"""Does the RL phase teach? Held-out accuracy of GRPO and EGPO against an SFT-only control given the same
training wall time, all continued from one shared SFT checkpoint, over several seeds, with paired-bootstrap
confidence intervals (issue 16).

    python benchmarks/bench_rl.py run                      # every unfinished cell in order; finished ones skipped
    python benchmarks/bench_rl.py run --cells sft-base grpo-s0
    python benchmarks/bench_rl.py report                   # tables, CIs and the plot from the finished cells
    python benchmarks/bench_rl.py power                    # the detectable effect of seeds x examples designs

Sets (fixed by SPLIT_SEED; their ids are written to RESULTS/splits.json):
- train: live_simple + simple_python (prompts <= 512 tokens) minus the sets below, plus NEG_TRAIN
  live_irrelevance negatives (the right answer is no call): the SFT and RL training pool.
- val: VAL_IN examples of the same categories + VAL_NEG live_irrelevance: choosing settings (the only set
  allowed for that).
- (a) test_in: TEST_IN examples of live_simple + simple_python, never trained on (in-distribution).
- (b) test_ood: all of `multiple` (a category never trained on: pick the right function among several).
- (c) test_irr: TEST_IRR examples of `irrelevance` (non-live; the training negatives are live_irrelevance).
- val_irr: the next VAL_IRR examples of the same shuffled `irrelevance` (disjoint from (c), never trained on):
  a validation set of (c)'s own kind, for choosing settings that target irrelevance without looking at (c)
  (val's no-call prompts are live_irrelevance and swapped tools, another kind). Not part of this protocol's
  evaluation (EVAL_SETS); added after it ran, which changed no other set.

Cells (a cell is finished when RESULTS/cells/<cell>.json exists; an interrupted cell restarts):
- sft-base: SFT on the training pool from SmolLM2-135M-Instruct; its checkpoint starts every arm.
- per seed s: grpo-s<s>, egpo-s<s> (RL_ARGS, fixed step count), then sft-s<s>: continued SFT with
  time_budget_s = the mean training seconds of the finished RL cells of that seed (so the control gets the
  same wall time as RL; the trainer stops after the step that reaches it).
Training seconds are the trainer's summed step times (rollout, reward, loss, update, weight sync; model
loading and evaluation excluded). Each cell is evaluated greedily on (a) + (b) + (c) (the base on val too) with the vLLM
engine (fctrain.eval's BFCL-compatible scoring) and its per-example verdicts are stored for pairing.

The base checkpoint lives under WORK (runs/, not committed). Every arm records the sha256 of the base it
started from, and the report pools only cells of the current base: a rerun on a fresh machine retrains the
base and starts a new matrix rather than mixing two bases.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import power  # noqa: E402  (issue 30, part 4: the detectable effect of a design, from the finished cells)

REPO = common.REPO
RESULTS = common.RESULTS / "rl_cpu"
WORK = REPO / "runs" / "bench_rl"

SPLIT_SEED = 16
MAX_PROMPT_TOKENS = 512
TEST_IN, VAL_IN, VAL_NEG, NEG_TRAIN, TEST_IRR = 150, 60, 30, 80, 120
VAL_IRR = 120  # the rest of BFCL's 240 `irrelevance` examples after (c)
SYN_TRAIN, SYN_VAL = 160, 30  # swapped-tool negatives (data.swapped_tools_negative) in train / val
# The SFT target's think (fctrain.prompts.render_target): "evidence" restates the request and each tool's
# purpose before the call / no-call decision (v4; chosen on val over "plan", whose base never abstained:
# results/rl_cpu/pilots/evidence-base.json). Its completions are about twice as long, hence 160 tokens.
THINK, MAX_NEW_TOKENS = "evidence", 160
EVAL_MAX_TOKENS = MAX_NEW_TOKENS
SEEDS = (0, 1, 2)
ARMS = ("grpo", "egpo", "sft")

COMMON_ARGS = ["--fmt", "python", "--max_prompt_tokens", str(MAX_PROMPT_TOKENS), "--max_new_tokens",
               str(MAX_NEW_TOKENS), "--eval_data", "none", "--save_every", "0", "--keep_last", "1", "--sft_think", THINK]
# 90 SFT steps (v6): the call / no-call decision keeps separating with SFT (val decision 66.6 at 60 steps, 77.5
# at 90: results/rl_cpu/pilots/evidence-sft90-curve.json); 90 steps + an arm + evaluation fit the hour.
SFT_BASE_ARGS = ["--sft_steps", "90", "--sft_batch_size", "8", "--sft_lr", "5e-5", "--steps", "0",
                 "--beta", "0", "--engine", "hf", "--seed", "0"]
RL_ARGS = ["--sft_steps", "0", "--steps", "10", "--prompts_per_step", "4", "--group_size", "8",
           "--lr", "2e-5", "--warmup_steps", "2", "--temperature", "0.7", "--beta", "0", "--reward", "partial"]
# Bump when the arms' training changes in a way their arguments do not show; finished cells of another
# version are neither skipped nor pooled. 3: the partial reward pays nothing for the wrong kind of answer
# (v2 results: benchmarks/results/rl_cpu_v2/). 4: the "evidence" think and 160 new tokens (v3 results:
# benchmarks/results/rl_cpu_v3/). 5: the 90-step base (v4 results, on the 60-step base:
# benchmarks/results/rl_cpu_v4/).
ARM_VERSION = 5
SAVE_ONLY = ("out_dir", "save_every", "keep_last")  # trainer options that change what is kept, not what is trained
SFT_ARM_ARGS = ["--sft_steps", "100000", "--sft_batch_size", "8", "--sft_lr", "5e-5", "--steps", "0",
                "--beta", "0", "--engine", "hf"]


# ------------------------------------------------------------------------------------------------ sets

def build_sets(tokenizer) -> dict:
    """{set name: [Example]} for train, val, test_in, test_ood, test_irr (deterministic)."""
    from fctrain import data
    from fctrain.prompts import filter_by_length

    def fit(examples):
        return filter_by_length(examples, tokenizer, MAX_PROMPT_TOKENS, "python")

    pool = data.shuffle(fit(data.load_bfcl("live_simple,simple_python")), SPLIT_SEED)
    neg = data.shuffle(fit(data.load_bfcl("live_irrelevance")), SPLIT_SEED)
    test_in, val_in, train_in = pool[:TEST_IN], pool[TEST_IN:TEST_IN + VAL_IN], pool[TEST_IN + VAL_IN:]
    irr = data.shuffle(data.load_bfcl("irrelevance"), SPLIT_SEED)  # (c) and val_irr: not length-filtered, as before
    val_neg, train_neg = neg[:VAL_NEG], neg[VAL_NEG:VAL_NEG + NEG_TRAIN]

    def swapped(examples, n, seed):  # n questions of `examples`, each beside another one's tools
        rng = random.Random(seed)
        out = []
        for q in data.shuffle(examples, seed):
            others = [t for t in examples if not {f["name"] for f in t.tools} & {f["name"] for f in q.tools}]
            out += fit([data.swapped_tools_negative(q, rng.choice(others))])
            if len(out) == n:
                return out
        raise AssertionError(f"only {len(out)} swapped-tool negatives fit")

    def near_miss(negatives, examples):  # each negative's question beside the nearest-topic tools that fit
        by_id = {e.id: e for e in examples}
        out = []
        for neg in negatives:
            q = by_id[data.negative_sources(neg.id)[0]]
            found = next((n for c in data.near_miss_candidates(q, examples)
                          if (n := fit([data.swapped_tools_negative(q, c)]))), None)
            if found is None:
                raise AssertionError(f"no near-miss tools for {q.id} fit {MAX_PROMPT_TOKENS} prompt tokens")
            out += found
        return out

    train_swapped = swapped(train_in, SYN_TRAIN, SPLIT_SEED)
    sets = {"train": data.shuffle(train_in + train_neg + train_swapped, SPLIT_SEED),
            "val": val_in + val_neg + swapped(val_in, SYN_VAL, SPLIT_SEED),
            "test_in": test_in, "test_ood": data.load_bfcl("multiple"),
            "test_irr": irr[:TEST_IRR], "val_irr": irr[TEST_IRR:TEST_IRR + VAL_IRR],
            # train with the same swapped-tool questions beside near-miss tools instead (issue 30: (c) offers a
            # function on the question's topic, the random swaps one from another field)
            "train_nm": data.shuffle(train_in + train_neg + near_miss(train_swapped, train_in), SPLIT_SEED)}
    ids = {name: {e.id for e in exs} for name, exs in sets.items()}
    for a in ids:
        for b in ids:
            if a < b and {a, b} != {"train", "train_nm"} and ids[a] & ids[b]:
                raise AssertionError(f"sets {a} and {b} overlap: {sorted(ids[a] & ids[b])[:5]}")
    return sets


def manifest(sets: dict) -> dict:
    """The ids of every set: fctrain/splits/<DEFAULT_SPLITS>.json, which the trainer reads as `split:<set>`."""
    return {"about": "benchmarks/bench_rl.py build_sets (issue 16): fixed train / val / held-out sets of BFCL v4",
            "split_seed": SPLIT_SEED, "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "categories": sorted({e.category for exs in sets.values() for e in exs} - {"synthetic_irrelevance"}),
            "sets": {name: [e.id for e in exs] for name, exs in sets.items()}}


def write_sets(sets: dict) -> Path:
    from fctrain import data

    WORK.mkdir(parents=True, exist_ok=True)
    data.save_jsonl(sets["train"], WORK / "train.jsonl")
    path = data.SPLITS_DIR / f"{data.DEFAULT_SPLITS}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest(sets), indent=0) + "\n")
    return WORK / "train.jsonl"


# ------------------------------------------------------------------------------------------------ cells

def cell_names() -> list[str]:
    return ["sft-base"] + [f"{arm}-s{s}" for s in SEEDS for arm in ARMS]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def final_checkpoint(run_dir: Path) -> Path:
    found = sorted(run_dir.glob("ckpt-*"))
    if not found:
        raise RuntimeError(f"{run_dir}: the trainer left no checkpoint")
    return found[-1]


def trainer_config(args: list[str], run_dir: Path) -> dict:
    """The trainer's resolved configuration for a cell's arguments, less the options that only decide what
    is saved."""
    import dataclasses

    from fctrain.config import parse_config
    cmd = [*COMMON_ARGS, "--train_data", str(WORK / "train.jsonl"), *args, "--out_dir", str(run_dir)]
    return {k: v for k, v in dataclasses.asdict(parse_config(cmd)[0]).items() if k not in SAVE_ONLY}


def same_run(cell: str, args: list[str]) -> dict | None:
    """A finished run under WORK (a scratch pilot, typically) that trained exactly what `args` would train
    from the original model (same resolved trainer configuration, saving options aside, same train.jsonl,
    checkpoint still there): its summary, so the base cell reuses that checkpoint instead of training again."""
    if "--model" in args:  # only runs from the original model: an arm's --model names its base's path
        return None
    want = trainer_config(args, WORK / cell)
    for done in sorted(WORK.glob("*/train_done.json")):
        info = json.loads(done.read_text())
        if (done.parent.name != cell and "args" in info and info.get("train_sha") == sha256(WORK / "train.jsonl")
                and Path(info["summary"]["checkpoint"]).exists() and trainer_config(info["args"], done.parent) == want):
            return info["summary"] | {"reused_from": done.parent.name}
    return None


def train(cell: str, args: list[str]) -> dict:
    """Run the trainer for one cell in a fresh process; returns its metrics summary."""
    run_dir = WORK / cell
    done = run_dir / "train_done.json"
    if done.exists() and json.loads(done.read_text()).get("key") == [ARM_VERSION, args]:  # evaluation was cut short
        return json.loads(done.read_text())["summary"]
    if cell == "sft-base" and (earlier := same_run(cell, args)) is not None:
        print(f"[bench_rl] {cell}: {earlier['reused_from']} trained exactly this; reusing its checkpoint "
              f"{earlier['checkpoint']}", flush=True)
        return earlier
    if run_dir.exists():  # an interrupted training restarts from scratch
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "fctrain.run", *COMMON_ARGS, "--train_data", str(WORK / "train.jsonl"),
           *args, "--out_dir", str(run_dir)]
    print(f"[bench_rl] {cell}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if r.get("phase") in ("sft", "rl")]
    rl = [r for r in steps if r["phase"] == "rl"]
    summary = {"command": " ".join(["python -m fctrain.run"] + cmd[3:]), "process_s": wall,
            "train_s": sum(r["step_s"] for r in steps), "steps": len(steps),
            "gen_tokens": sum(r.get("gen_tokens", 0) for r in rl),
            "gen_s": sum(r.get("gen_s", 0) for r in rl),
            "rl_reward": [r["reward"] for r in rl], "rl_accuracy": [r["accuracy"] for r in rl],
            "rl_kl": [r.get("kl") for r in rl], "sft_loss": [r["loss"] for r in steps if r["phase"] == "sft"],
            "checkpoint": str(final_checkpoint(run_dir))}
    done.write_text(json.dumps({"key": [ARM_VERSION, args], "args": args, "summary": summary,
                                "train_sha": sha256(WORK / "train.jsonl")}))  # the data it trained on
    return summary


EVAL_SETS = ("val", "test_in", "test_ood", "test_irr")
TEST_SETS = EVAL_SETS[1:]  # the arms: validation is for pilots (choosing settings), the base is measured on it too


def evaluate_checkpoint(ckpt: Path, out: Path, names=EVAL_SETS, max_tokens: int = EVAL_MAX_TOKENS) -> None:
    """(Run in its own process.) Greedy outputs and BFCL-compatible verdicts on the evaluation sets."""
    from fctrain import eval as feval
    from fctrain import models, rollout
    from fctrain.prompts import build_prompt_ids

    tokenizer = models.load_tokenizer(ckpt)
    sets = build_sets(tokenizer)
    examples = [e for n in names for e in sets[n]]
    prompts = [build_prompt_ids(e, tokenizer, "python") for e in examples]
    t0 = time.perf_counter()
    engine = rollout.VLLMEngine(ckpt, dtype="auto", max_model_len=max(map(len, prompts)) + max_tokens,
                                kv_cache_gib=4.0)
    t_load = time.perf_counter() - t0
    records = feval.generate_records(engine, tokenizer, examples, fmt="python", max_tokens=max_tokens,
                                     batch_size=1024, prompts=prompts)
    engine.close()
    labels = [n for n in names for _ in sets[n]]
    with open(out, "w") as f:
        f.write(json.dumps({"load_s": t_load, "eval_s": time.perf_counter() - t0 - t_load}) + "\n")
        for name, rec in zip(labels, records):
            f.write(json.dumps({"set": name, "id": rec.id, "valid": int(rec.valid), "format_ok": int(rec.format_ok),
                                "tokens": rec.output_tokens, "finish": rec.finish_reason, "text": rec.text}) + "\n")


def evaluate(cell: str, ckpt: Path, names=EVAL_SETS, max_tokens: int = EVAL_MAX_TOKENS) -> dict:
    out = WORK / cell / "eval.jsonl"
    subprocess.run([sys.executable, __file__, "eval-one", str(ckpt), str(out), *names, "--max-tokens", str(max_tokens)],
                   cwd=REPO, check=True)
    lines = [json.loads(line) for line in open(out)]
    timing, recs = lines[0], lines[1:]
    outputs = RESULTS / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    with open(outputs / f"{cell.replace('/', '-')}.jsonl", "w") as f:  # raw outputs, for reading what the model does
        for r in recs:
            f.write(json.dumps({k: r[k] for k in ("set", "id", "valid", "finish", "text")}) + "\n")
    per_set = {}
    for name in names:
        rs = [r for r in recs if r["set"] == name]
        per_set[name] = {"accuracy": sum(r["valid"] for r in rs) / len(rs), "n": len(rs),
                         "format_ok": sum(r["format_ok"] for r in rs) / len(rs),
                         "ids": [r["id"] for r in rs], "valid": [r["valid"] for r in rs]}
    return {"eval_s": timing["eval_s"], "eval_load_s": timing["load_s"],
            "eval_gen_tokens": sum(r["tokens"] for r in recs), "sets": per_set}


def cell_path(cell: str) -> Path:
    return RESULTS / "cells" / f"{cell}.json"


def load_cell(cell: str) -> dict | None:
    """A finished cell: the base only if trained from this recipe(), an arm only if by this ARM_VERSION."""
    p = cell_path(cell)
    c = json.loads(p.read_text()) if p.exists() else None
    if c is None or (c.get("recipe") == recipe() if cell == "sft-base" else c.get("arm_version") == ARM_VERSION):
        return c
    return None


def recipe() -> str:
    """What makes two SFT checkpoints interchangeable: the trainer arguments and the sets. Bases retrained
    from one recipe (a new machine, a new session) differ by rounding only; their arms are pooled, each arm
    paired with its own base."""
    from fctrain import data
    manifest_text = (data.SPLITS_DIR / f"{data.DEFAULT_SPLITS}.json").read_text()
    return hashlib.sha256(json.dumps([COMMON_ARGS, SFT_BASE_ARGS, manifest_text]).encode()).hexdigest()[:16]


def bases() -> dict:
    """{base sha: base cell} of every SFT checkpoint trained so far (cells/bases/), of any recipe."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / "cells" / "bases").glob("*.json"))}


def arms() -> list[dict]:
    """Finished arm cells whose base was trained from the current recipe."""
    ours = {sha for sha, b in bases().items() if b.get("recipe") == recipe()}
    return [c for c in (load_cell(n) for n in cell_names()[1:]) if c and c["base_sha"] in ours]


def sft_budget(seed: int, base_sha: str) -> float:
    """The SFT control's training seconds: the mean of the finished RL cells of its seed on the same base
    (of every seed on bases of this recipe when none of its own is finished)."""
    rl = [c for c in arms() if c["arm"] in ("grpo", "egpo")]
    own = [c for c in rl if c["seed"] == seed and c["base_sha"] == base_sha]
    if not rl:
        raise RuntimeError(f"sft-s{seed}: no finished RL cell to take the time budget from")
    return sum(c["train"]["train_s"] for c in own or rl) / len(own or rl)


def run_cell(cell: str) -> dict:
    t0 = time.time()
    base = load_cell("sft-base")
    if cell == "sft-base":
        arm, seed, args = "sft-base", 0, SFT_BASE_ARGS
    else:
        arm, seed = cell.split("-s")[0], int(cell.split("-s")[1])
        base_ckpt = Path(base["train"]["checkpoint"]) if base else None
        if base is None or not base_ckpt.exists() or sha256(base_ckpt / "model.safetensors") != base["base_sha"]:
            # a changed recipe, or a fresh machine (runs/ is not committed): train this recipe's base again
            print(f"[bench_rl] {cell}: no base checkpoint of this recipe here ({base_ckpt}); training it "
                  "(earlier bases stay in cells/bases/)", flush=True)
            base = run_cell("sft-base")
            base_ckpt = Path(base["train"]["checkpoint"])
        args = ["--model", str(base_ckpt), "--seed", str(seed)]
        if arm in ("grpo", "egpo"):
            args += RL_ARGS + ["--algo", arm]
        else:
            args += SFT_ARM_ARGS + ["--time_budget_s", f"{sft_budget(seed, base['base_sha']):.1f}"]
    result = {"cell": cell, "arm": arm, "seed": seed, "train": train(cell, args)}
    ckpt = Path(result["train"]["checkpoint"])
    result["base_sha"] = sha256(ckpt / "model.safetensors") if cell == "sft-base" else base["base_sha"]
    if cell == "sft-base":
        result["recipe"] = recipe()
    else:
        result["arm_version"] = ARM_VERSION
    result["eval"] = evaluate(cell, ckpt, EVAL_SETS if cell == "sft-base" else TEST_SETS)
    result["meta"] = common.run_metadata("cpu") | {"load_avg_end": common.load_avg(),
                                                   "cell_wall_s": time.time() - t0}
    cell_path(cell).parent.mkdir(parents=True, exist_ok=True)
    cell_path(cell).write_text(json.dumps(result) + "\n")
    if cell == "sft-base":
        save_base(result)
    if cell != "sft-base":  # keep the base; an arm's checkpoint is not reused
        for path in [*(WORK / cell).glob("ckpt-*"), WORK / cell / "reference"]:
            shutil.rmtree(path, ignore_errors=True)
    acc = {k: round(v["accuracy"], 3) for k, v in result["eval"]["sets"].items()}
    print(f"[bench_rl] {cell} done: train {result['train']['train_s']:.0f} s, {result['train']['steps']} steps, "
          f"eval {result['eval']['eval_s']:.0f} s | {acc}", flush=True)
    return result


def save_base(result: dict) -> None:
    (RESULTS / "cells" / "bases").mkdir(parents=True, exist_ok=True)
    (RESULTS / "cells" / "bases" / f"{result['base_sha']}.json").write_text(json.dumps(result) + "\n")


def run_pilot(name: str, sft: bool, overrides: list[str], start: str = "base", eval_max_tokens: int = 0) -> dict:
    """Settings are chosen here, on the validation set alone; the test sets are never looked at.

    start: "base" (the sft-base cell's checkpoint), "scratch" (SFT from the original model with SFT_BASE_ARGS:
    a candidate base recipe, whose checkpoint is kept) or the name of an earlier scratch pilot."""
    if start == "scratch":
        args = SFT_BASE_ARGS + overrides
    else:
        if start == "base":
            origin = load_cell("sft-base")
            if origin is None:
                raise SystemExit("run the sft-base cell first")
        else:
            origin = json.loads((RESULTS / "pilots" / f"{start}.json").read_text())
        args = ["--model", origin["train"]["checkpoint"], "--seed", "0"] + (SFT_ARM_ARGS if sft else RL_ARGS) + overrides
    t0 = time.time()
    result = {"pilot": name, "start": start, "overrides": overrides, "sft": sft, "arm_version": ARM_VERSION,
              "train": train(f"pilot-{name}", args)}
    result["eval"] = evaluate(f"pilot-{name}", Path(result["train"]["checkpoint"]), ("val",),
                              eval_max_tokens or EVAL_MAX_TOKENS)
    result["val_split"] = val_breakdown(f"pilot-{name}")
    result["meta"] = common.run_metadata("cpu") | {"load_avg_end": common.load_avg(), "wall_s": time.time() - t0}
    path = RESULTS / "pilots" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n")
    if start != "scratch":  # a scratch pilot's checkpoint may start later pilots
        for path in (WORK / f"pilot-{name}").glob("ckpt-*"):
            shutil.rmtree(path, ignore_errors=True)
    v = result["eval"]["sets"]["val"]
    rl = result["train"]["rl_reward"]
    print(f"[bench_rl] pilot {name}: val {v['accuracy']:.3f} {result['val_split']} | "
          f"train {result['train']['train_s']:.0f} s, {result['train']['steps']} steps | reward "
          f"{rl[:3]} .. {rl[-3:]}", flush=True)
    return result


def checkpoint_curve(name: str) -> dict:
    """Val accuracy of every checkpoint a scratch pilot kept (give it --save_every N --keep_last K): how the
    base improves with SFT steps, measured on the validation set only. Skips checkpoints already scored."""
    path = RESULTS / "pilots" / f"{name}-curve.json"
    curve = json.loads(path.read_text()) if path.exists() else {"pilot": name, "points": {}}
    for ckpt in sorted((WORK / f"pilot-{name}").glob("ckpt-*")):
        step = int(ckpt.name.split("-")[1])
        if str(step) in curve["points"]:
            continue
        cell = f"pilot-{name}-step{step}"
        (WORK / cell).mkdir(parents=True, exist_ok=True)
        ev = evaluate(cell, ckpt, ("val",))
        curve["points"][str(step)] = {"val": ev["sets"]["val"]["accuracy"], **val_breakdown(cell),
                                      "eval_s": ev["eval_s"]}
        path.write_text(json.dumps(curve, indent=1) + "\n")
        print(f"[bench_rl] {name} step {step}: {curve['points'][str(step)]}", flush=True)
    return curve


def val_breakdown(cell: str) -> dict:
    """Validation accuracy on the call prompts and on the no-call prompts, how often each abstains, and the
    balanced accuracy of the call / no-call decision alone (0.5 = no separation)."""
    from fctrain import data, reward
    recs = [json.loads(line) for line in open(RESULTS / "outputs" / f"{cell}.jsonl")]
    neg = {e.id for e in data.load_split("val") if reward.is_irrelevance(e.category)}
    out = {}
    for kind, rs in (("call", [r for r in recs if r["id"] not in neg]), ("no_call", [r for r in recs if r["id"] in neg])):
        out[f"{kind}_acc"] = round(sum(r["valid"] for r in rs) / len(rs), 3)
        out[f"{kind}_abstain"] = round(sum(answered_no_call(r["text"]) for r in rs) / len(rs), 3)
    out["decision_bacc"] = round((1 - out["call_abstain"] + out["no_call_abstain"]) / 2, 3)
    return out


# ------------------------------------------------------------------------------------------------ report

def n_seeds(n: int) -> str:
    return f"{n} seed" + "s" * (n != 1)


def bootstrap(matrix_a, matrix_b=None, reps: int = 10000, seed: int = 0):
    """Mean over examples of the per-example seed-mean of A (minus B's, paired), and its 95% percentile
    interval from resampling examples (fctrain.eval.paired_change). matrix_*: [seeds][examples] of 0/1."""
    import numpy as np

    from fctrain.eval import paired_change

    a = np.asarray(matrix_a, dtype=float).mean(0)
    b = np.asarray(matrix_b, dtype=float).mean(0) if matrix_b is not None else np.zeros_like(a)
    return paired_change(b, a, reps, seed)


def bootstrap_seeds(matrix_a, matrix_b, reps: int = 10000, seed: int = 0):
    """Like `bootstrap` for a paired difference, but resampling seeds as well as examples (two levels): the
    interval to read when seeds disagree, as they do here. Needs >= 2 seeds; None otherwise."""
    import numpy as np

    a, b = np.asarray(matrix_a, dtype=float), np.asarray(matrix_b, dtype=float)
    k, n = a.shape
    if k < 2:
        return None
    rng = np.random.default_rng(seed)
    d = a - b
    stats = np.empty(reps)
    for r in range(reps):
        stats[r] = d[rng.integers(0, k, k)][:, rng.integers(0, n, n)].mean()
    return float(d.mean()), float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


SET_LABELS = {"test_in": "(a) in-distribution", "test_ood": "(b) out-of-category (multiple)",
              "test_irr": "(c) irrelevance", "val": "validation"}


def no_call_rates(cell: str) -> dict | None:
    """{set: share of that cell's greedy outputs that parse as an answer with no call}, from outputs/."""
    path = RESULTS / "outputs" / f"{cell}.jsonl"
    if not path.exists():
        return None
    counts: dict = {}
    for line in open(path):
        r = json.loads(line)
        n, k = counts.get(r["set"], (0, 0))
        counts[r["set"]] = (n + 1, k + answered_no_call(r["text"]))
    return {s: k / n for s, (n, k) in counts.items()}


def answered_no_call(text: str) -> bool:
    from fctrain import reward
    parsed = reward.parse(text, "python")
    return bool(parsed.ok and not parsed.calls)


def report() -> str:
    import numpy as np

    all_bases = {sha: b for sha, b in bases().items() if b.get("recipe") == recipe()}
    if not all_bases:
        raise SystemExit("no finished sft-base cell of the current recipe")
    cells = arms()
    by_arm = {arm: sorted((c for c in cells if c["arm"] == arm), key=lambda c: c["seed"]) for arm in ARMS}
    used = [all_bases[sha] for sha in sorted(all_bases)]
    lines = ["# Does RL teach? (benchmarks/bench_rl.py)", "",
             f"Recipe {recipe()}; SFT checkpoint(s): " + "; ".join(
                 f"{b['base_sha']} ({b['train']['steps']} SFT steps, {b['train']['train_s']:.0f} s of training, "
                 f"{b['meta']['device']}, git {b['meta']['git_sha']})" for b in used) + ".",
             "Arms: " + "; ".join(f"{c['cell']} on {c['base_sha'][:8]} ({c['meta']['device']}, load at end "
                                   f"{c['meta'].get('load_avg_end', '?')})" for c in cells) + ".", ""]
    lines += ["| arm | seeds | train s / cell (mean) | steps | generated tokens (train) | eval s / cell | "
              + " | ".join(SET_LABELS[s] for s in ("test_in", "test_ood", "test_irr", "val")) + " |",
              "| --- " * 10 + "|"]
    rows = []

    def acc_cell(matrix):
        m, lo, hi = bootstrap(matrix)
        per_seed = np.asarray(matrix, dtype=float).mean(1)
        sd = per_seed.std(ddof=1) if len(per_seed) > 1 else float("nan")
        spread = f"{100 * per_seed.mean():.1f} ± {100 * sd:.1f}" if len(per_seed) > 1 else "1 seed"
        return m, lo, hi, sd, f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({spread})"

    for arm, cs in [("sft-base", used)] + list(by_arm.items()):
        if not cs:
            continue
        row = {"arm": arm, "seeds": len(cs)}
        texts = []
        for s in ("test_in", "test_ood", "test_irr", "val"):
            if any(s not in c["eval"]["sets"] for c in cs):
                texts.append("-")
                continue
            ids = cs[0]["eval"]["sets"][s]["ids"]
            assert all(c["eval"]["sets"][s]["ids"] == ids for c in cs)
            m, lo, hi, sd, text = acc_cell([c["eval"]["sets"][s]["valid"] for c in cs])
            row |= {f"{s}_acc": m, f"{s}_lo": lo, f"{s}_hi": hi, f"{s}_sd_seeds": sd}
            texts.append(text)
        row |= {"train_s": float(np.mean([c["train"]["train_s"] for c in cs])),
                "steps": float(np.mean([c["train"]["steps"] for c in cs])),
                "gen_tokens": float(np.mean([c["train"]["gen_tokens"] for c in cs])),
                "eval_s": float(np.mean([c["eval"]["eval_s"] for c in cs]))}
        rows.append(row)
        lines.append(f"| {arm} | {len(cs)} | {row['train_s']:.0f} | {row['steps']:.1f} | {row['gen_tokens']:.0f} | "
                     f"{row['eval_s']:.0f} | " + " | ".join(texts) + " |")
    lines += ["", "Accuracy in %: pooled mean [95% CI, paired bootstrap over examples of the seed-mean, 10,000 "
              "resamples] (mean ± sd over seeds).", ""]
    lines += ["How often each arm answers \"no call\" (a well-formed empty answer), in % of each set, mean over seeds "
              "(from outputs/; the right answer only on (c)):", "",
              "| arm | " + " | ".join(SET_LABELS[s] for s in ("test_in", "test_ood", "test_irr")) + " | decision |",
              "| --- | --- | --- | --- | --- |"]
    for arm, cs in [("sft-base", [{"cell": "sft-base"}])] + list(by_arm.items()):
        rates = [no_call_rates(c["cell"]) for c in cs]
        if cs and all(rates):
            mean = {s: np.mean([r[s] for r in rates]) for s in ("test_in", "test_ood", "test_irr")}
            lines.append(f"| {arm} | " + " | ".join(f"{100 * v:.1f}" for v in mean.values())
                         + f" | {100 * (1 - mean['test_in'] + mean['test_irr']) / 2:.1f} |")
    lines += ["", "decision: the balanced accuracy of the call / no-call decision alone, (calls on (a) + abstains on "
              "(c)) / 2; 50 = no separation (always or never calling, or deciding at random).", ""]

    def paired(a_cells, b_cells, s):  # cells of one seed on one base are paired
        keys = sorted({(c["seed"], c["base_sha"]) for c in a_cells} & {(c["seed"], c["base_sha"]) for c in b_cells})
        if not keys:
            return None
        a = [c["eval"]["sets"][s]["valid"] for k in keys for c in a_cells if (c["seed"], c["base_sha"]) == k]
        b = [c["eval"]["sets"][s]["valid"] for k in keys for c in b_cells if (c["seed"], c["base_sha"]) == k]
        return (*bootstrap(a, b), len(keys), bootstrap_seeds(a, b))

    lines += ["| comparison | " + " | ".join(SET_LABELS[s] for s in ("test_in", "test_ood", "test_irr")) + " |",
              "| --- | --- | --- | --- |"]
    comparisons = [("grpo", "sft"), ("egpo", "sft"), ("egpo", "grpo")]
    diff_rows = []
    for a, b in comparisons:
        cols = []
        for s in ("test_in", "test_ood", "test_irr"):
            r = paired(by_arm[a], by_arm[b], s)
            two = "" if r is None or r[4] is None else f"; seeds too [{100 * r[4][1]:+.1f}, {100 * r[4][2]:+.1f}]"
            cols.append("-" if r is None else f"{100 * r[0]:+.1f} [{100 * r[1]:+.1f}, {100 * r[2]:+.1f}]{two} "
                                              f"({n_seeds(r[3])})")
            if r is not None:
                diff_rows.append({"comparison": f"{a}-{b}", "set": s, "diff": r[0], "lo": r[1], "hi": r[2],
                                  "seeds": r[3], "lo_seeds_too": r[4][1] if r[4] else "",
                                  "hi_seeds_too": r[4][2] if r[4] else ""})
        lines.append(f"| {a} - {b} | " + " | ".join(cols) + " |")
    for arm in ARMS:
        cols = []
        for s in ("test_in", "test_ood", "test_irr"):
            if not by_arm[arm]:
                cols.append("-")
                continue
            r = paired(by_arm[arm], [dict(all_bases[c["base_sha"]], seed=c["seed"]) for c in by_arm[arm]], s)
            cols.append(f"{100 * r[0]:+.1f} [{100 * r[1]:+.1f}, {100 * r[2]:+.1f}] ({n_seeds(r[3])})")
            diff_rows.append({"comparison": f"{arm}-base", "set": s, "diff": r[0], "lo": r[1], "hi": r[2],
                              "seeds": r[3]})
        lines.append(f"| {arm} - SFT checkpoint | " + " | ".join(cols) + " |")
    lines += ["", "Differences in accuracy points, paired by example and seed: 95% bootstrap CI over examples; "
              "\"seeds too\": resampling seeds and examples (two levels), the interval to read when seeds "
              "disagree (with 2-3 seeds it is itself rough).", ""]
    text = "\n".join(lines) + "\n"
    (RESULTS / "report.md").write_text(text)
    common.write_csv(RESULTS / "summary.csv", rows, list(rows[0]))
    common.write_csv(RESULTS / "differences.csv", diff_rows or [{"comparison": ""}],
                     ["comparison", "set", "diff", "lo", "hi", "seeds", "lo_seeds_too", "hi_seeds_too"])
    plot(used, by_arm)
    print(text)
    return text


def plot(used_bases, by_arm):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"grpo": "tab:blue", "egpo": "tab:orange", "sft": "tab:gray"}
    for ax, s in zip(axes, ("test_in", "test_ood", "test_irr")):
        b = float(np.mean([u["eval"]["sets"][s]["accuracy"] for u in used_bases]))
        ax.scatter([0], [100 * b], color="black", zorder=3, label="SFT checkpoint")
        for arm, cs in by_arm.items():
            if not cs:
                continue
            xs = [c["train"]["train_s"] / 60 for c in cs]
            ys = [100 * c["eval"]["sets"][s]["accuracy"] for c in cs]
            ax.scatter(xs, ys, color=colors[arm], alpha=0.5)
            ax.plot([0, np.mean(xs)], [100 * b, np.mean(ys)], color=colors[arm], label=f"{arm} ({n_seeds(len(cs))})")
        ax.set_title(SET_LABELS[s])
        ax.set_xlabel("training wall time after the SFT checkpoint (min)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"held-out accuracy vs wall time ({used_bases[0]['meta']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "heldout_vs_time.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cells", nargs="+", default=None, help=f"default: all, in order: {' '.join(cell_names())}")
    sub.add_parser("report")
    w = sub.add_parser("power", help="minimum detectable effect of seeds x examples designs from the finished "
                                     "cells (benchmarks/power.py): power.csv, power_vs_effect.png")
    w.add_argument("--sims", type=int, default=300, help="simulated experiments per design")
    e = sub.add_parser("eval-one")
    e.add_argument("ckpt")
    e.add_argument("out")
    e.add_argument("sets", nargs="*", default=list(EVAL_SETS))
    e.add_argument("--max-tokens", type=int, default=EVAL_MAX_TOKENS)
    t = sub.add_parser("pilot", help="tuning: train from the base with RL_ARGS (or SFT_ARM_ARGS with --sft) "
                                     "plus overrides (RL: the trainer's default --algo, egpo), evaluate on val ONLY")
    t.add_argument("name")
    t.add_argument("--sft", action="store_true", help="a continued-SFT pilot (give --time_budget_s)")
    t.add_argument("--start", default="base", help="base (default) | scratch (a candidate base recipe: "
                                                   "SFT_BASE_ARGS + overrides) | the name of a scratch pilot")
    t.add_argument("--eval-max-tokens", type=int, default=0, help=f"default {EVAL_MAX_TOKENS}")
    t.add_argument("overrides", nargs=argparse.REMAINDER, help="trainer options after --")
    c = sub.add_parser("curve", help="val accuracy of every checkpoint a scratch pilot kept")
    c.add_argument("name")
    args = p.parse_args(argv)
    if args.cmd == "curve":
        checkpoint_curve(args.name)
        return 0
    if args.cmd == "eval-one":
        evaluate_checkpoint(Path(args.ckpt), Path(args.out), tuple(args.sets), args.max_tokens)
        return 0
    if args.cmd == "pilot":
        run_pilot(args.name, args.sft, [a for a in args.overrides if a != "--"], args.start, args.eval_max_tokens)
        return 0
    if args.cmd == "report":
        report()
        return 0
    if args.cmd == "power":
        power.run(sims=args.sims, results=RESULTS)
        return 0
    from fctrain import models
    tokenizer = models.load_tokenizer(models.resolve_model(None))
    sets = build_sets(tokenizer)
    write_sets(sets)
    print("[bench_rl] sets: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), flush=True)
    for cell in args.cells or cell_names():
        if cell not in cell_names():
            raise SystemExit(f"unknown cell {cell!r}; known: {cell_names()}")
        if load_cell(cell) is not None:
            print(f"[bench_rl] {cell}: finished, skipped", flush=True)
            continue
        run_cell(cell)
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
