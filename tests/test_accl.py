"""The accelerated trainer on the transformers engine: the update, the broadcast, the saved files,
Ray across two engines, and clean shutdown."""
import json
import os
import signal

import pytest
import torch

from accelerated.engines import TransformersEngine
from conftest import (PYTHON, ROOT, assert_session_ends, load_module, run_main, shared_ray,
                      start_script, stop_shared_ray)
from es_llm.hf_weights import full_state_dict, hf_layout, save_hf_model
from es_llm.models import load_model
from es_llm.strategy import es_update, normalize_rewards
from es_llm.weightset import WeightSet

SCRIPT = str(ROOT / "es_fine-tuning_countdown_accl.py")
SEEDS = [11, 2024, 777, 31337]
REWARDS = [0.1, 0.6, 0.0, 1.1]


PLAIN_FIELDS = {"iteration", "seeds", "rewards", "reward_mean", "reward_std", "reward_min",
                "reward_max", "time_s"}


def initial_params(model_dir):
    model, _ = load_model(str(model_dir), "fp32")
    return [p.detach().clone() for p in model.parameters()]


def engine(model_dir, noise_mode="correlated", master_weights="none"):
    return TransformersEngine(str(model_dir), "fp32", max_new_tokens=4, noise_mode=noise_mode,
                              master_weights=master_weights)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.slow  # seconds: the full suite runs it, the fast set does not
@pytest.mark.parametrize("noise_mode", ["correlated", "iid"])
@pytest.mark.parametrize("master_weights", ["none", "fp32"])
def test_accelerated_update_equals_plain_es_update(tiny_model_dir, noise_mode, master_weights):
    """N seeded additions of (alpha/N) z_i eps_i == the plain trainer's es_update (fp32, 1e-6)."""
    e = engine(tiny_model_dir, noise_mode, master_weights)
    z = normalize_rewards(REWARDS)
    expected = initial_params(tiny_model_dir)
    es_update(expected, SEEDS, z, 0.01, noise_mode)
    e.weights.update(SEEDS, z, 0.01)
    got = list(e.model.parameters())
    assert max_diff(got, expected) < 1e-6
    assert max_diff(got, initial_params(tiny_model_dir)) > 1e-4  # the update did move the weights


@pytest.mark.slow
def test_restore_undoes_perturb(tiny_model_dir):
    before = initial_params(tiny_model_dir)
    exact = engine(tiny_model_dir, master_weights="fp32")
    exact.weights.perturb(5, 0.01)
    assert max_diff(list(exact.model.parameters()), before) > 1e-4
    exact.weights.restore(5, 0.01)
    assert max_diff(list(exact.model.parameters()), before) == 0.0
    published = engine(tiny_model_dir)
    published.weights.perturb(5, 0.01)
    published.weights.restore(5, 0.01)
    assert max_diff(list(published.model.parameters()), before) < 1e-6


def sampled_pair(model_dir, noise_mode: str, **settings):
    """The plain trainer's Population on 2 of 4 prompts (--prompt_batch) with 2 sampled rollouts,
    and a transformers engine with the same settings: (population, engine, prompt indices)."""
    from accl_varied_reward import make_task
    from es_llm.config import TrainConfig
    from es_llm.generation import Generator
    from es_llm.trainer import Population

    task, prompts = make_task(4), [3, 1]
    cfg = TrainConfig(task="countdown", precision="fp32", noise_mode=noise_mode, num_rollouts=2,
                      max_new_tokens=6, sigma=0.05, **settings)
    model, tokenizer = load_model(str(model_dir), "fp32")
    batch = task.subset(prompts)
    plain = Population(model, cfg, Generator(tokenizer, batch.prompts, 6, sampling=cfg.sampling(),
                                             prompt_ids=prompts), batch)
    engine = TransformersEngine(str(model_dir), "fp32", 6, noise_mode, sampling=cfg.sampling())
    engine.set_task(task)
    return plain, engine, prompts


@pytest.mark.slow
def test_an_engine_scores_a_sampled_member_on_a_prompt_batch_as_the_plain_trainer(tiny_model_dir):
    """--prompt_batch and --num_rollouts 2: the transformers engine's reward of a member (and its
    first completion) is the plain trainer's, bit for bit: the same Generator rows and row seeds."""
    plain, e, prompts = sampled_pair(tiny_model_dir, "iid", gpu_threads=1)
    reward, completions, _ = plain.evaluate(0, 7, -1.0, iteration=2)
    result = e.evaluate(7, 0.05, -1.0, prompts, 2)
    assert (result["reward"], result["completion"]) == (reward, completions[0])
    assert e.evaluate(7, 0.05, -1.0, prompts, 3)["completion"] != result["completion"]


