"""Data-parallel training on PyTorch's own engine: torchrun + FSDP2 (`fully_shard`); gloo on CPU, nccl on CUDA.

Every rank runs the same loop on its share of the prompts; these helpers are the only differences:

    ctx = fdist.init()                                   # torchrun's env; world_size 1 without torchrun
    model = fdist.shard_model(model, bf16=True)          # fully_shard per decoder layer + root; grads SUMMED
    h, weight = fdist.forward_hidden(model, input_ids=ids, attention_mask=attn)  # root forward, no logits
    n_global = fdist.all_reduce_sum(n_local_tokens)      # loss = sum over my tokens / n_global -> same
    ...                                                  #   update as one process on the whole batch
    grad_norm = fdist.clip_grad_norm_(model, 1.0)        # global norm over every rank's shards
    for name, full in fdist.full_parameters(model): ...  # weight sync: one parameter gathered at a time
    stats = fdist.reduce_metrics(stats, summed, maximised=("is_max",))  # a step's metrics over all ranks
    record = fdist.concat_over_ranks({"rewards": [...], ...})            # per-completion logs, rank order
    stop = fdist.any_rank(ctrl_c_seen)                   # every rank stops after the same step
    fdist.save_pretrained(model, path)                   # rank 0 writes HF safetensors (any world size loads)
    fdist.load_pretrained_weights(model, path)           # a single-process (or any) checkpoint into shards

Gradients are summed over ranks (`set_gradient_divide_factor(1)`), not averaged: each rank divides its
loss by the GLOBAL normaliser (all-reduced token or sequence count), so K ranks give the update one process
gives on the same batch. Every FSDP forward/backward is a collective: all ranks must run the same number
of micro-batches (`all_reduce_max` the count; a rank with fewer runs `dummy_pass`). Every gather and
reduction the trainer makes across ranks is a function here; each is the identity in a single process, so
fctrain.run's step functions call them unconditionally (only setup, sharding, branches on torchrun).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0 under torchrun (it alone prints and writes logs and checkpoints); always true in one process."""
    return not is_distributed() or dist.get_rank() == 0


def barrier():
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def init(backend: str | None = None) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables: a single-process context, nothing initialised. backend: nccl on CUDA, gloo
    otherwise. Each rank uses GPU LOCAL_RANK.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(device="cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device != "cpu" else "gloo"),
                                device_id=torch.device(device) if device != "cpu" else None)
    return DistContext(rank, world, local_rank, device)


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ sharding

def _decoder_layers(model):
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: no decoder `.layers` to shard (a Hugging Face decoder-only LM "
                        "is expected)")
    return layers


def shard_model(model, bf16: bool = False, reshard_after_forward: bool = True):
    """FSDP2 in place: `fully_shard` each decoder layer, then the root (embeddings, final norm, LM head).

    bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) - compute in bf16 on gathered copies of
    the fp32 master shards, gradients reduced in fp32. Gradients are SUMMED over ranks (divide factor 1):
    normalise the loss by the global count. Returns the model (its class becomes FSDP<Class>).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not is_distributed():
        raise RuntimeError("shard_model needs an initialised process group with world_size > 1 (run under torchrun)")
    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root keeps its default: not resharded after forward, so the LM head that forward_hidden returns
    # stays gathered until backward has used it
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if dist.get_backend() == "gloo":  # gloo has no PREMUL_SUM: plain SUM (scaled by 1) instead
                module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _unwrapped_class(model):
    """The model's own class (FSDP2 swaps in a subclass named FSDP<Class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


_NO_POSITIONS = torch.empty(0, dtype=torch.long)


def forward_hidden(model, **inputs):
    """(last hidden states (B, T, H), LM-head weight (V, H)) for `inputs` (input_ids, attention_mask,
    position_ids, ... as the decoder takes them).

    Calls the ROOT module (sharded or not), so FSDP's root hooks gather the embeddings/norm/LM head and
    reduce their gradients (calling `model.get_decoder()` directly would skip them); `logits_to_keep`
    selects no position, so no logits are computed. The hidden state is the decoder's output, taken by a
    forward hook (output_hidden_states would keep every layer's states alive: ~L times the memory under
    no_grad). Read the weight AFTER the forward, as returned here: under FSDP it is the gathered parameter
    (bf16 under mixed precision) only then.
    """
    captured = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(**inputs, logits_to_keep=_NO_POSITIONS.to(inputs["input_ids"].device), use_cache=False)
    finally:
        hook.remove()
    return captured[0], model.get_output_embeddings().weight


def dummy_backward(model, device):
    """A zero-loss forward/backward: keeps FSDP's collectives in step on a rank with fewer micro-batches."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    h, weight = forward_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    (h.sum() * 0.0 + weight.sum() * 0.0).backward()


def dummy_forward(model, device) -> torch.Tensor:
    """A forward on two zero tokens (hidden states returned; the caller reshards): what a rank with fewer
    forward-only passes than its peers runs instead of one. Single-process runs never call it."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    return forward_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))[0]


def dummy_pass(model, ref_model, device):
    """What a rank with fewer micro-batches than its peers runs instead of one, so that the FSDP collectives
    of all ranks stay in the same order: the reference forward (when there is one), then a zero-loss policy
    forward/backward. Single-process runs never call it."""
    if ref_model is not None:
        with torch.no_grad():
            dummy_forward(ref_model, device)
        reshard(ref_model)
    dummy_backward(model, device)


def reshard(model):
    """Free the root's gathered parameters after a forward that has no backward (the frozen reference):
    FSDP keeps the embeddings and LM head gathered after a forward, for the backward. A no-op unsharded."""
    if is_sharded(model):
        model.reshard()


