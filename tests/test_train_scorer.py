"""train_scorer.py: the model (pooling, padding sides, trainable parts, dtypes, save formats), metrics, training in
each mode, logs, schedule, save/load/resume, eval, predict, config files, bad input, forking (in-process), and
`bash run.sh` with 2 CPU processes (gloo) as users run it."""

import csv
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from PIL import Image

import demo
import make_shards
import train_scorer
from collate import IMAGE_MEMBER, DataError, VLEncoder, collate_vl
from conftest import ROOT, scorer_args, exit_2_line, log_history, read_jsonl, run_cli, same_predictions
from train_scorer import ModelArguments, Qwen3VLScorer, load_scorer, pool_last_token, scorer_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the model --------------------------------------------------------------------------------------------------

def scorer(scorer_demo, dtype=torch.float32, **flags):
    torch.manual_seed(0)
    return load_scorer(ModelArguments(model_name_or_path=scorer_demo[0], num_types=3, **flags), dtype)


def right_padded(vl_features, pad_id):
    """The same batch with right padding (what collate_vl must not assume the model never sees)."""
    batch = collate_vl(vl_features, pad_id)
    width = batch["input_ids"].shape[1]
    for name, pad in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        rows = [f[name][0] for f in vl_features]
        batch[name] = torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])
    return batch


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "keys"}


def backbone_inputs(batch):
    return {k: v for k, v in batch.items() if not k.endswith(("_labels", "keys"))}


def test_pool_last_token_left_and_right():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_last_token(hidden, left)[:, 0].tolist() == [3.0, 7.0]
    assert pool_last_token(hidden, right)[:, 0].tolist() == [1.0, 7.0]


def test_batch_runs_and_pools_like_each_sample_alone(scorer_demo, vl_processor, vl_features):
    model = scorer(scorer_demo).eval()
    pad = vl_processor.tokenizer.pad_token_id
    batch = collate_vl(vl_features, pad)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        pooled = model.pooled(**backbone_inputs(batch))
        alone = [model.pooled(**backbone_inputs(collate_vl([f], pad))) for f in vl_features]
    assert out.heads["score"].shape == (4,) and out.heads["type"].shape == (4, 3)
    assert out.heads["score"].dtype == out.heads["type"].dtype == torch.float32
    assert out.loss.ndim == 0 and sorted(out.head_losses) == ["score", "type"]
    torch.testing.assert_close(out.loss, out.head_losses["score"] + out.head_losses["type"])
    torch.testing.assert_close(out.head_losses["score"], ((out.heads["score"] - batch["score_labels"]) ** 2).mean())
    torch.testing.assert_close(pooled, torch.cat(alone), rtol=1e-4, atol=1e-5)
    # the pooled row really depends on the sample (not e.g. always the shared generation prompt's hidden state)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


def test_left_and_right_padding_give_the_same_features_and_scores(scorer_demo, vl_processor, vl_features):
    model = scorer(scorer_demo).eval()
    pad = vl_processor.tokenizer.pad_token_id
    left, right = collate_vl(vl_features, pad), right_padded(vl_features, pad)
    assert not torch.equal(left["input_ids"], right["input_ids"])
    with torch.no_grad():
        a, b = model(**model_inputs(left)), model(**model_inputs(right))
        pa, pb = model.pooled(**backbone_inputs(left)), model.pooled(**backbone_inputs(right))
    torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.heads, b.heads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags, trained", [
    ({}, ("model.visual.", "model.language_model.", "score_head.", "type_head.")),
    ({"freeze_vision": True}, ("model.language_model.", "score_head.", "type_head.")),
    ({"freeze_backbone": True}, ("score_head.", "type_head.")),
])
def test_every_trainable_parameter_gets_a_gradient(scorer_demo, vl_processor, vl_features, flags, trained):
    """What DDP with find_unused_parameters=False needs, for a batch with images and a text-only batch."""
    model = scorer(scorer_demo, **flags).train()
    pad = vl_processor.tokenizer.pad_token_id
    for batch in (collate_vl(vl_features[:3], pad), collate_vl([vl_features[3], vl_features[3]], pad)):
        model.zero_grad(set_to_none=True)
        model(**model_inputs(batch)).loss.backward()
        for name, p in model.named_parameters():
            assert p.requires_grad == name.startswith(trained), name
            assert (p.grad is not None) == p.requires_grad, name


def test_heads_stay_fp32_on_a_bf16_backbone(scorer_demo, vl_processor, vl_features):
    model = scorer(scorer_demo, torch.bfloat16)
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.score_head.weight.dtype == model.type_head.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(**model_inputs(collate_vl(vl_features, vl_processor.tokenizer.pad_token_id)))
    assert out.heads["score"].dtype == out.heads["type"].dtype == torch.float32


@pytest.mark.parametrize("flags, lora", [({"freeze_vision": True}, False), ({}, True),
                                         ({"freeze_backbone": True}, False)])
def test_precision_policy_fp32_masters_frozen_parts_bf16(scorer_demo, flags, lora, capsys):
    """Under bf16: whatever trains is fp32 (masters, heads, adapters), whatever is frozen stays bf16."""
    from training_plan import LoraArguments, use_precision_policy

    model = load_scorer(ModelArguments(model_name_or_path=scorer_demo[0], num_types=3, **flags), torch.bfloat16,
                        LoraArguments(use_peft=lora))
    args = train_scorer.ScorerArguments(output_dir="unused", bf16=True, use_cpu=True)
    assert use_precision_policy(model, args) is None  # the Trainer's own AdamW, on fp32 masters
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert (f"precision: bf16 autocast, fp32 master weights for {trained:,} trainable parameters; "
            f"frozen: {frozen:,} bf16") in capsys.readouterr().out


def test_frozen_backbone_saves_heads_only_and_loads_the_full_scorer(scorer_demo, vl_processor, vl_features, tmp_path):
    import safetensors.torch

    model = scorer(scorer_demo, freeze_backbone=True).eval()
    with torch.no_grad():
        model.score_head.weight.add_(0.5)  # heads that differ from any fresh initialisation
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == ["score_head.bias", "score_head.weight", "type_head.bias", "type_head.weight"]
    assert model.config.scorer_base_model == os.path.abspath(scorer_demo[0])
    loaded = Qwen3VLScorer.from_pretrained(tmp_path).eval()
    batch = model_inputs(collate_vl(vl_features, vl_processor.tokenizer.pad_token_id))
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.heads, b.heads, rtol=0, atol=0)
    # training on from a heads-only save in full mode makes a full save again
    full = load_scorer(ModelArguments(model_name_or_path=str(tmp_path)), torch.float32)
    assert full.config.num_types == 3 and full.config.scorer_base_model is None
    full.save_pretrained(tmp_path / "full")
    assert len(safetensors.torch.load_file(tmp_path / "full" / "model.safetensors")) > 4
    with pytest.raises(Exception, match="has 3 types, not --num_types 4"):
        load_scorer(ModelArguments(model_name_or_path=str(tmp_path), num_types=4), torch.float32)


def test_a_qwen3_vl_checkpoint_needs_num_types(scorer_demo):
    with pytest.raises(Exception, match="--num_types is required"):
        load_scorer(ModelArguments(model_name_or_path=scorer_demo[0]), torch.float32)


# --- metrics ------------------------------------------------------------------------------------------------------

