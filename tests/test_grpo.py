"""The GRPO baseline (baselines/grpo.py): same task objects, same reward, comparable budgets."""
import json

import pytest

from conftest import PYTHON, ROOT, load_module, run_script

pytest.importorskip("trl", reason="the GRPO baseline needs requirements-baselines.txt")


def grpo_module():
    return load_module(ROOT / "baselines" / "grpo.py", "grpo")


@pytest.mark.parametrize("task", ["conciseness", "countdown", str(ROOT / "examples" / "word_count_task.py")])
def test_the_same_reward_function_scores_the_same_in_es_and_grpo(task, tmp_path):
    grpo = grpo_module()
    args = grpo.build_parser().parse_args(["--task", task, "--output_dir", str(tmp_path),
                                           "--data_sample", "4"])
    es_task = grpo.load_task(args)
    completions = ["8", " <think>3+5</think>\n<answer>(1 + 2) * 3</answer>", "calm blue sea", ""]
    completions = (completions * len(es_task.prompts))[:len(es_task.prompts)]
    recorder = grpo.RewardRecorder(es_task, tmp_path / "metrics.jsonl")
    assert recorder(es_task.prompts, completions, trainer_state=None, **es_task.columns) == \
        es_task.score(completions)


@pytest.mark.slow
def test_grpo_runs_and_counts_generations_like_es(tiny_model_dir, tmp_path):
    """Two GRPO steps on the tiny model write the ES metrics fields; the generation counters are
    group x prompts x steps (GRPO) and population x prompts x iterations (ES)."""
    out = tmp_path / "grpo"
    run_script([PYTHON, "baselines/grpo.py", "--task", "conciseness", "--model_name",
                str(tiny_model_dir), "--precision", "fp32", "--max_steps", "2",
                "--num_generations", "4", "--max_new_tokens", "6", "--beta", "0.04",
                "--output_dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert [r["generations"] for r in records] == [4 * 2 * 1, 4 * 2 * 2]
    for r in records:
        assert {"rewards", "reward_mean", "reward_std", "reward_min", "reward_max", "time_s"} <= set(r)
        assert len(r["rewards"]) == 8 and r["reward_min"] <= r["reward_mean"] <= r["reward_max"]
    assert (out / "model.safetensors").exists()

    es = tmp_path / "es"
    run_script([PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(tiny_model_dir),
                "--precision", "fp32", "--num_iterations", "2", "--population_size", "4",
                "--max_new_tokens", "6", "--gpu_threads", "1", "--report_to", "none",
                "--output_dir", str(es)])
    es_records = [json.loads(line) for line in (es / "metrics.jsonl").read_text().splitlines()]
    assert [r["generations"] for r in es_records] == [4 * 2 * 1, 4 * 2 * 2]


@pytest.mark.slow
def test_the_comparison_script_trains_evaluates_and_tabulates(tiny_model_dir, tmp_path):
    """bench/es_vs_grpo.py end to end at its smoke size: both methods, two seeds, the same budget."""
    run_script([PYTHON, "bench/es_vs_grpo.py", "--model_name", str(tiny_model_dir), "--preset",
                "smoke", "--out", str(tmp_path)], timeout=900)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in results} == {("es", 33), ("es", 34), ("grpo", 33),
                                                           ("grpo", 34)}
    assert len({r["generations"] for r in results}) == 1  # equal budgets
    assert "| ES | sigma 0.05 | 2 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "reward_vs_kl.png").stat().st_size > 0
