"""fused_linear_logprob_entropy (Triton under the interpreter, chunked torch) vs a float64 reference.

The branches a GPU takes run here with their gate forced: vocabulary splits (`_num_splits`), the atomic
backward's autotuning with its reset hook (two configs and a CPU timer).
"""
import inspect
import textwrap

import pytest
import torch

import kernels
from kernels import _triton as _t
from kernels import logprob_entropy as le
from kernels.reference import _chunk_rows, naive_logprob_entropy
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


def naive_over_chunks(hidden, weight, targets, temperature):
    """`naive` over the row chunks the torch path uses: the same GEMM calls, so the same bf16-rounded logits.
    A full-N GEMM may round some logits to the other bf16 neighbour (cuBLAS picks its algorithm by M); one such
    peaky row's entropy moved by 0.54 on an H200, past the budget that the full-N error had set."""
    rows = _chunk_rows(hidden.shape[0], weight.shape[0], None)
    parts = [naive_logprob_entropy(hidden[i:i + rows], weight, targets[i:i + rows], temperature)
             for i in range(0, hidden.shape[0], rows)] or [naive_logprob_entropy(hidden, weight, targets, temperature)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def run(impl, hidden, weight, targets, temperature, g_logp, g_ent):
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    if impl == "naive-chunked":
        logp, ent = naive_over_chunks(x, w, targets, temperature)
    else:
        logp, ent = fle(x, w, targets, temperature=temperature, impl=impl)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # fp32, fp64 kept by "naive"
    assert logp.dtype == ent.dtype and logp.dtype in (torch.float32, out_dtype) and logp.shape == targets.shape
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad, w.grad


def check_against_float64(impl, hidden, weight, targets, temperature, g_logp, g_ent, label):
    """impl's outputs and gradients within the dtype budget of float64 `naive`, on top of the same-dtype torch
    error; for the torch path that error is naive's over the same row chunks (its logits are those GEMMs')."""
    got = run(impl, hidden, weight, targets, temperature, g_logp, g_ent)
    want = run("naive", hidden.double(), weight.double(), targets, temperature, g_logp.double(), g_ent.double())
    same = run("naive-chunked" if impl == "torch" else "naive", hidden, weight, targets, temperature, g_logp, g_ent)
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want, same):
        within_budget(a, c, b, hidden.dtype, f"{label} {name}")
    return got


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

    got = check_against_float64(impl, hidden, weight, targets, temperature, g_logp, g_ent, f"{impl} {dtype} {shape}")
    ignored = targets == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_backward_over_several_chunks(monkeypatch, dtype):
    n, h, v = (3000, 256, 4000) if DEVICE == "cuda" else (70, 48, 300)
    monkeypatch.setattr(le, "DZ_CHUNK_BYTES", 16 * v * 4)  # 16 fp32 / 32 bf16 rows per chunk: 5 or 3 chunks
    assert le._dz_chunk_rows(n, v, torch.tensor([], dtype=dtype).element_size()) < n
    hidden, weight, targets = make_inputs(n, h, v, dtype, 4, peaky=True)
    g = torch.Generator().manual_seed(5)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    check_against_float64("triton", hidden, weight, targets, 0.7, g_logp, g_ent, f"chunked {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_over_several_chunks(monkeypatch, dtype):
    """The torch path's row chunks (one chunk at CPU_SHAPES, 83 rows at V 50257 on CUDA) forced on every device."""
    n, h, v = (3000, 256, 4000) if DEVICE == "cuda" else (70, 48, 300)
    monkeypatch.setattr(kernels.reference, "CHUNK_ELEMENTS", 16 * v)  # 16 rows per chunk: 5 chunks on CPU
    assert _chunk_rows(n, v, None) == 16
    hidden, weight, targets = make_inputs(n, h, v, dtype, 6, peaky=True)
    g = torch.Generator().manual_seed(7)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    check_against_float64("torch", hidden, weight, targets, 0.7, g_logp, g_ent, f"torch chunks {dtype}")


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
    ones = torch.ones(2, device=DEVICE)
    got = run(impl, hidden, weight, targets, 1.0, ones, ones)
    want = run("naive", hidden.double(), weight.double(), targets, 1.0, ones.double(), ones.double())
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
    g_logp = torch.randn(n, generator=g).to(DEVICE) * 1e-3  # ~ 1 / N scale
    g_ent = torch.randn(n, generator=g).to(DEVICE) * 1e-3
    dz = _dlogits(hidden, weight, targets, temperature, g_logp, g_ent)
    scale = ((g_logp.abs() + g_ent.abs()) / temperature).double()
    scale[targets == -100] = 0.0
    ratio = torch.where(dz == 0, 0.0, dz.abs() / scale[:, None])  # a tile is skipped when every ratio <= eps
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = kernels.fused_linear_logprob_entropy(x, w, targets, temperature, impl="triton", filter_eps=eps)
    (logp * g_logp + ent * g_ent).sum().backward()
    cfg = le._bwd_atomic_kernel.best_config.kwargs  # the tile the backward ran with (autotuned on a GPU)
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
    ones = torch.ones(11, device=DEVICE)
    got = run("torch", hidden, weight, targets, 1.0, ones, ones)
    want = run("naive", hidden.double(), weight.double(), targets, 1.0, ones.double(), ones.double())
    same = run("naive", hidden, weight, targets, 1.0, ones, ones)
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want, same):
        within_budget(a, c, b, torch.float16, name)


