"""The plain trainers' evaluator: processes (accelerate) and threads.

Seed i is evaluated by rank i % num_processes, up to `gpu_threads` at a time on separate model
copies (or, in lowrank mode and with --lora_batch, all of the rank's members in batched generate
calls on the one model); every rank all-reduces the rewards and applies the same update. The
loop itself is es_llm/loop.py.
"""
import copy
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs, broadcast, reduce

from . import checkpoint as ckpt
from . import tracking
from .evaluation import KL_BATCH_SIZE, per_sample_kl, sample_responses, summarize
from .generation import Generator
from .loop import heldout_entries, report_iteration, run_es
from .config import LORA, RESUME_MUST_MATCH, TrainConfig
from .lora import (MERGED_DIR, BatchedLora, adapter_tensors, attach_adapter, check_batchable,
                   save_merged, shared_copy)
from .lowrank import LOWRANK, BatchedLowRank, evaluate_batched
from .models import load_model
from .rundir import Run
from .shaping import member_signs
from .strategy import Strategy
from .tuning import prompt_batch_problem
from .weightset import WeightSet


def all_parameters(model) -> list:
    return list(model.named_parameters())


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

    With `--es_params lora` the weights are the adapter's tensors (es_llm/lora.py), and a thread
    copy owns its adapter but shares the one frozen base model; with `--lora_batch` there are no
    copies: the members' adapters are applied per row of batched generate calls on the canonical
    model (lora.BatchedLora), each member's adapter built from the canonical one exactly, as with
    fp32 master weights.
    """

    def __init__(self, model, cfg: TrainConfig, generate, task, masters=None,
                 optimizer_state=None):
        self.cfg, self.generate, self.task, self.base = cfg, generate, task, model
        lora = cfg.es_params == LORA
        tensors, clone = (adapter_tensors, shared_copy) if lora else (all_parameters, copy.deepcopy)
        self.weights = WeightSet(lambda: tensors(model), cfg.noise_mode,
                                 cfg.master_weights, rank=cfg.rank, targets=cfg.lowrank_targets,
                                 update_order="accumulate", optimizer=cfg.optimizer,
                                 momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if self.weights.masters and masters is not None:
            self.weights.load_masters(masters)
        if optimizer_state is not None:
            self.weights.load_optimizer_state(optimizer_state)
        self.batched = batched_population(model, cfg, self.weights)
        self.models = [clone(model) for _ in range(0 if self.batched else cfg.gpu_threads)]
        if cfg.published_drift and self.models:
            # As published: thread 0 evaluates on the canonical weights, so its restore rounding
            # stays in the weights that are updated and saved.
            self.models[0] = model
        self.copies = [WeightSet(lambda m=m: tensors(m), cfg.noise_mode,
                                 masters=self.weights.masters, keep_noise=True)
                       for m in self.models]
        self.pool = ThreadPoolExecutor(len(self.models)) if len(self.models) > 1 else None

    def evaluate(self, slot: int, seed: int, sign: float = 1.0, iteration: int = 0):
        """Mean reward of the member `seed` on every prompt (and rollout: --num_rollouts), its
        completions (the first rollout's), and phase timings."""
        scale = sign * self.cfg.sigma
        t0 = time.perf_counter()
        self.copies[slot].perturb(seed, scale)
        t1 = time.perf_counter()
        try:
            rollouts = self.generate.rollouts(self.models[slot], iteration, seed,
                                              with_prompt=self.cfg.reward_on_prompt_and_response)
        finally:
            t2 = time.perf_counter()
            self.copies[slot].restore(seed, scale)
        t3 = time.perf_counter()
        return (self.task.mean_reward(rollouts, seed), rollouts[0],
                {"noise": t1 - t0 + t3 - t2, "generate": t2 - t1})

    def evaluate_members(self, members, seeds, on_result=None, signs=None, iteration: int = 0):
        """Evaluate the members (population indices) this rank owns, `gpu_threads` at a time, or in
        lowrank mode and with --lora_batch up to `lowrank_batch` sequences per batched generate
        call. `iteration` seeds the sampled rollouts (with the member's seed).

        `signs[i]` (default +1) multiplies member i's perturbation (antithetic pairs).
        Returns {index: reward} and the summed phase timings (thread-seconds)."""
        signs = signs or member_signs(len(seeds), False)
        if self.batched:
            return self._evaluate_batched(members, seeds, signs, on_result, iteration)
        rewards, timings = {}, {"noise": 0.0, "generate": 0.0}
        threads = len(self.models)
        for chunk in range(0, len(members), threads):
            batch = members[chunk:chunk + threads]
            # One thread evaluates in the caller's thread: on CPU, generating from a worker thread
            # measured 1.6x slower (bench/bench_es.py, docs/benchmarks.md).
            run = self.pool.map if self.pool else map
            results = run(lambda slot_i: self.evaluate(slot_i[0], seeds[slot_i[1]],
                                                       signs[slot_i[1]], iteration),
                          enumerate(batch))
            for i, (reward, completions, spent) in zip(batch, results):
                rewards[i] = reward
                for phase, seconds in spent.items():
                    timings[phase] += seconds
                if on_result:
                    on_result(i, reward, completions)
        return rewards, timings

    def _evaluate_batched(self, members, seeds, signs, on_result, iteration: int):
        results, timings = evaluate_batched(
            self.batched, self.generate, self.task, [seeds[i] for i in members],
            [signs[i] for i in members], self.cfg.sigma, self.cfg.lowrank_batch,
            self.cfg.prune_finished, self.cfg.reward_on_prompt_and_response, iteration)
        rewards = {}
        for j, reward, completions in results:
            rewards[members[j]] = reward
            if on_result:
                on_result(members[j], reward, completions)
        return rewards, timings

    def update(self, seeds, weights, n: int | None = None, lr: float | None = None) -> None:
        """The same update on every rank; then every thread copy gets the new weights.

        (seeds, weights) are the strategy's update terms (the shaped rewards; one term per pair
        for antithetic pairs); n is the population size, len(seeds) unless given; lr is alpha
        unless given (the schedule's)."""
        self.weights.update(seeds, weights, self.cfg.alpha if lr is None else lr, n)
        for copy_ in self.copies:
            copy_.copy_from(self.weights)

    def master_state(self):
        return self.weights.master_state()

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


def batched_population(model, cfg: TrainConfig, weights: WeightSet):
    """How the members are generated together on the one model, or None (thread copies): lowrank
    terms per row (--noise_mode lowrank), or each member's adapter per row (--lora_batch)."""
    if cfg.noise_mode == LOWRANK:
        return BatchedLowRank(model, cfg.rank, cfg.lowrank_targets)
    if cfg.batched_population:
        return BatchedLora(model, weights.true_tensors, cfg.noise_mode)
    return None


def resume_mismatches(saved: dict, cfg) -> list:
    """The RESUME_MUST_MATCH settings on which a checkpoint's config and this run differ; a setting
    missing from an older checkpoint counts as its default. A decaying --lr_schedule spans the
    run's --num_iterations, so they must match too."""
    fields = type(cfg).__dataclass_fields__
    must_match = RESUME_MUST_MATCH + (("num_iterations",) if cfg.lr_schedule != "constant" else ())
    return [f"{k}: checkpoint has {saved.get(k, fields[k].default)!r}, this run has "
            f"{getattr(cfg, k)!r}" for k in must_match
            if saved.get(k, fields[k].default) != getattr(cfg, k)]


class LocalEvaluator:
    """The population on this process: thread copies (correlated, iid) or batched rows (lowrank,
    --lora_batch); the main rank's seeds broadcast, the rewards all-reduced, the same update on
    every rank."""

    def __init__(self, cfg: TrainConfig, accelerator, model, tokenizer, task, masters=None,
                 optimizer_state=None, heldout=None, kl_base=None):
        self.cfg, self.accelerator, self.task, self.tokenizer = cfg, accelerator, task, tokenizer
        self.is_main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.every_prompt = (self.generator(task.prompts, cfg.sampling()), task)
        self.heldout = (self.generator(heldout.prompts), heldout) if heldout else None
        self.kl_base = kl_base  # --eval_kl_samples: the base model, on the main rank
        self.population = Population(model, cfg, *self.every_prompt, masters, optimizer_state)
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

    def generator(self, prompts, sampling=None, prompt_ids=None) -> Generator:
        return Generator(self.tokenizer, prompts, self.cfg.max_new_tokens, self.cfg.do_sample,
                         sampling=sampling, prompt_ids=prompt_ids)

    def use_prompts(self, prompts) -> None:
        """Score the members on the training prompts `prompts` (indices; None: every one)."""
        if prompts is None:
            scoring = self.every_prompt
        else:
            task = self.task.subset(prompts)
            scoring = (self.generator(task.prompts, self.cfg.sampling(), prompts), task)
        self.population.generate, self.population.task = scoring

    def evaluate(self, seeds, signs, on_result, prompts=None, iteration: int = 0):
        t0 = time.perf_counter()
        self.use_prompts(prompts)
        mine, timings = self.population.evaluate_members(
            self.mine, seeds, lambda i, reward, completions: on_result(i, reward, completions[0]),
            signs, iteration)
        rewards = torch.zeros(len(seeds), dtype=torch.float32, device=self.accelerator.device)
        for i, reward in mine.items():
            rewards[i] = reward
        if self.world > 1:
            rewards = reduce(rewards, reduction="sum")
        timings["evaluate"] = time.perf_counter() - t0  # wall clock, the all-reduce included
        return rewards.cpu().tolist(), timings

    def heldout_reward(self) -> dict:
        """The canonical model's mean reward on the held-out prompts (greedy, whatever training's
        --temperature) and
        its time, on the main rank (the others hold the same weights and record nothing)."""
        if not self.is_main:
            return {}
        generate, task = self.heldout
        entries = heldout_entries(lambda: generate(
            self.population.base, with_prompt=self.cfg.reward_on_prompt_and_response), task)
        if self.kl_base is not None:
            t0 = time.perf_counter()
            entries["heldout_kl_mean"] = heldout_kl(self.population.base, self.kl_base,
                                                    self.tokenizer, task.prompts, self.cfg)
            entries["time_heldout_s"] += time.perf_counter() - t0
        return entries

    def update(self, seeds, weights, n: int, lr: float | None = None) -> dict:
        t0 = time.perf_counter()
        self.population.update(seeds, weights, n, lr)
        return {"update": time.perf_counter() - t0}

    def saveable(self):
        return self.population.base, self.tokenizer, self.population.master_state()

    def optimizer_state(self):
        return self.population.weights.optimizer_state()

    def save_final(self, out: Path, state: dict, records) -> None:
        model, tokenizer, masters = self.saveable()
        merged = (lambda directory: save_merged(model, tokenizer, directory / MERGED_DIR)
                  ) if self.cfg.merge_adapter else None
        ckpt.save_final(out, model, tokenizer, state, records, masters, merged,
                        self.optimizer_state())

    def finish(self) -> None:
        self.population.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def heldout_kl(model, base, tokenizer, prompts, cfg: TrainConfig) -> float:
    """--eval_kl_samples: the mean per-response KL of `model` from `base` on the held-out prompts,
    as eval_conciseness.py computes its kl_mean (the same samples, batches and estimator); the
    training's own torch random state is left as it was."""
    with torch.random.fork_rng():
        samples = sample_responses(model, tokenizer, prompts, cfg.eval_kl_samples,
                                   cfg.max_new_tokens, progress=False)
    kls = per_sample_kl(model, base, samples, KL_BATCH_SIZE, tokenizer.pad_token_id)
    return summarize(kls)["mean"]


def heldout_task(cfg: TrainConfig, task):
    """The task on its held-out prompts (the first --eval_samples of them), for --eval_every."""
    if task.heldout is None:
        raise ValueError(f"--eval_every: the task {task.name!r} has no held-out prompts (the "
                         f"conciseness and Countdown tasks have); drop --eval_every")
    heldout = task.heldout()
    if cfg.eval_samples > len(heldout.prompts):
        raise ValueError(f"--eval_samples {cfg.eval_samples} is more than the task's "
                         f"{len(heldout.prompts)} held-out prompts; give at most "
                         f"{len(heldout.prompts)} (or 0 for all of them)")
    return heldout.subset(range(cfg.eval_samples)) if cfg.eval_samples else heldout


def tuning_data(cfg: TrainConfig, task):
    """--prompt_batch checked against the training prompts, and --eval_every's held-out task (or
    None): before anything is written."""
    if cfg.prompt_batch > len(task.prompts):
        raise ValueError(prompt_batch_problem(cfg.prompt_batch, len(task.prompts)))
    return heldout_task(cfg, task) if cfg.eval_every else None


def load_for_training(cfg: TrainConfig, weights, device):
    """(model, tokenizer) to train: the base model, or the checkpoint's weights being resumed; with
    --es_params lora the base model with its adapter (the checkpoint's, --lora_init's, or new)."""
    if cfg.es_params != LORA:
        return load_model(weights or cfg.model_name, cfg.precision, cfg.hf_cache_dir, device)
    model, tokenizer = load_model(cfg.model_name, cfg.precision, cfg.hf_cache_dir, device)
    model = attach_adapter(model, cfg, weights or cfg.lora_init)
    if cfg.lora_batch:
        check_batchable(model)
    return model, tokenizer


def train(cfg: TrainConfig, task) -> Path | None:
    """Run ES on `task` as configured; returns the output directory holding the final model, or
    None when Ctrl-C or SIGTERM stopped the run (its checkpoint saved)."""
    started = time.time()
    logging_dir = cfg.logging_dir or cfg.output_dir
    accelerator = tracking.tracking_accelerator(
        cfg.report_to, logging_dir, cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))])
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    cfg.validate(world)
    heldout = tuning_data(cfg, task)
    if cfg.population_size < world * cfg.gpu_threads and not cfg.batched_population and is_main:
        print(f"note: population {cfg.population_size} < {world} processes x {cfg.gpu_threads} "
              f"threads; some threads will stay idle", file=sys.stderr)

    def log(record):
        report_iteration(record["iteration"], cfg.num_iterations, record, accelerator.device)
        tracking.log(accelerator, record)

    # Every check (on every rank: they only read) before anything is written.
    run = Run(cfg, cfg.output_dir, "--output_dir", is_main,
              lambda saved: resume_mismatches(saved, cfg), log)
    model, tokenizer = load_for_training(cfg, run.weights, accelerator.device)
    accelerator.wait_for_everyone()
    run.begin()
    tracking.start(accelerator, asdict(cfg), logging_dir)
    accelerator.wait_for_everyone()
    kl_base = None
    if cfg.eval_kl_samples and is_main:  # the reference of the KL: the model training started from
        kl_base = load_model(cfg.model_name, cfg.precision, cfg.hf_cache_dir, accelerator.device)[0]
    evaluator = LocalEvaluator(cfg, accelerator, model, tokenizer, task, run.masters,
                               run.optimizer_state, heldout, kl_base)
    strategy = Strategy(cfg.population_size, cfg.initial_seed, cfg.antithetic,
                        cfg.fitness_shaping, run.rng_state)
    out = run_es(cfg, evaluator, run, strategy, len(task.prompts))
    if is_main and out is not None:
        elapsed = time.time() - started
        print(f"Training finished: final model saved to {out}\n"
              f"Training completed in {elapsed:.2f}s ({elapsed / 60:.2f} minutes)", flush=True)
    return out
