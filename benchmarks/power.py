"""Power of the RL protocol (issue 30, part 4): the smallest true difference between two arms that a design of
S seeds x n held-out examples detects with 80% power at two-sided alpha 0.05, from the v6 per-example verdicts.

    python benchmarks/bench_rl.py power      # results/rl_cpu/power.csv and power_vs_effect.png (about a minute)

A paired comparison A - B (GRPO - SFT control, say) is a matrix d[s, i] = A[s, i] - B[s, i] in {-1, 0, 1} over
seeds s and examples i, every seed scored on the same examples. Three ways to the minimum detectable effect,
MDE = (z_0.975 + z_0.8) * SE:

1. `se_discordance`: every (seed, example) pair independent, SE^2 = var(d) / (S n), var(d) = P(A != B) - delta^2
   (the paired discordance rate). What a two-proportion calculation gives; it ignores that seeds and examples
   repeat, so it is a lower bound.
2. `components`: the two-way crossed random-effects model d[s, i] = delta + u_s + v_i + e_si (seed, example,
   residual; ANOVA estimates from the mean squares, negative ones set to 0) and
       SE^2 = var_u / S + var_v / n + var_e / (S n)                      (seeds resampled too)
       SE^2 =             var_v / n + var_e / (S n)                      (seeds fixed: the protocol's CI over
                                                                          examples, `bench_rl.bootstrap`)
   var_u is the between-seed variance of the per-seed arm difference less its example noise; examples are
   shared by the seeds, so their part does not shrink with S.
3. `simulate`: experiments of design (S, n) drawn from the v6 data (seeds and examples resampled with
   replacement, each variance component rescaled to the estimate of 2.) with a shift delta injected; the
   protocol's two-level paired-bootstrap CI (`bench_rl.bootstrap_seeds`, percentile, seeds and examples
   resampled) is computed on each, and the share whose CI excludes 0 is the power at delta. Since the
   percentile CI of d + delta is the CI of d shifted by delta, one bootstrap per drawn experiment gives the
   whole power curve.

No import of bench_rl here (it imports this module); the cells are read from their JSON files.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = common.RESULTS / "rl_cpu"
ALPHA, POWER = 0.05, 0.80
Z_ALPHA = NormalDist().inv_cdf(1 - ALPHA / 2)
Z_POWER = NormalDist().inv_cdf(POWER)
Z_MDE = Z_ALPHA + Z_POWER  # 2.80

SEEDS_GRID, N_GRID = (3, 5, 8, 12), (150, 300, 600)
TARGET = 0.05  # the issue's +5 points
COMPARISONS = (("grpo", "sft", "test_in"), ("grpo", "sft", "test_irr"))
# Examples that exist for a larger held-out set (build_sets: prompts <= 512 tokens; counted with the SmolLM2
# tokenizer, `available_examples`). (a): live_simple 213 of 258 fit + simple_python 400 of 400 = 613, of which
# val takes 60 and the current (a) 150, and the other 403 are the training pool's call examples: no unused one.
# (c): irrelevance has 240 (all fit); the current (c) takes 120, the other 120 are unused.
POOL = {"test_in": 613 - 60, "test_irr": 240}
IN_USE = {"test_in": 150, "test_irr": 120}
# A larger (a) takes its examples from the training pool's 403 call examples (a new split, a new base):
# 300 leaves 253 of them to train on; all 553 would leave none.
PRACTICAL_N = 300


def mde(se: float) -> float:
    """Minimum detectable effect at 80% power, two-sided alpha 0.05, for a normal estimate with this SE."""
    return Z_MDE * se


def power_normal(delta, se: float):
    """Two-sided power of a z-test at alpha 0.05 against a true difference delta (array or scalar)."""
    cdf = np.vectorize(NormalDist().cdf)
    delta = np.asarray(delta, dtype=float)
    if se <= 0:
        return (delta != 0).astype(float)
    return cdf(delta / se - Z_ALPHA) + cdf(-delta / se - Z_ALPHA)


def se_discordance(d, seeds: int | None = None, n: int | None = None) -> float:
    """(1) SE of the mean of d when all seeds x n pairs are independent: var(d) = P(A != B) - delta^2, from the
    observed discordance rate and mean difference of d ([seeds][examples] of -1/0/1); S, n default to d's."""
    d = np.asarray(d, dtype=float)
    s0, n0 = d.shape
    p_disc, delta = float((d != 0).mean()), float(d.mean())
    return math.sqrt(max(p_disc - delta ** 2, 0.0) / ((seeds or s0) * (n or n0)))


