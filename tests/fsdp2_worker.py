"""The model-level pieces of FSDP2 training, run by tests/test_sharding.py under torchrun with 2 CPU processes (gloo).

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py WORKDIR     # rank 0 writes WORKDIR/results.json

Trainer shards only on GPUs (accelerate ignores --fsdp on a CPU), but torch's own `fully_shard` runs here. Each
check shards a tiny model in the units accelerate 1.15 makes for `Trainer(--fsdp)` (`shard_like_accelerate`), runs
the same batches as an unsharded copy of it (each rank its half), and reports the largest relative differences of
losses, gradients and weights after AdamW steps, then saves with the scripts' `save_final_model` and reloads. One
more runs gradient accumulation as the Trainer does and reports the gradient bytes each rank holds after each
micro-batch, with the memory plan's figure for the same model and settings (`check_held_gradients`).
Then it writes checkpoints as the Trainer does under FSDP2 with the recipes' SHARDED_STATE_DICT (accelerate's own
save functions, which run on CPU) and loads one back into the layout of another number of processes.
Host memory: sft_qwen2.py's rank-0 loading through accelerate's own `fsdp2_prepare_model` (bytes each rank holds
at each stage), and rank 0's peak resident memory while the final save gathers a larger model. Last, prediction by
generation on a sharded model, every rank in lockstep (`check_generation_lockstep`).
"""

import gc
import json
import os
import random
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402
from collate import IGNORE_INDEX, collate_vl, encode_vl_example  # noqa: E402
from lean_loss import use_lean_causal_lm_loss  # noqa: E402
from plumbing import leave_process_group  # noqa: E402
from training_plan import (LoraArguments, add_lora, keep_fp32_under_fsdp, lora_settings, plan_bytes,  # noqa: E402
                           reduce_every_micro_batch, save_final_model, sharding, use_fsdp_precision)

WORLD = 2
NO_DROPOUT = LoraArguments(use_peft=True, lora_dropout=0.0)  # LoRA's dropout would draw different masks per copy


def shard_like_accelerate(model, mp_policy=None, lm_head_alone=False):
    """FSDP2 units as accelerate 1.15's `fsdp2_prepare_model` makes them: every decoder layer and vision block
    (the model's `_no_split_modules`), the input embedding, the final norm with the output layer (not resharded
    after forward), then the root. `lm_head_alone`: the output layer in a unit of its own, whose forward never runs
    under the lean loss (the case `lean_loss.full_weight` gathers by hand)."""
    kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    blocks = set(model._no_split_modules)
    for module in reversed(list(model.modules())):
        if type(module).__name__ in blocks:
            fully_shard(module, **kw)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    tied = head is not None and embed.weight is head.weight
    if not tied:
        fully_shard(embed, **kw)
    if head is not None:
        norm = inner.model.norm
        if lm_head_alone and not tied:
            fully_shard(head, **kw)
            fully_shard(norm, **kw)
        else:
            fully_shard([norm, embed, head] if tied else [norm, head], reshard_after_forward=False, **kw)
    fully_shard(model, **kw)
    return model


def whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def rel(a, b):
    a, b = whole(a).detach().float(), whole(b).detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def model_rel(pairs):
    """The largest difference over the largest reference value, across every (sharded, reference) tensor pair of a
    model. Per tensor would be ill-posed: a bias whose gradient is zero in exact arithmetic (k_proj's, under the
    softmax) has rounding noise for a gradient, and AdamW turns noise into full-size steps of a near-zero weight."""
    pairs = [(whole(a).detach().float(), b.detach().float()) for a, b in pairs]
    return (max((a - b).abs().max() for a, b in pairs) / max(b.abs().max() for _, b in pairs)).item()


