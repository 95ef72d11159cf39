"""vLLM worker extension: the ES weight operations inside a vLLM worker.

`LLM(..., worker_extension_cls="utils.worker_extn.WorkerExtension")` (the published path, which
re-exports the class from here) gives the worker these methods, called through `LLM.collective_rpc`:

    es_setup(layout, noise_mode, master_weights)  map the HF names onto the worker's tensors
    es_weight_op(name, *args)                     run one operation of es_llm.weightset.WeightSet
                                                  (WEIGHT_OPS: perturb, restore, update,
                                                  init_collective, broadcast, state_dict,
                                                  master_state, load_state_dict, fingerprint,
                                                  names, optimizer_state,
                                                  load_optimizer_state: None and refused here,
                                                  where no optimizer runs);
                                                  accelerated.engines.WorkerWeights
                                                  makes these calls
    es_write_adapters(seeds, sigma, signs, paths) lowrank mode: each member's perturbation as a
                                                  PEFT LoRA adapter directory (write_adapter)
    es_set_member_adapters(seeds, sigma, signs, ids)  lowrank mode: the same, in place into the
                                                  LoRA slots of adapters already loaded
                                                  (set_resident_adapters)
    es_set_adapters(ids, adapters)                --es_params lora: the members' adapters, the same

HF names. vLLM fuses q_proj/k_proj/v_proj into qkv_proj and gate_proj/up_proj into gate_up_proj
(the model's `packed_modules_mapping`). Each HF tensor is a view of its rows of the fused tensor
(tensor parallel 1), so perturbing it perturbs what vLLM computes with, noise tensor k is the same
as in an HF model, and `state_dict()` has HF names: a saved `.pth` loads into transformers with no
renaming.

The CPU trap. After loading, vLLM's CPU backend prepacks every unquantised linear layer for its
GEMM kernel (oneDNN, sgl-kernel or zentorch) and, by default, replaces `layer.weight` with an empty
tensor; the layer then computes with the packed copy alone, so changing the parameters changes
nothing but embeddings and norms. Importing this module (vLLM imports it when it builds the worker,
before the model loads; VLLMEngine imports it earlier still) makes that dispatch keep the weights
(`remove_weight=False`), and every change of weights re-dispatches the packed layers, so the packed
copies follow the weights. The embedding that doubles as the tied lm_head is packed the same way
(vLLM keeps its weight) and is re-dispatched too. On GPU nothing is packed: layers read their
parameters directly and nothing needs re-dispatching. (Without vLLM installed, importing this
module patches nothing.)

On CPU, importing this module also replaces vLLM's CPU multi-LoRA ops with
accelerated.vllm_lora_ops (a fused kernel computing a whole LoRA layer per call, else one batched
matmul per adapter slot instead of a per-token gather of the adapters' matrices;
ES_VLLM_LORA_OPS=slots or =vllm chooses the others).
"""
import importlib.util
import os

import torch

from es_llm.weightset import WEIGHT_OPS, WeightSet


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def unpacked() -> bool:
    """ES_VLLM_CPU_LINEAR=torch: vLLM's CPU linear layers compute with torch's F.linear on their
    weight as it is (nothing packed, so nothing to re-pack after a change); default "packed":
    vLLM's prepacked GEMM, re-packed after every change."""
    mode = os.environ.get("ES_VLLM_CPU_LINEAR", "packed")
    if mode not in ("packed", "torch"):
        raise ValueError(f"ES_VLLM_CPU_LINEAR must be 'packed' or 'torch', got {mode!r}")
    return mode == "torch"


def compiled_on_cpu(lora: bool = False) -> bool:
    """ES_VLLM_CPU_COMPILE=1 (with ES_VLLM_CPU_LINEAR=torch): vLLM's compiled execution on CPU
    instead of eager. Refused with packed layers (a compiled graph could keep computing with a
    layer's old packed weight) and for a LoRA-enabled engine (`lora`), which vLLM's CPU backend
    runs eager whatever it is asked (it turns compilation off when LoRA is enabled), so the
    setting would be silently ignored."""
    if os.environ.get("ES_VLLM_CPU_COMPILE", "0") != "1":
        return False
    if not unpacked():
        raise ValueError("ES_VLLM_CPU_COMPILE=1 needs ES_VLLM_CPU_LINEAR=torch (compiled graphs "
                         "and re-packed weights do not mix); set both or neither")
    if lora:
        raise ValueError("ES_VLLM_CPU_COMPILE=1 cannot compile this engine: its members are LoRA "
                         "adapters, and vLLM's CPU backend runs LoRA-enabled engines eager; "
                         "unset ES_VLLM_CPU_COMPILE for LoRA members and --es_params lora")
    return True


