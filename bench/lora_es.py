"""Issue 22's measurements, written into docs/lora_es.md's data folder (docs/lora_es_data/):

    python bench/lora_es.py curves    # reward against wall-clock time: LoRA rank 8 and 1, full, lowrank
    python bench/lora_es.py report    # curves' table and figure again, from the runs it wrote
    python bench/lora_es.py memory    # one iteration at population 30: seconds and peak RSS per mode
    python bench/lora_es.py base      # the untrained model, measured as `curves` measures a run

`curves` trains the bundled model in bf16 with README command 1's settings (population 8, 32 new
tokens, 1 thread) for 20 iterations, --eval_every 4 on the 12 held-out prompts (greedy, with
--eval_kl_samples 2), in four modes: full-weight ES and --noise_mode lowrank at command 1's sigma
0.01 (alpha 0.005), and --es_params lora --lora_batch at rank 8 and rank 1, whose sigma (alpha =
sigma / 2) comes from a one-seed sweep (seed 33) per rank, since sigma means something else on an
adapter. Then 3 seeds per mode (the sweep's best run is seed 33's). Each final model (or adapter)
is evaluated by eval_conciseness.py (4 samples per held-out prompt at T = 1, 32 new tokens): the
paper's held-out reward and per-token KL to the base model. Runs go one after the other in this
process (the machine should be otherwise quiet); every run's metrics.jsonl lands in runs/, the
evaluations in eval/, with a table (curves.md) and a figure (reward_vs_time.png).

`base` gives the table its starting point: eval_conciseness.py on the bundled model itself (eval/base)
and its greedy held-out reward and KL as --eval_every computes them (one iteration at alpha 1e-30, which
leaves the weights as they are (1e-30: zero is refused); base/runs/base.jsonl).

`memory` runs one iteration at population 30 per mode, each in its own process through
bench/peak_rss.py (peak RSS from the evaluator on, the model already loaded), and writes
memory.md: seconds per iteration and peak RSS against one model.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuning import ROOT, heldout_curve, run_main, train  # noqa: E402

DATA = ROOT / "docs" / "lora_es_data"
ITERATIONS = 20
SEEDS = (33, 34, 35)
FULL_SIGMA = 0.01
LORA_SWEEP = (0.01, 0.03, 0.1)
MODES = {  # name: flags (sigma apart)
    "full": [],
    "lowrank": ["--noise_mode", "lowrank"],
    "lora-r8": ["--es_params", "lora", "--lora_batch", "--lora_rank", "8"],
    "lora-r1": ["--es_params", "lora", "--lora_batch", "--lora_rank", "1"],
}
COLOURS = {"full": "tab:blue", "lowrank": "tab:green", "lora-r8": "tab:red", "lora-r1": "tab:orange"}


def evaluate(name: str):
    """eval_conciseness.py on a finished run's directory, its summary kept under eval/`name`."""
    def after(run_dir: Path) -> None:
        run_main("eval_conciseness.py", [
            "--model_path", str(run_dir), "--base_model_name", "bundled", "--precision", "bf16",
            "--num_samples", "4", "--max_new_tokens", "32", "--label", name,
            "--output_dir", str(DATA / "eval" / name)])
    return after


def run(mode: str, sigma: float, seed: int) -> tuple:
    """One run: (its name, its records)."""
    name = f"{mode}-sigma{sigma}-seed{seed}"
    return name, train(name, *MODES[mode], "--sigma", sigma, "--alpha", sigma / 2,
                       "--initial_seed", seed, data=DATA, iterations=ITERATIONS,
                       after=evaluate(name))


def curves(args) -> None:
    runs, sigmas = {}, {"full": FULL_SIGMA, "lowrank": FULL_SIGMA}
    for mode in ("lora-r8", "lora-r1"):
        sweep = dict(run(mode, sigma, SEEDS[0]) for sigma in LORA_SWEEP)
        runs.update(sweep)
        sigmas[mode] = max(LORA_SWEEP, key=lambda s: heldout_curve(
            sweep[f"{mode}-sigma{s}-seed{SEEDS[0]}"])[1][-1])
    for mode in MODES:
        for seed in SEEDS:
            if f"{mode}-sigma{sigmas[mode]}-seed{seed}" not in runs:
                runs.update([run(mode, sigmas[mode], seed)])
    (DATA / "sigmas.json").write_text(json.dumps(sigmas))
    report_curves(runs, sigmas)


def report(args) -> None:
    """The table and figure again, from what `curves` wrote (runs/, eval/, sigmas.json)."""
    runs = {path.stem: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((DATA / "runs").glob("*.jsonl"))}
    report_curves(runs, json.loads((DATA / "sigmas.json").read_text()))


def base(args) -> None:
    run_main("eval_conciseness.py", [
        "--base_model_name", "bundled", "--precision", "bf16", "--num_samples", "4",
        "--max_new_tokens", "32", "--label", "base", "--output_dir", str(DATA / "eval" / "base")])
    [record] = train("base", "--alpha", 1e-30, "--population_size", 2, "--eval_every", 1,
                     data=DATA / "base", iterations=1)
    print(f"base model: greedy held-out reward {record['heldout_reward_mean']:.2f}, "
          f"KL {record['heldout_kl_mean']:.4f}")


def final_eval(name: str) -> dict:
    return json.loads((DATA / "eval" / name / "summary.json").read_text())


