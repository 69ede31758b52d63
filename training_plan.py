"""What trains, in which precision, and what that costs per GPU: the precision policy, LoRA (peft), the memory plan.

Both training scripts call these in the same order once the model is loaded (in `load_dtype`):
  lora_settings -> add_lora (with --use_peft) -> use_precision_policy -> memory_plan -> Trainer(optimizer=...)
and `to_base_dtype` before the final save.

Precision (bf16 or fp16 runs). Plain AdamW on bf16 weights loses most small updates (an update below half the
bf16 spacing of a weight rounds away: for a weight near 0.02 that is 6e-5, for a norm weight near 1.0 it is 4e-3,
so lr 1e-5 never moves it). So:
- default: every trainable parameter is an fp32 master weight and compute runs under autocast (what TRL and
  LLaMA-Factory do); frozen parts (a frozen tower or backbone, a LoRA base) stay in the half dtype. Checkpoints
  hold the fp32 masters, so a resume rounds nothing; the final save is cast back to the checkpoint's own dtype.
- --pure_bf16: bf16 weights, gradients and optimizer states (10 instead of 16 bytes per trained parameter), with
  torch-optimi's AdamW and Kahan summation: each bf16 weight carries a bf16 compensation buffer holding the part
  of its updates that rounding dropped, so small updates add up as in fp32 (bench/bf16_optimizers.py: cosine
  0.998 with the fp32 update at lr 1e-5; torchao's stochastic rounding 0.936, and it needs torch.compile). Its
  weight decay, a plain multiply of the bf16 weight, rounds away, so --pure_bf16 requires --weight_decay 0.
"""

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from plumbing import log

GB = 1e9


def _size(n_bytes):
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= 0.1 * GB else f"{n_bytes / 1e6:.1f} MB"


@dataclass
class LoraArguments:
    """LoRA flags, named as in TRL."""
    use_peft: bool = field(default=False, metadata={
        "help": "Train LoRA adapters (peft) instead of the full model: 7B/8B models then fit one GPU."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(default=None, metadata={
        "help": "Module names (suffixes) that get adapters. Default: every linear layer of the language model; "
                "the vision tower only when its modules are named (qkv, proj, linear_fc1, linear_fc2)."})
    merge_lora: bool = field(default=False, metadata={
        "help": "After training also write the merged model (HF format, base dtype) to OUTPUT_DIR/merged."})


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------

def lora_settings(module, lora_args, language_model):
    """The LoraConfig keyword arguments (JSON-able, so a scorer can keep them in its config) for `module`.

    Default targets: every nn.Linear inside the submodule `language_model` (a regex, so a vision tower's linear layers
    with the same names are not hit); the output layer is outside it.
    """
    targets = lora_args.lora_target_modules
    if not targets:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in module.get_submodule(language_model).named_modules()
                        if isinstance(m, nn.Linear)})
        targets = rf"{re.escape(language_model)}\..*\.({'|'.join(names)})"
    return {"r": lora_args.lora_r, "lora_alpha": lora_args.lora_alpha, "lora_dropout": lora_args.lora_dropout,
            "target_modules": targets}


def add_lora(module, settings):
    """`module` wrapped by peft with fresh adapters: the base frozen, the adapters trainable (fp32)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(module, LoraConfig(**settings))


def lora_parameter_count(module, settings):
    """Parameters LoRA with `settings` would add to `module` (r x (in + out) per targeted linear layer), without
    adding them: the memory plan's alternative for a full fine-tune that does not fit. Targets match as in peft:
    a string is a regex for the whole module name, a list holds names or name suffixes."""
    targets = settings["target_modules"]

    def targeted(name):
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    return sum(settings["r"] * (m.in_features + m.out_features) for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and targeted(name))


# ---------------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------------

def half_dtype(args):
    """The autocast dtype of this run (bf16, fp16), or None for an fp32 run."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def load_dtype(args):
    """The dtype to load a checkpoint in: the half dtype under mixed precision (frozen parts stay in it and trainable
    ones are upcast by `use_precision_policy`, so a 7B model never sits in host memory twice in fp32), else fp32."""
    return half_dtype(args) or torch.float32


