"""ES in LoRA space (`--es_params lora`): the ES parameters are a PEFT LoRA adapter's A and B
matrices over a frozen base model.

    attach_adapter   the base model wrapped by PEFT with a LoRA adapter: new (PEFT's own
                     initialisation, B = 0 and A random, seeded by --initial_seed), or read from an
                     adapter directory (--lora_init, or a checkpoint being resumed)
    initial_adapter  the same adapter's tensors without the model's weights (vLLM engines)
    adapter_tensors  the adapter's (name, tensor) pairs in named_parameters() order: the list a
                     WeightSet perturbs, restores and updates (saved_tensors: the same, named as
                     adapter_model.safetensors names them; the accelerated engines' names)
    SavedAdapter     an adapter's settings and tensors away from its model (the accelerated
                     driver's copy of engine 0's), saved as PEFT saves an adapter
    shared_copy      a thread copy that owns its adapter and shares every base tensor
    BatchedLora      every member's adapter applied per row of one batched forward on the one
                     model (--lora_batch): no copies
    adapter_problems what is wrong with an adapter directory for this run (--lora_init)

The adapter is kept in fp32 (PEFT's default, whatever the base model's precision). A run directory
holds it as PEFT saves it (adapter_config.json, adapter_model.safetensors), which
`PeftModel.from_pretrained(base, directory)` loads; `save_merged` writes the merged full model.
"""
import copy
import itertools
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .noise import perturbed_tensors
from .rows import RowLayout, padded_blocks

ADAPTER_NAME = "default"  # PEFT's name for a model's only adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged_model"
# The path components that mark a LoRA adapter's tensors in PEFT's parameter names.
ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}


def target_list(targets: str) -> list:
    """--lora_targets (comma-separated module names) as a list."""
    return [name.strip() for name in targets.split(",") if name.strip()]


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      target_modules=target_list(cfg.lora_targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def attach_adapter(model, cfg, adapter_dir=None):
    """`model` (frozen) wrapped with a LoRA adapter as `cfg` describes: its weights read from
    `adapter_dir` when given, else PEFT's initialisation drawn from a generator seeded with
    cfg.initial_seed (the global generators are left as they were)."""
    from peft import get_peft_model

    check_targets(model, target_list(cfg.lora_targets), cfg.model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.initial_seed)
        wrapped = get_peft_model(model, lora_config(cfg))
    # What --model_name was (the evaluation scripts' --base_model_name), not a cache path.
    wrapped.peft_config[ADAPTER_NAME].base_model_name_or_path = cfg.model_name
    if adapter_dir is not None:
        load_adapter_weights(wrapped, Path(adapter_dir))
    wrapped.requires_grad_(False)
    wrapped.eval()
    return wrapped


def initial_adapter(model_path: str, cfg, dtype, cache_dir=None) -> list:
    """The adapter `attach_adapter` gives this run on the model at `model_path` in `dtype`, as
    saved_tensors pairs (fp32), without reading the model's weights (an engine that keeps the base
    model elsewhere: vLLM's): built on the model's meta-device structure whose targeted linear
    layers get empty CPU weights of their shapes and dtype, so that PEFT initialises the same
    adapter with the same draws (or reads cfg.lora_init)."""
    from .hf_weights import meta_model

    model = meta_model(model_path, cache_dir, dtype)
    targets = target_list(cfg.lora_targets)
    for name, module in model.named_modules():
        if targeted(name, targets):
            for key, tensor in list(module.named_parameters(recurse=False)):
                setattr(module, key, nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype),
                                                  requires_grad=False))
    wrapped = attach_adapter(model, cfg, cfg.lora_init)
    return [(name, tensor.detach().clone()) for name, tensor in saved_tensors(wrapped)]


def check_targets(model, targets, model_name: str) -> None:
    """Every --lora_targets name must name modules of the model (PEFT skips a name that matches
    nothing as long as another one matches)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(targeted(n, [t]) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"--lora_targets names {', '.join(missing)}, which {model_name} does not "
                         f"have; its linear layers are {', '.join(linear)}")


def targeted(name: str, targets) -> bool:
    """Whether a module of this name is one of PEFT's target_modules (a list: suffix match)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def check_batchable_targets(model, targets, model_name: str) -> None:
    """--lora_batch: every module the targets name must be an nn.Linear (checked on the model's
    structure, before an adapter is attached: the accelerated driver's meta-device model)."""
    others = sorted({f"{name} ({type(module).__name__})" for name, module in model.named_modules()
                     if targeted(name, targets) and not isinstance(module, nn.Linear)})
    if others:
        raise ValueError(f"--lora_batch applies adapters on linear layers only; --lora_targets "
                         f"names {', '.join(others[:3])} in {model_name}: give linear layers "
                         f"only, or drop --lora_batch to evaluate the members one at a time")