def report_curves(runs: dict, sigmas: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["| run | training s | training reward, iteration 1 -> 20 | held-out reward (greedy) at "
            "iterations 4, 8, 12, 16, 20 | eval_conciseness.py reward | KL |",
            "|---|---|---|---|---|---|"]
    fig, (train_ax, heldout_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, records in runs.items():
        mode, sigma, seed = re.fullmatch(r"(.+)-sigma(.+)-seed(\d+)", name).groups()
        summary = final_eval(name)
        rows.append(f"| {name} | {sum(r['time_s'] for r in records):.0f} | "
                    f"{records[0]['reward_mean']:.2f} -> {records[-1]['reward_mean']:.2f} | "
                    f"{', '.join(f'{y:.2f}' for y in heldout_curve(records)[1])} | "
                    f"{summary['reward_mean']:.2f} | {summary['kl_mean']:.4f} |")
        if float(sigma) != sigmas[mode]:
            continue  # a sweep's other runs: in the table only
        label = f"{mode} (sigma {sigma})" if int(seed) == SEEDS[0] else None
        clock = np.cumsum([r["time_s"] for r in records])
        train_ax.plot(clock, [r["reward_mean"] for r in records], color=COLOURS[mode],
                      alpha=0.7, label=label)
        xs, ys, _ = heldout_curve(records)
        heldout_ax.plot(xs, ys, marker="o", color=COLOURS[mode], alpha=0.7, label=label)
    for ax, what in ((train_ax, "training reward (population mean, 2 prompts)"),
                     (heldout_ax, "held-out reward (greedy, 12 prompts)")):
        ax.set_xlabel("training wall-clock seconds (held-out evaluation excluded)")
        ax.set_ylabel(what)
        ax.legend()
    fig.suptitle("Conciseness, bundled SmolLM2-135M bf16, population 8: LoRA-space ES against "
                 "full-weight and low-rank ES, 3 seeds each")
    fig.tight_layout()
    fig.savefig(DATA / "reward_vs_time.png", dpi=120)
    means = []
    if (DATA / "eval" / "base" / "summary.json").exists():
        [record] = [json.loads(line) for line in
                    (DATA / "base" / "runs" / "base.jsonl").read_text().splitlines()]
        rows.append(f"| base model | - | - | {record['heldout_reward_mean']:.2f} (KL "
                    f"{record['heldout_kl_mean']:.4f}) | {final_eval('base')['reward_mean']:.2f} | "
                    f"{final_eval('base')['kl_mean']:.4f} |")
        means.append(f"| base model | - | 0 | {final_eval('base')['reward_mean']:.2f} | "
                     f"{final_eval('base')['kl_mean']:.4f} |")
    for mode, sigma in sigmas.items():
        names = [f"{mode}-sigma{sigma}-seed{s}" for s in SEEDS]
        seconds = [sum(r["time_s"] for r in runs[n]) for n in names]
        finals = [final_eval(n) for n in names]
        means.append(f"| {mode} | {sigma} | {np.mean(seconds):.0f} | "
                     f"{np.mean([f['reward_mean'] for f in finals]):.2f} +/- "
                     f"{np.std([f['reward_mean'] for f in finals]):.2f} | "
                     f"{np.mean([f['kl_mean'] for f in finals]):.4f} +/- "
                     f"{np.std([f['kl_mean'] for f in finals]):.4f} |")
    summary = "\n".join(rows) + "\n\n" + "\n".join([
        f"| mode | sigma | training s (mean) | eval_conciseness.py reward (mean +/- std over seeds "
        f"{SEEDS}) | KL (mean +/- std) |", "|---|---|---|---|---|", *means])
    (DATA / "curves.md").write_text(summary + "\n")
    print(summary)


MEMORY_COMMON = ["--model_name", "bundled", "--precision", "bf16", "--num_iterations", "1",
                 "--population_size", "30", "--max_new_tokens", "32", "--report_to", "none",
                 "--overwrite"]
MEMORY_ROWS = [  # (label, flags, torch threads)
    ("(a) full weights, 4 thread copies", ["--gpu_threads", "4"], 1),
    ("(b) LoRA rank 8, 4 thread copies", ["--es_params", "lora", "--gpu_threads", "4"], 1),
    ("(c) LoRA rank 8, --lora_batch", ["--es_params", "lora", "--lora_batch"], 1),
    ("(d) --noise_mode lowrank", ["--noise_mode", "lowrank"], 1),
    ("(c) LoRA rank 8, --lora_batch", ["--es_params", "lora", "--lora_batch"], 2),
    ("(d) --noise_mode lowrank", ["--noise_mode", "lowrank"], 2),
    ("(c') LoRA rank 8, --lora_batch --lowrank_batch 30",
     ["--es_params", "lora", "--lora_batch", "--lowrank_batch", "30"], 1),
]


def memory(args) -> None:
    lines = ["| row | torch threads | s / iteration | one model MiB | peak RSS from the evaluator "
             "on, MiB | ratio to one model |", "|---|---|---|---|---|---|"]
    for label, flags, threads in MEMORY_ROWS:
        out = Path(tempfile.mkdtemp(prefix="lora-memory-")) / "run"
        command = [sys.executable, str(ROOT / "bench" / "peak_rss.py"),
                   "es_fine-tuning_conciseness.py", *MEMORY_COMMON, "--output_dir", str(out), *flags]
        print(" ".join(command), flush=True)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if done.returncode:
            sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
        peaks = dict(re.findall(r"(\w+_MiB)=(\d+)", done.stderr))
        [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        start, peak = int(peaks["rss_at_start_MiB"]), int(peaks["hwm_since_start_MiB"])
        lines.append(f"| {label} | {threads} | {record['time_s']:.1f} | {start} | {peak} | "
                     f"{peak / start:.2f} |")
        print(lines[-1], flush=True)
        subprocess.run(["rm", "-rf", str(out.parent)], check=True)
    (DATA / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["curves", "report", "memory", "base"])
    args = p.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    {"curves": curves, "report": report, "memory": memory, "base": base}[args.what](args)
    print(f"{args.what}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
