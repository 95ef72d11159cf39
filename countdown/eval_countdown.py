"""Evaluate a model on Countdown with transformers: generate for each test item, score the response
with the trainer's reward (countdown_task.reward_function, on the response only), print examples
and a summary, and write summary.json (plus every response with --save_responses).

By default the test split is evaluated: the last 2000 items of countdown/data/countdown.json (items
200..2199; the first 200 are the training items).

    python countdown/eval_countdown.py --model_path RUN_DIR              # a trainer's output
    python countdown/eval_countdown.py --model_path RUN_DIR/checkpoint-100
    python countdown/eval_countdown.py --base_model_name bundled         # the base model itself
    python countdown/eval_countdown.py --model_path final_model.pth --base_model_name BASE_MODEL
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch  # noqa: E402

from countdown.countdown_task import (DEFAULT_DATA_PATH, TEST_SIZE, TRAIN_SIZE,  # noqa: E402
                                      load_countdown_data, reward_function)
from es_llm.evaluation import (AUTO_PRECISION, argument_problems, generate, load_for_eval,  # noqa: E402
                               run_evaluation, summarize, write_json, write_jsonl)
from es_llm.models import PRECISIONS, model_short_name  # noqa: E402

SUMMARY_FILE = "summary.json"
RESPONSES_FILE = "responses.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None,
                   help="a trainer's output directory or checkpoint-N directory, any model "
                        "--base_model_name accepts, or a weights file (.pth/.pt/.bin/.safetensors) "
                        "for --base_model_name (default: evaluate the base model itself)")
    p.add_argument("--base_model_name", default="Qwen/Qwen2.5-3B-Instruct",
                   help="hub id, local directory, .gguf file or 'bundled': the model evaluated "
                        "when --model_path is not given, and the architecture for a weights file")
    p.add_argument("--hf_cache_dir", default=None)
    p.add_argument("--eval_data_path", default=str(DEFAULT_DATA_PATH),
                   help="Countdown data file (JSON list of items)")
    p.add_argument("--eval_offset", type=int, default=None,
                   help=f"index of the first item evaluated (default: the test split, i.e. the last "
                        f"{TEST_SIZE} items when the file holds at least {TRAIN_SIZE + TEST_SIZE}, "
                        f"otherwise the whole file)")
    p.add_argument("--eval_samples", type=int, default=None,
                   help="number of items evaluated from the offset on (default: all of them)")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --do_sample")
    p.add_argument("--top_p", type=float, default=1.0, help="with --do_sample")
    p.add_argument("--seed", type=int, default=0, help="torch seed for --do_sample")
    p.add_argument("--precision", default=AUTO_PRECISION, choices=[AUTO_PRECISION, *sorted(PRECISIONS)],
                   help="auto: the dtype the model directory was saved in (bf16 otherwise)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--save_responses", action="store_true",
                   help=f"also write every item's prompt, response and rewards to {RESPONSES_FILE}")
    p.add_argument("--show_examples", type=int, default=3, help="examples printed after generation")
    p.add_argument("--output_dir", default=None,
                   help="where summary.json goes (default: eval_results/countdown_<model name>)")
    p.add_argument("--verbose", action="store_true", help="print every item's response and reward")
    return p


def select_items(path, offset, count):
    """(items, offset): `count` items of the data file from `offset` on (defaults: the test split)."""
    items = load_countdown_data(path, split="all")
    if offset is None:
        offset = len(items) - TEST_SIZE if len(items) >= TRAIN_SIZE + TEST_SIZE else 0
    if not 0 <= offset < len(items):
        raise ValueError(f"--eval_offset {offset} is outside the {len(items)} items of {path}; "
                         f"give 0..{len(items) - 1}")
    if count is not None and count < 1:
        raise ValueError(f"--eval_samples must be >= 1 (got {count})")
    end = len(items) if count is None else offset + count
    if end > len(items):
        raise ValueError(f"--eval_offset {offset} + --eval_samples {count} goes past the "
                         f"{len(items)} items of {path}; ask for at most {len(items) - offset}")
    return items[offset:end], offset


def score(samples, items, offset) -> list:
    """One record per item: the trainer's reward (with its parts) of the response alone."""
    records = []
    for sample, item in zip(samples, items):
        parts = reward_function(sample.response, item["numbers"], item["target"])
        records.append({"index": offset + sample.prompt_index, "id": item["id"],
                        "prompt": sample.prompt, "response": sample.response,
                        "numbers": item["numbers"], "target": item["target"], **parts})
    return records