def _keep_cpu_linear_weights() -> None:
    """Make vLLM's CPU GEMM dispatch keep layer.weight (idempotent)."""
    if not _on_cpu():
        return
    from vllm.model_executor.layers import utils as layer_utils

    if getattr(layer_utils.dispatch_cpu_unquantized_gemm, "es_keeps_weights", False):
        return
    original = layer_utils.dispatch_cpu_unquantized_gemm

    def dispatch_keeping_weights(layer, remove_weight: bool = False):
        if unpacked() and layer.weight.ndim == 2 and not layer.weight.is_meta:
            layer.cpu_linear = torch.nn.functional.linear  # reads layer.weight at every call
            return None
        return original(layer, remove_weight=False)

    dispatch_keeping_weights.es_keeps_weights = True
    dispatch_keeping_weights.original = original
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weights


if importlib.util.find_spec("vllm") is not None:
    _keep_cpu_linear_weights()
    if _on_cpu():
        from accelerated import vllm_lora_ops

        vllm_lora_ops.install()  # the members' LoRA terms per adapter slot, not per token


def packed_cpu_layers(model) -> list:
    """The layers vLLM's CPU backend computes with through a packed copy of a 2-D weight (none
    with ES_VLLM_CPU_LINEAR=torch). A LoRA-enabled engine's wrappers are left out: they forward
    `cpu_linear` and `weight` to their `base_layer`, which is listed and computes (re-packing a
    wrapper too had doubled each re-pack: 243 layers for 121 weights, 0.33 s per change)."""
    if unpacked():
        return []
    return [m for m in model.modules()
            if hasattr(m, "cpu_linear") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.ndim == 2 and not getattr(m, "_cpu_skip_gemm_dispatch", False)
            and not isinstance(m._modules.get("base_layer"), torch.nn.Module)]


def redispatch(layers) -> None:
    """Re-pack each layer from its current weight."""
    from vllm.model_executor.layers import utils as layer_utils

    dispatch = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "original",
                       layer_utils.dispatch_cpu_unquantized_gemm)
    for layer in layers:
        dispatch(layer, remove_weight=False)


def hf_named_tensors(model, layout: dict) -> list:
    """[(HF name, view of the vLLM tensor holding it)] in the layout's (HF) order."""
    modules = dict(model.named_modules())
    packed = getattr(model, "packed_modules_mapping", None) or {}
    index = {}
    for vllm_name, param in model.named_parameters():
        module_name, _, attr = vllm_name.rpartition(".")
        sizes = getattr(modules.get(module_name), "output_sizes", None)
        # With LoRA enabled, vLLM wraps a layer and holds its weights in `<layer>.base_layer`.
        logical = module_name.removesuffix(".base_layer")
        parent, _, leaf = logical.rpartition(".")
        subs = packed.get(leaf)
        if subs and sizes and len(subs) == len(sizes):
            offset = 0
            for sub, size in zip(subs, sizes):
                index[f"{parent}.{sub}.{attr}" if parent else f"{sub}.{attr}"] = (param, offset)
                offset += size
        else:
            index[f"{logical}.{attr}"] = (param, 0)
    named = []
    for name, shape in zip(layout["names"], layout["shapes"]):
        if name not in index:
            raise KeyError(f"the vLLM model has no tensor for the HF parameter {name!r}; this "
                           f"architecture's names are not mapped (vLLM names such as "
                           f"{list(index)[:4]})")
        param, offset = index[name]
        view = param.detach()
        if view.ndim:
            view = view[offset:offset + shape[0]]  # rows of a fused tensor (or of a padded vocab)
        if list(view.shape) != list(shape):
            raise ValueError(f"{name}: the vLLM tensor gives shape {list(view.shape)}, the HF "
                             f"model has {list(shape)}; the accelerated trainer needs tensor "
                             f"parallel 1 and an unquantised model")
        named.append((name, view))
    return named


