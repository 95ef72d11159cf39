"""--es_params lora on the accelerated version (transformers engines): the same adapter as the plain
trainer, saved as a PEFT adapter, resumed exactly; the combinations it refuses."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, load_module, run_main
from es_llm import checkpoint as ckpt
from test_lora_es import adapter, same_tensors
from test_lora_es import metrics as without_time

# A task both trainers read (--task): two prompts, a reward a tiny random model earns in varied
# amounts (distinct characters / 10), so every iteration moves the adapter.
TASK = '''NAME = "distinct"
DATASET = [{"prompt": "Solve: 3 + 5 ="}, {"prompt": "Name a colour:"}]


def reward(completions, prompts, **_):
    return [len(set(c)) / 10 for c in completions]
'''
SETTINGS = ["--es_params", "lora", "--precision", "fp32", "--master_weights", "fp32",
            "--num_iterations", "2", "--population_size", "4", "--sigma", "0.05", "--alpha", "0.02",
            "--max_new_tokens", "6", "--save_every", "1", "--merge_adapter", "--report_to", "none"]
ACCL = [PYTHON, str(ROOT / "es_fine-tuning_countdown_accl.py"), "--engine", "transformers",
        "--num_engines", "2"]


def both_trainers(tiny_model_dir, tmp_path, accl_extra, plain_extra):
    """The accelerated run (2 engines, tmp_path/accl) and the plain trainer's (tmp_path/plain) of
    SETTINGS on TASK; their metrics and adapters must be equal. Returns (the common arguments,
    the accelerated run's directory)."""
    task = tmp_path / "distinct_task.py"
    task.write_text(TASK)
    common = ["--model_name", str(tiny_model_dir), "--task", str(task), *SETTINGS]
    run_main([*ACCL, *common, *accl_extra, "--experiment_dir", str(tmp_path), "--run_name",
              "accl"])
    plain = tmp_path / "plain"
    run_main([PYTHON, "es_fine-tuning.py", *common, *plain_extra, "--output_dir", plain])
    accl = tmp_path / "accl"
    assert without_time(accl) == without_time(plain)
    assert len({r for record in without_time(accl) for r in record["rewards"]}) > 1
    assert same_tensors(adapter(accl), adapter(plain))
    return common, accl


@pytest.mark.ray
@pytest.mark.slow
def test_two_engines_equal_the_plain_trainer_save_a_peft_adapter_and_resume_exactly(
        tiny_model_dir, tmp_path):
    """2 transformers engines, fp32 with fp32 masters: the metrics and the adapter equal the plain
    trainer's bit for bit; the run directory holds a PEFT adapter (no full-weight files) that
    PeftModel loads onto the base; resumed from checkpoint-1, the run equals the uninterrupted one
    (metrics, adapter, master weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common, accl = both_trainers(tiny_model_dir, tmp_path, [], ["--gpu_threads", "1"])
    plain = tmp_path / "plain"
    assert not same_tensors(adapter(accl / "checkpoint-1"), adapter(accl))
    merged = [load_file(str(run / "merged_model" / "model.safetensors")) for run in (accl, plain)]
    assert same_tensors(*merged)
    assert not any((accl / name).exists() for name in ("final_model.pth", "final_model",
                                                       "model_saves", "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, accl)
    assert all(torch.equal(p, adapter(accl)[n.replace(".default", "")])
               for n, p in loaded.named_parameters() if ".lora_" in n)

    run_main([*ACCL, *common, "--experiment_dir", str(tmp_path), "--run_name", "resumed",
              "--resume", accl / "checkpoint-1"])
    resumed = tmp_path / "resumed"
    assert without_time(resumed) == without_time(accl)
    assert same_tensors(adapter(resumed), adapter(accl))
    assert same_tensors(load_file(str(resumed / ckpt.MASTER_FILE)),
                        load_file(str(accl / ckpt.MASTER_FILE)))


@pytest.mark.ray
@pytest.mark.slow
def test_lora_batch_on_two_engines_equals_the_plain_trainers_thread_copies(tiny_model_dir,
                                                                           tmp_path):
    """--lora_batch on 2 transformers engines (each generating its members in one batched call),
    fp32 with fp32 masters: the metrics and the adapter equal the plain trainer's thread copies
    bit for bit."""
    from accelerated.engines import TransformersEngine
    from es_llm.config import AcceleratedConfig
    from es_llm.lora import BatchedLora

    cfg = AcceleratedConfig(task="t", model_name=str(tiny_model_dir), es_params="lora",
                            lora_batch=True, engine="transformers")
    engine = TransformersEngine(str(tiny_model_dir), "fp32", 6, "correlated", lora=cfg)
    assert isinstance(engine.batched, BatchedLora)  # what an engine given --lora_batch evaluates on
    both_trainers(tiny_model_dir, tmp_path, ["--lora_batch"], ["--gpu_threads", "2"])


def refusal(argv, capsys) -> str:
    """The accelerated front's checks alone (no Ray, nothing written): its exit-2 message."""
    script = load_module(ROOT / "es_fine-tuning_countdown_accl.py", "front_accl_lora")
    with pytest.raises(SystemExit) as leaving:
        script.settings(argv)
    assert leaving.value.code == 2
    return capsys.readouterr().err


def test_an_adapter_vllm_cannot_serve_and_lowrank_noise_are_refused(tmp_path, capsys):
    """On vLLM engines: a rank above 512 or targets beyond the decoder's projections (each its
    own line, before any engine starts)."""
    common = ["--es_params", "lora", "--precision", "fp32", "--data_sample", "4",
              "--experiment_dir", str(tmp_path)]
    vllm = refusal([*common, "--engine", "vllm", "--lora_rank", "1024", "--lora_targets",
                    "q_proj,embed_tokens"], capsys)
    assert "--lora_rank 1024: vLLM engines serve LoRA adapters of rank at most 512" in vllm
    assert "--lora_targets embed_tokens: vLLM engines apply LoRA adapters" in vllm
    lowrank = refusal([*common, "--engine", "transformers", "--noise_mode", "lowrank"], capsys)
    assert "--es_params lora cannot be combined with --noise_mode lowrank" in lowrank
    full = refusal(["--engine", "transformers", "--lora_rank", "4", *common[2:]], capsys)
    assert "--lora_rank only applies to --es_params lora" in full
    merge = refusal(["--engine", "transformers", "--merge_adapter", *common[2:]], capsys)
    assert "--merge_adapter only applies to --es_params lora" in merge
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("targets, extra, expected", [
    ("q_proj,v_porj", [], "error: --lora_targets names v_porj, which {} does not have"),
    ("embed_tokens,q_proj", ["--lora_batch"],
     "error: --lora_batch applies adapters on linear layers only; --lora_targets names "
     "model.embed_tokens (Embedding) in {}")], ids=["a typo", "an embedding with --lora_batch"])
def test_a_target_the_model_lacks_is_named_before_any_engine_starts(tiny_model_dir, tmp_path,
                                                                    targets, extra, expected):
    """And, with --lora_batch, a target that is not a linear layer."""
    script = load_module(ROOT / "es_fine-tuning_countdown_accl.py", "front_accl_lora_targets")
    with pytest.raises(SystemExit) as leaving:
        script.main(["--engine", "transformers", "--es_params", "lora", "--precision", "fp32",
                     "--model_name", str(tiny_model_dir), "--lora_targets", targets, *extra,
                     "--data_sample", "4", "--experiment_dir", str(tmp_path), "--run_name", "r"])
    assert str(leaving.value.code).startswith(expected.format(tiny_model_dir))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
