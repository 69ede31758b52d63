"""The scorer's input pipeline on CPU: samples/s of shard read, image decode, process_vision_info, processor and
collate_vl (data.ShardStream through data.make_loader) with 0, 1 and 2 DataLoader workers, against the
background post's approach (one processor call per sample, then torch.stack of pixel_values), in one run.

    python bench/scorer_pipeline.py            # the full bench (about 2-3 minutes on 2 cores)
    python bench/scorer_pipeline.py --quick    # a smoke run (fewer, smaller images)

Data: generated webdataset shards (4 per set), 2-3 JPEG images per sample, and the scorer's default pixel bounds
(64-1024 visual tokens per image). Two sets: "mixed" (each side 256-1024 px, drawn independently, so images differ
in size within a sample and a batch) and "same" (every image 512 x 512 px, 2 per sample). torch.stack needs every
sample to have the same number of patches, so the baseline can only run on the same-size set; the bench shows its
error on the mixed set. Our pipeline runs on both, so the same-size rows compare the two at equal work.
Per-step collate time is reported as a share of one training step (forward + backward + AdamW) of the tiny
Qwen3-VL scorer on the same batch, and `scorer_pipeline_samples_per_s: N` is the best of our rows.

Padding: a third set, "varied" (0-3 images per sample, each side 256-1024 px), read as one training epoch with the
scorer's default shuffle buffer, batches drawn at random (`--bucket_by_length false`) and bucketed by length (the
default): the share of padding tokens in the batches, `scorer_padding_share_random: A` and
`scorer_padding_share_bucketed: B` (target B <= A / 3), and the median tiny-model training step on those batches.

Steps across ranks: a step waits for its largest padded batch (longest sample x batch size, in tokens) on any rank.
A fourth set drawn like "varied" (about 65,536 samples in 512 shards of uneven sizes, so passes end at different steps
on different ranks) is read as one training epoch by the real ShardStream of every rank of 8 and of 64, with the
scorer's default shuffle buffer and 4 loader workers per rank, random and bucketed: the steps' largest batches
summed, random over bucketed, are `scorer_bucket_step_tokens_ratio_8_ranks: X` and `..._64_ranks: Y` (goals
1.4 and 1.3). Only lengths matter there, so its images are black PNGs of the drawn sizes (`blank_png`, quick to
write), each sample's length is VLEncoder.length's (the encoded length, as test_collate checks), and stand-ins
for the encoder and collate_vl carry it (`KnownLength`, `padded_tokens`) instead of pixels; each rank's workers run
in turn in this process, their batches in the DataLoader's order (the same figures as forked loader workers give).
"""

import argparse
import itertools
import math
import os
import random
import statistics
import struct
import sys
import tempfile
import time
import zlib
from types import SimpleNamespace
from unittest import mock

import common  # noqa: F401 - puts the repository root on sys.path

import demo
from collate import VLEncoder, collate_vl, encode_vl_example, open_image, parse_vl_sample
from data import ShardStream, make_loader, shard_samples
from train_scorer import DataArguments, ModelArguments, ScorerArguments, load_scorer

NUM_TYPES = 3
SHARDS = 4
_WORDS = "rate this photo for its light colour framing subject detail and mood please".split()


def make_sample(key, rng, sides, count, blank=False):
    """One scorer sample: `count` smooth random JPEG images (a random 8 x 8 colour field upscaled), each with
    (width, height) from `sides()`, and a prompt of 5-40 words. `blank`: black PNG images of those sizes instead
    (`blank_png`), for sets whose lengths matter but whose pixels are never decoded."""
    from PIL import Image

    images = []
    for _ in range(count):
        if blank:
            images.append(("png", blank_png(*sides())))
            continue
        field = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(8 * 8 * 3)))
        images.append(field.resize(sides(), Image.BICUBIC))
    prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 40)))
    record = {"prompt": prompt, "score": round(rng.uniform(0, 10), 3), "type": rng.randrange(NUM_TYPES)}
    return demo.vl_sample(key, record, images, formats=("jpg",))


