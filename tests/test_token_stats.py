"""token_stats.py: exact lengths (SFT and scorer shards), statistics vs numpy, outputs, bad input, the CLI."""

import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

import demo
import token_stats
from collate import IGNORE_INDEX, ChatFormat, encode_sft_batch, encode_sft_example, encode_vl_example
from conftest import exit_2_line, read_jsonl, run_cli
from data import load_sft_file
from test_collate import LAYOUTS

SYSTEM = "你是一个知识渊博的助手。"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, sft_demo):
    """A varied JSON Lines file: {query, answer} and {messages}, multi-turn, Chinese, own system prompts, answers
    starting with whitespace and newlines, and some long answers that a small max_len cuts."""
    records = demo.make_sft_records(150, seed=11)
    records += [
        {"query": "x", "answer": "\n\nstarts with blank lines"},
        {"query": "  indented question", "answer": "  indented answer  "},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "再说一遍"},
                      {"role": "assistant", "content": "你好。"}]},
        {"query": "long", "answer": "Prime numbers have two divisors. " * 40},
        {"query": "请介绍大海。" * 30, "answer": "好"},  # a long prompt and a one-token answer
    ]
    path = demo.write_jsonl(tmp_path_factory.mktemp("sft") / "varied.jsonl", records)
    return path, records


@pytest.fixture(autouse=True)
def one_worker_in_process(monkeypatch):
    """token_stats.main() called in this process uses one worker unless a test asks for more: its workers are forked,
    and a fork of the test process, which carries the threads of every earlier test (thread pools, allocator
    threads), can deadlock in the child. Runs with several workers go through the CLI, a fresh process, as users
    run it."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)


def run_stats(*args):
    """token_stats.main in-process, with its stdout kept out of the test log."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        report = token_stats.main(list(args))
    return report, out.getvalue()


@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_lengths_are_the_training_encoding(sft_demo, sft_data, qwen2_tokenizer, tmp_path, num_proc):
    path, records = sft_data
    out = tmp_path / "lengths.jsonl"
    args = ["--data", path, "--tokenizer", sft_demo[0], "--system_prompt", SYSTEM, "--output", str(out),
            "--num_proc", num_proc, "--batch_size", "40", "--format", "json"]
    if num_proc == "1":
        report, _ = run_stats(*args)
    else:  # forked workers: from a fresh process (see one_worker_in_process)
        res = run_cli(["python", "token_stats.py", *args])
        assert res.returncode == 0, res.stderr[-2000:]
        report = json.loads(res.stdout)
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(len(records))) and {r["file"] for r in rows} == {path}
    for record, row in zip(records, rows):
        enc = encode_sft_example(record, qwen2_tokenizer, None, fmt=ChatFormat(system_prompt=SYSTEM))
        answer = sum(x != IGNORE_INDEX for x in enc["labels"])
        assert (row["total"], row["answer"], row["prompt"]) == (len(enc["input_ids"]), answer,
                                                                len(enc["input_ids"]) - answer), record
    assert report["count"] == len(records) and report["num_proc"] == int(num_proc)
    assert report["answer_tokens"] == sum(r["answer"] for r in rows)
    assert report["prompt_tokens"] + report["answer_tokens"] == report["total_tokens"] == sum(r["total"] for r in rows)


