"""The plain trainers' evaluator: processes (accelerate) and threads.

Seed i is evaluated by rank i % num_processes, up to `gpu_threads` at a time on separate model
copies (or, in lowrank mode, all of the rank's members in batched generate calls on the one model);
every rank all-reduces the rewards and applies the same update. The loop itself is es_llm/loop.py.
"""
import copy
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import InitProcessGroupKwargs, broadcast, reduce

from . import checkpoint as ckpt
from . import tracking
from .generation import Generator
from .loop import report_iteration, run_es
# (utils/ imports ENGINES and SCHEDULES from here)
from .config import ENGINES, RESUME_MUST_MATCH, SCHEDULES, TrainConfig  # noqa: F401
from .lowrank import LOWRANK, BatchedLowRank, evaluate_batched, keeps_masters, lowrank_update
from .models import load_model
from .noise import MasterWeights, add_noise, subtract_noise
from .rundir import Run
from .shaping import member_signs
from .strategy import Strategy, es_update

class Population:
    """The rank's weights and how its members are evaluated.

    The canonical weights (`base`) are never perturbed (unless `published_drift`). In the
    correlated and iid modes each thread perturbs its own copy, generates, and restores it (by
    subtracting the regenerated noise, as published, so in bf16/fp16 a copy drifts within an
    iteration: member i sees the rounding left by the members before it on copy i mod
    processes x threads). In lowrank mode there are no copies: the members are batched into
    generate calls on `base`, each row computing with its own member's perturbation. The update is
    applied to the canonical weights (or their fp32 masters) and copied to every thread copy. The
    weights after an iteration are therefore a pure function of the weights before it, the seeds
    and the rewards; the rewards depend on the number of copies in bf16/fp16 without masters.
    With `published_drift`, thread 0's copy is `base` itself, as in the published scripts.
    """

    def __init__(self, model, cfg: TrainConfig, masters=None):
        self.cfg = cfg
        self.base = model
        self.names = [n for n, _ in model.named_parameters()]
        self.base_params = [p for _, p in model.named_parameters()]
        lowrank = cfg.noise_mode == LOWRANK
        # Lowrank always accumulates its update in fp32: a model held in a lower precision gets masters.
        self.masters = MasterWeights(self.base_params) if keeps_masters(
            cfg.master_weights, cfg.noise_mode, self.base_params) else None
        if self.masters and masters is not None:
            self.masters.tensors = [masters[n].to(self.base_params[0].device) for n in self.names]
            self.masters.copy_to(self.base_params)
        self.lowrank = BatchedLowRank(model, cfg.rank, cfg.lowrank_targets) if lowrank else None
        copies = 0 if lowrank else cfg.gpu_threads
        self.models = [copy.deepcopy(model) for _ in range(copies)]
        if cfg.published_drift and self.models:
            # As published: thread 0 evaluates on the canonical weights, so its restore rounding
            # stays in the weights that are updated and saved.
            self.models[0] = model
        self.params = [[p for _, p in m.named_parameters()] for m in self.models]

    def perturb(self, slot: int, seed: int, sign: float = 1.0):
        """Perturb a thread copy by sign * sigma * eps; returns what restore needs (the added
        noise, kept to save a pass)."""
        scale = sign * self.cfg.sigma
        if self.masters:
            self.masters.perturb(self.params[slot], seed, scale, self.cfg.noise_mode)
            return None
        return add_noise(self.params[slot], seed, scale, self.cfg.noise_mode, keep=True)

    def restore(self, slot: int, added) -> None:
        if self.masters:
            self.masters.copy_to(self.params[slot])
        else:
            subtract_noise(self.params[slot], added)

    def evaluate(self, slot: int, seed: int, generate, task, sign: float = 1.0):
        """Mean reward of the member `seed` on every prompt, its completions, and phase timings."""
        t0 = time.perf_counter()
        added = self.perturb(slot, seed, sign)
        t1 = time.perf_counter()
        try:
            completions = generate(self.models[slot],
                                   with_prompt=self.cfg.reward_on_prompt_and_response)
        finally:
            t2 = time.perf_counter()
            self.restore(slot, added)
        t3 = time.perf_counter()
        reward = float(np.mean(task.score(completions, seed=seed)))
        return reward, completions, {"noise": t1 - t0 + t3 - t2, "generate": t2 - t1}

    def evaluate_members(self, members, seeds, generate, task, pool, on_result=None, signs=None):
        """Evaluate the members (population indices) this rank owns, `gpu_threads` at a time, or in
        lowrank mode up to `lowrank_batch` sequences per batched generate call.

        `signs[i]` (default +1) multiplies member i's perturbation (antithetic pairs).
        Returns {index: reward} and the summed phase timings (thread-seconds)."""
        signs = signs or member_signs(len(seeds), False)
        if self.lowrank:
            return self._evaluate_lowrank(members, seeds, signs, generate, task, on_result)
        rewards, timings = {}, {"noise": 0.0, "generate": 0.0}
        threads = len(self.models)
        for chunk in range(0, len(members), threads):
            batch = members[chunk:chunk + threads]
            # One thread evaluates in the caller's thread: on CPU, generating from a worker thread
            # measured 1.6x slower (bench/bench_es.py, docs/benchmarks.md).
            run = pool.map if threads > 1 else map
            results = run(lambda slot_i: self.evaluate(slot_i[0], seeds[slot_i[1]], generate,
                                                       task, signs[slot_i[1]]),
                          enumerate(batch))
            for i, (reward, completions, spent) in zip(batch, results):
                rewards[i] = reward
                for phase, seconds in spent.items():
                    timings[phase] += seconds
                if on_result:
                    on_result(i, reward, completions)
        return rewards, timings

    def _evaluate_lowrank(self, members, seeds, signs, generate, task, on_result):
        results, timings = evaluate_batched(
            self.lowrank, generate, task, [seeds[i] for i in members], [signs[i] for i in members],
            self.cfg.sigma, self.cfg.lowrank_batch, self.cfg.prune_finished,
            self.cfg.reward_on_prompt_and_response)
        rewards = {}
        for j, reward, completions in results:
            rewards[members[j]] = reward
            if on_result:
                on_result(members[j], reward, completions)
        return rewards, timings

    @torch.no_grad()
    def update(self, seeds, weights, n: int | None = None) -> None:
        """The same update on every rank; then every thread copy gets the new weights.

        (seeds, weights) are the strategy's update terms (the shaped rewards; one term per pair
        for antithetic pairs); n is the population size, len(seeds) unless given."""
        n = n or len(seeds)
        target = self.masters.tensors if self.masters else self.base_params
        if self.lowrank:
            lowrank_update(target, seeds, weights, self.cfg.alpha, self.cfg.rank, n=n,
                           only=self.lowrank.only)
        else:
            es_update(target, seeds, weights, self.cfg.alpha, self.cfg.noise_mode, n=n)
        if self.masters:
            self.masters.copy_to(self.base_params)
        for params in self.params:
            for dst, src in zip(params, self.base_params):
                dst.copy_(src)

    def master_state(self):
        if not self.masters:
            return None
        return {n: t.detach().cpu().contiguous() for n, t in zip(self.names, self.masters.tensors)}


