"""Run directories: what --resume reads and where a run may write (es_llm/rundir.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import PYTHON, run_main, run_script
from es_llm import checkpoint as ckpt
from es_llm import rundir


def fake_checkpoint(run: Path, iteration: int, finished=False) -> Path:
    directory = run if finished else run / f"{ckpt.CHECKPOINT_PREFIX}{iteration}"
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(directory / "model.safetensors"))
    ckpt.write_metrics(directory / ckpt.METRICS_FILE, [{"iteration": i} for i in range(1, iteration + 1)])
    ckpt.write_json_atomic(directory / ckpt.STATE_FILE, {"iteration": iteration, "finished": finished,
                                                         "rng_state": None, "config": {}})
    return directory


def resume(path, iterations=10):
    return ckpt.load_resume(path, lambda saved: [], iterations)


def test_resuming_into_a_directory_holding_another_run_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fake_checkpoint(a, 2)
    fake_checkpoint(b, 3, finished=True)
    with pytest.raises(FileExistsError, match=r"already holds a finished run \(3 iterations\).*--overwrite"):
        rundir.plan_run_dir(b, resume(a), overwrite=False, name_flag="--output_dir")
    removed = rundir.plan_run_dir(b, resume(a), overwrite=True, name_flag="--output_dir")
    assert b / ckpt.STATE_FILE in removed and b / ckpt.METRICS_FILE in removed
    fake_checkpoint(tmp_path / "c", 1)  # an interrupted run: its checkpoints are a run too
    with pytest.raises(FileExistsError, match="unfinished run .*checkpoint-1"):
        rundir.plan_run_dir(tmp_path / "c", resume(a), overwrite=False, name_flag="--output_dir")
    assert rundir.plan_run_dir(tmp_path / "new", resume(a), False, "--output_dir") == []
    assert rundir.plan_run_dir(a, resume(a), False, "--output_dir") == []  # its own directory


def test_a_new_run_into_an_interrupted_run_is_refused(tmp_path):
    fake_checkpoint(tmp_path / "run", 2)
    with pytest.raises(FileExistsError, match="--resume"):
        rundir.plan_run_dir(tmp_path / "run", None, overwrite=False, name_flag="--output_dir")


def test_a_truncated_checkpoint_is_named_with_the_earlier_one(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 1)
    latest = fake_checkpoint(run, 2)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_readable(resume(run)["checkpoint"])
    message = str(error.value)
    assert str(weights) in message and f"--resume {run / 'checkpoint-1'}" in message
    assert "Nothing was written" in message

    alone = tmp_path / "alone"
    only = fake_checkpoint(alone, 1)
    (only / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ckpt.CheckpointError, match="no other checkpoint"):
        ckpt.check_readable(only)


def test_a_broken_state_file_is_named(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "run", 1)
    (checkpoint / ckpt.STATE_FILE).write_text('{"iteration": 1, "fini')
    with pytest.raises(ValueError, match=str(checkpoint / ckpt.STATE_FILE)):
        resume(checkpoint)


# --------------------------------------------------------------------------- the real command line

TINY = ["--population_size", "2", "--sigma", "0.05", "--alpha", "0.02", "--max_new_tokens", "4",
        "--gpu_threads", "1", "--precision", "fp32"]


@pytest.mark.slow
def test_resume_into_another_finished_run_and_a_damaged_checkpoint(tiny_model_dir, tmp_path):
    def command(out, iterations, *extra):
        return [PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(tiny_model_dir),
                "--output_dir", str(out), "--num_iterations", str(iterations), *TINY, *extra]

    a, b = tmp_path / "a", tmp_path / "b"
    run_main(command(a, 2, "--save_every", "1"))
    run_main(command(b, 1))
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    proc = run_script(command(b, 3, "--resume", str(a / "checkpoint-1")), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "already holds a finished run (1 iterations)" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before

    weights = a / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    metrics_before = (a / ckpt.METRICS_FILE).read_bytes()
    proc = run_script(command(a, 3, "--resume", str(a)), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(weights) in proc.stderr and f"--resume {a / 'checkpoint-1'}" in proc.stderr
    assert (a / ckpt.METRICS_FILE).read_bytes() == metrics_before

    run_main(command(b, 3, "--resume", str(a / "checkpoint-1"), "--overwrite"))
    assert [r["iteration"] for r in ckpt.read_metrics(b / ckpt.METRICS_FILE)] == [1, 2, 3]
    assert json.loads((b / ckpt.STATE_FILE).read_text())["finished"]


# --------------------------------------------------------------------------- published arithmetic


@pytest.mark.parametrize("seed", range(20))
def test_z_is_the_published_numpy_float32_expression(seed):
    from es_llm.strategy import normalize_rewards

    rng = np.random.default_rng(seed)
    rewards = torch.tensor(rng.normal(-40, 25, size=int(rng.integers(2, 64))), dtype=torch.float32)
    r = rewards.numpy()
    expected = (r - r.mean()) / (r.std() + 1e-8)
    z = normalize_rewards(rewards)
    assert z.dtype == torch.float32 and np.array_equal(z.numpy(), expected.astype(np.float32))
    assert np.array_equal(normalize_rewards(rewards.tolist()).numpy(), z.numpy())
