"""Comparing two fp32 computations of the same training step (2 ranks vs one process, one layout vs another).

Tolerances come from fp32 summation error, not from what one machine printed. The two sides compute the same
real numbers with their sums in different orders: other micro-batches, the cross-rank gradient sum, other
BLAS blockings for other batch shapes, another CPU's BLAS (AMD vs Intel). A sum of n terms x_i evaluated in
any order is within gamma_n * sum |x_i| of the exact sum, gamma_n = n u / (1 - n u) ~ n u with
u = 2**-24 the fp32 unit roundoff (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 4.2), so
two orders differ by at most 2 n u * sum |x_i|. Everything compared below is the end of a chain of such
sums, and along a chain the n's add up. For the tiny Llamas of these tests (hidden 64, MLP 128, head_dim 32,
vocab 300, 2 layers, <= 70 positions per row, <= 300 completion tokens per batch) one token's forward is
~1,700 terms long (per layer, ~620: RMSNorm 64, q/k/v 64, scores 32, softmax and attention over <= 70
positions, o_proj 64, RMSNorm 64, MLP 64 and 128; then the final norm, the LM head over 64 and the
log-softmax over 300), its backward about as long again, and gradients then add the batch's <= 300 tokens:
n <= 4,096 bounds the whole chain, and

    FP32_REL = 2 * 4096 * u = 4.9e-4

bounds the difference of the two computations relative to the magnitude of the summed terms. That is the
worst case, in which every rounding error has the same sign; the usual random-walk estimate is sqrt(n) u,
~100 times smaller (measured on an AMD EPYC: <= 3e-3 of the gradient tolerance, <= 6e-5 of the scalar one).
The slack is deliberate: it covers the approximate term magnitudes below, and a real bug (a rank's gradient
or token count left out, a wrong normaliser) changes these values by O(1): hundreds to thousands of times
the tolerance.

Magnitudes of the summed terms:
- a gradient tensor: its largest |element| (the per-token terms of an element are of the size of the
  tensor's typical element; their cancellation is what makes some elements small, so the tolerance is
  absolute per tensor: FP32_REL * max |g|, plus FP32_REL relative);
- scalar losses and metrics: TERM_SCALE = 10 bounds |per-token term| here (advantages ~ N(0,1), so |A| < 4
  for these few dozen sequences; probability ratios <= e (log-prob noise ~ 0.3 N(0,1)) or clipped to 1.2,
  times importance weights capped at 2; log-probs and entropies <= log 300 = 5.7 with logits ~ 0.1), and it
  also bounds the relative error exp() passes on (|d exp(x)| / exp(x) = |dx|, |dx| <= FP32_REL * 10).

The optimizer step is NOT well conditioned in its gradient. AdamW's first step moves each weight by
lr * g / (|g| + eps) ~ lr * sign(g): for |g| <~ eps = 1e-8 a rounding difference of 1e-11 in g (a
cancelling sum of terms ~1e-3, far inside the tolerance above) moves the weight by lr * 1e-11 / eps = 1e-6
(issue 15: 1 element of 8,192 off by 2e-6 on an AMD EPYC). So instead of comparing updated weights across
the two computations, RecordingAdamW records every step (weights and state before, the gradient it applies,
weights and state after) and the tests check each step in two well-conditioned halves:
1. the global gradient, before clipping (it carries the loss normalisation) and as applied (after
   clipping by the global norm), equals the other computation's within FP32_REL of its scale
   (assert_steps_equivalent);
2. the recorded update is exactly torch's AdamW on that gradient, replayed in one process on plain tensors
   from the recorded weights and state (adamw_replay): the same elementwise arithmetic, so equal to a few
   ulps (REPLAY_* below), whatever the gradient's conditioning.
"""
from __future__ import annotations

import contextlib

import torch

from tests.kernel_utils import assert_verbose_close

