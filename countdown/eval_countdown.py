"""Evaluate a model on Countdown with transformers: generate for each evaluated item, score the
response with the trainer's reward (countdown_task.reward_function, on the response only), print
examples and a summary, and write summary.json (plus every item's result with --save_responses).

The published command lines work as they are; the defaults evaluate the last 100 items of the data
file (--eval_offset -100 --eval_samples 100). The paper's test split is the last 2000 items:

    python countdown/eval_countdown.py --model_path RUN_DIR --eval_samples 2000 --eval_offset -2000
    python countdown/eval_countdown.py --model_path RUN_DIR/checkpoint-100      # a checkpoint
    python countdown/eval_countdown.py --model_path bundled                     # a base model itself
    python countdown/eval_countdown.py --model_path .../pytorch_model.pth --base_model_name BASE

A weights file (.pth/.pt/.bin/.safetensors) is a state dict applied to --base_model_name; both HF
names and vLLM's fused names (qkv_proj, gate_up_proj: the accelerated trainer's .pth) are read.
A PEFT adapter directory (an --es_params lora run or checkpoint: adapter_config.json) is loaded onto
--base_model_name with PEFT, unmerged, as it was trained.
Without --base_model_name the base model is guessed from the path (what the trainer recorded beside
the weights, a model_saves/base_model directory, the run directory's name; else the paper's model).

Precision: --torch_dtype is the dtype the weights are loaded in (auto: the dtype they were saved
in); --mixed_precision is an autocast around generation (the published default fp16). On CPU an
fp16 autocast is not applied (CPU fp16 kernels are slow and partly missing): the model computes in
its --torch_dtype there, and summary.json records the autocast actually used.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

from countdown.countdown_task import (DEFAULT_DATA_PATH, TEST_SIZE, TRAIN_SIZE,  # noqa: E402
                                      load_countdown_data, reward_function)
from es_llm.evaluation import (AUTO_PRECISION, WEIGHT_FILE_SUFFIXES, argument_problems,  # noqa: E402
                               eval_parser, generate, guess_base_model, load_for_eval, run_evaluation,
                               write_json)
from es_llm.lora import is_adapter_dir  # noqa: E402
from es_llm.models import (BUNDLED_MODEL, DTYPE_NAMES, PRECISIONS,  # noqa: E402
                           model_short_name)

SUMMARY_FILE = "summary.json"
DETAILS_FILE = "eval_detailed_results.json"
DEFAULT_BATCH_SIZE = 32
HIGH_REWARD = 1.0
# --torch_dtype (the published names) -> the project's precision names; --precision is an alias.
TORCH_DTYPES = {"auto": AUTO_PRECISION, **{name: p for p, name in DTYPE_NAMES.items()}}
PRECISION_ALIASES = {AUTO_PRECISION: "auto", **DTYPE_NAMES}
MIXED_PRECISION = {"no": None, "fp16": PRECISIONS["fp16"], "bf16": PRECISIONS["bf16"]}
STATS_KEYS = ("dataset_name", "num_samples", "avg_reward", "avg_format_reward", "avg_answer_reward",
              "std_reward", "min_reward", "max_reward", "high_reward_count",
              "high_reward_percentage", "correct_count", "accuracy", "eval_time")
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "batch_size",
                   "mixed_precision")


class PrecisionAlias(argparse.Action):
    """--precision bf16|fp16|fp32|auto (this project's name) sets --torch_dtype."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.torch_dtype = PRECISION_ALIASES[value]


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The data, sample, offset, token and sampling flags both evaluation scripts share."""
    p.add_argument("--train_data_path", default=str(DEFAULT_DATA_PATH),
                   help=f"the training data: its first {TRAIN_SIZE} items are the training items; "
                        f"evaluated items among them are counted and reported (default: the "
                        f"bundled countdown/data/countdown.json)")
    p.add_argument("--eval_data_path", default=None,
                   help="Countdown data file evaluated (JSON list of items; default: the "
                        "--train_data_path file, whose last 2000 items are the test split)")
    p.add_argument("--eval_samples", type=int, default=100,
                   help="number of items evaluated from the offset on (fewer if the file ends "
                        "first)")
    p.add_argument("--eval_offset", type=int, default=-100,
                   help="index of the first item evaluated; negative counts from the end of the "
                        "file (-2000 with 2000 samples: the paper's test split)")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--do_sample", action="store_true",
                   help="sample with --temperature and --top_p instead of greedy decoding (greedy, "
                        "as in training, by default)")
    p.add_argument("--temperature", type=float, default=0.8, help="with --do_sample")
    p.add_argument("--top_p", type=float, default=0.9, help="with --do_sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, with --do_sample")
    p.add_argument("--hf_cache_dir", default=None)


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default=None,
                   help="where summary.json goes (default: ./inference_results_<model>)")
    p.add_argument("--save_responses", action="store_true",
                   help=f"also write every item's prompt, response and rewards to {DETAILS_FILE}")
    p.add_argument("--verbose", action="store_true", help="print every item's response and reward")
    p.add_argument("--show_examples", type=int, default=5,
                   help="examples printed after generation")


def build_parser() -> argparse.ArgumentParser:
    p = eval_parser(__doc__, None, required=True, base_help=(
        "the model a weights file or an adapter was trained from (default: guessed from the "
        "path; printed). A model directory carries its own architecture"))
    add_data_flags(p)
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"prompts per generate call (default: min({DEFAULT_BATCH_SIZE}, samples))")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--torch_dtype", default="auto", choices=sorted(TORCH_DTYPES),
                   help="dtype the weights are loaded in; auto: the dtype they were saved in "
                        "(config.json's, a weights file's tensors'; bfloat16 otherwise)")
    p.add_argument("--precision", choices=sorted(PRECISION_ALIASES), action=PrecisionAlias,
                   help="the same as --torch_dtype, in the trainers' names")
    p.add_argument("--mixed_precision", default="fp16", choices=sorted(MIXED_PRECISION),
                   help="autocast dtype during generation (no: compute in --torch_dtype). On CPU "
                        "fp16 is not applied (the model computes in --torch_dtype); bf16 is")
    add_output_flags(p)
    return p


def select_items(path, offset, count):
    """(items, offset): up to `count` items of the data file from `offset` on; a negative offset
    counts from the end. Defaults (None): the test split, or the whole file if it is smaller."""
    items = load_countdown_data(path, split="all")
    if offset is None:
        offset = len(items) - TEST_SIZE if len(items) >= TRAIN_SIZE + TEST_SIZE else 0
    if not -len(items) <= offset < len(items):
        raise ValueError(f"--eval_offset {offset} is outside the {len(items)} items of {path}; "
                         f"give {-len(items)}..{len(items) - 1}")
    offset = offset % len(items)
    if count is not None and count < 1:
        raise ValueError(f"--eval_samples must be >= 1 (got {count})")
    end = len(items) if count is None else min(offset + count, len(items))
    if count is not None and end - offset < count:
        print(f"note: only {end - offset} items from offset {offset} on in {path}; evaluating "
              f"those (asked for {count})", flush=True)
    return items[offset:end], offset


def training_overlap(items, train_path) -> int:
    """How many of `items` are among the training items (the first TRAIN_SIZE of `train_path`)."""
    train = {item["context"] for item in load_countdown_data(train_path, split="all")[:TRAIN_SIZE]}
    return sum(item["context"] in train for item in items)


def score(samples, items, offset) -> list:
    """One record per item: the trainer's reward (with its parts) of the response alone."""
    records = []
    for sample, item in zip(samples, items):
        parts = reward_function(sample.response, item["numbers"], item["target"])
        records.append({"index": offset + sample.prompt_index, "id": item["id"],
                        "prompt": sample.prompt, "response": sample.response,
                        "numbers": item["numbers"], "target": item["target"], **parts,
                        "correct": parts["answer_reward"] > 0})
    return records


def eval_stats(records, seconds: float, dataset_name: str) -> dict:
    """The published eval_stats block: rewards, accuracy and high-reward share in percent."""
    n = len(records)
    rewards = np.array([r["reward"] for r in records], dtype=np.float64)
    correct = sum(r["answer_reward"] > 0 for r in records)
    high = int((rewards >= HIGH_REWARD).sum())
    return {"dataset_name": dataset_name, "num_samples": n,
            "avg_reward": float(rewards.mean()),
            "avg_format_reward": float(np.mean([r["format_reward"] for r in records])),
            "avg_answer_reward": float(np.mean([r["answer_reward"] for r in records])),
            "std_reward": float(rewards.std()), "min_reward": float(rewards.min()),
            "max_reward": float(rewards.max()), "high_reward_count": high,
            "high_reward_percentage": 100.0 * high / n, "correct_count": int(correct),
            "accuracy": 100.0 * correct / n, "eval_time": float(seconds)}


def generation_config(args, batch_size: int, mixed_precision) -> dict:
    """The published generation_config block (temperature and top_p null when greedy)."""
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
            "temperature": args.temperature if args.do_sample else None,
            "top_p": args.top_p if args.do_sample else None, "batch_size": batch_size,
            "mixed_precision": mixed_precision}


