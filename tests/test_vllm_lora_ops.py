"""accelerated.vllm_lora_ops: vLLM's multi-LoRA products per adapter slot (no vLLM needed here; the
vLLM tier compares them with vLLM's own ops and runs them inside engines)."""
import os
import subprocess
from types import SimpleNamespace

import pytest
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


# --- the fused kernel (accelerated/lora_kernel.c): a whole LoRA layer in one call ---

def wrapper(indices, prefill=False, no_lora=False):
    """What the kernel's methods read of vLLM's PunicaWrapperCPU."""
    return SimpleNamespace(token_lora_indices=indices, is_prefill=prefill, no_lora=no_lora)


def slot_ops_linear(y, x, a_stacked, b_stacked, scale, slices, indices, offset=0):
    """vLLM's add_lora_linear over the per-slot ops: an fp32 buffer per slice, then the expands."""
    for a, b, size in zip(a_stacked, b_stacked, slices):
        buffer = torch.zeros(x.shape[0], a.shape[-2])
        ops._plan["key"] = None
        ops.bgmv_shrink(x, a, buffer, indices, scale)
        ops.bgmv_expand_slice(buffer, b, y, indices, offset, size, True)
        offset += size


LAYOUTS = {"population": torch.arange(4).repeat_interleave(6),     # one run per member
           "any order, no adapter": torch.tensor([3, 1, -1, 0, 2, 2, 1, 0, -1, 3, 3, 1] * 2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_fused_kernel_computes_the_slot_ops_products(dtype, rank, layout):
    """add_lora_linear (q, k, v slices) and add_shrink then add_expand (a buffer [slices, tokens,
    rank], vLLM's row-parallel form) give what the per-slot ops give: in bf16 bit for bit (the
    products of bf16 values are exact in the fp32 sums, and the roundings are vLLM's), in fp32 to
    rounding (the sums' order differs from torch's matmuls)."""
    assert ops.kernel() is not None
    g = torch.Generator().manual_seed(rank)
    indices = LAYOUTS[layout]
    tokens, width, slices = len(indices), 40, (40, 16, 16)
    x = torch.randn(tokens, width, generator=g).to(dtype)
    a_stacked = tuple(torch.randn(4, 1, rank, width, generator=g).to(dtype) for _ in slices)
    b_stacked = tuple(torch.randn(4, 1, size, rank, generator=g).to(dtype) for size in slices)
    start = torch.randn(tokens, 80, generator=g).to(dtype)
    got, expected = start.clone(), start.clone()
    ops.add_lora_linear(wrapper(indices), got[:, :72], x, a_stacked, b_stacked, 0.5, slices)
    slot_ops_linear(expected[:, :72], x, a_stacked, b_stacked, 0.5, slices, indices)

    buffers = torch.full((2, tokens, rank), 9.0)
    ops.add_shrink(wrapper(indices), buffers, x, a_stacked[:2], 0.5)
    ops.add_expand(wrapper(indices), got, buffers, b_stacked[1:], slices[1:], offset_start=8)
    slot_ops_linear(expected, x, a_stacked[:2], b_stacked[1:], 0.5, slices[1:], indices, offset=8)
    without = indices < 0
    assert torch.equal(buffers[:, without], torch.zeros(2, int(without.sum()), rank))
    assert torch.equal(got[without], start[without])  # no adapter: no LoRA term
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, start)


def test_a_layers_checked_call_is_taken_again_only_while_its_adapters_and_tensors_match(
        monkeypatch):
    """add_lora_linear checks a layer's call once and reuses the kernel's arguments (_linear_site):
    an adapter written into a slot in place, new x and y, and y too narrow for the slices (vLLM's
    own op then, no kernel call) are all seen; the weights its arguments point into live as long
    as it does."""
    g = torch.Generator().manual_seed(3)
    indices, slices, dtype = LAYOUTS["population"], (40, 16, 16), torch.bfloat16
    a_stacked = tuple(torch.randn(4, 1, 8, 40, generator=g).to(dtype) for _ in slices)
    b_stacked = tuple(torch.randn(4, 1, size, 8, generator=g).to(dtype) for size in slices)
    for step in range(3):
        if step == 2:  # vLLM setting an adapter into slot 2: A of q, B of k
            a_stacked[0][2].copy_(torch.randn(1, 8, 40, generator=g))
            b_stacked[1][2].copy_(torch.randn(1, 16, 8, generator=g))
        x = torch.randn(len(indices), 40, generator=g).to(dtype)
        got, expected = torch.zeros(len(indices), 72, dtype=dtype), torch.zeros(len(indices), 72,
                                                                                 dtype=dtype)
        ops.add_lora_linear(wrapper(indices), got, x, a_stacked, b_stacked, 0.5, slices)
        slot_ops_linear(expected, x, a_stacked, b_stacked, 0.5, slices, indices)
        assert torch.equal(got, expected) and got.any()
    site = ops._sites[id(a_stacked)]
    assert site.a_stacked is a_stacked
    # The prepared weights' cache may be emptied (past 4096 entries): the site keeps the tensors
    # its pointers point into.
    ops._known.clear()
    assert [site.args[2][i] for i in range(3)] == [t.data_ptr() for t in site.prepared[0][3]]
    assert [site.args[4][i] for i in range(3)] == [t.data_ptr() for t in site.prepared[1][3]]
    theirs = []
    monkeypatch.setitem(ops._BASE, "add_lora_linear", lambda *args, **kwargs: theirs.append(1))
    monkeypatch.setitem(ops._kernel, "lib", SimpleNamespace(es_lora_linear=None))  # not called
    narrow = torch.zeros(len(indices), 64, dtype=dtype)
    ops.add_lora_linear(wrapper(indices), narrow, x, a_stacked, b_stacked, 0.5, slices)
    assert theirs == [1] and not narrow.any()


LANES = 16  # lora_kernel.c's


def lanes_dot(x, w):
    """x @ w as the kernel sums it, in fp32: LANES partial sums (lane l takes the terms j = l mod
    LANES, in order), then the lanes pairwise (lane l + half into lane l)."""
    products = x * w
    lanes = torch.zeros(LANES)
    for start in range(0, len(products), LANES):
        chunk = products[start:start + LANES]
        lanes[:len(chunk)] = lanes[:len(chunk)] + chunk
    half = LANES // 2
    while half:
        lanes[:half] = lanes[:half] + lanes[half:2 * half]
        half //= 2
    return lanes[0]


@pytest.mark.parametrize("width", [40, 64, 7])  # lanes with a tail, whole lanes, a tail alone
def test_the_kernels_sums_are_fixed_not_the_compilers_so_its_fp32_bits_are_the_same_everywhere(
        width):
    """In fp32 the kernel's results are its arithmetic's exact bits: each shrink a sum in 16 lanes
    added pairwise, each expand output summed over the rank in order, then added to y. None of it
    depends on the machine's vector width (AVX2, AVX-512) or on a token's neighbours."""
    assert ops.kernel() is not None
    g = torch.Generator().manual_seed(width)
    indices = torch.tensor([2, 2, 0, 1, 1, -1, 2])
    rank, slices = 3, (5, 20)
    x = torch.randn(len(indices), width, generator=g)
    a_stacked = tuple(torch.randn(3, 1, rank, width, generator=g) for _ in slices)
    b_stacked = tuple(torch.randn(3, 1, n, rank, generator=g) for n in slices)
    y = torch.randn(len(indices), sum(slices), generator=g)
    got = y.clone()
    ops.add_lora_linear(wrapper(indices), got, x, a_stacked, b_stacked, 0.5, slices)
    expected = y.clone()
    for t, slot in enumerate(indices.tolist()):
        offset = 0
        for a, b, n in zip(a_stacked, b_stacked, slices):
            if slot >= 0:
                buffer = [lanes_dot(x[t], a[slot, 0, k]) * 0.5 for k in range(rank)]
                total = torch.zeros(n)
                for k in range(rank):
                    total = total + buffer[k] * b[slot, 0, :, k]
                expected[t, offset:offset + n] = expected[t, offset:offset + n] + total
            offset += n
    assert torch.equal(got, expected)


def kernel_layer(dtype, threads):
    """One call of each kernel entry on a layer large enough for threads (64 tokens of 30 members
    in runs of 2 and a few without adapter, q/k/v slices of 256, rank 8), on `threads` threads."""
    g = torch.Generator().manual_seed(3)
    indices = torch.arange(30).repeat_interleave(2).tolist() + [-1, 5, -1, 29]
    indices = torch.tensor(indices)
    tokens, slices = len(indices), (256, 64, 64)
    x = torch.randn(tokens, 256, generator=g).to(dtype)
    a_stacked = tuple(torch.randn(30, 1, 8, 256, generator=g).to(dtype) for _ in slices)
    b_stacked = tuple(torch.randn(30, 1, size, 8, generator=g).to(dtype) for size in slices)
    y = torch.randn(tokens, 400, generator=g).to(dtype)
    buffers = torch.full((3, tokens, 8), 9.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops.add_lora_linear(wrapper(indices), y[:, :384], x, a_stacked, b_stacked, 0.5, slices)
        ops.add_shrink(wrapper(indices), buffers, x, a_stacked, 0.5)
        ops.add_expand(wrapper(indices), y, buffers, b_stacked, slices, offset_start=16)
    finally:
        torch.set_num_threads(before)
    return y, buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_gives_the_same_bits_on_any_number_of_threads_with_torchs_openmp(dtype):
    """Built with OpenMP, a large call splits its tokens among torch's threads (each token's rows
    are its own: the same bits on 1 and 2 threads), and the process holds one OpenMP runtime:
    torch's (the kernel found it by its name rather than loading a second one)."""
    assert ops.kernel() is not None
    one = kernel_layer(dtype, 1)
    for _ in range(5):  # a race between the threads would show in some of the calls
        two = kernel_layer(dtype, 2)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(runtimes) <= 1, runtimes


def test_the_kernel_leaves_prefill_without_adapters_alone_and_refuses_a_slot_out_of_range():
    x, a, b = torch.ones(3, 4), (torch.ones(2, 1, 1, 4),), (torch.ones(2, 1, 5, 1),)
    y = torch.zeros(3, 5)
    ops.add_lora_linear(wrapper(torch.zeros(3, dtype=torch.long), prefill=True, no_lora=True), y,
                        x, a, b, 1.0, (5,))
    assert torch.equal(y, torch.zeros(3, 5))  # as vLLM's prefill ops: they return at once
    with pytest.raises(IndexError, match="slot is out of range"):
        ops.add_lora_linear(wrapper(torch.tensor([0, 2, 1])), y, x, a, b, 1.0, (5,))


def test_a_step_without_any_adapter_adds_nothing_and_skips_the_kernel(monkeypatch):
    """An engine with LoRA enabled generating without LoRA requests: every slot -1, y as it is,
    without a kernel call (looked at once per version of the indices); a step with adapters in a
    new tensor computes again, at whatever address it lies."""
    calls = []
    lib = ops.kernel()
    counting = SimpleNamespace(es_lora_linear=lambda *a: calls.append(1) or lib.es_lora_linear(*a),
                               es_lora_expand=lambda *a: calls.append(1) or lib.es_lora_expand(*a))
    monkeypatch.setitem(ops._kernel, "lib", counting)
    x, a, b = torch.ones(4, 8), (torch.ones(2, 1, 1, 8),), (torch.ones(2, 1, 3, 1),)
    buffers = torch.ones(1, 4, 1)
    for _ in range(2):
        none = torch.full((4,), -1)
        y = torch.zeros(4, 3)
        ops.add_lora_linear(wrapper(none), y, x, a, b, 1.0, (3,))
        ops.add_expand(wrapper(none), y, buffers, b, (3,))
        assert torch.equal(y, torch.zeros(4, 3)) and calls == []
        del none
    indices = torch.tensor([0, 1, -1, 1])
    ops.add_lora_linear(wrapper(indices), y, x, a, b, 1.0, (3,))
    assert calls == [1] and torch.equal(y[:, 0], torch.tensor([8.0, 8.0, 0.0, 8.0]))
    indices[:] = -1  # written in place, as vLLM writes a step's indices
    ops.add_lora_linear(wrapper(indices), y, x, a, b, 1.0, (3,))
    assert calls == [1]


@pytest.mark.slow  # a compilation: about a second
def test_the_kernel_is_built_once_per_source_and_cpu_and_without_a_compiler_says_so_once(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ES_LLM_KERNEL_DIR", str(tmp_path / "kernels"))
    built = ops.build_kernel()
    assert built.parent == tmp_path / "kernels" and built.suffix == ".so"
    assert ops.build_kernel() == built and [p.name for p in built.parent.iterdir()] == [built.name]
    # A compiler without OpenMP threads: the SIMD-only build (one thread), under another name.
    monkeypatch.setattr(ops, "KERNEL_THREADS", (("-fno-such-openmp-flag",), ("-fopenmp-simd",)))
    single = ops.build_kernel()
    assert single != built and single.exists()
    assert "GOMP_parallel" not in single.read_bytes().decode("latin-1")
    probe = subprocess.run([os.environ.get("CC", "cc"), "-fopenmp", "-shared", "-fPIC", "-x", "c",
                            "-", "-o", str(tmp_path / "probe.so")], input="int f(void) { return 0; }",
                           text=True, capture_output=True)
    if probe.returncode == 0:  # this compiler has OpenMP threads: the first build uses them
        assert "GOMP_parallel" in built.read_bytes().decode("latin-1")
    monkeypatch.setenv("ES_LLM_KERNEL_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(ops, "_kernel", {"tried": False, "lib": None})
    assert ops.kernel() is None and ops.kernel() is None
    message = capsys.readouterr().err
    assert message.count("fused CPU LoRA kernel is not available") == 1
    assert "per-slot torch ops" in message and "ES_VLLM_LORA_OPS=slots" in message
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing half-written left


def test_lm_head_and_embedding_terms_are_skipped_while_no_adapter_has_them(monkeypatch):
    """vLLM adds x @ A @ B on the lm_head and the embedding of every LoRA-enabled model; with B all
    zeros (no adapter has those modules) the logits stay as they are, so the call is skipped, and
    made again as soon as a slot's B is written (in place, as vLLM sets an adapter)."""
    calls = []
    monkeypatch.setitem(ops._BASE, "add_lora_logits", lambda *a, **k: calls.append("logits"))
    monkeypatch.setitem(ops._BASE, "add_lora_embedding", lambda *a, **k: calls.append("embedding"))
    y, x = torch.ones(4, 10), torch.ones(4, 6)
    a, b = torch.ones(3, 1, 2, 6), torch.zeros(3, 1, 10, 2)
    embedding_b = torch.zeros(3, 1, 10, 2)
    me = wrapper(torch.tensor([0, 1, 2, 0]))
    for _ in range(2):
        ops.add_lora_logits(me, y, x, a, b, 1.0)
        ops.add_lora_embedding(me, y, x, embedding_b)
    assert calls == [] and torch.equal(y, torch.ones(4, 10))
    ops.add_lora_embedding(me, y, x, embedding_b, add_inputs=False)  # y = x @ B: not an addition
    b[1, 0, 3, 1] = 0.5
    embedding_b[2].fill_(1.0)
    ops.add_lora_logits(me, y, x, a, b, 1.0)
    ops.add_lora_embedding(me, y, x, embedding_b)
    assert calls == ["embedding", "logits", "embedding"]


def test_the_kernel_benchmark_prints_one_row_per_rank_and_thread_count(capsys):
    """bench/lora_kernel.py at a tiny size: its table (no vLLM needed)."""
    from bench import lora_kernel

    lora_kernel.main(["--layers", "1", "--steps", "1", "--slots", "2", "--hidden", "16",
                      "--intermediate", "32", "--kv", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| rank | threads |")
    assert [r.split(" | ")[:3] for r in rows[1:]] == [["| 1", "1", "4"], ["| 1", "2", "4"],
                                                       ["| 8", "1", "4"], ["| 8", "2", "4"]]