def chi2_cdf(x: float, df: int) -> float:
    """P(chi2(df) <= x): the regularized lower incomplete gamma P(df/2, x/2) by its series (no scipy here)."""
    if x <= 0:
        return 0.0
    a, z = df / 2, x / 2
    term = total = 1.0 / a
    k = 0
    while term > 1e-15 * total and k < 10000:
        k += 1
        term *= z / (a + k)
        total += term
    return min(1.0, math.exp(-z + a * math.log(z) - math.lgamma(a)) * total)


def chi2_quantile(p: float, df: int) -> float:
    """The p-quantile of chi2(df), by bisection on chi2_cdf."""
    lo, hi = 0.0, max(10.0, 10.0 * df)
    while chi2_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Components:
    """(2) Variance components of a paired difference d[s, i] (crossed seeds x examples, one verdict each)."""
    mean: float
    seed: float      # var_u: between seeds, of the per-seed difference, example noise removed
    example: float   # var_v: between examples, of the per-example difference, seed noise removed
    residual: float  # var_e: seed x example interaction + the verdicts' own noise
    seeds: int
    n: int
    ms_seed: float   # the mean squares they come from (ms_seed has seeds - 1 degrees of freedom)
    ms_example: float
    ms_residual: float

    def se(self, seeds: int, n: int, over_seeds: bool = True) -> float:
        var = self.example / n + self.residual / (seeds * n)
        return math.sqrt(var + (self.seed / seeds if over_seeds else 0.0))


def components(d) -> Components:
    """ANOVA (method-of-moments) estimates for the two-way crossed model without replication:
    E[MS_seed] = var_e + n var_u, E[MS_example] = var_e + S var_v, E[MS_residual] = var_e."""
    d = np.asarray(d, dtype=float)
    k, n = d.shape
    if k < 2 or n < 2:
        raise ValueError(f"need >= 2 seeds and >= 2 examples, got {d.shape}")
    m = d.mean()
    rows, cols = d.mean(1), d.mean(0)
    ms_s = n * ((rows - m) ** 2).sum() / (k - 1)
    ms_i = k * ((cols - m) ** 2).sum() / (n - 1)
    resid = d - rows[:, None] - cols[None, :] + m
    ms_r = (resid ** 2).sum() / ((k - 1) * (n - 1))
    return Components(float(m), float(max((ms_s - ms_r) / n, 0.0)), float(max((ms_i - ms_r) / k, 0.0)),
                      float(ms_r), k, n,
                      float(ms_s), float(ms_i), float(ms_r))


def seed_variance_interval(c: Components, level: float = 0.95) -> tuple[float, float]:
    """Interval for var_u from MS_seed ~ (var_e + n var_u) chi2(S-1) / (S-1), var_e taken as known (it has
    (S-1)(n-1) degrees of freedom; var_u has S-1: with 3 seeds, 2)."""
    df = c.seeds - 1
    lo_q, hi_q = chi2_quantile((1 + level) / 2, df), chi2_quantile((1 - level) / 2, df)
    return (max((c.ms_seed * df / lo_q - c.residual) / c.n, 0.0), max((c.ms_seed * df / hi_q - c.residual) / c.n, 0.0))


# ------------------------------------------------------------------------------------ the protocol's CIs, fast

def _percentiles(stats) -> tuple[float, float]:
    lo, hi = np.percentile(stats, [2.5, 97.5], axis=-1)
    return lo, hi


