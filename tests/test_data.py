"""data.py: SFT files and their error lines, shard lists, the tar reader, the rank x worker split, sample counting."""

import json
import random
import re

import pytest
import torch

import demo
from collate import DataError
from data import (BadSample, ShardStream, count_samples, expand_shards, load_sft_file, record_location,
                  samples_per_shard, sft_sources, shard_samples)

pytestmark = pytest.mark.usefixtures("one_thread")


def serve_hub_dataset(monkeypatch, tmp_path, repo_id, configs):
    """Answer `datasets.load_dataset(repo_id, name=, split=)` offline from a local dataset repository of a hub repo's
    layout (README configs, {config: {split: records}}), with a cache of its own: datasets keys the cache of a local
    repository by folder name and config, so another test's repository could answer. Returns the calls seen."""
    import datasets

    repo, calls, load_dataset = tmp_path / "hub-repo", [], datasets.load_dataset
    card = "---\nconfigs:\n"
    for config, splits in configs.items():
        card += f"- config_name: {config}\n  data_files:\n"
        for split, records in splits.items():
            demo.write_jsonl(repo / config / f"{split}.jsonl", records)
            card += f"  - split: {split}\n    path: {config}/{split}.jsonl\n"
    (repo / "README.md").write_text(card + "---\n")

    def load(path, *args, **kwargs):
        calls.append((path, kwargs))
        if path != repo_id:
            return load_dataset(path, *args, **kwargs)
        return load_dataset(str(repo), *args, **kwargs, cache_dir=str(tmp_path / "hub-cache"))

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


