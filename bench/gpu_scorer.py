"""Scorer training speed and memory at real model sizes on one GPU: Qwen3-VL-2B-size and Qwen3-VL-8B architectures
with random weights, bf16, as train_scorer.py's Qwen3VLScorer (score + type heads on the last token), batched by
collate.collate_vl.

    python bench/gpu_scorer.py                            # every setting below on the visible GPU
    python bench/gpu_scorer.py --models qwen3-vl-8b --modes full --attn sdpa --ckpt on
    python bench/gpu_scorer.py --tiny                     # CPU smoke run of the same code (tiny model, fp32)

Settings: the backbone frozen (heads only; the backbone runs forward without autograd, so gradient checkpointing
has nothing to do and only runs off) or full (vision tower, language model and heads all train); attention sdpa vs
flash_attention_2 (if flash_attn imports); gradient checkpointing on/off. Each setting runs in its own process.
Data: synthetic samples of 2-3 images with sides 256-1024 px (multiples of 32, mixed sizes; random pixel patches
as the processor would emit them) plus 30-150 text tokens, a fixed seed. Precision as train_scorer.py trains
(training_plan.use_precision_policy): what trains is fp32 master weights under bf16 autocast, the frozen backbone
stays bf16, the heads fp32; AdamW.
Reports language-model tokens/s (real tokens, image tokens included), samples/s, peak GPU memory and MFU: model
FLOPs of each batch from the config (6 x matmul parameters x tokens, or 2 x where the backbone runs forward only,
plus the attention terms, for the vision tower per patch and the language model per token) over the bf16 matmul
peak measured on the same GPU in the same run.
"""

import argparse
import itertools
import os
import sys
import time
from types import SimpleNamespace

from common import QWEN2_VOCAB, emit, importable, matmul_peak_tflops, run_child, sync

HERE = os.path.dirname(os.path.abspath(__file__))
_TOKENS = dict(image_token_id=151_655, video_token_id=151_656, vision_start_token_id=151_652,
               vision_end_token_id=151_653)
_ROPE = {"rope_type": "default", "rope_theta": 5_000_000, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
CONFIGS = {  # from the released checkpoints' config.json (Qwen3-VL-2B-Instruct, Qwen3-VL-8B-Instruct)
    "qwen3-vl-2b": dict(
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                           hidden_act="gelu_pytorch_tanh"),
        text_config=dict(vocab_size=QWEN2_VOCAB, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262_144,
                         rope_parameters=_ROPE, pad_token_id=151_643, eos_token_id=151_645, bos_token_id=151_643),
        tie_word_embeddings=True, **_TOKENS),
    "qwen3-vl-8b": dict(
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                           hidden_act="gelu_pytorch_tanh"),
        text_config=dict(vocab_size=QWEN2_VOCAB, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262_144,
                         rope_parameters=_ROPE, pad_token_id=151_643, eos_token_id=151_645, bos_token_id=151_643),
        tie_word_embeddings=False, **_TOKENS),
}
NUM_TYPES = 5


def build_config(name):
    """The Qwen3VLConfig of a bench model plus the scorer's fields; "tiny" is demo.py's tiny Qwen3-VL."""
    from transformers import Qwen3VLConfig

    import demo

    config = demo.tiny_qwen3_vl_config(demo.build_tokenizer()) if name == "tiny" else Qwen3VLConfig(**CONFIGS[name])
    config.num_types, config.score_weight, config.type_weight = NUM_TYPES, 1.0, 1.0
    config.use_cache = False
    return config


def batch_flops(config, grids, lengths, backbone_trains):
    """Model FLOPs of one training step on a batch: images with patch grids `grids` ((t, h, w) each), samples of
    `lengths` language-model tokens. Matmul parameters x 6 per token (forward + backward) or x 2 where only the
    forward runs, plus attention (QK^T and AV: 4 x width x sequence per token per layer, forward). The heads and
    norms are negligible; embedding lookups are not matmuls."""
    v, t = config.vision_config, config.text_config
    f = 6 if backbone_trains else 2
    vh, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size ** 2
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    mergers = 1 + len(v.deepstack_visual_indexes)
    per_patch = (v.depth * (4 * vh * vh + 2 * vh * v.intermediate_size) + patch_in * vh
                 + mergers * (merged * merged + merged * v.out_hidden_size) / v.spatial_merge_size ** 2)
    patches = [gt * gh * gw for gt, gh, gw in grids]
    vision = f * per_patch * sum(patches) + f * 2 * v.depth * vh * sum(p * p for p in patches)
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_token = t.num_hidden_layers * (2 * t.hidden_size * q + 2 * t.hidden_size * kv
                                       + 3 * t.hidden_size * t.intermediate_size)
    text = f * per_token * sum(lengths) + f * 2 * t.num_hidden_layers * q * sum(n * n for n in lengths)
    return vision + text


