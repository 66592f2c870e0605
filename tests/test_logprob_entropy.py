"""fused_linear_logprob_entropy (Triton under the interpreter, chunked torch) vs a float64 reference."""
import pytest
import torch

import kernels
from kernels import logprob_entropy as le
from kernels.reference import naive_logprob_entropy
from tests.kernel_utils import DEVICE, assert_verbose_close, make_inputs, within_budget

CPU_SHAPES = [(1, 32, 123), (37, 48, 123), (65, 80, 300), (3, 16, 1000), (0, 32, 64)]
CUDA_SHAPES = [(1, 128, 1000), (1000, 576, 49152), (2049, 1024, 50257), (4096, 2048, 151936)]
SHAPES = CUDA_SHAPES if DEVICE == "cuda" else CPU_SHAPES
IMPLS = ["triton", "triton-atomic", "torch"]  # triton: the chunked backward (default)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(le, "POISON_OUTPUTS", True)  # an unwritten work element becomes NaN and fails


def fle(*args, impl, **kw):
    """fused_linear_logprob_entropy with IMPLS' names ("triton-atomic": the atomic backward)."""
    impl, backward = ("triton", "atomic") if impl == "triton-atomic" else (impl, "auto")
    return kernels.fused_linear_logprob_entropy(*args, impl=impl, backward=backward, **kw)


def run(impl, hidden, weight, targets, temperature, g_logp, g_ent):
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fle(x, w, targets, temperature=temperature, impl=impl)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # fp32, fp64 kept by "naive"
    assert logp.dtype == ent.dtype and logp.dtype in (torch.float32, out_dtype) and logp.shape == targets.shape
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed,temperature,peaky", [(0, 1.0, False), (1, 0.7, True)])
def test_matches_float64_reference(impl, dtype, shape, seed, temperature, peaky):
    n, h, v = shape
    hidden, weight, targets = make_inputs(n, h, v, dtype, seed, peaky=peaky)
    g = torch.Generator().manual_seed(seed + 100)
    g_logp = torch.randn(n, generator=g).to(DEVICE)
    g_ent = torch.randn(n, generator=g).to(DEVICE)

    got = run(impl, hidden, weight, targets, temperature, g_logp, g_ent)
    want = run("naive", hidden.double(), weight.double(), targets, temperature, g_logp.double(), g_ent.double())
    same = run("naive", hidden, weight, targets, temperature, g_logp, g_ent)  # same-dtype torch error
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want, same):
        within_budget(a, c, b, dtype, f"{impl} {dtype} {shape} {name}")
    ignored = targets == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_backward_over_several_chunks(monkeypatch, dtype):
    n, h, v = (3000, 256, 4000) if DEVICE == "cuda" else (70, 48, 300)
    monkeypatch.setattr(le, "DZ_CHUNK_BYTES", 16 * v * 4)  # 16 fp32 / 32 bf16 rows per chunk: 5 or 3 chunks
    assert le._chunk_rows(n, v, torch.tensor([], dtype=dtype).element_size()) < n
    hidden, weight, targets = make_inputs(n, h, v, dtype, 4, peaky=True)
    g = torch.Generator().manual_seed(5)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    got = run("triton", hidden, weight, targets, 0.7, g_logp, g_ent)
    want = run("naive", hidden.double(), weight.double(), targets, 0.7, g_logp.double(), g_ent.double())
    same = run("naive", hidden, weight, targets, 0.7, g_logp, g_ent)
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want, same):
        within_budget(a, c, b, dtype, f"chunked {dtype} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_get_no_gradient(impl):
    hidden, weight, targets = make_inputs(9, 32, 130, torch.float32, 3)
    targets[::2] = -100
    x = hidden.clone().requires_grad_()
    logp, ent = fle(x, weight, targets, impl=impl)
    (logp + ent).sum().backward()
    assert (x.grad[::2] == 0).all() and (x.grad[1::2] != 0).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [49152, 50257] if DEVICE == "cpu" else [151936])
