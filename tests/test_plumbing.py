"""plumbing.py: config files, the exit-2 rule, precision defaults, demo folders, rank-0 logs."""

import json
from dataclasses import dataclass, field

import pytest
from transformers import HfArgumentParser

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
