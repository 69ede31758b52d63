"""One command that checks, on one H100/H200, that what real users run works: SFT at the Qwen2-1.5B size, padded ==
packed batches, LoRA at the Qwen2-7B size within the memory plan, the FSDP2 save, the Qwen3-VL-2B-size scorer
frozen and full. Random weights, no downloads; about 5 minutes (estimated: not yet run on a GPU; each check is
stopped after 300 s). Prints one table and, last, `gpu_check: N/M pass` (exit 0 if every check passes, else 1).

    python bench/gpu_check.py                           # every check on the visible GPU
    python bench/gpu_check.py --wheels wheels/          # first pip-install missing packages from wheels/ (no network)
    python bench/gpu_check.py --checks lora-7b,scorer-2b-full    # some checks only
    python bench/gpu_check.py --tiny                    # the same code on CPU with tiny models, fp32 (test suite)

A GPU machine without network may lack what the scripts import beyond torch and transformers (NEEDED below).
Prepare the folder here, for the GPU machine's Python version (python -V there; 3.12 below), then copy it over:

    pip download -d wheels/ --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        accelerate peft psutil torch-optimi datasets pyarrow pandas python-dateutil dill multiprocess xxhash \\
        webdataset braceexpand qwen-vl-utils av pillow requests urllib3 certifi charset-normalizer

--no-deps because peft and accelerate depend on torch, which the machine has and must keep: the list is their
dependency closure minus what torch + transformers bring (every name resolved to a cp312 wheel, 2026-12). If the
machine's versions differ, pip install there names any further wheel it needs (say a newer huggingface-hub for
datasets): add it. torchvision, imported by qwen-vl-utils, must match the machine's torch exactly: CUDA images
have it; if not, add that exact wheel.
With --wheels, every module of NEEDED that does not import is installed with
`pip install --no-index --find-links DIR <package>` before any project code is imported.

Each check runs in its own process on the GPU (GPU memory starts empty, peak memory is its own, an out-of-memory
or crash fails that row only); with --tiny they run in this process (tiny models need no isolation, and each child
would spend ~10 s re-importing torch and transformers on a small CPU machine). A check that raises is a FAIL row
with the exception's message.
"""

import argparse
import contextlib
import functools
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: the checks import its modules (lazily, after --wheels)
GB = 1e9  # as training_plan.py's memory plan prints
# What the scripts import beyond torch and transformers: module -> the PyPI package that provides it.
NEEDED = {"accelerate": "accelerate", "peft": "peft", "optimi": "torch-optimi", "datasets": "datasets",
          "webdataset": "webdataset", "braceexpand": "braceexpand", "qwen_vl_utils": "qwen-vl-utils",
          "PIL": "pillow", "yaml": "pyyaml"}
# Model FLOPs utilisation the 1.5B SFT step must beat on a GPU. A healthy run of this setting should land around
# 0.25-0.35 (estimated, not yet measured: sdpa with a packed-row mask and gradient checkpointing, whose recompute
# counts as no model FLOPs). 0.15 is a floor against gross regressions, not a tuning target: matmuls left in fp32
# (under 0.1 of the bf16 peak on an H100), a host-bound or synchronising step loop.
MFU_FLOOR = 0.15
CHILD_TIMEOUT_S = 300  # a hung check (a collective that never returns) fails its row instead of the whole run


