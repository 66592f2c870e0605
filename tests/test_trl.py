"""kernels.trl: TRL's GRPOTrainer on fctrain's kernels vs TRL's own loss and LM head.

The model is a tiny random Llama built here with a byte-level tokenizer (no download): hidden 64, MLP 128,
head_dim 32, 2 layers, vocab 258, <= 22 positions per row, <= 128 completion tokens per micro-batch, i.e.
inside the sizes tests/equivalence.py derives its fp32 tolerances for (summation chains <= 4096 terms,
FP32_REL = 4.9e-4 of the summed magnitude). Both sides run the same backbone; they differ in how the LM
head, the log-softmax and the loss sum their terms.
"""
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from tests.equivalence import FP32_REL, TERM_SCALE, U32, assert_grad_close, assert_scalar_close
from tests.kernel_utils import assert_verbose_close

trl = pytest.importorskip("trl")
from transformers import TrainerCallback  # noqa: E402

from kernels.trl import use_fctrain_kernels  # noqa: E402


def byte_tokenizer():
    """A real fast tokenizer with one token per byte (+ pad, eos): 258 tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    config.initializer_range = 0.1  # peakier than the default: sampled completions are not uniform noise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def reward(completions, **kwargs):
    return [sum(map(ord, c)) % 13 / 13 for c in completions]  # deterministic, varies within a group


LR = 0.03


def make_trainer(model_dir, tmp_path, fused, model=None, **options):
    from transformers import AutoModelForCausalLM

    config = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  num_generations=4, max_completion_length=16, beta=0.1, epsilon=0.2, epsilon_high=0.28,
                  loss_type="dapo", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
                  use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                  disable_tqdm=True)
    config.update(options)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    # plain SGD: the update lr * g is as well conditioned as the gradient, so weights compare like gradients
    # (AdamW's ~sign(g) step is not; see tests/equivalence.py)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=trl.GRPOConfig(**config),
                              train_dataset=_dataset(), processing_class=byte_tokenizer(),
                              optimizers=(optimizer, None))
    return use_fctrain_kernels(trainer) if fused else trainer


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["ab", "hello", "xyz", "tok"]})


# ---------------------------------------------------------------------------- the loss, case by case

@pytest.fixture(scope="module")
def trainer_pair(model_dir, tmp_path_factory):
    """(TRL's, ours): same weights, beta != 0 so both hold a reference model."""
    tmp = tmp_path_factory.mktemp("pair")
    return make_trainer(model_dir, tmp / "trl", fused=False), make_trainer(model_dir, tmp / "ours", fused=True)


def make_inputs(trainer, case, seed=0):
    """A micro-batch as GRPOTrainer._prepare_inputs hands it to the loss: prompts left-padded, completions
    right-padded (one row empty), advantages of both signs, old log-probs placed so that each row's ratios
    run through 0.6 ... 1.5 (below 1 - epsilon, between the edges, between 1 + epsilon and 1 + epsilon_high,
    above), reference log-probs 0.3 N(0,1) away from the policy's."""
    g = torch.Generator().manual_seed(seed)
    b, p, k = 6, 5, 8
    prompt_ids, completion_ids = torch.randint(2, 258, (b, p), generator=g), torch.randint(2, 258, (b, k), generator=g)
    prompt_mask = (torch.arange(p)[None] >= torch.tensor([0, 2, 1, 0, 3, 0])[:, None]).long()
    completion_mask = (torch.arange(k)[None] < torch.tensor([8, 3, 0, 5, 8, 1])[:, None]).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.7]),
              "num_items_in_batch": 2 * completion_mask.sum()}  # the generation batch spans 2 micro-batches
    if case.get("tool_mask"):
        inputs["tool_mask"] = (torch.rand(b, k, generator=g) > 0.3).long()
    with torch.no_grad():
        logp, _, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), k)
    ratios = torch.stack([torch.linspace(0.6, 1.5, k).roll(i) for i in range(b)])  # 1.243: only eps_high keeps it
    inputs["old_per_token_logps"] = logp - ratios.log()
    inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(b, k, generator=g)
    if case.get("vllm"):
        shape = (b, k) if case["vllm"] == "token" else (b, 1)
        inputs["importance_sampling_ratio"] = torch.exp(0.2 * torch.randn(*shape, generator=g))
    return inputs


def loss_grads_metrics(trainer, inputs, compute_loss, mode):
    trainer.model.train(mode == "train")
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    loss = compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, dict(trainer._metrics[mode])


