"""run.sh: how long the processes get to stop after a signal; two launchers whose nodes share no disk; inside a Slurm
job (fake Slurm variables and a fake `scontrol`, two launchers on loopback); the sbatch examples."""

import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli



def finish_together(processes, timeout=400):
    """(exit code, stdout, stderr) of each process, their pipes read at the same time: a launcher left writing to a
    full pipe that nobody reads stalls, and with it every node it trains with."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(processes)) as pool:
        outputs = list(pool.map(lambda p: p.communicate(timeout=timeout), processes))
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]

def test_a_process_that_takes_45_s_to_stop_is_not_killed(tmp_path):
    """torchrun kills its processes 30 s after passing on a SIGTERM unless told otherwise; a rank saving a 7B sharded
    checkpoint to a shared filesystem needs longer. Under run.sh (STOP_TIMEOUT, 600 s by default) a process that
    needs 45 s finishes, and run.sh exits 143."""
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="1", OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(["bash", "run.sh", "tests/slow_stop_worker.py", str(tmp_path), "45"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=300)
    assert (tmp_path / "stopped").exists(), out  # not killed at 30 s
    assert launcher.returncode == 143, (launcher.returncode, out)


def local_disks(tmp_path):
    """(--output_dir, [node 0's disk, node 1's disk]) for `on_two_nodes_with_local_disks`, made empty."""
    out, disks = tmp_path / "outputs", [tmp_path / f"node{i}-disk" for i in range(2)]
    for folder in (out, *disks):
        folder.mkdir()
    return out, disks


def on_two_nodes_with_local_disks(script, flags, folder, disks):
    """Run `script` with `flags` on two launchers (NNODES=2, one process each, loopback), each in its own mount
    namespace where `folder` is its own disk (`disks[node]`), as on nodes that share none; finish_together's list."""
    port = free_port()
    nodes = []
    for node in range(2):
        command = f"mount --bind {disks[node]} {folder} && exec bash run.sh {script} " + " ".join(flags)
        env = dict(os.environ, PYTHON=sys.executable, NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        nodes.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", command], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return finish_together(nodes)

def test_two_nodes_with_node_local_output_folders_exit_together_on_resume(tmp_path):
    """Two launchers (NNODES=2, one process each, loopback), each in its own mount namespace where --output_dir is a
    different disk, as on nodes that share none. The first run trains and saves; on node 1 its checkpoint holds only
    that node's own file. The same command for more steps then finds a complete checkpoint on node 0 and not on node
    1: before, node 0 resumed and node 1 started afresh, both trained at different steps and then hung. Now both
    ranks resume from rank 0's choice or neither does: each exits 2 with one line, and no traceback."""
    import demo

    model, train, _ = demo.build_sft_demo(tmp_path / "shared")  # data and model on a disk both nodes see
    out, disks = local_disks(tmp_path)

    def run_both(steps):
        return on_two_nodes_with_local_disks("sft_qwen2.py", [
            "--model_name_or_path", str(model), "--train_file", str(train), "--output_dir", str(out), "--max_len",
            "256", "--max_steps", str(steps), "--save_steps", "2", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--use_cpu", "--disable_tqdm", "true"], out, disks)

    first = run_both(2)
    assert [code for code, _, _ in first] == [0, 0], first[0][2][-2000:] + first[1][2][-2000:]
    assert sorted(os.listdir(disks[1] / "checkpoint-2")) == ["rng_state_1.pth"]  # node 1's part alone
    assert "checkpoint-complete" in os.listdir(disks[0] / "checkpoint-2")

    second = run_both(4)
    assert [code for code, _, _ in second] == [2, 2], second
    assert not any("Traceback" in stderr for _, _, stderr in second), second
    errors = [line for _, _, stderr in second for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}/checkpoint-2: ") and errors[0].endswith(
        "(met by process 1, not by process 0: every node must see the same --output_dir, on a shared filesystem, or "
        "a copy of the whole checkpoint)"), errors
    assert not os.path.exists(disks[0] / "checkpoint-4") and not os.path.exists(disks[1] / "checkpoint-4")


def test_two_nodes_with_node_local_output_folders_refuse_a_best_checkpoint_at_start(tmp_path):
    """--load_best_model_at_end reads the best checkpoint back on every rank after training; with a disk per node,
    node 1 cannot see what node 0 saves (under FSDP2 or ZeRO-3 the load crashes, under DDP node 1 keeps its last
    weights): both exit 2 at start with one line, before any step."""
    import demo

    model, train, evaluation = demo.build_sft_demo(tmp_path / "shared")
    out, disks = local_disks(tmp_path)
    both = on_two_nodes_with_local_disks("sft_qwen2.py", [
        "--model_name_or_path", str(model), "--train_file", str(train), "--eval_file", str(evaluation),
        "--output_dir", str(out), "--max_len", "256", "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps",
        "2", "--save_steps", "2", "--load_best_model_at_end", "--use_cpu", "--disable_tqdm", "true"], out, disks)
    assert [code for code, _, _ in both] == [2, 2], both
    assert not any("Traceback" in stderr for _, _, stderr in both), both
    errors = [line for _, _, stderr in both for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --load_best_model_at_end: every process reads the best checkpoint back at the end, "
                      f"and process 1 does not see what process 0 writes in --output_dir {out} (a disk of its own "
                      f"node); put --output_dir on a filesystem every node sees"], errors
    assert os.listdir(disks[0]) == [] and os.listdir(disks[1]) == []  # no step, and the probe is gone


BASH = shutil.which("bash")
LAUNCH_VARIABLES = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")


def fake_scontrol(tmp_path, *hosts, code=0):
    """A folder holding an `scontrol` that records its arguments in tmp_path/scontrol-calls, prints `hosts` one a
    line (as `scontrol show hostnames` does) and exits `code`; (folder, record file)."""
    folder, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    folder.mkdir()
    lines = "".join(f"echo {host}\n" for host in hosts)
    if code:
        lines += "echo 'scontrol: error: Unable to contact slurm controller' >&2\n"
    (folder / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{lines}exit {code}\n')
    (folder / "scontrol").chmod(0o755)
    return folder, calls


def slurm_env(path, **slurm):
    """This environment without any Slurm or launch variable of the machine running the tests, then `slurm`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARIABLES}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PATH=path)
    env.update({k: str(v) for k, v in slurm.items()})
    return env


def launch(env, script="tests/rank_worker.py"):
    return subprocess.Popen([BASH, "run.sh", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def refused(env):
    """run.sh under `env` exits 2 with one `error:` line on stderr, no traceback, before any process starts; the line."""
    p = launch(env)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 2, stdout + stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    assert not reports(stdout)
    return stderr


def reports(stdout):
    """The rank_worker lines of a launcher's stdout, as dicts."""
    return [dict(item.split("=", 1) for item in line.split()) for line in stdout.splitlines()
            if line.startswith("RANK=")]


def free_port(low=1024, high=65536):
    """A port nothing on this machine listens on now, in [low, high)."""
    for port in random.sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def test_two_launchers_in_a_slurm_job_find_each_other(tmp_path):
    """`srun bash run.sh ...` on two nodes, one task each: each launcher takes the node count, its node rank, the
    master (the step's first node, from `scontrol show hostnames`) and the processes per node from Slurm, and the
    port from the job id, the same on both. Here on loopback, the fake scontrol's first host being 127.0.0.1; the
    job id is chosen so that the port it gives is free now."""
    folder, calls = fake_scontrol(tmp_path, "127.0.0.1", "localhost")
    port = free_port(15000, 30000)
    job = 90000 + port  # run.sh: 15000 + SLURM_JOB_ID % 15000
    slurm = dict(SLURM_JOB_ID=job, SLURM_STEP_ID=0, SLURM_NNODES=2, SLURM_JOB_NUM_NODES=4, SLURM_NTASKS=2,
                 SLURM_NTASKS_PER_NODE=1, SLURM_JOB_NODELIST="node-[1-4]", SLURM_STEP_NODELIST="node-[3-4]",
                 SLURM_GPUS_ON_NODE=1)
    path = f"{folder}{os.pathsep}{os.environ['PATH']}"
    nodes = [launch(slurm_env(path, **slurm, SLURM_NODEID=node, SLURM_PROCID=node)) for node in range(2)]
    results = [(out, err) for _, out, err in finish_together(nodes, timeout=300)]
    assert [p.returncode for p in nodes] == [0, 0], results
    seen = [report for stdout, _ in results for report in reports(stdout)]
    assert sorted(r["RANK"] for r in seen) == ["0", "1"], results
    assert {(r["WORLD_SIZE"], r["LOCAL_RANK"], r["MASTER_ADDR"], r["MASTER_PORT"], r["SUM"]) for r in seen} == {
        ("2", "0", "127.0.0.1", str(port), "3")}, seen
    for node, (_, stderr) in enumerate(results):
        line = f"run.sh: Slurm job {job}: 2 nodes, node rank {node}, master 127.0.0.1:{port}, 1 process per node\n"
        assert line in stderr, stderr
    # the step's nodes, not the job's: SLURM_NODEID counts the step's, and a step may run on some of the job's nodes
    assert calls.read_text().splitlines() == ["show hostnames node-[3-4]"] * 2


def test_explicit_launch_variables_win_over_slurm(tmp_path):
    """Slurm says 2 nodes of 8 GPUs, this one node 1, and scontrol names an address no one answers on; the user's
    NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and NPROC_PER_NODE are what torchrun gets, and scontrol is not
    asked."""
    folder, calls = fake_scontrol(tmp_path, "10.255.255.1", "10.255.255.2")
    port = free_port()
    env = slurm_env(f"{folder}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=4242, SLURM_STEP_ID=0, SLURM_NNODES=2,
                    SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=1, SLURM_NODEID=1, SLURM_PROCID=1,
                    SLURM_JOB_NODELIST="node-[1-2]", SLURM_GPUS_ON_NODE=8, NNODES=1, NODE_RANK=0,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE=1)
    p = launch(env)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stdout + stderr
    assert [(r["RANK"], r["WORLD_SIZE"], r["MASTER_ADDR"], r["MASTER_PORT"]) for r in reports(stdout)] == [
        ("0", "1", "127.0.0.1", str(port))], stdout
    assert (f"run.sh: Slurm job 4242: 1 node, node rank 0, master 127.0.0.1:{port}, 1 process per node (set by you: "
            "NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE)\n") in stderr, stderr
    assert not calls.exists()


@pytest.mark.parametrize("tasks", [dict(SLURM_NTASKS_PER_NODE=2, SLURM_NTASKS=4), dict(SLURM_NTASKS=4)])
def test_several_tasks_per_node_exit_2(tmp_path, tasks):
    """`srun` with 2 tasks per node would start run.sh twice per node, each starting every GPU's process with the
    same node rank: exit 2 with one line, before anything starts."""
    folder, _ = fake_scontrol(tmp_path, "127.0.0.1", "localhost")
    env = slurm_env(f"{folder}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=4243, SLURM_STEP_ID=0,
                    SLURM_NNODES=2, SLURM_NODEID=0, SLURM_PROCID=0, SLURM_JOB_NODELIST="node-[1-2]",
                    SLURM_GPUS_ON_NODE=1, **tasks)
    stderr = refused(env)
    assert "one task per node" in stderr and "srun --ntasks-per-node=1" in stderr, stderr


@pytest.mark.parametrize("scontrol", ["missing", "failing"])
def test_no_master_without_scontrol_exits_2(tmp_path, scontrol):
    """MASTER_ADDR unset in a Slurm job and `scontrol show hostnames` missing or failing: exit 2 with one line that
    names scontrol and says to set MASTER_ADDR."""
    if scontrol == "missing":
        folder = tmp_path / "bin"  # nothing else on PATH: run.sh finds its python in PYTHON
        folder.mkdir()
    else:
        folder, _ = fake_scontrol(tmp_path, code=1)
    env = slurm_env(str(folder), SLURM_JOB_ID=4244, SLURM_STEP_ID=0, SLURM_NNODES=2, SLURM_NTASKS=2,
                    SLURM_NTASKS_PER_NODE=1, SLURM_NODEID=0, SLURM_PROCID=0, SLURM_JOB_NODELIST="node-[1-2]",
                    SLURM_GPUS_ON_NODE=1)
    stderr = refused(env)
    assert "scontrol" in stderr and "set MASTER_ADDR" in stderr, stderr


def test_sbatch_examples_run_a_recipe_and_stop_before_slurm_kills_them():
    """Each configs/slurm/*.sbatch is valid bash, asks for one task per node on 2 nodes x 8 GPUs, runs an existing
    script on an existing recipe through `srun bash run.sh`, gets its SIGTERM in its job steps (where torchrun is)
    N seconds before the end, gives the processes STOP_TIMEOUT < N seconds to save, and can be requeued."""
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "slurm", "*.sbatch")))
    assert [os.path.basename(f) for f in files] == ["scorer-qwen3vl-8b-2x8gpu.sbatch", "sft-qwen2-7b-2x8gpu.sbatch"]
    for path in files:
        check = subprocess.run([BASH, "-n", path], capture_output=True, text=True)
        assert check.returncode == 0, (path, check.stderr)
        with open(path) as f:
            text = f.read()
        directives = set(re.findall(r"^#SBATCH (\S+)\s*$", text, flags=re.M))
        assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue", "--open-mode=append"} <= (
            directives), (path, directives)
        (grace,) = re.findall(r"^#SBATCH --signal=TERM@(\d+)\s*$", text, flags=re.M)
        (stop,) = re.findall(r"^export STOP_TIMEOUT=(\d+)\s*$", text, flags=re.M)
        assert 0 < int(stop) < int(grace), (path, stop, grace)
        ((script, config),) = re.findall(r"^srun .*\bbash run\.sh (\S+\.py) (configs/\S+\.yaml)\s*$", text,
                                         flags=re.M)
        assert os.path.isfile(os.path.join(ROOT, script)) and os.path.isfile(os.path.join(ROOT, config)), path


