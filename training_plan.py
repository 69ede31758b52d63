"""What trains, in which precision, and what that costs per GPU and per node: the checks of the training flags and
of the warmup, the precision policy, LoRA (peft), the memory plan (GPU and host memory), how the model is loaded
under sharding, the final save.

Both training scripts call `check_flags` and `reduce_every_micro_batch` once the arguments are parsed (before any
data or model is read), `fit_warmup` once the number of optimizer steps is known, load the model in
`load_dtype` (weights read where `reads_weights`, else the architecture alone: `build_without_weights`),
then call these in the same order:
  lora_settings -> add_lora (with --use_peft) -> use_precision_policy -> memory_plan -> Trainer(optimizer=...)
  -> use_fsdp_precision (with --fsdp) -> train -> save_final_model

Sharded training (FSDP2 through --fsdp, DeepSpeed ZeRO through --deepspeed) needs GPUs; the precision policy below
holds under FSDP2 (accelerate makes what trains fp32 as it shards the model and all-gathers it in bf16 for compute;
gradients are reduce-scattered in fp32 after every micro-batch; fp32 heads get their own fp32 unit,
`keep_fp32_under_fsdp`). Under DeepSpeed the weights are bf16 and its ZeRO optimizer keeps the fp32 master
weights; the shipped JSON has it reduce and accumulate the gradients in fp32 (`deepspeed_gradient_dtypes`).

Host memory is per node (8 processes each holding an fp32 copy of a 7B model is 244 GB): on GPUs each process loads
straight onto its own GPU (`load_device`); with --fsdp and `cpu_ram_efficient_loading` only rank 0 reads the
checkpoint (`loads_on_main_only`); the final save gathers one tensor at a time (`final_state_dict`); the plan's host
line says what a node needs.

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

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

from plumbing import fail, log, warn

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

    try:
        return get_peft_model(module, LoraConfig(**settings))
    except ValueError as e:  # peft's own error for targets that name no module (a typo): one line, every rank
        fail(f"--lora_target_modules: {' '.join(str(e).split())}", every_rank=True)


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


def loads_on_main_only(args):
    """Whether only the main process reads the checkpoint: --fsdp with `cpu_ram_efficient_loading` in its fsdp_config.
    accelerate then upcasts rank 0's copy to fp32, shards it and broadcasts each tensor's shards from rank 0
    (`fsdp2_prepare_model`), so every other process only needs the architecture (`build_without_weights`). The
    library switch for this, transformers' `is_fsdp_enabled` (ACCELERATE_USE_FSDP), no longer keeps weights off
    other ranks in transformers 5: from_pretrained reads every weight on every rank (measured), so the scripts
    build those ranks' models themselves."""
    return bool(args.fsdp) and str(args.fsdp_config.get("cpu_ram_efficient_loading", False)).lower() == "true"


def reads_weights(args):
    """Whether this process loads the checkpoint's weights: not in a dry run, nor on a rank other than the main one
    when `loads_on_main_only`. Host memory per node at load is then one copy, not one per process."""
    return not args.dry_run and (args.process_index == 0 or not loads_on_main_only(args))


def load_device(args):
    """The device this process loads the checkpoint onto (`device_map`), or None for the CPU. On GPUs each process
    loads straight onto its own GPU (safetensors pages go from the page cache, which a node's processes share, to the
    GPU; no process holds a host copy, and what trains is upcast there), except where the library wants the weights
    on the CPU: rank-0 loading (`loads_on_main_only`), whose copy accelerate shards and broadcasts, and DeepSpeed,
    whose ZeRO-3 places the partitions itself. Without this, every process of an 8-GPU node kept its own copy in host
    memory: 260.6 GB for the 8B scorer under FSDP2 (accelerate upcasts before it shards), 122 GB for 7B LoRA."""
    if args.use_cpu or args.deepspeed or loads_on_main_only(args) or not torch.cuda.is_available():
        return None
    return args.device


def build_without_weights(build, dtype):
    """`build()`'s model with its parameters on the meta device in `dtype` (shapes and dtypes: no memory, nothing
    read) and its buffers real. Real buffers matter: the rotary inv_freq tables are computed at construction (in
    fp32, as from_pretrained leaves them) and are in no checkpoint, and accelerate keeps each rank's own
    non-persistent buffers when it broadcasts rank 0's weights."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def checkpoint_dtype(path, **kwargs):
    """The dtype the checkpoint at `path` is stored in (bf16 for Qwen; fp32 where its config does not say)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **kwargs).dtype or torch.float32


