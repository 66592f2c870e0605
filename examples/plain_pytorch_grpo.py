"""Using fctrain's kernels from your own training loop: a GRPO step on any Hugging Face causal LM.

    python examples/plain_pytorch_grpo.py            # a tiny random Llama, a toy reward, 3 steps, CPU

Only `kernels` is imported: the loss goes from the base model's hidden states and `lm_head.weight`
straight to the clipped GRPO loss, so the [tokens x vocab] logits never exist.
TRL's GRPOTrainer needs no code of yours: `kernels.trl.use_fctrain_kernels(trainer)` routes its loss and
its log-prob passes through these kernels (README, "Use the kernels from TRL / verl"). Liger-Kernel users
can swap in `kernels.FusedLinearGRPOLoss`, which takes the same arguments as LigerFusedLinearGRPOLoss.
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kernels


def grpo_step(model, optimizer, prompt_ids, group_size, reward_fn, temperature=1.0, max_new_tokens=12):
    # 1. rollouts: G samples per prompt (a real trainer uses vLLM here)
    model.eval()
    with torch.no_grad():
        seqs = model.generate(prompt_ids.repeat_interleave(group_size, 0), do_sample=True,
                              temperature=temperature, max_new_tokens=max_new_tokens, pad_token_id=0)
    completion = seqs[:, prompt_ids.shape[1]:]  # (P*G, C)
    # 2. rewards and group-normalised advantages
    rewards = torch.tensor([reward_fn(c) for c in completion.tolist()], dtype=torch.float32)
    r = rewards.view(-1, group_size)
    advantages = ((r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True).clamp(min=1e-6)).flatten()  # (P*G,)
    # 3. fused loss from hidden states: positions that predict completion tokens
    model.train()
    hidden = model.get_decoder()(input_ids=seqs).last_hidden_state[:, :-1]  # (B, T-1, H)
    targets = seqs[:, 1:]
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[:, prompt_ids.shape[1] - 1:] = True
    loss, metrics = kernels.fused_linear_grpo_loss(hidden, model.get_output_embeddings().weight, targets,
                                                   advantages, mask, temperature=temperature)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), rewards.mean().item(), metrics["entropy_mean"].item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prompts = torch.randint(1, 256, (4, 8))
    reward_fn = lambda tokens: sum(t % 2 == 0 for t in tokens) / len(tokens)  # toy: share of even ids  # noqa: E731
    for step in range(args.steps):
        loss, reward, entropy = grpo_step(model, optimizer, prompts, group_size=4, reward_fn=reward_fn)
        print(f"step {step} | loss {loss:.4f} | reward {reward:.3f} | entropy {entropy:.3f}")


if __name__ == "__main__":
    main()
