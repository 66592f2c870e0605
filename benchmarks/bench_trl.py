"""TRL's GRPOTrainer.train() with and without fctrain's kernels (`kernels.trl.use_fctrain_kernels`).

    python benchmarks/bench_trl.py [--prompts 4] [--group 4] [--max-new-tokens 96] [--steps 3]
                                   [--micro-batch-tokens 4096] [--model DIR] [--workload work.json]
                                   [--out benchmarks/results/trl_cpu.csv]

Work: bench_train.py's (SmolLM2-135M-Instruct in fp32, `--prompts` BFCL prompts x `--group` completions
sampled once from the model at T=0.7 and shared by both providers, fixed binary rewards with variance in
every group). Each provider runs a real `trainer.train()` for 1 + `--steps` optimizer steps. A step is
GRPOTrainer's own: a `rollout_func` that hands back the shared completions (generation is the same for
both and not what the kernels change, so it is left out), the reward, the reference log-prob pass
(beta 0.001; the old-policy pass is the same call), the dapo loss forward and backward over
`per_device_train_batch_size` micro-batches (TRL's padding; the largest divisor of the batch whose padded
tokens fit `--micro-batch-tokens`), gradient clipping and AdamW.
Providers: trl (TRL 1.16's own chunked fused LM head) and trl+fctrain (the same trainer after
`use_fctrain_kernels(trainer)`: the chunked torch path of our kernels on CPU).

Each provider runs in its own process. Step time: the median over the timed steps (after one warm-up
step) between the Trainer's on_step_begin and on_step_end, as wall time and as the process's CPU time
(all threads; on a machine shared with other jobs the CPU time is the steadier figure). Memory: process
peak RSS, and the peak above the RSS at the start of the first timed step (the optimizer state exists by
then). The first step's loss and gradient norm check that both providers computed the same step (later
steps drift apart through AdamW's ~sign(g) update, see tests/equivalence.py; tests/test_trl.py is the
equality check).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLUMNS = common.META_COLUMNS + [
    "provider", "transformers", "trl", "prompts", "group", "sequences", "prompt_tokens_mean", "completion_tokens_mean",
    "micro_batch_tokens", "per_device_batch", "micro_batches", "computed_tokens", "steps", "step_s", "step_p20_s",
    "step_p80_s", "step_cpu_s", "cpu_vs_trl", "rss_loaded_mb", "peak_rss_mb", "train_peak_extra_mb",
    "loss_first_step", "grad_norm_first_step", "time_vs_trl", "peak_rss_vs_trl", "train_mem_vs_trl", "status"]
PROVIDERS = ("trl", "trl+fctrain")


def worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import bench_train
    from fctrain import models
    from fctrain.config import Config
    from kernels.trl import use_fctrain_kernels

    torch.set_num_threads(os.cpu_count() or 1)
    work = json.loads(Path(spec["workload"]).read_text())
    seqs, group = work["seqs"], work["group"]
    n = len(seqs)
    cfg = Config(**bench_train.SETTINGS)
    p_len = max(len(s["prompt"]) for s in seqs)
    c_len = max(len(s["completion"]) for s in seqs)
    # bench_train's micro-batching: the largest divisor of the batch whose padded tokens fit the budget
    budget = spec["micro_batch_tokens"]
    per_device = max([b for b in range(1, n + 1) if n % b == 0 and b * (p_len + c_len) <= budget] or [1])
    by_prompt = {f"p{g}": [s for s in seqs if s["group"] == g] for g in range(n // group)}
    served = {key: 0 for key in by_prompt}

    def rollout(prompts, trainer):  # the shared completions, in order, for each (repeated) prompt
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "fixed_reward": []}
        for p in prompts:
            s = by_prompt[p][served[p] % group]
            served[p] += 1
            out["prompt_ids"].append(s["prompt"])
            out["completion_ids"].append(s["completion"])
            out["logprobs"].append(s["logprobs"])
            out["fixed_reward"].append(s["reward"])
        return out

    def reward(completions, fixed_reward, **kwargs):
        return fixed_reward

    args = GRPOConfig(output_dir=str(Path(spec["tmp"]) / spec["provider"]), per_device_train_batch_size=per_device,
                      gradient_accumulation_steps=n // per_device, num_generations=group,
                      max_completion_length=work["max_new_tokens"], temperature=cfg.temperature, beta=cfg.beta,
                      epsilon=cfg.eps_low, loss_type="dapo", learning_rate=cfg.lr, lr_scheduler_type="constant",
                      adam_beta2=0.99, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
                      max_steps=1 + spec["steps"], use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                      save_strategy="no", disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=models.load_model(work["model"]), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": list(by_prompt)}),
                          processing_class=models.load_tokenizer(work["model"]), rollout_func=rollout)
    if spec["provider"] == "trl+fctrain":
        use_fctrain_kernels(trainer)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times, self.rss_loaded, self.t0, self.cpu0 = [], [], None, 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # after the warm-up step: AdamW's state exists
                self.rss_loaded = common.reset_peak_rss()
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                self.times.append(time.perf_counter() - self.t0)
                self.cpu_times.append(time.process_time() - self.cpu0)

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)
    sp = common.spread(timer.times)
    return {"micro_batch_tokens": spec["micro_batch_tokens"], "per_device_batch": per_device,
            "micro_batches": n // per_device,
            "computed_tokens": 2 * n * (p_len + c_len),  # reference + policy forwards, padded tokens
            "steps": len(timer.times), "step_s": sp["time_ms"], "step_p20_s": sp["time_p20_ms"],
            "step_p80_s": sp["time_p80_ms"], "step_cpu_s": statistics.median(timer.cpu_times),
            "rss_loaded_mb": timer.rss_loaded / 2**20,
            "train_peak_extra_mb": (common.peak_rss() - timer.rss_loaded) / 2**20,
            "peak_rss_mb": common._status_kib("VmHWM") / 1024, "loss_first_step": first["loss"],
            "grad_norm_first_step": first["grad_norm"], "status": "ok"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--steps", type=int, default=3, help="timed steps per provider (after one warm-up step)")
    p.add_argument("--micro-batch-tokens", type=int, default=4096, help="padded-token budget of a micro-batch")
    p.add_argument("--model", default="", help="model dir (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--workload", type=Path, help="reuse a work.json written by an earlier run (same options)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "trl_cpu.csv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        common.report_from_worker(worker(json.loads(args.worker)))
        return
    if args.prompts < 1 or args.group < 2 or args.steps < 1:
        p.error("need --prompts >= 1, --group >= 2, --steps >= 1")

    import tempfile

    import bench_train
    from fctrain import models
    model_dir = str(models.resolve_model(args.model or None))
    tmp = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    if args.workload:
        work = json.loads(args.workload.read_text())
        if (len(work["seqs"]), work["group"], work["max_new_tokens"]) != (args.prompts * args.group, args.group,
                                                                          args.max_new_tokens):
            p.error(f"{args.workload} was sampled with other --prompts / --group / --max-new-tokens")
    else:
        print(f"sampling the workload: {args.prompts} prompts x {args.group} completions ...", flush=True)
        work = bench_train.make_workload(model_dir, args.prompts, args.group, args.max_new_tokens)
    (tmp / "work.json").write_text(json.dumps(work))
    seqs = work["seqs"]
    meta = common.run_metadata("cpu")
    meta.update(transformers=common.package_version("transformers"), trl=common.package_version("trl"))
    shape = {"prompts": args.prompts, "group": args.group, "sequences": len(seqs),
             "prompt_tokens_mean": statistics.mean(len(s["prompt"]) for s in seqs),
             "completion_tokens_mean": statistics.mean(len(s["completion"]) for s in seqs)}
    rows = []
    for name in PROVIDERS:
        spec = {"provider": name, "workload": str(tmp / "work.json"), "steps": args.steps, "tmp": str(tmp),
                "micro_batch_tokens": args.micro_batch_tokens}
        print(f"{name} ...", flush=True)
        load = common.load_avg()
        result = common.run_isolated(Path(__file__), spec, env={"TRANSFORMERS_VERBOSITY": "error",
                                                                "TRL_EXPERIMENTAL_SILENCE": "1"}, timeout_s=7200)
        rows.append({**meta, **shape, "provider": name, "load_avg": f"{load} -> {common.load_avg()}", **result})
        print("   ", {k: rows[-1].get(k) for k in ("step_s", "step_cpu_s", "peak_rss_mb", "train_peak_extra_mb",
                                                   "loss_first_step", "grad_norm_first_step", "load_avg", "status")},
              flush=True)
        base = rows[0] if rows[0].get("status") == "ok" else None
        common.add_ratios(rows, base, {"time_vs_trl": "step_s", "cpu_vs_trl": "step_cpu_s",
                                       "peak_rss_vs_trl": "peak_rss_mb", "train_mem_vs_trl": "train_peak_extra_mb"})
        common.write_csv(args.out, rows, COLUMNS)  # after every provider: a killed run keeps what it measured
    import plot
    print(f"wrote {args.out} and {plot.plot_train(args.out, title='TRL GRPOTrainer.train() steps')}")


if __name__ == "__main__":
    main()