POLYNOMIAL_LR_END = 1e-7  # transformers' get_polynomial_decay_schedule_with_warmup default


def check_flags(args, lora_args):
    """The one-line reason these flags cannot train together here, or None. Both training scripts call it once the
    flags are parsed, before any data or model is read: a value out of range, a combination that cannot run."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            return f"--{flag} {getattr(args, flag)}: must be at least 1"
    if args.max_steps == 0:  # the Trainer would read 0 as "no limit" and train by epochs after all
        return ("--max_steps 0 trains nothing: give the number of optimizer steps, or leave it out (-1) to train "
                "--num_train_epochs")
    if args.max_steps < 0 and args.num_train_epochs <= 0:
        return f"--num_train_epochs {args.num_train_epochs:g} trains nothing: give a positive number (or --max_steps)"
    if args.learning_rate < 0:
        return f"--learning_rate {args.learning_rate:g}: must not be negative"
    if args.lr_scheduler_type == "polynomial" and args.learning_rate <= (
            lr_end := (args.lr_scheduler_kwargs or {}).get("lr_end", POLYNOMIAL_LR_END)):
        return (f"--learning_rate {args.learning_rate:g} is not above the polynomial schedule's lr_end {lr_end:g}, "
                f"where it decays to: raise --learning_rate, or set a lower lr_end in --lr_scheduler_kwargs")
    if args.weight_decay < 0:
        return f"--weight_decay {args.weight_decay:g}: must not be negative"
    for kind in ("save", "eval", "logging"):  # the Trainer would then never save / evaluate / log, without a word
        if getattr(args, f"{kind}_strategy") == "steps" and (steps := getattr(args, f"{kind}_steps")) is not None \
                and steps <= 0:
            return f"--{kind}_steps {steps:g} with --{kind}_strategy steps: must be positive"
    for flag in ("seed", "data_seed"):  # numpy's and torch's seeds are 32-bit unsigned
        if (seed := getattr(args, flag)) is not None and not 0 <= seed < 2 ** 32:
            return f"--{flag} {seed}: must be in 0 .. 2**32 - 1"
    if args.dataloader_prefetch_factor is not None and args.dataloader_prefetch_factor < 1:
        return f"--dataloader_prefetch_factor {args.dataloader_prefetch_factor}: must be at least 1"
    if args.warmup_steps < 0:
        return f"--warmup_steps {args.warmup_steps:g}: must not be negative (steps, or a share of all steps if < 1)"
    if args.save_total_limit is not None and args.save_total_limit < 1:  # the Trainer would keep every checkpoint
        return (f"--save_total_limit {args.save_total_limit}: keep at least 1 checkpoint (the newest is what a "
                f"stopped run resumes from); to keep none use --save_strategy no, to keep all a number above their "
                f"count")
    if args.max_bad_steps < 1:
        return f"--max_bad_steps {args.max_bad_steps}: must be at least 1 (non-finite steps in a row before stopping)"
    if args.dataloader_num_workers < 0:
        return f"--dataloader_num_workers {args.dataloader_num_workers}: must not be negative (0 loads in process)"
    if args.fp16 and args.device.type == "cpu":  # accelerate turns autocast on for fp16 on accelerators only
        return ("--fp16 on CPU: there is no fp16 autocast there, so the run would train in fp32 while saying fp16; "
                "use --bf16 true (autocast runs on CPU) or leave --fp16 out")
    if lora_args.use_peft and (lora_args.lora_r < 1 or lora_args.lora_alpha <= 0):
        return f"--lora_r {lora_args.lora_r} / --lora_alpha {lora_args.lora_alpha}: both must be positive"
    if lora_args.use_peft and not 0 <= lora_args.lora_dropout < 1:
        return f"--lora_dropout {lora_args.lora_dropout:g}: must be in [0, 1)"
    if lora_args.merge_lora and not lora_args.use_peft:
        return "--merge_lora needs --use_peft"
    sharded = "--fsdp" if args.fsdp else "--deepspeed" if args.deepspeed else None
    if sharded and (args.use_cpu or not torch.cuda.is_available()):
        # accelerate would drop the sharding without a word and train plain DDP: not what was asked
        return (f"{sharded}: sharded training (FSDP / DeepSpeed ZeRO) needs GPUs, and this run has none; on CPU "
                f"leave {sharded} out (the processes then train with DDP)")
    if args.save_on_each_node:  # save_pretrained's should_save_on_this_rank: global rank 0 only, once a group exists
        return ("--save_on_each_node: transformers writes a full model's weights only on global rank 0, so the other "
                "nodes' checkpoints would lack them and could not resume (a copy per node is not supported here); drop "
                "it and put --output_dir on a filesystem every node sees")
    if args.pure_bf16 and not args.bf16:
        return "--pure_bf16 needs bf16 (--bf16 true; on CPU add --use_cpu, autocast runs there too)"
    if args.pure_bf16 and args.weight_decay > 0:  # measured in bench/bf16_optimizers.py: a decay share of 0.000
        return (f"--pure_bf16 with --weight_decay {args.weight_decay:g}: torch-optimi decays a bf16 weight by "
                f"multiplying it by 1 - lr x weight_decay, which rounds back to the same bf16 value, so no decay would "
                f"happen; add --weight_decay 0, or train with fp32 master weights (no --pure_bf16)")
    if lora_args.merge_lora and sharded:
        return (f"--merge_lora with {sharded}: the adapters end the run sharded over the GPUs; train without it and "
                f"merge the saved adapters afterwards in one process (peft's merge_and_unload)")
    if args.pure_bf16 and sharded:
        return (f"--pure_bf16 with {sharded}: sharded training keeps fp32 master weights of what trains (FSDP2 "
                f"through accelerate upcasts them, ZeRO keeps them in its optimizer) and divides their memory by the "
                f"number of GPUs instead; drop --pure_bf16")
    if args.pure_bf16 and lora_args.use_peft:
        return "--pure_bf16 is for full fine-tunes: LoRA adapters are small and train in fp32 (drop one of the two)"
    return None


def use_precision_policy(model, args):
    """Make every trainable parameter an fp32 master weight (unless --pure_bf16), say so on rank 0, and return the
    (optimizer class, kwargs) the Trainer must use (None: its own AdamW)."""
    half = half_dtype(args)
    if args.deepspeed:  # ZeRO-3 has already partitioned the weights; its optimizer holds the fp32 masters
        reduced, accumulated = deepspeed_gradient_dtypes(args)
        log(f"precision: DeepSpeed, {_name(half or torch.float32)} weights, gradients reduced in {_name(reduced)} and "
            f"accumulated in {_name(accumulated)}, fp32 master weights and AdamW states inside its ZeRO optimizer")
        return None
    # Under FSDP2 accelerate upcasts what trains as it shards the model (on rank 0 alone with `loads_on_main_only`);
    # an upcast here would put a full fp32 copy in every process's host memory first.
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32 and not args.pure_bf16 \
                and not args.fsdp:
            p.data = p.data.float()
    counts = {}  # (trained or frozen, dtype as it trains) -> parameters
    for p in model.parameters():
        key = ("trained" if p.requires_grad else "frozen", trained_dtype(p, args))
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
        log(f"precision: {_name(half)} autocast, fp32 master weights for {fp32:,} trainable parameters"
            + (" (upcast by accelerate as FSDP2 shards the model)" if args.fsdp else "") + f"; frozen: {frozen}")
    if not args.pure_bf16:
        return None
    import optimi

    # optimi enables Kahan summation for bf16 parameters by default; asked for explicitly so a change of its
    # default cannot silently turn this into plain bf16 AdamW. fp32 parameters (heads) need none and get none.
    return optimi.AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                          "eps": args.adam_epsilon, "weight_decay": args.weight_decay, "kahan_sum": True}


def trained_dtype(p, args):
    """The dtype parameter `p` trains in: under FSDP2 with a half dtype accelerate makes what trains fp32 when it
    shards the model (`use_precision_policy` leaves that to it); otherwise the dtype it has now."""
    if args.fsdp and half_dtype(args) is not None and p.requires_grad and p.is_floating_point():
        return torch.float32
    return p.dtype


def saved_as(name, tensor, dtype, keep=()):
    """`tensor` as the final save holds it: floating point in the checkpoint's `dtype` (not twice the size of the
    base), unless `name` contains one of `keep` (fp32 heads, LoRA adapters: small)."""
    return tensor.to(dtype) if tensor.is_floating_point() and not any(k in name for k in keep) else tensor


def to_base_dtype(model, dtype, keep=()):
    """Cast the trained weights in place as `saved_as` says (before a merged model is saved)."""
    for name, p in model.named_parameters():
        p.data = saved_as(name, p.data, dtype, keep)


def keep_fp32_under_fsdp(modules, args):
    """Give each of `modules` (the scorer's heads) its own FSDP2 unit that computes in fp32, before the Trainer
    shards the rest: accelerate would otherwise all-gather them in bf16 with their layer group (its policy casts
    every weight to the run's half dtype), and it leaves units that are already sharded as they are."""
    if not args.fsdp or half_dtype(args) is None:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _ = args.device  # the process group and this rank's GPU, on which fully_shard's default mesh places the shards
    for module in modules:
        fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))


