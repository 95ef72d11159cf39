"""Where each vLLM population path's time goes, against the plain vLLM batch (issue 24).

    PY=~/.cache/es-llm/vllm-tier-venv/bin/python
    $PY bench/vllm_profile.py --items 16 --population 4 --max_new_tokens 128
    $PY bench/vllm_profile.py --unit conciseness --precision fp32 --parts lowrank lora --no_member

One vLLM engine at a time (in this process, bf16, the bundled model, Countdown prompts; or the
conciseness unit's: population 30 x 2 prompts x 100 tokens), the same sequences in every row:
`population` members x `items` prompts, `max_new_tokens` each. Each part is timed on its own:

    plain batch            every member's sequences in one generate call, no perturbation (the
                           reference all targets are stated against)
    batch shape            the same sequences as one generate call per member, no perturbation:
                           what the per-member path costs before any weight changes
    perturb + restore      per member, the WeightSet's two calls; `re-dispatch` is the part that
                           re-packs vLLM's CPU linear layers after a change (timed apart, in the
                           worker), the rest is the noise itself
    per member             the published loop: perturb, generate, restore for each member (on
                           vLLM's packed CPU linear layers, and with ES_VLLM_CPU_LINEAR=torch:
                           F.linear on the weights, nothing to re-pack)
    update                 the ES update after the members (one engine: no broadcast)
    LoRA layers, no adapter  a LoRA-enabled engine's plain batch without LoRA requests
    adapters written       lowrank rank 1 (LoRA members) and LoRA space (--lora_rank): each
                           member's adapter directory written
    first call / resident  the members' generate call with fresh LoRA requests (vLLM loads each
                           adapter), then again with the same requests (loaded: the kernels alone),
                           with the time in vLLM's LoRA layer methods (PunicaWrapperCPU: the linear
                           layers' products, the lm_head's and the embedding's terms)
    set in place           the members' adapters put into the resident adapters' slots (what an
                           evaluation after the first does instead of writing files)
    the adapter as it is   LoRA space: a generate call on the adapter itself (a held-out
                           evaluation, or a member evaluated alone), first from files into its own
                           slot, then in place; and the members' evaluation right after it (their
                           adapters still resident: none written)
    no keep-weights patch  (subprocess) a plain vLLM engine as vLLM builds it: the CPU linear layers
                           without our keep-weights dispatch, eager and compiled

    cprofile               (--parts cprofile) Python's profiler on one LoRA members' generate
                           call and on the same call without adapters: where the LoRA layers'
                           time goes (printed, not in the table)

Prints one table; `--output FILE` appends it to a markdown file.
"""
import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.work_units import load_task, vllm_engine  # noqa: E402
from es_llm.strategy import normalize_rewards  # noqa: E402


def timed(call, *args, **kwargs):
    t0 = time.perf_counter()
    out = call(*args, **kwargs)
    return time.perf_counter() - t0, out


def redispatch_seconds(engine) -> float:
    """Seconds to re-pack every packed CPU linear layer of the engine once (0 off CPU)."""
    def in_worker(worker):
        from accelerated.vllm_worker import _on_cpu, packed_cpu_layers, redispatch

        if not _on_cpu():
            return 0.0
        layers = packed_cpu_layers(worker.model_runner.get_model())
        t0 = time.perf_counter()
        redispatch(layers)
        return time.perf_counter() - t0
    return engine.llm.collective_rpc(in_worker)[0]


def warm_up(engine, prompts) -> None:
    """One untimed plain batch: an engine's first full batch also pays one-off costs (its KV
    cache's pages touched for the first time, kernels' first calls at these shapes), which an
    iteration after the first does not."""
    t0 = time.perf_counter()
    engine.generate(prompts)
    print(f"  warm-up batch: {time.perf_counter() - t0:.2f} s (untimed)", flush=True)


class Profile:
    def __init__(self, args):
        self.args, self.rows = args, []

    def add(self, path, part, seconds, note=""):
        self.rows.append((path, part, seconds, note))
        print(f"  {path} | {part}: {seconds:.2f} s {note}", flush=True)