def test_scorer_metrics_match_definitions():
    pred = np.array([1.0, 2.0, 2.0, 5.0, 4.0])
    label = np.array([1.5, 2.0, 3.0, 4.0, 4.0])
    logits = np.log(np.array([[.7, .2, .1], [.1, .8, .1], [.3, .3, .4], [.2, .5, .3], [.6, .25, .15]]))
    kind = [0, 1, 1, 2, 0]  # argmax guesses: 0, 1, 2, 1, 0 -> 3 of 5 right
    rows = [{"heads": {"score": p, "type": list(l)}, "labels": {"score": y, "type": k}}
            for p, y, l, k in zip(pred, label, logits, kind)]
    m, details = scorer_metrics(rows, {"score": 2.0, "type": 0.5})
    mse = np.mean((pred - label) ** 2)
    ce = -np.mean([logits[i, k] for i, k in enumerate(kind)])
    assert m["eval_loss_score"] == pytest.approx(mse) and m["eval_loss_type"] == pytest.approx(ce)
    assert m["eval_loss"] == pytest.approx(2.0 * mse + 0.5 * ce)
    assert m["eval_score_mae"] == pytest.approx(np.mean(np.abs(pred - label)))
    assert m["eval_score_rmse"] == pytest.approx(math.sqrt(mse))
    assert m["eval_score_pearson"] == pytest.approx(np.corrcoef(pred, label)[0, 1])
    # average ranks with ties: pred (1, 2.5, 2.5, 5, 4), label (1, 2, 3, 4.5, 4.5)
    assert m["eval_score_spearman"] == pytest.approx(np.corrcoef([1, 2.5, 2.5, 5, 4], [1, 2, 3, 4.5, 4.5])[0, 1])
    assert m["eval_type_accuracy"] == pytest.approx(0.6)
    # class 0: tp 2 -> f1 1; class 1: tp 1, fp 1, fn 1 -> 0.5; class 2: fp 1, fn 1 -> 0
    assert m["eval_type_macro_f1"] == pytest.approx(0.5)
    # one-vs-rest ROC-AUC, the share of (positive, negative) pairs ranked right: class 0 6/6; class 1 (.8 and .3
    # against .2, .5, .25) 5/6; class 2 (.3 against .1, .1, .4, .15) 3/4
    assert details["eval_type_roc_auc_per_class"] == pytest.approx([1.0, 5 / 6, 0.75])
    assert m["eval_type_roc_auc"] == pytest.approx((1.0 + 5 / 6 + 0.75) / 3)
    assert details["eval_type_confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 1, 0]]  # rows: labels; columns: guesses
    assert m["eval_samples"] == 5

    # top-class calibration in 10 equal-width bins: confidences .95, .95 (both right), .65, .65 (one right), .45 (right)
    probs = [[.95, .03, .02], [.03, .95, .02], [.25, .10, .65], [.25, .10, .65], [.45, .35, .20]]
    m, details = scorer_metrics([dict(r, heads={**r["heads"], "type": list(np.log(p))}) for r, p in zip(rows, probs)],
                                {"score": 1, "type": 1})
    assert m["eval_type_ece"] == pytest.approx((2 * abs(1 - .95) + 2 * abs(.5 - .65) + abs(1 - .45)) / 5)
    assert details["eval_type_reliability"]["count"] == [0, 0, 0, 0, 1, 0, 2, 0, 0, 2]

    # undefined is NaN, not a number: constant predictions (a correlation), a class in every label or none (AUC)
    constant, _ = scorer_metrics([dict(r, heads={**r["heads"], "score": 1.0}) for r in rows], {"score": 1, "type": 1})
    assert math.isnan(constant["eval_score_pearson"]) and math.isnan(constant["eval_score_spearman"])
    _, one_class = scorer_metrics([dict(r, labels={**r["labels"], "type": 0}) for r in rows], {"score": 1, "type": 1})
    assert all(math.isnan(a) for a in one_class["eval_type_roc_auc_per_class"])
    assert scorer_metrics(rows[:1], {"score": 1, "type": 1})[0]["eval_type_macro_f1"] == 1.0  # one sample, right


# --- training in-process ------------------------------------------------------------------------------------------

GROUPS = {"vision": "model.visual.", "llm": "model.language_model.", "heads": ("score_head.", "type_head.")}


@pytest.mark.parametrize("flags, trained", [
    (["--freeze_backbone"], {"heads"}), (["--freeze_vision"], {"llm", "heads"}), ([], {"vision", "llm", "heads"})])
def test_each_mode_trains_exactly_its_parameters(scorer_demo, tmp_path, flags, trained):
    out = tmp_path / "out"
    trainer = train_scorer.main(scorer_args(scorer_demo, out, "--max_steps", "3", "--learning_rate", "1e-2",
                                          "--weight_decay", "0", "--warmup_steps", "0", *flags))
    before = safetensors.torch.load_file(os.path.join(scorer_demo[0], "model.safetensors"))
    after = trainer.model.state_dict()
    for name, value in after.items():
        group = next(g for g, prefix in GROUPS.items() if name.startswith(prefix))
        if group == "heads":
            continue  # new parameters: nothing to compare with in the checkpoint
        changed = not torch.equal(value, before[name])
        assert changed == (group in trained), name
    # activation checkpointing only where the backbone trains
    assert trainer.args.activation_checkpointing == (flags != ["--freeze_backbone"])
    saved = safetensors.torch.load_file(out / "model.safetensors")
    if "--freeze_backbone" in flags:  # heads-only save + the base it sits on
        assert sorted(saved) == ["score_head.bias", "score_head.weight", "type_head.bias", "type_head.weight"]
        with open(out / "config.json") as f:
            assert json.load(f)["scorer_base_model"] == os.path.abspath(scorer_demo[0])
    else:
        assert len(saved) == len(after)


def test_losses_fall_on_a_repeated_batch_and_logs_add_up(scorer_demo, tmp_path):
    shard = demo.write_shard(tmp_path / "four.tar", demo.make_vl_samples(4, seed=3))
    out = tmp_path / "out"
    train_scorer.main(scorer_args(scorer_demo, out, "--max_steps", "16", "--learning_rate", "1e-2",
                                "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--score_weight", "0.5",
                                "--type_weight", "2", "--logging_steps", "4", train=shard))
    logs = [h for h in log_history(out) if "loss_score" in h]
    assert [h["step"] for h in logs] == [4, 8, 12, 16]
    for h in logs:  # the Trainer's window-mean loss is the weighted sum of the heads' window means
        assert h["loss"] == pytest.approx(0.5 * h["loss_score"] + 2 * h["loss_type"], rel=1e-5), h
    assert logs[-1]["loss_score"] < 0.3 * logs[0]["loss_score"], logs
    assert logs[-1]["loss_type"] < 0.7 * logs[0]["loss_type"], logs


def test_head_lr_groups_and_cubic_schedule(scorer_demo, tmp_path):
    trainer = train_scorer.main(scorer_args(scorer_demo, tmp_path / "o", "--max_steps", "8", "--warmup_steps", "2",
                                          "--learning_rate", "1e-3", "--head_lr", "5e-2"))
    groups = trainer.optimizer.param_groups
    heads = {id(p) for m in (trainer.model.score_head, trainer.model.type_head) for p in m.parameters()}
    for g in groups:
        is_head = {id(p) in heads for p in g["params"]}
        assert len(is_head) == 1  # no group mixes heads and backbone
        assert g["initial_lr"] == (5e-2 if is_head.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in trainer.model.parameters())
    # polynomial decay, power 3, after a linear warmup (lr logged before each step's scheduler update)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    end = 1e-7
    expected = [1e-3 * s / 2 if s < 2 else (1e-3 - end) * (1 - (s - 2) / 6) ** 3 + end for s in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", ["frozen", "full", "lora"])
def test_save_load_predict_and_resume(scorer_demo, tmp_path, mode, capsys):
    flags = {"frozen": ["--freeze_backbone", "--learning_rate", "1e-2"], "full": ["--learning_rate", "2e-3"],
             "lora": ["--use_peft", "--learning_rate", "1e-2"]}[mode]
    args = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--eval_shards", scorer_demo[2],
            "--do_predict", "--dataloader_num_workers", "1", *flags]
    straight = tmp_path / "straight"
    trainer = train_scorer.main(scorer_args(scorer_demo, straight, *args))
    keys = [p["key"] for p in read_jsonl(straight / "predictions.jsonl")]
    assert sorted(keys) == [f"e{i:05d}" for i in range(48)]  # the demo's eval shards
    with open(straight / "eval_results.json") as f:
        results = json.load(f)
    assert results["eval_samples"] == 48 and results["eval_bad_samples"] == 0
    for name in ("loss", "loss_score", "loss_type", "score_mae", "score_rmse", "score_pearson", "score_spearman",
                 "type_accuracy", "type_macro_f1"):
        assert f"eval_{name}" in results

    # save -> load -> the same predictions: a predict-only run from the saved folder
    again = tmp_path / "again.jsonl"
    train_scorer.main(["--model_name_or_path", str(straight), "--predict_shards", scorer_demo[2], "--do_predict",
                       "--predict_output", str(again), "--output_dir", str(tmp_path / "p"), "--use_cpu",
                       "--min_pixels", "1024", "--max_pixels", "4096", "--dataloader_num_workers", "0"])
    same_predictions(read_jsonl(again), read_jsonl(straight / "predictions.jsonl"))
    loaded = Qwen3VLScorer.from_pretrained(str(straight))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name

    # resume: a run that lost everything after step 3 continues from checkpoint-3 to the same end
    resumed = tmp_path / "resumed"
    train_scorer.main(scorer_args(scorer_demo, resumed, *args))
    shutil.rmtree(resumed / "checkpoint-6")
    os.remove(resumed / "trainer_state.json")
    capsys.readouterr()
    trainer = train_scorer.main(scorer_args(scorer_demo, resumed, *args))
    assert f"resuming from {resumed / 'checkpoint-3'}" in capsys.readouterr().out
    assert trainer.state.global_step == 6
    a = {h["step"]: h["loss"] for h in log_history(straight) if "loss" in h}
    b = {h["step"]: h["loss"] for h in log_history(resumed) if "loss" in h}
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):  # the steps run after the resume see the same batches and weights
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
    same_predictions(read_jsonl(resumed / "predictions.jsonl"), read_jsonl(straight / "predictions.jsonl"))