class TestSFTFiles:
    @pytest.mark.parametrize("name, text, message", [
        ("malformed.jsonl", '{"query": "q", "answer": "a"}\n{"query": "q", "answer": \n', "line 2: malformed JSON"),
        ("array.json", '[{"query": "q", "answer": "a"},\n 7]', "record 2: expected a JSON object, got int"),
        ("mixed.jsonl", '{"query": "q", "answer": "a"}\n\n{"query": 5, "answer": "a"}\n',
         "line 3: expected a JSON object"),  # Arrow cannot type the column; the checker names the line
        ("empty.jsonl", "", "empty file"),
        ("notes.txt", "hello", "unknown data format '.txt'"),
    ])
    def test_errors_name_the_file_and_line(self, tmp_path, name, text, message):
        path = tmp_path / name
        path.write_text(text)

        def check(record):  # the scripts pass collate.to_messages; here a checker that rejects non-string queries
            if not isinstance(record, dict) or not isinstance(record.get("query"), str):
                raise DataError("expected a JSON object with a string 'query'" if isinstance(record, dict)
                                else f"expected a JSON object, got {type(record).__name__}")

        with pytest.raises(DataError, match=f"{path}: {message}"):
            load_sft_file(path, check if name == "mixed.jsonl" else None)

    def test_missing_path(self, tmp_path):
        with pytest.raises(DataError, match="nowhere.jsonl: no such file or folder"):
            load_sft_file(tmp_path / "nowhere.jsonl")

    def test_formats_read_alike(self, tmp_path):
        import datasets

        records = [{"query": f"q{i}", "answer": f"a{i}"} for i in range(3)]
        paths = [demo.write_jsonl(tmp_path / "r.jsonl", records)]
        (tmp_path / "r.json").write_text(json.dumps(records))
        paths.append(str(tmp_path / "r.json"))
        datasets.Dataset.from_list(records).to_parquet(tmp_path / "r.parquet")
        datasets.Dataset.from_list(records).save_to_disk(tmp_path / "saved")
        paths += [str(tmp_path / "r.parquet"), str(tmp_path / "saved")]
        for path in paths:
            assert load_sft_file(path).to_list() == records, path

    def test_record_location_counts_non_blank_lines(self, tmp_path):
        path = tmp_path / "gaps.jsonl"
        path.write_text('{"a": 1}\n\n\n{"a": 2}\n{"a": 3}\n')
        assert [record_location(path, i) for i in range(3)] == [f"{path}: line 1", f"{path}: line 4",
                                                                 f"{path}: line 5"]
        assert record_location(tmp_path / "x.parquet", 4) == f"{tmp_path / 'x.parquet'}: record 5"

    def test_folder_reads_its_data_files_in_path_order(self, tmp_path):
        """JSON Lines, CSV and Parquet of different layouts in one folder and a subfolder; a README, a hidden file
        and other extensions are skipped. Each file is a source of its own; read as one, the columns join."""
        import datasets

        folder = tmp_path / "mixed"
        (folder / "sub").mkdir(parents=True)
        sharegpt = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
                    for i in range(2)]
        demo.write_jsonl(folder / "a.jsonl", sharegpt)
        (folder / "a.jsonl").write_text((folder / "a.jsonl").read_text().replace("\n", "\n\n", 1))  # a blank line
        (folder / "b.csv").write_text("query,answer\nq,a\n")
        datasets.Dataset.from_list([{"instruction": "i", "input": "", "output": "o"}]).to_parquet(
            folder / "sub" / "c.parquet")
        for name in ("README.md", ".hidden.jsonl", "notes.txt"):
            (folder / name).write_text("not data")
        files = [str(folder / "a.jsonl"), str(folder / "b.csv"), str(folder / "sub" / "c.parquet")]
        assert sft_sources([str(folder), str(tmp_path / "x.jsonl"), "org/name"]) == files + [
            str(tmp_path / "x.jsonl"), "org/name"]
        empty = {"conversations": None, "query": None, "answer": None, "instruction": None, "input": None,
                 "output": None}
        assert load_sft_file(folder).to_list() == [
            {**empty, "conversations": sharegpt[0]["conversations"]},
            {**empty, "conversations": sharegpt[1]["conversations"]},
            {**empty, "query": "q", "answer": "a"}, {**empty, "instruction": "i", "input": "", "output": "o"}]
        assert [record_location(folder, i) for i in range(4)] == [f"{files[0]}: line 1", f"{files[0]}: line 3",
                                                                  f"{files[1]}: record 1", f"{files[2]}: record 1"]

    def test_folder_errors(self, tmp_path):
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "README.md").write_text("# no data here")
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'docs'}: no data files (.jsonl, .json, .parquet, "
                                                      f".csv) in this folder")):
            load_sft_file(tmp_path / "docs")
        clash = tmp_path / "clash"
        clash.mkdir()
        demo.write_jsonl(clash / "1.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]}])
        demo.write_jsonl(clash / "2.jsonl", [{"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                                                           {"role": "assistant", "content": "a"}]}])
        with pytest.raises(DataError, match=re.escape(f"{clash}: {clash / '2.jsonl'} holds column 'messages' in "
                                                      f"another type than the files before it")):
            load_sft_file(clash)

    def test_hub_id_split_and_config(self, tmp_path, monkeypatch):
        """A missing path that can name a hub dataset is read by datasets.load_dataset with the config and split.
        Offline: the id is answered from a local dataset repository (the layout of a hub repo, two configs)."""
        calls = serve_hub_dataset(monkeypatch, tmp_path, "org/sft-data", {
            config: {split: [{"query": f"{config} {split} {i}", "answer": "a"} for i in range(2)]
                     for split in ("train", "test")} for config in ("chat", "plain")})
        ds = load_sft_file("org/sft-data", split="test", config="plain")
        assert ds.to_list() == [{"query": f"plain test {i}", "answer": "a"} for i in range(2)]
        assert calls[0] == ("org/sft-data", {"name": "plain", "split": "test"})
        assert record_location("org/sft-data", 1) == "org/sft-data: record 2"

    def test_missing_path_or_unknown_hub_id(self, tmp_path, monkeypatch):
        import datasets

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        with pytest.raises(DataError, match=re.escape(f"{tmp_path}/data/train.parquet: no such file or folder")):
            load_sft_file(f"{tmp_path}/data/train.parquet")  # not a hub id: the hub is not asked
        with pytest.raises(DataError, match=re.escape("nobody/no-such-data: no such file or folder, and not a "
                                                      "dataset the hub gives (Couldn't reach 'nobody/no-such-data' "
                                                      "on the Hub (OfflineModeIsEnabled))")):
            load_sft_file("nobody/no-such-data")


class TestShardLists:
    def test_patterns_globs_and_lists(self, tmp_path):
        paths = [demo.write_shard(tmp_path / f"a-{i:06d}.tar", []) for i in range(3)]
        other = demo.write_shard(tmp_path / "b.tar", [])
        assert expand_shards(f"{tmp_path}/a-{{000000..000002}}.tar") == paths
        assert expand_shards(f"{tmp_path}/a-*.tar") == paths
        # a comma list whose items contain braces with commas, a glob repeating a brace item (kept once), a URL
        spec = f"{tmp_path}/b.tar, {tmp_path}/a-{{000001,000002}}.tar,{tmp_path}/a-00000[0-9].tar,pipe:cat x.tar"
        assert expand_shards(spec, allow_pipe=True) == [other, paths[1], paths[2], paths[0], "pipe:cat x.tar"]
        assert expand_shards("https://host/a.tar,s3://bucket/b.tar") == ["https://host/a.tar", "s3://bucket/b.tar"]
        with pytest.raises(DataError, match="pipe:cat x.tar: a pipe: shard runs a shell command; pass "
                                            "--allow_pipe_shards if you wrote it"):
            expand_shards(spec)  # a shard list from someone else must not run commands unasked

    @pytest.mark.parametrize("spec, message", [
        ("", "empty shard list"), (" , ", "empty shard list"),
        ("{d}/nothing-*.tar", "nothing-*.tar: pattern matches no file"),
        ("{d}/a-{{000000..000003}}.tar", "a-000003.tar: no such shard file"),
    ])
    def test_errors(self, tmp_path, spec, message):
        for i in range(3):
            demo.write_shard(tmp_path / f"a-{i:06d}.tar", [])
        with pytest.raises(DataError, match=message.replace("*", r"\*").replace(".", r"\.")):
            expand_shards(spec.format(d=tmp_path))


class TestTarReader:
    def test_samples_in_order_with_their_members(self, tmp_path):
        samples = [demo.vl_sample(f"s{i}", {"prompt": str(i)}, [("png", b"x" * i)] * i) for i in range(3)]
        path = demo.write_shard(tmp_path / "s.tar", samples)
        read = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in shard_samples(path)]
        assert read == samples
        assert count_samples([path, path]) == 6
        assert count_samples([path, path], most_images=True) == (6, 2)  # s2 has two images

    def test_unreadable_shard(self, tmp_path):
        broken = tmp_path / "broken.tar"
        broken.write_bytes(b"this is not a tar file at all" * 40)
        with pytest.raises(DataError, match="broken.tar: cannot read as a tar shard"):
            list(shard_samples(str(broken)))
        with pytest.raises(DataError, match="broken.tar: cannot read as a tar shard"):
            count_samples([str(broken)])

    def test_wanted_samples_are_webdatasets_own_and_the_others_none(self, tmp_path):
        """With `wanted`, a local shard is read by seeking over its members, yet gives exactly what webdataset's
        streaming reader gives (members it skips, keys in folders, upper-case extensions); a gzipped shard, which
        cannot seek, is streamed as before."""
        import gzip
        import io
        import tarfile

        from webdataset.tariterators import tarfile_samples

        path = tmp_path / "mixed.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in [("folder/", None), ("__meta__", b"m"), ("a.json", b"{}"), ("a.0.JPG", b"j" * 3000),
                               ("in/b.json", b"b"), ("in/b.1.png", b"p" * 700), ("noext", b"n"), ("c.json", b"c"),
                               ("__x__/y.json", b"q"), ("d.json", b"d" * 10000), ("d.0.webp", b"w"), ("e.json", b"e")]:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                else:
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if data else None)
        zipped = tmp_path / "mixed.tar.gz"
        zipped.write_bytes(gzip.compress(path.read_bytes()))
        for shard in (str(path), str(zipped)):
            reference = list(tarfile_samples([{"url": shard}]))
            assert [s["__key__"] for s in reference] == ["a", "in/b", "c", "d", "e"]
            assert list(shard_samples(shard)) == reference
            assert list(shard_samples(shard, lambda i: True)) == reference
            assert list(shard_samples(shard, lambda i: i % 2 == 1)) == [None, reference[1], None, reference[3], None]

    def test_a_slot_reads_only_its_share_of_a_shard(self, tmp_path):
        """One shard over 4 ranks (dealt by sample): each rank reads its own 4 samples' bytes and the tar headers,
        not the 16 samples' 2 MiB."""
        samples = [{"__key__": f"s{i:02d}", "json": b"{}", "bin": bytes([i]) * 2**17} for i in range(16)]
        path = demo.write_shard(tmp_path / "big.tar", samples)

        def bytes_read():  # every read(2) of this process
            with open("/proc/self/io") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

        run_rank(ShardStream([path], KeyOnly(), 2, 0, rank=0, world_size=4), 0)  # imports read files too
        for rank in range(4):
            before = bytes_read()
            keys, _, _ = run_rank(ShardStream([path], KeyOnly(), 2, 0, rank=rank, world_size=4), 0)
            read = bytes_read() - before
            assert keys == [f"s{i:02d}" for i in range(rank, 16, 4)]
            assert 4 * 2**17 < read < 5 * 2**17, read  # its 4 samples' 512 KiB, and the headers

    def test_count_needs_local_files(self):
        with pytest.raises(DataError, match="pass --epoch_samples"):
            count_samples(["pipe:cat x.tar"])

    def test_a_shard_is_counted_once_until_it_changes(self, tmp_path, monkeypatch):
        """The run start, the feature-cache build and each evaluation's progress bar ask for the same counts: the
        headers are read once, and again only once the shard was rewritten."""
        import tarfile

        opened, open_tar = [], tarfile.open

        def reading(name, mode="r", *args, **kwargs):  # the shard readers' opens; writing one is not counted
            if mode.startswith("r"):
                opened.append(str(name))
            return open_tar(name, mode, *args, **kwargs)

        monkeypatch.setattr(tarfile, "open", reading)
        paths, _ = key_shards(tmp_path, [3, 5])
        assert count_samples(paths) == 8 and samples_per_shard(paths) == [3, 5] and count_samples(paths[1:]) == 5
        assert opened == paths
        demo.write_shard(paths[0], [{"__key__": f"n{i}", "json": b"{}"} for i in range(4)])  # another size
        assert samples_per_shard(paths) == [4, 5] and opened == paths + paths[:1]


# --- splitting shards over ranks and workers ------------------------------------------------------------------------

class KeyOnly:
    """An encoder without images or a processor: the split logic is what is under test here."""

    def __init__(self):
        self.encoded = []  # keys, in the process that encodes

    def __call__(self, sample):
        self.encoded.append(sample["__key__"])
        if sample["__key__"].endswith("bad"):
            raise DataError("bad on purpose")
        return {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]]),
                "key": sample["__key__"]}

    @staticmethod
    def length(sample):  # something to bucket by
        return sum(map(ord, sample["__key__"])) % 7


