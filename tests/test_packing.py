"""Packed and shared-prompt micro-batches give the log-probs, loss and gradients of one sequence per row."""
import copy
import math

import pytest
import torch

import kernels
from fctrain import packing, run
from fctrain.config import Config
from fctrain.packing import Seq
from tests.equivalence import FP32_REL, TERM_SCALE, RecordingAdamW, assert_scalar_close, assert_steps_equivalent
from tests.kernel_utils import assert_verbose_close


def _random_seqs(g, n_groups, vocab=300, group_size=3, max_prompt=40, max_comp=25):
    seqs = []
    for grp in range(n_groups):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, max_prompt, (1,), generator=g)),), generator=g).tolist()
        for _ in range(group_size):
            n = int(torch.randint(1, max_comp, (1,), generator=g))
            seqs.append(Seq(prompt, torch.randint(0, vocab, (n,), generator=g).tolist(), grp))
    return seqs


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_plan_respects_the_budget_and_places_every_sequence_once(layout):
    g = torch.Generator().manual_seed(1)
    for trial in range(60):
        seqs = _random_seqs(g, int(torch.randint(1, 12, (1,), generator=g)), group_size=int(
            torch.randint(1, 6, (1,), generator=g)), max_prompt=200, max_comp=120)
        budget = 320 + int(torch.randint(0, 1500, (1,), generator=g))
        plan = packing.plan(seqs, budget, layout)
        placed = sorted(i for mb in plan for unit in mb for i in unit)
        assert placed == list(range(len(seqs))), f"trial {trial}: a sequence was dropped or duplicated"
        for mb_units in plan:
            mb = packing.build(seqs, mb_units, layout)
            assert mb.num_tokens <= budget, (trial, layout, mb.num_tokens, budget)
            assert len(mb.targets) == sum(len(seqs[i].completion) for i in mb.seqs)
            if layout != "shared":
                assert all(len(u) == 1 for u in mb_units)


def test_shared_layout_stores_each_prompt_once():
    p = list(range(10))
    seqs = [Seq(p, [1, 2, 3], 0), Seq(p, [4, 5], 0), Seq(p, [6], 0), Seq([7, 8], [9], 1)]
    mb = packing.build(seqs, packing.plan(seqs, 64, "shared")[0], "shared")
    assert (mb.attention_mask.sum(-1) > 0).all()  # every position (padding too) attends to something
    assert packing.build(seqs, packing.plan(seqs, 64, "packed")[0], "packed").num_tokens == 13 + 12 + 11 + 3
    assert mb.input_ids.shape == (2, 16)  # one row per prompt, padded to the longest


def test_bad_batches_fail_clearly():
    with pytest.raises(ValueError, match="over the micro-batch budget"):
        packing.plan([Seq([1] * 50, [2] * 20)], 64, "packed")
    with pytest.raises(ValueError, match="empty completion"):
        packing.plan([Seq([1, 2], [])], 64, "packed")
    with pytest.raises(ValueError, match="identical prompts"):
        packing.plan([Seq([1, 2], [3], 0), Seq([1, 5], [3], 0)], 64, "shared")
    seqs = [Seq([1, 2], [3], 0), Seq([1, 2], [4], 0)]
    with pytest.raises(ValueError, match="varlen"):
        packing.build(seqs, packing.plan(seqs, 64, "shared")[0], "shared", varlen=True)
    with pytest.raises(ValueError, match="layout must be"):
        packing.plan(seqs, 64, "ragged")
    with pytest.raises(ValueError, match="flash_attention_2 cannot share"):
        Config(attn_impl="flash_attention_2", packing="shared")


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _reference_logps(model, seqs, temperature):
    """float64 per-token log-probs of each completion, each sequence alone through the full model."""
    out = []
    for s in seqs:
        ids = torch.tensor([s.prompt + s.completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(s.prompt) - 1:-1].double() / temperature
        out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(s.completion)[:, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_layouts_give_the_log_probs_of_one_sequence_per_row(llama, layout):
    g = torch.Generator().manual_seed(2)
    seqs = _random_seqs(g, 5)
    ref = _reference_logps(llama, seqs, 0.7)
    got = torch.zeros_like(ref)
    offsets = torch.tensor([0] + [len(s.completion) for s in seqs]).cumsum(0)
    w = llama.get_output_embeddings().weight
    plan = packing.plan(seqs, 140, layout)
    assert len(plan) > 1  # several micro-batches
    for units in plan:
        mb = packing.build(seqs, units, layout)
        with torch.no_grad():
            lp, _ = kernels.fused_linear_logprob_entropy(packing.hidden_rows(llama, mb), w, mb.targets, 0.7)
        at = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in mb.seqs])
        got[at] = lp.double()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_train_on_rollouts_is_layout_independent(llama):
    """One full RL update (EGPO, KL to a reference, rollout IS weight) per layout: same loss, metrics,
    advantages and update as the padded one-sequence-per-row layout, within fp32 summation error. The update
    is checked in its well-conditioned halves (tests/equivalence.py): the same gradient, and AdamW's step on
    it; the updated weights themselves can differ by up to lr * (gradient rounding) / eps where |g| ~ eps."""
    g = torch.Generator().manual_seed(3)
    seqs = _random_seqs(g, 4)
    adv = torch.randn(len(seqs), generator=g)
    rollout = [(-torch.rand(len(s.completion), generator=g) * 3).tolist() for s in seqs]
    thinks = [(torch.rand(len(s.completion), generator=g) < 0.6).tolist() for s in seqs]
    cfg = Config(micro_batch_tokens=150, max_prompt_tokens=40, max_new_tokens=30, beta=0.04,
                 temperature=0.7, lr=1e-3, grad_clip=1e9)
    ref_model = copy.deepcopy(llama)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    results = {}
    for layout in packing.LAYOUTS:
        model = copy.deepcopy(llama).train()
        opt = RecordingAdamW(model, lr=1e-3)
        with opt.watching_clip():
            res = run.train_on_rollouts(cfg, model, ref_model, opt, 1e-3, seqs, adv, rollout, thinks, layout, False,
                                        "cpu")
        results[layout] = (res, opt.records)
    base_res, base_steps = results["padded"]
    assert base_res.stats["nan_loss"] == 0 and base_res.stats["kl"] > 0
    assert not torch.isnan(base_res.think_entropy).any()
    assert len(base_steps) == 1
    for layout in ("packed", "shared"):
        res, steps = results[layout]
        for key in ("loss", "kl", "entropy", "clip_low", "clip_high", "is_mean", "grad_norm"):
            assert_scalar_close(res.stats[key], base_res.stats[key], f"{layout} {key}")
        for key in ("adv", "think_entropy"):  # per-token entropies (<= log 300) averaged; A + 0.4 * clip(H)
            assert_verbose_close(getattr(res, key), getattr(base_res, key), FP32_REL * TERM_SCALE, FP32_REL * TERM_SCALE,
                                 f"{layout} {key}")
        assert_steps_equivalent(steps, base_steps, f"{layout} vs padded")
    # The shared layout computes fewer tokens than packing, which computes fewer than padding.
    tokens = {layout: results[layout][0].stats["computed_tokens"] for layout in packing.LAYOUTS}
    assert tokens["shared"] < tokens["packed"] < tokens["padded"], tokens