def make_summary(records, seconds: float, settings: dict) -> dict:
    rewards = summarize(r["reward"] for r in records)
    n = len(records)
    correct = sum(r["answer_reward"] > 0 for r in records)
    return {
        **settings,
        "num_items": n,
        "avg_reward": rewards["mean"],
        "avg_format_reward": summarize(r["format_reward"] for r in records)["mean"],
        "avg_answer_reward": summarize(r["answer_reward"] for r in records)["mean"],
        "reward_std": rewards["std"],
        "reward_min": rewards["min"],
        "reward_max": rewards["max"],
        "accuracy": correct / n,
        "num_correct": correct,
        "num_reward_at_least_1": sum(r["reward"] >= 1 for r in records),
        "generation_time_s": seconds,
        "time_per_sample_s": seconds / n,
    }


def print_example(record) -> None:
    print(f"--- item {record['index']} (id {record['id']}): numbers {record['numbers']}, "
          f"target {record['target']}")
    print(f"response: {record['response'][:600]!r}")
    print(f"reward {record['reward']:.3f} (format {record['format_reward']:.2f}, "
          f"answer {record['answer_reward']:.1f})")


def print_summary(s) -> None:
    print(f"\n=== Countdown evaluation: {s['model']} on {s['num_items']} items "
          f"(offset {s['eval_offset']}) ===")
    print(f"average reward   {s['avg_reward']:.4f}  (format {s['avg_format_reward']:.4f}, "
          f"answer {s['avg_answer_reward']:.4f})")
    print(f"reward std/min/max {s['reward_std']:.4f} / {s['reward_min']:.4f} / {s['reward_max']:.4f}")
    print(f"accuracy         {s['accuracy']:.4f}  ({s['num_correct']}/{s['num_items']} correct "
          f"answers; {s['num_reward_at_least_1']} with reward >= 1)")
    print(f"time per sample  {s['time_per_sample_s']:.3f} s  "
          f"(generation {s['generation_time_s']:.1f} s)")


def evaluate(args) -> dict:
    items, offset = select_items(args.eval_data_path, args.eval_offset, args.eval_samples)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, precision = load_for_eval(args.model_path, args.base_model_name,
                                                args.precision, device, args.hf_cache_dir)
    name = args.model_path or args.base_model_name
    print(f"evaluating {name} ({precision}, {device}) on items {offset}..{offset + len(items) - 1} "
          f"of {args.eval_data_path}", flush=True)
    if args.do_sample:
        torch.manual_seed(args.seed)
    start = time.time()
    samples = generate(model, tokenizer, [item["context"] for item in items], args.max_new_tokens,
                       args.batch_size, do_sample=args.do_sample, temperature=args.temperature,
                       top_p=args.top_p, desc="Countdown eval")
    seconds = time.time() - start
    records = score(samples, items, offset)

    settings = {"model": name, "model_path": args.model_path, "base_model_name": args.base_model_name,
                "eval_data_path": str(args.eval_data_path), "eval_offset": offset,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "do_sample": args.do_sample, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "precision": precision, "device": str(device)}
    return report(records, seconds, settings, args, f"countdown_{model_short_name(name)}")


def report(records, seconds, settings, args, default_name) -> dict:
    """Print examples and the summary; write summary.json (and responses.jsonl on request)."""
    for record in records if args.verbose else records[:args.show_examples]:
        print_example(record)
    summary = make_summary(records, seconds, settings)
    print_summary(summary)
    out = Path(args.output_dir or Path("eval_results") / default_name)
    write_json(out / SUMMARY_FILE, summary)
    if args.save_responses:
        write_jsonl(out / RESPONSES_FILE, records)
    print(f"summary written to {out / SUMMARY_FILE}"
          + (f"; responses to {out / RESPONSES_FILE}" if args.save_responses else ""))
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_evaluation(evaluate, args, argument_problems(args, ("max_new_tokens", "batch_size"),
                                                     sampling=args.do_sample))


if __name__ == "__main__":
    main()
