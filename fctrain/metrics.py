"""The run's record: metrics.jsonl (plus optional TensorBoard and W&B), the console, and the curves plot.

    log = MetricsLog(cfg, out, history, is_main, step)   # history: every record so far (from a checkpoint)
    log.add({"step": 3, "phase": "rl", "reward": 0.4, ...}); log.say("one line"); log.close()  # + curves.png
"""
from __future__ import annotations

import dataclasses
import json
import resource
import sys
from pathlib import Path

import torch

from fctrain.checkpoint import rewrite
from fctrain.config import Config


class MetricsLog:
    """The run's record and console. `history`, every step's and evaluation's record, is saved in each
    checkpoint; metrics.jsonl mirrors it (rewritten from it on resume, which drops the steps logged after
    the checkpoint), plus optional TensorBoard and W&B. Rank 0 alone writes and prints."""

    def __init__(self, cfg: Config, out: Path, history: list, is_main: bool, step: int):
        self.cfg, self.history, self.is_main = cfg, history, is_main
        self.tensorboard = self.file = self.bar = None
        self.path = out / "metrics.jsonl"
        if not is_main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(out / "tb"))
            except ImportError:
                print("tensorboard requested but not installed (pip install tensorboard); continuing without")
        if cfg.wandb:
            try:
                import wandb
                wandb.init(project="fctrain", config=dataclasses.asdict(cfg))
            except ImportError:
                print("wandb requested but not installed; continuing without")
        rewrite(self.path, "".join(json.dumps(r) + "\n" for r in history))
        self.file = open(self.path, "a")
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.sft_steps + cfg.steps, initial=step, desc="train", dynamic_ncols=True)
        except ImportError:
            pass

    def add(self, record: dict):
        self.history.append(record)
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, record["step"])
        if self.cfg.wandb and "wandb" in sys.modules:
            sys.modules["wandb"].log(record, step=record["step"])

    def say(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        elif self.is_main:
            print(text)

    def progress(self, **postfix):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**postfix)

    def end_progress(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        if self.is_main:
            self.file.close()
            plot_curves(self.path, self.path.parent / "curves.png")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plot_curves(metrics_path: Path, png: Path):
    """Reward, accuracy, entropy and KL per RL step, plus eval accuracy, as one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    rl = [r for r in rows if r.get("phase") == "rl"]
    ev = [r for r in rows if r.get("phase") == "eval"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, key in zip(axes, ["reward", "entropy", "kl"]):
        pts = [(r["step"], r[key]) for r in rl if r.get(key) is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[3].plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], marker="o")
    axes[3].set_title("held-out eval accuracy")
    axes[3].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

