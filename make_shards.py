"""Make train_scorer.py's webdataset shards from your own files: a manifest (JSON Lines or CSV) and image files.

Each manifest row becomes one sample: `KEY.json` = {"prompt", and the label fields of collate.LABELS: "score",
"type"} and the row's images `KEY.0.jpg`, `KEY.1.png`, ... in list order, with their original bytes (no re-encoding)
under their lower-case extension. Every row is checked as training checks a sample (the json fields, each image
decoded whole, its resize; the same functions, the same words), plus what only a manifest can get wrong: a missing
or unreadable image file, a key webdataset cannot keep (a dot in it) or a duplicate key. The same manifest and flags
give byte-identical shards. It ends with the `--train_shards` pattern to pass to train_scorer.py. What needs the
processor is not checked here: a sample's tokens against --max_len (token_stats.py on the shards counts them).

  # JSON Lines: one object a line; images relative to --image_root (default: the manifest's folder) or absolute
  #   {"prompt": "Rate the photo.", "score": 7.5, "type": 2, "images": ["a/1.jpg", "b/2.png"], "key": "x17"}
  python make_shards.py --manifest items.jsonl --output_dir shards/ --prefix train --shuffle_seed 0

  # CSV: a header row; `images` holds the paths separated by `;`; `key` is optional
  #   prompt,score,type,images
  #   Rate the photo.,7.5,2,a/1.jpg;b/2.png
  python make_shards.py --manifest items.csv --image_root /data/photos --output_dir shards/ --prefix val \\
      --max_shard_bytes 500000000 --num_types 5

  # prediction data (prompt and images, no labels)
  python make_shards.py --manifest new.jsonl --output_dir shards/ --prefix test --with_labels false
"""

import io
import os
import random
import re
import sys
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from collate import DataError, decode_vl_sample, pixel_bounds_problem
from data import manifest_checked, read_manifest
from plumbing import fail, parse_arguments

DEFAULT_SAMPLES_PER_SHARD = 1000