def install_missing(wheels):
    """pip-install, from the folder `wheels` only, the packages of NEEDED whose module does not import."""
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        print("wheels: every needed module imports, nothing to install", flush=True)
        return
    if not wheels:
        print(f"wheels: missing {' '.join(missing)}; the checks that need them will fail (see --wheels)", flush=True)
        return
    print(f"wheels: installing {' '.join(missing)} from {wheels}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *missing])
    if proc.returncode != 0:  # pip printed which distribution it could not find; the rows will say what broke
        print(f"wheels: pip install failed (exit {proc.returncode}, see above)", flush=True)
    importlib.invalidate_caches()


def row(ok, figures):
    """What a check returns: PASS/FAIL and its figures, one line."""
    return {"pass": bool(ok), "figures": figures}


def train_step(model, opt, batch, cuda):
    """One optimizer step as the Trainer runs it under --bf16 (autocast around forward only); the loss, detached."""
    import torch

    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().float()


def to_device(batch, device):
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def count(n):
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


def finite(losses):
    return all(math.isfinite(x) for x in losses)


def peak_gb(cuda):
    """Peak GPU memory allocated since the last reset, as text ("n/a" on CPU: no allocator figure there)."""
    import torch

    return f"{torch.cuda.max_memory_allocated() / GB:.1f} GB" if cuda else "n/a"


# ---------------------------------------------------------------------------------------------------------------
# The checks: each (tiny, workdir) -> row(...). tiny: CPU, fp32, tiny configs; else the visible GPU, bf16.
# ---------------------------------------------------------------------------------------------------------------

def check_sft(tiny, workdir):
    """bf16 SFT steps at the Qwen2-1.5B size as sft_qwen2.py trains (fp32 masters under autocast, lean loss, sdpa,
    gradient checkpointing on as its default), on one repeated batch: the loss must fall, and MFU is reported."""
    import torch

    import demo
    from collate import sft_collator
    from common import matmul_peak_tflops, sft_training_setup, sync
    from gpu_sft import CONFIGS, flops_per_token, make_batches

    cuda, device = not tiny, "cpu" if tiny else "cuda"
    cfg = CONFIGS["tiny" if tiny else "qwen2-1.5b"]
    peak = matmul_peak_tflops(device, torch.bfloat16 if cuda else torch.float32)  # the MFU denominator, this run
    torch.manual_seed(0)
    model, opt, _ = sft_training_setup(cfg, device, "sdpa", ckpt=True)
    feats = make_batches(1, 2 if tiny else 8, 256 if tiny else 4096, cfg["vocab_size"])[0]
    # packed: the fastest exact layout with sdpa (padded == packed is its own check below)
    batch = to_device(sft_collator(demo.build_tokenizer(), padding_free=True)(feats), device)
    warmup, steps = (1, 3) if tiny else (2, 6)
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        losses.append(train_step(model, opt, batch, cuda))
    sync(device)
    tokens_per_s = sum(len(f["input_ids"]) for f in feats) * steps / (time.perf_counter() - start)
    mean_len = sum(len(f["input_ids"]) for f in feats) / len(feats)
    mfu = tokens_per_s * flops_per_token(cfg, mean_len) / (peak * 1e12)
    losses = [float(x) for x in losses]
    floor = MFU_FLOOR if cuda else 0.0
    ok = finite(losses) and losses[-1] < losses[0] and mfu > floor
    return row(ok, f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps, {tokens_per_s:,.0f} tok/s, "
                   f"MFU {mfu:.1%} (floor {floor:.0%}, matmul peak {peak:.3g} TFLOP/s), peak memory {peak_gb(cuda)}")


def check_packed_equals_padded(tiny, workdir, attn):
    """The same examples as a padded batch and as one packed row give the same loss and gradients.

    At random init a packed row whose examples attend to each other (position_ids not restarting) moves the loss by
    only ~1e-4 relative but the gradients by 0.3-1.2 (measured on CPU with these configs): the gradients are what
    can see a masking bug, so the check also runs that leaking row and requires it to miss by more than 10x the
    tolerance, proving the tolerance can tell.
    """
    import torch

    import demo
    from collate import sft_collator
    from common import sft_training_setup
    from gpu_sft import CONFIGS, make_batches

    cuda, device = not tiny, "cpu" if tiny else "cuda"
    cfg = CONFIGS["tiny"] if tiny else dict(CONFIGS["tiny"], hidden_size=256, intermediate_size=1024,
                                             num_hidden_layers=4, vocab_size=32_768)  # head_dim 64: flash-friendly
    # fp32 on CPU: the two layouts differ by summation order only (measured 1e-7). bf16 autocast on GPU: the two
    # layouts run different kernel shapes, each matmul output rounds to bf16 (2^-9 relative) and that compounds
    # through the layers and backward: measured with CPU bf16 autocast, loss 4e-6, gradients 2e-3..6e-3.
    loss_tol, grad_tol = (1e-5, 1e-5) if tiny else (2e-3, 2e-2)
    torch.manual_seed(0)
    model, _, _ = sft_training_setup(cfg, device, attn)  # fp32 masters, lean loss: the training path
    params = [p for p in model.parameters() if p.requires_grad]
    feats = make_batches(1, 4 if tiny else 8, 256 if tiny else 1024, cfg["vocab_size"], seed=1)[0]
    tok = demo.build_tokenizer()
    padded = sft_collator(tok, pad_to_multiple_of=None if tiny else 8)(feats)
    packed = sft_collator(tok, padding_free=True, flash_attn_kwargs=attn.startswith("flash"))(feats)
    leaking = {"input_ids": packed["input_ids"], "labels": packed["labels"],
               "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**to_device(batch, device)).loss
        loss.backward()
        return loss.detach().double(), torch.cat([p.grad.flatten().double() for p in params])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    (l0, g0), (l1, g1), (_, g2) = loss_and_grads(padded), loss_and_grads(packed), loss_and_grads(leaking)
    loss_diff, grad_diff, leak_diff = rel(l1, l0), rel(g1, g0), rel(g2, g0)
    ok = math.isfinite(float(l0)) and loss_diff <= loss_tol and grad_diff <= grad_tol and leak_diff > 10 * grad_tol
    return row(ok, f"rel diff: loss {loss_diff:.1e} (tol {loss_tol:.0e}), grads {grad_diff:.1e} (tol {grad_tol:.0e}); "
                   f"a leaking row: grads {leak_diff:.2f}")


def activation_allowance(cfg, tokens):
    """Upper estimate of the bytes a gradient-checkpointed LoRA step holds beyond the memory plan, `tokens` packed:
    - each layer's checkpointed input, at most fp32: layers x tokens x hidden x 4;
    - one layer recomputed in backward, with LoRA's dropout copies and masks and the gradients in flight: at most
      24 hidden-wide and 8 intermediate-wide fp32 tensors per token (counted ~16 and ~6 saved for backward);
    - the lean loss: the output layer's fp32 gradient buffer and its half copy, which lean_loss.py allocates even for
      a frozen head (vocab x hidden x 6), three fp32 logit chunks (~64M entries each), hidden states and gradients
      at the labelled positions.
    """
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    checkpoints = layers * tokens * h * 4
    one_layer = tokens * 4 * (24 * h + 8 * i)
    loss = vocab * h * 6 + 3 * (64 << 20) * 4 + 2 * tokens * h * 4
    return checkpoints + one_layer + loss


def check_lora(tiny, workdir):
    """A LoRA step at the Qwen2-7B size (bf16 base, fp32 adapters, LoraArguments' defaults, packed batch, gradient
    checkpointing): finite loss, and peak GPU memory within the memory plan + the activation allowance."""
    import torch

    import demo
    from collate import sft_collator
    from common import sft_training_setup
    from gpu_sft import CONFIGS, make_batches

    cuda, device = not tiny, "cpu" if tiny else "cuda"
    cfg = CONFIGS["tiny" if tiny else "qwen2-7b"]
    torch.manual_seed(0)
    model, opt, plan = sft_training_setup(cfg, device, "sdpa", "lora", ckpt=True, lr=2e-4)  # the README's LoRA lr
    feats = make_batches(1, 2 if tiny else 8, 256 if tiny else 4096, cfg["vocab_size"])[0]
    batch = to_device(sft_collator(demo.build_tokenizer(), padding_free=True)(feats), device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [float(train_step(model, opt, batch, cuda)) for _ in range(3)]
    tokens = sum(len(f["input_ids"]) for f in feats)
    planned, extra = (plan["total"] + plan["autocast_copies"]) / GB, activation_allowance(cfg, tokens) / GB
    peak = torch.cuda.max_memory_allocated() / GB if cuda else None
    fits = peak <= planned + extra if cuda else True  # CPU: no allocator figure to hold to the plan
    return row(finite(losses) and fits,
               f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {tokens} tokens; peak {peak_gb(cuda)} vs plan {planned:.2f} "
               f"+ activations {extra:.2f} = {planned + extra:.2f} GB")


def check_fsdp2_save(tiny, workdir):
    """sft_qwen2.py under FSDP2 in one process, with the shipped 7B FSDP2 recipe's fsdp_config, on a tiny bf16
    checkpoint: 4 steps of 2 micro-batches with a sharded checkpoint at step 2 and 4, holding exactly the files
    reliability.CHECKPOINT_FILES lists for it, then a second run that resumes to step 6; the
    final save must be one bf16 HF folder that plain from_pretrained loads, with weights that moved. On CPU the script
    must refuse --fsdp with exit 2 and one line instead (accelerate would silently train DDP); the gathered save is
    proven on CPU by tests/test_sharding.py with torch's own fully_shard."""
    import json

    import safetensors.torch
    import torch
    import yaml

    import demo

    root = os.path.dirname(HERE)
    with open(os.path.join(root, "configs", "sft-qwen2-7b-full-fsdp2-8gpu.yaml")) as f:
        fsdp_config = yaml.safe_load(f)["fsdp_config"]
    fsdp_json = os.path.join(workdir, "fsdp2.json")
    with open(fsdp_json, "w") as f:
        json.dump(fsdp_config, f)
    _, train_file, _ = demo.build_sft_demo(os.path.join(workdir, "fsdp2-data"))
    base = demo.build_tiny_qwen2(os.path.join(workdir, "fsdp2-base"), dtype="bfloat16")  # stored as Qwen's are
    out = os.path.join(workdir, "fsdp2-out")

    def run(max_steps):
        cmd = ["bash", "run.sh", "sft_qwen2.py", "--model_name_or_path", base, "--train_file", train_file,
               "--output_dir", out, "--max_len", "256", "--max_steps", str(max_steps), "--save_steps", "2",
               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate",
               "1e-3", "--logging_steps", "1",
               "--fsdp", "--fsdp_config", fsdp_json, "--activation_checkpointing", "false", "--disable_tqdm", "true"]
        env = dict(os.environ, NPROC_PER_NODE="1", PYTHON=sys.executable)  # run.sh exits with the script's own code
        return subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=CHILD_TIMEOUT_S)

    first = run(4)
    if tiny:
        errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
        ok = first.returncode == 2 and len(errors) == 1 and "--fsdp" in errors[0] and "needs GPUs" in errors[0]
        return row(ok, f"CPU: exit {first.returncode}, {errors[0] if errors else 'no error line'}")
    if first.returncode != 0:
        return row(False, f"training exit {first.returncode}: {first.stderr.strip().splitlines()[-1][:150]}")
    from reliability import checkpoint_files

    checkpoint = os.path.join(out, "checkpoint-4")
    files = sorted(os.path.relpath(os.path.join(d, f), checkpoint) for d, _, fs in os.walk(checkpoint) for f in fs)
    listed = sorted(checkpoint_files("FSDP2 SHARDED_STATE_DICT", 1) + checkpoint_files("FSDP2 SHARDED_STATE_DICT", 1,
                                                                                       "also written"))
    second = run(6)  # resumes from the newest sharded checkpoint, checkpoint-4
    with open(os.path.join(out, "trainer_state.json")) as f:
        steps = json.load(f)["global_step"]
    resumed = second.returncode == 0 and "resuming from" in second.stdout and steps == 6
    saved = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    start = safetensors.torch.load_file(os.path.join(base, "model.safetensors"))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in saved.values()})
    moved = sum(not torch.equal(saved[k], start[k]) for k in start)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(input_ids=torch.arange(1, 9)[None]).logits
    ok = (resumed and dtypes == ["bfloat16"] and saved.keys() == start.keys() and moved > 0
          and bool(torch.isfinite(logits).all()) and files == listed)
    return row(ok, f"4 steps + resumed to step {steps} ({'ok' if resumed else 'FAILED: ' + second.stderr[-150:]}); "
                   f"checkpoint files {'as listed' if files == listed else f'{files} != listed {listed}'}; "
                   f"saved {len(saved)} tensors, {'/'.join(dtypes)}, {moved}/{len(start)} moved; from_pretrained "
                   f"loads, logits finite")


