"""Kernel benchmark: fctrain's fused log-prob + entropy and GRPO loss against the alternatives, side by side.

    python benchmarks/bench_kernels.py --device cpu                       # CPU mode: minutes, torch paths
    python benchmarks/bench_kernels.py --device cuda --wheels .whl        # GPU mode: one command, offline
    python benchmarks/bench_kernels.py --model                            # predicted H100/H200 times only

Providers (each measured on identical inputs in the same run):
  lm-head-matmul   the floor: z = hidden @ weight.T, then dX and dW (forward+backward) - no loss at all
  fctrain-triton   kernels.* with impl="triton" (CUDA only; the Triton interpreter is never timed): the
                   chunked backward (default: dz per row chunk, then cuBLAS GEMMs)
  fctrain-triton-atomic  the same with backward="atomic" (per-tile fp32 atomics into dX / dW)
  fctrain-torch    kernels.* with impl="torch" (token-chunked, recompute in backward)
  naive-eager      kernels.reference naive versions: full [N, V] logits, what a user would write
  naive-compile    the same under torch.compile (compile time excluded: it happens in the warm-up)
  liger-grpo       Liger-Kernel LigerFusedLinearGRPOLoss (no entropy; compiled=False on CPU, True on CUDA)
  liger-flce       Liger-Kernel LigerFusedLinearCrossEntropyLoss, log-probs only (CUDA only)
  cce              Cut Cross-Entropy linear_cross_entropy, log-probs only (CUDA only, if importable)

Ops: "logprob" (per-token log-prob, plus entropy when entropy=on: the upstream gradient flows through
both outputs) and "grpo" (token-mean clipped GRPO loss with k3 KL, beta=0.04, on-policy old log-probs,
entropy bonus 0.01 when entropy=on). Modes: "fwd" and "fwd+bwd" (gradients of hidden and weight).

Metrics per row: median time with 20th-80th percentile spread, TFLOP/s counting 2*N*H*V (fwd) or
6*N*H*V (fwd+bwd) useful FLOPs whatever a provider recomputes, ratio to the matmul floor of the same
shape and mode, and peak extra memory (see benchmarks/common.py; on CPU every configuration runs in its
own process) with its ratio to naive-eager. Rows carry device, versions, git sha and date.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

# benchmarks/ for `common`, the repository root for `kernels` when the project is not pip-installed
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import common  # noqa: E402

PROVIDERS = ["lm-head-matmul", "fctrain-triton", "fctrain-triton-atomic", "fctrain-torch", "naive-eager", "naive-compile",
             "liger-grpo", "liger-flce", "cce"]
OPS = ["logprob", "grpo"]
MODES = ["fwd", "fwd+bwd"]
COLUMNS = common.META_COLUMNS + [
    "op", "mode", "entropy", "provider", "dtype", "N", "H", "V", "reps", "time_ms", "time_p20_ms",
    "time_p80_ms", "tflops", "ratio_floor", "peak_mem_mb", "mem_ratio_naive", "status", "note"]
# Pinned versions of the peers; `--fetch-wheels DIR` downloads them for a GPU machine without internet.
PEER_WHEELS = ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"]
GRPO_SEQ_LEN = 256  # completion length T of the [B, T] GRPO layout (B = N / T); Liger chunks over B
GRPO_BETA, GRPO_ENTROPY_COEF = 0.04, 0.01
INPUT_COPIES = 3  # inputs rotated between calls so no call reuses the previous call's hidden states

ALL = {"ops": OPS, "modes": MODES, "entropy": ["on", "off"], "providers": PROVIDERS}
FWD_BWD = {"modes": ["fwd+bwd"]}

# CPU mode, most important first (a run stopped early keeps its rows): issue 3's target configuration at
# SmolLM2's shape with Liger beside it, the forward+backward matrix at a small N, the forward matrix, then
# the rest at SmolLM2's shape. "min_reps" 2 at SmolLM2's shape: one call takes tens of seconds on 2 cores.
SMALL = (512, 576, 49152)
CPU_PLAN = [
    {"shape": common.SMOLLM2, **ALL, **FWD_BWD, "ops": ["grpo"], "entropy": ["on"], "min_reps": 2,
     "providers": ["lm-head-matmul", "fctrain-torch", "naive-eager"]},
    {"shape": common.SMOLLM2, **ALL, **FWD_BWD, "ops": ["grpo"], "entropy": ["off"], "providers": ["liger-grpo"],
     "min_reps": 2},
    {"shape": SMALL, **ALL, **FWD_BWD, "providers": [p for p in PROVIDERS if p != "naive-compile"]},
    {"shape": SMALL, **ALL, **FWD_BWD, "entropy": ["on"], "providers": ["naive-compile"]},
    {"shape": SMALL, **ALL, "modes": ["fwd"], "providers": [p for p in PROVIDERS if p != "naive-compile"]},
    {"shape": common.SMOLLM2, **ALL, **FWD_BWD, "ops": ["grpo"], "entropy": ["off"], "min_reps": 2,
     "providers": ["fctrain-torch", "naive-eager"]},
    {"shape": common.SMOLLM2, **ALL, **FWD_BWD, "ops": ["logprob"], "entropy": ["on"], "min_reps": 2,
     "providers": ["fctrain-torch", "naive-eager"]},
    {"shape": common.SMOLLM2, **ALL, **FWD_BWD, "ops": ["grpo"], "entropy": ["on"], "min_reps": 2,
     "providers": ["naive-compile"]},
]
# GPU mode ("--plan target" + "--plan sweep"): everything at the target shape (torch.compile only in
# fwd+bwd with entropy: each compile takes about a minute there); then sweeps over N, H and V, one axis
# at a time from the target, for the fused providers and their peers in forward+backward. A subset of the
# 3 x 3 x 4 grid, chosen to show each axis; `--shapes` runs any other shape with every configuration.
_SWEEP_PROVIDERS = ["lm-head-matmul", "fctrain-triton", "fctrain-triton-atomic", "liger-grpo", "liger-flce", "cce"]
_SWEEP_SHAPES = [(2048, 4096, 151936), (8192, 4096, 151936), (16384, 576, 151936), (16384, 2048, 151936),
                 (16384, 4096, 32000), (16384, 4096, 49152), (16384, 4096, 128256), (16384, 576, 49152)]
GPU_PLANS = {
    "target": [{"shape": common.TARGET, **ALL, "providers": [p for p in PROVIDERS if p != "naive-compile"]},
               {"shape": common.TARGET, **ALL, **FWD_BWD, "entropy": ["on"], "providers": ["naive-compile"]}],
    "sweep": [{"shape": s, **ALL, **FWD_BWD, "providers": _SWEEP_PROVIDERS} for s in _SWEEP_SHAPES],
}
GPU_PLAN = GPU_PLANS["target"] + GPU_PLANS["sweep"]


# ---------------------------------------------------------------------------- plan

def applicable(provider: str, op: str, mode: str, entropy: str, device: str) -> str | None:
    """None if the configuration is measured, else why not (never a row: these are by design)."""
    if (provider == "lm-head-matmul") != (op == "lm-head-matmul"):
        return "the floor is its own op"
    if provider in ("fctrain-triton", "fctrain-triton-atomic", "liger-flce", "cce") and device != "cuda":
        return "CUDA only (the Triton interpreter is never timed)"
    if provider in ("liger-flce", "cce") and (op != "logprob" or entropy != "off"):
        return "log-probs only (no entropy output, no GRPO loss)"
    if provider == "liger-grpo" and (op != "grpo" or entropy != "off" or mode != "fwd+bwd"):
        return "GRPO without entropy; computes gradients inside forward, so only fwd+bwd compares"
    return None


def expand(plan: list[dict], device: str, dtype: str, filters: dict) -> list[dict]:
    """Plan entries -> one spec dict per measured configuration, floors first per shape."""
    specs, seen = [], set()
    for entry in plan:
        n, h, v = entry["shape"]
        for mode in entry["modes"]:
            combos = [("lm-head-matmul", "lm-head-matmul", "n/a")] if "lm-head-matmul" in entry["providers"] else []
            combos += [(p, op, ent) for op in entry["ops"] for ent in entry["entropy"] for p in entry["providers"]
                       if p != "lm-head-matmul"]
            for provider, op, ent in combos:
                if applicable(provider, op, mode, ent, device) is not None:
                    continue
                checks = [("providers", provider), ("modes", mode)]
                if provider != "lm-head-matmul":  # the floor serves every op and entropy setting
                    checks += [("ops", op), ("entropy", ent)]
                if any(filters.get(k) and val not in filters[k] for k, val in checks):
                    continue
                key = (provider, op, mode, ent, n, h, v)
                if key not in seen:
                    seen.add(key)
                    specs.append({"provider": provider, "op": op, "mode": mode, "entropy": ent, "N": n, "H": h,
                                  "V": v, "dtype": dtype, "device": device, "min_reps": entry.get("min_reps")})
    return specs


# ---------------------------------------------------------------------------- providers

def naive_logprob(hidden, weight, targets):
    """Log-probs alone with full logits: what a user writes when no entropy is needed."""
    z = (hidden @ weight.T).float()
    return z.log_softmax(-1).gather(-1, targets[:, None].long())[:, 0]


def make_call(spec: dict):
    """Build inputs and return `call(i)` that runs one measured iteration on input copy i % COPIES.

    Each call returns what it computed (outputs, or gradients in fwd+bwd) so the measurement sees it live.
    """
    import torch

    import kernels
    from kernels.reference import naive_grpo_loss, naive_logprob_entropy

    dev, dtype = spec["device"], getattr(torch, spec["dtype"])
    n, h, v = spec["N"], spec["H"], spec["V"]
    provider, op = spec["provider"], spec["op"]
    backward, entropy = spec["mode"] == "fwd+bwd", spec["entropy"] == "on"
    torch.manual_seed(0)
    t_len = GRPO_SEQ_LEN if n % GRPO_SEQ_LEN == 0 else n
    b = n // t_len
    # logits with std ~2 (hidden ~ N(0, 1), weight ~ N(0, 4/H)): realistic, neither flat nor one-hot
    weight = (torch.randn(v, h, device=dev) * (2 / h ** 0.5)).to(dtype).requires_grad_(backward)
    copies = []
    for _ in range(INPUT_COPIES):
        copies.append({
            "hidden": torch.randn(n, h, device=dev).to(dtype).requires_grad_(backward),
            "targets": torch.randint(0, v, (n,), device=dev),
            "g_logp": torch.randn(n, device=dev), "g_ent": torch.randn(n, device=dev),
            "advantages": torch.randn(b, device=dev),
            "mask": torch.ones(b, t_len, device=dev, dtype=torch.long),  # no padding: same work for all
            "ref_logp": -math.log(v) - 2 + 0.1 * torch.randn(b, t_len, device=dev),
        })
    grad_logits = torch.randn(n, v, device=dev, dtype=dtype) if provider == "lm-head-matmul" and backward else None
    compile_ = torch.compile if provider == "naive-compile" else (lambda f: f)
    impl = {"fctrain-triton": "triton", "fctrain-triton-atomic": "triton", "fctrain-torch": "torch"}.get(provider)
    scheme = "atomic" if provider == "fctrain-triton-atomic" else "auto"  # the Triton backward's

    if provider == "lm-head-matmul":
        def run(c):
            z = c["hidden"] @ weight.T  # (N, V) in the input dtype
            return torch.autograd.grad(z, [c["hidden"], weight], grad_logits) if backward else z
    elif op == "logprob" and provider in ("fctrain-triton", "fctrain-triton-atomic", "fctrain-torch", "naive-eager",
                                     "naive-compile"):
        if provider.startswith("fctrain"):
            fn = lambda x, w, t: kernels.fused_linear_logprob_entropy(x, w, t, impl=impl, backward=scheme)  # noqa: E731
        else:
            fn = compile_(naive_logprob_entropy if entropy else naive_logprob)

        def run(c):
            out = fn(c["hidden"], weight, c["targets"])
            if not backward:
                return out
            if entropy:
                return torch.autograd.grad(list(out), [c["hidden"], weight], [c["g_logp"], c["g_ent"]])
            logp = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(logp, [c["hidden"], weight], c["g_logp"])
    elif op == "logprob" and provider == "liger-flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def run(c):
            nll = flce(weight, c["hidden"], c["targets"])  # sum of -logp; its gradient is formed in forward
            return torch.autograd.grad(nll, [c["hidden"], weight]) if backward else nll
    elif op == "logprob" and provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def run(c):
            nll = linear_cross_entropy(c["hidden"], weight, c["targets"], reduction="sum")
            return torch.autograd.grad(nll, [c["hidden"], weight]) if backward else nll
    elif op == "grpo" and provider in ("fctrain-triton", "fctrain-triton-atomic", "fctrain-torch", "naive-eager",
                                     "naive-compile"):
        config = kernels.GRPOLossConfig(beta=GRPO_BETA, entropy_coef=GRPO_ENTROPY_COEF if entropy else 0.0)
        if provider.startswith("fctrain"):
            def fn(x, w, t, adv, mask, ref):
                return kernels.fused_linear_grpo_loss(x, w, t, adv, mask, ref_logp=ref, config=config, impl=impl,
                                              backward=scheme)[0]
        else:
            fn = compile_(lambda x, w, t, adv, mask, ref: naive_grpo_loss(
                x, w, t, adv, mask, ref_logp=ref, config=config)[0])

        def run(c):
            x = c["hidden"].view(b, t_len, h)
            loss = fn(x, weight, c["targets"].view(b, t_len), c["advantages"], c["mask"], c["ref_logp"])
            return torch.autograd.grad(loss, [c["hidden"], weight]) if backward else loss
    elif op == "grpo" and provider == "liger-grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, compiled=dev.startswith("cuda"), use_ref_model=True,
                                         loss_type="dapo")

        def run(c):
            loss, _ = liger(c["hidden"].view(b, t_len, h), weight, c["targets"].view(b, t_len), c["mask"],
                            c["advantages"], ref_per_token_logps=c["ref_logp"])
            return torch.autograd.grad(loss, [c["hidden"], weight])
    else:
        raise ValueError(f"no implementation for provider={provider!r} op={op!r}")

    return lambda i: run(copies[i % INPUT_COPIES])


def measure(spec: dict, timing: dict) -> dict:
    """Run one configuration in this process and return its metrics (or a status saying why not)."""
    import gc

    import torch

    try:
        call = make_call(spec)
        if spec["device"].startswith("cuda"):
            return {**common.measure_cuda(call, spec["device"]), "status": "ok"}
        if spec["provider"] == "naive-compile":
            timing = {**timing, "warmup": 2}  # a recompile on the second call must not land in the timing
        return {**common.measure_cpu(call, **timing), "status": "ok"}
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except ImportError as e:
        return {"status": f"skipped: {e}"}
    except Exception as e:  # one broken peer (e.g. a Triton version it was not written for) must not end the run
        return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        call = None
        gc.collect()
        if spec["device"].startswith("cuda"):
            torch.cuda.empty_cache()


def note_for(spec: dict) -> str:
    notes = {
        "liger-grpo": "compiled loss math (torch.compile)" if spec["device"] == "cuda" else "compiled=False",
        "liger-flce": "reduction=sum; gradient formed in forward",
        "cce": "default filter_eps='high' (skips gradients of tiny probabilities)",
        "naive-compile": "torch.compile, compile time excluded",
        "fctrain-torch": "token-chunked, recompute in backward",
    }
    note = notes.get(spec["provider"], "")
    if spec["op"] == "grpo":
        note = "; ".join(x for x in (note, f"B={spec['N'] // GRPO_SEQ_LEN if spec['N'] % GRPO_SEQ_LEN == 0 else 1}"
                                           f" x T={GRPO_SEQ_LEN if spec['N'] % GRPO_SEQ_LEN == 0 else spec['N']}") if x)
    return note


# ---------------------------------------------------------------------------- derived columns

def add_ratios(rows: list[dict]) -> None:
    """TFLOP/s, time / floor time (same shape, dtype, mode) and peak / naive-eager peak (same op too)."""
    def key(r, *extra):
        return (r["device"], r["dtype"], r["N"], r["H"], r["V"], r["mode"]) + tuple(r[k] for k in extra)

    ok = [r for r in rows if r["status"] == "ok"]
    floors = {key(r): r["time_ms"] for r in ok if r["provider"] == "lm-head-matmul"}
    naive = {key(r, "op", "entropy"): r["peak_mem_mb"] for r in ok if r["provider"] == "naive-eager"}
    for r in ok:
        flops = (6 if r["mode"] == "fwd+bwd" else 2) * r["N"] * r["H"] * r["V"]
        r["tflops"] = flops / (r["time_ms"] * 1e-3) / 1e12
        if key(r) in floors:
            r["ratio_floor"] = r["time_ms"] / floors[key(r)]
        base = naive.get(key(r, "op", "entropy"))
        if base:
            r["mem_ratio_naive"] = r["peak_mem_mb"] / base


# ---------------------------------------------------------------------------- peers from wheels

def install_wheels(wheel_dir: Path) -> None:
    """Make liger-kernel / cut-cross-entropy importable from wheels in `wheel_dir` (GPU machine, offline).

    Installed with --no-index --no-deps into wheel_dir/site, which is put on sys.path and PYTHONPATH
    (for isolated workers). Nothing is installed when the packages already import.
    """
    missing = [w for w in sorted(Path(wheel_dir).glob("*.whl"))
               if w.name.split("-")[0] in ("liger_kernel", "cut_cross_entropy")
               and not _importable(w.name.split("-")[0])]
    site = Path(wheel_dir).resolve() / "site"
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, missing)], check=True)
    if site.is_dir():
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def fetch_wheels(dest: Path) -> None:
    """Download the pinned peer wheels (pure Python, any platform) into `dest` for a machine offline."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                    str(dest), *PEER_WHEELS], check=True)
    print("\n".join(str(p) for p in sorted(dest.glob("*.whl"))))