def checkpoint_dtype(path, **kwargs):
    """The dtype the checkpoint at `path` is stored in (bf16 for Qwen; fp32 where its config does not say)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **kwargs).dtype or torch.float32


def check_flags(args, lora_args):
    """The one-line reason these flags cannot train together here, or None."""
    if lora_args.merge_lora and not lora_args.use_peft:
        return "--merge_lora needs --use_peft"
    sharded = "--fsdp" if args.fsdp else "--deepspeed" if args.deepspeed else None
    if sharded and (args.use_cpu or not torch.cuda.is_available()):
        # accelerate would drop the sharding without a word and train plain DDP: not what was asked
        return (f"{sharded}: sharded training (FSDP / DeepSpeed ZeRO) needs GPUs, and this run has none; on CPU "
                f"leave {sharded} out (the processes then train with DDP)")
    if args.pure_bf16 and not args.bf16:
        return "--pure_bf16 needs bf16 (--bf16 true; on CPU add --use_cpu, autocast runs there too)"
    if args.pure_bf16 and args.weight_decay > 0:  # measured in bench/bf16_optimizers.py: a decay share of 0.000
        return (f"--pure_bf16 with --weight_decay {args.weight_decay:g}: torch-optimi decays a bf16 weight by "
                f"multiplying it by 1 - lr x weight_decay, which rounds back to the same bf16 value, so no decay would "
                f"happen; add --weight_decay 0, or train with fp32 master weights (no --pure_bf16)")
    if args.pure_bf16 and lora_args.use_peft:
        return "--pure_bf16 is for full fine-tunes: LoRA adapters are small and train in fp32 (drop one of the two)"
    return None


def use_precision_policy(model, args):
    """Make every trainable parameter an fp32 master weight (unless --pure_bf16), say so on rank 0, and return the
    (optimizer class, kwargs) the Trainer must use (None: its own AdamW)."""
    half = half_dtype(args)
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32 and not args.pure_bf16:
            p.data = p.data.float()
    counts = {}  # (trained or frozen, dtype) -> parameters
    for p in model.parameters():
        key = ("trained" if p.requires_grad else "frozen", p.dtype)
        counts[key] = counts.get(key, 0) + p.numel()
    frozen = ", ".join(f"{n:,} {_name(d)}" for (kind, d), n in counts.items() if kind == "frozen") or "none"
    fp32 = counts.get(("trained", torch.float32), 0)
    if half is None:
        log(f"precision: fp32 for {fp32:,} trainable parameters; frozen: {frozen}")
    elif args.pure_bf16:
        bf16 = counts.get(("trained", torch.bfloat16), 0)
        log(f"precision: pure bf16, bf16 weights and AdamW states for {bf16:,} trainable parameters with Kahan-"
            f"compensated AdamW (torch-optimi)" + (f", fp32 for {fp32:,} (heads)" if fp32 else "")
            + f"; frozen: {frozen}")
    else:
        log(f"precision: {_name(half)} autocast, fp32 master weights for {fp32:,} trainable parameters; "
            f"frozen: {frozen}")
    if not args.pure_bf16:
        return None
    import optimi

    # optimi enables Kahan summation for bf16 parameters by default; asked for explicitly so a change of its
    # default cannot silently turn this into plain bf16 AdamW. fp32 parameters (heads) need none and get none.
    return optimi.AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                          "eps": args.adam_epsilon, "weight_decay": args.weight_decay, "kahan_sum": True}


def to_base_dtype(model, dtype, keep=()):
    """Cast the trained weights back to the checkpoint's `dtype` for the final save (not twice the size of the
    base); parameters whose names contain one of `keep` (heads, LoRA adapters) stay as they are."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and not any(k in name for k in keep):
            p.data = p.data.to(dtype)


def _name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------------------------------------------