def blank_png(width, height):
    """A valid 1-bit PNG of black pixels: written in a fraction of a millisecond even at 1024 x 1024 px, where a
    JPEG encode takes tens, so the rank simulation affords tens of thousands of samples of the varied sizes."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = bytes(1 + (width + 7) // 8) * height  # each row: filter byte 0, then the bits
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))


def write_set(root, name, n, sides, counts, seed, sizes=None, blank=False):
    """`n` samples in shards of `sizes` (default: SHARDS shards of equal size); their paths."""
    rng = random.Random(seed)
    samples = [make_sample(f"{name}{i:05d}", rng, lambda: sides(rng), rng.choice(counts), blank) for i in range(n)]
    return demo.write_shards(root, name, samples, sizes or [len(range(i, n, SHARDS)) for i in range(SHARDS)])


def loader_args(workers):
    return SimpleNamespace(dataloader_num_workers=workers, dataloader_pin_memory=False,
                           dataloader_prefetch_factor=2 if workers else None,
                           dataloader_multiprocessing_context=None)


def time_ours(shards, encoder, batch, pad_id, workers):
    """Samples/s of ShardStream (read, decode, encode, collate_vl per batch) through make_loader, worker start
    included."""
    start, n = time.perf_counter(), 0
    for b in make_loader(ShardStream(shards, encoder, batch, pad_id), loader_args(workers)):
        if b["bad_samples"]:
            raise RuntimeError(f"bad samples: {b['bad_samples'][:2]}")
        n += len(b["keys"])
    return n / (time.perf_counter() - start), n


class KnownLength:
    """A stand-in for VLEncoder in the rank simulation: a sample's feature is its token length, looked up by key in
    `lengths` (VLEncoder.length of each sample, which is the encoded length: test_collate checks it), so 64 ranks'
    epochs cost no pixel decoding. `padded_tokens` is the matching stand-in for collate_vl."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __call__(self, sample):
        return {"length": self.lengths[sample["__key__"]]}

    def length(self, sample):
        return self.lengths[sample["__key__"]]


def padded_tokens(features, pad_token_id):
    """What collate_vl's batch of these features costs a step: the longest sample's tokens x the batch size."""
    return {"padded_tokens": max(f["length"] for f in features) * len(features)}


def rank_batches(stream, workers):
    """The batches a rank's DataLoader with `workers` workers yields from `stream`, in its order (batch j from
    worker j % workers), the workers run one after another in this process, each told its id as a loader worker is
    (torch.utils.data.get_worker_info): 64 ranks x 4 workers then cost no process start."""
    per_worker = []
    for worker in range(workers):
        with mock.patch("torch.utils.data.get_worker_info", return_value=SimpleNamespace(num_workers=workers,
                                                                                          id=worker)):
            per_worker.append(iter(stream))  # the stream reads its worker's id here
    return [b for step in itertools.zip_longest(*per_worker) for b in step if b is not None]


def step_tokens(shards, lengths, world, bucketed, batch, buffer, workers):
    """Tokens of one epoch's steps on `world` simulated ranks, each step counted at its largest padded batch among
    the ranks (the one the step waits for): the real ShardStream of every rank (rank r of `world`, the epoch's
    batch count as train_scorer.py computes it), its workers' batches in the DataLoader's order."""
    known = KnownLength(lengths)
    steps = math.ceil(len(lengths) / (world * batch))
    per_rank = []
    for rank in range(world):
        stream = ShardStream(shards, known, batch, 0, rank=rank, world_size=world, batches_per_epoch=steps,
                             shuffle_buffer=buffer, length_of=known.length if bucketed else None,
                             collate=padded_tokens)
        per_rank.append([b["padded_tokens"] for b in rank_batches(stream, workers)])
        assert len(per_rank[-1]) == steps, (rank, len(per_rank[-1]), steps)
    return sum(max(step) for step in zip(*per_rank))


def stack_collate(features):
    """The background post's collate: per-sample processor outputs stacked; text right-padded."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    batch = {name: pad_sequence([f[name][0] for f in features], batch_first=True)
             for name in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch["pixel_values"] = torch.stack([f["pixel_values"] for f in features])
    batch["image_grid_thw"] = torch.stack([f["image_grid_thw"] for f in features])
    return batch


class PerSample:
    """The post's per-sample step: decode the sample, one processor call (through process_vision_info)."""

    def __init__(self, processor, min_pixels, max_pixels):
        self.processor, self.min_pixels, self.max_pixels = processor, min_pixels, max_pixels

    def __call__(self, sample):
        s = parse_vl_sample(sample, {"type": NUM_TYPES})
        images = [open_image(member, data) for member, data in s.images]
        return dict(encode_vl_example(images, s.prompt, self.processor, self.min_pixels, self.max_pixels))