# ---------------------------------------------------------------------------- the docstring's specification

def docstring_spec():
    """The code block under "Specification:" in fused_linear_logprob_entropy's docstring."""
    block = kernels.fused_linear_logprob_entropy.__doc__.split("Specification:")[1].split("\n\n")[1]
    return textwrap.dedent(block).strip()


def test_docstring_spec_is_the_reference_function():
    """One copy of the spec: the docstring quotes naive_logprob_entropy's body, which the tests compare against."""
    body = textwrap.dedent(inspect.getsource(naive_logprob_entropy).split('"""')[2])
    assert docstring_spec() in body, f"docstring spec:\n{docstring_spec()}\nnaive_logprob_entropy body:\n{body}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_docstring_spec_equals_the_implementation(impl, dtype):
    """The docstring's code, run in float64, vs the implementation on odd shapes with a non-default
    ignore_index on a third of the rows: outputs and both gradients within the dtype's error budget, and the
    ignored rows exactly 0 with no gradient."""
    namespace = {"torch": torch}
    exec("def spec(hidden, weight, targets, temperature, ignore_index):\n" + textwrap.indent(docstring_spec(), "    "),
         namespace)
    n, h, v, temperature = 37, 31, 123, 0.7
    hidden, weight, targets = make_inputs(n, h, v, dtype, 12, peaky=True, ignore_frac=0.0)
    ignored = torch.arange(n, device=DEVICE) % 3 == 1
    targets[ignored] = -1
    g = torch.Generator().manual_seed(13)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)

    def spec(x, w, gl, ge):
        x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        logp, ent = namespace["spec"](x, w, targets, temperature, -1)
        (logp * gl + ent * ge).sum().backward()
        return logp.detach(), ent.detach(), x.grad, w.grad

    x, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, ent = fle(x, w, targets, temperature, ignore_index=-1, impl=impl)
    (logp * g_logp + ent * g_ent).sum().backward()
    got = (logp.detach(), ent.detach(), x.grad, w.grad)
    want = spec(hidden.double(), weight.double(), g_logp.double(), g_ent.double())
    same = spec(hidden, weight, g_logp, g_ent)
    for name, a, b, c in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want, same):
        within_budget(a, c, b, dtype, f"{impl} {dtype} spec {name}")
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all() and (got[2][ignored] == 0).all()


# ---------------------------------------------------------------------------- vocabulary splits (GPU-only branch)

@pytest.mark.parametrize("align", [1, None])  # 1: split edges cut tiles (the kernel's own masking); None: the launcher's
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_vocabulary_forward_matches_float64(monkeypatch, splits, align, dtype):
    """The forward's SPLITS > 1 branch (on a GPU when row blocks are few), forced under the interpreter:
    targets right before, at and just past every split edge, plus the first and last ids; then the backward
    on its statistics."""
    v, h = 700, 32
    monkeypatch.setattr(le, "_num_splits", lambda n, v, sms: splits)
    if align is not None:
        monkeypatch.setattr(le, "VOCAB_ALIGN", align)
    n_splits, per = le._split_plan(1, v, 0)
    assert n_splits > 1 and (n_splits - 1) * per < v <= n_splits * per
    edges = [k * per for k in range(1, n_splits)]
    ids = sorted({t for e in edges for t in (e - 1, e, e + 1, e + 5)} | {0, v - 1})
    hidden, weight, _ = make_inputs(len(ids) + 1, h, v, dtype, 14)
    targets = torch.tensor(ids + [-100], device=DEVICE)
    g = torch.Generator().manual_seed(15)
    g_logp, g_ent = torch.randn(len(targets), generator=g).to(DEVICE), torch.randn(len(targets), generator=g).to(DEVICE)
    check_against_float64("triton", hidden, weight, targets, 0.7, g_logp, g_ent, f"{n_splits} splits of {per} ({dtype})")