def bootstrap_seeds_stats(d, reps: int = 10000, seed: int = 0, same_stream: bool = True,
                          with_examples: bool = False):
    """The resampled means of `bench_rl.bootstrap_seeds` (seeds, then examples, with replacement, each rep)
    without its Python-level loop over reps: equal, up to rounding, to its stats when same_stream (the same
    random draws in the same order); otherwise the same distribution from vectorised draws. with_examples:
    also return, from the same example draws, the resampled means of `bench_rl.bootstrap` (examples only, on
    the per-example seed-mean; a different random stream from it, the same distribution)."""
    d = np.asarray(d, dtype=float)
    k, n = d.shape
    rng = np.random.default_rng(seed)
    if same_stream:
        si, ei = np.empty((reps, k), dtype=np.int64), np.empty((reps, n), dtype=np.int64)
        for r in range(reps):
            si[r], ei[r] = rng.integers(0, k, k), rng.integers(0, n, n)
    else:
        si, ei = rng.integers(0, k, (reps, k)), rng.integers(0, n, (reps, n), dtype=np.int32)
    ei = ei + (np.arange(reps, dtype=ei.dtype) * n)[:, None]
    counts = np.bincount(ei.ravel(), minlength=reps * n).reshape(reps, n).astype(float)
    row_means = (counts @ d.T) / n  # [reps, seeds]: each seed's mean over that rep's examples
    stats = np.take_along_axis(row_means, si, axis=1).mean(1)
    return (stats, row_means.mean(1)) if with_examples else stats


def bootstrap_examples_stats(d, reps: int = 10000, seed: int = 0) -> np.ndarray:
    """The resampled means of `bench_rl.bootstrap` (fctrain.eval.paired_change on the per-example seed-mean)."""
    dbar = np.asarray(d, dtype=float).mean(0)
    return dbar[np.random.default_rng(seed).integers(0, dbar.size, size=(reps, dbar.size))].mean(1)


# ------------------------------------------------------------------------------------ (3) simulation

def simulate(d, seeds: int, n: int, deltas, sims: int = 400, reps: int = 1000, seed: int = 0,
             comps: Components | None = None) -> dict:
    """Power of the protocol's CIs against each true difference in `deltas`, for a design of `seeds` x `n`,
    from experiments drawn out of d ([S0][n0] paired differences):

    d = mean + a_s + b_i + r_si (two-way decomposition); a drawn experiment is
        x[j, k] = delta + c_u a[s_j] + c_v b[i_k] + c_e r[t_jk, m_jk]
    with s_j, i_k, t_jk, m_jk uniform with replacement and c_* rescaling each part's variance to the estimate
    `comps` (default components(d)): so the draw's true SE is exactly comps.se(seeds, n). Residuals are drawn
    per cell: a seed or example drawn twice must not repeat its residuals.

    Returns {"deltas", "seeds_ci": power of bench_rl.bootstrap_seeds's CI, "examples_ci": of bench_rl.bootstrap's
    CI (seeds fixed), "analytic": power_normal at comps.se(seeds, n), "se": that SE, "sd_of_means": the sd of the
    drawn experiments' means (checks the draw)}."""
    d = np.asarray(d, dtype=float)
    comps = comps or components(d)
    s0, n0 = d.shape
    m = d.mean()
    a, b = d.mean(1) - m, d.mean(0) - m
    r = d - m - a[:, None] - b[None, :]

    def scale(part, target):
        var = float((part ** 2).mean())
        return math.sqrt(target / var) if var > 0 else 0.0

    c_u, c_v, c_e = scale(a, comps.seed), scale(b, comps.example), scale(r, comps.residual)
    rng = np.random.default_rng(seed)
    bounds = np.empty((sims, 2, 2))  # [sim][seeds ci, examples ci][lo, hi]
    means = np.empty(sims)
    for t in range(sims):
        sj, ik = rng.integers(0, s0, seeds), rng.integers(0, n0, n)
        x = (c_u * a[sj][:, None] + c_v * b[ik][None, :]
             + c_e * r[rng.integers(0, s0, (seeds, n)), rng.integers(0, n0, (seeds, n))])
        means[t] = x.mean()
        both, examples = bootstrap_seeds_stats(x, reps, int(rng.integers(1 << 31)), same_stream=False,
                                               with_examples=True)
        bounds[t, 0] = _percentiles(both) if seeds >= 2 else np.nan
        bounds[t, 1] = _percentiles(examples)
    deltas = np.asarray(deltas, dtype=float)
    # the CI of x + delta is the CI of x shifted by delta: it excludes 0 when lo + delta > 0 or hi + delta < 0
    lo, hi = bounds[:, :, 0][:, :, None], bounds[:, :, 1][:, :, None]
    reject = ((lo + deltas) > 0) | ((hi + deltas) < 0)
    se = comps.se(seeds, n)
    return {"deltas": deltas, "seeds_ci": reject[:, 0].mean(0), "examples_ci": reject[:, 1].mean(0),
            "analytic": power_normal(deltas, se), "se": se, "sd_of_means": float(means.std(ddof=1)),
            "sims": sims}


