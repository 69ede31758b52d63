"""Where records come from: SFT files, folders and hub ids, scorer manifests, shard lists, the tar reader, the shard
stream over ranks x workers, the loader.

Errors raise `collate.DataError` naming the file, line or shard; the scripts print them as one line and exit 2.
"""

import bisect
import functools
import json
import os
import random
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from collate import IMAGE_MEMBER, LABELS, DataError, collate_vl, parse_vl_sample

# ----------------------------------------------------------------------------------------------------------------
# SFT files
# ----------------------------------------------------------------------------------------------------------------

SFT_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# What names a dataset on the hub ("org/name", or a canonical "name"); a missing local path that could not be one
# is reported as missing, without asking the hub.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what datasets.save_to_disk writes at a folder's top


@dataclass
class SFTSource:
    """Which part of a datasets hub id (or saved DatasetDict) to read: flags of sft_qwen2.py and token_stats.py
    (their argument dataclasses derive from this one)."""
    dataset_split: str = field(default="train", metadata={
        "help": "Split read from a datasets hub id or a saved DatasetDict (hub ids also take slices: train[:10%%])."})
    dataset_config: str = field(default=None, metadata={
        "help": "Configuration (subset) of a datasets hub id, when it has several."})


def sft_sources(paths):
    """The sources `paths` name, in order: a file, a hub id or a `save_to_disk` folder stands for itself; any other
    folder for its data files (SFT_FORMATS, subfolders included, in path order). Training and token_stats read each
    source apart, so files of different layouts or column types can share a folder, and errors name the file."""
    return [f for path in paths for f in (_data_files(path) if _plain_folder(path) else [str(path)])]


def _plain_folder(path):
    p = Path(path)
    return p.is_dir() and not any((p / name).is_file() for name in SAVED_MARKERS)


def _data_files(folder):
    """The data files of `folder` and its subfolders in path order; hidden ones and other files (a README, a
    .gitattributes) are skipped."""
    root = Path(folder)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SFT_FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{folder}: no data files ({', '.join(SFT_FORMATS)}) in this folder, and not a folder "
                        f"written by datasets.save_to_disk")
    return files


def load_sft_file(path, check_record=None, split="train", config=None):
    """One SFT data source as a `datasets.Dataset`: a .jsonl/.json/.parquet/.csv file, a folder of them (its files
    in `sft_sources` order, joined), a `save_to_disk` folder (`split` of a DatasetDict), or a datasets hub id
    (`datasets.load_dataset(path, name=config, split=split)`, cached by datasets).

    The fast Arrow readers do the work; only when one fails on JSON do we re-read the file in Python, checking each
    record with `check_record` (e.g. `to_messages`), to say which line is broken and why: Arrow's message names
    neither the line nor the key (a number where a string was expected fails type inference, for instance).
    """
    import datasets

    p = Path(path)
    if not p.exists():
        if not HUB_ID.fullmatch(str(path)) or p.suffix.lower() in SFT_FORMATS:
            raise DataError(f"{path}: no such file or folder")
        try:
            ds = datasets.load_dataset(str(path), name=config, split=split)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, private, bad split: the reason is what helps
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: no such file or folder, and not a dataset the hub gives ({reason})") from None
    elif _plain_folder(p):
        ds = _join(path, [(f, load_sft_file(f, check_record)) for f in _data_files(p)])
    elif p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - any failure here means "not a saved dataset"
            raise DataError(f"{path}: not a folder written by datasets.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: a DatasetDict without a {split!r} split (it has {', '.join(ds)}; "
                                f"--dataset_split chooses)")
            ds = ds[split]
    else:
        fmt = SFT_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unknown data format {p.suffix!r} (use .jsonl, .json, .parquet, .csv or a folder)")
        if p.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        if fmt == "csv":  # before pandas reads it: its error names no line (and datasets logs one more)
            _check_utf8(p)
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        except Exception as e:  # noqa: BLE001 - Arrow raises many types; the message is what the user needs
            if fmt == "json":
                _check_utf8(p)
                _check_json_file(p, check_record)
            raise DataError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
        if fmt == "json" and not _valid_strings(ds):  # Arrow's JSON reader keeps bytes that are not UTF-8
            _check_utf8(p)
    if len(ds) == 0:
        raise DataError(f"{path}: no records")
    return ds


def _join(folder, parts):
    """The datasets of a folder's files as one; Arrow cannot join a column held in different types by two files."""
    import datasets

    joined = parts[0][1]
    for name, ds in parts[1:]:
        try:
            joined = datasets.concatenate_datasets([joined, ds])
        except ValueError:
            column = next(k for k in ds.features if k in joined.features and ds.features[k] != joined.features[k])
            raise DataError(f"{folder}: {name} holds column '{column}' in another type than the files before it, "
                            f"so they cannot be read as one dataset; pass the files one by one") from None
    return joined


