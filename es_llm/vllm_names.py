"""HF and vLLM parameter names of a state dict, and the conversion between them (no vLLM needed).

vLLM fuses, in every decoder layer of Llama/Qwen/Mistral-style models,
    self_attn.qkv_proj   = torch.cat([q_proj, k_proj, v_proj], dim=0)   (weight, and bias if any)
    mlp.gate_up_proj     = torch.cat([gate_proj, up_proj], dim=0)
and keeps no `lm_head.weight` when the embeddings are tied. Every other name is the same in both.

    hf_to_vllm(state, config)   an HF state dict as vLLM names its parameters (the accelerated
                                trainer's published .pth); a tied lm_head.weight is dropped
    vllm_to_hf(state, config)   the inverse: fused tensors split back into the HF tensors
    is_vllm_state(state)        whether a state dict holds fused names
    vllm_lora_rank(rank)        the max_lora_rank vLLM needs to serve adapters of rank `rank`

The split uses the config's num_attention_heads, num_key_value_heads (default: the attention heads),
head_dim (default: hidden_size // num_attention_heads) and intermediate_size. `config` is a
transformers config or a plain dict of the same fields. The order of the dict is kept, a fused tensor
taking the place of its first part (q_proj, gate_proj), which is vLLM's parameter order for these
models. Tensors are concatenated or sliced (views, not copies, in vllm_to_hf).
"""
import torch

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSED = {"self_attn.qkv_proj": ("self_attn.", QKV), "mlp.gate_up_proj": ("mlp.", GATE_UP)}
TIED_HEAD = "lm_head.weight"


def _get(config, key, default=None):
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def fused_sizes(config) -> dict:
    """{fused module: the row counts of its parts}, from the model's config."""
    heads = _get(config, "num_attention_heads")
    hidden = _get(config, "hidden_size")
    intermediate = _get(config, "intermediate_size")
    if heads is None or hidden is None or intermediate is None:
        raise ValueError("the config needs num_attention_heads, hidden_size and intermediate_size "
                         "to split vLLM's fused qkv_proj / gate_up_proj tensors")
    kv_heads = _get(config, "num_key_value_heads", heads)
    head_dim = _get(config, "head_dim", hidden // heads)
    return {"self_attn.qkv_proj": (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim),
            "mlp.gate_up_proj": (intermediate, intermediate)}


def _split_name(name: str):
    """(prefix, fused module, suffix) if `name` is a fused vLLM parameter, else None."""
    for fused in FUSED:
        marker = "." + fused + "."
        if marker in name:
            prefix, suffix = name.split(marker, 1)
            return prefix + ".", fused, suffix
    return None


def _part_name(name: str):
    """(prefix, fused module, part index, suffix) if `name` is a part of a fused tensor, else None."""
    for fused, (scope, parts) in FUSED.items():
        for i, part in enumerate(parts):
            marker = "." + scope + part + "."
            if marker in name:
                prefix, suffix = name.split(marker, 1)
                return prefix + ".", fused, i, suffix
    return None


def is_vllm_state(state) -> bool:
    return any(_split_name(name) for name in state)


def hf_to_vllm(state: dict, config) -> dict:
    """An HF state dict with vLLM's names: q/k/v and gate/up concatenated along dim 0; lm_head.weight
    dropped when the config ties the embeddings. Raises ValueError if a part is missing."""
    sizes = fused_sizes(config)
    tied = bool(_get(config, "tie_word_embeddings", False))
    out = {}
    for name, tensor in state.items():
        if tied and name == TIED_HEAD:
            continue
        found = _part_name(name)
        if found is None:
            out[name] = tensor
            continue
        prefix, fused, index, suffix = found
        if index:
            continue  # added with the first part
        scope, parts = FUSED[fused]
        names = [f"{prefix}{scope}{part}.{suffix}" for part in parts]
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"cannot fuse {prefix}{fused}.{suffix}: {missing} not in the state dict")
        tensors = [state[n] for n in names]
        got = tuple(t.shape[0] for t in tensors)
        if got != sizes[fused]:
            raise ValueError(f"{names} have {got} rows; the config says {sizes[fused]}")
        out[f"{prefix}{fused}.{suffix}"] = torch.cat(tensors, dim=0)
    return out


def vllm_to_hf(state: dict, config) -> dict:
    """A state dict with vLLM's fused names as HF names: qkv_proj split into q/k/v, gate_up_proj into
    gate/up, by the config's sizes, in HF order (q weight, q bias, k weight, ...). Other names pass
    through; a missing tied lm_head stays missing (HF models re-tie it). Raises ValueError if a
    fused tensor's rows do not match the config."""
    sizes = fused_sizes(config)
    modules = {}  # (prefix, fused) -> its suffixes present, in order
    for name in state:
        found = _split_name(name)
        if found:
            modules.setdefault(found[:2], []).append(found[2])
    out = {}
    for name, tensor in state.items():
        found = _split_name(name)
        if found is None:
            out[name] = tensor
            continue
        prefix, fused, suffix = found
        suffixes = modules[(prefix, fused)]
        if suffix != suffixes[0]:
            continue  # written with the module's first tensor
        rows = sizes[fused]
        scope, parts = FUSED[fused]
        pieces = {}
        for s in suffixes:
            fused_name = f"{prefix}{fused}.{s}"
            whole = state[fused_name]
            if whole.shape[0] != sum(rows):
                raise ValueError(f"{fused_name} has {whole.shape[0]} rows, but the config's sizes "
                                 f"{rows} add up to {sum(rows)}: give the base model the weights "
                                 f"were trained from")
            pieces[s] = whole.split(list(rows), dim=0)
        for i, part in enumerate(parts):
            for s in suffixes:
                out[f"{prefix}{scope}{part}.{s}"] = pieces[s][i]
    return out


# The LoRA ranks vLLM serves (its max_lora_rank must be one of them, at least the adapter's rank).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves adapters of rank `rank`."""
    for served in VLLM_LORA_RANKS:
        if served >= rank:
            return served
    raise ValueError(f"vLLM serves LoRA adapters of rank at most {VLLM_LORA_RANKS[-1]} (this one "
                     f"has rank {rank}): merge the adapter into the model (--merge_adapter) and "
                     f"evaluate the merged model")
