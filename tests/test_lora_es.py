"""ES in LoRA space (--es_params lora): the update on the adapter's tensors, the PEFT adapter a run
saves (and the merged model), exact resume, the evaluation scripts on an adapter, bad input."""
import json
import shlex
import signal
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PYTHON, ROOT, build_tiny_model, load_module, run_main, start_script
from es_llm import checkpoint as ckpt

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = ["--population_size", "4", "--sigma", "0.05", "--alpha", "0.02", "--max_new_tokens", "6",
        "--report_to", "none"]
PROMPTS = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]


def lora_run(model_dir, out, iterations, *extra, precision="fp32", threads=2):
    return [PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(model_dir),
            "--output_dir", str(out), "--num_iterations", str(iterations), "--es_params", "lora",
            "--precision", precision, "--gpu_threads", str(threads), *TINY, *extra]


def metrics(out):
    return [{k: v for k, v in r.items() if not k.startswith("time")}
            for r in ckpt.read_metrics(Path(out) / ckpt.METRICS_FILE)]


def adapter(directory):
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logits(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def base_model(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


@pytest.mark.parametrize("noise_mode", ["correlated", "iid"])
def test_one_update_equals_a_recomputation_from_the_logged_seeds_and_rewards(
        tiny_model_dir, tmp_path, noise_mode):
    """Written from the description alone: PEFT's adapter seeded with initial_seed, eps of the k-th
    adapter tensor (named_parameters order) from seed (correlated) or seed + k (iid), z-scores in
    numpy float32, theta += alpha * (sum_i z_i eps_i) / N; the base model is not saved again."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path / "run"
    run_main(lora_run(tiny_model_dir, out, 1, "--noise_mode", noise_mode))
    torch.manual_seed(33)
    model = get_peft_model(base_model(tiny_model_dir), LoraConfig(
        r=8, lora_alpha=16, target_modules=PROJECTIONS, lora_dropout=0.0))
    (record,) = metrics(out)
    r = np.asarray(record["rewards"], dtype=np.float32)
    z = (r - r.mean()) / (r.std() + 1e-8)
    saved = adapter(out)
    tensors = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
    assert len(tensors) == len(saved) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for k, (name, before) in enumerate(tensors):
        update = torch.zeros_like(before)
        for seed, zi in zip(record["seeds"], z):
            g = torch.Generator().manual_seed(seed + (k if noise_mode == "iid" else 0))
            update.add_(torch.randn(before.shape, generator=g, dtype=before.dtype).mul_(float(zi)))
        expected = before.detach() + update.div_(4).mul_(0.02)
        assert torch.equal(saved[name.replace(".default", "")], expected), name
        assert not torch.equal(expected, before), name  # every tensor moved
    assert not (out / "model.safetensors").exists()  # the base model is not saved again


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_the_saved_adapter_and_the_merged_model_compute_the_trained_models_logits(
        tiny_model_dir, tmp_path, precision):
    """The trained model in memory (captured before the final save) against the adapter loaded
    with PEFT onto the base model (the same logits, bit for bit) and against merged_model/ (fp32:
    within 1e-5; bf16 merging rounds the merged weights to bf16, so it is not compared there)."""
    from es_llm import trainer
    from peft import PeftModel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trained, save_final = {}, trainer.LocalEvaluator.save_final

    def capture(self, *args):
        trained["logits"] = logits(self.population.base, tokenizer)
        save_final(self, *args)

    out = tmp_path / "run"
    with mock.patch.object(trainer.LocalEvaluator, "save_final", capture):
        run_main(lora_run(tiny_model_dir, out, 1, "--merge_adapter", precision=precision,
                          threads=1))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 8
    assert set(config["target_modules"]) == set(PROJECTIONS)
    assert not (out / "README.md").exists()
    loaded = PeftModel.from_pretrained(base_model(tiny_model_dir, dtype), out)
    assert torch.equal(logits(loaded, tokenizer), trained["logits"])
    assert not torch.equal(logits(base_model(tiny_model_dir, dtype), tokenizer), trained["logits"])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_model")
    assert merged.dtype == dtype and not any("lora" in n for n, _ in merged.named_parameters())
    if precision == "fp32":
        torch.testing.assert_close(logits(merged, tokenizer), trained["logits"], atol=1e-5,
                                   rtol=0)
        run_main(lora_run(tiny_model_dir, out, 1, "--es_params", "full", "--overwrite",
                          precision=precision, threads=1))  # a full run replaces this one
        assert not [p for p in out.iterdir() if "adapter" in p.name or "merged" in p.name]


@pytest.mark.slow  # seconds: the full suite runs it, the fast set does not
def test_resume_from_a_checkpoint_gives_the_uninterrupted_adapter_bit_for_bit(
        tiny_model_dir, tmp_path):
    """bf16 base, fp32 masters, two thread copies: resumed from checkpoint-1 into a new directory,
    the metrics, the adapter and the master weights equal the uninterrupted run's."""
    extra = ("--save_every", "1", "--master_weights", "fp32")
    full, part = tmp_path / "full", tmp_path / "part"
    run_main(lora_run(tiny_model_dir, full, 2, *extra, precision="bf16"))
    run_main(lora_run(tiny_model_dir, part, 2, *extra, "--resume", full / "checkpoint-1",
                      precision="bf16"))
    assert metrics(part) == metrics(full)
    assert same_tensors(adapter(part), adapter(full))
    assert same_tensors(load_file(str(part / ckpt.MASTER_FILE)),
                        load_file(str(full / ckpt.MASTER_FILE)))
    assert not same_tensors(adapter(full / "checkpoint-1"), adapter(full))


@pytest.mark.slow
def test_lora_init_continues_from_an_adapter_and_evaluation_scripts_read_adapters(
        tiny_model_dir, tmp_path):
    """A run started from another run's adapter (--lora_init) begins where that one ended; both
    evaluation scripts evaluate an adapter directory on its base model."""
    from es_llm import lora, trainer

    first, second = tmp_path / "first", tmp_path / "second"
    run_main(lora_run(tiny_model_dir, first, 1, threads=1))
    started = {}

    def attach(*args):
        model = lora.attach_adapter(*args)
        started.update({n.replace(".default", ""): t.clone()
                        for n, t in lora.adapter_tensors(model)})
        return model

    with mock.patch.object(trainer, "attach_adapter", attach):
        run_main(lora_run(tiny_model_dir, second, 1, "--lora_init", first, threads=1))
    assert same_tensors(started, adapter(first))
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"prompt": PROMPTS[0], "target": "8"}]))
    conciseness = load_module(ROOT / "eval_conciseness.py", "eval_conciseness_lora")
    summary = conciseness.evaluate(conciseness.build_parser().parse_args(
        ["--model_path", str(second), "--base_model_name", str(tiny_model_dir), "--num_samples",
         "2", "--max_new_tokens", "6", "--eval_data_path", str(items),
         "--output_dir", str(tmp_path / "eval")]))
    assert summary["precision"] == "fp32" and summary["kl_mean"] > 0
    countdown = tmp_path / "countdown"
    run_main([PYTHON, "countdown/eval_countdown.py", "--model_path", second, "--eval_samples", "2",
              "--max_new_tokens", "6", "--output_dir", countdown])  # base model: as recorded
    saved = json.loads((countdown / "summary.json").read_text())
    assert saved["base_model_name"] == str(tiny_model_dir)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_adapter_without_the_models_weights_is_the_attached_one(tiny_model_dir, tmp_path,
                                                                   precision):
    """initial_adapter (vLLM engines keep no HF model): PEFT's initialisation on the model's
    meta-device structure equals attach_adapter's on the loaded model, names, order, dtype and
    values; with --lora_init, the adapter read from the directory."""
    from es_llm.config import TrainConfig
    from es_llm.lora import attach_adapter, initial_adapter, saved_tensors
    from es_llm.models import PRECISIONS, load_model

    cfg = TrainConfig(task="t", model_name=str(tiny_model_dir), es_params="lora", lora_rank=4,
                      lora_targets="q_proj,v_proj,down_proj", precision=precision,
                      initial_seed=7)
    attached = attach_adapter(load_model(str(tiny_model_dir), precision)[0], cfg)
    expected = [(n, t.detach().clone()) for n, t in saved_tensors(attached)]
    got = initial_adapter(str(tiny_model_dir), cfg, PRECISIONS[precision])
    assert [n for n, _ in got] == [n for n, _ in expected] and len(got) == 2 * 3 * 2
    assert all(a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
               for (_, a), (_, b) in zip(got, expected))
    with torch.no_grad():
        for _, tensor in saved_tensors(attached):
            tensor.add_(0.5)
    attached.save_pretrained(tmp_path / "adapter")
    cfg.lora_init = str(tmp_path / "adapter")
    read = initial_adapter(str(tiny_model_dir), cfg, PRECISIONS[precision])
    assert all(torch.equal(a, b + 0.5) for (_, a), (_, b) in zip(read, expected))


