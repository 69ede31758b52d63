"""Faults injected on CPU with the tiny models: signals mid-run (1 process, and 2 through run.sh), a save cut short,
resume equality."""

import json
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
SCORER_RUN = ["--max_steps", "20", "--eval_steps", "20", "--save_steps", "10", "--eval_on_start", "false",
              "--do_predict", "false"]


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")


def interrupt(cmd, sig, extra_env=None, group=False):
    """Start `cmd`, send `sig` once training has logged: to the launcher (torchrun passes it on to every process),
    or with `group` to its whole process group (what Ctrl-C in a terminal does: DataLoader workers get it too);
    returns (exit code, output, seconds from the signal to the exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=group)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "'loss'" in line:
            break
    start = time.monotonic()
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
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


    def test_a_stopped_run_keeps_its_checkpoint_and_loads_no_best_weights(self, sft_demo, tmp_path, monkeypatch):
        """A stop under --load_best_model_at_end: the Trainer's end of train() would load the best checkpoint (a
        sharded read inside the grace period) for a final save the stop never makes; the stop's checkpoint is kept."""
        import sft_qwen2
        from transformers import Trainer

        agree = GracefulStop.on_step_end

        def signal_at_step_3(self, args, state, control, **kwargs):
            if state.global_step == 3:
                self._on_signal(signal.SIGTERM, None)
            return agree(self, args, state, control, **kwargs)

        loads = []
        monkeypatch.setattr(GracefulStop, "on_step_end", signal_at_step_3)
        monkeypatch.setattr(Trainer, "_load_best_model", lambda trainer: loads.append(trainer.state.global_step))
        out = tmp_path / "o"
        with pytest.raises(SystemExit) as stopped:
            sft_qwen2.main(["--model_name_or_path", sft_demo[0], "--train_file", sft_demo[1], "--eval_file",
                            sft_demo[2], "--output_dir", str(out), "--use_cpu", "--report_to", "none", "--max_len",
                            "256", "--max_steps", "8", "--eval_strategy", "steps", "--eval_steps", "2",
                            "--save_strategy", "steps", "--save_steps", "2", "--load_best_model_at_end",
                            "--save_total_limit", "2", "--eval_generate", "0"])
        assert stopped.value.code == 143 and loads == []
        assert (out / "checkpoint-3" / COMPLETE).is_file() and (out / "checkpoint-2").is_dir()


