"""Run directories: where a run may write (es_llm/rundir.py)."""
import json

import pytest

from conftest import PYTHON, fake_checkpoint, run_main
from es_llm import checkpoint as ckpt
from es_llm import rundir


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
    proc = run_main(command(b, 3, "--resume", str(a / "checkpoint-1")), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "already holds a finished run (1 iterations)" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before

    weights = a / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    metrics_before = (a / ckpt.METRICS_FILE).read_bytes()
    proc = run_main(command(a, 3, "--resume", str(a)), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(weights) in proc.stderr and f"--resume {a / 'checkpoint-1'}" in proc.stderr
    assert (a / ckpt.METRICS_FILE).read_bytes() == metrics_before

    run_main(command(b, 3, "--resume", str(a / "checkpoint-1"), "--overwrite"))
    assert [r["iteration"] for r in ckpt.read_metrics(b / ckpt.METRICS_FILE)] == [1, 2, 3]
    assert json.loads((b / ckpt.STATE_FILE).read_text())["finished"]