class OfLength:
    """An encoder whose sample `s..n<N>` has N tokens (json {"n": N}): what bucketing sorts by, without a processor."""

    def __call__(self, sample):
        if sample["__key__"].endswith("bad"):
            raise DataError("bad on purpose")
        n = self.length(sample)
        return {"input_ids": torch.ones(1, n, dtype=torch.long), "attention_mask": torch.ones(1, n, dtype=torch.long),
                "key": sample["__key__"]}

    def length(self, sample):
        return json.loads(sample["json"])["n"]


def key_shards(root, sizes, bad=()):
    """Shards of json-only samples named by shard and index; returns (paths, keys in shard order)."""
    paths, keys = [], []
    for s, size in enumerate(sizes):
        names = [f"s{s}i{i}" + ("bad" if (s, i) in bad else "") for i in range(size)]
        paths.append(demo.write_shard(root / f"k-{s:06d}.tar", [{"__key__": k, "json": b"{}"} for k in names]))
        keys += names
    return paths, keys


class LoaderArgs:  # the DataLoader settings make_loader reads from TrainingArguments
    dataloader_pin_memory, dataloader_prefetch_factor, dataloader_multiprocessing_context = False, None, None

    def __init__(self, workers):
        self.dataloader_num_workers = workers


def run_rank(stream, workers):
    from data import make_loader

    keys, bad, batches = [], [], []
    for batch in make_loader(stream, LoaderArgs(workers)):
        keys += batch.get("keys", [])
        bad += batch["bad_samples"]
        batches.append(len(batch.get("keys", [])))
    return keys, bad, batches


