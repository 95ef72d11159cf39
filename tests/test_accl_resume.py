"""Nothing lost, accelerated version: checkpoints, resume, interrupts and finished runs.

The slow tests train the tests' tiny model (fp32) on 2 transformers engines under Ray, through
tests/accl_varied_reward.py: the real script on a reward the tiny model can earn, so that every
iteration moves the weights (on Countdown's reward it scores 0, and the update would be zero).
The 4-iteration run uses the plain trainers' tuning options (Adam, a cosine schedule, a prompt
batch, 2 sampled rollouts, the held-out reward every iteration); it is resumed on one engine.
"""
import json
import os
import shlex
import signal
from dataclasses import asdict
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PYTHON, ROOT, load_module, run_main
from es_llm import checkpoint as ckpt
from es_llm import rundir
from es_llm.weightset import WeightSet
from test_tuning import same_saved_state

VARIED = str(ROOT / "tests" / "accl_varied_reward.py")
SCRIPT = ROOT / "es_fine-tuning_countdown_accl.py"
# 2 engines, rewards that differ, fp32 masters (exact restore: the run is reproducible bit for bit
# whichever engine evaluates which member).
SETTINGS = ["--engine", "transformers", "--num_engines", "2", "--population_size", "4",
            "--max_new_tokens", "32", "--data_sample", "16", "--precision", "fp32",
            "--noise_mode", "iid", "--sigma", "0.05", "--alpha", "0.02"]
MASTERS = ["--master_weights", "fp32"]
# The plain trainers' tuning options: Adam on a cosine schedule, 2 of the 16 prompts per
# iteration, 2 sampled rollouts per prompt (temperature 1), the held-out reward on 2 test items
# every iteration.
TUNED = ["--optimizer", "adam", "--lr_schedule", "cosine", "--prompt_batch", "2",
         "--num_rollouts", "2", "--eval_every", "1", "--eval_samples", "2"]


def load_script():
    return load_module(SCRIPT, "es_accl")