def baseline_loader(shards, per_sample, batch, workers):
    import torch
    import webdataset as wds

    dataset = wds.WebDataset(shards, shardshuffle=False, workersplitter=wds.split_by_worker,
                             empty_check=False).map(per_sample)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=stack_collate, num_workers=workers)


def time_baseline(shards, per_sample, batch, workers):
    start, n = time.perf_counter(), 0
    for b in baseline_loader(shards, per_sample, batch, workers):
        n += b["input_ids"].shape[0]
    return n / (time.perf_counter() - start), n


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16 samples per set, sides 256-384 px, 256 px same, 2048 samples across ranks")
    p.add_argument("--samples", type=int, default=48, help="samples per set")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--min_side", type=int, default=256)
    p.add_argument("--max_side", type=int, default=1024)
    p.add_argument("--same_side", type=int, default=512)
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    p.add_argument("--varied_samples", type=int, default=96, help="samples of the padding set (0-3 images each)")
    p.add_argument("--rank_samples", type=int, default=65536, help="samples of the rank simulation's set")
    p.add_argument("--rank_shards", type=int, default=512, help="its shards (at least 64 ranks x 4 workers)")
    a = p.parse_args()
    if a.quick:
        a.samples, a.max_side, a.same_side, a.varied_samples, a.rank_samples = 16, 384, 256, 16, 2048
    import torch

    data_defaults = DataArguments()
    min_px, max_px = data_defaults.min_pixels, data_defaults.max_pixels
    tmp = tempfile.TemporaryDirectory(prefix="scorer-pipeline-")
    model_dir = demo.build_tiny_qwen3_vl(os.path.join(tmp.name, "tiny-qwen3-vl"))
    processor = demo.build_tiny_qwen3vl_processor()
    pad_id = processor.tokenizer.pad_token_id
    mixed = write_set(tmp.name, "mixed", a.samples, lambda r: (r.randint(a.min_side, a.max_side),
                                                                r.randint(a.min_side, a.max_side)), (2, 3), seed=0)
    same = write_set(tmp.name, "same", a.samples, lambda r: (a.same_side, a.same_side), (2,), seed=1)
    encoder = VLEncoder(processor, {"type": NUM_TYPES}, True, min_px, max_px, max_len=1 << 20)
    per_sample = PerSample(processor, min_px, max_px)
    workers = [int(w) for w in a.workers.split(",")]
    print(f"{a.samples} samples per set in {SHARDS} shards, batch {a.batch}, JPEG; mixed: 2-3 images, sides "
          f"{a.min_side}-{a.max_side} px; same: 2 images of {a.same_side} x {a.same_side} px; "
          f"pixel bounds {min_px}-{max_px}; {os.cpu_count()} CPUs; torch runs 1 thread per process for the pipeline "
          f"rows (DataLoader workers always do; 2 threads made the processor ~8x slower on 2 shared cores)")
    print(f"\n{'pipeline':<34}{'images':<8}{'workers':>8}{'samples/s':>11}{'vs stack':>10}")
    ours_best, base = 0.0, {}
    rows = [("stack (background post)", "same", w) for w in workers] + \
           [("collate_vl (ours)", "same", w) for w in workers] + [("collate_vl (ours)", "mixed", w) for w in workers]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, images, w in rows:
        shards = same if images == "same" else mixed
        if name.startswith("stack"):
            rate, n = time_baseline(shards, per_sample, a.batch, w)
            base[w] = rate
        else:
            rate, n = time_ours(shards, encoder, a.batch, pad_id, w)
            ours_best = max(ours_best, rate)
        assert n == a.samples, (name, images, w, n)
        ratio = f"{rate / base[w]:.2f}x" if images == "same" and w in base else "-"
        print(f"{name:<34}{images:<8}{w:>8}{rate:>11.2f}{ratio:>10}", flush=True)
    try:
        next(iter(baseline_loader(mixed, per_sample, a.batch, 0)))
        print("\nstack on mixed sizes: ran (unexpected)")
    except RuntimeError as e:
        print(f"\nstack on mixed sizes fails: RuntimeError: {str(e).splitlines()[0]}")

    torch.set_num_threads(threads)

    # One batch: collate time vs a tiny-model training step on it
    import webdataset as wds

    raw = list(itertools.islice(wds.WebDataset(mixed[:1], shardshuffle=False), a.batch))
    features = [encoder(s) for s in raw]
    batch = collate_vl(features, pad_id)
    model = load_scorer(ModelArguments(model_name_or_path=model_dir, num_types=NUM_TYPES), torch.float32)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    inputs = {k: v for k, v in batch.items() if k != "keys"}

    def step():
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    step_s = median_time(step, 3)
    collate_s = median_time(lambda: collate_vl(features, pad_id), 50)
    encode_s = median_time(lambda: [encoder(s) for s in raw], 1)
    tokens, patches = int(batch["attention_mask"].sum()), batch["pixel_values"].shape[0]
    print(f"\none mixed batch of {a.batch} ({tokens} tokens, {patches} patches), tiny Qwen3-VL scorer, full training:")
    print(f"  training step (forward + backward + AdamW)  {step_s * 1e3:9.1f} ms")
    print(f"  collate_vl                                  {collate_s * 1e3:9.2f} ms  ({collate_s / step_s:.2%} of "
          f"the step)")
    print(f"  read + decode + encode, in the main process {encode_s * 1e3:9.1f} ms  ({encode_s / step_s:.0%} of "
          f"the step; workers take it off the training loop)")
    print(f"scorer_collate_share_of_step: {collate_s / step_s:.4%}")
    print(f"scorer_pipeline_samples_per_s: {ours_best:.2f}")

    # Padding: one training epoch of the varied set, random batches vs length-bucketed ones
    varied = write_set(tmp.name, "varied", a.varied_samples, lambda r: (r.randint(a.min_side, a.max_side),
                                                                         r.randint(a.min_side, a.max_side)),
                       (0, 1, 2, 3), seed=2)
    buffer = data_defaults.shuffle_buffer
    print(f"\npadding: {a.varied_samples} samples of 0-3 images (sides {a.min_side}-{a.max_side} px), batch "
          f"{a.batch}, one epoch, shuffle buffer {buffer} (the default)")
    print(f"{'batches':<12}{'padding':>9}{'tokens':>9}{'step ms':>9}")
    shares = {}
    for name, bucketed in (("random", False), ("bucketed", True)):
        stream = ShardStream(varied, encoder, a.batch, pad_id, batches_per_epoch=a.varied_samples // a.batch,
                             shuffle_buffer=buffer, length_of=encoder.length if bucketed else None)
        padded = real = 0
        times = []
        for b in make_loader(stream, loader_args(0)):
            padded, real = padded + b["attention_mask"].numel(), real + int(b["attention_mask"].sum())
            inputs = {k: v for k, v in b.items() if k not in ("keys", "order", "lengths", "bad_samples")}
            t = time.perf_counter()
            model(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        shares[name] = 1 - real / padded
        print(f"{name:<12}{shares[name]:>9.1%}{padded:>9}{statistics.median(times) * 1e3:>9.1f}", flush=True)
    for name, share in shares.items():
        print(f"scorer_padding_share_{name}: {share:.4f}")

    # Steps across ranks: a step waits for its longest batch on any rank, random batches vs bucketed ones
    rng = random.Random(3)
    sizes = [rng.randint(a.rank_samples // a.rank_shards // 2, a.rank_samples // a.rank_shards * 3 // 2)
             for _ in range(a.rank_shards)]
    ranks_set = write_set(tmp.name, "ranks", sum(sizes), lambda r: (r.randint(a.min_side, a.max_side),
                                                                    r.randint(a.min_side, a.max_side)),
                          (0, 1, 2, 3), seed=4, sizes=sizes, blank=True)
    lengths = {s["__key__"]: encoder.length(s) for shard in ranks_set for s in shard_samples(shard)}
    rank_workers = ScorerArguments.dataloader_num_workers  # the dataclass field's default
    print(f"\nsteps across ranks: {len(lengths)} samples like the padding set's in {a.rank_shards} shards of "
          f"{min(sizes)}-{max(sizes)}, batch {a.batch}, one epoch, shuffle buffer {buffer}, {rank_workers} workers per "
          f"rank (the defaults; workers run in turn in this process); tokens of each step's largest padded batch "
          f"among the ranks, summed")
    print(f"{'ranks':<8}{'random':>12}{'bucketed':>12}{'ratio':>8}")
    for world in (8, 64):
        tokens = {bucketed: step_tokens(ranks_set, lengths, world, bucketed, a.batch, buffer, rank_workers)
                  for bucketed in (False, True)}
        ratio = tokens[False] / tokens[True]
        print(f"{world:<8}{tokens[False]:>12}{tokens[True]:>12}{ratio:>8.2f}", flush=True)
        print(f"scorer_bucket_step_tokens_ratio_{world}_ranks: {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
