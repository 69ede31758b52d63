"""The model-level pieces of FSDP2 training, run by tests/test_sharding.py under torchrun with 2 CPU processes (gloo).

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py WORKDIR     # rank 0 writes WORKDIR/results.json

Trainer shards only on GPUs (accelerate ignores --fsdp on a CPU), but torch's own `fully_shard` runs here. Each
check shards a tiny model in the units accelerate 1.15 makes for `Trainer(--fsdp)` (`shard_like_accelerate`), runs
the same batches as an unsharded copy of it (each rank its half), and reports the largest relative differences of
losses, gradients and weights after AdamW steps, then saves with the scripts' `save_final_model` and reloads.
Host memory: sft_qwen2.py's rank-0 loading through accelerate's own `fsdp2_prepare_model` (bytes each rank holds
at each stage), and rank 0's peak resident memory while the final save gathers a larger model.
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402
from collate import IGNORE_INDEX, collate_vl, encode_vl_example  # noqa: E402
from lean_loss import use_lean_causal_lm_loss  # noqa: E402
from training_plan import (LoraArguments, add_lora, keep_fp32_under_fsdp, lora_settings,  # noqa: E402
                           save_final_model, use_fsdp_precision)

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
                          dataloader_prefetch_factor=None, dataloader_multiprocessing_context=None)
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


INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


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
    results.update(check_scorer(workdir, models["vl"], AutoProcessor.from_pretrained(models["vl"])))
    results["streamed_save"] = check_streamed_save(workdir, models["big"], AutoTokenizer.from_pretrained(models["big"]))
    results["rank0_loading"] = check_rank0_loading(models["bf16"])
    if dist.get_rank() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
