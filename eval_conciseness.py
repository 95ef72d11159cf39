"""Evaluate conciseness fine-tuning the way the paper does: on held-out prompts with short reference
answers, sample N responses per prompt, report the mean reward (minus the character-length difference
from the reference, the training reward) and the mean per-token KL divergence of the model from its
base model on those responses (k3 estimator, see es_llm/evaluation.py). Writes summary.json.

    python eval_conciseness.py --model_path RUN_DIR --base_model_name bundled
    python eval_conciseness.py --model_path LORA_RUN_DIR --base_model_name bundled   # an adapter
    python eval_conciseness.py --base_model_name bundled          # the base model: KL 0 by definition
"""
import argparse
import json
import time
from pathlib import Path

import torch

from es_llm.evaluation import (AUTO_PRECISION, KL_BATCH_SIZE, SAMPLE_BATCH_SIZE, SAMPLE_SEED,
                               argument_problems, eval_parser, load_for_eval, per_sample_kl,
                               run_evaluation, sample_responses, summarize, write_json, write_jsonl)
from es_llm.models import PRECISIONS, load_model, model_short_name
from es_llm.tasks import conciseness_reward

DEFAULT_EVAL_DATA = Path(__file__).resolve().parent / "data" / "conciseness_eval.json"
SUMMARY_FILE = "summary.json"
RESPONSES_FILE = "responses.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = eval_parser(__doc__, "Qwen/Qwen2.5-3B-Instruct", required=False, base_help=(
        "the model fine-tuning started from: the reference of the KL divergence"))
    p.add_argument("--hf_cache_dir", default=None)
    p.add_argument("--eval_data_path", default=str(DEFAULT_EVAL_DATA),
                   help='JSON list of {"prompt": ..., "target": ...} held-out items')
    p.add_argument("--num_samples", type=int, default=20, help="sampled responses per prompt")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (the KL estimate is unbiased only at 1)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=SAMPLE_BATCH_SIZE,
                   help="prompts per generate call (each with --num_samples responses)")
    p.add_argument("--kl_batch_size", type=int, default=KL_BATCH_SIZE, help="responses per scoring forward pass")
    p.add_argument("--seed", type=int, default=SAMPLE_SEED, help="torch seed for sampling")
    p.add_argument("--precision", default=AUTO_PRECISION, choices=[AUTO_PRECISION, *sorted(PRECISIONS)],
                   help="auto: the dtype the model directory was saved in (bf16 otherwise); the base "
                        "model is loaded in the same precision")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--label", default=None, help="name of this model in plots (default: its path)")
    p.add_argument("--output_dir", default=None,
                   help="where summary.json goes (default: eval_results/conciseness_<model name>)")
    p.add_argument("--save_responses", action="store_true",
                   help=f"also write every response with its reward and KL to {RESPONSES_FILE}")
    p.add_argument("--show_examples", type=int, default=1, help="responses printed per prompt")
    p.add_argument("--verbose", action="store_true", help="print every response")
    return p


def load_eval_items(path) -> list:
    path = Path(path)
    expected = 'a JSON list of objects {"prompt": str, "target": str}'
    if not path.is_file():
        raise FileNotFoundError(f"conciseness evaluation file {path} not found; expected {expected}")
    items = json.loads(path.read_text())
    if not isinstance(items, list) or not items or not all(
            isinstance(i, dict) and isinstance(i.get("prompt"), str)
            and isinstance(i.get("target"), str) for i in items):
        raise ValueError(f"{path} is not {expected}")
    return items