def detectable(deltas, power, level: float = POWER) -> float:
    """The smallest delta on the grid (linearly interpolated) where the power curve reaches `level`; nan if
    it never does."""
    deltas, power = np.asarray(deltas, dtype=float), np.asarray(power, dtype=float)
    above = np.nonzero(power >= level)[0]
    if not above.size:
        return float("nan")
    j = above[0]
    if j == 0:
        return float(deltas[0])
    p0, p1 = power[j - 1], power[j]
    return float(deltas[j - 1] + (level - p0) * (deltas[j] - deltas[j - 1]) / (p1 - p0))


# ------------------------------------------------------------------------------------ the v6 data and costs

def load_cells(results: Path = RESULTS) -> dict:
    """{cell name: cell} of the finished arm cells (cells/<arm>-s<seed>.json)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((results / "cells").glob("*-s[0-9]*.json"))}


def paired_matrix(cells: dict, arm_a: str, arm_b: str, set_name: str) -> np.ndarray:
    """d[seed][example] = A - B over the seeds both arms finished on one base, examples in the stored order."""
    by = {(c["arm"], c["seed"]): c for c in cells.values()}
    keys = sorted(s for (arm, s) in by if arm == arm_a and (arm_b, s) in by
                  and by[(arm_b, s)]["base_sha"] == by[(arm_a, s)]["base_sha"])
    if not keys:
        raise ValueError(f"no seed of both {arm_a} and {arm_b}")
    rows = []
    for s in keys:
        ea, eb = by[(arm_a, s)]["eval"]["sets"][set_name], by[(arm_b, s)]["eval"]["sets"][set_name]
        if ea["ids"] != eb["ids"]:
            raise ValueError(f"seed {s}: {arm_a} and {arm_b} scored different examples on {set_name}")
        rows.append(np.asarray(ea["valid"], dtype=float) - np.asarray(eb["valid"], dtype=float))
    return np.asarray(rows)


def cell_costs(cells: dict) -> dict:
    """Seconds per arm cell on the v6 machine (2-core AMD EPYC): training process (model load + steps),
    evaluation per generated example and the rest of a cell (vLLM load, processes), from the cells' records."""
    arms = [c for c in cells.values() if c["arm"] in ("grpo", "egpo", "sft")]
    n_eval = [sum(s["n"] for s in c["eval"]["sets"].values()) for c in arms]
    eval_per_example = float(np.mean([c["eval"]["eval_s"] / k for c, k in zip(arms, n_eval)]))
    train = float(np.mean([c["train"]["process_s"] for c in arms]))
    wall = float(np.mean([c["meta"]["cell_wall_s"] for c in arms]))
    return {"train_s": train, "eval_per_example_s": eval_per_example,
            "overhead_s": wall - train - eval_per_example * float(np.mean(n_eval)), "cell_wall_s": wall,
            "eval_examples": float(np.mean(n_eval)), "eval_s": float(np.mean([c["eval"]["eval_s"] for c in arms]))}


