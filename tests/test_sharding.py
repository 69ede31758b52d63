"""Sharded training: FSDP2's model-level pieces under 2 gloo processes (tests/fsdp2_worker.py), the recipes in
configs/, and what the scripts do with --fsdp / --deepspeed on a machine without GPUs."""

import json
import os
import re
import sys

import pytest

from conftest import ROOT, run_cli

REL = 1e-5


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    """The worker's results: every check ran on two ranks, each with its half of the batches."""
    work = tmp_path_factory.mktemp("fsdp2")
    # A fixed mmap threshold makes glibc hand every large freed block back at once, so the peak resident size the
    # streamed-save check reads follows the bytes of live tensors (its dynamic threshold would keep freed blocks).
    res = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "tests/fsdp2_worker.py", str(work)], env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(work / "results.json") as f:
        return json.load(f)


class TestFSDP2:
    @pytest.mark.parametrize("check", ["sft", "sft_lm_head_alone", "sft_tied", "sft_lora", "scorer", "scorer_lora"])
    def test_sharded_training_matches_unsharded(self, fsdp2, check):
        """Loss, gradients and the weights after two AdamW steps equal an unsharded copy trained on both halves:
        the lean loss (whose output layer is gathered by the norm's group, or by hand when alone, or is the tied
        embedding), LoRA adapters, the scorer's fp32 heads in their own unit, and its vision tower on the rank
        whose batch is text-only (it runs on a blank image, so both ranks run the same collectives)."""
        r = fsdp2[check]
        assert r["loss"] <= REL and r["gradients"] <= REL and r["weights"] <= REL, r
        assert r["trained"] > 0

    def test_exact_evaluation_with_uneven_shares_runs_in_lockstep(self, fsdp2):
        """Exact evaluation deals samples unevenly (5 over 2 ranks: 3 and 2 batches); under FSDP2 each forward
        gathers layers from every rank, so the rank that runs out runs one-token stand-ins until all are done
        (without them it would wait forever): every sample once, scores as the unsharded model's."""
        r = fsdp2["scorer_exact_pass_uneven"]
        assert r["rows"] == 5 and r["bad"] == 0 and r["scores"] <= REL, r
        assert r["forwards"] == [["batch"] * 3, ["batch"] * 2 + ["stand-in"]], r

    def test_final_save_is_gathered_into_a_loadable_folder(self, fsdp2):
        assert fsdp2["sft"]["saved_logits"] <= REL  # plain AutoModelForCausalLM.from_pretrained
        assert fsdp2["sft"]["saved_bf16_dtypes"] == ["torch.bfloat16"] and fsdp2["sft"]["saved_bf16_exact"]
        assert fsdp2["sft_lora"]["saved_logits"] <= REL  # PeftModel.from_pretrained(base, folder)
        assert "adapter_model.safetensors" in fsdp2["sft_lora"]["saved_files"]
        assert fsdp2["scorer"]["saved_outputs"] <= REL and fsdp2["scorer_lora"]["saved_outputs"] <= REL

    def test_heads_compute_in_fp32_while_layers_gather_in_bf16(self, fsdp2):
        """The scripts' FSDP2 policy: layers in bf16, the heads' own unit in fp32, fp32 gradients, and neither the
        float score labels nor the predictions rounded to bf16 on the way in or out."""
        assert fsdp2["scorer_bf16_policy"] == {"layer": "torch.bfloat16", "head": "torch.float32",
                                               "labels": "torch.float32", "grads_fp32": True,
                                               "outputs": ["torch.float32"]}
        assert fsdp2["sft_bf16_policy"] == {"loss_finite": True, "grads_fp32": True}

    def test_only_rank_0_loads_and_accelerate_upcasts_after_sharding(self, fsdp2):
        """--fsdp with cpu_ram_efficient_loading, as sft_qwen2.py loads and accelerate's fsdp2_prepare_model then
        shards: rank 1 holds no weight bytes until it receives its shards, the precision policy leaves the bf16
        checkpoint as it is (no fp32 copy before sharding), and after preparation each rank holds half of the fp32
        masters, equal to the checkpoint, with rank 0's rotary tables."""
        rank0, rank1 = fsdp2["rank0_loading"]
        full = rank0["full_fp32"]
        assert full == 509_184
        assert (rank0["loaded"], rank0["after_policy"], rank0["prepared"]) == (full // 2, full // 2, full // 2)
        assert (rank1["loaded"], rank1["after_policy"], rank1["prepared"]) == (0, 0, full // 2)
        for r in (rank0, rank1):
            assert r["policy_dtypes"] == ["torch.bfloat16"] and r["prepared_dtypes"] == ["torch.float32"]
            assert r["weights_equal"] and r["buffers_equal"]

    def test_final_save_streams_one_tensor_at_a_time(self, fsdp2):
        """Saving a 28M-parameter fp32 model in bf16 from FSDP2 shards: rank 0's peak resident memory grows by one
        bf16 copy plus gathered tensors of the largest size (gathering everything in fp32 first, then casting, grew it
        by 175 MB here), and the file holds exactly the bf16 weights."""
        r = fsdp2["streamed_save"]
        assert (r["bf16"], r["largest_fp32"]) == (57_488_384, 8_388_608)
        assert r["peak"] <= r["bf16"] + 2 * r["largest_fp32"], r
        assert r["exact"]



@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """The reference (1 process, no DeepSpeed), then ZeRO-3 over 2 processes with the shipped JSON: same batches."""
    work = tmp_path_factory.mktemp("zero3")
    env = {"OMP_NUM_THREADS": "1"}
    plain = run_cli([sys.executable, "tests/zero3_worker.py", str(work), "plain"], env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    # the first DeepSpeed run on a machine compiles its CPU communication op (about 2.5 minutes on 2 cores)
    res = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "tests/zero3_worker.py", str(work), "zero3"], env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return work


class TestZero3:
    def test_zero3_trains_like_one_process_with_the_lean_loss(self, zero3):
        """The weights were loaded partitioned (lm_head an empty placeholder on each rank), yet the lean loss,
        which reads lm_head.weight outside lm_head's forward, gives the reference's loss at every step: ZeRO-3
        gathers a parameter read inside its model's forward."""
        with open(zero3 / "plain" / "losses.json") as f:
            plain = json.load(f)
        with open(zero3 / "zero3" / "losses.json") as f:
            sharded = json.load(f)
        assert sharded["partitioned"] and not plain["partitioned"]
        assert len(sharded["losses"]) == len(plain["losses"]) == 4
        assert sharded["losses"] == pytest.approx(plain["losses"], rel=REL)

    def test_zero3_final_save_is_one_loadable_folder(self, zero3):
        import torch
        from transformers import AutoModelForCausalLM

        got = AutoModelForCausalLM.from_pretrained(zero3 / "zero3" / "final", dtype=torch.float32)
        want = AutoModelForCausalLM.from_pretrained(zero3 / "plain" / "final", dtype=torch.float32)
        pairs = list(zip(got.state_dict().values(), want.state_dict().values()))
        assert all(a.shape == b.shape for a, b in pairs)  # gathered whole, not one rank's partition
        diff = max((a - b).abs().max() for a, b in pairs) / max(b.abs().max() for _, b in pairs)
        assert diff <= REL, diff
        ids = torch.arange(5, 29)[None]
        torch.testing.assert_close(got(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    def test_the_shipped_config_gathers_the_save_and_leaves_optimizer_and_schedule_to_the_trainer(self):
        with open(os.path.join(ROOT, "configs", "deepspeed", "zero3.json")) as f:
            config = json.load(f)
        assert config["zero_optimization"]["stage"] == 3
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert "optimizer" not in config and "scheduler" not in config  # the scripts' AdamW and lr schedule
        assert config["bf16"]["enabled"] == "auto"  # the Trainer fills in the run's precision

# --- the recipes -------------------------------------------------------------------------------------------------

RECIPES = sorted(p for p in os.listdir(os.path.join(ROOT, "configs")) if p.endswith(".yaml"))
PLACEHOLDERS = {  # what the README tells users to replace
    "sft_qwen2": {"model_name_or_path": "Qwen/Qwen2-7B-Instruct", "train_file": ["data/train.jsonl"],
                  "eval_file": ["data/eval.jsonl"]},
    "train_scorer": {"model_name_or_path": "Qwen/Qwen3-VL-8B-Instruct",
                     "train_shards": "data/train-{000000..000099}.tar", "eval_shards": "data/val-{000000..000009}.tar"},
}


def parse_recipe(name):
    """(script module, parsed dataclasses, whether they set up ZeRO-3) as the script itself parses its single
    config-file argument."""
    import importlib

    from transformers import HfArgumentParser

    from plumbing import parse_arguments

    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    script = importlib.import_module("sft_qwen2" if name.startswith("sft") else "train_scorer")
    parsed = parse_arguments(HfArgumentParser(script.ARGUMENTS), [os.path.join(ROOT, "configs", name)])
    # TrainingArguments with a ZeRO-3 config make every model built afterwards in this process a partitioned one
    # (what the script wants: it loads the model next); the tests build theirs whole, so the setting goes here.
    zero3 = is_deepspeed_zero3_enabled()
    unset_hf_deepspeed_config()
    return script, parsed, zero3


def planned_gb(script, model_args, lora_args, args, gpus):
    """The memory plan's per-GPU figure for the recipe's model (its real architecture, on the meta device)."""
    import torch
    from test_training_plan import QWEN2_7B, QWEN3_VL_8B, bf16_args
    from transformers import AutoModelForCausalLM, Qwen3VLConfig

    from training_plan import add_lora, lora_settings, memory_plan, use_precision_policy

    deepspeed = os.path.join(ROOT, args.deepspeed) if args.deepspeed else None
    plan_args = bf16_args(world_size=gpus, fsdp=bool(args.fsdp), deepspeed=deepspeed, fsdp_config=args.fsdp_config)
    with torch.device("meta"):
        if script.__name__ == "sft_qwen2":
            model = AutoModelForCausalLM.from_config(QWEN2_7B, dtype=torch.bfloat16)
            if lora_args.use_peft:
                model = add_lora(model, lora_settings(model, lora_args, "model"))
        else:
            config = Qwen3VLConfig(**QWEN3_VL_8B)
            config.num_types = model_args.num_types
            model = script.Qwen3VLScorer(config).to(torch.bfloat16)
            for name in ("score", "type"):
                model.head(name).float()
            if lora_args.use_peft:
                model.add_lora(lora_settings(model.model, lora_args, "language_model"))
            model.set_trainable(model_args.freeze_backbone, model_args.freeze_vision, "base")
    use_precision_policy(model, plan_args)
    return memory_plan(model, plan_args, 0, gpu_bytes=80e9, gpu_name="an 80 GB GPU")["total"] / 1e9


class TestRecipes:
    def test_every_recipe_the_issue_names_is_shipped(self):
        assert RECIPES == ["scorer-qwen3vl-8b-full-fsdp2-8gpu.yaml", "scorer-qwen3vl-8b-heads-1gpu.yaml",
                           "scorer-qwen3vl-8b-lora-1gpu.yaml", "sft-qwen2-7b-full-fsdp2-8gpu.yaml",
                           "sft-qwen2-7b-full-zero3-8gpu.yaml", "sft-qwen2-7b-lora-1gpu.yaml"]

    @pytest.mark.parametrize("name", RECIPES)
    def test_recipe_parses_and_its_header_says_hardware_command_and_plan(self, name):
        script, (model_args, data_args, lora_args, args), zero3 = parse_recipe(name)  # unknown keys would exit 2
        for key, value in PLACEHOLDERS[script.__name__].items():
            assert (getattr(model_args, key, None) or getattr(data_args, key)) == value, key
        with open(os.path.join(ROOT, "configs", name)) as f:
            header = [line for line in f.read().splitlines() if line.startswith("#")]
        text = " ".join(header)
        gpus = int(re.search(r"(\d+)gpu", name).group(1))
        assert ("ONE" if gpus == 1 else f"over {gpus} GPUs") in header[0] and "GB" in header[0]  # the hardware
        launcher = "python" if gpus == 1 else "bash run.sh"
        assert f"{launcher} {script.__name__}.py configs/{name}" in text  # the command
        figure = float(re.search(r"Memory plan per GPU: ([\d.]+) GB", text).group(1))
        assert figure == round(planned_gb(script, model_args, lora_args, args, gpus), 1)
        if gpus > 1:  # a recipe for a node says how to run it on two
            assert "NNODES=2 NODE_RANK=0|1 MASTER_ADDR=" in text
        # the Trainer gets the JSON: TrainingArguments has read it and set up ZeRO-3 for the model load
        assert zero3 == bool(args.deepspeed) == ("zero3" in name)
        assert args.deepspeed in (None, "configs/deepspeed/zero3.json")
