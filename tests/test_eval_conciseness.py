"""Conciseness evaluation: sampling, the k3 KL estimator and eval_conciseness.py end to end."""
import copy
import json

import pytest
import torch
from hypothesis import given, strategies as st

from es_llm.evaluation import (Sample, generate, k3_kl, load_for_eval, per_sample_kl,
                               response_log_probs)
from es_llm.models import load_model, save_model
from es_llm.noise import add_noise
from conftest import PYTHON, run_main

PROMPTS = ["Solve: 7 + 2 =", "Is the Sun a star?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), "fp32")


def sampled(model, tokenizer, num_samples=3, max_new_tokens=6):
    torch.manual_seed(0)
    return generate(model, tokenizer, PROMPTS, max_new_tokens, batch_size=2,
                    num_samples=num_samples, do_sample=True, progress=False)


def perturbed_copy(model, sigma=0.05):
    other = copy.deepcopy(model)
    add_noise(list(other.parameters()), 7, sigma, "iid")
    return other


@given(st.lists(st.floats(-30, 0), min_size=1, max_size=20),
       st.lists(st.floats(-30, 0), min_size=1, max_size=20))
def test_k3_is_nonnegative_and_zero_only_where_the_models_agree(a, b):
    n = min(len(a), len(b))
    ft, base = torch.tensor(a[:n]), torch.tensor(b[:n])
    kl = k3_kl(ft, base)
    assert (kl >= 0).all()
    assert (k3_kl(ft, ft) == 0).all()


def test_sampling_gives_num_samples_responses_per_prompt_in_prompt_order(tiny):
    model, tokenizer = tiny
    samples = sampled(model, tokenizer, num_samples=3)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert all(s.prompt == PROMPTS[s.prompt_index] for s in samples)
    assert all(1 <= len(s.response_ids) <= 6 for s in samples)
    assert samples[0].prompt_ids == tokenizer(PROMPTS[0])["input_ids"]


def test_greedy_decoding_refuses_several_samples(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="need sampling"):
        generate(model, tokenizer, PROMPTS, 4, num_samples=2, progress=False)


def test_response_log_probs_do_not_depend_on_padding_or_batching(tiny):
    model, tokenizer = tiny
    samples = sampled(model, tokenizer, num_samples=2)
    batched = response_log_probs(model, samples, batch_size=len(samples))
    for sample, logp in zip(samples, batched):
        alone = response_log_probs(model, [sample], batch_size=1)[0]
        torch.testing.assert_close(logp, alone, atol=1e-4, rtol=1e-4)


def test_response_log_probs_match_a_plain_forward_pass(tiny):
    model, _ = tiny
    sample = Sample(0, "", "", [1, 5, 9, 13], [21, 34, 55])
    logp = response_log_probs(model, [sample])[0]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13, 21, 34]])).logits[0, 3:].log_softmax(-1)
    torch.testing.assert_close(logp, logits[torch.arange(3), torch.tensor([21, 34, 55])])


def test_kl_of_a_model_against_itself_is_zero(tiny):
    model, tokenizer = tiny
    samples = sampled(model, tokenizer)
    assert per_sample_kl(model, model, samples) == [0.0] * len(samples)


def test_kl_against_a_perturbed_copy_is_positive(tiny):
    model, tokenizer = tiny
    other = perturbed_copy(model)
    samples = sampled(other, tokenizer)
    kls = per_sample_kl(other, model, samples)
    assert all(kl > 0 for kl in kls)
    assert per_sample_kl(other, perturbed_copy(model, sigma=0.2), samples)[0] != kls[0]


def test_a_weights_file_is_applied_to_the_base_model(tmp_path, tiny_model_dir, tiny):
    model, _ = tiny
    other = perturbed_copy(model)
    torch.save(other.state_dict(), tmp_path / "weights.pth")
    loaded, _, precision = load_for_eval(str(tmp_path / "weights.pth"), str(tiny_model_dir), "fp32")
    assert precision == "fp32"
    for (name, a), b in zip(loaded.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_weights_file_with_foreign_names_is_refused_with_the_names(tmp_path, tiny_model_dir, tiny):
    model, _ = tiny
    torch.save({"engine." + k: v for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not match the base model's parameter names"):
        load_for_eval(str(tmp_path / "w.pth"), str(tiny_model_dir), "fp32")


@pytest.mark.slow
def test_eval_conciseness_end_to_end_reward_and_kl(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    tuned = tmp_path / "tuned"
    save_model(perturbed_copy(model), tokenizer, tuned)
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"prompt": p, "target": t} for p, t in zip(PROMPTS, ["9", "Yes"])]))
    common = ["--base_model_name", str(tiny_model_dir), "--eval_data_path", str(data),
              "--num_samples", "3", "--max_new_tokens", "6", "--save_responses", "--device", "cpu"]
    run_main([PYTHON, "eval_conciseness.py", "--model_path", str(tuned), "--label", "tuned",
                "--output_dir", str(tmp_path / "out"), *common])
    run_main([PYTHON, "eval_conciseness.py", "--output_dir", str(tmp_path / "base"), *common])

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / "responses.jsonl").open()]
    assert len(records) == summary["num_prompts"] * summary["num_samples"] == 6
    assert summary["label"] == "tuned" and summary["precision"] == "fp32"
    assert summary["reward_mean"] == pytest.approx(sum(r["reward"] for r in records) / 6)
    assert all(r["reward"] == -abs(len(r["response"]) - len(r["target"])) for r in records)
    assert summary["kl_mean"] == pytest.approx(sum(r["kl"] for r in records) / 6)
    assert summary["kl_mean"] > 0 and not summary["is_base_model"]
    base = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert base["is_base_model"] and base["kl_mean"] == 0.0
