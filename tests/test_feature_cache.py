"""feature_cache.py through train_scorer.py: heads trained from cached features are the heads trained without the
cache; the cache is rebuilt when its settings or a shard change or a file is damaged; bad samples count alike;
prediction reads it for the shards it covers; two processes build it together."""

import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import demo
import feature_cache
import train_scorer
from conftest import ROOT, exit_2_line, log_history, read_jsonl, run_cli, same_predictions, scorer_args


@pytest.fixture
def backbone_calls(monkeypatch):
    """How many times the Qwen3-VL backbone ran (each batch of a pass is one call)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    calls, forward = [], Qwen3VLModel.forward
    monkeypatch.setattr(Qwen3VLModel, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    return calls


def cache_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def cached_samples(path):
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["samples"])


FROZEN = ["--freeze_backbone", "--learning_rate", "1e-2", "--max_steps", "12", "--per_device_eval_batch_size", "8",
          "--eval_strategy", "steps", "--eval_steps", "6", "--dataloader_num_workers", "1"]


def test_heads_from_the_cache_train_and_evaluate_like_heads_on_the_backbone(scorer_demo, tmp_path, backbone_calls,
                                                                            capsys):
    """Same batches (bucketed, shuffled, dealt alike), same per-step losses, same heads, same eval metrics; the
    backbone ran once per sample (the 6 shards' 176 samples in one chunk, 22 batches of 8), not per step."""
    plain = train_scorer.main(scorer_args(scorer_demo, tmp_path / "plain", *FROZEN, "--eval_shards", scorer_demo[2],
                                          "--feature_cache", "none"))
    plain_calls = len(backbone_calls)
    assert plain_calls == 12 + 2 * 6  # a call per step, and 6 batches per evaluation (at steps 6 and 12)
    assert not os.path.exists(tmp_path / "plain" / "feature_cache")
    capsys.readouterr()

    cached = train_scorer.main(scorer_args(scorer_demo, tmp_path / "cached", *FROZEN, "--eval_shards",
                                           scorer_demo[2]))
    out = capsys.readouterr().out
    assert len(backbone_calls) - plain_calls == 22
    assert f"feature cache: computing the backbone's features of 6 shard(s) once, into " \
           f"{tmp_path / 'cached' / 'feature_cache'}" in out
    assert len(cache_files(tmp_path / "cached" / "feature_cache")) == 6

    a = [h["loss"] for h in log_history(tmp_path / "plain") if "loss" in h]
    b = [h["loss"] for h in log_history(tmp_path / "cached") if "loss" in h]
    assert len(a) == len(b) == 12 and b == pytest.approx(a, rel=1e-5)
    for name, value in plain.model.state_dict().items():
        if name.startswith(("score_head.", "type_head.")):
            torch.testing.assert_close(cached.model.state_dict()[name], value, rtol=1e-5, atol=1e-7)
    for key, value in plain.metrics.items():
        if key.startswith("eval_") and "runtime" not in key and "per_second" not in key:
            assert cached.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


EVAL_ONLY = ["--num_types", "3", "--min_pixels", "1024", "--max_pixels", "4096", "--use_cpu", "--report_to", "none",
             "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--per_device_eval_batch_size", "8"]


def evaluate(model, shards, out, cache, *extra):
    trainer = train_scorer.main(["--model_name_or_path", model, "--eval_shards", shards, "--output_dir", str(out),
                                 "--feature_cache", str(cache), *EVAL_ONLY, *extra])
    return {k: v for k, v in trainer.metrics.items() if k.startswith("eval_") and "runtime" not in k
            and "per_second" not in k}


class TestInvalidation:
    @pytest.fixture
    def shards(self, scorer_demo, tmp_path):
        """The demo's eval shards, and a third with a bad sample (missing type) among good ones."""
        samples = demo.make_vl_samples(6, seed=5, prefix="x")
        samples[2]["json"] = b'{"prompt": "p", "score": 1.0}'
        extra = demo.write_shard(tmp_path / "extra.tar", samples)
        return f"{scorer_demo[2]},{extra}", extra

    def test_reused_mapped_rebuilt_on_change_or_damage_and_bad_samples_counted_alike(
            self, scorer_demo, shards, tmp_path, capsys, backbone_calls, monkeypatch):
        spec, extra = shards
        cache = tmp_path / "cache"
        uncached = evaluate(scorer_demo[0], spec, tmp_path / "o", "none")
        assert uncached["eval_bad_samples"] == 1 and uncached["eval_samples"] == 53
        capsys.readouterr()

        built = evaluate(scorer_demo[0], spec, tmp_path / "o", cache)
        assert "computing the backbone's features of 3 shard(s)" in capsys.readouterr().out
        assert built == pytest.approx(uncached, rel=1e-5)
        files = cache_files(cache)
        assert len(files) == 3
        extra_file = next(cache / f for f in files if f.startswith("extra-"))
        assert [s.get("problem") for s in cached_samples(extra_file)] == \
            [None, None, "json: missing field 'type'", None, None, None]

        calls = len(backbone_calls)
        assert evaluate(scorer_demo[0], spec, tmp_path / "o", cache) == built  # read, not computed
        assert len(backbone_calls) == calls and "computing" not in capsys.readouterr().out
        with monkeypatch.context() as m:  # as if the cache did not fit in memory: rows read from the mapped files
            m.setattr(feature_cache, "memory_budget", lambda: 0)
            assert evaluate(scorer_demo[0], spec, tmp_path / "o", cache, "--dataloader_num_workers", "1") == built
        assert "features are read from the files as needed (memory-mapped" in capsys.readouterr().out
        assert len(backbone_calls) == calls

        with monkeypatch.context() as m:  # killed while building, after the first chunk's file: it is kept
            m.setattr(feature_cache, "CHUNK_SAMPLES", 29)  # chunks: the first shard (29 samples), then the others
            write = feature_cache.FeatureCache._write_chunk

            def write_then_die(self, *args, **kwargs):
                write(self, *args, **kwargs)
                raise KeyboardInterrupt

            m.setattr(feature_cache.FeatureCache, "_write_chunk", write_then_die)
            with pytest.raises(KeyboardInterrupt):
                evaluate(scorer_demo[0], spec, tmp_path / "o", tmp_path / "killed")
        assert len(cache_files(tmp_path / "killed")) == 1
        # the rest computed in other batches than `built`'s (padding differs): equal to rounding
        assert evaluate(scorer_demo[0], spec, tmp_path / "o", tmp_path / "killed") == pytest.approx(built, rel=1e-5)
        assert "computing the backbone's features of 2 shard(s)" in capsys.readouterr().out

        os.utime(extra, ns=(os.stat(extra).st_atime_ns, os.stat(extra).st_mtime_ns + 10**9))  # the shard changed
        assert evaluate(scorer_demo[0], spec, tmp_path / "o", cache) == built
        out = capsys.readouterr().out
        assert f"feature cache: {extra_file}: its shard or the settings changed since it was written; not used" in out
        assert "computing the backbone's features of 1 shard(s)" in out

        extra_file.write_bytes(extra_file.read_bytes()[:100])  # damaged: cut short
        assert evaluate(scorer_demo[0], spec, tmp_path / "o", cache) == built
        out = capsys.readouterr().out
        assert f"feature cache: {extra_file}: unreadable (" in out and "of 1 shard(s)" in out

        other = evaluate(scorer_demo[0], spec, tmp_path / "o", cache, "--max_pixels", "2048")  # a setting changed
        assert "computing the backbone's features of 3 shard(s)" in capsys.readouterr().out
        assert other == pytest.approx(evaluate(scorer_demo[0], spec, tmp_path / "o", "none", "--max_pixels", "2048"),
                                      rel=1e-5)

    def test_prediction_reads_the_shards_it_covers_and_computes_the_others(self, scorer_demo, shards, tmp_path,
                                                                           capsys):
        spec, extra = shards
        cache = tmp_path / "cache"
        evaluate(scorer_demo[0], scorer_demo[2], tmp_path / "o", cache)  # caches the demo's eval shards only
        new = demo.write_shard(tmp_path / "new.tar", demo.make_vl_samples(5, seed=6, prefix="n"))
        predict = f"{scorer_demo[2]},{new}"
        for name, folder in (("cached", cache), ("plain", "none")):
            train_scorer.main(["--model_name_or_path", scorer_demo[0], "--predict_shards", predict, "--do_predict",
                               "--allow_untrained_heads", "--output_dir", str(tmp_path / name), "--feature_cache",
                               str(folder), *EVAL_ONLY])
        assert len(cache_files(cache)) == 2  # the new shard was computed for the predictions, not cached
        cached, plain = (read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("cached", "plain"))
        assert len(plain) == 53 and plain[-1]["key"] == "n00004"
        same_predictions(cached, plain)


def test_two_processes_build_the_cache_once_and_train_from_it(scorer_demo, tmp_path):
    """Under run.sh with 2 processes each rank computes its share of the samples; rank 0 writes every shard's file,
    with every sample once, holding the features one process computes."""
    two, one = tmp_path / "two", tmp_path / "one"
    run = ["--freeze_backbone", "--max_steps", "2", "--eval_shards", scorer_demo[2], "--per_device_eval_batch_size",
           "8"]
    res = run_cli(["bash", "run.sh", "train_scorer.py", *scorer_args(scorer_demo, two, *run)],
                  env={"NPROC_PER_NODE": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("feature cache: computing") == 1
    train_scorer.main(scorer_args(scorer_demo, one, *run))
    files = cache_files(two / "feature_cache")
    assert files == cache_files(one / "feature_cache") and len(files) == 6
    for f in files:
        a, b = (safetensors.torch.load_file(d / "feature_cache" / f) for d in (two, one))
        samples = cached_samples(two / "feature_cache" / f)
        assert samples == cached_samples(one / "feature_cache" / f) and a["features"].shape[0] == len(samples)
        torch.testing.assert_close(a["features"], b["features"], rtol=1e-4, atol=1e-5)
        assert torch.equal(a["score"], b["score"]) and torch.equal(a["type"], b["type"])


def test_a_cache_for_a_backbone_that_trains_exits_2(scorer_demo, tmp_path, capsys):
    line = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, tmp_path / "o", "--feature_cache",
                                                              str(tmp_path / "cache")))
    assert line == "error: --feature_cache keeps a frozen backbone's features: add --freeze_backbone (or " \
                   "--feature_cache none)"


BUILDER = """
import resource, sys
from types import SimpleNamespace
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import demo
import plumbing
from data import ShardStream
from feature_cache import FeatureCache
from train_scorer import exact_pass

dist.init_process_group("gloo")
rank, folder, samples, chunk = dist.get_rank(), sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
WIDE = 262144  # 1 MB of features a sample: what the build holds shows in the resident set
shards = [f"{{folder}}/shards/s-{{i:06d}}.tar" for i in range(samples // 8)]  # 8 samples a shard
if rank == 0:
    demo.write_shards(folder + "/shards", "s", [demo.vl_sample(f"k{{i:04d}}", {{"prompt": "p", "score": i, "type": 0}},
                                                               []) for i in range(samples)], [8] * (samples // 8))
dist.barrier()
args = SimpleNamespace(dataloader_num_workers=0, dataloader_pin_memory=False, dataloader_prefetch_factor=None,
                       dataloader_multiprocessing_context=None, process_index=rank, disable_tqdm=True, device="cpu")


def features_pass(only, desc):  # the real exact pass; a sample's features are WIDE copies of its number
    stream = ShardStream(only, lambda s: {{"key": s["__key__"]}}, 4, 0, rank, 2,
                         collate=lambda features, pad: {{"keys": [f["key"] for f in features]}})
    return exact_pass(stream, args, "error", lambda batch: [
        {{"features": torch.full((WIDE,), float(key[1:])), "labels": {{"score": 0.0, "type": 0}}, "length": 1}}
        for key in batch["keys"]], unique=False, rows_to=0, desc=desc)


cache = FeatureCache(folder + "/cache", {{"sentinel": 1}})
cache.fill(shards, features_pass, writer=rank == 0, chunk_samples=chunk)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MB, the build's high-water mark
assert cache.load_agreed(shards) == []
rows = [float(cache.encode(e)["features"][0]) for s in shards for e in cache.read(s)]
assert rows == [float(i) for i in range(samples)], rows[:10]
print(f"rank {{rank}}: peak {{peak}} MB", flush=True)
plumbing.leave_process_group()
"""


def test_building_holds_a_chunk_not_the_data(tmp_path):
    """Peak resident memory of a 2-process build (the real exact pass, gathered to the writer) grows with the chunk,
    not with the samples: 4x the samples (96 MB more features) add less than a quarter of that on either rank
    (measured: nothing); before, every rank gathered and kept every feature. The files hold every sample in order.
    glibc's mmap threshold is fixed, so that freed 1 MB rows go back to the system: its adaptive threshold keeps
    freed heap pages resident (measured: 50 MB more at 4x), a high-water mark of the allocator, not of the build."""
    script = tmp_path / "builder.py"
    script.write_text(BUILDER.format(root=str(ROOT)))
    peaks = {}
    for samples in (32, 128):
        res = run_cli(["bash", "run.sh", str(script), str(tmp_path / str(samples)), str(samples), "8"],
                      env={"NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
        assert res.returncode == 0, res.stderr[-3000:]
        peaks[samples] = sorted(line for line in res.stdout.splitlines() if line.startswith("rank"))
    growth = [int(big.split()[3]) - int(small.split()[3]) for small, big in zip(peaks[32], peaks[128])]
    assert all(g < 96 / 4 for g in growth), (peaks, growth)