U32 = 2.0 ** -24  # fp32 unit roundoff (torch.finfo(torch.float32).eps / 2)
CHAIN_LEN = 4096  # bound on the summation chain behind any compared value (module docstring)
FP32_REL = 2 * CHAIN_LEN * U32  # 4.9e-4
TERM_SCALE = 10.0  # bound on |per-token term| of the scalar losses and metrics (module docstring)
# Replaying a step: ~10 correctly rounded elementwise ops per element on both sides (foreach on plain tensors
# vs on FSDP shards, vectorised or not, FMA or not: <= 1 ulp apart each). The update term lr * m_hat /
# (sqrt(v_hat) + eps) has |m_hat| / sqrt(v_hat) <= sqrt(sum_k a_k^2 / b_k) = 1.02 for up to 7 steps
# (Cauchy-Schwarz with the bias-corrected exp_avg and exp_avg_sq weights a_k, b_k), so it agrees to
# 16 u * 1.02 lr; the new weight w (1 - lr wd) - update is rounded twice more, 4 u of |w| <= |w_new| + 2 lr:
# REPLAY_RTOL of |w_new| plus 8 u lr. The state (exp_avg, exp_avg_sq: one lerp / multiply-add each, which
# may cancel) agrees to 4 u of the tensor's largest value. Measured here: bit-identical.
REPLAY_RTOL = 4 * U32
REPLAY_UPDATE_ATOL = 32 * U32  # times lr: 16 u * 1.02 + 8 u, rounded up


def assert_scalar_close(got, want, name, scale=TERM_SCALE):
    """A loss or metric: sums of per-token terms of magnitude <= scale, some through exp()."""
    got, want = torch.as_tensor(float(got), dtype=torch.float64), torch.as_tensor(float(want), dtype=torch.float64)
    assert_verbose_close(got, want, FP32_REL * scale, FP32_REL * scale, name)


def assert_grad_close(got, want, name):
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert_verbose_close(got, want, FP32_REL * scale, FP32_REL, name)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class RecordingAdamW(torch.optim.AdamW):
    """torch's AdamW that records every step as full tensors keyed by parameter name: weights and state
    before, the gradient it applies (as clipped by the caller), weights and state after, and, inside
    watching_clip(), the gradient before clipping. Under FSDP2 the record gathers the shards: a collective,
    which every rank runs since every rank steps (and clips). DCP's lr = 0 step that initialises the state
    before loading a state dict is not recorded."""

    def __init__(self, model, **hyper):
        super().__init__(model.parameters(), **hyper)
        self.param_names = {p: n for n, p in model.named_parameters()}
        self.records = []
        self._pre_clip = None

    @contextlib.contextmanager
    def watching_clip(self):
        """While open, fctrain.dist.clip_grad_norm_ (the clipping of fctrain.run and of the tests) first
        records the gradient it is given (the global one: FSDP has summed it), for the next step's record.
        The gradient before clipping carries the normalisation (clipping rescales it away)."""
        from fctrain import dist as fdist

        clip = fdist.clip_grad_norm_

        def recording_clip(model, max_norm):
            self._pre_clip = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            return clip(model, max_norm)

        fdist.clip_grad_norm_ = recording_clip
        try:
            yield self
        finally:
            fdist.clip_grad_norm_ = clip

    def _snapshot(self, params):
        return ({self.param_names[p]: _full(p) for p in params},
                {self.param_names[p]: {k: _full(v) for k, v in self.state[p].items()} for p in params if self.state[p]})

    def step(self, closure=None):
        assert len(self.param_groups) == 1
        group = self.param_groups[0]
        if group["lr"] == 0:
            return super().step(closure)
        params = list(group["params"])
        before, state = self._snapshot(params)
        grads = {self.param_names[p]: _full(p.grad) for p in params if p.grad is not None}
        out = super().step(closure)
        after, state_after = self._snapshot(params)
        self.records.append({"hyper": {k: v for k, v in group.items() if k != "params"}, "before": before,
                             "state": state, "pre_clip": self._pre_clip, "grad": grads, "after": after,
                             "state_after": state_after})
        self._pre_clip = None
        return out