@dataclass
class ShardArguments:
    manifest: str = field(default=None, metadata={
        "help": "The rows: a .jsonl file (one JSON object a line) or a .csv file (a header row). Fields: prompt, the "
                "labels (score: a number, type: an integer), images (JSON: a list of paths; CSV: paths separated by "
                "';'; none or empty: a text-only sample), key (optional; default: the row's index, zero-padded). "
                "Other fields are left out."})
    output_dir: str = field(default=None, metadata={"help": "Folder of the shards (made if missing)."})
    prefix: str = field(default="train", metadata={"help": "Shard names: PREFIX-000000.tar, PREFIX-000001.tar, ..."})
    image_root: str = field(default=None, metadata={
        "help": "Folder relative image paths start from (default: the manifest's folder)."})
    samples_per_shard: int = field(default=None, metadata={
        "help": f"Samples per shard (default {DEFAULT_SAMPLES_PER_SHARD} unless --max_shard_bytes is given). Many "
                f"shards of similar sizes spread evenly over ranks x DataLoader workers."})
    max_shard_bytes: int = field(default=None, metadata={
        "help": "A shard closes before it would grow beyond this many bytes (a sample larger than that alone gets "
                "a shard of its own). With --samples_per_shard too, whichever limit comes first."})
    shuffle_seed: int = field(default=None, metadata={
        "help": "Write the rows in an order shuffled with this seed (default: manifest order). Training shuffles "
                "only within a buffer of samples (--shuffle_buffer) over shards read in random order, so rows that "
                "sit together in the manifest (one class, one source) stay near each other unless the shards are "
                "shuffled here. Keys keep their manifest row number."})
    on_bad_row: str = field(default="skip", metadata={
        "help": "skip: leave a bad row out, list it (FILE: line N: problem) and count it in the summary; error: "
                "exit 2 at the first bad row, leaving no shard of this run behind.",
        "choices": ["skip", "error"]})
    with_labels: bool = field(default=True, metadata={
        "help": "Check the label fields as training does (false for prediction data: prompt and images only)."})
    num_types: int = field(default=None, metadata={
        "help": "A 'type' outside 0..num_types-1 is a bad row, as in train_scorer.py (default: not checked)."})
    min_pixels: int = field(default=None, metadata={
        "help": "With --max_pixels: the pixel bounds you will train with (train_scorer.py's defaults are 65536 and "
                "1048576); an image that cannot be resized within them is a bad row. An image whose aspect ratio "
                "is over 200 is refused whatever the bounds (qwen_vl_utils refuses it), so it is always checked "
                "(default bounds: qwen_vl_utils' own)."})
    max_pixels: int = field(default=None, metadata={"help": "See --min_pixels."})
    num_workers: int = field(default=None, metadata={
        "help": "Threads reading and decoding the images (default: the cores); the output is the same for any "
                "number."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace the PREFIX-*.tar shards already in --output_dir (all of them, so none of an older, larger "
                "run is left for a glob to pick up); without it their presence is an error."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar (it goes to stderr)."})


# ---------------------------------------------------------------------------------------------------------------
# Data: each row -> its sample, checked (in threads, results in write order)
# ---------------------------------------------------------------------------------------------------------------

def check_row(row, args, image_root):
    """`(sample, None)` for a good row, `(None, problem)` for a bad one: the row's own problem, an image file that
    cannot be read, or training's verdict on the sample it would become (collate.decode_vl_sample), in the words of
    data.manifest_checked (which train_scorer.py's --predict_file shares)."""
    classes = {"type": args.num_types} if args.num_types else None

    def checked(sample):
        decode_vl_sample(sample, classes, args.with_labels, args.min_pixels, args.max_pixels)
        return sample

    try:
        return manifest_checked(row, image_root, checked), None
    except DataError as e:
        return None, e.problem


def in_order(fn, items, workers):
    """fn(item) for each item, computed by `workers` threads a few items ahead and yielded in item order (PIL
    decodes without holding the GIL); at most 4 x workers results wait in memory."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------------------------
# Shards: deterministic tars, split by samples and bytes
# ---------------------------------------------------------------------------------------------------------------

def member(name, size):
    """A tar header that holds nothing of the machine or the moment (time 0, owner root, no names), so the same
    samples give the same bytes anywhere."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def members(sample):
    """`[(TarInfo, bytes)]` of one sample, ordered as webdataset's TarWriter orders them (sorted: images, then
    json); a sample is a run of members with one key, whatever their order."""
    return [(member(f"{sample['__key__']}.{ext}", len(sample[ext])), sample[ext])
            for ext in sorted(sample) if ext != "__key__"]


def tar_bytes(payload):
    """Size of a tar file whose members take `payload` bytes (headers + data padded to blocks): two zero blocks
    end it, and tarfile pads the whole to its record size."""
    record = tarfile.RECORDSIZE
    return -(-(payload + 2 * tarfile.BLOCKSIZE) // record) * record


def member_bytes(info):
    return len(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")) + \
        -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class ShardWriter:
    """Writes samples to `folder/prefix-000000.tar`, ...: a shard closes when it holds `per_shard` samples or the
    next sample would take it beyond `max_bytes` (a shard has at least one sample)."""

    def __init__(self, folder, prefix, per_shard, max_bytes):
        self.folder, self.prefix, self.per_shard, self.max_bytes = folder, prefix, per_shard, max_bytes
        self.paths, self.tar, self.count, self.payload = [], None, 0, 0

    def add(self, sample):
        parts = members(sample)
        size = sum(member_bytes(info) for info, _ in parts)
        if self.tar is not None and ((self.per_shard and self.count >= self.per_shard) or (
                self.max_bytes and tar_bytes(self.payload + size) > self.max_bytes)):
            self.close()
        if self.tar is None:
            self.paths.append(os.path.join(self.folder, f"{self.prefix}-{len(self.paths):06d}.tar"))
            self.tar, self.count, self.payload = tarfile.open(self.paths[-1], "w", format=tarfile.PAX_FORMAT), 0, 0
        for info, data in parts:
            self.tar.addfile(info, io.BytesIO(data))
        self.count, self.payload = self.count + 1, self.payload + size

    def close(self):
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def pattern(self):
        """The brace pattern naming every shard written, as --train_shards takes it."""
        return os.path.join(self.folder, f"{self.prefix}-{{000000..{len(self.paths) - 1:06d}}}.tar")


def existing_shards(folder, prefix):
    import glob

    own = re.compile(re.escape(prefix) + r"-\d{6,}\.tar$")
    return sorted(p for p in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(prefix)}-*.tar"))
                  if own.match(os.path.basename(p)))


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def write_shards(args, rows, order, image_root, stale, workers):
    """Check the rows in `order` and write the good ones; returns (the ShardWriter, bad-row lines, images written).
    `stale`: this prefix's shards of an earlier run, removed first (--overwrite)."""
    from tqdm import tqdm

    for path in stale:
        os.remove(path)
    os.makedirs(args.output_dir, exist_ok=True)
    writer = ShardWriter(args.output_dir, args.prefix, args.samples_per_shard, args.max_shard_bytes)
    bad, images = [], 0
    results = in_order(lambda i: check_row(rows[i], args, image_root), order, workers)
    for i, (sample, problem) in zip(order, tqdm(results, total=len(rows), unit="row", file=sys.stderr,
                                                 disable=args.disable_tqdm or None, mininterval=0.5)):
        if problem is not None:
            bad.append(f"{args.manifest}: line {rows[i].line}: {problem}")
            if args.on_bad_row == "error":
                writer.close()
                for path in writer.paths:  # a shard set missing rows is no run anyone meant to start
                    os.remove(path)
                fail(bad[-1])
            continue
        writer.add(sample)
        images += len(rows[i].paths)
    writer.close()
    return writer, bad, images


def check_flags(args):
    if not args.manifest or not args.output_dir:
        fail("--manifest and --output_dir are required")
    if not args.prefix or any(c in args.prefix for c in "/{}*?[],") or "." in args.prefix:
        fail(f"--prefix {args.prefix!r}: use a plain name (no dots, slashes, braces, commas or glob characters)")
    for name in ("samples_per_shard", "max_shard_bytes", "num_workers", "num_types"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be positive")
    if problem := pixel_bounds_problem(args.min_pixels, args.max_pixels):  # before qwen_vl_utils asserts on a row
        fail(problem)
    if args.samples_per_shard is None and args.max_shard_bytes is None:
        args.samples_per_shard = DEFAULT_SAMPLES_PER_SHARD
    if not os.path.isfile(args.manifest):
        fail(f"{args.manifest}: no such manifest file")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        fail(f"--image_root {args.image_root}: no such folder")
    found = existing_shards(args.output_dir, args.prefix)
    if found and not args.overwrite:
        fail(f"{args.output_dir} already holds {len(found)} shard(s) named {args.prefix}-*.tar "
             f"({os.path.basename(found[0])}, ...); pass --overwrite to replace them, or another --prefix")
    return found


def main(argv=None):
    start = time.time()
    (args,) = parse_arguments(HfArgumentParser(ShardArguments), argv)
    stale = check_flags(args)
    image_root = args.image_root if args.image_root is not None else os.path.dirname(os.path.abspath(args.manifest))
    workers = args.num_workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count())
    try:
        rows = read_manifest(args.manifest)
    except DataError as e:
        fail(e)
    order = list(range(len(rows)))
    if args.shuffle_seed is not None:
        random.Random(args.shuffle_seed).shuffle(order)
    try:
        writer, bad, images = write_shards(args, rows, order, image_root, stale, workers)
    except OSError as e:  # an output folder that cannot be written
        fail(f"{e.filename or args.output_dir}: {e.strerror or e}")
    good = len(rows) - len(bad)
    if bad:
        print(f"{len(bad)} bad row(s) left out:\n  " + "\n  ".join(bad))
    if not good:
        fail(f"{args.manifest}: no good row, no shard written")
    sizes = [os.path.getsize(p) for p in writer.paths]
    print(f"summary ({time.time() - start:.1f}s): {good} samples ({images} images) in {len(writer.paths)} shards "
          f"of {min(sizes):,} to {max(sizes):,} bytes in {args.output_dir}"
          + (f", rows shuffled with seed {args.shuffle_seed}" if args.shuffle_seed is not None else ""))
    pattern = writer.pattern()
    print(f"--train_shards '{pattern}'  # {good} samples, {len(writer.paths)} shards, {len(bad)} bad rows left out")
    return {"pattern": pattern, "shards": writer.paths, "samples": good, "images": images, "bad": bad}


if __name__ == "__main__":
    main()
