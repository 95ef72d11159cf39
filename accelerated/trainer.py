"""The accelerated version's evaluator and run: one inference engine per GPU, each a Ray actor.

The loop is es_llm/loop.py, as for every trainer. Here the evaluator hands seeds to the engines
(accelerated/pool.py: whichever engine is free, as published, or a static schedule; in lowrank mode
each engine generates its share of the population in batches), the update is applied on engine 0
as N seeded additions of (alpha / N) * z_i * eps_i and broadcast to the others, and the saves are
the published ones (model_saves/) beside an HF directory and checkpoints. With --es_params lora the
engines evolve a LoRA adapter (engine 0's is saved, as a PEFT adapter, where the plain trainers
save theirs). The plain trainers' tuning options run here on transformers engines: --optimizer
(every engine takes the same step inside its WeightSet, keeps the same state, and engine 0's goes
into checkpoints as optimizer.pt), --lr_schedule (the loop's learning rate), --prompt_batch and
--num_rollouts/--temperature/--top_p (the engines generate as the plain trainers do, rows seeded by
iteration, member seed, prompt and rollout, so the engine count changes nothing), --eval_every
(engine 0 scores the held-out prompts).
"""
import os
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from es_llm.config import LORA
from es_llm.tuning import OPTIMIZER_FILE

CONVERTED = "converted"
PUBLISHED_SAVES = "model_saves"


def default_run_name(cfg) -> str:
    from es_llm.cli import tuning_suffix
    from es_llm.models import model_short_name

    lora = f"_lora_rank{cfg.lora_rank}" if cfg.es_params == LORA else ""
    return (f"{cfg.task}_{model_short_name(cfg.model_name)}_{cfg.engine}_pop{cfg.population_size}"
            f"_sigma{cfg.sigma}_alpha{cfg.alpha}_{cfg.noise_mode}{lora}_{cfg.precision}"
            f"{tuning_suffix(cfg)}_{datetime.now():%Y%m%d-%H%M%S}")


def run_dir_of(cfg) -> Path:
    """<experiment_dir>/<run_name>; with --resume and no --run_name, the resumed run's directory."""
    from es_llm.checkpoint import resolve_checkpoint
    from es_llm.checkpoint import run_home

    if cfg.run_name:
        return Path(cfg.experiment_dir) / cfg.run_name
    if cfg.resume:
        return run_home(resolve_checkpoint(cfg.resume))
    return Path(cfg.experiment_dir) / default_run_name(cfg)


def save_published_base(base: str, run_dir: Path, cache_dir=None) -> None:
    """model_saves/base_model: the base model in fp16, as published (once per run directory)."""
    from es_llm.checkpoint import atomic
    from es_llm.models import load_model, save_model

    target = run_dir / PUBLISHED_SAVES / "base_model"
    if (target / "config.json").exists():
        return
    model, tokenizer = load_model(base, "fp16", cache_dir)
    with atomic(target) as tmp:
        save_model(model, tokenizer, tmp)


def published_pth(run_dir: Path, iteration: int) -> Path:
    return run_dir / PUBLISHED_SAVES / f"final_model_iteration_{iteration}" / "pytorch_model.pth"


