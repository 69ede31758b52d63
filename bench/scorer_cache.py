"""The feature cache on CPU: heads trained on a frozen Qwen3-VL backbone for several epochs, with and without
`--feature_cache`, through train_scorer.main, in one run.

    python bench/scorer_cache.py            # about 2 minutes on 2 cores
    python bench/scorer_cache.py --quick    # a smoke run (smaller model, images and set)

The backbone is big enough to dominate a step, as an 8B one does on a GPU: random weights, a 4-layer language model
of hidden size 512 and a 4-block vision tower, images of 384-768 px (144-576 visual tokens each, 1-2 per sample).
Each run trains --epochs epochs of the same samples in the same order (same seed, bucketing on); an epoch's time is
the median interval between epoch starts (marked by the stream's epoch callback), so the cached run's one-off pass
that builds the cache is not in it (it is printed apart). Ends with `scorer_cache_epoch_speedup: X` (an uncached
epoch's time over a cached one's; target >= 50) and `scorer_cache_max_loss_diff: D` (the largest difference between
the two runs' per-step training losses, relative to the loss; target <= 1e-5).
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import common  # noqa: F401 - puts the repository root on sys.path

import demo
import train_scorer

NUM_TYPES = 3


def build_backbone(out_dir, quick):
    """A random Qwen3-VL saved like a real checkpoint: demo.py's tiny config, scaled up."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    processor = demo.build_tiny_qwen3vl_processor()
    tok = processor.tokenizer
    tok.chat_template = demo.QWEN3VL_CHAT_TEMPLATE
    config = demo.tiny_qwen3_vl_config(tok)
    hidden, layers = (256, 2) if quick else (512, 4)
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 3 * hidden, layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = hidden // 64, hidden // 128, 64
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # halves of the 64-wide heads, as Qwen3-VL splits them
    vision.hidden_size, vision.intermediate_size, vision.depth, vision.num_heads = hidden // 2, 2 * hidden, layers, 4
    vision.out_hidden_size, vision.num_position_embeddings, vision.deepstack_visual_indexes = hidden, 576, [1]
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def write_samples(root, n, min_side, max_side):
    from PIL import Image

    rng = random.Random(0)
    samples = []
    for i in range(n):
        images = []
        for _ in range(rng.choice((1, 2))):
            field = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(8 * 8 * 3)))
            images.append(field.resize((rng.randint(min_side, max_side), rng.randint(min_side, max_side))))
        record = {"prompt": "Rate this photo.", "score": round(rng.uniform(0, 10), 3), "type": rng.randrange(NUM_TYPES)}
        samples.append(demo.vl_sample(f"b{i:05d}", record, images, formats=("jpg",)))
    return demo.write_shards(root, "train", samples, [n // 2, n - n // 2])


def run(model, shards, out, cache, a):
    """Train through train_scorer.main; returns (per-step losses, times of all epochs but the last, seconds before
    the first epoch)."""
    starts = []
    on_epoch_begin = train_scorer._SetStreamEpoch.on_epoch_begin

    def timed(self, *args, **kwargs):
        starts.append(time.perf_counter())
        return on_epoch_begin(self, *args, **kwargs)

    train_scorer._SetStreamEpoch.on_epoch_begin = timed  # the stream's epoch hook marks each epoch's start
    begin = time.perf_counter()
    try:
        trainer = train_scorer.main([
            "--model_name_or_path", model, "--train_shards", ",".join(shards), "--output_dir", out, "--freeze_backbone",
            "--feature_cache", cache, "--num_types", str(NUM_TYPES), "--num_train_epochs", str(a.epochs),
            "--per_device_train_batch_size", str(a.batch), "--per_device_eval_batch_size", str(a.batch),
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--dataloader_num_workers", "0", "--use_cpu", "--disable_tqdm", "true", "--seed", "0"])
    finally:
        train_scorer._SetStreamEpoch.on_epoch_begin = on_epoch_begin
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, [b - a for a, b in zip(starts, starts[1:])], starts[0] - begin


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: hidden 256, 2 layers, 16 samples, 3 epochs")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args()
    sides = (384, 768)
    if a.quick:
        a.samples, a.epochs, sides = 16, 3, (128, 256)
    tmp = tempfile.TemporaryDirectory(prefix="scorer-cache-")
    model = build_backbone(os.path.join(tmp.name, "backbone"), a.quick)
    shards = write_samples(tmp.name, a.samples, *sides)
    print(f"{a.samples} samples (1-2 JPEG images of {sides[0]}-{sides[1]} px), batch {a.batch}, {a.epochs} epochs, "
          f"frozen backbone: {model}")
    plain_losses, plain_epochs, _ = run(model, shards, os.path.join(tmp.name, "plain"), "none", a)
    cached_losses, cached_epochs, build = run(model, shards, os.path.join(tmp.name, "cached"),
                                              os.path.join(tmp.name, "cache"), a)
    plain_s, cached_s = statistics.median(plain_epochs), statistics.median(cached_epochs)
    diff = max(abs(x - y) / abs(x) for x, y in zip(plain_losses, cached_losses))
    assert len(plain_losses) == len(cached_losses), (len(plain_losses), len(cached_losses))
    print(f"\n{'run':<10}{'epoch s (median)':>18}{'epochs':>40}")
    print(f"{'backbone':<10}{plain_s:>18.3f}{' '.join(f'{t:.3f}' for t in plain_epochs):>40}")
    print(f"{'cache':<10}{cached_s:>18.4f}{' '.join(f'{t:.4f}' for t in cached_epochs):>40}")
    print(f"building the cache (one exact pass, and the model load): {build:.1f} s before the first cached epoch")
    print(f"scorer_cache_epoch_speedup: {plain_s / cached_s:.1f}")
    print(f"scorer_cache_max_loss_diff: {diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
