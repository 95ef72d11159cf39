"""Wrong input gets a clear error (what was wrong, what was expected, what to do) before any work."""
import json
import math

import pytest

from conftest import PYTHON, run_main
from es_llm.models import ModelNotFoundError, load_model
from es_llm.tasks import Task, conciseness_reward
from es_llm.trainer import TrainConfig


def config(**overrides):
    return TrainConfig(**{"task": "conciseness", "model_name": "m", "output_dir": "o", **overrides})


@pytest.mark.parametrize("overrides,message", [
    ({"population_size": 0}, "population_size must be >= 1"),
    ({"sigma": 0.0}, "sigma must be a positive number"),
    ({"alpha": -1.0}, "alpha must be a positive number"),
    ({"sigma": math.nan}, "sigma must be a positive number"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"noise_mode": "gaussian"}, "noise_mode must be one of"),
    ({"gpu_threads": 0}, "gpu_threads must be >= 1"),
])
def test_invalid_settings_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides).validate()


def test_population_smaller_than_process_count_is_refused():
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        config(population_size=3).validate(num_processes=4)


def test_unknown_model_offline_names_what_was_tried_and_the_bundled_model(monkeypatch):
    with pytest.raises(ModelNotFoundError, match="bundled") as error:
        load_model("no-such-org/no-such-model-xyz", "fp32")
    assert "no-such-org/no-such-model-xyz" in str(error.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("/nonexistent/model.gguf", "fp32")


def test_unknown_precision_is_refused_by_the_loader():
    with pytest.raises(ValueError, match="unknown precision"):
        load_model("bundled", "int3")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_names_the_seed_and_the_prompt(bad):
    task = Task("t", ["prompt one", "prompt two"], lambda prompts, completions, **_: [1.0, bad])
    with pytest.raises(ValueError, match=r"seed 1234 on prompt 'prompt two'"):
        task.score(["a", "b"], seed=1234)


def test_task_columns_must_match_the_prompts():
    with pytest.raises(ValueError, match="one per prompt"):
        Task("t", ["a", "b"], conciseness_reward, {"target": ["x"]})


def test_data_sample_larger_than_the_train_split_is_refused():
    proc = run_main([PYTHON, "countdown/es_fine-tuning_countdown.py", "--model_name", "x",
                     "--data_sample", "5000"], check=False)
    assert proc.returncode != 0
    assert "200" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_flags_exit_before_loading_a_model(tmp_path):
    proc = run_main([PYTHON, "es_fine-tuning_conciseness.py", "--model_name", "bundled",
                     "--sigma", "-1", "--output_dir", str(tmp_path / "o")], check=False)
    assert proc.returncode != 0 and "sigma must be a positive number" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_an_unwritable_output_dir_is_refused_before_training(tmp_path):
    from es_llm.rundir import clear_and_check_writable

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        clear_and_check_writable(blocker / "run", [], "--output_dir")


def test_missing_or_malformed_countdown_data_names_the_path_and_fields(tmp_path):
    from countdown.countdown_task import load_countdown_data

    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_countdown_data(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 0, "numbers": [1, 2, 3]}]))
    with pytest.raises(ValueError, match="context"):
        load_countdown_data(bad, split="all")