def load_adapter_weights(model, directory: Path) -> None:
    """The adapter weights saved in `directory` into `model`'s adapter; every one must fit."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {ADAPTER_WEIGHTS}; give a PEFT adapter "
                                f"directory (a run or checkpoint of --es_params lora)")
    try:
        result = set_peft_model_state_dict(model, load_file(str(path)))
    except RuntimeError as error:  # a shape mismatch
        raise ValueError(f"the adapter in {directory} does not fit this model ({error}); was it "
                         f"trained on another base model or with another --lora_rank?") from error
    missing = [k for k in result.missing_keys if ADAPTER_PARTS & set(k.split("."))]
    if missing or result.unexpected_keys:
        raise ValueError(f"the adapter in {directory} does not match this model's adapter: "
                         f"{len(missing)} tensor(s) missing (e.g. {missing[:2]}), "
                         f"{len(result.unexpected_keys)} unexpected (e.g. "
                         f"{result.unexpected_keys[:2]}); check --lora_targets and --model_name")


def adapter_tensors(model) -> list:
    """The adapter's (name, tensor) pairs, in named_parameters() order (the k of iid noise)."""
    return [(name, p) for name, p in model.named_parameters()
            if ADAPTER_PARTS & set(name.split("."))]


def saved_name(name: str) -> str:
    """A parameter's name as PEFT saves it: without the adapter's name (lora_A.default.weight ->
    lora_A.weight)."""
    return ".".join(part for part in name.split(".") if part != ADAPTER_NAME)


def saved_tensors(model) -> list:
    """adapter_tensors under their saved names, the keys of adapter_model.safetensors."""
    return [(saved_name(name), p) for name, p in adapter_tensors(model)]


class SavedAdapter:
    """An adapter's settings (`cfg`'s) and tensors (by saved name), without its model: what the
    accelerated driver receives from engine 0. es_llm.models.save_model saves it as a PEFT model
    (save_pretrained: adapter_config.json and adapter_model.safetensors)."""

    def __init__(self, cfg, state: dict):
        config = lora_config(cfg)
        config.base_model_name_or_path = cfg.model_name
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        self.peft_config, self.state = {ADAPTER_NAME: config}, state

    def config_dict(self) -> dict:
        """adapter_config.json's content, as save_pretrained writes it."""
        config = self.peft_config[ADAPTER_NAME].to_dict()
        return json.loads(json.dumps({key: list(value) if isinstance(value, set) else value
                                      for key, value in config.items()}))

    def save_pretrained(self, directory, **_) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        self.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
        save_file(self.state, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def shared_copy(model):
    """A copy of `model` whose adapter tensors are its own and whose other tensors (the frozen
    base's parameters and buffers) are `model`'s: a thread copy costs one adapter, not a model."""
    own = {id(p) for _, p in adapter_tensors(model)}
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())
              if id(t) not in own}
    return copy.deepcopy(model, memo=shared)


class BatchedLora:
    """The members' adapters evaluated together on one model, in one batched forward (--lora_batch).

    The rows of a call are the members' prompts, member-major (es_llm/rows.py). While `perturbed`
    is active, every nn.Linear whose weight is an adapter tensor (PEFT's lora_A and lora_B of each
    adapted layer) computes each member's block of rows with that member's tensor, which is the
    tensor a thread copy evaluating the member holds: t + sign * sigma * eps, the same noise drawn
    from the same seed (es_llm.noise), added to `tensors()` (the canonical adapter, or its fp32
    masters). PEFT's own forward does the rest (base output + lora_B(lora_A(x)) * scaling, cast
    back to the base's dtype), so a member's rows compute what its thread copy computes on them.
    Memory: the one model plus one adapter per member of the call."""

    def __init__(self, model, tensors, noise_mode: str):
        check_batchable(model)
        self.model, self.tensors, self.noise_mode = model, tensors, noise_mode
        index = {id(p): k for k, (_, p) in enumerate(adapter_tensors(model))}
        self.linears = [(module, index[id(module.weight)]) for module in model.modules()
                        if isinstance(module, nn.Linear) and id(module.weight) in index]

    @torch.no_grad()
    def member_tensors(self, seeds, sigma: float, signs=None) -> list:
        """Per adapter tensor (adapter_tensors order), every member's copy of it stacked: [members,
        *shape], member i's as its thread copy holds it. Filled one member at a time, so no more
        than the stack is held."""
        signs = [1.0] * len(seeds) if signs is None else signs
        stacks = [t.new_empty((len(seeds), *t.shape)) for t in self.tensors()]
        for i, (seed, sign) in enumerate(zip(seeds, signs)):
            for stack, tensor in zip(stacks, perturbed_tensors(self.tensors(), seed,
                                                               float(sign) * sigma,
                                                               self.noise_mode)):
                stack[i] = tensor
        return stacks

    @contextmanager
    def perturbed(self, seeds, sigma: float, signs=None):
        """While active, a forward over rows = len(seeds) x B (member-major) computes row block i
        with member i's adapter. Yields the RowLayout that generation tells which rows remain."""
        stacks = self.member_tensors(seeds, sigma, signs)
        rows = RowLayout(len(seeds))
        for module, k in self.linears:  # an instance attribute: nn.Linear's own forward is shadowed
            module.forward = member_linear(rows, stacks[k])
        try:
            yield rows
        finally:
            for module, _ in self.linears:
                del module.forward