def plan_bytes(model, args, world_size=1, shards=1):
    """Bytes per GPU of weights, gradients and optimizer states for `model` as it will train (the dtypes and
    requires_grad already set), plus the transient extras. `shards`: ranks the model states are sharded over
    (FSDP / ZeRO-3); unsharded DDP also keeps a gradient-sized bucket copy when `world_size` > 1."""
    weights = grads = states = autocast = 0
    autocast_run = half_dtype(args) is not None
    for p in model.parameters():
        size = p.numel() * p.element_size()
        weights += size
        if p.requires_grad:
            grads += size
            # AdamW: two moments in the parameter's dtype; Kahan adds one buffer per low-precision parameter
            states += 2 * size + (size if args.pure_bf16 and p.dtype != torch.float32 else 0)
            if autocast_run and p.dtype == torch.float32:
                autocast += p.numel() * 2  # the half copy autocast keeps of each fp32 weight during forward
    plan = {"weights": weights / shards, "gradients": grads / shards, "optimizer": states / shards}
    plan["total"] = sum(plan.values())
    plan["autocast_copies"] = autocast / shards
    plan["ddp_buckets"] = grads if world_size > 1 and shards == 1 else 0
    return plan


def what_would_fit(model, adapters, gpu_bytes):
    """The setups that would bring a full fine-tune's weights + gradients + optimizer states within `gpu_bytes`, each
    with its bytes per GPU: LoRA with `adapters` parameters, --pure_bf16, and the fewest GPUs to shard over."""
    n_all = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = 2 * (n_all - n_trained)  # bf16
    options = [("--use_peft (LoRA)", 2 * n_all + 16 * adapters), ("--pure_bf16", frozen + 10 * n_trained)]
    shards = next((n for n in (2, 4, 8, 16, 32, 64) if (frozen + 16 * n_trained) / n <= gpu_bytes), None)
    if shards:
        options.append((f"full fine-tuning sharded over {shards} GPUs (FSDP or ZeRO-3)",
                        (frozen + 16 * n_trained) / shards))
    return [f"{what} {_size(need)}" for what, need in options if need <= gpu_bytes]


def memory_plan(model, args, lora_adapters, gpu_bytes=None, gpu_name=None):
    """Print (rank 0) and return the per-GPU plan; a loud warning, naming what would fit, when weights, gradients
    and optimizer states alone exceed the GPU. `lora_adapters`: parameters LoRA would train (the LoRA option).
    `gpu_bytes`/`gpu_name` default to this process's GPU (none on CPU: the plan is printed for reference)."""
    if gpu_bytes is None and torch.cuda.is_available() and not args.use_cpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu_bytes, gpu_name = props.total_memory, props.name
    plan = plan_bytes(model, args, args.world_size)
    extras = [f"{name} {_size(plan[key])}" for key, name in
              (("autocast_copies", "autocast half copies of the fp32 weights during forward"),
               ("ddp_buckets", "DDP gradient buckets")) if plan[key]]
    where = f"{gpu_name}, {_size(gpu_bytes)}" if gpu_bytes else "no GPU here"
    lines = [f"memory plan per GPU ({args.world_size} process{'es' if args.world_size > 1 else ''}, not sharded; "
             f"{where}): weights {_size(plan['weights'])} + gradients {_size(plan['gradients'])} + "
             f"AdamW states {_size(plan['optimizer'])} = {_size(plan['total'])}; on top: "
             + ", ".join(extras + ["activations (gradient checkpointing keeps them small)"])]
    if gpu_bytes and plan["total"] > gpu_bytes:
        fits = what_would_fit(model, lora_adapters, gpu_bytes)
        lines.append(f"WARNING: weights, gradients and optimizer states alone need {_size(plan['total'])} per "
                     f"GPU, more than this GPU's {_size(gpu_bytes)}: the run will fail with out-of-memory. "
                     f"What would fit: {'; '.join(fits) if fits else 'nothing listed here'}")
    for line in lines:
        log(line)
    plan["lines"] = lines
    return plan
