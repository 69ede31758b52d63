"""token_stats.py: exact lengths (SFT and scorer shards), statistics vs numpy, outputs, bad input, the CLI."""

import ctypes
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

import demo
import token_stats
from collate import IGNORE_INDEX, _token_ids, encode_sft_batch, encode_sft_example
from conftest import run_cli

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


def run_stats(*args):
    """token_stats.main in-process, with its stdout kept out of the test log."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        report = token_stats.main(list(args))
    return report, out.getvalue()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_lengths_are_the_training_encoding(sft_demo, sft_data, qwen2_tokenizer, tmp_path, num_proc):
    path, records = sft_data
    out = tmp_path / "lengths.jsonl"
    report, _ = run_stats("--data", path, "--tokenizer", sft_demo[0], "--system_prompt", SYSTEM, "--output", str(out),
                          "--num_proc", num_proc, "--batch_size", "40", "--format", "json")
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(len(records))) and {r["file"] for r in rows} == {path}
    for record, row in zip(records, rows):
        enc = encode_sft_example(record, qwen2_tokenizer, None, system_prompt=SYSTEM)
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


def test_token_ids_shortcuts_are_exact(qwen2_tokenizer):
    """One backend call without offsets, NFC text skipping the NFC normalizer: the ids tokenizer() gives, also for
    text that is not NFC (decomposed accents, which NFC composes), and the normalizer is left in place."""
    from tokenizers import normalizers

    texts = ["plain ascii", "e\u0301t\u00e9 cafe\u0301", "<|im_start|>user\n好<|im_end|>\n", "", "  \n\n x",
             "\u212b ohm \u2126", "Ａｂｃ full width"]
    assert not all(__import__("unicodedata").is_normalized("NFC", t) for t in texts)
    assert _token_ids(qwen2_tokenizer, texts) == qwen2_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert isinstance(qwen2_tokenizer.backend_tokenizer.normalizer, normalizers.NFC)


def test_guard_clears_the_hidden_tokenizers_parallelism(monkeypatch):
    """The datasets trap: false at the OS level while os.environ does not show it."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    os.putenv("TOKENIZERS_PARALLELISM", "false")
    assert libc.getenv(b"TOKENIZERS_PARALLELISM") == b"false"
    token_stats.guard_tokenizers_parallelism()
    assert libc.getenv(b"TOKENIZERS_PARALLELISM") is None
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # set by the user: kept
    token_stats.guard_tokenizers_parallelism()
    assert libc.getenv(b"TOKENIZERS_PARALLELISM") == b"false"


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
    demo.write_scorer_shard(root / "train-000.tar", samples[:6])
    demo.write_scorer_shard(root / "train-001.tar", samples[6:])
    return root, samples


