"""fctrain.dist on 2 gloo ranks (spawned here, torchrun-style env): FSDP2 data parallel == one process.

A tiny random Llama (hidden 64, 2 layers, vocab 300, head_dim 32, tied embeddings), a GRPO step through the
fused loss (torch path) with the loss normalised by the all-reduced token count and the gradient clipped by
the global norm; the 2-rank step must equal the single-process step on all sequences (loss, pre-clip grad
norm, the gradient before and after clipping, and AdamW's update of it: see tests/equivalence.py for why the
updated weights are not compared across the two directly). Then checkpoints go 2 ranks -> 1 process -> 2 ranks
with the optimizer state.
Last, fctrain.run's own training functions (train_on_rollouts, sft_loss_backward + clip_and_step,
save_checkpoint / load_optimizer_state) on 2 ranks, each with its share of the sequences, against one
process on all of them.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import kernels
from fctrain import dist as fdist
from fctrain import packing
from tests.equivalence import (FP32_REL, TERM_SCALE, RecordingAdamW, assert_adamw_state_close, assert_scalar_close,
                               assert_state_equal, assert_steps_equivalent, grad_scales)
from tests.kernel_utils import assert_verbose_close

WORLD = 2
VOCAB, TEMPERATURE, LR, CLIP = 300, 0.7, 1e-3, 0.05
# micro-batches (indices into the batch): one process vs each rank's share; rank 0 runs one micro-batch
# more than rank 1, whose extra FSDP collectives come from fdist.dummy_backward
SINGLE_MBS = [[0, 1, 2], [3, 4, 5]]
RANK_MBS = {0: [[0], [1, 2]], 1: [[3, 4, 5]]}


def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def make_optimizer(model):
    """AdamW that records every step (tests/equivalence.py): the tests check the steps, not the weights."""
    return RecordingAdamW(model, lr=LR, betas=(0.9, 0.99), weight_decay=0.01, foreach=True)


def make_batch(seed, n=6):
    """Sequences (token ids, completion start, advantage, per-token noise added to the old log-probs)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        length = int(torch.randint(6, 15, (1,), generator=g))
        start = int(torch.randint(2, 5, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        batch.append((ids, start, float(torch.randn((), generator=g)), torch.randn(length, generator=g) * 0.3))
    return batch


def pad(seqs):
    t = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros(len(seqs), t - 1, dtype=torch.bool)
    noise = torch.zeros(len(seqs), t - 1)
    for b, (s, start, _, nz) in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        attn[b, :len(s)] = 1
        comp[b, start - 1:len(s) - 1] = True
        noise[b, :len(s) - 1] = nz[:len(s) - 1]
    adv = torch.tensor([s[2] for s in seqs])
    return ids, attn, ids[:, 1:], comp, adv, noise


def train_step(model, optimizer, batch, micro_batches):
    """The data-parallel pattern run.py follows: global token count, same micro-batch count on every rank,
    loss per rank = sum over its tokens / global count, gradients summed by FSDP, global-norm clipping."""
    n_tokens = sum(len(batch[i][0]) - batch[i][1] for mb in micro_batches for i in mb)
    n_global = fdist.all_reduce_sum(n_tokens)
    n_steps = fdist.all_reduce_max(len(micro_batches))
    loss_sum = torch.zeros(())
    for mb in micro_batches:
        ids, attn, targets, comp, adv, noise = pad([batch[i] for i in mb])
        h, weight = fdist.forward_hidden(model, input_ids=ids, attention_mask=attn)
        h = h[:, :-1]  # positions that predict a next token
        with torch.no_grad():  # "old" policy log-probs: this forward's, perturbed so that ratios clip
            old_lp, _ = kernels.fused_linear_logprob_entropy(h.detach()[comp], weight.detach(), targets[comp],
                                                             temperature=TEMPERATURE, impl="torch")
        old = torch.zeros(comp.shape)
        old[comp] = old_lp + noise[comp]
        loss, _ = kernels.fused_linear_grpo_loss(h, weight, targets, adv, comp, old_logp=old,
                                                 config=kernels.GRPOLossConfig(entropy_coef=0.01),
                                                 temperature=TEMPERATURE, impl="torch")
        loss = loss * int(comp.sum()) / n_global
        loss.backward()
        loss_sum += loss.detach()
    for _ in range(n_steps - len(micro_batches)):
        fdist.dummy_backward(model, "cpu")
    with optimizer.watching_clip():
        grad_norm = fdist.clip_grad_norm_(model, CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return fdist.all_reduce_sum(loss_sum), grad_norm


def full_weights(model):
    return {name: t.clone() for name, t in fdist.full_parameters(model)}


def _worker(rank, port, out, phase):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = fdist.init()
    assert ctx.world_size == WORLD and ctx.rank == rank and ctx.device == "cpu"
    result = {}
    try:
        if phase == 1:  # same init as the single process; one step; save model + optimizer
            model = fdist.shard_model(tiny_llama(seed=0))
            optimizer = make_optimizer(model)
            result["loss"], result["grad_norm"] = train_step(model, optimizer, make_batch(1), RANK_MBS[rank])
            result["records"] = optimizer.records
            result["weights"] = full_weights(model)
            result["gathered"] = fdist.all_gather_list(fdist.split_for_rank(list("abcde"), rank, WORLD))
            fdist.save_pretrained(model, os.path.join(out, "ckpt-a"))
            optim_state = fdist.optimizer_state_dict(model, optimizer)
            if rank == 0:
                torch.save(optim_state, os.path.join(out, "ckpt-a", "optimizer.pt"))
            # bf16 mixed precision: bf16 compute on gathered copies, fp32 master shards and reductions
            model = fdist.shard_model(tiny_llama(seed=0), bf16=True)
            ids = torch.tensor([[1, 2, 3]])
            h, weight = fdist.forward_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))
            result["bf16_dtypes"] = (h.dtype, weight.dtype)
            (h.float().sum() * 0).backward()  # completes FSDP's backward before the next forward
            optimizer = make_optimizer(model)
            result["bf16_loss"], result["bf16_grad_norm"] = train_step(model, optimizer, make_batch(1), RANK_MBS[rank])
            result["bf16_master_dtypes"] = {p.dtype for p in model.parameters()}
        elif phase == 3:  # fctrain.run's functions on this rank's share; see run_pieces
            result = run_pieces(out, rank)
        else:  # a DIFFERENT random init, then the single-process checkpoint loaded over it; one more step
            model = fdist.shard_model(tiny_llama(seed=123))
            fdist.load_pretrained_weights(model, os.path.join(out, "ckpt-b"))
            result["loaded"] = full_weights(model)
            optimizer = make_optimizer(model)
            state = torch.load(os.path.join(out, "ckpt-b", "optimizer.pt")) if rank == 0 else {}
            fdist.load_optimizer_state_dict(model, optimizer, state)
            result["loss"], result["grad_norm"] = train_step(model, optimizer, make_batch(3), RANK_MBS[rank])
            result["records"] = optimizer.records
    finally:
        torch.save(result, os.path.join(out, f"phase{phase}-rank{rank}.pt"))
        torch.distributed.barrier()  # no rank tears gloo down while its peer still talks to it
        fdist.shutdown()


def spawn(out, phase):
    with socket.socket() as s:  # a free port for the rendezvous (MASTER_PORT)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out), phase), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"phase{phase}-rank{r}.pt")) for r in range(WORLD)]


def assert_weights_close(got, want, atol, name):
    assert set(got) == set(want), f"{name}: parameter names differ: {set(got) ^ set(want)}"
    for key in want:
        assert_verbose_close(got[key], want[key], atol=atol, rtol=0, name=f"{name} {key}")


def test_two_ranks_equal_one_process_and_checkpoints_cross_world_sizes(tmp_path):
    from transformers import AutoModelForCausalLM

    # one process, all sequences
    single = tiny_llama(seed=0)
    single_opt = make_optimizer(single)
    loss1, norm1 = train_step(single, single_opt, make_batch(1), SINGLE_MBS)
    assert float(norm1) > CLIP, "the test must exercise clipping"

    ranks = spawn(tmp_path, phase=1)
    for r in ranks:  # every rank reports the global loss and norm
        assert_scalar_close(r["loss"], loss1, "loss")
        assert_scalar_close(r["grad_norm"], norm1, "grad norm (pre-clip, global)")
    # the step: from the same weights, the same gradient before and after clipping (within fp32 summation
    # error) and AdamW's update of it; not the updated weights, ill-conditioned in the gradient where |g| ~ eps
    # (tests/equivalence.py)
    assert_weights_close(ranks[0]["records"][0]["before"], full_weights(tiny_llama(seed=0)), 0, "2-rank start")
    assert_steps_equivalent(ranks[0]["records"], single_opt.records, "2-rank step")
    assert_weights_close(ranks[0]["weights"], ranks[0]["records"][-1]["after"], 0, "2-rank weights")
    assert_weights_close(ranks[1]["weights"], ranks[0]["weights"], 0, "ranks' gathered weights")
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == list("abcde")
    assert ranks[0]["bf16_dtypes"] == (torch.bfloat16, torch.bfloat16)
    assert ranks[0]["bf16_master_dtypes"] == {torch.float32}
    assert_verbose_close(ranks[0]["bf16_loss"], loss1, 2e-3, 5e-2, "bf16 mixed-precision loss vs fp32")
    assert_verbose_close(ranks[0]["bf16_grad_norm"], norm1, 0, 5e-2, "bf16 mixed-precision grad norm vs fp32")

    # 2 ranks -> 1 process: transformers loads the gathered checkpoint; the optimizer state carries over
    ckpt_a = tmp_path / "ckpt-a"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt_a, dtype=torch.float32)
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    assert_weights_close(full_weights(loaded), ranks[0]["weights"], 0, "from_pretrained(2-rank checkpoint)")
    loaded_opt = make_optimizer(loaded)
    saved = torch.load(ckpt_a / "optimizer.pt")
    fdist.load_optimizer_state_dict(loaded, loaded_opt, saved)
    assert_state_equal(fdist.optimizer_state_dict(loaded, loaded_opt)["state"], saved["state"],
                       "2-rank optimizer state loaded in one process")
    assert_adamw_state_close(saved["state"], fdist.optimizer_state_dict(single, single_opt)["state"],
                             grad_scales(single_opt.records), "2-rank vs 1-process optimizer state")
    train_step(loaded, loaded_opt, make_batch(2), SINGLE_MBS)
    fdist.save_pretrained(loaded, tmp_path / "ckpt-b")
    torch.save(fdist.optimizer_state_dict(loaded, loaded_opt), tmp_path / "ckpt-b" / "optimizer.pt")

    # 1 process -> 2 ranks: load into a differently initialised sharded model, then one step both ways
    ranks = spawn(tmp_path, phase=2)
    assert_weights_close(ranks[0]["loaded"], full_weights(loaded), 0, "2 ranks load the 1-process checkpoint")
    state_before = fdist.optimizer_state_dict(loaded, loaded_opt)["state"]
    assert_state_equal(ranks[0]["records"][0]["state"], state_before, "2 ranks load the 1-process optimizer state")
    loss3, norm3 = train_step(loaded, loaded_opt, make_batch(3), SINGLE_MBS)
    assert_scalar_close(ranks[0]["loss"], loss3, "loss after the round trip")
    assert_scalar_close(ranks[0]["grad_norm"], norm3, "grad norm after the round trip")
    assert_steps_equivalent(ranks[0]["records"], loaded_opt.records[-1:], "step after the round trip")


