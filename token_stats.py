"""Token-length statistics of a dataset, computed with exactly the encoding training uses, to choose max_len.

SFT data (the files, formats and keys of sft_qwen2.py): every example is encoded by `collate.encode_sft_batch`, the
function sft_qwen2.py trains with (chat template + answer mask), without truncation, so the lengths are the tokens
training sees. Scorer shards (the webdataset shards of train_scorer.py): per sample, text tokens plus image tokens,
the image tokens computed from each image's size after `process_vision_info`'s resize (--min_pixels/--max_pixels),
without decoding pixels or running a model.

Reports count, min/max/mean/std, percentiles, total and answer tokens, what --max_len would truncate or drop, a
suggested max_len (the smallest multiple of 64 covering --coverage of the examples) and the speed achieved.

  # the sample data shipped in data/ with Qwen2-7B-Instruct's tokenizer
  python token_stats.py

  # offline: the tiny demo tokenizer on the demo data, or on the sample shipped in data/
  python token_stats.py --demo
  python token_stats.py --demo --data data/sample_sft.jsonl

  # your data: a table and a text histogram; a JSON object instead; a histogram + CDF plot; per-example lengths
  python token_stats.py --data data/train.jsonl --tokenizer Qwen/Qwen2-7B-Instruct --max_len 4096
  python token_stats.py --data data/train.jsonl --format json > stats.json
  python token_stats.py --data data/train.jsonl --plot lengths.png --output lengths.jsonl

  # scorer shards
  python token_stats.py --shards 'shards/train-{000..063}.tar' --processor Qwen/Qwen3-VL-8B-Instruct \
      --max_pixels 1003520
"""

import contextlib
import functools
import gc
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from collate import (IGNORE_INDEX, ChatFormat, DataError, apply_overflow, encode_sft_batch, image_tokens,
                     missing_chat_template, parse_vl_sample, pixel_bounds_problem, to_messages, vl_text)
from data import BadSample, SFTSource, expand_shards, load_sft_file, record_location, sft_sources, shard_samples
from plumbing import check_output_file, demo_dir, fail, load_pretrained, parse_arguments, prepare_demo

SAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample_sft.jsonl")
PERCENTILES = (50, 90, 95, 99, 99.9)


@dataclass
class StatsArguments(ChatFormat, SFTSource):  # --data_format, --system_prompt, keys, --dataset_split/_config:
    # as sft_qwen2.py
    data: list[str] = field(default_factory=lambda: [SAMPLE_DATA], metadata={
        "help": "SFT files (.jsonl/.json/.parquet/.csv), folders of them, datasets folders or hub ids, as "
                "sft_qwen2.py --train_file."})
    tokenizer: str = field(default="Qwen/Qwen2-7B-Instruct", metadata={
        "help": "Hub id or local folder of the tokenizer (the model you will fine-tune)."})
    shards: str = field(default=None, metadata={
        "help": "Scorer webdataset shards instead of SFT data: a glob and/or brace pattern ('train-{000..063}.tar')."})
    processor: str = field(default="Qwen/Qwen3-VL-8B-Instruct", metadata={
        "help": "Hub id or local folder of the Qwen3-VL processor (with --shards)."})
    min_pixels: int = field(default=None, metadata={
        "help": "Smallest image area after resizing, as train_scorer.py (default: qwen_vl_utils' own bound)."})
    max_pixels: int = field(default=None, metadata={
        "help": "Largest image area after resizing, as train_scorer.py (default: qwen_vl_utils' own bound)."})
    num_types: int = field(default=None, metadata={
        "help": "With --shards: a 'type' outside 0..num_types-1 is a bad sample, as in train_scorer.py."})
    with_labels: bool = field(default=True, metadata={
        "help": "With --shards: check the labels as training does (false for prediction shards: prompt and images)."})
    max_len: int = field(default=8192, metadata={
        "help": "The max_len you plan to train with: how many examples and tokens it would truncate or drop."})
    coverage: float = field(default=0.99, metadata={
        "help": "Share of examples the suggested max_len must hold whole (0 < coverage <= 1)."})
    format: str = field(default="table", metadata={
        "help": "table: a readable table and a text histogram; json: one JSON object on stdout.",
        "choices": ["table", "json"]})
    plot: str = field(default=None, metadata={"help": "Write a histogram + CDF of the lengths to this .png file."})
    output: str = field(default=None, metadata={"help": "Write one JSON line of lengths per example to this file."})
    num_proc: int = field(default=None, metadata={"help": "Worker processes (default: all cores)."})
    batch_size: int = field(default=500, metadata={"help": "Examples per tokenizer call (one job of a worker)."})
    allow_pipe_shards: bool = field(default=False, metadata={
        "help": "Accept `pipe:COMMAND` shards, which run a shell command (as train_scorer.py)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run code from the tokenizer's/processor's repo (Qwen does not need it)."})
    demo: bool = field(default=False, metadata={
        "help": "Use the tiny offline demo tokenizer (built in a temporary folder) on the demo data, or on the "
                "--data given."})


