"""Smoke tests of the benchmarks that must stay runnable from the suite (the GPU ones in their --tiny CPU mode)."""

import json
import re
import sys

from conftest import run_cli


def test_gpu_sft_tiny_runs_every_cpu_setting():
    # each setting is a child process, most of whose time here is its start: one setting, LoRA with padding-free
    # batches and checkpointing (the other values are flags of the same code; full training runs in gpu_check)
    res = run_cli([sys.executable, "bench/gpu_sft.py", "--tiny", "--train", "lora", "--ckpt", "on",
                   "--padding_free", "on"])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("tiny ")]
    # each with throughput, plan and MFU figures
    assert [(r[2], r[4], r[5]) for r in rows] == [("on", "on", "lora")], rows
    for r in rows:
        assert float(r[6]) > 0 and float(r[7]) > 0 and float(r[9]) >= 0 and re.fullmatch(r"[\d.]+%", r[10]), r


def test_scorer_pipeline_quick_times_every_row_and_shows_stack_failing_on_mixed_sizes():
    res = run_cli([sys.executable, "bench/scorer_pipeline.py", "--quick", "--samples", "8"])
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    padding = {name: float(share) for name, share in re.findall(r"^scorer_padding_share_(\w+): ([\d.]+)$", out, re.M)}
    assert set(padding) == {"random", "bucketed"} and padding["bucketed"] < padding["random"], out
    steps = {int(world): float(r) for world, r in re.findall(r"^scorer_bucket_step_tokens_ratio_(\d+)_ranks: ([\d.]+)$",
                                                            out, re.M)}
    assert set(steps) == {8, 64} and steps[8] > 1, out  # the smoke run's 64 ranks hold 8 samples per worker
    rows = re.findall(r"^(stack \(background post\)|collate_vl \(ours\))\s+(same|mixed)\s+(\d)\s+([\d.]+)", out, re.M)
    got = sorted((name.split()[0], images, int(w)) for name, images, w, _ in rows)
    assert got == sorted([("stack", "same", w) for w in (0, 1, 2)] + [("collate_vl", s, w) for s in ("same", "mixed")
                                                                        for w in (0, 1, 2)]), out
    assert all(float(rate) > 0 for *_, rate in rows), out
    assert "stack on mixed sizes fails: RuntimeError: stack expects each tensor to be equal size" in out
    share = float(re.search(r"^scorer_collate_share_of_step: ([\d.]+)%$", out, re.M).group(1))
    best = float(re.search(r"^scorer_pipeline_samples_per_s: ([\d.]+)$", out, re.M).group(1))
    assert 0 < share < 100 and best == max(float(rate) for name, *_, rate in rows if "ours" in name), out


def test_gpu_scorer_tiny_runs_every_cpu_setting():
    res = run_cli([sys.executable, "bench/gpu_scorer.py", "--tiny", "--ckpt", "off"])  # a child process a setting
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("tiny ")]
    # frozen backbone and full training (checkpointing is a flag of the same code)
    assert sorted((r[1], r[3]) for r in rows) == [("frozen", "off"), ("full", "off")], res.stdout
    for r in rows:
        assert float(r[4]) > 0 and float(r[5]) > 0 and re.fullmatch(r"[\d.]+%", r[7]), r
    trainable = {r[1]: float(r[8][:-1]) for r in rows}
    assert trainable["frozen"] < trainable["full"], rows  # heads only vs the whole model


def test_gpu_check_tiny_passes(tmp_path):
    res = run_cli([sys.executable, "bench/gpu_check.py", "--tiny", "--wheels", str(tmp_path)])  # nothing missing here
    out = res.stdout.splitlines()
    assert "wheels: every needed module imports, nothing to install" in out, res.stdout
    names = ["sft-1.5b", "packed==padded/sdpa", "packed==padded/eager", "lora-7b", "fsdp2-save", "scorer-2b-frozen",
             "scorer-2b-full"]
    verdicts = {line.split()[0]: line.split()[1] for line in out if line.split() and line.split()[0] in names}
    assert verdicts == {name: "PASS" for name in names}, res.stdout + res.stderr[-2000:]
    assert "CPU: exit 2, error: --fsdp: sharded training" in res.stdout  # on CPU the script refuses, never DDP
    assert out[-1] == f"gpu_check: {len(names)}/{len(names)} pass", res.stdout
    assert res.returncode == 0
    # On a GPU each check runs in a child process; its row comes back as a RESULT line, a failure included.
    child = run_cli([sys.executable, "bench/gpu_check.py", "--tiny", "--child", "no-such-check", "--workdir",
                     str(tmp_path)])
    results = [json.loads(line[len("RESULT "):]) for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [{"check": "no-such-check", "pass": False, "figures": "KeyError: 'no-such-check'"}], child.stdout


def test_scorer_cache_quick_ends_with_its_two_figures():
    res = run_cli([sys.executable, "bench/scorer_cache.py", "--quick"])
    assert res.returncode == 0, res.stderr[-2000:]
    speedup = float(re.search(r"^scorer_cache_epoch_speedup: ([\d.]+)$", res.stdout, re.M).group(1))
    diff = float(re.search(r"^scorer_cache_max_loss_diff: ([\d.e+-]+)$", res.stdout, re.M).group(1))
    assert speedup > 1 and diff <= 1e-5, res.stdout[-1500:]  # even the smoke run's tiny backbone outweighs the heads