@pytest.mark.parametrize("sms", [108, 132])  # A100, H100/H200
def test_split_plan_aligns_every_split_to_the_widest_tile(sms):
    """V_PER_SPLIT is a multiple of the widest BLOCK_V (so of 16: the specialisation the compile report
    builds), the splits cover V with none empty, and there are never more than asked for."""
    assert le.VOCAB_ALIGN == 256
    for v in (1000, 49152, 50257, 151936):
        for n in (1, 37, 64, 500, 4096, 16384, 70000):
            splits, per = le._split_plan(n, v, sms)
            assert per % le.VOCAB_ALIGN == 0 and (splits - 1) * per < v <= splits * per, (n, v, splits, per)
            assert 1 <= splits <= le._num_splits(n, v, sms)
    assert le._split_plan(16384, 151936, 132) == (2, 76032)  # the target shape on an H200
    assert le._split_plan(512, 151936, 132) == (33, 4608)  # an RL micro-batch: more splits
    assert le._split_plan(512, 151936, 0) == (1, 152064)  # no GPU: one split
    for v, h in ((151936, 4096), (49152, 576), (50257, 48)):
        slabs = le._dw_slabs(v, h)
        assert slabs[0][0] == 0 and slabs[-1][1] == v and all(a[1] == b[0] for a, b in zip(slabs, slabs[1:]))
        assert all(lo % le.VOCAB_ALIGN == 0 and (hi - lo) * h <= max(le.DW_SLAB_ELEMENTS, le.VOCAB_ALIGN * h)
                   for lo, hi in slabs)


# ---------------------------------------------------------------------------- autotuning with its hooks (GPU-only)

@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_atomic_backward_autotune_reset_hook_keeps_the_inputs(monkeypatch, frozen):
    """On a GPU the atomic backward is autotuned, and its reset_to_zero hook zeroes DX and DW before each
    timed config and after tuning. A gradient that is not needed (frozen hidden states or a frozen head)
    must not hand an input (lse) to the hook in its place. Forced here: two configs and a CPU timer make the
    interpreter's autotuner time both and run the hook."""
    kernel = le._bwd_atomic_kernel
    monkeypatch.setattr(kernel, "configs", [_t.config(BLOCK_N=32, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
                                            _t.config(BLOCK_N=16, BLOCK_V=64, BLOCK_H=64, num_warps=4, num_stages=2)])
    monkeypatch.setattr(kernel, "cache", {})
    timed = []

    def do_bench(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [float(len(timed))] * len(quantiles)

    monkeypatch.setitem(kernel.__dict__, "do_bench", do_bench)
    n, h, v = 40, 32, 300
    hidden, weight, targets = make_inputs(n, h, v, torch.float32, 16)
    g = torch.Generator().manual_seed(17)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    x, w = hidden.clone().requires_grad_(frozen != "hidden"), weight.clone().requires_grad_(frozen != "weight")
    logp, ent = fle(x, w, targets, 0.7, impl="triton-atomic")
    (logp * g_logp + ent * g_ent).sum().backward()
    assert len(timed) == 2, "the autotuner did not time both configs"
    x64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logp, ref_ent = naive_logprob_entropy(x64, w64, targets, 0.7)
    (ref_logp * g_logp.double() + ref_ent * g_ent.double()).sum().backward()
    got, want = (w.grad, w64.grad) if frozen == "hidden" else (x.grad, x64.grad)
    assert (x.grad is None) == (frozen == "hidden") and (w.grad is None) == (frozen == "weight")
    assert_verbose_close(got, want, 1e-5, 1e-4, f"frozen {frozen}: the other gradient after autotuning")


def test_kernel_tests_make_their_tensors_on_the_test_device():
    """Every tensor this file makes is made on DEVICE: a factory call without device= must be moved with
    .to(...) (a CPU tensor next to CUDA outputs fails on the GPU only). Checked by reading the source, since
    on a CPU machine every device is the CPU."""
    import ast

    factories = {"ones", "zeros", "full", "randn", "rand", "randint", "arange", "empty", "tensor", "eye"}
    for path in (__file__,):
        tree = ast.parse(open(path).read())
        moved = {id(node.func.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and node.func.attr in ("to", "element_size")}
        bad = [f"{path}:{node.lineno}" for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
               and node.func.attr in factories and id(node) not in moved
               and not any(k.arg == "device" for k in node.keywords)]
        assert not bad, f"tensors made on the CPU whatever DEVICE is: {bad}"
