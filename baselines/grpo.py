"""The RL baseline: GRPO (TRL's GRPOTrainer) on the same tasks, model loading and metrics as ES.

    pip install -r requirements-baselines.txt
    python baselines/grpo.py --task conciseness --model_name bundled --max_steps 20 \
        --num_generations 8 --beta 0.01 --max_new_tokens 32 --output_dir runs/grpo

The task is the ES scripts' own (`conciseness`, `countdown`, or a `--task PATH.py` file with
`--data`), scored by the same reward function on the same raw prompts (no chat template) and the
generated continuation only; the model is loaded by the same code (`bundled`, a `.gguf` file, a hub
id or a local directory) in the same `--precision`. Each step samples `--num_generations`
completions (the group) for each of `--prompts_per_step` prompts; `--beta` weighs the KL penalty to
the initial model. `metrics.jsonl` has the ES trainers' fields per step (`iteration` = step,
`rewards` = the step's completions' rewards, their mean/std/min/max, `time_s`) plus `generations`,
the sample generations so far (group x prompts x steps), the budget ES counts as population x
prompts x iterations. The final model is saved to --output_dir (as ES saves it).
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILTIN_TASKS = ("conciseness", "countdown")


def build_parser() -> argparse.ArgumentParser:
    from es_llm.models import BUNDLED_MODEL, PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="conciseness",
                   help=f"{' or '.join(BUILTIN_TASKS)}, or a task file PATH.py (as ES's --task)")
    p.add_argument("--data", default=None, help="with a task file: its rows (JSON list or JSONL)")
    p.add_argument("--data_sample", type=int, default=200, help="countdown: training items")
    p.add_argument("--model_name", default="Qwen/Qwen2.5-3B-Instruct",
                   help=f"hub id, local HF directory, local .gguf file, or '{BUNDLED_MODEL}'")
    p.add_argument("--hf_cache_dir", default=None)
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    p.add_argument("--num_generations", type=int, default=8, help="the group size G")
    p.add_argument("--prompts_per_step", type=int, default=None,
                   help="prompts per step (default: every training prompt, as an ES member scores)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient")
    p.add_argument("--learning_rate", type=float, default=1e-6)
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=33)
    p.add_argument("--output_dir", required=True)
    return p


def load_task(args):
    """The same Task objects the ES scripts train on."""
    from es_llm.tasks import conciseness_task, load_task_file

    if args.task == "conciseness":
        return conciseness_task()
    if args.task == "countdown":
        from countdown.countdown_task import make_task

        return make_task(args.data_sample)
    return load_task_file(args.task, args.data)


class RewardRecorder:
    """TRL's reward function: the task's reward on the completions, each call (one step's
    generations) written to metrics.jsonl with the ES fields."""

    __name__ = "task_reward"  # TRL names its logged reward after the function

    def __init__(self, task, metrics_path: Path):
        self.task, self.path = task, metrics_path
        self.generations, self.started = 0, time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def __call__(self, prompts, completions, trainer_state=None, **columns):
        from es_llm.loop import iteration_record
        from es_llm.tasks import Task

        batch = Task(self.task.name, list(prompts), self.task.reward_fn,
                     {k: columns[k] for k in self.task.columns}, self.task.source)
        rewards = batch.score(completions)
        self.generations += len(completions)
        step = (trainer_state.global_step if trainer_state is not None else 0) + 1
        record = iteration_record(step, [], rewards, time.time() - self.started,
                                  generations=self.generations)
        del record["seeds"]  # GRPO has no population seeds
        self.started = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"Step {step}, Mean: {record['reward_mean']:.2f}, Min: {record['reward_min']:.2f}, "
              f"Max: {record['reward_max']:.2f}, generations {self.generations}", flush=True)
        return rewards


def main(argv=None):
    args = build_parser().parse_args(argv)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from es_llm.hf_weights import resolve_base_model
    from es_llm.models import DTYPE_NAMES, load_model, save_model

    task = load_task(args)
    out = Path(args.output_dir)
    prompts_per_step = args.prompts_per_step or len(task.prompts)
    # The bundled model or a .gguf file becomes a dense HF directory first (the fp32 copy the
    # accelerated version's engines load): TRL loads GRPO's reference model from the model's path.
    source = resolve_base_model(args.model_name, out / "converted", args.hf_cache_dir)
    model, tokenizer = load_model(source, args.precision, args.hf_cache_dir)
    model.requires_grad_(True)
    model.train()
    dataset = Dataset.from_dict({"prompt": list(task.prompts),
                                 **{k: list(v) for k, v in task.columns.items()}})
    config = GRPOConfig(
        output_dir=str(out / "trainer"), learning_rate=args.learning_rate,
        per_device_train_batch_size=prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature,
        beta=args.beta, max_steps=args.max_steps, seed=args.seed, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=not __import__("torch").cuda.is_available(),
        bf16=False, fp16=False, remove_unused_columns=False,
        model_init_kwargs={"dtype": DTYPE_NAMES[args.precision]})
    trainer = GRPOTrainer(model=model, reward_funcs=[RewardRecorder(task, out / "metrics.jsonl")],
                          args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    model.eval()
    save_model(model, tokenizer, out)
    print(f"GRPO finished: {args.max_steps} steps, model saved to {out}", flush=True)


if __name__ == "__main__":
    main()