def resume_mismatches(saved: dict, cfg) -> list:
    """The RESUME_MUST_MATCH settings on which a checkpoint's config and this run differ; a setting
    missing from an older checkpoint counts as its default."""
    fields = type(cfg).__dataclass_fields__
    return [f"{k}: checkpoint has {saved.get(k, fields[k].default)!r}, this run has "
            f"{getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
            if saved.get(k, fields[k].default) != getattr(cfg, k)]


class LocalEvaluator:
    """The population on this process: thread copies (correlated, iid) or batched rows (lowrank);
    the main rank's seeds broadcast, the rewards all-reduced, the same update on every rank."""

    def __init__(self, cfg: TrainConfig, accelerator, model, tokenizer, task, masters=None):
        self.cfg, self.accelerator, self.task, self.tokenizer = cfg, accelerator, task, tokenizer
        self.is_main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.population = Population(model, cfg, masters)
        self.generate = Generator(tokenizer, task.prompts, cfg.max_new_tokens, cfg.do_sample)
        self.pool = ThreadPoolExecutor(cfg.gpu_threads)
        self.mine = list(range(accelerator.process_index, cfg.population_size, self.world))
        self.label = f"[rank {accelerator.process_index}] " if self.world > 1 else ""

    def agree(self, strategy, stop: bool):
        """The main rank's stop flag and seeds, on every rank (None: stop)."""
        message = torch.zeros(self.cfg.population_size + 1, dtype=torch.int64,
                              device=self.accelerator.device)
        if self.is_main:
            message[0] = int(stop)
            if not stop:
                message[1:] = torch.tensor(strategy.ask(), dtype=torch.int64)
        if self.world > 1:
            message = broadcast(message, from_process=0)
        return None if message[0] else message[1:].tolist()

    def evaluate(self, seeds, signs, on_result):
        t0 = time.perf_counter()
        mine, timings = self.population.evaluate_members(
            self.mine, seeds, self.generate, self.task, self.pool,
            lambda i, reward, completions: on_result(i, reward, completions[0]), signs)
        rewards = torch.zeros(len(seeds), dtype=torch.float32, device=self.accelerator.device)
        for i, reward in mine.items():
            rewards[i] = reward
        if self.world > 1:
            rewards = reduce(rewards, reduction="sum")
        timings["evaluate"] = time.perf_counter() - t0  # wall clock, the all-reduce included
        return rewards.cpu().tolist(), timings

    def update(self, seeds, weights, n: int) -> dict:
        t0 = time.perf_counter()
        self.population.update(seeds, weights, n)
        return {"update": time.perf_counter() - t0}

    def saveable(self):
        return self.population.base, self.tokenizer, self.population.master_state()

    def save_final(self, out: Path, state: dict, records) -> None:
        ckpt.save_final(out, *self.saveable()[:2], state, records, self.population.master_state())

    def finish(self) -> None:
        self.pool.shutdown()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def train(cfg: TrainConfig, task) -> Path:
    """Run ES on `task` as configured; returns the output directory holding the final model."""
    started = time.time()
    logging_dir = cfg.logging_dir or cfg.output_dir
    accelerator = tracking.tracking_accelerator(
        cfg.report_to, logging_dir, cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))])
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    cfg.validate(world)
    if cfg.population_size < world * cfg.gpu_threads and cfg.noise_mode != LOWRANK and is_main:
        print(f"note: population {cfg.population_size} < {world} processes x {cfg.gpu_threads} "
              f"threads; some threads will stay idle", file=sys.stderr)

    def log(record):
        report_iteration(record["iteration"], cfg.num_iterations, record, accelerator.device)
        tracking.log(accelerator, record)

    # Every check (on every rank: they only read) before anything is written.
    run = Run(cfg, cfg.output_dir, "--output_dir", is_main,
              lambda saved: resume_mismatches(saved, cfg), log)
    model, tokenizer = load_model(run.weights or cfg.model_name, cfg.precision, cfg.hf_cache_dir,
                                  accelerator.device)
    accelerator.wait_for_everyone()
    run.begin()
    tracking.start(accelerator, asdict(cfg), logging_dir)
    accelerator.wait_for_everyone()
    evaluator = LocalEvaluator(cfg, accelerator, model, tokenizer, task, run.masters)
    strategy = Strategy(cfg.population_size, cfg.initial_seed, cfg.antithetic,
                        cfg.fitness_shaping, run.rng_state)
    out = run_es(cfg, evaluator, run, strategy, len(task.prompts))
    if is_main:
        elapsed = time.time() - started
        print(f"Training finished: final model saved to {out}\n"
              f"Training completed in {elapsed:.2f}s ({elapsed / 60:.2f} minutes)", flush=True)
    return out
