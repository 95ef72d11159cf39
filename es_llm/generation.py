"""Greedy (or sampled) batched generation of the continuation of every prompt."""
import torch


class Generator:
    """Tokenises the prompts once (left padding) and generates their continuations on demand."""

    def __init__(self, tokenizer, prompts, max_new_tokens: int, do_sample: bool = False,
                 batch_size: int | None = None):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
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
    def repeated(self, model, copies: int, with_prompt: bool = False) -> list:
        """`copies` lists of decoded continuations, one per prompt, from batched calls whose rows are
        the prompts repeated copy-major (copy 0's prompts, then copy 1's, ...): the layout a
        batched low-rank population expects."""
        head = model.get_output_embeddings()
        handle = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
        try:
            return self._generate(model, copies, with_prompt)
        finally:
            if handle:
                handle.remove()

    def _generate(self, model, copies: int, with_prompt: bool) -> list:
        texts = [[] for _ in range(copies)]
        config = model.generation_config
        for batch in self.batches:
            batch = {k: v.to(model.device).repeat(copies, 1) for k, v in batch.items()}
            out = model.generate(**batch, max_new_tokens=self.max_new_tokens,
                                 do_sample=self.do_sample,
                                 pad_token_id=self.tokenizer.pad_token_id,
                                 eos_token_id=config.eos_token_id or self.tokenizer.eos_token_id,
                                 **({} if self.do_sample else
                                    {"temperature": None, "top_p": None, "top_k": None}))
            new = out[:, batch["input_ids"].shape[1]:]
            self.tokens_generated += int((new != self.tokenizer.pad_token_id).sum())
            start = 0 if with_prompt else batch["input_ids"].shape[1]
            decoded = self.tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
            rows = len(decoded) // copies
            for i in range(copies):
                texts[i] += decoded[i * rows:(i + 1) * rows]
        return texts


def _contiguous_input(module, args):
    """The prompt pass feeds the head the last position of every row, a strided view; on CPU a linear
    layer then copies its weight once per row (a 300x slowdown in bf16 at 64 rows). A copy of the
    small input avoids it."""
    return (args[0].contiguous(), *args[1:])