def test_forward_hidden_is_the_decoder_output_and_computes_no_logits():
    model = tiny_llama(seed=0)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 5:] = 0
    position_ids = torch.arange(7).expand(2, 7)
    h, weight = fdist.forward_hidden(model, input_ids=ids, attention_mask=attn, position_ids=position_ids)
    want = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=position_ids).last_hidden_state
    assert torch.equal(h, want) and weight is model.lm_head.weight


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_hidden_rows_is_bit_identical_to_the_decoder_call(layout):
    """packing.hidden_rows goes through forward_hidden (the root module); unsharded it must give exactly the
    decoder's output at the rows, for 2-D padding masks, packed and shared 4-D masks."""
    model = tiny_llama(seed=0)
    seqs = [seq for _, members in rl_groups(5, 3) for seq in members]
    for units in packing.plan([s for s, *_ in seqs], 40, layout):
        mb = packing.build([s for s, *_ in seqs], units, layout)
        got = packing.hidden_rows(model, mb)
        h = model.get_decoder()(input_ids=mb.input_ids, position_ids=mb.position_ids,
                                attention_mask=mb.attention_mask).last_hidden_state
        assert torch.equal(got, h.reshape(-1, h.shape[-1]).index_select(0, mb.rows))


def test_split_for_rank_and_single_process_context():
    items = list(range(7))
    shares = [fdist.split_for_rank(items, r, 3) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert sum(shares, []) == items
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        ctx = fdist.init()
    finally:
        os.environ.update(env)
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert fdist.all_reduce_sum(5) == 5
    with pytest.raises(RuntimeError, match="torchrun"):
        fdist.shard_model(tiny_llama(seed=0))


# ------------------------------------------------------------------------------- fctrain.run on 2 ranks

GROUP = 2  # completions per prompt


def rl_groups(seed, n_groups):
    """Prompt groups: (prompt, [(Seq, advantage, rollout log-probs, <think> mask) per completion])."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    groups = []
    for k in range(n_groups):
        prompt = torch.randint(0, VOCAB, (rand(3, 7),), generator=g).tolist()
        members = []
        for _ in range(GROUP):
            n = rand(2, 8)
            members.append((packing.Seq(prompt, torch.randint(0, VOCAB, (n,), generator=g).tolist(), k),
                            float(torch.randn((), generator=g)), (-3 * torch.rand(n, generator=g)).tolist(),
                            (torch.rand(n, generator=g) < 0.5).tolist()))
        groups.append((prompt, members))
    return groups


def sft_seqs(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [packing.Seq(torch.randint(0, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist(),
                        torch.randint(0, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


# (name, config overrides, layout, data seed, which groups each rank gets: None = fdist.split_for_rank)
RL_SCENARIOS = [
    # EGPO think entropy, a reference model, two passes over the batch; rank 1 has one micro-batch less
    ("egpo-ref", dict(beta=0.05, updates_per_batch=2), "shared", 11, None),
    ("seq-mean", dict(loss_agg="seq-mean-token-mean", algo="grpo", entropy_coef=0.01), "padded", 12, None),
    ("rank1-empty", dict(beta=0.05), "packed", 13, {0: [0, 1, 2], 1: []}),  # rank 1 trains nothing
    ("nan", dict(beta=0.05), "shared", 14, None),  # a NaN advantage in rank 1's group: skipped everywhere
    # --decision_anchor beside the RL loss; its 6 prompts split 5 | 1, so rank 1 runs dummy passes (forward-only
    # ones in the pass that finds the mean shift, a zero-loss backward in the gradient pass)
    ("anchor", dict(beta=0.05, decision_anchor=2.0), "padded", 16, None),
    # --decision_project: the offset's gradient over the same uneven prompt shares, the step, then the correction
    # on each rank's shards (dots all-reduced); the next scenario's gradients start from the corrected weights
    ("project", dict(decision_project=True), "padded", 17, None),
]
ANCHOR_SHARES = {0: [0, 1, 2, 3, 4], 1: [5]}
DECISION_IDS = ([3, 5], [7, 11, 13])  # (no-call, call) token ids of the toy vocabulary


def anchor_seqs(seed, n):
    """Prompts followed by one placeholder token: the decision row of each (run.decision_anchor_seqs' form)."""
    return [packing.Seq(s.prompt, s.completion[:1]) for s in sft_seqs(seed, n)]


class _NoTokenizer:
    def save_pretrained(self, directory):
        pass


def run_pieces(out, rank=None):
    """The scenarios above, then an SFT step, then a checkpoint, through fctrain.run's functions on one
    model and optimizer; rank None = one process on all sequences, else this rank's share (FSDP2)."""
    import dataclasses

    from fctrain import checkpoint, run
    from fctrain.config import Config

    model, ref = tiny_llama(seed=0), tiny_llama(seed=7).eval().requires_grad_(False)
    if rank is not None:
        fdist.shard_model(model)
        fdist.shard_model(ref)
    optimizer = make_optimizer(model)
    base = Config(group_size=GROUP, max_prompt_tokens=8, max_new_tokens=8, micro_batch_tokens=24,
                      temperature=0.7, grad_clip=CLIP, impl="torch", beta=0.0, rollout_is_cap=2.0)
    result = {}
    with optimizer.watching_clip():  # the gradients before clipping are recorded too
        for name, overrides, layout, seed, shares in RL_SCENARIOS:
            cfg = dataclasses.replace(base, **overrides)
            groups = rl_groups(seed, 3)
            if name == "nan":
                prompt, members = groups[2]
                groups[2] = (prompt, [(members[0][0], float("nan"), *members[0][2:]), *members[1:]])
            if rank is not None:
                picks = shares[rank] if shares else fdist.split_for_rank(list(range(len(groups))), rank, WORLD)
                groups = [groups[i] for i in picks]
            members = [m for _, ms in groups for m in ms]
            thinks = [m[3] for m in members] if cfg.algo == "egpo" else None
            decision = None
            if cfg.decision_anchor or cfg.decision_project:
                aseqs = anchor_seqs(seed, 6)
                decision = ([aseqs[i] for i in ANCHOR_SHARES[rank]] if rank is not None else aseqs, *DECISION_IDS)
            res = run.train_on_rollouts(cfg, model, ref if cfg.beta > 0 else None, optimizer, LR,
                                        [m[0] for m in members], torch.tensor([m[1] for m in members]),
                                        [m[2] for m in members], thinks, layout, False, "cpu",
                                        anchor=decision if cfg.decision_anchor else None,
                                        project=decision if cfg.decision_project else None)
            result[name] = {"stats": res.stats, "adv": res.adv, "weights": full_weights(model),
                            "steps": len(optimizer.records)}
        seqs = sft_seqs(15, 5)
        if rank is not None:
            seqs = fdist.split_for_rank(seqs, rank, WORLD)  # 3 | 2 sequences
        loss = run.sft_loss_backward(base, model, seqs, "padded", False, "cpu")
        result["sft"] = {"loss": loss, "grad_norm": run.clip_and_step(base, model, optimizer, LR),
                         "weights": full_weights(model)}
    # checkpoint: torch's optimizer format from one process, name-keyed from 2 ranks
    ckpt = checkpoint.save_checkpoint(base, Path(out) / ("single" if rank is None else "ranks"), 1, model,
                                      _NoTokenizer(), optimizer, {"epoch": 0, "pos": 0}, [])
    result["optimizer"] = fdist.optimizer_state_dict(model, optimizer)
    result["records"] = optimizer.records
    if rank is not None:  # the single process's checkpoint (saved before the spawn) into fresh shards
        single = Path(out) / "single" / ckpt.name
        fresh = fdist.shard_model(tiny_llama(seed=123))
        fdist.load_pretrained_weights(fresh, single)
        fresh_optimizer = make_optimizer(fresh)
        state = torch.load(single / "trainer_state.pt", weights_only=False) if rank == 0 else {}
        checkpoint.load_optimizer_state(fresh, fresh_optimizer, state.get("optimizer", {}))
        result["loaded_single"] = {"weights": full_weights(fresh),
                                   "optimizer": fdist.optimizer_state_dict(fresh, fresh_optimizer)}
    return result


def test_run_training_functions_on_two_ranks_equal_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from fctrain import checkpoint

    single = run_pieces(tmp_path)
    ranks = spawn(tmp_path, phase=3)

    # the shares give the ranks different micro-batch counts, so dummy passes run (with a reference model too)
    def n_micro_batches(seqs, layout):
        return len(packing.plan(seqs, 24, layout))

    egpo = [[m[0] for g in fdist.split_for_rank(rl_groups(11, 3), r, WORLD) for m in g[1]] for r in range(WORLD)]
    assert n_micro_batches(egpo[0], "shared") > n_micro_batches(egpo[1], "shared")
    sft = [fdist.split_for_rank(sft_seqs(15, 5), r, WORLD) for r in range(WORLD)]
    anchors = [[anchor_seqs(16, 6)[i] for i in ANCHOR_SHARES[r]] for r in range(WORLD)]
    assert n_micro_batches(anchors[0], "padded") > n_micro_batches(anchors[1], "padded")
    assert abs(single["anchor"]["stats"]["decision_shift"]) > 1e-3, "the policy and reference must differ"
    # the move removed, g . Δθ: g a sum of fp32 terms, Δθ AdamW's step of gradients that agree within fp32 summation
    # error (|m_hat| / sqrt(v_hat) <= 1.02 per element, tests/equivalence.py), so it agrees to FP32_REL of itself;
    # the move left is the fp32 rounding of the corrected weights, 2 u sum |g| |θ|, far below FP32_REL of the
    # move at this lr
    want = single["project"]["stats"]
    assert abs(want["decision_move"]) > 0 and abs(want["decision_move_left"]) < FP32_REL * abs(want["decision_move"])
    for rank, got in enumerate(ranks):
        got = got["project"]["stats"]
        assert_verbose_close(torch.tensor(got["decision_move"]), torch.tensor(want["decision_move"]),
                             FP32_REL * abs(want["decision_move"]), 0, f"project rank {rank} move")
        assert abs(got["decision_move_left"]) < FP32_REL * abs(want["decision_move"]), rank
    assert n_micro_batches(sft[0], "padded") > n_micro_batches(sft[1], "padded")

    for name, _, _, _, shares in RL_SCENARIOS:
        want = single[name]
        if name == "nan":
            assert want["stats"]["nan_loss"] == 1 and math.isnan(want["stats"]["grad_norm"])
            for run_name, res in [("1 process", single), *((f"rank {r}", got) for r, got in enumerate(ranks))]:
                assert_weights_close(res["nan"]["weights"], res["rank1-empty"]["weights"], 0,
                                     f"{run_name}: a skipped update")
                assert res["nan"]["steps"] == res["rank1-empty"]["steps"], f"{run_name}: a skipped update"
        elif name == "egpo-ref":
            assert want["stats"]["grad_norm"] > CLIP, "the test must exercise clipping"
        for rank, got in enumerate(ranks):  # every rank reports the whole batch's metrics
            got = got[name]
            assert got["stats"]["nan_loss"] == want["stats"]["nan_loss"], name
            for key in ("loss", "kl", "entropy", "clip_low", "clip_high", "is_mean", "is_min", "is_max",
                        *(("decision_log_odds", "decision_shift", "decision_anchor_loss") if name == "anchor" else ()),
                        *(("decision_log_odds",) if name == "project" else ())):
                assert_scalar_close(got["stats"][key], want["stats"][key], f"{name} rank {rank} {key}")
            if name != "nan":
                assert_scalar_close(got["stats"]["grad_norm"], want["stats"]["grad_norm"],
                                    f"{name} rank {rank} grad norm")
            assert got["steps"] == want["steps"], f"{name} rank {rank}: optimizer steps"
            assert_weights_close(got["weights"], ranks[0][name]["weights"], 0, f"{name} ranks' gathered weights")
        mine = [shares[r] if shares else fdist.split_for_rank([0, 1, 2], r, WORLD) for r in range(WORLD)]
        got_adv = torch.cat([ranks[r][name]["adv"] for r in range(WORLD)])  # EGPO advantages, in group order
        order = torch.tensor([g * GROUP + j for r in range(WORLD) for g in mine[r] for j in range(GROUP)])
        if name != "nan":  # A + lambda * clip(think entropy): per-token terms as the losses'
            assert_verbose_close(got_adv, want["adv"][order], FP32_REL * TERM_SCALE, FP32_REL * TERM_SCALE,
                                 f"{name} advantages")
    for rank, got in enumerate(ranks):
        assert_scalar_close(got["sft"]["loss"], single["sft"]["loss"], f"sft rank {rank} loss")
        assert_scalar_close(got["sft"]["grad_norm"], single["sft"]["grad_norm"], f"sft rank {rank} grad norm")
        assert_weights_close(got["sft"]["weights"], ranks[0]["sft"]["weights"], 0, "sft ranks' gathered weights")
    # every optimizer step, in its well-conditioned halves (tests/equivalence.py): the same gradient before and
    # after clipping, and AdamW's update of it
    labels, done = [], 0
    for name in [name for name, *_ in RL_SCENARIOS] + ["sft"]:
        steps = single[name]["steps"] if name != "sft" else len(single["records"])
        labels, done = labels + [name] * (steps - done), steps
    assert_steps_equivalent(ranks[0]["records"], single["records"], "2 ranks", labels)

    # checkpoints: the 2-rank one loads in one process (weights and name-keyed optimizer state) ...
    assert_adamw_state_close(ranks[0]["optimizer"]["state"], single["optimizer"]["state"],
                             grad_scales(single["records"]), "2 ranks' vs 1 process's optimizer state")
    ckpt = tmp_path / "ranks" / "ckpt-000001"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert_weights_close(full_weights(loaded), ranks[0]["sft"]["weights"], 0, "2-rank checkpoint in one process")
    loaded_optimizer = make_optimizer(loaded)
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"]
    assert all(isinstance(key, str) for key in saved["state"])  # keyed by parameter name
    checkpoint.load_optimizer_state(loaded, loaded_optimizer, saved)
    assert_state_equal(fdist.optimizer_state_dict(loaded, loaded_optimizer)["state"], ranks[0]["optimizer"]["state"],
                       "2 ranks -> 1 optimizer")
    # ... and the single-process one (torch's own optimizer format) into 2 ranks' shards
    assert_weights_close(ranks[0]["loaded_single"]["weights"], single["sft"]["weights"], 0, "1 -> 2 ranks weights")
    assert_state_equal(ranks[0]["loaded_single"]["optimizer"]["state"], single["optimizer"]["state"],
                       "1 -> 2 ranks optimizer")


@pytest.mark.slow
def test_torchrun_fctrain_run_with_vllm_engines(tmp_path):
    """`torchrun --nproc-per-node 2 -m fctrain.run` end to end on CPU (gloo, one vLLM engine per rank through
    external_launcher): SFT warm start, RL steps that train, weight sync, split evaluation, reference and
    checkpoint. ~100 s here, most of it two vLLM start-ups."""
    pytest.importorskip("vllm")
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from fctrain import data
    from fctrain.models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", hidden_size=64, num_layers=2, num_heads=2)
    examples = data.load_bfcl("simple_python", limit=4)
    data.save_jsonl(examples[:2], tmp_path / "train.jsonl")
    data.save_jsonl(examples[2:], tmp_path / "eval.jsonl")
    out = tmp_path / "out"
    args = dict(model=model_dir, engine="vllm", engine_dtype="float32", train_data=tmp_path / "train.jsonl",
                eval_data=tmp_path / "eval.jsonl", eval_limit=2, sft_steps=30, sft_batch_size=2, sft_lr=5e-3,
                steps=3, prompts_per_step=2, group_size=4, max_new_tokens=40, reward="partial", lr=1e-3,
                temperature=1.0, warmup_steps=1, save_every=0, beta=0.001, out_dir=out,
                updates_per_batch=2, sft_think="plan")  # 2nd pass follows an update: KL > 0; short targets
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD)]
    proc = subprocess.run([*torchrun, "-m", "fctrain.run", *[x for k, v in args.items() for x in (f"--{k}", str(v))]],
                          capture_output=True, text=True, timeout=400, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "torchrun: 2 ranks" in output  # rank 0 alone prints (vLLM's own logs come from both ranks)
    assert sum(line.startswith("config: {") for line in output.splitlines()) == 1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    sft = [r for r in rows if r["phase"] == "sft"]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(sft) == 30 and sft[-1]["loss"] < sft[0]["loss"] / 10
    assert len(rl) == 3 and all(r["groups"] == 2 for r in rl)  # every rank's groups are in the record
    trained = [r for r in rl if r["trained_seqs"]]
    assert trained, "the warm-started tiny model should give reward variance"
    for r in trained:
        assert math.isfinite(r["loss"]) and r["nan_loss"] == 0 and r["sync_s"] > 0
        # vLLM's sampling log-probs match the trainer's on both ranks, after every sync of new weights
        assert 0.999 < r["is_min"] <= r["is_max"] < 1.001, r
    assert all(r["kl"] > 0 for r in trained), \
        f"after an update the policy differs from the sharded reference: {[(r['step'], r['trained_seqs'], r['kl']) for r in rl]}"
    assert [r["eval_total"] for r in rows if r["phase"] == "eval"] == [2, 2]  # after SFT, at the end
    ckpt = out / "ckpt-000033"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 33 and all(isinstance(k, str) for k in state["optimizer"]["state"])
    final = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(out / "reference", dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(final.parameters(), reference.parameters()))