def compare_training(sharded, reference, rank_batches, loss_of, steps=2):
    """Train both on the same batches (the sharded copy on this rank's half, the reference on all) with AdamW;
    {loss, gradients, weights}: the largest relative differences met (`model_rel`)."""
    rank = dist.get_rank()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (sharded, reference)]
    worst = {"loss": 0.0, "gradients": 0.0}
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        # Each rank's loss is its share of the whole batch's loss (as Trainer scales it), so FSDP2's averaging of
        # gradients across ranks gives exactly the whole batch's gradient.
        mine = loss_of(sharded, rank_batches[rank])
        (mine * WORLD).backward()
        total = mine.detach().clone()
        dist.all_reduce(total)
        ref = sum(loss_of(reference, b) for b in rank_batches)
        ref.backward()
        worst["loss"] = max(worst["loss"], abs(total.item() - ref.item()) / abs(ref.item()))
        worst["gradients"] = max(worst["gradients"], model_rel(
            [(p.grad, q.grad) for p, q in zip(sharded.parameters(), reference.parameters()) if q.requires_grad]))
        for opt in opts:
            opt.step()
    worst["weights"] = model_rel(list(zip(sharded.parameters(), reference.parameters())))
    worst["trained"] = sum(int(p.grad is not None) for p in reference.parameters())  # tensors that trained
    return worst


def fsdp_policy():
    """The MixedPrecisionPolicy `use_fsdp_precision` sets on the Trainer's FSDP plugin for a bf16 run."""
    plugin = SimpleNamespace()
    use_fsdp_precision(SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))),
                       SimpleNamespace(fsdp=True, bf16=True, fp16=False))
    return plugin.mixed_precision_policy


def trainer_like(processor):
    """What `save_final_model` reads of a Trainer."""
    return SimpleNamespace(is_deepspeed_enabled=False, args=SimpleNamespace(should_save=dist.get_rank() == 0),
                           processing_class=processor)


# ---------------------------------------------------------------------------------------------------------------
# SFT: the lean loss (it reads lm_head.weight outside lm_head's forward) and LoRA
# ---------------------------------------------------------------------------------------------------------------

def sft_batches(vocab, n=2, rows=2, length=24):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (rows, length), generator=g)
        labels = ids.clone()
        labels[:, :7] = IGNORE_INDEX  # a prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def sft_loss(batches):
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)  # labelled tokens, all ranks

    def loss_of(model, batch):
        return model(**batch, num_items_in_batch=total).loss
    return loss_of