class TestShardStream:
    @pytest.mark.parametrize("sizes, world, workers", [
        ([7], 2, 0),  # one shard, two ranks
        ([5, 1, 9], 2, 0),  # uneven shards
        ([4, 3], 4, 0),  # more ranks than shards
        ([5, 1, 9], 2, 2),  # 4 slots > 3 shards: split by sample, in worker processes
        ([3, 3, 2, 6, 1], 2, 2),  # 4 slots <= 5 shards: split by shard, one slot gets two
    ])
    def test_exact_stream_reads_every_sample_once(self, tmp_path, sizes, world, workers):
        paths, keys = key_shards(tmp_path, sizes, bad={(0, 1)})
        seen, bad = [], []
        for rank in range(world):
            stream = ShardStream(paths, KeyOnly(), 2, 0, rank=rank, world_size=world)
            k, b, _ = run_rank(stream, workers)
            seen += k
            bad += b
            # what a progress bar counts on: the rank's share, known from the headers before reading
            assert stream.share(samples_per_shard(paths), max(1, workers)) == len(k) + len(b)
        good = [k for k in keys if not k.endswith("bad")]
        assert sorted(seen) == sorted(good) and len(seen) == len(good)
        assert bad == [BadSample(paths[0], "s0i1bad", "bad on purpose")]
        assert str(bad[0]) == f"{paths[0]}: s0i1bad: bad on purpose"

    def test_training_stream_gives_every_rank_the_same_full_batches(self, tmp_path):
        paths, keys = key_shards(tmp_path, [9, 2, 5])
        per_rank = []
        for rank in range(2):
            stream = ShardStream(paths, KeyOnly(), 3, 0, rank=rank, world_size=2, batches_per_epoch=5,
                                 shuffle_buffer=4)
            assert len(stream) == 5
            k, _, batches = run_rank(stream, 2)
            assert batches == [3] * 5  # rank 1 holds 2 samples on its shard but still makes 5 full batches
            assert run_rank(stream, 2)[0] == k  # the same epoch replays the same stream (resume skips batches of it)
            stream.set_epoch(1)
            assert run_rank(stream, 2)[0] != k  # a new epoch reshuffles
            per_rank.append(set(k))
        assert per_rank[0].isdisjoint(per_rank[1])  # within an epoch the ranks read different shards
        assert per_rank[0] | per_rank[1] <= set(keys)

    def test_more_workers_than_batches(self, tmp_path):
        paths, _ = key_shards(tmp_path, [4, 4, 4, 4])
        assert run_rank(ShardStream(paths, KeyOnly(), 2, 0, batches_per_epoch=1), 2)[2] == [2]

    def test_training_stream_without_usable_samples_is_fatal(self, tmp_path):
        paths, _ = key_shards(tmp_path, [2], bad={(0, 0), (0, 1)})
        _, bad, batches = run_rank(ShardStream(paths, KeyOnly(), 2, 0, batches_per_epoch=3), 0)
        assert [b.fatal for b in bad] == [False, False, True, True, True]  # the two bad samples, then the verdict
        assert "no usable sample for rank 0" in bad[-1].problem
        assert batches == [0, 0, 0]  # still as many batches as the other ranks make: they stop together

    def test_unreadable_shard_is_fatal(self, tmp_path):
        broken = tmp_path / "broken.tar"
        broken.write_bytes(b"this is not a tar file at all" * 40)
        _, bad, _ = run_rank(ShardStream([str(broken)], KeyOnly(), 2, 0), 0)
        assert bad[-1].fatal and "broken.tar: cannot read as a tar shard" in str(bad[-1])