@pytest.mark.slow
def test_an_engine_scores_a_sampled_lowrank_batch_on_a_prompt_batch_as_the_plain_trainer(
        tiny_model_dir):
    """The same in lowrank mode: the engine's batch of members (their K rollouts rows of one
    generate call) gives the plain trainer's rewards and first completions, bit for bit."""
    seeds, signs = [7, 8, 9], [1.0, -1.0, 1.0]
    plain, e, prompts = sampled_pair(tiny_model_dir, "lowrank", population_size=3)
    got = {}
    plain.evaluate_members([0, 1, 2], seeds, lambda i, reward, completions: got.update(
        {i: (reward, completions[0])}), signs, iteration=2)
    results = e.evaluate_batch(seeds, 0.05, signs, prompts, 2)
    assert [(r["reward"], r["completion"]) for r in results] == [got[i] for i in range(3)]
    assert [r["completion"] for r in e.evaluate_batch(seeds, 0.05, signs, prompts, 3)] != \
        [r["completion"] for r in results]  # the iteration seeds the rows


def test_weight_set_sees_views_of_fused_tensors():
    """A view into a fused tensor (as vLLM's q/k/v) gets its own tensor's noise and saves alone."""
    fused = torch.zeros(6, 3)
    views = lambda: [("q", fused[:4]), ("k", fused[4:])]  # noqa: E731
    weights = WeightSet(views, "iid")
    weights.perturb(3, 1.0)
    separate = [torch.zeros(4, 3), torch.zeros(2, 3)]
    from es_llm.noise import add_noise
    add_noise(separate, 3, 1.0, "iid")
    assert torch.equal(fused, torch.cat(separate))
    state = weights.state_dict()
    assert state["k"].untyped_storage().nbytes() == 2 * 3 * 4


@pytest.mark.slow  # seconds: the full suite runs it, the fast set does not
def test_weight_operations_reach_the_weight_set_and_no_other_name_passes(tiny_model_dir):
    """The Ray actor runs an engine's WeightSet operations (WEIGHT_OPS) and nothing else; so do
    the vLLM worker extension, at its published path, and the engine's handle on it."""
    from types import SimpleNamespace

    from accelerated.engines import WorkerWeights
    from accelerated.pool import EngineActor
    from countdown.countdown_task import make_task
    from utils.worker_extn import WorkerExtension

    actor = EngineActor("transformers", {"model_path": str(tiny_model_dir), "precision": "fp32",
                                         "max_new_tokens": 4, "noise_mode": "iid"}, make_task(2))
    actor.weight_op("perturb", 5, 0.01)
    assert actor.weight_op("fingerprint") == actor.engine.weights.fingerprint()
    model = engine(tiny_model_dir).model
    worker = WorkerExtension()
    worker.es_weights = WeightSet(lambda: list(model.named_parameters()), "iid")
    llm = SimpleNamespace(collective_rpc=lambda method, args: [getattr(worker, method)(*args)])
    WorkerWeights(llm).perturb(5, 0.01)
    assert WorkerWeights(llm).state_dict().keys() == actor.engine.weights.state_dict().keys()
    assert WorkerWeights(llm).fingerprint() == actor.weight_op("fingerprint")
    for refuse in (lambda: actor.weight_op("after_change"),
                   lambda: worker.es_weight_op("named_tensors")):
        with pytest.raises(ValueError, match="unknown weight operation"):
            refuse()
    with pytest.raises(AttributeError, match="not a weight operation"):
        WorkerWeights(llm).after_change()


@pytest.mark.slow  # seconds: the full suite runs it, the fast set does not
def test_pth_has_hf_names_and_hf_directory_reloads_identically(tiny_model_dir, tmp_path):
    e = engine(tiny_model_dir)
    e.weights.update(SEEDS, normalize_rewards(REWARDS), 0.01)
    layout = hf_layout(str(tiny_model_dir))
    state = full_state_dict(e.weights.state_dict(), layout)
    assert list(state) == list(e.model.state_dict())  # incl. the tied lm_head.weight
    torch.save(state, tmp_path / "final_model.pth")
    save_hf_model(state, str(tiny_model_dir), tmp_path / "final_model", "fp32")
    reloaded, tokenizer = load_model(str(tmp_path / "final_model"), "fp32")
    assert tokenizer.pad_token is not None
    pth = torch.load(tmp_path / "final_model.pth")
    hf = reloaded.state_dict()
    assert set(hf) == set(pth)
    for name in pth:
        assert torch.equal(hf[name], pth[name]), name


