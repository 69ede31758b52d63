"""Smoke tests of the benchmarks that must stay runnable from the suite (the GPU ones in their --tiny CPU mode)."""

import re
import sys

from conftest import run_cli


def test_gpu_sft_tiny_runs_every_cpu_setting():
    res = run_cli([sys.executable, "bench/gpu_sft.py", "--tiny"])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("tiny ")]
    # padding-free off/on x gradient checkpointing on/off, each with a throughput and an MFU figure
    assert sorted((r[2], r[4]) for r in rows) == [("off", "off"), ("off", "on"), ("on", "off"), ("on", "on")]
    for r in rows:
        assert float(r[5]) > 0 and float(r[6]) > 0 and re.fullmatch(r"[\d.]+%", r[8]), r
