"""The paper's conciseness comparison in miniature: ES against GRPO at the same generation budget.

    python bench/es_vs_grpo.py --out docs/es_vs_grpo_data            (the bundled model, hours)
    python bench/es_vs_grpo.py --model_name DIR --preset smoke --out /tmp/x   (a minute: the tests)

For each setting and seed it trains with the ES conciseness script (sigma values, alpha = sigma / 2)
or the GRPO baseline (beta values), with the same budget of sample generations (ES: population x
prompts x iterations; GRPO: group x prompts x steps), then evaluates the final model with
eval_conciseness.py (held-out reward and KL to the base model, as the paper does). A run whose
summary exists is not run again, so the command resumes. It writes `results.json`, `table.md`
(mean +/- std across seeds, and the share of empty or degenerate answers: reward hacking) and
`reward_vs_kl.png` (each setting's seeds and their mean).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    # ES: population 8 x 2 prompts x 15 iterations = 240 generations; GRPO: group 8 x 2 x 15.
    "mini": {"sigmas": [0.003, 0.01], "betas": [0.0, 0.04], "seeds": [33, 34, 35],
             "population": 8, "iterations": 15, "tokens": 32, "learning_rate": 1e-5,
             "eval_samples": 4, "precision": "bf16"},
    # A first look (one setting each, 3 seeds): 8 x 2 x 10 = 160 generations per run.
    "pilot": {"sigmas": [0.01], "betas": [0.04], "seeds": [33, 34, 35], "population": 8,
              "iterations": 10, "tokens": 24, "learning_rate": 1e-5, "eval_samples": 4,
              "precision": "bf16"},
    "smoke": {"sigmas": [0.05], "betas": [0.04], "seeds": [33, 34], "population": 4,
              "iterations": 2, "tokens": 6, "learning_rate": 1e-5, "eval_samples": 1,
              "precision": "fp32"},
}


def run(command, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed ({proc.returncode}); see {log}")


def degenerate(response: str) -> bool:
    """Reward hacking in this task: an empty answer, or one character repeated."""
    text = response.strip()
    return not text or len(set(text)) == 1


def train_and_evaluate(method, value, seed, p, args, out: Path) -> dict:
    name = f"{method}_{value}_seed{seed}"
    model = out / "runs" / name
    summary = out / "eval" / name / "summary.json"
    if not summary.exists():
        if method == "es":
            run([sys.executable, "es_fine-tuning_conciseness.py", "--model_name", args.model_name,
                 "--sigma", str(value), "--alpha", str(value / 2), "--initial_seed", str(seed),
                 "--population_size", str(p["population"]), "--num_iterations",
                 str(p["iterations"]), "--max_new_tokens", str(p["tokens"]), "--gpu_threads", "1",
                 "--precision", p["precision"], "--report_to", "none", "--output_dir", str(model),
                 "--overwrite"], out / "logs" / f"{name}.log")
        else:
            run([sys.executable, "baselines/grpo.py", "--task", "conciseness", "--model_name",
                 args.model_name, "--beta", str(value), "--seed", str(seed), "--num_generations",
                 str(p["population"]), "--max_steps", str(p["iterations"]), "--max_new_tokens",
                 str(p["tokens"]), "--learning_rate", str(p["learning_rate"]), "--precision",
                 p["precision"], "--output_dir", str(model)], out / "logs" / f"{name}.log")
        run([sys.executable, "eval_conciseness.py", "--model_path", str(model),
             "--base_model_name", args.model_name, "--num_samples", str(p["eval_samples"]),
             "--max_new_tokens", str(p["tokens"]), "--precision", p["precision"],
             "--save_responses", "--output_dir", str(summary.parent)],
            out / "logs" / f"{name}.eval.log")
    result = json.loads(summary.read_text())
    responses = [json.loads(line)["response"]
                 for line in (summary.parent / "responses.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    return {"method": method, "value": value, "seed": seed, "reward": result["reward_mean"],
            "kl": result["kl_mean"], "degenerate": float(np.mean([degenerate(r) for r in responses])),
            "generations": metrics[-1]["generations"]}


def table(results) -> str:
    lines = ["| method | setting | seeds | generations | held-out reward (mean +/- std) | "
             "KL (mean +/- std) | degenerate answers |", "|---|---|---|---|---|---|---|"]
    for (method, value), rows in groups(results).items():
        r, k = np.array([x["reward"] for x in rows]), np.array([x["kl"] for x in rows])
        setting = f"sigma {value}" if method == "es" else f"beta {value}"
        lines.append(f"| {method.upper()} | {setting} | {len(rows)} | {rows[0]['generations']} | "
                     f"{r.mean():.2f} +/- {r.std():.2f} | {k.mean():.4f} +/- {k.std():.4f} | "
                     f"{np.mean([x['degenerate'] for x in rows]):.0%} |")
    return "\n".join(lines) + "\n"


def groups(results) -> dict:
    out = {}
    for x in results:
        out.setdefault((x["method"], x["value"]), []).append(x)
    return out


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (method, value), rows in groups(results).items():
        label = f"ES sigma {value}" if method == "es" else f"GRPO beta {value}"
        points = ax.scatter([x["kl"] for x in rows], [x["reward"] for x in rows], alpha=0.4,
                            marker="o" if method == "es" else "s")
        ax.scatter([np.mean([x["kl"] for x in rows])], [np.mean([x["reward"] for x in rows])],
                   color=points.get_facecolor()[0][:3], s=120, marker="o" if method == "es" else "s",
                   edgecolor="black", label=label)
    ax.set_xlabel("KL to the base model (per token, held-out)")
    ax.set_ylabel("held-out reward")
    ax.set_title("Conciseness: ES vs GRPO at equal generations (seeds faint, means bold)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name", default="bundled")
    p.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    preset, out = PRESETS[args.preset], Path(args.out)
    results = [train_and_evaluate("es", s, seed, preset, args, out)
               for s in preset["sigmas"] for seed in preset["seeds"]]
    results += [train_and_evaluate("grpo", b, seed, preset, args, out)
                for b in preset["betas"] for seed in preset["seeds"]]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results))
    plot(results, out / "reward_vs_kl.png")
    print(table(results))


if __name__ == "__main__":
    main()
