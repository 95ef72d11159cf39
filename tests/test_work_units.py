"""bench/work_units.py and bench/gpu_check.sh, at tiny sizes: every row runs and is reported.

(The vLLM rows and the whole GPU check run in the vLLM tier: tests/test_vllm_tier.py.)"""
import importlib.util

import pytest

from conftest import PYTHON, ROOT, run_script

pytestmark = pytest.mark.slow


def test_transformers_rows_and_scaling_of_the_countdown_unit(tmp_path, tiny_model_dir):
    """Every transformers row's code path, on the tiny model (the bundled model's rows are
    bench/work_units.py's own runs, docs/benchmarks.md; drawing its 135M weights' noise made this
    test one of CI's slowest without checking more)."""
    import bench.work_units as work_units

    output = tmp_path / "units.md"
    rows, scaling = work_units.main([
        "--model", str(tiny_model_dir),
        "--unit", "countdown", "--population", "2", "--items", "2", "--max_new_tokens", "4",
        "--rows", "paper", "faithful", "faithful4", "lowrank", "generate", "lora_es", "vllm_lora",
        "--scaling", "2", "3", "--scaling_items", "1", "--scaling_tokens", "4",
        "--scaling_engines", "lowrank", "--output", str(output)])
    names = [r["row"] for r in rows]
    assert names[:4] == ["paper-style loop", "ours, faithful",
                         "ours, faithful, --gpu_threads 4 (the trainers' default)",
                         "ours, lowrank rank 1"]
    assert names[4].startswith("transformers generate (reference")
    assert names[5] == "ours, LoRA space rank 8, --lora_batch"
    for r in rows:
        assert r["s"] > 0 and 0 < r["evaluate_s"] <= r["s"] and r["peak_gib"] > 0.1
        assert r["sequences"] == 4 and r["tokens"] > 0
    assert [(mode, n) for mode, n, _, _ in scaling] == [("transformers lowrank", 2),
                                                       ("transformers lowrank", 3)]
    report = output.read_text()
    assert "| paper-style loop |" in report and "1.00x" in report
    assert "of transformers generate (reference" in report  # the 80% target's line
    assert "the paper-style loop (target >= 5x)" in report
    if importlib.util.find_spec("vllm") is None:
        assert "| vllm_lora (vLLM is not installed here) | not run |" in report
    assert "| transformers lowrank | 3 | 3 |" in report


def test_gpu_check_refuses_to_run_without_a_gpu_unless_asked(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_script(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], check=False,
                      env={"PYTHON": PYTHON})
    assert proc.returncode == 2
    assert "GPU_CHECK_ALLOW_CPU=1" in proc.stdout
    assert (ROOT / "bench" / "gpu_check.sh").exists()