def use_fsdp_precision(trainer, args):
    """The FSDP2 policy of a half-precision run, set on the Trainer's plugin before training shards the model:
    weights all-gathered in the half dtype for compute (accelerate adds no autocast under FSDP2: this is what makes
    compute bf16), gradients reduce-scattered in fp32 (accelerate's default reduces them in bf16, one more rounding
    of every fp32 master update), inputs and outputs left as they are (its default casts every float input, the
    scorer's score labels too, and every output, its predictions and losses, to bf16). The models cast what they
    compute on themselves: embeddings come out bf16, pixel values are cast to the vision tower's dtype."""
    half = half_dtype(args)
    if not args.fsdp or half is None:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=half, reduce_dtype=torch.float32, cast_forward_inputs=False)


def save_final_model(trainer, model, output_dir, dtype, keep=()):
    """Save the trained `model` as one HF folder that `from_pretrained` loads, in the checkpoint's `dtype` (not twice
    its size); tensors whose names contain one of `keep` (fp32 heads, LoRA adapters) stay as they are. A model
    sharded with FSDP2 is gathered one tensor at a time (`final_state_dict`); under DeepSpeed the Trainer saves the
    bf16 weights ZeRO-3 gathers (`stage3_gather_16bit_weights_on_model_save`). The tokenizer or processor goes with
    it. `config.json` says `dtype`, the dtype of the saved weights: save_pretrained writes the model's own, the fp32
    of its masters, and `from_pretrained` would then load a 7B model in fp32 (30.5 GB instead of 15.2)."""
    if trainer.is_deepspeed_enabled:
        trainer.save_model(output_dir)
        return
    from transformers import PreTrainedModel

    state = final_state_dict(model, dtype, keep, trainer.args.should_save)
    if trainer.args.should_save:
        model.save_pretrained(output_dir, state_dict=state)
        if isinstance(model, PreTrainedModel):  # a peft model saves its adapters and adapter_config.json only
            model.config.dtype = dtype
            model.config.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)


