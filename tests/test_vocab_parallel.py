"""Vocabulary-parallel fused log-prob/entropy and GRPO loss: 2 gloo ranks (spawned here) vs unsharded fp64.

One spawn runs every case on both ranks and saves what each rank computed; the checks run in this process
against the float64 unsharded reference (the error budget of tests.kernel_utils). Ranks must also agree
exactly with each other on everything that is replicated (log-prob, entropy, loss, grad hidden).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
from tests.kernel_utils import assert_verbose_close, make_inputs, within_budget

WORLD = 2
N, H, V = 37, 48, 250
SPLITS = {"even": (125, 125), "uneven": (100, 150)}  # rows per rank; "even" uses the default vocab_start
TEMPERATURE = 0.7
CASES = [(impl, dtype, split) for impl in ("triton", "torch") for dtype in ("float32", "bfloat16")
         for split in SPLITS]
GRPO = dict(config=kernels.GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.04, entropy_coef=0.01,
                                          rollout_is_cap=2.0, loss_agg="token-mean"), temperature=TEMPERATURE)


def case_inputs(dtype, seed):
    hidden, weight, targets = make_inputs(N, H, V, getattr(torch, dtype), seed, peaky=True, device="cpu")
    targets[:6] = torch.tensor([0, 99, 100, V - 1, -100, -100])  # both shards, their edges, ignored rows
    g = torch.Generator().manual_seed(seed + 100)
    return hidden, weight, targets, torch.randn(N, generator=g), torch.randn(N, generator=g)


def grpo_inputs(seed=7):
    b, t = 4, 9
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 2
    targets = torch.randint(0, V, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.8
    mask[:, 0] = True
    adv = torch.randn(b, generator=g)
    old, ref, rollout = (-torch.rand(b, t, generator=g) * 4 for _ in range(3))
    return hidden, weight, targets, adv, mask, old, ref, rollout


def shard_bounds(split, rank):
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)  # two ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for i, (impl, dtype, split) in enumerate(CASES):
            hidden, weight, targets, g_logp, g_ent = case_inputs(dtype, seed=i)
            lo, hi = shard_bounds(split, rank)
            x = hidden.clone().requires_grad_()
            w = weight[lo:hi].clone().requires_grad_()
            logp, ent = kernels.fused_linear_logprob_entropy(
                x, w, targets, temperature=TEMPERATURE, impl=impl, process_group=dist.group.WORLD,
                vocab_start=None if split == "even" else lo)
            (logp * g_logp + ent * g_ent).sum().backward()
            results[(impl, dtype, split)] = (logp.detach(), ent.detach(), x.grad, w.grad)

            if split == "even":  # no rows at all (a fully masked batch): the collectives still match
                x = hidden[:0].clone().requires_grad_()
                w = weight[lo:hi].clone().requires_grad_()
                logp, ent = kernels.fused_linear_logprob_entropy(x, w, targets[:0], impl=impl,
                                                                 process_group=dist.group.WORLD)
                (logp.sum() + ent.sum()).backward()
                results[(impl, dtype, "empty")] = (logp.shape, x.grad.shape, float(w.grad.abs().sum()))

        hidden, weight, targets, adv, mask, old, ref, rollout = grpo_inputs()
        lo, hi = shard_bounds("even", rank)
        for impl in ("triton", "torch"):
            x = hidden.clone().requires_grad_()
            w = weight[lo:hi].clone().requires_grad_()
            loss, metrics = kernels.fused_linear_grpo_loss(
                x, w, targets, adv, mask, old_logp=old, ref_logp=ref, rollout_logp=rollout, impl=impl,
                process_group=dist.group.WORLD, **GRPO)
            loss.backward()
            results[("grpo", impl)] = (loss.detach(), metrics["logp"], metrics["kl_mean"], x.grad, w.grad)

        hidden, weight, targets, _, _ = case_inputs("float32", seed=0)
        gap_targets = targets.clone()
        gap_targets[5] = 127  # rank 0 holds rows [0, 125), rank 1 rows [130, 250): nobody owns 127
        for name, bad_targets, shard, start in [
                ("out of range", torch.full_like(targets, V), weight[:125] if rank == 0 else weight[125:], None),
                ("gap", gap_targets, weight[:125] if rank == 0 else weight[130:], 0 if rank == 0 else 130)]:
            try:
                kernels.fused_linear_logprob_entropy(hidden, shard, bad_targets, impl="torch",
                                                     process_group=dist.group.WORLD, vocab_start=start)
                results[("error", name)] = None
            except IndexError as e:
                results[("error", name)] = str(e)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def reference(hidden, weight, targets, g_logp, g_ent):
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = kernels.fused_linear_logprob_entropy(x, w, targets, temperature=TEMPERATURE, impl="naive")
    (logp * g_logp.to(logp.dtype) + ent * g_ent.to(logp.dtype)).sum().backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


@pytest.mark.parametrize("impl,dtype,split", CASES)
def test_sharded_logprob_entropy_matches_unsharded(ranks, impl, dtype, split):
    hidden, weight, targets, g_logp, g_ent = case_inputs(dtype, seed=CASES.index((impl, dtype, split)))
    want = reference(hidden.double(), weight.double(), targets, g_logp.double(), g_ent.double())
    same = reference(hidden, weight, targets, g_logp, g_ent)  # same-dtype unsharded torch error
    got = [r[(impl, dtype, split)] for r in ranks]
    for k, name in enumerate(["logp", "entropy", "grad_hidden"]):
        assert torch.equal(got[0][k], got[1][k]), f"{name} differs between ranks"
        within_budget(got[0][k], same[k], want[k], getattr(torch, dtype), f"{impl} {dtype} {split} {name}")
    grad_w = torch.cat([got[0][3], got[1][3]])  # shards in rank order = the full weight's gradient
    within_budget(grad_w, same[3], want[3], getattr(torch, dtype), f"{impl} {dtype} {split} grad_weight")
    ignored = targets == -100
    assert ignored.any() and (got[0][0][ignored] == 0).all()


def grpo_reference(impl, dtype):
    hidden, weight, targets, adv, mask, old, ref, rollout = grpo_inputs()
    x = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    loss, metrics = kernels.fused_linear_grpo_loss(x, w, targets, adv.to(dtype), mask, old_logp=old.to(dtype),
                                                   ref_logp=ref.to(dtype), rollout_logp=rollout.to(dtype),
                                                   impl=impl, **GRPO)
    loss.backward()
    return loss.detach(), metrics["logp"], metrics["kl_mean"], x.grad, w.grad


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_sharded_grpo_loss_with_kl_matches_unsharded(ranks, impl):
    want = grpo_reference("naive", torch.float64)
    same = grpo_reference(impl, torch.float32)  # unsharded, same impl: the fp32 error budget's slack
    assert float(want[2]) > 0
    got = [r[("grpo", impl)] for r in ranks]
    for k in range(4):
        assert torch.equal(got[0][k], got[1][k]), f"output {k} differs between ranks"
    got_full = got[0][:4] + (torch.cat([got[0][4], got[1][4]]),)  # weight shards in rank order
    for name, a, b, c in zip(["loss", "logp", "kl_mean", "grad_hidden", "grad_weight"], got_full, want, same):
        within_budget(a, c, b, torch.float32, f"{impl} grpo {name}")


def test_empty_input(ranks):
    for key in [(impl, dtype, "empty") for impl in ("triton", "torch") for dtype in ("float32", "bfloat16")]:
        for r in ranks:
            assert r[key] == ((0,), (0, H), 0.0), key


def test_bad_targets_and_gaps_raise_on_every_rank(ranks):
    for name in ["out of range", "gap"]:
        for rank, r in enumerate(ranks):
            assert r[("error", name)] is not None, f"{name}: rank {rank} did not raise"
            assert "exactly one vocabulary shard" in r[("error", name)]


def test_process_group_errors_without_distributed():
    hidden, weight, targets, _, _ = case_inputs("float32", seed=0)
    with pytest.raises(RuntimeError, match="not initialised"):
        kernels.fused_linear_logprob_entropy(hidden, weight, targets, impl="torch", process_group=object())
