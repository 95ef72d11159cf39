"""An engine's weights and the ES operations on them, wherever the engine keeps them.

`WeightSet` runs perturb, restore, the update, broadcast, save and load on a list of (name, tensor)
pairs: the HF model's parameters (the transformers engine), HF-named views of vLLM's tensors, or
vLLM's own fused tensors (utils/worker_extn.py). `CollectiveGroup` is the process group the engines
broadcast through (NCCL on GPUs, gloo on CPUs), created once, beside whatever group the engine uses
internally. Nothing here imports an engine, so both engines and vLLM's worker import it.
"""
import hashlib
from datetime import timedelta

import torch
import torch.distributed as dist

from .lowrank import LOWRANK, keeps_masters, lowrank_update, target_indices
from .noise import MasterWeights, add_noise, subtract_noise
from .strategy import es_update
from .tuning import make_optimizer, optimizer_step

COLLECTIVE_TIMEOUT_S = 1800
UPDATE_ORDERS = ("accumulate", "sequential")
# The WeightSet operations an engine may be asked to run (the vLLM worker refuses any other name).
WEIGHT_OPS = ("perturb", "restore", "update", "init_collective", "broadcast", "state_dict",
              "master_state", "load_state_dict", "fingerprint", "names", "optimizer_state",
              "load_optimizer_state")


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
    """The ES operations on one set of weights, given as (HF name, tensor) pairs in HF order: the
    one place where weights are perturbed, restored and updated (the plain trainers' canonical
    weights and thread copies, and every engine's weights).

    `named_tensors()` is asked again before every operation (an engine may swap a parameter's
    storage), and `after_change()` runs after every change (vLLM on CPU re-packs its linear layers).
    With `master_weights="fp32"` an fp32 copy is the true state: perturbation is cast from it,
    restore is exact, and the update accumulates in fp32 (see es_llm.noise.MasterWeights); thread
    copies share their canonical weights' masters (`masters`).
    `optimizer` other than "sgd" (the published step) steps a torch.optim optimizer on the ES
    gradient estimate (es_llm.tuning); it implies fp32 master weights, the tensors it steps.

    `update_order`: "accumulate" as the published plain scripts (sum_i z_i eps_i, divided by N,
    times alpha, added once: es_llm.strategy.es_update), or "sequential" as the published
    accelerated version (N seeded additions of (alpha / N) z_i eps_i). `keep_noise` keeps the added
    noise so restore subtracts it instead of drawing it again (the same bits, less time, the memory
    of one more copy).
    """

    def __init__(self, named_tensors, noise_mode: str, master_weights: str = "none",
                 after_change=None, to_hf=None, from_hf=None, rank: int = 1,
                 targets: str = "all", update_order: str = "sequential", masters=None,
                 keep_noise: bool = False, optimizer: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 0.01):
        if master_weights not in ("none", "fp32"):
            raise ValueError(f"master_weights must be 'none' or 'fp32', got {master_weights!r}")
        if update_order not in UPDATE_ORDERS:
            raise ValueError(f"update_order must be one of {UPDATE_ORDERS}, got {update_order!r}")
        self.named_tensors = named_tensors
        self.rank = rank
        # lowrank: the tensors that carry noise (all, or the projections vLLM's LoRA covers)
        self.only = target_indices(self.names(), targets) if noise_mode == LOWRANK else None
        # An engine that draws noise over its own tensors (vLLM's fused ones) exchanges weights by
        # HF name all the same: to_hf / from_hf convert a {name: tensor} dict.
        self.to_hf = to_hf or (lambda state: state)
        self.from_hf = from_hf or (lambda state: state)
        self.noise_mode = noise_mode
        self.update_order = update_order
        self.keep_noise, self.added = keep_noise, None
        self.after_change = after_change or (lambda: None)
        self.masters = masters or (MasterWeights(self.params()) if keeps_masters(
            master_weights, noise_mode, self.params()) or optimizer != "sgd" else None)
        self.optimizer = make_optimizer(optimizer, self.masters.tensors, momentum, weight_decay
                                        ) if optimizer != "sgd" else None
        self.group = None

    def names(self) -> list:
        return [name for name, _ in self.named_tensors()]

    def params(self) -> list:
        return [tensor for _, tensor in self.named_tensors()]

    def true_tensors(self) -> list:
        """The weights' true state: the fp32 master weights, or the weights themselves."""
        return self.masters.tensors if self.masters else self.params()

    def perturb(self, seed: int, sigma: float) -> None:
        """theta += sigma * eps (a negative sigma gives the minus member of an antithetic pair)."""
        if self.masters:
            self.masters.perturb(self.params(), seed, sigma, self.noise_mode)
        else:
            self.added = add_noise(self.params(), seed, sigma, self.noise_mode,
                                   keep=self.keep_noise)
        self.after_change()

    def restore(self, seed: int, sigma: float) -> None:
        """Undo perturb(seed, sigma): exact with master weights, else by subtracting the noise
        (in bf16/fp16 this leaves about one ulp of rounding per add, as published)."""
        if self.masters:
            self.masters.copy_to(self.params())
        elif self.added:
            subtract_noise(self.params(), self.added)
        else:
            add_noise(self.params(), seed, -sigma, self.noise_mode)
        self.added = None
        self.after_change()

    @torch.no_grad()
    def update(self, seeds, z, alpha: float, n: int | None = None) -> None:
        """theta += alpha * (1/N) * sum_i z_i * eps_i in `update_order`; N is the population size,
        len(seeds) unless given (antithetic pairs give one term per pair); lowrank:
        alpha * (1/N) * sum_i z_i * A_i B_i^T / sqrt(R), in fp32. With an optimizer (momentum,
        adam, adamw), the same sum at alpha = 1 is the ES gradient estimate its step follows, at
        learning rate alpha, on the fp32 master weights."""
        target = self.true_tensors()
        n = n or len(seeds)
        if self.optimizer is None:
            self._add_update(target, seeds, z, alpha, n)
        else:
            gradients = [torch.zeros_like(t) for t in target]
            self._add_update(gradients, seeds, z, 1.0, n)
            optimizer_step(self.optimizer, target,
                           [g if self.only is None or k in self.only else None
                            for k, g in enumerate(gradients)], alpha)
        if self.masters:
            self.masters.copy_to(self.params())
        self.after_change()

    def _add_update(self, target, seeds, z, alpha: float, n: int) -> None:
        if self.noise_mode == LOWRANK:
            lowrank_update(target, [int(s) for s in seeds], z, alpha, self.rank, n=n,
                           only=self.only)
        elif self.update_order == "accumulate":
            es_update(target, seeds, z, alpha, self.noise_mode, n=n)
        else:
            for seed, zi in zip(seeds, z):
                add_noise(target, int(seed), alpha / n * float(zi), self.noise_mode)

    def optimizer_state(self):
        """The optimizer's state_dict (momentum, Adam's moments), or None for the sgd step."""
        return None if self.optimizer is None else self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        if self.optimizer is None:
            raise ValueError("optimizer state was given, but this run steps with sgd "
                             "(--optimizer sgd keeps none)")
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def copy_from(self, other: "WeightSet") -> None:
        """Take another set's weights (a thread copy after the canonical weights' update)."""
        for dst, src in zip(self.params(), other.params()):
            dst.copy_(src)
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
        return self.to_hf({name: t.detach().to("cpu", copy=True).contiguous()
                           for name, t in self.named_tensors()})

    def master_state(self):
        """{HF name: CPU copy of its fp32 master weight}, or None without master weights."""
        if not self.masters:
            return None
        return self.to_hf({name: m.detach().to("cpu", copy=True).contiguous()
                           for name, m in zip(self.names(), self.masters.tensors)})

    @torch.no_grad()
    def load_state_dict(self, state: dict, masters=None) -> None:
        """Load weights by HF name; `masters` (fp32, by HF name, as master_state() gives them)
        become the master weights, else the masters are cast again from the loaded weights."""
        if masters is not None and not self.masters:
            raise ValueError("fp32 master weights were given, but this engine keeps none "
                             "(--master_weights none)")
        state = self.from_hf(state)
        masters = self.from_hf(masters) if masters is not None else None
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
            self.load_masters(masters, converted=True)
        elif self.masters:  # in place: an optimizer keeps stepping these tensors
            for master, tensor in zip(self.masters.tensors, self.params()):
                master.copy_(tensor)
        self.after_change()

    @torch.no_grad()
    def load_masters(self, masters: dict, converted: bool = False) -> None:
        """The fp32 master weights by HF name (as master_state() gives them); the weights are cast
        from them."""
        masters = masters if converted else self.from_hf(masters)
        for (name, tensor), master in zip(self.named_tensors(), self.masters.tensors):
            if name not in masters or tuple(masters[name].shape) != tuple(tensor.shape):
                raise ValueError(f"the master weights to load lack {name!r} or give it "
                                 f"another shape; were they saved from another model?")
            master.copy_(masters[name])
        self.masters.copy_to(self.params())
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
