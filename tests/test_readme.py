"""The README cannot drift from the code: every path its commands name exists, and every command it shows that runs
offline on a CPU (`--demo`, `--help`; dry runs and token_stats.py on demo data or the shipped sample) runs, exit 0,
as written, doing what the README says it does."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    README = f.read()
BLOCKS = re.findall(r"^```([a-z]*)\n(.*?)^```", README, flags=re.S | re.M)


def shell_commands():
    """Each command of the README's bash blocks: continuation lines joined, comments and blank lines left out."""
    commands = []
    for lang, block in BLOCKS:
        if lang not in ("bash", "sh"):
            continue
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return list(dict.fromkeys(commands))  # each once, in README order


CPU_SAFE = [c for c in shell_commands() if "--demo" in c or "--help" in c]


def test_the_readme_shows_the_commands_a_newcomer_runs():
    assert {"bash run.sh sft_qwen2.py --demo", "bash run.sh train_scorer.py --demo", "python token_stats.py --demo",
            "python token_stats.py --demo --data data/sample_sft.jsonl",
            "NPROC_PER_NODE=2 bash run.sh sft_qwen2.py --demo --dry_run"} <= set(CPU_SAFE), CPU_SAFE


def test_no_readme_command_names_a_missing_file():
    """Every repository path in the README's code blocks exists (data/ and outputs/ paths are the user's, except
    the shipped sample)."""
    paths = {p for _, block in BLOCKS
             for p in re.findall(r"(?<![\w/.-])((?:configs|bench|tests)/[\w./-]+|data/sample[\w.-]*|\w+\.py)\b", block)}
    assert any(p.startswith("configs/") for p in paths) and "data/sample_sft.jsonl" in paths
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert missing == [], missing


DEMO_OUTPUT = {"sft_qwen2.py": "sft-qwen2", "train_scorer.py": "scorer-qwen3-vl"}


def demo_output(script):
    from plumbing import demo_dir

    return os.path.join(demo_dir(DEMO_OUTPUT[script]), "output")


@pytest.mark.parametrize("command", CPU_SAFE)
def test_command_runs_as_written(command):
    env = dict(os.environ, PYTHON=sys.executable, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    res = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    script = next((s for s in DEMO_OUTPUT if f" {s} " in f" {command} "), None)
    if script is None or "--help" in command:
        return
    output = demo_output(script)
    if "--dry_run" in command:  # the plan the README shows is this command's, to the token and the step
        (line,) = re.findall(r"^dry run: .* Nothing was trained\.$", out, flags=re.M)
        assert f"\n{line}\n" in README, line
        assert "'loss'" not in out and not os.path.exists(os.path.join(output, "model.safetensors"))
        return
    # a demo: it learns, evaluates each model once, draws its curves, and its story reads without progress bars
    assert out.count("summary") == 1 and "Writing model shards" not in res.stderr + out
    assert os.path.isfile(os.path.join(output, "training_curves.png"))
    with open(os.path.join(output, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert len({h["step"] for h in evals}) == len(evals), evals  # no model evaluated twice
    if script == "sft_qwen2.py":
        assert evals[0]["step"] == 0 and evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"], evals
        assert out.count("eval_generate, step ") == len(evals)  # the answers to two prompts at each evaluation
        with open(os.path.join(output, "predictions.jsonl"), encoding="utf-8") as f:
            assert len(f.readlines()) == 16  # every prompt of the demo's evaluation file answered
    else:
        with open(os.path.join(output, "eval_results.json")) as f:
            results = json.load(f)
        assert results["eval_score_pearson"] >= 0.9 and results["eval_type_accuracy"] >= 0.9, results


@pytest.mark.parametrize("script", ["sft_qwen2", "train_scorer", "token_stats", "make_shards"])
def test_help_lists_every_flag(script, capsys):
    """`--help` is where the README sends users for the flags: it must print (argparse formats each help text with %,
    so a bare % in one, e.g. `train[:10%]`, broke sft_qwen2.py's --help) and name every flag of the script."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and out.startswith("usage: "), out[-2000:]
    if hasattr(module, "ARGUMENTS"):
        from dataclasses import fields

        names = {f.name for cls in module.ARGUMENTS for f in fields(cls) if f.init}
        assert [n for n in sorted(names) if f"--{n}" not in out] == []
