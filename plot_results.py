"""Turn runs into figures (PNG):

- reward_curves.png: reward over ES iterations from one or more metrics.jsonl (a trainer writes one
  into its output directory): the population's mean reward as a line, its min-max range as a band,
  one labelled line per run; a run trained with --eval_every also gets its held-out reward as a
  dashed line of the same colour;
- reward_vs_kl.png: mean reward against mean per-token KL from the base model, from the summary.json
  files of eval_conciseness.py (the paper's reward/KL Pareto figure); the base model is a star.

    python plot_results.py --metrics RUN_A RUN_B --labels "sigma 0.001" "sigma 0.01" \
        --evals EVAL_BASE EVAL_A EVAL_B --output_dir docs
"""
import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
HELDOUT = "heldout_reward_mean"  # what --eval_every records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", nargs="+", default=[],
                   help=f"{METRICS_FILE} files, or run directories holding one")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one legend label per --metrics entry (default: the run directory's name)")
    p.add_argument("--evals", nargs="+", default=[],
                   help=f"eval_conciseness.py {SUMMARY_FILE} files, or directories holding one")
    p.add_argument("--eval_labels", nargs="+", default=None,
                   help="one label per --evals entry (default: the summary's label)")
    p.add_argument("--x", default="iteration", choices=["iteration", "time"],
                   help="x axis of the reward curves: iteration, or cumulative wall-clock seconds")
    p.add_argument("--title", default=None, help="prefix for the figure titles")
    p.add_argument("--output_dir", default=".", help="where the PNGs go")
    p.add_argument("--prefix", default="", help="prefix of the PNG file names")
    return p


def _resolve(path, filename) -> Path:
    path = Path(path)
    path = path / filename if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give a {filename} file or a directory holding one")
    return path


def read_metrics(path) -> list:
    path = _resolve(path, METRICS_FILE)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    needed = ("iteration", "reward_mean", "reward_min", "reward_max")
    if not records or any(k not in r for r in records for k in needed):
        raise ValueError(f"{path} has no iterations with the fields {', '.join(needed)}; is it a "
                         f"trainer's {METRICS_FILE}?")
    return sorted(records, key=lambda r: r["iteration"])


def read_summary(path) -> dict:
    path = _resolve(path, SUMMARY_FILE)
    summary = json.loads(path.read_text())
    if "reward_mean" not in summary or "kl_mean" not in summary:
        raise ValueError(f"{path} has no reward_mean and kl_mean; is it an eval_conciseness.py "
                         f"{SUMMARY_FILE}?")
    return summary


def _labels(given, paths, default):
    if given is None:
        return [default(p) for p in paths]
    if len(given) != len(paths):
        raise ValueError(f"{len(given)} labels for {len(paths)} inputs; give one label per input")
    return given


def _run_name(path) -> str:
    path = Path(path)
    return (path.parent if path.name == METRICS_FILE else path).name


def plot_reward_curves(runs, labels, out: Path, title=None, x_axis="iteration") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for records, label in zip(runs, labels):
        if x_axis == "time":  # cumulative wall-clock seconds at the end of each iteration
            x = list(itertools.accumulate(r["time_s"] for r in records))
        else:
            x = [r["iteration"] for r in records]
        line, = ax.plot(x, [r["reward_mean"] for r in records], marker="o", markersize=3,
                        label=label)
        ax.fill_between(x, [r["reward_min"] for r in records], [r["reward_max"] for r in records],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        heldout = [(xi, r[HELDOUT]) for xi, r in zip(x, records) if HELDOUT in r]
        if heldout:  # --eval_every: the canonical model on held-out prompts
            ax.plot(*zip(*heldout), linestyle="--", marker="s", markersize=4,
                    color=line.get_color(), label=f"{label} (held-out)")
    held = any(HELDOUT in r for records in runs for r in records)
    ax.set_xlabel("wall-clock time (s)" if x_axis == "time" else "ES iteration")
    ax.set_ylabel("reward" if held else "training reward (population)")
    ax.set_title((f"{title}\n" if title else "") + f"training reward per {x_axis} "
                 "(line: population mean, band: min-max"
                 + ("; dashed: held-out reward, --eval_every)" if held else ")"), fontsize=10)
    return _save(fig, ax, out)


def _save(fig, ax, out: Path) -> Path:
    """Grid, legend, layout, written to `out`; the figure is closed."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_reward_vs_kl(summaries, labels, out: Path, title=None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for summary, label in zip(summaries, labels):
        base = summary.get("is_base_model", False)
        count = summary.get("num_prompts", 0) * summary.get("num_samples", 0)
        error = summary["reward_std"] / math.sqrt(count) if count and "reward_std" in summary else None
        ax.errorbar(summary["kl_mean"], summary["reward_mean"], yerr=error, capsize=3,
                    marker="*" if base else "o", markersize=14 if base else 8,
                    color="black" if base else None, linestyle="none", zorder=3, label=label)
    ax.set_xlabel("mean per-token KL divergence from the base model (k3)")
    ax.set_ylabel("mean reward on held-out prompts (bars: ±1 s.e.)")
    first = summaries[0]
    ax.set_title((f"{title}\n" if title else "") + f"held-out reward vs KL from the base model "
                 f"({first.get('num_samples', '?')} samples/prompt, T={first.get('temperature', '?')})",
                 fontsize=10)
    return _save(fig, ax, out)


def make_plots(args) -> list:
    if not args.metrics and not args.evals:
        raise ValueError("nothing to plot: give --metrics and/or --evals")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.metrics:
        runs = [read_metrics(p) for p in args.metrics]
        labels = _labels(args.labels, args.metrics, _run_name)
        written.append(plot_reward_curves(runs, labels, out / f"{args.prefix}reward_curves.png",
                                          args.title, args.x))
    if args.evals:
        summaries = [read_summary(p) for p in args.evals]
        labels = _labels(args.eval_labels, summaries,
                         lambda s: "base model" if s.get("is_base_model") else s.get("label", "?"))
        written.append(plot_reward_vs_kl(summaries, labels, out / f"{args.prefix}reward_vs_kl.png",
                                         args.title))
    return written


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        for path in make_plots(args):
            print(f"wrote {path}")
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