def command(model_dir, experiment, iterations, *extra, run_name=None):
    args = [PYTHON, VARIED, "--model_name", str(model_dir), "--experiment_dir", str(experiment),
            "--num_iterations", str(iterations), *SETTINGS, *extra]
    return args + (["--run_name", run_name] if run_name else [])


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
            for line in (run / ckpt.METRICS_FILE).read_text().splitlines()]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(run, reference, masters=True):
    """Same metrics (timings aside), same final weights (.pth and HF directory) and masters."""
    assert metrics(run) == metrics(reference)
    assert same_tensors(torch.load(run / "final_model.pth"),
                        torch.load(reference / "final_model.pth"))
    assert same_tensors(load_file(str(run / "final_model" / "model.safetensors")),
                        load_file(str(reference / "final_model" / "model.safetensors")))
    if masters:
        assert same_tensors(load_file(str(run / ckpt.MASTER_FILE)),
                            load_file(str(reference / ckpt.MASTER_FILE)))
    state = ckpt.load_state(run)
    assert state["finished"] and state["iteration"] == metrics(reference)[-1]["iteration"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return tmp_path_factory.mktemp("accl-runs")


@pytest.fixture(scope="module")
def four(tiny_model_dir, experiment):
    """An uninterrupted 4-iteration run with the tuning options (TUNED), a checkpoint after every
    iteration, the newest 2 kept."""
    run_main(command(tiny_model_dir, experiment, 4, *MASTERS, *TUNED, "--save_every", "1",
                     "--keep_checkpoints", "2", run_name="four"))
    return experiment / "four"


# --------------------------------------------------------------------------- with real runs


@pytest.mark.ray
@pytest.mark.slow
def test_checkpoints_hold_what_resume_needs(four):
    # every iteration, the last one included (as published); the newest 2 kept
    assert [p.name for p in ckpt.list_checkpoints(four)] == ["checkpoint-3", "checkpoint-4"]
    checkpoint = four / "checkpoint-3"
    state = ckpt.load_state(checkpoint)
    assert state["iteration"] == 3 and not state["finished"]
    assert state["config"]["population_size"] == 4 and state["config"]["master_weights"] == "fp32"
    assert [r["iteration"] for r in metrics(checkpoint)] == [1, 2, 3]
    assert metrics(checkpoint) == metrics(four)[:3]
    weights, masters = ckpt.load_weights(checkpoint), ckpt.load_masters(checkpoint)
    assert set(masters) <= set(weights) and all(m.dtype == torch.float32 for m in masters.values())
    assert not list(four.glob(".checkpoint-*")), "no temporary checkpoint is left behind"


@pytest.mark.ray
@pytest.mark.slow
def test_a_tuned_run_resumed_on_one_engine_equals_the_two_engine_run(four, tiny_model_dir,
                                                                     experiment):
    """Adam + cosine + --prompt_batch + --num_rollouts 2 + --eval_every: resumed from checkpoint-3
    on 1 engine (2 before), the run equals the uninterrupted one bit for bit (records, weights,
    masters, Adam's state); each held-out reward is the greedy evaluation of that checkpoint."""
    from accl_varied_reward import make_task
    from es_llm.generation import Generator
    from es_llm.models import load_model
    from es_llm.tuning import lr_factor, prompt_batch

    one = command(tiny_model_dir, experiment, 4, *MASTERS, *TUNED, "--resume",
                  four / "checkpoint-3", run_name="four-one-engine")
    one[one.index("--num_engines") + 1] = "1"
    # The one engine computes with as many cores (torch threads) as each of the two did: a
    # reduction split over more threads could round otherwise (and 2 threads on a busy 2-core
    # machine run several times slower).
    cores = sorted(os.sched_getaffinity(0))
    with mock.patch("os.sched_getaffinity", lambda pid: set(cores[:max(1, len(cores) // 2)])):
        run_main(one)
    assert_same_run(experiment / "four-one-engine", four)
    assert same_saved_state(experiment / "four-one-engine", four)  # masters and Adam's state
    assert not same_saved_state(four / "checkpoint-3", four / "checkpoint-4")
    rows = metrics(four)
    assert [r["lr"] for r in rows] == [0.02 * lr_factor(i, 4, "cosine") for i in (1, 2, 3, 4)]
    assert [r["prompts"] for r in rows] == [prompt_batch(33, i, 2, 16) for i in (1, 2, 3, 4)]
    assert [r["generations"] for r in rows] == [16, 32, 48, 64]  # 4 members x 2 prompts x 2
    heldout = make_task(16).heldout().subset(range(2))
    for row in rows[2:]:
        model, tokenizer = load_model(str(four / f"checkpoint-{row['iteration']}"), "fp32")
        completions = Generator(tokenizer, heldout.prompts, 32)(model)
        assert row["heldout_reward_mean"] == sum(heldout.score(completions)) / 2


@pytest.mark.ray
@pytest.mark.slow
def test_resume_from_a_checkpoint_into_another_run_without_masters(tiny_model_dir, experiment):
    """Without fp32 masters an engine drifts with every member it evaluates, so the reference
    run and the resumed one use --schedule static; resumed from checkpoint-1/ into a new run
    directory, the run equals the uninterrupted one."""
    static = ["--schedule", "static"]
    run_main(command(tiny_model_dir, experiment, 2, *static, "--save_every", "1",
                     run_name="static"))
    reference = experiment / "static"
    assert [p.name for p in ckpt.list_checkpoints(reference)] == ["checkpoint-1", "checkpoint-2"]
    assert ckpt.load_masters(reference / "checkpoint-1") is None
    run_main(command(tiny_model_dir, experiment, 2, *static, "--resume",
                     str(reference / "checkpoint-1"), run_name="static-resumed"))
    assert_same_run(experiment / "static-resumed", reference, masters=False)


# --------------------------------------------------------------------------- refusals (no Ray)


def fake_checkpoint(run, iteration, finished=False, **config):
    """A run directory's trainer_state.json (and metrics) as the script writes them; finished:
    in the run directory itself, else in checkpoint-<iteration>/."""
    cfg, _ = load_script().settings(["--model_name", "tiny", *SETTINGS, *MASTERS])
    settings = {**asdict(cfg), **config}
    directory = run if finished else run / f"{ckpt.CHECKPOINT_PREFIX}{iteration}"
    weights = directory / "final_model" if finished else directory
    weights.mkdir(parents=True, exist_ok=True)
    save_file({"placeholder": torch.zeros(1)}, str(weights / "model.safetensors"))  # never loaded
    records = [{"iteration": i} for i in range(1, iteration + 1)]
    ckpt.write_metrics(directory / ckpt.METRICS_FILE, records)
    ckpt.write_json_atomic(directory / ckpt.STATE_FILE,
                           {"iteration": iteration, "finished": finished, "rng_state": None,
                            "config": settings})
    return directory


def fake_finished_run(run):
    fake_checkpoint(run, 9, finished=True, model_name="tiny")
    fake_checkpoint(run, 7)
    (run / "final_model.pth").write_bytes(b"weights")
    return run


@pytest.fixture
def script():
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    yield load_script()
    signal.signal(signal.SIGTERM, previous)


def refused(script, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        script.main([str(a) for a in argv])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and exit_.value.code not in (0, None)
    return message


BASE = ["--model_name", "tiny", *SETTINGS, *MASTERS, "--num_iterations", "20"]


@pytest.mark.parametrize("flag, value, expected", [
    ("--population_size", "6", "population_size: checkpoint has 4, this run has 6"),
    ("--model_name", "other", "model_name: checkpoint has 'tiny', this run has 'other'"),
    ("--noise_mode", "correlated", "noise_mode: checkpoint has 'iid', this run has 'correlated'"),
    ("--precision", "bf16", "precision: checkpoint has 'fp32', this run has 'bf16'"),
    ("--master_weights", "none", "master_weights: checkpoint has 'fp32', this run has 'none'"),
    ("--data_sample", "8", "data_sample: checkpoint has 16, this run has 8"),
])
def test_resume_with_other_settings_is_refused_naming_the_mismatch(script, tmp_path, flag, value,
                                                                   expected):
    checkpoint = fake_checkpoint(tmp_path / "run", 3)
    argv = BASE + ["--experiment_dir", tmp_path, "--resume", checkpoint]
    argv[argv.index(flag) + 1] = value
    message = refused(script, argv)
    assert expected in message and f"cannot resume from {checkpoint}" in message
    assert not (tmp_path / "converted").exists()  # refused before the model was touched


def test_resume_refuses_nothing_to_do_and_a_missing_checkpoint(script, tmp_path):
    fake_checkpoint(tmp_path / "run", 20)
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--resume", tmp_path / "run"])
    assert "at iteration 20" in message and "larger --num_iterations" in message
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--resume", tmp_path / "none"])
    assert "no checkpoint found" in message


def test_a_run_directory_holding_a_run_is_not_overwritten(script, tmp_path):
    run = fake_finished_run(tmp_path / "done")
    before = sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None)
                    for p in run.rglob("*"))
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--run_name", "done"])
    assert "already holds a finished run (9 iterations)" in message and "--overwrite" in message
    assert sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None)
                  for p in run.rglob("*")) == before

    fake_checkpoint(tmp_path / "stopped", 5)
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--run_name", "stopped"])
    assert "unfinished run (latest checkpoint: checkpoint-5)" in message
    assert f"--resume {tmp_path / 'stopped'}" in message

    (tmp_path / "killed").mkdir()  # killed before its first checkpoint
    ckpt.write_metrics(tmp_path / "killed" / ckpt.METRICS_FILE, [{"iteration": 1}])
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--run_name", "killed"])
    assert "without a checkpoint (nothing to resume)" in message and "--overwrite" in message


def test_resuming_an_older_checkpoint_in_place_would_mix_histories(script, tmp_path):
    run = tmp_path / "run"
    old = fake_checkpoint(run, 2)
    fake_checkpoint(run, 4)
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--resume", old])
    assert "gone past iteration 2" in message and "checkpoint-4" in message
    assert "--overwrite" in message and (run / "checkpoint-4").is_dir()


def test_resume_picks_the_newest_state_and_finds_its_weights(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 3)
    assert ckpt.resolve_checkpoint(run) == run / "checkpoint-3"
    assert ckpt.weights_dir(run / "checkpoint-3") == run / "checkpoint-3"
    fake_checkpoint(run, 5, finished=True)  # a finished run newer than its last checkpoint
    assert ckpt.resolve_checkpoint(run) == run
    assert ckpt.weights_dir(run) == run / "final_model"
    assert ckpt.run_home(run / "checkpoint-3") == run and ckpt.run_home(run) == run
    fake_checkpoint(run, 5)  # a tie: the checkpoint wins
    assert ckpt.resolve_checkpoint(run) == run / "checkpoint-5"


def test_resume_command_replaces_resume_and_overwrite(tmp_path):
    line = rundir.resume_command([str(SCRIPT), "--run_name", "a b", "--resume", "x", "--overwrite",
                                  "--resume=y", "--num_iterations", "5"], tmp_path / "a b")
    args = shlex.split(line)
    assert args[0] == "python" and args[1].endswith("es_fine-tuning_countdown_accl.py")
    assert args[2:] == ["--run_name", "a b", "--num_iterations", "5", "--resume",
                        str(tmp_path / "a b")]


def test_tuning_settings_that_cannot_run_are_refused_before_anything_is_written(script, tmp_path,
                                                                              capsys):
    """vLLM engines refuse an optimizer over vLLM's fused tensors (its state is kept per HF
    tensor), and nothing else of the tuning options; a prompt batch or held-out sample larger than
    the data is refused before the run directory, the converted model or Ray exist."""
    with pytest.raises(SystemExit):
        load_script().settings(["--engine", "vllm", "--optimizer", "adam", "--prompt_batch", "2",
                                "--num_rollouts", "2", "--lr_schedule", "cosine"])
    error = capsys.readouterr().err.split("error:")[-1]  # after the usage lines
    assert "--optimizer adam on vLLM engines keeps its state per HF tensor" in error
    assert "add --vllm_noise hf" in error
    for flag in ("prompt_batch", "num_rollouts", "lr_schedule"):
        assert flag not in error
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--prompt_batch", "17"])
    assert "--prompt_batch 17 asks for more prompts" in message and "give at most 16" in message
    message = refused(script, BASE + ["--experiment_dir", tmp_path, "--eval_every", "1",
                                      "--eval_samples", "2001"])
    assert "--eval_samples 2001 is more than the task's 2000 held-out prompts" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, expected", [
    (["--save_every", "-1"], "save_every must be >= 0"),
    (["--keep_checkpoints", "-2"], "keep_checkpoints must be >= 0"),
    (["--run_name", "../elsewhere"], "--run_name must be a plain directory name"),
    (["--run_name", "converted"], "--run_name must be a plain directory name"),
])
def test_bad_checkpoint_flags_are_refused(argv, expected, capsys):
    with pytest.raises(SystemExit):
        load_script().settings(["--engine", "transformers", *argv])
    assert expected in capsys.readouterr().err