def vllm_named_tensors(model) -> list:
    """[(vLLM name, tensor)] in vLLM's `named_parameters()` order (fused tensors whole)."""
    return [(name, param.detach()) for name, param in model.named_parameters()]


def hf_names(model, layout: dict) -> list:
    return [name for name, _ in hf_named_tensors(model, layout)]


def to_hf(state: dict, layout: dict) -> dict:
    """vLLM-named tensors -> HF-named ones in HF order (rows past the HF shape, a padded
    vocabulary's, are dropped)."""
    from es_llm.vllm_names import vllm_to_hf

    hf = vllm_to_hf(state, layout["config"])
    out = {}
    for name, shape in zip(layout["names"], layout["shapes"]):
        tensor = hf[name]
        out[name] = tensor[:shape[0]].contiguous() if tensor.ndim and tensor.shape[0] != shape[0] \
            else tensor
    return out


def from_hf(state: dict, layout: dict) -> dict:
    """HF-named tensors -> vLLM names (fused); a tied lm_head is dropped."""
    from es_llm.vllm_names import hf_to_vllm

    config = dict(layout["config"], tie_word_embeddings=bool(layout["tied"]))
    return hf_to_vllm({n: state[n] for n in layout["names"] if n in state}, config)


def member_adapter(named, only, seed: int, scale: float, rank: int):
    """Member `seed`'s low-rank perturbation scale * A B^T / sqrt(R) of each target weight (HF
    name, index k: the factors es_llm.lowrank draws) as a PEFT LoRA adapter: (its tensors by
    saved name, its adapter_config.json) with lora_A = B^T (R x in), lora_B = scale / sqrt(R) * A
    (out x R), lora_alpha = r (scaling 1)."""
    import math

    from es_llm.lowrank import LORA_MODULES, factors

    tensors, modules = {}, set()
    for k, (name, tensor) in enumerate(named):
        if k not in only:
            continue
        a, b = factors(tensor, seed, k, rank)
        prefix = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{prefix}.lora_A.weight"] = b.T.contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = a.mul_(scale / math.sqrt(rank)).cpu()
        modules.add(name.split(".")[-2])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "modules_to_save": None,
              "target_modules": sorted(modules, key=LORA_MODULES.index)}
    return tensors, config