def design_hours(costs: dict, seeds: int, n_in: int = 150, n_irr: int = 120, n_ood: int = 200,
                 arms: int = 2) -> float:
    """CPU hours (2 cores, one cell at a time) of `seeds` x `arms` arm cells, each trained as in v6 and
    evaluated on (a) n_in + (b) n_ood + (c) n_irr examples. The base SFT checkpoint (~46 min, trained once
    per split) is not included."""
    per_cell = costs["train_s"] + costs["overhead_s"] + costs["eval_per_example_s"] * (n_in + n_irr + n_ood)
    return seeds * arms * per_cell / 3600


def available_examples() -> dict:
    """{category: (all, prompts <= 512 tokens)} for the categories a larger (a) or (c) could come from
    (loads the tokenizer; the numbers behind POOL)."""
    from fctrain import data, models
    from fctrain.prompts import filter_by_length

    tok = models.load_tokenizer(models.resolve_model(None))
    out = {}
    for cat in ("live_simple", "simple_python", "irrelevance"):
        ex = data.load_bfcl(cat)
        out[cat] = (len(ex), len(filter_by_length(ex, tok, 512, "python")))
    return out


# ------------------------------------------------------------------------------------ the results

def cheapest(comp: Components, costs: dict, set_name: str, ns, target: float = TARGET, max_seeds: int = 200):
    """(hours, seeds, n) of the cheapest design, n in `ns`, whose seeds-resampled MDE is <= target; None if none
    up to max_seeds seeds."""
    best = None
    for n in ns:
        s = next((s for s in range(2, max_seeds + 1) if mde(comp.se(s, n)) <= target), None)
        if s is not None:
            h = design_hours(costs, s, **{"n_in" if set_name == "test_in" else "n_irr": n})
            if best is None or h < best[0]:
                best = (h, s, n)
    return best


