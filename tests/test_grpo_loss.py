"""fused_linear_grpo_loss and its adapters vs a float64 full-logits reference and Liger-Kernel."""
import dataclasses
import inspect
import math
import textwrap

import pytest
import torch

import kernels
from kernels.reference import naive_grpo_loss
from tests.kernel_utils import BUDGETS, DEVICE, assert_verbose_close, within_budget

IMPLS = ["triton", "torch"]
AGGS = list(kernels.LOSS_AGGREGATIONS)


def make_batch(b, t, h, v, dtype, seed, per_seq_adv=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h ** 0.5 * 2
    targets = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = 1  # a one-token sequence
    mask = torch.arange(t)[None] < lengths[:, None]
    if b > 2:
        mask[2] = False  # a sequence with no valid token
    adv = torch.randn(b, generator=g) if per_seq_adv else torch.randn(b, t, generator=g)
    noise = lambda: 0.3 * torch.randn(b, t, generator=g)  # noqa: E731
    with torch.no_grad():  # old/ref/rollout log-probs near the current policy's
        logp = naive_grpo_loss(hidden.double(), weight.double(), targets, adv.double(), mask)[1]["logp"].float()
    old, ref, rollout = logp + noise(), logp + noise(), logp + noise()
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return (to(hidden).to(dtype), to(weight).to(dtype), to(targets), to(adv), to(mask), to(old), to(ref), to(rollout))


def split_options(kw):
    """Keyword options of the old flat form -> (per-token inputs and kernel options, GRPOLossConfig)."""
    fields = kernels.GRPOLossConfig.__dataclass_fields__
    config = kernels.GRPOLossConfig(**{k: v for k, v in kw.items() if k in fields})
    return {k: v for k, v in kw.items() if k not in fields}, config


def run_fused(impl, hidden, weight, targets, adv, mask, **kw):
    kw, config = split_options(kw)
    x, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, metrics = kernels.fused_linear_grpo_loss(x, w, targets, adv, mask, impl=impl, config=config, **kw)
    loss.backward()
    return loss.detach(), x.grad, w.grad, metrics


def run_ref(hidden, weight, targets, adv, mask, old_logp=None, ref_logp=None, rollout_logp=None, **kw):
    kw, config = split_options(kw)
    x, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    cast = lambda t: None if t is None else t.to(x.dtype if x.dtype == torch.float64 else torch.float32)  # noqa
    loss, metrics = naive_grpo_loss(x, w, targets, cast(adv), mask, cast(old_logp), cast(ref_logp),
                                    cast(rollout_logp), config=config, **kw)
    loss.backward()
    return loss.detach(), x.grad, w.grad, metrics["logp"], metrics["entropy"]


OPTIONS = [
    dict(),
    dict(use_old=True, beta=0.04, temperature=0.7, kl_times_ratio=True),
    dict(use_old=True, entropy_coef=0.01, rollout_is_cap=2.0),
    dict(use_old=True, beta=0.001, entropy_coef=0.02, rollout_is_cap=1.5, eps_high=0.28, per_token_adv=True),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_loss_and_grads_match_float64_reference(impl, dtype, agg, opt):
    o = dict(OPTIONS[opt])
    use_old, per_token = o.pop("use_old", False), o.pop("per_token_adv", False)
    hidden, weight, targets, adv, mask, old, ref, rollout = make_batch(4, 9, 32, 101, dtype, seed=opt,
                                                                       per_seq_adv=not per_token)
    kw = dict(o, loss_agg=agg, old_logp=old if use_old else None, ref_logp=ref if o.get("beta") else None,
              rollout_logp=rollout if o.get("rollout_is_cap") else None)
    got = run_fused(impl, hidden, weight, targets, adv, mask, **kw)
    want = run_ref(hidden.double(), weight.double(), targets, adv.double(), mask, **kw)
    same = run_ref(hidden, weight, targets, adv, mask, **kw)
    for name, a, b, c in zip(["loss", "grad_hidden", "grad_weight"], got[:3], want[:3], same[:3]):
        within_budget(a, c, b, dtype, f"{impl} {dtype} {agg} opt{opt} {name}")
    within_budget(got[3]["logp"], same[3], want[3], dtype, "metrics.logp")
    within_budget(got[3]["entropy"], same[4], want[4], dtype, "metrics.entropy")
    assert got[3]["num_tokens"].item() == mask.sum().item()


def docstring_spec():
    """The code block under "Specification:" in fused_linear_grpo_loss's docstring, as a function."""
    doc = kernels.fused_linear_grpo_loss.__doc__
    block = doc.split("Specification:")[1].split("\n\n")[1]
    return textwrap.dedent(block).strip()


def test_docstring_spec_is_the_reference_function():
    """The docstring quotes naive_grpo_loss's body verbatim, so the spec that tests run is the one readers see."""
    body = textwrap.dedent(inspect.getsource(naive_grpo_loss).split('"""')[2])
    assert docstring_spec() in body, f"docstring spec:\n{docstring_spec()}\nnaive_grpo_loss body:\n{body}"


SPEC_CONFIG = kernels.GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.04, kl_times_ratio=True, entropy_coef=0.01,
                                     rollout_is_cap=1.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_docstring_spec_equals_the_implementation(impl, layout, dtype):
    """The docstring's code, run in float64, vs fused_linear_grpo_loss on odd shapes (B, T, H, V) = (3, 13, 31, 123):
    loss, metrics and gradients, every aggregation. Budget (ml-cross-entropy): the kernel's error vs float64
    may exceed the spec's own error when run in the input dtype by the dtype's tolerance only. Clip fractions
    are counts: they may differ by the tokens whose ratio lies within the log-prob error of a clip edge."""
    namespace = {"torch": torch, "grpo_objective": kernels.grpo_objective}
    args = "hidden, weight, targets, advantages, mask, old_logp, ref_logp, rollout_logp, is_weight, seq_ids, config, " \
           "temperature"
    exec(f"def spec({args}):\n" + textwrap.indent(docstring_spec(), "    "), namespace)
    hidden, weight, targets, adv, mask, old, ref, rollout = make_batch(3, 13, 31, 123, dtype, seed=21)
    b, t, h = hidden.shape
    seq_ids = None
    if layout == "packed":  # the same sequences, end to end
        hidden, targets, mask, old, ref, rollout = (x.reshape(b * t, *x.shape[2:]) for x in
                                                    (hidden, targets, mask, old, ref, rollout))
        seq_ids = torch.arange(b, device=DEVICE).repeat_interleave(t)

    def spec(x, w, config, cast):
        x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss, metrics = namespace["spec"](x, w, targets, cast(adv), mask, cast(old), cast(ref), cast(rollout), None,
                                          seq_ids, config, 0.7)
        loss.backward()
        return loss.detach(), x.grad, w.grad, metrics

    for agg in AGGS:
        config = dataclasses.replace(SPEC_CONFIG, loss_agg=agg, max_len=t)
        x, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss, metrics = kernels.fused_linear_grpo_loss(x, w, targets, adv, mask, old, ref, rollout, seq_ids=seq_ids,
                                                       config=config, temperature=0.7, impl=impl)
        loss.backward()
        want = spec(hidden.double(), weight.double(), config, lambda v: v.double())
        same = spec(hidden, weight, config, lambda v: v.float())
        name = f"{impl} {layout} {dtype} {agg}"
        for what, got, w64, wd in zip(["loss", "grad_hidden", "grad_weight"], [loss, x.grad, w.grad], want, same):
            within_budget(got, wd, w64, dtype, f"{name} {what}")
        for key in ("logp", "entropy", "entropy_mean", "kl_mean", "ratio_mean", "is_weight_min", "is_weight_mean",
                    "is_weight_max"):
            within_budget(metrics[key], same[3][key], want[3][key], dtype, f"{name} metrics.{key}")
        assert metrics["num_tokens"].item() == want[3]["num_tokens"].item() == mask.sum().item()
        valid = mask.bool()
        ratio = torch.exp(want[3]["logp"] - old.double())[valid]
        dr = ratio * (metrics["logp"].double() - want[3]["logp"]).abs().max()  # ratio error from the logp error
        near = ((ratio - 0.8).abs() <= dr) | ((ratio - 1.28).abs() <= dr)
        for key in ("clip_low_frac", "clip_high_frac"):
            assert abs(metrics[key].item() - want[3][key].item()) <= near.sum().item() / valid.sum().item(), key


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_input_equals_padded_layout(impl):
    hidden, weight, targets, adv, mask, old, ref, _ = make_batch(5, 7, 32, 90, torch.float32, seed=11)
    b, t, h = hidden.shape
    seq_ids = torch.arange(b, device=DEVICE).repeat_interleave(t)
    for agg in AGGS:
        kw = dict(old_logp=old, ref_logp=ref, beta=0.1, loss_agg=agg, max_len=t)
        padded = run_fused(impl, hidden, weight, targets, adv, mask, **kw)
        packed_kw = dict(kw, old_logp=old.reshape(-1), ref_logp=ref.reshape(-1))
        packed = run_fused(impl, hidden.reshape(b * t, h), weight, targets.reshape(-1), adv, mask.reshape(-1),
                           seq_ids=seq_ids, **packed_kw)
        assert_verbose_close(packed[0], padded[0], 1e-6, 1e-5, f"{agg} loss")
        assert_verbose_close(packed[1].reshape(b, t, h), padded[1], 1e-6, 1e-5, f"{agg} grad_hidden")
        assert_verbose_close(packed[2], padded[2], 1e-6, 1e-5, f"{agg} grad_weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_ratios_at_and_around_the_clip_edges(impl):
    """Per-token ratios placed just inside, just outside and exactly on both clip edges, both signs of A."""
    eps_low, eps_high = 0.2, 0.28
    hidden, weight, targets, _, _, _, _, _ = make_batch(2, 8, 32, 64, torch.float32, seed=3)
    mask = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    logp = kernels.naive_logprob_entropy(hidden.double().reshape(16, 32), weight.double(),
                                         targets.reshape(-1))[0].reshape(2, 8)
    ratios = torch.tensor([1 - eps_low - 1e-2, 1 - eps_low + 1e-2, 1 + eps_high - 1e-2, 1 + eps_high + 1e-2,
                           0.5, 1.0, 1.7, 1 - eps_low], dtype=torch.float64, device=DEVICE)
    old = (logp - torch.log(ratios)[None]).float()  # exp(logp - old) = ratio
    adv = torch.tensor([1.0, -1.0], device=DEVICE)
    got = run_fused(impl, hidden, weight, targets, adv, mask, old_logp=old, eps_low=eps_low, eps_high=eps_high)
    want = run_ref(hidden.double(), weight.double(), targets, adv.double(), mask, old_logp=old.double(),
                   eps_low=eps_low, eps_high=eps_high)
    assert_verbose_close(got[0], want[0], 1e-5, 1e-4, "loss")
    # Exactly-on-edge tokens (last column) may round to either side in fp32: compare gradients elsewhere.
    assert_verbose_close(got[1][:, :7], want[1][:, :7], 1e-4, 1e-3, "grad_hidden")
    m = got[3]
    # A>0: clipped high when r > 1.28 (cols 3, 6); A<0: clipped low when r < 0.8 (cols 0, 4).
    assert m["clip_high_frac"].item() == pytest.approx(2 / 16)
    assert m["clip_low_frac"].item() == pytest.approx(2 / 16)
    # Clipped tokens get no policy gradient: with only clipped tokens unmasked, grads vanish.
    only_clipped = torch.zeros_like(mask)
    only_clipped[0, [3, 6]] = True
    only_clipped[1, [0, 4]] = True
    got_c = run_fused(impl, hidden, weight, targets, adv, only_clipped, old_logp=old, eps_low=eps_low, eps_high=eps_high)
    assert got_c[1].abs().max().item() == 0 and got_c[2].abs().max().item() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_advantages_give_zero_policy_gradient(impl):
    hidden, weight, targets, adv, mask, old, _, _ = make_batch(3, 6, 32, 50, torch.float32, seed=5)
    loss, gx, gw, _ = run_fused(impl, hidden, weight, targets, torch.zeros_like(adv), mask, old_logp=old)
    assert loss.item() == 0 and gx.abs().max().item() == 0 and gw.abs().max().item() == 0


def test_bad_arguments_fail_clearly():
    hidden, weight, targets, adv, mask, old, ref, rollout = make_batch(2, 4, 16, 20, torch.float32, seed=6)
    config = kernels.GRPOLossConfig
    with pytest.raises(ValueError, match="ref_logp"):
        kernels.fused_linear_grpo_loss(hidden, weight, targets, adv, mask, config=config(beta=0.1))
    with pytest.raises(ValueError, match="loss_agg"):
        config(loss_agg="sum")
    with pytest.raises(ValueError, match="eps_low"):
        config(eps_low=1.0)
    with pytest.raises(ValueError, match="rollout_logp"):
        kernels.fused_linear_grpo_loss(hidden, weight, targets, adv, mask, config=config(rollout_is_cap=2.0))
    with pytest.raises(ValueError, match="advantages"):
        kernels.fused_linear_grpo_loss(hidden, weight, targets, adv[:1], mask)
    with pytest.raises(ValueError, match="hidden must be"):
        kernels.fused_linear_grpo_loss(hidden, weight, targets.reshape(-1), adv, mask)
    with pytest.raises(ValueError, match="max_len"):
        kernels.fused_linear_grpo_loss(hidden.reshape(8, 16), weight, targets.reshape(-1), torch.ones(8),
                                       mask.reshape(-1), config=config(loss_agg="seq-mean-token-sum-norm"))
    with pytest.raises(NotImplementedError, match="cispo"):
        kernels.FusedLinearGRPOLoss(loss_type="cispo")


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta, bias_correction_kl", [(0.0, False), (0.05, False), (0.05, True)])
def test_parity_with_liger(loss_type, beta, bias_correction_kl):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, targets, adv, mask, old, ref, _ = make_batch(4, 9, 32, 101, torch.float32, seed=8)
    b, t, h = hidden.shape
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=t,
              temperature=0.9, use_ref_model=beta > 0, use_bias_correction_kl=bias_correction_kl)
    outs = []
    for module in [liger.LigerFusedLinearGRPOLoss(compiled=False, **kw), kernels.FusedLinearGRPOLoss(**kw)]:
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = module(x, w, targets, mask.long(), adv, ref_per_token_logps=ref if beta else None,
                               old_per_token_logps=old)
        loss.backward()
        outs.append((loss.detach(), x.grad, w.grad, [m.detach().float() for m in metrics]))
    (l0, x0, w0, m0), (l1, x1, w1, m1) = outs
    # Same semantics: a different normaliser or clip rule would differ by far more than fp32 noise
    # (Liger's own fp32 error vs float64 reaches ~5e-4 on this batch).
    assert_verbose_close(l1, l0, 2e-3, 2e-3, "loss")
    assert_verbose_close(x1, x0, 2e-3, 2e-3, "grad_hidden")
    assert_verbose_close(w1, w0, 2e-3, 2e-3, "grad_weight")
    assert len(m0) == len(m1)
    for a, b_ in zip(m1, m0):
        assert_verbose_close(a, b_, 1e-4, 1e-3, "metric")


@pytest.mark.parametrize("impl", IMPLS)
def test_hf_helper_matches_full_forward_with_tied_embeddings(impl):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 97, (3, 12), device=DEVICE)
    logp, ent = kernels.hf_logprob_entropy(model, ids, logits_to_keep=5, temperature=0.8, impl=impl)
    (logp.sum() + ent.sum()).backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(ids).logits[:, -6:-1].float() / 0.8
    ref = logits.log_softmax(-1)
    ref_logp = ref.gather(-1, ids[:, -5:, None])[..., 0]
    ref_ent = -(ref.exp() * ref).sum(-1)
    (ref_logp.sum() + ref_ent.sum()).backward()
    assert_verbose_close(logp, ref_logp, 1e-5, 1e-4, "logp")
    assert_verbose_close(ent, ref_ent, 1e-5, 1e-4, "entropy")
    assert_verbose_close(grad, model.lm_head.weight.grad, 1e-5, 1e-4, "tied weight grad")


def test_plain_pytorch_example_runs():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "examples/plain_pytorch_grpo.py", "--steps", "2"], capture_output=True,
                         text=True, timeout=300, cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("| reward") == 2
