"""Shared fixtures: tiny offline checkpoints built once per test session (see demo.py)."""

import os
import sys

import pytest

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def sft_demo(tmp_path_factory):
    """(model_dir, train_file, eval_file) of the tiny Qwen2 + demo data."""
    return demo.build_sft_demo(tmp_path_factory.mktemp("sft-demo"))


@pytest.fixture(scope="session")
def qwen2_tokenizer(sft_demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sft_demo[0])


def run_cli(args, env=None, timeout=300):
    """Run a command from the repository root as a user would; returns CompletedProcess (text)."""
    import subprocess

    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def scorer_demo(tmp_path_factory):
    """(model_dir, train_pattern, eval_pattern) of the tiny Qwen3-VL + synthetic shards (64 train, 14 eval)."""
    return demo.build_scorer_demo(tmp_path_factory.mktemp("scorer-demo"))


@pytest.fixture(scope="session")
def vl_processor(scorer_demo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(scorer_demo[0])


@pytest.fixture
def one_thread():
    """Run a test's tiny-model math on one thread: faster than two for tensors this small, and immune to a busy
    second core (waiting OpenMP threads made the same steps 10x slower on a loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
