"""Benchmark one ES iteration on CPU: a literal paper-style loop, our trainer's paths, and the roofline.

    python bench/bench_es.py                      # population 30, the two conciseness prompts, 100 tokens
    python bench/bench_es.py --scaling            # add the population and token scaling tables
    python bench/bench_es.py --population_size 8 --max_new_tokens 20 --iterations 1   # a quick look

The lowrank rows (`--noise_mode lowrank`: the whole population in batched generate calls) come with
a table at populations 64 and 128 (`--lowrank_populations`), each against one plain batched generate
of the same number of sequences.

Everything runs in one process, one after the other, from the same initial weights and the same seeds.
Prints a markdown table and writes it (with machine, versions and command) to --output.
"""
import argparse
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from es_llm.generation import Generator  # noqa: E402
from es_llm.models import load_model  # noqa: E402
from es_llm.noise import tensor_noise  # noqa: E402
from es_llm.strategy import normalize_rewards  # noqa: E402
from es_llm.tasks import Task, conciseness_reward  # noqa: E402
from es_llm.trainer import Population, TrainConfig  # noqa: E402
from bench.published_loop import published_iteration  # noqa: E402

PROMPTS = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]
TARGETS = ["8", "No"]


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms); with
    `tree`, of this process and all its descendants together (sampled every 200 ms)."""

    def __init__(self, tree: bool = False):
        self.tree = tree

    def __enter__(self):
        self.peak, self.running = self.rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def rss(self) -> int:
        if self.tree:
            import psutil

            total = 0
            me = psutil.Process()
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # gone between the listing and the reading
                    pass
            return total
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.2 if self.tree else 0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


@torch.no_grad()
def paper_style_iteration(canonical, scratch, seeds, generate, task, sigma, alpha, noise_mode):
    """The published iteration (bench/published_loop.py) with the members on a scratch copy."""
    return published_iteration(canonical, scratch, seeds, generate, task, sigma, alpha, noise_mode)[1]


def our_iteration(population, seeds):
    t0 = time.perf_counter()
    rewards, timings = population.evaluate_members(list(range(len(seeds))), seeds)
    timings["evaluate"] = time.perf_counter() - t0  # wall time (the phases are thread-seconds)
    t0 = time.perf_counter()
    population.update(seeds, normalize_rewards([rewards[i] for i in range(len(seeds))]))
    timings["update"] = time.perf_counter() - t0
    return timings


def measure(name, args, step, generate, rng_seed):
    """Warm-up iterations, then timed ones; returns a row of the table."""
    rng = np.random.RandomState(rng_seed)
    rows = []
    with PeakRSS() as memory:
        for i in range(args.warmup + args.iterations):
            seeds = rng.randint(0, 2**30, size=args.population_size, dtype=np.int64).tolist()
            tokens_before = generate.tokens_generated
            t0 = time.perf_counter()
            timings = step(seeds)
            seconds = time.perf_counter() - t0
            if i >= args.warmup:
                rows.append((seconds, timings, generate.tokens_generated - tokens_before))
    seconds = float(np.mean([r[0] for r in rows]))
    phases = {k: float(np.mean([r[1].get(k, 0.0) for r in rows])) for k in ("generate", "noise", "update")}
    tokens = float(np.mean([r[2] for r in rows]))
    print(f"  {name}: {seconds:.2f} s/iteration", flush=True)
    return {"name": name, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_gb": memory.peak / 2**30,
            "evaluate_s": float(np.mean([r[1].get("evaluate", r[0]) for r in rows])),
            **{f"share_{k}": v / seconds for k, v in phases.items()}}


def lowrank_population(model, args, population_size, precision, generate, task, prune_finished=True):
    cfg = TrainConfig(task="bench", model_name=args.model_name, output_dir="-", sigma=args.sigma,
                      alpha=args.alpha, population_size=population_size, gpu_threads=1, noise_mode="lowrank",
                      rank=args.rank, lowrank_batch=args.lowrank_batch, precision=precision,
                      prune_finished=prune_finished)
    return Population(model, cfg, generate, task)


@torch.no_grad()
def reset(model, weights) -> None:
    for p, w in zip(model.parameters(), weights):
        p.copy_(w)


def weights_of(model):
    return [p.detach().clone() for p in model.parameters()]


def run_configs(args):
    task = Task("conciseness", PROMPTS[:args.prompts] * ((args.prompts + 1) // 2), conciseness_reward,
                {"target": (TARGETS * args.prompts)[:args.prompts]})
    results, identical = [], {}
    for precision in args.precisions:
        model, tokenizer = load_model(args.model_name, precision)
        generate = Generator(tokenizer, task.prompts, args.max_new_tokens)
        initial = weights_of(model)
        final = {}
        if precision == args.precisions[0]:
            # The literal reference loop: a canonical model and one scratch copy.
            import copy
            scratch = copy.deepcopy(model)
            scratch.set_attn_implementation("sdpa")  # as published (ours shares the key/value heads)
            results.append(measure(f"paper-style loop, {precision}", args, lambda seeds: paper_style_iteration(
                model, scratch, seeds, generate, task, args.sigma, args.alpha, args.noise_mode), generate, 0))
            final["paper"] = weights_of(model)
            del scratch
        for master in args.master_weights:
            reset(model, initial)
            cfg = TrainConfig(task="bench", model_name=args.model_name, output_dir="-", sigma=args.sigma,
                              alpha=args.alpha, population_size=args.population_size, gpu_threads=1,
                              noise_mode=args.noise_mode, master_weights=master, precision=precision)
            population = Population(model, cfg, generate, task)
            label = f"ours, {precision}" + (", --master_weights fp32" if master == "fp32" else "")
            results.append(measure(label, args, lambda seeds: our_iteration(population, seeds),
                                   generate, 0))
            final[master] = weights_of(model)
            del population
        if "paper" in final and "none" in final:
            identical[precision] = all(torch.equal(a, b) for a, b in zip(final["paper"], final["none"]))
        for prune in (True, False):
            reset(model, initial)
            population = lowrank_population(model, args, args.population_size, precision, generate, task,
                                            prune)
            label = f"ours, lowrank rank {args.rank}, {precision}" + ("" if prune else ", --no_prune_finished")
            results.append(measure(label, args, lambda seeds: our_iteration(population, seeds), generate, 0))
            del population
        # The roofline: the unperturbed model at the initial weights (the timed rows start there),
        # all sequences in one batch, and one member at a time.
        reset(model, initial)
        batched = Generator(tokenizer, task.prompts * args.population_size, args.max_new_tokens)
        results.append(measure(f"roofline: one batched generate of all {args.population_size * len(task.prompts)} "
                               f"sequences, {precision}", args, lambda seeds: {"generate": _timed(batched, model)},
                               batched, 0))
        results.append(measure(f"roofline: generate one member at a time, {precision}", args,
                               lambda seeds: {"generate": sum(_timed(generate, model) for _ in seeds)}, generate, 0))
        t0 = time.perf_counter()
        with torch.no_grad():
            for k, p in enumerate(model.parameters()):
                tensor_noise(p, 1, k, "iid")
        results.append({"name": f"one noise pass over all weights, {precision}",
                        "seconds": time.perf_counter() - t0})
        del model
    return results, identical


def _timed(generate, model):
    t0 = time.perf_counter()
    generate(model)
    return time.perf_counter() - t0


def table(results, reference) -> str:
    lines = ["| configuration | s / iteration | vs paper-style | tokens / s | generate | noise | update | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "share_generate" not in r:
            lines.append(f"| {r['name']} | {r['seconds']:.2f} | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['seconds']:.2f} | {reference / r['seconds']:.2f}x | "
                     f"{r['tokens_per_s']:.0f} | {r['share_generate']:.0%} | {r['share_noise']:.0%} | "
                     f"{r['share_update']:.0%} | {r['peak_gb']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="bundled")
    p.add_argument("--population_size", type=int, default=30)
    p.add_argument("--prompts", type=int, default=2, help="how many conciseness prompts (cycled)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sigma", type=float, default=0.001)
    p.add_argument("--alpha", type=float, default=0.0005)
    p.add_argument("--noise_mode", default="correlated", choices=["correlated", "iid"],
                   help="noise of the paper-style loop and of our full-rank rows")
    p.add_argument("--rank", type=int, default=1, help="rank of the lowrank rows")
    p.add_argument("--lowrank_batch", type=int, default=256, help="sequences per batched generate call (lowrank)")
    p.add_argument("--lowrank_populations", type=int, nargs="*", default=[64, 128],
                   help="populations of the lowrank scaling table (none: skip it)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--master_weights", nargs="+", default=["none", "fp32"])
    p.add_argument("--scaling", action="store_true", help="also time our default path against population and tokens")
    p.add_argument("--output", default=None, help="markdown file to write (default: print only)")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    results, identical = run_configs(args)
    reference = results[0]["seconds"]
    report = [table(results, reference)]
    report.append("\nWeights after the timed iterations identical to the paper-style loop's: "
                  + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in identical.items()))
    by_name = {r["name"]: r for r in results}
    first = args.precisions[0]
    ours = by_name[f"ours, {first}"]["seconds"]
    one_at_a_time = by_name[f"roofline: generate one member at a time, {first}"]["seconds"]
    noise_pass = by_name[f"one noise pass over all weights, {first}"]["seconds"]
    bound = one_at_a_time + args.population_size * noise_pass
    report.append(f"\nTargets ({first}): ours vs paper-style {reference / ours:.2f}x (target >= 1.3x); "
                  f"ours / (generation one member at a time + one noise pass per member) = "
                  f"{ours / bound:.2f} (target <= 1.5)")
    lowrank = by_name[f"ours, lowrank rank {args.rank}, {first}"]
    batched = next(r["seconds"] for r in results
                   if r["name"].startswith("roofline: one batched generate") and r["name"].endswith(f", {first}"))
    report.append(f"Targets ({first}, lowrank): iteration vs paper-style {reference / lowrank['seconds']:.2f}x "
                  f"(target >= 10x); population evaluation throughput / one plain batched generate of the same "
                  f"sequences = {batched / lowrank['evaluate_s']:.0%} (target >= 80%)")
    if args.lowrank_populations:
        report.append("\n" + lowrank_scaling(args))
    if args.scaling:
        report.append("\n" + scaling(args))
    text = "\n".join(report)
    print("\n" + text)
    if args.output:
        header = (f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                  f"Python {platform.python_version()}, torch {torch.__version__}\n\n"
                  f"Command: `python {' '.join(sys.argv)}`\n\n")
        Path(args.output).write_text(header + text + "\n")


def lowrank_scaling(args) -> str:
    """Lowrank at larger populations (first precision), each against one plain batched generate of the same
    number of sequences."""
    precision = args.precisions[0]
    model, tokenizer = load_model(args.model_name, precision)
    task = Task("conciseness", PROMPTS, conciseness_reward, {"target": TARGETS})
    generate = Generator(tokenizer, task.prompts, args.max_new_tokens)
    lines = [f"Lowrank rank {args.rank}, {precision}, {args.max_new_tokens} new tokens, up to {args.lowrank_batch} "
             f"sequences per generate call:\n",
             "| population | sequences | s / iteration | evaluation s | plain batched generate s | throughput vs plain "
             "| update s | peak RSS (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for n in args.lowrank_populations:
        sub = argparse.Namespace(**{**vars(args), "population_size": n, "iterations": 1,
                                    "warmup": min(args.warmup, 1)})
        population = lowrank_population(model, args, n, precision, generate, task)
        r = measure(f"lowrank {n}", sub, lambda seeds: our_iteration(population, seeds), generate, 2)
        del population
        batched = Generator(tokenizer, task.prompts * n, args.max_new_tokens)
        plain = measure(f"plain batched generate of {n * len(task.prompts)} sequences", sub,
                        lambda seeds: {"generate": _timed(batched, model)}, batched, 2)["seconds"]
        lines.append(f"| {n} | {n * len(task.prompts)} | {r['seconds']:.2f} | {r['evaluate_s']:.2f} | {plain:.2f} | "
                     f"{plain / r['evaluate_s']:.0%} | {r['share_update'] * r['seconds']:.2f} | {r['peak_gb']:.2f} |")
    return "\n".join(lines)


def scaling(args) -> str:
    task_prompts = PROMPTS
    model, tokenizer = load_model(args.model_name, args.precisions[0])
    task = Task("conciseness", task_prompts, conciseness_reward, {"target": TARGETS})
    lines = ["| population | max new tokens | s / iteration | s / member | peak RSS (GiB) |", "|---|---|---|---|---|"]
    cases = [(n, args.max_new_tokens) for n in (8, 16, 30)]
    cases += [(args.population_size, t) for t in (args.max_new_tokens // 4, args.max_new_tokens // 2)]
    for n, tokens in cases:
        generate = Generator(tokenizer, task.prompts, tokens)
        cfg = TrainConfig(task="bench", model_name=args.model_name, output_dir="-", sigma=args.sigma,
                          alpha=args.alpha, population_size=n, gpu_threads=1, noise_mode=args.noise_mode,
                          precision=args.precisions[0])
        population = Population(model, cfg, generate, task)
        sub = argparse.Namespace(**{**vars(args), "population_size": n, "iterations": 1, "warmup": 0})
        r = measure(f"scaling {n} x {tokens}", sub, lambda seeds: our_iteration(population, seeds), generate, 1)
        lines.append(f"| {n} | {tokens} | {r['seconds']:.2f} | {r['seconds'] / n:.2f} | {r['peak_gb']:.2f} |")
        del population
    return "\n".join(lines)


if __name__ == "__main__":
    main()
