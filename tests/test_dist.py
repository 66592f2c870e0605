"""fctrain.dist on 2 gloo ranks (spawned here, torchrun-style env): FSDP2 data parallel == one process.

A tiny random Llama (hidden 64, 2 layers, vocab 300, head_dim 32, tied embeddings), a GRPO step through the
fused loss (torch path) with the loss normalised by the all-reduced token count and the gradient clipped by
the global norm; the 2-rank step must equal the single-process step on all sequences (loss, pre-clip grad
norm, updated weights). Then checkpoints go 2 ranks -> 1 process -> 2 ranks with the optimizer state.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import kernels
from fctrain import dist as fdist
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
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.01, foreach=True)


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
        loss, _ = kernels.fused_linear_grpo_loss(h, weight, targets, adv, comp, old_logp=old, entropy_coef=0.01,
                                                 temperature=TEMPERATURE, impl="torch")
        loss = loss * int(comp.sum()) / n_global
        loss.backward()
        loss_sum += loss.detach()
    for _ in range(n_steps - len(micro_batches)):
        fdist.dummy_backward(model, "cpu")
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
        else:  # a DIFFERENT random init, then the single-process checkpoint loaded over it; one more step
            model = fdist.shard_model(tiny_llama(seed=123))
            fdist.load_pretrained_weights(model, os.path.join(out, "ckpt-b"))
            result["loaded"] = full_weights(model)
            optimizer = make_optimizer(model)
            state = torch.load(os.path.join(out, "ckpt-b", "optimizer.pt")) if rank == 0 else {}
            fdist.load_optimizer_state_dict(model, optimizer, state)
            result["loss"], result["grad_norm"] = train_step(model, optimizer, make_batch(3), RANK_MBS[rank])
            result["weights"] = full_weights(model)
    finally:
        torch.save(result, os.path.join(out, f"phase{phase}-rank{rank}.pt"))
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
        assert_verbose_close(r["loss"], loss1, 1e-6, 1e-5, "loss")
        assert_verbose_close(r["grad_norm"], norm1, 1e-6, 1e-5, "grad norm (pre-clip, global)")
    assert_weights_close(ranks[0]["weights"], full_weights(single), 1e-6, "weights after the 2-rank step")
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
    fdist.load_optimizer_state_dict(loaded, loaded_opt, torch.load(ckpt_a / "optimizer.pt"))
    want_state = fdist.optimizer_state_dict(single, single_opt)["state"]
    got_state = fdist.optimizer_state_dict(loaded, loaded_opt)["state"]
    assert set(got_state) == set(want_state)
    for name in want_state:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_verbose_close(got_state[name][key], want_state[name][key], 1e-9, 1e-5, f"optimizer {name} {key}")
    train_step(loaded, loaded_opt, make_batch(2), SINGLE_MBS)
    fdist.save_pretrained(loaded, tmp_path / "ckpt-b")
    torch.save(fdist.optimizer_state_dict(loaded, loaded_opt), tmp_path / "ckpt-b" / "optimizer.pt")

    # 1 process -> 2 ranks: load into a differently initialised sharded model, then one step both ways
    ranks = spawn(tmp_path, phase=2)
    assert_weights_close(ranks[0]["loaded"], full_weights(loaded), 0, "2 ranks load the 1-process checkpoint")
    loss3, norm3 = train_step(loaded, loaded_opt, make_batch(3), SINGLE_MBS)
    assert_verbose_close(ranks[0]["loss"], loss3, 1e-6, 1e-5, "loss after the round trip")
    assert_verbose_close(ranks[0]["grad_norm"], norm3, 1e-6, 1e-5, "grad norm after the round trip")
    assert_weights_close(ranks[0]["weights"], full_weights(loaded), 1e-6, "weights after the round trip")


def test_forward_hidden_is_the_decoder_output_and_computes_no_logits():
    model = tiny_llama(seed=0)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 5:] = 0
    position_ids = torch.arange(7).expand(2, 7)
    h, weight = fdist.forward_hidden(model, input_ids=ids, attention_mask=attn, position_ids=position_ids)
    want = model.get_decoder()(input_ids=ids, attention_mask=attn, position_ids=position_ids).last_hidden_state
    assert torch.equal(h, want) and weight is model.lm_head.weight


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