def test_tensorboard_gets_both_losses(scorer_demo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    train_scorer.main(scorer_args(scorer_demo, out, "--max_steps", "2", "--report_to", "tensorboard",
                                "--eval_shards", scorer_demo[2], "--eval_strategy", "steps", "--eval_steps", "2"))
    events = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if "tfevents" in f]
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_score", "train/loss_type", "eval/loss", "eval/loss_score",
            "eval/loss_type", "eval/score_pearson", "eval/type_macro_f1"} <= tags, tags


def test_config_file(scorer_demo, tmp_path):
    import yaml

    cfg = tmp_path / "scorer.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": scorer_demo[0], "train_shards": scorer_demo[1], "output_dir": str(tmp_path / "o"),
        "num_types": 3, "min_pixels": 1024, "max_pixels": 4096, "use_cpu": True, "max_steps": 2,
        "per_device_train_batch_size": 2, "dataloader_num_workers": 0, "report_to": "none",
        "save_strategy": "no", "freeze_vision": True}))
    trainer = train_scorer.main([str(cfg)])
    assert trainer.state.global_step == 2 and trainer.args.per_device_train_batch_size == 2
    assert not any(p.requires_grad for p in trainer.model.model.visual.parameters())


# --- bad input ------------------------------------------------------------------------------------------------------

def bad_samples():
    """One sample per kind of bad input, named by its problem."""
    good = demo.make_vl_samples(6, seed=9, prefix="bad")
    corrupt = dict(good[0], **{"0.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"})
    missing_image = {k: v for k, v in good[1].items() if k != "0.jpg"}
    assert "1.png" in missing_image
    def record(s, **change):
        return dict(s, json=json.dumps({**json.loads(s["json"]), **change}).encode())

    missing_field = dict(good[2], json=json.dumps({"prompt": "p", "type": 0}).encode())
    ill_typed = record(good[3], prompt=5)
    out_of_range = record(good[4], type=7)
    nan = dict(good[5], json=b'{"prompt": "p", "score": NaN, "type": 0}')
    return {"image .0.jpg: cannot decode": corrupt, "image 0 is missing": missing_image,
            "missing field 'score'": missing_field, "field 'prompt': expected str, got int": ill_typed,
            "field 'type' is 7, outside 0..2": out_of_range, "field 'score' is nan": nan}


def test_bad_samples_are_skipped_and_counted(scorer_demo, tmp_path, capsys):
    bad = bad_samples()
    samples = demo.make_vl_samples(10, seed=4, prefix="ok")
    shard = demo.write_shard(tmp_path / "mixed.tar", samples[:5] + list(bad.values()) + samples[5:])
    trainer = train_scorer.main(scorer_args(scorer_demo, tmp_path / "o", "--max_steps", "6", "--eval_shards", shard,
                                          "--do_predict", train=shard))
    out = capsys.readouterr().out
    m = trainer.metrics
    assert m["train_bad_samples"] == 6 and m["eval_bad_samples"] == 6 and m["eval_samples"] == 10
    # prediction needs no labels: only the bad image, the missing image and the non-string prompt are bad there
    assert m["predict_bad_samples"] == 3 and m["predict_samples"] == 13
    assert "bad samples skipped 6 (per rank [6])" in out
    assert len(read_jsonl(tmp_path / "o" / "predictions.jsonl")) == 13


def test_resume_decodes_no_image_of_a_trained_step(scorer_demo, tmp_path, monkeypatch):
    """A run resumed at step 3 of 6 (2 batches per step, bucketed, bad samples among the trained steps) positions its
    stream there: it decodes only the images of steps 4-6, yet they see the batches of the uninterrupted run (the
    same losses), the trained steps' bad samples left out where that run left them out (its checkpoint says where)."""
    import collate

    decoded = []

    def counted(member, data, decode=True):
        decoded.append(decode)
        return open_image(member, data, decode)

    open_image = collate.open_image
    monkeypatch.setattr(collate, "open_image", counted)
    samples = demo.make_vl_samples(40, seed=4, prefix="ok")
    shard = demo.write_shard(tmp_path / "mixed.tar", samples[:5] + list(bad_samples().values()) + samples[5:])
    args = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--gradient_accumulation_steps", "2",
            "--learning_rate", "2e-3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_scorer.main(scorer_args(scorer_demo, straight, *args, train=shard))
    assert decoded.count(True) == 108  # the images of 6 steps (48 samples), and the one corrupt image
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    decoded.clear()
    trainer = train_scorer.main(scorer_args(scorer_demo, resumed, *args, train=shard))
    assert trainer.state.global_step == 6
    assert decoded.count(True) == 61  # the images of steps 4-6 only; replaying the trained steps decoded 108
    with open(straight / "checkpoint-3" / "bad_samples.json") as f:
        assert json.load(f) == [[shard, 7], [shard, 10]]  # the bad samples of steps 1-3 (5-10 are bad)
    # a checkpoint without the record (an earlier version's) is replayed by every rank: decoded again, same batches
    replayed = tmp_path / "replayed"
    shutil.copytree(straight / "checkpoint-3", replayed / "checkpoint-3")
    os.remove(replayed / "checkpoint-3" / "bad_samples.json")
    decoded.clear()
    train_scorer.main(scorer_args(scorer_demo, replayed, *args, train=shard))
    assert decoded.count(True) == 108
    a = {h["step"]: h["loss"] for h in log_history(straight) if "loss" in h}
    for run in (resumed, replayed):
        b = {h["step"]: h["loss"] for h in log_history(run) if "loss" in h}
        assert sorted(b) == list(range(1, 7))
        for step in range(4, 7):
            assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)


@pytest.mark.parametrize("problem", list(bad_samples()))
def test_bad_sample_with_on_bad_sample_error_exits_2(scorer_demo, tmp_path, capsys, problem):
    sample = bad_samples()[problem]
    shard = demo.write_shard(tmp_path / "one-bad.tar", demo.make_vl_samples(2, seed=4, prefix="ok") + [sample])
    err = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, tmp_path / "o", "--max_steps", "2",
                                                           "--on_bad_sample", "error", train=shard))
    assert err.startswith(f"error: {shard}: {sample['__key__']}: ") and problem in err, err


