"""The command line every trainer script shares, the accelerated one included.

The flags are built from the settings' fields (es_llm/config.py: each setting's default and help,
declared once). A script keeps its experiment constants at its top (NUM_ITERATIONS,
POPULATION_SIZE, SIGMA, ALPHA, max_new_tokens, do_sample, initial_seed, NOISE_MODE,
REWARD_ON_PROMPT_AND_RESPONSE and, for Countdown, SAVE_EVERY and DATA_SAMPLE); they replace the
fields' defaults, so editing a constant changes the flag's default.
"""
import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from .config import LORA, AcceleratedConfig, TrainConfig
from .lowrank import LOWRANK
from .models import ModelNotFoundError, model_short_name
from .loop import STOPPED
from .tasks import load_python_file, load_task_file
from .trainer import train

# The paper's experiment constants (conciseness), for fronts that keep none of their own: the
# settings' defaults under the names of the constants that replace them.
PAPER_CONSTANTS = {f.metadata["constant"]: f.default for f in dataclasses.fields(TrainConfig)
                   if "constant" in f.metadata and not f.metadata.get("if_constant")}

# Errors that are the user's to fix: reported as one clear message, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ModelNotFoundError,
               NotImplementedError)


def build_parser(description: str, constants: dict, accelerated: bool = False
                 ) -> argparse.ArgumentParser:
    """One flag per field of the trainer's settings (AcceleratedConfig's with `accelerated`), its
    default replaced by the script's constant where the script defines one."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(AcceleratedConfig if accelerated else TrainConfig):
        how = f.metadata
        constant = how.get("constant")
        default = constants[constant] if constant in constants else field_default(f)
        if how.get("flag") is False:
            if constant:
                parser.set_defaults(**{f.name: default})
        elif not ((accelerated and how.get("plain"))
                  or (how.get("if_constant") and constant not in constants)):
            add_flag(parser, f, default)
    return parser


def field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, default) -> None:
    """--<name> (or metadata's flag and aliases) setting field `f`: a switch for a bool (storing
    False where the field defaults to True), else a value of the field's type."""
    how = f.metadata
    names = [how.get("flag") or f"--{f.name}", *how.get("aliases", ())]
    options = {"dest": f.name, "default": default, "help": how.get("help")}
    if f.type is bool:
        options["action"] = "store_false" if f.default else "store_true"
    else:
        kinds = [t for t in typing.get_args(f.type) or (f.type,) if t is not type(None)]
        options.update(type=kinds[0] if kinds[0] in (int, float) else None,
                       choices=how.get("choices"), metavar=how.get("metavar"))
    parser.add_argument(*names, **options)


# The published output directory names: conciseness finetuned_<...>_correct, Countdown <...>_final.
OUTPUT_NAME_AFFIXES = {"conciseness": ("finetuned_", "_correct"), "countdown": ("", "_final")}


def default_output_dir(args, num_questions: int, task_name: str = "conciseness") -> str:
    """The published naming: the model id as given (slashes included), seed, population,
    iterations, sigma, alpha, precision, threads, question count, then `_correct` (conciseness,
    after a `finetuned_` prefix) or `_final` (Countdown). A local directory or .gguf file is named
    by its last component instead of its path (a path would place the run outside the working
    directory). Options of ours that change the run add their name before the ending: the lowrank
    mode and its rank, LoRA-space ES and its rank, antithetic sampling, a fitness shaping other
    than zscore, an optimizer other than sgd, an lr schedule other than constant, a prompt batch, sampled rollouts."""
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
    if args.es_params == LORA:
        name += f"_lora_rank{args.lora_rank}"
    if args.antithetic:
        name += "_antithetic"
    if args.fitness_shaping != "zscore":
        name += f"_{args.fitness_shaping}"
    return name + tuning_suffix(args) + ending


def tuning_suffix(args) -> str:
    """The run name's part for the tuning options that are not at their defaults: _<optimizer>,
    _<schedule>, _batch<N>, _k<K>_t<T>_p<P> (sampled rollouts)."""
    name = ""
    if args.optimizer != "sgd":
        name += f"_{args.optimizer}"
    if args.lr_schedule != "constant":
        name += f"_{args.lr_schedule}"
    if args.prompt_batch:
        name += f"_batch{args.prompt_batch}"
    if args.num_rollouts != 1 or args.temperature is not None:
        name += f"_k{args.num_rollouts}_t{args.temperature}_p{args.top_p}"
    return name


def config_from_args(args, task_name: str, num_questions: int, config_cls=TrainConfig,
                     run_dir=None):
    """The run's settings from the parsed flags. Without --output_dir the run goes to
    `run_dir(cfg)` where given (the accelerated <experiment_dir>/<run>), else to the published
    name (default_output_dir)."""
    values = {k: v for k, v in vars(args).items() if k in config_cls.__dataclass_fields__}
    cfg = config_cls(task=task_name, **values)
    if not cfg.output_dir:
        cfg.output_dir = (str(run_dir(cfg)) if run_dir
                          else default_output_dir(cfg, num_questions, task_name))
    return cfg


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
        out = train(config_from_args(args, task.name, len(task.prompts)), task)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    if out is None:
        sys.exit(STOPPED)


def run_twin(script_file: str, twin_name: str, **constants) -> None:
    """Run the twin script's main() with some of its constants replaced (the _iid scripts)."""
    path = Path(script_file).resolve().with_name(twin_name)
    module = load_python_file(path, path.stem.replace("-", "_"))
    vars(module).update(constants)
    module.main()