def load_sft(path, lora=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    use_lean_causal_lm_loss(model)
    if lora:
        torch.manual_seed(0)
        model = add_lora(model, lora_settings(model, NO_DROPOUT, "model"))
        for name, p in model.named_parameters():  # nonzero B, so the adapters change the output from step one
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def check_sft(workdir, models, tokenizer):
    from transformers import AutoModelForCausalLM

    results = {}
    batches = sft_batches(vocab=len(tokenizer))
    for name, path, alone in (("sft", models["untied"], False), ("sft_lm_head_alone", models["untied"], True),
                              ("sft_tied", models["tied"], False)):
        sharded, reference = shard_like_accelerate(load_sft(path), lm_head_alone=alone), load_sft(path)
        results[name] = compare_training(sharded, reference, batches, sft_loss(batches))
        if name == "sft":  # the final save: gathered, written by rank 0, loadable by plain from_pretrained
            out = os.path.join(workdir, "sft-saved")
            save_final_model(trainer_like(tokenizer), sharded, out, torch.float32)
            dist.barrier()
            loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            ids = batches[0]["input_ids"]
            results[name]["saved_logits"] = rel(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
            out16 = os.path.join(workdir, "sft-saved-bf16")
            save_final_model(trainer_like(tokenizer), sharded, out16, torch.bfloat16)
            dist.barrier()
            import safetensors.torch

            saved = safetensors.torch.load_file(os.path.join(out16, "model.safetensors"))
            results[name]["saved_bf16_dtypes"] = sorted({str(t.dtype) for t in saved.values()})
            results[name]["saved_bf16_exact"] = all(
                torch.equal(saved[k], whole(v).detach().to(torch.bfloat16))
                for k, v in sharded.state_dict().items() if k in saved)

    from peft import PeftModel

    sharded, reference = shard_like_accelerate(load_sft(models["untied"], lora=True)), load_sft(models["untied"], True)
    results["sft_lora"] = compare_training(sharded, reference, batches, sft_loss(batches))
    out = os.path.join(workdir, "sft-lora-saved")
    save_final_model(trainer_like(tokenizer), sharded, out, torch.float32, keep=("lora_",))
    dist.barrier()
    base = AutoModelForCausalLM.from_pretrained(models["untied"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out)
    ids = batches[0]["input_ids"]
    results["sft_lora"]["saved_logits"] = rel(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    results["sft_lora"]["saved_files"] = sorted(os.listdir(out))

    # bf16 compute as the scripts set it (no autocast under FSDP2): the lean loss on bf16 hidden states and weight
    model = shard_like_accelerate(load_sft(models["untied"]), fsdp_policy())
    loss = sft_loss(batches)(model, batches[dist.get_rank()])
    loss.backward()
    results["sft_bf16_policy"] = {"loss_finite": bool(torch.isfinite(loss)), "grads_fp32": all(
        p.grad.dtype == torch.float32 for p in model.parameters())}
    return results


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation: the gradient bytes each rank holds between micro-batches, against the memory plan
# ---------------------------------------------------------------------------------------------------------------

MICRO_BATCHES = 3


def live_storages():
    """{storage address: bytes} of every live tensor's storage: the tensors the garbage collector tracks (whatever a
    library keeps in Python objects), the gradient of each leaf among them (autograd keeps it in C++ until asked) and
    a DTensor's local shard (the DTensor itself is a wrapper without storage of its own). Storages shared by views
    count once; freed ones (FSDP2 resizes an unsharded parameter's storage to 0 after use) not at all."""
    gc.collect()
    found = {}

    def add(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        if t.device.type == "cpu" and t.untyped_storage().nbytes():
            found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # not isinstance: that asks deprecated proxies for __class__
            add(obj)
            if obj.is_leaf and obj.grad is not None:
                add(obj.grad)
    return found


def settled_new_bytes(before, pause=0.1, tries=50):
    """Bytes of the storages that appeared since `before`, read until two readings `pause` seconds apart agree. A
    gloo thread drops its reference to a finished collective's buffers a moment after the collective completes: read
    at once, the embedding unit's all-gather output (26,496 bf16 elements, 52,992 bytes) was still counted under load
    (CI, once), though nothing holds it a moment later."""
    last = None
    for _ in range(tries):  # no collective in here: the ranks may read a different number of times
        now = sum(n for ptr, n in live_storages().items() if ptr not in before)
        if now == last:
            return now
        last = now
        time.sleep(pause)
    raise AssertionError(f"the storages held kept changing: last read {last} bytes")


def check_held_gradients(path, vocab):
    """Run micro-batches as the Trainer does (its zero_grad, then a backward per micro-batch, all but the last under
    accelerate's FSDP2 `no_sync`, set_requires_gradient_sync(False), unless sync_each_batch) with the scripts' bf16
    policy, for the recipes' setting (sync_each_batch, set by `reduce_every_micro_batch`) and for sync_each_batch
    false. After each micro-batch: the bytes of the storages that appeared since the zero_grad (the gradients: the
    inputs, weights and the model exist before; activations are freed by each backward); and what the plan counts."""
    results = {}
    batches = sft_batches(vocab, n=MICRO_BATCHES * WORLD)[dist.get_rank()::WORLD]
    for name, kwargs in (("sync_each_batch", None), ("no_sync", {"sync_each_batch": False})):
        args = SimpleNamespace(fsdp=True, world_size=WORLD, gradient_accumulation_steps=MICRO_BATCHES, bf16=True,
                               fp16=False, pure_bf16=False, deepspeed=None,
                               accelerator_config=SimpleNamespace(gradient_accumulation_kwargs=kwargs), fsdp_config={})
        reduce_every_micro_batch(args)
        model = load_sft(path)  # fp32 master weights, as the Trainer shards them
        plan = plan_bytes(model, args, WORLD, sharding(args))
        shard_like_accelerate(model, fsdp_policy())
        sync_each = args.accelerator_config.gradient_accumulation_kwargs["sync_each_batch"]
        model.zero_grad()
        before = live_storages()
        held = []
        for i, batch in enumerate(batches):
            if not (sync_each or i == len(batches) - 1):
                model.set_requires_gradient_sync(False)
            try:
                model(**batch).loss.backward()
            finally:
                model.set_requires_gradient_sync(True)
            held.append(settled_new_bytes(before))
        results[name] = {"held": held, "planned": plan["gradients"] + plan["no_sync_gradients"]}
        del model
    return {"held_gradients": results}


# ---------------------------------------------------------------------------------------------------------------
# Scorer: fp32 heads in their own unit, the vision tower on a text-only rank, LoRA, the by-reference save
# ---------------------------------------------------------------------------------------------------------------

def scorer_batches(processor):
    from PIL import Image

    def sample(i, n_images):
        images = [Image.new("RGB", (32 + 16 * j, 48), (40 * i, 30 * j, 90)) for j in range(n_images)]
        f = encode_vl_example(images, f"sample {i}: rate it", processor, min_pixels=32 * 32, max_pixels=64 * 64)
        return {**f, "score_labels": float(i) / 3, "type_labels": i % 3, "key": f"k{i}"}

    pad = processor.tokenizer.pad_token_id
    # rank 0 sees images, rank 1 a text-only batch: the vision tower runs on one rank only unless the model
    # runs it on a blank image (Qwen3VLScorer.vision_tower_on_nothing)
    return [collate_vl([sample(0, 2), sample(1, 1)], pad), collate_vl([sample(2, 0), sample(3, 0)], pad)]


def scorer_loss(model, batch):
    return model(**{k: v for k, v in batch.items() if k != "keys"}).loss / WORLD  # the mean over both ranks


def load_vl_scorer(path, lora=False):
    from train_scorer import ModelArguments, load_scorer

    torch.manual_seed(0)
    lora_args = NO_DROPOUT if lora else None
    model = load_scorer(ModelArguments(model_name_or_path=path, num_types=3), torch.float32, lora_args)
    if lora:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def shard_scorer(model, mp_policy=None):
    from collate import LABELS

    # what train_scorer.py does before Trainer shards the rest (only under a half-precision --fsdp run)
    run = SimpleNamespace(fsdp=True, bf16=True, fp16=False, device="cpu")  # the TrainingArguments fields it reads
    keep_fp32_under_fsdp([model.head(name) for name in LABELS], run)
    return shard_like_accelerate(model, mp_policy)


def check_scorer(workdir, path, processor):
    from train_scorer import Qwen3VLScorer

    results = {}
    batches = scorer_batches(processor)
    inputs = {k: v for k, v in batches[0].items() if not k.endswith(("_labels", "keys"))}
    for name, lora in (("scorer", False), ("scorer_lora", True)):
        sharded, reference = shard_scorer(load_vl_scorer(path, lora)), load_vl_scorer(path, lora)
        results[name] = compare_training(sharded, reference, batches, scorer_loss)
        out = os.path.join(workdir, f"{name}-saved")
        from train_scorer import SAVED_WITH_BASE

        save_final_model(trainer_like(processor), sharded, out, torch.float32, keep=SAVED_WITH_BASE)
        dist.barrier()
        loaded = Qwen3VLScorer.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            got, want = loaded(**inputs).heads, reference.eval()(**inputs).heads
        results[name]["saved_outputs"] = max(rel(got[k], want[k]) for k in want)

    # bf16 compute with the policy use_fsdp_precision sets on the Trainer's plugin, and no autocast (accelerate
    # adds none under FSDP2): the layers gather in bf16, the heads in fp32, the float labels arrive unrounded
    model = shard_scorer(load_vl_scorer(path), fsdp_policy())
    seen = {}

    def note(name):
        def hook(module, args):
            seen[name] = str(module.weight.dtype)
        return hook
    model.score_head.register_forward_pre_hook(note("head"))
    model.model.language_model.layers[0].self_attn.q_proj.register_forward_pre_hook(note("layer"))

    def note_labels(module, args, kwargs):  # runs after FSDP2's own pre-forward hook, which casts inputs
        seen["labels"] = str(kwargs["score_labels"].dtype)
    model.register_forward_pre_hook(note_labels, with_kwargs=True)
    batch = batches[dist.get_rank()]
    out = model(**{k: v for k, v in batch.items() if k != "keys"})
    out.loss.backward()
    results["scorer_bf16_policy"] = {**seen, "grads_fp32": all(p.grad.dtype == torch.float32
                                                               for p in model.parameters() if p.grad is not None),
                                     "outputs": sorted({str(v.dtype) for v in out.heads.values()})}
    results["scorer_exact_pass_uneven"] = check_exact_pass_uneven(workdir, path, processor)
    return results


def check_exact_pass_uneven(workdir, path, processor):
    """train_scorer.exact_pass on a sharded scorer when the ranks hold different numbers of batches (5 samples of
    one shard, batch 1: rank 0 runs 3, rank 1 runs 2): it ends (the rank that runs out runs one-token stand-ins
    while the other still gathers layers) with every sample's score equal to the unsharded model's."""
    from collate import VLEncoder
    from data import ShardStream
    from train_scorer import exact_pass

    shard = os.path.join(workdir, "uneven.tar")
    if dist.get_rank() == 0:
        demo.write_shard(shard, demo.make_vl_samples(5, seed=3))
    dist.barrier()
    sharded, reference = shard_scorer(load_vl_scorer(path)).eval(), load_vl_scorer(path).eval()
    encoder = VLEncoder(processor, {"type": 3}, True, 32 * 32, 64 * 64, 4096)
    pad = processor.tokenizer.pad_token_id
    stream = ShardStream([shard], encoder, 1, pad, rank=dist.get_rank(), world_size=WORLD)
    run = SimpleNamespace(device="cpu", dataloader_num_workers=0, dataloader_pin_memory=False,
                          dataloader_prefetch_factor=None, dataloader_multiprocessing_context=None,
                          process_index=dist.get_rank(), disable_tqdm=True)
    forwards = []

    def rows_of(batch):
        forwards.append("batch")
        with torch.no_grad():
            heads = sharded(**{k: v for k, v in batch.items() if k in INPUTS}).heads
        return [{"score": heads["score"][0].item()}]

    def one_token():
        forwards.append("stand-in")
        with torch.no_grad():
            sharded(input_ids=torch.tensor([[pad]]), attention_mask=torch.ones(1, 1, dtype=torch.long))

    rows, bad = exact_pass(stream, run, "skip", rows_of, lockstep=one_token)
    expected = []
    for sample in ShardStream([shard], encoder, 1, pad):
        with torch.no_grad():
            expected.append(reference(**{k: v for k, v in sample.items() if k in INPUTS}).heads["score"][0].item())
    every = [None] * WORLD
    dist.all_gather_object(every, forwards)
    return {"rows": len(rows), "bad": len(bad), "forwards": every,
            "scores": rel(torch.tensor([r["score"] for r in rows]), torch.tensor(expected))}


def an_end_token(first, others):
    """A token of `first` (the answer ids of one rank's first generate call) before its last that is in none of
    `others` (the other rank's answers): as an extra eos it ends that call early on one rank only, so the ranks'
    calls end at different passes and only generate(synced_gpus=True) keeps them in step."""
    return next(t for t in first[:-1] if all(t not in answer for answer in others))


def check_generation_lockstep(path, tokenizer):
    """sft_qwen2.py --do_predict on a model sharded as the Trainer leaves it (generation.predict, lockstep): 5
    prompts of different lengths over 2 ranks, batch 1, so rank 0 has 3 generate calls and rank 1 has 2 and one
    stand-in, and rank 0's first call (its longest prompt, 4) ends early (`an_end_token`). Reports each rank's
    forward passes (equal, else the ranks' collectives mismatch), the keys in order, and whether every answer is
    the unsharded model's own answer to that prompt alone."""
    from collate import encode_prompts
    from generation import generate, generation_config, predict

    sharded, reference = shard_like_accelerate(load_sft(path)), load_sft(path).eval()
    rows = [{"key": i, "prompt": [{"role": "user", "content": "Please explain the ocean " * (i + 1)}]}
            for i in range(5)]
    ids = encode_prompts([r["prompt"] for r in rows], tokenizer)
    config = generation_config(tokenizer, max_new_tokens=12)
    alone = [generate(reference, [i], config, 1, "cpu")[0] for i in ids]
    config.eos_token_id = [tokenizer.eos_token_id, an_end_token(alone[4], alone[1::2])]
    forwards = []
    sharded.register_forward_pre_hook(lambda module, args: forwards.append(1))
    run = SimpleNamespace(process_index=dist.get_rank(), world_size=WORLD, per_device_eval_batch_size=1,
                          device="cpu")
    answered = predict(sharded, tokenizer, rows, config, run, lockstep=True)
    expected = [tokenizer.decode(generate(reference, [i], config, 1, "cpu")[0], skip_special_tokens=True)
                for i in ids]
    every = [None] * WORLD
    dist.all_gather_object(every, len(forwards))
    return {"keys": [r["key"] for r in answered], "forwards": every,
            "same": [r["completion"] for r in answered] == expected,
            "first_call_ended_early": len(generate(reference, [ids[4]], config, 1, "cpu")[0]) < 12}


INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


# ---------------------------------------------------------------------------------------------------------------
# Sharded checkpoints: what a Trainer with the recipes' fsdp_config writes at a save on GPUs
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT_STEP = 3


def fsdp_plugin(recipe):
    """accelerate's FSDP plugin as the Trainer makes it from a recipe's fsdp_config, and the AcceleratorState it has
    on GPUs (on a CPU accelerate leaves FSDP off: the run record is written with what a GPU run holds)."""
    import yaml
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    with open(os.path.join(ROOT, "configs", recipe)) as f:
        config = yaml.safe_load(f)["fsdp_config"]
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", fsdp=True, fsdp_config=config)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    return plugin, SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)


def save_sharded_checkpoint(model, out, recipe, accelerator):
    """A checkpoint-N of `model` after one AdamW step, written as Trainer._save_checkpoint writes it under FSDP with
    SHARDED_STATE_DICT (transformers 5.25): save_model writes nothing (it saves FULL_STATE_DICT only); accelerate's
    save_fsdp_model (with the Trainer's adapter_only=True) and save_fsdp_optimizer, called here themselves; then the
    Trainer's own scheduler.pt, rng_state_{rank}.pth and trainer_state.json, and the scripts' MarkComplete part (run
    record, marker). Returns the path and the optimizer."""
    from accelerate.utils import save_fsdp_model, save_fsdp_optimizer
    from transformers import TrainerState, get_scheduler

    from reliability import COMPLETE, run_record, write_run_record

    plugin, state = fsdp_plugin(recipe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.01)
    optimizer.step()
    scheduler.step()
    path = os.path.join(out, f"checkpoint-{CHECKPOINT_STEP}")
    save_fsdp_model(plugin, accelerator, model, path, adapter_only=True)
    save_fsdp_optimizer(plugin, accelerator, optimizer, model, path)
    rank = dist.get_rank()
    if rank == 0:  # the Trainer's should_save process
        torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               os.path.join(path, f"rng_state_{rank}.pth"))
    if rank == 0:
        TrainerState(global_step=CHECKPOINT_STEP, max_steps=10).save_to_json(os.path.join(path, "trainer_state.json"))
    dist.barrier()  # MarkComplete's: every rank's part written
    if rank == 0:
        write_run_record(path, run_record(model, WORLD, state))
        with open(os.path.join(path, COMPLETE), "w") as f:
            f.write(f"step {CHECKPOINT_STEP}\n")
    dist.barrier()
    return path, optimizer


def one_shard_layout(model_of):
    """The model `model_of()` builds, sharded (each decoder layer, then the rest) over this rank alone: the layout a
    one-GPU run holds. Each rank gets a group of its own (every rank creates every group, as torch requires)."""
    from torch.distributed.device_mesh import DeviceMesh

    groups = [dist.new_group([r]) for r in range(WORLD)]
    mesh = DeviceMesh.from_group(groups[dist.get_rank()], "cpu")
    model = model_of()
    kw = {"mesh": mesh}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def check_sharded_checkpoints(workdir, models):
    """FSDP2 checkpoints of the SFT model (full and LoRA) and the scorer, with the recipes' fsdp_config: their file
    lists, whether each loads back into a fresh model of the same layout as Trainer._load_best_model loads the best
    checkpoint at the end of a --load_best_model_at_end run (load_fsdp_model with the Trainer's adapter_only=True; a
    LoRA model's adapters only), and whether the full SFT one loads (accelerate's load_fsdp_model /
    load_fsdp_optimizer) into the layout of another number of processes (one shard instead of two)."""
    from accelerate import Accelerator
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

    accelerator = Accelerator(cpu=True)
    results = {"paths": {}, "files": {}, "best_loaded": {}}
    sft_recipe, scorer_recipe = "sft-qwen2-7b-full-fsdp2-8gpu.yaml", "scorer-qwen3vl-8b-full-fsdp2-8gpu.yaml"
    for name, model_of, recipe in (
            ("sft", lambda: shard_like_accelerate(load_sft(models["untied"])), sft_recipe),
            ("sft_lora", lambda: shard_like_accelerate(load_sft(models["untied"], lora=True)), sft_recipe),
            ("scorer", lambda: shard_scorer(load_vl_scorer(models["vl"])), scorer_recipe)):
        model = model_of()
        path, optimizer = save_sharded_checkpoint(model, os.path.join(workdir, f"fsdp2-{name}"), recipe, accelerator)
        results["paths"][name] = path
        results["files"][name] = sorted(os.path.relpath(os.path.join(d, f), path)
                                        for d, _, files in os.walk(path) for f in files)
        plugin, _ = fsdp_plugin(recipe)
        fresh = model_of()  # as loaded at the start of the run: the saved weights took an AdamW step since
        moved = model_rel(list(zip(fresh.parameters(), [whole(p) for p in model.parameters()])))
        load_fsdp_model(plugin, accelerator, fresh, path, adapter_only=True)
        results["best_loaded"][name] = [moved > 0, model_rel(list(zip(fresh.parameters(),
                                                                      [whole(p) for p in model.parameters()])))]
        if name == "sft":
            other = one_shard_layout(lambda: load_sft(models["untied"]))
            other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
            load_fsdp_model(plugin, accelerator, other, path, adapter_only=True)
            load_fsdp_optimizer(plugin, accelerator, other_optimizer, other, path)
            saved, loaded = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
            results["resharded"] = {
                "local_rows": [model.lm_head.weight.to_local().shape[0], other.lm_head.weight.to_local().shape[0]],
                "weights": model_rel(list(zip(other.parameters(), [whole(p) for p in model.parameters()]))),
                "optimizer": max(rel(loaded[i][k], saved[i][k]) for i in saved for k in ("exp_avg", "exp_avg_sq"))}
    results["agreed"] = check_one_decision(workdir, results["paths"]["sft"])
    return results


def check_one_decision(workdir, checkpoint):
    """reliability's resume decisions when the ranks see different disks (as nodes may): rank 0 sees `checkpoint`
    in its output folder, rank 1 an empty output folder and, at the path it is given, a copy without DCP's index.
    Every rank gets rank 0's choice, and rank 1's problem."""
    import shutil

    from reliability import checkpoint_to_resume, resume_mismatch

    rank = dist.get_rank()
    output_dir, path = os.path.dirname(checkpoint), checkpoint
    if rank == 1:
        output_dir = path = os.path.join(workdir, "rank-1-disk")
        shutil.copytree(checkpoint, path)
        os.remove(os.path.join(path, "pytorch_model_fsdp_0", ".metadata"))
    chosen = checkpoint_to_resume(SimpleNamespace(resume_from_checkpoint=None, output_dir=output_dir))
    with open(os.path.join(checkpoint, "checkpoint-run.json")) as f:
        run = json.load(f)
    every = [None] * WORLD
    dist.all_gather_object(every, {"chosen": chosen, "problem": resume_mismatch(path, run)})
    return every




# ---------------------------------------------------------------------------------------------------------------
# Host memory: rank-0 loading through accelerate's FSDP2 preparation, the streamed final save
# ---------------------------------------------------------------------------------------------------------------

def held_bytes(model):
    """Bytes of this rank's parameters that hold memory (meta tensors hold none; a sharded one, its local shard)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local if t.device.type != "meta")


def check_rank0_loading(path):
    """sft_qwen2.py's loading under --fsdp with cpu_ram_efficient_loading (training_plan.reads_weights), its
    precision policy, then the preparation accelerate runs inside Trainer (`fsdp2_prepare_model`, given what it reads
    of an Accelerator): bytes held by each rank at each stage, the dtypes, and the result against from_pretrained."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from training_plan import build_without_weights, reads_weights, use_precision_policy

    rank = dist.get_rank()
    args = SimpleNamespace(fsdp=True, fsdp_config={"cpu_ram_efficient_loading": True}, dry_run=False,
                           process_index=rank, bf16=True, fp16=False, pure_bf16=False, deepspeed=None)
    if reads_weights(args):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        config = AutoConfig.from_pretrained(path)
        model = build_without_weights(lambda: AutoModelForCausalLM.from_config(config), torch.bfloat16)
    out = {"loaded": held_bytes(model)}
    use_precision_policy(model, args)
    out["policy_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    out["after_policy"] = held_bytes(model)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                            transformer_cls_names_to_wrap=["Qwen2DecoderLayer"],
                                            mixed_precision_policy=fsdp_policy())
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, mixed_precision="bf16", is_main_process=rank == 0,
                                  device=torch.device("cpu"))
    model = fsdp2_prepare_model(accelerator, model)
    out["prepared"] = held_bytes(model)
    out["prepared_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    out["full_fp32"] = sum(p.numel() * 4 for p in reference.parameters())
    ours = model.state_dict()
    out["weights_equal"] = all(torch.equal(whole(ours[k]), v.float()) for k, v in reference.state_dict().items())
    out["buffers_equal"] = all(torch.equal(b, dict(reference.named_buffers())[k]) for k, b in model.named_buffers())
    every = [None] * WORLD
    dist.all_gather_object(every, out)
    return every


def check_streamed_save(workdir, path, tokenizer):
    """The final save of a 28M-parameter fp32 model in bf16 from FSDP2 shards: the growth of rank 0's peak resident
    memory during save_final_model (the kernel's high-water mark, reset first) against one bf16 copy."""
    import safetensors.torch

    model = shard_like_accelerate(load_sft(path))
    sizes = [p.numel() for p in model.parameters()]
    out = os.path.join(workdir, "big-saved")
    if dist.get_rank() == 0:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    before = vm("VmRSS")
    save_final_model(trainer_like(tokenizer), model, out, torch.bfloat16)
    peak = vm("VmHWM") - before
    dist.barrier()
    saved = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    exact = all(torch.equal(saved[k], whole(v).detach().to(torch.bfloat16)) for k, v in model.state_dict().items())
    return {"peak": peak, "bf16": 2 * sum(sizes), "largest_fp32": 4 * max(sizes), "exact": exact}


def vm(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def main(workdir):
    dist.init_process_group("gloo")
    from accelerate import PartialState

    PartialState(cpu=True)  # accelerate's collectives (train_scorer.exact_pass gathers with them) over gloo
    torch.set_num_threads(1)
    models = {"untied": os.path.join(workdir, "qwen2"), "tied": os.path.join(workdir, "qwen2-tied"),
              "vl": os.path.join(workdir, "qwen3-vl"), "bf16": os.path.join(workdir, "qwen2-bf16"),
              "big": os.path.join(workdir, "qwen2-big")}
    if dist.get_rank() == 0:
        demo.build_tiny_qwen2(models["untied"])
        demo.build_tiny_qwen2(models["tied"], tie_word_embeddings=True)
        demo.build_tiny_qwen3_vl(models["vl"])
        demo.build_tiny_qwen2(models["bf16"], dtype="bfloat16")  # as real Qwen checkpoints are stored
        demo.build_tiny_qwen2(models["big"], hidden_size=512, num_layers=4, intermediate_size=4096)
    dist.barrier()
    from transformers import AutoProcessor, AutoTokenizer

    results = check_sft(workdir, models, AutoTokenizer.from_pretrained(models["untied"]))
    results.update(check_held_gradients(models["untied"], len(AutoTokenizer.from_pretrained(models["untied"]))))
    results.update(check_scorer(workdir, models["vl"], AutoProcessor.from_pretrained(models["vl"])))
    results["sharded_checkpoints"] = check_sharded_checkpoints(workdir, models)
    results["streamed_save"] = check_streamed_save(workdir, models["big"], AutoTokenizer.from_pretrained(models["big"]))
    results["rank0_loading"] = check_rank0_loading(models["bf16"])
    results["generation_lockstep"] = check_generation_lockstep(models["untied"],
                                                                AutoTokenizer.from_pretrained(models["untied"]))
    if dist.get_rank() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    leave_process_group()  # the project's own exit: no gloo thread can abort this process at interpreter exit


if __name__ == "__main__":
    main(sys.argv[1])
