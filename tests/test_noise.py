import pytest
import torch

from es_llm.noise import MasterWeights, add_noise, tensor_noise


def reference_noise(shape, seed, dtype):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correlated_noise_is_torch_randn_with_the_seed_for_every_tensor(dtype):
    params = [torch.zeros(3, 4, dtype=dtype), torch.zeros(7, dtype=dtype), torch.zeros(3, 4, dtype=dtype)]
    for k, p in enumerate(params):
        assert torch.equal(tensor_noise(p, 123, k, "correlated"), reference_noise(p.shape, 123, dtype))
    # Same shape, same seed: the published "correlated" noise is identical across tensors.
    assert torch.equal(tensor_noise(params[0], 123, 0, "correlated"),
                       tensor_noise(params[2], 123, 2, "correlated"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_iid_noise_uses_seed_plus_tensor_index(dtype):
    params = [torch.zeros(3, 4, dtype=dtype), torch.zeros(7, dtype=dtype), torch.zeros(3, 4, dtype=dtype)]
    for k, p in enumerate(params):
        assert torch.equal(tensor_noise(p, 123, k, "iid"), reference_noise(p.shape, 123 + k, dtype))
    assert not torch.equal(tensor_noise(params[0], 123, 0, "iid"), tensor_noise(params[2], 123, 2, "iid"))


def test_unknown_noise_mode_is_refused():
    with pytest.raises(ValueError, match="unknown noise mode"):
        tensor_noise(torch.zeros(2), 1, 0, "gaussian")


@pytest.mark.parametrize("mode", ["correlated", "iid"])
def test_add_noise_adds_sigma_times_the_regenerated_noise(mode):
    torch.manual_seed(0)
    params = [torch.randn(5, 6), torch.randn(6)]
    before = [p.clone() for p in params]
    add_noise(params, 42, 0.01, mode)
    for k, (p, b) in enumerate(zip(params, before)):
        seed = 42 if mode == "correlated" else 42 + k
        assert torch.equal(p, b + reference_noise(b.shape, seed, torch.float32) * 0.01)


def test_published_bf16_restore_drifts_and_master_weights_restore_exactly():
    torch.manual_seed(0)
    original = [(torch.randn(256, 256) * 0.05).to(torch.bfloat16) for _ in range(3)]

    published = [p.clone() for p in original]
    add_noise(published, 7, 0.001, "correlated")
    add_noise(published, 7, -0.001, "correlated")
    drifted = sum(int((p != o).sum()) for p, o in zip(published, original))
    assert drifted > 0, "bf16 perturb-then-subtract should not be exact"

    exact = [p.clone() for p in original]
    masters = MasterWeights(exact)
    masters.perturb(exact, 7, 0.001, "correlated")
    assert any(not torch.equal(p, o) for p, o in zip(exact, original))
    masters.copy_to(exact)
    assert all(torch.equal(p, o) for p, o in zip(exact, original))


def test_master_weights_perturbation_is_cast_from_fp32_master_plus_noise():
    torch.manual_seed(1)
    params = [torch.randn(8, 8).to(torch.bfloat16)]
    masters = MasterWeights(params)
    masters.perturb(params, 9, 0.001, "iid")
    expected = (params[0].float() * 0 + masters.tensors[0]
                + 0.001 * reference_noise((8, 8), 9, torch.float32)).to(torch.bfloat16)
    assert torch.equal(params[0], expected)


def naive_add(params, seed, scale, mode):
    """The paper-style pass: regenerate every tensor's noise, no sharing."""
    for k, p in enumerate(params):
        p.add_(tensor_noise(p, seed, k, mode).mul_(scale))


@pytest.mark.parametrize("mode", ["correlated", "iid"])
def test_shared_and_kept_noise_give_the_same_bits_as_regenerating_it(mode):
    from es_llm.noise import subtract_noise

    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (16, 8), (8,), (4, 16)]
    ours = [(torch.randn(s) * 0.05).to(torch.bfloat16) for s in shapes]
    paper = [p.clone() for p in ours]
    added = add_noise(ours, 99, 0.001, mode, keep=True)
    naive_add(paper, 99, 0.001, mode)
    assert all(torch.equal(a, b) for a, b in zip(ours, paper))
    subtract_noise(ours, added)
    naive_add(paper, 99, -0.001, mode)
    assert all(torch.equal(a, b) for a, b in zip(ours, paper))