def final_state_dict(model, dtype, keep=(), here=True):
    """Every tensor of `model` whole, as `saved_as` says, where `here` (the process that writes; others get {}).
    FSDP2 shards are gathered one tensor at a time onto the CPU, every rank taking part in each gather in the same
    order (state_dict order), and each is cast to the save dtype at once: the writer holds one full copy in the save
    dtype plus one gathered tensor (15.2 GB for Qwen2-7B), not the fp32 model and then its cast copy (45.7 GB).
    Unsharded tensors stay where they are (save_pretrained moves what it writes, a shard at a time, and leaves out
    what a heads or adapter save does not hold)."""
    from torch.distributed.tensor import DTensor

    state, done = {}, {}  # done: one gather and one copy for a tensor held under two names (tied embeddings)
    for name, held in model.state_dict(keep_vars=True).items():  # the model's own tensors: ids stay fixed
        if id(held) not in done:
            tensor = held.detach()
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            saved = saved_as(name, whole, dtype, keep) if here else None
            done[id(held)] = saved.cpu() if here and isinstance(tensor, DTensor) else saved
            del whole
        if here:
            state[name] = done[id(held)]
    return state


def _name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------------------------------------------

def sharding(args):
    """(name, ranks, the parts sharded over them) of this run: FSDP2 and ZeRO-3 shard weights, gradients and
    optimizer states over every rank, ZeRO-2 gradients and states, ZeRO-1 states; None: not sharded."""
    parts = ("optimizer", "gradients", "weights")
    if args.fsdp:
        return "FSDP2", args.world_size, parts
    if args.deepspeed:
        stage = int(deepspeed_config(args).get("zero_optimization", {}).get("stage", 0))
        return f"DeepSpeed ZeRO-{stage}", args.world_size, parts[:stage]
    return None