def make_summary(records, seconds, model_path, base_model_name, dataset_name, gen_config,
                 run_info=None) -> dict:
    """summary.json: the published keys, and this project's extras under run_info."""
    summary = {"model_path": model_path, "base_model_name": base_model_name,
               "eval_stats": eval_stats(records, seconds, dataset_name),
               "generation_config": gen_config}
    if run_info is not None:
        summary["run_info"] = {**run_info, "time_per_sample": seconds / len(records)}
    return summary


def print_example(record) -> None:
    print(f"--- item {record['index']} (id {record['id']}): numbers {record['numbers']}, "
          f"target {record['target']}")
    print(f"response: {record['response'][:600]!r}")
    print(f"reward {record['reward']:.3f} (format {record['format_reward']:.2f}, "
          f"answer {record['answer_reward']:.1f})")


def print_summary(summary) -> None:
    s = summary["eval_stats"]
    n = s["num_samples"]
    print("\n" + "=" * 60)
    print(f"Countdown evaluation of {summary['model_path']} (base {summary['base_model_name']}) "
          f"on {n} items of {s['dataset_name']}")
    print(f"Average reward: {s['avg_reward']:.4f} +/- {s['std_reward']:.4f} "
          f"(format {s['avg_format_reward']:.4f}, answer {s['avg_answer_reward']:.4f})")
    print(f"Accuracy: {s['correct_count']}/{n} ({s['accuracy']:.2f}%)")
    print(f"High reward (>= {HIGH_REWARD}): {s['high_reward_count']}/{n} "
          f"({s['high_reward_percentage']:.2f}%)")
    print(f"Reward range: [{s['min_reward']:.4f}, {s['max_reward']:.4f}]")
    print(f"Time per sample: {s['eval_time'] / n:.3f}s (total {s['eval_time']:.1f}s)")
    print("=" * 60)


