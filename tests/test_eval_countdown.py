"""countdown/eval_countdown.py: item selection, scoring with the trainer's reward, and end to end on
a tiny model, including models saved by the Countdown trainer (final and checkpoint)."""
import importlib.util
import json
from pathlib import Path

import pytest

from countdown.countdown_task import make_task
from es_llm.evaluation import Sample
from es_llm.generation import Generator
from es_llm.models import load_model
from tests.conftest import PYTHON, ROOT, run_script

SCRIPT = ROOT / "countdown" / "eval_countdown.py"
TRAINER = ROOT / "countdown" / "es_fine-tuning_countdown.py"
SUMMARY_FIELDS = ("avg_reward", "avg_format_reward", "avg_answer_reward", "reward_std", "reward_min",
                  "reward_max", "accuracy", "num_correct", "num_reward_at_least_1", "num_items",
                  "time_per_sample_s", "eval_offset", "model_path")
RECORD_FIELDS = ("prompt", "response", "numbers", "target", "reward", "format_reward",
                 "answer_reward")


def load_eval_module():
    spec = importlib.util.spec_from_file_location("eval_countdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = load_eval_module()


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_default_selection_is_the_test_split():
    items, offset = ev.select_items(ev.DEFAULT_DATA_PATH, None, None)
    assert offset == 200 and len(items) == 2000 and items[0]["id"] == 200


def test_offset_and_count_select_a_slice_and_out_of_range_is_refused():
    items, offset = ev.select_items(ev.DEFAULT_DATA_PATH, 0, 3)
    assert offset == 0 and [i["id"] for i in items] == [0, 1, 2]
    with pytest.raises(ValueError, match="goes past"):
        ev.select_items(ev.DEFAULT_DATA_PATH, 2199, 2)
    with pytest.raises(ValueError, match="outside"):
        ev.select_items(ev.DEFAULT_DATA_PATH, 5000, 1)


def test_eval_scores_match_the_trainer_task_on_the_same_completions():
    task = make_task(data_sample=4)
    items = ev.select_items(ev.DEFAULT_DATA_PATH, 0, 4)[0]
    solution = items[0]["solution"]
    completions = [f" {solution} works.</think>\n<answer>{solution}</answer>",  # 1.1
                   " no idea</think>\n<answer>1 + 1</answer>",  # format only
                   " <answer>(3 ** 3)</answer>",  # refused characters
                   ""]
    samples = [Sample(i, p, c, [], []) for i, (p, c) in enumerate(zip(task.prompts, completions))]
    records = ev.score(samples, items, 0)
    assert [r["reward"] for r in records] == task.score(completions)
    assert records[0]["reward"] == pytest.approx(1.1)
    summary = ev.make_summary(records, 2.0, {})
    assert summary["accuracy"] == 0.25 and summary["num_reward_at_least_1"] == 1
    assert summary["time_per_sample_s"] == 0.5


@pytest.mark.slow
def test_eval_end_to_end_summary_agrees_with_saved_responses(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    proc = run_script([PYTHON, str(SCRIPT), "--model_path", str(tiny_model_dir), "--eval_samples", "4",
                       "--max_new_tokens", "8", "--batch_size", "3", "--save_responses",
                       "--show_examples", "2", "--output_dir", str(out), "--device", "cpu"])
    assert "average reward" in proc.stdout and "accuracy" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    records = read_jsonl(out / "responses.jsonl")
    assert all(field in summary for field in SUMMARY_FIELDS)
    assert all(field in r for r in records for field in RECORD_FIELDS)
    assert summary["num_items"] == len(records) == 4
    assert [r["index"] for r in records] == [200, 201, 202, 203]
    assert summary["avg_reward"] == pytest.approx(sum(r["reward"] for r in records) / 4)
    assert summary["reward_max"] == max(r["reward"] for r in records)
    assert summary["accuracy"] == sum(r["answer_reward"] > 0 for r in records) / 4
    task = make_task(split="test", data_sample=4)
    assert [r["prompt"] for r in records] == task.prompts
    assert [r["reward"] for r in records] == task.score([r["response"] for r in records])


@pytest.mark.slow
def test_trained_model_and_checkpoint_evaluate_with_the_training_rewards(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run_script([PYTHON, str(TRAINER), "--model_name", str(tiny_model_dir), "--data_sample", "3",
                "--num_iterations", "2", "--population_size", "2", "--gpu_threads", "1",
                "--max_new_tokens", "8", "--save_every", "1", "--output_dir", str(run)])
    task = make_task(data_sample=3)
    for model_dir in (run, run / "checkpoint-1"):
        out = tmp_path / f"eval-{model_dir.name}"
        run_script([PYTHON, str(SCRIPT), "--model_path", str(model_dir), "--eval_offset", "0",
                    "--eval_samples", "3", "--batch_size", "3", "--max_new_tokens", "8",
                    "--save_responses", "--output_dir", str(out), "--device", "cpu"])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["precision"] == "bf16"  # the trainer's precision, read from the saved config
        records = read_jsonl(out / "responses.jsonl")
        # The trainer's own generation and scoring of the same items with the saved weights.
        model, tokenizer = load_model(str(model_dir), "bf16")
        completions = Generator(tokenizer, task.prompts, 8)(model)
        assert [r["response"] for r in records] == completions
        assert [r["reward"] for r in records] == task.score(completions)