def refused(args, capsys) -> str:
    """The error line a trainer's command line exits with (it must exit non-zero)."""
    script = load_module(ROOT / args[1], "front_lora_refused")
    with mock.patch.object(sys, "argv", [args[1], *map(str, args[2:])]):
        with pytest.raises(SystemExit) as leaving:
            script.main()
    message = str(leaving.value.code) if leaving.value.code not in (0, None) else ""
    assert message.startswith("error: "), capsys.readouterr()
    return message


@pytest.fixture
def other_adapter(tiny_model_dir, tmp_path):
    """An adapter for the tiny model made by PEFT itself (q_proj and v_proj, rank 4)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_bad_lora_input_is_one_clear_error_before_anything_is_written(
        tiny_model_dir, tmp_path, capsys, other_adapter):
    out = tmp_path / "run"
    lowrank = refused(lora_run(tiny_model_dir, out, 1, "--noise_mode", "lowrank"), capsys)
    assert "--es_params lora cannot be combined with --noise_mode lowrank" in lowrank
    assert lowrank.count("\n  ") == 1  # one problem listed
    full = refused(lora_run(tiny_model_dir, out, 1, "--es_params", "full", "--lora_rank", "4"),
                   capsys)
    assert "--lora_rank only applies to --es_params lora" in full
    other_base = build_tiny_model(tmp_path / "other-base", tiny_model_dir, seed=1)
    base = refused(lora_run(other_base, out, 1, "--lora_init", other_adapter, "--lora_rank", "4",
                            "--lora_alpha", "8", "--lora_targets", "q_proj,v_proj"), capsys)
    assert f"was trained on base model {str(tiny_model_dir)!r}" in base
    assert f"give --model_name {tiny_model_dir}" in base
    targets = refused(lora_run(tiny_model_dir, out, 1, "--lora_init", other_adapter), capsys)
    assert "covers target modules 'q_proj,v_proj'" in targets
    assert "give --lora_targets q_proj,v_proj" in targets and "give --lora_rank 4" in targets
    missing = refused(lora_run(tiny_model_dir, out, 1, "--lora_init", tmp_path), capsys)
    assert "is not a PEFT adapter directory" in missing
    assert not out.exists()
    typo = refused(lora_run(tiny_model_dir, out, 1, "--lora_targets", "q_proj,v_porj"), capsys)
    assert f"--lora_targets names v_porj, which {tiny_model_dir} does not have" in typo
    assert "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj" in typo
    assert not out.exists() or not any(out.iterdir())  # checked once the model is loaded


@pytest.mark.slow
def test_bundled_bf16_ctrl_c_then_resume_equals_the_uninterrupted_run_adapter_bit_for_bit(
        tmp_path):
    """The real model in bf16 (adapter fp32): Ctrl-C during iteration 1, the printed resume command,
    and the uninterrupted run give the same metrics and the same adapter, bit for bit."""
    settings = ["--model_name", "bundled", "--es_params", "lora", "--num_iterations", "2",
                "--population_size", "4", "--sigma", "0.1", "--alpha", "0.05",
                "--max_new_tokens", "8", "--gpu_threads", "2", "--report_to", "none", "--verbose"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    run_main([PYTHON, "es_fine-tuning_conciseness.py", *settings, "--output_dir", reference])
    args = [PYTHON, "es_fine-tuning_conciseness.py", *settings, "--output_dir", str(out)]
    proc = start_script(args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("member 0 seed"):  # iteration 1 runs: it stops after it
            proc.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=600) == 130, output
    printed = shlex.split(output.split("Resume with:\n", 1)[1].splitlines()[0])
    assert printed[2:] == args[2:] + ["--resume", str(out)]
    assert [r["iteration"] for r in metrics(out)] == [1]
    run_main([PYTHON, *printed[1:]])
    assert metrics(out) == metrics(reference)
    assert len({r for record in metrics(out) for r in record["rewards"]}) > 1
    assert same_tensors(adapter(out), adapter(reference))


def test_thread_copies_share_the_frozen_base_and_own_their_adapters(tiny_model_dir):
    """--gpu_threads copies in lora mode: one base model in memory, one adapter per copy; the
    WeightSet of a copy perturbs its own adapter only."""
    from es_llm.config import TrainConfig
    from es_llm.lora import adapter_tensors, attach_adapter, shared_copy
    from es_llm.weightset import WeightSet

    cfg = TrainConfig(task="t", model_name=str(tiny_model_dir), es_params="lora")
    model = attach_adapter(base_model(tiny_model_dir), cfg)
    copy_ = shared_copy(model)
    own = {id(p) for _, p in adapter_tensors(model)}
    base = [p for p in model.parameters() if id(p) not in own]
    base_copy = [p for p in copy_.parameters() if id(p) not in {id(t) for _, t in
                                                               adapter_tensors(copy_)}]
    assert len(base) == len(base_copy) and all(a is b for a, b in zip(base, base_copy))
    assert all(a is not b and torch.equal(a, b) for (_, a), (_, b) in
               zip(adapter_tensors(model), adapter_tensors(copy_)))
    before = [t.clone() for _, t in adapter_tensors(model)]
    WeightSet(lambda: adapter_tensors(copy_), "iid").perturb(7, 0.1)
    assert all(torch.equal(a, b) for a, (_, b) in zip(before, adapter_tensors(model)))
    assert not torch.equal(before[0], adapter_tensors(copy_)[0][1])



def with_adapter(model, model_name, lora_B_only=False, std=0.3):
    """`model` with a LoRA adapter whose tensors are made non-trivial (PEFT starts with B = 0):
    normal(0, std) from per-tensor seeds (B only with `lora_B_only`)."""
    from es_llm.config import TrainConfig
    from es_llm.lora import adapter_tensors, attach_adapter

    model = attach_adapter(model, TrainConfig(task="t", model_name=model_name, es_params="lora"))
    with torch.no_grad():
        for k, (name, tensor) in enumerate(adapter_tensors(model)):
            if "lora_B" in name or not lora_B_only:
                tensor.normal_(0, std, generator=torch.Generator().manual_seed(k))
    return model


def population(model, tokenizer, noise_mode, lora_batch):
    """A trainer's Population over `model` (an adapter attached) on the conciseness task, with fp32
    master weights (the thread copies restore exactly)."""
    from es_llm.config import TrainConfig
    from es_llm.generation import Generator
    from es_llm.tasks import conciseness_task
    from es_llm.trainer import Population

    cfg = TrainConfig(task="conciseness", model_name="m", es_params="lora", sigma=0.3,
                      noise_mode=noise_mode, master_weights="fp32", lora_batch=lora_batch,
                      gpu_threads=2)
    task = conciseness_task()
    return Population(model, cfg, Generator(tokenizer, task.prompts, 12), task)


@pytest.mark.slow
@pytest.mark.parametrize("noise_mode", ["correlated", "iid"])
def test_a_members_batched_rows_give_its_thread_copys_texts_rewards_and_logits(
        tiny_model_dir, noise_mode):
    """fp32: each member's rows of one batched call (--lora_batch) generate the greedy texts, and
    so the rewards, that its thread copy generates, and compute its logits bit for bit (the adapter
    made non-trivial first: PEFT starts with B = 0)."""
    model = with_adapter(base_model(tiny_model_dir), str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    seeds, signs = [5, 2**30 - 1, 77, 123456], [1.0, -1.0, 1.0, -1.0]
    found, evaluated = {}, {}
    for lora_batch in (False, True):
        texts, evaluated[lora_batch] = {}, population(model, tokenizer, noise_mode, lora_batch)
        rewards, _ = evaluated[lora_batch].evaluate_members(
            list(range(4)), seeds, lambda i, r, completions: texts.update({i: completions}), signs)
        found[lora_batch] = rewards, texts
    assert found[True] == found[False]
    assert len({tuple(t) for t in found[True][1].values()}) == 4  # the members differ
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), evaluated[True].batched.perturbed(seeds, 0.3, signs):
        rows = model(**{k: v.repeat(4, 1) for k, v in batch.items()}).logits.split(len(PROMPTS))
    copies = evaluated[False]
    for i, (seed, sign) in enumerate(zip(seeds, signs)):
        copies.copies[1].perturb(seed, sign * 0.3)
        assert torch.equal(logits(copies.models[1], tokenizer), rows[i]), i
        copies.copies[1].restore(seed, sign * 0.3)


def test_lora_batch_drops_finished_rows_and_keeps_each_members_texts(tiny_model_dir):
    """With an end token that some rows produce part-way, the pruned batched generation (rows
    leave the batch as they finish) gives each member the texts of its thread copy."""
    from es_llm.generation import Generator
    from es_llm.lora import BatchedLora, adapter_tensors, shared_copy
    from es_llm.weightset import WeightSet

    model = with_adapter(base_model(tiny_model_dir), str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    generate, seeds, signs = Generator(tokenizer, PROMPTS, 10), [3, 4, 5], [1.0, -1.0, 1.0]
    batched = BatchedLora(model, lambda: [t for _, t in adapter_tensors(model)], "iid")
    rows = {k: v.repeat(3, 1) for k, v in generate.batches[0].items()}
    with torch.no_grad(), batched.perturbed(seeds, 0.3, signs):
        new = model.generate(**rows, max_new_tokens=10, do_sample=False, eos_token_id=-1,
                             pad_token_id=tokenizer.pad_token_id)[:, rows["input_ids"].shape[1]:]
    model.generation_config.eos_token_id = int(new[1, 3])  # row 1 ends after 4 tokens
    calls = []
    with batched.perturbed(seeds, 0.3, signs) as layout:
        def on_rows(keep):
            calls.append(None if keep is None else len(keep))
            layout.select_rows(keep)
        pruned = generate.repeated(model, 3, on_rows=on_rows)
    assert calls[0] is None and 0 < calls[1] < 6, calls
    copy_ = shared_copy(model)
    weights = WeightSet(lambda: adapter_tensors(copy_), "iid", master_weights="fp32")
    for i, (seed, sign) in enumerate(zip(seeds, signs)):
        weights.perturb(seed, sign * 0.3)
        assert pruned[i] == generate(copy_), i
        weights.restore(seed, sign * 0.3)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [(), ("--num_rollouts", "2", "--temperature", "1")],
                         ids=["greedy", "sampled"])
def test_a_lora_batch_run_equals_the_thread_copy_run_bit_for_bit(tiny_model_dir, tmp_path,
                                                                 sampling):
    """fp32, 2 iterations, antithetic: --lora_batch gives the thread copies' metrics (rewards)
    and adapter bit for bit, the copies restoring exactly (--master_weights fp32; without it a
    copy's restore-by-subtraction rounds, and its later members drift); sampled rollouts too (a
    member's rollouts are row blocks of its adapter, each row seeded as a copy seeds it)."""
    copies, batched = tmp_path / "copies", tmp_path / "batched"
    extra = ("--sigma", "0.3", "--antithetic", "--noise_mode", "iid", *sampling)
    run_main(lora_run(tiny_model_dir, copies, 2, *extra, "--master_weights", "fp32"))
    run_main(lora_run(tiny_model_dir, batched, 2, *extra, "--lora_batch", threads=1))
    assert metrics(batched) == metrics(copies)
    assert len({r for record in metrics(copies) for r in record["rewards"]}) > 2
    assert same_tensors(adapter(batched), adapter(copies))


def test_lora_batch_in_a_bad_combination_is_one_clear_error_before_anything_is_written(
        tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    for extra, expected in (
            (["--es_params", "full"], "--lora_batch only applies to --es_params lora"),
            (["--published_drift"], "lowrank mode and --lora_batch never perturb the weights")):
        message = refused(lora_run(tiny_model_dir, out, 1, "--lora_batch", *extra), capsys)
        assert expected in message and message.count("\n  ") == 1, message
    assert not out.exists()
    embedding = refused(lora_run(tiny_model_dir, out, 1, "--lora_batch", "--lora_targets",
                                 "embed_tokens,q_proj"), capsys)
    assert "--lora_batch applies adapters on linear layers only" in embedding, embedding
    assert "embed_tokens.lora_embedding_A" in embedding
    assert not out.exists() or not any(out.iterdir())  # checked once the model is loaded


@pytest.mark.slow
def test_bundled_bf16_a_members_batched_rows_compute_its_thread_copys_logits_bit_for_bit():
    """The README's bf16 claim, on this CPU: the real model in bf16 (adapter fp32, B made
    non-zero), 4 members in one batched forward; each member's rows give the logits of its thread
    copy (exact restore) bit for bit."""
    from es_llm.models import load_model

    model, tokenizer = load_model("bundled", "bf16")
    model = with_adapter(model, "bundled", lora_B_only=True, std=0.02)
    seeds, signs = [100, 101, 102, 103], [1.0, -1.0, 1.0, -1.0]
    batched, copies = (population(model, tokenizer, "correlated", b) for b in (True, False))
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), batched.batched.perturbed(seeds, 0.02, signs):
        rows = model(**{k: v.repeat(4, 1) for k, v in batch.items()}).logits.split(len(PROMPTS))
    for i, (seed, sign) in enumerate(zip(seeds, signs)):
        copies.copies[1].perturb(seed, sign * 0.02)
        assert torch.equal(logits(copies.models[1], tokenizer), rows[i].float()), i
        copies.copies[1].restore(seed, sign * 0.02)
        assert not torch.equal(rows[i], rows[(i + 1) % 4])
