"""Your own task (--task PATH.py, --data), trackers (--report_to), and every option on every path."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, run_main, run_script
from es_llm import checkpoint as ckpt
from es_llm.tasks import load_task_file

EXAMPLE = ROOT / "examples" / "word_count_task.py"


def test_the_example_task_loads_and_scores_with_its_columns():
    task = load_task_file(EXAMPLE)
    assert task.name == "word_count" and len(task.prompts) == 3
    assert task.columns == {"words": [3, 1, 5]}
    assert task.score(["calm blue deep", "red", "hi"]) == [0.0, 0.0, -4.0]


def test_data_replaces_the_rows_json_and_jsonl(tmp_path):
    rows = [{"prompt": "one", "words": 1}, {"prompt": "two words", "words": 2}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps(rows))
    for path in (jsonl, listed):
        task = load_task_file(EXAMPLE, path)
        assert task.prompts == ["one", "two words"] and task.columns == {"words": [1, 2]}


def test_task_file_errors_name_the_file_and_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such Python file"):
        load_task_file(tmp_path / "missing.py")
    no_reward = tmp_path / "no_reward.py"
    no_reward.write_text("DATASET = [{'prompt': 'a'}]\n")
    with pytest.raises(ValueError, match=f"{no_reward}.*reward"):
        load_task_file(no_reward)
    no_data = tmp_path / "no_data.py"
    no_data.write_text("def reward(completions, prompts, **_):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ValueError, match="neither DATASET .* nor load_dataset"):
        load_task_file(no_data)
    loader = tmp_path / "loader.py"
    loader.write_text(no_data.read_text() + "def load_dataset():\n    return [{'prompt': 'p', 'x': 1}]\n")
    assert load_task_file(loader).columns == {"x": [1]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="row 1 has no \"prompt\""):
        load_task_file(no_data, bad)
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps([{"prompt": "a", "x": 1}, {"prompt": "b"}]))
    with pytest.raises(ValueError, match="row 1 lacks the column 'x'"):
        load_task_file(no_data, ragged)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("DATASET = [{'prompt': 'a'}, {'prompt': 'b'}]\n"
                     "def reward(completions, prompts, **_):\n    return [1.0]\n")
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        load_task_file(wrong).score(["x", "y"])


def test_data_without_task_is_refused():
    from es_llm.cli import PAPER_CONSTANTS, build_parser, run_training

    args = build_parser("", PAPER_CONSTANTS).parse_args(["--data", "rows.jsonl", "--model_name", "x"])
    with pytest.raises(SystemExit) as exit_:  # what the scripts' main() does, in this process
        run_training(args, lambda: pytest.fail("the script's own task must not be built"))
    assert exit_.value.code not in (0, None)
    assert "--data replaces a task file's prompts" in str(exit_.value.code)


# --------------------------------------------------------------------------- end to end

TINY = ["--population_size", "4", "--sigma", "0.05", "--alpha", "0.02", "--max_new_tokens", "6",
        "--precision", "fp32", "--num_iterations", "2"]


def without_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


def scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def readme_tags(trainer: str) -> set:
    """The TensorBoard tags the README's tracking table promises for a trainer ("plain trainers"
    or "accelerated version"): the backticked tags of its row (and of the row it says "the same" of)."""
    import re

    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1).split(" (")[0]: m.group(2) for m in
            re.finditer(r"^\| (plain trainers[^|]*|accelerated version) \| (.*) \|$", readme,
                        re.MULTILINE)}
    tags = set(re.findall(r"`([a-z_/]+)`", rows[trainer]))
    if rows[trainer].startswith("the same"):
        tags |= set(re.findall(r"`([a-z_/]+)`", rows["plain trainers"]))
    return tags


def test_the_readme_lists_each_trainers_tags():
    assert "time/broadcast" in readme_tags("accelerated version") - readme_tags("plain trainers")
    assert {"reward/mean", "time/evaluate", "generations"} <= readme_tags("plain trainers")


@pytest.mark.slow
def test_own_task_with_tensorboard_and_offline_wandb(tiny_model_dir, tmp_path):
    """es_fine-tuning.py --task: the example trains; TensorBoard gets the published tags and wandb
    (offline, no network) its run, through accelerate's trackers."""
    out = tmp_path / "run"
    run_script([PYTHON, "es_fine-tuning.py", "--task", str(EXAMPLE), "--model_name",
                str(tiny_model_dir), "--gpu_threads", "1", "--output_dir", str(out),
                "--report_to", "all", *TINY], env={"WANDB_MODE": "offline"})
    records = ckpt.read_metrics(out / ckpt.METRICS_FILE)
    assert [r["iteration"] for r in records] == [1, 2]
    assert [r["generations"] for r in records] == [4 * 3, 2 * 4 * 3]  # population x prompts x it.
    assert ckpt.load_state(out)["config"]["task"] == "word_count"
    logged = scalars(out / "es_llm")
    assert set(logged) == readme_tags("plain trainers")
    for tag in logged:
        assert [step for step, _ in logged[tag]] == [0, 1], tag
    assert [v for _, v in logged["reward/mean"]] == pytest.approx([r["reward_mean"] for r in records])
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


