"""vLLM's multi-LoRA kernels on CPU, computed per adapter slot instead of per token.

vLLM's CPU backend applies a batch's LoRA adapters with pure-torch ops (vllm/lora/ops/torch_ops)
that gather, for every token, its adapter's whole matrix (`weights[token_indices]`: tokens x out x
rank values, for each of the 14 LoRA products of a decoder layer) and multiply token by token; that
grows with the rank. The ops here compute the same products, x @ W[slot]^T for each token's slot,
as one batched matmul over the slots in use: a population's rows (one run of tokens per member, as
vLLM batches them) as they are, other layouts gathered into one padded block per slot. How the
tokens map to slots is worked out once per engine step and shared by every layer; each layer's
stacked weights are converted and transposed once while they are unchanged. The dtypes are vLLM's
(inputs and weights cast to the output's dtype); a token with index -1 (no adapter) gets no LoRA
term, as vLLM's GPU kernels treat it. Measured (docs/benchmarks.md, "Where the vLLM paths' time
goes"): LoRA space at rank 8 evaluates a population in 1.4x a plain batch's time with these ops,
2.9x with vLLM's; rank-1 members about the same either way (1.5-1.6x: the per-call costs).

`install()` puts these ops in vLLM's CPU punica wrapper; accelerated.vllm_worker calls it when it
is imported, unless ES_VLLM_LORA_OPS=vllm keeps vLLM's own (bench/vllm_profile.py compares both).
"""
import os
from typing import NamedTuple, Optional

import torch

_plan = {"key": None}  # the latest token -> slot layout, shared by the layers of one step
_weights = {}  # stacked weights converted and transposed, while they are unchanged


def _version_key(*tensors) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)


class Layout(NamedTuple):
    """How a step's tokens map to adapter slots. `slots`: the slot of each block (None: every
    slot, in order). `runs`: the tokens already are their blocks (every token has an adapter,
    one run of `longest` tokens per block), so the input is used as it is; otherwise `order`
    lists the tokens with an adapter, sorted by slot, and `block`, `position` where each goes."""
    slots: Optional[tuple]
    blocks: int
    longest: int
    runs: bool
    order: Optional[torch.Tensor] = None
    block: Optional[torch.Tensor] = None
    position: Optional[torch.Tensor] = None


def _layout(indices, slots: int, key) -> Layout:
    """The layout of `indices` (a tensor of slots, -1 for no adapter, or a function making it)
    over `slots` slots, computed once per `key` (one engine step)."""
    if _plan["key"] == (key, slots):
        return _plan["value"]
    indices = (indices() if callable(indices) else indices).long()
    slot_of = torch.where(indices >= 0, indices, slots)
    counts = torch.bincount(slot_of, minlength=slots + 1)
    present = torch.nonzero(counts[:slots]).flatten()
    longest = int(counts[:slots].max()) if slots else 0
    every = tuple(range(slots))
    value = None
    if longest > 0 and counts[slots] == 0 and len(indices) == longest * len(present):
        # A population's rows as vLLM batches them: one run per member, of one length.
        runs = indices.view(len(present), longest)
        if bool((runs == runs[:, :1]).all()):
            run_slots = tuple(runs[:, 0].tolist())
            value = Layout(None if run_slots == every else run_slots, len(present), longest, True)
    if value is None:
        order = torch.argsort(slot_of, stable=True)
        sorted_slot = slot_of[order]
        position = torch.arange(len(order), device=indices.device) - (
            torch.cumsum(counts, 0) - counts)[sorted_slot]
        with_adapter = sorted_slot < slots
        block_of_slot = torch.zeros(slots + 1, dtype=torch.long, device=indices.device)
        block_of_slot[present] = torch.arange(len(present), device=indices.device)
        used = tuple(present.tolist())
        value = Layout(None if used == every else used, len(present), longest, False,
                       order[with_adapter], block_of_slot[sorted_slot[with_adapter]],
                       position[with_adapter])
    _plan.update(key=(key, slots), value=value)
    return value


def _prepared(weights: torch.Tensor, slots: Optional[tuple], dtype) -> torch.Tensor:
    """weights[slots] in `dtype`, transposed for the batched matmul ([blocks, in, out]); kept
    while the stacked weights are unchanged (vLLM writes an adapter into its slot in place, which
    bumps the tensor's version), so that a step's calls do not convert the same tensors again."""
    key = (weights.data_ptr(), weights._version, tuple(weights.shape), dtype, slots)
    found = _weights.get(key)
    if found is None:
        if len(_weights) > 4096:
            _weights.clear()
        chosen = weights if slots is None else weights[list(slots)]
        found = _weights[key] = chosen.to(dtype).transpose(1, 2)
    return found


def rows_times(x: torch.Tensor, weights: torch.Tensor, indices, dtype, key=None):
    """Row t of the result is x[t] @ weights[indices[t]]^T (zeros where indices[t] < 0), in
    `dtype`; `weights` is [slots, out, in] (or [slots, 1, out, in]); `indices` a tensor, or a
    function making it (called only when the layout is not known yet). `key` names the layout
    (default: the indices tensor's storage and version)."""
    if weights.ndim == 4:
        weights = weights.squeeze(1)
    slots, out_features = weights.shape[0], weights.shape[1]
    plan = _layout(indices, slots, _version_key(indices) if key is None else key)
    if plan.runs:
        blocks = x.to(dtype).reshape(plan.blocks, plan.longest, x.shape[1])
        prepared = _prepared(weights, plan.slots, dtype)
        return torch.bmm(blocks, prepared).reshape(x.shape[0], -1)
    result = torch.zeros((x.shape[0], out_features), dtype=dtype, device=x.device)
    if plan.longest == 0:
        return result
    blocks = torch.zeros((plan.blocks, plan.longest, x.shape[1]), dtype=dtype, device=x.device)
    blocks[plan.block, plan.position] = x[plan.order].to(dtype)
    products = torch.bmm(blocks, _prepared(weights, plan.slots, dtype))
    result[plan.order] = products[plan.block, plan.position]
    return result


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0,
                key=None):
    outputs = rows_times(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype, key)
    output_tensor[:, :outputs.shape[1]] = outputs if scaling == 1.0 else scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True,
                key=None):
    outputs = rows_times(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype, key)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                      slice_size, add_inputs=True, key=None):
    outputs = rows_times(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype, key)
    if add_inputs:
        output_tensor[:, slice_offset:slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset:slice_offset + slice_size] = outputs


def _tokens(seq_start, seq_len, lora_indices):
    """The per-token slots of sequences (made only when their layout is not known yet), and the
    key of their layout (the same for every layer of a step)."""
    key = _version_key(seq_start, seq_len, lora_indices)
    return (lambda: torch.repeat_interleave(lora_indices, seq_len)), key


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, scaling):
    tokens, key = _tokens(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, tokens, scaling, key=key)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False):
    tokens, key = _tokens(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, tokens, add_inputs, key=key)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset,
                      slice_size, add_inputs=False):
    tokens, key = _tokens(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, tokens, slice_offset, slice_size,
                      add_inputs, key=key)


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand",
       "sgmv_expand_slice")


def install() -> bool:
    """These ops in vLLM's CPU punica wrapper (idempotent); False where ES_VLLM_LORA_OPS=vllm."""
    if os.environ.get("ES_VLLM_LORA_OPS", "slots") == "vllm":
        return False
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    return True