def forbid_trl_lm_head(monkeypatch):
    def trl_lm_head(*args, **kwargs):
        raise AssertionError("TRL's own chunked LM head ran under use_fctrain_kernels")

    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", trl_lm_head)


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo+entropy+tools": dict(loss_type="bnpo", entropy_coef=0.05, tool_mask=True),
    "dr_grpo+entropy": dict(loss_type="dr_grpo", entropy_coef=0.05),
    "dapo+entropy+vllm_token_is": dict(loss_type="dapo", entropy_coef=0.05, vllm="token"),
    "luspo+vllm_sequence_is": dict(loss_type="luspo", vllm="sequence"),
    "dapo-no_kl_bias_correction": dict(loss_type="dapo", use_bias_correction_kl=False),
    "bnpo-beta0": dict(loss_type="bnpo", beta=0.0),
    "dr_grpo-eval": dict(loss_type="dr_grpo", mode="eval"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_grads_and_metrics_match_trl(trainer_pair, name, monkeypatch):
    case = CASES[name]
    for trainer in trainer_pair:  # the options _compute_loss reads, set on both trainers
        trainer.loss_type, trainer.beta = case["loss_type"], case.get("beta", 0.1)
        trainer.entropy_coef = case.get("entropy_coef", 0.0)
        trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = bool(case.get("vllm"))
        trainer.args.use_bias_correction_kl = case.get("use_bias_correction_kl", True)
        trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = 3, 2
    theirs, ours = trainer_pair
    inputs = make_inputs(theirs, case)
    mode = case.get("mode", "train")
    want = loss_grads_metrics(theirs, inputs, theirs._compute_loss, mode)
    forbid_trl_lm_head(monkeypatch)
    got = loss_grads_metrics(ours, inputs, ours._compute_loss, mode)
    assert_scalar_close(got[0], want[0], f"{name} loss")
    assert set(got[1]) == set(want[1])
    for key in want[1]:
        assert_grad_close(got[1][key], want[1][key], f"{name} grad {key}")
    assert set(got[2]) == set(want[2]), f"{name}: metrics {set(got[2]) ^ set(want[2])}"
    for key in want[2]:
        assert len(got[2][key]) == len(want[2][key]) == 1, key
        assert_scalar_close(got[2][key][0], want[2][key][0], f"{name} metric {key}")


# ---------------------------------------------------------------------------- GRPOTrainer.train(), end to end

class RecordSteps(TrainerCallback):
    """Records each optimizer step's gradient and the weights after it."""

    def __init__(self):
        self.grads, self.weights = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})


def train(model_dir, tmp_path, fused, **options):
    # One generation (num_iterations = max_steps = 4) reused for 4 optimizer steps: steps 2-4 run with
    # ratios away from 1 (clipped at both edges), and no sampling follows an update, so a rounding
    # difference in the weights can never change a sampled token.
    trainer = make_trainer(model_dir, tmp_path, fused, num_iterations=4, max_steps=4, **options)
    record = RecordSteps()
    trainer.add_callback(record)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, record


def assert_runs_match(got, want, name, compare_metrics=True):
    """Per step: the logged loss (and TRL's metrics), the gradient, and the weights after the SGD step.
    Weights: w_k = w_{k-1} - lr g_k, so two runs differ by at most lr * sum_j (FP32_REL (max|g_j| + |g_j|))
    <= lr * sum_j 2 FP32_REL max|g_j| plus the update's own rounding (a few ulps of |w|)."""
    (logs_got, rec_got), (logs_want, rec_want) = got, want
    assert len(logs_got) == len(logs_want) == len(rec_got.grads) == len(rec_want.grads) == 4
    drift, used = defaultdict(float), defaultdict(float)  # used: the largest |difference| / tolerance seen
    for step, (lg, lw, gg, gw, wg, ww) in enumerate(zip(logs_got, logs_want, rec_got.grads, rec_want.grads,
                                                        rec_got.weights, rec_want.weights)):
        label = f"{name} step {step + 1}"
        keys = [k for k in lw if k.startswith(("kl", "entropy", "clip_ratio"))] if compare_metrics else []
        for key in ["loss"] + keys:
            assert_scalar_close(lg[key], lw[key], f"{label} {key}")
            used["loss and metrics"] = max(used["loss and metrics"], abs(lg[key] - lw[key]) / (
                FP32_REL * TERM_SCALE * (1 + abs(lw[key]))))
        for key in gw:
            assert_grad_close(gg[key], gw[key], f"{label} grad {key}")
            drift[key] += LR * 2 * FP32_REL * float(gw[key].abs().max())
            assert_verbose_close(wg[key], ww[key], drift[key], 8 * U32 * (step + 1), f"{label} weights {key}")
            scale = FP32_REL * float(gw[key].abs().max())
            used["gradients"] = max(used["gradients"], _used(gg[key], gw[key], scale, FP32_REL))
            used["weights"] = max(used["weights"], _used(wg[key], ww[key], drift[key], 8 * U32 * (step + 1)))
    print(f"{name}: largest difference / tolerance: " + ", ".join(f"{k} {v:.2g}" for k, v in used.items()))


