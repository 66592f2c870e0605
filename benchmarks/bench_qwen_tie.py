"""Is Qwen2.5-Coder-0.5B's GGUF lm_head the same matrix as its embeddings, and what does saving it tied cost?

    python benchmarks/bench_qwen_tie.py > benchmarks/results/qwen05b_tie_cpu.txt

The original Qwen2.5-0.5B-Instruct ties its embeddings (tie_word_embeddings=true); the offline GGUF
(fctrain.models.QWEN_CODER_05B, assembled and hash-checked here) holds two copies: token_embd in Q5_0 and
output in Q8_0, which transformers loads as an untied lm_head (630M parameters instead of 494M). This prints
(1) the copies' relative difference and how many entries of the embeddings equal a Q5_0 re-quantisation of
the Q8_0 head (all of them would mean one source matrix), (2) for two chat prompts with a get_weather tool,
the greedy answers and the max logit difference, top-1 agreement and KL against the as-loaded untied model of:
tied to the Q8_0 copy, tied to the Q5_0 copy, bf16-rounded, and tied-Q8_0 + bf16 (what fctrain saves).
Costs ~5 min and ~8 GB on 2 CPU cores.
"""
import tempfile
import time

import numpy as np
import torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
import gguf
from gguf import quants
from fctrain.models import QWEN_CODER_05B, assemble_gguf
scratch = tempfile.TemporaryDirectory()  # removed at exit (491 MB)
p = assemble_gguf(QWEN_CODER_05B, Path(scratch.name) / "qwen.gguf")
r = gguf.GGUFReader(str(p))
T = {t.name: t for t in r.tensors}
E = quants.dequantize(T["token_embd.weight"].data, T["token_embd.weight"].tensor_type)
H = quants.dequantize(T["output.weight"].data, T["output.weight"].tensor_type)
print("shapes", E.shape, H.shape)
print("rel fro diff E vs H", np.linalg.norm(E - H) / np.linalg.norm(H))
# Does re-quantising H (Q8_0 dequant) to Q5_0 give E?
rows = slice(0, 20000)
Hq = quants.dequantize(quants.quantize(H[rows], gguf.GGMLQuantizationType.Q5_0), gguf.GGMLQuantizationType.Q5_0)
print("Q5_0(H) == E exactly, fraction:", (Hq == E[rows]).mean(), "rel diff", np.linalg.norm(Hq - E[rows]) / np.linalg.norm(E[rows]))
# Q5_0 quantisation noise scale for comparison: re-quantise E itself (idempotent?) and a random perturbation
print("rel diff Q5_0(H) vs H", np.linalg.norm(Hq - H[rows]) / np.linalg.norm(H[rows]))
# correlation per row
c = (E * H).sum(1) / (np.linalg.norm(E, axis=1) * np.linalg.norm(H, axis=1) + 1e-12)
print("row cosine E,H: min", c.min(), "median", np.median(c))
del Hq

tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
ct = tok.chat_template or ""
print("chat template len", len(ct), "has tools:", "tools" in ct, "<tool_call>" in ct)
packed = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
sd = {k: v.clone() for k, v in packed.state_dict().items()}
print("transformers embed == gguf E", np.array_equal(sd["model.embed_tokens.weight"].numpy(), E), "lm_head == H", np.array_equal(sd["lm_head.weight"].numpy(), H))
config = packed.config
del packed
if hasattr(config, "quantization_config"): del config.quantization_config
M = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
M.load_state_dict(sd, strict=True); M.eval()
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]
qs = ["What's the weather in Paris in celsius?", "Who won the Lakers game yesterday?"]
ids = [tok.apply_chat_template([{"role": "user", "content": q}], tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False) for q in qs]
ids = [list(i["input_ids"]) if hasattr(i, "keys") else list(i) for i in ids]
print("prompt tokens", [len(i) for i in ids])
def run(model, label):
    outs = []
    with torch.no_grad():
        for i in ids:
            g = model.generate(torch.tensor([i]), max_new_tokens=60, do_sample=False)
            outs.append(g[0, len(i):])
    return outs
def logits(model, seqs):
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float() for s in seqs]
t = time.perf_counter(); ref_out = run(M, "untied"); print("gen s", time.perf_counter() - t)
for o in ref_out: print("UNTIED:", repr(tok.decode(o)))
seqs = [i + o.tolist() for i, o in zip(ids, ref_out)]
L0 = logits(M, seqs)
def compare(label):
    L = logits(M, seqs)
    md = max((a - b).abs().max().item() for a, b in zip(L0, L))
    agree = np.mean(np.concatenate([(a.argmax(-1) == b.argmax(-1)).numpy() for a, b in zip(L0, L)]))
    kl = np.mean(np.concatenate([torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1).numpy() for a, b in zip(L0, L)]))
    print(f"{label}: max|dlogit| {md:.4f} top1 agree {agree:.4f} mean KL(untied||this) {kl:.2e}")
    for o in run(M, label): print(f"  {label}:", repr(tok.decode(o)))
# tied with H (Q8_0 copy)
with torch.no_grad():
    M.model.embed_tokens.weight.copy_(torch.from_numpy(H))
compare("tied-H(Q8_0)")
with torch.no_grad():
    M.model.embed_tokens.weight.copy_(torch.from_numpy(E)); M.lm_head.weight.copy_(torch.from_numpy(E))
compare("tied-E(Q5_0)")
# untied, weights rounded to bf16
with torch.no_grad():
    for k, v in M.state_dict().items(): pass
    M.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in sd.items()})
compare("untied-bf16-rounded")
with torch.no_grad():
    M.model.embed_tokens.weight.copy_(torch.from_numpy(H).to(torch.bfloat16).float())
compare("tied-H-bf16-rounded")
