"""Model loading: the bundled model's dense copy, cached under ~/.cache/es-llm, is the GGUF file's
conversion bit for bit (weights, buffers, config, tokenizer), written atomically, rebuilt when
damaged."""
import pytest
import torch

from es_llm import models

pytestmark = pytest.mark.slow


def loaded(model_name):
    model, tokenizer = models.load_model(model_name, "bf16")
    return model, tokenizer


def test_the_dense_copy_is_the_gguf_conversion_bit_for_bit():
    cached, cached_tok = loaded("bundled")  # from the dense copy (built on first use)
    fresh, fresh_tok = loaded(str(models.bundled_model_path()))  # converted from the GGUF file
    ours, theirs = dict(cached.named_parameters()), dict(fresh.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    ours = dict(cached.named_buffers())
    theirs = dict(fresh.named_buffers())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    skip = {"_name_or_path", "architectures"}  # where it was read from; save_pretrained sets it
    assert {k: v for k, v in cached.config.to_dict().items() if k not in skip} == \
        {k: v for k, v in fresh.config.to_dict().items() if k not in skip}
    assert cached.generation_config.to_dict() == fresh.generation_config.to_dict()
    texts = ["Solve: 3 + 5 =", "If all birds can fly, can penguins fly? <think> 12 </think>"]
    assert cached_tok(texts)["input_ids"] == fresh_tok(texts)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert cached_tok.apply_chat_template(chat, tokenize=False) == \
        fresh_tok.apply_chat_template(chat, tokenize=False)
    assert (cached_tok.pad_token, cached_tok.eos_token, cached_tok.padding_side) == \
        (fresh_tok.pad_token, fresh_tok.eos_token, fresh_tok.padding_side)
    batch = cached_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(cached(**batch).logits, fresh(**batch).logits)


def test_a_damaged_dense_copy_is_rebuilt_and_an_unwritable_cache_falls_back(tmp_path,
                                                                             monkeypatch):
    """The cache's rules, with the conversion itself (tested above) read from the real copy."""
    dense = models.bundled_dense_dir()
    real_load = models._load
    monkeypatch.setattr(models, "_load", lambda source, kwargs, dtype, name: real_load(
        str(dense), {}, dtype, name))
    monkeypatch.setenv("ES_LLM_CACHE", str(tmp_path / "cache"))
    first = models.bundled_dense_dir()
    assert first.parent == tmp_path / "cache" and models.dense_copy_is_whole(first)
    weights = first / "model.safetensors"
    expected = weights.read_bytes()
    assert expected == (dense / "model.safetensors").read_bytes()
    with open(weights, "r+b") as f:
        f.truncate(len(expected) // 2)  # a copy cut short (or damaged since)
    assert not models.dense_copy_is_whole(first)
    assert models.bundled_dense_dir() == first and weights.read_bytes() == expected
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left
    (tmp_path / "ro").write_text("a file, not a directory: nothing can be written below it")
    monkeypatch.setenv("ES_LLM_CACHE", str(tmp_path / "ro"))
    assert models.bundled_dense_dir() is None  # load_model then converts the GGUF file itself


AVX2_CPUINFO = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx fma avx2 "
                "bmi2 sha_ni\nbogomips\t: 4491.55\n")


def test_vllm_in_bf16_on_a_cpu_without_bf16_instructions_says_so_once(capsys, monkeypatch):
    """On a CPU without AVX512-BF16 or AMX (x86) or BF16 (Arm), vLLM's bf16 linear layers fall
    back to a path about 5x slower than fp32 (docs/benchmarks.md): a vLLM engine on CPU in bf16
    says so, once per process, and names the flag that runs faster."""
    flags = models.cpu_flags(AVX2_CPUINFO)
    assert flags == {"fpu", "sse", "sse2", "avx", "fma", "avx2", "bmi2", "sha_ni"}
    note = models.slow_bf16_note("bf16", flags)
    assert note and "--precision fp32" in note
    assert models.slow_bf16_note("bfloat16", flags) == note  # eval_countdown_vllm.py's --dtype
    for other in ("fp32", "float32", "fp16", "float16"):
        assert models.slow_bf16_note(other, flags) is None
    for feature in ("avx512_bf16", "amx_bf16"):
        assert models.slow_bf16_note("bf16", flags | {feature}) is None
    arm = models.cpu_flags("processor\t: 0\nFeatures\t: fp asimd evtstrm bf16 i8mm\n")
    assert "bf16" in arm and models.slow_bf16_note("bf16", arm) is None
    assert models.cpu_flags("model name\t: unknown\n") is None
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    monkeypatch.setitem(models._SAID, "slow_bf16", False)
    models.say_slow_bf16("fp32")
    models.say_slow_bf16("bf16")
    models.say_slow_bf16("bf16")
    assert capsys.readouterr().err == note + "\n"