# --------------------------------------------------------------------------- engine weights


def test_master_weights_travel_with_the_weights():
    """master_state()/load_state_dict(state, masters) carry the fp32 masters exactly, so a resumed
    engine has the same masters, not ones cast again from the (lower precision) weights."""
    bf16 = torch.bfloat16
    source = {"a": torch.randn(3, 2, dtype=bf16), "b": torch.randn(4, dtype=bf16)}
    weights = WeightSet(lambda: list(source.items()), "iid", "fp32")
    weights.update([1, 2], [0.5, -1.0], 1e-4)  # below half a bf16 ulp: only the masters move
    state, masters = weights.state_dict(), weights.master_state()
    assert not torch.equal(masters["a"], state["a"].float())

    target = {"a": torch.zeros(3, 2, dtype=bf16), "b": torch.zeros(4, dtype=bf16)}
    restored = WeightSet(lambda: list(target.items()), "iid", "fp32")
    restored.load_state_dict(state, masters)
    assert same_tensors(restored.master_state(), masters)
    assert restored.fingerprint() == weights.fingerprint()
    restored.load_state_dict(state)  # no masters given: cast again from the weights
    assert torch.equal(restored.master_state()["a"], state["a"].float())
    plain = WeightSet(lambda: list(target.items()), "iid")
    assert plain.master_state() is None
    with pytest.raises(ValueError, match="keeps none"):
        plain.load_state_dict(state, masters)