def make_batches(config, n_batches, batch, sides, seed=0):
    """collate_vl batches of synthetic processor outputs: 2-3 images per sample with sides drawn from `sides`
    (px, multiples of 32), random patch values, text tokens around each image as the chat template puts them.
    Returns [(batch dict, image grids, real lengths), ...]."""
    import random

    import torch

    from collate import collate_vl

    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    v = config.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    text_ids = min(config.image_token_id, config.vision_start_token_id, config.text_config.vocab_size)  # plain text
    out = []
    for _ in range(n_batches):
        features, grids = [], []
        for _ in range(batch):
            ids, mm, pixels, thw = [torch.randint(0, text_ids, (rng.randint(10, 30),), generator=g)], [], [], []
            for _ in range(rng.randint(2, 3)):
                h, w = rng.choice(sides) // v.patch_size, rng.choice(sides) // v.patch_size
                n_tokens = h * w // v.spatial_merge_size ** 2
                ids += [torch.tensor([config.vision_start_token_id]), torch.full((n_tokens,), config.image_token_id),
                        torch.tensor([config.vision_end_token_id])]
                pixels.append(torch.randn(h * w, patch_dim, generator=g))
                thw.append((1, h, w))
            ids.append(torch.randint(0, text_ids, (rng.randint(20, 120),), generator=g))
            ids = torch.cat(ids)[None]
            mm = (ids == config.image_token_id).long()
            features.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm,
                             "pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(thw),
                             "score_labels": rng.uniform(0, 10), "type_labels": rng.randrange(NUM_TYPES)})
            grids += thw
        out.append((collate_vl(features, config.text_config.pad_token_id), grids,
                    [f["input_ids"].shape[-1] for f in features]))
    return out


def child(a):
    import torch

    from collate import LABELS
    from train_scorer import Qwen3VLScorer
    from training_plan import use_precision_policy

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = build_config(a.model)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLScorer._from_config(config, dtype=dtype, attn_implementation=a.attn)
    for name in LABELS:  # fp32 heads on a bf16 backbone, as train_scorer.py loads them
        model.head(name).float()
    frozen = a.mode == "frozen"
    model.set_trainable(freeze_backbone=frozen, freeze_vision=False, base_record="random weights")
    use_precision_policy(model, SimpleNamespace(bf16=device == "cuda", fp16=False, pure_bf16=False, deepspeed=None,
                                             fsdp=False))
    if a.ckpt == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    sides = list(range(a.min_side, a.max_side + 1, 32))
    batches = make_batches(config, a.warmup + a.steps, a.batch, sides)
    tokens = samples = flops = 0
    for i, (batch, grids, lengths) in enumerate(batches):
        if i == a.warmup:
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            tokens += sum(lengths)
            samples += len(lengths)
            flops += batch_flops(config, grids, lengths, backbone_trains=not frozen)
    sync(device)
    elapsed = time.perf_counter() - start
    emit({"tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed, "loss": float(loss),
          "flops_per_s": flops / elapsed, "trainable": sum(p.numel() for p in params),
          "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    p.add_argument("--models", default=None, help="comma list of " + ", ".join(CONFIGS))
    p.add_argument("--modes", default="frozen,full", help="comma list: frozen (heads only), full")
    p.add_argument("--attn", default=None, help="comma list: sdpa, flash_attention_2")
    p.add_argument("--ckpt", default="on,off", help="gradient checkpointing settings (full mode)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min_side", type=int, default=256, help="smallest image side, px")
    p.add_argument("--max_side", type=int, default=1024, help="largest image side, px")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    import torch

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    if a.tiny:
        a.models, a.batch, a.min_side, a.max_side, a.warmup, a.steps = "tiny", 2, 32, 96, 1, 2
    models = (a.models or "qwen3-vl-2b,qwen3-vl-8b").split(",")
    flash = importable("flash_attn") and device == "cuda"
    attns = (a.attn or ("sdpa,flash_attention_2" if flash else "sdpa")).split(",")
    peak = matmul_peak_tflops(device, torch.bfloat16 if device == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; measured {'bf16' if device == 'cuda' else 'fp32'} matmul peak {peak:.3g} TFLOP/s")
    print(f"data: batch {a.batch}, 2-3 images per sample, sides {a.min_side}-{a.max_side} px")
    if device == "cuda" and not importable("flash_attn"):
        print("flash_attention_2: flash_attn is not installed, skipped")
    print(f"\n{'model':<13}{'mode':<8}{'attn':<20}{'ckpt':<6}{'tok/s':>10}{'samples/s':>11}{'peak GB':>9}{'MFU':>7}"
          f"{'trainable':>12}")
    for model, mode, attn, ckpt in itertools.product(models, a.modes.split(","), attns, a.ckpt.split(",")):
        if mode == "frozen" and ckpt == "on":
            continue  # a frozen backbone runs without autograd: checkpointing would change nothing
        cmd = [sys.executable, os.path.join(HERE, "gpu_scorer.py"), "--child", "--model", model, "--mode", mode,
               "--attn", attn, "--ckpt", ckpt, "--batch", str(a.batch), "--min_side", str(a.min_side),
               "--max_side", str(a.max_side), "--warmup", str(a.warmup), "--steps", str(a.steps)]
        if a.tiny:
            cmd.append("--tiny")
        r, error = run_child(cmd)
        row = f"{model:<13}{mode:<8}{attn:<20}{ckpt:<6}"
        if r is None:
            print(row + f"  failed: {error:.120}", flush=True)
            continue
        mfu = r["flops_per_s"] / (peak * 1e12)
        print(row + f"{r['tokens_per_s']:>10.0f}{r['samples_per_s']:>11.2f}{r['peak_mem_gb']:>9.1f}{mfu:>7.1%}"
              f"{r['trainable'] / 1e6:>11.1f}M", flush=True)


if __name__ == "__main__":
    main()
