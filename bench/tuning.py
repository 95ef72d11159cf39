"""Issue 23's measurements, written into docs/tuning.md's data folder (docs/tuning_data/):

    python bench/tuning.py curves     # SGD (published step) vs Adam on conciseness, held-out curves
    python bench/tuning.py batch      # a Countdown iteration: --prompt_batch 16 vs all 200 prompts
    python bench/tuning.py spread     # a member's reward over 3 repeats, --num_rollouts 1 vs 4

`curves` trains the bundled model in bf16 with README command 1's settings (population 8, sigma
0.01, 32 new tokens, 1 thread), 12 iterations, --eval_every 4 on the 12 held-out prompts of
eval_conciseness.py (with --eval_kl_samples 2): first a one-seed sweep of Adam's learning rate,
then 3 seeds of SGD (alpha 0.005, README command 1's) and of the sweep's best Adam; it writes every
run's metrics.jsonl, a figure of held-out reward against wall-clock time, and a table. Each run goes
in this process, one after the other (the machine should be otherwise quiet).
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "docs" / "tuning_data"
COMMAND_1 = ["--model_name", "bundled", "--population_size", "8", "--sigma", "0.01",
             "--max_new_tokens", "32", "--gpu_threads", "1", "--report_to", "none"]
ITERATIONS, EVAL_EVERY = 12, 4
SGD_ALPHA = 0.005
ADAM_SWEEP = (0.0003, 0.001, 0.003)
SEEDS = (33, 34, 35)


def run_main(script: str, argv: list) -> None:
    """A script's main() in this process, with `argv` as its command line."""
    from es_llm.tasks import load_python_file

    module = load_python_file(ROOT / script, Path(script).stem.replace("-", "_"))
    print(" ".join(argv), flush=True)
    old, sys.argv = sys.argv, [Path(script).name, *argv]
    try:
        module.main()
    finally:
        sys.argv = old


def train(name: str, *extra, data: Path = DATA, iterations: int = ITERATIONS, after=None) -> list:
    """One conciseness run (es_fine-tuning_conciseness.py's main, in this process); its records,
    also written to `data`/runs/`name`.jsonl. `after(run_dir)`, if given, sees the saved run
    before it is deleted."""
    out = Path(tempfile.mkdtemp(prefix="tuning-")) / name
    run_main("es_fine-tuning_conciseness.py", [
        *COMMAND_1, "--num_iterations", str(iterations), "--eval_every", str(EVAL_EVERY),
        "--eval_kl_samples", "2", "--output_dir", str(out), *map(str, extra)])
    text = (out / "metrics.jsonl").read_text()
    (data / "runs").mkdir(parents=True, exist_ok=True)
    (data / "runs" / f"{name}.jsonl").write_text(text)  # the records, not the weights
    if after is not None:
        after(out)
    shutil.rmtree(out.parent)
    records = [json.loads(line) for line in text.splitlines()]
    return records


def heldout_curve(records) -> tuple:
    """(wall-clock seconds of training at each evaluation, held-out reward, KL) of one run."""
    clock, xs, ys, kls = 0.0, [], [], []
    for r in records:
        clock += r["time_s"]
        if "heldout_reward_mean" in r:
            xs.append(clock)
            ys.append(r["heldout_reward_mean"])
            kls.append(r.get("heldout_kl_mean"))
    return xs, ys, kls


def curves(args) -> None:
    runs = {}
    for lr in ADAM_SWEEP:
        runs[f"adam-{lr}-seed{SEEDS[0]}"] = train(f"adam-{lr}-seed{SEEDS[0]}", "--optimizer", "adam",
                                                  "--alpha", lr, "--initial_seed", SEEDS[0])
    best = max(ADAM_SWEEP, key=lambda lr: heldout_curve(runs[f"adam-{lr}-seed{SEEDS[0]}"])[1][-1])
    for seed in SEEDS:
        runs[f"sgd-{SGD_ALPHA}-seed{seed}"] = train(f"sgd-{SGD_ALPHA}-seed{seed}", "--alpha",
                                                    SGD_ALPHA, "--initial_seed", seed)
        if seed != SEEDS[0]:
            runs[f"adam-{best}-seed{seed}"] = train(f"adam-{best}-seed{seed}", "--optimizer",
                                                    "adam", "--alpha", best, "--initial_seed", seed)
    report_curves(runs, best)