def deepspeed_config(args):
    """The run's DeepSpeed configuration (--deepspeed: a JSON file, or a dict when called from Python)."""
    if isinstance(args.deepspeed, dict):
        return args.deepspeed
    with open(args.deepspeed) as f:
        return json.load(f)


def deepspeed_gradient_dtypes(args):
    """(the dtype DeepSpeed reduces gradients in, the dtype it accumulates and keeps them in), read from its JSON as
    DeepSpeed reads `communication_data_type` and `data_types.grad_accum_dtype`. Each defaults to the model's dtype:
    bf16 under bf16, every micro-batch's gradient rounded to bf16 and summed in bf16 (configs/deepspeed/zero3.json
    sets both to fp32; ZeRO-3 then keeps a 4-byte gradient partition per parameter instead of 2)."""
    from deepspeed.runtime.config import DtypeEnum, get_communication_data_type

    config = deepspeed_config(args)
    model = half_dtype(args) or torch.float32
    accumulated = config.get("data_types", {}).get("grad_accum_dtype")
    return (get_communication_data_type(config) or model,
            DtypeEnum(accumulated).value if accumulated is not None else model)


def plan_bytes(model, args, world_size=1, sharded=None):
    """Bytes per GPU of weights, gradients and optimizer states for `model` as it will train (the dtypes and
    requires_grad already set; DeepSpeed's gradients in the dtype it accumulates them in), plus the transient extras.
    `sharded`: `sharding(args)`, or None (unsharded DDP then also keeps a gradient-sized bucket copy when
    `world_size` > 1)."""
    weights = grads = states = autocast = trained = 0
    autocast_run = half_dtype(args) is not None
    ds_grad_bytes = deepspeed_gradient_dtypes(args)[1].itemsize if args.deepspeed else None
    for p in model.parameters():
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty placeholder and records the full size
        size = numel * trained_dtype(p, args).itemsize
        weights += size
        if p.requires_grad:
            trained += numel
            grads += numel * ds_grad_bytes if ds_grad_bytes else size
            if args.deepspeed and autocast_run:  # ZeRO's optimizer: an fp32 master copy and two fp32 moments
                states += 12 * numel
            else:  # AdamW: two moments in the parameter's dtype; Kahan adds one buffer per low-precision parameter
                states += 2 * size + (size if args.pure_bf16 and p.dtype != torch.float32 else 0)
            if autocast_run and p.dtype == torch.float32 and not sharded:
                autocast += numel * 2  # the half copy autocast keeps of each fp32 weight during forward
    _, ranks, parts = sharded or ("", 1, ())
    plan = {part: value / (ranks if part in parts else 1)
            for part, value in (("weights", weights), ("gradients", grads), ("optimizer", states))}
    plan["total"] = sum(plan.values())
    plan["autocast_copies"] = autocast
    plan["ddp_buckets"] = grads if world_size > 1 and not sharded else 0
    plan["gathered"] = 2 * 2 * _largest_layer(model) if "weights" in parts else 0
    # FSDP2 without rank-0 loading: each process loads the whole model onto its GPU (`load_device`) and accelerate
    # upcasts what trains there before it shards: a peak at setup, gone once the model is sharded (plus the shards,
    # made while accelerate still holds the unsharded state dict it keeps for rank-0 loading)
    plan["unsharded_at_setup"] = weights * (1 + 1 / ranks) if args.fsdp and not loads_on_main_only(args) else 0
    # FSDP2's backward: a unit's unsharded gradient in the compute dtype, then its fp32 copy to reduce-scatter
    # (torch _fsdp_collectives.foreach_reduce): 3.3 GB at 7B for the embedding's unit
    plan["reduce_buffers"] = (2 + 4) * _largest_layer(model) if args.fsdp else 0
    # FSDP2 under no_sync: from the first micro-batch to the last, every unit holds its whole gradient in the fp32
    # reduce dtype where its shard would be (zero_grad freed the shards): all of it, less the shard counted above
    plan["no_sync_gradients"] = 4 * trained - plan["gradients"] if holds_unsharded_gradients(args) else 0
    # ZeRO-3's optimizer step flattens each sub-group's gradient partition into a new fp32 tensor (stage3.py,
    # _prepare_fp32_grad_for_sub_group): up to `sub_group_size` elements at a time (3.8 GB at 7B over 8 GPUs)
    zero3 = bool(args.deepspeed) and "weights" in parts
    sub_group = deepspeed_config(args).get("zero_optimization", {}).get("sub_group_size", 1e9) if zero3 else 0
    plan["zero3_step_gradients"] = 4 * min(sub_group, trained / ranks)
    return plan