@pytest.mark.parametrize("nnodes, code", [(None, 2), ("1", 0)])
def test_started_once_in_a_job_of_two_nodes_exits_2_unless_told_one_node(tmp_path, nnodes, code):
    """run.sh run by the batch script itself (no srun step) in a 2-node job is one launcher: it would wait forever for
    the second node's. Exit 2 with one line saying to use srun; with NNODES=1 it trains on this node alone."""
    folder, _ = fake_scontrol(tmp_path, "127.0.0.1", "localhost")
    extra = {} if nnodes is None else dict(NNODES=nnodes, NPROC_PER_NODE=1)
    env = slurm_env(f"{folder}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=4245, SLURM_NNODES=2, SLURM_NTASKS=2,
                    SLURM_NODEID=0, SLURM_JOB_NODELIST="node-[1-2]", **extra)
    if code == 2:
        assert "srun --ntasks-per-node=1" in refused(env)
    else:
        p = launch(env)
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stdout + stderr
        assert [(r["RANK"], r["WORLD_SIZE"]) for r in reports(stdout)] == [("0", "1")], stdout


@pytest.mark.parametrize("script, flags", [
    ("sft_qwen2.py", ["--use_peft", "--max_steps", "2"]),
    ("train_scorer.py", ["--max_steps", "2", "--eval_steps", "2", "--eval_on_start", "false", "--save_strategy", "no",
                         "--do_predict", "false"]),
])
def test_a_wait_longer_than_the_collective_timeout_completes(tmp_path, script, flags):
    """2 processes whose collective timeout is 5 s, and phases that keep a rank waiting 10 s (at real sizes: the
    SFT local main encoding millions of examples, a rank with longer answers to predict, a rank with a larger share
    of the exact evaluation, process 0 counting the scorer's training labels): the run completes. The old waits (main_process_first's barrier, the prediction's and
    the evaluation's gathers) timed out after 5 s."""
    res = run_cli(["bash", "run.sh", "tests/short_timeout_worker.py", script, "--demo", *flags,
                   "--output_dir", str(tmp_path / "out")], env={"NPROC_PER_NODE": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Timed out" not in res.stderr and res.stdout.count("summary") == 1, res.stdout[-2000:]


@pytest.mark.parametrize("script", ["sft_qwen2.py", "train_scorer.py"])
def test_demo_on_two_nodes_with_their_own_temporary_folders(tmp_path, script):
    """`--demo` on two launchers (NNODES=2, one process each, loopback) whose temporary folders differ, as on nodes
    with local disks: each node's local main builds the demo in its own folder. Node 1's used to stay empty
    (save_pretrained writes only on global rank 0 once a process group exists) and node 1 crashed reading it.
    The folders are 100 characters deep, as a scheduler's per-job TMPDIR may be: the scorer's first loader worker
    used to fail there ("AF_UNIX path too long") and both nodes with it (seen under pytest-xdist's deeper folders)."""
    port, nodes = free_port(), []
    tmps = [tmp_path / f"node{node}-tmp".ljust(100 - len(str(tmp_path)) - 1, "x") for node in range(2)]
    for node, tmp in enumerate(tmps):
        tmp.mkdir()
        env = dict(os.environ, PYTHON=sys.executable, NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TMPDIR=str(tmp))
        nodes.append(subprocess.Popen(["bash", "run.sh", script, "--demo"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = finish_together(nodes)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(  # each node's errors, then the end of its log
        [line for _, _, err in results for line in err.splitlines() if "Error" in line] +
        [f"node {node}: ...{err[-1500:]}" for node, (_, _, err) in enumerate(results)])
    assert "summary" in results[0][1]  # rank 0's summary line
    for tmp in tmps:  # each node built its own demo model
        assert len(str(tmp)) == 100 and any((d / "config.json").exists() for d in tmp.glob("*-demo-*/tiny-*"))


def test_a_feature_cache_on_node_local_disks_exits_together(tmp_path):
    """The scorer's feature cache (a frozen backbone) in an output folder on node-local disks: process 0 writes the
    cache files on its node only, then every process reads them back, and node 1 finds none: both exit 2 with one
    line in the run that builds it. (Before, the next run had node 1 compute every shard's features alone in
    collectives node 0 never joined: a hang.)"""
    import demo

    model, train, evals = demo.build_scorer_demo(tmp_path / "shared")
    out, disks = local_disks(tmp_path)
    flags = ["--model_name_or_path", str(model), "--train_shards", f"'{train}'", "--eval_shards", f"'{evals}'",
             "--output_dir", str(out), "--num_types", "3", "--min_pixels", "1024", "--max_pixels", "4096",
             "--freeze_backbone", "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no",
             "--dataloader_num_workers", "0", "--use_cpu", "--disable_tqdm", "true"]
    run = on_two_nodes_with_local_disks("train_scorer.py", flags, out, disks)
    assert [code for code, _, _ in run] == [2, 2], run
    assert os.listdir(disks[0] / "feature_cache") and not (disks[1] / "feature_cache").exists()  # rank 0 writes
    assert not any("Traceback" in stderr for _, _, stderr in run), run
    errors = [line for _, _, stderr in run for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: feature cache: process 1 cannot read {out}/feature_cache/"
                                                     ) and errors[0].endswith(
        "which process 0 read: every node must see the same --feature_cache folder (a shared filesystem)"), errors
