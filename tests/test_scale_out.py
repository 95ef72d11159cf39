"""Scale-out on this machine: two "machines" for accelerate, a two-node Ray cluster for the
accelerated version (Ray's own test harness, ray.cluster_utils.Cluster), and a node lost mid-run.

These prove the multi-node commands in the README: `accelerate launch --num_machines 2` with one
process per machine gives the same run as one process; the accelerated version on a Ray cluster
whose engines sit on two nodes gives the same run as on one machine; losing a worker node stops the
run within a bounded time, its last checkpoint intact and the resume command printed, and the run
resumes on the node that is left (one test: the resumed run equals one machine's).
"""
import shlex
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import (PYTHON, ROOT, free_port, read_until, run_main, run_script, start_script,
                      stop_shared_ray)
from es_llm import checkpoint as ckpt

pytestmark = pytest.mark.slow

TINY = ["--population_size", "4", "--sigma", "0.05", "--alpha", "0.02", "--max_new_tokens", "6",
        "--precision", "fp32", "--report_to", "none"]


def without_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_machines_equal_one_process(tiny_model_dir, tmp_path):
    """Machine ranks 0 and 1 on 127.0.0.1 (gloo), one process each, as on two real machines."""
    train = ["es_fine-tuning_conciseness.py", "--model_name", str(tiny_model_dir),
             "--num_iterations", "2", "--gpu_threads", "1", "--verbose", *TINY]
    run_main([PYTHON, *train, "--output_dir", str(tmp_path / "one")])
    port = str(free_port())
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "2",
              "--main_process_ip", "127.0.0.1", "--main_process_port", port,
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / "two_machines"
    second = subprocess.Popen([*launch, "--machine_rank", "1", *train, "--output_dir", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = run_script([*launch, "--machine_rank", "0", *train, "--output_dir", str(out)])
        assert second.wait(timeout=300) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert "[rank 1] member 1" in second.stdout.read()  # member 1 ran on the second machine
    assert "[rank 0] member 0" in first.stdout + first.stderr
    assert without_time(ckpt.read_metrics(out / ckpt.METRICS_FILE)) == \
        without_time(ckpt.read_metrics(tmp_path / "one" / ckpt.METRICS_FILE))
    assert same_weights(out / "model.safetensors", tmp_path / "one" / "model.safetensors")


@pytest.fixture
def two_node_cluster():
    """A head node and a worker node, one CPU each: two engines of one CPU land on both."""
    from ray.cluster_utils import Cluster

    stop_shared_ray()  # this process's own Ray, if a test before left it running
    # Workers at the driver's priority, as the trainer's own local Ray has them (accelerated/pool.py:
    # Ray's default nice 15 starves the engines beside the suite's other jobs).
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "_system_config": {"worker_niceness": 0}})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, worker
    finally:
        cluster.shutdown()


def accl(tiny_model_dir, experiment, iterations, *extra):
    return [PYTHON, str(ROOT / "tests" / "accl_varied_reward.py"), "--model_name",
            str(tiny_model_dir), "--engine", "transformers", "--num_engines", "2",
            "--data_sample", "4", "--noise_mode", "iid", "--master_weights", "fp32",
            "--experiment_dir", str(experiment), "--num_iterations", str(iterations), *TINY, *extra]


@pytest.mark.ray
def test_a_two_node_cluster_equals_one_machine_and_a_lost_node_stops_it_to_resume_on_the_node_left(
        tiny_model_dir, tmp_path, two_node_cluster):
    """An engine on each node of the cluster; the worker node dies during the second iteration:
    the run stops, its last checkpoint intact and the resume command printed, and resumed on the
    head node alone (1 engine) it gives the run of one machine (2 engines) bit for bit: records
    and final weights. The iterations before the loss ran on the two nodes, so the cluster's
    iterations equal one machine's."""
    cluster, worker = two_node_cluster
    args = accl(tiny_model_dir, tmp_path, 1000, "--run_name", "run", "--ray_address",
                cluster.address, "--save_every", "1")
    proc = start_script(args)
    try:
        lines = read_until(proc, "Iteration 2/")
        # Each node has one CPU and each engine's placement bundle takes one: one engine a node.
        assert any("2 transformers engines on CPU ready" in line for line in lines), lines
        cluster.remove_node(worker)  # the worker node dies during (or just before) an iteration
        lost = time.time()
        rest = proc.stdout.read()
        status = proc.wait(timeout=300)
        elapsed = time.time() - lost
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert status not in (0, None), output
    assert elapsed < 180, f"the run took {elapsed:.0f} s to stop after losing a node"
    assert "an engine was lost" in output and "Resume with:" in output, output
    run = tmp_path / "run"
    latest = ckpt.list_checkpoints(run)[-1]
    last = ckpt.load_state(latest)["iteration"]
    assert last >= 1 and load_file(str(latest / "model.safetensors"))  # intact and readable

    resume = shlex.split(output.split("Resume with:\n", 1)[1].splitlines()[0])
    resume[resume.index("--num_iterations") + 1] = str(last + 1)
    resume[resume.index("--num_engines") + 1] = "1"  # the head node has room for one engine
    proc = run_script([PYTHON, str(ROOT / "tests" / "accl_varied_reward.py"), *resume[2:]])
    assert f"resuming from {latest} at iteration {last}" in proc.stdout
    records = ckpt.read_metrics(run / ckpt.METRICS_FILE)
    assert [r["iteration"] for r in records] == list(range(1, last + 2))
    assert ckpt.load_state(run)["finished"]

    # One machine's run of as many iterations (its own local Ray, 2 engines): the same run.
    run_script(accl(tiny_model_dir, tmp_path, last + 1, "--run_name", "local"))
    local = tmp_path / "local"
    assert without_time(records) == without_time(ckpt.read_metrics(local / ckpt.METRICS_FILE))
    assert same_weights(run / "final_model" / "model.safetensors",
                        local / "final_model" / "model.safetensors")