def reduce_every_micro_batch(args):
    """Under --fsdp, have the Trainer reduce-scatter gradients after every micro-batch (accelerate's
    `sync_each_batch`), unless the run's accelerator_config sets it. Otherwise the Trainer runs all but the last
    micro-batch of each step under `no_sync`, and FSDP2 then keeps every unit's unsharded gradient in fp32 until the
    last one: 4 bytes per trained parameter on every GPU, whatever their number (30.5 GB for Qwen2-7B). The price is
    one fp32 reduce-scatter per micro-batch instead of one per step, overlapped with the backward pass."""
    if args.fsdp:
        kwargs = args.accelerator_config.gradient_accumulation_kwargs or {}
        kwargs.setdefault("sync_each_batch", True)
        args.accelerator_config.gradient_accumulation_kwargs = kwargs


def holds_unsharded_gradients(args):
    """Whether FSDP2 keeps every unsharded gradient between micro-batches in this run (`reduce_every_micro_batch`)."""
    return bool(args.fsdp) and args.gradient_accumulation_steps > 1 and not (
        args.accelerator_config.gradient_accumulation_kwargs or {}).get("sync_each_batch", False)


def host_bytes(model, args, sharded, per_process_total):
    """(processes per node, {load, training, save}: host bytes on the node of rank 0). Per node = processes x what
    each holds. Loading on GPUs: the checkpoint's pages in the page cache, one copy shared by the node's processes,
    which load straight onto their GPUs (`load_device`), except with rank-0 loading (FSDP2 with
    `loads_on_main_only`: rank 0's copy, upcast by accelerate on the CPU) and under ZeRO-3 (transformers reads the
    state dict on rank 0 alone, other ranks map it to the meta device, and zero.Init puts the partitions on the
    GPUs); with --use_cpu every process holds its own copy, upcast. Training: the weights live on the GPUs (with
    --use_cpu in every process: `per_process_total`). The final save: one copy in the checkpoint's dtype on rank 0
    (`final_state_dict`; ZeRO-3's gathered 16-bit weights)."""
    per_node = processes_per_node(args)
    itemsize = load_dtype(args).itemsize
    trained = saved = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        trained += numel * trained_dtype(p, args).itemsize
        saved += numel * min(p.element_size(), itemsize)  # as loaded and saved (fp32 heads, adapters: small)
    name = sharded[0] if sharded else ""
    load = (per_node * trained if args.use_cpu else trained if name == "FSDP2" and loads_on_main_only(args)
            else saved)
    return per_node, {"load": load, "training": per_node * per_process_total if args.use_cpu else 0, "save": saved}


def processes_per_node(args):
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, else one per GPU (every process on CPU)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or min(args.world_size,
                                                               torch.cuda.device_count() or args.world_size)


def loader_sample_bytes(max_len, image_processor=None, most_images=None, max_pixels=None):
    """A sample's tensors in a batch at their largest: three int64 values per token (input ids, attention mask, and
    labels, position ids or mm_token_type_ids), plus for a VL sample its fp32 pixel values, merge_size**2 patches of
    3 x temporal_patch_size x patch_size**2 values per visual token. Visual tokens: `most_images` (None: not counted)
    times max_pixels / (patch_size x merge_size)**2 each (qwen_vl_utils resizes within max_pixels to multiples of
    that side), and never more than `max_len`, since a longer sample is refused."""
    tokens = 3 * 8 * max_len
    if image_processor is None:
        return tokens
    ip = image_processor
    per_image = max_pixels // (ip.patch_size * ip.merge_size) ** 2
    visual = max_len if most_images is None else min(max_len, most_images * per_image)
    return tokens + 4 * visual * ip.merge_size ** 2 * 3 * ip.temporal_patch_size * ip.patch_size ** 2