def check_scorer(tiny, workdir, frozen):
    """A Qwen3-VL-2B-size scorer step as train_scorer.py trains it (bf16 backbone, fp32 heads, fp32 masters of what
    trains under autocast; checkpointing for the full model): finite loss, every trainable parameter changed and
    no frozen one did; samples/s and peak memory reported."""
    from types import SimpleNamespace

    import torch

    from collate import LABELS
    from common import sync
    from gpu_scorer import build_config, make_batches
    from train_scorer import Qwen3VLScorer
    from training_plan import use_precision_policy

    cuda, device = not tiny, "cpu" if tiny else "cuda"
    config = build_config("tiny" if tiny else "qwen3-vl-2b")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLScorer._from_config(config, dtype=torch.bfloat16 if cuda else torch.float32,
                                           attn_implementation="sdpa")
    for name in LABELS:  # fp32 heads on a bf16 backbone, as train_scorer.py loads them
        model.head(name).float()
    model.set_trainable(freeze_backbone=frozen, freeze_vision=False, base_record="random weights")
    use_precision_policy(model, SimpleNamespace(bf16=cuda, fp16=False, pure_bf16=False, deepspeed=None, fsdp=False))
    if not frozen:  # train_scorer.py's default; a frozen backbone runs without autograd, nothing to recompute
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)  # train_scorer.py's default lr: small updates must land
    warmup, steps = 1, 2
    sides = list(range(32, 97, 32)) if tiny else list(range(256, 1025, 32))
    batches = make_batches(config, warmup + steps, 2 if tiny else 8, sides)
    before = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}  # host: not in the peak
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, samples = [], 0
    for i, (batch, _, lengths) in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        losses.append(train_step(model, opt, to_device(batch, device), cuda))
        samples += len(lengths) if i >= warmup else 0
    sync(device)
    samples_per_s = samples / (time.perf_counter() - start)
    changed = {n: not torch.equal(p.detach().cpu(), before[n]) for n, p in model.named_parameters()}
    stuck = [n for n, p in model.named_parameters() if p.requires_grad and not changed[n]]
    moved = [n for n, p in model.named_parameters() if not p.requires_grad and changed[n]]
    losses = [float(x) for x in losses]
    n_trained = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for p in model.parameters()) - n_trained
    problems = ([f"{len(stuck)} trainable tensors unchanged (first {stuck[0]})"] if stuck else []) + \
               ([f"{len(moved)} frozen tensors changed (first {moved[0]})"] if moved else [])
    return row(finite(losses) and not problems,
               f"losses {', '.join(f'{x:.2f}' for x in losses)} (new batches); "
               + ("; ".join(problems) if problems else f"{count(n_trained)} trained params all changed, "
                  f"{count(n_frozen)} frozen unchanged")
               + f"; {samples_per_s:.2f} samples/s, peak {peak_gb(cuda)}")