def test_statistics_and_over_limit_counts_match_numpy(sft_demo, sft_data, qwen2_tokenizer, tmp_path):
    path, records = sft_data
    max_len, coverage = 120, 0.9
    out = tmp_path / "lengths.jsonl"
    report, _ = run_stats("--data", path, "--tokenizer", sft_demo[0], "--max_len", str(max_len), "--coverage",
                          str(coverage), "--output", str(out), "--format", "json")
    rows = read_jsonl(out)
    total = np.array([r["total"] for r in rows])
    answer = np.array([r["answer"] for r in rows])
    assert report["min"] == total.min() and report["max"] == total.max()
    assert report["mean"] == pytest.approx(total.mean()) and report["std"] == pytest.approx(total.std())
    for p in (50, 90, 95, 99, 99.9):
        assert report["percentiles"][f"p{p:g}"] == pytest.approx(np.percentile(total, p))
    assert report["answer"]["percentiles"]["p50"] == pytest.approx(np.median(answer))

    # what sft_qwen2.py would do at this max_len, from its own encoding
    truncated = encode_sft_batch(records, qwen2_tokenizer, max_len, "truncate")
    dropped = encode_sft_batch(records, qwen2_tokenizer, max_len, "drop")
    over = report["over_max_len"]
    assert 0 < over["examples"] == (total > max_len).sum() < len(records)
    assert over["truncate"]["truncated"] == sum(s == "truncated" for _, s in truncated) > 0
    assert over["truncate"]["dropped"] == sum(s == "dropped" for _, s in truncated) > 0
    kept = sum(len(e["input_ids"]) for e, _ in truncated if e is not None)
    kept_answer = sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e, _ in truncated if e is not None)
    assert over["truncate"]["tokens_lost"] == total.sum() - kept
    assert over["truncate"]["answer_tokens_lost"] == answer.sum() - kept_answer
    assert over["truncate"]["token_share_lost"] == pytest.approx((total.sum() - kept) / total.sum())
    assert over["drop"]["dropped"] == sum(e is None for e, _ in dropped)
    assert over["drop"]["tokens_lost"] == total.sum() - sum(len(e["input_ids"]) for e, _ in dropped if e is not None)
    # suggested max_len: the smallest multiple of 64 holding `coverage` of the examples whole
    suggested = next(m for m in range(64, 10 ** 6, 64) if (total <= m).mean() >= coverage)
    assert report["suggested_max_len"] == suggested


def test_suggested_max_len_edges():
    assert token_stats.suggested_max_len([64] * 10, 1.0) == 64
    assert token_stats.suggested_max_len([65] + [1] * 9, 1.0) == 128
    assert token_stats.suggested_max_len([65] + [1] * 99, 0.99) == 64
    assert token_stats.suggested_max_len([65] + [1] * 98, 0.99) == 128  # 98/99 < 0.99


# ---------------------------------------------------------------------------------------------------------------
# Scorer shards
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vl_setup(tmp_path_factory):
    """A tiny Qwen3-VL processor and two shards of samples with 0-3 images of assorted sizes, PNG and JPEG."""
    import io

    root = tmp_path_factory.mktemp("vl")
    demo.build_tiny_qwen3vl_processor(root / "processor")
    sizes = [(40, 30), (300, 200), (33, 500), (1000, 700), (64, 64), (17, 250), (640, 480), (2000, 90)]
    samples = []
    for i in range(10):
        images = []
        for j in range(i % 4):
            w, h = sizes[(i + 3 * j) % len(sizes)]
            image = Image.new("RGB", (w, h), (i * 20 % 256, j * 70, 128))
            if j % 2:  # a JPEG: raw bytes with their own extension
                buf = io.BytesIO()
                image.save(buf, format="JPEG")
                image = ("jpg", buf.getvalue())
            images.append(image)
        samples.append((f"sample{i:03d}", {"prompt": f"Rate picture set {i}. 这组图片怎么样?" * (1 + i % 3),
                                           "score": i / 10, "type": i % 2}, images))
    demo.write_shard(root / "train-000.tar", [demo.vl_sample(*s) for s in samples[:6]])
    demo.write_shard(root / "train-001.tar", [demo.vl_sample(*s) for s in samples[6:]])
    return root, samples


def processor_length(processor, prompt, images, min_pixels, max_pixels):
    """What the scorer feeds its model: train_scorer.py's own per-sample encoding (collate.encode_vl_example)."""
    import io

    pil = [Image.open(io.BytesIO(im[1])).convert("RGB") if isinstance(im, tuple) else im for im in images]
    batch = encode_vl_example(pil, prompt, processor, min_pixels, max_pixels)
    n_image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    return batch["input_ids"].shape[1], n_image_tokens


@pytest.mark.parametrize("bounds", [(None, None), (128 * 128, 256 * 256), (64 * 64, 160 * 160), (None, 200 * 200),
                                    (512 * 512, None)])
