"""The ES training loop, shared by every trainer script.

Per iteration (MISSION.md section 1): the main rank draws the population's seeds and broadcasts
them; seed i is evaluated by rank i % num_processes, up to `gpu_threads` at a time on separate model
copies (or, in lowrank mode, all of the rank's members in batched generate calls on the one model);
every rank all-reduces the rewards, shapes them (z-score by default) and applies the same update.
"""
import copy
import math
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, reduce
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import rundir
from .generation import Generator
from .lowrank import LOWRANK, BatchedLowRank, lowrank_update
from .models import PRECISIONS, load_model
from .noise import NOISE_MODES, MasterWeights, add_noise, subtract_noise
from .shaping import FITNESS_SHAPINGS, antithetic_seeds, member_signs, shape_fitness, update_terms
from .strategy import es_update

SEED_HIGH = 2**30
TRAINER_NOISE_MODES = NOISE_MODES + (LOWRANK,)
# The run's settings that a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model_name", "task", "population_size", "noise_mode", "master_weights",
                     "precision", "data_sample", "rank", "antithetic", "fitness_shaping")


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
        if self.save_every < 0 or self.keep_checkpoints < 0:
            problems.append("save_every and keep_checkpoints must be >= 0")
        if problems:
            raise ValueError("invalid settings:\n  " + "\n  ".join(problems))


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
        use_masters = cfg.master_weights == "fp32" or (
            lowrank and any(p.dtype != torch.float32 for p in self.base_params))
        self.masters = MasterWeights(self.base_params) if use_masters else None
        if self.masters and masters is not None:
            self.masters.tensors = [masters[n].to(self.base_params[0].device) for n in self.names]
            self.masters.copy_to(self.base_params)
        self.lowrank = BatchedLowRank(model, cfg.rank) if lowrank else None
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
        rewards, timings = {}, {"noise": 0.0, "generate": 0.0}
        per_call = max(1, self.cfg.lowrank_batch // len(task.prompts))
        for chunk in range(0, len(members), per_call):
            batch = members[chunk:chunk + per_call]
            t0 = time.perf_counter()
            with self.lowrank.perturbed([seeds[i] for i in batch], self.cfg.sigma,
                                        [signs[i] for i in batch]) as rows:
                t1 = time.perf_counter()
                texts = generate.repeated(self.base, len(batch),
                                          with_prompt=self.cfg.reward_on_prompt_and_response,
                                          on_rows=rows.select_rows if self.cfg.prune_finished else None)
            timings["noise"] += t1 - t0
            timings["generate"] += time.perf_counter() - t1
            for i, completions in zip(batch, texts):
                rewards[i] = float(np.mean(task.score(completions, seed=seeds[i])))
                if on_result:
                    on_result(i, rewards[i], completions)
        return rewards, timings

    @torch.no_grad()
    def update(self, seeds, z) -> None:
        """The same update on every rank; then every thread copy gets the new weights.

        `z` are the shaped rewards; with antithetic pairs each pair's noise is used once, weighted
        z_2j - z_2j+1."""
        n = len(seeds)
        seeds, weights = update_terms(seeds, z, self.cfg.antithetic)
        target = self.masters.tensors if self.masters else self.base_params
        if self.lowrank:
            lowrank_update(target, seeds, weights, self.cfg.alpha, self.cfg.rank, n=n)
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


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current iteration; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after the current iteration "
              f"and saving a checkpoint (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _iteration_record(iteration, seeds, rewards, seconds, timings=None, signs=None) -> dict:
    """One line of metrics.jsonl; `timings` (this rank's seconds per phase) are added as time_<phase>_s;
    `signs` (antithetic runs) give each member's perturbation sign."""
    r = np.asarray(rewards, dtype=np.float64)
    record = {"iteration": iteration, "seeds": [int(s) for s in seeds],
              "rewards": [float(x) for x in r], "reward_mean": float(r.mean()),
              "reward_std": float(r.std()), "reward_min": float(r.min()),
              "reward_max": float(r.max()), "time_s": seconds}
    if signs is not None:
        record["signs"] = [int(x) for x in signs]
    record.update({f"time_{phase}_s": value for phase, value in (timings or {}).items()})
    return record


def report_iteration(iteration: int, total: int, record: dict, device) -> None:
    """The published per-iteration lines (2 decimals), and the GPU memory line on a GPU."""
    tqdm.write(f"Iteration {iteration}/{total}, Time: {record['time_s']:.2f}s, "
               f"Mean: {record['reward_mean']:.2f}, Min: {record['reward_min']:.2f}, "
               f"Max: {record['reward_max']:.2f}")
    if torch.device(device).type == "cuda":
        tqdm.write(f"GPU Memory: {torch.cuda.memory_allocated(device) / 1024**2:.2f}MB allocated, "
                   f"{torch.cuda.max_memory_allocated(device) / 1024**2:.2f}MB peak")


def resume_mismatches(saved: dict, cfg: TrainConfig) -> list:
    """The RESUME_MUST_MATCH settings on which a checkpoint's config and this run differ; a setting
    missing from an older checkpoint counts as its default."""
    fields = TrainConfig.__dataclass_fields__
    return [f"{k}: checkpoint has {saved.get(k, fields[k].default)!r}, this run has "
            f"{getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
            if saved.get(k, fields[k].default) != getattr(cfg, k)]


def draw_seeds(rng: np.random.RandomState, cfg: TrainConfig) -> np.ndarray:
    """The population's seeds: N draws, or N/2 draws each used by an antithetic +/- pair."""
    if not cfg.antithetic:
        return rng.randint(0, SEED_HIGH, size=cfg.population_size, dtype=np.int64)
    pairs = rng.randint(0, SEED_HIGH, size=cfg.population_size // 2, dtype=np.int64)
    return np.asarray(antithetic_seeds(pairs), dtype=np.int64)


def train(cfg: TrainConfig, task) -> Path:
    """Run ES on `task` as configured; returns the output directory holding the final model."""
    started = time.time()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))])
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    cfg.validate(world)
    if cfg.population_size < world * cfg.gpu_threads and cfg.noise_mode != LOWRANK and is_main:
        print(f"note: population {cfg.population_size} < {world} processes x {cfg.gpu_threads} "
              f"threads; some threads will stay idle", file=sys.stderr)

    out = Path(cfg.output_dir)
    start, rng, records, masters = 0, np.random.RandomState(cfg.initial_seed), [], None
    source, resume = cfg.model_name, None
    # Every check (on every rank: they only read) before anything is written.
    if cfg.resume:
        resume = rundir.load_resume(cfg.resume, lambda saved: resume_mismatches(saved, cfg),
                                    cfg.num_iterations)
        start, records = resume["start"], resume["records"]
        rng = ckpt.rng_from_json(resume["state"]["rng_state"])
        masters = ckpt.load_masters(resume["checkpoint"])
        source = str(rundir.weights_dir(resume["checkpoint"]))
    remove = rundir.plan_run_dir(out, resume, cfg.overwrite, "--output_dir")
    if resume:
        rundir.check_readable(resume["checkpoint"])
    if is_main:
        ckpt.ensure_writable(out, "--output_dir")
    model, tokenizer = load_model(source, cfg.precision, cfg.hf_cache_dir, accelerator.device)
    accelerator.wait_for_everyone()
    if is_main:
        rundir.clear_and_check_writable(out, remove, "--output_dir")
        ckpt.write_metrics(out / ckpt.METRICS_FILE, records)
        if start:
            print(f"resuming from {resume['checkpoint']} at iteration {start}", flush=True)
    accelerator.wait_for_everyone()

    population = Population(model, cfg, masters)
    generate = Generator(tokenizer, task.prompts, cfg.max_new_tokens, cfg.do_sample)
    n = cfg.population_size
    mine = list(range(rank, n, world))
    signs = member_signs(n, cfg.antithetic)

    def state_at(iteration, finished=False):
        return {"iteration": iteration, "finished": finished, "rng_state": ckpt.rng_state_to_json(rng),
                "config": asdict(cfg)}

    with StopRequest() as stop, ThreadPoolExecutor(cfg.gpu_threads) as pool:
        bar = tqdm(range(start + 1, cfg.num_iterations + 1), initial=start,
                   total=cfg.num_iterations, disable=not is_main, desc="ES iterations")
        for iteration in bar:
            t0 = time.time()
            # Seeds (and a stop flag) come from the main rank, so every rank agrees on both.
            message = torch.zeros(n + 1, dtype=torch.int64, device=accelerator.device)
            if is_main:
                message[0] = int(stop.requested)
                if not stop.requested:
                    message[1:] = torch.from_numpy(draw_seeds(rng, cfg))
            if world > 1:
                message = broadcast(message, from_process=0)
            if message[0]:
                _stop(cfg, out, population, tokenizer, records, state_at(iteration - 1), is_main,
                      accelerator)
            seeds = message[1:].tolist()

            def show(i, reward, completions):
                if cfg.verbose:
                    sign = ("+" if signs[i] > 0 else "-") if cfg.antithetic else ""
                    tqdm.write(f"[rank {rank}] member {i} seed {sign}{seeds[i]}: reward {reward:.4f} "
                               f"{completions[0][:120]!r}")

            mine_rewards, timings = population.evaluate_members(mine, seeds, generate, task, pool,
                                                                 show, signs)
            rewards = torch.zeros(n, dtype=torch.float32, device=accelerator.device)
            for i, reward in mine_rewards.items():
                rewards[i] = reward
            if world > 1:
                rewards = reduce(rewards, reduction="sum")
            t_update = time.perf_counter()
            population.update(seeds, shape_fitness(rewards.cpu(), cfg.fitness_shaping))
            timings["update"] = time.perf_counter() - t_update

            record = _iteration_record(iteration, seeds, rewards.cpu().tolist(), time.time() - t0,
                                       timings, signs if cfg.antithetic else None)
            records.append(record)
            if is_main:
                ckpt.append_metrics(out / ckpt.METRICS_FILE, record)
                report_iteration(iteration, cfg.num_iterations, record, accelerator.device)
                if cfg.save_every and iteration % cfg.save_every == 0:
                    ckpt.save_checkpoint(out, model, tokenizer, state_at(iteration), records,
                                         population.master_state(), cfg.keep_checkpoints)
        bar.close()

    if is_main:
        ckpt.save_final(out, model, tokenizer, state_at(cfg.num_iterations, finished=True), records,
                        population.master_state())
        if records:
            print(f"Mean reward: {records[0]['reward_mean']:.4f} at iteration "
                  f"{records[0]['iteration']} -> {records[-1]['reward_mean']:.4f} at iteration "
                  f"{records[-1]['iteration']}", flush=True)
        print(f"Training finished: final model saved to {out}", flush=True)
        elapsed = time.time() - started
        print(f"Training completed in {elapsed:.2f}s ({elapsed / 60:.2f} minutes)", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _stop(cfg, out, population, tokenizer, records, state, is_main, accelerator):
    """Save the last completed iteration, release every process and exit non-zero."""
    if is_main:
        path = ckpt.save_checkpoint(out, population.base, tokenizer, state, records,
                                    population.master_state(), cfg.keep_checkpoints)
        print(f"Stopped at iteration {state['iteration']}; checkpoint saved to {path}\n"
              f"Resume with the same command plus: --resume {out}", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.exit(130)