def test_large_vocab_not_multiple_of_tile(impl, v):
    hidden, weight, targets = make_inputs(2, 16, v, torch.float32, 4, ignore_frac=0.0)
    targets[-1] = v - 1  # the last (partial) tile holds a target
    got = run(impl, hidden, weight, targets, 1.0, torch.ones(2), torch.ones(2))
    want = run("naive", hidden.double(), weight.double(), targets, 1.0, torch.ones(2).double(), torch.ones(2).double())
    for name, a, b in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want):
        assert_verbose_close(a, b, atol=5e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs_and_tied_embeddings(impl):
    torch.manual_seed(5)
    v, h, b, t = 211, 48, 3, 7
    emb = torch.nn.Embedding(v, h).to(DEVICE)
    tokens = torch.randint(0, v, (b, t), device=DEVICE)
    # hidden: a non-contiguous (transposed) view; weight: the embedding table itself (tied LM head)
    hidden = (emb(tokens) * 1.5).transpose(0, 1).reshape(t * b, h)[::2]
    targets = torch.randint(0, v, (hidden.shape[0],), device=DEVICE)
    logp, ent = fle(hidden, emb.weight, targets, impl=impl)
    (logp.sum() + 0.5 * ent.sum()).backward()
    got_grad = emb.weight.grad.clone()
    emb.weight.grad = None
    hidden_again = (emb(tokens) * 1.5).transpose(0, 1).reshape(t * b, h)[::2]
    ref_logp, ref_ent = naive_logprob_entropy(hidden_again, emb.weight, targets)
    (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
    assert_verbose_close(logp, ref_logp, 1e-5, 1e-4, "logp")
    assert_verbose_close(got_grad, emb.weight.grad, 1e-5, 1e-4, "tied grad (embedding + lm head)")


@pytest.mark.parametrize("impl", IMPLS)
def test_column_major_inputs(impl):
    # stride(-1) != 1: the triton launcher copies to unit stride (the specialised, spill-free build)
    hidden, weight, targets = make_inputs(19, 48, 150, torch.float32, 8)
    x = hidden.t().contiguous().t().requires_grad_()
    w = weight.t().contiguous().t().requires_grad_()
    assert x.stride(-1) != 1 and w.stride(-1) != 1
    logp, ent = fle(x, w, targets, impl=impl)
    (logp.sum() + 0.5 * ent.sum()).backward()
    x64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logp, ref_ent = naive_logprob_entropy(x64, w64, targets)
    (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
    for name, a, b in [("logp", logp, ref_logp), ("entropy", ent, ref_ent), ("grad_hidden", x.grad, x64.grad),
                       ("grad_weight", w.grad, w64.grad)]:
        assert_verbose_close(a, b, 1e-5, 1e-4, f"{impl} column-major {name}")


def _dlogits(hidden, weight, targets, temperature, g_logp, g_ent):
    """float64 dz = d(sum(logp * g_logp + entropy * g_ent)) / d(hidden @ weight.T), (N, V)."""
    z = (hidden.double() @ weight.double().T).requires_grad_()
    logp, ent = naive_logprob_entropy(z, torch.eye(z.shape[1], dtype=torch.float64, device=z.device), targets,
                                      temperature)
    (logp * g_logp.double() + ent * g_ent.double()).sum().backward()
    return z.grad


def test_filter_eps_skips_exactly_the_small_tiles():
    n, h, v, temperature, eps = 70, 48, 300, 0.7, 0.05
    hidden, weight, targets = make_inputs(n, h, v, torch.float32, 9)
    hidden[:, 0], weight[:, 0], weight[128:, 0] = 1.0, 0.0, -6.0  # logits of columns 128.. lowered by 6
    targets = targets.clamp(max=127)
    targets[32:64] = -100  # no gradient from these rows: dz = 0
    g = torch.Generator().manual_seed(11)
    g_logp, g_ent = torch.randn(n, generator=g) * 1e-3, torch.randn(n, generator=g) * 1e-3  # ~ 1 / N scale
    hidden, weight, targets, g_logp, g_ent = (t.to(DEVICE) for t in (hidden, weight, targets, g_logp, g_ent))
    dz = _dlogits(hidden, weight, targets, temperature, g_logp, g_ent)
    scale = ((g_logp.abs() + g_ent.abs()) / temperature).double()
    scale[targets == -100] = 0.0
    ratio = torch.where(dz == 0, 0.0, dz.abs() / scale[:, None])  # a tile is skipped when every ratio <= eps
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = kernels.fused_linear_logprob_entropy(x, w, targets, temperature, impl="triton", filter_eps=eps)
    (logp * g_logp + ent * g_ent).sum().backward()
    cfg = le._bwd_kernel.best_config.kwargs  # the tile the backward ran with (autotuned on a GPU)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    tiles = [(i, j) for i in range(0, n, bn) for j in range(0, v, bv)]
    tile_max = {t: float(ratio[t[0]:t[0] + bn, t[1]:t[1] + bv].max()) for t in tiles}
    assert all(m < eps / 4 or m > 4 * eps for m in tile_max.values()), sorted(tile_max.items())  # fp32 cannot flip one
    skipped = {t for t, m in tile_max.items() if m <= eps}
    assert 0 < len(skipped) < len(tiles), tile_max
    dz_kept = dz.clone()
    for i, j in skipped:
        dz_kept[i:i + bn, j:j + bv] = 0
    want_dx, want_dw = dz_kept @ weight.double(), dz_kept.T @ hidden.double()
    assert_verbose_close(x.grad, want_dx, 1e-8, 1e-4, "grad_hidden, skipped tiles")
    assert_verbose_close(w.grad, want_dw, 1e-8, 1e-4, "grad_weight, skipped tiles")
    # the documented bound against the unfiltered float64 gradient
    exact_dx, exact_dw = dz @ weight.double(), dz.T @ hidden.double()
    bound_dx = eps * scale[:, None] * weight.double().abs().sum(0)[None, :]
    bound_dw = eps * scale[None, :] @ hidden.double().abs()
    assert ((x.grad.double() - exact_dx).abs() <= bound_dx + 1e-8).all()
    assert ((w.grad.double() - exact_dw).abs() <= bound_dw + 1e-8).all()

    x.grad = w.grad = None  # an eps above every ratio: every tile skipped, forward unchanged
    logp2, ent2 = kernels.fused_linear_logprob_entropy(x, w, targets, temperature, impl="triton", filter_eps=1e9)
    (logp2 * g_logp + ent2 * g_ent).sum().backward()
    assert (x.grad == 0).all() and (w.grad == 0).all() and torch.equal(logp2, logp)


def test_auto_dispatch_and_errors():
    hidden, weight, targets = make_inputs(4, 16, 50, torch.float32, 6)
    a = kernels.fused_linear_logprob_entropy(hidden, weight, targets)  # auto: torch here, triton on CUDA
    b = kernels.fused_linear_logprob_entropy(hidden, weight, targets, impl="naive")
    assert_verbose_close(a[0], b[0], 1e-5, 1e-5, "auto")
    with pytest.raises(ValueError, match="impl"):
        kernels.fused_linear_logprob_entropy(hidden, weight, targets, impl="cuda")
    with pytest.raises(ValueError, match="hidden size"):
        kernels.fused_linear_logprob_entropy(hidden, weight[:, :8], targets)
    with pytest.raises(IndexError, match="out of range"):
        kernels.fused_linear_logprob_entropy(hidden, weight, torch.full_like(targets, 50))
    with pytest.raises(TypeError, match="dtype"):
        kernels.fused_linear_logprob_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="temperature"):
        kernels.fused_linear_logprob_entropy(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="backward must be one of"):
        kernels.fused_linear_logprob_entropy(hidden, weight, targets, backward="fast")  # any impl
    with pytest.raises(ValueError, match="needs backward='atomic'"):
        kernels.fused_linear_logprob_entropy(hidden, weight, targets, impl="triton", backward="chunked", filter_eps=1e-3)


def test_fp16_torch_path():
    hidden, weight, targets = make_inputs(11, 32, 97, torch.float16, 7)
    got = run("torch", hidden, weight, targets, 1.0, torch.ones(11), torch.ones(11))
    want = run("naive", hidden.double(), weight.double(), targets, 1.0, torch.ones(11).double(), torch.ones(11).double())
    same = run("naive", hidden, weight, targets, 1.0, torch.ones(11), torch.ones(11))
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want, same):
        within_budget(a, c, b, torch.float16, name)