# ------------------------------------------------------------------------------------------------ collectives

def all_reduce_sum(x):
    """Sum over ranks of a number or tensor (returned as the same type); identity in a single process."""
    return _all_reduce(x, dist.ReduceOp.SUM) if is_distributed() else x


def all_reduce_max(x):
    return _all_reduce(x, dist.ReduceOp.MAX) if is_distributed() else x


def _all_reduce(x, op):
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        dist.all_reduce(y, op=op)
        return y
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    y = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(y, op=op)
    return type(x)(y.item())  # host sync


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a Ctrl-C that reached some ranks only)."""
    return bool(all_reduce_max(int(flag)))


def reduce_metrics(values: dict, summed: tuple, minimised: tuple = (), maximised: tuple = (),
                   device="cpu") -> dict:
    """`values` with the `summed` keys summed and the `minimised` / `maximised` ones reduced over ranks, each
    cast back to its type (two all-reduces); `values` itself in a single process."""
    if not is_distributed():
        return values
    sums = all_reduce_sum(torch.tensor([values[k] for k in summed], dtype=torch.float64, device=device))
    extremes = all_reduce_max(torch.tensor([-values[k] for k in minimised] + [values[k] for k in maximised],
                                           dtype=torch.float64, device=device)).tolist()  # host sync
    return {**values, **{k: type(values[k])(v) for k, v in zip(summed, sums.tolist())},
            **{k: -v for k, v in zip(minimised, extremes)}, **dict(zip(maximised, extremes[len(minimised):]))}


def all_gather_list(items: list) -> list:
    """Every rank's `items` (picklable, e.g. reward results for logging) concatenated in rank order, on every
    rank; `items` itself in a single process. Host objects through the CPU: for small per-step records."""
    if not is_distributed():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def concat_over_ranks(lists: dict[str, list]) -> dict[str, list]:
    """Each key's list concatenated over ranks in rank order, on every rank (one gather of host objects);
    `lists` itself in a single process."""
    parts = all_gather_list([lists])
    return {key: [x for part in parts for x in part[key]] for key in lists}


def split_for_rank(items: list, rank: int, world_size: int) -> list:
    """Contiguous share of `items` for `rank` (sizes differ by at most one). Split whole prompt groups,
    so that group advantages need no communication."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (rank < extra)]


def clip_grad_norm_(model, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm over all ranks' shards; returns the pre-clip norm (a plain tensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ------------------------------------------------------------------------------------------------ weights

def full_parameters(model):
    """(name, full tensor) per parameter, gathering ONE sharded parameter at a time (peak extra memory: the
    largest parameter). A collective: every rank must exhaust the iterator; only the caller that feeds the
    rollout engine needs the values. Names are the unsharded model's (FSDP2 keeps them)."""
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        yield name, full.detach()


def _tied_output_key(model) -> tuple[str, str] | None:
    """(output-embedding key, input-embedding key) when the LM head shares the embedding table."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or not getattr(model.config, "tie_word_embeddings", False):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(out)] + ".weight", names[id(inp)] + ".weight"


def full_state_dict(model) -> dict:
    """The full (unsharded) model state dict on CPU on rank 0; {} on other ranks. Collective."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model, directory, tokenizer=None, max_shard_size: str = "5GB"):
    """Rank 0 writes a Hugging Face model directory (config.json, safetensors) that `from_pretrained` loads in
    one process, or `load_pretrained_weights` into a sharded model of any world size. Collective."""
    from huggingface_hub import save_torch_state_dict

    state = full_state_dict(model)
    if is_main():
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tied = _tied_output_key(model)
        if tied is not None:
            state.pop(tied[0], None)  # stored once, as the embedding (transformers re-ties on load)
        config = copy.deepcopy(model.config)
        config.architectures = [_unwrapped_class(model).__name__]  # not FSDP<Class>: vLLM reads this
        config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
        save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, directory,
                              max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    barrier()  # nobody reads the directory before it is complete


def _read_safetensors(directory) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_pretrained_weights(model, directory):
    """Load a Hugging Face safetensors directory (from one process or a distributed run) into `model`,
    sharded or not. Distributed: only rank 0 reads the files; each tensor is broadcast and every rank keeps
    its shard. Raises on missing or unexpected keys. Collective."""
    state = _read_safetensors(directory) if is_main() else {}
    if is_main():
        tied = _tied_output_key(model)
        if tied is not None and tied[0] not in state:
            state[tied[0]] = state[tied[1]]
        expected = set(model.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"checkpoint {directory} does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    if not is_sharded(model):
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def copy_weights(src, dst, directory):
    """`dst` takes `src`'s weights, which are also saved as a model directory (for a later --resume).
    Under torchrun rank 0 writes the directory and every rank reads its shards from it. Collective."""
    if is_distributed():
        save_pretrained(src, directory)
        load_pretrained_weights(dst, directory)
    else:
        dst.load_state_dict(src.state_dict())
        src.save_pretrained(directory, safe_serialization=True)


def optimizer_state_dict(model, optimizer) -> dict:
    """Full optimizer state keyed by parameter name (same format for any world size), on rank 0's CPU; {} on
    other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sharded = is_sharded(model)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=sharded))


def load_optimizer_state_dict(model, optimizer, state: dict):
    """Load `optimizer_state_dict`'s output (from any world size) into `optimizer`; distributed: rank 0's
    `state` is broadcast (other ranks may pass {}). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    sharded = is_sharded(model)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=sharded))