ACCL = [PYTHON, str(ROOT / "es_fine-tuning_countdown_accl.py"), "--engine", "transformers",
        "--num_engines", "2", "--report_to", "none"]


@pytest.mark.ray
@pytest.mark.slow
def test_accelerated_antithetic_centered_rank_on_two_engines(tiny_model_dir, tmp_path):
    """--antithetic --fitness_shaping centered_rank on two transformers engines, on the example
    task: the final weights are the update replayed from the logged seeds, signs and rewards."""
    from es_llm.shaping import shape_fitness, update_terms
    from es_llm.strategy import es_update

    run_main([*ACCL, "--task", str(EXAMPLE), "--model_name", str(tiny_model_dir),
                "--antithetic", "--fitness_shaping", "centered_rank", "--noise_mode", "iid",
                "--experiment_dir", str(tmp_path), "--run_name", "run", *TINY,
                "--report_to", "tensorboard"])
    run = tmp_path / "run"
    assert set(scalars(run / "es_llm")) == readme_tags("accelerated version")
    records = ckpt.read_metrics(run / ckpt.METRICS_FILE)
    assert all(r["signs"] == [1, -1, 1, -1] and r["seeds"][0] == r["seeds"][1] for r in records)
    from es_llm.models import load_model

    model, _ = load_model(str(tiny_model_dir), "fp32")
    expected = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    for r in records:
        seeds, weights = update_terms(r["seeds"], shape_fitness(r["rewards"], "centered_rank"), True)
        es_update(expected, seeds, weights, 0.02, "iid", n=4)
    final = torch.load(run / "final_model.pth")
    assert max((final[n] - e).abs().max().item() for n, e in zip(names, expected)) < 1e-6
    assert ckpt.load_state(run)["config"]["task"] == "word_count"


@pytest.mark.ray
@pytest.mark.slow
def test_lowrank_on_two_engines_equals_the_plain_lowrank_trainer(tiny_model_dir, tmp_path):
    """--noise_mode lowrank with the accelerated version's transformers engines: the same run as
    the plain trainer's lowrank mode, metrics and weights bit for bit."""
    lowrank = ["--noise_mode", "lowrank", "--rank", "2", "--task", str(EXAMPLE), *TINY]
    run_main([*ACCL, "--model_name", str(tiny_model_dir), "--experiment_dir", str(tmp_path),
                "--run_name", "accl", *lowrank])
    plain = tmp_path / "plain"
    run_main([PYTHON, "es_fine-tuning.py", "--model_name", str(tiny_model_dir), "--gpu_threads",
                "1", "--output_dir", str(plain), "--report_to", "tensorboard", *lowrank])
    assert set(scalars(plain / "es_llm")) == readme_tags("plain trainers")
    accl = tmp_path / "accl"
    assert without_time(ckpt.read_metrics(accl / ckpt.METRICS_FILE)) == \
        without_time(ckpt.read_metrics(plain / ckpt.METRICS_FILE))
    ours = load_file(str(accl / "final_model" / "model.safetensors"))
    theirs = load_file(str(plain / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
