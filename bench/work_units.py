"""One ES iteration of a work unit on every path, transformers and vLLM, in one run.

    # in the vLLM tier's environment (.ci/vllm_tier.sh builds it); elsewhere the vLLM rows are skipped
    PY=~/.cache/es-llm/vllm-tier-venv/bin/python
    $PY bench/work_units.py --unit countdown --population 4 --items 32 --max_new_tokens 256 \
        --scaling 30 64 128
    $PY bench/work_units.py --unit conciseness          # population 30, 2 prompts, 100 tokens

Rows, one after the other, from the same initial weights, with the same seeds, the bundled model:
    paper-style loop        bench_es.py's literal loop (MISSION.md section 1), one member at a time
    ours, faithful          es_llm's Population, correlated noise, bit-identical to the loop above
    ours, lowrank           `--noise_mode lowrank`: the population in batched generate calls
    transformers generate   reference: plain batched `generate` of the same sequences, unperturbed
    vLLM batch              reference: one vLLM engine generating the same sequences in one call
    vLLM per member         the published loop on one vLLM engine: perturb, generate, restore
    vLLM LoRA batch         `--noise_mode lowrank --lowrank_targets lora` on one vLLM engine
    LoRA space              `--es_params lora --lora_batch` (rank --lora_rank): on transformers,
                            the members' adapters per row of one batched generate; on one vLLM
                            engine, one LoRA request per member
    accelerated, N engines  es_fine-tuning_countdown_accl.py's pool (Ray actors, one core each):
                            per member as published, and in LoRA mode
Each row is a whole iteration (evaluation, update, and broadcast for the pools) except the two
references. Peak memory is the resident memory of this process and all its children (Ray's
workers and daemons included) while the row ran.

`--scaling P1 P2 ...` adds a table of the low-rank modes at those populations on fewer items and
tokens (`--scaling_items`, `--scaling_tokens`), each against its engine's plain batch.
"""
import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_es import PROMPTS, TARGETS, PeakRSS, paper_style_iteration, weights_of  # noqa: E402
from es_llm.generation import Generator  # noqa: E402
from es_llm.strategy import normalize_rewards  # noqa: E402

UNITS = {"countdown": dict(population=4, items=32, max_new_tokens=256),
         "conciseness": dict(population=30, items=2, max_new_tokens=100)}


def load_task(unit: str, items: int):
    from es_llm.tasks import Task, conciseness_reward

    if unit == "countdown":
        from countdown.countdown_task import make_task

        return make_task(items)
    return Task("conciseness", (PROMPTS * items)[:items], conciseness_reward,
                {"target": (TARGETS * items)[:items]})


