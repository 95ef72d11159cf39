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

On top of them, the fused kernel (`accelerated/lora_kernel.c`, built with the C compiler on first
use into es-llm's cache (~/.cache/es-llm/kernels), about a second, and called through ctypes) computes a whole LoRA
layer (every slice's shrink and expand) in one call: on CPU the per-slot ops' time is the fixed
cost of their many small torch calls (14 products per decoder layer and step), not arithmetic. It
keeps vLLM's dtypes and roundings (the buffer in fp32; the expand's product and its addition in the
output's dtype); the sums' order differs from torch's matmuls, so fp32 results agree to rounding.
Where it does not apply (another dtype, layout or call form) or cannot be built (no compiler: said
once), the per-slot ops compute. Built with OpenMP (else one thread), a large call splits its tokens
among torch's own threads (the kernel uses the libgomp torch has loaded): the same bits on any
number of threads.

vLLM also wraps the lm_head and the embedding of a LoRA-enabled model and adds their LoRA terms for
every token, whose B weights are zeros when the adapters have none (ES members never do): those
two products are skipped while their stacked B is all zeros (in both `kernel` and `slots` modes).

`install()` puts these ops in vLLM's CPU punica wrapper; accelerated.vllm_worker calls it when it
is imported. ES_VLLM_LORA_OPS chooses: `kernel` (the default: the fused kernel, else the per-slot
ops), `slots` (the per-slot ops only), `vllm` (vLLM's own; bench/vllm_profile.py compares them).
"""
import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
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


# --- the fused kernel ------------------------------------------------------------------------

KERNEL_SOURCE = Path(__file__).with_name("lora_kernel.c")
# -ffp-contract=off: a multiply and an add stay two roundings (no fused multiply-add), so that the
# kernel's sums are the same bits on every machine (tests/test_vllm_lora_ops.py computes them)
KERNEL_FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fPIC", "-shared")
# OpenMP threads where the compiler has them (the kernel then runs on torch's libgomp, already
# loaded), else the SIMD pragmas alone (one thread)
KERNEL_THREADS = (("-fopenmp",), ("-fopenmp-simd",))
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_SLICES, _MAX_RANK = 8, 64  # lora_kernel.c's limits
_kernel = {"tried": False, "lib": None}


def kernel_cache() -> Path:
    """$ES_LLM_KERNEL_DIR, else kernels/ in es-llm's cache (es_llm.models.cache_root)."""
    from es_llm.models import cache_root

    return Path(os.environ.get("ES_LLM_KERNEL_DIR") or cache_root() / "kernels")


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU's feature flags."""
    from es_llm.models import cpu_flags

    flags = cpu_flags()
    return f"{platform.machine()} {' '.join(sorted(flags)) if flags else platform.processor()}"


def build_kernel() -> Path:
    """The kernel's shared library, compiled once per source, compiler and CPU (a file named by
    their hash; written under another name and renamed, so engines building at once are safe)."""
    compiler = os.environ.get("CC", "cc")
    flags = (*KERNEL_FLAGS, *sum(KERNEL_THREADS, ()))
    key = hashlib.sha256(KERNEL_SOURCE.read_bytes() + " ".join(
        (compiler, *flags, _cpu_signature())).encode()).hexdigest()[:16]
    target = kernel_cache() / f"lora_kernel-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so.partial", dir=target.parent)
        os.close(handle)
        try:
            for threads in KERNEL_THREADS:
                done = subprocess.run([compiler, *KERNEL_FLAGS, *threads, str(KERNEL_SOURCE),
                                       "-o", partial], capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


def kernel():
    """The loaded kernel (ctypes), built on first use; None where it cannot be built or loaded
    (said once on stderr: the per-slot ops compute instead)."""
    if not _kernel["tried"]:
        _kernel["tried"] = True
        try:
            lib = ctypes.CDLL(str(build_kernel()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as failure:
            print(f"accelerated: the fused CPU LoRA kernel is not available ({failure}); the "
                  f"per-slot torch ops compute vLLM's LoRA products instead (slower, the same "
                  f"products). Install a C compiler (cc), or set ES_VLLM_LORA_OPS=slots to "
                  f"silence this.", file=sys.stderr)
            return None
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        f32 = ctypes.c_float
        lib.es_lora_shrink.argtypes = [i64, i64, p, i64, i32, p, i64, i64, p, i32, i64, f32, p,
                                       i64]
        lib.es_lora_expand.argtypes = [i64, p, i64, i64, p, i32, p, i64, i64, p, i64, p, i64, i32]
        lib.es_lora_linear.argtypes = [i64, i64, p, i64, i32, p, i64, i64, p, i32, p, i32, p, i64,
                                       f32, p, i64, i32]
        for function in (lib.es_lora_shrink, lib.es_lora_expand, lib.es_lora_linear):
            function.restype = i32
        _kernel["lib"] = lib
    return _kernel["lib"]


def _pointers(addresses) -> ctypes.Array:
    return (ctypes.c_void_p * len(addresses))(*addresses)


_known = {}  # what the calls of a step repeat: their prepared weights, their sizes


def _sizes(sizes) -> ctypes.Array:
    key = ("sizes", tuple(sizes))
    found = _known.get(key)
    if found is None:
        found = _known[key] = (ctypes.c_int64 * len(sizes))(*sizes)
    return found


def _prepared_stack(stacked, kind: str, dtype=None):
    """The kernel's form of a tuple of stacked LoRA weights ([slots, 1, a, b] or [slots, a, b],
    one dtype, on the CPU): (slots, rank, pointers, tensors, dtype code), every slice contiguous in
    its own dtype (A, "a") or, for B ("b"), cast to `dtype` (the expand casts B to the output's
    dtype) and transposed to [slots, rank, out]; None where the kernel does not take them. bf16
    stays bf16: the kernel reads it as fp32 exactly, and reads half the bytes. Kept per tuple (a
    layer's, made once) while its tensors are unchanged (vLLM writes an adapter into its slot in
    place, which bumps the tensor's version): a step's calls use the same copies."""
    key = (id(stacked), kind, dtype)
    versions = tuple((w.data_ptr(), w._version) for w in stacked)
    found = _known.get(key)
    if found is not None and found[0] is stacked and found[1] == versions:
        return found[2]
    value = None
    first = stacked[0]
    if (first.dtype in _DTYPES and 0 < len(stacked) <= _MAX_SLICES and first.ndim in (3, 4)
            and (kind == "a" or dtype in _DTYPES)
            and all(w.dtype == first.dtype and w.ndim == first.ndim and w.device.type == "cpu"
                    and w.shape[0] == first.shape[0] and (w.ndim == 3 or w.shape[1] == 1)
                    for w in stacked)):
        tensors = []
        for weights in stacked:
            weights = weights.reshape(weights.shape[0], weights.shape[-2], weights.shape[-1])
            if kind == "b":
                weights = weights.to(dtype).transpose(1, 2)  # [slots, rank, out]
            tensors.append(weights.contiguous())
        rank = tensors[0].shape[1]
        if rank <= _MAX_RANK and all(t.shape[1] == rank for t in tensors):
            value = (first.shape[0], rank, _pointers([t.data_ptr() for t in tensors]), tensors,
                     _DTYPES[tensors[0].dtype])
    if len(_known) > 4096:
        _known.clear()
    _known[key] = (stacked, versions, value)
    return value


def _rows(tensor):
    """(dtype code, row stride) of a 2-D CPU tensor with unit column stride, or None."""
    code = _DTYPES.get(tensor.dtype)
    if code is None or tensor.ndim != 2 or tensor.stride(1) != 1 or tensor.device.type != "cpu":
        return None
    return code, tensor.stride(0)


def _indices(wrapper, tokens: int):
    indices = wrapper.token_lora_indices
    if len(indices) != tokens or indices.dtype != torch.long or not indices.is_contiguous():
        return None
    return indices


def _buffers(buffers, tokens: int, rank: int, slices: int):
    """(row pointers, row stride) of fp32 LoRA buffers ([slices, tokens, rank] or a tuple of
    [tokens, rank]), or None."""
    rows = list(buffers) if isinstance(buffers, (tuple, list)) else [buffers[i] for i in range(slices)]
    if len(rows) != slices or any(r.dtype != torch.float32 or r.ndim != 2 or r.shape[0] != tokens
                                  or r.shape[1] < rank or r.stride(1) != 1
                                  or r.stride(0) != rows[0].stride(0) for r in rows):
        return None
    return _pointers([r.data_ptr() for r in rows]), rows[0].stride(0)


def _nothing_to_do(wrapper) -> bool:
    return wrapper.is_prefill and wrapper.no_lora  # where vLLM's own prefill ops return at once


_no_adapter = {"base": None}  # whether no token of a step has an adapter, per version of its indices


def _no_adapter_in(indices) -> bool:
    """Whether every token's slot is -1 (an engine with LoRA enabled, generating without LoRA
    requests: vLLM's no_lora flag is set in prefill only), looked at once per step: vLLM writes a
    step's indices in place into one buffer, which bumps its version, and hands out views of it.
    The buffer is kept here, so that another tensor at its address is not taken for it."""
    base = indices._base if indices._base is not None else indices
    key = (indices.data_ptr(), len(indices), indices._version)
    if _no_adapter["base"] is not base or _no_adapter["key"] != key:
        _no_adapter.update(base=base, key=key, value=bool((indices < 0).all()))
    return _no_adapter["value"]


_BASE = {}  # vLLM's PunicaWrapperCPU methods, for the calls the kernel does not take


class _Site(NamedTuple):
    """One LoRA layer's add_lora_linear calls, checked once: the kernel's arguments that every call
    repeats (`args`: slots to rank), while the layer's stacked weights are unchanged (their
    versions) and x and y come in the same form (dtypes, x's columns, y's columns in use)."""
    a_stacked: tuple
    b_stacked: tuple
    slices: object
    versions: tuple
    features: int
    x_dtype: torch.dtype
    y_dtype: torch.dtype
    columns: int
    args: tuple
    prepared: tuple  # the weights args points into, kept alive with it


_sites = {}  # per layer (its stacked A weights): its _Site


def _versions(a_stacked, b_stacked) -> tuple:
    return tuple(w._version for w in a_stacked) + tuple(w._version for w in b_stacked)


def _linear_site(x2, y, lora_a_stacked, lora_b_stacked, output_slices):
    """The layer's _Site for a call with x2 ([tokens, in]) and y, or None where the kernel does not
    take the call (another dtype, layout or device). The checks are made once per layer and form
    of call; later calls compare the few things that could change."""
    site = _sites.get(id(lora_a_stacked))
    if (site is not None and site.a_stacked is lora_a_stacked
            and site.b_stacked is lora_b_stacked and site.slices is output_slices
            and x2.dtype is site.x_dtype and y.dtype is site.y_dtype
            and x2.shape[1] == site.features and y.dim() == 2 and y.shape[0] == x2.shape[0]
            and y.shape[1] >= site.columns and x2.stride(1) == 1 and y.stride(1) == 1
            and x2.is_cpu and y.is_cpu and site.versions == _versions(lora_a_stacked,
                                                                      lora_b_stacked)):
        return site
    xs, ys = _rows(x2), _rows(y)
    a = _prepared_stack(lora_a_stacked, "a")
    b = ys and _prepared_stack(lora_b_stacked, "b", y.dtype)
    if not (a and b and xs and a[:2] == b[:2]
            and len(lora_b_stacked) == len(output_slices) == len(lora_a_stacked)
            and all(t.shape[2] == n for t, n in zip(b[3], output_slices))
            and a[3][0].shape[2] == x2.shape[1] and y.shape[0] == x2.shape[0]
            and sum(output_slices) <= y.shape[1]):
        return None
    site = _Site(lora_a_stacked, lora_b_stacked, output_slices,
                 _versions(lora_a_stacked, lora_b_stacked), x2.shape[1], x2.dtype, y.dtype,
                 sum(output_slices), (a[0], len(lora_a_stacked), a[2], a[4], b[2], b[4],
                                      _sizes(output_slices), a[1]), (a, b))
    if len(_sites) > 4096:
        _sites.clear()
    _sites[id(lora_a_stacked)] = site
    return site


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                    buffer=None, **kwargs):
    """PunicaWrapperCPU.add_lora_linear in one kernel call (vLLM's own where it does not apply)."""
    lib = kernel()
    if lib is not None and buffer is None and kwargs.get("add_inputs", True):
        if _nothing_to_do(self):
            return
        x2 = x.view(-1, x.shape[-1])
        indices = _indices(self, x2.shape[0])
        if indices is not None and _no_adapter_in(indices):
            return  # y as it is, as the kernel leaves a token without adapter
        site = indices is not None and _linear_site(x2, y, lora_a_stacked, lora_b_stacked,
                                                    output_slices)
        if site:
            status = lib.es_lora_linear(
                x2.shape[0], site.features, x2.data_ptr(), x2.stride(0), _DTYPES[site.x_dtype],
                indices.data_ptr(), *site.args, float(scale), y.data_ptr(), y.stride(0),
                _DTYPES[site.y_dtype])
            if status == 0:
                return
            raise IndexError("a token's LoRA slot is out of range of the stacked adapters")
    return _BASE["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                    output_slices, buffer=buffer, **kwargs)


def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
    """PunicaWrapperCPU.add_shrink (y[i] = scale * x @ A_i per token's slot) in one kernel call."""
    lib = kernel()
    if lib is not None:
        if _nothing_to_do(self):
            return
        x2 = x.view(-1, x.shape[-1])
        xs = _rows(x2)
        a = _prepared_stack(lora_a_stacked, "a")
        indices = _indices(self, x2.shape[0])
        buffers = a and _buffers(y, x2.shape[0], a[1], len(lora_a_stacked))
        if a and xs and buffers and indices is not None and a[3][0].shape[2] == x2.shape[1]:
            status = lib.es_lora_shrink(x2.shape[0], x2.shape[1], x2.data_ptr(), xs[1], xs[0],
                                        indices.data_ptr(), a[0], len(lora_a_stacked), a[2], a[4],
                                        a[1], float(scale), buffers[0], buffers[1])
            if status == 0:
                return
            raise IndexError("a token's LoRA slot is out of range of the stacked adapters")
    return _BASE["add_shrink"](self, y, x, lora_a_stacked, scale, **kwargs)


def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True,
               **kwargs):
    """PunicaWrapperCPU.add_expand (y[:, slice i] += x[i] @ B_i per token's slot) in one call."""
    lib = kernel()
    if lib is not None and add_inputs:
        if _nothing_to_do(self):
            return
        y2 = y.view(-1, y.shape[-1])
        indices = _indices(self, y2.shape[0])
        if indices is not None and _no_adapter_in(indices):
            return
        ys = _rows(y2)
        b = ys and _prepared_stack(lora_b_stacked, "b", y.dtype)
        buffers = b and _buffers(x, y2.shape[0], b[1], len(lora_b_stacked))
        if (b and buffers and indices is not None and len(lora_b_stacked) == len(output_slices)
                and all(t.shape[2] == n for t, n in zip(b[3], output_slices))
                and offset_start + sum(output_slices) <= y2.shape[1]):
            status = lib.es_lora_expand(y2.shape[0], buffers[0], buffers[1], len(lora_b_stacked),
                                        b[2], b[4], _sizes(output_slices), offset_start, b[1],
                                        indices.data_ptr(), b[0], y2.data_ptr(), ys[1], ys[0])
            if status == 0:
                return
            raise IndexError("a token's LoRA slot is out of range of the stacked adapters")
    return _BASE["add_expand"](self, y, x, lora_b_stacked, output_slices, offset_start,
                               add_inputs, **kwargs)


_zero = {}  # whether stacked weights hold only zeros, per storage and version


def _all_zero(weights: torch.Tensor) -> bool:
    """Whether `weights` holds only zeros; looked at once while it is unchanged (vLLM writes an
    adapter into its slot in place, which bumps the tensor's version)."""
    key = _version_key(weights)
    found = _zero.get(key)
    if found is None:
        if len(_zero) > 4096:
            _zero.clear()
        found = _zero[key] = not bool(weights.any())
    return found


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    """PunicaWrapperCPU.add_lora_logits, skipped while no adapter has an lm_head term: vLLM wraps
    the lm_head of every LoRA-enabled model and adds x @ A^T @ B^T for each token, B all zeros
    when the adapters hold no lm_head (ES members never do); adding zeros leaves the logits as
    they are. 5-7 ms per engine step at the conciseness unit's 30 adapters (docs/benchmarks.md)."""
    if _all_zero(lora_b_stacked):
        return None
    return _BASE["add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                    buffer=buffer, **kwargs)


def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
    """PunicaWrapperCPU.add_lora_embedding (y += x @ B per token's slot), skipped while B is all
    zeros (no adapter has an embedding term), as add_lora_logits."""
    if add_inputs and _all_zero(lora_b_stacked):
        return None
    return _BASE["add_lora_embedding"](self, y, x, lora_b_stacked, add_inputs, **kwargs)


KERNEL_METHODS = ("add_lora_linear", "add_shrink", "add_expand")
ZERO_SKIPPING_METHODS = ("add_lora_logits", "add_lora_embedding")


def install() -> str:
    """These ops in vLLM's CPU punica wrapper (idempotent), and the fused kernel's methods where it
    builds. Returns what computes: "kernel", "slots" or "vllm" (ES_VLLM_LORA_OPS)."""
    mode = os.environ.get("ES_VLLM_LORA_OPS", "kernel")
    if mode not in ("kernel", "slots", "vllm"):
        raise ValueError(f"ES_VLLM_LORA_OPS={mode!r}: expected kernel, slots or vllm")
    if mode == "vllm":
        return mode
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    wrapper = punica_cpu.PunicaWrapperCPU
    fused = mode == "kernel" and kernel() is not None
    for name in ZERO_SKIPPING_METHODS + (KERNEL_METHODS if fused else ()):
        _BASE.setdefault(name, getattr(wrapper, name))
        setattr(wrapper, name, globals()[name])
    return "kernel" if fused else "slots"
