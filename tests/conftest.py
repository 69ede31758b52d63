"""Shared fixtures and helpers: tiny offline checkpoints built once per test session (see demo.py), a CLI runner."""

import gc
import json
import os
import sys

import pytest

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
for name in [k for k in os.environ if k.startswith("SLURM_")]:  # the suite launches its own processes, also when
    del os.environ[name]  # run inside a Slurm allocation (run.sh would read that job's nodes)

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of the parallel workers pytest.ini starts (pytest-xdist)
    import atexit
    import shutil
    import tempfile

    # Its own temporary folder, inherited by the commands it runs: the scripts' --demo folders live there, and each
    # demo run rebuilds its folder, so two workers running the same demo at once must not share one.
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix=f"pytest-{os.environ['PYTEST_XDIST_WORKER']}-")
    tempfile.tempdir = None
    atexit.register(shutil.rmtree, os.environ["TMPDIR"], True)
    # One thread per process: the workers already share the cores, and waiting OpenMP threads on a busy core made
    # tiny-model steps up to 10x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """Collect once per test module, then freeze what is left: the Trainer runs a full garbage collection at every
    train() (accelerate's free_memory), whose cost grows with everything this long process holds (torch,
    transformers, session fixtures); it then scans only what the current module made. Unfrozen at the next module,
    so nothing that became garbage meanwhile is kept."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def sft_demo(tmp_path_factory):
    """(model_dir, train_file, eval_file) of the tiny Qwen2 + demo data."""
    return demo.build_sft_demo(tmp_path_factory.mktemp("sft-demo"))


@pytest.fixture(scope="session")
def qwen2_tokenizer(sft_demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sft_demo[0])


@pytest.fixture(scope="session")
def scorer_demo(tmp_path_factory):
    """(model_dir, train_pattern, eval_pattern) of the tiny Qwen3-VL + synthetic shards (128 train, 48 eval)."""
    return demo.build_scorer_demo(tmp_path_factory.mktemp("scorer-demo"))


@pytest.fixture(scope="session")
def vl_processor(scorer_demo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(scorer_demo[0])


def image(w, h, colour=(10, 20, 30)):
    from PIL import Image

    return Image.new("RGB", (w, h), colour)


VL_SAMPLES = [  # 2, 1 and 3 images of different sizes, then a text-only sample: (images, prompt)
    ([image(64, 48, (200, 10, 10)), image(32, 96, (10, 200, 10))], "Please describe the ocean."),
    ([image(80, 80, (90, 90, 90))], "Rate it."),
    ([image(40, 40, (1, 2, 3)), image(96, 64, (250, 250, 0)), image(50, 70, (0, 0, 250))], "Three pictures."),
    ([], "No picture at all, a longer prompt than the others."),
]
VL_PIXELS = dict(min_pixels=32 * 32, max_pixels=64 * 64)


@pytest.fixture(scope="session")
def vl_features(vl_processor):
    """Per-sample processor outputs of VL_SAMPLES with labels (score i, type i % 3) and keys k0..k3."""
    from collate import encode_vl_example

    return [{**encode_vl_example(images, prompt, vl_processor, **VL_PIXELS), "score_labels": float(i),
             "type_labels": i % 3, "key": f"k{i}"} for i, (images, prompt) in enumerate(VL_SAMPLES)]


@pytest.fixture
def one_thread():
    """Run a test's tiny-model math on one thread: faster than two for tensors this small, and immune to a busy
    second core (waiting OpenMP threads made the same steps 10x slower on a loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args, env=None, timeout=300):
    """Run a command from the repository root as a user would; returns CompletedProcess (text)."""
    import subprocess

    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def exit_2_line(capsys, main, args):
    """Run a script's main(args) in-process on bad input: it must exit 2 with an `error: ` line last on stderr,
    and no traceback; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def log_history(out):
    """The Trainer's log history from `out/trainer_state.json`."""
    with open(os.path.join(out, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def scorer_args(scorer_demo, out, *extra, train=None):
    """train_scorer.py flags of a short CPU run on the demo data (logs every step, no saves); `extra` last, wins."""
    return ["--model_name_or_path", scorer_demo[0], "--train_shards", train or scorer_demo[1],
            "--output_dir", str(out), "--num_types", "3", "--min_pixels", "1024", "--max_pixels", "4096",
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "1", "--logging_steps", "1",
            "--save_strategy", "no", "--dataloader_num_workers", "0", "--per_device_train_batch_size", "4", *extra]


def same_predictions(a, b, rel=1e-5):
    """Two predictions.jsonl contents: the same keys in the same order, the same guesses, scores within `rel`."""
    assert [p["key"] for p in a] == [q["key"] for q in b]
    for p, q in zip(a, b):
        assert p["type"] == q["type"], (p, q)
        assert p["score"] == pytest.approx(q["score"], rel=rel) and p["type_probs"] == pytest.approx(q["type_probs"])