@pytest.mark.parametrize("spec, message", [
    (" , ", "--train_shards: empty shard list"),
    ("{d}/nothing-{{000000..000003}}.tar", "--train_shards: {d}/nothing-000000.tar: no such shard file"),
    ("{d}/nothing-*.tar", "--train_shards: {d}/nothing-*.tar: pattern matches no file"),
])
def test_unusable_shard_lists_exit_2(scorer_demo, tmp_path, capsys, spec, message):
    err = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, tmp_path / "o", train=spec.format(d=tmp_path)))
    assert err == "error: " + message.format(d=tmp_path)


def test_resume_refuses_a_checkpoint_of_another_mode(scorer_demo, tmp_path, capsys):
    """A heads-only checkpoint cannot resume a run that trains the language model (nor the other way round): its
    optimizer state covers other parameters."""
    out = tmp_path / "o"
    args = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    train_scorer.main(scorer_args(scorer_demo, out, *args, "--freeze_backbone"))
    err = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, out, *args, "--max_steps", "4",
                                                           "--freeze_vision"))
    assert err.startswith(f"error: {out / 'checkpoint-2'}: saved with scorer_trains = heads, this run has llm+heads")


# heads alone at 3e-2: the RMSE bounces after step 4 (at 1e-2 it still falls slowly at step 30)
@pytest.mark.parametrize("mode, flags, metric", [
    ("heads", ["--freeze_backbone", "--learning_rate", "3e-2"], "eval_score_rmse"),
    ("lora", ["--use_peft"], "eval_score_spearman")])
def test_early_stopping_stops_when_the_metric_stops_improving_and_keeps_the_best(scorer_demo, tmp_path, capsys, mode,
                                                                                 flags, metric):
    """Heads only on a frozen backbone (through the feature cache: saves hold the heads) and LoRA (adapters and
    heads): the final save is the best checkpoint's, by a metric where lower (RMSE) or higher (Spearman) is better."""
    out = tmp_path / "o"
    trainer = train_scorer.main(scorer_args(
        scorer_demo, out, "--eval_shards", scorer_demo[2], "--per_device_eval_batch_size", "16", "--max_steps", "30",
        "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--eval_strategy",
        "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--early_stopping_patience",
        "2", "--load_best_model_at_end", "--metric_for_best_model", metric, *flags))
    history = trainer.state.log_history
    evals = {h["step"]: h[metric] for h in history[:next(i for i, h in enumerate(history) if "train_loss" in h)]
             if metric in h}
    best = (min if metric.endswith("rmse") else max)(evals, key=evals.get)
    assert trainer.state.global_step == best + 2 * 2 < 30 and max(evals) == best + 4, evals
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{best}")
    final, kept, last = (safetensors.torch.load_file(os.path.join(d, "model.safetensors"))
                         for d in (out, out / f"checkpoint-{best}", out / f"checkpoint-{best + 4}"))
    if mode == "heads":
        assert sorted(final) == ["score_head.bias", "score_head.weight", "type_head.bias", "type_head.weight"]
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in kept)
    assert not all(torch.equal(final[k], last[k]) for k in last)
    assert trainer.metrics[metric] == pytest.approx(evals[best], rel=1e-6)  # the final evaluation is the best's
    summary = capsys.readouterr().out
    assert (f"stopped early at step {best + 4} of 30 planned ({metric}: no improvement in 2 evaluations); final "
            f"weights from the best checkpoint, checkpoint-{best} ({metric} {evals[best]:.4g})\n") in summary


@pytest.mark.parametrize("metric, given, greater", [
    ("eval_score_spearman", [], True), ("eval_score_pearson", [], True), ("eval_score_mae", [], False),
    ("score_rmse", [], False), ("eval_loss_type", [], False), ("eval_type_macro_f1", [], True),
    ("eval_type_roc_auc", [], True), ("eval_type_ece", [], False),
    ("eval_score_mae", ["--greater_is_better", "true"], True)])
def test_whether_higher_is_better_follows_the_metric(scorer_demo, metric, given, greater):
    from transformers import HfArgumentParser

    from plumbing import parse_arguments

    model_args, data_args, lora_args, args = parse_arguments(HfArgumentParser(train_scorer.ARGUMENTS), [
        "--model_name_or_path", scorer_demo[0], "--train_shards", "t.tar", "--eval_shards", "e.tar", "--num_types",
        "3", "--eval_strategy", "steps",
        "--metric_for_best_model", metric, *given])
    train_scorer.settle_flags(model_args, data_args, lora_args, args)
    assert args.greater_is_better is greater
    # every metric the evaluation logs can be chosen
    rows = [{"heads": {"score": float(i), "type": [0.0, float(i), 1.0]}, "labels": {"score": i % 2, "type": i % 3}}
            for i in range(4)]
    logged = scorer_metrics(rows, {"score": 1.0, "type": 1.0})[0].keys() - {"eval_samples"}
    assert logged == train_scorer.eval_metric_directions().keys()


@pytest.mark.parametrize("flags, message", [
    (["--eval_shards", "EVAL", "--metric_for_best_model", "eval_score_r2"],
     "--metric_for_best_model eval_score_r2: not a metric of this script's evaluation; one of: eval_loss, "
     "eval_loss_score, eval_score_mae, eval_score_rmse, eval_score_pearson, eval_score_spearman, eval_loss_type, "
     "eval_type_accuracy, eval_type_macro_f1, eval_type_roc_auc, eval_type_ece"),
    ([], "--eval_strategy steps needs --eval_shards")])
def test_early_stopping_on_an_unknown_metric_or_without_evaluation_data_exits_2(scorer_demo, tmp_path, capsys, flags,
                                                                                message):
    flags = [scorer_demo[2] if f == "EVAL" else f for f in flags]
    line = exit_2_line(capsys, train_scorer.main, scorer_args(
        scorer_demo, tmp_path / "o", "--eval_strategy", "steps", "--early_stopping_patience", "2", *flags))
    assert line == f"error: {message}"


