"""Smoke tests of the benchmarks that must stay runnable from the suite (the GPU ones in their --tiny CPU mode)."""

import re
import sys

from conftest import run_cli


def test_gpu_sft_tiny_runs_every_cpu_setting():
    res = run_cli([sys.executable, "bench/gpu_sft.py", "--tiny", "--train", "masters,lora"])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("tiny ")]
    # padding-free off/on x gradient checkpointing on/off x full/LoRA, each with throughput, plan and MFU figures
    assert sorted((r[2], r[4], r[5]) for r in rows) == sorted(
        (pf, ckpt, train) for pf in ("off", "on") for ckpt in ("off", "on") for train in ("masters", "lora")), rows
    for r in rows:
        assert float(r[6]) > 0 and float(r[7]) > 0 and float(r[9]) >= 0 and re.fullmatch(r"[\d.]+%", r[10]), r


def test_scorer_pipeline_quick_times_every_row_and_shows_stack_failing_on_mixed_sizes():
    res = run_cli([sys.executable, "bench/scorer_pipeline.py", "--quick", "--samples", "8"])
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
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
    res = run_cli([sys.executable, "bench/gpu_scorer.py", "--tiny"])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("tiny ")]
    # frozen backbone (checkpointing off only) and full training with checkpointing on/off
    assert sorted((r[1], r[3]) for r in rows) == [("frozen", "off"), ("full", "off"), ("full", "on")], res.stdout
    for r in rows:
        assert float(r[4]) > 0 and float(r[5]) > 0 and re.fullmatch(r"[\d.]+%", r[7]), r
    trainable = {r[1]: float(r[8][:-1]) for r in rows}
    assert trainable["frozen"] < trainable["full"], rows  # heads only vs the whole model
