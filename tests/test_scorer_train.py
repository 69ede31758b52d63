"""train_scorer.main in-process: what trains in each mode, learning, logging, schedule, save/load, resume, eval,
predict, config files, bad input."""

import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import demo
import train_scorer
from train_scorer import Qwen3VLScorer

pytestmark = pytest.mark.usefixtures("one_thread")


def base_args(scorer_demo, out, *extra, train=None):
    return ["--model_name_or_path", scorer_demo[0], "--train_shards", train or scorer_demo[1],
            "--output_dir", str(out), "--num_types", "3", "--min_pixels", "1024", "--max_pixels", "4096",
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "1", "--logging_steps", "1",
            "--save_strategy", "no", "--dataloader_num_workers", "0", "--per_device_train_batch_size", "4", *extra]


def history(out):
    with open(os.path.join(out, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def same_predictions(a, b, rel=1e-5):
    assert [p["key"] for p in a] == [q["key"] for q in b]
    for p, q in zip(a, b):
        assert p["type"] == q["type"], (p, q)
        assert p["score"] == pytest.approx(q["score"], rel=rel) and p["type_probs"] == pytest.approx(q["type_probs"])


GROUPS = {"vision": "model.visual.", "llm": "model.language_model.", "heads": ("score_head.", "type_head.")}


@pytest.mark.parametrize("flags, trained", [
    (["--freeze_backbone"], {"heads"}), (["--freeze_vision"], {"llm", "heads"}), ([], {"vision", "llm", "heads"})])
def test_each_mode_trains_exactly_its_parameters(scorer_demo, tmp_path, flags, trained):
    out = tmp_path / "out"
    trainer = train_scorer.main(base_args(scorer_demo, out, "--max_steps", "3", "--learning_rate", "1e-2",
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
    train_scorer.main(base_args(scorer_demo, out, "--max_steps", "16", "--learning_rate", "1e-2",
                                "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--score_weight", "0.5",
                                "--type_weight", "2", "--logging_steps", "4", train=shard))
    logs = [h for h in history(out) if "loss_score" in h]
    assert [h["step"] for h in logs] == [4, 8, 12, 16]
    for h in logs:  # the Trainer's window-mean loss is the weighted sum of the heads' window means
        assert h["loss"] == pytest.approx(0.5 * h["loss_score"] + 2 * h["loss_type"], rel=1e-5), h
    assert logs[-1]["loss_score"] < 0.3 * logs[0]["loss_score"], logs
    assert logs[-1]["loss_type"] < 0.7 * logs[0]["loss_type"], logs


def test_head_lr_groups_and_cubic_schedule(scorer_demo, tmp_path):
    trainer = train_scorer.main(base_args(scorer_demo, tmp_path / "o", "--max_steps", "8", "--warmup_steps", "2",
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


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_save_load_predict_and_resume(scorer_demo, tmp_path, mode, capsys):
    flags = ["--freeze_backbone", "--learning_rate", "1e-2"] if mode == "frozen" else ["--learning_rate", "2e-3"]
    args = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--eval_shards", scorer_demo[2],
            "--do_predict", "--dataloader_num_workers", "1", *flags]
    straight = tmp_path / "straight"
    trainer = train_scorer.main(base_args(scorer_demo, straight, *args))
    keys = [p["key"] for p in read_jsonl(straight / "predictions.jsonl")]
    assert sorted(keys) == [f"e{i:05d}" for i in range(14)]
    with open(straight / "eval_results.json") as f:
        results = json.load(f)
    assert results["eval_samples"] == 14 and results["eval_bad_samples"] == 0
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
    train_scorer.main(base_args(scorer_demo, resumed, *args))
    shutil.rmtree(resumed / "checkpoint-6")
    os.remove(resumed / "trainer_state.json")
    capsys.readouterr()
    trainer = train_scorer.main(base_args(scorer_demo, resumed, *args))
    assert f"resuming from {resumed / 'checkpoint-3'}" in capsys.readouterr().out
    assert trainer.state.global_step == 6
    a = {h["step"]: h["loss"] for h in history(straight) if "loss" in h}
    b = {h["step"]: h["loss"] for h in history(resumed) if "loss" in h}
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):  # the steps run after the resume see the same batches and weights
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
    same_predictions(read_jsonl(resumed / "predictions.jsonl"), read_jsonl(straight / "predictions.jsonl"))


def test_tensorboard_gets_both_losses(scorer_demo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    train_scorer.main(base_args(scorer_demo, out, "--max_steps", "2", "--report_to", "tensorboard",
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
    record = lambda s, **change: dict(s, json=json.dumps({**json.loads(s["json"]), **change}).encode())  # noqa: E731
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
    trainer = train_scorer.main(base_args(scorer_demo, tmp_path / "o", "--max_steps", "6", "--eval_shards", shard,
                                          "--do_predict", train=shard))
    out = capsys.readouterr().out
    m = trainer.metrics
    assert m["train_bad_samples"] == 6 and m["eval_bad_samples"] == 6 and m["eval_samples"] == 10
    # prediction needs no labels: only the bad image, the missing image and the non-string prompt are bad there
    assert m["predict_bad_samples"] == 3 and m["predict_samples"] == 13
    assert "bad samples skipped 6 (per rank [6])" in out
    assert len(read_jsonl(tmp_path / "o" / "predictions.jsonl")) == 13


@pytest.mark.parametrize("problem", list(bad_samples()))
def test_bad_sample_with_on_bad_sample_error_exits_2(scorer_demo, tmp_path, capsys, problem):
    sample = bad_samples()[problem]
    shard = demo.write_shard(tmp_path / "one-bad.tar", demo.make_vl_samples(2, seed=4, prefix="ok") + [sample])
    with pytest.raises(SystemExit) as exit_info:
        train_scorer.main(base_args(scorer_demo, tmp_path / "o", "--max_steps", "2", "--on_bad_sample", "error",
                                    train=shard))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {shard}: {sample['__key__']}: ") and problem in err, err


@pytest.mark.parametrize("spec, message", [
    (" , ", "--train_shards: empty shard list"),
    ("{d}/nothing-{{000000..000003}}.tar", "--train_shards: {d}/nothing-000000.tar: no such shard file"),
    ("{d}/nothing-*.tar", "--train_shards: {d}/nothing-*.tar: pattern matches no file"),
])
def test_unusable_shard_lists_exit_2(scorer_demo, tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit) as exit_info:
        train_scorer.main(base_args(scorer_demo, tmp_path / "o", train=spec.format(d=tmp_path)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + message.format(d=tmp_path)


def test_resume_refuses_a_checkpoint_of_another_mode(scorer_demo, tmp_path, capsys):
    """A heads-only checkpoint cannot resume a run that trains the language model (nor the other way round): its
    optimizer state covers other parameters."""
    out = tmp_path / "o"
    args = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    train_scorer.main(base_args(scorer_demo, out, *args, "--freeze_backbone"))
    with pytest.raises(SystemExit) as exit_info:
        train_scorer.main(base_args(scorer_demo, out, *args, "--max_steps", "4", "--freeze_vision"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out / 'checkpoint-2'}: saved with scorer_trains = heads, this run has llm+heads")
