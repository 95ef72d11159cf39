"""--optimizer, --lr_schedule, --warmup_iterations and --prompt_batch (es_llm/tuning.py): sgd is the
published step bit for bit, Adam's step is torch.optim.Adam's on the logged ES gradient, a resumed
run equals the uninterrupted one, the prompt sampler's epochs, and each bad input."""
import json
import math
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import PYTHON, ROOT, load_module, run_main, run_script, two_processes
from es_llm.strategy import es_update, normalize_rewards
from es_llm.tuning import lr_factor, prompt_batch

SCRIPT = "es_fine-tuning_conciseness.py"
ALPHA = 0.02


def command(model_dir, out, *extra, iterations=2):
    return [PYTHON, SCRIPT, "--model_name", str(model_dir), "--gpu_threads", "1",
            "--output_dir", str(out), "--num_iterations", str(iterations), "--population_size",
            "2", "--sigma", "0.05", "--alpha", str(ALPHA), "--max_new_tokens", "4",
            "--report_to", "none", *extra]


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def initial_fp32(model_dir, precision):
    """The model's (name, fp32 tensor) pairs as a run in `precision` starts from them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return [(n, p.detach().to(dtype).float()) for n, p in model.named_parameters()]


def es_gradient(tensor, seeds, z):
    """(1/N) sum_i z_i eps_i for one tensor, drawn here as the published code draws it."""
    total = torch.zeros_like(tensor)
    for seed, weight in zip(seeds, z):
        generator = torch.Generator().manual_seed(int(seed))
        total.add_(torch.randn(tensor.shape, generator=generator).mul_(float(weight)))
    return total.div_(len(seeds))


@pytest.mark.slow
def test_sgd_is_the_published_step_bit_for_bit(tiny_model_dir, tmp_path):
    out = tmp_path / "sgd"
    run_main(command(tiny_model_dir, out, "--precision", "fp32", "--optimizer", "sgd"))
    tensors = initial_fp32(tiny_model_dir, "fp32")
    weights = [t for _, t in tensors]
    for record in records(out):
        assert "lr" not in record and "prompts" not in record  # today's records
        es_update(weights, record["seeds"], normalize_rewards(record["rewards"]), ALPHA,
                  "correlated")
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[name], w) for (name, _), w in zip(tensors, weights))
    assert not (out / "optimizer.pt").exists() and not (out / "master_weights.safetensors").exists()


def test_adams_first_step_on_fp32_masters_is_torch_optim_adams(tiny_model_dir, tmp_path):
    out = tmp_path / "adam"
    run_main(command(tiny_model_dir, out, "--precision", "bf16", "--optimizer", "adam",
                     iterations=1))
    (record,) = records(out)
    z = normalize_rewards(record["rewards"])
    masters = load_file(str(out / "master_weights.safetensors"))  # implied by --optimizer adam
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in initial_fp32(tiny_model_dir, "bf16"):
        expected = tensor.clone()
        adam = torch.optim.Adam([expected], lr=ALPHA)
        expected.grad = -es_gradient(tensor, record["seeds"], z)  # ascent: minus the estimate
        adam.step()
        assert torch.equal(masters[name], expected), name
        assert torch.equal(saved[name], expected.to(torch.bfloat16)), name
    state = torch.load(out / "optimizer.pt", weights_only=True)
    assert len(state["state"]) == len(masters) and float(state["state"][0]["step"]) == 1.0


def same_saved_state(a: Path, b: Path) -> bool:
    """Two run directories hold the same weights (or adapter), fp32 masters and optimizer state,
    bit for bit."""
    for name in ("model.safetensors", "adapter_model.safetensors", "master_weights.safetensors"):
        if (a / name).exists() or (b / name).exists():
            x, y = load_file(str(a / name)), load_file(str(b / name))
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
    x, y = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    return x["param_groups"] == y["param_groups"] and x["state"].keys() == y["state"].keys() and all(
        torch.equal(v, y["state"][k][key]) for k, state in x["state"].items()
        for key, v in state.items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    ("--optimizer", "adam", "--lr_schedule", "cosine", "--prompt_batch", "1"),
    ("--optimizer", "momentum", "--noise_mode", "lowrank", "--rank", "2", "--lr_schedule", "linear"),
    ("--optimizer", "adamw", "--es_params", "lora", "--prompt_batch", "1"),
], ids=["adam-cosine-batch", "momentum-lowrank", "adamw-lora"])
def test_a_resumed_run_equals_the_uninterrupted_one(tiny_model_dir, tmp_path, mode):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_main(command(tiny_model_dir, whole, "--precision", "fp32", "--save_every", "1", *mode))
    run_main(command(tiny_model_dir, resumed, "--precision", "fp32", *mode,
                     "--resume", whole / "checkpoint-1"))
    assert without_time(records(whole)) == without_time(records(resumed))
    assert same_saved_state(whole, resumed)
    rows = records(whole)
    if "--lr_schedule" in mode:  # cosine and linear over 2 iterations: alpha, then alpha / 2
        assert [r["lr"] for r in rows] == [ALPHA, ALPHA / 2]
    if "--prompt_batch" in mode:
        assert [r["prompts"] for r in rows] == [prompt_batch(33, i, 1, 2) for i in (1, 2)]


def test_the_prompt_sampler_covers_each_epoch_without_replacement_then_reshuffles():
    batches = [prompt_batch(7, i, 3, 10) for i in range(1, 13)]  # 3 batches of 3 per epoch
    assert batches == [prompt_batch(7, i, 3, 10) for i in range(1, 13)]  # a pure function
    epochs = [sum(batches[e * 3:(e + 1) * 3], []) for e in range(4)]
    assert all(len(set(epoch)) == 9 for epoch in epochs)  # no prompt twice within an epoch
    assert len({tuple(epoch) for epoch in epochs}) == 4  # each epoch its own order
    assert set().union(*map(set, epochs)) == set(range(10))  # the remainder comes up later
    assert prompt_batch(8, 1, 3, 10) != batches[0]  # the seed chooses the order
    whole = [prompt_batch(7, i, 10, 10) for i in (1, 2)]  # N = P: every prompt, reshuffled
    assert sorted(whole[0]) == sorted(whole[1]) == list(range(10)) and whole[0] != whole[1]


def test_the_schedules_warm_up_then_decay():
    assert [lr_factor(i, 4) for i in (1, 4)] == [1.0, 1.0]
    assert [lr_factor(i, 6, "constant", 2) for i in (1, 2, 3, 6)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(i, 5, "linear") for i in range(1, 6)] == pytest.approx([1, .8, .6, .4, .2])
    cosine = [lr_factor(i, 5, "cosine", 1) for i in range(1, 6)]
    assert cosine[:2] == [1.0, 1.0] and cosine[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a > b > 0 for a, b in zip(cosine[1:], cosine[2:]))


def fails(args, capsys) -> str:
    """The front's error for a command line that must exit with one."""
    script = load_module(ROOT / SCRIPT, "front_tuning")
    with mock.patch.object(sys, "argv", [SCRIPT, *map(str, args[2:])]):
        with pytest.raises(SystemExit) as leaving:
            script.main()
    assert leaving.value.code not in (0, None)
    return str(leaving.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--optimizer", "rmsprop"), ("--lr_schedule", "step")])
def test_an_unknown_optimizer_or_schedule_is_refused_by_its_choices(flag, value, tmp_path,
                                                                    tiny_model_dir, capsys):
    error = fails(command(tiny_model_dir, tmp_path / "run", flag, value), capsys)
    assert f"argument {flag}: invalid choice: '{value}'" in error
    assert not (tmp_path / "run").exists()


def test_a_prompt_batch_larger_than_the_data_is_refused_before_anything_is_written(
        tiny_model_dir, tmp_path, capsys):
    error = fails(command(tiny_model_dir, tmp_path / "run", "--prompt_batch", "3"), capsys)
    assert "--prompt_batch 3 asks for more prompts" in error and "give at most 2" in error
    assert not (tmp_path / "run").exists()


TUNED = ["--optimizer", "adam", "--lr_schedule", "cosine", "--prompt_batch", "1"]


@pytest.fixture(scope="module")
def tuned_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-iteration run with Adam, a cosine schedule and a prompt batch, checkpointed
    after each iteration."""
    out = tmp_path_factory.mktemp("tuned") / "run"
    run_main(command(tiny_model_dir, out, "--precision", "fp32", "--save_every", "1", *TUNED))
    return out


@pytest.mark.parametrize("flag,value", [("--optimizer", "momentum"), ("--lr_schedule", "linear"),
                                        ("--prompt_batch", "2"),
                                        ("--num_iterations", "4")])  # a cosine spans the run
def test_a_resume_with_other_tuning_settings_is_refused_before_anything_is_written(
        flag, value, tuned_run, tiny_model_dir, tmp_path, capsys):
    flags = {**dict(zip(TUNED[::2], TUNED[1::2])), flag: value}
    iterations = int(flags.pop("--num_iterations", 2))
    again = command(tiny_model_dir, tmp_path / "again", "--precision", "fp32",
                    *sum(map(list, flags.items()), []), "--resume", tuned_run / "checkpoint-1",
                    iterations=iterations)
    error = fails(again, capsys)
    assert "cannot resume" in error and f"{flag[2:]}: checkpoint has" in error
    assert error.count(": checkpoint has") == 1 and not (tmp_path / "again").exists()


def test_settings_of_another_optimizer_are_refused(tiny_model_dir, tmp_path, capsys):
    error = fails(command(tiny_model_dir, tmp_path / "run", "--momentum", "0.5"), capsys)
    assert "--momentum only applies to --optimizer momentum" in error
    error = fails(command(tiny_model_dir, tmp_path / "run", "--optimizer", "adam",
                          "--weight_decay", "0.1", "--warmup_iterations", "-1"), capsys)
    assert "--weight_decay only applies to --optimizer adamw" in error
    assert "warmup_iterations must be >= 0" in error and not (tmp_path / "run").exists()


def test_a_damaged_optimizer_state_is_named_before_anything_is_written(
        tuned_run, tiny_model_dir, tmp_path, capsys):
    import shutil

    checkpoint = tmp_path / "copy" / "checkpoint-1"
    shutil.copytree(tuned_run / "checkpoint-1", checkpoint)
    state = checkpoint / "optimizer.pt"
    state.write_bytes(state.read_bytes()[:100])
    error = fails(command(tiny_model_dir, tmp_path / "again", "--precision", "fp32", *TUNED,
                          "--resume", checkpoint), capsys)
    assert f"cannot read {state}" in error and "damaged or incomplete" in error
    assert not (tmp_path / "again").exists()


def test_the_weightset_steps_its_own_masters_even_after_loading_weights():
    """The optimizer keeps stepping the master tensors that a load_state_dict refreshed in place,
    and the weights are cast from them; sgd at a scheduled lr is the published update at that
    alpha."""
    from es_llm.weightset import WeightSet

    weight = torch.zeros(3, 2, dtype=torch.bfloat16)
    adam = WeightSet(lambda: [("w", weight)], "correlated", optimizer="adam",
                     update_order="accumulate")  # the plain trainers' order
    adam.load_state_dict({"w": torch.ones(3, 2)})
    adam.update([5, 7], [1.0, -1.0], 0.1)
    expected = torch.ones(3, 2)
    reference = torch.optim.Adam([expected], lr=0.1)
    expected.grad = -es_gradient(expected, [5, 7], [1.0, -1.0])
    reference.step()
    assert torch.equal(adam.masters.tensors[0], expected)
    assert torch.equal(weight, expected.to(torch.bfloat16))
    plain = torch.ones(3, 2)
    WeightSet(lambda: [("w", plain)], "correlated", update_order="accumulate").update(
        [5, 7], [1.0, -1.0], 0.05)
    published = [torch.ones(3, 2)]
    es_update(published, [5, 7], [1.0, -1.0], 0.05, "correlated")
    assert torch.equal(plain, published[0])


@pytest.mark.slow
def test_two_processes_give_the_one_process_run_with_adam_a_prompt_batch_and_samples(
        tiny_model_dir, tmp_path):
    """Every process draws the same prompts, samples each row from its seeds alone (not from the
    process evaluating it) and takes the same optimizer step (fp32; Adam implies fp32 masters:
    exact restores, so the number of copies leaves no rounding of its own; without them 1 and 2
    copies differ by a rounding, and a sampled token flipped on it on an AMD EPYC)."""
    one, two = tmp_path / "one", tmp_path / "two"
    settings = ["--precision", "fp32", *TUNED, "--num_rollouts", "2", "--temperature", "1.0",
                "--population_size", "4"]
    run_main(command(tiny_model_dir, one, *settings))
    run_script([*two_processes(), *command(tiny_model_dir, two, *settings)[1:]])
    assert without_time(records(one)) == without_time(records(two))
    assert same_saved_state(one, two)


@pytest.mark.slow  # several seconds: the full suite runs it, the fast set does not
def test_eval_every_records_the_held_out_reward_and_kl_of_the_saved_model(tiny_model_dir, tmp_path):
    """--eval_every 1: each iteration's heldout_reward_mean is the greedy mean reward, on the first
    --eval_samples held-out prompts of eval_conciseness.py, of the model saved at that iteration;
    with --eval_kl_samples K its heldout_kl_mean is the kl_mean eval_conciseness.py reports for
    that checkpoint with --num_samples K; and the KL's sampling leaves the training as it was."""
    from es_llm.generation import Generator
    from es_llm.models import load_model
    from es_llm.tasks import conciseness_heldout

    out = tmp_path / "run"
    run_main(command(tiny_model_dir, out, "--precision", "fp32", "--save_every", "1",
                     "--eval_every", "1", "--eval_samples", "3", "--eval_kl_samples", "2"))
    heldout = conciseness_heldout().subset(range(3))
    items = json.loads((ROOT / "data" / "conciseness_eval.json").read_text())[:3]
    assert [item["prompt"] for item in items] == list(heldout.prompts)
    (tmp_path / "eval.json").write_text(json.dumps(items))
    for record in records(out):
        checkpoint = out / f"checkpoint-{record['iteration']}"
        model, tokenizer = load_model(str(checkpoint), "fp32")
        completions = Generator(tokenizer, heldout.prompts, 4)(model)
        expected = sum(heldout.score(completions)) / 3
        assert record["heldout_reward_mean"] == expected
        assert record["time_heldout_s"] > 0 and record["time_s"] > 0
        run_main([PYTHON, "eval_conciseness.py", "--model_path", str(checkpoint),
                  "--base_model_name", str(tiny_model_dir), "--eval_data_path",
                  str(tmp_path / "eval.json"), "--num_samples", "2", "--max_new_tokens", "4",
                  "--output_dir", str(tmp_path / "eval")])
        summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
        assert record["heldout_kl_mean"] == summary["kl_mean"] > 0
    plain = tmp_path / "plain"
    run_main(command(tiny_model_dir, plain, "--precision", "fp32"))
    assert [r["rewards"] for r in records(plain)] == [r["rewards"] for r in records(out)]


def test_eval_every_is_refused_where_it_cannot_run(tiny_model_dir, tmp_path, capsys):
    error = fails(command(tiny_model_dir, tmp_path / "run", "--eval_samples", "2"), capsys)
    assert "--eval_samples only applies with --eval_every N" in error
    error = fails(command(tiny_model_dir, tmp_path / "run", "--eval_kl_samples", "2"), capsys)
    assert "--eval_kl_samples only applies with --eval_every N" in error
    error = fails(command(tiny_model_dir, tmp_path / "run", "--eval_every", "1",
                          "--eval_samples", "13"), capsys)
    assert "--eval_samples 13 is more than the task's 12 held-out prompts" in error
    task = ROOT / "examples" / "word_count_task.py"
    error = fails(command(tiny_model_dir, tmp_path / "run", "--eval_every", "1", "--task", task),
                  capsys)
    assert "has no held-out prompts" in error and not (tmp_path / "run").exists()


def test_the_held_out_reward_goes_to_the_trackers():
    from es_llm import tracking

    class Accelerator:
        log_with = ["tensorboard"]

        def log(self, values, step):
            self.logged = values, step

    accelerator = Accelerator()
    tracking.log(accelerator, {"iteration": 3, "reward_mean": -2.0, "heldout_reward_mean": -1.5,
                               "time_heldout_s": 0.25})
    assert accelerator.logged == ({"reward/mean": -2.0, "heldout/reward_mean": -1.5,
                                   "time/heldout": 0.25}, 2)
