"""Token-budget micro-batches for the trainer, in three layouts that give the same per-token log-probs.

    padded   one sequence per row, right-padded; costs rows x longest tokens (the classic layout)
    packed   all sequences of a micro-batch concatenated in one row, positions restarting per sequence.
             Meant for flash-attn's varlen path (position ids alone split the row; linear cost). Under
             SDPA it needs an explicit [1, 1, T, T] block-diagonal mask, and SDPA's cost then grows with
             T^2 for the whole row: on CPU prefer `shared`.
    shared   one row per prompt: the prompt once, then its G completions, each attending to the prompt
             and to itself, never to its siblings (a [B, 1, T, T] mask; SDPA only). Rows are padded to the
             longest in the micro-batch. With ~85% of an RL sequence being prompt (SmolLM2 on BFCL), this
             computes ~3x fewer tokens than `padded`.

Only hidden states that predict a completion token are handed to the loss (`MicroBatch.rows`), so the
fused loss runs on the packed [M, H] form with per-sequence `seq_ids`, whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fctrain import dist as fdist

LAYOUTS = ("padded", "packed", "shared")


@dataclass(frozen=True)
class Seq:
    prompt: list[int]        # prompt token ids (sequences with the same `group` must have equal prompts)
    completion: list[int]    # trained token ids (non-empty)
    group: int = -1          # sequences of one group may share their prompt (layout "shared")


@dataclass
class MicroBatch:
    seqs: list[int]                       # indices into the caller's Seq list, in seq_id order
    input_ids: torch.Tensor               # (B, T)
    position_ids: torch.Tensor            # (B, T)
    attention_mask: torch.Tensor | None   # (B, T) padding | (1, 1, T, T) bool | None = varlen by position ids
    rows: torch.Tensor                    # (M,) flat indices into the (B * T) hidden states
    targets: torch.Tensor                 # (M,) the completion token each row predicts
    seq_ids: torch.Tensor                 # (M,) 0..len(seqs)-1

    @property
    def num_tokens(self) -> int:          # tokens the model computes (padding included)
        return self.input_ids.numel()


def _units(seqs: list[Seq], budget: int, layout: str) -> list[list[int]]:
    """Sequences laid out together: singletons, or (shared) one prompt's completions, split to fit."""
    if layout != "shared":
        return [[i] for i in range(len(seqs))]
    by_group: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_group.setdefault(s.group if s.group >= 0 else -1 - i, []).append(i)
    units = []
    for members in by_group.values():
        prompt = seqs[members[0]].prompt
        if any(seqs[i].prompt != prompt for i in members[1:]):
            raise ValueError("sequences of one group must have identical prompts to share them")
        cur, size = [], len(prompt)
        for i in members:
            n = len(seqs[i].completion)
            if cur and size + n > budget:
                units.append(cur)
                cur, size = [], len(prompt)
            cur.append(i)
            size += n
        units.append(cur)
    return units


def _unit_tokens(seqs: list[Seq], unit: list[int]) -> int:
    return len(seqs[unit[0]].prompt) + sum(len(seqs[i].completion) for i in unit)