# Run the script named by argv[1] with torch.save patched to hang, announced, right after it has written a file of
# checkpoint-40: the test then kills the process mid-save, as a crash or a pre-emption without warning would.
KILLED_IN_SAVE = """
import runpy, sys, time, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if "checkpoint-40" in str(f):
        print("WRITING checkpoint-40", flush=True)
        time.sleep(600)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class TestGracefulStop:
    def test_sigterm_then_a_kill_during_a_save_and_the_same_command_ends_like_an_uninterrupted_run(self, tmp_path):
        """One run's story: SIGTERM mid-step saves where it stopped (143); the same command resumes and is killed
        (-9) while checkpoint-40 is being written (its weights on disk, its optimizer state not yet); the same
        command again skips that folder, resumes from the newest complete checkpoint, finishes, and its weights are
        an uninterrupted run's."""
        out, whole = tmp_path / "run", tmp_path / "whole"
        script = ["sft_qwen2.py", "--demo", "--output_dir", str(out), *SFT_RUN]
        code, log, seconds = interrupt([sys.executable, *script], signal.SIGTERM)
        assert code == 143, log[-3000:]
        step = stopped_step(log, "SIGTERM")
        assert 0 < step < 40 and seconds < 60
        assert (out / f"checkpoint-{step}" / COMPLETE).is_file() and not (out / "model.safetensors").exists()
        assert f"the same command resumes from it: python sft_qwen2.py --demo --output_dir {out}" in log

        proc = subprocess.Popen([sys.executable, "-c", KILLED_IN_SAVE, *script], cwd=ROOT, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        resumed = []
        for line in proc.stdout:
            resumed.append(line)
            if line.startswith("WRITING checkpoint-40"):
                break
        proc.kill()
        proc.communicate(timeout=60)
        assert f"resuming from {out / f'checkpoint-{step}'}\n" in resumed, "".join(resumed)[-3000:]
        cut = out / "checkpoint-40"
        assert (cut / "model.safetensors").is_file() and not (cut / "optimizer.pt").exists()
        assert not (cut / COMPLETE).exists()

        res = run_cli([sys.executable, *script])
        assert res.returncode == 0, res.stderr[-2000:]
        newest = out / f"checkpoint-{max(step, 20)}"  # the periodic save at 20, or the stop's after it
        assert f"skipping {cut}: incomplete" in res.stdout and f"resuming from {newest}" in res.stdout
        reference = run_cli([sys.executable, "sft_qwen2.py", "--demo", "--output_dir", str(whole), *SFT_RUN])
        assert reference.returncode == 0, reference.stderr[-2000:]
        same_weights(out, whole)

    def test_sigint_to_the_group_with_loader_workers_stops_with_130_and_a_complete_checkpoint(self, tmp_path):
        out = tmp_path / "run"
        code, log, _ = interrupt([sys.executable, "sft_qwen2.py", "--demo", "--output_dir", str(out), *SFT_RUN,
                                  "--dataloader_num_workers", "2"], signal.SIGINT, group=True)
        assert code == 130, log[-3000:]
        step = stopped_step(log, "SIGINT")
        assert (out / f"checkpoint-{step}" / COMPLETE).is_file()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log  # the workers took it quietly too

    def test_two_processes_stop_at_the_same_step_and_resume_to_the_same_metrics(self, tmp_path):
        """SIGTERM to run.sh's torchrun: both ranks save one checkpoint at the step they agreed on, every process is
        gone well within 60 s, and the same command then ends with the eval metrics of an uninterrupted run."""
        from reliability import RUN_RECORD, TRAINER_FILES

        out, whole = tmp_path / "run", tmp_path / "whole"
        nproc = {"NPROC_PER_NODE": "2"}
        cmd = ["bash", "run.sh", "train_scorer.py", "--demo", "--output_dir", str(out), *SCORER_RUN]
        code, log, seconds = interrupt(cmd, signal.SIGTERM, nproc)
        assert code == 143 and seconds < 60, log[-3000:]
        assert log.count("SIGTERM received") == 2 and log.count("stopped by SIGTERM") == 1  # 2 ranks, rank 0 says
        step = stopped_step(log, "SIGTERM")
        assert (out / f"checkpoint-{step}" / COMPLETE).is_file() and not (out / "model.safetensors").exists()
        # what the Trainer writes into every checkpoint of 2 processes (any sharding), as reliability lists it
        assert [p.format(_rank=f"_{r}") for p in TRAINER_FILES for r in range(2) if not
                (out / f"checkpoint-{step}" / p.format(_rank=f"_{r}")).is_file()] == []
        with open(out / f"checkpoint-{step}" / RUN_RECORD) as f:
            record = json.load(f)
        # the demo's training scores: mean and standard deviation, as its head learned them
        assert record["model"].pop("scorer_targets") == {"score": pytest.approx([2.98271, 0.912051], rel=1e-5)}
        assert record == {"model": {"scorer_base_model": None}, "trains": "all", "sharding": "none", "world_size": 2}

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


def sft_args(sft_demo, out, *extra):
    return ["--model_name_or_path", sft_demo[0], "--train_file", sft_demo[1], "--output_dir", str(out), "--use_cpu",
            "--report_to", "none", "--disable_tqdm", "true", "--max_len", "256", "--logging_steps", "1",
            "--save_strategy", "no", "--learning_rate", "1e-3", *extra]


def poison(monkeypatch, steps):
    """Make the training loss NaN at these (1-based) forward calls: one call per step here (no accumulation)."""
    import itertools

    import lean_loss

    original, calls = lean_loss.chunked_linear_cross_entropy, itertools.count(1)

    def poisoned(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * float("nan") if next(calls) in steps else loss
    monkeypatch.setattr(lean_loss, "chunked_linear_cross_entropy", poisoned)


class TestNonFiniteSteps:
    def test_a_nan_step_is_skipped_counted_and_the_run_goes_on(self, sft_demo, tmp_path, monkeypatch, capsys):
        import sft_qwen2

        poison(monkeypatch, {2})
        trainer = sft_qwen2.main(sft_args(sft_demo, tmp_path / "o", "--max_steps", "4"))
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert [h["skipped_steps"] for h in logs] == [0, 1, 1, 1]
        assert "step 2: non-finite loss or gradient, optimizer step skipped (1 in a row, 1 in all)" in \
            capsys.readouterr().out
        weights = safetensors.torch.load_file(tmp_path / "o" / "model.safetensors")
        assert all(bool(w.isfinite().all()) for w in weights.values())

    def test_max_bad_steps_in_a_row_save_and_exit_2_without_any_update(self, sft_demo, tmp_path, monkeypatch,
                                                                        capsys):
        import sft_qwen2

        poison(monkeypatch, set(range(1, 100)))
        out = tmp_path / "o"
        line = exit_2_line(capsys, sft_qwen2.main, sft_args(sft_demo, out, "--max_steps", "10", "--max_bad_steps", "3"))
        assert line == (f"error: 3 optimizer steps in a row had a non-finite loss or gradient, the last at step 3; "
                        f"checkpoint saved to {out / 'checkpoint-3'}. Look for a bad sample, lower the learning rate "
                        f"or raise --max_bad_steps")
        saved = safetensors.torch.load_file(out / "checkpoint-3" / "model.safetensors")
        start = safetensors.torch.load_file(os.path.join(sft_demo[0], "model.safetensors"))
        assert all(bool((saved[k] == start[k]).all()) for k in start)  # three skipped steps: nothing moved
        assert (out / "checkpoint-3" / COMPLETE).is_file()

    def test_scorer_names_the_batch_that_overflowed(self, scorer_demo, tmp_path, capsys):
        import json

        import demo
        import train_scorer

        samples = demo.make_vl_samples(4, seed=3, prefix="huge")
        for s in samples:  # a finite score whose squared error overflows fp32
            s["json"] = json.dumps({**json.loads(s["json"]), "score": 1e38}).encode()
        shard = demo.write_shard(tmp_path / "huge.tar", samples)
        args = ["--model_name_or_path", scorer_demo[0], "--train_shards", shard, "--num_types", "3", "--output_dir",
                str(tmp_path / "o"), "--use_cpu", "--min_pixels", "1024", "--max_pixels", "4096",
                "--dataloader_num_workers", "0", "--per_device_train_batch_size", "2", "--max_steps", "6",
                "--max_bad_steps", "2", "--save_strategy", "no", "--report_to", "none", "--shuffle_buffer", "1",
                "--score_norm", "none"]  # standardized, these scores would be 0s: nothing to overflow
        line = exit_2_line(capsys, train_scorer.main, args)
        assert line.startswith("error: 2 optimizer steps in a row had a non-finite loss or gradient, the last at "
                               "step 2 (its batch: huge"), line
        assert len(line.split("(its batch: ")[1].split(")")[0].split(", ")) == 2  # the batch's two sample keys


def logged_losses(out):
    import json

    with open(out / "trainer_state.json") as f:
        return {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}


class TestResume:
    @pytest.mark.parametrize("collator", [[], ["--padding_free", "true"],
                                          ["--train_sampling_strategy", "group_by_length"]],
                             ids=["dynamic-padding", "padding-free", "length-grouped"])
    def test_a_save_cut_short_is_skipped_and_the_resumed_run_matches(self, sft_demo, tmp_path, capsys, collator):
        """The last checkpoint of a run is left as a crash during its save leaves it (no marker, a truncated
        weights file); the same command resumes from the one before and ends exactly where an uninterrupted run
        ends: the same loss at every later step, the same weights, the learning-rate schedule continued."""
        import sft_qwen2

        args = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--per_device_train_batch_size",
                "4", *collator]
        straight, resumed = tmp_path / "straight", tmp_path / "resumed"
        sft_qwen2.main(sft_args(sft_demo, straight, *args))
        sft_qwen2.main(sft_args(sft_demo, resumed, *args))
        cut = resumed / "checkpoint-8"
        (cut / COMPLETE).unlink()
        (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:100])
        os.remove(resumed / "trainer_state.json")
        capsys.readouterr()

        trainer = sft_qwen2.main(sft_args(sft_demo, resumed, *args))
        out = capsys.readouterr().out
        assert f"skipping {cut}: incomplete" in out and f"resuming from {resumed / 'checkpoint-4'}" in out
        assert trainer.state.global_step == 8
        a, b = logged_losses(straight), logged_losses(resumed)
        assert sorted(b) == list(range(1, 9))
        assert [b[s] for s in range(5, 9)] == pytest.approx([a[s] for s in range(5, 9)], rel=1e-6)
        same_weights(resumed, straight)

    def test_the_best_checkpoint_survives_save_total_limit(self, sft_demo, tmp_path):
        """Stock Trainer behaviour, checked: with --load_best_model_at_end, rotation keeps the best checkpoint even
        when it is the oldest (with the newest: a limit of 1 is refused, see plumbing.check_best_model_flags), and the
        final model is the best one. (The eval loss falls at every evaluation here, so
        "best" is made the highest one: the first checkpoint, which plain rotation would delete.)"""
        import sft_qwen2

        out = tmp_path / "o"
        trainer = sft_qwen2.main(sft_args(sft_demo, out, "--eval_file", sft_demo[2], "--max_steps", "12",
                                          "--learning_rate", "3e-2", "--eval_strategy", "steps", "--eval_steps", "3",
                                          "--save_steps", "3", "--save_strategy", "steps", "--save_total_limit", "2",
                                          "--load_best_model_at_end", "--metric_for_best_model", "eval_loss",
                                          "--greater_is_better", "true"))
        evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
        best = max(evals, key=evals.get)
        assert best == 3 and trainer.state.best_model_checkpoint == str(out / "checkpoint-3")
        # rotation kept checkpoint-3 through every later save, beside the newest
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-3"]
        same_weights(out, out / "checkpoint-3")


