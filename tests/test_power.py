"""benchmarks/power.py (issue 30, part 4): the minimum detectable effect of a paired seeds x examples design,
against closed forms and against its own simulation on synthetic data. Tolerances come from the sample sizes
and the number of simulated experiments, not from a printed run."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import power  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bench_rl_power", BENCH / "bench_rl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _bernoulli_pairs(p_a, p_b, seeds, n, rng):
    """Two arms scored independently on every (seed, example): no seed or example effect at all."""
    return (rng.random((seeds, n)) < p_a).astype(float) - (rng.random((seeds, n)) < p_b).astype(float)


def test_mde_formula_closed_form():
    assert power.Z_MDE == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    # 200 pairs: 30% A right and B wrong, 10% the reverse: P(A != B) = 0.4, delta = 0.2, var(d) = 0.4 - 0.04
    row = [1] * 30 + [-1] * 10 + [0] * 60
    d = np.array([row, row[::-1]], dtype=float)
    assert power.se_discordance(d) == pytest.approx(math.sqrt(0.36 / 200))
    assert power.se_discordance(d, seeds=8, n=300) == pytest.approx(math.sqrt(0.36 / 2400))
    se = power.se_discordance(d)
    assert power.mde(se) == pytest.approx(2.801585 * math.sqrt(0.36 / 200), rel=1e-6)
    # at the MDE the two-sided z-test has 80% power (the far tail adds ~1e-6), at 0 its level
    assert power.power_normal(power.mde(se), se) == pytest.approx(0.8, abs=1e-5)
    assert power.power_normal(0.0, se) == pytest.approx(0.05, abs=1e-9)
    assert power.chi2_quantile(0.975, 2) == pytest.approx(-2 * math.log(0.025), rel=1e-9)  # closed form at df 2
    assert power.chi2_quantile(0.95, 10) == pytest.approx(18.307038, rel=1e-6)


def test_independent_bernoulli_differences_all_three_agree_with_the_closed_form():
    """Independent Bernoulli verdicts: var(d) = pA(1-pB) + pB(1-pA) - (pA-pB)^2, no seed or example component,
    so the seeds-resampled SE equals the discordance SE = sqrt(var(d) / (S n))."""
    p_a, p_b, seeds, n = 0.40, 0.33, 4, 20000
    d = _bernoulli_pairs(p_a, p_b, seeds, n, np.random.default_rng(0))
    plus, minus = p_a * (1 - p_b), p_b * (1 - p_a)
    delta = plus - minus
    var = plus + minus - delta ** 2
    mu4 = plus * (1 - delta) ** 4 + minus * (1 + delta) ** 4 + (1 - plus - minus) * delta ** 4
    c = power.components(d)
    df_r = (seeds - 1) * (n - 1)
    assert c.residual == pytest.approx(var, abs=5 * math.sqrt((mu4 - var ** 2) / df_r))
    # var_u and var_v: true 0; their estimates' noise is that of a mean square about var_e, over n or S
    assert c.seed <= 5 * var * math.sqrt(2 / (seeds - 1)) / n
    assert c.example <= 5 * var * math.sqrt(2 / (n - 1)) / seeds
    closed = power.Z_MDE * math.sqrt(var / (3 * 150))
    for got in (power.mde(power.se_discordance(d, 3, 150)), power.mde(c.se(3, 150)), power.mde(c.se(3, 150, False))):
        assert got == pytest.approx(closed, rel=0.03)


def test_components_recover_known_variances():
    rng = np.random.default_rng(1)
    seeds, n, su, sv, se = 60, 400, 0.06, 0.18, 0.40
    d = 0.05 + rng.normal(0, su, (seeds, 1)) + rng.normal(0, sv, (1, n)) + rng.normal(0, se, (seeds, n))
    c = power.components(d)
    df_r = (seeds - 1) * (n - 1)
    # sampling sd of the ANOVA estimates (normal data): mean squares ~ E[MS] chi2(df) / df
    sd_u = math.sqrt(2 * (se ** 2 + n * su ** 2) ** 2 / (seeds - 1) + 2 * se ** 4 / df_r) / n
    sd_v = math.sqrt(2 * (se ** 2 + seeds * sv ** 2) ** 2 / (n - 1) + 2 * se ** 4 / df_r) / seeds
    assert c.seed == pytest.approx(su ** 2, abs=5 * sd_u)
    assert c.example == pytest.approx(sv ** 2, abs=5 * sd_v)
    assert c.residual == pytest.approx(se ** 2, abs=5 * se ** 2 * math.sqrt(2 / df_r))
    assert c.se(5, 300) == pytest.approx(math.sqrt(c.seed / 5 + c.example / 300 + c.residual / 1500))
    lo, hi = power.seed_variance_interval(c)
    assert lo < c.seed < hi


def test_fast_bootstraps_are_the_protocols():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, (3, 150)), rng.integers(0, 2, (3, 150))
    d = a - b
    m, lo, hi = bench.bootstrap_seeds(a, b, reps=3000, seed=5)
    stats = power.bootstrap_seeds_stats(d, reps=3000, seed=5)
    assert np.percentile(stats, [2.5, 97.5]) == pytest.approx([lo, hi], abs=1e-12)
    m, lo, hi = bench.bootstrap(a, b, reps=3000, seed=5)
    assert np.percentile(power.bootstrap_examples_stats(d, 3000, 5), [2.5, 97.5]) == pytest.approx([lo, hi],
                                                                                                      abs=1e-12)
    # the vectorised draws: the same distribution (sd of the resampled means within 5 of its sampling sds)
    fast = power.bootstrap_seeds_stats(d, reps=3000, seed=6, same_stream=False)
    assert fast.std() == pytest.approx(stats.std(), rel=5 * math.sqrt(2 / 3000))


def test_simulated_power_matches_the_analytic_power():
    """Synthetic seeds x examples with a seed, an example and a residual part; with 20 seeds the protocol's
    percentile CI is close to a z-interval (its seed part shrinks by 19/20, the residual, counted at both
    levels, is small here), so the simulated power must equal the normal formula's within Monte Carlo error
    of `sims` Bernoulli outcomes (5 sd)."""
    rng = np.random.default_rng(3)
    s0, n0 = 20, 100
    d = rng.normal(0, 0.05, (s0, 1)) + rng.normal(0, 0.2, (1, n0)) + rng.normal(0, 0.05, (s0, n0))
    c = power.components(d)
    sims = 400
    se = c.se(s0, n0)
    target = power.mde(se)
    sim = power.simulate(d, s0, n0, [0.0, target / 2, target], sims=sims, reps=1000, seed=4, comps=c)
    assert sim["se"] == pytest.approx(se)
    # the drawn experiments have the SE the formula assumes (sample sd of `sims` means: relative sd 1/sqrt(2 sims))
    assert sim["sd_of_means"] == pytest.approx(se, rel=5 / math.sqrt(2 * (sims - 1)))
    for p_sim, p_true in zip(sim["seeds_ci"], power.power_normal(sim["deltas"], se)):
        assert p_sim == pytest.approx(p_true, abs=5 * math.sqrt(p_true * (1 - p_true) / sims))
    assert sim["analytic"][2] == pytest.approx(0.8, abs=1e-4)
    # the detectable effect read off the simulated curve
    deltas = np.linspace(0, 2 * target, 41)
    sim2 = power.simulate(d, s0, n0, deltas, sims=sims, reps=1000, seed=5, comps=c)
    slope = (power.power_normal(target * 1.05, se) - power.power_normal(target * 0.95, se)) / (0.1 * target)
    assert power.detectable(deltas, sim2["seeds_ci"]) == pytest.approx(
        target, abs=5 * math.sqrt(0.16 / sims) / slope + deltas[1])


def test_few_seeds_with_a_seed_effect_fool_the_examples_only_ci():
    """What the v6 report warns about: with a real seed effect, the CI over examples alone rejects a true
    difference of 0 far more often than 5%; the seeds-and-examples CI much less."""
    rng = np.random.default_rng(6)
    d = rng.normal(0, 0.06, (3, 1)) + rng.normal(0, 0.18, (1, 150)) + rng.normal(0, 0.4, (3, 150))
    sim = power.simulate(d, 3, 150, [0.0], sims=300, reps=500, seed=7)
    assert sim["examples_ci"][0] > 0.05 + 5 * math.sqrt(0.05 * 0.95 / 300)
    assert sim["seeds_ci"][0] < sim["examples_ci"][0]


def _cell(arm, seed, valid, process_s=400.0):
    sets = {name: {"n": len(v), "ids": [f"{name}_{i}" for i in range(len(v))], "valid": list(v)}
            for name, v in valid.items()}
    return {"cell": f"{arm}-s{seed}", "arm": arm, "seed": seed, "base_sha": "b",
            "train": {"process_s": process_s, "train_s": process_s - 20},
            "eval": {"eval_s": 0.8 * sum(len(v) for v in valid.values()), "sets": sets},
            "meta": {"cell_wall_s": process_s + 20 + 0.8 * sum(len(v) for v in valid.values())}}


def test_run_on_synthetic_cells(tmp_path):
    rng = np.random.default_rng(8)
    (tmp_path / "cells").mkdir()
    for s in range(3):
        for arm, p in (("grpo", 0.45), ("sft", 0.35)):
            valid = {"test_in": (rng.random(150) < p).astype(int).tolist(),
                     "test_ood": (rng.random(200) < 0.1).astype(int).tolist(),
                     "test_irr": (rng.random(120) < p + 0.2).astype(int).tolist()}
            (tmp_path / "cells" / f"{arm}-s{s}.json").write_text(json.dumps(_cell(arm, s, valid)))
    cells = power.load_cells(tmp_path)
    d = power.paired_matrix(cells, "grpo", "sft", "test_in")
    assert d.shape == (3, 150)
    costs = power.cell_costs(cells)
    assert costs["eval_per_example_s"] == pytest.approx(0.8) and costs["overhead_s"] == pytest.approx(20.0)
    assert power.design_hours(costs, 3) == pytest.approx(3 * 2 * (400 + 20 + 0.8 * 470) / 3600)
    rows = power.run(sims=20, reps=100, results=tmp_path)
    assert len(rows) >= 2 * 12 and (tmp_path / "power.csv").exists() and (tmp_path / "power_vs_effect.png").exists()
    for r in rows:  # resampling seeds too never makes the detectable effect smaller
        assert r["mde_examples"] <= r["mde_seeds"] + 1e-12
    by = {(r["set"], r["seeds"], r["n"]): r["mde_seeds"] for r in rows}
    assert by[("test_in", 12, 600)] < by[("test_in", 3, 150)]
    assert sum(r["n_exists"] == 0 for r in rows if r["set"] == "test_in") == 4  # n = 600 > the 553 that exist
    assert all(r["sims"] == 0 and r["mde_seeds_sim"] is None for r in rows if not r["n_exists"])
