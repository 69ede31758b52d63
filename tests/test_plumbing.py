"""plumbing.py: config files, the exit-2 rule, precision defaults, demo folders, rank-0 logs."""

import json
import os
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
from transformers import HfArgumentParser

from conftest import ROOT, run_cli
from plumbing import TrainingDefaults, fail, log, parse_arguments, prepare_demo, resolve_mixed_precision


@dataclass
class Flags:
    name: str = field(default="sentinel-default")
    steps: int = field(default=-7)
    demo: bool = field(default=False)


def parser():
    return HfArgumentParser(Flags)


class TestParseArguments:
    def test_flags(self):
        assert parse_arguments(parser(), ["--name", "x", "--steps", "3"]) == (Flags("x", 3),)

    @pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
    def test_one_config_file_in_place_of_the_flags(self, tmp_path, suffix):
        path = tmp_path / f"cfg{suffix}"
        path.write_text(json.dumps({"name": "from-file", "steps": 5}))  # JSON is YAML too
        assert parse_arguments(parser(), [str(path)]) == (Flags("from-file", 5),)

    def test_demo_flags_go_first_so_user_flags_win(self):
        (flags,) = parse_arguments(parser(), ["--demo", "--steps", "9"], demo_args=["--name", "demo", "--steps", "1"])
        assert flags == Flags("demo", 9, True)
        assert parse_arguments(parser(), ["--steps", "9"], demo_args=["--name", "demo"]) == (Flags(steps=9),)

    @pytest.mark.parametrize("content, message", [
        (None, "cfg.yaml: config file not found"),
        ("name: x\nstepz: 3\n", "cfg.yaml: Some keys are not used by the HfArgumentParser: ['stepz']"),
    ])
    def test_bad_config_file_exits_2_with_one_line(self, tmp_path, capsys, monkeypatch, content, message):
        monkeypatch.chdir(tmp_path)
        if content is not None:
            (tmp_path / "cfg.yaml").write_text(content)
        with pytest.raises(SystemExit) as exit_info:
            parse_arguments(parser(), ["cfg.yaml"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_fail_exits_2_with_one_line_on_stderr(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fail(ValueError("data.jsonl: line 3: bad"))
    assert exit_info.value.code == 2
    assert capsys.readouterr() == ("", "error: data.jsonl: line 3: bad\n")


@pytest.mark.parametrize("rank, printed", [(None, True), ("0", True), ("1", False)])
def test_log_only_on_rank_0(capsys, monkeypatch, rank, printed):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    log("hello", 3)
    assert capsys.readouterr().out == ("hello 3\n" if printed else "")


@dataclass
class PrecisionArgs:
    use_cpu: bool
    bf16: bool | None = None
    fp16: bool | None = None


@pytest.mark.parametrize("given, expected", [
    (PrecisionArgs(use_cpu=True), (False, False)),  # unset on CPU: fp32
    (PrecisionArgs(use_cpu=False), (False, False)),  # no GPU on this machine: fp32 too
    (PrecisionArgs(use_cpu=True, bf16=True), (True, False)),  # an explicit choice is kept
    (PrecisionArgs(use_cpu=False, fp16=True), (False, True)),
])
def test_resolve_mixed_precision(given, expected):
    resolve_mixed_precision(given)
    assert (given.bf16, given.fp16) == expected


def test_training_defaults(tmp_path):
    args = TrainingDefaults(output_dir=str(tmp_path), use_cpu=True)
    assert (args.bf16, args.fp16, args.logging_steps, args.save_total_limit) == (False, False, 10, 3)
    assert args.report_to in ("none", [])  # no reporting service unless asked


def test_prepare_demo_rebuilds_a_fresh_folder(tmp_path):
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / "stale.txt").write_text("from the last run")
    prepare_demo(str(demo_dir), lambda d: (tmp_path / "demo").mkdir() or (tmp_path / "demo" / "new.txt").write_text(d))
    assert sorted(p.name for p in demo_dir.iterdir()) == ["new.txt"]


LEAVER = textwrap.dedent("""
    import atexit, os, sys
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist
    from plumbing import fail, leave_process_group

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    class TornDown:  # what interpreter finalization would destroy (a model, a process group's Python side)
        def __del__(self, write=os.write):
            write(1, f"rank {{rank}}: torn down\\n".encode())

    kept = TornDown()
    from multiprocessing import util
    os.write(1, f"rank {{rank}}: sockets in {{util.get_temp_dir()}}\\n".encode())  # one write: ranks share stdout
    atexit.register(os.write, 1, f"rank {{rank}}: atexit ran\\n".encode())  # a logger's final sync, registered late
    dist.all_reduce(torch.ones(1))
    if sys.argv[1] == "end":
        leave_process_group()
    elif sys.argv[1] == "fail":
        fail("sentinel problem", every_rank=True)
    else:
        leave_process_group()
        raise RuntimeError("sentinel after leaving")
""")


@pytest.mark.parametrize("how, code", [("end", 0), ("fail", 2), ("raise", 1)])
def test_leaving_the_process_group_ends_the_process_without_finalizing(tmp_path, how, code):
    """After leave_process_group, 2 gloo processes end with their exit code (0, fail's 2, 1 after an uncaught
    exception) once atexit handlers have run, and without the interpreter's teardown: during it, a collective's thread
    that releases its tensors a moment late aborts the process (exit -6, seen under load)."""
    worker = tmp_path / "leaver.py"
    worker.write_text(LEAVER.format(root=ROOT))
    res = run_cli(["bash", "run.sh", str(worker), how], env={"NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"})
    assert res.returncode == code, res.stdout + res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("rank")]
    folders = [line.split(" sockets in ")[1] for line in lines if " sockets in " in line]
    assert sorted(line for line in lines if " sockets in " not in line) == [
        "rank 0: atexit ran", "rank 1: atexit ran"], res.stdout
    assert res.stderr.count("error: sentinel problem") == (how == "fail"), res.stderr
    assert len(folders) == 2 and not any(os.path.exists(f) for f in folders)  # multiprocessing's clean-up, done here


LOADER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    import plumbing  # noqa: F401 - the scripts' first import: it sets the sockets' folder

    class Tensors(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3,), float(i))

    if __name__ == "__main__":
        from multiprocessing import util
        for method in ("fork", "forkserver", "spawn"):
            loader = torch.utils.data.DataLoader(Tensors(), batch_size=2, num_workers=1, multiprocessing_context=method)
            print(method, [batch[:, 0].tolist() for batch in loader], flush=True)
        print(util.get_temp_dir())
""")


def test_loader_workers_hand_batches_over_under_a_deep_tmpdir(tmp_path):
    """DataLoader workers send each batch's tensors through a Unix socket in multiprocessing's temporary folder, whose
    path may not exceed 107 bytes. Under a 120-character TMPDIR (a scheduler's per-job folder) a forked worker used to
    fail to send and the loop to wait for its batch forever; with plumbing imported, every start method delivers."""
    deep = tmp_path / ("d" * (120 - len(str(tmp_path)) - 1))
    deep.mkdir()
    script = tmp_path / "loader.py"
    script.write_text(LOADER.format(root=ROOT))
    res = run_cli([sys.executable, str(script)], env={"TMPDIR": str(deep)}, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    *batches, folder = res.stdout.splitlines()
    assert batches == [f"{method} [[0.0, 1.0], [2.0, 3.0]]" for method in ("fork", "forkserver", "spawn")]
    assert len(folder) <= 107 - len("/listener-12345678") and not os.path.exists(folder)