def test_vl_lengths_equal_the_processor(vl_setup, tmp_path, bounds):
    from transformers import AutoProcessor

    root, samples = vl_setup
    min_pixels, max_pixels = bounds
    out = tmp_path / "lengths.jsonl"
    args = ["--shards", str(root / "train-{000..001}.tar"), "--processor", str(root / "processor"),
            "--output", str(out), "--format", "json"]
    for flag, value in (("--min_pixels", min_pixels), ("--max_pixels", max_pixels)):
        if value is not None:
            args += [flag, str(value)]
    report, _ = run_stats(*args)
    rows = read_jsonl(out)
    processor = AutoProcessor.from_pretrained(root / "processor")
    assert [r["key"] for r in rows] == [key for key, _, _ in samples]
    for (key, record, images), row in zip(samples, rows):
        total, image_tokens = processor_length(processor, record["prompt"], images, min_pixels, max_pixels)
        assert row["total"] == total and sum(row["image_tokens"]) == image_tokens, (key, bounds)
        assert row["images"] == len(images) == len(row["image_tokens"])
    lengths = np.array([r["total"] for r in rows])
    assert report["count"] == len(samples) and report["max"] == lengths.max()
    assert report["percentiles"]["p90"] == pytest.approx(np.percentile(lengths, 90))
    assert report["images"]["total"] == sum(len(s[2]) for s in samples)
    per_image = [t for r in rows for t in r["image_tokens"]]
    assert report["image_tokens_per_image"]["max"] == max(per_image)
    assert report["image_tokens"] + report["text_tokens"] == report["total_tokens"] == lengths.sum()


def exit_2_message(capsys, *args):
    return exit_2_line(capsys, token_stats.main, args)


def write_one(path, key, record, images):
    return demo.write_shard(path, [demo.vl_sample("ok", {"prompt": "fine", "score": 1.0, "type": 0}, []),
                                   demo.vl_sample(key, record, images)])


def test_vl_bad_shards(vl_setup, tmp_path, capsys):
    from transformers import AutoProcessor

    root, _ = vl_setup
    processor = str(root / "processor")
    bad = write_one(tmp_path / "bad-000.tar", "noprompt", {"score": 1.0}, [])
    assert exit_2_message(capsys, "--shards", bad, "--processor", processor) == (
        f"error: {bad}: noprompt: json: missing field 'prompt'")
    broken = write_one(tmp_path / "img-000.tar", "s1", {"prompt": "p", "score": 1.0, "type": 0}, [("jpg", b"no")])
    assert exit_2_message(capsys, "--shards", broken, "--processor", processor).startswith(
        f"error: {broken}: s1: image .0.jpg: cannot decode")
    # an image so thin that the resize within max_pixels gives it no width: process_vision_info fails on it too
    thin = write_one(tmp_path / "thin-000.tar", "s1", {"prompt": "p", "score": 1.0, "type": 0},
                     [Image.new("RGB", (33, 500))])
    with pytest.raises(ValueError):
        processor_length(AutoProcessor.from_pretrained(processor), "p", [Image.new("RGB", (33, 500))], None, 96 * 96)
    assert exit_2_message(capsys, "--shards", thin, "--processor", processor, "--max_pixels", "9216").startswith(
        f"error: {thin}: s1: image .0.jpg (33x500) resizes to 0x352")
    assert exit_2_message(capsys, "--shards", str(tmp_path / "none-*.tar"), "--processor", processor).endswith(
        "pattern matches no file")
    not_tar = tmp_path / "junk-000.tar"
    not_tar.write_bytes(b"this is not a tar file" * 50)
    assert "junk-000.tar: cannot read as a tar shard" in exit_2_message(capsys, "--shards", str(not_tar),
                                                                        "--processor", processor)


def image_order_cases():
    """Samples training refuses for their image order (a gap in the indices, two files for one index)."""
    png = demo.encode_image(Image.new("RGB", (40, 40)), "png")
    labels = json.dumps({"prompt": "p", "score": 1.0, "type": 0}).encode()
    return {"gap": ({"__key__": "gap", "json": labels, "0.png": png, "2.png": png}, "image 1 is missing"),
            "twice": ({"__key__": "twice", "json": labels, "0.png": png, "0.jpg": png}, "two files for image 0")}


