"""Sharded training: FSDP2's model-level pieces under 2 gloo processes (tests/fsdp2_worker.py), the recipes in
configs/, and what the scripts do with --fsdp / --deepspeed on a machine without GPUs."""

import json
import os
import re
import sys

import pytest

from conftest import ROOT, exit_2_line, run_cli

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

    def test_prediction_generates_in_lockstep_on_a_sharded_model(self, fsdp2):
        """sft_qwen2.py --do_predict after FSDP2 training: 5 prompts over 2 ranks in batches of 1 (3 generate calls
        and 2), one rank's first call ending passes before the other's; each forward gathers layers from every
        rank, so both ranks run the same passes (a stand-in call and synced_gpus; without either the run dies in
        mismatched collectives): every prompt once, in order, each answer the unsharded model's."""
        assert fsdp2["generation_lockstep"] == {"keys": [0, 1, 2, 3, 4], "forwards": [26, 26], "same": True,
                                                "first_call_ended_early": True}

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

    def test_gradients_held_between_micro_batches_are_what_the_plan_counts(self, fsdp2):
        """3 micro-batches of the tiny Qwen2 (127,296 trained parameters) run as the Trainer runs them, bf16 policy.
        Reducing every micro-batch (the recipes; the scripts' default under --fsdp), each rank holds its fp32 shard of
        the gradients throughout; under no_sync every unit keeps its whole fp32 gradient until the last micro-batch
        reduce-scatters it: all 4 x 127,296 bytes on each rank, whatever the number of ranks. The plan says each."""
        held = fsdp2["held_gradients"]
        shard = 4 * 127_296 / 2
        assert held["sync_each_batch"]["held"] == pytest.approx([shard] * 3, rel=0.1)
        assert held["no_sync"]["held"] == pytest.approx([2 * shard, 2 * shard, shard], rel=0.1)
        for run in held.values():
            assert max(run["held"]) == pytest.approx(run["planned"], rel=0.1), run


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


def unlisted(files, kind):
    """(files of a 2-process checkpoint that reliability.CHECKPOINT_FILES[kind] does not list, listed files it lacks)"""
    import fnmatch

    from reliability import checkpoint_files

    listed = checkpoint_files(kind, 2) + checkpoint_files(kind, 2, "also written")
    return ([f for f in files if not any(fnmatch.fnmatchcase(f, p) for p in listed)],
            [p for p in listed if not fnmatch.filter(files, p)])


TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 414}  # demo.py's


def fsdp2_run(name, world_size=2):
    """The run record of a GPU run with an FSDP2 recipe on the worker's checkpoint `name`'s model and mode."""
    identity, trains = {"sft": (TINY_QWEN2, "full"), "sft_lora": (TINY_QWEN2, "LoRA"),
                        "scorer": ({"scorer_base_model": None, "scorer_targets": None}, "all")}[name]
    return {"model": identity, "trains": trains, "sharding": "FSDP2 SHARDED_STATE_DICT", "world_size": world_size}


