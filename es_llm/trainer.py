"""The ES training loop, shared by every trainer script.

Per iteration (MISSION.md section 1): the main rank draws the population's seeds and broadcasts
them; seed i is evaluated by rank i % num_processes, up to `gpu_threads` at a time on separate model
copies; every rank all-reduces the rewards, z-scores them and applies the same update.
"""
import copy
import math
import os
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
from .generation import Generator
from .models import PRECISIONS, load_model
from .noise import NOISE_MODES, MasterWeights, add_noise, subtract_noise
from .strategy import es_update, normalize_rewards

SEED_HIGH = 2**30
# The run's settings that a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model_name", "task", "population_size", "noise_mode", "master_weights",
                     "precision", "data_sample")


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
    master_weights: str = "none"
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
        if self.noise_mode not in NOISE_MODES:
            problems.append(f"noise_mode must be one of {NOISE_MODES} (got {self.noise_mode!r})")
        if self.master_weights not in ("none", "fp32"):
            problems.append(f"master_weights must be 'none' or 'fp32' (got {self.master_weights!r})")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            problems.append("save_every and keep_checkpoints must be >= 0")
        if problems:
            raise ValueError("invalid settings:\n  " + "\n  ".join(problems))


class Population:
    """The rank's weights and the model copies its threads evaluate members on.

    The canonical weights (`base`) are never perturbed: each thread perturbs its own copy, generates,
    and restores it (by subtracting the regenerated noise, as published, so the bf16 drift shows
    inside an iteration); the update is applied to the canonical weights and copied to every thread
    copy. The weights after an iteration are therefore a pure function of the weights before it,
    the seeds and the rewards, whatever the number of processes and threads.
    """

    def __init__(self, model, cfg: TrainConfig, masters=None):
        self.cfg = cfg
        self.base = model
        self.names = [n for n, _ in model.named_parameters()]
        self.base_params = [p for _, p in model.named_parameters()]
        self.masters = MasterWeights(self.base_params) if cfg.master_weights == "fp32" else None
        if self.masters and masters is not None:
            self.masters.tensors = [masters[n].to(self.base_params[0].device) for n in self.names]
            self.masters.copy_to(self.base_params)
        self.models = [copy.deepcopy(model) for _ in range(cfg.gpu_threads)]
        self.params = [[p for _, p in m.named_parameters()] for m in self.models]

    def perturb(self, slot: int, seed: int):
        """Perturb a thread copy; returns what restore needs (the added noise, kept to save a pass)."""
        if self.masters:
            self.masters.perturb(self.params[slot], seed, self.cfg.sigma, self.cfg.noise_mode)
            return None
        return add_noise(self.params[slot], seed, self.cfg.sigma, self.cfg.noise_mode, keep=True)

    def restore(self, slot: int, added) -> None:
        if self.masters:
            self.masters.copy_to(self.params[slot])
        else:
            subtract_noise(self.params[slot], added)

    def evaluate(self, slot: int, seed: int, generate, task):
        """Mean reward of the member `seed` on every prompt, its completions, and phase timings."""
        t0 = time.perf_counter()
        added = self.perturb(slot, seed)
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

    def evaluate_members(self, members, seeds, generate, task, pool, on_result=None):
        """Evaluate the members (population indices) this rank owns, `gpu_threads` at a time.

        Returns {index: reward} and the summed phase timings (thread-seconds)."""
        rewards, timings = {}, {"noise": 0.0, "generate": 0.0}
        threads = len(self.models)
        for chunk in range(0, len(members), threads):
            batch = members[chunk:chunk + threads]
            results = pool.map(lambda slot_i: self.evaluate(slot_i[0], seeds[slot_i[1]], generate, task),
                               enumerate(batch))
            for i, (reward, completions, spent) in zip(batch, results):
                rewards[i] = reward
                for phase, seconds in spent.items():
                    timings[phase] += seconds
                if on_result:
                    on_result(i, reward, completions)
        return rewards, timings

    @torch.no_grad()
    def update(self, seeds, z) -> None:
        """The same update on every rank; then every thread copy gets the new weights."""
        if self.masters:
            es_update(self.masters.tensors, seeds, z, self.cfg.alpha, self.cfg.noise_mode)
            self.masters.copy_to(self.base_params)
        else:
            es_update(self.base_params, seeds, z, self.cfg.alpha, self.cfg.noise_mode)
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


