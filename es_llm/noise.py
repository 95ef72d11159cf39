"""Seeded Gaussian noise over every parameter tensor, regenerated from the seed whenever needed.

Workers exchange only seeds and rewards; the noise itself is never stored or shipped.

Noise modes (MISSION.md section 1):
    correlated  every tensor's generator is seeded with `seed` (the published default): tensors of
                the same shape get identical noise, so it is drawn once per shape and reused, which
                gives the same bits as drawing it again for every tensor
    iid         the k-th tensor in `named_parameters()` order uses `seed + k`
"""
import torch

NOISE_MODES = ("correlated", "iid")


def tensor_seed(seed: int, k: int, noise_mode: str) -> int:
    """The generator seed of the k-th parameter tensor for a population member's seed."""
    if noise_mode == "correlated":
        return int(seed)
    if noise_mode == "iid":
        return int(seed) + k
    raise ValueError(f"unknown noise mode {noise_mode!r}; expected one of {NOISE_MODES}")


def tensor_noise(like: torch.Tensor, seed: int, k: int, noise_mode: str, dtype=None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, from a fresh generator on its device."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(tensor_seed(seed, k, noise_mode))
    return torch.randn(like.shape, generator=generator, device=like.device,
                       dtype=dtype or like.dtype)


def per_tensor(tensors, noise_mode: str, make):
    """Yield (tensor, make(k, tensor)) for every tensor; in correlated mode `make` runs once per
    (shape, dtype, device), because its noise, and so its result, is the same for all of them."""
    cache = {}
    for k, tensor in enumerate(tensors):
        if noise_mode != "correlated":
            yield tensor, make(k, tensor)
            continue
        key = (tuple(tensor.shape), tensor.dtype, tensor.device)
        if key not in cache:
            cache[key] = make(k, tensor)
        yield tensor, cache[key]


@torch.no_grad()
def add_noise(params, seed: int, scale: float, noise_mode: str, keep: bool = False):
    """The published perturbation: param += scale * eps, computed in the parameter's dtype.

    Called with +sigma to perturb and -sigma to restore; in bf16 the pair does not return the
    original weights exactly (each add rounds), which is the drift `MasterWeights` removes.
    With `keep`, returns the added tensors so that `subtract_noise` restores without regenerating
    them (bit-identical to adding -scale * eps, since negation is exact).
    """
    added = []
    for param, delta in per_tensor(
            params, noise_mode, lambda k, p: tensor_noise(p, seed, k, noise_mode).mul_(scale)):
        param.add_(delta)
        if keep:
            added.append(delta)
    return added


def perturbed_tensors(tensors, seed: int, scale: float, noise_mode: str):
    """Yield a new tensor scale * eps + t for every tensor t, noise drawn in t's dtype, one at a
    time: what MasterWeights casts into the weights, and what perturbing weights equal to
    `tensors` gives in their dtype. No autograd graph (t detached, the noise drawn without one);
    not a no_grad generator, which would enter and leave no_grad at every tensor."""
    for tensor, delta in per_tensor(tensors, noise_mode, lambda k, t: tensor_noise(
            t.detach(), seed, k, noise_mode).mul_(scale)):
        yield delta + tensor.detach()


@torch.no_grad()
def subtract_noise(params, added) -> None:
    for param, delta in zip(params, added):
        param.sub_(delta)


class MasterWeights:
    """fp32 master copy of the weights (`--master_weights fp32`).

    A perturbed model is cast from master + sigma * eps (noise drawn in fp32); restoring casts the
    master again, so it is exact; the update is accumulated and applied in fp32.
    """

    def __init__(self, params):
        self.tensors = [p.detach().to(torch.float32).clone() for p in params]

    @torch.no_grad()
    def perturb(self, params, seed: int, sigma: float, noise_mode: str) -> None:
        for param, perturbed in zip(params, perturbed_tensors(self.tensors, seed, sigma,
                                                              noise_mode)):
            param.copy_(perturbed)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for param, master in zip(params, self.tensors):
            param.copy_(master)