def report_curves(runs: dict, best: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["| run | held-out reward at iterations 4, 8, 12 | KL at 12 | training s | "
            "held-out evaluation s |", "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"sgd": "tab:blue", "adam": "tab:red"}
    for name, records in runs.items():
        xs, ys, kls = heldout_curve(records)
        kind = name.split("-")[0]
        in_figure = kind == "sgd" or name.startswith(f"adam-{best}-")
        if in_figure:
            ax.plot(xs, ys, marker="o", color=colours[kind], alpha=0.8,
                    label=f"{kind} ({name.split('-')[1]})" if name.endswith(f"seed{SEEDS[0]}") else None)
        rows.append(f"| {name} | {', '.join(f'{y:.2f}' for y in ys)} | {kls[-1]:.4f} | "
                    f"{sum(r['time_s'] for r in records):.0f} | "
                    f"{sum(r.get('time_heldout_s', 0) for r in records):.0f} |")
    ax.set_xlabel("training wall-clock seconds (held-out evaluation excluded)")
    ax.set_ylabel("held-out reward (greedy, 12 prompts)")
    ax.set_title("Conciseness, bundled SmolLM2-135M bf16: SGD vs Adam, 3 seeds each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DATA / "sgd_vs_adam_heldout.png", dpi=120)
    means = {}
    for kind, lr in (("sgd", SGD_ALPHA), ("adam", best)):
        finals = [heldout_curve(runs[f"{kind}-{lr}-seed{s}"])[1][-1] for s in SEEDS]
        means[kind] = (float(np.mean(finals)), float(np.min(finals)), float(np.max(finals)))
    summary = "\n".join(rows) + "\n\n" + "\n".join(
        f"- {kind} ({lr}): final held-out reward mean {m:.2f} (min {lo:.2f}, max {hi:.2f}) over "
        f"seeds {SEEDS}" for (kind, lr), (m, lo, hi) in zip((("sgd", SGD_ALPHA), ("adam", best)),
                                                              means.values()))
    summary += f"\n- Adam's learning rate from the sweep {ADAM_SWEEP} (seed {SEEDS[0]}): {best}"
    (DATA / "curves.md").write_text(summary + "\n")
    print(summary)


def batch(args) -> None:
    """One iteration of the Countdown trainer (population 2, 32 new tokens, 1 thread) on 200
    training prompts, then with --prompt_batch 16: the iteration's seconds."""
    lines = ["| prompts per iteration | iteration s | generate s |", "|---|---|---|"]
    for extra in ([], ["--prompt_batch", "16"]):
        out = Path(tempfile.mkdtemp(prefix="tuning-")) / "run"
        run_main("countdown/es_fine-tuning_countdown.py", [
            "--model_name", "bundled", "--data_sample", "200", "--population_size", "2",
            "--num_iterations", "1", "--max_new_tokens", "32", "--gpu_threads", "1",
            "--report_to", "none", "--output_dir", str(out), *extra])
        [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        lines.append(f"| {extra[-1] if extra else 200} | {record['time_s']:.1f} | "
                     f"{record.get('time_generate_s', float('nan')):.1f} |")
        shutil.rmtree(out.parent)
    (DATA / "prompt_batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def spread(args) -> None:
    """The bundled model's reward on the conciseness prompts (bf16), sampled at temperature 1,
    repeated 3 times (3 draws: iterations 1, 2, 3 of row_seed) with K = 1 and K = 4 rollouts."""
    from es_llm.generation import Generator
    from es_llm.models import load_model
    from es_llm.tasks import conciseness_task

    import torch

    torch.set_num_threads(1)
    model, tokenizer = load_model("bundled", "bf16")
    task = conciseness_task()
    lines = ["| K | rewards of 3 repeats | std | max - min |", "|---|---|---|---|"]
    for k in (1, 4):
        generate = Generator(tokenizer, task.prompts, 32, sampling=(k, 1.0, 1.0))
        rewards = [task.mean_reward(generate.rollouts(model, repeat, 12345), 12345)
                   for repeat in (1, 2, 3)]
        lines.append(f"| {k} | {', '.join(f'{r:.2f}' for r in rewards)} | "
                     f"{np.std(rewards):.2f} | {max(rewards) - min(rewards):.2f} |")
        print(lines[-1], flush=True)
    (DATA / "spread.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["curves", "batch", "spread"])
    args = p.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    {"curves": curves, "batch": batch, "spread": spread}[args.what](args)
    print(f"{args.what}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