class TestResume:
    @pytest.mark.parametrize("sizes, workers", [
        ([13, 11], 0),  # 2 shards over 2 ranks: by shard, in process (encoder calls visible)
        ([30], 2),  # 1 shard over 2 ranks x 2 workers: dealt by sample
        ([9, 8, 7, 6, 5], 2),  # 5 shards over 4 slots: by shard, one slot gets two
    ])
    def test_a_resumed_epoch_continues_with_its_own_batches_without_encoding_the_earlier_ones(self, tmp_path, sizes,
                                                                                              workers):
        """resume_at(K, bad positions of batches < K): batches K.. of an uninterrupted epoch (bucketed, with bad
        samples, wrapping around the rank's share, batch j from worker j % 2), and no sample of a batch before K
        encoded; the next epoch starts at its first batch."""
        paths, _ = key_shards(tmp_path, sizes, bad={(0, 2), (0, 5), (0, 6), (1, 3), (2, 1), (3, 4), (4, 2)})

        def stream():
            return ShardStream(paths, KeyOnly(), 3, 0, rank=1, world_size=2, batches_per_epoch=9, shuffle_buffer=6,
                               seed=5, length_of=KeyOnly.length)

        def batches(s):
            from data import make_loader

            return [(b["keys"], b["bad_samples"]) for b in make_loader(s, LoaderArgs(workers))]

        whole = batches(stream())
        assert len(whole) == 9 and sum(len(bad) for _, bad in whole) >= 2
        for start in (1, 4, 7) if workers == 0 else (5,):  # an odd start: worker 0 takes over worker 1's share
            resumed = stream()
            resumed.resume_at(start, {(b.shard, b.index) for _, bad in whole[:start] for b in bad})
            assert batches(resumed) == whole[start:], start
            if workers == 0:
                assert sorted(resumed.encoder.encoded) == sorted(
                    [k for keys, _ in whole[start:] for k in keys] + [b.key for _, bad in whole[start:] for b in bad])
                resumed.set_epoch(1)
                again = stream()
                again.set_epoch(1)
                assert batches(resumed) == batches(again)


    def test_an_unreadable_shard_met_while_counting_out_is_still_the_one_error(self, tmp_path):
        paths, _ = key_shards(tmp_path, [6])
        with open(paths[0], "r+b") as f:
            f.truncate(2 * 1024 + 600)  # samples 0 and 1 (a 512-byte header and a 512-byte block each), then a cut
        stream = ShardStream(paths, KeyOnly(), 3, 0, batches_per_epoch=3)
        stream.resume_at(1, ())
        keys, bad, batches = run_rank(stream, 0)
        assert keys == [] and stream.encoder.encoded == [] and [b.fatal for b in bad] == [True, True]
        assert "cannot read as a tar shard" in str(bad[0]) and bad[1] == bad[0]
        assert batches == [0, 0]  # the resumed epoch's batches 1 and 2: the error, then the same again