def loader_shm_bytes(args, batch_bytes):
    """Shared memory a node's DataLoader workers fill at once: every worker of every process keeps
    `dataloader_prefetch_factor` batches (torch's default 2) of `batch_bytes` in flight, each handed to the training
    process as a /dev/shm file."""
    return (processes_per_node(args) * args.dataloader_num_workers * (args.dataloader_prefetch_factor or 2)
            * batch_bytes)


SHM = "/dev/shm"


def shm_free():
    """Free bytes in /dev/shm, or None where there is none."""
    return shutil.disk_usage(SHM).free if os.path.isdir(SHM) else None


def check_loader_shm(args, batch_bytes):
    """Say in one line, on each node whose /dev/shm has less room than its DataLoader workers may fill at once
    (`loader_shm_bytes`), what to change: the failure would otherwise be a worker's bus error ("unable to write to
    file </torch_...>") hours in (Docker gives a container 64 MB). A warning, not a refusal: the need is an upper
    bound (every batch at its largest samples). No sharing strategy avoids /dev/shm: torch's file_descriptor (Linux
    default) and file_system both put each batch in a file there. Returns the need."""
    import socket
    import sys

    need = loader_shm_bytes(args, batch_bytes)
    free = shm_free() if need and args.local_process_index == 0 else None  # each node's local main, its own
    if free is not None and need > free:
        per_node, workers = processes_per_node(args), args.dataloader_num_workers
        print(f"warning: {SHM} on {socket.gethostname()} has {_size(free)} free; {workers} DataLoader worker"
              f"{'s' if workers > 1 else ''} x {args.dataloader_prefetch_factor or 2} prefetched batches x {per_node} "
              f"process{'es' if per_node > 1 else ''} may need up to {_size(need)} (a bus error when it runs out): "
              f"start the container with --shm-size={math.ceil(need / 2 ** 30)}g (or give the node a larger {SHM}), "
              f"or lower --dataloader_num_workers (0 loads in the training process) or the batch size",
              file=sys.stderr, flush=True)
    return need


