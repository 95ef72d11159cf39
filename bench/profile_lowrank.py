"""Where the transformers low-rank mode spends its time on a Countdown-shaped population.

    python bench/profile_lowrank.py --population 4 --items 16 --max_new_tokens 128

Rows, one after the other in one process, the bundled model, the same seeds:
    per member       our faithful path's generation: each member's prompts in one `generate` call
    plain batch      the unperturbed model, every member's prompts in one call (our pruning loop)
    low-rank batch   `--noise_mode lowrank`: the same call with the members' hooks
Each row is split into the prompt pass (the first forward of a call) and the decoding steps, and
the low-rank row's forward time into the hooks' own time (measured by timing the hooks) and the rest.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from es_llm.generation import Generator  # noqa: E402
from es_llm.lowrank import BatchedLowRank  # noqa: E402
from es_llm.models import load_model  # noqa: E402
from es_llm.strategy import Strategy  # noqa: E402


class Clock:
    """Times every forward of the model: the first of a call (prompt pass) apart from the others."""

    def __init__(self, model):
        self.prompt = self.decode = self.hooks = 0.0
        self.steps = 0
        self._start = None
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs=None):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        seconds = time.perf_counter() - self._start
        ids = module._clock_ids
        if ids.shape[1] > 1:
            self.prompt += seconds
        else:
            self.decode += seconds
            self.steps += 1

    def reset(self):
        self.prompt = self.decode = self.hooks = 0.0
        self.steps = 0


ROWS = {"member": "per member, generate", "member_pruned": "per member, pruning loop",
        "batch": "plain batch, generate", "batch_pruned": "plain batch, pruning loop",
        "lowrank_pruned": "low-rank batch, pruning loop", "lowrank": "low-rank batch, generate"}


def faults_and_system_s():
    """(minor page faults, system CPU seconds) of this process so far (/proc/self/stat)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--population", type=int, default=4)
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--sigma", type=float, default=0.001)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    from countdown.countdown_task import make_task

    task = make_task(args.items)
    model, tokenizer = load_model("bundled", args.precision)
    clock = Clock(model)
    original_forward = model.forward

    def forward(*a, **k):  # records the input's length for the clock
        model._clock_ids = k.get("input_ids", a[0] if a else None)
        return original_forward(*a, **k)

    model.forward = forward
    seeds = Strategy(args.population, 33).ask()
    per_member = Generator(tokenizer, task.prompts, args.max_new_tokens)
    rows = []

    def row(key, run):
        if key not in args.rows:
            return
        name = ROWS[key]
        clock.reset()
        tokens = per_member.tokens_generated
        faults, system = faults_and_system_s()
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
        faults_after, system_after = faults_and_system_s()
        rows.append((name, total, clock.prompt, clock.decode, clock.steps, clock.hooks,
                     per_member.tokens_generated - tokens, faults_after - faults,
                     system_after - system))
        print(f"{name}: {total:.1f} s", flush=True)

    per_member(model)  # warm-up
    row("member", lambda: [per_member(model) for _ in seeds])
    row("member_pruned",
        lambda: [per_member.repeated(model, 1, on_rows=lambda keep: None) for _ in seeds])
    row("batch", lambda: per_member.repeated(model, len(seeds)))
    row("batch_pruned", lambda: per_member.repeated(model, len(seeds), on_rows=lambda keep: None))
    lowrank = BatchedLowRank(model, args.rank)

    def timed_hooks(rows_map):
        """Wraps the row map's hook factories so that the hooks' own time is counted."""
        for name in ("linear_hook", "embedding_hook"):
            factory = getattr(rows_map, name)

            def wrapped(*a, _factory=factory):
                hook = _factory(*a)

                def timed(*h):
                    t0 = time.perf_counter()
                    out = hook(*h)
                    clock.hooks += time.perf_counter() - t0
                    return out
                return timed
            setattr(rows_map, name, wrapped)

    def lowrank_row(prune):
        with lowrank.perturbed(seeds, args.sigma) as rows_map:
            pass  # builds the terms once outside the timing (and checks they build)
        import es_llm.lowrank as lr
        original = lr.RowMap.__init__

        def init(self, *a, **k):
            original(self, *a, **k)
            timed_hooks(self)
        lr.RowMap.__init__ = init
        try:
            with lowrank.perturbed(seeds, args.sigma) as rows_map:
                per_member.repeated(model, len(seeds), on_rows=rows_map.select_rows if prune else None)
        finally:
            lr.RowMap.__init__ = original

    row("lowrank_pruned", lambda: lowrank_row(True))
    row("lowrank", lambda: lowrank_row(False))

    print(f"\n`python bench/profile_lowrank.py {' '.join(argv or sys.argv[1:])}`: population "
          f"{args.population}, {args.items} Countdown prompts each, {args.max_new_tokens} new tokens, "
          f"{args.precision}, {torch.get_num_threads()} threads\n")
    print("| row | total s | prompt pass s | decoding s | decoding steps | s / step | hooks s | "
          "tokens/s | minor page faults | system CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, total, prompt, decode, steps, hooks, tokens, faults, system in rows:
        print(f"| {name} | {total:.1f} | {prompt:.1f} | {decode:.1f} | {steps} | "
              f"{decode / max(steps, 1):.3f} | {hooks:.1f} | {tokens / total:.0f} | "
              f"{faults / 1e6:.1f} M | {system:.1f} |")


if __name__ == "__main__":
    main()