class TestBuckets:
    LENGTHS = [37, 3, 21, 50, 8, 44, 15, 29, 2, 33, 11, 47, 26, 6, 40, 18, 31, 9, 24, 45, 13, 36, 5, 28]

    def stream(self, tmp_path, bucketed, batches=6, buffer=24):
        samples = [{"__key__": f"s{i:02d}", "json": json.dumps({"n": n}).encode()} for i, n in enumerate(self.LENGTHS)]
        path = demo.write_shard(tmp_path / "lengths.tar", samples)
        encoder = OfLength()
        return ShardStream([path], encoder, 4, 0, batches_per_epoch=batches, shuffle_buffer=buffer, seed=3,
                           length_of=encoder.length if bucketed else None)

    @staticmethod
    def batches(stream):
        from data import make_loader

        return [(b["keys"], b["attention_mask"].sum(1).tolist(), b.get("lengths"), b["attention_mask"].numel())
                for b in make_loader(stream, LoaderArgs(0))]

    def test_batches_of_neighbours_in_length_from_each_buffer_in_random_order(self, tmp_path):
        plain, bucketed = self.batches(self.stream(tmp_path, False)), self.batches(self.stream(tmp_path, True))
        assert len(plain) == len(bucketed) == 6 and all(len(keys) == 4 for keys, *_ in bucketed)
        # one pass of 24 samples: the same samples, each once, only grouped differently
        assert sorted(k for keys, *_ in bucketed for k in keys) == sorted(k for keys, *_ in plain for k in keys)
        for keys, real, lengths, _ in bucketed:
            assert lengths == real  # the lengths the stream sorted by are the encoded ones
        # the buffer held the whole pass: its samples sorted by length, cut into 6 batches, in random order
        assert sorted(n for _, real, *_ in bucketed for n in sorted(real)) == sorted(self.LENGTHS)
        ranges = [(min(real), max(real)) for _, real, *_ in bucketed]
        assert all(a[1] < b[0] for a, b in zip(sorted(ranges), sorted(ranges)[1:])), ranges  # no overlap
        assert ranges != sorted(ranges) and ranges != sorted(ranges, reverse=True), ranges
        padding = {name: sum(size - sum(real) for _, real, _, size in runs) / sum(size for *_, size in runs)
                   for name, runs in (("plain", plain), ("bucketed", bucketed))}
        assert padding["bucketed"] < padding["plain"] / 3, padding
        assert [b[0] for b in self.batches(self.stream(tmp_path, True))] == [b[0] for b in bucketed]  # replayable

    def test_buffer_of_one_batch_changes_nothing_but_order_within_batches(self, tmp_path):
        plain, bucketed = self.batches(self.stream(tmp_path, False, buffer=4)), \
            self.batches(self.stream(tmp_path, True, buffer=4))
        assert [sorted(b[0]) for b in plain] == [sorted(b[0]) for b in bucketed]