DEMO_DIR = demo_dir("token-stats")
# Flags the demo puts before the user's own (so `--demo --data FILE` measures FILE with the demo tokenizer).
DEMO_ARGS = ["--tokenizer", os.path.join(DEMO_DIR, "tiny-qwen2"), "--data", os.path.join(DEMO_DIR, "train.jsonl")]


# ---------------------------------------------------------------------------------------------------------------
# Workers. A job is a slice of one input; it returns lengths only, so memory stays flat in the number of examples.
# Workers are forked after the inputs are opened (Arrow files are memory-mapped, nothing is copied) and
# find them in _STATE.
# ---------------------------------------------------------------------------------------------------------------

_STATE = {}


def _sft_job(job):
    """Encode records [start, stop) of input `f` as sft_qwen2.py does; returns an int64 array (n, 5): total tokens,
    answer tokens, and under --overflow truncate at --max_len: status (0 whole, 1 truncated, 2 dropped), tokens
    lost, answer tokens lost."""
    f, start, stop = job
    args, path, ds = _STATE["args"], _STATE["paths"][f], _STATE["inputs"][f]
    columns = ds[start:stop]
    records = [dict(zip(columns, values)) for values in zip(*columns.values())]
    try:
        results = encode_sft_batch(records, _STATE["tokenizer"], None, "truncate", args)
    except DataError as e:  # record i of this job -> the file's own line number
        raise DataError(f"{record_location(path, start + e.index)}: {e.problem}") from None
    out = np.zeros((len(results), 5), dtype=np.int64)
    for i, (enc, _) in enumerate(results):
        ids, labels = enc["input_ids"], enc["labels"]
        answer = len(labels) - labels.count(IGNORE_INDEX)
        out[i, :2] = len(ids), answer
        if len(ids) > args.max_len:  # the very rule sft_qwen2.py applies
            kept, status = apply_overflow(ids, labels, args.max_len, "truncate")
            if kept is None:
                out[i, 2:] = 2, len(ids), answer
            else:
                out[i, 2:] = 1, len(ids) - args.max_len, answer - (args.max_len - kept["labels"].count(IGNORE_INDEX))
    return out


def _scorer_job(shard):
    """All samples of one shard: a list of (key, text tokens, [image tokens of each image]). A sample training
    would refuse (collate.parse_vl_sample, the same checks and the same error line) stops the run."""
    processor, args = _STATE["processor"], _STATE["args"]
    classes = {"type": args.num_types} if args.num_types else None
    keys, texts, per_image = [], [], []
    for sample in shard_samples(shard):
        try:
            s = parse_vl_sample(sample, classes, args.with_labels)
            texts.append(vl_text(processor, len(s.images), s.prompt))
            per_image.append([image_tokens(member, data, processor.image_processor, args.min_pixels, args.max_pixels)
                              for member, data in s.images])
        except DataError as e:
            raise DataError(str(BadSample(shard, sample.get("__key__"), str(e)))) from None
        keys.append(s.key)
    if not keys:
        raise DataError(f"{shard}: no samples")
    ids = processor.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    # each image is one <|image_pad|> in the rendered text; the processor expands it to that image's tokens
    return [(key, len(t) - len(n), n) for key, t, n in zip(keys, ids, per_image)]


