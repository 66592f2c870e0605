"""A traffic and FLOP model of each kernel provider, predicting H100 / H200 times before any GPU run (issue 17).

    python benchmarks/traffic_model.py            # -> results/traffic_model.csv + a markdown table
    from traffic_model import predict             # bench_kernels.py prints it beside measured GPU times

For one configuration (provider, op, mode, entropy, N, H, V, bf16 inputs) it counts
- FLOPs, recomputation included (useful work is 2NHV forward, 6NHV forward+backward);
- HBM bytes: operands read and results written once, plus every pass eager PyTorch makes over an [N, V]
  tensor (counted kernel by kernel below; about +-30%: torch may fuse or split a kernel differently);
- L2 bytes: the operand tiles a tiled kernel streams from L2 (each W tile once per row block, each X tile
  once per vocabulary block) and the read-modify-write of every atomic add in a backward.
Predicted time = the sum over the kernels a call launches of max(FLOPs / peak, HBM bytes / bandwidth),
               + atomic L2 bytes / L2 bandwidth.
Atomics are added, not overlapped: they sit on the backward's critical path (each tile's dX/dW update).
The operand bytes streamed from L2 are reported (l2_operand_ms) but not timed: cuBLAS hides most of them
with shared-memory reuse and cluster multicast, and a fused kernel must too (grouped program order); a
value far above the FLOP time flags a tile shape that needs that reuse.
This is a bound-based model, not a simulator: it ranks providers, names each one's binding resource and
shows why the backward's atomics decide the fused kernel's distance from the matmul floor. The measured
GPU rows (bench_kernels.py on a GPU) calibrate it; until then, its numbers are predictions only.

fctrain-triton's backward is "chunked" (atomic-free: dz in bf16 per chunk of rows, then cuBLAS GEMMs; see
count()), chosen by this model over the per-tile fp32 atomics of fctrain-triton-atomic (backward="atomic").

Device figures are the vendors' dense peaks (no sparsity). L2 bandwidth is not published; 5.5 TB/s is a
typical microbenchmark reading of Hopper's L2 (an assumption, the same for H100 and H200, one die).
Tile skipping (kernels' filter_eps) removes a fraction `skip` of the backward's dX/dW matmuls and atomics;
the fractions measured on CPU (results/tile_skip_cpu.csv, T=0.7) are the defaults below.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEVICES = {  # dense bf16 TFLOP/s, HBM TB/s, L2 TB/s (assumed)
    "H100-SXM": {"bf16_tflops": 989.4, "hbm_tbs": 3.35, "l2_tbs": 5.5},
    "H200-SXM": {"bf16_tflops": 989.4, "hbm_tbs": 4.8, "l2_tbs": 5.5},
}
B16, F32 = 2, 4  # bytes per element
# Tiles: fctrain's default bf16 config (kernels/logprob_entropy.py), cuBLAS-like (128, 256) for the floor.
TILES = {"fctrain-triton": (64, 128), "fctrain-triton-atomic": (64, 128), "cce": (128, 128), "lm-head-matmul": (128, 256)}
# Bytes per [N, V] element of eager PyTorch (naive-eager; fctrain-torch chunks the same kernels):
# forward, logprob + entropy: z (w2), .float() (r2 w4), / T (r4 w4), log_softmax (r8 w4: max and sum
#   passes), exp (r4 w4), p * logz (r8 w4), sum (r4) = 52; without entropy, up to log_softmax: 28.
# backward, through the same graph: mul (r8 w8), exp (r8 w4), add the two logz grads (r8 w4), gather
#   (w4), add (r8 w4), log_softmax (r12 w4), / T (r4 w4), to bf16 (r4 w2), dX and dW GEMMs read dz (r4)
#   = 90 (less the entropy path: 38).
EAGER_FWD = {"on": 52, "off": 28}
EAGER_BWD = {"on": 90, "off": 38}
# Liger's chunked losses form the logit-gradient inside forward: per element z (w2 r2), .float() (w4),
# log_softmax etc. (r8 w4), the gradient (r8 w4), back to the GEMMs (r4) = 36.
LIGER_PER_ELEM = 36
GRPO_SEQ_LEN = 256  # LigerFusedLinearGRPOLoss chunks by sequence (chunk_size=1): N / 256 chunks
DZ_CHUNK_BYTES = 1 << 30  # kernels.logprob_entropy.DZ_CHUNK_BYTES: the chunked backward's dz buffer bound
SKIP = {"on": 0.24, "off": 0.24}  # tiles skipped at filter_eps 2**-12, Qwen-shaped, T=0.7 (tile_skip_cpu.csv)


def count(provider: str, op: str, mode: str, entropy: str, n: int, h: int, v: int, skip: float = 0.0) -> dict:
    """The kernels one call launches, each as (FLOPs, HBM bytes), plus the L2 bytes of its atomic adds and
    the operand bytes its tiled GEMMs stream from L2 (reported, not timed: see the module docstring)."""
    e, nh, vh = n * v, n * h, v * h
    bwd = mode == "fwd+bwd"
    gemm = 2 * n * h * v
    io = B16 * (nh + vh)  # X and W read (or dX and dW written) once

    def stream(m, k, cols, bm, bc):  # L2 operand bytes of C[m, cols] = A[m, k] B[k, cols] in (bm, bc) tiles
        return B16 * (m * k * -(-cols // bc) + cols * k * -(-m // bm))

    kernels, atomics, l2_ops = [], 0.0, 0.0
    if provider in ("lm-head-matmul", "naive-eager", "fctrain-torch"):
        bn, bv = TILES["lm-head-matmul"]  # eager GEMMs are cuBLAS's
        kernels.append((gemm, io + B16 * e))  # z = X W^T, written
        l2_ops = stream(n, h, v, bn, bv)
        if provider != "lm-head-matmul":
            kernels.append((0, EAGER_FWD[entropy] * e - B16 * e))  # the elementwise passes (z's write counted)
        if bwd:
            if provider == "fctrain-torch":  # chunks recompute z in the backward
                kernels.append((gemm, io + B16 * e))
            if provider != "lm-head-matmul":
                kernels.append((0, EAGER_BWD[entropy] * e - 2 * B16 * e))
            kernels += [(gemm, B16 * e + io), (gemm, B16 * e + io)]  # dX = dz W, dW = dz^T X
            l2_ops += stream(n, v, h, bn, bv) + stream(v, n, h, bn, bv)
    elif provider in ("fctrain-triton-atomic", "cce"):
        bn, bv = TILES[provider]
        kernels.append((gemm, io))  # logits live in registers / shared memory only
        l2_ops = stream(n, h, v, bn, bv)
        if bwd:  # z tiles recomputed; dX/dW matmuls and their atomics only for tiles not skipped
            acc = F32 if provider == "fctrain-triton-atomic" else B16  # CCE accumulates in the input dtype
            kernels.append((gemm + 2 * gemm * (1 - skip), 2 * io + F32 * nh))  # + the fp32 dX buffer
            l2_ops += stream(n, h, v, bn, bv) * (1 + 2 * (1 - skip))
            atomics = 2 * acc * (nh * -(-v // bv) + vh * -(-n // bn)) * (1 - skip)  # read + write each
    elif provider == "fctrain-triton":
        # The chunked backward. An atomic-free backward cannot own whole rows of dX in one program (a
        # [BLOCK_N, H] fp32 accumulator is 1 MB at H 4096, beyond registers and shared memory), so: per chunk
        # of rows (dz <= DZ_CHUNK_BYTES), _dz_kernel recomputes z and writes dz in bf16, then two cuBLAS GEMMs
        # form dX = dz W and dW += dz^T X (fp32 accumulator read and written once per chunk).
        chunks = max(1, -(-n // max(1, DZ_CHUNK_BYTES // (B16 * v))))
        bn, bv = TILES[provider]
        kernels.append((gemm, io))
        l2_ops = stream(n, h, v, bn, bv)
        if bwd:
            l2_ops += stream(n, h, v, bn, bv)  # the recomputed tiles (the GEMMs' streams are cuBLAS's)
            kernels += [(gemm, io + B16 * e),                              # z recomputed, dz written
                        (gemm, B16 * e + chunks * B16 * vh + B16 * nh),    # dX GEMMs
                        (gemm, B16 * e + B16 * nh + chunks * 3 * F32 * vh)]  # dW GEMMs into the fp32 acc
    elif provider in ("liger-grpo", "liger-flce"):
        # gradients formed inside forward, chunk by chunk; backward only scales them
        chunks = max(1, n // GRPO_SEQ_LEN) if provider == "liger-grpo" else max(1, -(-v // h))
        kernels += [(3 * gemm, 3 * chunks * B16 * vh + 3 * B16 * nh),  # z, dX, dW GEMMs: W read per chunk
                    (0, LIGER_PER_ELEM * e),                             # the logit-sized passes
                    (0, chunks * 4 * F32 * vh)]                          # dW chunk (w, r) into fp32 acc (r, w)
    else:
        raise ValueError(f"no model for provider {provider!r}")
    return {"kernels": kernels, "flops": sum(k[0] for k in kernels), "hbm_bytes": sum(k[1] for k in kernels),
            "l2_atomic_bytes": atomics, "l2_operand_bytes": l2_ops}


def predict(provider: str, op: str, mode: str, entropy: str, n: int, h: int, v: int, device: str,
            skip: float | None = None) -> dict:
    """count() plus the predicted milliseconds on `device` (a DEVICES key): each kernel at its roofline
    bound (FLOPs or HBM), in sequence, plus the atomics at L2 bandwidth; and the binding resource."""
    d = DEVICES[device]
    c = count(provider, op, mode, entropy, n, h, v, SKIP[entropy] if skip is None else skip)
    flop_s = hbm_s = 0.0  # seconds of the kernels bound by FLOPs, by HBM bytes
    for flops, hbm in c.pop("kernels"):
        t_flop, t_hbm = flops / (d["bf16_tflops"] * 1e12), hbm / (d["hbm_tbs"] * 1e12)
        if t_flop >= t_hbm:
            flop_s += t_flop
        else:
            hbm_s += t_hbm
    atomic_s = c["l2_atomic_bytes"] / (d["l2_tbs"] * 1e12)
    parts = {"flop": flop_s, "hbm": hbm_s, "atomics": atomic_s}
    return {**c, "pred_ms": 1e3 * sum(parts.values()), "bound": max(parts, key=parts.get),
            "flop_bound_ms": 1e3 * flop_s, "hbm_bound_ms": 1e3 * hbm_s, "atomic_ms": 1e3 * atomic_s,
            "l2_operand_ms": 1e3 * c["l2_operand_bytes"] / (d["l2_tbs"] * 1e12)}


def device_key(name: str) -> str | None:
    """The DEVICES entry for a torch device name ("NVIDIA H100 80GB HBM3" -> "H100-SXM"), else None."""
    for key in DEVICES:
        if key.split("-")[0] in name.upper():
            return key
    return None


# The configurations bench_kernels.py measures on a GPU: its target shape (all providers) and sweeps.
PROVIDER_CASES = [("lm-head-matmul", "lm-head-matmul", "n/a"), ("fctrain-triton", "grpo", "on"),
                  ("fctrain-triton", "grpo", "off"), ("fctrain-triton-atomic", "grpo", "on"),
                  ("fctrain-torch", "grpo", "on"), ("naive-eager", "grpo", "on"),
                  ("liger-grpo", "grpo", "off"), ("liger-flce", "logprob", "off"), ("cce", "logprob", "off"),
                  ("fctrain-triton", "logprob", "off"), ("fctrain-triton-atomic", "logprob", "off")]
COLUMNS = ["device", "provider", "op", "mode", "entropy", "N", "H", "V", "skip", "flops", "hbm_bytes",
           "l2_atomic_bytes", "l2_operand_bytes", "flop_bound_ms", "hbm_bound_ms", "atomic_ms", "pred_ms", "bound",
           "ratio_floor", "l2_operand_ms"]


def table(shapes, devices=tuple(DEVICES)) -> list[dict]:
    rows = []
    for device in devices:
        for n, h, v in shapes:
            for mode in ("fwd", "fwd+bwd"):
                floor = predict("lm-head-matmul", "lm-head-matmul", mode, "off", n, h, v, device)["pred_ms"]
                for provider, op, ent in PROVIDER_CASES:
                    if provider.startswith("liger") and mode == "fwd":
                        continue  # their forward already computes the gradients
                    skips = [0.0, SKIP["on"]] if provider in ("fctrain-triton-atomic", "cce") and mode == "fwd+bwd" else [0.0]
                    for skip in skips:
                        p = predict(provider, op, mode, "off" if ent == "n/a" else ent, n, h, v, device, skip)
                        rows.append({"device": device, "provider": provider, "op": op, "mode": mode, "entropy": ent,
                                     "N": n, "H": h, "V": v, "skip": skip, **p, "ratio_floor": p["pred_ms"] / floor})
    return rows


def markdown(rows) -> str:
    lines = ["| device | shape N,H,V | mode | provider | op | entropy | skip | pred ms | x floor | bound |",
             "| --- " * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['N']},{r['H']},{r['V']} | {r['mode']} | {r['provider']} | {r['op']} | "
                     f"{r['entropy']} | {r['skip']:.2f} | {r['pred_ms']:.1f} | {r['ratio_floor']:.2f} | {r['bound']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(common.RESULTS / "traffic_model.csv"))
    args = p.parse_args(argv)
    rows = table([common.TARGET, common.SMOLLM2])
    common.write_csv(Path(args.out), rows, COLUMNS)
    print(markdown([r for r in rows if (r["N"], r["H"], r["V"]) == common.TARGET]))
    print(f"\n-> {args.out}")
    return rows


if __name__ == "__main__":
    main()
