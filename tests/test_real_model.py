"""On the real bundled model (SmolLM2-135M-Instruct) in bf16 and fp16: the promises of exactness.

The tests' tiny fp32 model hides rounding and dtype problems, so everything a README sentence
promises bit for bit is checked here on the model users train: the loading path, resume after
Ctrl-C (plain, lowrank with its fp32 masters, the tuning options with Adam, and the accelerated
version: Ctrl-C to its whole process group, nothing left running), evaluation of a saved model
against the bundled base, and when several threads or processes give the same run.
Settings are small (population 2, sigma 0.01, alpha 0.005, 8 new tokens; population 4 where the
members' order on a copy is the point) so each run takes seconds of compute: most of it drawing the
noise of 135M weights (about 2 s a draw on one loaded core; two or three draws per member and
iteration).
"""
import json
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (PYTHON, ROOT, assert_session_ends, run_main, run_script, start_script,
                      two_processes)
from es_llm import checkpoint as ckpt

pytestmark = pytest.mark.slow

SMALL = ["--population_size", "2", "--sigma", "0.01", "--alpha", "0.005", "--max_new_tokens", "8"]
PROMPTS = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]


def logits(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def buffers(model):
    return {n: (b.dtype, b.clone()) for n, b in model.named_buffers()}


def same_buffers(a, b):
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1])
                                        for k in a)


def without_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in records]


def weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bundled_and_saved_directory_compute_the_same_logits(tmp_path, precision):
    """The bundled GGUF, a directory it was saved to, a checkpoint written by the trainer's save and
    (in bf16: the conversion is the same for every precision) the fp32 copy the accelerated
    version's engines load and the GGUF file loaded directly: same parameters, same buffers (the
    rotary embedding's inv_freq stays fp32), same logits bit for bit."""
    from es_llm.hf_weights import resolve_base_model
    from es_llm.models import load_model, save_model

    bundled, tokenizer = load_model("bundled", precision)
    assert bundled.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not getattr(bundled, "is_quantized", False)  # dense now: trainable (GRPO), saveable
    expected = logits(bundled, tokenizer)
    save_model(bundled, tokenizer, tmp_path / "saved")
    state = {"iteration": 1, "finished": False, "rng_state": None, "config": {}}
    checkpoint = ckpt.save_checkpoint(tmp_path / "run", bundled, tokenizer, state, [])
    sources = [tmp_path / "saved", checkpoint]
    if precision == "bf16":  # the conversion is one for every precision (loads cast its fp32)
        sources.append(resolve_base_model("bundled", tmp_path / "converted"))  # the engines' copy
    for source in sources:
        model, tok = load_model(str(source), precision)
        assert model.dtype == bundled.dtype
        assert same_tensors(dict(model.named_parameters()), dict(bundled.named_parameters()))
        assert same_buffers(buffers(model), buffers(bundled)), source
        assert torch.equal(logits(model, tok), expected), source
    if precision == "bf16":
        gguf = load_model(str(Path(__import__("es_llm.models").models.bundled_model_path())),
                          precision)[0]
        assert torch.equal(logits(gguf, tokenizer), expected)


# --------------------------------------------------------------------------- resume after Ctrl-C


def conciseness(out, iterations, *extra, model="bundled"):
    return [PYTHON, "es_fine-tuning_conciseness.py", "--model_name", model, "--output_dir", str(out),
            "--num_iterations", str(iterations), "--gpu_threads", "1", *SMALL, *extra]


FIRST_MEMBER = "member 0 seed"  # --verbose prints it while iteration 1 runs


