"""make_shards.py: manifests (JSONL, CSV) with nested folders and 0-3 images a row -> shards that webdataset reads back
as exactly the good rows with the original bytes; every bad row with its line and training's words; byte-identical
reruns, shuffling, shard limits, refusals; token_stats.py and training read the shards with the same verdicts."""

import contextlib
import csv
import io
import json
import os
import random
import re

import pytest
from PIL import Image

import make_shards
from conftest import exit_2_line, read_jsonl, scorer_args

PIXELS = ["--min_pixels", "1024", "--max_pixels", "4096"]  # the bounds of the demo runs (conftest.scorer_args)


def save(path, image, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path.read_bytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images in nested folders, and the rows of a manifest: GOOD (0-3 images, one absolute path, one own key) first,
    then BAD ones as (JSON Lines text, the problem make_shards must name)."""
    root = tmp_path_factory.mktemp("items")
    red = save(root / "photos/a/red.jpg", Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG")
    green = save(root / "photos/b/c/green.PNG", Image.new("RGBA", (50, 60), (10, 200, 10, 90)), "PNG")
    blue = save(root / "elsewhere/blue.webp", Image.new("RGB", (64, 32), (10, 10, 200)), "WEBP")
    save(root / "photos/thin.png", Image.new("RGB", (300, 1)), "PNG")
    (root / "photos/broken.jpg").write_bytes(b"not a picture")
    (root / "photos/noext").write_bytes(red)
    (root / "photos/dir.jpg").mkdir()
    good = [
        ({"prompt": "Two pictures.", "score": 1.5, "type": 0, "images": ["photos/a/red.jpg", "photos/b/c/green.PNG"]},
         [("jpg", red), ("png", green)]),
        ({"prompt": "No picture.", "score": 2.0, "type": 1}, []),
        ({"prompt": "Three.", "score": 3.25, "type": 2, "key": "k-3",
          "images": ["photos/b/c/green.PNG", str(root / "elsewhere/blue.webp"), "photos/a/red.jpg"]},
         [("png", green), ("webp", blue), ("jpg", red)]),
        ({"prompt": "Blue only.", "score": 0.5, "type": 1, "images": ["elsewhere/blue.webp"]}, [("webp", blue)]),
    ]
    row = {"prompt": "p", "score": 1.0, "type": 0}
    bad = [
        ('{"prompt": "x",', "malformed JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({**row, "images": "photos/a/red.jpg"}), "field 'images': expected a list of paths"),
        (json.dumps({**row, "key": 7}), "field 'key': expected a string, got int"),
        (json.dumps({**row, "key": "a.b"}), "key 'a.b' contains a dot (webdataset splits keys at the first dot)"),
        (json.dumps({**row, "key": "k-3"}), "key 'k-3' is already the key of line 3"),
        (json.dumps({**row, "images": ["photos/a/red.jpg", "photos/nope.jpg"]}),
         f"{root}/photos/nope.jpg: no such image file"),
        (json.dumps({**row, "images": ["photos/dir.jpg"]}), f"{root}/photos/dir.jpg: cannot read (Is a directory)"),
        (json.dumps({**row, "images": ["photos/noext"]}),
         f"{root}/photos/noext: no file extension to name the image member by (KEY.0.jpg, ...)"),
        (json.dumps({**row, "images": ["photos/a/red.jpg", "photos/broken.jpg"]}),
         f"{root}/photos/broken.jpg: image .1.jpg: cannot decode (UnidentifiedImageError: cannot identify image file "
         f"<_io.BytesIO object at ADDRESS>)"),
        (json.dumps({**row, "images": ["photos/thin.png"]}),
         f"{root}/photos/thin.png: image .0.png (300x1): absolute aspect ratio must be smaller than 200, got 300.0"),
        (json.dumps({"score": 1.0, "type": 0}), "json: missing field 'prompt'"),
        (json.dumps({**row, "prompt": 5}), "json: field 'prompt': expected str, got int"),
        ('{"prompt": "p", "score": NaN, "type": 0}', "json: field 'score' is nan"),
        (json.dumps({**row, "type": 1.0}), "json: field 'type': expected int, got float"),
        (json.dumps({**row, "type": 3}), "json: field 'type' is 3, outside 0..2 (--num_types 3)"),
        (json.dumps({"prompt": "p", "score": 1.0}), "json: missing field 'type'"),
    ]
    return root, good, bad


def write_jsonl(root, name, good, bad=()):
    """The manifest: good rows, a blank line (skipped, but counted in line numbers), then the bad ones."""
    lines = [json.dumps(r) for r, _ in good] + [""] + [text for text, _ in bad]
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args):
    """make_shards.main in-process, its stdout kept; returns (result, stdout)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = make_shards.main([*map(str, args), "--disable_tqdm", "true"])
    return result, out.getvalue()


def stable(lines):
    """Bad-row lines without the memory address PIL's message names."""
    return [re.sub(r"at 0x[0-9a-f]+", "at ADDRESS", line) for line in lines]


def read_back(shards):
    """Every sample of the shards with webdataset's own reader, in order."""
    from webdataset.tariterators import tarfile_samples

    return [{k: v for k, v in s.items() if k != "__url__"} for s in tarfile_samples([{"url": p} for p in shards])]


def expected_samples(good, keys):
    return [{"__key__": key, "json": json.dumps({k: r[k] for k in ("prompt", "score", "type")}).encode(),
             **{f"{i}.{ext}": data for i, (ext, data) in enumerate(images)}} for key, (r, images) in zip(keys, good)]


GOOD_KEYS = ["000000", "000001", "k-3", "000003"]


class TestManifests:
    def test_jsonl_gives_exactly_the_good_rows_with_their_bytes_and_lists_every_bad_row(self, files, tmp_path):
        from data import count_samples, shard_samples

        root, good, bad = files
        manifest = write_jsonl(root, "all.jsonl", good, bad)
        result, out = run("--manifest", manifest, "--output_dir", tmp_path, "--num_types", "3",
                          "--samples_per_shard", "3", *PIXELS)
        first_bad = len(good) + 2  # after the blank line
        assert stable(result["bad"]) == [f"{manifest}: line {first_bad + i}: {p}" for i, (_, p) in enumerate(bad)]
        assert result["samples"] == 4 and result["images"] == 6
        assert result["shards"] == [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
        assert out.splitlines()[-1] == (f"--train_shards '{tmp_path}/train-{{000000..000001}}.tar'  # 4 samples, "
                                        f"2 shards, {len(bad)} bad rows left out")
        assert f"{len(bad)} bad row(s) left out:\n  {result['bad'][0]}\n" in out
        assert read_back(result["shards"]) == expected_samples(good, GOOD_KEYS)
        ours = [{k: v for k, v in s.items() if k != "__url__"} for p in result["shards"] for s in shard_samples(p)]
        assert ours == expected_samples(good, GOOD_KEYS) and count_samples(result["shards"]) == 4

    def test_csv_gives_the_same_shards_as_jsonl_and_names_bad_columns(self, files, tmp_path):
        root, good, _ = files
        jsonl, _ = run("--manifest", write_jsonl(root, "good.jsonl", good), "--output_dir", tmp_path / "j")
        table = root / "good.csv"
        cells = [[r["prompt"], str(r["score"]), str(r["type"]), ";".join(r.get("images", [])), r.get("key", "")]
                 for r, _ in good]
        cells += [["bad score", "abc", "0", "", ""], ["bad type", "1", "2.5", "", ""], ["no score", "", "1", "", ""],
                  ['a "quoted",\nmultiline prompt', "1", "3", "photos/a/red.jpg ; photos/b/c/green.PNG", "q"]]
        with open(table, "w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark, as Excel writes
            csv.writer(f).writerows([["prompt", "score", "type", "images", "key"], *cells])
        result, _ = run("--manifest", table, "--output_dir", tmp_path / "c", "--num_types", "3")
        assert result["bad"] == [f"{table}: line 6: column 'score': 'abc' is not a number",
                                 f"{table}: line 7: column 'type': '2.5' is not an integer",
                                 f"{table}: line 8: json: missing field 'score'",
                                 f"{table}: line 9: json: field 'type' is 3, outside 0..2 (--num_types 3)"]
        assert [open(p, "rb").read() for p in result["shards"]] == [open(p, "rb").read() for p in jsonl["shards"]]

    def test_prediction_rows_need_no_labels(self, files, tmp_path):
        root, good, _ = files
        rows = [({"prompt": r["prompt"], "images": r.get("images", [])}, images) for r, images in good]
        result, _ = run("--manifest", write_jsonl(root, "predict.jsonl", rows), "--output_dir", tmp_path,
                        "--with_labels", "false", "--prefix", "test")
        written = [json.loads(s["json"]) for s in read_back(result["shards"])]
        assert written == [{"prompt": r["prompt"]} for r, _ in rows]


class TestDeterminism:
    def test_the_same_manifest_twice_gives_identical_bytes_for_any_number_of_workers(self, files, tmp_path):
        root, good, bad = files
        manifest = write_jsonl(root, "all.jsonl", good, bad)
        outputs = []
        for name, workers in (("a", "1"), ("b", "3"), ("c", "3")):
            result, _ = run("--manifest", manifest, "--output_dir", tmp_path / name, "--num_workers", workers,
                            "--samples_per_shard", "2", "--shuffle_seed", "7", "--num_types", "3")
            outputs.append([open(p, "rb").read() for p in result["shards"]])
        assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 2

    def test_shuffle_seed_permutes_the_rows_deterministically(self, files, tmp_path):
        root, good, bad = files
        manifest = write_jsonl(root, "all.jsonl", good, bad)
        rows = len(good) + len(bad)
        for seed in (3, 4):
            result, out = run("--manifest", manifest, "--output_dir", tmp_path / str(seed), "--shuffle_seed", seed,
                              "--num_types", 3)
            order = list(range(rows))
            random.Random(seed).shuffle(order)
            keys = [GOOD_KEYS[i] for i in order if i < len(good)]
            assert [s["__key__"] for s in read_back(result["shards"])] == keys and keys != GOOD_KEYS
            assert f"rows shuffled with seed {seed}" in out
            plain, _ = run("--manifest", manifest, "--output_dir", tmp_path / f"plain{seed}", "--num_types", 3)
            assert sorted(stable(result["bad"])) == sorted(stable(plain["bad"]))


class TestShardLimits:
    def test_samples_per_shard_and_max_shard_bytes(self, files, tmp_path):
        from data import samples_per_shard

        root, good, _ = files
        big = save(root / "photos/noise.png", Image.effect_noise((128, 128), 60).convert("RGB"), "PNG")
        again = [({k: v for k, v in r.items() if k != "key"}, images) for r, images in good]
        rows = good + [({"prompt": "Big.", "score": 1.0, "type": 0, "images": ["photos/noise.png"]}, [("png", big)])]
        manifest = write_jsonl(root, "big.jsonl", rows + again)
        result, _ = run("--manifest", manifest, "--output_dir", tmp_path / "n", "--samples_per_shard", "4")
        assert samples_per_shard(result["shards"]) == [4, 4, 1]
        limit = 20480
        assert len(big) > limit
        result, _ = run("--manifest", manifest, "--output_dir", tmp_path / "b", "--max_shard_bytes", limit)
        counts = samples_per_shard(result["shards"])
        sizes = [os.path.getsize(p) for p in result["shards"]]
        assert counts == [4, 1, 4] and sizes[0] <= limit and sizes[2] <= limit and sizes[1] > limit
        keys = GOOD_KEYS + [f"{i:06d}" for i in range(4, 9)]
        assert read_back(result["shards"]) == expected_samples(rows + again, keys)


class TestRefusals:
    def test_on_bad_row_error_exits_2_at_the_first_bad_row_and_leaves_no_shard(self, files, tmp_path, capsys):
        root, good, bad = files
        manifest = write_jsonl(root, "all.jsonl", good, bad)
        line = exit_2_line(capsys, make_shards.main, ["--manifest", str(manifest), "--output_dir", str(tmp_path),
                                                      "--on_bad_row", "error", "--samples_per_shard", "1",
                                                      "--disable_tqdm", "true"])
        assert line == f"error: {manifest}: line 6: {bad[0][1]}"
        assert os.listdir(tmp_path) == []

    def test_existing_shards_need_overwrite_which_removes_all_of_them(self, files, tmp_path, capsys):
        root, good, _ = files
        manifest = write_jsonl(root, "good.jsonl", good)
        (tmp_path / "train-000007.tar").write_bytes(b"an older run")
        (tmp_path / "val-000000.tar").write_bytes(b"another set")
        args = ["--manifest", str(manifest), "--output_dir", str(tmp_path), "--disable_tqdm", "true"]
        assert exit_2_line(capsys, make_shards.main, args) == (
            f"error: {tmp_path} already holds 1 shard(s) named train-*.tar (train-000007.tar, ...); pass --overwrite "
            f"to replace them, or another --prefix")
        config = tmp_path / "shards.yaml"  # a config file in place of the flags, as every script takes
        config.write_text(f"manifest: {manifest}\noutput_dir: {tmp_path}\noverwrite: true\ndisable_tqdm: true\n")
        with contextlib.redirect_stdout(io.StringIO()):
            make_shards.main([str(config)])
        assert sorted(os.listdir(tmp_path)) == ["shards.yaml", "train-000000.tar", "val-000000.tar"]

    @pytest.mark.parametrize("flags, message", [
        (["--prefix", "a.b"], "--prefix 'a.b': use a plain name (no dots, slashes, braces, commas or glob characters)"),
        (["--samples_per_shard", "0"], "--samples_per_shard must be positive"),
        (["--manifest", "nope.jsonl"], "nope.jsonl: no such manifest file"),
        (["--image_root", "nowhere"], "--image_root nowhere: no such folder"),
    ])
    def test_bad_flags(self, files, tmp_path, capsys, flags, message):
        root, good, _ = files
        args = ["--manifest", str(write_jsonl(root, "good.jsonl", good)), "--output_dir", str(tmp_path), *flags]
        assert exit_2_line(capsys, make_shards.main, args) == f"error: {message}"

    def test_an_output_dir_that_is_a_file(self, files, tmp_path, capsys):
        root, good, _ = files
        (tmp_path / "taken").write_text("")
        args = ["--manifest", str(write_jsonl(root, "good.jsonl", good)), "--output_dir", str(tmp_path / "taken")]
        assert exit_2_line(capsys, make_shards.main, args) == f"error: {tmp_path / 'taken'}: File exists"

    def test_a_manifest_without_a_good_row(self, files, tmp_path, capsys):
        root, _, bad = files
        manifest = write_jsonl(root, "bad.jsonl", [], bad[:2])
        assert exit_2_line(capsys, make_shards.main, ["--manifest", str(manifest), "--output_dir", str(tmp_path),
                                                      "--disable_tqdm", "true"]) == (
            f"error: {manifest}: no good row, no shard written")


class TestTraining:
    def test_token_stats_and_training_read_the_shards_alike_and_train_on_them(self, files, scorer_demo, vl_processor,
                                                                               tmp_path, monkeypatch):
        import token_stats
        import train_scorer
        from collate import VLEncoder
        from data import shard_samples

        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # no fork of the test process
        root, good, bad = files
        result, out = run("--manifest", write_jsonl(root, "all.jsonl", good, bad), "--output_dir", tmp_path / "s",
                          "--num_types", "3", *PIXELS)
        pattern = re.match(r"--train_shards '(.*)'  #", out.splitlines()[-1]).group(1)
        with contextlib.redirect_stdout(io.StringIO()):
            token_stats.main(["--shards", pattern, "--processor", scorer_demo[0], "--num_types", "3", *PIXELS,
                              "--output", str(tmp_path / "lengths.jsonl")])
        measured = {r["key"]: r["total"] for r in read_jsonl(tmp_path / "lengths.jsonl")}
        encoder = VLEncoder(vl_processor, {"type": 3}, True, 1024, 4096, 8192)
        encoded = {s["__key__"]: encoder(s)["input_ids"].shape[-1] for p in result["shards"] for s in shard_samples(p)}
        assert measured == encoded and list(encoded) == GOOD_KEYS
        one_step = ["--max_steps", "1", "--warmup_steps", "0"]  # (a warmup of the one step divides by zero)
        trainer = train_scorer.main(scorer_args(scorer_demo, tmp_path / "out", *one_step, train=pattern))
        assert trainer.state.global_step == 1 and trainer.metrics["train_bad_samples"] == 0
