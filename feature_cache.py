"""A frozen backbone's features, computed once: each sample's pooled last-token hidden state, kept per shard, so that
head-only training (train_scorer.py --freeze_backbone) runs the backbone once, not at every epoch and evaluation.

One file per shard, `DIR/<shard file name>-<hash of its path>.safetensors`: `features` (one row per usable sample,
in the backbone's compute dtype) and one tensor per label, plus metadata: the fingerprint, and every sample of the
shard in order (key, length for bucketing, and the problem of each bad one), so a stream over the cache deals,
shuffles, buckets and skips exactly as a stream over the shards would. The fingerprint is the settings that shape a
feature (base model and its config, weight files, dtype, processor, pixel bounds, max_len, label checks) and the
shard's path, size and modification time: a file whose fingerprint differs, or that cannot be read, is rebuilt, with
one line saying why. Files are written under a temporary name and renamed (a crash never leaves half a file).
Features are held in memory when they fit (`memory_budget`), else read from the memory-mapped files as needed.

Nobody else does this: TRL, LLaMA-Factory and ms-swift cache tokenization at most, never frozen-backbone features.
"""

import hashlib
import json
import os

import torch

from collate import LABELS, DataError, collate_features
from data import samples_per_shard
from plumbing import fail, log, wait_for_every_rank
from reliability import first_problem, rank_0s