def evaluate(args) -> dict:
    items = load_eval_items(args.eval_data_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, precision = load_for_eval(args.model_path, args.base_model_name,
                                                args.precision, device, args.hf_cache_dir)
    name = args.model_path or args.base_model_name
    is_base = args.model_path is None
    base = model if is_base else load_model(args.base_model_name, precision, args.hf_cache_dir,
                                            device)[0]
    if base.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"{name} has a vocabulary of {model.config.vocab_size} tokens but the base "
                         f"model {args.base_model_name} has {base.config.vocab_size}; give the "
                         f"--base_model_name the model was fine-tuned from")
    print(f"evaluating {name} against base {args.base_model_name} ({precision}, {device}): "
          f"{len(items)} prompts x {args.num_samples} samples, temperature {args.temperature}, "
          f"top_p {args.top_p}", flush=True)

    start = time.time()
    prompts = [item["prompt"] for item in items]
    samples = sample_responses(model, tokenizer, prompts, args.num_samples, args.max_new_tokens,
                               args.seed, args.batch_size, args.temperature, args.top_p)
    generation_s = time.time() - start
    targets = [items[s.prompt_index]["target"] for s in samples]
    rewards = conciseness_reward([s.prompt for s in samples], [s.response for s in samples], targets)
    if is_base:
        kls = [0.0] * len(samples)  # the model is its own base
    else:
        kls = per_sample_kl(model, base, samples, args.kl_batch_size, tokenizer.pad_token_id)
    tokens = [len(s.response_ids) for s in samples]

    records = [{"prompt_index": s.prompt_index, "prompt": s.prompt, "target": t, "response": s.response,
                "reward": float(r), "kl": kl, "num_tokens": n}
               for s, t, r, kl, n in zip(samples, targets, rewards, kls, tokens)]
    per_prompt = []
    for i, item in enumerate(items):
        mine = [r for r in records if r["prompt_index"] == i]
        per_prompt.append({"prompt": item["prompt"], "target": item["target"],
                           "reward_mean": summarize(r["reward"] for r in mine)["mean"],
                           "kl_mean": summarize(r["kl"] for r in mine)["mean"],
                           "examples": [r["response"] for r in mine[:3]]})
        print(f"--- {item['prompt']!r} (reference {item['target']!r}): mean reward "
              f"{per_prompt[-1]['reward_mean']:.2f}, KL {per_prompt[-1]['kl_mean']:.4f}")
        for r in mine if args.verbose else mine[:args.show_examples]:
            print(f"    {r['reward']:6.0f}  {r['response'][:150]!r}")

    reward, kl = summarize(rewards), summarize(kls)
    summary = {
        "model": name, "label": args.label or name, "model_path": args.model_path,
        "base_model_name": args.base_model_name, "is_base_model": is_base,
        "eval_data_path": str(args.eval_data_path), "num_prompts": len(items),
        "num_samples": args.num_samples, "temperature": args.temperature, "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens, "seed": args.seed, "precision": precision,
        "device": str(device),
        "reward_mean": reward["mean"], "reward_std": reward["std"], "reward_min": reward["min"],
        "reward_max": reward["max"],
        # kl_mean: mean over responses of each response's mean per-token KL (the paper's measure);
        # kl_token_mean: mean over all response tokens pooled.
        "kl_mean": kl["mean"], "kl_std": kl["std"],
        "kl_token_mean": sum(k * n for k, n in zip(kls, tokens)) / max(sum(tokens), 1),
        "mean_response_chars": summarize(len(s.response) for s in samples)["mean"],
        "mean_response_tokens": summarize(tokens)["mean"],
        "generation_time_s": generation_s, "total_time_s": time.time() - start,
        "per_prompt": per_prompt,
    }
    print(f"\n=== conciseness evaluation of {name} ===\nmean reward {summary['reward_mean']:.3f} "
          f"(std {summary['reward_std']:.3f}), mean per-token KL from base {summary['kl_mean']:.5f}, "
          f"mean response {summary['mean_response_chars']:.1f} chars; "
          f"{summary['total_time_s']:.1f} s")

    out = Path(args.output_dir or Path("eval_results") / f"conciseness_{model_short_name(name)}")
    write_json(out / SUMMARY_FILE, summary)
    if args.save_responses:
        write_jsonl(out / RESPONSES_FILE, records)
    print(f"summary written to {out / SUMMARY_FILE}")
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_evaluation(evaluate, args, argument_problems(
        args, ("num_samples", "max_new_tokens", "batch_size", "kl_batch_size")))


if __name__ == "__main__":
    main()