def test_lora_trains_adapters_and_heads_composes_with_freeze_vision_and_merges(scorer_demo, tmp_path, capsys):
    """Adapters in the language model and, named, in the vision tower (frozen by --freeze_vision); the base never
    changes; the save holds heads + adapters; the merged folder is a plain full scorer with the same outputs."""
    out = tmp_path / "out"
    trainer = train_scorer.main(scorer_args(scorer_demo, out, "--use_peft", "--freeze_vision", "--lora_target_modules",
                                          "q_proj", "v_proj", "qkv", "--max_steps", "3", "--learning_rate", "1e-2",
                                          "--warmup_steps", "0", "--eval_shards", scorer_demo[2], "--do_predict"))
    assert "(lora-llm+heads)" in capsys.readouterr().out
    saved = safetensors.torch.load_file(out / "model.safetensors")
    heads = {"score_head.bias", "score_head.weight", "type_head.bias", "type_head.weight"}
    adapters = {k for k in saved if ".lora_A." in k or ".lora_B." in k}
    assert set(saved) == heads | adapters
    vision = {k for k in adapters if ".visual." in k}
    assert vision and {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in adapters} == {"q_proj", "v_proj", "qkv"}
    transformers.set_seed(1)  # as the run did before loading: the same fresh adapters
    fresh = load_scorer(ModelArguments(model_name_or_path=scorer_demo[0], num_types=3), torch.float32,
                        train_scorer.LoraArguments(use_peft=True, lora_target_modules=["q_proj", "v_proj", "qkv"]))
    for k in adapters:  # lora_B starts at zero: the LLM's moved, the frozen vision tower's did not
        if ".lora_B." in k:
            assert torch.equal(saved[k], torch.zeros_like(saved[k])) == (k in vision), k
    assert all(torch.equal(saved[k], fresh.state_dict()[k]) for k in vision)
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["scorer_base_model"] == os.path.abspath(scorer_demo[0]) and config["scorer_lora"]["r"] == 16

    # the merged scorer: every base weight that had no adapter is exactly the checkpoint's
    base = safetensors.torch.load_file(os.path.join(scorer_demo[0], "model.safetensors"))
    train_scorer.main(["--model_name_or_path", str(out), "--use_peft", "--merge_lora", "--output_dir", str(out),
                       "--predict_shards", scorer_demo[2], "--do_predict", "--use_cpu", "--min_pixels", "1024",
                       "--max_pixels", "4096", "--dataloader_num_workers", "0",
                       "--predict_output", str(tmp_path / "lora.jsonl")])
    merged = Qwen3VLScorer.from_pretrained(str(out / "merged"))
    assert merged.config.scorer_base_model is None and merged.config.scorer_lora is None
    for name, value in merged.model.state_dict().items():
        if not name.endswith(("q_proj.weight", "v_proj.weight", "qkv.weight")):
            assert torch.equal(value, base[f"model.{name}"]), name
    train_scorer.main(["--model_name_or_path", str(out / "merged"), "--predict_shards", scorer_demo[2],
                       "--do_predict", "--output_dir", str(tmp_path / "p"), "--use_cpu", "--min_pixels", "1024",
                       "--max_pixels", "4096", "--dataloader_num_workers", "0"])
    same_predictions(read_jsonl(tmp_path / "p" / "predictions.jsonl"), read_jsonl(tmp_path / "lora.jsonl"))
    same_predictions(read_jsonl(tmp_path / "lora.jsonl"), read_jsonl(out / "predictions.jsonl"))

    # training on from a LoRA save needs --use_peft (its adapters train on)
    err = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, tmp_path / "o")[2:] + [
        "--model_name_or_path", str(out), "--max_steps", "1"])
    assert err == f"error: {out}: a LoRA scorer (adapters + heads); train it further with --use_peft"
    assert trainer.model.config.scorer_trains == "lora-llm+heads"
    further = train_scorer.main(scorer_args(scorer_demo, tmp_path / "further", "--max_steps", "2", "--use_peft",
                                          "--learning_rate", "1e-2", "--warmup_steps", "0")[2:]
                                + ["--model_name_or_path", str(out)])
    again = further.model.state_dict()
    llm = [k for k in adapters if k not in vision]
    assert all(not torch.equal(again[k], saved[k]) for k in llm if ".lora_B." in k)  # the same adapters, trained on
    assert further.model.config.scorer_base_model == os.path.abspath(scorer_demo[0])  # still the original base


def test_lora_and_frozen_backbone_exit_2(scorer_demo, tmp_path, capsys):
    err = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, tmp_path, "--use_peft", "--freeze_backbone"))
    assert err == "error: --use_peft trains adapters in the backbone, --freeze_backbone only the heads: choose one"


# --- plain files: --predict_file, and predict() from Python ------------------------------------------------------

def write_manifest(folder, items):
    """A JSON Lines manifest, a line per item: a sample (demo.vl_sample dict) as its json's fields, `images` (each
    image in a file of its own under folder/images/KEY/) and `key`, or a line as written. Returns its path."""
    lines = []
    for s in items:
        if isinstance(s, str):
            lines.append(s)
            continue
        paths = []
        for member in sorted((k for k in s if IMAGE_MEMBER.match(k)), key=lambda k: int(k.split(".")[0])):
            path = folder / "images" / s["__key__"] / member
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s[member])
            paths.append(str(path.relative_to(folder)))
        lines.append(json.dumps({**json.loads(s["json"]), "images": paths, "key": s["__key__"]}))
    manifest = folder / "items.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def shards_of(manifest, folder):
    """make_shards.py's prediction shards of `manifest` (3 rows a shard): its result (pattern, bad-row lines)."""
    return make_shards.main(["--manifest", str(manifest), "--output_dir", str(folder), "--prefix", "test",
                             "--with_labels", "false", "--samples_per_shard", "3", "--min_pixels", "1024",
                             "--max_pixels", "4096", "--disable_tqdm", "true"])