def write_adapter(path, named, only, seed: int, scale: float, rank: int) -> None:
    """member_adapter's adapter as a directory that vLLM loads."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    tensors, config = member_adapter(named, only, seed, scale, rank)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config))


def set_resident_adapters(runner, lora_ids, adapters) -> bool:
    """Each (tensors by saved name, adapter_config.json dict) of `adapters` into the LoRA slot of
    the adapter `lora_ids` names, which must be loaded and active, with no file written or read.
    The first goes in as vLLM's activation sets one (made into a LoRA model as vLLM makes one
    from those files: its dtype, scaling and packed modules); once that slot is seen to hold
    exactly what SlotPlan writes, the rest are written straight into their slots (SlotPlan). False
    where an id is not active in a slot (nothing changed), or this vLLM lacks what it takes: the
    caller then loads files under new ids, leaving these ids and their slots unused (so vLLM's
    registered copy of a slot written straight, no longer its content, is never activated).
    The tensors given are not changed."""
    try:
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        loader = runner.lora_manager
        manager = loader._adapter_manager
        slots, active = manager.lora_index_to_id, manager._active_adapters
        merge, weights_of = manager._create_merged_loras_inplace, manager._get_lora_layer_weights
        registered = manager._registered_adapters
    except (AttributeError, ImportError):
        return False
    if any(int(i) not in slots or int(i) not in active for i in lora_ids):
        return False
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    plan = getattr(manager, "_es_slot_plan", None)  # False: checked, and vLLM's setting stays
    for lora_id, (tensors, config) in zip(lora_ids, adapters):
        index = slots.index(int(lora_id))
        if plan and plan.write(index, tensors, config):
            continue
        peft = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings":
                                     loader.max_position_embeddings})
        peft.validate_legal(loader.lora_config)
        # vLLM may scale B in place where it already has the slot's dtype: it gets copies, and
        # the caller's tensors (an engine's ES parameters, say) stay as they are for the check
        given = {n: t.clone() for n, t in tensors.items()}
        try:
            lora = LoRAModel.from_lora_tensors(
                int(lora_id), given, peft, device="cpu", dtype=loader.lora_config.lora_dtype,
                model_vocab_size=loader.vocab_size,
                weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
                skip_prefixes=getattr(manager.model, "lora_skip_prefixes", None))
        except (AttributeError, TypeError):  # another vLLM version: files under new ids instead
            return False
        merge(lora)
        for name, module in manager.modules.items():
            weights = weights_of(lora, name)
            if weights:
                module.set_lora(index, weights.lora_a, weights.lora_b)
            else:
                module.reset_lora(index)
        kept = registered.get(int(lora_id))  # vLLM's copy, should it activate the id again
        if kept is not None:
            kept.__dict__.update(lora.__dict__)
        if plan is None:
            plan = manager._es_slot_plan = SlotPlan.checked(
                manager, mapper, index, tensors, config,
                float(getattr(peft, "vllm_lora_scaling_factor", 1.0))) or False
    return True


class SlotPlan:
    """Where each tensor of an adapter goes in a LoRA slot: the [:rows, :cols] corner of one
    slice of a LoRA layer's stacked A or B weights (vLLM's packed modules: q/k/v in qkv_proj's
    slices, gate/up in gate_up_proj's), found from the tensors' names as vLLM finds them. Only
    made (`checked`) where vLLM's own setting of an adapter into a slot left exactly that there:
    each tensor in its corner in the slot's dtype, B times the adapter's scaling (lora_alpha / r)
    in that dtype, and zeros everywhere else in the slot (the rank's padding, the layers it has no
    tensors for). Writing an adapter with the same config, names and shapes into a slot that holds
    one then gives the slot what vLLM's setting gives it, with a copy per tensor (scaled on the
    CPU, where vLLM builds its weights, then copied to a GPU's slot). On tensor parallel
    ranks vLLM sets a shard of each tensor: the check fails there, and vLLM's setting stays."""

    def __init__(self, places: dict, config: dict, scaling: float):
        self.places = places  # saved name -> (stacked weights, shape, scaling)
        self.config = config
        self.written = 0  # adapters written

    @classmethod
    def checked(cls, manager, mapper, index: int, tensors: dict, config: dict, scaling: float):
        """The plan for adapters named as `tensors` with adapter_config.json `config`, which vLLM
        has just set into slot `index`; None where the slot holds anything else, or vLLM's modules
        are not as expected."""
        try:
            from vllm.lora.utils import parse_fine_tuned_lora_name

            packed = {sub: (name, i) for name, subs in manager.packed_modules.items()
                      for i, sub in enumerate(subs)}
            rename = mapper.get_rename_mapper() if mapper is not None else None
            places, used = {}, set()
            for saved, tensor in tensors.items():
                module_name, is_a = parse_fine_tuned_lora_name(saved, rename)
                name, i = packed.get(module_name, (module_name, 0))
                module = manager.modules[name]
                stacked = (module.lora_a_stacked if is_a else module.lora_b_stacked)[i]
                if tensor.ndim != 2 or stacked.ndim != 4 or id(stacked) in used:
                    return None
                used.add(id(stacked))
                places[saved] = (stacked, tuple(tensor.shape), 1.0 if is_a else scaling)
            every = [w for module in manager.modules.values()
                     for stacked in (getattr(module, "lora_a_stacked", ()),
                                     getattr(module, "lora_b_stacked", ()))
                     for w in ((stacked,) if isinstance(stacked, torch.Tensor) else stacked)]
        except (AttributeError, ImportError, KeyError, IndexError, TypeError, ValueError):
            return None
        for stacked in every:
            slot = stacked[index].to("cpu", copy=True)  # the adapters' tensors are on the CPU
            for saved, (target, (rows, cols), scale) in places.items():
                if target is stacked:
                    expected = tensors[saved].to(slot.dtype, copy=True)
                    if scale != 1:
                        expected *= scale
                    if not torch.equal(slot[0, :rows, :cols], expected):
                        return None
                    slot[0, :rows, :cols] = 0
            if slot.any():
                return None
        return cls(places, config, scaling)

    def write(self, index: int, tensors: dict, config: dict) -> bool:
        """`tensors` into slot `index`; False (nothing written) where their config, names or
        shapes are not the plan's."""
        if config != self.config or tensors.keys() != self.places.keys() or any(
                tuple(t.shape) != self.places[n][1] for n, t in tensors.items()):
            return False
        for saved, tensor in tensors.items():
            stacked, (rows, cols), scale = self.places[saved]
            corner = stacked[index, 0, :rows, :cols]
            if scale != 1 and not corner.is_cpu:  # scaled on the CPU, as vLLM scales it
                tensor = tensor.to(stacked.dtype, copy=True)
                tensor *= scale
                scale = 1
            corner.copy_(tensor)
            if scale != 1:
                corner *= scale  # in the slot's dtype, on the CPU: the same bits
        self.written += 1
        return True