def check_batchable(model) -> None:
    """--lora_batch applies adapter tensors that are the weight of an nn.Linear (lora_A, lora_B);
    PEFT's LoRA on an embedding (lora_embedding_A/B) or a LoRA bias is refused."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    others = [name for name, p in adapter_tensors(model) if id(p) not in linear]
    if others:
        raise ValueError(f"--lora_batch applies adapters on linear layers only; this adapter also "
                         f"holds {', '.join(others[:3])}: give --lora_targets linear layers only, "
                         f"or drop --lora_batch to evaluate the members on thread copies")


def member_linear(rows: RowLayout, weights: torch.Tensor):
    """The forward of a bias-free nn.Linear that computes each member's block of rows with that
    member's weight (weights[i], of the stack [members, out, in]), as F.linear on those rows alone
    would. All blocks in one batched matmul: the rows gathered into one padded block per member
    present (es_llm.rows.padded_blocks, computed once per row layout)."""

    def forward(x):
        members, gather, valid = rows.per_row(
            "padded", x, lambda member_of_row: padded_blocks(member_of_row, len(weights)))
        if members is None:  # every member, blocks of one length: no gathering
            ys = torch.bmm(x.reshape(len(weights), -1, x.shape[-1]), weights.transpose(1, 2))
            return ys.reshape(*x.shape[:-1], ys.shape[-1])
        xs = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])[gather]  # [members, longest, ..., in]
        ys = torch.bmm(xs.reshape(len(members), -1, x.shape[-1]),
                       weights[members].transpose(1, 2))
        ys = ys.reshape(*gather.shape, *x.shape[1:-1], ys.shape[-1])
        out = ys.new_zeros((*x.shape[:-1], ys.shape[-1]))
        out[gather[valid]] = ys[valid]
        return out
    return forward


def is_adapter_dir(path) -> bool:
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: Path) -> dict:
    try:
        return json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {Path(directory) / ADAPTER_CONFIG} ({error})") from error


def same_model(a, b) -> bool:
    """Two --model_name values naming the same model: equal, or paths to the same place."""
    if a == b:
        return True
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def adapter_problems(directory, model_name: str, targets: str, rank: int, alpha) -> list:
    """What keeps the adapter in `directory` from starting this run (--lora_init): not a PEFT
    LoRA adapter, or one made for another base model, other target modules, rank or alpha."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        return [f"--lora_init {directory} is not a PEFT adapter directory (it needs "
                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); give a run or checkpoint directory of "
                f"an --es_params lora run"]
    try:
        saved = read_adapter_config(directory)
    except ValueError as error:
        return [f"--lora_init: {error}"]
    problems = []
    if saved.get("peft_type") != "LORA":
        problems.append(f"--lora_init {directory} holds a {saved.get('peft_type')} adapter, not LORA")
    base = saved.get("base_model_name_or_path")
    if base and not same_model(base, model_name):
        problems.append(f"--lora_init {directory} was trained on base model {base!r}, not "
                        f"{model_name!r}: give --model_name {base}")
    saved_targets = saved.get("target_modules")
    if not isinstance(saved_targets, list) or set(saved_targets) != set(target_list(targets)):
        shown = ",".join(sorted(saved_targets)) if isinstance(saved_targets, list) else saved_targets
        problems.append(f"--lora_init {directory} covers target modules {shown!r}, not "
                        f"{targets!r}: give --lora_targets {shown}")
    for key, flag, value in (("r", "--lora_rank", rank), ("lora_alpha", "--lora_alpha", alpha)):
        if saved.get(key) != value:
            problems.append(f"--lora_init {directory} has {key} = {saved.get(key)}, this run "
                            f"{flag} {value}: give {flag} {saved.get(key)}")
    return problems


def save_merged(model, tokenizer, directory) -> None:
    """The base model with the adapter merged into its weights, as an HF directory. Merges in
    place (the adapter's modules are unloaded): the last thing done with the model."""
    from .models import save_model

    save_model(model.merge_and_unload(), tokenizer, directory)


def merge_saved(base: str, cfg, directory) -> None:
    """<directory>/merged_model/: the base model (read again, in cfg.precision) with the adapter
    saved in `directory` merged into it (the accelerated driver, which holds no model)."""
    from .models import load_model

    model, tokenizer = load_model(base, cfg.precision, cfg.hf_cache_dir)
    save_merged(attach_adapter(model, cfg, directory), tokenizer, Path(directory) / MERGED_DIR)


def load_adapter(base, directory):
    """An adapter directory on its base model, for evaluation (PEFT's loader)."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(directory))
    except (RuntimeError, ValueError, KeyError) as error:
        recorded = read_adapter_config(directory).get("base_model_name_or_path")
        raise ValueError(f"the adapter in {directory} does not fit the base model ({error}); give "
                         f"the --base_model_name it was trained on (recorded: {recorded!r})"
                         ) from error
    model.eval()
    return model
