"""countdown/eval_countdown.py, eval_countdown_vllm.py (the parts that need no vLLM) and
countdown/scripts/eval.sh: the published command lines and defaults, item selection, scoring with the
trainer's reward, the summary.json shape, and runs on a tiny model (in process, a few tokens)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from countdown.countdown_task import load_countdown_data, make_task
from es_llm.evaluation import Sample, guess_base_model
from es_llm.generation import Generator
from es_llm.models import load_model
from es_llm.vllm_names import hf_to_vllm
from conftest import PYTHON, ROOT, load_module, run_main

SCRIPT = ROOT / "countdown" / "eval_countdown.py"
TRAINER = ROOT / "countdown" / "es_fine-tuning_countdown.py"
EVAL_SH = ROOT / "countdown" / "scripts" / "eval.sh"
TOP_KEYS = {"model_path", "base_model_name", "eval_stats", "generation_config"}
STATS_KEYS = {"dataset_name", "num_samples", "avg_reward", "avg_format_reward", "avg_answer_reward",
              "std_reward", "min_reward", "max_reward", "high_reward_count",
              "high_reward_percentage", "correct_count", "accuracy", "eval_time"}
GENERATION_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_p", "batch_size",
                   "mixed_precision"}
RECORD_FIELDS = {"index", "id", "prompt", "response", "numbers", "target", "reward",
                 "format_reward", "answer_reward", "correct"}
N_ITEMS = len(load_countdown_data(split="all"))


ev = load_module(SCRIPT, "eval_countdown")
vl = load_module(ROOT / "eval_countdown_vllm.py", "eval_countdown_vllm")


# --------------------------------------------------------------------------- command lines

def test_published_command_line_parses_with_the_published_defaults():
    args = ev.build_parser().parse_args(["--model_path", "X"])
    assert (args.model_path, args.base_model_name) == ("X", None)
    assert (args.eval_samples, args.eval_offset, args.max_new_tokens) == (100, -100, 1024)
    assert (args.do_sample, args.temperature, args.top_p) == (False, 0.8, 0.9)
    assert (args.batch_size, args.device, args.torch_dtype, args.mixed_precision) == \
        (None, "auto", "auto", "fp16")
    assert (args.output_dir, args.save_responses, args.verbose, args.show_examples) == \
        (None, False, False, 5)
    argv = ["--model_path", "X", "--base_model_name", "B", "--train_data_path", "A",
            "--eval_data_path", "E", "--eval_samples", "4", "--eval_offset", "-4",
            "--max_new_tokens", "8", "--do_sample", "--temperature", "0.7", "--top_p", "0.95",
            "--batch_size", "2", "--device", "cpu", "--torch_dtype", "float32",
            "--mixed_precision", "no", "--output_dir", "O", "--save_responses", "--verbose",
            "--show_examples", "1"]
    args = ev.build_parser().parse_args(argv)
    assert (args.train_data_path, args.eval_data_path, args.eval_offset, args.batch_size) == \
        ("A", "E", -4, 2)
    assert (args.torch_dtype, args.mixed_precision, args.temperature, args.top_p) == \
        ("float32", "no", 0.7, 0.95)
    assert args.do_sample and args.save_responses and args.verbose
    # this project's --precision stays, as an alias of --torch_dtype
    assert ev.build_parser().parse_args(["--model_path", "X", "--precision", "bf16"]).torch_dtype \
        == "bfloat16"
    with pytest.raises(SystemExit):
        ev.build_parser().parse_args([])  # --model_path is required
    with pytest.raises(SystemExit):
        ev.build_parser().parse_args(["--model_path", "X", "--mixed_precision", "fp8"])


def test_vllm_command_line_parses_with_the_published_defaults_and_the_old_aliases():
    args = vl.build_parser().parse_args(["--trained_model_path", "w.pth"])
    assert (args.model_id, args.trained_model_path) == ("Qwen/Qwen2.5-3B-Instruct", "w.pth")
    assert (args.eval_samples, args.eval_offset, args.max_new_tokens) == (100, -100, 1024)
    assert (args.do_sample, args.temperature, args.top_p) == (False, 0.8, 0.9)
    assert (args.batch_size, args.tensor_parallel_size, args.dtype, args.show_examples) == \
        (None, 1, "float16", 5)
    argv = ["--model_id", "M", "--trained_model_path", "w.pth", "--train_data_path", "A",
            "--eval_data_path", "E", "--eval_samples", "4", "--eval_offset", "-4",
            "--max_new_tokens", "8", "--do_sample", "--temperature", "0.5", "--top_p", "0.8",
            "--batch_size", "2", "--tensor_parallel_size", "2", "--dtype", "bfloat16",
            "--output_dir", "O", "--save_responses", "--verbose", "--show_examples", "0"]
    args = vl.build_parser().parse_args(argv)
    assert (args.model_id, args.tensor_parallel_size, args.dtype, args.eval_offset) == \
        ("M", 2, "bfloat16", -4)
    old = vl.build_parser().parse_args(["--model_path", "w.pth", "--base_model_name", "B",
                                        "--precision", "fp32"])
    assert (old.trained_model_path, old.model_id, old.dtype) == ("w.pth", "B", "float32")
    with pytest.raises(SystemExit):
        vl.build_parser().parse_args(["--model_id", "M"])  # --trained_model_path is required


def read_stub_calls(log):
    return [json.loads(line) for line in Path(log).read_text().splitlines()]


@pytest.fixture
def stub_python(tmp_path):
    """A `python` first on PATH that records its arguments (one JSON list per call)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(f"#!{PYTHON}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def run_eval_sh(stub, **env):
    bin_dir, _ = stub
    full = {k: v for k, v in os.environ.items()
            if k not in ("MODEL_PATH", "BASE_MODEL_NAME", "EVAL_SAMPLES", "BATCH_SIZE",
                         "MAX_NEW_TOKENS")}
    full |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(EVAL_SH)], env=full, capture_output=True, text=True,
                          cwd="/")


