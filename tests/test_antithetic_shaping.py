"""Antithetic pairs and fitness shaping, for every noise mode."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import PYTHON, run_main
from es_llm.lowrank import lowrank_update
from es_llm.models import load_model
from es_llm.noise import tensor_noise
from es_llm.shaping import centered_ranks, member_signs, shape_fitness, update_terms
from es_llm.strategy import es_update, normalize_rewards
from es_llm.strategy import Strategy
from es_llm.trainer import Population, TrainConfig, resume_mismatches


def config(**overrides):
    return TrainConfig(**{"task": "conciseness", "model_name": "m", "output_dir": "o", **overrides})


def test_zscore_shaping_is_bit_identical_to_the_published_normalisation():
    rewards = torch.randn(30).tolist()
    assert torch.equal(shape_fitness(rewards), normalize_rewards(rewards))
    assert torch.equal(shape_fitness(rewards, "zscore"), normalize_rewards(rewards))


def test_centered_ranks_are_ranks_scaled_to_minus_half_half():
    z = centered_ranks([10.0, -3.0, 7.5, 100.0, 0.0])
    assert z.dtype == torch.float32
    assert z.tolist() == [0.25, -0.5, 0.0, 0.5, -0.25]


def test_centered_ranks_give_ties_their_mean_rank_so_equal_rewards_do_not_move_the_weights():
    assert centered_ranks([1.0, 2.0, 2.0, 3.0]).tolist() == pytest.approx([-0.5, 0.0, 0.0, 0.5])
    assert torch.equal(centered_ranks([4.0] * 6), torch.zeros(6))
    assert torch.equal(centered_ranks([7.0]), torch.zeros(1))
    z = centered_ranks([-2.0, -1.0, -2.0, 5.0, -1.0])
    assert torch.equal(z, centered_ranks([-2.0, -1.0, -2.0, 5.0, -1.0]))  # deterministic
    assert float(z.sum()) == pytest.approx(0.0, abs=1e-7)


def test_centered_ranks_ignore_the_scale_of_the_rewards():
    r = np.random.RandomState(0).randn(17)
    assert torch.equal(centered_ranks(r), centered_ranks(r * 1e6 + 3))


def test_unknown_shaping_is_refused():
    with pytest.raises(ValueError, match="unknown fitness shaping"):
        shape_fitness([1.0, 2.0], "softmax")
    with pytest.raises(ValueError, match="fitness_shaping must be one of"):
        config(fitness_shaping="softmax").validate()


def test_antithetic_draws_half_the_seeds_each_used_by_a_plus_and_a_minus_member():
    strategy = Strategy(6, 33, antithetic=True)
    seeds = strategy.ask()
    pairs = np.random.RandomState(33).randint(0, 2**30, size=3, dtype=np.int64)
    assert seeds == [int(s) for s in np.repeat(pairs, 2)]
    assert strategy.signs == [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    assert member_signs(6, True) == [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    assert member_signs(3, False) == [1.0, 1.0, 1.0]
    plain = Strategy(6, 33).ask()
    assert plain == np.random.RandomState(33).randint(0, 2**30, size=6).tolist()


def test_antithetic_needs_an_even_population():
    with pytest.raises(ValueError, match="must be even with --antithetic"):
        config(population_size=5, antithetic=True).validate()
    config(population_size=6, antithetic=True).validate()


def test_rank_without_lowrank_is_refused():
    with pytest.raises(ValueError, match="only applies to --noise_mode lowrank"):
        config(rank=4).validate()
    config(rank=4, noise_mode="lowrank").validate()


def test_lowrank_targets_without_lowrank_or_unknown_are_refused():
    with pytest.raises(ValueError, match="--lowrank_targets lora only applies to --noise_mode"):
        config(lowrank_targets="lora").validate()
    with pytest.raises(ValueError, match="lowrank_targets must be one of"):
        config(lowrank_targets="attention", noise_mode="lowrank").validate()
    config(lowrank_targets="lora", noise_mode="lowrank").validate()


@pytest.mark.parametrize("mode", ["correlated", "iid", "lowrank"])
def test_one_term_per_pair_equals_the_member_by_member_signed_update(mode):
    torch.manual_seed(0)
    tensors = [torch.randn(12, 8), torch.randn(8), torch.randn(8, 12)]
    seeds, signs = [4, 4, 9, 9], torch.tensor([1.0, -1.0, 1.0, -1.0])
    z = shape_fitness([0.3, -1.0, 2.0, 0.5])
    paired, by_member = [t.clone() for t in tensors], [t.clone() for t in tensors]
    terms, weights = update_terms(seeds, z, antithetic=True)
    assert terms == [4, 9] and torch.equal(weights, z[0::2] - z[1::2])
    if mode == "lowrank":
        lowrank_update(paired, terms, weights, 0.01, 2, n=4)
        lowrank_update(by_member, seeds, z * signs, 0.01, 2)
    else:
        es_update(paired, terms, weights, 0.01, mode, n=4)
        es_update(by_member, seeds, z * signs, 0.01, mode)
    for a, b in zip(paired, by_member):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_antithetic_the_update_terms_are_the_members_unchanged():
    z = shape_fitness([1.0, 2.0, 3.0])
    seeds, weights = update_terms([1, 2, 3], z, antithetic=False)
    assert seeds == [1, 2, 3] and weights is z


@pytest.mark.parametrize("master_weights", ["none", "fp32"])
def test_the_minus_member_is_evaluated_at_base_minus_sigma_eps(tiny_model_dir, master_weights):
    model, _ = load_model(str(tiny_model_dir), "fp32")
    cfg = config(sigma=0.01, gpu_threads=1, noise_mode="iid", master_weights=master_weights,
                 precision="fp32")
    population = Population(model, cfg, generate=None, task=None)
    member, base_params = population.copies[0], population.weights.params()
    member.perturb(123, -1.0 * cfg.sigma)  # what evaluate() does for sign -1
    for k, (p, base) in enumerate(zip(member.params(), base_params)):
        assert torch.equal(p, base + tensor_noise(base, 123, k, "iid") * -0.01)
    member.restore(123, -1.0 * cfg.sigma)
    if master_weights == "fp32":  # subtracting in fp32 need not be exact; the master copy is
        assert all(torch.equal(p, b) for p, b in zip(member.params(), base_params))


def test_resume_checks_antithetic_shaping_and_rank_and_reads_old_checkpoints_as_defaults():
    cfg = config(antithetic=True, fitness_shaping="centered_rank", noise_mode="lowrank", rank=2)
    saved = {k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__}
    assert resume_mismatches(saved, cfg) == []
    old = {k: v for k, v in saved.items() if k not in ("antithetic", "fitness_shaping", "rank")}
    problems = resume_mismatches(old, cfg)
    assert any(p.startswith("antithetic: checkpoint has False") for p in problems)
    assert any(p.startswith("fitness_shaping: checkpoint has 'zscore'") for p in problems)
    assert any(p.startswith("rank: checkpoint has 1, this run has 2") for p in problems)
    assert resume_mismatches(old, config(noise_mode="lowrank")) == []
    plain = config()
    assert resume_mismatches({k: getattr(plain, k) for k in ("model_name", "task")}, plain) == []


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_antithetic_centered_rank_run_logs_signs_and_recomputes_its_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_main([PYTHON, "es_fine-tuning_conciseness_iid.py", "--model_name", str(tiny_model_dir),
                "--precision", "fp32", "--gpu_threads", "2", "--output_dir", str(out),
                "--num_iterations", "2", "--population_size", "4", "--sigma", "0.05",
                "--alpha", "0.02", "--max_new_tokens", "8", "--antithetic",
                "--fitness_shaping", "centered_rank"])
    records = read_metrics(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    tensors = [p.detach().clone() for p in model.parameters()]
    for r in records:
        assert r["signs"] == [1, -1, 1, -1]
        assert r["seeds"][0] == r["seeds"][1] and r["seeds"][2] == r["seeds"][3]
        z = centered_ranks(r["rewards"]) * torch.tensor(r["signs"], dtype=torch.float32)
        es_update(tensors, r["seeds"], z, 0.02, "iid")
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in zip(names, tensors):
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6)