class TestBadShards:
    def scorer_args(self, scorer_demo, shards, out, *extra):
        return ["--model_name_or_path", scorer_demo[0], "--train_shards", shards, "--num_types", "3",
                "--output_dir", str(out), "--use_cpu", "--min_pixels", "1024", "--max_pixels", "4096",
                "--dataloader_num_workers", "0", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                "--report_to", "none", "--disable_tqdm", "true", *extra]

    def test_a_truncated_tar_exits_2_before_training(self, scorer_demo, tmp_path, capsys):
        import demo
        import train_scorer

        shard = demo.write_shard(tmp_path / "cut.tar", demo.make_vl_samples(6, seed=5, prefix="c"))
        data = open(shard, "rb").read()
        with open(shard, "wb") as f:
            f.write(data[:len(data) // 2])  # what an interrupted copy leaves
        line = exit_2_line(capsys, train_scorer.main, self.scorer_args(scorer_demo, shard, tmp_path / "o",
                                                                       "--max_steps", "2"))
        assert line.startswith(f"error: {shard}: cannot read as a tar shard"), line

    def test_a_shard_deleted_mid_run_exits_2_naming_it(self, scorer_demo, tmp_path, capsys, monkeypatch):
        import demo
        import train_scorer

        shard = demo.write_shard(tmp_path / "gone.tar", demo.make_vl_samples(4, seed=6, prefix="g"))
        begin = train_scorer._SetStreamEpoch.on_epoch_begin

        def delete_after_the_first_epoch(self, args, state, control, **kwargs):
            if state.global_step > 0 and os.path.exists(shard):
                os.remove(shard)
            return begin(self, args, state, control, **kwargs)
        monkeypatch.setattr(train_scorer._SetStreamEpoch, "on_epoch_begin", delete_after_the_first_epoch)
        line = exit_2_line(capsys, train_scorer.main, self.scorer_args(scorer_demo, shard, tmp_path / "o",
                                                                       "--max_steps", "6"))
        assert line.startswith(f"error: {shard}: cannot read as a tar shard (FileNotFoundError"), line


class TestFailBeforeTrainingData:
    def test_max_len_below_the_template_overhead(self, sft_demo, tmp_path, capsys):
        import sft_qwen2

        line = exit_2_line(capsys, sft_qwen2.main, sft_args(sft_demo, tmp_path / "o", "--max_len", "8"))
        assert line == (f"error: {sft_demo[1]}: every example was dropped (max_len 8: no answer token fits after the "
                        f"prompt and the chat template; token_stats.py shows the lengths)")

    def test_an_eval_set_with_no_usable_example(self, sft_demo, tmp_path, capsys):
        import demo
        import sft_qwen2

        long_only = demo.write_jsonl(tmp_path / "eval.jsonl", [{"query": "q", "answer": "word " * 400}])
        line = exit_2_line(capsys, sft_qwen2.main, sft_args(sft_demo, tmp_path / "o", "--eval_file", long_only,
                                                            "--overflow", "drop"))
        assert line == f"error: {long_only}: no usable evaluation example (max_len 256, overflow drop)"

    def test_a_checkpoint_of_another_mode_or_model_is_refused(self, sft_demo, tmp_path, capsys):
        import demo
        import sft_qwen2

        saved = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
        lora_out = tmp_path / "lora"
        sft_qwen2.main(sft_args(sft_demo, lora_out, "--use_peft", *saved))
        line = exit_2_line(capsys, sft_qwen2.main, sft_args(sft_demo, lora_out, *saved))
        assert line == (f"error: {lora_out / 'checkpoint-2'}: holds LoRA adapters and this run trains the full "
                        f"model; resume with the flags it was saved with, or use another --output_dir")
        # a checkpoint of an earlier version (no run record) is checked by its files, as that version checked it
        os.remove(lora_out / "checkpoint-2" / "checkpoint-run.json")
        assert exit_2_line(capsys, sft_qwen2.main, sft_args(sft_demo, lora_out, *saved)) == line

        other = demo.build_tiny_qwen2(tmp_path / "other", hidden_size=32)
        full_out = tmp_path / "full"
        sft_qwen2.main(sft_args(sft_demo, full_out, *saved, "--model_name_or_path", other))
        line = exit_2_line(capsys, sft_qwen2.main, sft_args(sft_demo, full_out, *saved))
        assert line == (f"error: {full_out / 'checkpoint-2'}: saved from another model (hidden_size 32, this "
                        f"model's 64); use another --output_dir")

    def test_a_checkpoint_of_another_sharding_or_zero_world_size_is_refused(self, tmp_path):
        """The run record decides (no files needed for these verdicts): a plain checkpoint under FSDP2, a ZeRO-3 one
        without DeepSpeed, and a ZeRO-3 one on another number of processes, whose optimizer partitions DeepSpeed
        cannot redistribute (tried in tests/test_sharding.py); and a --resume_from_checkpoint that does not exist."""
        from reliability import RUN_RECORD, resume_mismatch

        model = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 414}

        def checkpoint(name, sharding, world_size):
            path = tmp_path / name / "checkpoint-5"
            path.mkdir(parents=True)
            with open(path / RUN_RECORD, "w") as f:
                json.dump({"model": model, "trains": "full", "sharding": sharding, "world_size": world_size}, f)
            return path

        def run(sharding, world_size):
            return {"model": model, "trains": "full", "sharding": sharding, "world_size": world_size}
        plain, zero3 = checkpoint("plain", "none", 1), checkpoint("zero3", "DeepSpeed ZeRO-3", 8)
        assert resume_mismatch(plain, run("none", 2)) is None  # DDP and one process write the same files
        typo = tmp_path / "typo"
        assert resume_mismatch(typo, run("none", 1)) == f"{typo}: no such folder"
        assert resume_mismatch(plain, run("FSDP2 SHARDED_STATE_DICT", 8)) == (
            f"{plain}: saved with no sharding on 1 process, this run has FSDP2 SHARDED_STATE_DICT on 8 processes; "
            f"resume with the sharding it was saved with, or use another --output_dir")
        assert resume_mismatch(zero3, run("DeepSpeed ZeRO-3", 4)) == (
            f"{zero3}: saved with DeepSpeed ZeRO-3 on 8 processes, this run has 4; DeepSpeed loads each rank's own "
            f"partition of the optimizer states: resume on 8 GPUs, or use another --output_dir")
        assert resume_mismatch(zero3, run("none", 1)).startswith(
            f"{zero3}: saved with DeepSpeed ZeRO-3 on 8 processes, this run has no sharding on 1 process")

    def test_empty_eval_shards_exit_2_before_training(self, scorer_demo, tmp_path, capsys):
        import demo
        import train_scorer

        empty = demo.write_shard(tmp_path / "empty.tar", [])
        args = ["--model_name_or_path", scorer_demo[0], "--train_shards", scorer_demo[1], "--eval_shards", empty,
                "--num_types", "3", "--output_dir", str(tmp_path / "o"), "--use_cpu"]
        line = exit_2_line(capsys, train_scorer.main, args)
        assert line == f"error: --eval_shards: {empty}: no sample in these shards"


class TestBadRecords:
    def test_a_jsonl_with_a_bad_line_in_the_middle_exits_2_naming_it(self, sft_demo, tmp_path):
        import json

        lines = [json.dumps({"query": f"q{i}", "answer": "a"}) for i in range(9)]
        lines[4] = lines[4][:-9]  # a line cut by a failed write: malformed JSON
        path = tmp_path / "cut.jsonl"
        path.write_text("\n".join(lines) + "\n")
        res = run_cli([sys.executable, "sft_qwen2.py", "--model_name_or_path", sft_demo[0], "--train_file", str(path),
                       "--output_dir", str(tmp_path / "o"), "--use_cpu"])
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1].startswith(f"error: {path}: line 5: malformed JSON")

    def test_a_truncated_jpeg_mid_shard_is_counted_or_with_error_mode_exits_2_naming_it(self, scorer_demo, tmp_path,
                                                                                        capsys):
        import demo
        import train_scorer

        samples = demo.make_vl_samples(8, seed=7, prefix="j")
        assert "0.jpg" in samples[4]
        samples[4] = dict(samples[4], **{"0.jpg": samples[4]["0.jpg"][:len(samples[4]["0.jpg"]) // 2]})
        shard = demo.write_shard(tmp_path / "cut-jpeg.tar", samples)
        args = TestBadShards().scorer_args(scorer_demo, shard, tmp_path / "o", "--max_steps", "3")
        trainer = train_scorer.main(args)
        assert trainer.metrics["train_bad_samples"] == 1
        line = exit_2_line(capsys, train_scorer.main, args + ["--on_bad_sample", "error", "--output_dir",
                                                              str(tmp_path / "o2")])  # o: a finished run
        assert line.startswith(f"error: {shard}: j00004: image .0.jpg: cannot decode"), line