# ---------------------------------------------------------------------------- main

def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(x) for x in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes wants 'N,H,V;N,H,V' with positive integers; got {text!r}")
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--plan", choices=["all", "target", "sweep"], default="all",
                   help="GPU: the target shape, the N/H/V sweeps, or both (CPU has one plan)")
    p.add_argument("--shapes", type=parse_shapes, help="'N,H,V;...': every configuration at these shapes "
                   "instead of the device's default plan")
    p.add_argument("--providers", type=lambda s: s.split(","), help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--ops", type=lambda s: s.split(","), help="subset of logprob,grpo")
    p.add_argument("--modes", type=lambda s: s.split(","), help="subset of fwd,fwd+bwd")
    p.add_argument("--entropy", type=lambda s: s.split(","), help="subset of on,off")
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/kernels_<device>.csv)")
    p.add_argument("--no-isolate", action="store_true", help="CPU: run configurations in this process "
                   "(peak memory then less trustworthy; for smoke tests)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--min-time", type=float, default=2.0, help="CPU: seconds of timed calls per configuration")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--wheels", type=Path, help="folder of peer wheels to install offline if not importable")
    p.add_argument("--fetch-wheels", type=Path, help="download the pinned peer wheels into this folder; exit")
    p.add_argument("--model", action="store_true", help="print traffic_model's H100/H200 predictions at the "
                   "target shape and exit (a GPU run prints them beside the measured times)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, allowed in (("providers", PROVIDERS), ("ops", OPS), ("modes", MODES), ("entropy", ["on", "off"])):
        bad = set(getattr(args, name) or []) - set(allowed)
        if bad:
            p.error(f"--{name}: unknown {sorted(bad)}; choose from {allowed}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels(args.fetch_wheels)
        return []
    if args.model:  # no GPU here: the predictions alone
        import traffic_model
        print(traffic_model.markdown(traffic_model.table([common.TARGET])))
        return []
    timing = {"min_reps": args.min_reps, "min_time_s": args.min_time}
    if args.worker:  # isolated child: one configuration, one result line
        spec = json.loads(args.worker)
        if spec["device"] == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # Liger imports triton; nothing here launches it
        common.report_from_worker(measure(spec, spec.pop("timing")))
        return []
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/Liger import triton (never timed)
    if args.wheels:
        install_wheels(args.wheels)
    plan = CPU_PLAN if device == "cpu" else GPU_PLAN if args.plan == "all" else GPU_PLANS[args.plan]
    if args.shapes:
        plan = [{"shape": s, **ALL} for s in args.shapes]
    filters = {"providers": args.providers, "ops": args.ops, "modes": args.modes, "entropy": args.entropy}
    specs = expand(plan, device, args.dtype, filters)
    meta = common.run_metadata(device)
    slug = "cpu" if device == "cpu" else "cuda_" + "".join(c if c.isalnum() else "_" for c in meta["device"].lower())
    out = args.out or common.RESULTS / f"kernels_{slug}.csv"
    isolate = device == "cpu" and not args.no_isolate
    print(f"{len(specs)} configurations on {meta['device']} ({'one process each' if isolate else 'in process'})"
          f" -> {out}", flush=True)

    rows = []
    for i, spec in enumerate(specs):
        load = common.load_avg()
        spec_timing = {**timing, "min_reps": spec["min_reps"] or args.min_reps}
        if isolate:
            result = common.run_isolated(Path(__file__), {**spec, "timing": spec_timing})
        else:
            result = measure(spec, spec_timing)
        row = {**meta, **{k: spec[k] for k in ("op", "mode", "entropy", "provider", "dtype", "N", "H", "V")},
               **result, "load_avg": load, "note": note_for(spec)}
        rows.append(row)
        shown = f"{row['time_ms']:10.1f} ms  {row['peak_mem_mb']:9.1f} MB" if row["status"] == "ok" else row["status"]
        print(f"[{i + 1}/{len(specs)}] {spec['op']:>14} {spec['mode']:>7} ent={spec['entropy']:<3} "
              f"{spec['provider']:<15} N={spec['N']} H={spec['H']} V={spec['V']}: {shown}  (load {load})", flush=True)
        add_ratios(rows)
        common.write_csv(out, rows, COLUMNS)  # after every row: a killed run keeps what it measured
    print_predictions(rows, meta["device"])
    if not args.no_plot:
        import plot

        print("plot:", plot.plot_kernels(out))
    return rows


def print_predictions(rows: list[dict], device_name: str) -> None:
    """Measured GPU times beside traffic_model's predictions for the same configurations (H100/H200)."""
    import traffic_model
    key = traffic_model.device_key(device_name)
    ok = [r for r in rows if r["status"] == "ok" and r["dtype"] == "bfloat16"]
    if key is None or not ok:
        return
    print(f"\nmeasured vs traffic_model ({key}; bf16):")
    for r in ok:
        p = traffic_model.predict(r["provider"], r["op"], r["mode"], "off" if r["entropy"] == "n/a" else r["entropy"],
                                  r["N"], r["H"], r["V"], key, skip=0.0)
        print(f"  {r['op']:>14} {r['mode']:>7} ent={r['entropy']:<3} {r['provider']:<15} N={r['N']} H={r['H']} "
              f"V={r['V']}: measured {r['time_ms']:9.2f} ms, predicted {p['pred_ms']:9.2f} ms ({p['bound']}-bound), "
              f"measured / predicted {r['time_ms'] / p['pred_ms']:.2f}")


if __name__ == "__main__":
    main()
