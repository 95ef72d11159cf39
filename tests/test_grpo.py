"""The GRPO baseline (baselines/grpo.py): same task objects, same reward, comparable budgets."""
import json

import pytest

from conftest import PYTHON, ROOT, load_module, run_main, run_script

pytest.importorskip("trl", reason="the GRPO baseline needs requirements-baselines.txt")


def grpo_module():
    return load_module(ROOT / "baselines" / "grpo.py", "grpo")


def compare_in_process(command, monkeypatch):
    """bench/es_vs_grpo.py's main() here, each training and evaluation it would start as a
    process run in this one (conftest.run_main: the same command lines, without a fresh interpreter
    importing torch, transformers and TRL for each of them); a failing one fails as the script's
    own `run` does."""
    compare = load_module(ROOT / "bench" / "es_vs_grpo.py", "es_vs_grpo")

    def run(sub_command, log):
        log.parent.mkdir(parents=True, exist_ok=True)
        done = run_main([PYTHON, *map(str, sub_command[1:])], check=False)
        log.write_text(done.stdout + done.stderr)
        assert done.returncode == 0, f"{sub_command} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"

    monkeypatch.setattr(compare, "run", run)
    compare.main(command[2:])


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
    run_main([PYTHON, "baselines/grpo.py", "--task", "conciseness", "--model_name",
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
    run_main([PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(tiny_model_dir),
              "--precision", "fp32", "--num_iterations", "2", "--population_size", "4",
              "--max_new_tokens", "6", "--gpu_threads", "1", "--report_to", "none",
              "--output_dir", str(es)])
    es_records = [json.loads(line) for line in (es / "metrics.jsonl").read_text().splitlines()]
    assert [r["generations"] for r in es_records] == [4 * 2 * 1, 4 * 2 * 2]


@pytest.mark.slow
def test_the_comparison_script_trains_evaluates_and_tabulates(tiny_model_dir, tmp_path, monkeypatch):
    """bench/es_vs_grpo.py end to end at its smoke size: the base model, both methods, two seeds,
    the same budget; run again (its command line), it reads what it wrote instead of training
    again."""
    command = [PYTHON, "bench/es_vs_grpo.py", "--model_name", str(tiny_model_dir), "--preset",
               "smoke", "--out", str(tmp_path)]
    compare_in_process(command, monkeypatch)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results] == [
        ("base", None), ("es", 33), ("es", 34), ("grpo", 33), ("grpo", 34)]
    assert results[0]["kl"] == 0.0 and results[0]["generations"] == 0
    assert {r["generations"] for r in results[1:]} == {4 * 2 * 2}  # equal budgets
    table = (tmp_path / "table.md").read_text()
    assert "| ES | sigma 0.05 | 2 | 16 |" in table and "| GRPO | beta 0.04, lr 1e-05 | 2 | 16 |" in table
    assert (tmp_path / "reward_vs_kl.png").stat().st_size > 0
    again = run_script(command, timeout=300)
    assert "training and evaluating" not in again.stdout
    assert json.loads((tmp_path / "results.json").read_text()) == results


@pytest.mark.slow
def test_the_countdown_comparison_reports_held_out_accuracy(tiny_model_dir, tmp_path, monkeypatch):
    """The Countdown preset: ES low-rank and GRPO trained on the same items at the same budget,
    each evaluated on test items (accuracy, format and answer reward), the base model first."""
    compare_in_process([PYTHON, "bench/es_vs_grpo.py", "--model_name", str(tiny_model_dir),
                        "--preset", "countdown_smoke", "--out", str(tmp_path)], monkeypatch)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["setting"] for r in results] == ["base model", "sigma 0.05, low-rank",
                                               "beta 0.04, lr 1e-05"]
    assert {r["generations"] for r in results[1:]} == {4 * 2 * 2}
    for r in results:
        assert 0 <= r["accuracy"] <= 100 and 0 <= r["format_reward"] <= 1
    summary = json.loads((tmp_path / "eval" / "es_sigma0.05_lowrank_seed33" / "summary.json")
                         .read_text())
    assert summary["eval_stats"]["num_samples"] == 4  # test items, from the end of the file
    assert "| ES | sigma 0.05, low-rank | 1 | 16 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "countdown.png").stat().st_size > 0
