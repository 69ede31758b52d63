"""training_plan.py: bf16 runs keep the fp32 run's updates (and plain bf16 AdamW does not), the precision line, the
per-GPU memory plan of the real Qwen2-7B and Qwen3-VL-8B (built on the meta device from their config values)."""

import json
import os
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3VLConfig

from conftest import ROOT
import demo
import sft_qwen2
from training_plan import (LoraArguments, add_lora, lean_loss_bytes, lora_parameter_count, lora_settings, memory_plan,
                           plan_bytes, reduce_every_micro_batch, use_precision_policy)

# ---------------------------------------------------------------------------------------------------------------
# Precision: a tiny Qwen2 stored in bf16, lr 1e-5, 60 steps, constant schedule; the weight update (checkpoint minus
# start) of each run against the fp32 run's.
# ---------------------------------------------------------------------------------------------------------------

STEPS = 60


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    model = demo.build_tiny_qwen2(root / "model", dtype="bfloat16")
    train = demo.write_jsonl(root / "train.jsonl", demo.make_sft_records(32, seed=3))
    start = safetensors.torch.load_file(os.path.join(model, "model.safetensors"))
    assert {t.dtype for t in start.values()} == {torch.bfloat16}
    return model, train, start


def update(bf16_checkpoint, out, *flags):
    """The weight update of a 60-step run, flattened (fp64), and the checkpoint's tensors."""
    model, train, start = bf16_checkpoint
    sft_qwen2.main(["--model_name_or_path", model, "--train_file", train, "--output_dir", str(out), "--use_cpu",
                    "--max_steps", str(STEPS), "--learning_rate", "1e-5", "--lr_scheduler_type", "constant",
                    "--warmup_steps", "0", "--weight_decay", "0", "--per_device_train_batch_size", "2",
                    "--max_len", "64", "--save_steps", str(STEPS), "--logging_steps", str(STEPS),
                    "--disable_tqdm", "true", "--seed", "0", *flags])
    saved = safetensors.torch.load_file(os.path.join(out, f"checkpoint-{STEPS}", "model.safetensors"))
    return torch.cat([(saved[k].double() - start[k].double()).flatten() for k in sorted(start)]), saved


@pytest.fixture(scope="module")
def fp32_update(bf16_checkpoint, tmp_path_factory):
    return update(bf16_checkpoint, tmp_path_factory.mktemp("fp32") / "out", "--bf16", "false")[0]


def like_fp32(u, ref):
    """(norm ratio, cosine) of update `u` against the fp32 run's; 'keeps the updates' = 0.8-1.25 and >= 0.9."""
    return (u.norm() / ref.norm()).item(), torch.nn.functional.cosine_similarity(u, ref, dim=0).item()


class TestPrecisionPolicy:
    def test_default_bf16_trains_fp32_masters_and_saves_bf16(self, bf16_checkpoint, fp32_update, tmp_path, capsys):
        u, checkpoint = update(bf16_checkpoint, tmp_path / "out", "--bf16", "true")
        ratio, cosine = like_fp32(u, fp32_update)
        assert 0.8 <= ratio <= 1.25 and cosine >= 0.9, (ratio, cosine)
        out = capsys.readouterr().out
        assert "precision: bf16 autocast, fp32 master weights for 127,296 trainable parameters; frozen: none" in out
        assert {t.dtype for t in checkpoint.values()} == {torch.float32}  # a resume rounds nothing
        final = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
        assert {t.dtype for t in final.values()} == {torch.bfloat16}  # the checkpoint's own dtype, not twice its size

    def test_pure_bf16_with_kahan_keeps_the_updates(self, bf16_checkpoint, fp32_update, tmp_path, capsys):
        u, checkpoint = update(bf16_checkpoint, tmp_path / "out", "--bf16", "true", "--pure_bf16")
        ratio, cosine = like_fp32(u, fp32_update)
        assert 0.8 <= ratio <= 1.25 and cosine >= 0.9, (ratio, cosine)
        assert {t.dtype for t in checkpoint.values()} == {torch.bfloat16}
        assert "precision: pure bf16, bf16 weights and AdamW states for 127,296" in capsys.readouterr().out
        state = torch.load(tmp_path / "out" / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)["state"]
        assert all(s["kahan_comp"].dtype == torch.bfloat16 for s in state.values())  # resumes with its compensation

    def test_plain_bf16_adamw_fails_the_same_measure(self, bf16_checkpoint, fp32_update, tmp_path, monkeypatch):
        """The same --pure_bf16 run with the compensation taken out: most updates round away."""
        def plain_adamw(model, args):
            _, kwargs = use_precision_policy(model, args)
            kwargs.pop("kahan_sum")
            return torch.optim.AdamW, kwargs

        monkeypatch.setattr(sft_qwen2, "use_precision_policy", plain_adamw)
        u, _ = update(bf16_checkpoint, tmp_path / "out", "--bf16", "true", "--pure_bf16")
        ratio, cosine = like_fp32(u, fp32_update)
        assert ratio < 0.8 and cosine < 0.9, (ratio, cosine)


