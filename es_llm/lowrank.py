"""Low-rank perturbations: the whole population shares one batched forward pass (after EGGROLL).

`--noise_mode lowrank --rank R`. For a member's seed s and the k-th parameter in
`named_parameters()` order, a fresh generator on the parameter's device is seeded with s + k and
draws, in fp32:
    a 2-D weight (d0 x d1):  A = randn(d0, R), then B = randn(d1, R); perturbation A B^T / sqrt(R)
    any other parameter:     eps = randn(shape), an ordinary iid perturbation
Member i is evaluated at W + sign_i * sigma * perturbation (sign_i = -1 for the minus member of an
antithetic pair, else +1).

Generation never builds a perturbed weight. The rows of one batched call are the members' prompts,
member-major (member 0's prompts, then member 1's, ...); while `BatchedLowRank.perturbed` is active,
hooks add each member's term to the shared base computation:
    nn.Linear      y = x W^T + b + c_i (x B_i) A_i^T + c_i eps_bias_i      (c_i = sign_i sigma / sqrt R)
    nn.Embedding   e = E[t] + c_i A_i[t] B_i^T
    RMSNorm        the weight is replaced, for the duration of the module's call, by a per-row
                   tensor (w + sign_i sigma eps_i) shaped to broadcast against the hidden states;
                   valid for norms that compute weight * hidden (Llama, Qwen, Mistral, ...)
A tied lm_head uses the embedding's factors: factors are keyed by the parameter itself.
A `RowMap` holds which member each row belongs to, so generation can drop finished rows mid-way.

`--lowrank_targets lora` narrows the noise to the layers vLLM's LoRA adapters cover: the 2-D
weights of the decoder's projections (q/k/v/o_proj, gate/up/down_proj; `LORA_MODULES`), with the
same index k and so the same factors as above; embeddings, norms, biases and the lm_head keep their
weights. This is the set the vLLM engine's low-rank mode perturbs (one LoRA adapter per member).

The update is alpha * (1/N) sum_i z_i sign_i A_i B_i^T / sqrt(R) (and alpha * (1/N) sum_i z_i sign_i
eps_i for the other parameters), computed in fp32: for a 2-D weight one matmul of the stacked,
weight-scaled A's with the stacked B's.
"""
import math
import time
from contextlib import contextmanager

import torch
from torch import nn

from .rows import RowLayout

LOWRANK = "lowrank"
LOWRANK_TARGETS = ("all", "lora")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLUMN_LOOP_MAX_RANK = 4  # up to this rank the hooks add R rank-one terms; above, one batched matmul


def factors(like: torch.Tensor, seed: int, k: int, rank: int):
    """(A, B) for a 2-D parameter, else the ordinary noise tensor; fp32, on the parameter's device."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(int(seed) + k)
    draw = dict(generator=generator, device=like.device, dtype=torch.float32)
    if like.ndim == 2:
        a = torch.randn((like.shape[0], rank), **draw)
        return a, torch.randn((like.shape[1], rank), **draw)
    return torch.randn(like.shape, **draw)


def target_indices(names, targets: str = "all"):
    """Indices k of the parameters (HF names, in order) that carry noise: every one ("all"), or
    the 2-D weights of the projections vLLM's LoRA covers ("lora")."""
    if targets not in LOWRANK_TARGETS:
        raise ValueError(f"lowrank targets must be one of {LOWRANK_TARGETS}, got {targets!r}")
    names = list(names)
    if targets == "all":
        return set(range(len(names)))
    return {k for k, name in enumerate(names)
            if name.endswith(".weight") and name.split(".")[-2] in LORA_MODULES}


def perturbation(like: torch.Tensor, seed: int, k: int, rank: int) -> torch.Tensor:
    """The dense fp32 perturbation (before sigma) of the k-th parameter: A B^T / sqrt(R), or eps."""
    drawn = factors(like, seed, k, rank)
    if like.ndim == 2:
        a, b = drawn
        return (a @ b.T).div_(math.sqrt(rank))
    return drawn


