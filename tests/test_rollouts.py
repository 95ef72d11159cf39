"""--num_rollouts K, --temperature, --top_p: a member's reward is the mean over K sampled completions
per prompt, each sampled row seeded by (iteration, member seed, prompt, rollout) only. The sampler
gives a row the same tokens alone or in any batch; greedy stays the default bit for bit; one
process and two give the same run (in test_tuning.py, with Adam and a prompt batch); a resumed run
equals the uninterrupted one; each bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_main
from es_llm.generation import Generator, RowSampler, row_seed
from test_tuning import command, fails, records, without_time

PROMPTS = ["Hello there", "A much longer prompt about the weather today", "Count: 1 2 3"]
SAMPLED = ["--num_rollouts", "2", "--temperature", "1.0"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def same_weights(a: Path, b: Path, name: str = "model.safetensors") -> bool:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_row_samples_the_same_tokens_alone_or_in_any_batch(tiny):
    model, tokenizer = tiny
    sampling = (2, 1.0, 0.9)
    together = Generator(tokenizer, PROMPTS, 5, sampling=sampling).rollouts(model, 3, 1234)
    one_by_one = Generator(tokenizer, PROMPTS, 5, batch_size=1, sampling=sampling)
    assert one_by_one.rollouts(model, 3, 1234) == together
    alone = Generator(tokenizer, PROMPTS[1:2], 5, sampling=sampling, prompt_ids=[1])
    assert alone.rollouts(model, 3, 1234) == [[rollout[1]] for rollout in together]
    # the seed tuple changes the samples: another rollout, iteration or member draws anew
    assert together[0] != together[1]
    assert alone.rollouts(model, 4, 1234) != alone.rollouts(model, 3, 1235) != [
        [rollout[1]] for rollout in together]


def test_greedy_is_the_default_and_a_cold_sampler_is_greedy(tiny):
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None,
                         top_k=None)
    greedy = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert Generator(tokenizer, PROMPTS, 8).rollouts(model, 1, 5) == [greedy]
    cold = Generator(tokenizer, PROMPTS, 8, sampling=(1, 1e-6, 1.0)).rollouts(model, 1, 5)
    assert cold == [greedy]


def test_the_sampler_draws_one_number_per_row_and_keeps_only_the_drawn_token():
    scores = torch.tensor([[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]])
    sampler = RowSampler([row_seed(1, 2, 0, 0), row_seed(1, 2, 1, 0)], 1.0, 0.5)
    out = sampler(None, scores)
    # top_p 0.5 keeps only the likeliest token of each row here
    assert out.argmax(-1).tolist() == [2, 0] and torch.isinf(out).sum() == 4
    assert row_seed(1, 2, 0, 0) != row_seed(1, 2, 0, 1) != row_seed(2, 2, 0, 1)


@pytest.mark.slow  # seconds: the full suite runs it, the fast set does not
def test_k1_without_temperature_is_todays_greedy_run_bit_for_bit(tiny_model_dir, tmp_path):
    today, explicit = tmp_path / "today", tmp_path / "explicit"
    run_main(command(tiny_model_dir, today, "--precision", "fp32"))
    run_main(command(tiny_model_dir, explicit, "--precision", "fp32", "--num_rollouts", "1",
                     "--top_p", "1.0"))
    assert without_time(records(today)) == without_time(records(explicit))
    assert same_weights(today, explicit)


@pytest.mark.slow
def test_sampled_rollouts_count_their_generations_and_record_k_in_the_config(tiny_model_dir,
                                                                           tmp_path):
    greedy, sampled = tmp_path / "greedy", tmp_path / "sampled"
    run_main(command(tiny_model_dir, greedy, "--precision", "fp32", iterations=1))
    run_main(command(tiny_model_dir, sampled, "--precision", "fp32", *SAMPLED, iterations=1))
    row, greedy_row = records(sampled)[0], records(greedy)[0]
    assert row["generations"] == 2 * greedy_row["generations"] and len(row["rewards"]) == 2
    assert "num_rollouts" not in row and row["rewards"] != greedy_row["rewards"]
    state = json.loads((sampled / "trainer_state.json").read_text())
    config = state.get("config", state)
    assert config["num_rollouts"] == 2 and config["temperature"] == 1.0


@pytest.mark.slow
def test_a_resumed_sampled_run_equals_the_uninterrupted_one(tiny_model_dir, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    settings = ["--precision", "fp32", *SAMPLED, "--prompt_batch", "1"]
    run_main(command(tiny_model_dir, whole, "--save_every", "1", *settings))
    run_main(command(tiny_model_dir, resumed, *settings, "--resume", whole / "checkpoint-1"))
    assert without_time(records(whole)) == without_time(records(resumed))
    assert same_weights(whole, resumed)


@pytest.mark.slow
def test_a_batched_population_samples_each_member_as_it_samples_alone(tiny):
    """Lowrank mode (and --lora_batch, the same rows): member j's K rollouts are K blocks of rows of
    its perturbation, each row seeded by (iteration, seed, prompt, rollout) only, so the members
    come out the same whether all share one generate call or each has its own."""
    from es_llm.lowrank import BatchedLowRank, evaluate_batched
    from es_llm.tasks import Task

    model, tokenizer = tiny
    task = Task("lengths", PROMPTS, lambda prompts, completions, **_: [len(c) for c in completions])
    generate = Generator(tokenizer, PROMPTS, 5, sampling=(2, 1.0, 1.0), prompt_ids=[4, 0, 9])
    batched = BatchedLowRank(model, 1)
    seeds, signs = [11, 12, 13], [1.0, -1.0, 1.0]
    together, _ = evaluate_batched(batched, generate, task, seeds, signs, 0.05, 1000, iteration=3)
    alone, _ = evaluate_batched(batched, generate, task, seeds, signs, 0.05, 2 * len(PROMPTS),
                                iteration=3)
    assert together == alone and [j for j, *_ in together] == [0, 1, 2]
    later, _ = evaluate_batched(batched, generate, task, seeds, signs, 0.05, 1000, iteration=4)
    assert later != together  # the iteration seeds the rows
    greedy = Generator(tokenizer, PROMPTS, 5)
    plain, _ = evaluate_batched(batched, greedy, task, seeds, signs, 0.05, 1000)
    assert [c for *_, c in plain] != [c for *_, c in together]


@pytest.mark.slow  # seconds: the full suite runs it, the fast set does not
@pytest.mark.parametrize("mode", [["--noise_mode", "lowrank"], ["--es_params", "lora",
                                                                 "--lora_batch"]],
                         ids=["lowrank", "lora_batch"])
def test_a_sampled_batched_run_does_not_depend_on_its_batches_and_resumes_exactly(
        mode, tiny_model_dir, tmp_path):
    """--num_rollouts 2 at temperature 1 in a batched population: one member per generate call
    (--lowrank_batch = K x prompts) gives the run of the whole population in one call, and a run
    resumed from its checkpoint-1 equals it."""
    settings = ["--precision", "fp32", *SAMPLED, "--population_size", "4", *mode]
    whole, split, resumed = tmp_path / "whole", tmp_path / "split", tmp_path / "resumed"
    run_main(command(tiny_model_dir, whole, "--save_every", "1", *settings))
    run_main(command(tiny_model_dir, split, *settings, "--lowrank_batch", "4"))
    run_main(command(tiny_model_dir, resumed, *settings, "--resume", whole / "checkpoint-1"))
    assert without_time(records(whole)) == without_time(records(split)) == \
        without_time(records(resumed))
    assert records(whole)[0]["generations"] == 4 * 2 * 2  # members x rollouts x prompts
    assert len({r for row in records(whole) for r in row["rewards"]}) > 1
    output = "adapter_model.safetensors" if "lora" in mode else "model.safetensors"
    assert same_weights(whole, split, output)


@pytest.mark.parametrize("flags,message", [
    (["--num_rollouts", "0"], "num_rollouts must be >= 1"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--temperature", "1", "--top_p", "0"], "top_p must be in (0, 1]"),
    (["--temperature", "1", "--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--top_p", "0.9"], "--top_p only applies to sampling"),
    (["--num_rollouts", "2", "--temperature", "0"], "the same greedy completion 2 times"),
])
def test_bad_rollout_settings_are_refused_before_anything_is_written(flags, message, tmp_path,
                                                                     tiny_model_dir, capsys):
    error = fails(command(tiny_model_dir, tmp_path / "run", *flags), capsys)
    assert message in error and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def sampled_checkpoint(tiny_model_dir, tmp_path_factory):
    first = tmp_path_factory.mktemp("sampled") / "run"
    run_main(command(tiny_model_dir, first, "--precision", "fp32", "--save_every", "1", *SAMPLED,
                     iterations=1))
    return first / "checkpoint-1"


@pytest.mark.parametrize("flags,differs", [
    (["--num_rollouts", "3", "--temperature", "1.0"], "num_rollouts"),
    (["--num_rollouts", "2", "--temperature", "0.7"], "temperature"),
    ([*SAMPLED, "--top_p", "0.9"], "top_p")])
def test_a_resume_with_other_sampling_settings_is_refused(flags, differs, sampled_checkpoint,
                                                          tiny_model_dir, tmp_path, capsys):
    again = command(tiny_model_dir, tmp_path / "again", "--precision", "fp32", *flags,
                    "--resume", sampled_checkpoint)
    error = fails(again, capsys)
    assert "cannot resume" in error and f"{differs}: checkpoint has" in error
    assert error.count(": checkpoint has") == 1 and not (tmp_path / "again").exists()
