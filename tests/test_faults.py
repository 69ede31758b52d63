"""Faults injected on CPU with the tiny models: signals mid-run (1 process, and 2 through run.sh), a save cut short,
resume equality."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
from transformers import TrainingArguments

from conftest import ROOT, exit_2_line, run_cli
from reliability import COMPLETE, GracefulStop, checkpoint_to_resume

SFT_RUN = ["--max_steps", "40", "--eval_steps", "20", "--save_steps", "20"]  # the demo, a little longer
SCORER_RUN = ["--max_steps", "30", "--eval_steps", "30", "--save_steps", "10"]


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")


def interrupt(cmd, sig, extra_env=None):
    """Start `cmd`, send `sig` once training has logged (to the launcher: torchrun passes it on to every process);
    returns (exit code, output, seconds from the signal to the exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "'loss'" in line:
            break
    start = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out, time.monotonic() - start


def stopped_step(log, sig):
    """The step of the one `stopped by SIG... at step N:` line (rank 0's)."""
    lines = re.findall(rf"^stopped by {sig} at step (\d+): .*$", log, flags=re.M)
    assert len(lines) == 1, log[-3000:]
    return int(lines[0])


def same_weights(a, b, rel=1e-6):
    x, y = (safetensors.torch.load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert x.keys() == y.keys()
    worst = max(((x[k] - y[k]).abs().max() / y[k].abs().max().clamp_min(1e-12)).item() for k in y)
    assert worst <= rel, worst


class TestCheckpointToResume:
    def test_newest_complete_checkpoint_wins_and_incomplete_ones_are_named(self, tmp_path, capsys):
        args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
        assert checkpoint_to_resume(args) is None  # no output folder yet: start afresh
        for step in (2, 10, 12):
            (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
        for step in (2, 10):
            (tmp_path / "out" / f"checkpoint-{step}" / COMPLETE).write_text("")
        (tmp_path / "out" / "checkpoint-12" / "model.safetensors").write_bytes(b"\0" * 10)  # a save cut short
        assert checkpoint_to_resume(args) == str(tmp_path / "out" / "checkpoint-10")
        out = capsys.readouterr().out.splitlines()
        assert out == [f"skipping {tmp_path / 'out' / 'checkpoint-12'}: incomplete (no {COMPLETE} marker; its save "
                       f"was cut short)", f"resuming from {tmp_path / 'out' / 'checkpoint-10'}"]
        args.resume_from_checkpoint = "chosen"
        assert checkpoint_to_resume(args) == "chosen"


class TestSignals:
    def test_a_repeat_within_a_second_is_the_same_request_a_later_one_exits_at_once(self, monkeypatch, capsys):
        exits = []
        monkeypatch.setattr(os, "_exit", exits.append)
        stop = GracefulStop()
        stop._on_signal(signal.SIGTERM, None)
        stop._on_signal(signal.SIGTERM, None)  # what torchrun forwards right after the group got it
        assert exits == [] and stop.first[0] == signal.SIGTERM
        assert "SIGTERM received: stopping after this optimizer step" in capsys.readouterr().err
        stop.first = (signal.SIGTERM, time.monotonic() - 2)
        stop._on_signal(signal.SIGINT, None)  # the user insists
        assert exits == [130]


@pytest.fixture(scope="module")
def sft_uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "whole"
    res = run_cli([sys.executable, "sft_qwen2.py", "--demo", "--output_dir", str(out), *SFT_RUN])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


class TestGracefulStop:
    def test_sigterm_saves_where_it_stopped_and_the_same_command_ends_like_an_uninterrupted_run(
            self, tmp_path, sft_uninterrupted):
        out = tmp_path / "run"
        cmd = [sys.executable, "sft_qwen2.py", "--demo", "--output_dir", str(out), *SFT_RUN]
        code, log, seconds = interrupt(cmd, signal.SIGTERM)
        assert code == 143, log[-3000:]
        step = stopped_step(log, "SIGTERM")
        assert 0 < step < 40 and seconds < 60
        assert (out / f"checkpoint-{step}" / COMPLETE).is_file() and not (out / "model.safetensors").exists()
        assert f"the same command resumes from it: python sft_qwen2.py --demo --output_dir {out}" in log

        res = run_cli(cmd)  # the same command: resumes, continues the schedule, finishes
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"resuming from {out / f'checkpoint-{step}'}" in res.stdout
        same_weights(out, sft_uninterrupted)

    def test_sigint_stops_with_130_and_a_complete_checkpoint(self, tmp_path):
        out = tmp_path / "run"
        code, log, _ = interrupt([sys.executable, "sft_qwen2.py", "--demo", "--output_dir", str(out), *SFT_RUN],
                                 signal.SIGINT)
        assert code == 130, log[-3000:]
        step = stopped_step(log, "SIGINT")
        assert (out / f"checkpoint-{step}" / COMPLETE).is_file()

    def test_two_processes_stop_at_the_same_step_and_resume_to_the_same_metrics(self, tmp_path):
        """SIGTERM to run.sh's torchrun: both ranks save one checkpoint at the step they agreed on, every process is
        gone well within 60 s, and the same command then ends with the eval metrics of an uninterrupted run."""
        out, whole = tmp_path / "run", tmp_path / "whole"
        nproc = {"NPROC_PER_NODE": "2"}
        cmd = ["bash", "run.sh", "train_scorer.py", "--demo", "--output_dir", str(out), *SCORER_RUN]
        code, log, seconds = interrupt(cmd, signal.SIGTERM, nproc)
        assert code == 143 and seconds < 60, log[-3000:]
        assert log.count("SIGTERM received") == 2 and log.count("stopped by SIGTERM") == 1  # 2 ranks, rank 0 says
        step = stopped_step(log, "SIGTERM")
        assert (out / f"checkpoint-{step}" / COMPLETE).is_file() and not (out / "model.safetensors").exists()

        resumed = run_cli(cmd, env=nproc)
        assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
        reference = run_cli(["bash", "run.sh", "train_scorer.py", "--demo", "--output_dir", str(whole),
                             *SCORER_RUN], env=nproc)
        assert reference.returncode == 0, reference.stderr[-2000:]

        def metrics(res):
            return next(line for line in res.stdout.splitlines() if line.strip().startswith("eval: "))
        assert metrics(resumed) == metrics(reference)


class TestSafeLoading:
    @pytest.fixture(scope="class")
    def pickle_only(self, sft_demo, tmp_path_factory):
        """The demo model as an older checkpoint holds it: pytorch_model.bin (a pickle), config and tokenizer."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = tmp_path_factory.mktemp("pickle-model")
        model = AutoModelForCausalLM.from_pretrained(sft_demo[0])
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")  # transformers 5 no longer writes these
        AutoTokenizer.from_pretrained(sft_demo[0]).save_pretrained(path)
        assert (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
        return path

    def test_pickle_weights_are_refused_unless_allowed(self, sft_demo, pickle_only, tmp_path, capsys):
        import sft_qwen2

        args = ["--model_name_or_path", str(pickle_only), "--train_file", sft_demo[1], "--output_dir",
                str(tmp_path / "o"), "--use_cpu", "--report_to", "none", "--max_len", "256", "--max_steps", "1",
                "--save_strategy", "no", "--disable_tqdm", "true"]
        line = exit_2_line(capsys, sft_qwen2.main, args)
        assert line == (f"error: {pickle_only}: its weights are pickle files (pytorch_model.bin), which can run "
                        f"arbitrary code when loaded; convert them to safetensors, or pass --allow_pickle if you "
                        f"trust their source")
        assert sft_qwen2.main(args + ["--allow_pickle"]).state.global_step == 1

    def test_a_pipe_shard_needs_its_flag(self, scorer_demo, tmp_path, capsys):
        import train_scorer

        args = ["--model_name_or_path", scorer_demo[0], "--train_shards", "pipe:cat x.tar", "--num_types", "3",
                "--output_dir", str(tmp_path / "o"), "--use_cpu"]
        assert exit_2_line(capsys, train_scorer.main, args) == (
            "error: --train_shards: pipe:cat x.tar: a pipe: shard runs a shell command; pass --allow_pipe_shards if "
            "you wrote it")


class TestFailBeforeTraining:
    def test_an_output_dir_that_cannot_be_written_exits_2_before_anything_loads(self, sft_demo, tmp_path, capsys):
        import sft_qwen2

        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        line = exit_2_line(capsys, sft_qwen2.main, ["--model_name_or_path", sft_demo[0], "--train_file", sft_demo[1],
                                                    "--output_dir", str(blocker / "out"), "--use_cpu"])
        assert line == f"error: --output_dir {blocker / 'out'}: cannot write there (Not a directory)"
        assert "loss only on the text" not in capsys.readouterr().out  # stopped before the data was read

    def test_an_unknown_flag_exits_2_naming_it(self, capsys):
        import train_scorer

        line = exit_2_line(capsys, train_scorer.main, ["--demo", "--no_such_flag", "1"])
        assert "--no_such_flag" in line