def adamw_replay(record):
    """torch's AdamW step, in one process on plain tensors, from a record's weights, state and gradient:
    (weights after, state after)."""
    params = {n: torch.nn.Parameter(w.clone()) for n, w in record["before"].items()}
    opt = torch.optim.AdamW(list(params.values()))
    opt.param_groups[0].update(record["hyper"])
    for n, p in params.items():
        if n in record["grad"]:
            p.grad = record["grad"][n].clone()
        if n in record["state"]:
            opt.state[p] = {k: v.clone() for k, v in record["state"][n].items()}
    opt.step()
    return ({n: p.detach() for n, p in params.items()},
            {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items() if opt.state[p]})


def assert_replays(record, name):
    """The recorded update is torch's AdamW on the recorded gradient, element for element."""
    weights, state = adamw_replay(record)
    lr = record["hyper"]["lr"]
    assert set(weights) == set(record["after"]) and set(state) == set(record["state_after"]), name
    for key, want in weights.items():
        assert_verbose_close(record["after"][key], want, REPLAY_UPDATE_ATOL * lr, REPLAY_RTOL, f"{name} {key}")
    for key, fields in state.items():
        for field, want in fields.items():
            scale = float(want.abs().max()) if want.numel() else 0.0
            assert_verbose_close(record["state_after"][key][field], want, REPLAY_RTOL * scale, REPLAY_RTOL,
                                 f"{name} {key} {field}")


def assert_steps_equivalent(got, want, name, labels=None):
    """Two runs' recorded optimizer steps (RecordingAdamW.records): as many steps, the same hyperparameters,
    each step's gradient before clipping and as applied equal within fp32 summation error, and each of
    `got`'s updates exactly AdamW's on its own applied gradient."""
    assert len(got) == len(want), f"{name}: {len(got)} optimizer steps, want {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        label = f"{name} step {k}" + (f" ({labels[k]})" if labels else "")
        assert g["hyper"] == w["hyper"], label
        assert (g["pre_clip"] is None) == (w["pre_clip"] is None), f"{label}: clipping watched on one side only"
        for kind in ("pre_clip", "grad"):
            if w[kind] is None:
                continue
            assert set(g[kind]) == set(w[kind]), f"{label}: parameters with a gradient differ"
            for key in w[kind]:
                what = "gradient before clipping" if kind == "pre_clip" else "applied gradient"
                assert_grad_close(g[kind][key], w[kind][key], f"{label} {what} {key}")
        assert_replays(g, label)


def grad_scales(records):
    """Per parameter, the largest |applied gradient| over the recorded steps."""
    scales = {}
    for r in records:
        for key, g in r["grad"].items():
            scales[key] = max(scales.get(key, 0.0), float(g.abs().max()))
    return scales


def assert_adamw_state_close(got, want, scales, name):
    """AdamW state of two runs (name -> exp_avg, exp_avg_sq, step) whose applied gradients agree as
    assert_steps_equivalent checks: |dg| <= FP32_REL (s + |g|) <= 2 FP32_REL s, s the gradient's scale
    (grad_scales). exp_avg = sum_k a_k g_k and exp_avg_sq = sum_k b_k g_k^2 with sum a_k, sum b_k <= 1, so
    they differ by at most 2 FP32_REL s and 2 s * 2 FP32_REL s; the step count is exact."""
    assert set(got) == set(want), f"{name}: parameter names differ: {set(got) ^ set(want)}"
    for key in want:
        s = scales[key]
        assert_verbose_close(got[key]["exp_avg"], want[key]["exp_avg"], 2 * FP32_REL * s, 0, f"{name} {key} exp_avg")
        assert_verbose_close(got[key]["exp_avg_sq"], want[key]["exp_avg_sq"], 4 * FP32_REL * s * s, 0,
                             f"{name} {key} exp_avg_sq")
        assert torch.equal(got[key]["step"], want[key]["step"]), f"{name} {key} step"


def assert_state_equal(got, want, name):
    """Optimizer states (name or index -> field -> tensor) bit for bit: a round trip through a checkpoint."""
    assert set(got) == set(want), f"{name}: parameters differ: {set(got) ^ set(want)}"
    for key in want:
        assert set(got[key]) == set(want[key]), f"{name} {key}: fields differ"
        for field, w in want[key].items():
            assert torch.equal(torch.as_tensor(got[key][field]), torch.as_tensor(w)), f"{name} {key} {field}"