def interrupt_after(args, line_start=FIRST_MEMBER, group=False):
    """Run `args`, send SIGINT (Ctrl-C) once a line starts with `line_start` (by default the first
    member's line of iteration 1, so the run stops after iteration 1); returns the output. With
    `group`, the signal goes to the run's whole process group, as a terminal sends it, and every
    process of the run's session (Ray and its actors) must be gone soon after it exits."""
    proc = start_script(args)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(line_start):
                if group:
                    os.killpg(proc.pid, signal.SIGINT)
                else:
                    proc.send_signal(signal.SIGINT)
                break
        output = "".join(lines) + proc.stdout.read()
        assert proc.wait(timeout=600) == 130, output
        if group:
            assert_session_ends(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return output


# Issue 23's tuning options at once: Adam on fp32 masters, a cosine schedule, 1 of the 2 prompts
# per iteration, 2 rollouts sampled at temperature 1.
TUNED = ("--optimizer", "adam", "--lr_schedule", "cosine", "--prompt_batch", "1",
         "--num_rollouts", "2", "--temperature", "1")


# fp32 masters with the published step (sgd) resume in the lowrank case (it implies them), with
# Adam in the tuned case.
@pytest.mark.parametrize("extra", [(), ("--noise_mode", "lowrank"), TUNED],
                         ids=["plain", "lowrank", "tuned"])
def test_ctrl_c_then_the_printed_resume_command_equals_the_uninterrupted_run(tmp_path, extra):
    """Two iterations, Ctrl-C during the first: the run saves iteration 1 and stops; the printed
    command runs iteration 2 (with TUNED: the same Adam state, schedule, prompt batches and
    sampled rollouts)."""
    reference = tmp_path / "reference"
    run_main(conciseness(reference, 2, "--verbose", *extra))
    out = tmp_path / "run"
    args = conciseness(out, 2, "--verbose", *extra)
    output = interrupt_after(args)
    printed = shlex.split(output.split("Resume with:\n", 1)[1].splitlines()[0])
    assert printed[:2] == ["python", "es_fine-tuning_conciseness.py"]
    assert printed[2:] == args[2:] + ["--resume", str(out)]
    stopped_at = ckpt.load_state(ckpt.list_checkpoints(out)[-1])["iteration"]
    assert stopped_at == 1
    run_main([PYTHON, *printed[1:]])
    ran = ckpt.read_metrics(out / ckpt.METRICS_FILE)
    assert without_time(ran) == without_time(ckpt.read_metrics(reference / ckpt.METRICS_FILE))
    assert len({r for record in ran for r in record["rewards"]}) > 1, "rewards should differ"
    assert same_tensors(weights(out), weights(reference))
    if extra:  # both imply fp32 masters
        assert same_tensors(load_file(str(out / ckpt.MASTER_FILE)),
                            load_file(str(reference / ckpt.MASTER_FILE)))
    if extra == TUNED:
        from test_tuning import same_saved_state

        assert same_saved_state(out, reference)  # Adam's state too
        assert [len(r["prompts"]) for r in ran] == [1, 1] and "lr" in ran[0]


ACCL = [PYTHON, str(ROOT / "tests" / "accl_varied_reward.py"), "--model_name", "bundled",
        "--engine", "transformers", "--num_engines", "2", "--schedule", "static",
        "--data_sample", "2", "--population_size", "2", "--sigma", "0.01", "--alpha", "0.005",
        "--max_new_tokens", "8"]


@pytest.mark.ray
def test_accelerated_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path):
    """Transformers engines in bf16 (the default precision here), static schedule. Ctrl-C (SIGINT
    to the whole process group, as a terminal sends it) saves a checkpoint of the last completed
    iteration, names the resume command and leaves nothing running; the resumed run equals the
    uninterrupted one, metrics and both output forms bit for bit."""
    base = ACCL + ["--experiment_dir", str(tmp_path), "--num_iterations", "2", "--verbose"]
    run_main(base + ["--run_name", "reference"])
    output = interrupt_after(base + ["--run_name", "run"], group=True)
    saved = ckpt.list_checkpoints(tmp_path / "run")
    assert len(saved) == 1 and f"checkpoint saved to {saved[0]}" in output, output
    assert "interrupted" in output and f"--resume {tmp_path / 'run'}" in output
    assert ckpt.load_state(saved[0])["iteration"] == 1
    resume = shlex.split(output.split("Resume with:\n", 1)[1].splitlines()[0])
    run_main([PYTHON, ACCL[1], *resume[2:]])
    run, reference = tmp_path / "run", tmp_path / "reference"
    records = ckpt.read_metrics(run / ckpt.METRICS_FILE)
    assert without_time(records) == without_time(ckpt.read_metrics(reference / ckpt.METRICS_FILE))
    assert len({r for record in records for r in record["rewards"]}) > 1
    assert same_tensors(torch.load(run / "final_model.pth"), torch.load(reference / "final_model.pth"))
    assert same_tensors(weights(run / "final_model"), weights(reference / "final_model"))

    # Its output forms are one model: the HF-named .pth and the published vLLM-named .pth, its
    # fused tensors split as the evaluations read them, hold the HF directory's tensors bit for
    # bit; countdown/eval_countdown.py evaluates the published form on the bundled base (every
    # form's evaluation is test_eval_countdown's, on the tiny model).
    from transformers import AutoConfig

    from es_llm.vllm_names import vllm_to_hf

    published = run / "model_saves" / "final_model_iteration_2" / "pytorch_model.pth"
    hf = weights(run / "final_model")
    config = AutoConfig.from_pretrained(run / "final_model")
    for form in (torch.load(run / "final_model.pth"), vllm_to_hf(torch.load(published), config)):
        assert set(form) - {"lm_head.weight"} == set(hf) - {"lm_head.weight"}  # tied: stored once
        assert all(torch.equal(form[k], hf[k]) for k in set(form) & set(hf))
    out = tmp_path / "eval-published"
    run_main([PYTHON, "countdown/eval_countdown.py", "--model_path", str(published),
              "--base_model_name", "bundled", "--eval_samples", "3", "--max_new_tokens", "8",
              "--torch_dtype", "bfloat16", "--mixed_precision", "no", "--save_responses",
              "--output_dir", str(out)])
    assert len(json.loads((out / "eval_detailed_results.json").read_text())) == 3