def _largest_layer(model):
    """The parameter count of the largest unit FSDP2 / ZeRO-3 gathers whole (a decoder layer, a vision block or the
    embedding): the plan's "gathered" extra is two such units (one prefetched) in the half dtype."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    sizes = [sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for m in model.modules()
             if type(m).__name__ in blocks or isinstance(m, nn.Embedding)]
    return max(sizes, default=0)


def optimizer_steps(samples, args):
    """(optimizer steps per epoch, in all) for `samples` training samples, as the Trainer counts them: every rank
    takes `per_device_train_batch_size` samples a batch (the last one of an epoch may be short), a step is
    `gradient_accumulation_steps` batches, and --max_steps overrides the epochs."""
    per_epoch = max(1, math.ceil(samples / (args.world_size * args.per_device_train_batch_size
                                            * args.gradient_accumulation_steps)))
    return per_epoch, args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)


def fit_warmup(args, steps):
    """Check the warmup against the run's `steps` optimizer steps once they are known (both scripts, before training
    and in a dry run): a warmup of every step, which the polynomial schedule cannot run (it divides by the steps after
    the warmup: ZeroDivisionError at the last step), is cut to one step less, said in one line; a warmup at least as
    long as the run, where the learning rate never reaches its peak, is one warning line."""
    warmup = args.get_warmup_steps(steps)
    if warmup == steps and args.lr_scheduler_type == "polynomial":
        args.warmup_steps = steps - 1
        warn(f"--warmup_steps: a warmup of all {steps} steps leaves the polynomial schedule no step to decay over; "
             f"warmup cut to {steps - 1} steps")
    elif warmup >= steps:
        warn(f"--warmup_steps: a warmup of {warmup} steps is not shorter than the run's {steps} steps, so the learning "
             f"rate never reaches --learning_rate {args.learning_rate:g} (at most {(steps - 1) / warmup:.0%} of it); "
             f"give fewer warmup steps, or a share of all steps (< 1)")


def steps_line(samples, args, unit):
    """`optimizer_steps` as the dry runs print it: per epoch, the batch it is made of, and in all."""
    per_epoch, steps = optimizer_steps(samples, args)
    return (f"{per_epoch:,} optimizer steps per epoch of {args.world_size} x {args.per_device_train_batch_size} x "
            f"{args.gradient_accumulation_steps} {unit}, {steps:,} in all"
            + (" (--max_steps)" if args.max_steps > 0 else f" ({args.num_train_epochs:g} epochs)"))


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


def lean_loss_bytes(head, args):
    """What the lean loss (lean_loss.py) holds at once for the output layer `head` in this run: sharded runs hand it
    the weight gathered in the half dtype, unsharded ones their own (fp32 master) weight."""
    from lean_loss import buffer_bytes

    weight = head.weight
    compute = half_dtype(args) or torch.float32
    sharded = sharding(args)
    seen = compute if sharded and "weights" in sharded[2] else weight.dtype
    vocab, hidden = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3 leaves an empty placeholder
    return buffer_bytes(vocab, hidden, seen, compute, weight.requires_grad)


def memory_plan(model, args, lora_adapters, gpu_bytes=None, gpu_name=None, lean_loss=None, loader_shm=0):
    """Print (rank 0) and return the per-GPU plan, then the host memory per node (`host_bytes`, in "host_line");
    a loud warning, naming what would fit, when weights, gradients and optimizer states alone exceed the GPU.
    `lora_adapters`: parameters LoRA would train (the LoRA option). `gpu_bytes`/`gpu_name` default to this process's
    GPU (none on CPU: the plan is printed for reference). `lean_loss`: the output layer whose loss lean_loss.py
    computes (its buffers are counted), or None. `loader_shm`: the DataLoader workers' /dev/shm (`check_loader_shm`)."""
    if gpu_bytes is None and torch.cuda.is_available() and not args.use_cpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu_bytes, gpu_name = props.total_memory, props.name
    sharded = sharding(args)
    plan = plan_bytes(model, args, args.world_size, sharded)
    plan["lean_loss"] = lean_loss_bytes(lean_loss, args) if lean_loss is not None else 0
    extras = [f"{name} {_size(plan[key])}" for key, name in
              (("autocast_copies", "autocast half copies of the fp32 weights during forward"),
               ("ddp_buckets", "DDP gradient buckets"),
               ("gathered", "the layers gathered whole at a time (bf16)"),
               ("reduce_buffers", "a layer's gradient before its fp32 reduce-scatter"),
               ("unsharded_at_setup", "at setup, the whole model on each GPU until FSDP2 shards it"),
               ("no_sync_gradients", "the unsharded fp32 gradients FSDP2 holds between micro-batches "
                                     "(accelerator_config gradient_accumulation_kwargs sync_each_batch is false)"),
               ("zero3_step_gradients", "ZeRO-3's fp32 copy of a gradient partition at the optimizer step"),
               ("lean_loss", "the loss's buffers (fp32 logits of a chunk, the output layer's fp32 gradient)"))
              if plan[key]]
    where = f"{gpu_name}, {_size(gpu_bytes)}" if gpu_bytes else "no GPU here"
    processes = f"{args.world_size} process{'es' if args.world_size > 1 else ''}"
    how = f"{sharded[0]}, sharded over {sharded[1]} ranks" if sharded else f"{processes}, not sharded"
    lines = [f"memory plan per GPU ({how}; {where}): weights {_size(plan['weights'])} + "
             f"gradients {_size(plan['gradients'])} + "
             f"AdamW states {_size(plan['optimizer'])} = {_size(plan['total'])}; on top: "
             + ", ".join(extras + ["activations (gradient checkpointing keeps them small)"])]
    per_node, plan["host"] = host_bytes(model, args, sharded, plan["total"])
    training = _size(plan["host"]["training"]) if plan["host"]["training"] else "little (weights on the GPUs)"
    plan["host_line"] = (f"host memory per node ({per_node} process{'es' if per_node > 1 else ''}): at load "
                         f"{_size(plan['host']['load'])}, in training {training}, at the final save "
                         f"{_size(plan['host']['save'])} (rank 0's)"
                         + (f"; DataLoader batches in {SHM} {_size(loader_shm)}" if loader_shm else ""))
    if gpu_bytes and plan["total"] > gpu_bytes:
        fits = what_would_fit(model, lora_adapters, gpu_bytes)
        lines.append(f"WARNING: weights, gradients and optimizer states alone need {_size(plan['total'])} per "
                     f"GPU, more than this GPU's {_size(gpu_bytes)}: the run will fail with out-of-memory. "
                     f"What would fit: {'; '.join(fits) if fits else 'nothing listed here'}")
    for line in lines[:1] + [plan["host_line"]] + lines[1:]:
        log(line)
    plan["lines"] = lines
    return plan
