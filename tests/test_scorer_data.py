"""Scorer data: shard specs, sample checks, collate_vl == one processor call, rank/worker splits, metrics."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from collate import (VL_IMAGE_PATCH_SIZE, DataError, ShardStream, collate_vl, count_samples, encode_vl_example,
                     expand_shards, read_vl_sample, vl_messages)
from train_scorer import make_loader, scorer_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def image(w, h, colour=(10, 20, 30)):
    return Image.new("RGB", (w, h), colour)


# --- shard specs ------------------------------------------------------------------------------------------------

def test_expand_shards_patterns_globs_and_lists(tmp_path):
    paths = [demo.write_shard(tmp_path / f"a-{i:06d}.tar", []) for i in range(3)]
    other = demo.write_shard(tmp_path / "b.tar", [])
    assert expand_shards(f"{tmp_path}/a-{{000000..000002}}.tar") == paths
    assert expand_shards(f"{tmp_path}/a-*.tar") == paths
    # a comma list whose items contain braces with commas, a glob repeating a brace item (kept once), a URL
    spec = f"{tmp_path}/b.tar, {tmp_path}/a-{{000001,000002}}.tar,{tmp_path}/a-00000[0-9].tar,pipe:cat x.tar"
    assert expand_shards(spec) == [other, paths[1], paths[2], paths[0], "pipe:cat x.tar"]


@pytest.mark.parametrize("spec, message", [
    ("", "empty shard list"), (" , ", "empty shard list"),
    ("{d}/nothing-*.tar", "nothing-*.tar: pattern matches no file"),
    ("{d}/a-{{000000..000003}}.tar", "a-000003.tar: no such shard file"),
])
def test_expand_shards_errors(tmp_path, spec, message):
    for i in range(3):
        demo.write_shard(tmp_path / f"a-{i:06d}.tar", [])
    with pytest.raises(DataError, match=message.replace("*", r"\*").replace(".", r"\.")):
        expand_shards(spec.format(d=tmp_path))


# --- one sample ---------------------------------------------------------------------------------------------------

def test_read_vl_sample_orders_images_by_index():
    sample = demo.vl_sample("k", "rate", [image(40, 30, (255, 0, 0)), image(50, 60, (0, 255, 0)),
                                          image(70, 20, (0, 0, 255))], 2.5, 1, formats=("png",))
    sample = {k: sample[k] for k in ("__key__", "2.png", "json", "0.png", "1.png")}  # members in any order
    prompt, images, score, kind = read_vl_sample(sample, num_types=3)
    assert (prompt, score, kind) == ("rate", 2.5, 1)
    assert [im.size for im in images] == [(40, 30), (50, 60), (70, 20)]
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    # prediction data needs no labels; text-only samples have no images
    text_only = {"__key__": "t", "json": b'{"prompt": "hi"}'}
    assert read_vl_sample(text_only, 3, with_labels=False) == ("hi", [], None, None)


def _bad(record=None, images=(("0.jpg", None),), raw_json=None):
    sample = {"__key__": "k", "json": raw_json if raw_json is not None else json.dumps(record).encode()}
    for name, data in images:
        sample[name] = data if data is not None else demo.encode_image(image(32, 32), name.split(".")[-1])
    return sample


GOOD = {"prompt": "p", "score": 1.0, "type": 0}


@pytest.mark.parametrize("sample, message", [
    ({"__key__": "k", "0.jpg": b""}, "no .json member"),
    (_bad(raw_json=b"{not json"), "malformed json"),
    (_bad(raw_json=b"[1, 2]"), "expected an object, got list"),
    (_bad({"score": 1.0, "type": 0}), "missing field 'prompt'"),
    (_bad({"prompt": 3, "score": 1.0, "type": 0}), "field 'prompt': expected str, got int"),
    (_bad({"prompt": "p", "type": 0}), "missing field 'score'"),
    (_bad({"prompt": "p", "score": "high", "type": 0}), "field 'score': expected float, got str"),
    (_bad({"prompt": "p", "score": 1.0, "type": 1.5}), "field 'type': expected int, got float"),
    (_bad({"prompt": "p", "score": 1.0, "type": True}), "field 'type': expected int, got bool"),
    (_bad({"prompt": "p", "score": 1.0, "type": 3}), "field 'type' is 3, outside 0..2"),
    (_bad({"prompt": "p", "score": 1.0, "type": -1}), "field 'type' is -1, outside 0..2"),
    (_bad(raw_json=b'{"prompt": "p", "score": NaN, "type": 0}'), "field 'score' is nan"),
    (_bad(GOOD, [("0.jpg", None), ("2.png", None)]), r"image 1 is missing \(found .0.jpg, .2.png\)"),
    (_bad(GOOD, [("1.jpg", None)]), "image 0 is missing"),
    (_bad(GOOD, [("0.jpg", None), ("0.png", None)]), "two files for image 0"),
    (_bad(GOOD, [("0.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")]), r"image .0.jpg: cannot decode"),
    (_bad(GOOD, [("0.png", demo.encode_image(image(64, 64), "png")[:60])]), r"image .0.png: cannot decode"),
])
def test_read_vl_sample_rejects_bad_samples(sample, message):
    with pytest.raises(DataError, match=message):
        read_vl_sample(sample, num_types=3)


# --- collate_vl ---------------------------------------------------------------------------------------------------

SAMPLES = [  # 2, 1 and 3 images of different sizes, then a text-only sample
    ([image(64, 48, (200, 10, 10)), image(32, 96, (10, 200, 10))], "Please describe the ocean."),
    ([image(80, 80, (90, 90, 90))], "Rate it."),
    ([image(40, 40, (1, 2, 3)), image(96, 64, (250, 250, 0)), image(50, 70, (0, 0, 250))], "Three pictures."),
    ([], "No picture at all, a longer prompt than the others."),
]
PIXELS = dict(min_pixels=32 * 32, max_pixels=64 * 64)


def vl_features(processor):
    feats = []
    for i, (images, prompt) in enumerate(SAMPLES):
        f = dict(encode_vl_example(images, prompt, processor, **PIXELS))
        feats.append({**f, "score_labels": float(i), "type_labels": i % 3, "key": f"k{i}"})
    return feats


def one_call_batch(processor):
    from qwen_vl_utils import process_vision_info

    texts, images = [], []
    for ims, prompt in SAMPLES:
        messages = vl_messages(ims, prompt, **PIXELS)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images += process_vision_info(messages, image_patch_size=VL_IMAGE_PATCH_SIZE)[0] or []
    return processor(text=texts, images=images, do_resize=False, padding=True, padding_side="left",
                      return_tensors="pt")


def test_collate_vl_equals_one_processor_call(vl_processor):
    feats = vl_features(vl_processor)
    assert [len(f.get("image_grid_thw", [])) for f in feats] == [2, 1, 3, 0]
    assert len({tuple(g.tolist()) for f in feats[:3] for g in f["image_grid_thw"]}) > 2  # varied image sizes
    batch = collate_vl(feats, vl_processor.tokenizer.pad_token_id)
    ref = one_call_batch(vl_processor)
    assert set(ref) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    for name in ref:
        assert batch[name].dtype == ref[name].dtype, name
        assert torch.equal(batch[name], ref[name]), name
    assert batch["attention_mask"][:, -1].all()  # left padding: every row ends with a real token
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()
    image_token = vl_processor.image_token_id
    assert (batch["input_ids"] == image_token).sum() == batch["image_grid_thw"].prod(-1).sum() // 4
    assert batch["score_labels"].tolist() == [0.0, 1.0, 2.0, 3.0] and batch["score_labels"].dtype == torch.float32
    assert batch["type_labels"].tolist() == [0, 1, 2, 0] and batch["type_labels"].dtype == torch.long
    assert batch["keys"] == ["k0", "k1", "k2", "k3"]


def test_collate_vl_text_only_batch_and_no_labels(vl_processor):
    feats = vl_features(vl_processor)
    text = dict(feats[3], score_labels=None, type_labels=None)
    batch = collate_vl([text, text], vl_processor.tokenizer.pad_token_id)
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert "score_labels" not in batch and "type_labels" not in batch
    assert batch["input_ids"].shape == (2, text["input_ids"].shape[1])


# --- splitting shards over ranks and workers ------------------------------------------------------------------------

class KeyOnly:
    """An encoder without images or a processor: the split logic is what is under test here."""

    def __call__(self, sample):
        if sample["__key__"].endswith("bad"):
            raise DataError("bad on purpose")
        return {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]]),
                "key": sample["__key__"]}


def key_shards(root, sizes, bad=()):
    """Shards of json-only samples named by shard and index; returns (paths, keys in shard order)."""
    paths, keys = [], []
    for s, size in enumerate(sizes):
        names = [f"s{s}i{i}" + ("bad" if (s, i) in bad else "") for i in range(size)]
        samples = [{"__key__": k, "json": b"{}"} for k in names]
        paths.append(demo.write_shard(root / f"k-{s:06d}.tar", samples))
        keys += names
    return paths, keys


class Args:  # the DataLoader settings make_loader reads from TrainingArguments
    dataloader_pin_memory, dataloader_prefetch_factor, dataloader_multiprocessing_context = False, None, None

    def __init__(self, workers):
        self.dataloader_num_workers = workers


def run_rank(stream, workers):
    keys, bad, batches = [], [], []
    for batch in make_loader(stream, Args(workers)):
        keys += batch.get("keys", [])
        bad += batch["bad_samples"]
        batches.append(len(batch.get("keys", [])))
    return keys, bad, batches


@pytest.mark.parametrize("sizes, world, workers", [
    ([7], 2, 0),            # one shard, two ranks
    ([5, 1, 9], 2, 0),      # uneven shards
    ([4, 3], 4, 0),         # more ranks than shards
    ([5, 1, 9], 2, 2),      # 4 slots > 3 shards: split by sample, in worker processes
    ([3, 3, 2, 6, 1], 2, 2),  # 4 slots <= 5 shards: split by shard, one slot gets two
])
def test_exact_stream_reads_every_sample_once(tmp_path, sizes, world, workers):
    paths, keys = key_shards(tmp_path, sizes, bad={(0, 1)})
    seen, bad = [], []
    for rank in range(world):
        stream = ShardStream(paths, KeyOnly(), 2, 0, rank=rank, world_size=world)
        k, b, _ = run_rank(stream, workers)
        seen += k
        bad += b
    good = [k for k in keys if not k.endswith("bad")]
    assert sorted(seen) == sorted(good) and len(seen) == len(good)
    assert bad == [{"shard": paths[0], "key": "s0i1bad", "problem": "bad on purpose"}]


def test_training_stream_gives_every_rank_the_same_full_batches(tmp_path):
    paths, keys = key_shards(tmp_path, [9, 2, 5])
    per_rank = []
    for rank in range(2):
        stream = ShardStream(paths, KeyOnly(), 3, 0, rank=rank, world_size=2, batches_per_epoch=5,
                             shuffle_buffer=4)
        assert len(stream) == 5
        k, _, batches = run_rank(stream, 2)
        assert batches == [3] * 5  # rank 1 holds 2 samples on its shard but still makes 5 full batches
        again, _, _ = run_rank(stream, 2)
        assert again == k  # the same epoch replays the same stream (resume skips batches of it)
        stream.set_epoch(1)
        assert run_rank(stream, 2)[0] != k  # a new epoch reshuffles
        per_rank.append(set(k))
    assert per_rank[0].isdisjoint(per_rank[1])  # within an epoch the ranks read different shards
    assert per_rank[0] | per_rank[1] <= set(keys)


def test_training_stream_with_more_workers_than_batches(tmp_path):
    paths, _ = key_shards(tmp_path, [4, 4, 4, 4])
    stream = ShardStream(paths, KeyOnly(), 2, 0, batches_per_epoch=1)
    assert run_rank(stream, 2)[2] == [2]  # the second worker has no batch to make, and makes none


def test_training_stream_without_usable_samples_is_fatal(tmp_path):
    paths, _ = key_shards(tmp_path, [2], bad={(0, 0), (0, 1)})
    stream = ShardStream(paths, KeyOnly(), 2, 0, batches_per_epoch=3)
    _, bad, _ = run_rank(stream, 0)
    assert bad[-1]["fatal"] and "no usable sample for rank 0" in bad[-1]["problem"]
    assert len(bad) == 3  # the two bad samples, then the verdict


def test_unreadable_shard_is_fatal(tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file at all" * 40)
    _, bad, _ = run_rank(ShardStream([str(broken)], KeyOnly(), 2, 0), 0)
    assert bad[-1]["fatal"] and "broken.tar: cannot read as a tar shard" in bad[-1]["problem"]


def test_count_samples(tmp_path):
    paths, keys = key_shards(tmp_path, [3, 0, 4])
    assert count_samples(paths) == 7
    with pytest.raises(DataError, match="pass --epoch_samples"):
        count_samples(["pipe:cat x.tar"])


# --- metrics ------------------------------------------------------------------------------------------------------

def test_scorer_metrics_match_definitions():
    pred = np.array([1.0, 2.0, 2.0, 5.0, 4.0])
    label = np.array([1.5, 2.0, 3.0, 4.0, 4.0])
    logits = np.log(np.array([[.7, .2, .1], [.1, .8, .1], [.3, .3, .4], [.2, .5, .3], [.6, .3, .1]]))
    kind = [0, 1, 1, 2, 0]  # argmax guesses: 0, 1, 2, 1, 0 -> 3 of 5 right
    rows = [{"score": p, "score_label": y, "type_logits": list(l), "type_label": k}
            for p, y, l, k in zip(pred, label, logits, kind)]
    m = scorer_metrics(rows, score_weight=2.0, type_weight=0.5)
    mse = np.mean((pred - label) ** 2)
    ce = -np.mean([logits[i, k] for i, k in enumerate(kind)])
    assert m["eval_loss_score"] == pytest.approx(mse) and m["eval_loss_type"] == pytest.approx(ce)
    assert m["eval_loss"] == pytest.approx(2.0 * mse + 0.5 * ce)
    assert m["eval_score_mae"] == pytest.approx(np.mean(np.abs(pred - label)))
    assert m["eval_score_rmse"] == pytest.approx(math.sqrt(mse))
    assert m["eval_score_pearson"] == pytest.approx(np.corrcoef(pred, label)[0, 1])
    # average ranks with ties: pred (1, 2.5, 2.5, 5, 4), label (1, 2, 3, 4.5, 4.5)
    assert m["eval_score_spearman"] == pytest.approx(np.corrcoef([1, 2.5, 2.5, 5, 4], [1, 2, 3, 4.5, 4.5])[0, 1])
    assert m["eval_type_accuracy"] == pytest.approx(0.6)
    # class 0: tp 2 -> f1 1; class 1: tp 1, fp 1, fn 1 -> 0.5; class 2: fp 1, fn 1 -> 0
    assert m["eval_type_macro_f1"] == pytest.approx(0.5)
    assert m["eval_samples"] == 5
    constant = scorer_metrics([dict(r, score=1.0) for r in rows], 1.0, 1.0)
    assert math.isnan(constant["eval_score_pearson"])
