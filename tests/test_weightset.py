"""WeightSet, the one class that perturbs, restores and updates weights: its update orders, its
restore with kept noise, and thread copies sharing the canonical weights' fp32 masters."""
import pytest
import torch

from es_llm.noise import add_noise
from es_llm.strategy import es_update, normalize_rewards
from es_llm.weightset import WeightSet

SEEDS, REWARDS = [11, 2024, 777, 31337], [0.1, 0.6, 0.0, 1.1]


def tensors(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return [torch.randn(8, 4).to(dtype), torch.randn(4).to(dtype), torch.randn(8, 4).to(dtype)]


def weight_set(params, mode="correlated", **kwargs):
    return WeightSet(lambda: [(f"t{k}", p) for k, p in enumerate(params)], mode, **kwargs)


@pytest.mark.parametrize("mode", ["correlated", "iid"])
def test_the_update_orders_are_the_published_scripts_and_the_accelerated_versions(mode):
    """accumulate: es_update (sum, divide, add once); sequential: N seeded additions; bit for bit
    in bf16, where the two orders round differently."""
    z = normalize_rewards(REWARDS)
    accumulate, sequential = tensors(), tensors()
    weight_set(accumulate, mode, update_order="accumulate").update(SEEDS, z, 0.01)
    weight_set(sequential, mode).update(SEEDS, z, 0.01)
    published, engines = tensors(), tensors()
    es_update(published, SEEDS, z, 0.01, mode)
    for seed, zi in zip(SEEDS, z):
        add_noise(engines, seed, 0.01 / len(SEEDS) * float(zi), mode)
    assert all(torch.equal(a, b) for a, b in zip(accumulate, published))
    assert all(torch.equal(a, b) for a, b in zip(sequential, engines))
    assert not all(torch.equal(a, b) for a, b in zip(accumulate, sequential))


def test_restore_with_kept_noise_equals_subtracting_it_drawn_again():
    kept, drawn = tensors(), tensors()
    a, b = weight_set(kept, "iid", keep_noise=True), weight_set(drawn, "iid")
    for weights in (a, b):
        weights.perturb(5, -0.01)  # an antithetic minus member
        weights.restore(5, -0.01)
    assert all(torch.equal(x, y) for x, y in zip(kept, drawn))
    assert a.added is None  # the kept noise is released once used
    with pytest.raises(ValueError, match="update_order"):
        weight_set(tensors(), update_order="reversed")


def test_thread_copies_share_the_masters_restore_exactly_and_take_the_update():
    canonical_params, copy_params = tensors(), tensors()
    canonical = weight_set(canonical_params, master_weights="fp32", update_order="accumulate")
    member = weight_set(copy_params, masters=canonical.masters, keep_noise=True)
    assert member.masters is canonical.masters
    member.perturb(7, 0.05)
    expected = [(m + torch.randn(m.shape, generator=torch.Generator().manual_seed(7))
                 * 0.05).to(torch.bfloat16) for m in canonical.masters.tensors]
    assert all(torch.equal(p, e) for p, e in zip(copy_params, expected))
    member.restore(7, 0.05)
    assert all(torch.equal(p, c) for p, c in zip(copy_params, canonical_params))
    canonical.update(SEEDS, normalize_rewards(REWARDS), 0.01)
    member.copy_from(canonical)
    assert all(torch.equal(p, c) for p, c in zip(copy_params, canonical_params))
    assert all(torch.equal(m.to(torch.bfloat16), c)
               for m, c in zip(canonical.masters.tensors, canonical_params))


def test_the_plain_trainers_population_keeps_every_copy_on_the_canonical_weights(tiny_model_dir):
    from es_llm.config import TrainConfig
    from es_llm.models import load_model
    from es_llm.trainer import Population

    model, _ = load_model(str(tiny_model_dir), "bf16")
    cfg = TrainConfig(task="t", model_name="m", output_dir="-", gpu_threads=2, sigma=0.01)
    population = Population(model, cfg, generate=None, task=None)
    before = [p.clone() for p in population.weights.params()]
    for slot, weights in enumerate(population.copies):
        weights.perturb(100 + slot, 0.01)
        weights.restore(100 + slot, 0.01)
    population.update(SEEDS, normalize_rewards(REWARDS))
    canonical = population.weights.params()
    assert not all(torch.equal(a, b) for a, b in zip(canonical, before))
    for weights in population.copies:  # the restore rounding of each copy is gone
        assert all(torch.equal(p, c) for p, c in zip(weights.params(), canonical))
    population.close()
