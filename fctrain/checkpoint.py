"""Checkpoints that survive a crash: atomic, durable writes, safe loads, and the RNG state of a resume.

    path = save_checkpoint(cfg, out, step, model, tokenizer, optimizer, data_state, history)  # ckpt-<step>/
    ckpt = latest_checkpoint(out)                    # the newest complete one, or None
    state = load_trainer_state(ckpt)                 # step, optimizer, data position, history, RNG state
    load_optimizer_state(model, optimizer, state["optimizer"]); set_rng_state(state["rng"])

A checkpoint directory holds the model and tokenizer (Hugging Face format, so any tool loads it),
fctrain_config.json (the run's Config) and trainer_state.pt (tensors and plain types only). It is written
into a temporary directory, fsynced and renamed, so a power loss or a SIGKILL leaves either the previous
checkpoint or the new one, never half of one. fault_point lets the tests kill a run at chosen places.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from fctrain import dist as fdist


# ------------------------------------------------------------------------------------------------ write

def save_checkpoint(cfg, out: Path, step, model, tokenizer, optimizer, data_state, history):
    """Atomic and durable: write into a temporary directory, fsync its files and itself, rename, fsync the
    parent; keep the last cfg.keep_last. A failed write (a full disk) removes the temporary directory, keeps
    the previous checkpoints and ends the run with one error line. trainer_state.pt holds tensors and plain
    types only (load_trainer_state reads it with weights_only=True). Under torchrun every rank calls it
    (gathering is collective) and rank 0 writes."""
    final = out / f"ckpt-{step:06d}"
    tmp = out / f".tmp-ckpt-{step:06d}"
    main = fdist.is_main()
    try:
        if main:
            for stale in out.glob(".tmp-ckpt-*"):  # left by a run killed while writing
                shutil.rmtree(stale)
        if fdist.is_sharded(model):  # gathered to rank 0's CPU; optimizer state keyed by parameter name
            fdist.save_pretrained(model, tmp, tokenizer)
            optimizer_state = fdist.optimizer_state_dict(model, optimizer)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            optimizer_state = optimizer.state_dict()
        if main:
            fault_point("ckpt_write")
            (tmp / "fctrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            torch.save({"step": step, "optimizer": optimizer_state, "data": dict(data_state), "history": history,
                        "rng": rng_state()}, tmp / "trainer_state.pt")
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_tree(out, files=False)  # the rename itself
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        raise SystemExit(f"error: checkpoint {final} not written ({e}); "
                         + (f"{previous.name} is intact, resume with --resume {out}" if previous
                            else "no earlier checkpoint")) from None
    if main:
        for old in sorted(out.glob("ckpt-*"))[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    fdist.barrier()  # no rank goes on (or reads it on resume) before the rename
    return final


def save_policy(model, tokenizer, path: Path):
    """The policy's weights and tokenizer alone (loadable with --model), written to a temporary directory and
    renamed over `path`, so a crash leaves the previous one whole. Under torchrun every rank calls it (a sharded
    model's gathering is collective) and rank 0 writes."""
    tmp = path.with_name(f".tmp-{path.name}")
    main = fdist.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if fdist.is_sharded(model):
        fdist.save_pretrained(model, tmp, tokenizer)
    elif main:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if main:
        fsync_tree(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync_tree(path.parent, files=False)
    fdist.barrier()


def fsync_tree(path: Path, files: bool = True):
    """Flush `path`'s files (when `files`) and its directories to disk, so that a power loss after a rename
    cannot leave the renamed directory holding truncated files."""
    for p in sorted(path.rglob("*")) if files else []:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())] if files else [path]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rewrite(path: Path, text: str):
    """Replace `path`'s content by `text` atomically (a temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ RNG state

def rng_state() -> dict:
    """The Python, NumPy and torch RNG states as tuples, lists and a tensor (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------------------------------------ read

def load_trainer_state(ckpt: Path, mmap: bool = False) -> dict:
    """A checkpoint's trainer_state.pt, unpickled with weights_only=True: tensors and plain types only, so a
    checkpoint from someone else cannot run code here. Anything else is refused with one error line."""
    path = ckpt / "trainer_state.pt"
    # checkpoints written before this format hold NumPy's RNG state as an array: allow its reconstruction only
    numpy_array = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line or "Can only" in line),
                   str(e)[:200])
        raise SystemExit(f"error: {path} refused: it holds more than tensors and plain types (a tampered "
                         f"file?); not loaded. {why}") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or damaged: the zip or pickle fails to read
        raise SystemExit(f"error: {path} cannot be read ({str(e).splitlines()[0][:200]})") from None


def load_optimizer_state(model, optimizer, saved: dict):
    """A checkpoint's optimizer state: torch's own format (saved by one process, keyed by parameter index)
    or fdist.optimizer_state_dict's (saved under torchrun, keyed by name); either loads at any world size.
    Under torchrun only rank 0's `saved` is read (it is broadcast)."""
    by_index = all(isinstance(key, int) for key in saved.get("state", {}))
    if not fdist.is_sharded(model) and by_index:
        optimizer.load_state_dict(saved)
        return
    if saved and by_index:  # index i is the i-th of model.parameters(), the optimizer's order
        names = [name for name, _ in model.named_parameters()]
        saved = {"state": {names[i]: v for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    fdist.load_optimizer_state_dict(model, optimizer, saved)


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in out.glob("ckpt-*") if (p / "trainer_state.pt").exists())
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------------ fault injection

_fault_arrivals: dict[str, int] = {}


def fault_point(name: str):
    """Fault injection for tests, off unless FCTRAIN_FAULT is set: FCTRAIN_FAULT=<name>:<k> makes the k-th
    arrival at fault_point(<name>) SIGKILL this process. Points: step (inside a training step, after the
    update, before it is logged), ckpt_write (between a checkpoint's weight and state files), eval (inside
    an evaluation), and rollout, where the engine raises instead (RuntimeError, as a failing vLLM would)."""
    spec = os.environ.get("FCTRAIN_FAULT", "")
    point, _, k = spec.partition(":")
    if point == name:
        _fault_arrivals[name] = _fault_arrivals.get(name, 0) + 1
        if _fault_arrivals[name] == int(k or 1):
            if name == "rollout":
                raise RuntimeError("injected engine failure (FCTRAIN_FAULT)")
            os.kill(os.getpid(), signal.SIGKILL)