class TestShardedCheckpoints:
    """Checkpoints written as the Trainer writes them on GPUs with the FSDP2 recipes (SHARDED_STATE_DICT): accelerate's
    save_fsdp_model / save_fsdp_optimizer over 2 gloo processes (tests/fsdp2_worker.py), the Trainer's own files,
    the scripts' run record and marker; no config.json among them."""

    def test_the_files_are_those_reliability_lists(self, fsdp2):
        assert set(fsdp2["sharded_checkpoints"]["files"]) == {"sft", "sft_lora", "scorer"}
        for files in fsdp2["sharded_checkpoints"]["files"].values():
            assert unlisted(files, "FSDP2 SHARDED_STATE_DICT") == ([], [])

    def test_another_number_of_processes_loads_it(self, fsdp2):
        """accelerate's load_fsdp_model / load_fsdp_optimizer (torch's distributed checkpoint) put the 2-process
        checkpoint into the layout of one process (the whole output layer in one shard): the same weights and AdamW
        states. So an FSDP2 checkpoint is not refused for another number of GPUs (rng_state_N.pth of a rank that
        did not exist then is only missing: the Trainer logs it and goes on)."""
        assert fsdp2["sharded_checkpoints"]["resharded"] == {"local_rows": [207, 414], "weights": 0.0,
                                                             "optimizer": 0.0}

    def test_the_best_checkpoint_loads_back_at_the_end_of_training(self, fsdp2):
        """--load_best_model_at_end under FSDP2: Trainer._load_best_model reads the best checkpoint into the sharded
        model with load_fsdp_model (adapter_only=True, as it saved it), every rank its shards. Into a fresh model of
        each kind (its weights before the checkpoint's step: they differ), it gives the saved weights exactly, the
        LoRA adapters included."""
        assert fsdp2["sharded_checkpoints"]["best_loaded"] == {name: [True, 0.0]
                                                               for name in ("sft", "sft_lora", "scorer")}

    @pytest.mark.parametrize("name", ["sft", "sft_lora", "scorer"])
    def test_the_run_it_was_saved_by_resumes_from_it_on_any_number_of_gpus(self, fsdp2, name):
        """No crash on the missing config.json, and LoRA adapters are known as such."""
        from reliability import RUN_RECORD, resume_mismatch

        path = fsdp2["sharded_checkpoints"]["paths"][name]
        with open(os.path.join(path, RUN_RECORD)) as f:
            assert json.load(f) == fsdp2_run(name)
        assert resume_mismatch(path, fsdp2_run(name)) is None
        assert resume_mismatch(path, fsdp2_run(name, world_size=8)) is None

    @pytest.mark.parametrize("name", ["sft", "sft_lora", "scorer"])
    def test_a_cpu_run_refuses_it_with_one_line(self, fsdp2, name, capsys):
        """What each script's resume line does on this machine, which has no GPU: no FSDP (accelerate shards only on
        GPUs), so it cannot load the shards; before the record, it crashed reading a config.json that a sharded save
        does not write (LoRA: it claimed the checkpoint held the full model)."""
        import sft_qwen2
        import train_scorer

        path = fsdp2["sharded_checkpoints"]["paths"][name]
        main = train_scorer.main if name == "scorer" else sft_qwen2.main
        extra = ["--use_peft"] if name == "sft_lora" else []
        line = exit_2_line(capsys, main, ["--demo", "--output_dir", os.path.dirname(path), *extra])
        assert line == (f"error: {path}: saved with FSDP2 SHARDED_STATE_DICT on 2 processes, this run has no sharding "
                        f"on 1 process (no GPU here: FSDP and DeepSpeed shard on GPUs only); resume with the sharding "
                        f"it was saved with, or use another --output_dir")

    def test_one_process_names_its_rng_state_as_the_trainer_does(self, fsdp2, tmp_path):
        """FSDP2 in one process on one GPU (torchrun sets LOCAL_RANK: accelerate shards; bench/gpu_check.py does it):
        the Trainer writes rng_state.pth, not rng_state_0.pth."""
        import shutil

        from reliability import RUN_RECORD, resume_mismatch

        copy = shutil.copytree(fsdp2["sharded_checkpoints"]["paths"]["sft"], tmp_path / "checkpoint-3")
        os.rename(copy / "rng_state_0.pth", copy / "rng_state.pth")
        with open(copy / RUN_RECORD, "w") as f:
            json.dump(fsdp2_run("sft", world_size=1), f)
        assert resume_mismatch(str(copy), fsdp2_run("sft", world_size=1)) is None

    def test_every_rank_resumes_from_rank_0s_choice_and_exits_with_any_ranks_problem(self, fsdp2):
        """Nodes may not share a disk: rank 1's output folder is empty and its copy of the checkpoint lacks DCP's
        index. Both ranks take rank 0's checkpoint, and both get rank 1's verdict, so they exit together."""
        path = fsdp2["sharded_checkpoints"]["paths"]["sft"]
        copy = os.path.join(os.path.dirname(os.path.dirname(path)), "rank-1-disk")
        problem = (f"{copy}: pytorch_model_fsdp_0/.metadata is missing, which a FSDP2 SHARDED_STATE_DICT resume "
                   f"reads; copy the whole checkpoint (hidden files too), or use another --output_dir (met by process "
                   f"1, not by process 0: every node must see the same --output_dir, on a shared filesystem, or a copy "
                   f"of the whole checkpoint)")
        assert fsdp2["sharded_checkpoints"]["agreed"] == [{"chosen": path, "problem": problem}] * 2

    @pytest.mark.parametrize("remove, line", [
        ("checkpoint-run.json", "holds no checkpoint-run.json, config.json or adapter_config.json, so nothing says "
                                "what it holds (an FSDP2 checkpoint of an earlier version of this script, which could "
                                "not resume it either, has none); use another --output_dir"),
        ("pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/.metadata is missing, which a FSDP2 "
                                           "SHARDED_STATE_DICT resume reads; copy the whole checkpoint (hidden files "
                                           "too), or use another --output_dir")], ids=["earlier-version", "cp-star"])
    def test_one_without_its_record_or_a_file_is_refused(self, fsdp2, tmp_path, remove, line):
        """An FSDP2 checkpoint of an earlier version has no record and no config.json (that version could not resume
        it either: a traceback, so refusing it loses nothing that worked); `cp checkpoint-3/*` leaves out DCP's
        hidden index, without which nothing loads."""
        import shutil

        from reliability import resume_mismatch

        copy = shutil.copytree(fsdp2["sharded_checkpoints"]["paths"]["sft"], tmp_path / "checkpoint-3")
        os.remove(copy / remove)
        assert resume_mismatch(str(copy), fsdp2_run("sft")) == f"{copy}: {line}"

    def test_an_unreadable_record_is_a_problem_not_a_traceback(self, fsdp2, tmp_path):
        """A record cut short (a full disk, a copy interrupted) is one line: a rank that raised instead would never
        reach the all-gather its peers wait in."""
        import shutil

        from reliability import RUN_RECORD, resume_mismatch

        copy = shutil.copytree(fsdp2["sharded_checkpoints"]["paths"]["sft"], tmp_path / "checkpoint-3")
        (copy / RUN_RECORD).write_text('{"model": {"model_')
        assert resume_mismatch(str(copy), fsdp2_run("sft")) == (
            f"{copy}: cannot read it (JSONDecodeError: Unterminated string starting at: line 1 column 12 (char 11)); "
            f"use another --output_dir")


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """The reference (1 process, no DeepSpeed), then ZeRO-3 over 2 processes with the shipped JSON: same batches;
    then ZeRO-3 with 1 process trying to resume the 2-process checkpoint."""
    work = tmp_path_factory.mktemp("zero3")
    env = {"OMP_NUM_THREADS": "1"}
    plain = run_cli([sys.executable, "tests/zero3_worker.py", str(work), "plain"], env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    # the first DeepSpeed run on a machine compiles its CPU communication op (about 2.5 minutes on 2 cores)
    res = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "tests/zero3_worker.py", str(work), "zero3"], env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "tests/zero3_worker.py", str(work), "resume"], env=env)
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

    def test_zero3_reduces_and_accumulates_gradients_in_fp32_under_bf16(self, zero3):
        """What the DeepSpeed engine of a bf16 run with the shipped JSON reports (DeepSpeed's default would be the
        model's bf16 for both), and the dtype of the gradient partitions its ZeRO-3 optimizer keeps."""
        with open(zero3 / "zero3" / "losses.json") as f:
            dtypes = json.load(f)["bf16_gradient_dtypes"]
        assert dtypes == {"model": "torch.bfloat16", "reduced": "torch.float32", "accumulated": "torch.float32",
                          "partitions": "torch.float32"}

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

    def test_early_stopping_keeps_the_best_checkpoint_under_zero3(self, zero3):
        """Stopped at the second of 4 steps (patience 1), the final save holds the best checkpoint's weights, read
        back from DeepSpeed's partitioned checkpoint by every rank and gathered, not the last step's."""
        import safetensors.torch
        import torch

        with open(zero3 / "zero3" / "losses.json") as f:
            assert json.load(f)["best_model_kept"] == {"step": 2, "best": "checkpoint-1"}
        final, best, last = (safetensors.torch.load_file(zero3 / "zero3-best" / d / "model.safetensors")
                             for d in ("final", "checkpoint-1", "checkpoint-2"))
        assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in best)
        assert not all(torch.equal(final[k], last[k]) for k in last)

    def test_prediction_generates_in_lockstep_on_the_partitioned_model(self, zero3):
        """sft_qwen2.py --do_predict after ZeRO-3 training: 3 prompts over 2 ranks, batch 1 (2 generate calls and 1
        plus a stand-in), rank 0's first answer ending passes before rank 1's; every forward gathers each layer from
        both ranks, so both run the same passes, and each answer is the saved model's own greedy answer to that
        prompt alone."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from generation import generation_config
        from zero3_worker import GENERATION_PROMPTS

        with open(zero3 / "zero3" / "losses.json") as f:
            ranks = json.load(f)["generation"]
        assert [r["forwards"] for r in ranks] == [16, 16]
        saved = AutoModelForCausalLM.from_pretrained(zero3 / "zero3" / "final", dtype=torch.float32)
        config = generation_config(AutoTokenizer.from_pretrained(zero3 / "base"), max_new_tokens=8)
        config.eos_token_id = ranks[0]["eos"]
        alone = [saved.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                generation_config=config)[0, len(p):].tolist() for p in GENERATION_PROMPTS]
        assert ranks[0]["answers"] == alone[0::2] and ranks[1]["answers"] == alone[1::2]
        assert len(alone[2]) < 8 and len(alone[1]) == 8  # the ranks' first calls end at different passes

    def test_its_checkpoint_holds_the_files_reliability_lists_and_a_run_on_other_gpus_is_refused(self, zero3):
        """The Trainer's own ZeRO-3 checkpoint (every file DeepSpeed and the Trainer write, and the run record, which
        says what accelerate set up) meets a run of as many processes, and one of another number, which DeepSpeed
        itself cannot resume (tried with one process)."""
        with open(zero3 / "resume" / "error.txt") as f:
            assert f.read().startswith("ZeRORuntimeException: The checkpoint being loaded used a DP world size of 2 "
                                       "but the current world size is 1.")
        from reliability import RUN_RECORD, resume_mismatch

        path = zero3 / "zero3" / "checkpoint-4"
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        assert unlisted(files, "DeepSpeed ZeRO-3") == ([], [])
        with open(path / RUN_RECORD) as f:
            record = json.load(f)
        assert record == {"model": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
                                    "vocab_size": 512}, "trains": "full", "sharding": "DeepSpeed ZeRO-3",
                          "world_size": 2}
        assert resume_mismatch(str(path), record) is None
        assert resume_mismatch(str(path), {**record, "world_size": 8}) == (
            f"{path}: saved with DeepSpeed ZeRO-3 on 2 processes, this run has 8; DeepSpeed loads each rank's own "
            f"partition of the optimizer states: resume on 2 GPUs, or use another --output_dir")

    def test_the_shipped_config_gathers_the_save_and_leaves_optimizer_and_schedule_to_the_trainer(self):
        with open(os.path.join(ROOT, "configs", "deepspeed", "zero3.json")) as f:
            config = json.load(f)
        assert config["zero_optimization"]["stage"] == 3
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert "optimizer" not in config and "scheduler" not in config  # the scripts' AdamW and lr schedule
        assert config["bf16"]["enabled"] == "auto"  # the Trainer fills in the run's precision

@pytest.mark.parametrize("script, data", [("sft_qwen2", "--train_file"), ("train_scorer", "--train_shards")])
def test_fsdp_reduces_every_micro_batch_unless_the_run_says_otherwise(script, data, monkeypatch, tmp_path, capsys):
    """What accumulation settings a --fsdp run hands the Trainer, seen where the script checks its flags (on this
    machine it then exits 2: no GPUs)."""
    import importlib

    module = importlib.import_module(script)
    seen = []

    def check_flags(args, lora_args):
        seen.append(args.accelerator_config.gradient_accumulation_kwargs)
        return real(args, lora_args)

    real = module.check_flags
    monkeypatch.setattr(module, "check_flags", check_flags)
    flags = ["--fsdp", "--gradient_accumulation_steps", "4", "--use_cpu", data, str(tmp_path / "x"),
             "--output_dir", str(tmp_path / "o")]
    assert "needs GPUs" in exit_2_line(capsys, module.main, flags)
    exit_2_line(capsys, module.main, flags + ["--accelerator_config",
                                              '{"gradient_accumulation_kwargs": {"sync_each_batch": false}}'])
    assert seen == [{"sync_each_batch": True}, {"sync_each_batch": False}]


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
    return recipe_plan(script, model_args, lora_args, args, gpus)["total"] / 1e9


def recipe_plan(script, model_args, lora_args, args, gpus):
    """The memory plan (`memory_plan`'s dict) of the recipe's model as it would train under `args`."""
    import torch
    from test_training_plan import QWEN2_7B, QWEN3_VL_8B, bf16_args
    from transformers import AutoModelForCausalLM, Qwen3VLConfig

    from training_plan import add_lora, lora_settings, memory_plan, use_precision_policy

    deepspeed = os.path.join(ROOT, args.deepspeed) if args.deepspeed else None
    plan_args = bf16_args(world_size=gpus, fsdp=bool(args.fsdp), deepspeed=deepspeed,
                          accumulation=args.gradient_accumulation_steps,
                          accumulation_kwargs=args.accelerator_config.gradient_accumulation_kwargs,
                          fsdp_config=args.fsdp_config)
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
    return memory_plan(model, plan_args, 0, gpu_bytes=80e9, gpu_name="an 80 GB GPU")


class TestRecipes:
    @pytest.mark.parametrize("name", [name for name in RECIPES if "fsdp2" in name])
    def test_fsdp2_recipes_reduce_every_micro_batch(self, name):
        """The YAML carries accelerate's sync_each_batch to the Trainer through HfArgumentParser, and the comment
        beside it says what turning it off would add to the plan: FSDP2's unsharded fp32 gradients."""
        script, (model_args, _, lora_args, *_, args), _ = parse_recipe(name)
        assert args.gradient_accumulation_steps > 1
        assert args.accelerator_config.gradient_accumulation_kwargs == {"sync_each_batch": True}
        assert recipe_plan(script, model_args, lora_args, args, 8)["no_sync_gradients"] == 0
        args.accelerator_config.gradient_accumulation_kwargs = {"sync_each_batch": False}
        held = recipe_plan(script, model_args, lora_args, args, 8)["no_sync_gradients"]
        with open(os.path.join(ROOT, "configs", name)) as f:
            said = float(re.search(r"\+([\d.]+) GB a GPU here", f.read()).group(1))
        assert said == round(held / 1e9, 1)

    def test_every_recipe_the_issue_names_is_shipped(self):
        assert RECIPES == ["scorer-qwen3vl-8b-full-fsdp2-8gpu.yaml", "scorer-qwen3vl-8b-heads-1gpu.yaml",
                           "scorer-qwen3vl-8b-lora-1gpu.yaml", "sft-qwen2-7b-full-fsdp2-8gpu.yaml",
                           "sft-qwen2-7b-full-zero3-8gpu.yaml", "sft-qwen2-7b-lora-1gpu.yaml"]

    @pytest.mark.parametrize("name", RECIPES)
    def test_recipe_parses_and_its_header_says_hardware_command_and_plan(self, name):
        script, (model_args, data_args, lora_args, *_, args), zero3 = parse_recipe(name)  # unknown keys: exit 2
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
