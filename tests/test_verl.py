"""kernels.verl: verl's fused-kernel contract on our kernels, against verl's own torch implementation.

verl 0.9.1 is not in the project's environment (it pins transformers < 5.11 and pulls Ray): scripts/setup.sh
installs it beside it, into <venv>/verl-pkgs (`pip install --no-deps --target`), and this module appends that
folder to sys.path (after the environment's own packages). Skipped where verl is still not importable.
"""
import sys
from pathlib import Path

import pytest
import torch

VERL_PKGS = Path(sys.prefix) / "verl-pkgs"
if VERL_PKGS.is_dir() and str(VERL_PKGS) not in sys.path:
    sys.path.append(str(VERL_PKGS))

from tests.equivalence import assert_grad_close
from tests.kernel_utils import assert_verbose_close, within_budget

verl_functional = pytest.importorskip("verl.utils.experimental.torch_functional")
import verl.utils.kernel.linear_cross_entropy as verl_lce  # noqa: E402
from verl.models.transformers.dense_common import (  # noqa: E402
    forward_with_torch_backend,
    forward_with_triton_backend,
)

import kernels.verl  # noqa: E402


def verl_torch(hidden, weight, labels, temperature):
    """verl's torch backend of the same op (what use_fused_kernels runs with fused_kernels_backend="torch")."""
    return verl_functional.FusedLinearForPPO(impl_backend="torch").forward(hidden, weight, labels, temperature)


def run(fn, hidden, weight, labels, temperature, g_logp, g_ent):
    x, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, ent = fn(x, w, labels, temperature)
    logp, ent = logp.reshape(labels.shape), ent.reshape(labels.shape)
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()  # random upstream gradients, both outputs
    return logp.detach(), ent.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37,), (3, 13)], ids=["packed", "batched"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_outputs_and_grads_match_verl_torch_implementation(dtype, shape, temperature):
    g = torch.Generator().manual_seed(len(shape))
    h, v = 64, 301
    hidden = torch.randn(*shape, h, generator=g)
    hidden[..., :2, :] *= 20  # peaky rows: entropy ~ 0
    weight = torch.randn(v, h, generator=g) / h ** 0.5 * 2
    labels = torch.randint(0, v, shape, generator=g)
    g_logp, g_ent = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                    dtype=torch.float64)
    args = (labels, temperature, g_logp, g_ent)
    ours = run(kernels.verl.linear_cross_entropy, hidden.to(dtype), weight.to(dtype), *args)
    theirs = run(verl_torch, hidden.to(dtype), weight.to(dtype), *args)  # same dtype: the error budget's base
    exact = run(verl_torch, hidden.double(), weight.double(), *args)
    for name, a, b, c in zip(["log_probs", "entropy", "grad_hidden", "grad_weight"], ours, theirs, exact):
        assert a.dtype == (torch.float32 if name in ("log_probs", "entropy") else dtype), name
        within_budget(a, b, c, dtype, f"{dtype} {shape} T={temperature} {name}")


def test_reductions_and_unsupported_arguments():
    g = torch.Generator().manual_seed(0)
    hidden, weight, labels = torch.randn(2, 5, 32, generator=g), torch.randn(50, 32, generator=g), \
        torch.randint(0, 50, (2, 5), generator=g)
    logp, ent = kernels.verl.linear_cross_entropy(hidden, weight, labels, 0.9)
    assert logp.shape == ent.shape == (10,)  # flattened, like verl's Triton kernel
    for reduction, want in [("sum", logp.sum()), ("mean", logp.mean())]:
        got, ent_r = kernels.verl.linear_cross_entropy(hidden, weight, labels, 0.9, reduction)
        assert_verbose_close(got, want, 1e-5, 1e-6, reduction)
        assert torch.equal(ent_r, ent)
    with pytest.raises(ValueError, match="reduction"):
        kernels.verl.linear_cross_entropy(hidden, weight, labels, 1.0, "max")
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        kernels.verl.linear_cross_entropy(hidden, weight, labels, 1.0, "none", dist_process_group=object())


def test_verl_fused_forward_runs_our_kernel(monkeypatch):
    """verl's own `forward_with_triton_backend` (use_fused_kernels=True) on a tiny Llama, after
    use_fctrain_kernels(), against its `forward_with_torch_backend`: log-probs, entropies and every weight's
    gradient. fp32, sizes within tests/equivalence.py's (hidden 64, vocab 300, 2 layers, 24 positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(verl_lce, "linear_cross_entropy", verl_lce.linear_cross_entropy)  # restored afterwards
    kernels.verl.use_fctrain_kernels()
    assert verl_lce.linear_cross_entropy is kernels.verl.linear_cross_entropy
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (1, 24), generator=g)  # verl's remove-padding layout: one packed row
    g_logp, g_ent = torch.randn(1, 24, generator=g), torch.randn(1, 24, generator=g)
    results = []
    for forward in (forward_with_triton_backend, forward_with_torch_backend):
        model.zero_grad(set_to_none=True)
        out = forward(model, input_ids=input_ids, return_dict=True, temperature=0.8)
        logp, ent = out.log_probs.reshape(1, 24), out.entropy.reshape(1, 24)
        (logp * g_logp + ent * g_ent).sum().backward()
        results.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp, ent, grads), (logp_t, ent_t, grads_t) = results
    assert_grad_close(logp, logp_t, "log_probs")
    assert_grad_close(ent, ent_t, "entropy")
    for name in grads_t:
        assert_grad_close(grads[name], grads_t[name], f"grad {name}")
