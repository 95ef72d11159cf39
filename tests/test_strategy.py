import numpy as np
import pytest
import torch

from es_llm.strategy import es_update, normalize_rewards


@pytest.mark.parametrize("seed", range(20))
def test_z_is_the_published_numpy_float32_expression_with_population_std(seed):
    rng = np.random.default_rng(seed)
    rewards = torch.tensor(rng.normal(-40, 25, size=int(rng.integers(2, 64))), dtype=torch.float32)
    r = rewards.numpy()
    expected = (r - r.mean()) / (r.std() + 1e-8)
    z = normalize_rewards(rewards)
    assert z.dtype == torch.float32 and np.array_equal(z.numpy(), expected.astype(np.float32))
    assert np.array_equal(normalize_rewards(rewards.tolist()).numpy(), z.numpy())


def test_normalize_equal_rewards_gives_zero_not_nan():
    assert torch.equal(normalize_rewards([3.0, 3.0, 3.0]), torch.zeros(3))


def independent_update(tensors, seeds, rewards, alpha, mode):
    """Recompute the ES update from seeds and rewards with plain numpy-level arithmetic."""
    r = np.asarray(rewards, dtype=np.float64)
    z = (r - r.mean()) / (r.std() + 1e-8)
    out = []
    for k, t in enumerate(tensors):
        total = np.zeros(t.shape, dtype=np.float64)
        for seed, zi in zip(seeds, z):
            g = torch.Generator()
            g.manual_seed(seed if mode == "correlated" else seed + k)
            total += zi * torch.randn(t.shape, generator=g, dtype=torch.float32).double().numpy()
        out.append(t.double().numpy() + alpha * total / len(seeds))
    return out


def test_update_matches_an_independent_recomputation():
    torch.manual_seed(0)
    for mode in ("correlated", "iid"):
        tensors = [torch.randn(16, 8), torch.randn(8), torch.randn(16, 8)]
        seeds, rewards, alpha = [11, 2**29 + 5, 77, 3], [0.5, -1.0, 2.0, 0.25], 0.01
        expected = independent_update(tensors, seeds, rewards, alpha, mode)
        es_update(tensors, seeds, normalize_rewards(rewards), alpha, mode)
        for t, e in zip(tensors, expected):
            np.testing.assert_allclose(t.numpy(), e, rtol=0, atol=1e-6)


def test_update_is_a_pure_function_of_weights_seeds_and_rewards():
    torch.manual_seed(0)
    base = [torch.randn(4, 4), torch.randn(4)]
    a, b = [t.clone() for t in base], [t.clone() for t in base]
    z = normalize_rewards([1.0, 0.0, 3.0])
    es_update(a, [5, 6, 7], z, 0.1, "iid")
    es_update(b, [5, 6, 7], z, 0.1, "iid")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], base[0])


def test_bf16_update_of_small_alpha_leaves_most_weights_unchanged_but_fp32_moves_them():
    # The defect the fp32 master weights fix: at the paper's population 30 and alpha, the update
    # of a typical weight (|w| ~ 0.05) is below half a bf16 ulp, so most entries never change.
    torch.manual_seed(0)
    weights = torch.randn(64, 64) * 0.05
    bf16, fp32 = [weights.to(torch.bfloat16)], [weights.clone()]
    z = normalize_rewards(torch.randn(30))
    es_update(bf16, list(range(30)), z, 0.0005, "correlated")
    es_update(fp32, list(range(30)), z, 0.0005, "correlated")
    assert (bf16[0] != weights.to(torch.bfloat16)).float().mean() < 0.5
    assert (fp32[0] != weights).float().mean() > 0.99


def test_shared_update_per_shape_gives_the_same_bits_as_the_per_tensor_loop():
    from es_llm.noise import tensor_noise

    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (16, 8), (8,)]
    ours = [(torch.randn(s) * 0.05).to(torch.bfloat16) for s in shapes]
    paper = [p.clone() for p in ours]
    seeds, z = [3, 4, 5], normalize_rewards([1.0, -2.0, 0.5])
    es_update(ours, seeds, z, 0.0005, "correlated")
    for k, t in enumerate(paper):
        update = torch.zeros_like(t)
        for seed, zi in zip(seeds, z.tolist()):
            update.add_(tensor_noise(t, seed, k, "correlated").mul_(zi))
        update.div_(len(seeds))
        t.add_(update.mul_(0.0005))
    assert all(torch.equal(a, b) for a, b in zip(ours, paper))