@torch.no_grad()
def lowrank_update(tensors, seeds, z, alpha: float, rank: int, n: int | None = None,
                   only=None) -> None:
    """tensor += alpha * (1/N) * sum_i z_i * perturbation_i, in place, computed in fp32.

    For a 2-D tensor: [z_1 A_1, ..., z_N A_N] @ [B_1, ..., B_N]^T * alpha / (N sqrt R), one matmul.
    N is len(seeds) unless given (antithetic pairs pass one term per pair). `only`: the indices k
    that carry noise (target_indices); the other tensors are left as they are.
    """
    n = n or len(seeds)
    weights = [float(w) for w in z]
    for k, tensor in enumerate(tensors):
        if only is not None and k not in only:
            continue
        if tensor.ndim == 2:
            a_list, b_list = [], []
            for seed, weight in zip(seeds, weights):
                a, b = factors(tensor, seed, k, rank)
                a_list.append(a.mul_(weight))
                b_list.append(b)
            delta = torch.cat(a_list, dim=1) @ torch.cat(b_list, dim=1).T
            delta.mul_(alpha / (n * math.sqrt(rank)))
        else:
            delta = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
            for seed, weight in zip(seeds, weights):
                delta.add_(factors(tensor, seed, k, rank).mul_(weight))
            delta.mul_(alpha / n)
        if tensor.dtype == torch.float32:
            tensor.add_(delta)
        else:
            tensor.copy_(tensor.float().add_(delta))


def keeps_masters(master_weights: str, noise_mode: str, params) -> bool:
    """fp32 master weights when asked for, and always in lowrank mode for a model held below fp32
    (its update is accumulated in fp32, and a bf16 weight would lose most of it)."""
    return master_weights == "fp32" or (
        noise_mode == LOWRANK and any(p.dtype != torch.float32 for p in params))