class Tokens:
    """Generated-token counter for rows whose engine does not count (vLLM): re-tokenises texts."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens_generated = tokenizer, 0

    def add(self, texts) -> list:
        self.tokens_generated += sum(len(ids) for ids in self.tokenizer(
            list(texts), add_special_tokens=False)["input_ids"])
        return texts


class Bench:
    def __init__(self, args, task, tokenizer):
        self.args, self.task, self.tokenizer = args, task, tokenizer
        self.rows, self.skipped = [], []

    def seeds(self, population):
        return np.random.RandomState(0).randint(0, 2**30, size=population, dtype=np.int64).tolist()

    def row(self, name, step, counter=None, population=None, kind="iteration", key=None):
        """Runs step(seeds) `--iterations` times; step returns the seconds of its evaluation.
        `key`: the row's name in --rows, for the report's targets."""
        population = population or self.args.population
        seeds = self.seeds(population)
        gc.collect()
        seconds, evaluate, tokens = [], [], []
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(self.args.warmup):  # untimed: a training run's later iterations
            step(seeds)
        with PeakRSS(tree=True) as memory:
            for _ in range(self.args.iterations):
                before = counter.tokens_generated if counter else 0
                t0 = time.perf_counter()
                evaluate_s = step(seeds)
                seconds.append(time.perf_counter() - t0)
                evaluate.append(seconds[-1] if evaluate_s is None else evaluate_s)
                tokens.append((counter.tokens_generated - before) if counter else None)
        row = {"row": name, "kind": kind, "key": key, "population": population, "s": float(np.mean(seconds)),
               "evaluate_s": float(np.mean(evaluate)), "peak_gib": memory.peak / 2**30,
               "sequences": population * len(self.task.prompts),
               "tokens": None if tokens[0] is None else float(np.mean(tokens)),
               "gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        self.rows.append(row)
        print(f"  {name}: {row['s']:.1f} s (evaluation {row['evaluate_s']:.1f} s), "
              f"peak {row['peak_gib']:.2f} GiB", flush=True)
        return row


def transformers_rows(bench: Bench, model, tokenizer, task):
    from bench.bench_es import lowrank_population, our_iteration, reset

    from es_llm.trainer import Population, TrainConfig

    a = bench.args
    generate = Generator(tokenizer, task.prompts, a.max_new_tokens)
    initial = weights_of(model)
    if "paper" in a.rows:
        import copy

        # As published: transformers' own "sdpa" attention (ours shares the key/value heads).
        scratch = copy.deepcopy(model)
        scratch.set_attn_implementation("sdpa")
        bench.row("paper-style loop", lambda seeds: _evaluation_of(paper_style_iteration(
            model, scratch, seeds, generate, task, a.sigma, a.alpha, "correlated")), generate,
                  key="paper")
        del scratch
    for threads, key in ((1, "faithful"), (4, "faithful4")):
        if key not in a.rows:
            continue
        reset(model, initial)
        cfg = TrainConfig(task="bench", model_name=a.model_name, output_dir="-", sigma=a.sigma,
                          alpha=a.alpha, population_size=a.population, gpu_threads=threads,
                          precision=a.precision)
        population = Population(model, cfg, generate, task)
        bench.row("ours, faithful" + ("" if threads == 1 else f", --gpu_threads {threads} "
                                      "(the trainers' default)"),
                  lambda seeds: _evaluation_of(our_iteration(population, seeds)), generate)
        population.close()
        del population
    if "lowrank" in a.rows:
        reset(model, initial)
        population = lowrank_population(model, a, a.population, a.precision, generate, task)
        bench.row(f"ours, lowrank rank {a.rank}", lambda seeds: _evaluation_of(our_iteration(
            population, seeds)), generate, key="lowrank")
        del population
    if "generate" in a.rows:
        reset(model, initial)
        batched = Generator(tokenizer, task.prompts * a.population, a.max_new_tokens,
                            batch_size=a.lowrank_batch)
        bench.row(f"transformers generate (reference, {a.lowrank_batch} sequences per call)",
                  lambda seeds: untimed(batched, model), batched, kind="reference", key="generate")
    if "lora_es" in a.rows:  # last: PEFT wraps the model's linear layers in place
        from es_llm.lora import attach_adapter

        reset(model, initial)
        cfg = lora_es_config(a)
        population = Population(attach_adapter(model, cfg), cfg, generate, task)
        bench.row(f"ours, LoRA space rank {a.lora_rank}, --lora_batch",
                  lambda seeds: _evaluation_of(our_iteration(population, seeds)), generate,
                  key="lora_es")
        del population


def lora_es_config(a):
    """--es_params lora --lora_batch at --lora_rank over the decoder's projections (the default
    targets), the bench's sigma and alpha."""
    from es_llm.trainer import TrainConfig

    return TrainConfig(task="bench", model_name=a.model_name, output_dir="-", sigma=a.sigma,
                       alpha=a.alpha, population_size=a.population, es_params="lora",
                       lora_rank=a.lora_rank, lora_batch=True, lowrank_batch=a.lowrank_batch,
                       precision=a.precision)


def untimed(call, *args) -> None:
    """A reference row's step: the whole call is its evaluation."""
    call(*args)


def _evaluation_of(timings: dict) -> float:
    return timings.get("evaluate", timings.get("noise", 0.0) + timings.get("generate", 0.0))


def vllm_engine(args, model_dir, layout, task, max_new_tokens, lowrank=False, population=None,
                lora=None):
    """One vLLM engine: per member, low-rank LoRA members (`lowrank`), or LoRA-space ES (`lora`:
    the run's settings)."""
    from accelerated.engines import VLLMEngine

    extra = dict(rank=args.rank, lowrank_targets="lora", lowrank_batch=args.lowrank_batch,
                 population_size=population or args.population) if lowrank else {}
    if lora is not None:
        extra = dict(lora=lora, lowrank_batch=args.lowrank_batch,
                     population_size=population or args.population)
    engine = VLLMEngine(model_dir, args.precision, max_new_tokens,
                        "lowrank" if lowrank else "correlated", layout,
                        max_model_len=args.max_model_len, **extra)
    engine.set_task(task)
    engine.generate(task.prompts[:1])  # warm-up
    return engine