class TestBucketsAcrossRanks:
    """A step waits for its longest batch on any rank: bucketed, the ranks' batches of one step share a length band."""

    @staticmethod
    def length_shards(root, lengths_per_shard, bad=()):
        """Shards of samples with the given lengths; (shard, index) in `bad`: a bad sample (its length still read)."""
        encoder = OfLength()
        paths = [demo.write_shard(root / f"n-{s:06d}.tar",
                                  [{"__key__": f"s{s}i{i}" + ("bad" if (s, i) in bad else ""),
                                    "json": json.dumps({"n": n}).encode()} for i, n in enumerate(lengths)])
                 for s, lengths in enumerate(lengths_per_shard)]
        return paths, encoder

    @staticmethod
    def epoch(paths, encoder, world, workers, bucketed, batches, buffer, epoch=0):
        """Each rank's batches (their lengths) over one epoch, ranks simulated in this process."""
        from data import make_loader

        per_rank = []
        for rank in range(world):
            stream = ShardStream(paths, encoder, 4, 0, rank=rank, world_size=world, batches_per_epoch=batches,
                                 shuffle_buffer=buffer, seed=5, length_of=encoder.length if bucketed else None)
            stream.set_epoch(epoch)
            per_rank.append([b["attention_mask"].sum(1).tolist() for b in make_loader(stream, LoaderArgs(workers))
                             if "attention_mask" in b])
        return per_rank

    def test_every_rank_draws_each_step_from_the_same_band(self, tmp_path):
        # 16 shards, 2 per rank: each holds one sample of every band 0-70 (tens) plus a shard's own units
        paths, encoder = self.length_shards(tmp_path, [[10 * b + s % 7 for b in (3, 0, 6, 1, 7, 4, 2, 5)]
                                                       for s in range(16)])
        runs = {epoch: self.epoch(paths, encoder, 8, 0, True, 8, 16, epoch) for epoch in (0, 1)}
        for epoch, per_rank in runs.items():
            assert [len(batches) for batches in per_rank] == [8] * 8  # every rank the same number of steps
            for step in zip(*per_rank):  # each rank's 16 samples make 4 batches of two neighbouring bands per pass
                assert len({tuple(sorted(n // 10 for n in batch)) for batch in step}) == 1, step
        bands = {epoch: [sorted(n // 10 for n in batch) for batch in per_rank[0]] for epoch, per_rank in runs.items()}
        assert bands == {0: [[6, 6, 7, 7], [4, 4, 5, 5], [2, 2, 3, 3], [0, 0, 1, 1],
                             [6, 6, 7, 7], [2, 2, 3, 3], [0, 0, 1, 1], [4, 4, 5, 5]],
                         1: [[2, 2, 3, 3], [6, 6, 7, 7], [4, 4, 5, 5], [0, 0, 1, 1],
                             [0, 0, 1, 1], [4, 4, 5, 5], [6, 6, 7, 7], [2, 2, 3, 3]]}  # a new order each epoch
        assert self.epoch(paths, encoder, 8, 0, True, 8, 16, 0) == runs[0]  # replayed exactly (a resumed run)

    @pytest.mark.parametrize("bad, tokens", [
        (0, {False: 18504, True: 12508}),
        # 5% bad samples: a batch that loses one takes another of its band (15,104 tokens if it took the next
        # band's first, shifting the slot's later batches)
        (0.05, {False: 18412, True: 12640}),
    ])
    def test_steps_wait_for_fewer_tokens_than_with_random_batches(self, tmp_path, bad, tokens):
        # uneven shards of random lengths: passes end at different steps on different ranks, some mid-batch; each
        # rank's 2 workers make every other batch (the bands are drawn per worker index)
        rng = random.Random(0)
        shards = [[rng.randint(1, 100) for _ in range(rng.randint(40, 90))] for _ in range(8)]
        paths, encoder = self.length_shards(tmp_path, shards, {(s, i) for s, lengths in enumerate(shards)
                                                                for i in range(len(lengths)) if rng.random() < bad})
        runs = {bucketed: self.epoch(paths, encoder, 4, 2, bucketed, 50, 32) for bucketed in (False, True)}
        assert all(len(batches) == 50 for per_rank in runs.values() for batches in per_rank)
        # each step costs its largest padded batch on any rank: ~1.47x fewer tokens than random batches (1.10x and
        # 1.07x when each rank bucketed on its own)
        step_max = {bucketed: sum(max(max(b) * len(b) for b in step) for step in zip(*per_rank))
                    for bucketed, per_rank in runs.items()}
        assert step_max == tokens


@pytest.mark.parametrize("given, start", [(None, "forkserver"), ("fork", "fork"), ("spawn", "spawn")])
def test_workers_start_from_a_fork_server_unless_told(tmp_path, given, start):
    """DataLoader workers are not forks of the training process (its collective and tokenizer threads can leave a
    forked worker stuck), unless --dataloader_multiprocessing_context says so; a stream still reads every key once
    through them."""
    from data import ShardStream, make_loader

    paths, keys = key_shards(tmp_path, [3, 2])
    args = LoaderArgs(1)
    args.dataloader_multiprocessing_context = given
    loader = make_loader(ShardStream(paths, KeyOnly(), 2, 0), args)
    context = loader.multiprocessing_context
    assert (context if isinstance(context, str) else context.get_start_method()) == start
    assert sorted(k for batch in loader for k in batch.get("keys", [])) == sorted(keys)