def save_published_pth(state: dict, base: str, run_dir: Path, iteration: int, cache_dir=None) -> Path:
    """model_saves/final_model_iteration_<N>/pytorch_model.pth: the final weights with vLLM's
    (fused) parameter names, as published; both evaluation scripts read it."""
    import torch
    from transformers import AutoConfig

    from es_llm.vllm_names import hf_to_vllm

    from es_llm.checkpoint import atomic

    path = published_pth(run_dir, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        torch.save(hf_to_vllm(state, AutoConfig.from_pretrained(base, cache_dir=cache_dir)), tmp)
    return path


def lost_engine_message(error, run_dir: Path) -> str:
    """What to do after an engine (or its node) died mid-run: the last checkpoint and the command
    that resumes from it (with the engines that are left: --num_engines may change)."""
    from es_llm.rundir import resume_note

    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    first = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    return (f"\nan engine was lost ({type(error).__name__}: {first}); the run stopped: "
            f"{resume_note(run_dir)}\n(add --num_engines N for the engines the cluster still has "
            f"room for)")


@contextmanager
def reward_errors():
    """A task's reward error, raised inside an engine, as the RewardError it is."""
    import ray

    from es_llm.tasks import RewardError

    try:
        yield
    except ray.exceptions.RayTaskError as error:  # the task's reward, run by an engine
        if isinstance(error.cause, RewardError):
            raise RewardError(str(error.cause)) from None
        raise


class PoolEvaluator:
    """The population on the engine pool; the update on engine 0, then broadcast."""

    is_main = True
    label = ""

    def __init__(self, cfg, pool, base: str, layout: dict, accelerator):
        self.cfg, self.pool, self.base, self.layout = cfg, pool, base, layout
        self.accelerator = accelerator

    def agree(self, strategy, stop: bool):
        return None if stop else strategy.ask()

    def evaluate(self, seeds, signs, on_result, prompts=None, iteration=0):
        """Every member on the iteration's training prompts (`prompts`: --prompt_batch's indices,
        None: all), greedy or sampled (--num_rollouts, seeded by `iteration`)."""

        t0 = time.time()
        with reward_errors():
            results = self.pool.evaluate(seeds, self.cfg.sigma, signs,
                                         lambda i, r: on_result(i, r["reward"], r["completion"]),
                                         self.cfg.schedule, batched=self.cfg.batched_population,
                                         prompts=prompts, iteration=iteration)
        # As the plain trainers all-reduce them: rewards in float32.
        rewards = [float(np.float32(r["reward"])) for r in results]
        return rewards, {"evaluate": time.time() - t0,
                         "noise": float(np.mean([r["noise_s"] for r in results])),
                         "generate": float(np.mean([r["generate_s"] for r in results]))}

    def update(self, seeds, weights, n: int, lr: float) -> dict:
        """The sgd step on engine 0, or an optimizer's step on every engine (each keeps the same
        optimizer state); then engine 0's weights are broadcast, as published."""
        t0 = time.perf_counter()
        self.pool.update(seeds, [float(w) for w in weights], lr, n,
                         everywhere=self.cfg.optimizer != "sgd")
        t1 = time.perf_counter()
        self.pool.broadcast()
        return {"update": t1 - t0, "broadcast": time.perf_counter() - t1}

    def state(self) -> dict:
        from es_llm.hf_weights import full_state_dict

        return full_state_dict(self.pool.call_main("state_dict"), self.layout)

    def saveable(self):
        """(model, tokenizer, fp32 masters or None) of engine 0, for a checkpoint; with
        --es_params lora the model is its adapter alone (es_llm.lora.SavedAdapter)."""
        from transformers import AutoTokenizer

        from es_llm.hf_weights import hf_model
        from es_llm.lora import SavedAdapter

        if self.cfg.es_params == LORA:
            model = SavedAdapter(self.cfg, self.pool.call_main("state_dict"))
            tokenizer = AutoTokenizer.from_pretrained(self.base, cache_dir=self.cfg.hf_cache_dir)
        else:
            model, tokenizer = hf_model(self.state(), self.base, self.cfg.precision,
                                        self.cfg.hf_cache_dir)
        return model, tokenizer, self.pool.call_main("master_state")

    def optimizer_state(self):
        """Engine 0's optimizer state_dict (every engine holds the same), or None for sgd."""
        return None if self.cfg.optimizer == "sgd" else self.pool.call_main("optimizer_state")

    def heldout_reward(self) -> dict:
        """--eval_every: engine 0's held-out reward (the canonical weights, unperturbed)."""
        with reward_errors():
            return self.pool.heldout_reward()

    def save_final(self, out: Path, state_file: dict, records) -> None:
        """final_model.pth, final_model/, the published .pth (with --es_params lora the adapter
        instead, as the plain trainers save it), masters, metrics, then
        trainer_state.json ("finished") last; an older one goes first, so a crash half-way never
        leaves a finished state beside other weights."""
        import torch
        from safetensors.torch import save_file

        from es_llm import checkpoint as ckpt
        from es_llm.hf_weights import save_hf_model

        fingerprints = self.pool.call_all("fingerprint")
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"the engines' weights differ after the final broadcast: "
                               f"{fingerprints}")
        if self.cfg.es_params == LORA:  # the adapter, where the plain trainers save theirs
            from es_llm.lora import merge_saved

            model, tokenizer, masters = self.saveable()
            merged = (lambda directory: merge_saved(self.base, self.cfg, directory)
                      ) if self.cfg.merge_adapter else None
            ckpt.save_final(out, model, tokenizer, state_file, records, masters, merged,
                            self.optimizer_state())
            print(f"Training finished: the adapter in {out} (all {self.cfg.num_engines} engines "
                  f"identical)", flush=True)
            return
        (out / ckpt.STATE_FILE).unlink(missing_ok=True)
        state = self.state()
        with ckpt.saving(out):  # each save below removes its own temporary if it fails
            with ckpt.atomic(out / "final_model.pth") as tmp:
                torch.save(state, tmp)
            save_hf_model(state, self.base, out / "final_model", self.cfg.precision,
                          self.cfg.hf_cache_dir)
            save_published_pth(state, self.base, out, self.cfg.num_iterations,
                               self.cfg.hf_cache_dir)
            masters = self.pool.call_main("master_state")
            if masters is not None:
                with ckpt.atomic(out / ckpt.MASTER_FILE) as tmp:
                    save_file(masters, str(tmp))
            optimizer = self.optimizer_state()
            if optimizer is not None:
                with ckpt.atomic(out / OPTIMIZER_FILE) as tmp:
                    torch.save(optimizer, tmp)
        ckpt.write_metrics(out / ckpt.METRICS_FILE, records)
        ckpt.write_json_atomic(out / ckpt.STATE_FILE, state_file)
        print(f"Training finished: final weights in {out / 'final_model.pth'} and "
              f"{out / 'final_model'}/ (all {self.cfg.num_engines} engines identical)", flush=True)

    def finish(self) -> None:
        from es_llm import tracking

        tracking.finish_trackers(self.accelerator)  # the driver has no process group of its own