def test_bad_model_is_a_clear_error_before_ray_starts(tmp_path, capsys):
    import ray

    stop_shared_ray()
    script = load_module(SCRIPT, "es_accl")
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    try:
        with pytest.raises(SystemExit) as exit_:  # the script's main, in this process
            script.main(["--model_name", str(tmp_path / "missing"), "--engine", "transformers",
                         "--experiment_dir", str(tmp_path)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_.value.code not in (0, None) and str(exit_.value.code).startswith("error:")
    assert not ray.is_initialized() and "Ray" not in "".join(capsys.readouterr())


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engines_identical_after_broadcast_and_update_equals_plain(tiny_model_dir):
    import ray

    from accelerated.pool import EnginePool
    from countdown.countdown_task import make_task

    kwargs = {"model_path": str(tiny_model_dir), "precision": "fp32", "max_new_tokens": 4,
              "noise_mode": "iid"}
    shared_ray()

    @ray.remote
    def niceness():
        return os.nice(0)

    # The engines' processes keep the run's priority (Ray's default renices them to 15).
    assert ray.get(niceness.remote()) == os.nice(0)
    pool = None
    try:
        pool = EnginePool("transformers", 2, kwargs, make_task(2), use_gpu=False)
        results = pool.evaluate(SEEDS, 0.001)
        assert [set(r) >= {"reward", "noise_s", "generate_s"} for r in results] == [True] * 4
        # Knock engine 1 off the shared weights, so that the broadcast has to repair it.
        ray.get(pool.actors[1].weight_op.remote("perturb", 99, 0.05))
        assert len(set(pool.call_all("fingerprint"))) == 2
        z = normalize_rewards(REWARDS)
        pool.update(SEEDS, z, 0.01)
        pool.broadcast()
        assert len(set(pool.call_all("fingerprint"))) == 1
        expected = initial_params(tiny_model_dir)
        es_update(expected, SEEDS, z, 0.01, "iid")
        for state in pool.call_all("state_dict"):
            assert max_diff(list(state.values()), expected) < 1e-6
    finally:
        if pool:
            pool.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_two_engines_two_iterations_end_to_end(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_main([PYTHON, SCRIPT, "--model_name", str(tiny_model_dir), "--engine",
                     "transformers", "--num_engines", "2", "--population_size", "4",
                     "--num_iterations", "2", "--max_new_tokens", "8", "--data_sample", "3",
                     "--precision", "fp32", "--noise_mode", "iid", "--experiment_dir",
                     str(tmp_path), "--run_name", "run"])
    run = tmp_path / "run"
    assert "Iteration 1/2, Time:" in proc.stdout and "Iteration 2/2, Time:" in proc.stdout
    assert "all 2 engines identical" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(PLAIN_FIELDS | {"time_noise_s", "time_broadcast_s", "generations"} <= set(r)
               for r in records)

    events = EventAccumulator(str(run / "es_llm"))  # accelerate's TensorBoard tracker
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # The published tags (step = iteration index from 0), ours beside them.
    assert {"reward/mean", "reward/std", "reward/min", "reward/max",
            "time/perturbation_application", "time/broadcast", "time/iteration"} <= tags
    assert {"time/evaluate", "time/generate", "time/update"} <= tags
    assert [e.step for e in events.Scalars("reward/mean")] == [0, 1]
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx(
        [r["reward_mean"] for r in records])

    # The final weights are the plain update replayed from the logged seeds and rewards.
    expected = initial_params(tiny_model_dir)
    for r in records:
        es_update(expected, r["seeds"], normalize_rewards(r["rewards"]), 0.0005, "iid")
    pth = torch.load(run / "final_model.pth")
    reloaded, _ = load_model(str(run / "final_model"), "fp32")
    assert list(pth) == list(reloaded.state_dict())
    assert max_diff([pth[n] for n, _ in reloaded.named_parameters()], expected) < 1e-6
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, pth[name]), name

    # The published outputs: the fp16 base model, and the final weights with vLLM's fused names.
    published = run / "model_saves" / "final_model_iteration_2" / "pytorch_model.pth"
    assert "model.layers.0.self_attn.qkv_proj.weight" in torch.load(published)
    saved_base = json.loads((run / "model_saves" / "base_model" / "config.json").read_text())
    assert saved_base["dtype"] == "float16"

    # countdown/eval_countdown.py takes every form directly, and all give the same answers.
    responses = {}
    for label, model_args in {"pth": ["--model_path", str(run / "final_model.pth"),
                                      "--base_model_name", str(tiny_model_dir)],
                              "published": ["--model_path", str(published),
                                            "--base_model_name", str(tiny_model_dir)],
                              "hf": ["--model_path", str(run / "final_model")]}.items():
        out = tmp_path / f"eval_{label}"
        run_main([PYTHON, str(ROOT / "countdown" / "eval_countdown.py"), *model_args,
                  "--precision", "fp32", "--eval_samples", "3", "--max_new_tokens", "6",
                  "--save_responses", "--output_dir", str(out)])
        assert json.loads((out / "summary.json").read_text())["eval_stats"]["num_samples"] == 3
        responses[label] = [r["response"] for r in
                            json.loads((out / "eval_detailed_results.json").read_text())]
    assert responses["published"] == responses["hf"]
    assert responses["pth"] == responses["hf"]


@pytest.mark.ray
@pytest.mark.slow
def test_engine_failure_exits_nonzero_and_leaves_nothing_running(tiny_model_dir, tmp_path):
    """An engine that cannot load its model: the run fails, and Ray and its actors are gone."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = start_script(
        [PYTHON, SCRIPT, "--model_name", str(broken), "--engine", "transformers", "--num_engines",
         "2", "--population_size", "2", "--num_iterations", "1", "--max_new_tokens", "4",
         "--data_sample", "2", "--precision", "fp32", "--experiment_dir", str(tmp_path)])
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode not in (0, None), out
        assert "safetensors" in out.lower() or "header" in out.lower(), out[-3000:]
        assert_session_ends(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
