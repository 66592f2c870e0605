"""Checkpoints: atomic and durable writes, safe loads (tensors and plain types only), RNG state."""
import json
import random

import numpy as np
import pytest
import torch

from fctrain import checkpoint
from fctrain.run import Config


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fctrain.models import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny", hidden_size=64, num_layers=2, num_heads=2)


def test_checkpoint_reloads_to_identical_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM
    from fctrain.models import load_model, load_tokenizer
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters())
    path = checkpoint.save_checkpoint(Config(keep_last=1), tmp_path, 7, model, tok, opt, {"epoch": 0, "pos": 3}, [])
    ids = torch.randint(0, 1000, (2, 9))
    again = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert json.loads((path / "fctrain_config.json").read_text())["keep_last"] == 1
    assert not list(tmp_path.glob(".tmp-*"))  # atomic: no temporary directory left behind
    state = checkpoint.load_trainer_state(path)  # weights_only=True: tensors and plain types
    assert state["step"] == 7 and state["data"] == {"epoch": 0, "pos": 3}
    opt.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["rng"])
    drawn = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(state["rng"])
    assert drawn == (random.random(), np.random.rand(), torch.rand(1))


class _Payload:
    """Unpickling it would create `marker`: what a hostile checkpoint would do with os.system instead."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt-000001"
    ckpt.mkdir()
    torch.save({"step": 1, "optimizer": {}, "data": {}, "history": [], "rng": _Payload(marker)},
               ckpt / "trainer_state.pt")
    with pytest.raises(SystemExit, match=r"^error: .*trainer_state.pt refused: .*not loaded.*Unsupported global"):
        checkpoint.load_trainer_state(ckpt)
    assert not marker.exists()
    torch.load(ckpt / "trainer_state.pt", weights_only=False)  # the payload is live: the old loader ran it
    assert marker.exists()
    (ckpt / "trainer_state.pt").write_bytes((ckpt / "trainer_state.pt").read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit, match="cannot be read"):
        checkpoint.load_trainer_state(ckpt)
    (ckpt / "trainer_state.pt").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="^error: .*trainer_state.pt (refused|cannot be read)"):
        checkpoint.load_trainer_state(ckpt)


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tiny_model, tmp_path, monkeypatch):
    import errno
    from fctrain.models import load_model, load_tokenizer
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    opt = torch.optim.AdamW(model.parameters())
    cfg = Config(keep_last=2)
    first = checkpoint.save_checkpoint(cfg, tmp_path, 1, model, tok, opt, {"epoch": 0, "pos": 1}, [{"step": 1}])
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)  # the weights are written, then the disk is full
    with pytest.raises(SystemExit, match=r"^error: checkpoint .*ckpt-000002 not written \(.*No space left on "
                                         r"device\); ckpt-000001 is intact, resume with --resume"):
        checkpoint.save_checkpoint(cfg, tmp_path, 2, model, tok, opt, {"epoch": 0, "pos": 2}, [{"step": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001"]  # no partial directory left
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert checkpoint.latest_checkpoint(tmp_path) == first


def test_a_checkpoint_from_before_the_plain_rng_format_still_loads(tmp_path):
    """Checkpoints written before trainer_state.pt held NumPy's RNG state as lists hold it as an array: the
    loader allows exactly what rebuilding that array needs."""
    ckpt = tmp_path / "ckpt-000001"
    ckpt.mkdir()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"step": 1, "rng": rng}, ckpt / "trainer_state.pt")
    checkpoint.set_rng_state(checkpoint.load_trainer_state(ckpt)["rng"])
    drawn = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(rng)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1))