# --------------------------------------------------------------------------- evaluation


def test_the_untrained_model_saved_to_a_directory_has_kl_exactly_zero_to_the_bundled_base(tmp_path):
    from es_llm.models import load_model, save_model

    model, tokenizer = load_model("bundled", "bf16")
    save_model(model, tokenizer, tmp_path / "untrained")
    run_main([PYTHON, "eval_conciseness.py", "--model_path", str(tmp_path / "untrained"),
              "--base_model_name", "bundled", "--num_samples", "2", "--max_new_tokens", "12",
              "--output_dir", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["kl_mean"] == 0.0 and summary["kl_token_mean"] == 0.0


# --------------------------------------------------------------------------- layout


def layout_run(tmp_path, name, threads, extra=(), processes=1):
    out = tmp_path / name
    args = conciseness(out, 1, "--population_size", "4", *extra)  # 2 members per copy
    args[args.index("--gpu_threads") + 1] = str(threads)
    if processes == 1:
        run_main(args)
    else:
        run_script([*two_processes(), *args[1:]])
    return without_time(ckpt.read_metrics(out / ckpt.METRICS_FILE)), weights(out)


def test_layout_in_bf16_depends_on_the_number_of_copies_not_on_their_split(tmp_path):
    """Both sides of the README's layout claim, in bf16 without masters. A thread copy is restored
    by subtracting the noise, so member i is scored on its copy (copy i mod processes x threads) as
    left by the members before it there: 2 threads in 1 process and 1 thread in each of 2
    processes agree bit for bit; 1 copy and 2 copies score a member on different weights (whether
    that changes a reward depends on the CPU's bf16 kernels: it did on an AVX512-BF16 Xeon, not on
    an AVX2-only EPYC, so the weights are compared, not the rewards). With fp32 masters (exact
    restore) 1 and 2 copies agree."""
    from es_llm.models import load_model
    from es_llm.weightset import WeightSet

    threads, w_threads = layout_run(tmp_path, "threads", 2)
    processes, w_processes = layout_run(tmp_path, "processes", 1, processes=2)
    assert threads == processes and same_tensors(w_threads, w_processes)

    # Member 2 of the run's first iteration, on the bundled bf16 weights (two decoder layers':
    # each tensor rounds on its own): on 1 copy after members 0 and 1, on copy 0 of 2 after
    # member 0 only.
    seeds, sigma = threads[0]["seeds"], 0.01
    model, _ = load_model("bundled", "bf16")
    chosen = [(n, p) for n, p in model.named_parameters() if ".layers.0." in n or ".layers.1." in n]
    copies = {k: [(n, p.detach().clone()) for n, p in chosen] for k in ("one", "two")}
    for copy, before in (("one", seeds[:2]), ("two", seeds[:1])):
        weights = WeightSet(lambda c=copies[copy]: c, "correlated")
        for seed in before:
            weights.perturb(seed, sigma)
            weights.restore(seed, sigma)
        weights.perturb(seeds[2], sigma)
    assert [n for n, _ in copies["one"]] == [n for n, _ in copies["two"]]
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(copies["one"], copies["two"]))

    masters = ("--master_weights", "fp32")
    one, w_one = layout_run(tmp_path, "one-masters", 1, masters)
    threads, w_threads = layout_run(tmp_path, "threads-masters", 2, masters)
    assert one == threads and same_tensors(w_one, w_threads)


# --------------------------------------------------------------------------- published drift


def published_loop(precision, iterations, population, sigma, alpha, max_new_tokens, seed=33):
    """MISSION.md section 1 literally (bench/published_loop.py), one process, one thread: thread
    0's model is the canonical model, perturbed by adding sigma * eps and restored by adding
    -sigma * eps in the parameter dtype; the prompt plus response is scored; z from a numpy float32
    array; the update sums z_i * eps_i, divides by N and adds alpha times that. Returns (rewards per
    iteration, weights)."""
    import numpy as np

    from bench.published_loop import published_iteration
    from es_llm.generation import Generator
    from es_llm.models import load_model
    from es_llm.tasks import conciseness_task

    model, tokenizer = load_model("bundled", precision)
    model.set_attn_implementation("sdpa")  # transformers' own attention, as published (ours: attention.py)
    generate = Generator(tokenizer, PROMPTS, max_new_tokens)
    rng, history = np.random.RandomState(seed), []
    for _ in range(iterations):
        seeds = rng.randint(0, 2**30, size=population, dtype=np.int64)
        rewards, _ = published_iteration(model, model, seeds, generate, conciseness_task(), sigma,
                                         alpha, with_prompt=True)
        history.append(rewards)
    return history, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_published_drift_gives_the_published_rewards_and_weights(tmp_path, precision):
    from es_llm.tasks import Task, conciseness_reward
    from es_llm.trainer import TrainConfig, train

    cfg = TrainConfig(task="conciseness", model_name="bundled", output_dir=str(tmp_path / "run"),
                      num_iterations=2, population_size=4, sigma=0.01, alpha=0.005,
                      max_new_tokens=8, gpu_threads=1, precision=precision,
                      reward_on_prompt_and_response=True, published_drift=True)
    train(cfg, Task("conciseness", PROMPTS, conciseness_reward, {"target": ["8", "No"]}))
    expected_rewards, expected_weights = published_loop(precision, 2, 4, 0.01, 0.005, 8)
    ran = ckpt.read_metrics(tmp_path / "run" / ckpt.METRICS_FILE)
    assert [r["rewards"] for r in ran] == expected_rewards
    saved = weights(tmp_path / "run")
    assert all(torch.equal(saved[n], t) for n, t in expected_weights.items())