def test_gradients_match_float64_reference(llama):
    """Packed-shared gradients of a simple objective vs the same objective in float64, one row per sequence."""
    g = torch.Generator().manual_seed(4)
    seqs = _random_seqs(g, 3)
    coef = torch.randn(sum(len(s.completion) for s in seqs), generator=g, dtype=torch.float64)
    m64 = copy.deepcopy(llama).double()
    lp = []
    for s in seqs:
        logits = m64(torch.tensor([s.prompt + s.completion])).logits[0, len(s.prompt) - 1:-1]
        lp.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(s.completion)[:, None])[:, 0])
    (torch.cat(lp) * coef).sum().backward()
    m32 = copy.deepcopy(llama)
    mb = packing.build(seqs, packing.plan(seqs, 4096, "shared")[0], "shared")
    logp, _ = kernels.fused_linear_logprob_entropy(packing.hidden_rows(m32, mb), m32.get_output_embeddings().weight,
                                                   mb.targets)
    offsets = torch.tensor([0] + [len(s.completion) for s in seqs]).cumsum(0)
    order = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in mb.seqs])
    (logp * coef[order].float()).sum().backward()
    for (name, p64), p32 in zip(m64.named_parameters(), m32.parameters()):
        scale = p64.grad.abs().max().item() + 1e-12
        assert (p32.grad.double() - p64.grad).abs().max().item() / scale < 1e-4, name


def _two_pass_update(cfg, model, optimizer, seqs, adv, rollout, thinks):
    """The RL update as run.py made it before the loss was split into its two layers: a separate no-grad
    LM-head pass for the old log-probs (and EGPO's entropy), then fused_linear_grpo_loss."""
    config = kernels.GRPOLossConfig(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=0.0, entropy_coef=cfg.entropy_coef,
                                    rollout_is_cap=cfg.rollout_is_cap, loss_agg=cfg.loss_agg, max_len=cfg.max_new_tokens)
    batches = [packing.build(seqs, units, "packed") for units in packing.plan(seqs, cfg.micro_batch_tokens, "packed")]
    final_adv, n_total, old = adv.clone(), sum(len(s.completion) for s in seqs), {}
    for update in range(cfg.updates_per_batch):
        for k, mb in enumerate(batches):
            h = packing.hidden_rows(model, mb)
            w = model.get_output_embeddings().weight
            if update == 0:
                with torch.no_grad():
                    old[k], ent = kernels.fused_linear_logprob_entropy(h.detach(), w, mb.targets,
                                                                       temperature=cfg.temperature)
                think = packing.per_token(thinks, mb, torch.bool)
                n_think = torch.zeros(len(mb.seqs)).index_add_(0, mb.seq_ids, think.float())
                h_seq = torch.zeros(len(mb.seqs)).index_add_(0, mb.seq_ids, ent * think) / n_think.clamp(min=1)
                final_adv[mb.seqs] = run.egpo_advantages(adv[mb.seqs], h_seq, cfg.egpo_lambda, cfg.egpo_alpha)
            loss, _ = kernels.fused_linear_grpo_loss(h, w, mb.targets, final_adv[mb.seqs],
                                                     torch.ones_like(mb.targets, dtype=torch.bool), old_logp=old[k],
                                                     rollout_logp=packing.per_token(rollout, mb), seq_ids=mb.seq_ids,
                                                     config=config, temperature=cfg.temperature)
            (loss * (len(mb.targets) / n_total)).backward()  # run.py's share of the global token mean
        run.clip_and_step(cfg, model, optimizer, cfg.lr)


