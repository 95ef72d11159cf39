"""Low-rank noise: the batched population forward equals plain forwards on explicitly perturbed weights,
the update equals an independent recomputation, and a lowrank run trains end to end."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from conftest import PYTHON, run_main
from es_llm.generation import Generator
from es_llm.lowrank import BatchedLowRank, factors, lowrank_update, target_indices
from es_llm.models import load_model
from es_llm.shaping import shape_fitness, update_terms

PROMPTS = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]
SEEDS, SIGNS, SIGMA = [5, 2**30 - 1, 77, 123456], [1.0, -1.0, 1.0, -1.0], 0.05


def reference_factors(shape, seed, k, rank):
    """The documented draw, written out: a generator seeded with seed + k; A (d0 x R), then B (d1 x R)."""
    g = torch.Generator()
    g.manual_seed(seed + k)
    if len(shape) == 2:
        return (torch.randn((shape[0], rank), generator=g, dtype=torch.float32),
                torch.randn((shape[1], rank), generator=g, dtype=torch.float32))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def explicitly_perturbed(model, seed, sign, sigma, rank, only=None):
    """A copy of the model with W + sign * sigma * A B^T / sqrt(R) (2-D) or + sign * sigma * eps
    (the parameters whose index is in `only`, if given)."""
    member = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in enumerate(member.parameters()):
            if only is not None and k not in only:
                continue
            drawn = reference_factors(p.shape, seed, k, rank)
            delta = drawn[0] @ drawn[1].T / math.sqrt(rank) if p.ndim == 2 else drawn
            p.add_(sign * sigma * delta)
    return member


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return load_model(str(tiny_model_dir), "fp32")


@pytest.fixture(scope="module")
def tiny_qwen2(bundled_tokenizer_dir):
    """Untied lm_head and biased q/k/v projections: the cases the tied Llama does not cover."""
    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir)
    tokenizer.padding_side = "left"
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model, tokenizer


def test_factors_are_drawn_in_fp32_from_seed_plus_k_a_then_b():
    weight, norm = torch.zeros(6, 4, dtype=torch.bfloat16), torch.zeros(4)
    a, b = factors(weight, 11, 3, 2)
    ra, rb = reference_factors((6, 4), 11, 3, 2)
    assert a.dtype == torch.float32 and torch.equal(a, ra) and torch.equal(b, rb)
    assert torch.equal(factors(norm, 11, 4, 2), reference_factors((4,), 11, 4, 2))


@pytest.mark.parametrize("rank", [1, 3, 6])
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_batched_forward_gives_each_member_the_logits_of_its_explicitly_perturbed_weights(
        which, rank, request):
    model, tokenizer = request.getfixturevalue(which)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    members = len(SEEDS)
    with torch.no_grad():
        base = model(**batch).logits
        with BatchedLowRank(model, rank).perturbed(SEEDS, SIGMA, SIGNS):
            logits = model(input_ids=batch["input_ids"].repeat(members, 1),
                           attention_mask=batch["attention_mask"].repeat(members, 1)).logits
        for i, (seed, sign) in enumerate(zip(SEEDS, SIGNS)):
            expected = explicitly_perturbed(model, seed, sign, SIGMA, rank)(**batch).logits
            got = logits[i * len(PROMPTS):(i + 1) * len(PROMPTS)]
            assert (expected - base).abs().max() > 0.1, "the perturbation should move the logits"
            torch.testing.assert_close(got, expected, rtol=1e-5,
                                       atol=1e-5 * float(expected.abs().max()))
        # The hooks are gone and the weights untouched: a plain forward is the base model again.
        assert torch.equal(model(**batch).logits, base)


LORA_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_lora_targets_perturb_only_the_projection_weights_with_the_same_factors(which, request):
    """--lowrank_targets lora: the projections' 2-D weights carry noise, with the index k (so the
    factors) they have among all parameters; embeddings, norms, biases and the lm_head do not."""
    model, tokenizer = request.getfixturevalue(which)
    names = [n for n, _ in model.named_parameters()]
    only = target_indices(names, "lora")
    assert {names[k] for k in only} == {n for n in names if n.endswith(".weight")
                                        and n.split(".")[-2] in LORA_NAMES}
    assert 0 < len(only) < len(names) and target_indices(names, "all") == set(range(len(names)))
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        with BatchedLowRank(model, 2, "lora").perturbed(SEEDS, SIGMA, SIGNS):
            logits = model(input_ids=batch["input_ids"].repeat(len(SEEDS), 1),
                           attention_mask=batch["attention_mask"].repeat(len(SEEDS), 1)).logits
        for i, (seed, sign) in enumerate(zip(SEEDS, SIGNS)):
            expected = explicitly_perturbed(model, seed, sign, SIGMA, 2, only)(**batch).logits
            everywhere = explicitly_perturbed(model, seed, sign, SIGMA, 2)(**batch).logits
            got = logits[i * len(PROMPTS):(i + 1) * len(PROMPTS)]
            torch.testing.assert_close(got, expected, rtol=1e-5,
                                       atol=1e-5 * float(expected.abs().max()))
            assert (everywhere - expected).abs().max() > 1e-3  # "all" is another perturbation


def test_the_lora_targets_update_leaves_the_other_parameters_alone(tiny_llama):
    model, _ = tiny_llama
    names = [n for n, _ in model.named_parameters()]
    tensors = [p.detach().clone() for p in model.parameters()]
    before = [t.clone() for t in tensors]
    only = target_indices(names, "lora")
    z = shape_fitness([1.0, 0.0, 2.0])
    lowrank_update(tensors, [1, 2, 3], z, 0.1, 2, only=only)
    everything = [t.clone() for t in before]
    lowrank_update(everything, [1, 2, 3], z, 0.1, 2)
    for k, (t, b, e) in enumerate(zip(tensors, before, everything)):
        assert torch.equal(t, e if k in only else b), names[k]


def test_batched_greedy_text_equals_each_explicitly_perturbed_models_text(tiny_llama):
    model, tokenizer = tiny_llama
    generate = Generator(tokenizer, PROMPTS, max_new_tokens=12)
    batched = BatchedLowRank(model, 2)
    with batched.perturbed(SEEDS, SIGMA, SIGNS):
        together = generate.repeated(model, len(SEEDS))
    for i, (seed, sign) in enumerate(zip(SEEDS, SIGNS)):
        assert together[i] == generate(explicitly_perturbed(model, seed, sign, SIGMA, 2))
        with batched.perturbed([seed], SIGMA, [sign]):  # alone in its call: same text
            assert generate.repeated(model, 1)[0] == together[i]
    assert len({tuple(t) for t in together}) > 1, "members should answer differently"


def with_end_token_mid_way(model, tokenizer, generate, seeds, signs):
    """A copy of the model whose end token is one its members produce part-way through some rows but
    not all, so that rows finish at different steps."""
    with BatchedLowRank(model, 2).perturbed(seeds, SIGMA, signs):
        batch = {k: v.repeat(len(seeds), 1) for k, v in generate.batches[0].items()}
        new = model.generate(**batch, max_new_tokens=generate.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=-1)[:, batch["input_ids"].shape[1]:]
    first_steps = {}
    for token in new.unique().tolist():
        rows_with = [(row == token).nonzero()[0].item() for row in new if (row == token).any()]
        if 1 < len(rows_with) < len(new) and len(set(rows_with)) > 1 and min(rows_with) > 0:
            first_steps[token] = rows_with
    assert first_steps, "the tiny model should repeat some token part-way through several rows"
    ended = copy.deepcopy(model)
    ended.generation_config.eos_token_id = max(first_steps, key=lambda t: len(first_steps[t]))
    return ended


def test_pruned_generation_drops_finished_rows_and_gives_the_same_texts(tiny_llama):
    model, tokenizer = tiny_llama
    generate = Generator(tokenizer, PROMPTS, max_new_tokens=16)
    model = with_end_token_mid_way(model, tokenizer, generate, SEEDS, SIGNS)
    batched, calls = BatchedLowRank(model, 2), []
    with batched.perturbed(SEEDS, SIGMA, SIGNS):
        kept = generate.repeated(model, len(SEEDS))  # generate: finished rows stay in the batch
    with batched.perturbed(SEEDS, SIGMA, SIGNS) as rows:
        def on_rows(keep):
            calls.append(None if keep is None else len(keep))
            rows.select_rows(keep)
        pruned = generate.repeated(model, len(SEEDS), on_rows=on_rows)
    assert calls[0] is None and len(calls) > 1 and all(n < len(SEEDS) * len(PROMPTS) for n in calls[1:]), calls
    assert pruned == kept
    for i, (seed, sign) in enumerate(zip(SEEDS, SIGNS)):
        assert pruned[i] == generate(explicitly_perturbed(model, seed, sign, SIGMA, 2))


def test_a_pruned_row_map_refuses_a_batch_of_another_size(tiny_llama):
    model, tokenizer = tiny_llama
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    rows = {k: v.repeat(2, 1) for k, v in batch.items()}
    with torch.no_grad(), BatchedLowRank(model, 1).perturbed([1, 2], SIGMA) as row_map:
        model(**rows)
        row_map.select_rows(torch.tensor([0, 3]))
        assert row_map.member_of_row.tolist() == [0, 1]
        with pytest.raises(ValueError, match="select_rows"):
            model(**rows)
        row_map.select_rows(None)
        model(**rows)


def test_sigma_scales_the_perturbation_and_the_minus_member_mirrors_the_plus_member(tiny_llama):
    model, tokenizer = tiny_llama
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    rows = {k: v.repeat(3, 1) for k, v in batch.items()}
    with torch.no_grad():
        base = model(**batch).logits
        with BatchedLowRank(model, 1).perturbed([9, 9, 9], 1e-4, [1.0, -1.0, 1.0]):
            plus, minus, again = model(**rows).logits.split(len(PROMPTS))
    # To first order in sigma the two members move the logits by opposite amounts (at the real
    # tokens: a padding token's embedding is zero, so its normalised hidden state is all noise).
    real = batch["attention_mask"].bool()
    torch.testing.assert_close((plus - base)[real], -(minus - base)[real], rtol=0.05, atol=1e-3)
    assert torch.equal(plus, again)


def test_unsupported_modules_are_refused_naming_the_module():
    class WithLayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.ln_f = nn.LayerNorm(4)

    with pytest.raises(NotImplementedError, match=r"ln_f \(LayerNorm\)"):
        BatchedLowRank(WithLayerNorm(), 1)

    class WithTorchRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(4)

    with pytest.raises(NotImplementedError, match=r"norm \(RMSNorm\).*--noise_mode iid"):
        BatchedLowRank(WithTorchRMSNorm(), 1)


def independent_update(tensors, seeds, rewards, alpha, rank, signs):
    """alpha * mean_i z_i sign_i * (A_i B_i^T / sqrt(R) or eps_i), member by member, in float64."""
    z = np.asarray(shape_fitness(rewards).tolist(), dtype=np.float64)
    out = []
    for k, t in enumerate(tensors):
        total = np.zeros(t.shape)
        for seed, zi, sign in zip(seeds, z, signs):
            drawn = reference_factors(tuple(t.shape), seed, k, rank)
            if t.ndim == 2:
                a, b = drawn[0].double().numpy(), drawn[1].double().numpy()
                total += zi * sign * (a @ b.T) / math.sqrt(rank)
            else:
                total += zi * sign * drawn.double().numpy()
        out.append(t.double().numpy() + alpha * total / len(seeds))
    return out


@pytest.mark.parametrize("antithetic", [False, True])
def test_update_equals_an_independent_recomputation(antithetic):
    torch.manual_seed(0)
    tensors = [torch.randn(40, 24), torch.randn(24), torch.randn(24, 40)]
    seeds = [3, 3, 8, 8] if antithetic else [3, 4, 8, 2**29]
    signs = [1, -1, 1, -1] if antithetic else [1, 1, 1, 1]
    rewards, alpha, rank = [0.5, -1.0, 2.0, 0.0], 0.01, 4
    expected = independent_update(tensors, seeds, rewards, alpha, rank, signs)
    terms, weights = update_terms(seeds, shape_fitness(rewards), antithetic)
    lowrank_update(tensors, terms, weights, alpha, rank, n=len(seeds))
    for t, e in zip(tensors, expected):
        np.testing.assert_allclose(t.numpy(), e, rtol=0, atol=1e-6)


def test_update_of_a_low_precision_tensor_is_computed_in_fp32_then_cast():
    torch.manual_seed(0)
    master = torch.randn(16, 8)
    low = master.to(torch.bfloat16)
    z = shape_fitness([1.0, 0.0, 2.0])
    lowrank_update([master], [1, 2, 3], z, 0.1, 2)
    expected = low.float()
    lowrank_update([expected], [1, 2, 3], z, 0.1, 2)
    lowrank_update([low], [1, 2, 3], z, 0.1, 2)
    assert torch.equal(low, expected.to(torch.bfloat16))


TINY = ["--num_iterations", "2", "--population_size", "4", "--sigma", "0.05", "--alpha", "0.02",
        "--max_new_tokens", "8", "--noise_mode", "lowrank", "--rank", "2"]


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_lowrank_run_trains_and_its_logged_seeds_and_rewards_recompute_the_weights(
        tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # lowrank_batch 4 = two members per call: the population takes two batched calls.
    run_main([PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(tiny_model_dir),
                "--precision", "fp32", "--lowrank_batch", "4", "--output_dir", str(out), *TINY])
    records = read_metrics(out)
    assert [r["iteration"] for r in records] == [1, 2]
    assert len(set(r for x in records for r in x["rewards"])) > 1, "rewards should differ"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["config"]["noise_mode"] == "lowrank" and state["config"]["rank"] == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()]
    tensors = [p.detach().clone() for p in model.parameters()]
    for record in records:
        expected = independent_update(tensors, record["seeds"], record["rewards"], 0.02, 2, [1] * 4)
        tensors = [torch.from_numpy(e).float() for e in expected]
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in zip(names, tensors):
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_bf16_lowrank_run_keeps_fp32_masters_and_saves_them(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_main([PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(tiny_model_dir),
                "--precision", "bf16", "--antithetic", "--no_prune_finished", "--output_dir", str(out), *TINY])
    assert json.loads((out / "trainer_state.json").read_text())["config"]["prune_finished"] is False
    records = read_metrics(out)
    assert all(r["signs"] == [1, -1, 1, -1] for r in records)
    assert all(r["seeds"][0] == r["seeds"][1] and r["seeds"][2] == r["seeds"][3] for r in records)
    masters = load_file(str(out / "master_weights.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    for name, master in masters.items():
        assert master.dtype == torch.float32
        assert torch.equal(saved[name], master.to(torch.bfloat16))
