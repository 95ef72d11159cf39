"""The Hugging Face form of a model's weights: its parameter layout, state dicts, directories.

    hf_layout           the HF model's parameter names, shapes and tied names, read from its
                        config alone (the order noise is drawn in)
    full_state_dict     an HF state dict with its tied names, as the published `.pth` holds it
    hf_model            an HF model and tokenizer around a state dict; save_hf_model writes them
    resolve_base_model  the HF directory or hub id every engine loads (the bundled model and
                        .gguf files dequantised once)

Used by the accelerated trainer (accelerated/), the GRPO baseline and eval_countdown_vllm.py.
"""
from pathlib import Path

import torch

from .checkpoint import atomic
from .models import (BUNDLED_MODEL, PRECISIONS, load_model, model_not_found, model_short_name,
                     save_model)


def meta_model(model_path: str, cache_dir=None, dtype=None):
    """The HF model built from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, cache_dir=cache_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))


def hf_layout(model_path: str, cache_dir=None) -> dict:
    """The HF model's parameters, built on the meta device (no weights are read).

    names, shapes: `named_parameters()` order, the order noise is drawn in;
    tied: {state-dict name: the parameter it shares}, e.g. lm_head.weight -> embed_tokens.weight;
    config: the sizes es_llm.vllm_names needs to split vLLM's fused tensors into HF ones.
    """
    model = meta_model(model_path, cache_dir)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config = {key: getattr(text, key, None) for key in ("num_attention_heads", "num_key_value_heads",
                                                         "head_dim", "hidden_size",
                                                         "intermediate_size")}
    params = list(model.named_parameters())
    first = {id(p): name for name, p in params}
    unique = set(first.values())
    tied = {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if name not in unique}
    return {"names": [n for n, _ in params], "shapes": [list(p.shape) for _, p in params],
            "tied": tied, "config": config}


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

    model = meta_model(base_model, cache_dir, PRECISIONS[precision])
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
    with atomic(Path(directory)) as tmp:
        save_model(model, tokenizer, tmp)


def resolve_base_model(model_name: str, convert_dir, cache_dir=None) -> str:
    """An HF directory or hub id both engines load. The bundled model and .gguf files are
    dequantised once into `convert_dir` (fp32, so every precision casts from the same weights)."""
    local = Path(model_name).expanduser()
    if model_name != BUNDLED_MODEL and local.suffix != ".gguf":
        if local.is_dir():
            return str(local)
        from transformers import AutoConfig

        try:  # a hub id: found (or downloaded) now, with the loader's error if it cannot be
            AutoConfig.from_pretrained(model_name, cache_dir=cache_dir)
        except OSError as error:
            raise model_not_found(model_name, error) from error
        return model_name
    target = Path(convert_dir) / f"{model_short_name(model_name)}-fp32"
    if not (target / "config.json").exists():
        model, tokenizer = load_model(model_name, "fp32")
        with atomic(target, unique=True) as tmp:
            save_model(model, tokenizer, tmp)
    return str(target)
