"""One ES population on vLLM: per member (as published) against all members as LoRA adapters in one batch.

Runs in the vLLM tier's environment (.ci/vllm_tier.sh builds it):

    ~/.cache/es-llm/vllm-tier-venv/bin/python bench/vllm_population.py --task countdown \
        --population 8 --items 32 --max_new_tokens 128

Rows, one after the other in one process, the same seeds, the bundled model:
    plain batch     the unperturbed model generating every member's prompts in one call: the
                    engine's own throughput on these sequences, the reference
    per member      the published accelerated loop on one engine: perturb (noise over vLLM's
                    fused tensors), generate the member's prompts, restore; member by member
    LoRA batch      `--noise_mode lowrank --lowrank_targets lora`: every member a LoRA adapter,
                    all members' prompts in one generate call (VLLMEngine.evaluate_batch)
Each row: seconds per iteration's evaluation (the update is not included), sequences and generated
tokens per second, and its share of the plain batch's throughput; the process's peak resident
memory while the row ran.
"""
import argparse
import gc
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_es import PeakRSS  # noqa: E402
from es_llm.strategy import Strategy  # noqa: E402


def load_task(name: str, items: int):
    from es_llm.tasks import Task, conciseness_reward

    if name == "countdown":
        from countdown.countdown_task import make_task

        return make_task(items)
    prompts = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]
    return Task("conciseness", prompts, conciseness_reward, {"target": ["8", "No"]})


def tokens_of(tokenizer, texts) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="countdown", choices=["countdown", "conciseness"])
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--items", type=int, default=32, help="countdown training items")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--sigma", type=float, default=0.001)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--output", default=None, help="also append the table to this markdown file")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from utils.engines import VLLMEngine, hf_layout, resolve_base_model

    model_dir = resolve_base_model("bundled", Path.home() / ".cache/es-llm/bench-converted")
    layout, task = hf_layout(model_dir), load_task(args.task, args.items)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seeds = Strategy(args.population, 33).ask()
    signs = [1.0] * len(seeds)
    longest = max(len(tokenizer(x)["input_ids"]) for x in task.prompts)
    common = dict(max_model_len=longest + args.max_new_tokens + 8)
    rows = []

    def timed(name, evaluate):
        """Times evaluate(), which returns the texts it generated."""
        gc.collect()
        with PeakRSS() as memory:
            t0 = time.perf_counter()
            texts = evaluate()
            seconds = time.perf_counter() - t0
        rows.append({"row": name, "s": seconds, "sequences": len(seeds) * len(task.prompts),
                     "tokens": tokens_of(tokenizer, texts), "peak_gib": memory.peak / 2**30})
        print(f"{name}: {seconds:.1f} s", flush=True)

    def plain_rows():
        engine = VLLMEngine(model_dir, args.precision, args.max_new_tokens, "correlated", layout,
                            **common)
        engine.set_task(task)
        everything = [p for _ in seeds for p in task.prompts]
        engine.generate(task.prompts[:1])  # warm-up
        timed("plain batch (reference)", lambda: engine.generate(everything))

        def per_member():
            texts = []
            for seed in seeds:
                engine.perturb(seed, args.sigma)
                texts.extend(engine.generate(task.prompts))
                engine.restore(seed, args.sigma)
            return texts

        timed("per member (published loop)", per_member)

    plain_rows()
    gc.collect()

    lora = VLLMEngine(model_dir, args.precision, args.max_new_tokens, "lowrank", layout,
                      rank=args.rank, lowrank_targets="lora", population_size=len(seeds),
                      lowrank_batch=len(seeds) * len(task.prompts), **common)
    lora.set_task(task)
    lora.evaluate_batch(seeds[:1], args.sigma, signs[:1])  # warm-up (LoRA kernels)
    texts, generate = [], lora.generate

    def keeping_texts(*a, **k):  # evaluate_batch returns rewards; the row counts the texts
        out = generate(*a, **k)
        texts.extend(out)
        return out

    def lora_batch():
        lora.generate = keeping_texts
        lora.evaluate_batch(seeds, args.sigma, signs)
        return texts

    timed(f"LoRA batch (rank {args.rank})", lora_batch)

    reference = rows[0]["tokens"] / rows[0]["s"]
    lines = [f"`{' '.join(sys.argv)}` on {platform.node()} ({torch.get_num_threads()} threads), "
             f"{time.strftime('%Y-%m-%d')}: task {args.task}, population {args.population}, "
             f"{len(task.prompts)} prompts each, {args.max_new_tokens} new tokens, {args.precision}",
             "", "| row | s per population | sequences/s | generated tokens/s | of plain batch | "
             "peak RSS GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['s']:.1f} | {r['sequences'] / r['s']:.2f} | "
                     f"{r['tokens'] / r['s']:.0f} | {r['tokens'] / r['s'] / reference:.0%} | "
                     f"{r['peak_gib']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