# ---------------------------------------------------------------------------------------------------------------
# Memory plan at real size: parameters on the meta device (no memory, no weights), bytes from their dtypes
# ---------------------------------------------------------------------------------------------------------------

QWEN2_7B = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152_064, tie_word_embeddings=False)
QWEN3_VL_8B = dict(  # Qwen/Qwen3-VL-8B-Instruct's config.json
    text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151_936,
                     rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False)
GPU_80GB = 80e9


def bf16_args(world_size=1, pure_bf16=False, fsdp=False, deepspeed=None, accumulation=1, accumulation_kwargs=None,
              fsdp_config=None):
    return SimpleNamespace(bf16=True, fp16=False, pure_bf16=pure_bf16, use_cpu=False, world_size=world_size,
                           learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                           fsdp=fsdp, deepspeed=deepspeed, gradient_accumulation_steps=accumulation,
                           accelerator_config=SimpleNamespace(gradient_accumulation_kwargs=accumulation_kwargs),
                           fsdp_config=fsdp_config or {})


@pytest.fixture
def qwen2_7b():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(QWEN2_7B, dtype=torch.bfloat16)


class TestMemoryPlan:
    def test_qwen2_7b_full_fine_tune_needs_122_gb_and_says_what_fits(self, qwen2_7b, capsys):
        assert sum(p.numel() for p in qwen2_7b.parameters()) == 7_615_616_512
        args = bf16_args()
        use_precision_policy(qwen2_7b, args)  # every parameter trains: all become fp32 masters
        adapters = lora_parameter_count(qwen2_7b, lora_settings(qwen2_7b, LoraArguments(), "model"))  # r=16
        assert adapters == 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))  # 40,370,176
        plan = memory_plan(qwen2_7b, args, adapters, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        n = 7_615_616_512
        assert (plan["weights"], plan["gradients"], plan["optimizer"]) == (4 * n, 4 * n, 8 * n)
        assert plan["total"] == 16 * n and plan["autocast_copies"] == 2 * n and plan["ddp_buckets"] == 0
        first, warning = plan["lines"]
        assert "weights 30.5 GB + gradients 30.5 GB + AdamW states 60.9 GB = 121.8 GB" in first
        assert warning.startswith("WARNING: weights, gradients and optimizer states alone need 121.8 GB per GPU, "
                                  "more than this GPU's 80.0 GB")
        # LoRA: bf16 base 15.2 GB + 16 bytes per adapter parameter; pure bf16: 10 bytes per parameter; FSDP / 2
        assert "--use_peft (LoRA) 15.9 GB; --pure_bf16 76.2 GB; full fine-tuning sharded over 2 GPUs" in warning
        assert capsys.readouterr().out.count("WARNING") == 1

    def test_qwen2_7b_lora_fits_one_gpu(self, qwen2_7b):
        model = add_lora(qwen2_7b, lora_settings(qwen2_7b, LoraArguments(), "model"))  # the defaults: r=16
        use_precision_policy(model, bf16_args())
        plan = memory_plan(model, bf16_args(), 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        adapters = 40_370_176
        assert plan["weights"] == 2 * 7_615_616_512 + 4 * adapters  # frozen bf16 base + fp32 adapters
        assert (plan["gradients"], plan["optimizer"]) == (4 * adapters, 8 * adapters)
        assert len(plan["lines"]) == 1 and "= 15.9 GB" in plan["lines"][0]

    def test_pure_bf16_and_ddp(self, qwen2_7b):
        model = qwen2_7b.to(torch.bfloat16).requires_grad_(True)
        args = bf16_args(world_size=8, pure_bf16=True)
        use_precision_policy(model, args)
        plan = plan_bytes(model, args, world_size=8)
        n = 7_615_616_512
        # bf16 weight + bf16 gradient + two bf16 moments + the bf16 Kahan buffer; DDP keeps a gradient bucket copy
        assert (plan["weights"], plan["gradients"], plan["optimizer"]) == (2 * n, 2 * n, 6 * n)
        assert plan["ddp_buckets"] == 2 * n and plan["autocast_copies"] == 0

    def test_qwen2_7b_sharded_over_8_gpus_fsdp2_and_zero3(self, qwen2_7b, tmp_path):
        n, embedding = 7_615_616_512, 152_064 * 3584  # the largest unit gathered whole: the embedding (or lm_head)
        args = bf16_args(world_size=8, fsdp=True)
        use_precision_policy(qwen2_7b, args)  # FSDP2: fp32 masters, sharded
        plan = memory_plan(qwen2_7b, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        assert (plan["weights"], plan["gradients"], plan["optimizer"]) == (4 * n / 8, 4 * n / 8, 8 * n / 8)
        assert plan["gathered"] == 2 * 2 * embedding and plan["autocast_copies"] == plan["ddp_buckets"] == 0
        assert plan["reduce_buffers"] == (2 + 4) * embedding  # its bf16 gradient, then the fp32 one reduce-scattered
        assert len(plan["lines"]) == 1 and plan["lines"][0].startswith(
            "memory plan per GPU (FSDP2, sharded over 8 ranks; an 80 GB GPU, 80.0 GB): weights 3.8 GB + gradients "
            "3.8 GB + AdamW states 7.6 GB = 15.2 GB; on top: the layers gathered whole at a time (bf16) 2.2 GB")

        zero3 = tmp_path / "zero3.json"
        zero3.write_text('{"zero_optimization": {"stage": 3}}')
        model = qwen2_7b.to(torch.bfloat16)
        args = bf16_args(world_size=8, deepspeed=str(zero3))
        use_precision_policy(model, args)  # DeepSpeed keeps bf16 weights; its optimizer holds the fp32 masters
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        plan = memory_plan(model, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        assert (plan["weights"], plan["gradients"], plan["optimizer"]) == (2 * n / 8, 2 * n / 8, 12 * n / 8)
        assert "(DeepSpeed ZeRO-3, sharded over 8 ranks; " in plan["lines"][0] and "= 15.2 GB" in plan["lines"][0]
        zero3.write_text('{"zero_optimization": {"stage": 2}}')  # ZeRO-2: weights whole on every GPU
        plan = memory_plan(model, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        assert (plan["weights"], plan["gradients"], plan["optimizer"]) == (2 * n, 2 * n / 8, 12 * n / 8)
        assert plan["gathered"] == 0

    def test_sharded_gradients_counted_as_held(self, qwen2_7b, capsys):
        """FSDP2 with gradient accumulation: reducing every micro-batch is the scripts' default, and a run that turns
        it off holds every unsharded fp32 gradient in place of its shard between micro-batches (tests/test_sharding.py
        measures both under fully_shard). ZeRO-3 with the shipped JSON keeps fp32 gradient partitions."""
        n = 7_615_616_512
        use_precision_policy(qwen2_7b, bf16_args(world_size=8, fsdp=True))
        unsharded = 4 * n - 4 * n / 8  # the whole fp32 gradient in place of the shard the plan counts already
        for kwargs, held in ((None, 0), ({"sync_each_batch": True}, 0), ({"sync_each_batch": False}, unsharded)):
            args = bf16_args(world_size=8, fsdp=True, accumulation=4, accumulation_kwargs=kwargs)
            reduce_every_micro_batch(args)
            plan = memory_plan(qwen2_7b, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
            assert plan["no_sync_gradients"] == held and plan["gradients"] == 4 * n / 8
            assert "= 15.2 GB" in plan["lines"][0]
        assert ("the unsharded fp32 gradients FSDP2 holds between micro-batches (accelerator_config "
                "gradient_accumulation_kwargs sync_each_batch is false) 26.7 GB") in plan["lines"][0]
        args = bf16_args(world_size=8, fsdp=True, accumulation_kwargs={"sync_each_batch": False})  # no accumulation
        assert memory_plan(qwen2_7b, args, 0)["no_sync_gradients"] == 0

        model = qwen2_7b.to(torch.bfloat16)
        args = bf16_args(world_size=8, deepspeed=os.path.join(ROOT, "configs", "deepspeed", "zero3.json"))
        capsys.readouterr()
        use_precision_policy(model, args)
        assert capsys.readouterr().out.startswith("precision: DeepSpeed, bf16 weights, gradients reduced in fp32 and "
                                                  "accumulated in fp32, fp32 master weights and AdamW states")
        plan = memory_plan(model, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        assert (plan["weights"], plan["gradients"], plan["optimizer"]) == (2 * n / 8, 4 * n / 8, 12 * n / 8)
        assert "= 17.1 GB" in plan["lines"][0] and plan["no_sync_gradients"] == 0
        # at the optimizer step ZeRO-3 flattens the gradient partition (under sub_group_size) into a new fp32 tensor
        assert plan["zero3_step_gradients"] == 4 * n / 8
        assert "ZeRO-3's fp32 copy of a gradient partition at the optimizer step 3.8 GB" in plan["lines"][0]

    def test_host_memory_per_node_at_load_in_training_and_at_the_final_save(self, qwen2_7b, tmp_path, monkeypatch,
                                                                              capsys):
        """Qwen2-7B on 8 GPUs per node: each process loads straight onto its GPU, so a node holds the checkpoint's
        pages once (15.2 GB, shared) and each GPU the whole model, upcast by accelerate, until FSDP2 shards it; with
        rank-0 loading (cpu_ram_efficient_loading) rank 0's copy, upcast on the CPU, and no GPU holds the whole model;
        ZeRO-3 reads the bf16 state dict on rank 0 alone; on CPUs each process holds its own copy, upcast. The final
        save holds one bf16 copy on rank 0; LOCAL_WORLD_SIZE says how many processes share a node."""
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        n = 7_615_616_512
        # at setup: the whole fp32 model, plus the shards made while accelerate still holds it
        for fsdp_config, load, setup in (({}, 2 * n, 4 * n * 9 / 8), ({"cpu_ram_efficient_loading": True}, 4 * n, 0)):
            args = bf16_args(world_size=8, fsdp=True, fsdp_config=fsdp_config)
            use_precision_policy(qwen2_7b, args)
            assert {p.dtype for p in qwen2_7b.parameters()} == {torch.bfloat16}  # accelerate upcasts as it shards
            assert ("precision: bf16 autocast, fp32 master weights for 7,615,616,512 trainable parameters (upcast by "
                    "accelerate as FSDP2 shards the model); frozen: none") in capsys.readouterr().out
            plan = memory_plan(qwen2_7b, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
            assert plan["host"] == {"load": load, "training": 0, "save": 2 * n}
            assert plan["unsharded_at_setup"] == setup
        assert plan["host_line"] == ("host memory per node (8 processes): at load 30.5 GB, in training little "
                                     "(weights on the GPUs), at the final save 15.2 GB (rank 0's)")
        zero3 = tmp_path / "zero3.json"
        zero3.write_text('{"zero_optimization": {"stage": 3}}')
        plan = memory_plan(qwen2_7b, bf16_args(world_size=16, deepspeed=str(zero3)), 0, gpu_bytes=GPU_80GB)
        assert plan["host"] == {"load": 2 * n, "training": 0, "save": 2 * n}
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 16 processes on 4 nodes, unsharded (DDP)
        args = bf16_args(world_size=16)
        assert memory_plan(qwen2_7b, args, 0, gpu_bytes=GPU_80GB)["host"]["load"] == 2 * n  # onto the GPUs
        args.use_cpu = True  # each process holds and upcasts its own copy
        use_precision_policy(qwen2_7b, args)
        assert memory_plan(qwen2_7b, args, 0)["host"]["load"] == 4 * 4 * n

    def test_qwen3_vl_8b_scorer(self):
        from train_scorer import Qwen3VLScorer

        config = Qwen3VLConfig(**QWEN3_VL_8B)
        config.num_types = 5
        with torch.device("meta"):
            scorer = Qwen3VLScorer(config).to(torch.bfloat16)
        heads = 4096 + 1 + 4096 * 5 + 5
        backbone = sum(p.numel() for p in scorer.model.parameters())
        assert backbone == 8_144_793_840  # Qwen3-VL-8B's 8,767,123,696 less its 151,936 x 4096 output layer
        scorer.set_trainable(freeze_backbone=True, freeze_vision=False, base_record="Qwen/Qwen3-VL-8B-Instruct")
        args = bf16_args()
        use_precision_policy(scorer, args)
        plan = memory_plan(scorer, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        assert plan["weights"] == 2 * backbone + 4 * heads and plan["optimizer"] == 8 * heads
        assert "= 16.3 GB" in plan["lines"][0] and len(plan["lines"]) == 1

        scorer.set_trainable(freeze_backbone=False, freeze_vision=True, base_record=None)
        use_precision_policy(scorer, args)
        vision = sum(p.numel() for p in scorer.model.visual.parameters())
        plan = memory_plan(scorer, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU")
        trained = backbone - vision + heads
        assert plan["total"] == 2 * vision + 16 * trained and plan["lines"][1].startswith("WARNING")


class TestLeanLossBuffers:
    """The loss's own buffers at Qwen2-7B (152,064 x 3,584 output layer, chunks of 441 rows): 536 MB of fp32 chunk
    logits and log-softmax, plus the weight's fp32 gradient and its cast back to the dtype the loss was handed."""
    LOGITS, LAYER = 8 * 441 * 152_064, 152_064 * 3584

    def test_fsdp2_full_fine_tune(self, qwen2_7b):
        args = bf16_args(world_size=8, fsdp=True)
        use_precision_policy(qwen2_7b, args)
        plan = memory_plan(qwen2_7b, args, 0, gpu_bytes=GPU_80GB, gpu_name="an 80 GB GPU",
                           lean_loss=qwen2_7b.lm_head)
        assert plan["lean_loss"] == self.LOGITS + (4 + 2) * self.LAYER  # gathered in bf16: fp32 + bf16 gradient
        assert ("the loss's buffers (fp32 logits of a chunk, the output layer's fp32 gradient) 3.8 GB"
                in plan["lines"][0])

    def test_unsharded_fp32_masters_and_lora(self, qwen2_7b):
        args = bf16_args()
        use_precision_policy(qwen2_7b, args)  # fp32 master: a bf16 copy to compute with, an fp32 gradient
        assert lean_loss_bytes(qwen2_7b.lm_head, args) == self.LOGITS + (2 + 4) * self.LAYER
        qwen2_7b.lm_head.requires_grad_(False).to(torch.bfloat16)  # LoRA: a frozen bf16 output layer
        assert lean_loss_bytes(qwen2_7b.lm_head, args) == self.LOGITS


class TestLoadDevice:
    """Where each process loads the checkpoint: straight onto its own GPU (no host copy per process), except where the
    library wants it on the CPU (rank-0 loading, DeepSpeed) and on CPU runs."""

    @pytest.mark.parametrize("changes, expected", [
        ({}, "cuda:3"),
        ({"fsdp": True}, "cuda:3"),  # FSDP2: accelerate upcasts on the GPU, then shards
        ({"fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": True}}, None),  # rank 0's CPU copy is broadcast
        ({"deepspeed": "zero3.json"}, None),  # zero.Init places the partitions itself
        ({"use_cpu": True}, None)])
    def test_each_process_loads_onto_its_own_gpu(self, monkeypatch, changes, expected):
        from training_plan import load_device

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        args = SimpleNamespace(**{**vars(bf16_args(world_size=8)), "device": torch.device("cuda", 3), **changes})
        assert load_device(args) == (torch.device(expected) if expected else None)


def test_the_final_save_says_the_dtype_of_its_weights(tmp_path):
    """save_pretrained writes the model's own dtype into config.json, the fp32 of its master weights; the final save
    holds bf16 weights and must say so, or from_pretrained loads them in fp32 (twice the memory)."""
    from transformers import AutoTokenizer

    from training_plan import save_final_model

    path = demo.build_tiny_qwen2(tmp_path / "model", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(path)
    for p in model.parameters():
        p.data = p.data.float()  # fp32 masters, as training holds them
    trainer = SimpleNamespace(is_deepspeed_enabled=False, args=SimpleNamespace(should_save=True),
                              processing_class=AutoTokenizer.from_pretrained(path))
    save_final_model(trainer, model, tmp_path / "out", torch.bfloat16)
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# /dev/shm for DataLoader workers: the estimate, and the check both scripts make at start
# ---------------------------------------------------------------------------------------------------------------

QWEN3_VL_PATCHES = SimpleNamespace(patch_size=16, merge_size=2, temporal_patch_size=2)  # Qwen3-VL's image processor


class TestLoaderShm:
    def test_estimate(self, monkeypatch):
        """4 images of 1024 visual tokens (the default max_pixels): 4096 tokens x 4 patches x 1536 fp32 values =
        100.7 MB of pixel values a sample, plus three int64 values per token of max_len; capped at max_len visual
        tokens (a longer sample is refused), which is also the bound when the images were not counted."""
        from training_plan import loader_sample_bytes, loader_shm_bytes

        tokens = 3 * 8 * 8192
        assert loader_sample_bytes(8192, QWEN3_VL_PATCHES, 4, 1024 * 32 * 32) == 100_663_296 + tokens
        assert loader_sample_bytes(8192, QWEN3_VL_PATCHES, 10, 1024 * 32 * 32) == 201_326_592 + tokens
        assert loader_sample_bytes(8192, QWEN3_VL_PATCHES, None, 1024 * 32 * 32) == 201_326_592 + tokens
        assert loader_sample_bytes(2048) == 49_152  # SFT: tokens only
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        args = SimpleNamespace(world_size=16, dataloader_num_workers=4, dataloader_prefetch_factor=None)
        batch = 4 * loader_sample_bytes(8192, QWEN3_VL_PATCHES, 4, 1024 * 32 * 32)  # 403.4 MB
        assert loader_shm_bytes(args, batch) == 8 * 4 * 2 * 403_439_616  # 3.2 GB a process, 25.8 GB a node
        args.dataloader_num_workers = 0
        assert loader_shm_bytes(args, batch) == 0

    def test_scorer_warns_when_shm_is_too_small_and_not_without_workers(self, scorer_demo, tmp_path, monkeypatch,
                                                                        capsys):
        import socket

        import train_scorer
        import training_plan
        from conftest import scorer_args

        monkeypatch.setattr(training_plan, "shm_free", lambda: 1_000_000)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        # the demo's train shards: at most 3 images a sample, 4 visual tokens each at max_pixels 4096
        trainer = train_scorer.main(scorer_args(scorer_demo, tmp_path / "o", "--max_steps", "1", "--warmup_steps",
                                                "0", "--dataloader_num_workers", "2"))
        need = 1 * 2 * 2 * 4 * (3 * 8 * 8192 + 4 * 3 * 4 * 4 * 1536)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: /dev/shm")]
        assert warnings == [
            f"warning: /dev/shm on {socket.gethostname()} has 1.0 MB free; 2 DataLoader workers x 2 prefetched batches "
            f"x 1 process may need up to {need / 1e6:.1f} MB (a bus error when it runs out): start the container "
            f"with --shm-size=1g (or give the node a larger /dev/shm), or lower --dataloader_num_workers (0 loads in "
            f"the training process) or the batch size"]
        assert trainer.state.global_step == 1  # a warning: the run goes on
        # an evaluation's workers fill /dev/shm while the training loader's hold theirs: both batches count
        train_scorer.main(scorer_args(scorer_demo, tmp_path / "o1", "--max_steps", "1", "--warmup_steps", "0",
                                      "--dataloader_num_workers", "2", "--eval_shards", scorer_demo[2],
                                      "--per_device_eval_batch_size", "3"))
        need += 1 * 2 * 2 * 3 * (3 * 8 * 8192 + 4 * 3 * 4 * 4 * 1536)  # the demo's eval shards: 3 images too
        assert f"may need up to {need / 1e6:.1f} MB" in capsys.readouterr().err
        trainer = train_scorer.main(scorer_args(scorer_demo, tmp_path / "o2", "--max_steps", "1", "--warmup_steps",
                                                "0"))  # scorer_args: --dataloader_num_workers 0
        assert trainer.state.global_step == 1 and "warning: /dev/shm" not in capsys.readouterr().err

    def test_sft_warns_when_shm_is_too_small(self, sft_demo, tmp_path, monkeypatch, capsys):
        import training_plan

        monkeypatch.setattr(training_plan, "shm_free", lambda: 1_000)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        sft_qwen2.main([
            "--model_name_or_path", sft_demo[0], "--train_file", sft_demo[1], "--output_dir", str(tmp_path / "o"),
            "--use_cpu", "--max_len", "256", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "3",
            "--max_steps", "1", "--warmup_steps", "0", "--save_strategy", "no"])
        err = capsys.readouterr().err
        assert (f"has 0.0 MB free; 3 DataLoader workers x 2 prefetched batches x 1 process may need up to "
                f"{3 * 2 * 2 * 24 * 256 / 1e6:.1f} MB") in err, err
