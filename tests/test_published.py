"""The trainers' published command lines, output names and printed lines (MISSION.md sections 1-2)."""
import pytest
import torch

from conftest import ROOT, load_module


def script_parser(path):
    module = load_module(ROOT / path, "script")
    from es_llm.cli import build_parser

    return build_parser(module.__doc__, vars(module))


@pytest.mark.parametrize("path,published", [
    ("es_fine-tuning_conciseness.py", ["--model_name", "Qwen/Qwen2.5-7B-Instruct", "--hf_cache_dir",
                                        "/c", "--precision", "bf16", "--gpu_threads", "2",
                                        "--verbose"]),
    ("countdown/es_fine-tuning_countdown.py", ["--model_name", "Qwen/Qwen2.5-0.5B-Instruct",
                                               "--hf_cache_dir", "/c", "--precision", "fp16",
                                               "--gpu_threads", "1", "--data_sample", "200"]),
])
def test_published_command_lines_parse(path, published):
    args = script_parser(path).parse_args(published)
    assert args.model_name == published[1] and args.hf_cache_dir == "/c"


def test_published_defaults():
    conciseness = script_parser("es_fine-tuning_conciseness.py").parse_args([])
    countdown = script_parser("countdown/es_fine-tuning_countdown.py").parse_args([])
    for args in (conciseness, countdown):
        assert (args.model_name, args.precision, args.gpu_threads) == ("Qwen/Qwen2.5-3B-Instruct", "bf16", 4)
        assert (args.population_size, args.sigma, args.alpha, args.initial_seed) == (30, 0.001, 0.0005, 33)
        assert not args.do_sample and not args.published_drift
    assert (conciseness.num_iterations, conciseness.max_new_tokens) == (1000, 100)
    assert (countdown.num_iterations, countdown.max_new_tokens, countdown.save_every) == (500, 1024, 100)


def test_default_output_names_are_the_published_ones(tmp_path):
    from es_llm.cli import default_output_dir

    conciseness = script_parser("es_fine-tuning_conciseness.py").parse_args([])
    assert default_output_dir(conciseness, 2, "conciseness") == (
        "finetuned_Qwen/Qwen2.5-3B-Instruct_es_random_seed33_pop30_iter1000_sigma0.001_alpha0.0005"
        "_bf16_threads4_question_num2_correct")
    countdown = script_parser("countdown/es_fine-tuning_countdown.py").parse_args(
        ["--model_name", "Qwen/Qwen2.5-0.5B-Instruct", "--gpu_threads", "2"])
    assert default_output_dir(countdown, 200, "countdown") == (
        "Qwen/Qwen2.5-0.5B-Instruct_es_random_seed33_pop30_iter500_sigma0.001_alpha0.0005_bf16"
        "_threads2_question_num200_final")
    iid = script_parser("es_fine-tuning_conciseness.py").parse_args(["--noise_mode", "iid"])
    assert default_output_dir(iid, 2, "conciseness") == default_output_dir(conciseness, 2, "conciseness")
    ours = script_parser("es_fine-tuning_conciseness.py").parse_args(
        ["--model_name", str(tmp_path), "--noise_mode", "lowrank", "--antithetic"])
    assert default_output_dir(ours, 2, "conciseness") == (
        f"finetuned_{tmp_path.name}_es_random_seed33_pop30_iter1000_sigma0.001_alpha0.0005_bf16"
        "_threads4_question_num2_lowrank_rank1_antithetic_correct")


def test_the_iteration_line_is_the_published_one(capsys):
    from es_llm.trainer import report_iteration

    record = {"time_s": 12.3456, "reward_mean": -40.125, "reward_min": -75.0, "reward_max": -3.004}
    report_iteration(7, 1000, record, torch.device("cpu"))
    assert capsys.readouterr().out == "Iteration 7/1000, Time: 12.35s, Mean: -40.12, Min: -75.00, Max: -3.00\n"


def test_published_drift_is_refused_in_lowrank_mode():
    from es_llm.trainer import TrainConfig

    with pytest.raises(ValueError, match="published_drift"):
        TrainConfig(task="t", model_name="m", output_dir="o", noise_mode="lowrank",
                    published_drift=True).validate()