@pytest.mark.parametrize("case", ["gap", "twice"])
def test_token_stats_and_training_refuse_the_same_samples_with_the_same_line(vl_setup, scorer_demo, tmp_path,
                                                                             capsys, case):
    """One schema, one verdict, one error line: token_stats and train_scorer.py --on_bad_sample error."""
    import train_scorer

    root, _ = vl_setup
    sample, problem = image_order_cases()[case]
    shard = demo.write_shard(tmp_path / f"{case}.tar", demo.make_vl_samples(3, seed=1) + [sample])
    stats = exit_2_message(capsys, "--shards", shard, "--processor", str(root / "processor"))
    trained = exit_2_line(capsys, train_scorer.main, [
        "--model_name_or_path", scorer_demo[0], "--num_types", "3", "--eval_shards", shard, "--on_bad_sample",
        "error", "--output_dir", str(tmp_path / "o"), "--use_cpu", "--dataloader_num_workers", "0",
        "--min_pixels", "1024", "--max_pixels", "4096"])
    assert stats == trained and stats.startswith(f"error: {shard}: {sample['__key__']}: {problem}"), (stats, trained)


@pytest.mark.parametrize("record, flags, error", [
    ({"prompt": "p", "score": 1.0, "type": 5}, ["--num_types", "3"],
     "json: field 'type' is 5, outside 0..2 (--num_types 3)"),
    ({"prompt": "p", "score": 1.0, "type": 5}, ["--num_types", "9"], None),
    ({"prompt": "p"}, [], "json: missing field 'score'"),
    ({"prompt": "p"}, ["--with_labels", "false"], None),  # prediction shards
])
def test_scorer_labels_are_checked_as_training_checks_them(vl_setup, tmp_path, capsys, record, flags, error):
    root, _ = vl_setup
    shard = write_one(tmp_path / "t.tar", "s1", record, [])
    args = ["--shards", shard, "--processor", str(root / "processor"), "--format", "json", *flags]
    if error is None:
        assert run_stats(*args)[0]["count"] == 2
    else:
        assert exit_2_message(capsys, *args) == f"error: {shard}: s1: {error}"


# ---------------------------------------------------------------------------------------------------------------
# The CLI, as a user runs it
# ---------------------------------------------------------------------------------------------------------------

DOCUMENTED_KEYS = {"kind", "inputs", "tokenizer", "count", "min", "max", "mean", "std", "percentiles", "total_tokens",
                   "prompt_tokens", "answer_tokens", "answer_share", "prompt", "answer", "max_len", "over_max_len",
                   "coverage", "suggested_max_len", "num_proc", "seconds", "examples_per_s", "wall_seconds"}