def run(sims: int = 300, reps: int = 600, results: Path = RESULTS) -> list[dict]:
    """power.csv and power_vs_effect.png in `results` from its cells/ (the v6 matrix by default). Every design
    gets the analytic MDEs; those whose examples exist (n <= POOL) also the simulation (3)."""
    import time

    t0 = time.perf_counter()
    cells = load_cells(results)
    costs = cell_costs(cells)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_sha": common.git_sha()}
    deltas = np.round(np.arange(0, 0.3001, 0.0025), 4)
    rows, curves = [], {}
    for arm_a, arm_b, set_name in COMPARISONS:
        d = paired_matrix(cells, arm_a, arm_b, set_name)
        comp = components(d)
        u_lo, u_hi = seed_variance_interval(comp)
        designs = {(s, n): "grid" for s in SEEDS_GRID for n in N_GRID}
        designs[(3, IN_USE[set_name])] = "v6" + (" (grid)" if (3, IN_USE[set_name]) in designs else "")
        if set_name != "test_in":  # (c): every irrelevance example there is (120 of them unused today)
            designs |= {(s, POOL[set_name]): "all that exist" for s in SEEDS_GRID}
        if set_name == "test_in":  # the target is a difference on (a); on (c) it is a level (>= 80%)
            for ns, note in (((IN_USE[set_name], PRACTICAL_N),
                              f"cheapest for +{100 * TARGET:.0f} with n <= {PRACTICAL_N}"),
                             ((POOL[set_name],), f"cheapest for +{100 * TARGET:.0f} with all {POOL[set_name]}")):
                best = cheapest(comp, costs, set_name, ns)
                if best:
                    designs[(best[1], best[2])] = note
        for (s, n), note in designs.items():
            exists = n <= POOL[set_name]
            sim = simulate(d, s, n, deltas, sims=sims, reps=reps, seed=1000 * s + n, comps=comp) if exists else None
            if sim:
                curves[(arm_a, arm_b, set_name, s, n, note)] = sim
            kw = {"n_in": n} if set_name == "test_in" else {"n_irr": n}
            rows.append(meta | {
                "comparison": f"{arm_a}-{arm_b}", "set": set_name, "seeds": s, "n": n, "design": note,
                "n_exists": int(exists), "observed_diff": comp.mean,
                "sd_seed": math.sqrt(comp.seed), "sd_seed_lo95": math.sqrt(u_lo), "sd_seed_hi95": math.sqrt(u_hi),
                "sd_example": math.sqrt(comp.example), "sd_residual": math.sqrt(comp.residual),
                "mde_discordance": mde(se_discordance(d, s, n)), "mde_examples": mde(comp.se(s, n, False)),
                "mde_seeds": mde(comp.se(s, n)),
                "mde_seeds_hi95": mde(math.sqrt(comp.se(s, n) ** 2 + (u_hi - comp.seed) / s)),
                "mde_seeds_sim": detectable(deltas, sim["seeds_ci"]) if sim else None,
                "power_at_target": float(power_normal(TARGET, comp.se(s, n))),
                "power_at_target_sim": float(np.interp(TARGET, deltas, sim["seeds_ci"])) if sim else None,
                "type1_seeds_ci_sim": float(sim["seeds_ci"][0]) if sim else None,
                "type1_examples_ci_sim": float(sim["examples_ci"][0]) if sim else None,
                "sims": sims if sim else 0, "cpu_hours_2arms": design_hours(costs, s, **kw),
                "cpu_hours_3arms": design_hours(costs, s, arms=3, **kw)})
    common.write_csv(results / "power.csv", rows, list(rows[0]))
    plot(curves, results / "power_vs_effect.png", meta)
    print(f"[power] {len(rows)} designs, {len(curves)} simulated ({sims} experiments each), "
          f"{time.perf_counter() - t0:.0f} s; cell costs {json.dumps({k: round(v, 1) for k, v in costs.items()})}",
          flush=True)
    return rows


def plot(curves: dict, path: Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({k[2] for k in curves}, key=["test_in", "test_irr"].index)
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    colors = dict(zip(SEEDS_GRID, ("tab:red", "tab:orange", "tab:green", "tab:blue")))
    for ax, set_name in zip(axes[0], sets):
        styles = ({IN_USE[set_name]: "-", PRACTICAL_N: ":"} if set_name == "test_in"
                  else {150: "-", POOL[set_name]: ":"})
        for (arm_a, arm_b, s_name, s, n, note), sim in sorted(curves.items()):
            x = 100 * sim["deltas"]
            if s_name != set_name:
                continue
            if note.startswith("cheapest"):
                ax.plot(x, sim["seeds_ci"], "-", color="black", lw=2, label=f"S={s}, n={n}: {note}")
            elif note == "v6" or n in styles:
                ax.plot(x, sim["seeds_ci"], "-." if note == "v6" else styles[n], color=colors[s],
                        label=f"S={s}, n={n}" + (" (v6)" if note.startswith("v6") else ""))
                if note.startswith("v6"):
                    ax.plot(x, sim["analytic"], "--", color="grey", lw=0.8, label="normal formula, v6 design")
        ax.axhline(POWER, color="grey", lw=0.5)
        ax.axhline(ALPHA, color="grey", lw=0.5)
        ax.axvline(100 * TARGET, color="grey", lw=0.5, ls="--")
        ax.set_xlim(0, 25)
        ax.set_ylim(0, 1)
        ax.set_title(f"{'(a) in-distribution' if set_name == 'test_in' else '(c) irrelevance'}: GRPO - SFT control",
                     fontsize=9)
        ax.set_xlabel("true difference (accuracy points)")
        ax.set_ylabel("P(two-level bootstrap CI excludes 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle(f"power vs true effect, simulated from the v6 verdicts (protocol's CI over seeds and examples); "
                 f"git {meta['git_sha']}, {meta['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    run()