def train_accelerated(cfg, task) -> int:
    """Run the accelerated version (`cfg` checked, its output_dir the run directory, and
    CUDA_VISIBLE_DEVICES set by the script's front); returns the exit status (0, 130 when
    stopped)."""
    # Until the loop takes over SIGTERM (to stop after an iteration and save), it unwinds through
    # the clean-up in train_on_engines.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from transformers import AutoTokenizer

    from es_llm import tracking
    from es_llm.checkpoint import write_json_atomic
    from es_llm.hf_weights import hf_layout, meta_model, resolve_base_model
    from es_llm.lora import check_batchable_targets, check_targets, target_list
    from es_llm.loop import report_iteration
    from es_llm.rundir import Run
    from es_llm.trainer import resume_mismatches, tuning_data

    started = time.time()
    heldout = tuning_data(cfg, task)  # before anything is written
    logging_dir = cfg.logging_dir or cfg.output_dir
    accelerator = tracking.tracking_accelerator(cfg.report_to, logging_dir, cpu=True)

    def log(record):
        report_iteration(record["iteration"], cfg.num_iterations, record)
        tqdm.write(f"  perturb+restore {record['time_noise_s']:.2f}s, update "
                   f"{record['time_update_s']:.2f}s, broadcast {record['time_broadcast_s']:.2f}s")
        tracking.log(accelerator, record)

    # Every check before anything is written (user errors propagate to the script's front).
    run = Run(cfg, cfg.output_dir, "--run_name", True, lambda saved: resume_mismatches(saved, cfg),
              log)
    base = resolve_base_model(cfg.model_name, Path(cfg.experiment_dir) / CONVERTED,
                              cfg.hf_cache_dir)
    layout = hf_layout(base, cfg.hf_cache_dir)
    if cfg.es_params == LORA:  # a target the model lacks, named before any engine starts
        structure = meta_model(base, cfg.hf_cache_dir)
        check_targets(structure, target_list(cfg.lora_targets), cfg.model_name)
        if cfg.lora_batch:
            check_batchable_targets(structure, target_list(cfg.lora_targets), cfg.model_name)
    tokenizer = AutoTokenizer.from_pretrained(base, cache_dir=cfg.hf_cache_dir)
    run.begin()
    longest_prompt = max(len(ids) for ids in tokenizer(task.prompts)["input_ids"])
    run_dir = run.out
    write_json_atomic(run_dir / "config.json", {**vars(cfg), "base_model": base})
    print(f"run directory: {run_dir}", flush=True)
    return train_on_engines(cfg, (task, heldout), run, base, layout,
                            longest_prompt + cfg.max_new_tokens, accelerator, logging_dir, started)


