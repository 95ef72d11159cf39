"""transformers' SDPA attention, without copying the shared key/value heads on CPU.

For a model whose attention heads share key/value heads (grouped-query attention: SmolLM2, Llama 3,
Qwen), transformers' "sdpa" attention copies every key/value head once per query head that uses it
(`repeat_kv`) whenever an attention mask is given, which generation with left padding always does.
That copy, of the whole key/value cache at every layer and every decoding step, dominated decoding
on CPU: with 128 rows and a cache of 380 tokens, 1484 ms per step against 508 ms without it
(bench/profile_lowrank.py and docs/benchmarks.md). PyTorch's CPU kernel takes the shared heads
directly (`enable_gqa=True`) and gives bit-identical results (tests/test_attention.py).

`use_shared_kv_attention(model)` switches a model that uses "sdpa" to this attention: on CPU,
without gradients, it calls SDPA with `enable_gqa`; anywhere else (CUDA, where a masked GQA call
would fall back to the slow math kernel; training; position biases; paged caches) it is
transformers' own function.
"""
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SHARED_KV_SDPA = "sdpa_shared_kv"


def sdpa_shared_kv_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, **kwargs):
    shared = key.shape[1] != query.shape[1]
    if (not shared or query.device.type != "cpu" or query.requires_grad
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
            or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # transformers' choice of the causal flag: only for a prompt pass without a mask
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_KV_SDPA, sdpa_shared_kv_forward)
AttentionMaskInterface.register(SHARED_KV_SDPA, sdpa_mask)  # the masks "sdpa" gets


def use_shared_kv_attention(model) -> None:
    """Switch a model using transformers' "sdpa" attention to the shared-key/value one."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(SHARED_KV_SDPA)