def test_eval_sh_runs_the_published_evaluation_from_the_environment(stub_python):
    proc = run_eval_sh(stub_python, MODEL_PATH="runs/final",
                       BASE_MODEL_NAME="Qwen/Qwen2.5-3B-Instruct")
    assert proc.returncode == 0, proc.stderr
    [argv] = read_stub_calls(stub_python[1])
    assert argv == ["countdown/eval_countdown.py", "--model_path", "runs/final",
                    "--base_model_name", "Qwen/Qwen2.5-3B-Instruct", "--eval_samples", "2000",
                    "--eval_offset", "-2000", "--batch_size", "500", "--max_new_tokens", "1024",
                    "--save_responses", "--show_examples", "5"]
    args = ev.build_parser().parse_args(argv[1:])
    assert (args.eval_samples, args.eval_offset, args.batch_size, args.max_new_tokens) == \
        (2000, -2000, 500, 1024)
    assert args.save_responses and args.show_examples == 5 and not args.do_sample


def test_eval_sh_without_base_model_lets_the_script_guess_and_needs_a_model_path(stub_python):
    assert run_eval_sh(stub_python, MODEL_PATH="m").returncode == 0
    [argv] = read_stub_calls(stub_python[1])
    assert "--base_model_name" not in argv and argv[1:3] == ["--model_path", "m"]
    proc = run_eval_sh(stub_python)
    assert proc.returncode == 2 and "MODEL_PATH" in proc.stderr


# --------------------------------------------------------------------------- items and scores

def test_a_negative_offset_selects_the_last_items():
    items, offset = ev.select_items(ev.DEFAULT_DATA_PATH, -4, 4)
    assert offset == N_ITEMS - 4
    assert [i["id"] for i in items] == [i["id"] for i in load_countdown_data(split="all")[-4:]]
    items, offset = ev.select_items(ev.DEFAULT_DATA_PATH, -2000, 2000)  # the paper's test split
    assert offset == N_ITEMS - 2000 and len(items) == 2000
    assert items == load_countdown_data(split="test")


def test_offset_and_count_select_a_slice_clipped_at_the_end_and_out_of_range_is_refused(capsys):
    items, offset = ev.select_items(ev.DEFAULT_DATA_PATH, 0, 3)
    assert offset == 0 and [i["id"] for i in items] == [0, 1, 2]
    items, offset = ev.select_items(ev.DEFAULT_DATA_PATH, -2, 5)
    assert len(items) == 2 and "only 2 items" in capsys.readouterr().out
    items, offset = ev.select_items(ev.DEFAULT_DATA_PATH, None, None)  # library default: test split
    assert offset == 200 and len(items) == 2000
    for bad in (N_ITEMS, -N_ITEMS - 1):
        with pytest.raises(ValueError, match="outside"):
            ev.select_items(ev.DEFAULT_DATA_PATH, bad, 1)


def test_scores_match_the_trainer_task_and_the_stats_are_in_percent():
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
    assert records[0]["reward"] == pytest.approx(1.1) and records[0]["correct"]
    stats = ev.eval_stats(records, 2.0, "countdown")
    assert set(stats) == STATS_KEYS
    assert (stats["correct_count"], stats["accuracy"]) == (1, 25.0)
    assert (stats["high_reward_count"], stats["high_reward_percentage"]) == (1, 25.0)
    assert stats["max_reward"] == pytest.approx(1.1) and stats["eval_time"] == 2.0
    assert stats["num_samples"] == 4 and stats["dataset_name"] == "countdown"