def per_member_parts(p: Profile, a, model_dir, layout, task, seeds, linear="packed",
                     reference=None, compiled=False, members=True):
    """The per-member path on an engine whose CPU linear layers are `linear` (ES_VLLM_CPU_LINEAR:
    "packed", vLLM's prepacked GEMM re-packed after each change; "torch", F.linear on the
    weights as they are); the plain batch alone without `members`. Returns the plain batch's
    seconds."""
    os.environ["ES_VLLM_CPU_LINEAR"] = linear
    os.environ["ES_VLLM_CPU_COMPILE"] = "1" if compiled else "0"
    t0 = time.perf_counter()
    engine = vllm_engine(a, model_dir, layout, task, a.max_new_tokens)
    linear += ", compiled" if compiled else ""
    print(f"  engine ({linear} linear) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    prompts = list(task.prompts)
    warm_up(engine, prompts * a.population)
    path = f"per member ({linear} linear)"
    s, _ = timed(engine.generate, prompts * a.population)
    if reference is None:
        p.add("plain", "plain batch (reference)", s)
        reference = s
    else:
        p.add("plain", f"plain batch, {linear} linear", s, f"({s / reference:.2f}x the reference)")
    if not members:
        del engine
        gc.collect()
        return reference
    call = engine.generate
    s, _ = timed(lambda: [call(prompts) for _ in seeds])
    p.add(path, "batch shape: one call per member, unperturbed", s,
          f"({s / reference:.2f}x the plain batch)")
    perturb = restore = 0.0
    generate = 0.0
    rewards = []
    for seed in seeds:
        t, _ = timed(engine.weights.perturb, seed, a.sigma)
        perturb += t
        t, texts = timed(engine.generate, prompts)
        generate += t
        t, _ = timed(engine.weights.restore, seed, a.sigma)
        restore += t
        rewards.append(float(np.mean(task.score(texts, seed=seed))))
    dispatch = redispatch_seconds(engine)
    changes = 2 * len(seeds)
    p.add(path, "perturb + restore (all members)", perturb + restore,
          f"(re-dispatch {dispatch:.2f} s x {changes} changes = {dispatch * changes:.2f} s; "
          f"noise {perturb + restore - dispatch * changes:.2f} s)")
    p.add(path, "generate (all members)", generate)
    s, _ = timed(engine.weights.update, seeds, normalize_rewards(rewards).tolist(), a.alpha)
    p.add(path, "update (1 engine, no broadcast)", s)
    p.add(path, "whole evaluation", perturb + restore + generate,
          f"({(perturb + restore + generate) / reference:.2f}x the plain batch)")
    del engine
    gc.collect()
    os.environ["ES_VLLM_CPU_LINEAR"], os.environ["ES_VLLM_CPU_COMPILE"] = "packed", "0"
    return reference


def lora_parts(p: Profile, a, model_dir, layout, task, seeds, reference, mode: str):
    """LoRA members (lowrank rank 1, `mode` "lowrank") or LoRA-space ES (`mode` "lora")."""
    from bench.work_units import lora_es_config

    lora = lora_es_config(a) if mode == "lora" else None
    engine = vllm_engine(a, model_dir, layout, task, a.max_new_tokens, lowrank=lora is None,
                         lora=lora)
    path = f"LoRA members, rank {a.rank}" if lora is None else f"LoRA space, rank {a.lora_rank}"
    prompts = list(task.prompts)
    warm_up(engine, prompts * a.population)
    if lora is None:
        s, _ = timed(engine.generate, prompts * a.population)
        p.add(path, "LoRA layers, no adapter: plain batch", s,
              f"({s / reference:.2f}x the plain batch)")
    n = len(prompts)
    signs = [1.0] * len(seeds)
    with engine._adapters(len(seeds), lambda paths: None) as requests:
        paths = [q.lora_path for q in requests]
        s, _ = timed(engine._write_members, seeds, a.sigma, signs, paths)
        p.add(path, "adapters written", s, f"({len(seeds)} members)")
        rows = [q for q in requests for _ in range(n)]
        s, _ = timed(engine.generate, prompts * len(seeds), lora_requests=rows)
        p.add(path, "generate, fresh requests (adapters loaded)", s,
              f"({s / reference:.2f}x the plain batch)")
        with LoraMethodTimes() as methods:
            s, _ = timed(engine.generate, prompts * len(seeds), lora_requests=rows)
        p.add(path, "generate, resident adapters (kernels only)", s,
              f"({s / reference:.2f}x the plain batch)")
        for part, seconds in methods.parts():
            p.add(path, f"of which {part}", seconds, f"({seconds / reference:.3f}x the plain batch)")
        s, done = timed(engine._set_members, seeds, a.sigma, signs,
                        [q.lora_int_id for q in requests])
        p.add(path, "members set in place into the resident adapters", s,
              "" if done else "(refused: not resident; nothing set)")
        one = [requests[0]] * (n * len(seeds))
        s, _ = timed(engine.generate, prompts * len(seeds), lora_requests=one)
        p.add(path, "generate, one resident adapter for every row", s,
              f"({s / reference:.2f}x the plain batch)")
    s, results = timed(engine.evaluate_batch, seeds, a.sigma, signs)
    p.add(path, "whole evaluation (evaluate_batch), first: adapters written and loaded", s,
          f"({s / reference:.2f}x the plain batch)")
    s, results = timed(engine.evaluate_batch, seeds, a.sigma, signs)
    p.add(path, "whole evaluation (evaluate_batch), later: members set in place", s,
          f"({s / reference:.2f}x the plain batch)")
    if lora is not None:  # the adapter as it is (a held-out evaluation; a member alone)
        for when in ("first: written and loaded into its own slot", "later: set in place"):
            s, _ = timed(engine.generate, prompts)
            p.add(path, f"generate, the adapter as it is, {when}", s, f"({n} sequences)")
        written = engine.adapters_written
        s, _ = timed(engine.evaluate_batch, seeds, a.sigma, signs)
        p.add(path, "whole evaluation right after it", s,
              f"({engine.adapters_written - written} adapters written)")
    z = normalize_rewards([r["reward"] for r in results]).tolist()
    s, _ = timed(engine.weights.update, seeds, z, a.alpha)
    p.add(path, "update (1 engine, no broadcast)", s)
    del engine
    gc.collect()


class LoraMethodTimes:
    """Seconds spent in vLLM's CPU LoRA layer methods (PunicaWrapperCPU, ours where installed)
    while in use: the linear layers' products, and the lm_head's and the embedding's terms."""

    GROUPS = {"LoRA linear layers": ("add_lora_linear", "add_shrink", "add_expand"),
              "lm_head and embedding LoRA terms": ("add_lora_logits", "add_lora_embedding")}

    def __enter__(self):
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        self.cls, self.saved, self.seconds, self.calls = PunicaWrapperCPU, {}, {}, {}
        for name in sum(self.GROUPS.values(), ()):
            method = self.saved[name] = getattr(PunicaWrapperCPU, name)
            setattr(PunicaWrapperCPU, name, self._timing(name, method))
        return self

    def _timing(self, name, method):
        def timed_method(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed_method

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(self.cls, name, method)

    def parts(self):
        for group, names in self.GROUPS.items():
            calls = sum(self.calls.get(n, 0) for n in names)
            yield f"{group} ({calls} calls)", sum(self.seconds.get(n, 0.0) for n in names)


def cprofile_part(a, model_dir, layout, task, seeds) -> None:
    """cProfile of the LoRA members' generate call against the same call without adapters (the
    functions with the most own time), to see where the LoRA layers' time goes."""
    import cProfile
    import pstats

    engine = vllm_engine(a, model_dir, layout, task, a.max_new_tokens, lowrank=True)
    prompts = list(task.prompts)
    warm_up(engine, prompts * len(seeds))
    with engine._adapters(len(seeds), lambda paths: None) as requests:
        engine._write_members(seeds, a.sigma, [1.0] * len(seeds), [q.lora_path for q in requests])
        rows = [q for q in requests for _ in prompts]
        engine.generate(prompts * len(seeds), lora_requests=rows)  # adapters loaded
        for name, extra in (("without adapters", {}), ("LoRA members", {"lora_requests": rows})):
            profile = cProfile.Profile()
            profile.enable()
            engine.generate(prompts * len(seeds), **extra)
            profile.disable()
            print(f"=== cProfile: one generate call, {name}", flush=True)
            pstats.Stats(profile).sort_stats("tottime").print_stats(a.cprofile_rows)
    del engine
    gc.collect()


UNPATCHED = r"""
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
spec = json.loads(sys.argv[1])
llm = LLM(model=spec["model"], dtype=spec["dtype"], tensor_parallel_size=1,
          distributed_executor_backend="uni", enforce_eager=spec["eager"],
          enable_prefix_caching=False, max_model_len=spec["max_model_len"],
          kv_cache_memory_bytes=1 << 30)
params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"])
llm.generate(spec["prompts"], params, use_tqdm=False)  # warm-up, as warm_up()
t0 = time.perf_counter()
llm.generate(spec["prompts"], params, use_tqdm=False)
print("SECONDS", time.perf_counter() - t0)
"""


def unpatched_parts(p: Profile, a, model_dir, task, reference):
    for eager in (True, False):
        spec = {"model": str(model_dir), "dtype": "bfloat16", "eager": eager,
                "max_model_len": a.max_model_len, "max_new_tokens": a.max_new_tokens,
                "prompts": list(task.prompts) * a.population}
        done = subprocess.run([sys.executable, "-c", UNPATCHED, json.dumps(spec)],
                              capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("SECONDS")]
        if done.returncode or not line:
            p.add("plain", f"no keep-weights patch, {'eager' if eager else 'compiled'}",
                  float("nan"), f"(failed: {done.stderr[-300:]!r})")
            continue
        s = float(line[0].split()[1])
        p.add("plain", f"no keep-weights patch, {'eager' if eager else 'compiled'}", s,
              f"({s / reference:.2f}x the patched eager plain batch)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unit", choices=["countdown", "conciseness"], default="countdown")
    ap.add_argument("--items", type=int, default=None, help="default: 16 (Countdown), 2")
    ap.add_argument("--population", type=int, default=None, help="default: 4 (Countdown), 30")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default: 128, 100")
    ap.add_argument("--no_member", action="store_true",
                    help="the plain batch alone, not the per-member path's parts")
    ap.add_argument("--sigma", type=float, default=0.001)
    ap.add_argument("--alpha", type=float, default=0.0005)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--lora_rank", type=int, default=8)
    ap.add_argument("--lowrank_batch", type=int, default=256)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--model", default="bundled")
    parts = ["member_torch", "member_compiled", "lowrank", "lora", "unpatched", "cprofile"]
    ap.add_argument("--parts", nargs="*", default=parts, choices=parts,
                    help="besides the per-member path on packed linear layers (always)")
    ap.add_argument("--output", default=None)
    ap.add_argument("--cprofile_rows", type=int, default=15,
                    help="--parts cprofile: the functions listed (by own time)")
    a = ap.parse_args(argv)
    defaults = (dict(items=16, population=4, max_new_tokens=128) if a.unit == "countdown"
                else dict(items=2, population=30, max_new_tokens=100))
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    torch.set_grad_enabled(False)
    from transformers import AutoTokenizer

    from es_llm.hf_weights import hf_layout, resolve_base_model

    model_dir = resolve_base_model(a.model, Path.home() / ".cache/es-llm/bench-converted")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = load_task(a.unit, a.items)
    longest = max(len(ids) for ids in tokenizer(list(task.prompts))["input_ids"])
    a.max_model_len = longest + a.max_new_tokens + 8
    a.model_name = model_dir
    layout = hf_layout(model_dir)
    seeds = np.random.RandomState(0).randint(0, 2**30, size=a.population, dtype=np.int64).tolist()
    p = Profile(a)
    reference = per_member_parts(p, a, model_dir, layout, task, seeds, members=not a.no_member)
    if "member_torch" in a.parts:
        per_member_parts(p, a, model_dir, layout, task, seeds, "torch", reference)
    if "member_compiled" in a.parts:
        per_member_parts(p, a, model_dir, layout, task, seeds, "torch", reference, compiled=True)
    for mode in ("lowrank", "lora"):
        if mode in a.parts:
            lora_parts(p, a, model_dir, layout, task, seeds, reference, mode)
    if "unpatched" in a.parts:
        unpatched_parts(p, a, model_dir, task, reference)
    if "cprofile" in a.parts:
        cprofile_part(a, model_dir, layout, task, seeds)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    lines = [f"`{command}` on {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}: population {a.population}, {a.items} {a.unit} "
             f"prompts, {a.max_new_tokens} new tokens, {a.precision}", "",
             "| path | part | seconds | |", "|---|---|---|---|"]
    lines += [f"| {path} | {part} | {s:.2f} | {note} |" for path, part, s, note in p.rows]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.output:
        with open(a.output, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
