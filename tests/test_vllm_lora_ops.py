"""accelerated.vllm_lora_ops: vLLM's multi-LoRA products per adapter slot (no vLLM needed here; the
vLLM tier compares them with vLLM's own ops and runs them inside engines)."""
import torch

from accelerated import vllm_lora_ops as ops


def reference(x, weights, indices, dtype):
    """Token by token, as the products are defined: x[t] @ W[indices[t]]^T, 0 without adapter."""
    weights = weights.squeeze(1) if weights.ndim == 4 else weights
    rows = [torch.zeros(weights.shape[1], dtype=dtype) if i < 0
            else x[t].to(dtype) @ weights[i].to(dtype).T for t, i in enumerate(indices.tolist())]
    return torch.stack(rows)


def test_rows_times_is_each_tokens_product_with_its_slot_in_any_order_and_none_for_minus_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 6, generator=g)
    weights = torch.randn(4, 1, 3, 6, generator=g)
    indices = torch.tensor([2, 2, 0, -1, 3, 3, 0, 2, -1, 1, 2])  # slots out of order, unequal blocks
    got = ops.rows_times(x, weights, indices, torch.float32)
    assert torch.allclose(got, reference(x, weights, indices, torch.float32), atol=1e-6)
    assert torch.equal(got[3], torch.zeros(3)) and torch.equal(got[8], torch.zeros(3))
    none = ops.rows_times(x, weights, torch.full((11,), -1), torch.float32)
    assert torch.equal(none, torch.zeros(11, 3))


def test_the_layout_is_computed_once_per_step_and_again_when_the_indices_change():
    g = torch.Generator().manual_seed(1)
    x, weights = torch.randn(6, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    indices = torch.tensor([0, 0, 1, 1, 2, 2])
    first = ops.rows_times(x, weights, indices, torch.float32)
    assert ops._plan["key"] is not None
    indices.copy_(torch.tensor([2, 2, 1, 1, 0, 0]))  # in place, as vLLM updates its mapping
    second = ops.rows_times(x, weights, indices, torch.float32)
    assert torch.allclose(second, reference(x, weights, indices, torch.float32), atol=1e-6)
    assert not torch.allclose(first, second)


def test_shrink_and_expand_write_as_vllms_ops_write():
    g = torch.Generator().manual_seed(2)
    x, a = torch.randn(5, 8, generator=g, dtype=torch.bfloat16), torch.randn(3, 1, 2, 8, generator=g)
    indices = torch.tensor([1, 1, 0, 2, -1])
    shrunk = torch.full((5, 4), 7.0)
    ops.bgmv_shrink(x, a.to(torch.bfloat16), shrunk, indices, 0.5)
    expected = 0.5 * reference(x, a.to(torch.bfloat16), indices, torch.float32)
    assert torch.allclose(shrunk[:, :2], expected) and torch.equal(shrunk[:, 2:], torch.full((5, 2), 7.0))
    b = torch.randn(3, 1, 6, 2, generator=g)
    out = torch.ones(5, 10)
    ops.bgmv_expand_slice(shrunk[:, :2], b, out, indices, 3, 6, add_inputs=True)
    assert torch.allclose(out[:, 3:9], 1 + reference(shrunk[:, :2], b, indices, torch.float32))
    assert torch.equal(out[:, :3], torch.ones(5, 3)) and torch.equal(out[:, 9:], torch.ones(5, 1))
    seq_start, seq_len, per_seq = torch.tensor([0, 2, 3]), torch.tensor([2, 1, 2]), torch.tensor([1, 0, 2])
    prefill = torch.zeros(5, 6)
    ops.sgmv_expand(shrunk[:, :2], b, prefill, seq_start, seq_len, per_seq, 3, 2, 5, False)
    tokens = torch.tensor([1, 1, 0, 2, 2])
    assert torch.allclose(prefill, reference(shrunk[:, :2], b, tokens, torch.float32))


def test_a_populations_contiguous_blocks_and_a_subset_of_slots_give_the_same_products():
    """The two shortcuts: tokens already in equal blocks in slot order are used as they are (no
    gather), and only the slots some token uses are multiplied."""
    g = torch.Generator().manual_seed(3)
    x, weights = torch.randn(8, 5, generator=g), torch.randn(4, 1, 3, 5, generator=g)
    for indices in (torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),   # a population, in order
                    torch.tensor([1, 1, 1, 1, 3, 3, 3, 3]),   # two of four slots, in order
                    torch.tensor([2] * 8),                     # one adapter for every row
                    torch.tensor([3, 3, 0, 0, 2, 2, 1, 1]),   # a population, slots in any order
                    torch.tensor([3, 1, 3, 1, -1, 1, 3, 3])):  # two slots, out of order
        got = ops.rows_times(x, weights, indices, torch.float32)
        assert torch.allclose(got, reference(x, weights, indices, torch.float32), atol=1e-6)
    runs = ops._layout(torch.tensor([3, 3, 1, 1]), 4, "runs")
    assert runs.runs and runs.slots == (3, 1)
    assert ops._layout(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 4, "population").slots is None
    assert not ops._layout(torch.tensor([3, 1, 3, 1]), 4, "interleaved").runs
    assert not ops._layout(torch.tensor([3, 3, 1, -1]), 4, "no adapter").runs


def test_the_converted_weights_are_made_again_when_an_adapter_is_written_into_its_slot():
    g = torch.Generator().manual_seed(4)
    x, weights = torch.randn(4, 5, generator=g), torch.randn(2, 1, 3, 5, generator=g)
    indices = torch.tensor([0, 0, 1, 1])
    before = ops.rows_times(x, weights, indices, torch.float64)
    weights[1].copy_(torch.randn(1, 3, 5, generator=g))  # vLLM loading an adapter into slot 1
    after = ops.rows_times(x, weights, indices, torch.float64)
    assert torch.equal(after[:2], before[:2]) and not torch.allclose(after[2:], before[2:])
    assert torch.allclose(after, reference(x, weights, indices, torch.float64))


def test_a_populations_expand_is_added_into_the_output_slice_in_place():
    g = torch.Generator().manual_seed(5)
    x, b = torch.randn(8, 2, generator=g), torch.randn(4, 1, 6, 2, generator=g)
    indices = torch.tensor([2, 2, 0, 0, 3, 3, 1, 1])  # runs: the fused path
    out = torch.ones(8, 10)
    ops.bgmv_expand_slice(x, b, out, indices, 3, 6, add_inputs=True)
    assert torch.allclose(out[:, 3:9], 1 + reference(x, b, indices, torch.float32), atol=1e-6)
    assert torch.equal(out[:, :3], torch.ones(8, 3)) and torch.equal(out[:, 9:], torch.ones(8, 1))