@pytest.mark.parametrize("updates_per_batch", [1, 2])
def test_one_lm_head_pass_per_micro_batch_gives_the_two_pass_update(llama, monkeypatch, updates_per_batch):
    """train_on_rollouts takes the old log-probs from its own loss pass (the policy has not moved before the
    first optimizer step): one LM-head pass per micro-batch and update instead of an extra no-grad one at the
    first update, and bit for bit the weights of the two-pass update."""
    g = torch.Generator().manual_seed(5)
    seqs = _random_seqs(g, 3)
    adv = torch.randn(len(seqs), generator=g)
    rollout = [(-torch.rand(len(s.completion), generator=g) * 3).tolist() for s in seqs]
    thinks = [(torch.rand(len(s.completion), generator=g) < 0.6).tolist() for s in seqs]
    cfg = Config(micro_batch_tokens=150, max_prompt_tokens=40, max_new_tokens=30, temperature=0.7, lr=1e-3,
                 entropy_coef=0.01, updates_per_batch=updates_per_batch, impl="torch")
    calls = []
    fused = kernels.fused_linear_logprob_entropy
    monkeypatch.setattr(kernels, "fused_linear_logprob_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = copy.deepcopy(llama).train()
    res = run.train_on_rollouts(cfg, model, None, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.lr, seqs, adv,
                                rollout, thinks, "packed", False, "cpu")
    n_micro_batches = len(packing.plan(seqs, cfg.micro_batch_tokens, "packed"))
    assert n_micro_batches > 1 and len(calls) == n_micro_batches * updates_per_batch
    assert res.stats["nan_loss"] == 0 and math.isfinite(res.stats["grad_norm"])
    monkeypatch.undo()
    want = copy.deepcopy(llama).train()
    _two_pass_update(cfg, want, torch.optim.SGD(want.parameters(), lr=cfg.lr), seqs, adv, rollout, thinks)
    changed = 0
    for (name, p), q in zip(model.named_parameters(), want.parameters()):
        assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max().item():.3g}"
        changed += not torch.equal(p, llama.get_parameter(name))
    assert changed > 0


def test_grpo_reports_the_think_entropy_and_trains_as_without_it(llama):
    """GRPO measures each completion's think entropy (what EGPO would add) without using it: the same weights as
    a GRPO update that was handed no think masks, bit for bit, EGPO's think entropies, and its advantages
    unchanged; EGPO on the same batch moves them by lambda * clip(H)."""
    g = torch.Generator().manual_seed(6)
    seqs = _random_seqs(g, 3)
    adv = torch.randn(len(seqs), generator=g)
    rollout = [(-torch.rand(len(s.completion), generator=g) * 3).tolist() for s in seqs]
    thinks = [(torch.rand(len(s.completion), generator=g) < 0.6).tolist() for s in seqs]
    thinks[0] = [False] * len(thinks[0])  # a completion without a think: no entropy, no term
    out = {}
    for algo, masks in (("grpo", thinks), ("grpo", None), ("egpo", thinks)):
        cfg = Config(micro_batch_tokens=150, max_prompt_tokens=40, max_new_tokens=30, temperature=0.7, lr=1e-3,
                     algo=algo, impl="torch")
        model = copy.deepcopy(llama).train()
        res = run.train_on_rollouts(cfg, model, None, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.lr, seqs,
                                    adv, rollout, masks, "packed", False, "cpu")
        out[algo, masks is not None] = res, model
    (grpo, grpo_model), (bare, bare_model), (egpo, _) = out["grpo", True], out["grpo", False], out["egpo", True]
    assert torch.equal(grpo.adv, adv) and torch.equal(bare.adv, adv)
    for p, q in zip(grpo_model.parameters(), bare_model.parameters()):
        assert torch.equal(p, q)
    assert bare.think_entropy.isnan().all()
    assert grpo.think_entropy[0].isnan() and (grpo.think_entropy[1:] > 0).all()
    torch.testing.assert_close(grpo.think_entropy, egpo.think_entropy, equal_nan=True, rtol=0, atol=0)
    # EGPO's term on the H GRPO reported (a completion without a think: H = 0); the formula: test_run
    assert torch.equal(egpo.adv, run.egpo_advantages(adv, grpo.think_entropy.nan_to_num(0.0)))
    assert not torch.equal(egpo.adv, adv)
