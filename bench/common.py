"""Shared pieces of the benchmarks: the bench model, skewed synthetic SFT data, peak memory, the child-result
protocol, device sync and the measured matmul peak (the MFU denominator)."""

import json
import os
import resource
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import demo  # noqa: E402

QWEN2_VOCAB = 151_936  # the real Qwen2 vocabulary: the output layer and its loss dominate a step at this size
_WORDS = ("ocean robot tea prime moon library river map leaves boat city lights bread calm simple quiet old "
          "green small paper autumn mountain").split()


def build_bench_model(out_dir, hidden_size=256, num_layers=4, vocab_size=QWEN2_VOCAB):
    """Random-weight fp32 Qwen2-architecture model (tiny tokenizer, real-size vocabulary)."""
    return demo.build_tiny_qwen2(out_dir, hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size,
                                 intermediate_size=4 * hidden_size)


def skewed_lengths(n, median=250, p99=2500, cap=4000, seed=0):
    """Log-normal answer lengths in tokens: most answers short, a long tail (like real chat data)."""
    rng = np.random.default_rng(seed)
    sigma = np.log(p99 / median) / 2.326  # the 99th percentile of a normal is 2.326 sigma
    return np.clip(rng.lognormal(np.log(median), sigma, n).round().astype(int), 8, cap)


def make_records(tokenizer, n, seed=0, **length_kw):
    """Single-turn records whose answers have (close to) the skewed token lengths of `skewed_lengths`."""
    rng = np.random.default_rng(seed + 1)
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in _WORDS}
    records = []
    for target in skewed_lengths(n, seed=seed, **length_kw):
        words, used = [], 0
        while used < target:
            w = _WORDS[rng.integers(len(_WORDS))]
            words.append(w)
            used += cost[w]
        query = "Please write about " + " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), rng.integers(4, 30)))
        records.append({"query": query, "answer": " ".join(words)})
    return records


def sft_training_setup(cfg, device, attn="sdpa", train="masters", ckpt=False, lean_loss=True, lr=1e-5):
    """A random-weight Qwen2 of config `cfg` (a dict) set up as sft_qwen2.py trains it: created in bf16 on a GPU as
    the script loads a checkpoint (fp32 on CPU), the lean loss (unless Liger brings its own), LoRA with the scripts'
    defaults (train="lora"), the precision policy (train="masters": fp32 master weights under bf16 autocast;
    "pure_bf16": bf16 weights with Kahan AdamW), gradient checkpointing. Returns (model in train mode, its
    optimizer, training_plan.plan_bytes' plan)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lean_loss import use_lean_causal_lm_loss
    from training_plan import LoraArguments, add_lora, lora_settings, plan_bytes, use_precision_policy

    cuda = device == "cuda"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg, use_cache=False),
                                                 dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation=attn)
    if lean_loss:
        use_lean_causal_lm_loss(model)
    if train == "lora":
        model = add_lora(model, lora_settings(model, LoraArguments(), "model"))  # the scripts' defaults: r=16
    # the TrainingArguments fields the policy and the plan read (one process, no sharding)
    args = SimpleNamespace(bf16=cuda, fp16=False, pure_bf16=train == "pure_bf16", use_cpu=not cuda, world_size=1,
                           fsdp="", deepspeed=None, learning_rate=lr, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8, weight_decay=0.0)
    optimizer = use_precision_policy(model, args)
    plan = plan_bytes(model, args)
    if ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer[0](params, **optimizer[1]) if optimizer else torch.optim.AdamW(params, lr=lr, fused=cuda)
    return model, opt, plan


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def emit(result):
    """Children print one JSON line the parent reads (everything else they print is noise to it)."""
    print("RESULT " + json.dumps(result), flush=True)


def read_result(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def run_child(cmd, **kwargs):
    """Run one benchmark child process; returns (its emitted result, None) or (None, the last line it printed to
    stderr: the error that stopped it)."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    result = read_result(proc.stdout)
    if result is not None:
        return result, None
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return None, err[-1] if err else f"exit code {proc.returncode}"


def importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device, dtype):
    """Measured dense matmul throughput of this device (the MFU denominator)."""
    import time

    import torch

    n, reps = (8192, 20) if device == "cuda" else (1024, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