def _valid_strings(ds):
    """Whether every string of `ds` is UTF-8: Arrow's full validation (fast, in C++, on the memory-mapped table);
    otherwise reading such a string fails later, on every rank, with an error naming neither file nor line."""
    import pyarrow as pa

    try:
        ds.data.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _check_utf8(p):
    """Raise a DataError naming the line of the first byte of text file `p` that is not UTF-8 (Arrow's and pandas'
    readers say neither the file nor the line), with the fix: re-save it as UTF-8. Reads blocks of whole lines."""
    with open(p, "rb") as f:
        lines = 0
        while block := f.read(1 << 20) + f.readline():
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as e:
                column = e.start - block.rfind(b"\n", 0, e.start)  # 1-based, in bytes
                line = lines + block.count(b"\n", 0, e.start) + 1
                utf16 = line == 1 and block[:2] in (b"\xff\xfe", b"\xfe\xff")  # a UTF-16 byte-order mark
                raise DataError(f"{p}: line {line}: not UTF-8 (byte 0x{block[e.start]:02x} at byte {column} of the "
                                f"line); save it as UTF-8, e.g. iconv -f {'UTF-16' if utf16 else 'GBK'} -t "
                                f"UTF-8 {p.name} > utf8-{p.name} (-f: the encoding it is in, e.g. GBK or GB18030 for "
                                f"Chinese, LATIN1 or CP1252 for Western European text)") from None
            lines += block.count(b"\n")


def _check_json_file(p, check_record):
    """Raise a DataError naming the first bad line (JSON Lines) or record (one JSON array) of `p`."""
    with open(p, "rb") as f:
        if f.read(1).lstrip() == b"[":  # one JSON array
            f.seek(0)
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {e.lineno}: malformed JSON: {e.msg}") from None
            located = [(f"record {i + 1}", r) for i, r in enumerate(records)] if isinstance(records, list) else []
        else:
            f.seek(0)
            located = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        located.append((f"line {lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}: line {lineno}: malformed JSON: {e.msg}") from None
    for where, record in located:
        try:
            if check_record is not None:
                check_record(record)
            elif not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}")
        except DataError as e:
            raise DataError(f"{p}: {where}: {e}") from None


def record_lines(path):
    """The line number (1-based) of each record of a JSON Lines file, or None for other sources."""
    p = Path(path)
    if p.suffix.lower() != ".jsonl" or not p.is_file():
        return None
    with open(p, "rb") as f:  # blank lines are skipped by the reader, so count the non-blank ones
        return [lineno for lineno, line in enumerate(f, 1) if line.strip()]


def record_location(path, index):
    """How to point a user at record `index` (0-based) of `path`: a line number for JSON Lines, else a row; in a
    folder, of the file holding that record (read again: this runs once, for an error)."""
    p = Path(path)
    if _plain_folder(p):
        for name in _data_files(p):
            size = len(load_sft_file(name))
            if index < size:
                return record_location(name, index)
            index -= size
    lines = record_lines(path)
    if lines is not None and index < len(lines):
        return f"{path}: line {lines[index]}"
    return f"{path}: record {index + 1}"


# ----------------------------------------------------------------------------------------------------------------
# Scorer manifests: a table of rows (prompt, labels, image paths, key) -> the samples a shard would hold
# ----------------------------------------------------------------------------------------------------------------

MANIFEST_FORMATS = (".jsonl", ".csv")


@dataclass
class ManifestRow:
    """One row of a scorer manifest: its 1-based `line` in the file, `key`, the KEY.json `record` (prompt and the
    label fields present), image `paths` as written; `problem`: why the row is bad before any image is read."""
    line: int
    key: str | None
    record: dict
    paths: list
    problem: str | None = None