def prepare_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    state = out / ckpt.STATE_FILE
    if state.exists() and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a finished run ({state}); pass --overwrite to "
                              f"replace it, --resume {out} to continue it, or choose another "
                              f"--output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output directory {out} is not writable ({error}); choose another "
                              f"--output_dir") from error
    return out


def _iteration_record(iteration, seeds, rewards, seconds, timings=None) -> dict:
    """One line of metrics.jsonl; `timings` (this rank's seconds per phase) are added as time_<phase>_s."""
    r = np.asarray(rewards, dtype=np.float64)
    record = {"iteration": iteration, "seeds": [int(s) for s in seeds],
              "rewards": [float(x) for x in r], "reward_mean": float(r.mean()),
              "reward_std": float(r.std()), "reward_min": float(r.min()),
              "reward_max": float(r.max()), "time_s": seconds}
    record.update({f"time_{phase}_s": value for phase, value in (timings or {}).items()})
    return record


def train(cfg: TrainConfig, task) -> Path:
    """Run ES on `task` as configured; returns the output directory holding the final model."""
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))])
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    cfg.validate(world)
    if cfg.population_size < world * cfg.gpu_threads and is_main:
        print(f"note: population {cfg.population_size} < {world} processes x {cfg.gpu_threads} "
              f"threads; some threads will stay idle", file=sys.stderr)

    out = Path(cfg.output_dir)
    start, rng, records, masters = 0, np.random.RandomState(cfg.initial_seed), [], None
    source = cfg.model_name
    if cfg.resume:
        checkpoint = ckpt.resolve_checkpoint(cfg.resume)
        state = ckpt.load_state(checkpoint)
        mismatched = [f"{k}: checkpoint has {state['config'].get(k)!r}, this run has "
                      f"{getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
                      if state["config"].get(k) != getattr(cfg, k)]
        if mismatched:
            raise ValueError(f"cannot resume from {checkpoint}: its run differs from this one:\n  "
                             + "\n  ".join(mismatched) + "\nRun with the checkpoint's settings.")
        start, rng = state["iteration"], ckpt.rng_from_json(state["rng_state"])
        records = ckpt.read_metrics(checkpoint / ckpt.METRICS_FILE)
        masters, source = ckpt.load_masters(checkpoint), str(checkpoint)
    if is_main:
        prepare_output_dir(cfg)
        ckpt.write_metrics(out / ckpt.METRICS_FILE, records)
        if start:
            print(f"resuming from {source} at iteration {start}", flush=True)
    accelerator.wait_for_everyone()

    model, tokenizer = load_model(source, cfg.precision, cfg.hf_cache_dir, accelerator.device)
    population = Population(model, cfg, masters)
    generate = Generator(tokenizer, task.prompts, cfg.max_new_tokens, cfg.do_sample)
    n = cfg.population_size
    mine = list(range(rank, n, world))

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
                    message[1:] = torch.from_numpy(rng.randint(0, SEED_HIGH, size=n, dtype=np.int64))
            if world > 1:
                message = broadcast(message, from_process=0)
            if message[0]:
                _stop(cfg, out, population, tokenizer, records, state_at(iteration - 1), is_main,
                      accelerator)
            seeds = message[1:].tolist()

            def show(i, reward, completions):
                if cfg.verbose:
                    tqdm.write(f"[rank {rank}] member {i} seed {seeds[i]}: reward {reward:.4f} "
                               f"{completions[0][:120]!r}")

            mine_rewards, timings = population.evaluate_members(mine, seeds, generate, task, pool,
                                                                 show)
            rewards = torch.zeros(n, dtype=torch.float32, device=accelerator.device)
            for i, reward in mine_rewards.items():
                rewards[i] = reward
            if world > 1:
                rewards = reduce(rewards, reduction="sum")
            t_update = time.perf_counter()
            population.update(seeds, normalize_rewards(rewards.cpu()))
            timings["update"] = time.perf_counter() - t_update

            record = _iteration_record(iteration, seeds, rewards.cpu().tolist(), time.time() - t0,
                                       timings)
            records.append(record)
            if is_main:
                ckpt.append_metrics(out / ckpt.METRICS_FILE, record)
                tqdm.write(f"Iteration {iteration}/{cfg.num_iterations}, "
                           f"Time: {record['time_s']:.2f}s, Mean reward: {record['reward_mean']:.4f}, "
                           f"Min: {record['reward_min']:.4f}, Max: {record['reward_max']:.4f}")
                if cfg.save_every and iteration % cfg.save_every == 0 \
                        and iteration < cfg.num_iterations:
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
