"""One Ray actor per inference engine: placement, the seed queue, update and broadcast.

Only seeds go out to the engines and only rewards (and timings) come back; the noise is regenerated
from the seeds inside each engine. Engines sit in one placement group, one bundle each (a GPU and a
CPU on GPU clusters, CPUs otherwise), so Ray places them on any node of the cluster that has room.
"""
import os
import socket
from collections import deque
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from es_llm.config import SCHEDULES
from es_llm.weightset import COLLECTIVE_TIMEOUT_S, WEIGHT_OPS

ROOT = Path(__file__).resolve().parents[1]
PLACEMENT_TIMEOUT_S = 300


def _pythonpath() -> str:
    """The repository first, so that workers (and vLLM's, through `utils.worker_extn`) import
    `accelerated`, `es_llm`, `countdown` and `utils` from it."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def start_ray(address: str = "local", verbose: bool = False, num_cpus=None) -> bool:
    """Start a private local Ray ("local") or join a running cluster ("auto" or host:port), and
    return True; a Ray this process already runs (a notebook's, a test session's) is used as it is,
    and False returned: it is not the run's to shut down."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"PYTHONPATH": _pythonpath()}}
    if address == "local":
        # Ray renices its worker processes to 15 by default (`worker_niceness`), which would make
        # the engines, the run's whole work, yield to any other job on the machine (on a shared
        # CPU box they all but stop, and a `nice` the user chose is lost in it): our private Ray's
        # workers keep the priority the run was started with.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=verbose, runtime_env=runtime_env,
                 _system_config={"worker_niceness": 0})
    else:
        ray.init(address=address, log_to_driver=verbose, runtime_env=runtime_env)
    return True


class EngineActor:
    """Builds one engine in its own process and runs, for the driver, the population members and
    the operations of the engine's WeightSet."""

    def __init__(self, kind: str, engine_kwargs: dict, task, heldout=None):
        from accelerated.engines import make_engine

        self.engine = make_engine(kind, **engine_kwargs)
        self.engine.set_task(task, heldout)

    def evaluate(self, seed: int, sigma: float, sign: float, prompts=None,
                 iteration: int = 0) -> dict:
        return self.engine.evaluate(seed, sigma, sign, prompts, iteration)

    def evaluate_batch(self, seeds, sigma: float, signs, prompts=None, iteration: int = 0) -> list:
        return self.engine.evaluate_batch(seeds, sigma, signs, prompts, iteration)

    def heldout_reward(self) -> dict:
        return self.engine.heldout_reward()

    def weight_op(self, name: str, *args):
        """engine.weights.<name>(*args), for `name` one of WEIGHT_OPS (perturb, update,
        broadcast, state_dict, ...); any other name is refused."""
        if name not in WEIGHT_OPS:
            raise ValueError(f"unknown weight operation {name!r}; expected one of {WEIGHT_OPS}")
        return getattr(self.engine.weights, name)(*args)

    def rendezvous(self):
        """This node's address and a free port, to host the engines' collective group."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port


def cpu_binding(num_engines: int) -> list:
    """Disjoint core lists (as "0,1") for engines sharing this machine's CPUs."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // num_engines)
    return [",".join(str(cores[(i * per + j) % len(cores)]) for j in range(per))
            for i in range(num_engines)]