def test_the_default_output_directory_is_named_after_the_model():
    assert ev.output_name("runs/x/checkpoint-100/") == "checkpoint-100"
    assert ev.output_name("Qwen/Qwen2.5-3B-Instruct") == "Qwen2.5-3B-Instruct"
    assert ev.output_name("r/model_saves/final_model_iteration_10/pytorch_model.pth") == \
        "final_model_iteration_10_pytorch_model"
    assert ev.output_name("bundled") == "SmolLM2-135M-Instruct"


def test_the_base_model_is_guessed_from_what_sits_beside_the_weights(tmp_path):
    plain = tmp_path / "plain" / "checkpoint-100"
    plain.mkdir(parents=True)
    (plain / "trainer_state.json").write_text(json.dumps({"config": {"model_name": "org/A"}}))
    assert guess_base_model(plain)[0] == "org/A"
    run = tmp_path / "accl" / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model_name": "org/B", "sigma": 0.001}))
    (run / "final_model.pth").write_bytes(b"")
    assert guess_base_model(run / "final_model.pth")[0] == "org/B"
    saves = tmp_path / "published" / "model_saves"
    (saves / "base_model").mkdir(parents=True)
    (saves / "base_model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (saves / "final_model_iteration_5").mkdir()
    pth = saves / "final_model_iteration_5" / "pytorch_model.pth"
    pth.write_bytes(b"")
    assert guess_base_model(pth)[0] == str(saves / "base_model")
    name = "Qwen/Qwen2.5-3B-Instruct_es_random_seed33_pop30_iter500_sigma0.001_final"
    assert guess_base_model(name)[0] == "Qwen/Qwen2.5-3B-Instruct"
    assert guess_base_model(tmp_path / "lonely.pth")[0] == "Qwen/Qwen2.5-3B-Instruct"


# --------------------------------------------------------------------------- runs on a tiny model

def run_eval(argv):
    """The script's evaluation in this process (no new interpreter): the summary it wrote."""
    args = ev.build_parser().parse_args(argv)
    return ev.evaluate(args)


def read_details(out):
    return json.loads((Path(out) / ev.DETAILS_FILE).read_text())


def test_greedy_run_writes_the_published_summary_shape(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "eval"
    summary = run_eval(["--model_path", str(tiny_model_dir), "--eval_samples", "4",
                        "--eval_offset", "-4", "--max_new_tokens", "4", "--device", "cpu",
                        "--save_responses", "--show_examples", "2", "--output_dir", str(out)])
    stdout = capsys.readouterr().out
    for text in ("Average reward:", "+/-", "Accuracy: ", "/4 (", "High reward (>= 1.0):",
                 "Reward range: [", "Time per sample:"):
        assert text in stdout
    assert stdout.count("--- item ") == 2
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(written) == TOP_KEYS | {"run_info"}  # the published keys, extras under run_info
    assert set(written["eval_stats"]) == STATS_KEYS
    assert set(written["generation_config"]) == GENERATION_KEYS
    gen = written["generation_config"]
    assert gen == {"max_new_tokens": 4, "do_sample": False, "temperature": None, "top_p": None,
                   "batch_size": 4, "mixed_precision": "fp16"}  # batch: min(32, samples)
    assert written["model_path"] == str(tiny_model_dir)
    assert written["run_info"]["autocast"] is None  # fp16 autocast is not applied on CPU
    assert written["run_info"]["torch_dtype"] == "fp32"  # auto: the saved dtype

    records = read_details(out)
    assert len(records) == 4 and all(set(r) >= RECORD_FIELDS for r in records)
    assert [r["index"] for r in records] == list(range(N_ITEMS - 4, N_ITEMS))
    stats = written["eval_stats"]
    assert stats["num_samples"] == 4 and stats["dataset_name"] == "countdown"
    assert stats["avg_reward"] == pytest.approx(sum(r["reward"] for r in records) / 4)
    assert stats["accuracy"] == 100.0 * sum(r["answer_reward"] > 0 for r in records) / 4
    task = make_task(split="test")
    assert [r["prompt"] for r in records] == task.prompts[-4:]
    assert [r["reward"] for r in records] == [
        ev.reward_function(r["response"], r["numbers"], r["target"])["reward"] for r in records]


def test_sampling_records_temperature_and_top_p_and_bf16_autocast_applies_on_cpu(tmp_path,
                                                                                   tiny_model_dir):
    out = tmp_path / "eval"
    summary = run_eval(["--model_path", str(tiny_model_dir), "--eval_samples", "2",
                        "--eval_offset", "-2", "--max_new_tokens", "3", "--do_sample",
                        "--device", "cpu", "--mixed_precision", "bf16", "--output_dir", str(out)])
    gen = summary["generation_config"]
    assert (gen["do_sample"], gen["temperature"], gen["top_p"], gen["mixed_precision"]) == \
        (True, 0.8, 0.9, "bf16")
    assert summary["run_info"]["autocast"] == "bf16"
    assert not (out / ev.DETAILS_FILE).exists()  # only with --save_responses


@pytest.mark.slow
def test_a_vllm_named_pth_evaluates_like_the_model_directory(tmp_path, tiny_model_dir):
    """The accelerated trainer's .pth (fused names) on its base model answers as the HF model."""
    model, _ = load_model(str(tiny_model_dir), "fp32")
    torch.save(hf_to_vllm(model.state_dict(), model.config), tmp_path / "pytorch_model.pth")
    common = ["--eval_samples", "3", "--eval_offset", "-3", "--max_new_tokens", "4",
              "--device", "cpu", "--mixed_precision", "no", "--save_responses"]
    run_eval(["--model_path", str(tiny_model_dir), *common, "--output_dir", str(tmp_path / "hf")])
    summary = run_eval(["--model_path", str(tmp_path / "pytorch_model.pth"), "--base_model_name",
                        str(tiny_model_dir), *common, "--output_dir", str(tmp_path / "pth")])
    assert summary["base_model_name"] == str(tiny_model_dir)
    assert [r["response"] for r in read_details(tmp_path / "pth")] == \
        [r["response"] for r in read_details(tmp_path / "hf")]


@pytest.mark.slow
def test_vllm_script_turns_a_vllm_named_pth_into_the_hf_model(tmp_path, tiny_model_dir):
    """What eval_countdown_vllm.py hands vLLM (no vLLM needed to build it): an HF directory with
    exactly the .pth's weights."""
    model, _ = load_model(str(tiny_model_dir), "fp32")
    torch.save(hf_to_vllm(model.state_dict(), model.config), tmp_path / "w.pth")
    args = vl.build_parser().parse_args(["--trained_model_path", str(tmp_path / "w.pth"),
                                         "--model_id", str(tiny_model_dir)])
    model_dir = vl.prepare_model_dir(args, tmp_path / "work")
    rebuilt, tokenizer = load_model(model_dir, "fp32")
    assert (Path(model_dir) / "tokenizer_config.json").exists()
    for (name, a), b in zip(rebuilt.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


class FakeLLM:
    """Stands in for vllm.LLM: records how it was built and answers every prompt with its length."""
    built = []

    def __init__(self, **kwargs):
        assert Path(kwargs["model"], "config.json").exists()  # the directory exists while it loads
        FakeLLM.built.append(kwargs)
        self.calls = []

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.calls.append(len(prompts))
        FakeLLM.built[-1]["calls"] = self.calls
        FakeLLM.built[-1]["params"] = params
        FakeLLM.built[-1]["lora_request"] = lora_request
        texts = [f" {len(p)}</think>\n<answer>1</answer>" for p in prompts]
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts]


@pytest.mark.slow
def test_vllm_script_glue_with_a_stand_in_for_vllm(tmp_path, tiny_model_dir, monkeypatch):
    """eval_countdown_vllm.evaluate end to end with a fake vllm module: the engine settings, batches
    of --batch_size, greedy parameters, the summary shape and the details file."""
    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # restored afterwards
    model, _ = load_model(str(tiny_model_dir), "fp32")
    torch.save(hf_to_vllm(model.state_dict(), model.config), tmp_path / "w.pth")
    out = tmp_path / "out"
    args = vl.build_parser().parse_args(
        ["--model_id", str(tiny_model_dir), "--trained_model_path", str(tmp_path / "w.pth"),
         "--eval_samples", "5", "--eval_offset", "-5", "--max_new_tokens", "7", "--batch_size",
         "2", "--save_responses", "--output_dir", str(out)])
    FakeLLM.built.clear()
    summary = vl.evaluate(args)
    [built] = FakeLLM.built
    assert built["dtype"] == "float16" and built["tensor_parallel_size"] == 1
    # one worker: in this process, no engine-core or worker process importing vLLM again
    assert built["distributed_executor_backend"] == "uni"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert built["calls"] == [2, 2, 1]
    assert built["params"] == {"temperature": 0.0, "top_p": 1.0, "seed": None, "max_tokens": 7}
    assert not Path(built["model"]).exists()  # the temporary HF directory is removed
    assert set(summary) == TOP_KEYS | {"run_info"}
    assert set(summary["eval_stats"]) == STATS_KEYS
    assert set(summary["generation_config"]) == GENERATION_KEYS
    assert summary["generation_config"]["temperature"] is None
    assert summary["generation_config"]["batch_size"] == 2
    assert (summary["model_path"], summary["base_model_name"]) == \
        (str(tmp_path / "w.pth"), str(tiny_model_dir))
    assert summary["eval_stats"]["num_samples"] == 5
    assert summary["eval_stats"]["avg_format_reward"] == 1.0
    records = read_details(out)
    assert [r["index"] for r in records] == list(range(N_ITEMS - 5, N_ITEMS))
    assert records[0]["response"] == f" {len(records[0]['prompt'])}</think>\n<answer>1</answer>"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


@pytest.mark.slow
def test_vllm_script_serves_an_adapter_as_a_lora_request(tmp_path, tiny_model_dir, monkeypatch):
    """An adapter directory (--es_params lora's output): vLLM is built on the base model with LoRA
    on (max_lora_rank the smallest rank it serves that fits) and every generate call carries the
    adapter's LoRARequest. An adapter made for another base model, or of a rank vLLM cannot
    serve, is refused with its reason before anything runs."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_dir), "fp32")
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(adapter)
    flags = ["--trained_model_path", str(adapter), "--eval_samples", "3", "--max_new_tokens", "7",
             "--output_dir", str(tmp_path / "out")]
    for model_id, rank, expected in ((tmp_path, 4, f"trained on base model {str(tiny_model_dir)!r}"),
                                     (tiny_model_dir, 1024, "rank at most 512")):
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": rank}))
        with pytest.raises(SystemExit) as exit_:
            vl.main(["--model_id", str(model_id), *flags])
        assert expected in str(exit_.value.code)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    assert not (tmp_path / "out").exists()

    request = SimpleNamespace(LoRARequest=lambda name, number, path: (name, number, path))
    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw,
                           lora=SimpleNamespace(request=request))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.lora", fake.lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    FakeLLM.built.clear()
    summary = vl.evaluate(vl.build_parser().parse_args(["--model_id", str(tiny_model_dir), *flags]))
    [built] = FakeLLM.built
    assert Path(built["model"]).resolve() == Path(tiny_model_dir).resolve()
    assert (built["enable_lora"], built["max_loras"], built["max_lora_rank"]) == (True, 1, 8)
    assert built["lora_request"] == ("adapter", 1, str(adapter.resolve()))
    assert (summary["model_path"], summary["base_model_name"]) == (str(adapter), str(tiny_model_dir))


def test_bad_flags_exit_with_the_reason(tmp_path):
    with pytest.raises(SystemExit) as exit_:  # the script's main, in this process
        ev.main(["--model_path", "X", "--eval_samples", "0", "--output_dir", str(tmp_path)])
    assert exit_.value.code not in (0, None)
    assert "--eval_samples must be >= 1" in str(exit_.value.code)


@pytest.mark.slow
def test_trained_model_and_checkpoint_evaluate_with_the_training_rewards(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run_main([PYTHON, str(TRAINER), "--model_name", str(tiny_model_dir), "--data_sample", "3",
                "--num_iterations", "2", "--population_size", "2", "--gpu_threads", "1",
                "--max_new_tokens", "8", "--save_every", "1", "--output_dir", str(run)])
    task = make_task(data_sample=3)
    for model_dir in (run, run / "checkpoint-1"):
        out = tmp_path / f"eval-{model_dir.name}"
        proc = run_main([PYTHON, str(SCRIPT), "--model_path", str(model_dir), "--eval_offset",
                         "0", "--eval_samples", "3", "--max_new_tokens", "8",
                         "--save_responses", "--output_dir", str(out), "--device", "cpu"])
        assert "are training items" in proc.stdout  # items 0..2 are training items
        summary = json.loads((out / "summary.json").read_text())
        assert summary["base_model_name"] == str(tiny_model_dir)  # recorded by the trainer
        assert summary["run_info"]["torch_dtype"] == "bf16"  # the trainer's, from the config
        records = read_details(out)
        # The trainer's own generation and scoring of the same items with the saved weights.
        model, tokenizer = load_model(str(model_dir), "bf16")
        completions = Generator(tokenizer, task.prompts, 8)(model)
        assert [r["response"] for r in records] == completions
        assert [r["reward"] for r in records] == task.score(completions)