def engine_settings(cfg, base: str, layout: dict, max_model_len: int) -> dict:
    """Every engine's keyword arguments (accelerated.engines.make_engine)."""
    return {"model_path": base, "precision": cfg.precision, "max_new_tokens": cfg.max_new_tokens,
            "noise_mode": cfg.noise_mode, "master_weights": cfg.master_weights,
            "cache_dir": cfg.hf_cache_dir, "layout": layout, "max_model_len": max_model_len,
            "seed": cfg.initial_seed, "noise_names": cfg.vllm_noise, "rank": cfg.rank,
            "lowrank_targets": cfg.lowrank_targets, "lowrank_batch": cfg.lowrank_batch,
            "population_size": cfg.population_size, "prune_finished": cfg.prune_finished,
            "lora": cfg if cfg.es_params == LORA else None, "optimizer": cfg.optimizer,
            "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "sampling": cfg.sampling()}


def start_from(pool, run) -> None:
    """Every engine starts from engine 0's weights: a resumed run's (and its fp32 masters) loaded
    there first; every engine takes the checkpoint's optimizer state."""
    if run.resume:
        from es_llm.checkpoint import load_weights

        pool.call_main("load_state_dict", load_weights(run.weights), run.masters)
        if run.optimizer_state is not None:
            pool.call_all("load_optimizer_state", run.optimizer_state)
    pool.broadcast()


def train_on_engines(cfg, tasks, run, base: str, layout: dict, max_model_len: int, accelerator,
                     logging_dir, started: float) -> int:
    """Ray, the engine pool and the ES loop on it, for a run whose directory is ready; `tasks`:
    the training task and the held-out one (or None). The engines and Ray are shut down however
    it ends. Returns the exit status."""
    import ray

    from accelerated.pool import EnginePool, start_ray
    from es_llm import tracking
    from es_llm.loop import STOPPED, run_es
    from es_llm.strategy import Strategy

    run_dir = run.out
    cores = len(os.sched_getaffinity(0))
    local = cfg.ray_address == "local"
    cpus_per_engine = max(1, cores // cfg.num_engines) if local else 1
    pool, status, own_ray = None, 1, False
    try:
        own_ray = start_ray(cfg.ray_address, cfg.verbose,
                            num_cpus=max(cores, cfg.num_engines * cpus_per_engine) if local else None)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        engine_kwargs = engine_settings(cfg, base, layout, max_model_len)
        t0 = time.time()
        pool = EnginePool(cfg.engine, cfg.num_engines, engine_kwargs, tasks[0], use_gpu,
                          cpus_per_engine, bind_cpus=local and not use_gpu,
                          collective_timeout_s=cfg.collective_timeout, heldout=tasks[1])
        start_from(pool, run)
        print(f"{cfg.num_engines} {cfg.engine} engines on {'GPU' if use_gpu else 'CPU'} ready "
              f"in {time.time() - t0:.1f}s", flush=True)
        if cfg.es_params != LORA:  # the published saves are of full weights
            save_published_base(base, run_dir, cfg.hf_cache_dir)
        tracking.start(accelerator, vars(cfg), logging_dir)
        strategy = Strategy(cfg.population_size, cfg.initial_seed, cfg.antithetic,
                            cfg.fitness_shaping, run.rng_state)
        evaluator = PoolEvaluator(cfg, pool, base, layout, accelerator)
        try:
            if run_es(cfg, evaluator, run, strategy, len(tasks[0].prompts)) is None:
                return STOPPED  # (the clean-up below still runs)
        except ray.exceptions.RayError as error:  # an engine, or the node it ran on, was lost
            print(lost_engine_message(error, run_dir), file=sys.stderr, flush=True)
            return 1  # (the clean-up below still runs)
        elapsed = time.time() - started
        print(f"Training completed in {elapsed:.2f}s ({elapsed / 60:.2f} minutes)", flush=True)
        status = 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the engines (no checkpoint saved)", file=sys.stderr,
              flush=True)
        status = STOPPED
    except SystemExit as leaving:
        status = leaving.code
    finally:
        if pool is not None:
            pool.shutdown()
        if own_ray and ray.is_initialized():
            ray.shutdown()
    return status