def _run_jobs(fn, jobs, num_proc, sizes, unit):
    """Yield fn(job) in job order, from `num_proc` forked workers (or in this process when 1); `sizes[i]` advances
    the progress bar (stderr, shown on a terminal) when job i is done."""
    from tqdm import tqdm

    pool = None
    if workers(num_proc, len(jobs)) > 1:
        # One single-threaded tokenizer per worker: the workers already fill the cores (and a Rust thread pool
        # used before a fork is disabled in the child, with a warning). gc.disable: workers build only acyclic
        # lists and dicts, and the collector's walks over them cost ~2% of their time for nothing.
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # what the children inherit
        try:
            pool = multiprocessing.get_context("fork").Pool(workers(num_proc, len(jobs)), initializer=gc.disable)
        finally:
            if saved is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
    results = pool.imap(fn, jobs) if pool else map(fn, jobs)
    with tqdm(total=sum(sizes), unit=unit, file=sys.stderr, disable=None, mininterval=0.5) as bar:
        try:
            for result, size in zip(results, sizes):
                yield result
                bar.update(size)
        finally:
            if pool:
                pool.terminate()


def workers(num_proc, n_jobs):
    """How many processes _run_jobs uses: forked workers need the fork start method (not on Windows)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(num_proc, n_jobs))


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------

def summary(values):
    """count, min, max, mean, std (population) and percentiles (numpy's default linear interpolation)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "min": int(v.min()), "max": int(v.max()), "mean": float(v.mean()),
            "std": float(v.std()),
            "percentiles": {f"p{p:g}": float(x) for p, x in zip(PERCENTILES, np.percentile(v, PERCENTILES))}}


def suggested_max_len(lengths, coverage, multiple=64):
    """The smallest multiple of `multiple` that holds at least `coverage` of the examples whole."""
    s = np.sort(np.asarray(lengths))
    k = max(1, math.ceil(coverage * len(s) - 1e-9))
    return int(math.ceil(s[k - 1] / multiple) * multiple)


def sft_report(rows, args):
    total, answer, status, lost, answer_lost = rows.T
    n, tokens, answer_tokens = len(total), int(total.sum()), int(answer.sum())
    over = total > args.max_len

    def share(a, b):
        return float(a / b) if b else 0.0

    report = {"kind": "sft", "inputs": args.data, "tokenizer": args.tokenizer, **summary(total),
              "total_tokens": tokens, "prompt_tokens": tokens - answer_tokens, "answer_tokens": answer_tokens,
              "answer_share": share(answer_tokens, tokens),
              "prompt": summary(total - answer), "answer": summary(answer),
              "max_len": args.max_len,
              "over_max_len": {
                  "examples": int(over.sum()), "share": share(int(over.sum()), n),
                  "truncate": {"truncated": int((status == 1).sum()), "dropped": int((status == 2).sum()),
                               "tokens_lost": int(lost.sum()), "token_share_lost": share(int(lost.sum()), tokens),
                               "answer_tokens_lost": int(answer_lost.sum()),
                               "answer_token_share_lost": share(int(answer_lost.sum()), answer_tokens)},
                  "drop": {"dropped": int(over.sum()), "tokens_lost": int(total[over].sum()),
                           "token_share_lost": share(int(total[over].sum()), tokens),
                           "answer_tokens_lost": int(answer[over].sum()),
                           "answer_token_share_lost": share(int(answer[over].sum()), answer_tokens)}},
              "coverage": args.coverage, "suggested_max_len": suggested_max_len(total, args.coverage)}
    return report, total