PREDICT_FLAGS = ["--use_cpu", "--min_pixels", "1024", "--max_pixels", "4096", "--dataloader_num_workers", "0",
                 "--per_device_eval_batch_size", "3", "--report_to", "none", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def saved_scorers(scorer_demo, vl_processor, tmp_path_factory):
    """One scorer saved whole and heads-only (on the demo base), each folder with its processor."""
    folder, saved = tmp_path_factory.mktemp("saved"), {}
    for name, flags in (("full", {}), ("heads", {"freeze_backbone": True})):
        scorer(scorer_demo, **flags).save_pretrained(folder / name)
        vl_processor.save_pretrained(folder / name)
        saved[name] = str(folder / name)
    return saved


def stable(text):
    return re.sub(r"at 0x[0-9a-f]+", "at ADDRESS", text)  # PIL names a buffer's address


def test_predict_file_predicts_as_its_shards_and_counts_bad_rows_in_make_shards_words(
        scorer_demo, saved_scorers, vl_processor, tmp_path, capsys):
    """--predict_file (alone: no shards, no --do_predict) writes the predictions --predict_shards writes for the
    shards make_shards.py makes of the same manifest, in manifest order; its bad rows are bad samples named as
    make_shards.py names them, and so is the first one with --on_bad_sample error; a CSV of the good rows, without
    labels, gives the same predictions. predict() from Python gives the predictions file's rows for a full and a
    heads-only save, images as paths or PIL images."""
    from PIL import Image

    from data import ManifestSource, ShardStream

    samples = demo.make_vl_samples(5, seed=12, prefix="it") + [
        demo.vl_sample("text", {"prompt": "No picture at all."}, [])]
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    bad_lines = ['{"prompt": "x",', json.dumps({"prompt": "p", "images": ["images/nope.jpg"]}),
                 json.dumps({"prompt": "p", "images": ["broken.jpg"]}), json.dumps({"prompt": 5}),
                 json.dumps({"prompt": "p", "key": "it00001"})]
    manifest = write_manifest(tmp_path, samples[:3] + bad_lines[:3] + samples[3:] + bad_lines[3:])
    made = shards_of(manifest, tmp_path / "shards")
    keys = [s["__key__"] for s in samples]
    assert made["samples"] == 6 and [line.split(": ")[1] for line in made["bad"]] == [
        "line 4", "line 5", "line 6", "line 10", "line 11"]

    # the stream over the manifest: the good rows' keys in order, each bad row in make_shards.py's words
    stream = ManifestSource.from_file(str(manifest)).attach(ShardStream(
        [str(manifest)], VLEncoder(vl_processor, None, False, 1024, 4096, 8192), 4, vl_processor.tokenizer.pad_token_id))
    batches = list(stream)
    assert [k for b in batches for k in b.get("keys", [])] == keys
    assert [stable(str(bad)) for b in batches for bad in b["bad_samples"]] == [stable(line) for line in made["bad"]]

    def predictions(model, *flags):
        path = tmp_path / f"{len(list(tmp_path.glob('*.out.jsonl')))}.out.jsonl"
        trainer = train_scorer.main(["--model_name_or_path", model, "--output_dir", str(tmp_path / "o"),
                                     "--predict_output", str(path), *PREDICT_FLAGS, *flags])
        return read_jsonl(path), trainer.metrics

    from_shards, _ = predictions(saved_scorers["heads"], "--predict_shards", made["pattern"], "--do_predict")
    from_file, metrics = predictions(saved_scorers["heads"], "--predict_file", str(manifest))
    assert [p["key"] for p in from_file] == keys
    same_predictions(from_file, from_shards)
    assert metrics["predict_samples"] == 6 and metrics["predict_bad_samples"] == 5
    err = exit_2_line(capsys, train_scorer.main, ["--model_name_or_path", saved_scorers["heads"], "--output_dir",
                                                  str(tmp_path / "o"), "--predict_file", str(manifest),
                                                  "--on_bad_sample", "error", *PREDICT_FLAGS])
    assert err == f"error: {made['bad'][0]}" == f"error: {manifest}: line 4: malformed JSON: Expecting property " \
                                                   f"name enclosed in double quotes"

    # the good rows as a CSV without labels: the same predictions
    rows = [json.loads(line) for i, line in enumerate(manifest.read_text().splitlines(), 1)
            if i not in (4, 5, 6, 10, 11)]
    with open(tmp_path / "items.csv", "w", newline="") as f:
        csv.writer(f).writerows([["key", "prompt", "images"]] + [[r["key"], r["prompt"], ";".join(r["images"])]
                                                                 for r in rows])
    same_predictions(predictions(saved_scorers["heads"], "--predict_file", str(tmp_path / "items.csv"))[0], from_file)

    # from Python: the same rows, one of them with its images as PIL images
    rows[1]["images"] = [Image.open(tmp_path / p) for p in rows[1]["images"]]
    for save in ("full", "heads"):
        served = train_scorer.predict(saved_scorers[save], rows, batch_size=4, image_root=str(tmp_path),
                                      min_pixels=1024, max_pixels=4096)
        same_predictions(served, from_file if save == "heads" else predictions(saved_scorers["full"], "--predict_file",
                                                                               str(manifest))[0])
    with pytest.raises(DataError, match=r"^rows: row 1: .*/images/nope\.jpg: no such image file$"):
        train_scorer.predict(saved_scorers["full"], [rows[0], json.loads(bad_lines[1])], image_root=str(tmp_path),
                             min_pixels=1024, max_pixels=4096)


@pytest.mark.parametrize("flags, message", [
    (["--predict_file", "items.jsonl", "--predict_shards", "x.tar"],
     "--predict_file and --predict_shards: one predictions file holds one set of items, give one of them"),
    (["--image_root", "photos", "--predict_shards", "x.tar", "--do_predict"],
     "--image_root is where the image paths of --predict_file start: it needs --predict_file"),
    (["--predict_file", "nothing.jsonl"], "nothing.jsonl: cannot read (No such file or directory)"),
])
def test_predict_file_contradictions_exit_2(scorer_demo, tmp_path, capsys, flags, message):
    err = exit_2_line(capsys, train_scorer.main, ["--model_name_or_path", scorer_demo[0], "--num_types", "3",
                                                  "--allow_untrained_heads", "--output_dir", str(tmp_path / "o"),
                                                  "--use_cpu", *flags])
    assert err == f"error: {message}"


# --- as users run it: bash run.sh with 2 CPU processes (gloo) --------------------------------------------------

TWO = {"NPROC_PER_NODE": "2"}


def check_logs_add_up(out, score_weight=1.0, type_weight=1.0):
    """Each training log's loss (the Trainer's mean over the window and the ranks) must be the weighted sum of the
    logged head losses: it is not if those were one rank's, or one step's."""
    logs = [h for h in log_history(out) if "loss_score" in h]
    assert logs
    for h in logs:
        assert h["loss"] == pytest.approx(score_weight * h["loss_score"] + type_weight * h["loss_type"], rel=1e-4)
    return logs


def test_tensorboard_and_the_curves_get_the_per_head_losses_and_the_eval_metrics(scorer_demo, tmp_path):
    """--report_to tensorboard receives what training_curves.png draws: the loss, each head's loss, the learning rate
    and every evaluation metric, at the logged steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    train_scorer.main(scorer_args(scorer_demo, out, "--max_steps", "4", "--logging_steps", "2", "--eval_strategy",
                                "steps", "--eval_steps", "4", "--eval_shards", scorer_demo[2], "--report_to",
                                "tensorboard"))
    (run,) = (out / "runs").iterdir()  # the Trainer's default: OUTPUT_DIR/runs/DATE_HOST
    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_score", "train/loss_type", "train/learning_rate", "eval/loss_score",
                "eval/score_pearson", "eval/type_accuracy", "eval/type_roc_auc"):
        assert tag in tags, sorted(tags)
    history = {h["step"]: h for h in log_history(out) if "loss_score" in h}
    assert [(e.step, e.value) for e in events.Scalars("train/loss_score")] == [
        (step, pytest.approx(h["loss_score"], rel=1e-6)) for step, h in sorted(history.items())]
    assert (out / "training_curves.png").is_file()
    # and next to it the picture of the final evaluation, whose calibration error is one more metric
    with Image.open(out / "eval_report.png") as picture:
        assert picture.format == "PNG" and picture.size == (1000, 840)  # a row of two panels per label
    assert "eval/type_ece" in tags
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    assert 0 <= results["eval_type_ece"] <= 1 and sum(results["eval_type_reliability"]["count"]) == 48
    with open(out / "all_results.json") as f:
        assert json.load(f)["eval_type_ece"] == results["eval_type_ece"]


def test_two_processes_uneven_shards_text_only_batches_exact_eval_and_predict(scorer_demo, tmp_path):
    """Rank 0 and rank 1 train on different shards, one of them text-only (so one rank's vision tower gets no real
    gradient); eval shards of very different sizes; prediction of a manifest (--predict_file: one "shard" for 4
    slots, ranks x workers), one bad row counted, the same predictions as one process gives for its shards. Process
    0 alone shows progress bars of its share of the evaluation (shards 0, 1 and 4: 8 samples) and of the prediction
    (rows 0, 1, 4 and 5 of 6)."""
    texts = [demo.vl_sample(f"txt{i}", {"prompt": f"Please rate text {i}.", "score": float(i), "type": i % 3}, [])
             for i in range(3)]
    images = demo.make_vl_samples(7, seed=5, prefix="img")
    broken = [dict(images[0], __key__="broken0", **{"0.jpg": b"not an image"}),
              dict(images[1], __key__="broken1", json=b'{"prompt": "p", "score": 1.0, "type": 9}')]
    demo.write_shard(tmp_path / "train-text.tar", texts)
    demo.write_shard(tmp_path / "train-images.tar", images[:3] + broken + images[3:])
    evals = demo.make_vl_samples(16, seed=6, prefix="ev")
    demo.write_shards(tmp_path, "eval", evals, [4, 1, 6, 2, 3])
    preds = demo.make_vl_samples(5, seed=7, prefix="pr")
    (tmp_path / "predict").mkdir()
    manifest = write_manifest(tmp_path / "predict", preds + [json.dumps({"prompt": "p", "images": ["nope.jpg"]})])
    out = tmp_path / "out"
    result = run_cli([
        "bash", "run.sh", "train_scorer.py", "--model_name_or_path", scorer_demo[0], "--num_types", "3",
        "--train_shards", f"{tmp_path}/train-*.tar", "--eval_shards", f"{tmp_path}/eval-{{000000..000004}}.tar",
        "--predict_file", str(manifest), "--output_dir", str(out),
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "2", "--max_steps", "8",
        "--logging_steps", "2", "--learning_rate", "1e-3", "--min_pixels", "1024", "--max_pixels", "4096",
        "--dataloader_num_workers", "2", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "false"],
        env=TWO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    bars = [line for line in result.stderr.replace("\r", "\n").splitlines() if "(process 0)" in line]
    assert [b.split(":")[0] for b in bars if " 0/" in b] == ["evaluation (process 0)", "prediction (process 0)"]
    assert any("| 8/8 [" in b for b in bars) and any("| 4/4 [" in b for b in bars), bars
    assert "an epoch is 12 samples = 6 steps of 2 x 1 x 1" in result.stdout
    assert "bad samples skipped 2 (per rank [" in result.stdout
    with open(out / "all_results.json") as f:
        results = json.load(f)
    assert results["train_bad_samples"] == 2
    assert results["eval_samples"] == 16 and results["eval_bad_samples"] == 0
    assert results["predict_samples"] == 5 and results["predict_bad_samples"] == 1
    with open(out / "eval_results.json") as f:
        assert json.load(f)["eval_samples"] == 16
    assert (out / "eval_report.png").is_file()  # drawn by process 0 from every rank's samples
    keys = [p["key"] for p in read_jsonl(out / "predictions.jsonl")]
    assert keys == [s["__key__"] for s in preds]  # each once, in manifest order
    check_logs_add_up(out)
    made = shards_of(manifest, tmp_path / "shards")
    train_scorer.main(["--model_name_or_path", str(out), "--predict_shards", made["pattern"], "--do_predict",
                       "--output_dir", str(tmp_path / "one"), *PREDICT_FLAGS])
    same_predictions(read_jsonl(out / "predictions.jsonl"), read_jsonl(tmp_path / "one" / "predictions.jsonl"))


@pytest.mark.parametrize("phase", ["train", "eval"])
def test_two_processes_bad_sample_error_exits_2_with_one_line(scorer_demo, tmp_path, phase):
    """The bad sample sits in one rank's share: that rank alone meets it, yet the run ends cleanly everywhere."""
    samples = demo.make_vl_samples(6, seed=8, prefix="ok")
    samples[3]["json"] = b'{"prompt": "p", "score": 1.0}'
    demo.write_shard(tmp_path / "data-000000.tar", demo.make_vl_samples(6, seed=9, prefix="fine"))
    shard = demo.write_shard(tmp_path / "data-000001.tar", samples)
    result = run_cli(["bash", "run.sh", "train_scorer.py", "--model_name_or_path", scorer_demo[0], "--num_types",
                      "3", f"--{phase}_shards", f"{tmp_path}/data-*.tar", "--on_bad_sample", "error",
                      "--output_dir", str(tmp_path / "o"), "--max_steps", "6", "--logging_steps", "2",
                      "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true",
                      "--min_pixels", "1024", "--max_pixels", "4096", "--dataloader_num_workers", "0", "--use_cpu"],
                     env=TWO, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {shard}: ok00003: json: missing field 'type'" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr and result.stderr.count("error: ") == 1, result.stderr[-3000:]


# --- forking: a new label field, exactly as the README's "Forking" section says ------------------------------------

NEW_LABELS_LINE = 'LABELS = {"score": "value", "type": "class", "aesthetic": "value"}'
NEW_WEIGHT_FIELD = ('    aesthetic_weight: float = field(default=0.5, metadata={"help": "Weight of the aesthetic '
                    'loss."})')


def test_forking_recipe_adds_a_label_field(scorer_demo, tmp_path):
    """The README's recipe for a new label: one line in collate.LABELS (+ an optional weight flag). A copy of the
    project edited exactly so trains a head on the new field, logs its loss, evaluates it and predicts it."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert NEW_LABELS_LINE in readme and NEW_WEIGHT_FIELD in readme
    fork = tmp_path / "fork"
    shutil.copytree(ROOT, fork, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "bench", "__pycache__"))
    collate_py, script = fork / "collate.py", fork / "train_scorer.py"
    collate_py.write_text(re.sub(r"^LABELS = .*$", NEW_LABELS_LINE, collate_py.read_text(), count=1, flags=re.M))
    anchor = re.search(r"^    type_weight: .*\n", script.read_text(), flags=re.M).group(0)
    script.write_text(script.read_text().replace(anchor, anchor + NEW_WEIGHT_FIELD + "\n"))

    samples = demo.make_vl_samples(12, seed=3)
    for i, s in enumerate(samples):  # the new field: here a copy of the score, halved
        s["json"] = json.dumps({**json.loads(s["json"]), "aesthetic": i / 2}).encode()
    shard = demo.write_shard(tmp_path / "aesthetic.tar", samples)
    old = demo.write_shard(tmp_path / "old.tar", demo.make_vl_samples(1, seed=4, prefix="old"))  # without the field
    out = tmp_path / "out"
    result = run_cli([sys.executable, str(script), "--model_name_or_path", scorer_demo[0], "--num_types", "3",
                      "--train_shards", shard, "--eval_shards", f"{shard},{old}", "--predict_shards", shard,
                      "--do_predict", "--output_dir", str(out),
                      "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
                      "--min_pixels", "1024", "--max_pixels", "4096", "--dataloader_num_workers", "0", "--use_cpu",
                      "--save_strategy", "no", "--disable_tqdm", "true"])
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [h for h in log_history(out) if "loss_aesthetic" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["loss"] == pytest.approx(h["loss_score"] + h["loss_type"] + 0.5 * h["loss_aesthetic"], rel=1e-4)
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    assert {"eval_loss_aesthetic", "eval_aesthetic_mae", "eval_aesthetic_pearson"} <= set(results)
    with Image.open(out / "eval_report.png") as picture:
        assert picture.size == (1000, 1260)  # a row of panels for the new label too
    assert results["eval_samples"] == 12 and results["eval_bad_samples"] == 1  # the sample without the field
    assert "aesthetic_head.weight" in safetensors.torch.load_file(out / "model.safetensors")
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 12 and all(isinstance(p["aesthetic"], float) for p in predictions)


def test_fsdp_rank0_loading_exits_2(scorer_demo, tmp_path, capsys):
    """accelerate's cpu_ram_efficient_loading broadcasts rank 0's tensors whole into the sharded model; the scorer's
    heads are sharded before it (their own fp32 unit), so rank 0 would send a shard where the others wait for a whole
    tensor (under 2 gloo processes: a size mismatch in load_state_dict; on NCCL, a mismatched broadcast)."""
    config = tmp_path / "recipe.json"  # as the FSDP2 recipe sets it
    config.write_text(json.dumps({"model_name_or_path": scorer_demo[0], "train_shards": scorer_demo[1], "num_types": 3,
                                  "output_dir": str(tmp_path / "o"), "use_cpu": True, "report_to": "none",
                                  "fsdp": True, "fsdp_config": {"cpu_ram_efficient_loading": True}}))
    err = exit_2_line(capsys, train_scorer.main, [str(config)])
    assert err.startswith("error: --fsdp with cpu_ram_efficient_loading: ") and "leave the option out" in err, err


# --- targets: standardized scores, class weights, the ranking loss ------------------------------------------------

def relabelled_shard(path, samples, score=None, type_=None):
    """`samples` written to one shard with their json labels changed by `score(old)` and `type_(old)`."""
    for s in samples:
        record = json.loads(s["json"])
        record["score"] = score(record["score"]) if score else record["score"]
        record["type"] = type_(record["type"]) if type_ else record["type"]
        s["json"] = json.dumps(record).encode()
    return demo.write_shard(path, samples)


def eval_results(out):
    with open(out / "eval_results.json") as f:
        return json.load(f)


HEADS_ONLY = ["--freeze_backbone", "--feature_cache", "none", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
              "--per_device_eval_batch_size", "16"]


class TestTargets:
    def test_rank_loss_literal(self):
        """Pairs with target_i > target_j: (2, 0) and (2, 1); the tie (0, 1) is left out."""
        predicted, target = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 2.0])
        expected = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-2.0))) / 2
        assert train_scorer.rank_loss(predicted, target).item() == pytest.approx(expected, rel=1e-6)
        flat = torch.tensor([0.5, 2.0], requires_grad=True)
        loss = train_scorer.rank_loss(flat, torch.tensor([4.0, 4.0]))  # no pair: 0, and still a graph
        loss.backward()
        assert loss.item() == 0.0 and flat.grad.tolist() == [0.0, 0.0]

    def test_weighted_eval_loss_and_standardized_mse(self):
        rows = [{"heads": {"score": p, "type": [0.0, math.log(3.0)]}, "labels": {"score": y, "type": k}}
                for p, y, k in ((12.0, 10.0, 0), (10.0, 10.0, 1), (7.0, 10.0, 1))]
        m, _ = scorer_metrics(rows, {"score": 1.0, "type": 1.0}, std={"score": 2.0}, class_weights={"type": [4.0, 1.0]})
        assert m["eval_loss_score"] == pytest.approx((4 + 0 + 9) / 3 / 4)  # the MSE of the standardized values
        assert m["eval_score_rmse"] == pytest.approx(math.sqrt(13 / 3))  # in the labels' units
        nll = [math.log(4.0), math.log(4 / 3), math.log(4 / 3)]  # softmax of (0, log 3): 1/4, 3/4
        assert m["eval_loss_type"] == pytest.approx((4 * nll[0] + nll[1] + nll[2]) / 6)

    def test_an_untrained_head_predicts_the_label_mean_in_the_labels_units(self, scorer_demo, vl_processor, tmp_path):
        samples = demo.make_vl_samples(6, seed=5)
        shard = relabelled_shard(tmp_path / "t.tar", samples, score=lambda s: 100 * s + 1000)
        labels = [json.loads(s["json"])["score"] for s in samples]
        model = scorer(scorer_demo)
        line = train_scorer.settle_targets(model, ModelArguments(model_name_or_path=scorer_demo[0], num_types=3),
                                           {"type": 3}, [shard], 0)
        mean, std = np.mean(labels), np.std(labels)
        assert model.config.scorer_targets == {"score": [pytest.approx(mean), pytest.approx(std)]}
        assert line.startswith("targets: score standardized with mean ") and "over 6 training samples" in line
        encoder = VLEncoder(vl_processor, {"type": 3}, True, 1024, 4096, 8192)
        batch = collate_vl([encoder(s) for s in samples[:3]], vl_processor.tokenizer.pad_token_id)
        with torch.no_grad():
            scores = model(**backbone_inputs(batch)).heads["score"]
        assert scores.tolist() == pytest.approx([mean] * 3, rel=1e-6)

    def test_labels_on_another_scale_train_to_the_same_pearson(self, scorer_demo, tmp_path):
        """score -> 100 x score + 1000: standardized, the head sees the same targets, so the run ends where the
        original's does; metrics and predictions come in the new units (RMSE x 100)."""
        results = {}
        for name, change in (("original", None), ("scaled", lambda s: 100 * s + 1000)):
            train = relabelled_shard(tmp_path / f"{name}-train.tar", demo.make_vl_samples(64, seed=7), score=change)
            evals = relabelled_shard(tmp_path / f"{name}-eval.tar", demo.make_vl_samples(32, seed=8), score=change)
            out = tmp_path / name
            train_scorer.main(scorer_args(scorer_demo, out, "--eval_shards", evals, "--max_steps", "40",
                                          "--learning_rate", "3e-2", "--do_predict", "--seed", "3", *HEADS_ONLY,
                                          train=train))
            results[name] = eval_results(out)
            results[name]["predictions"] = [p["score"] for p in read_jsonl(out / "predictions.jsonl")]
        original, scaled = results["original"], results["scaled"]
        assert original["eval_score_pearson"] > 0.5, original
        assert scaled["eval_score_pearson"] == pytest.approx(original["eval_score_pearson"], abs=0.02)
        assert scaled["eval_score_rmse"] == pytest.approx(100 * original["eval_score_rmse"], rel=0.02)
        assert scaled["predictions"] == pytest.approx([100 * p + 1000 for p in original["predictions"]], rel=1e-3)

    def test_balanced_class_weights_raise_the_minority_recall(self, scorer_demo, tmp_path, capsys):
        """type: 90 samples of class 0, 10 of class 1; the evaluation has as many of each."""
        pool = demo.make_vl_samples(200, seed=11, num_types=2)
        kind = [json.loads(s["json"])["type"] for s in pool]
        train = [s for s, k in zip(pool, kind) if k == 0][:90] + [s for s, k in zip(pool, kind) if k == 1][:10]
        evals = [s for s, k in zip(pool, kind) if k == 0][90:110] + [s for s, k in zip(pool, kind) if k == 1][10:30]
        train_shard, eval_shard = demo.write_shard(tmp_path / "t.tar", train), demo.write_shard(tmp_path / "e.tar", evals)
        recall = {}
        for weights in ("none", "balanced"):
            out = tmp_path / weights
            capsys.readouterr()
            train_scorer.main(scorer_args(scorer_demo, out, "--num_types", "2", "--eval_shards", eval_shard,
                                          "--max_steps", "12", "--learning_rate", "1e-2", "--type_class_weights",
                                          weights, *HEADS_ONLY, train=train_shard))
            matrix = eval_results(out)["eval_type_confusion_matrix"]
            recall[weights] = matrix[1][1] / sum(matrix[1])
            if weights == "balanced":  # n / (classes x count): 100 / (2 x 90), 100 / (2 x 10)
                assert "type class weights [0.5556, 5.0] (balanced, from counts [90, 10])" in capsys.readouterr().out
        assert recall["balanced"] > recall["none"], recall

    def test_the_rank_loss_alone_raises_spearman(self, scorer_demo, tmp_path):
        out = tmp_path / "out"
        train_scorer.main(scorer_args(scorer_demo, out, "--eval_shards", scorer_demo[2], "--max_steps", "30",
                                      "--learning_rate", "3e-2", "--score_weight", "0", "--type_weight", "0",
                                      "--rank_weight", "1", "--eval_strategy", "steps", "--eval_steps", "30",
                                      "--eval_on_start", "true", *HEADS_ONLY))
        history = log_history(out)
        spearman = [h["eval_score_spearman"] for h in history if "eval_score_spearman" in h]
        assert math.isnan(spearman[0]) and spearman[-1] > 0.5, spearman  # from a constant (zero) head
        for h in (h for h in history if "loss_rank" in h):
            assert h["loss"] == pytest.approx(h["loss_rank"], rel=1e-5), h
        assert len([h for h in history if "loss_rank" in h]) == 30

    @pytest.mark.parametrize("flags, message", [
        (["--score_norm", "minmax"], "--score_norm minmax: choose standardize or none"),
        (["--score_mean", "3"], "--score_mean and --score_std: give both"),
        (["--score_mean", "3", "--score_std", "0"], "need a finite mean and a standard deviation above 0"),
        (["--score_norm", "none", "--score_mean", "3", "--score_std", "1"], "contradict --score_norm none"),
        (["--type_class_weights", "1,x,2"], "--type_class_weights 1,x,2: give none, balanced, or one weight"),
        (["--type_class_weights", "1,0,2"], "one weight above 0 per class"),
        (["--type_class_weights", "1,2"], "--type_class_weights: 2 weights for 3 types (--num_types)"),
        (["--rank_weight", "-1"], "--rank_weight -1.0: give a weight of 0 (off) or more"),
    ])
    def test_bad_target_flags_exit_2(self, scorer_demo, tmp_path, capsys, flags, message):
        err = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, tmp_path / "o", "--max_steps", "1",
                                                                 *flags))
        assert message in err, err

    def test_a_saved_standardization_is_kept_and_guarded(self, scorer_demo, tmp_path, capsys):
        out = tmp_path / "out"
        flags = ["--score_mean", "5", "--score_std", "2", "--save_strategy", "steps", "--save_steps", "1", *HEADS_ONLY]
        train_scorer.main(scorer_args(scorer_demo, out, "--max_steps", "1", *flags))
        with open(out / "config.json") as f:
            assert json.load(f)["scorer_targets"] == {"score": [5.0, 2.0]}
        err = exit_2_line(capsys, train_scorer.main, scorer_args(scorer_demo, out, "--max_steps", "2", *flags,
                                                                 "--score_mean", "6"))  # a resume, other units
        assert err.startswith(f"error: {out / 'checkpoint-1'}: its value heads learned targets standardized as "
                              f"{{'score': [5.0, 2.0]}}"), err
        err = exit_2_line(capsys, train_scorer.main, scorer_args(
            (str(out), *scorer_demo[1:]), tmp_path / "again", "--max_steps", "1", "--score_norm", "none"))
        assert "its score head learned scores standardized with mean 5 and std 2" in err, err