def output_name(model_path: str) -> str:
    """<model> in the default output directory ./inference_results_<model>."""
    if model_path == BUNDLED_MODEL:
        return model_short_name(model_path)
    path = Path(model_path.rstrip("/"))
    if path.suffix in WEIGHT_FILE_SUFFIXES:
        return f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
    return model_short_name(str(path))


def report(records, summary, args) -> dict:
    """Print examples and the summary; write summary.json (and every item's result on request)."""
    for record in records if args.verbose else records[:args.show_examples]:
        print_example(record)
    print_summary(summary)
    out = Path(args.output_dir or f"./inference_results_{output_name(summary['model_path'])}")
    write_json(out / SUMMARY_FILE, summary)
    if args.save_responses:
        write_json(out / DETAILS_FILE, records)
    print(f"summary written to {out / SUMMARY_FILE}"
          + (f"; every item's result to {out / DETAILS_FILE}" if args.save_responses else ""))
    return summary


def resolve_base(args) -> tuple:
    """(base model, how it was chosen): --base_model_name, else the guess from --model_path."""
    if args.base_model_name:
        return args.base_model_name, "--base_model_name"
    return guess_base_model(args.model_path)


def load_eval_items(args) -> tuple:
    """(items, offset, data path, training overlap) for the data flags."""
    data_path = args.eval_data_path or args.train_data_path
    items, offset = select_items(data_path, args.eval_offset, args.eval_samples)
    overlap = training_overlap(items, args.train_data_path)
    if overlap:
        print(f"warning: {overlap} of the {len(items)} evaluated items are training items (the "
              f"first {TRAIN_SIZE} of {args.train_data_path})", flush=True)
    return items, offset, data_path, overlap


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def autocast_context(mixed_precision: str, device: str):
    """(context manager, autocast actually used: 'fp16', 'bf16' or None)."""
    dtype = MIXED_PRECISION[mixed_precision]
    device_type = torch.device(device).type
    if dtype is None:
        return contextlib.nullcontext(), None
    if device_type == "cpu" and dtype == torch.float16:
        print("note: --mixed_precision fp16 is not applied on CPU; the model computes in its "
              "--torch_dtype", flush=True)
        return contextlib.nullcontext(), None
    return torch.autocast(device_type, dtype=dtype), mixed_precision


def evaluate(args) -> dict:
    base, how = resolve_base(args)
    items, offset, data_path, overlap = load_eval_items(args)
    batch_size = args.batch_size or min(DEFAULT_BATCH_SIZE, len(items))
    device = resolve_device(args.device)
    model, tokenizer, precision = load_for_eval(args.model_path, base,
                                                TORCH_DTYPES[args.torch_dtype], device,
                                                args.hf_cache_dir)
    weights_file = (Path(args.model_path).suffix in WEIGHT_FILE_SUFFIXES
                    or is_adapter_dir(args.model_path))
    print(f"evaluating {args.model_path}" + (f" on base {base} ({how})" if weights_file else "")
          + f" ({precision}, {device}) on items {offset}..{offset + len(items) - 1} of {data_path}",
          flush=True)
    autocast, used = autocast_context(args.mixed_precision, device)
    if args.do_sample:
        torch.manual_seed(args.seed)
    start = time.time()
    with autocast:
        samples = generate(model, tokenizer, [item["context"] for item in items],
                           args.max_new_tokens, batch_size, do_sample=args.do_sample,
                           temperature=args.temperature, top_p=args.top_p, desc="Countdown eval")
    records = score(samples, items, offset)
    seconds = time.time() - start

    run_info = {"engine": "transformers", "eval_data_path": str(data_path),
                "train_data_path": str(args.train_data_path), "eval_offset": offset,
                "training_items_evaluated": overlap, "torch_dtype": precision, "autocast": used,
                "device": device, "seed": args.seed if args.do_sample else None,
                "base_model_source": how}
    summary = make_summary(records, seconds, args.model_path, base, Path(data_path).stem,
                           generation_config(args, batch_size, args.mixed_precision), run_info)
    return report(records, summary, args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    positive = ("max_new_tokens", "eval_samples") + (("batch_size",) if args.batch_size is not None
                                                     else ())
    run_evaluation(evaluate, args, argument_problems(args, positive, sampling=args.do_sample))


if __name__ == "__main__":
    main()