class EnginePool:
    """`num_engines` engines of one kind, each a Ray actor on its own bundle (a GPU on GPUs)."""

    def __init__(self, kind: str, num_engines: int, engine_kwargs: dict, task, use_gpu: bool,
                 cpus_per_engine: int = 1, bind_cpus: bool = False,
                 collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, heldout=None):
        """`heldout`: the held-out task (--eval_every), or None."""
        self.actors, self.pg = [], None
        try:
            bundle = {"CPU": cpus_per_engine, **({"GPU": 1} if use_gpu else {})}
            self.pg = placement_group([dict(bundle) for _ in range(num_engines)], strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"Ray could not place {num_engines} engines of {bundle} within "
                    f"{PLACEMENT_TIMEOUT_S} s; the cluster has {ray.cluster_resources()}. Lower "
                    f"--num_engines, or add nodes (ray start --address=HEAD:6379)") from None
            binds = cpu_binding(num_engines) if bind_cpus else [None] * num_engines
            remote = ray.remote(EngineActor)
            for i in range(num_engines):
                env = {"PYTHONPATH": _pythonpath()}
                if binds[i]:
                    env["VLLM_CPU_OMP_THREADS_BIND"] = binds[i]
                    # Engines sharing this machine's cores: each computes with its own share of
                    # them. Without this, torch in every engine used all the cores, so 2 engines
                    # ran 4 busy threads on 2 cores and each step waited on a descheduled
                    # thread: 4x slower than one engine (docs/benchmarks.md, work units).
                    env["OMP_NUM_THREADS"] = str(len(binds[i].split(",")))
                self.actors.append(remote.options(
                    num_cpus=cpus_per_engine, num_gpus=1 if use_gpu else 0,
                    runtime_env={"env_vars": env},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=i)).remote(kind, engine_kwargs, task,
                                                                         heldout))
            self.call_all("names")  # waits until every engine has loaded (or raises its error)
            host, port = ray.get(self.actors[0].rendezvous.remote())
            backend = "nccl" if use_gpu else "gloo"
            ray.get([a.weight_op.remote("init_collective", host, port, rank, num_engines,
                                        backend, collective_timeout_s)
                     for rank, a in enumerate(self.actors)])
        except BaseException:  # a failed start (or Ctrl-C during it) releases what it took
            self.shutdown()
            raise

    def call_all(self, op: str, *args) -> list:
        """Every engine's answer to the weight operation `op` (one of WEIGHT_OPS)."""
        return ray.get([a.weight_op.remote(op, *args) for a in self.actors])

    def call_main(self, op: str, *args):
        """Engine 0's answer to the weight operation `op`."""
        return ray.get(self.actors[0].weight_op.remote(op, *args))

    def evaluate(self, seeds, sigma: float, signs=None, on_result=None, schedule: str = "dynamic",
                 batched: bool = False, prompts=None, iteration: int = 0) -> list:
        """Each member's result dict (reward, timings, first completion), in seed order; member i
        is perturbed by signs[i] * sigma (antithetic pairs; default +1) and scored on the training
        prompts `prompts` (indices; None: all), its sampled rollouts seeded with `iteration`.

        dynamic: a seed goes to whichever engine is free first (the published scheduling).
        static: member i goes to engine i % num_engines, each engine taking its members in order;
        an engine that restores by subtracting the noise (no fp32 masters) drifts by rounding with
        every member it evaluates, so only this makes such runs reproducible bit for bit.
        batched (lowrank mode, --lora_batch): engine e generates its members i = e mod
        num_engines together."""
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        signs = [1.0] * len(seeds) if signs is None else [float(x) for x in signs]
        engines = len(self.actors)
        if batched:
            parts = [list(range(e, len(seeds), engines)) for e in range(engines)]
            refs = [self.actors[e].evaluate_batch.remote([int(seeds[i]) for i in part], sigma,
                                                         [signs[i] for i in part], prompts,
                                                         iteration)
                    for e, part in enumerate(parts) if part]
            results = [None] * len(seeds)
            for part, batch in zip([p for p in parts if p], ray.get(refs)):
                for i, result in zip(part, batch):
                    results[i] = result
                    if on_result:
                        on_result(i, result)
            return results
        queues = ([deque(range(len(seeds)))] * engines if schedule == "dynamic"
                  else [deque(range(e, len(seeds), engines)) for e in range(engines)])
        results = [None] * len(seeds)
        running = {}

        def submit(e):
            i = queues[e].popleft()
            running[self.actors[e].evaluate.remote(int(seeds[i]), sigma, signs[i], prompts,
                                                   iteration)] = (i, e)

        for e in range(engines):
            if queues[e]:
                submit(e)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i, e = running.pop(ref)
            results[i] = ray.get(ref)
            if queues[e]:
                submit(e)
            if on_result:
                on_result(i, results[i])
        return results

    def update(self, seeds, z, alpha: float, n=None, everywhere: bool = False) -> None:
        """The update on engine 0 only (broadcast() then gives it to the others), or with
        `everywhere` the same update on every engine (an optimizer's step: each engine keeps the
        same optimizer state)."""
        args = ("update", [int(s) for s in seeds], [float(x) for x in z], alpha, n)
        if everywhere:
            self.call_all(*args)
        else:
            self.call_main(*args)

    def heldout_reward(self) -> dict:
        """Engine 0's held-out entries (--eval_every), on its unperturbed weights."""
        return ray.get(self.actors[0].heldout_reward.remote())

    def broadcast(self) -> None:
        self.call_all("broadcast", 0)

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead: nothing left to release
                pass
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
