"""es_llm/attention.py: the shared-key/value SDPA attention gives exactly transformers' "sdpa"
results (prompt logits and greedy generations, with left padding) and is what load_model uses."""
import json

import pytest
import torch

from es_llm.attention import SHARED_KV_SDPA
from es_llm.models import load_model, save_model

PROMPTS = ["Using the numbers [3, 5, 7], create an equation that equals 22.",
           "Hi", "If all birds can fly and penguins are birds, can penguins fly?"]


def both_attentions(model, tokenizer, new_tokens):
    """(logits at the real positions, greedy generations) with ours, then with transformers' sdpa."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    results = []
    for implementation in (SHARED_KV_SDPA, "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = model(**batch).logits[batch["attention_mask"].bool()]
            generated = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                       temperature=None, top_p=None, top_k=None,
                                       pad_token_id=tokenizer.pad_token_id)
        results.append((logits, generated))
    model.set_attn_implementation(SHARED_KV_SDPA)
    return results


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_gqa_model_is_bit_identical_to_transformers_sdpa(tiny_model_dir, precision):
    model, tokenizer = load_model(str(tiny_model_dir), precision)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # shared heads
    assert model.config._attn_implementation == SHARED_KV_SDPA
    (ours_logits, ours_text), (hf_logits, hf_text) = both_attentions(model, tokenizer, 12)
    assert torch.equal(ours_logits, hf_logits)
    assert torch.equal(ours_text, hf_text)


def test_saved_config_does_not_name_our_attention(tiny_model_dir, tmp_path):
    """A model saved by our scripts loads anywhere: the attention choice is not written."""
    model, tokenizer = load_model(str(tiny_model_dir), "fp32")
    save_model(model, tokenizer, tmp_path / "saved")
    assert SHARED_KV_SDPA not in (tmp_path / "saved" / "config.json").read_text()
    json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.slow
def test_bundled_model_bf16_is_bit_identical_to_transformers_sdpa():
    """The real SmolLM2-135M-Instruct (9 query heads sharing 3 key/value heads) in bf16."""
    model, tokenizer = load_model("bundled", "bf16")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    (ours_logits, ours_text), (hf_logits, hf_text) = both_attentions(model, tokenizer, 24)
    assert torch.equal(ours_logits, hf_logits)
    assert torch.equal(ours_text, hf_text)