def _sha(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def settings(model, processor, model_args, data_args, compute, classes):
    """What shapes a cached feature, besides the shard itself. `model`: the scorer (its backbone's checkpoint is
    `config.scorer_base_model` when frozen); `compute`: how the backbone computes (dtype, autocast)."""
    config = model.config
    base = config.scorer_base_model or model_args.model_name_or_path
    weights = sorted((f, os.path.getsize(os.path.join(base, f)), os.path.getmtime(os.path.join(base, f)))
                     for f in os.listdir(base) if f.endswith((".safetensors", ".bin"))) if os.path.isdir(base) else []
    tokenizer = processor.tokenizer
    return {"base_model": base, "weight_files": weights, "compute": compute,
            "backbone_config": _sha({"text": config.text_config.to_dict(), "vision": config.vision_config.to_dict()}),
            "attn_implementation": model_args.attn_implementation,
            "processor": _sha({"image": processor.image_processor.to_dict(), "template": processor.chat_template,
                               "tokenizer": [type(tokenizer).__name__, len(tokenizer), tokenizer.pad_token_id]}),
            "decoding": "qwen_vl_utils.to_rgb",  # collate.open_image's rule: caches of an older rule are rebuilt
            "min_pixels": data_args.min_pixels, "max_pixels": data_args.max_pixels, "max_len": data_args.max_len,
            "classes": classes}


class FeatureCache:
    """The cache folder for one set of `settings`: which shards it covers, loading them, storing new ones."""

    def __init__(self, folder, settings):
        self.folder, self.settings, self.entries = folder, settings, {}  # {shard: [sample entry, ...]}
        self._opened = {}  # {(process id, file): a mapped `features` tensor}, for caches read from disk

    def path(self, shard):
        name = os.path.basename(shard).removesuffix(".tar")
        return os.path.join(self.folder, f"{name}-{hashlib.sha256(os.path.abspath(shard).encode()).hexdigest()[:12]}"
                                         f".safetensors")

    def fingerprint(self, shard):
        stat = os.stat(shard)
        return {"settings": _sha(self.settings), "shard": os.path.abspath(shard), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}

    def load(self, shards, read=True):
        """Read the valid files of `shards`: into memory when they fit (see `memory_budget`), else memory-mapped,
        a row read when its sample is; returns the others (not cached yet, or a file that cannot be used: one line
        each). `read` off: only check which files are valid (their headers)."""
        from safetensors import safe_open

        files = [self.path(s) for s in shards if s not in self.entries and os.path.exists(self.path(s))]
        size = sum(os.path.getsize(f) for f in files)
        mapped = size > memory_budget()
        if mapped and read:
            log(f"feature cache: {size / 2**30:.1f} GiB in {len(files)} files, more than this process should hold: "
                f"features are read from the files as needed (memory-mapped, shared by the processes of a node)")
        missing = []
        for shard in shards:
            if shard in self.entries:
                continue
            path = self.path(shard)
            if not os.path.exists(path):
                missing.append(shard)
                continue
            try:
                with safe_open(path, "pt") as f:
                    meta = f.metadata()
                    if json.loads(meta["fingerprint"]) != self.fingerprint(shard):
                        raise _Stale("its shard or the settings changed since it was written")
                    if not read:
                        continue
                    tensors = {name: f.get_tensor(name) for name in LABELS}
                    if mapped:  # each good sample's row number in this file, read by `encode`
                        rows = f.get_slice("features").get_shape()[0]
                        tensors["features"] = [(path, i) for i in range(rows)]
                    else:
                        tensors["features"] = f.get_tensor("features")
                    self.entries[shard] = _entries(json.loads(meta["samples"]), tensors)
            except _Stale as e:
                log(f"feature cache: {path}: {e}; not used")
                missing.append(shard)
            except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways; it is rebuilt, never trusted
                log(f"feature cache: {path}: unreadable ({type(e).__name__}: {e}); not used")
                missing.append(shard)
        return missing

    def load_agreed(self, shards, read=True):
        """`load` on every rank, and the shards rank 0 could not use, the same on every rank: ranks that computed
        different shards would wait for each other forever. A rank that cannot read a file rank 0 read (the cache
        folder on a node-local disk) exits 2 on every rank with one line."""
        mine = self.load(shards, read)
        missing = rank_0s(mine)
        rank, unread = first_problem(next((self.path(s) for s in mine if s not in missing), None))
        if unread:
            fail(f"feature cache: process {rank} cannot read {unread}, which process 0 read: every node must see the "
                 f"same --feature_cache folder (a shared filesystem)", every_rank=True)
        return missing

    def fill(self, shards, features_pass, writer, chunk_samples=None):
        """Make the cache cover `shards` (local files): the files it lacks are computed a chunk of shards at a time
        (about `chunk_samples` samples, `CHUNK_SAMPLES` by default), each chunk's files written when it is done, so a
        run stopped during this pass (one backbone epoch at full size) keeps what it finished.
        `features_pass(chunk, desc)` is one exact pass over the chunk's samples on every rank, returning (rows,
        data.BadSample list): each good sample's `order`, `key`, `length`, `features` and `labels`, gathered on the
        `writer` only (the other ranks get none), and the bad samples on every rank. Only the writer holds a chunk's
        features, and only until its files are written; every rank then reads the files like any others
        (`load_agreed`: in memory when they fit, else memory-mapped). Before, every rank kept every feature it had
        computed in the first run: 8 KB a sample x 8 ranks, 350 GB a node for 5M samples."""
        missing = self.load_agreed(shards, read=False)
        chunks = list(_chunks(missing, samples_per_shard(missing), chunk_samples or CHUNK_SAMPLES))
        if missing:
            log(f"feature cache: computing the backbone's features of {len(missing)} shard(s) once, into "
                f"{self.folder}, in {len(chunks)} part(s)")
        for i, chunk in enumerate(chunks):
            rows, bad = features_pass(chunk, f"feature cache, part {i + 1} of {len(chunks)}")
            if fatal := next((b for b in bad if b.fatal), None):  # every rank has the bad samples: all raise
                raise DataError(str(fatal))
            if writer:
                self._write_chunk(chunk, rows, bad)
            del rows  # before the next chunk's pass, not after it
            wait_for_every_rank()  # every file written before anyone reads it, however long the writer takes

    def _write_chunk(self, shards, rows, bad):
        """One file per shard of a chunk, from its rows and bad samples (with their index and length)."""
        per_shard = {shard: [] for shard in shards}
        for r in rows:
            per_shard[shards[r["order"][0]]].append((r["order"][1], {"__key__": r["key"], "length": r["length"],
                                                                      "features": r["features"],
                                                                      "labels": r["labels"]}))
        for b in bad:
            per_shard[b.shard].append((b.index, {"__key__": b.key, "length": b.length, "problem": b.problem}))
        os.makedirs(self.folder, exist_ok=True)
        for shard, indexed in per_shard.items():
            self._write(shard, [entry for _, entry in sorted(indexed, key=lambda x: x[0])])

    def _write(self, shard, entries):
        import safetensors.torch

        good = [e for e in entries if "problem" not in e]
        hidden = good[0]["features"].shape[-1] if good else 0
        tensors = {"features": torch.stack([e["features"] for e in good]) if good else torch.zeros(0, hidden)}
        for name, kind in LABELS.items():
            tensors[name] = torch.tensor([e["labels"][name] for e in good],
                                         dtype=torch.float32 if kind == "value" else torch.long)
        samples = [{"key": e["__key__"], "length": e["length"], **({"problem": e["problem"]} if "problem" in e else {})}
                   for e in entries]
        path = self.path(shard)
        safetensors.torch.save_file(tensors, path + ".tmp", metadata={
            "fingerprint": json.dumps(self.fingerprint(shard)), "samples": json.dumps(samples)})
        os.replace(path + ".tmp", path)  # atomic: a reader sees the old file or the whole new one

    def attach(self, stream):
        """Make a data.ShardStream read this cache instead of its shards (all of them covered): the same dealing
        over ranks and workers, shuffling, bucketing (by the stored lengths) and bad samples (failing where they
        failed, so skipped and counted the same way); batches of features instead of encoded samples."""
        stream.read, stream.encoder, stream.collate = self.read, self.encode, collate_features
        if stream.length_of:
            stream.length_of = self.length
        return stream

    def read(self, shard, wanted=None):  # entries are in memory or mapped: nothing to skip reading
        return iter(self.entries[shard])

    def encode(self, entry):
        if "problem" in entry:
            raise DataError(entry["problem"])
        features = entry["features"]
        if isinstance(features, tuple):  # (file, row) of a memory-mapped cache
            features = self._mapped(features[0])[features[1]]
        return {"features": features, **{f"{name}_labels": v for name, v in entry["labels"].items()},
                "key": entry["__key__"]}

    def __getstate__(self):  # a DataLoader worker started by spawn maps the files itself
        return {**self.__dict__, "_opened": {}}

    def _mapped(self, path):
        """The `features` of a cache file, mapped once per process (DataLoader workers open their own)."""
        from safetensors import safe_open

        key = (os.getpid(), path)
        if key not in self._opened:
            self._opened[key] = safe_open(path, "pt").get_slice("features")
        return self._opened[key]

    @staticmethod
    def length(entry):
        return entry["length"]


CHUNK_SAMPLES = 32_768  # samples whose features the writer holds at once: 256 MB of 8 KB (4096 bf16 values) each


def _chunks(shards, counts, limit):
    """Consecutive shards in groups of at most `limit` samples (a larger shard alone)."""
    chunk, size = [], 0
    for shard, n in zip(shards, counts):
        if chunk and size + n > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(shard)
        size += n
    if chunk:
        yield chunk


def memory_budget():
    """Bytes of features a process holds in memory: an eighth of the memory available now (a node may run 8 ranks,
    each holding its own copy; beyond that the files are mapped, so the page cache holds one copy for all)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8


def open_feature_cache(folder, settings, shards, features_pass, writer):
    """The cache in `folder` for these `settings`, covering `shards` (computed where it does not yet:
    `FeatureCache.fill`); None, said in one line, when some shard is not a local file (nothing to check a cached
    feature against). A fatal bad sample during the computation exits 2 on every rank with one line."""
    if not all(os.path.isfile(s) for s in shards):
        log("feature cache: off, some shards are not local files (nothing to check a cached feature against)")
        return None
    cache = FeatureCache(folder, settings)
    try:
        cache.fill(shards, features_pass, writer)
    except DataError as e:
        fail(e, every_rank=True)
    if unusable := cache.load_agreed(shards):
        fail(f"feature cache: {cache.path(unusable[0])}: written in this run, yet not usable", every_rank=True)
    return cache


class _Stale(Exception):
    pass


def _entries(samples, tensors):
    """Sample entries of one file: every sample in shard order; good ones with their feature row (or where to read
    it) and labels."""
    rows = iter(range(len(tensors["features"])))
    entries = []
    for s in samples:
        if "problem" in s:
            entries.append({"__key__": s["key"], "length": s["length"], "problem": s["problem"]})
            continue
        i = next(rows)
        entries.append({"__key__": s["key"], "length": s["length"], "features": tensors["features"][i],
                        "labels": {name: tensors[name][i].item() for name in LABELS}})
    if next(rows, None) is not None:
        raise ValueError("more feature rows than usable samples")
    return entries