def processor_length(processor, prompt, images, min_pixels, max_pixels):
    """What the scorer feeds its model: train_scorer.py's own per-sample encoding (collate.encode_vl_example)."""
    import io

    from collate import encode_vl_example

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
    """Run token_stats.main in-process on bad input: it must exit 2 with one line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        token_stats.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


def test_vl_bad_shards(vl_setup, tmp_path, capsys):
    from transformers import AutoProcessor

    root, _ = vl_setup
    processor = str(root / "processor")
    bad = demo.write_scorer_shard(tmp_path / "bad-000.tar", [("ok", {"prompt": "fine"}, []),
                                                             ("noprompt", {"score": 1.0}, [])])
    assert exit_2_message(capsys, "--shards", bad, "--processor", processor) == (
        f"error: {bad}: sample 'noprompt': .json: key 'prompt': expected a string")
    broken = demo.write_scorer_shard(tmp_path / "img-000.tar", [("s1", {"prompt": "p"}, [("jpg", b"not a jpeg")])])
    assert exit_2_message(capsys, "--shards", broken, "--processor", processor).startswith(
        f"error: {broken}: sample 's1': image .0.jpg: cannot be read as an image")
    # an image so thin that the resize within max_pixels gives it no width: process_vision_info fails on it too
    thin = demo.write_scorer_shard(tmp_path / "thin-000.tar", [("s1", {"prompt": "p"}, [Image.new("RGB", (33, 500))])])
    with pytest.raises(ValueError):
        processor_length(AutoProcessor.from_pretrained(processor), "p", [Image.new("RGB", (33, 500))], None, 96 * 96)
    assert exit_2_message(capsys, "--shards", thin, "--processor", processor, "--max_pixels", "9216").startswith(
        f"error: {thin}: sample 's1': image .0.png (33x500) resizes to 0x352")
    assert exit_2_message(capsys, "--shards", str(tmp_path / "none-*.tar"), "--processor", processor).endswith(
        "pattern matches no file")
    not_tar = tmp_path / "junk-000.tar"
    not_tar.write_bytes(b"this is not a tar file" * 50)
    assert "not a readable tar shard" in exit_2_message(capsys, "--shards", str(not_tar), "--processor", processor)


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

    r = run_cli(["python", "token_stats.py", "--demo"])
    assert r.returncode == 0, r.stderr
    assert "suggested max_len:" in r.stdout and "examples/s" in r.stdout
    bars = [line for line in r.stdout.splitlines() if re.match(r"\s+[\d,]+ - [\d,]+\s+#", line)]
    assert len(bars) >= 10


def test_no_argument_run(tmp_path):
    """The defaults: the shipped sample data and Qwen2-7B-Instruct's tokenizer, which is not here (no hub)."""
    r = run_cli(["python", "token_stats.py"], env={"HF_HUB_OFFLINE": "1"})
    if r.returncode == 0:  # a machine with the tokenizer cached
        assert "suggested max_len:" in r.stdout
        return
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load the tokenizer 'Qwen/Qwen2-7B-Instruct'")
    assert "pass a local copy with --tokenizer PATH" in lines[0]


def test_sample_data_is_valid(qwen2_tokenizer):
    from collate import load_sft_file

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
def test_bad_sft_data_exits_2_naming_file_and_line(sft_demo, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    r = run_cli(["python", "token_stats.py", "--data", str(path), "--tokenizer", sft_demo[0]])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {path}: {message}"), r.stderr


def test_bad_arguments_exit_2(sft_demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args, message in ((["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file or folder"),
                          (["--coverage", "1.5"], "--coverage must be in (0, 1]"),
                          (["--max_len", "0"], "must be positive"),
                          (["--tokenizer", str(tmp_path / "nothing")], "pass a local copy with --tokenizer PATH")):
        assert message in exit_2_message(capsys, "--tokenizer", sft_demo[0], *args), args


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


@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_encoding_equals_tokenizing_each_segment(qwen2_tokenizer, split_special_tokens):
    """encode_sft_batch's one-call encoding == the plain definition: the rendered conversation cut at every answer
    edge, each piece through tokenizer(); labels on the answer pieces. With split_special_tokens the eos string is
    not one token, which sends every answer through the fallback path."""
    import copy

    tok = copy.deepcopy(qwen2_tokenizer)
    tok.split_special_tokens = split_special_tokens
    records = demo.make_sft_records(40, seed=5) + [{"query": "x", "answer": "\n\nfoo <|im_end|> bar"}]
    for record, (enc, _) in zip(records, encode_sft_batch(records, tok)):
        messages = __import__("collate").to_messages(record)
        full = tok.apply_chat_template(messages, tokenize=False)
        edges, pos = [0], 0
        for j, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(tok.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True))
                pos = full.index(m["content"] + "<|im_end|>", start) + len(m["content"]) + len("<|im_end|>")
                edges += [start, pos]
        edges.append(len(full))
        pieces = [tok(full[a:b], add_special_tokens=False)["input_ids"] for a, b in zip(edges, edges[1:])]
        assert enc["input_ids"] == [t for p in pieces for t in p]
        assert enc["labels"] == [t if k % 2 else IGNORE_INDEX for k, p in enumerate(pieces) for t in p]