def scorer_report(rows, args, shards):
    text = np.array([r[1] for r in rows], dtype=np.int64)
    per_image = np.array([t for r in rows for t in r[2]], dtype=np.int64)
    image = np.array([sum(r[2]) for r in rows], dtype=np.int64)
    count = np.array([len(r[2]) for r in rows], dtype=np.int64)
    total = text + image
    tokens = int(total.sum())
    over = total > args.max_len
    beyond = int((total[over] - args.max_len).sum())
    report = {"kind": "scorer", "inputs": shards, "processor": args.processor, "min_pixels": args.min_pixels,
              "max_pixels": args.max_pixels, **summary(total), "total_tokens": tokens,
              "text_tokens": int(text.sum()), "image_tokens": int(image.sum()), "text": summary(text),
              "images": {"total": int(count.sum()), "per_sample": summary(count)},
              "image_tokens_per_image": summary(per_image),
              "max_len": args.max_len,
              "over_max_len": {"examples": int(over.sum()), "share": float(over.mean()), "tokens_beyond": beyond,
                               "token_share_beyond": beyond / tokens if tokens else 0.0},
              "coverage": args.coverage, "suggested_max_len": suggested_max_len(total, args.coverage)}
    return report, total


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

def text_histogram(lengths, marks, bins=20, width=50):
    """Lines of a horizontal bar chart of `lengths` from 0 to the longest; `marks` ({name: value}) are noted on the
    bin holding them, or after the chart when they lie beyond the longest example."""
    lengths = np.asarray(lengths)
    step = max(1, math.ceil((int(lengths.max()) + 1) / bins))
    counts = np.bincount(lengths // step, minlength=bins)
    top = int(counts.max())
    lines = []
    for b, c in enumerate(counts):
        lo = b * step
        note = "  ".join(f"<- {name} {v:,}" for name, v in marks.items() if lo <= v < lo + step)
        bar = "#" * math.ceil(width * c / top) if c else ""
        lines.append(f"  {lo:>7,} - {lo + step - 1:<7,} {bar:<{width}} {c:>9,} {note}".rstrip())
    beyond = [f"{name} {v:,}" for name, v in marks.items() if v >= len(counts) * step]
    if beyond:
        lines.append(f"  (beyond the longest example, {int(lengths.max()):,}: {', '.join(beyond)})")
    return lines


def print_table(report, speed):
    r, p = report, report["percentiles"]
    over = r["over_max_len"]
    out = [f"token lengths of {r['count']:,} {'examples' if r['kind'] == 'sft' else 'samples'} "
           f"({', '.join(r['inputs'][:3])}{' ...' if len(r['inputs']) > 3 else ''})"]
    if r["kind"] == "sft":
        out.append(f"  tokenizer {r['tokenizer']}: chat template + answer mask exactly as sft_qwen2.py trains")
        cols = [("total", r), ("prompt", r["prompt"]), ("answer", r["answer"])]
    else:
        bounds = ", ".join(f"{k} {r[k]:,}" for k in ("min_pixels", "max_pixels") if r[k] is not None)
        out.append(f"  processor {r['processor']}: text + image tokens, images resized as train_scorer.py "
                   f"({bounds or 'qwen_vl_utils default pixel bounds'})")
        cols = [("total", r), ("text", r["text"]), ("img/image", r["image_tokens_per_image"]),
                ("images", r["images"]["per_sample"])]
    out.append(f"  {'':8}" + "".join(f"{name:>12}" for name, _ in cols))
    for stat in ("min", *p, "max", "mean", "std"):
        cells = [s.get(stat, s.get("percentiles", {}).get(stat)) for _, s in cols]
        fmt = ",.1f" if stat in ("mean", "std") else ",.0f"
        out.append(f"  {stat:8}" + "".join(f"{'-' if c is None else format(c, fmt):>12}" for c in cells))
    if r["kind"] == "sft":
        out.append(f"  tokens: {r['total_tokens']:,} in all, {r['prompt_tokens']:,} prompt (masked), "
                   f"{r['answer_tokens']:,} answer (trained, {r['answer_share']:.1%})")
        t, d = over["truncate"], over["drop"]
        out.append(f"  max_len {r['max_len']:,}: {over['examples']:,} examples longer ({over['share']:.2%})")
        out.append(f"    --overflow truncate: {t['truncated']:,} truncated, {t['dropped']:,} dropped (no answer token "
                   f"left); {t['token_share_lost']:.2%} of tokens, {t['answer_token_share_lost']:.2%} of answer "
                   f"tokens lost")
        out.append(f"    --overflow drop: {d['dropped']:,} dropped; {d['token_share_lost']:.2%} of tokens, "
                   f"{d['answer_token_share_lost']:.2%} of answer tokens lost")
    else:
        out.append(f"  tokens: {r['total_tokens']:,} in all, {r['text_tokens']:,} text, {r['image_tokens']:,} image "
                   f"({r['images']['total']:,} images)")
        out.append(f"  max_len {r['max_len']:,}: {over['examples']:,} samples longer ({over['share']:.2%}), "
                   f"{over['tokens_beyond']:,} tokens beyond it ({over['token_share_beyond']:.2%})")
    out.append(f"  suggested max_len: {r['suggested_max_len']:,} (smallest multiple of 64 holding "
               f"{r['coverage']:.1%} of the {'examples' if r['kind'] == 'sft' else 'samples'} whole)")
    out.append(f"  speed: {speed}")
    print("\n".join(out))


def write_plot(path, lengths, report):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.sort(lengths)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.hist(lengths, bins=min(100, max(10, len(s) // 20)), color="#4c72b0")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    cdf = ax.twinx()
    cdf.step(s, np.arange(1, len(s) + 1) / len(s), where="post", color="#222222", linewidth=1.2, label="CDF")
    cdf.set_ylim(0, 1.01)
    cdf.set_ylabel("share of examples with at most this many tokens")
    right = 1.04 * max(s[-1], report["suggested_max_len"])
    for x, label, style in ((report["suggested_max_len"], f"suggested max_len {report['suggested_max_len']:,}", "--"),
                            (report["max_len"], f"--max_len {report['max_len']:,}", ":")):
        if x <= right:
            ax.axvline(x, color="#c44e52", linestyle=style, label=label)
        else:  # far beyond the data: an arrow at the right edge rather than an axis squashing every bar
            ax.annotate(f"{label} ->", xy=(1, 0.5), xycoords="axes fraction", ha="right", color="#c44e52")
    ax.set_xlim(0, right)
    handles = ax.get_legend_handles_labels()[0] + cdf.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right")
    ax.set_title(f"{report['count']:,} examples: p50 {report['percentiles']['p50']:.0f}, "
                 f"p99 {report['percentiles']['p99']:.0f}, max {report['max']:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def measure_sft(args, num_proc):
    """Lengths of every SFT example (rows of _sft_job), written to --output as they come."""
    check, paths = functools.partial(to_messages, fmt=args), sft_sources(args.data)
    _STATE.update(paths=paths, inputs=[load_sft_file(p, check, args.dataset_split, args.dataset_config)
                                       for p in paths])
    jobs = [(f, i, min(i + args.batch_size, len(ds))) for f, ds in enumerate(_STATE["inputs"])
            for i in range(0, len(ds), args.batch_size)]
    parts = []
    with open(args.output or os.devnull, "w", encoding="utf-8") as out:
        for (f, first, stop), part in zip(jobs, _run_jobs(_sft_job, jobs, num_proc, [b - a for _, a, b in jobs],
                                                          "ex")):
            parts.append(part)
            if args.output:
                name = json.dumps(paths[f], ensure_ascii=False)
                out.writelines(f'{{"file": {name}, "index": {i}, "total": {t}, "prompt": {t - a}, "answer": {a}}}\n'
                               for i, (t, a) in enumerate(part[:, :2].tolist(), first))
    report, lengths = sft_report(np.concatenate(parts), args)
    report["num_proc"] = workers(num_proc, len(jobs))
    return report, lengths


def measure_scorer(args, num_proc):
    """Lengths of every scorer sample (rows of _scorer_job), written to --output as they come."""
    shards = expand_shards(args.shards, args.allow_pipe_shards)
    rows = []
    with open(args.output or os.devnull, "w", encoding="utf-8") as out:
        sizes = [os.path.getsize(s) for s in shards]
        for shard, part in zip(shards, _run_jobs(_scorer_job, shards, num_proc, sizes, "B")):
            rows += part
            if args.output:
                out.writelines(json.dumps({"shard": shard, "key": key, "total": text + sum(images), "text": text,
                                           "images": len(images), "image_tokens": images}) + "\n"
                               for key, text, images in part)
    report, lengths = scorer_report(rows, args, shards)
    report["num_proc"] = workers(num_proc, len(shards))
    return report, lengths


def check_flags(args):
    """Exit 2 before any work on flags that contradict each other or outputs that could not be written at the end."""
    if args.shards and args.data != [SAMPLE_DATA]:
        fail("--shards measures scorer shards, --data SFT files (--demo gives demo SFT data): give one of them")
    if not args.shards and (given := [f"--{name}" for name in ("num_types", "min_pixels", "max_pixels")
                                      if getattr(args, name) is not None]):
        fail(f"{', '.join(given)}: only with --shards (scorer shards); SFT data has no images or types")
    if args.shards and (problem := pixel_bounds_problem(args.min_pixels, args.max_pixels)):
        fail(problem)
    for flag, path in (("--plot", args.plot), ("--output", args.output)):
        if path:
            check_output_file(path, flag)
    if args.plot and (suffix := os.path.splitext(args.plot)[1].lstrip(".").lower()):
        from matplotlib.figure import Figure

        if suffix not in (kinds := Figure().canvas.get_supported_filetypes()):
            fail(f"--plot {args.plot}: matplotlib cannot write .{suffix} files; use one of .{', .'.join(kinds)}")
    if args.plot and args.output and os.path.abspath(args.plot) == os.path.abspath(args.output):
        fail(f"--plot and --output are the same file {args.plot}: give two names")


def main(argv=None):
    start = time.time()
    parser = HfArgumentParser(StatsArguments)
    (args,) = parse_arguments(parser, argv, demo_args=DEMO_ARGS)
    if args.max_len < 1 or args.batch_size < 1 or (args.num_proc is not None and args.num_proc < 1):
        fail("--max_len, --batch_size and --num_proc must be positive")
    if not 0 < args.coverage <= 1:
        fail(f"--coverage must be in (0, 1], not {args.coverage}")
    check_flags(args)
    num_proc = args.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    # Everything but the report goes to stderr: libraries print on stdout too (DeepSpeed announces its accelerator
    # when a model is saved, as the demo does), and `--format json` promises one JSON object there.
    with contextlib.redirect_stdout(sys.stderr):
        if args.demo:  # the SFT demo's tiny model and 2,000 of its records
            import demo
            prepare_demo(DEMO_DIR, functools.partial(demo.build_sft_demo, n_train=2000))

        if args.shards:
            loaded = load_pretrained("AutoProcessor", args.processor, "--processor",
                                     trust_remote_code=args.trust_remote_code)
        else:
            loaded = load_pretrained("AutoTokenizer", args.tokenizer, "--tokenizer", " (or run --demo)",
                                     trust_remote_code=args.trust_remote_code)
        if problem := missing_chat_template(loaded, args.processor if args.shards else args.tokenizer):
            fail(problem)
        _STATE.update(args=args, **{"processor" if args.shards else "tokenizer": loaded})
        t0 = time.time()
        try:
            report, lengths = (measure_scorer if args.shards else measure_sft)(args, num_proc)
        except DataError as e:
            fail(e)
        except OSError as e:  # an output path that cannot be written, etc.
            fail(f"{e.filename or args.output}: {e.strerror or e}")
        seconds = time.time() - t0
        num_proc = report["num_proc"]
        report.update(seconds=round(seconds, 3), examples_per_s=round(report["count"] / seconds, 1),
                      wall_seconds=round(time.time() - start, 3))
        if args.plot:
            write_plot(args.plot, lengths, report)
    if args.format == "json":
        print(json.dumps(report, ensure_ascii=False))
    else:
        unit = "examples" if report["kind"] == "sft" else "samples"
        print_table(report, f"{report['count']:,} {unit} in {seconds:.1f} s = {report['examples_per_s']:,.0f} "
                            f"{unit}/s with {num_proc} process{'es' if num_proc > 1 else ''} "
                            "(reading + exact encoding)")
        print(f"histogram ({unit} per length bin):")
        print("\n".join(text_histogram(lengths, {"max_len": report["max_len"],
                                                 "suggested": report["suggested_max_len"]})))
        if args.plot:
            print(f"plot written to {args.plot}")
    return report


if __name__ == "__main__":
    main()