def plan(seqs: list[Seq], budget: int, layout: str) -> list[list[list[int]]]:
    """Micro-batches (each a list of units, each unit a list of sequence indices) whose computed tokens
    stay within `budget`: rows x longest row for `padded` and `shared`, the row length for `packed`. Every sequence is
    placed exactly once; a single sequence longer than the budget is an error, not a silent drop."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    for i, s in enumerate(seqs):
        if not s.completion:
            raise ValueError(f"sequence {i} has an empty completion (nothing to train on)")
        if len(s.prompt) + len(s.completion) > budget:
            raise ValueError(f"sequence {i} has {len(s.prompt) + len(s.completion)} tokens, over the "
                             f"micro-batch budget of {budget}")
    units = _units(seqs, budget, layout)
    cost = [_unit_tokens(seqs, u) for u in units]
    order = sorted(range(len(units)), key=lambda u: (-cost[u], u))  # longest first: little waste
    batches: list[list[int]] = []
    loads: list[int] = []
    for u in order:
        for b, batch in enumerate(batches):
            if layout != "packed":  # rows x longest; the first unit of a batch is its longest
                fits = (len(batch) + 1) * cost[batch[0]] <= budget
            else:
                fits = loads[b] + cost[u] <= budget
            if fits:
                batch.append(u)
                loads[b] += cost[u]
                break
        else:
            batches.append([u])
            loads.append(cost[u])
    return [[units[u] for u in batch] for batch in batches]


def build(seqs: list[Seq], units: list[list[int]], layout: str, device="cpu", varlen: bool = False) -> MicroBatch:
    """Tensors for one planned micro-batch. `varlen=True` (flash-attn) gives position ids and no mask;
    it cannot express shared prompts."""
    order = [i for u in units for i in u]
    targets = torch.tensor([t for i in order for t in seqs[i].completion], dtype=torch.long)
    seq_ids = torch.repeat_interleave(torch.arange(len(order)), torch.tensor([len(seqs[i].completion) for i in order]))
    if layout == "padded":
        width = max(len(seqs[i].prompt) + len(seqs[i].completion) for i in order)
        ids = torch.zeros(len(order), width, dtype=torch.long)
        attn = torch.zeros(len(order), width, dtype=torch.long)
        rows = []
        for b, i in enumerate(order):
            s = seqs[i].prompt + seqs[i].completion
            ids[b, :len(s)] = torch.tensor(s)
            attn[b, :len(s)] = 1
            p = len(seqs[i].prompt)
            rows.append(b * width + torch.arange(p - 1, len(s) - 1))
        pos = torch.arange(width).expand(len(order), width).clone()
        return MicroBatch(order, ids.to(device), pos.to(device), attn.to(device), torch.cat(rows).to(device),
                          targets.to(device), seq_ids.to(device))
    if varlen and layout == "shared":
        raise ValueError("the shared-prompt layout needs an attention mask; flash-attn varlen cannot express it")
    # packed: every unit in one row; shared: one row per unit. Each token gets its unit and branch
    # (0 = the prompt, k + 1 = completion k); q sees k iff same unit, k <= q, and k is prompt or on q's branch.
    lines = [units] if layout == "packed" else [[u] for u in units]
    laid = []
    for line in lines:
        tokens, pos, unit_of, branch_of, rows = [], [], [], [], []
        for u_idx, unit in enumerate(line):
            prompt = seqs[unit[0]].prompt
            start = len(tokens)
            tokens += prompt
            pos += range(len(prompt))
            unit_of += [u_idx] * len(prompt)
            branch_of += [0] * len(prompt)
            for k, i in enumerate(unit):
                comp = seqs[i].completion
                at = len(tokens)
                rows += [start + len(prompt) - 1] + list(range(at, at + len(comp) - 1))
                tokens += comp
                pos += range(len(prompt), len(prompt) + len(comp))
                unit_of += [u_idx] * len(comp)
                branch_of += [k + 1] * len(comp)
        laid.append((tokens, pos, unit_of, branch_of, rows))
    width = max(len(t) for t, *_ in laid)
    ids = torch.zeros(len(laid), width, dtype=torch.long)
    position_ids = torch.zeros(len(laid), width, dtype=torch.long)
    unit_t = torch.full((len(laid), width), -1)  # padding: its own unit, attending only to padding
    branch_t = torch.zeros(len(laid), width, dtype=torch.long)
    flat_rows = []
    for b, (tokens, pos, unit_of, branch_of, rows) in enumerate(laid):
        n = len(tokens)
        ids[b, :n], position_ids[b, :n] = torch.tensor(tokens), torch.tensor(pos)
        unit_t[b, :n], branch_t[b, :n] = torch.tensor(unit_of), torch.tensor(branch_of)
        flat_rows.append(b * width + torch.tensor(rows))
    mask = None
    if not varlen:
        q = torch.arange(width)
        mask = ((unit_t[:, None, :] == unit_t[:, :, None]) & (q[None, None, :] <= q[None, :, None])
                & ((branch_t[:, None, :] == 0) | (branch_t[:, None, :] == branch_t[:, :, None])))[:, None]
        mask = mask.to(device)
    return MicroBatch(order, ids.to(device), position_ids.to(device), mask, torch.cat(flat_rows).to(device),
                      targets.to(device), seq_ids.to(device))


def hidden_rows(model, mb: MicroBatch) -> torch.Tensor:
    """(M, H) last hidden states at `mb.rows`; the LM head is never applied (the fused loss takes the
    hidden states and lm_head.weight). Calls the root module through fdist.forward_hidden, so that an
    FSDP-sharded model gathers and reduces its root parameters; unsharded it is the decoder's output.
    Read lm_head.weight AFTER this call: under FSDP it is gathered only by the forward."""
    h = fdist.forward_hidden(model, input_ids=mb.input_ids, position_ids=mb.position_ids,
                             attention_mask=mb.attention_mask)[0]
    return h.reshape(-1, h.shape[-1]).index_select(0, mb.rows)


def per_token(values: list[list[float]] | list[list[bool]], mb: MicroBatch, dtype=torch.float32) -> torch.Tensor:
    """Concatenate per-sequence lists (indexed like the caller's Seq list) in the micro-batch's row order."""
    return torch.tensor([v for i in mb.seqs for v in values[i]], dtype=dtype, device=mb.rows.device)
