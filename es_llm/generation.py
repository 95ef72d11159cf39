"""Greedy (or sampled) batched generation of the continuation of every prompt."""
import numpy as np
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

# Generation-config settings that change the next-token choice; the pruning loop implements none of
# them, so a model that sets one is generated with `generate` (and keeps its finished rows).
_LOGITS_SETTINGS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                    "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "forced_bos_token_id": None,
                    "forced_eos_token_id": None, "encoder_repetition_penalty": 1.0,
                    "sequence_bias": None, "renormalize_logits": False}


class Generator:
    """Tokenises the prompts once (left padding) and generates their continuations on demand."""

    def __init__(self, tokenizer, prompts, max_new_tokens: int, do_sample: bool = False,
                 batch_size: int | None = None, sampling=None, prompt_ids=None):
        """`sampling`: (rollouts, temperature, top_p) for seeded per-row sampling (RowSampler), or
        None for greedy (or, with `do_sample`, generate's own sampling); `prompt_ids`: the prompts'
        indices in the training data (default 0, 1, ...), which seed their rows."""
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.sampling = sampling
        self.prompt_ids = list(prompt_ids if prompt_ids is not None else range(len(prompts)))
        self.batch_size = batch_size or len(prompts)
        self.tokens_generated = 0  # new tokens produced so far (padding excluded), for benchmarks
        self.batches = [tokenizer(list(prompts[i:i + self.batch_size]), return_tensors="pt",
                                  padding=True)
                        for i in range(0, len(prompts), self.batch_size)]

    @torch.inference_mode()
    def __call__(self, model, with_prompt: bool = False) -> list:
        """Decoded continuations (or prompt + continuation when `with_prompt`), one per prompt."""
        return self.repeated(model, 1, with_prompt)[0]

    @torch.inference_mode()
    def rollouts(self, model, iteration: int, seed: int, with_prompt: bool = False) -> list:
        """The member's completions, one list per rollout: K lists sampled with the row seeds of
        (iteration, seed, prompt, rollout) under `sampling`, or the one greedy list."""
        if self.sampling is None:
            return [self(model, with_prompt)]
        k = self.sampling[0]
        return self.repeated(model, k, with_prompt, draw=[(iteration, seed, r) for r in range(k)])

    @torch.inference_mode()
    def repeated(self, model, copies: int, with_prompt: bool = False, on_rows=None,
                 draw=None) -> list:
        """`copies` lists of decoded continuations, one per prompt, from batched calls whose rows are
        the prompts repeated copy-major (copy 0's prompts, then copy 1's, ...): the layout a
        batched low-rank population expects.

        With `on_rows` (greedy only), a row leaves the batch as soon as it has produced its end
        token, so the finished rows cost nothing; `on_rows(keep)` is told the indices (into the
        current rows) of the rows kept, and `on_rows(None)` when a new batch starts. With `draw`
        (one (iteration, member seed, rollout) per copy), copy c's row of prompt p is sampled with
        the seed row_seed(*draw[c][:2], p, draw[c][2]) (RowSampler)."""
        head = model.get_output_embeddings()
        handle = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
        try:
            return self._generate(model, copies, with_prompt, on_rows, draw)
        finally:
            if handle:
                handle.remove()

    def _eos(self, model) -> list:
        eos = model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def can_prune(self, model) -> bool:
        config = model.generation_config
        return not self.do_sample and all(getattr(config, k, default) in (default, None)
                                          for k, default in _LOGITS_SETTINGS.items())

    def _generate(self, model, copies: int, with_prompt: bool, on_rows=None, draw=None) -> list:
        texts = [[] for _ in range(copies)]
        prune = on_rows is not None and draw is None and self.can_prune(model)
        first = 0  # the batch's first prompt
        for batch in self.batches:
            batch = {k: v.to(model.device).repeat(copies, 1) for k, v in batch.items()}
            rows = batch["input_ids"].shape[0] // copies
            if prune:
                on_rows(None)
                out = self._greedy_pruned(model, batch, on_rows)
            else:
                sampler = [] if draw is None else [RowSampler(
                    [row_seed(iteration, seed, self.prompt_ids[first + j], rollout)
                     for iteration, seed, rollout in draw for j in range(rows)],
                    *self.sampling[1:])]
                out = model.generate(**batch, max_new_tokens=self.max_new_tokens,
                                     do_sample=self.do_sample,
                                     pad_token_id=self.tokenizer.pad_token_id,
                                     eos_token_id=self._eos(model),
                                     logits_processor=LogitsProcessorList(sampler),
                                     **({} if self.do_sample else
                                        {"temperature": None, "top_p": None, "top_k": None}))
            first += rows
            new = out[:, batch["input_ids"].shape[1]:]
            self.tokens_generated += int((new != self.tokenizer.pad_token_id).sum())
            start = 0 if with_prompt else batch["input_ids"].shape[1]
            decoded = self.tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
            for i in range(copies):
                texts[i] += decoded[i * rows:(i + 1) * rows]
        return texts

    def _greedy_pruned(self, model, batch, on_rows) -> torch.Tensor:
        """Greedy decoding as `generate` does it (left padding, KV cache), except that rows which
        have produced an end token leave the batch and its cache. Returns prompt + new tokens, the
        finished rows padded, like `generate`."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        eos = torch.tensor(self._eos(model), device=ids.device)
        new = torch.full((ids.shape[0], self.max_new_tokens), self.tokenizer.pad_token_id,
                         dtype=ids.dtype, device=ids.device)
        live = torch.arange(ids.shape[0], device=ids.device)  # original index of each row kept
        position = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        cache = DynamicCache(config=model.config)
        step_ids, steps = ids, 0
        for t in range(self.max_new_tokens):
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=position,
                           past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1)
            new[live, t] = token
            steps = t + 1
            done = torch.isin(token, eos)
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                live, token, mask, position = live[keep], token[keep], mask[keep], position[keep]
                cache.batch_select_indices(keep)
                on_rows(keep)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            position = position[:, -1:] + 1
            step_ids = token.unsqueeze(1)
        return torch.cat([ids, new[:, :steps]], dim=1)


def row_seed(iteration: int, seed: int, prompt: int, rollout: int) -> int:
    """The seed of one sampled completion: a pure function of (iteration, member seed, prompt index
    in the training data, rollout index), so no process, thread or batch layout changes it."""
    return int(np.random.SeedSequence([iteration, seed, prompt, rollout]).generate_state(
        1, np.uint64)[0])


class RowSampler(LogitsProcessor):
    """Sampling inside greedy `generate`: every row draws its next token from its temperature- and
    top-p-shaped distribution with its own torch.Generator, and every other token's score becomes
    -inf, so greedy picks the drawn one. A row draws exactly one uniform number per step (rows that
    have ended too, their draws unused), so its tokens do not depend on the rows beside it."""

    def __init__(self, seeds, temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            ordered, order = probs.sort(dim=-1, descending=True)
            # a token is dropped when the more likely ones before it already reach top_p
            ordered[(ordered.cumsum(-1) - ordered) >= self.top_p] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        cdf = probs.cumsum(-1)
        uniform = torch.stack([torch.rand((), generator=g) for g in self.generators])
        target = (uniform.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        token = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(-1, token, 0.0)


def _contiguous_input(module, args):
    """The prompt pass feeds the head the last position of every row, a strided view; on CPU a linear
    layer then copies its weight once per row (a 300x slowdown in bf16 at 64 rows). A copy of the
    small input avoids it."""
    return (args[0].contiguous(), *args[1:])