def test_cli_json_plot_and_table(tmp_path):
    plot = tmp_path / "lengths.png"
    r = run_cli(["python", "token_stats.py", "--demo", "--format", "json", "--plot", str(plot), "--max_len", "128"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # the whole stdout is one JSON object
    assert set(report) == DOCUMENTED_KEYS
    assert set(report["percentiles"]) == {"p50", "p90", "p95", "p99", "p99.9"}
    assert set(report["over_max_len"]) == {"examples", "share", "truncate", "drop"}
    assert report["count"] == 2000 and report["over_max_len"]["examples"] > 0 and report["examples_per_s"] > 0
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000

    _, table = run_stats("--demo")  # the default output: a table and a text histogram
    assert "suggested max_len:" in table and "examples/s" in table
    bars = [line for line in table.splitlines() if re.match(r"\s+[\d,]+ - [\d,]+\s+#", line)]
    assert len(bars) >= 10


def test_no_argument_run_without_the_default_tokenizer(tmp_path):
    """The defaults: the shipped sample data and Qwen2-7B-Instruct's tokenizer, offline and with an empty cache."""
    r = run_cli(["python", "token_stats.py"], env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load the tokenizer 'Qwen/Qwen2-7B-Instruct'")
    assert "pass a local copy with --tokenizer PATH" in lines[0]


def test_sample_data_is_valid(qwen2_tokenizer):
    ds = load_sft_file(token_stats.SAMPLE_DATA)
    assert len(ds) >= 10
    results = encode_sft_batch([dict(zip(ds[:], v)) for v in zip(*ds[:].values())], qwen2_tokenizer)
    assert all(status == "ok" for _, status in results)


@pytest.mark.parametrize("content, message", [
    ('{"query": "q", "answer": "a"}\n{"query": "q"}\n', "line 2: missing key 'answer'"),
    ('{"query": "q", "answer": "a"}\n\n{"messages": [{"role": "bot", "content": "x"}]}\n',
     "line 3: key 'messages[0]': unknown role 'bot'"),
    ('{"query": "q", "answer": "a"}\n{"query": "q", "answer": \n', "line 2: malformed JSON"),
])
def test_bad_sft_data_exits_2_naming_file_and_line(sft_demo, tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    line = exit_2_message(capsys, "--data", str(path), "--tokenizer", sft_demo[0])
    assert line.startswith(f"error: {path}: {message}"), line


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file or folder"),
    (["--coverage", "1.5"], "--coverage must be in (0, 1]"),
    (["--max_len", "0"], "must be positive"),
    (["--tokenizer", "{tmp}/nothing"], "pass a local copy with --tokenizer PATH"),
])
def test_bad_arguments_exit_2(sft_demo, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [a.format(tmp=tmp_path) for a in args]
    assert message in exit_2_message(capsys, "--tokenizer", sft_demo[0], *args)


def test_benchmark_smoke(tmp_path):
    """bench/token_stats_speed.py end to end on a small tokenizer and few examples: its agreement check holds and
    it prints the ratio line (the speed itself is measured by the full run, not here)."""
    r = run_cli(["python", "bench/token_stats_speed.py", "--examples", "400", "--vocab_size", "1000",
                 "--corpus_docs", "500", "--rounds", "1",
                 "--cache", str(tmp_path)], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all exact: True" in r.stdout
    ratio = re.search(r"^token_stats_speedup_vs_loop: ([\d.]+)$", r.stdout, re.M)
    assert ratio and math.isfinite(float(ratio.group(1)))


def write_layouts(folder):
    """The LAYOUTS records of test_collate, one file each (the Alpaca one with history as Parquet), in a folder."""
    import datasets

    folder.mkdir()
    for i, (layout, record, _) in enumerate(LAYOUTS):
        if layout == "alpaca" and "history" in record:
            datasets.Dataset.from_list([record]).to_parquet(folder / f"{i}-{layout}.parquet")
        else:
            demo.write_jsonl(folder / f"{i}-{layout}.jsonl", [record])
    return sorted(str(p) for p in folder.iterdir())


def test_every_layout_measures_as_its_messages(sft_demo, tmp_path):
    """A folder of the same conversations in every layout measures as the file of their {messages} records, each
    file read apart (its own rows in --output); detected and forced (--data_format) alike."""
    files = write_layouts(tmp_path / "layouts")
    same = demo.write_jsonl(tmp_path / "messages.jsonl", [{"messages": m} for _, _, m in LAYOUTS])

    def rows(*args):
        out = tmp_path / "rows.jsonl"
        run_stats("--tokenizer", sft_demo[0], "--system_prompt", SYSTEM, "--output", str(out), "--format", "json",
                  *args)
        return [(r["file"], r["index"], r["total"], r["answer"]) for r in read_jsonl(out)]

    expected = [lengths for _, _, *lengths in rows("--data", same)]
    assert rows("--data", str(tmp_path / "layouts")) == [(f, 0, *n) for f, n in zip(files, expected)]
    for (layout, _, _), path, lengths in zip(LAYOUTS, files, expected):
        assert rows("--data", path, "--data_format", layout) == [(path, 0, *lengths)], layout


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "bot", "value": "x"}]},
     "key 'conversations[0]': unknown role 'bot' (expected one of human, gpt, system, user, assistant)"),
    ({"instruction": "i", "input": "x"}, "missing key 'output' (alpaca records have 'instruction', 'output')"),
    ({"prompt": "p", "completion": 5}, "key 'completion': expected a string, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]},
     "key 'messages[0]'.content[0]: a 'image' part; SFT trains on text parts only"),
    ({"text": "x"}, "matches none of the formats tried: messages ('messages'), sharegpt ('conversations'), "
                    "alpaca ('instruction', 'output'), prompt_completion ('prompt', 'completion'), query_answer "
                    "('query', 'answer'); the record has keys 'text'"),
])
def test_bad_record_of_each_layout_in_a_folder_exits_2_naming_file_and_line(sft_demo, tmp_path, capsys, record,
                                                                             message):
    demo.write_jsonl(tmp_path / "data" / "a.jsonl", demo.make_sft_records(3))
    bad = tmp_path / "data" / "b.jsonl"
    bad.write_text(json.dumps({"query": "q", "answer": "a"}) + "\n\n" + json.dumps(record) + "\n")
    line = exit_2_message(capsys, "--data", str(tmp_path / "data"), "--tokenizer", sft_demo[0])
    assert line == f"error: {bad}: line 3: {message}", line
