"""sft_qwen2.main in-process: learning, every parameter trained, save/load round trip, resume, eval, options."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import demo
import sft_qwen2


def base_args(sft_demo, out, train=None, *extra):
    return ["--model_name_or_path", sft_demo[0], "--train_file", train or sft_demo[1], "--output_dir", str(out),
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--max_len", "256", "--seed", "1",
            "--logging_steps", "1", "--save_strategy", "no", *extra]


def losses(out):
    with open(os.path.join(out, "trainer_state.json")) as f:
        return {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}


def test_learns_a_repeated_batch_and_trains_every_parameter(sft_demo, tmp_path):
    train = demo.write_jsonl(tmp_path / "four.jsonl", demo.make_sft_records(4, seed=5))
    out = tmp_path / "out"
    trainer = sft_qwen2.main(base_args(sft_demo, out, train, "--per_device_train_batch_size", "4",
                                       "--max_steps", "20", "--learning_rate", "1e-2", "--warmup_steps", "0",
                                       "--lr_scheduler_type", "constant"))
    curve = losses(out)
    assert len(curve) == 20 and curve[20] < 0.5 * curve[1], curve
    assert trainer.tokens_trained() == 20 * sum(trainer.train_dataset["length"])  # real tokens, padding excluded

    before = AutoModelForCausalLM.from_pretrained(sft_demo[0]).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out)
    for name, p in saved.state_dict().items():
        assert not torch.equal(p, before[name]), f"{name} did not change"

    # the saved folder is a complete HF checkpoint giving the trained model's logits
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, trainer.model(ids).logits, rtol=0, atol=0)
    assert os.path.isfile(out / "tokenizer_config.json") and os.path.isfile(out / "chat_template.jinja")


def test_resume_reaches_the_same_step_and_loss(sft_demo, tmp_path, capsys):
    args = ["--per_device_train_batch_size", "4", "--max_steps", "8", "--save_strategy", "steps",
            "--save_steps", "4", "--learning_rate", "2e-3"]
    straight = tmp_path / "straight"
    sft_qwen2.main(base_args(sft_demo, straight) + args)

    resumed = tmp_path / "resumed"
    sft_qwen2.main(base_args(sft_demo, resumed) + args)
    # simulate a crash after step 4: only checkpoint-4 survives, then the same command runs again
    import shutil
    shutil.rmtree(resumed / "checkpoint-8")
    os.remove(resumed / "trainer_state.json")
    capsys.readouterr()
    trainer = sft_qwen2.main(base_args(sft_demo, resumed) + args)
    out = capsys.readouterr().out
    assert f"resuming from {resumed / 'checkpoint-4'}" in out
    assert "{'loss'" in out and out.count("{'loss'") == 4  # only steps 5-8 ran again
    assert trainer.state.global_step == 8
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 9))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)
    p, q = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (straight, resumed))
    for name in p:
        torch.testing.assert_close(p[name], q[name], rtol=1e-6, atol=1e-7)


def test_eval_and_load_best_model_at_end(sft_demo, tmp_path):
    trainer = sft_qwen2.main(base_args(sft_demo, tmp_path / "o") + [
        "--eval_file", sft_demo[2], "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "steps",
        "--save_steps", "3", "--load_best_model_at_end", "--metric_for_best_model", "eval_loss"])
    assert trainer.state.best_model_checkpoint is not None
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and trainer.metrics["eval_loss"] == pytest.approx(min(evals[:2]), rel=1e-6)


@pytest.mark.parametrize("extra", [["--padding_free"], ["--train_sampling_strategy", "group_by_length"],
                                   ["--val_size", "0.25"]])
def test_options_train(sft_demo, tmp_path, extra):
    trainer = sft_qwen2.main(base_args(sft_demo, tmp_path / "o") + [
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3"] + extra)
    assert trainer.state.global_step == 4
    if "--val_size" in extra:
        assert len(trainer.eval_dataset) == 24 and len(trainer.train_dataset) == 72
        assert "eval_loss" in trainer.metrics


def test_padding_free_trains_like_padded(sft_demo, tmp_path):
    """Same examples, same order, same optimizer steps: the loss curves of the two batch layouts agree."""
    common = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
              "--train_sampling_strategy", "sequential"]
    sft_qwen2.main(base_args(sft_demo, tmp_path / "padded") + common)
    sft_qwen2.main(base_args(sft_demo, tmp_path / "packed") + common + ["--padding_free"])
    a, b = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4)


def test_config_file(sft_demo, tmp_path):
    import yaml

    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": sft_demo[0], "train_file": [sft_demo[1]], "output_dir": str(tmp_path / "o"),
        "use_cpu": True, "max_steps": 2, "per_device_train_batch_size": 2, "max_len": 128, "report_to": "none",
        "save_strategy": "no", "disable_tqdm": True}))
    trainer = sft_qwen2.main([str(cfg)])
    assert trainer.state.global_step == 2 and trainer.args.per_device_train_batch_size == 2
