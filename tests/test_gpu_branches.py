"""The trainer's branches that only a GPU takes, run on this CPU with their gate forced (issue 31): the attention
choice, the vLLM engine's memory share and keyword arguments, and its sleep mode around the policy update.
The kernels' own GPU branches (vocabulary splits, autotune hooks) are forced in tests/test_logprob_entropy.py.
"""
from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from fctrain import models, rollout
from fctrain.config import Config

GIB = 2**30


# ---------------------------------------------------------------------------- attention

@pytest.mark.parametrize("train_dtype,want", [("float32", ("sdpa", "shared")),
                                              ("bfloat16", ("flash_attention_2", "packed")),
                                              ("amp-bf16", ("flash_attention_2", "packed"))])
def test_auto_attention_on_a_gpu_with_flash_attn(monkeypatch, train_dtype, want):
    """flash-attn refuses float32 inputs: auto falls back to SDPA when the model trains in float32."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    cfg = Config(train_dtype=train_dtype)
    assert models.attention_choice(cfg, "cuda") == want
    assert models.attention_choice(cfg, "cpu") == ("sdpa", "shared")


# ---------------------------------------------------------------------------- the engine's memory on a shared GPU

def test_colocated_share_fits_paper_7b_on_one_h200():
    """--preset paper-7b on one H200: policy and reference in bf16 (2 x 14.2 GiB) leave ~111 GiB free of
    139.8 GiB. vLLM's default 0.9 asks for 125.8 GiB and is refused (total * share > free); the colocated
    share fits what is free, holds the engine's own 14.2 GiB of weights with room for a KV cache, and leaves
    the trainer its gradients and AdamW moments (3 x 14.2 GiB) plus the headroom."""
    total, weights = 139.8 * GIB, 14.2 * GIB
    free = total - 2 * weights - 0.6 * GIB  # CUDA context
    to_come = 3 * weights
    share = rollout.colocated_memory_share(int(free), int(total), int(to_come))
    assert 0.9 * total > free  # the old hard-wired value cannot start
    assert share * total <= free - to_come - rollout.ENGINE_MEMORY_HEADROOM * total + 0.001 * total
    assert share * total - weights > 20 * GIB  # a KV cache of > 20 GiB beside the engine's weights
    assert rollout.colocated_memory_share(int(total), int(total)) == 0.9  # an empty GPU: vLLM's own default


def test_colocated_share_refuses_what_cannot_fit():
    with pytest.raises(rollout.EngineUnavailableError, match="engine_memory"):
        rollout.colocated_memory_share(40 * GIB, 80 * GIB, 38 * GIB)


def test_trainer_state_bytes_counts_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    model[0].bias.requires_grad_(False)
    assert rollout.trainer_state_bytes(model) == 3 * (32 * 4 + (8 + 2) * 2)


def test_engine_kwargs_for_a_gpu_built_on_a_cpu(tmp_path):
    gpu = rollout.engine_kwargs(tmp_path, "auto", 2048, 3, on_gpu=True, gpu_memory_utilization=0.42, sleep_mode=True)
    assert gpu == dict(model=str(tmp_path), dtype="bfloat16", max_model_len=2048, seed=3,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True, gpu_memory_utilization=0.42,
                       enable_sleep_mode=True)
    cpu = rollout.engine_kwargs(tmp_path, "auto", 256, 0, on_gpu=False)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] == GIB
    assert "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu
    assert rollout.engine_kwargs(tmp_path, "auto", 256, 0, on_gpu=True, gpu_memory_utilization=0.5,
                                 distributed=True)["distributed_executor_backend"] == "external_launcher"
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        rollout.engine_kwargs(tmp_path, "auto", 256, 0, on_gpu=True)
    with pytest.raises(ValueError, match="sleep mode needs a GPU"):
        rollout.engine_kwargs(tmp_path, "auto", 256, 0, on_gpu=False, sleep_mode=True)


# ---------------------------------------------------------------------------- a "GPU" engine on a fake vLLM

class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def get_tokenizer(self):
        return None

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")

    def generate(self, prompts, params, use_tqdm):
        self.calls.append("generate")
        return []

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


@pytest.fixture
def gpu_engine(monkeypatch, tmp_path):
    """VLLMEngine as it starts on an H200 holding the trainer's models (111 GiB free of 139.8), vLLM faked."""
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(111 * GIB), int(139.8 * GIB)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setattr(rollout, "_import_vllm", lambda: fake)
    monkeypatch.setattr(rollout, "_model_config", lambda llm: (2048, "bfloat16"))
    monkeypatch.setattr(rollout, "_reload_weights", lambda llm, tensors, on_gpu: [t for t in tensors])
    return rollout.VLLMEngine(tmp_path)


def test_gpu_engine_takes_the_free_share_and_sleeps_through_the_update(gpu_engine):
    kw = gpu_engine.llm.kwargs
    assert kw["gpu_memory_utilization"] == rollout.colocated_memory_share(int(111 * GIB), int(139.8 * GIB))
    assert kw["gpu_memory_utilization"] * 139.8 <= 111 and kw["enable_sleep_mode"] and kw["dtype"] == "bfloat16"
    calls = gpu_engine.llm.calls
    gpu_engine.generate([[1, 2]], n=2)
    gpu_engine.sleep()
    gpu_engine.sleep()  # twice: one sleep
    assert calls == ["generate", "sleep1"]
    gpu_engine.update_weights([])  # the weight sync wakes it
    gpu_engine.generate([[1, 2]])
    assert calls == ["generate", "sleep1", "wake_up", "reset_prefix_cache", "generate"]


def test_engine_without_sleep_mode_ignores_sleep(gpu_engine, monkeypatch, tmp_path):
    engine = rollout.VLLMEngine(tmp_path, gpu_memory_utilization=0.3, sleep_mode=False)
    assert engine.llm.kwargs["gpu_memory_utilization"] == 0.3 and "enable_sleep_mode" not in engine.llm.kwargs
    engine.sleep()
    engine.generate([[1]])
    assert engine.llm.calls == ["generate"]


def test_trainer_gives_vllm_the_share_beside_its_models(monkeypatch):
    """run.engine_share: --engine_memory when set, else the colocated share less the trainer's state to come;
    None off a GPU (vLLM's CPU engine sizes its KV cache in GiB instead)."""
    from fctrain import run

    model = torch.nn.Linear(1024, 1024)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(100 * GIB), int(139.8 * GIB)))
    cuda = types.SimpleNamespace(device="cuda:0")
    want = rollout.colocated_memory_share(int(100 * GIB), int(139.8 * GIB), rollout.trainer_state_bytes(model))
    assert run.engine_share(Config(), cuda, model) == want
    assert run.engine_share(Config(engine_memory=0.3), cuda, model) == 0.3
    assert run.engine_share(Config(), types.SimpleNamespace(device="cpu"), model) is None
    with pytest.raises(ValueError, match="engine_memory"):
        Config(engine_memory=1.5)