def vllm_rows(bench: Bench, model_dir, layout, task):
    a = bench.args
    counter = Tokens(bench.tokenizer)
    if {"vllm_batch", "vllm_member"} & set(a.rows):
        engine = vllm_engine(a, model_dir, layout, task, a.max_new_tokens)
        if "vllm_batch" in a.rows:
            everything = list(task.prompts) * a.population
            bench.row("vLLM batch (reference)", lambda seeds: untimed(
                counter.add, engine.generate(everything)), counter, kind="reference",
                key="vllm_batch")
        if "vllm_member" in a.rows:
            def per_member(seeds):
                t0 = time.perf_counter()
                rewards = []
                for seed in seeds:
                    engine.weights.perturb(seed, a.sigma)
                    texts = counter.add(engine.generate(task.prompts))
                    engine.weights.restore(seed, a.sigma)
                    rewards.append(float(np.mean(task.score(texts, seed=seed))))
                evaluate = time.perf_counter() - t0
                engine.weights.update(seeds, normalize_rewards(rewards).tolist(), a.alpha)
                return evaluate
            bench.row("vLLM per member, 1 engine (published loop)", per_member, counter)
        del engine
        gc.collect()
    if "vllm_lora" in a.rows:
        engine = vllm_engine(a, model_dir, layout, task, a.max_new_tokens, lowrank=True)
        bench.row(f"vLLM LoRA batch, 1 engine (rank {a.rank})",
                  lambda seeds: _lora_iteration(engine, seeds, a, counter), counter, key="vllm_lora")
        del engine
        gc.collect()
    if "vllm_lora_es" in a.rows:
        engine = vllm_engine(a, model_dir, layout, task, a.max_new_tokens, lora=lora_es_config(a))
        bench.row(f"vLLM, LoRA space rank {a.lora_rank}, --lora_batch, 1 engine",
                  lambda seeds: _lora_iteration(engine, seeds, a, counter), counter,
                  key="vllm_lora_es")
        del engine
        gc.collect()
    modes = [mode for mode in ("member", "lora") if f"accl_{mode}" in a.rows]
    if modes:
        import ray

        from accelerated.pool import start_ray

        cores = len(os.sched_getaffinity(0))
        start_ray("local", num_cpus=max(cores, a.num_engines * max(1, cores // a.num_engines)))
        try:  # one Ray instance for both rows, each its own pool
            for mode in modes:
                accelerated_row(bench, model_dir, layout, task, mode)
        finally:
            ray.shutdown()


def _lora_iteration(engine, seeds, a, counter=None):
    """evaluate_batch + update on one vLLM LoRA engine; returns the evaluation's seconds."""
    if counter is not None and not hasattr(engine, "_counted"):
        generate = engine.generate
        engine.generate = lambda *p, **k: counter.add(generate(*p, **k))
        engine._counted = True
    t0 = time.perf_counter()
    results = engine.evaluate_batch(seeds, a.sigma, [1.0] * len(seeds))
    evaluate = time.perf_counter() - t0
    z = normalize_rewards([r["reward"] for r in results]).tolist()
    engine.weights.update(seeds, z, a.alpha)
    return evaluate


def accelerated_row(bench: Bench, model_dir, layout, task, mode: str):
    """The accelerated version's pool (on the Ray this process started): `--num_engines` vLLM
    engines as Ray actors (each on its share of the cores, or on its own GPU)."""
    from accelerated.pool import EnginePool

    a = bench.args
    per_engine = max(1, len(os.sched_getaffinity(0)) // a.num_engines)
    kwargs = {"model_path": model_dir, "precision": a.precision, "max_new_tokens": a.max_new_tokens,
              "noise_mode": "lowrank" if mode == "lora" else "correlated", "layout": layout,
              "max_model_len": a.max_model_len, "rank": a.rank, "lowrank_targets": "lora",
              "lowrank_batch": a.lowrank_batch, "population_size": a.population}
    pool = None
    try:
        t0 = time.perf_counter()
        on_gpu = torch.cuda.is_available()  # then one GPU per engine, as the accelerated version
        pool = EnginePool("vllm", a.num_engines, kwargs, task, on_gpu, 1 if on_gpu else per_engine,
                          bind_cpus=not on_gpu)
        pool.broadcast()
        print(f"  ({a.num_engines} engines ready in {time.perf_counter() - t0:.0f} s)", flush=True)

        def iteration(seeds):
            t0 = time.perf_counter()
            results = pool.evaluate(seeds, a.sigma, batched=mode == "lora")
            evaluate = time.perf_counter() - t0
            pool.update(seeds, normalize_rewards([r["reward"] for r in results]).tolist(), a.alpha)
            pool.broadcast()
            return evaluate
        label = "per member (published)" if mode == "member" else f"LoRA batches (rank {a.rank})"
        engines = f"{a.num_engines} vLLM engine" + ("s" if a.num_engines > 1 else "")
        bench.row(f"accelerated, {engines}, {label}", iteration)
    finally:
        if pool is not None:
            pool.shutdown()


def scaling_rows(args, model_dir, layout, tokenizer, have_vllm) -> list:
    """The low-rank modes at larger populations on a smaller unit, each against its plain batch."""
    from es_llm.models import load_model

    sub = argparse.Namespace(**{**vars(args), "items": args.scaling_items,
                                "max_new_tokens": args.scaling_tokens, "iterations": 1})
    task = load_task(args.unit, args.scaling_items)
    bench = Bench(sub, task, tokenizer)
    lines = []
    if "lowrank" in args.scaling_engines:
        model, _ = load_model(model_dir, args.precision, device=args.device)
        for n in args.scaling:  # the unit's own rows, at population n
            at_n = Bench(argparse.Namespace(**{**vars(sub), "population": n,
                                               "rows": ["lowrank", "generate"]}), task, tokenizer)
            transformers_rows(at_n, model, tokenizer, task)
            lines.append(("transformers lowrank", n, *at_n.rows))
        del model
        gc.collect()
    if "vllm_lora" in args.scaling_engines and have_vllm:
        counter = Tokens(tokenizer)
        plain_engine = vllm_engine(sub, model_dir, layout, task, args.scaling_tokens)
        plains = {}
        for n in args.scaling:
            everything = list(task.prompts) * n
            plains[n] = bench.row(f"vLLM batch, {n}", lambda seeds: untimed(
                counter.add, plain_engine.generate(everything)), counter, n, "reference")
        del plain_engine
        gc.collect()
        for n in args.scaling:
            engine = vllm_engine(sub, model_dir, layout, task, args.scaling_tokens, lowrank=True,
                                 population=n)
            r = bench.row(f"vLLM LoRA batch, population {n}",
                          lambda seeds: _lora_iteration(engine, seeds, sub, counter), counter, n)
            lines.append(("vLLM LoRA batch", n, r, plains[n]))
            del engine
            gc.collect()
    return lines


def throughput(row) -> float:
    return row["tokens"] / row["evaluate_s"] if row["tokens"] else row["sequences"] / row["evaluate_s"]


def report(args, rows, scaling, skipped) -> str:
    command = " ".join([Path(sys.executable).name, *sys.argv])
    lines = [f"`{command}` on {platform.node()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}: unit {args.unit}, population "
             f"{args.population}, {args.items} prompts per member, {args.max_new_tokens} new "
             f"tokens, {args.precision}, {args.iterations} timed iteration(s) per row after "
             f"{args.warmup} untimed", "",
             "| row | s / iteration | evaluation s | vs paper-style | generated tokens/s | "
             "peak RSS GiB | peak GPU GiB |", "|---|---|---|---|---|---|---|"]
    by = {r["key"]: r for r in rows if r["key"]}
    paper = by.get("paper")
    for r in rows:
        speed = f"{paper['s'] / r['s']:.2f}x" if paper and r["kind"] == "iteration" else ""
        tps = f"{r['tokens'] / r['evaluate_s']:.0f}" if r["tokens"] else ""
        gpu = "" if r["gpu_gib"] is None else f"{r['gpu_gib']:.2f}"
        lines.append(f"| {r['row']} | {r['s']:.1f} | {r['evaluate_s']:.1f} | {speed} | {tps} | "
                     f"{r['peak_gib']:.2f} | {gpu} |")
    for name in skipped:
        lines.append(f"| {name} | not run | | | | | |")
    targets = []
    for low, ref in (("lowrank", "generate"), ("vllm_lora", "vllm_batch")):
        if low in by and ref in by and by[low]["tokens"] and by[ref]["tokens"]:
            low, ref = by[low], by[ref]
            targets.append(f"- {low['row']}: evaluation throughput {throughput(low) / throughput(ref):.0%} "
                           f"of {ref['row']} (target >= 80%)")
    if paper:
        fastest = min((r for r in rows if r["kind"] == "iteration"), key=lambda r: r["s"])
        goal = 5 if args.unit == "countdown" else 15
        targets.append(f"- fastest whole iteration: {fastest['row']}, {paper['s'] / fastest['s']:.2f}x "
                       f"the paper-style loop (target >= {goal}x)")
    if targets:
        lines += ["", "Targets:", *targets]
    if scaling:
        lines += ["", f"Scaling: {args.scaling_items} prompts per member, {args.scaling_tokens} new "
                      f"tokens, one iteration each", "",
                  "| mode | population | sequences | s / iteration | evaluation s | plain batch s | "
                  "throughput vs plain | peak RSS GiB | plain's peak RSS GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode, n, r, p in scaling:
            lines.append(f"| {mode} | {n} | {r['sequences']} | {r['s']:.1f} | {r['evaluate_s']:.1f} | "
                         f"{p['s']:.1f} | {throughput(r) / throughput(p):.0%} | {r['peak_gib']:.2f} | "
                         f"{p['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


ROWS = ("paper", "faithful", "faithful4", "lowrank", "generate", "lora_es", "vllm_batch",
        "vllm_member", "vllm_lora", "vllm_lora_es", "accl_member", "accl_lora")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit", default="countdown", choices=sorted(UNITS))
    p.add_argument("--population", type=int, default=None, help="default: the unit's")
    p.add_argument("--items", type=int, default=None, help="prompts per member (default: the unit's)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the unit's")
    p.add_argument("--iterations", type=int, default=1, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed iterations per row before the timed ones (the steady state of a "
                        "training run: vLLM LoRA members load their adapters' files in the first "
                        "iteration only)")
    p.add_argument("--sigma", type=float, default=0.001)
    p.add_argument("--alpha", type=float, default=0.0005)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--lora_rank", type=int, default=8, help="the LoRA-space rows' adapter rank")
    p.add_argument("--lowrank_batch", type=int, default=256, help="sequences per batched call")
    p.add_argument("--num_engines", type=int, default=2, help="engines of the accelerated rows")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--model", default="bundled", help="the bundled model, or an HF directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="of the transformers rows (vLLM picks its own)")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    p.add_argument("--scaling", type=int, nargs="*", default=[], help="populations of the scaling table")
    p.add_argument("--scaling_items", type=int, default=2)
    p.add_argument("--scaling_tokens", type=int, default=128)
    p.add_argument("--scaling_engines", nargs="+", default=["lowrank", "vllm_lora"],
                   choices=["lowrank", "vllm_lora"])
    p.add_argument("--output", default=None, help="also append the report to this markdown file")
    args = p.parse_args(argv)
    for key, value in UNITS[args.unit].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_grad_enabled(False)

    from transformers import AutoTokenizer

    from accelerated.engines import vllm_available
    from es_llm.hf_weights import hf_layout, resolve_base_model
    from es_llm.models import load_model

    model_dir = resolve_base_model(args.model, Path.home() / ".cache/es-llm/bench-converted")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # as load_model sets it: generation pads on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = load_task(args.unit, args.items)
    longest = max(len(ids) for ids in tokenizer(list(task.prompts))["input_ids"])
    args.max_model_len = longest + max(args.max_new_tokens, args.scaling_tokens) + 8
    args.model_name = model_dir
    bench = Bench(args, task, tokenizer)
    print(f"unit {args.unit}: population {args.population}, {len(task.prompts)} prompts (longest "
          f"{longest} tokens), {args.max_new_tokens} new tokens", flush=True)
    if {"paper", "faithful", "faithful4", "lowrank", "generate", "lora_es"} & set(args.rows):
        model, _ = load_model(model_dir, args.precision, device=args.device)
        transformers_rows(bench, model, tokenizer, task)
        del model
        gc.collect()
    have_vllm = vllm_available()
    vllm_wanted = [r for r in args.rows if r.startswith(("vllm", "accl"))]
    if have_vllm:
        vllm_rows(bench, model_dir, hf_layout(model_dir), task)
    else:
        bench.skipped += [f"{r} (vLLM is not installed here)" for r in vllm_wanted]
    scaling = scaling_rows(args, model_dir, hf_layout(model_dir), tokenizer, have_vllm) if args.scaling else []
    text = report(args, bench.rows, scaling, bench.skipped)
    print("\n" + text)
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n" + text)
    return bench.rows, scaling


if __name__ == "__main__":
    main()
