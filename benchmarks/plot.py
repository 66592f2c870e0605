"""PNG plots from the benchmark CSVs in benchmarks/results/.

    python benchmarks/plot.py benchmarks/results/kernels_cpu.csv      # writes kernels_cpu.png beside it

One row of panels per shape: time relative to the LM-head matmul floor (or milliseconds where no floor
was measured) and peak extra memory, with one bar per provider in each op / mode / entropy group. The
device, dtype and shape are in every panel's title, so a figure never loses which machine it came from.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

COLORS = {"fctrain-triton": "#1b7837", "fctrain-torch": "#7fbf7b", "naive-eager": "#b2182b",
          "naive-compile": "#ef8a62", "liger-grpo": "#2166ac", "liger-flce": "#67a9cf", "cce": "#984ea3"}


def _measured(csv_path, png_path):
    """(csv path, png path defaulting to the CSV's name, the rows with status ok); no rows is an error."""
    csv_path = Path(csv_path)
    png_path = Path(png_path) if png_path else csv_path.with_suffix(".png")
    rows = [r for r in common.read_csv(csv_path) if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"{csv_path}: no measured rows to plot")
    return csv_path, png_path, rows


def plot_kernels(csv_path: Path, png_path: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path, png_path, rows = _measured(csv_path, png_path)
    shapes = list(dict.fromkeys((r["N"], r["H"], r["V"], r["dtype"]) for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(15, 4.2 * len(shapes)), squeeze=False)
    for (n, h, v, dtype), (ax_t, ax_m) in zip(shapes, axes):
        at = [r for r in rows if (r["N"], r["H"], r["V"], r["dtype"]) == (n, h, v, dtype)]
        device = at[0]["device"]
        floor = [r for r in at if r["provider"] == "lm-head-matmul"]
        groups = list(dict.fromkeys((r["op"], r["mode"], r["entropy"]) for r in at
                                    if r["provider"] != "lm-head-matmul"))
        providers = [p for p in COLORS if any(r["provider"] == p for r in at)]
        use_ratio = all(r["ratio_floor"] for r in at if r["provider"] != "lm-head-matmul")
        width = 0.8 / max(len(providers), 1)
        for j, prov in enumerate(providers):
            xs, ts, ms = [], [], []
            for g, (op, mode, ent) in enumerate(groups):
                hit = [r for r in at if r["provider"] == prov and (r["op"], r["mode"], r["entropy"]) == (op, mode, ent)]
                if hit:
                    xs.append(g + (j - (len(providers) - 1) / 2) * width)
                    ts.append(float(hit[0]["ratio_floor"] if use_ratio else hit[0]["time_ms"]))
                    ms.append(float(hit[0]["peak_mem_mb"]))
            ax_t.bar(xs, ts, width, label=prov, color=COLORS[prov])
            ax_m.bar(xs, ms, width, label=prov, color=COLORS[prov])
        labels = [f"{op}\n{mode}\nentropy {ent}" for op, mode, ent in groups]
        for ax in (ax_t, ax_m):
            ax.set_xticks(range(len(groups)), labels, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        if use_ratio:
            ax_t.axhline(1.0, color="k", lw=1, ls="--", label="matmul floor = 1")
            ax_t.set_ylabel("time / LM-head matmul, same mode (log)")
        else:
            ax_t.set_ylabel("median time (ms, log)")
        for r in floor:
            ax_t.annotate(f"floor {r['mode']}: {float(r['time_ms']):.4g} ms", xy=(0.01, 0.93 - 0.07 *
                          (r["mode"] == "fwd")), xycoords="axes fraction", fontsize=7)
        ax_t.set_yscale("log")
        ax_m.set_yscale("log")
        ax_m.set_ylabel("peak extra memory (MiB, log)")
        title = f"{device} | {dtype} | N={n} H={h} V={v}"
        ax_t.set_title("time: " + title, fontsize=9)
        ax_m.set_title("memory: " + title, fontsize=9)
        ax_t.legend(fontsize=7, ncol=2)
    sha = rows[0]["git_sha"]
    fig.suptitle(f"fctrain kernel benchmark ({csv_path.name}, git {sha}, {rows[0]['date']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def markdown_table(csv_path: Path, shape: tuple[int, int, int] | None = None) -> str:
    """A Markdown table of the measured kernel rows (optionally one N, H, V), for the README's
    Performance section; the device, dtype and date head it so the figures keep their provenance."""
    rows = [r for r in common.read_csv(csv_path) if r["status"] == "ok"]
    if shape is not None:
        rows = [r for r in rows if (int(r["N"]), int(r["H"]), int(r["V"])) == tuple(shape)]
    if not rows:
        raise ValueError(f"{csv_path}: no measured rows" + (f" at N, H, V = {shape}" if shape else ""))

    def cell(r, key, fmt):
        if not r[key]:
            return "-"
        x = float(r[key])
        return f"{x:.0f}" if fmt == "ms" and x >= 100 else format(x, ".3g" if fmt == "ms" else fmt)

    lines = [f"Device: {rows[0]['device']} | git {rows[0]['git_sha']} | {rows[0]['date']} | "
             f"torch {rows[0]['torch']}, liger-kernel {rows[0]['liger_kernel'] or '-'}",
             "",
             "| N, H, V | dtype | op | mode | entropy | provider | median ms (p20-p80) | x matmul | peak MiB | x naive |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['N']}, {r['H']}, {r['V']} | {r['dtype']} | {r['op']} | {r['mode']} | {r['entropy']} | "
                     f"{r['provider']} | {cell(r, 'time_ms', 'ms')} ({cell(r, 'time_p20_ms', 'ms')}-"
                     f"{cell(r, 'time_p80_ms', 'ms')}) | {cell(r, 'ratio_floor', '.2f')} | "
                     f"{cell(r, 'peak_mem_mb', '.1f')} | {cell(r, 'mem_ratio_naive', '.3f')} |")
    return "\n".join(lines)


def plot_train(csv_path: Path, png_path: Path | None = None, title: str = "RL training phase") -> Path:
    """bench_train.py / bench_trl.py results: step time and memory per provider, TRL's bar first, ratios on
    the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path, png_path, rows = _measured(csv_path, png_path)
    names = [r["provider"] for r in rows]
    colors = ["#b2182b" if n == "trl" else "#1b7837" if n == "fctrain" else "#7fbf7b" for n in names]
    panels = [("step_s", "time_vs_trl", "training-phase step (s)"),
              ("peak_rss_mb", "peak_rss_vs_trl", "process peak RSS (MiB)"),
              ("train_peak_extra_mb", "train_mem_vs_trl", "peak above loaded models (MiB)")]
    if rows[0].get("step_cpu_s"):  # bench_trl.py: CPU time per step too
        panels.insert(1, ("step_cpu_s", "cpu_vs_trl", "step CPU time, all threads (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.3 * len(panels), 4.2))
    for ax, (key, ratio, panel) in zip(axes, panels):
        vals = [float(r[key]) for r in rows]
        bars = ax.bar(names, vals, color=colors)
        for bar, r in zip(bars, rows):
            if r.get(ratio):
                ax.annotate(f"{float(r[ratio]):.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    r0 = rows[0]
    fig.suptitle(f"{title}, {r0['device']} | {r0['prompts']} prompts x {r0['group']} completions, prompt "
                 f"~{float(r0['prompt_tokens_mean']):.0f} tok, completion ~{float(r0['completion_tokens_mean']):.0f} "
                 f"tok | trl {r0['trl']} | git {r0['git_sha']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def train_markdown_table(csv_path: Path) -> str:
    rows = [r for r in common.read_csv(csv_path) if r["status"] == "ok"]
    r0 = rows[0]
    lines = [f"Device: {r0['device']} | git {r0['git_sha']} | {r0['date']} | torch {r0['torch']}, transformers "
             f"{r0['transformers']}, trl {r0['trl']} | {r0['sequences']} sequences (prompt ~"
             f"{float(r0['prompt_tokens_mean']):.0f}, completion ~{float(r0['completion_tokens_mean']):.0f} tokens)",
             "",
             "| provider | step s (p20-p80) | x TRL time | computed tokens | peak RSS MiB | x TRL | peak above loaded MiB | x TRL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda r, k, fmt: format(float(r[k]), fmt) if r.get(k) else "-"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['provider']} | {f(r, 'step_s', '.1f')} ({f(r, 'step_p20_s', '.1f')}-{f(r, 'step_p80_s', '.1f')}) "
                     f"| {f(r, 'time_vs_trl', '.2f')} | {r['computed_tokens']} | {f(r, 'peak_rss_mb', '.0f')} | "
                     f"{f(r, 'peak_rss_vs_trl', '.2f')} | {f(r, 'train_peak_extra_mb', '.0f')} | {f(r, 'train_mem_vs_trl', '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        raise SystemExit("usage: python benchmarks/plot.py RESULTS.csv [OUT.png]\n"
                         "       python benchmarks/plot.py --markdown RESULTS.csv [N,H,V]")
    csv_arg = Path(args[1] if args[0] == "--markdown" else args[0])
    train = "step_s" in common.read_csv(csv_arg)[0]  # a bench_train.py CSV
    if args[0] == "--markdown" and train:
        print(train_markdown_table(Path(args[1])))
    elif train:
        print(plot_train(Path(args[0]), Path(args[1]) if len(args) > 1 else None))
    elif args[0] == "--markdown":
        shape = tuple(int(x) for x in args[2].split(",")) if len(args) > 2 else None
        print(markdown_table(Path(args[1]), shape))
    else:
        print(plot_kernels(Path(args[0]), Path(args[1]) if len(args) > 1 else None))
