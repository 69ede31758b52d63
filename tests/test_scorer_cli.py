"""train_scorer.py as users run it: `bash run.sh` with 2 CPU processes (gloo)."""

import json
import os
import time

import pytest

import demo
from conftest import run_cli

TWO = {"NPROC_PER_NODE": "2"}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_logs_add_up(out, score_weight=1.0, type_weight=1.0):
    """Each training log's loss (the Trainer's mean over the window and the ranks) must be the weighted sum of the
    logged head losses: it is not if those were one rank's, or one step's."""
    with open(os.path.join(out, "trainer_state.json")) as f:
        logs = [h for h in json.load(f)["log_history"] if "loss_score" in h]
    assert logs
    for h in logs:
        assert h["loss"] == pytest.approx(score_weight * h["loss_score"] + type_weight * h["loss_type"], rel=1e-4)
    return logs


def test_demo_on_two_processes(tmp_path):
    out = tmp_path / "out"
    start = time.time()
    result = run_cli(["bash", "run.sh", "train_scorer.py", "--demo", "--output_dir", str(out)], env=TWO, timeout=120)
    wall = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert wall < 120, wall
    text = result.stdout
    assert "'loss_score'" in text and "'loss_type'" in text and "'eval_type_macro_f1'" in text
    assert f"predictions for 14 samples written to {out / 'predictions.jsonl'}" in text
    assert "per rank [0, 0]" in text
    assert sorted(p["key"] for p in read_jsonl(out / "predictions.jsonl")) == [f"e{i:05d}" for i in range(14)]
    logs = check_logs_add_up(out)
    assert logs[-1]["loss_score"] < 0.5 * logs[0]["loss_score"] and logs[-1]["loss_type"] < logs[0]["loss_type"]
    with open(out / "eval_results.json") as f:
        assert json.load(f)["eval_samples"] == 14


def test_two_processes_uneven_shards_text_only_batches_exact_eval_and_predict(scorer_demo, tmp_path):
    """Rank 0 and rank 1 train on different shards, one of them text-only (so one rank's vision tower gets no real
    gradient); eval shards of very different sizes; a predict shard with fewer shards than ranks x workers."""
    texts = [demo.vl_sample(f"txt{i}", f"Please rate text {i}.", [], float(i), i % 3) for i in range(3)]
    images = demo.make_vl_samples(7, seed=5, prefix="img")
    broken = [dict(images[0], __key__="broken0", **{"0.jpg": b"not an image"}),
              dict(images[1], __key__="broken1", json=b'{"prompt": "p", "score": 1.0, "type": 9}')]
    demo.write_shard(tmp_path / "train-text.tar", texts)
    demo.write_shard(tmp_path / "train-images.tar", images[:3] + broken + images[3:])
    evals = demo.make_vl_samples(16, seed=6, prefix="ev")
    demo.write_shards(tmp_path, "eval", evals, [4, 1, 6, 2, 3])
    preds = demo.make_vl_samples(5, seed=7, prefix="pr")
    demo.write_shard(tmp_path / "predict.tar", preds)
    out = tmp_path / "out"
    result = run_cli([
        "bash", "run.sh", "train_scorer.py", "--model_name_or_path", scorer_demo[0], "--num_types", "3",
        "--train_shards", f"{tmp_path}/train-*.tar", "--eval_shards", f"{tmp_path}/eval-{{000000..000004}}.tar",
        "--predict_shards", f"{tmp_path}/predict.tar", "--do_predict", "--output_dir", str(out),
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "2", "--max_steps", "8",
        "--logging_steps", "2", "--learning_rate", "1e-3", "--min_pixels", "1024", "--max_pixels", "4096",
        "--dataloader_num_workers", "2", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"],
        env=TWO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "an epoch is 12 samples = 6 steps of 2 x 1 x 1" in result.stdout
    assert "bad samples skipped 2 (per rank [" in result.stdout
    with open(out / "all_results.json") as f:
        results = json.load(f)
    assert results["train_bad_samples"] == 2
    assert results["eval_samples"] == 16 and results["eval_bad_samples"] == 0
    with open(out / "eval_results.json") as f:
        assert json.load(f)["eval_samples"] == 16
    keys = [p["key"] for p in read_jsonl(out / "predictions.jsonl")]
    assert keys == [s["__key__"] for s in preds]  # each once, in shard order
    check_logs_add_up(out)


@pytest.mark.parametrize("phase", ["train", "eval"])
def test_two_processes_bad_sample_error_exits_2_with_one_line(scorer_demo, tmp_path, phase):
    """The bad sample sits in one rank's share: that rank alone meets it, yet the run ends cleanly everywhere."""
    samples = demo.make_vl_samples(6, seed=8, prefix="ok")
    samples[3]["json"] = b'{"prompt": "p", "score": 1.0}'
    demo.write_shard(tmp_path / "data-000000.tar", demo.make_vl_samples(6, seed=9, prefix="fine"))
    shard = demo.write_shard(tmp_path / "data-000001.tar", samples)
    result = run_cli(["bash", "run.sh", "train_scorer.py", "--model_name_or_path", scorer_demo[0], "--num_types",
                      "3", f"--{phase}_shards", f"{tmp_path}/data-*.tar", "--on_bad_sample", "error",
                      "--output_dir", str(tmp_path / "o"), "--max_steps", "6", "--logging_steps", "2",
                      "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true",
                      "--min_pixels", "1024", "--max_pixels", "4096", "--dataloader_num_workers", "0", "--use_cpu"],
                     env=TWO, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {shard}: ok00003: json: missing field 'type'" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr and result.stderr.count("error: ") == 1, result.stderr[-3000:]