def _used(got, want, atol, rtol):
    return float(((got.double() - want.double()).abs() / (atol + rtol * want.double().abs())).max())


def test_grpo_trainer_train_matches_trl(model_dir, tmp_path, monkeypatch):
    """>= 3 steps of a real GRPOTrainer.train(): dapo with beta (bias-corrected KL), epsilon_high != epsilon,
    gradient accumulation, old-policy log-probs; TRL alone, TRL with our kernels (TRL's own LM head
    forbidden), and TRL alone with another micro-batching of the same steps (the step's own fp32
    sensitivity: it must pass the same tolerance, or the tolerance would be tighter than what reordering
    the sums already changes)."""
    theirs = train(model_dir, tmp_path / "trl", fused=False)
    clipped = [(entry["clip_ratio/low_mean"], entry["clip_ratio/high_mean"]) for entry in theirs[0]]
    assert clipped[0] == (0, 0) and min(min(c) for c in clipped[1:]) > 0.02, \
        f"steps 2-4 must clip at both edges: {clipped}"
    assert min(entry["kl"] for entry in theirs[0][1:]) > 1e-3, "the run must exercise the KL term"
    with monkeypatch.context() as m:  # old, reference and policy passes all on our kernels
        forbid_trl_lm_head(m)
        ours = train(model_dir, tmp_path / "ours", fused=True)
    assert_runs_match(ours, theirs, "fctrain kernels vs TRL")
    reordered = train(model_dir, tmp_path / "reordered", fused=False, per_device_train_batch_size=8,
                      gradient_accumulation_steps=1)
    # (metrics are means of per-micro-batch means: they legitimately change with the micro-batching)
    assert_runs_match(reordered, theirs, "TRL one micro-batch vs TRL two", compare_metrics=False)


# ---------------------------------------------------------------------------- what raises, what imports

UNSUPPORTED = {
    "loss_type": dict(loss_type="cispo"),
    "importance_sampling_level": dict(importance_sampling_level="sequence", loss_type="grpo"),
    "delta": dict(delta=1.5),
    "top_entropy_quantile": dict(top_entropy_quantile=0.5),
    "off_policy_mask_threshold": dict(off_policy_mask_threshold=0.5),
    "use_adaptive_entropy": dict(use_adaptive_entropy=True),
    "entropy_coef": dict(entropy_coef=0.01, loss_type="grpo"),
}


@pytest.mark.parametrize("option", list(UNSUPPORTED))
def test_unsupported_option_raises_naming_it(model_dir, tmp_path, option):
    trainer = make_trainer(model_dir, tmp_path, fused=False, beta=0.0, **UNSUPPORTED[option])
    with pytest.raises(NotImplementedError, match=option):
        use_fctrain_kernels(trainer)


def test_unsupported_model_and_late_changes_raise(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        use_fctrain_kernels(make_trainer(model_dir, tmp_path / "a", fused=False, model=model, beta=0.0))
    trainer = make_trainer(model_dir, tmp_path / "b", fused=True, beta=0.0)
    trainer.loss_type = "sapo"  # changed after the call: the loss refuses too
    with pytest.raises(NotImplementedError, match="loss_type='sapo'"):
        trainer._compute_loss(trainer.model, make_inputs(trainer, {}))
    with pytest.raises(TypeError, match="GRPOTrainer"):
        use_fctrain_kernels(object())


def test_kernels_import_without_trl_and_fctrain():
    code = ("import sys; sys.modules['trl'] = None; sys.modules['fctrain'] = None\n"
            "import kernels, kernels.trl\n"
            "try:\n    kernels.trl.use_fctrain_kernels(None)\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
