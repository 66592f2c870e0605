"""Shared helpers for kernel tests: float64 references, error budgets, verbose mismatch reports."""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, atol, rtol) budget added on top of the same-dtype torch error vs float64.
BUDGETS = {torch.float32: (1e-4, 5e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def assert_verbose_close(actual, expected, atol, rtol, name="", k=5):
    """assert_close that prints the k worst mismatches (index, actual, expected)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {(~torch.isfinite(actual)).nonzero()[:k].tolist()}"
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    if (excess > 0).any():
        worst = excess.flatten().topk(min(k, excess.numel())).indices
        rows = [f"  {tuple(int(i) for i in torch.unravel_index(j, actual.shape))}: got {actual.flatten()[j]:.6g} "
                f"want {expected.flatten()[j]:.6g}" for j in worst]
        raise AssertionError(f"{name}: {(excess > 0).sum()} / {actual.numel()} mismatches "
                             f"(atol={atol}, rtol={rtol}); worst:\n" + "\n".join(rows))


def within_budget(actual, same_dtype_torch, reference, dtype, name):
    """Kernel error vs fp64 must not exceed the same-dtype torch error vs fp64 plus the dtype budget."""
    atol, rtol = BUDGETS[dtype]
    torch_err = (same_dtype_torch.double().cpu() - reference.double().cpu()).abs()
    slack = float(torch_err.max()) if torch_err.numel() else 0.0
    assert_verbose_close(actual, reference, atol=atol + slack, rtol=rtol, name=name)


def make_inputs(n, h, v, dtype, seed, peaky=False, ignore_frac=0.1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h ** 0.5 * 2
    if peaky and n > 0:
        hidden[: max(1, n // 3)] *= 30.0  # a third of the rows: one logit dominates (entropy ~ 0)
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 1:
        targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)
