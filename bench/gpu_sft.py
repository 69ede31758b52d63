"""SFT training speed and memory at real model sizes on one GPU: Qwen2-1.5B and Qwen2-7B architectures with random
weights, trained as sft_qwen2.py trains them: its precision policy (training_plan.py: fp32 master weights under bf16
autocast, or --pure_bf16, or LoRA), model patch and collators.

    python bench/gpu_sft.py                           # every setting below on the visible GPU
    python bench/gpu_sft.py --models qwen2-1.5b --attn sdpa --padding_free on
    python bench/gpu_sft.py --models qwen2-7b --padding_free on --ckpt on --train masters,pure_bf16,lora --batch 2
                                                      # peak memory of each policy next to the memory plan's figure
    python bench/gpu_sft.py --tiny                    # CPU smoke run of the same code (tiny model, fp32)

Settings: attention sdpa vs flash_attention_2 (if flash_attn imports), padding-free on/off, Liger kernels on/off
(if liger_kernel imports; Liger brings its own fused linear + cross-entropy, replacing ours), gradient
checkpointing on/off. Each setting runs in its own process (fresh memory, and Liger patches classes globally).
Data: skewed chat lengths (log-normal, median ~250 answer tokens, p99 ~2,500, max_len 4096), prompt tokens masked.
Reports real tokens/s, samples/s, peak GPU memory next to the memory plan's weights + gradients + optimizer states +
autocast copies (activations come on top of the plan), and MFU: model FLOPs per token (6 x non-embedding parameters
+ 6 x output layer + 12 x layers x hidden x mean sequence length, the PaLM convention, counting the full output
layer even where we skip it) over the bf16 matmul peak measured on the same GPU in the same run.
"""

import argparse
import itertools
import os
import sys
import time

from common import (QWEN2_VOCAB, emit, importable, matmul_peak_tflops, run_child, sft_training_setup,
                    skewed_lengths, sync)

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {  # from the released checkpoints' config.json
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=QWEN2_VOCAB, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152_064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
}


def flops_per_token(cfg, mean_len):
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg["intermediate_size"]  # q, o, k, v, gate/up/down
    return 6 * (layers * per_layer + h * cfg["vocab_size"]) + 12 * layers * h * mean_len


def make_batches(n_batches, batch, max_len, vocab, seed=0):
    """Token-id examples with skewed lengths; the first ~15% of each (the prompt) is masked out of the loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = skewed_lengths(n_batches * batch, cap=max_len - 64, seed=seed) + 48
    feats = []
    for n in lengths.tolist():
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompt = max(8, n // 7)
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return [feats[i:i + batch] for i in range(0, len(feats), batch)]


def child(a):
    import torch

    import demo
    from collate import sft_collator

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    cuda = device == "cuda"
    cfg = CONFIGS[a.model]
    if a.liger == "on":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2()
    torch.manual_seed(0)
    model, opt, plan = sft_training_setup(cfg, device, a.attn, a.train, a.ckpt == "on", lean_loss=a.liger == "off")
    tok = demo.build_tokenizer()  # only its pad id is used: the ids are random
    collate = sft_collator(tok, padding_free=a.padding_free == "on", pad_to_multiple_of=8 if device == "cuda" else None,
                           flash_attn_kwargs=a.attn.startswith("flash"))
    batches = make_batches(a.warmup + a.steps, a.batch, a.max_len, cfg["vocab_size"])
    tokens = samples = 0
    for i, feats in enumerate(batches):
        if i == a.warmup:
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(feats).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            tokens += sum(len(f["input_ids"]) for f in feats)
            samples += len(feats)
    sync(device)
    elapsed = time.perf_counter() - start
    mean_len = tokens / samples
    emit({"tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed, "loss": float(loss),
          "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
          "plan_gb": (plan["total"] + plan["autocast_copies"]) / 1e9,
          "flops_per_token": flops_per_token(cfg, mean_len)})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    p.add_argument("--models", default=None, help="comma list of " + ", ".join(CONFIGS))
    p.add_argument("--attn", default=None, help="comma list: sdpa, flash_attention_2")
    p.add_argument("--padding_free", default="off,on")
    p.add_argument("--liger", default=None, help="comma list: off, on")
    p.add_argument("--ckpt", default="on,off", help="gradient checkpointing settings")
    p.add_argument("--train", default="masters", help="comma list: masters (fp32 master weights, the default policy), "
                   "pure_bf16, lora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    import torch

    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    if a.tiny:
        a.models, a.batch, a.max_len, a.warmup, a.steps = "tiny", 2, 256, 1, 2
    models = (a.models or "qwen2-1.5b,qwen2-7b").split(",")
    attns = (a.attn or ("sdpa,flash_attention_2" if importable("flash_attn") and device == "cuda" else "sdpa")).split(",")
    ligers = (a.liger or ("off,on" if importable("liger_kernel") and device == "cuda" else "off")).split(",")
    peak = matmul_peak_tflops(device, torch.bfloat16 if device == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; measured {'bf16' if device == 'cuda' else 'fp32'} matmul peak {peak:.3g} TFLOP/s")
    if device == "cuda" and not importable("flash_attn"):
        print("flash_attention_2: flash_attn is not installed, skipped")
    if device == "cuda" and not importable("liger_kernel"):
        print("liger: liger_kernel is not installed, skipped")
    print(f"\n{'model':<12}{'attn':<20}{'packed':<8}{'liger':<7}{'ckpt':<6}{'train':<11}{'tok/s':>10}{'samples/s':>11}"
          f"{'peak GB':>9}{'plan GB':>9}{'MFU':>7}")
    for model, attn, pf, liger, ckpt, train in itertools.product(models, attns, a.padding_free.split(","), ligers,
                                                                 a.ckpt.split(","), a.train.split(",")):
        cmd = [sys.executable, os.path.join(HERE, "gpu_sft.py"), "--child", "--model", model, "--attn", attn,
               "--padding_free", pf, "--liger", liger, "--ckpt", ckpt, "--train", train, "--batch", str(a.batch),
               "--max_len", str(a.max_len), "--warmup", str(a.warmup), "--steps", str(a.steps)]
        if a.tiny:
            cmd.append("--tiny")
        r, error = run_child(cmd)
        row = f"{model:<12}{attn:<20}{pf:<8}{liger:<7}{ckpt:<6}{train:<11}"
        if r is None:
            print(row + f"  failed: {error:.120}", flush=True)
            continue
        mfu = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)
        print(row + f"{r['tokens_per_s']:>10.0f}{r['samples_per_s']:>11.2f}{r['peak_mem_gb']:>9.1f}"
              f"{r['plan_gb']:>9.1f}{mfu:>7.1%}", flush=True)


if __name__ == "__main__":
    main()
