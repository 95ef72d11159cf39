"""The ES strategy: normalise the population's rewards and move the weights along the noise.

Both are pure functions of (weights, seeds, rewards): anyone holding the logged seeds and rewards
can recompute the update exactly.
"""
import numpy as np
import torch

from .noise import per_tensor, tensor_noise


def normalize_rewards(rewards) -> torch.Tensor:
    """z = (r - mean) / (std + 1e-8), population std: the published expression, on a numpy float32
    array (numpy's pairwise sums, so the bits are the published ones), returned as a float32 tensor."""
    r = np.asarray(torch.as_tensor(rewards, dtype=torch.float32).cpu().numpy(), dtype=np.float32)
    z = (r - r.mean()) / (r.std() + 1e-8)
    return torch.from_numpy(np.asarray(z, dtype=np.float32))


@torch.no_grad()
def es_update(tensors, seeds, z, alpha: float, noise_mode: str, n: int | None = None) -> None:
    """tensor += alpha * (1/N) * sum_i z_i * eps_i, in place, for every tensor.

    Accumulated in each tensor's own dtype (bf16 for the published path, fp32 for master
    weights), in this exact order: update = sum_i eps_i * z_i; update /= N; tensor += alpha * update.
    The 1/sigma of textbook ES is folded into alpha, as in the paper. N is the population size,
    len(seeds) unless given (antithetic pairs pass one term per pair, see shaping.update_terms).
    """
    n = n or len(seeds)
    weights = [float(zi) for zi in z]

    def step(k, tensor):
        update = torch.zeros_like(tensor)
        for seed, weight in zip(seeds, weights):
            update.add_(tensor_noise(tensor, seed, k, noise_mode).mul_(weight))
        return update.div_(n).mul_(alpha)

    for tensor, delta in per_tensor(tensors, noise_mode, step):
        tensor.add_(delta)