def evaluate_batched(lowrank, generate, task, seeds, signs, sigma: float, max_sequences: int,
                     prune: bool = True, with_prompt: bool = False, iteration: int = 0):
    """Members (seeds[j], signs[j]) generated together on `lowrank.model`, at most `max_sequences`
    sequences (members x rollouts x prompts) per generate call. `lowrank` is a batched population:
    a BatchedLowRank, or es_llm.lora.BatchedLora (the members' adapters, --lora_batch). With
    `generate.sampling` (--num_rollouts K), member j's K rollouts are K consecutive row blocks of
    its perturbation, block r's rows sampled as rollout r with the seeds of (iteration, seeds[j]),
    as a thread copy samples them. Returns [(j, mean reward, completions of its first rollout)] in
    order, and the seconds spent per phase ({"noise", "generate"})."""
    k = generate.sampling[0] if generate.sampling else 1
    per_call = max(1, max_sequences // (len(task.prompts) * k))
    timings = {"noise": 0.0, "generate": 0.0}
    results = []
    for chunk in range(0, len(seeds), per_call):
        part = list(range(chunk, min(chunk + per_call, len(seeds))))
        rows = [j for j in part for _ in range(k)]  # one block of rows per member and rollout
        draw = [(iteration, seeds[j], r) for j in part for r in range(k)] if generate.sampling \
            else None
        t0 = time.perf_counter()
        with lowrank.perturbed([seeds[j] for j in rows], sigma, [signs[j] for j in rows]) as layout:
            t1 = time.perf_counter()
            texts = generate.repeated(lowrank.model, len(rows), with_prompt=with_prompt,
                                      on_rows=layout.select_rows if prune else None, draw=draw)
        timings["noise"] += t1 - t0
        timings["generate"] += time.perf_counter() - t1
        for n, j in enumerate(part):
            rollouts = texts[n * k:(n + 1) * k]
            results.append((j, task.mean_reward(rollouts, seed=seeds[j]), rollouts[0]))
    return results, timings


def _is_weight_times_hidden_norm(module: nn.Module) -> bool:
    """RMSNorms of the HF decoder families, whose forward returns weight * normalised hidden
    (torch.nn.RMSNorm calls F.rms_norm, which needs a 1-D weight, so it is not one of them)."""
    return type(module).__name__.endswith("RMSNorm") and not isinstance(module, nn.RMSNorm)


class BatchedLowRank:
    """Evaluates several low-rank-perturbed members of one model in one batched forward pass."""

    def __init__(self, model: nn.Module, rank: int, targets: str = "all"):
        self.model = model
        self.rank = rank
        named = list(model.named_parameters())
        self.params = [p for _, p in named]
        self.only = target_indices([n for n, _ in named], targets)
        index = {id(p): k for k, p in enumerate(self.params)}
        self.linears, self.embeddings, self.norms = [], [], []
        for name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own or not any(index[id(p)] in self.only for p in own.values()):
                continue
            if targets == "lora":  # a projection's weight only; its bias keeps its value
                if not isinstance(module, nn.Linear):
                    raise NotImplementedError(f"--lowrank_targets lora: {name} is a "
                                              f"{type(module).__name__}, not an nn.Linear")
                self.linears.append((module, index[id(module.weight)], None))
                continue
            kind = (f"{name or 'the model'} ({type(module).__name__}) holding "
                    f"{sorted(own)} of shapes {[tuple(p.shape) for p in own.values()]}")
            if isinstance(module, nn.Linear) and set(own) <= {"weight", "bias"}:
                self.linears.append((module, index[id(module.weight)],
                                     None if module.bias is None else index[id(module.bias)]))
            elif isinstance(module, nn.Embedding) and set(own) == {"weight"}:
                self.embeddings.append((module, index[id(module.weight)]))
            elif (_is_weight_times_hidden_norm(module) and set(own) == {"weight"}
                  and module.weight.ndim == 1):
                self.norms.append((module, index[id(module.weight)]))
            else:
                raise NotImplementedError(
                    f"--noise_mode lowrank cannot evaluate module {kind}: batched low-rank "
                    f"evaluation supports nn.Linear, nn.Embedding and RMSNorm modules that compute "
                    f"weight * hidden (Llama, Qwen, Mistral). Use --noise_mode iid or correlated "
                    f"for this model.")
        for k, p in enumerate(self.params):
            if p.ndim > 2 and k in self.only:
                raise NotImplementedError(f"--noise_mode lowrank: a parameter of shape "
                                          f"{tuple(p.shape)} has more than 2 dimensions")

    @torch.no_grad()
    def member_terms(self, seeds, sigma: float, signs=None) -> dict:
        """Per parameter index: (c A stacked [M, d0, R], B stacked [M, d1, R]) for a 2-D weight,
        sign sigma eps stacked [M, *shape] otherwise; in the parameter's dtype."""
        signs = [1.0] * len(seeds) if signs is None else [float(s) for s in signs]
        scale = torch.tensor([s * sigma for s in signs], dtype=torch.float32)
        terms = {}
        for k, p in enumerate(self.params):
            if k not in self.only:
                continue
            c = scale.to(p.device)
            drawn = [factors(p, seed, k, self.rank) for seed in seeds]
            if p.ndim == 2:
                a = torch.stack([x for x, _ in drawn]).mul_((c / math.sqrt(self.rank)).view(-1, 1, 1))
                b = torch.stack([y for _, y in drawn])
                terms[k] = (a.to(p.dtype), b.to(p.dtype))
            else:
                eps = torch.stack(drawn).mul_(c.view(-1, *[1] * p.ndim))
                terms[k] = eps.to(p.dtype)
        return terms

    @contextmanager
    def perturbed(self, seeds, sigma: float, signs=None):
        """While active, a forward pass over rows = len(seeds) x B (member-major) computes row block i
        with member i's perturbation. Yields a `RowMap`: generation that drops finished rows from its
        batch tells it which rows remain (`select_rows`)."""
        rows = RowMap(self, self.member_terms(seeds, sigma, signs), len(seeds))
        handles = []
        try:
            for module, k_weight, k_bias in self.linears:
                handles.append(module.register_forward_hook(rows.linear_hook(k_weight, k_bias)))
            for module, k_weight in self.embeddings:
                handles.append(module.register_forward_hook(rows.embedding_hook(k_weight)))
            for module, k_weight in self.norms:
                pre, post = rows.norm_hooks(k_weight)
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
            yield rows
        finally:
            for handle in handles:
                handle.remove()
            for module, k_weight in self.norms:  # a forward that raised left its weight swapped
                module._parameters["weight"] = self.params[k_weight]


class RowMap(RowLayout):
    """The members' low-rank terms laid out per row (es_llm/rows.py: which member each row is);
    the per-row tensors are gathered once per layout, not once per forward."""

    def __init__(self, batched: BatchedLowRank, terms: dict, members: int):
        super().__init__(members)
        self.params = batched.params
        self.terms = terms

    def linear_hook(self, k_weight, k_bias):
        a, b = self.terms[k_weight]  # [M, out, R], [M, in, R]
        bias = None if k_bias is None else self.terms[k_bias]  # [M, out]

        def make(rows):
            a_rows, b_rows = a[rows], b[rows]
            if a.shape[-1] <= COLUMN_LOOP_MAX_RANK:
                columns = [(a_rows[:, :, r].unsqueeze(1).contiguous(), b_rows[:, :, r].unsqueeze(1).contiguous())
                           for r in range(a.shape[-1])]  # ([rows, 1, out], [rows, 1, in])
                a_rows = b_rows = None
            else:
                columns, a_rows = None, a_rows.transpose(1, 2).contiguous()  # [rows, R, out]
            return columns, a_rows, b_rows, None if bias is None else bias[rows].unsqueeze(1)

        def hook(module, args, output):
            columns, a_t, b_rows, bias_rows = self.per_row(("linear", k_weight), output, make)
            x = args[0].reshape(output.shape[0], -1, args[0].shape[-1])  # [rows, seq, in]
            out = output.reshape(output.shape[0], -1, output.shape[-1])
            if columns is not None:
                # At a small rank, R rank-one updates beat a batched matmul of degenerate shape.
                for a_r, b_r in columns:
                    out.addcmul_(torch.linalg.vecdot(x, b_r).unsqueeze(-1), a_r)
            else:
                out.baddbmm_(torch.bmm(x, b_rows), a_t)
            if bias_rows is not None:
                out.add_(bias_rows)
            return out.reshape(output.shape)
        return hook

    def embedding_hook(self, k_weight):
        a, b = self.terms[k_weight]  # [M, vocab, R], [M, H, R]

        def make(rows):
            return rows.unsqueeze(1), [b[rows][:, :, r].unsqueeze(1).contiguous() for r in range(b.shape[-1])]

        def hook(module, args, output):
            member, b_cols = self.per_row(("embedding", k_weight), output, make)
            ids = args[0].reshape(output.shape[0], -1)
            rows_a = a[member, ids]  # [rows, seq, R]
            out = output.reshape(output.shape[0], -1, output.shape[-1])
            for r, b_r in enumerate(b_cols):
                out.addcmul_(rows_a[:, :, r:r + 1], b_r)
            return out.reshape(output.shape)
        return hook

    def norm_hooks(self, k_weight):
        param = self.params[k_weight]
        weights = param.unsqueeze(0) + self.terms[k_weight]  # [M, H]

        def pre(module, args):
            hidden = args[0]
            per_row = self.per_row(("norm", k_weight, hidden.ndim), hidden, lambda rows: weights[rows].view(
                hidden.shape[0], *[1] * (hidden.ndim - 2), -1))
            module._parameters["weight"] = per_row

        def post(module, args, output):
            module._parameters["weight"] = param
        return pre, post