class WorkerExtension:
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's."""

    def es_setup(self, layout: dict, noise_mode: str, master_weights: str = "none",
                 noise_names: str = "vllm", rank: int = 1, targets: str = "all",
                 optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.01) -> int:
        """noise_names "vllm": noise over vLLM's own parameters (fused qkv_proj and gate_up_proj)
        in vLLM's order, as published; "hf": over HF-named views of them in HF order, the same
        noise as the transformers engine draws (and, with an `optimizer` other than sgd, the same
        optimizer state). Weights are exchanged by HF name either way."""
        model = self.model_runner.get_model()
        layers = packed_cpu_layers(model) if _on_cpu() else []
        emptied = [n for n, m in model.named_modules() if m in layers and m.weight.numel() == 0]
        if emptied:
            raise RuntimeError(f"vLLM's CPU backend removed the weights of {len(emptied)} linear "
                               f"layers (e.g. {emptied[0]}): utils.worker_extn was imported after "
                               f"the model loaded, so its keep-weights patch came too late")
        after = (lambda: redispatch(layers)) if layers else None
        if noise_names == "hf":
            self.es_weights = WeightSet(lambda: hf_named_tensors(model, layout), noise_mode,
                                        master_weights, after_change=after, rank=rank,
                                        targets=targets, optimizer=optimizer, momentum=momentum,
                                        weight_decay=weight_decay)
            return len(layout["names"])
        if noise_names != "vllm":
            raise ValueError(f"noise_names must be 'vllm' or 'hf', got {noise_names!r}")
        if optimizer != "sgd":
            raise ValueError(f"--optimizer {optimizer} on vLLM engines needs noise_names 'hf'")
        hf_names(model, layout)  # the same checks: every HF tensor must be found in vLLM's
        self.es_weights = WeightSet(lambda: vllm_named_tensors(model), noise_mode, master_weights,
                                    after_change=after, to_hf=lambda state: to_hf(state, layout),
                                    from_hf=lambda state: from_hf(state, layout))
        return len(self.es_weights.names())

    def es_write_adapters(self, seeds, sigma: float, signs, paths) -> None:
        weights = self.es_weights
        named = weights.named_tensors()
        for seed, sign, path in zip(seeds, signs, paths):
            write_adapter(path, named, weights.only, int(seed), sign * sigma, weights.rank)

    def es_set_member_adapters(self, seeds, sigma: float, signs, lora_ids) -> bool:
        """Lowrank mode: each member's adapter (member_adapter) in place into the slot of a
        resident adapter (set_resident_adapters); False where they are not resident."""
        weights = self.es_weights
        named = weights.named_tensors()
        return set_resident_adapters(self.model_runner, lora_ids, (
            member_adapter(named, weights.only, int(seed), sign * sigma, weights.rank)
            for seed, sign in zip(seeds, signs)))

    def es_set_adapters(self, lora_ids, adapters) -> bool:
        """--es_params lora: the members' adapters (tensors by saved name, adapter_config.json
        dict) in place into the slots of resident adapters (set_resident_adapters)."""
        return set_resident_adapters(self.model_runner, lora_ids, adapters)

    def es_weight_op(self, name: str, *args):
        if name not in WEIGHT_OPS:
            raise ValueError(f"unknown weight operation {name!r}; expected one of {WEIGHT_OPS}")
        return getattr(self.es_weights, name)(*args)