def read_manifest(path):
    """The rows of a scorer manifest, JSON Lines or CSV, in file order, each checked as far as the row alone allows.

    A row: `prompt`, the label fields of `collate.LABELS` (none in a prediction manifest), `images` (JSON: a list of
    paths; CSV: one column, paths separated by `;`) and an optional `key` (default: the row's index, zero-padded).
    CSV labels are numbers as training reads them from json: a "value" a float, a "class" an int. A bad row keeps
    its line and `problem` (malformed JSON, an `images` that is no list of paths, an unparsable CSV number, a key
    webdataset cannot keep or that an earlier row holds); the file itself unreadable raises DataError.
    """
    p = Path(path)
    if p.suffix.lower() not in MANIFEST_FORMATS:
        raise DataError(f"{path}: unknown manifest format {p.suffix!r} (use .jsonl or .csv)")
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark (Excel's CSV) is no header
            rows = list(_jsonl_rows(f) if p.suffix.lower() == ".jsonl" else _csv_rows(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return _keyed(rows)


def manifest_rows(records):
    """`read_manifest` of rows held in memory: dicts as a JSON Lines manifest holds them, where an image may also
    be a PIL image. A row's `line` is its index in `records`."""
    from PIL import Image

    return _keyed([_record_row(i, record, (str, Image.Image)) for i, record in enumerate(records)])


def _keyed(rows):
    """`rows` with their keys: the default ones given, those webdataset cannot keep or an earlier row holds made
    the row's problem."""
    from webdataset.tariterators import base_plus_ext

    width, holders = max(6, len(str(len(rows) - 1))), {}
    for index, row in enumerate(rows):
        if row.key is None:
            row.key = f"{index:0{width}d}"
        if row.problem is not None:
            continue
        if "." in row.key:
            row.problem = f"key {row.key!r} contains a dot (webdataset splits keys at the first dot)"
        elif base_plus_ext(f"{row.key}.json") != (row.key, "json"):
            row.problem = f"key {row.key!r} cannot name webdataset members (KEY.json)"
        elif row.key in holders:
            row.problem = f"key {row.key!r} is already the key of line {holders[row.key]}"
        else:
            holders[row.key] = row.line
    return rows


def _jsonl_rows(f):
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield ManifestRow(line, None, {}, [], f"malformed JSON: {e.msg}")
            continue
        yield _record_row(line, row)


def _record_row(line, row, image_types=(str,)):
    """The ManifestRow of one decoded JSON row (`image_types`: what an entry of its `images` may be)."""
    if not isinstance(row, dict):
        return ManifestRow(line, None, {}, [], f"expected a JSON object, got {type(row).__name__}")
    key, paths, problem = row.get("key"), row.get("images", []), None
    if key is not None and not isinstance(key, str):
        key, problem = None, f"field 'key': expected a string, got {type(key).__name__}"
    if not isinstance(paths, list) or not all(isinstance(x, image_types) for x in paths):
        paths, problem = [], problem or "field 'images': expected a list of paths"
    return ManifestRow(line, key, {k: row[k] for k in ("prompt", *LABELS) if k in row}, paths, problem)


def _csv_rows(f):
    import csv

    reader = csv.DictReader(f)
    if reader.fieldnames is None:  # reads the header, so line_num counts the lines before each row from here on
        return
    while True:
        line = reader.line_num + 1  # where the next row starts (a quoted cell may span lines)
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{f.name}: line {line}: malformed CSV: {e}") from None
        record, problem = {}, None
        if row.get("prompt") is not None:
            record["prompt"] = row["prompt"]
        for name, kind in LABELS.items():
            text = (row.get(name) or "").strip()
            if not text:  # an empty cell is no label: a prediction row, or training's own "missing field"
                continue
            try:
                record[name] = float(text) if kind == "value" else int(text)
            except ValueError:
                wanted = "a number" if kind == "value" else "an integer"
                problem = problem or f"column '{name}': {text!r} is not {wanted}"
        paths = [x.strip() for x in (row.get("images") or "").split(";") if x.strip()]
        yield ManifestRow(line, (row.get("key") or "").strip() or None, record, paths, problem)


def manifest_sample(row, image_root):
    """The webdataset sample `row` (a good ManifestRow) becomes: `{"__key__", "json": bytes, "0.jpg": bytes, ...}`,
    each image file's own bytes under its lower-case extension, paths relative to `image_root` or absolute (a PIL
    image, from `manifest_rows`: its pixels as PNG, lossless). Raises DataError naming the path of a missing,
    unreadable or extension-less image file."""
    sample = {"__key__": row.key, "json": json.dumps(row.record, ensure_ascii=False).encode()}
    for i, name in enumerate(row.paths):
        if not isinstance(name, str):
            sample[f"{i}.png"] = _png(name, i)
            continue
        path = os.path.join(image_root, name)
        ext = os.path.splitext(name)[1][1:].lower()
        if not IMAGE_MEMBER.match(f"{i}.{ext}"):
            raise DataError(f"{path}: no file extension to name the image member by (KEY.{i}.jpg, ...)")
        try:
            with open(path, "rb") as f:
                sample[f"{i}.{ext}"] = f.read()
        except FileNotFoundError:
            raise DataError(f"{path}: no such image file") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return sample


def _png(image, index):
    import io

    data = io.BytesIO()
    try:
        image.save(data, format="PNG")
    except OSError as e:  # a mode PNG cannot hold (CMYK): the caller converts it
        raise DataError(f"image {index}: a PIL image of mode {image.mode} cannot be kept as PNG ({e})") from None
    return data.getvalue()


def manifest_checked(row, image_root, check):
    """`check(sample)` (training's verdict on a sample, and what it makes of it) of the sample `row` becomes, or
    DataError with the row's problem in the words make_shards.py lists: the row's own problem, an image file that
    cannot be read, or check's own words after the path of the image they are about ("a/1.jpg: image .0.jpg: ...")."""
    import re

    if row.problem is not None:
        raise DataError(row.problem)
    sample = manifest_sample(row, image_root)
    try:
        return check(sample)
    except DataError as e:
        about = re.match(r"image \.(\d+)\.", e.problem)
        name = row.paths[int(about.group(1))] if about else None
        raise DataError((f"{os.path.join(image_root, name)}: " if isinstance(name, str) else "") + e.problem) \
            from None


class ManifestSource:
    """A manifest read like one shard of a ShardStream (prediction without shards): its rows are that shard's
    samples, in order, so the stream deals, batches, orders and counts them as it does a shard's, bad ones too. Each
    row's image files are read and checked where the stream encodes it (the DataLoader workers), by the slot it is
    dealt to only. A bad row is a bad sample named as make_shards.py names it, after the stream's one shard (the
    manifest's path): `FILE: line N: problem`. `rows`: `read_manifest`'s or `manifest_rows`'s; `where`: "line" for
    a file's line numbers, "row" for the indices of rows in memory."""

    def __init__(self, rows, image_root, where="line"):
        self.rows, self.image_root, self.where = rows, image_root, where

    @classmethod
    def from_file(cls, path, image_root=None):
        """The manifest at `path`, image paths relative to `image_root` (default: the manifest's folder)."""
        return cls(read_manifest(path), image_root or os.path.dirname(os.path.abspath(path)))

    def attach(self, stream):
        """Make `stream` (its shards: [the manifest's path]) read these rows, each sample encoded by its encoder."""
        stream.read, stream.count = self.read, self.count
        stream.encoder = functools.partial(self.encode, stream.encoder)
        return stream

    def read(self, shard, wanted=None):
        # the stream names a bad sample by its __key__ (BadSample): here the row's line; the row's key is its sample's
        for i, row in enumerate(self.rows):
            yield {"__key__": f"{self.where} {row.line}", "row": i} if wanted is None or wanted(i) else None

    def encode(self, encoder, item):
        return manifest_checked(self.rows[item["row"]], self.image_root, encoder)

    def count(self, shards):
        return [len(self.rows)]


# ----------------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------------

def _split_top_level_commas(spec):
    """Split "a,b{0,1}.tar" on the commas outside braces: ["a", "b{0,1}.tar"]."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in parts + [current] if p.strip()]


def expand_shards(spec, allow_pipe=False):
    """The shard list a `--*_shards` value names, in order and without repeats.

    `spec` mixes brace patterns (`data/train-{000000..000099}.tar`), globs (`data/*.tar`) and comma lists. Local
    paths must exist; URLs that webdataset streams (`http://...`, `s3://...` through its handlers) are passed through
    unchecked. An empty spec, a glob that matches nothing, or a named file that does not exist raise DataError: none
    of them is a run anyone meant to start. So does a `pipe:` shard, which runs a shell command, unless `allow_pipe`.
    """
    import glob

    import braceexpand

    items = _split_top_level_commas(spec or "")
    if not items:
        raise DataError("empty shard list")
    shards = []
    for item in items:
        for path in braceexpand.braceexpand(item):
            if path.startswith("pipe:") and not allow_pipe:
                raise DataError(f"{path}: a pipe: shard runs a shell command; pass --allow_pipe_shards if you wrote it")
            if "://" in path or path.startswith("pipe:"):
                shards.append(path)
            elif any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f"{path}: pattern matches no file")
                shards += matches
            elif not os.path.isfile(path):
                raise DataError(f"{path}: no such shard file")
            else:
                shards.append(path)
    return list(dict.fromkeys(shards))


def shard_samples(shard, wanted=None):
    """The samples of one shard (local path or URL) in order: `{"__key__": key, "__url__": shard, "json": bytes,
    "0.jpg": bytes, ...}`.

    The one tar reader of the project (webdataset's own), for training, evaluation and token_stats.py alike.
    `wanted(index)`: which samples the caller uses (index in the shard); the others come as None, and in an
    uncompressed local shard their members are not read at all: the reader seeks past them by their tar headers, so
    a stream slot that keeps every n-th sample reads about 1/n of the shard. A URL or a compressed shard cannot seek:
    it is read whole.
    """
    from webdataset.tariterators import tarfile_samples

    try:
        tar = _random_access(shard) if wanted is not None else None
        if tar is None:
            for i, sample in enumerate(tarfile_samples([{"url": shard}])):
                yield sample if wanted is None or wanted(i) else None
            return
        with tar:
            yield from _seeking_samples(tar, shard, wanted)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: tarfile and gopen raise many types
        raise DataError(f"{shard}: cannot read as a tar shard ({type(e).__name__}: {e})") from None


def _random_access(shard):
    """`shard` opened as an uncompressed local tar (its first header read), or None: a URL or a compressed file is
    read as a stream (and a file that is no tar at all is left to the stream reader to name)."""
    import tarfile

    if not os.path.isfile(shard):
        return None
    try:
        return tarfile.open(shard, "r:")
    except tarfile.ReadError:
        return None


def _seeking_samples(tar, shard, wanted):
    """`shard_samples` of an open uncompressed tar: the members webdataset keeps, grouped into samples by
    webdataset's own `group_by_keys`, but only those of wanted samples read (a sample is a run of members with one
    key, as there)."""
    import re

    from webdataset.tariterators import base_plus_ext, group_by_keys

    def files():
        index, key = -1, None
        for member in tar:  # random access: each header is read, the data between them seeked over
            # what webdataset's tar_file_iterator skips (its default skip_meta)
            if not member.isreg() or re.match(r"__[^/]*__($|/)", member.name):
                continue
            prefix = base_plus_ext(member.name)[0]
            if prefix is None:
                continue
            if prefix != key:
                index, key = index + 1, prefix
            yield {"fname": member.name, "__url__": shard,
                   "data": tar.extractfile(member).read() if wanted(index) else None}

    for i, sample in enumerate(group_by_keys(files())):
        yield sample if wanted(i) else None


def count_samples(shards, most_images=False):
    """Samples in local shards, from their tar headers alone (no member is read: a 1 GB shard costs a few seeks).
    `most_images`: (samples, the most images one sample has), from the same headers (its `KEY.<index>.<ext>`)."""
    counts = [_count_one(shard) for shard in shards]
    total = sum(n for n, _ in counts)
    return (total, max((most for _, most in counts), default=0)) if most_images else total


def label_statistics(shards, classes):
    """The training labels of local shards, from their json members alone (no image is read): {value label: (n,
    mean, population standard deviation)} and {class label: counts of each of its `classes[label]` classes}. A
    sample training would refuse for its json (collate.parse_vl_sample) is left out, as training skips it."""
    import tarfile
    import zlib

    import numpy as np

    values = {name: [] for name, kind in LABELS.items() if kind == "value"}
    counts = {name: [0] * classes[name] for name, kind in LABELS.items() if kind == "class"}
    for shard in shards:
        if not os.path.isfile(shard):
            raise DataError(f"{shard}: not a local file, so its labels cannot be counted (pass --score_mean and "
                            f"--score_std, or --score_norm none)")
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not (member.isreg() and member.name.endswith(".json")):
                        continue
                    try:
                        labels = parse_vl_sample({"json": tar.extractfile(member).read()}, classes).labels
                    except DataError:
                        continue
                    for name, value in labels.items():
                        if name in values:
                            values[name].append(value)
                        else:
                            counts[name][value] += 1
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # unreadable, cut short, damaged
            raise DataError(f"{shard}: cannot read as a tar shard ({type(e).__name__}: {e})") from None
    stats = {name: (len(v), float(np.mean(v)) if v else float("nan"), float(np.std(v)) if v else float("nan"))
             for name, v in values.items()}
    return stats, counts


def samples_per_shard(shards):
    """`count_samples` of each shard, in order."""
    return [_count_one(shard)[0] for shard in shards]


def _count_one(shard):
    if not os.path.isfile(shard):
        raise DataError(f"{shard}: not a local file, so its samples cannot be counted (pass --epoch_samples)")
    stat = os.stat(shard)
    return _counted(shard, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _counted(shard, size, mtime_ns):
    """(samples, most images in a sample) of a shard as it is now (its size and time in the key): counted once per
    process, though the run start, the feature-cache build and every evaluation's progress bar all ask (a header
    scan reads every member's header: thousands of reads a shard, again at each evaluation otherwise)."""
    import tarfile
    from collections import Counter

    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(shard) as tar:
            names = [base_plus_ext(m.name) for m in tar if m.isreg()]
    except tarfile.TarError as e:
        raise DataError(f"{shard}: cannot read as a tar shard ({e})") from None
    keys = [k for k, _ in names if k is not None]
    images = Counter(k for k, ext in names if k is not None and IMAGE_MEMBER.match(ext.lower()))
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]), max(images.values(), default=0)


@dataclass
class BadSample:
    """A sample the stream could not use: where it is and why. `fatal`: the stream itself cannot go on (an
    unreadable shard, or a rank left without any usable sample), whatever `--on_bad_sample` says."""
    shard: str | None
    key: str | None
    problem: str
    fatal: bool = False
    index: int | None = field(default=None, compare=False)  # its position in the shard
    length: int | None = field(default=None, compare=False)  # the length bucketing gave it (`length_of`)

    def __str__(self):  # the one error line for a bad sample, in training and in token_stats.py
        return (f"{self.shard}: {self.key}: " if self.shard else "") + self.problem


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from webdataset shards, split over `world_size` ranks x DataLoader workers ("slots").

    With at least as many shards as slots, each slot reads its own shards; with fewer, every slot goes through all of
    them and keeps every n-th sample, so even one shard splits exactly over two ranks (a slot reads only its own
    samples' members of a local shard: `shard_samples`). Exact mode (`batches_per_epoch` None): each slot yields its
    samples once, in order. Training mode: each slot cycles through its share, reshuffled every pass, and the workers
    of a rank yield `batches_per_epoch` full batches between them, so every rank runs the same number of steps (after
    a fatal error too: the rest are batches of no sample that carry the error); a resumed run starts the epoch at its
    step (`resume_at`). A batch is `collate_vl`'s dict plus `order` ((shard,
    index) per sample) and `bad_samples` (BadSample list) that the main process counts or turns into an error;
    `stop_at_bad` ends an exact stream at its first bad sample (no point reading on when the run will stop).

    `length_of(sample)`: the token length of a raw sample; given, training batches are bucketed by it (within
    each slot's pool of a shuffle buffer, in length bands the ranks draw alike at each step, see `_Bands`) and
    every batch also carries `lengths` (per sample, like `order`).
    `read(shard, wanted)` yields a shard's samples (None where `wanted(index)` is false, or any stand-in: those are
    not used) and `collate(features, pad_token_id)` makes a batch: the tar reader and collate_vl, or another source
    of the same samples (feature_cache.py: cached features, same order; ManifestSource: a manifest's rows).
    `count(shards)`: their samples per shard, for progress bars (default: from local shards' tar headers).
    """

    def __init__(self, shards, encoder, batch_size, pad_token_id, rank=0, world_size=1, batches_per_epoch=None,
                 seed=0, shuffle_buffer=0, stop_at_bad=False, length_of=None, read=shard_samples, collate=collate_vl,
                 count=samples_per_shard):
        super().__init__()
        self.shards, self.encoder, self.batch_size, self.pad_token_id = shards, encoder, batch_size, pad_token_id
        self.rank, self.world_size, self.batches_per_epoch = rank, world_size, batches_per_epoch
        self.seed, self.shuffle_buffer, self.stop_at_bad, self.epoch = seed, shuffle_buffer, stop_at_bad, 0
        self.length_of, self.read, self.collate, self.count = length_of, read, collate, count
        self.start, self.bad_before = 0, set()  # see resume_at

    def set_epoch(self, epoch):
        self.epoch, self.start = epoch, 0

    def resume_at(self, batches, bad):
        """Start this epoch's training stream at its batch `batches` (this rank's), as a resumed run needs, without
        encoding the batches before it: their samples are still read and dealt (bucketing needs their lengths,
        which come from headers) but no image of theirs is decoded. Where those batches ended depends on which of
        their samples encoding refused; `bad` says which ((shard, index in shard) of each, as the run that trained
        them met them, e.g. recorded in its checkpoints): they are left out, so every batch ends where it ended and
        the batches from `batches` on are those of an uninterrupted epoch. A position missing from `bad` would
        shift them. `set_epoch` starts the next epoch at its first batch."""
        self.start, self.bad_before = batches, set(bad)

    def __len__(self):  # batches per rank per epoch; exact streams have no length known in advance
        if self.batches_per_epoch is None:
            raise TypeError("an exact stream has no length")
        return self.batches_per_epoch

    def share(self, counts, workers):
        """How many samples an exact pass gives this rank, from each shard's sample count (`samples_per_shard`)
        and the loader's worker count: the dealing of `__iter__`, counted instead of read."""
        slots, first = self.world_size * workers, self.rank * workers
        if len(counts) < slots:  # dealt by sample: the n-th sample of the shards in order goes to slot n % slots
            return sum(len(range(slot, sum(counts), slots)) for slot in range(first, first + workers))
        return sum(sum(counts[slot::slots]) for slot in range(first, first + workers))

    def _raw(self, shard_ids, slot, slots, sample_level):
        """(shard id, index in shard, raw sample, its length or None) of this slot, shards in the given order."""
        n = 0
        for sid in shard_ids:  # dealt by sample: the reader skips the other slots' samples unread
            wanted = (lambda i, first=n: (first + i) % slots == slot) if sample_level else None
            for i, sample in enumerate(self.read(self.shards[sid], wanted)):
                if not sample_level or n % slots == slot:
                    yield sid, i, sample, self.length_of(sample) if self.length_of else None
                n += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # batch j of the epoch comes from worker j % n; the loader asks worker 0 first, so after a resume at batch
        # `start` each worker takes over the share of the one `start` places later
        worker = (worker + self.start) % workers
        slots, slot = self.world_size * workers, self.rank * workers + worker
        ids = list(range(len(self.shards)))
        if self.batches_per_epoch is not None:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(ids)  # the same permutation in every slot
        sample_level = len(ids) < slots
        mine = ids if sample_level else ids[slot::slots]
        if self.batches_per_epoch is None:
            return self._batches(self._raw(mine, slot, slots, sample_level), None)
        quota = len(range(worker, self.batches_per_epoch, workers))
        skip = len(range(worker, self.start, workers))  # this share's batches before the resumed one
        # bucketed, the slot's length bands: drawn from the seed, the epoch and the worker index, not the rank
        bands = _Bands(self.batch_size, self.shuffle_buffer,
                       random.Random(f"{self.seed}/{self.epoch}/bands/{worker}")) if self.length_of else None
        return (self._batches(self._cycle(mine, slot, slots, sample_level, bands), quota, skip, bands)
                if quota > skip else iter(()))

    def _cycle(self, mine, slot, slots, sample_level, bands):
        """Endless training samples of one slot: pass after pass over its share, each pass in a new order.

        Slots split by sample keep the epoch's shard order in every pass: the n-th sample then always belongs to the
        same slot, so the ranks' shares stay disjoint even when one rank wraps around before another. Bucketed, the
        passes go through `bands` (`_Bands`): the k-th batch of worker w is the same band of its pool on every rank,
        so the ranks' batches of one step are of similar length.
        """
        rng, n_pass = random.Random(f"{self.seed}/{self.epoch}/{slot}"), 0
        while True:
            order = list(mine)
            if not sample_level:
                random.Random(f"{self.seed}/{self.epoch}/{slot}/{n_pass}").shuffle(order)
            items = _shuffled(self._raw(order, slot, slots, sample_level), self.shuffle_buffer, rng)
            yield from bands(items) if bands else items
            yield None, mine, None, None  # end of a pass: no shard, the pass's shard ids, no sample
            n_pass += 1

    def _batches(self, items, quota, skip=0, bands=None):
        """Encoded batches of `items` until `quota` batches are made, the first `skip` of them only counted out
        (`resume_at`); `bands` (bucketed) hears of each sample a batch loses."""
        features, order, lengths, bad, made, good_in_pass = [], [], [], [], 0, 0
        try:
            for sid, index, sample, length in items:
                if sample is None:  # a training pass over this slot's share ended; `index` holds its shard ids
                    if not good_in_pass:
                        raise DataError(f"{', '.join(self.shards[i] for i in index) or 'training shards'}: no usable "
                                        f"sample for rank {self.rank} (all bad, or fewer than ranks x workers)")
                    good_in_pass = 0
                    continue
                if made < skip and (self.shards[sid], index) in self.bad_before:
                    if bands:  # as when it was refused: its batch took another sample of its band
                        bands.dropped()
                    continue  # refused when its batch was trained, and counted then
                try:
                    features.append(self.encoder(sample) if made >= skip else None)
                    order.append((sid, index))
                    lengths.append(length)
                    good_in_pass += 1
                except DataError as e:
                    bad.append(BadSample(self.shards[sid], sample.get("__key__"), str(e), index=index, length=length))
                    if bands:
                        bands.dropped()
                    if self.stop_at_bad:
                        break
                if len(features) == self.batch_size:
                    if made >= skip:
                        yield self._batch(features, order, lengths, bad)
                    features, order, lengths, bad, made = [], [], [], [], made + 1
                    if made == quota:
                        return
        except DataError as e:  # unreadable shard or no samples at all: fatal whatever the policy
            bad.append(BadSample(None, None, str(e), fatal=True))
        if made < skip:  # stopped while counting out a trained batch: its samples are not encoded, only the error
            features, order, lengths = [], [], []
        if features or bad:
            yield self._batch(features, order, lengths, bad)
        if bad and bad[-1].fatal and quota is not None:
            # A training stream keeps its rank in step with the others: the rest of its batches carry only the
            # error, so the trainer can run stand-in steps until every rank stops together (a rank that left at
            # once would leave the others in a collective, to fail with the library's traceback).
            for _ in range(quota - max(made, skip) - 1):
                yield self._batch([], [], [], [bad[-1]])

    def _batch(self, features, order, lengths, bad):
        batch = {**(self.collate(features, self.pad_token_id) if features else {}), "order": order, "bad_samples": bad}
        return {**batch, "lengths": lengths} if self.length_of else batch


def _shuffled(items, size, rng):
    """Shuffle a stream through a buffer of `size` items."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class _Bands:
    """Batches of similar length, in bands that every rank draws alike. Each slot sorts its items by length
    (`item[3]`) in a pool of `window` items (a shuffle buffer's worth, at least one batch); whenever the pool is full
    the next batch is taken from it: the pool is cut into blocks of a batch, and `schedule` (a random.Random seeded
    without the rank) picks the block by its place in the length order, one draw per batch. So the k-th batch of a
    worker is the same quantile of its own pool on every rank: the ranks of one step wait for similar lengths, not
    for whichever rank drew the longest bucket, while the bands follow each other at random. Every item is equally
    likely to be taken at each batch, and the pool refills from the stream. At the end of a pass (`__call__`'s
    items) the pool is emptied the same way, so one pass's items stay in that pass; a batch a pass leaves unfilled
    is filled from the next one at the same band, and so is a batch that lost a bad sample (`dropped`): otherwise
    the slot's later batches would each straddle two draws (at 1% bad samples, 8 ranks' steps cost 1.6x more tokens
    than aligned). Lengths come from the raw samples (collate.VLEncoder.length), so the pool holds compressed
    images, not pixel values (about 25 MB per 1024-token image)."""

    def __init__(self, batch_size, window, schedule):
        self.batch_size, self.schedule = batch_size, schedule
        self.window = max(window - window % batch_size, batch_size)
        self.filled, self.band = 0, 0.0  # items of the current batch already given, and its band (a quantile)

    def __call__(self, items):
        pool = []
        for item in items:
            bisect.insort(pool, item, key=_length)  # after equal lengths: they keep their shuffled order
            if len(pool) == self.window:
                yield from self._take(pool)
        while pool:
            yield from self._take(pool)

    def _take(self, pool):
        if not self.filled:
            self.band = self.schedule.random()
        size = min(self.batch_size - self.filled, len(pool))
        blocks = len(pool) // size
        start = int(self.band * blocks) * (len(pool) - size) // max(blocks - 1, 1)
        taken, pool[start:start + size] = pool[start:start + size], []
        for item in taken:
            self.filled = (self.filled + 1) % self.batch_size
            yield item

    def dropped(self):
        """The item just given was a bad sample, left out of its batch: the batch takes one more from its band."""
        self.filled = (self.filled - 1) % self.batch_size


def _length(item):
    return item[3]


def make_loader(stream, args):
    """A DataLoader over a ShardStream, not accelerator.prepare()d: each rank reads its own shards (no batches
    dispatched from rank 0, whose slicing would also break the concatenated pixel_values). `args`: the Trainer's
    TrainingArguments (workers, pinning, prefetch)."""
    workers = args.dataloader_num_workers
    return torch.utils.data.DataLoader(
        stream, batch_size=None, collate_fn=_as_is, num_workers=workers, worker_init_fn=_leave_stop_signals,
        pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        multiprocessing_context=(args.dataloader_multiprocessing_context or worker_context()) if workers else None)


def worker_context():
    """Where DataLoader workers start: a fork server, not a fork of the training process. That process runs threads
    (gloo's or NCCL's, tokenizers', the DataLoader's own): a fork while one of them holds a lock of the interpreter
    leaves the worker stuck for good (seen: a worker hung inside os.fork's child handlers, and one whose result never
    reached the training process, right after a collective), and the run with it. The fork server is a fresh
    single-threaded process that has imported what the workers use once, so a worker still starts in a moment."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "data", "collate", "feature_cache"])
    return context


def _leave_stop_signals(worker_id):
    """Loader workers ignore SIGTERM and SIGINT: torchrun sends them to each rank's whole process group, and a worker
    killed by one would fail the step its rank must finish before a graceful stop (reliability.GracefulStop). The
    workers still end with their rank."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def _as_is(batch):  # streams yield whole batches; the default collate would turn their tuples into lists
    return batch
