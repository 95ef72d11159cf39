"""es_llm/vllm_names.py: HF <-> vLLM (fused qkv_proj / gate_up_proj) state dict names, both ways, on
tiny models built from configs; a model loaded from a vLLM-named .pth computes the same logits."""
import pytest
import torch

from es_llm.evaluation import load_for_eval, load_state_into
from es_llm.vllm_names import hf_to_vllm, is_vllm_state, vllm_to_hf
from tests.conftest import build_tiny_model


def tiny(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    if kind == "llama-gqa-tied":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True))
    if kind == "llama-headdim-bias-untied":  # head_dim * heads != hidden_size, biases everywhere
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=1,
                                            head_dim=16, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=False))
    if kind == "qwen2":  # q/k/v biases, as Qwen2.5
        return Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True))
    raise ValueError(kind)


KINDS = ["llama-gqa-tied", "llama-headdim-bias-untied", "qwen2"]


def expected_vllm_names(model) -> list:
    """vLLM's parameter order for these models: HF order, a fused tensor in its first part's place,
    no tied lm_head."""
    names = []
    for name, _ in model.named_parameters():
        for first, fused, rest in (("q_proj", "qkv_proj", ("k_proj", "v_proj")),
                                   ("gate_proj", "gate_up_proj", ("up_proj",))):
            if f".{first}." in name:
                name = name.replace(f".{first}.", f".{fused}.")
            elif any(f".{r}." in name for r in rest):
                name = None
                break
        if name is not None:
            names.append(name)
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_both_directions(kind):
    model = tiny(kind)
    config = model.config
    hf = model.state_dict()
    fused = hf_to_vllm(hf, config)
    assert is_vllm_state(fused) and not is_vllm_state(hf)
    assert list(fused) == expected_vllm_names(model)
    assert ("lm_head.weight" in fused) == (not config.tie_word_embeddings)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = fused[p + "self_attn.qkv_proj.weight"]
        assert qkv.shape == ((heads + 2 * kv) * hd, config.hidden_size)
        assert torch.equal(qkv, torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        assert torch.equal(fused[p + "mlp.gate_up_proj.weight"],
                           torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]))
        if p + "self_attn.q_proj.bias" in hf:
            assert torch.equal(fused[p + "self_attn.qkv_proj.bias"],
                               torch.cat([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    back = vllm_to_hf(fused, config)
    hf_without_tied = {k: v for k, v in hf.items()
                       if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert list(back) == list(hf_without_tied)  # HF order again
    for name, tensor in hf_without_tied.items():
        assert torch.equal(back[name], tensor), name
    # ... and the other way round: vLLM names -> HF -> vLLM names
    again = hf_to_vllm(back, config)
    assert list(again) == list(fused)
    assert all(torch.equal(again[k], fused[k]) for k in fused)
    # a plain dict config works too
    assert list(vllm_to_hf(fused, config.to_dict())) == list(back)


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_loaded_from_vllm_names_gives_identical_logits(kind):
    model = tiny(kind).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    reference = model(ids).logits
    other = tiny(kind).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_state_into(other, hf_to_vllm(model.state_dict(), model.config))
    assert torch.equal(other(ids).logits, reference)


@pytest.mark.slow
def test_a_vllm_named_pth_loads_through_load_for_eval(tmp_path, bundled_tokenizer_dir):
    """The file the accelerated trainer publishes (fused names, no tied lm_head) applied to its base
    model gives the trained model's logits exactly."""
    base = build_tiny_model(tmp_path / "base", bundled_tokenizer_dir, seed=0)
    trained = build_tiny_model(tmp_path / "trained", bundled_tokenizer_dir, seed=1)
    reference, _, _ = load_for_eval(str(trained), None, "fp32")
    state = hf_to_vllm(reference.state_dict(), reference.config)
    assert "lm_head.weight" not in state
    torch.save(state, tmp_path / "pytorch_model.pth")
    loaded, _, precision = load_for_eval(str(tmp_path / "pytorch_model.pth"), str(base), "auto")
    assert precision == "fp32"  # auto: the file's dtype
    ids = torch.tensor([[1, 20, 30, 40]])
    assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_sizes_that_do_not_fit_the_config_are_refused():
    model = tiny("llama-gqa-tied")
    fused = hf_to_vllm(model.state_dict(), model.config)
    wrong = model.config.to_dict() | {"num_key_value_heads": 4}
    with pytest.raises(ValueError, match="qkv_proj.weight has 64 rows"):
        vllm_to_hf(fused, wrong)
    partial = {k: v for k, v in model.state_dict().items() if "v_proj" not in k}
    with pytest.raises(ValueError, match="cannot fuse"):
        hf_to_vllm(partial, model.config)