def checks(tiny):
    """{row name: check}, in table order. Attention on CPU: sdpa and eager; on a GPU: sdpa, and flash-attention 2
    when flash_attn imports."""
    if tiny:
        attns = ["sdpa", "eager"]  # flash-attention has no CPU kernels
    else:
        attns = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    table = {"sft-1.5b": check_sft}
    table.update({f"packed==padded/{a}": functools.partial(check_packed_equals_padded, attn=a) for a in attns})
    table.update({"lora-7b": check_lora, "fsdp2-save": check_fsdp2_save,
                  "scorer-2b-frozen": functools.partial(check_scorer, frozen=True),
                  "scorer-2b-full": functools.partial(check_scorer, frozen=False)})
    return table


def run_here(name, tiny, workdir):
    """Run one check in this process: {"check", "pass", "figures"}; an exception is a FAIL with its message."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the scripts' own logs (precision, plan): not in the table
            result = checks(tiny)[name](tiny, workdir)
    except Exception as e:  # noqa: BLE001 -- any failure of a check is that row's verdict, not the run's end
        message = (str(e).strip().splitlines() or [""])[0]
        result = row(False, f"{type(e).__name__}: {message}"[:200])
    return {"check": name, **result}


def run_in_child(name, workdir):
    from common import run_child

    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--workdir", workdir]
    try:
        result, error = run_child(cmd, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        result, error = None, f"timed out after {CHILD_TIMEOUT_S} s"
    return result or {"check": name, "pass": False, "figures": f"process failed: {error}"[:200]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU, fp32: the test suite's run")
    p.add_argument("--wheels", help="folder of wheels to pip-install missing packages from (no network needed)")
    p.add_argument("--checks", help="comma list of check names (default: all)")
    p.add_argument("--workdir", help="scratch folder for checks that write (default: a temporary one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:  # one check in this fresh process, its row printed for the parent
        from common import emit

        return emit(run_here(a.child, a.tiny, a.workdir))

    install_missing(a.wheels)  # before anything below imports project code
    import torch
    import transformers

    if not a.tiny and not torch.cuda.is_available():
        print("gpu_check: no GPU visible; run with --tiny for the CPU run of the same code", file=sys.stderr)
        return 2
    table = checks(a.tiny)
    names = a.checks.split(",") if a.checks else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"gpu_check: unknown check(s) {', '.join(unknown)}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    device = "CPU (--tiny: tiny models, fp32)" if a.tiny else torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}")
    if not a.tiny and "packed==padded/flash_attention_2" not in table:
        print("flash_attention_2: flash_attn is not installed, its packed==padded row is skipped")
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        workdir = a.workdir or scratch
        print(f"\n{'check':<34}{'result':<8}figures", flush=True)
        rows = []
        for name in names:
            start = time.perf_counter()
            r = run_here(name, a.tiny, workdir) if a.tiny else run_in_child(name, workdir)
            rows.append(r)
            print(f"{name:<34}{'PASS' if r['pass'] else 'FAIL':<8}{r['figures']} [{time.perf_counter() - start:.0f} s]",
                  flush=True)
    passed = sum(r["pass"] for r in rows)
    print(f"total: {time.perf_counter() - begin:.0f} s")
    print(f"gpu_check: {passed}/{len(rows)} pass")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
