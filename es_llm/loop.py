"""The ES loop, one for every trainer (MISSION.md section 1).

Per iteration: the strategy asks for the population's seeds (on the main rank; the evaluator makes
every rank agree on them and on a stop request), the evaluator scores every member, the strategy
turns the rewards into update terms, and the evaluator applies the update its own way (every rank
locally, or engine 0 then a broadcast). The run directory logs, checkpoints, stops and saves.

An evaluator provides: is_main; label (a prefix for its printed lines); agree(strategy, stop) -> seeds, or None to stop; evaluate(seeds,
signs, on_result, prompts, iteration) -> (rewards, timings), `prompts` the indices of the iteration's
training prompts (None: all), `iteration` seeding sampled rollouts; update(seeds, weights, n, lr) -> timings; saveable() -> (model, tokenizer,
fp32 masters or None); optimizer_state() -> the optimizer's state_dict or None; heldout_reward()
-> the held-out entries of the record (--eval_every); save_final(out, state, records); finish().
"""
import signal
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .tuning import lr_factor, prompt_batch


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


def iteration_record(iteration, seeds, rewards, seconds, timings=None, signs=None,
                     generations=None, extra=None) -> dict:
    """One line of metrics.jsonl; `timings` (seconds per phase) are added as time_<phase>_s, `signs`
    (antithetic runs) give each member's sign, `generations` the sample generations so far, `extra`
    the settings' own entries (the prompts scored, the learning rate)."""
    r = np.asarray(rewards, dtype=np.float64)
    record = {"iteration": iteration, "seeds": [int(s) for s in seeds],
              "rewards": [float(x) for x in r], "reward_mean": float(r.mean()),
              "reward_std": float(r.std()), "reward_min": float(r.min()),
              "reward_max": float(r.max()), "time_s": seconds}
    if signs is not None:
        record["signs"] = [int(x) for x in signs]
    if generations is not None:
        record["generations"] = int(generations)
    record.update(extra or {})
    record.update({f"time_{phase}_s": value for phase, value in (timings or {}).items()})
    return record


def report_iteration(iteration: int, total: int, record: dict, device="cpu") -> None:
    """The published per-iteration lines (2 decimals), and the GPU memory line on a GPU."""
    tqdm.write(f"Iteration {iteration}/{total}, Time: {record['time_s']:.2f}s, "
               f"Mean: {record['reward_mean']:.2f}, Min: {record['reward_min']:.2f}, "
               f"Max: {record['reward_max']:.2f}")
    if torch.device(device).type == "cuda":
        tqdm.write(f"GPU Memory: {torch.cuda.memory_allocated(device) / 1024**2:.2f}MB allocated, "
                   f"{torch.cuda.max_memory_allocated(device) / 1024**2:.2f}MB peak")


STOPPED = 130  # the exit status of a run stopped by Ctrl-C or SIGTERM (after saving)


def run_es(cfg, evaluator, run, strategy, num_prompts: int):
    """Iterations run.start + 1 .. cfg.num_iterations; returns the run directory, or None when a
    stop request ended the run early (its checkpoint saved; the front exits with STOPPED)."""
    with StopRequest() as stop:
        try:
            if not _iterate(cfg, evaluator, run, strategy, num_prompts, stop):
                return None
            return run.finish(evaluator, strategy)
        except Exception as error:  # the note says where the run can go on from
            raise run.failed(error) from error


def _iterate(cfg, evaluator, run, strategy, num_prompts, stop) -> bool:
    """Run the iterations; False when stopped early."""
    n = cfg.population_size
    generations = run.records[-1].get("generations", 0) if run.records else 0
    bar = tqdm(range(run.start + 1, cfg.num_iterations + 1), initial=run.start,
               total=cfg.num_iterations, disable=not evaluator.is_main, desc="ES iterations")
    for iteration in bar:
        t0 = time.time()
        seeds = evaluator.agree(strategy, stop.requested)
        if seeds is None:
            run.stop(evaluator, strategy, iteration - 1)
            return False

        def show(i, reward, completion):
            if cfg.verbose:
                sign = ("+" if strategy.signs[i] > 0 else "-") if cfg.antithetic else ""
                tqdm.write(f"{evaluator.label}member {i} seed {sign}{seeds[i]}: reward "
                           f"{reward:.4f} {completion[:120]!r}")

        prompts, lr, extra = tuning_of(cfg, iteration, num_prompts)
        rewards, timings = evaluator.evaluate(seeds, strategy.signs, show, prompts, iteration)
        update_seeds, weights = strategy.tell(seeds, rewards)
        timings.update(evaluator.update(update_seeds, weights, n, lr))
        scored = len(prompts) if prompts is not None else num_prompts
        seconds = time.time() - t0  # the held-out evaluation's time is recorded apart
        if cfg.eval_every and iteration % cfg.eval_every == 0:
            extra.update(evaluator.heldout_reward())
        record = iteration_record(iteration, seeds, rewards, seconds, timings,
                                  strategy.signs if cfg.antithetic else None,
                                  generations=generations + n * scored * cfg.num_rollouts,
                                  extra=extra)
        generations = record["generations"]
        run.add(record, evaluator, strategy)
    bar.close()
    return True


def heldout_entries(complete, task) -> dict:
    """--eval_every's entries of a record: the mean reward on the held-out `task` of `complete()`
    (the canonical model's completions of its prompts) and the time both took."""
    t0 = time.perf_counter()
    reward = float(np.mean(task.score(complete(), seed="heldout")))
    return {"heldout_reward_mean": reward, "time_heldout_s": time.perf_counter() - t0}


def tuning_of(cfg, iteration: int, num_prompts: int):
    """The iteration's training prompts (None: all of them), learning rate (alpha times the
    schedule), and what metrics.jsonl records of them: "prompts" with --prompt_batch, "lr" with a
    schedule other than a constant alpha."""
    lr = cfg.alpha * lr_factor(iteration, cfg.num_iterations, cfg.lr_schedule,
                               cfg.warmup_iterations)
    scheduled = cfg.lr_schedule != "constant" or cfg.warmup_iterations > 0
    extra = {"lr": lr} if scheduled else {}
    prompts = None
    if cfg.prompt_batch:
        prompts = prompt_batch(cfg.initial_seed, iteration, cfg.prompt_batch, num_prompts)
        extra["prompts"] = prompts
    return prompts, lr, extra
