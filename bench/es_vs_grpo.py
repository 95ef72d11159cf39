"""The paper's comparison in miniature: ES against GRPO on the same task, model and generation budget.

    python bench/es_vs_grpo.py --preset conciseness --out docs/es_vs_grpo_data/conciseness
    python bench/es_vs_grpo.py --preset countdown --out docs/es_vs_grpo_data/countdown
    python bench/es_vs_grpo.py --model_name DIR --preset smoke --out /tmp/x   (a minute: the tests)

Each preset is a task, a list of arms (an ES setting: sigma with alpha = sigma / 2, the faithful
full-rank path or `--noise_mode lowrank`; a GRPO setting: beta and learning rate) and seeds. Every
run of an arm has the same budget of sample generations (ES: population x prompts x iterations;
GRPO: group x prompts x steps) unless the arm says otherwise, and its final model is evaluated on
held-out data: conciseness with eval_conciseness.py (reward and per-token KL to the base model, as
in the paper's figure), Countdown with countdown/eval_countdown.py on test items (accuracy, format
and answer reward). The base model is evaluated the same way, as the first row. A run whose
evaluation exists is not run again, so the command resumes. It writes `results.json`, `table.md`
(mean +/- std across seeds; for conciseness the share of empty or degenerate answers: reward
hacking) and a figure (`reward_vs_kl.png` or `countdown.png`).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def es(sigma, **extra):
    """An ES arm: alpha = sigma / 2; extra flags such as noise_mode="lowrank", iterations=20."""
    return {"method": "es", "sigma": sigma, **extra}


def grpo(beta, lr, **extra):
    return {"method": "grpo", "beta": beta, "learning_rate": lr, **extra}


PRESETS = {
    # The conciseness figure: 8 x 2 prompts x 10 iterations = 160 generations per run, 24 tokens.
    "conciseness": {"task": "conciseness", "seeds": [33, 34, 35], "population": 8,
                    "iterations": 10, "tokens": 24, "eval_samples": 4, "precision": "bf16",
                    "arms": [es(0.003), es(0.01), grpo(0.04, 1e-5), grpo(0.04, 1e-4),
                             grpo(0.0, 1e-4), grpo(0.04, 3e-4)]},
    # The first look, one setting each (its runs are the first arms' of the preset above).
    "pilot": {"task": "conciseness", "seeds": [33, 34, 35], "population": 8, "iterations": 10,
              "tokens": 24, "eval_samples": 4, "precision": "bf16",
              "arms": [es(0.01), grpo(0.04, 1e-5)]},
    # Countdown: 8 training items, 8 members (or a group of 8) x 8 items per iteration (or step).
    # ES low-rank and GRPO 8 x 8 x 10 = 640 generations, the faithful path half of it; 64 tokens.
    "countdown": {"task": "countdown", "seeds": [33], "population": 8, "items": 8,
                  "iterations": 10, "tokens": 64, "eval_items": 200, "precision": "bf16",
                  "arms": [es(0.001, noise_mode="lowrank"), es(0.001, iterations=5),
                           grpo(0.04, 1e-4)]},
    "smoke": {"task": "conciseness", "seeds": [33, 34], "population": 4, "iterations": 2,
              "tokens": 6, "eval_samples": 1, "precision": "fp32",
              "arms": [es(0.05), grpo(0.04, 1e-5)]},
    "countdown_smoke": {"task": "countdown", "seeds": [33], "population": 4, "items": 2,
                        "iterations": 2, "tokens": 8, "eval_items": 4, "precision": "fp32",
                        "arms": [es(0.05, noise_mode="lowrank"), grpo(0.04, 1e-5)]},
}


def describe(arm, seed=None):
    """(the tables' label of an arm, the directory name of its run with this seed)."""
    if arm["method"] == "base":
        return "base model", "base"
    if arm["method"] == "es":
        label, name = f"sigma {arm['sigma']}", f"es_sigma{arm['sigma']}"
        if arm.get("noise_mode") == "lowrank":
            label, name = label + ", low-rank", name + "_lowrank"
    else:
        label = f"beta {arm['beta']}, lr {arm['learning_rate']:g}"
        name = f"grpo_beta{arm['beta']}_lr{arm['learning_rate']:g}"
    if "iterations" in arm:
        label, name = label + f", {arm['iterations']} it.", name + f"_it{arm['iterations']}"
    return label, f"{name}_seed{seed}"


def run(command, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed ({proc.returncode}); see {log}")


def train(arm, seed, p, args, model: Path, log: Path) -> None:
    common = ["--model_name", args.model_name, "--max_new_tokens", str(p["tokens"]),
              "--precision", p["precision"], "--output_dir", str(model),
              *(["--data_sample", str(p["items"])] if p["task"] == "countdown" else [])]
    iterations = str(arm.get("iterations", p["iterations"]))
    if arm["method"] == "es":
        script = ("countdown/es_fine-tuning_countdown.py" if p["task"] == "countdown"
                  else "es_fine-tuning_conciseness.py")
        command = [script, "--sigma", str(arm["sigma"]), "--alpha", str(arm["sigma"] / 2),
                   "--noise_mode", arm.get("noise_mode", "correlated"), "--initial_seed",
                   str(seed), "--population_size", str(p["population"]), "--num_iterations",
                   iterations, "--gpu_threads", "1", "--report_to", "none", "--overwrite"]
    else:
        command = ["baselines/grpo.py", "--task", p["task"], "--beta", str(arm["beta"]),
                   "--learning_rate", str(arm["learning_rate"]), "--seed", str(seed),
                   "--num_generations", str(p["population"]), "--max_steps", iterations]
    run([sys.executable, *command, *common], log)


def evaluate(model, p, args, out_dir: Path, log: Path) -> None:
    if p["task"] == "countdown":
        run([sys.executable, "countdown/eval_countdown.py", "--model_path",
             str(model or args.model_name), "--base_model_name",
             args.model_name, "--eval_samples", str(p["eval_items"]), "--eval_offset", "-2000",
             "--max_new_tokens", str(p["tokens"]), "--precision", p["precision"],
             "--save_responses", "--output_dir", str(out_dir)], log)
    else:  # no --model_path: the base model (KL 0)
        target = ["--model_path", str(model)] if model is not None else []
        run([sys.executable, "eval_conciseness.py", *target, "--base_model_name",
             args.model_name, "--num_samples", str(p["eval_samples"]), "--max_new_tokens",
             str(p["tokens"]), "--precision", p["precision"], "--save_responses",
             "--output_dir", str(out_dir)], log)


def degenerate(response: str) -> bool:
    """Reward hacking in the conciseness task: an empty answer, or one character repeated."""
    text = response.strip()
    return not text or len(set(text)) == 1


def measure(arm, seed, p, args, out: Path) -> dict:
    """Trains (unless the arm is the base model) and evaluates one run, or reads what a previous
    invocation wrote: the evaluation's summary and `train.json` (generations, training time, best
    training reward)."""
    setting, run_name = describe(arm, seed)
    model = None if arm["method"] == "base" else out / "runs" / run_name
    out_dir = out / "eval" / run_name
    summary, info = out_dir / "summary.json", out_dir / "train.json"
    if not info.exists():  # written last: a run cut short after its evaluation runs again
        print(f"{run_name}: training and evaluating", flush=True)
        if model is not None:
            train(arm, seed, p, args, model, out / "logs" / f"{run_name}.log")
        evaluate(model, p, args, out_dir, out / "logs" / f"{run_name}.eval.log")
        metrics = [] if model is None else [
            json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
        info.write_text(json.dumps({  # train_s: the iterations' (steps') time, loading excluded
            "generations": metrics[-1]["generations"] if metrics else 0,
            "train_s": round(sum(m["time_s"] for m in metrics), 1),
            "train_reward_max": max((m["reward_max"] for m in metrics), default=None)}))
    result = {"method": arm["method"], "setting": setting, "seed": seed,
              **json.loads(info.read_text())}
    data = json.loads(summary.read_text())
    if p["task"] == "countdown":
        s = data["eval_stats"]
        detail = json.loads((out_dir / "eval_detailed_results.json").read_text())
        return {**result, "accuracy": s["accuracy"], "format_reward": s["avg_format_reward"],
                "answer_reward": s["avg_answer_reward"], "reward": s["avg_reward"],
                "closed_answer": float(np.mean(["</answer>" in r["response"]
                                                for r in detail]))}
    responses = [json.loads(line)["response"]
                 for line in (out_dir / "responses.jsonl").read_text().splitlines()]
    return {**result, "reward": data["reward_mean"], "kl": data["kl_mean"],
            "degenerate": float(np.mean([degenerate(r) for r in responses]))}


def groups(results) -> dict:
    out = {}
    for x in results:
        out.setdefault((x["method"], x["setting"]), []).append(x)
    return out


def mean_std(rows, key, fmt) -> str:
    v = np.array([x[key] for x in rows], dtype=float)
    return f"{v.mean():{fmt}} +/- {v.std():{fmt}}"


def best(rows) -> str:
    """The highest reward any training generation (GRPO) or member (ES: mean over the prompts)
    reached, across seeds: whether the method ever saw a signal."""
    values = [x["train_reward_max"] for x in rows if x.get("train_reward_max") is not None]
    return f"{max(values):.3g}" if values else "-"


def table(results, task) -> str:
    if task == "countdown":
        columns = [("held-out accuracy %", "accuracy", ".1f"), ("format reward", "format_reward",
                   ".3f"), ("answer reward", "answer_reward", ".3f"), ("reward", "reward", ".3f"),
                   ("answers closed", "closed_answer", ".2f")]
    else:
        columns = [("held-out reward", "reward", ".2f"), ("KL", "kl", ".4f"),
                   ("degenerate answers", "degenerate", ".2f")]
    lines = ["| method | setting | seeds | generations | train s | best training reward | "
             + " | ".join(c[0] + " (mean +/- std)" for c in columns) + " |",
             "|---" * (6 + len(columns)) + "|"]
    for (method, setting), rows in groups(results).items():
        lines.append(f"| {method.upper() if method != 'base' else '-'} | {setting} | {len(rows)} | "
                     f"{rows[0]['generations']} | {np.mean([x['train_s'] for x in rows]):.0f} | "
                     f"{best(rows)} | "
                     + " | ".join(mean_std(rows, key, fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(results, task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marker = {"es": "o", "grpo": "s", "base": "*"}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    if task == "countdown":
        items = list(groups(results).items())
        for i, ((method, setting), rows) in enumerate(items):
            for j, key in enumerate(("format_reward", "answer_reward")):
                values = [x[key] for x in rows]
                ax.bar(i + 0.4 * j - 0.2, np.mean(values), 0.4, yerr=np.std(values),
                       color="C0" if j == 0 else "C1", label=key.replace("_", " ") if i == 0 else None)
        ax.set_xticks(range(len(items)), [f"{m.upper() if m != 'base' else ''} {s}".strip()
                                          for (m, s), _ in items], rotation=25, ha="right",
                      fontsize=7)
        ax.set_ylabel("held-out mean (test items)")
        ax.set_title("Countdown: ES vs GRPO (mean and std across seeds)")
    else:
        for (method, setting), rows in groups(results).items():
            kl, reward = [x["kl"] for x in rows], [x["reward"] for x in rows]
            points = ax.scatter(kl, reward, alpha=0.35, marker=marker[method])
            ax.errorbar([np.mean(kl)], [np.mean(reward)], xerr=[np.std(kl)], yerr=[np.std(reward)],
                        color=points.get_facecolor()[0][:3], marker=marker[method], markersize=10,
                        markeredgecolor="black", capsize=3,
                        label=f"{method.upper() if method != 'base' else ''} {setting}".strip())
        ax.set_xlabel("KL to the base model (per response, held-out)")
        ax.set_ylabel("held-out reward")
        ax.set_title("Conciseness: ES vs GRPO at equal generations (seeds faint, means +/- std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name", default="bundled")
    p.add_argument("--preset", default="conciseness", choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    preset, out = PRESETS[args.preset], Path(args.out)
    results = [measure({"method": "base"}, None, preset, args, out)]
    results += [measure(arm, seed, preset, args, out)
                for arm in preset["arms"] for seed in preset["seeds"]]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results, preset["task"]))
    plot(results, preset["task"],
         out / ("countdown.png" if preset["task"] == "countdown" else "reward_vs_kl.png"))
    print(table(results, preset["task"]))


if __name__ == "__main__":
    main()
