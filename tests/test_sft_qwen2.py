"""sft_qwen2.py: learning, every parameter trained, save/load round trip, resume, eval, options (in-process);
bad input exits 2 with one line; run.sh launches 2 CPU processes (as users run it)."""

import json
import os
import shutil
import sys

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

import demo
import sft_qwen2
from conftest import exit_2_line, log_history, run_cli


def base_args(sft_demo, out, train=None, *extra):
    return ["--model_name_or_path", sft_demo[0], "--train_file", train or sft_demo[1], "--output_dir", str(out),
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--max_len", "256", "--seed", "1",
            "--logging_steps", "1", "--save_strategy", "no", *extra]


def losses(out):
    return {h["step"]: h["loss"] for h in log_history(out) if "loss" in h}


def test_learns_a_repeated_batch_and_trains_every_parameter(sft_demo, tmp_path):
    train = demo.write_jsonl(tmp_path / "four.jsonl", demo.make_sft_records(4, seed=5))
    out = tmp_path / "out"
    trainer = sft_qwen2.main(base_args(sft_demo, out, train, "--per_device_train_batch_size", "4",
                                       "--max_steps", "20", "--learning_rate", "1e-2", "--warmup_steps", "0",
                                       "--lr_scheduler_type", "constant"))
    curve = losses(out)
    assert len(curve) == 20 and curve[20] < 0.5 * curve[1], curve
    assert trainer.state.num_input_tokens_seen == 20 * sum(trainer.train_dataset["length"])  # padding excluded

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


def test_eval_and_load_best_model_at_end(sft_demo, tmp_path):
    trainer = sft_qwen2.main(base_args(sft_demo, tmp_path / "o") + [
        "--eval_file", sft_demo[2], "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "steps",
        "--save_steps", "3", "--load_best_model_at_end", "--metric_for_best_model", "eval_loss"])
    assert trainer.state.best_model_checkpoint is not None
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and trainer.metrics["eval_loss"] == pytest.approx(min(evals[:2]), rel=1e-6)


def overfit_args(sft_demo, out, train, *extra):
    """Four training examples at a high constant rate, evaluated on others every 2 steps: the eval loss falls, then
    stops improving as the model learns the four by heart."""
    return base_args(sft_demo, out, train, "--eval_file", sft_demo[2], "--per_device_train_batch_size", "4",
                     "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
                     "--max_steps", "40", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
                     "--save_steps", "2", "--save_total_limit", "2", "--early_stopping_patience", "2",
                     "--load_best_model_at_end", *extra)


def evals_during_training(trainer):
    """{step: eval_loss} of the evaluations during training (not the final one, of the best model)."""
    evals = {}
    for h in trainer.state.log_history:
        if "train_loss" in h:  # the end of training
            break
        if "eval_loss" in h:
            evals[h["step"]] = h["eval_loss"]
    return evals


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_early_stopping_stops_when_the_eval_loss_stops_improving_and_keeps_the_best(sft_demo, tmp_path, mode,
                                                                                     capsys):
    train = demo.write_jsonl(tmp_path / "four.jsonl", demo.make_sft_records(4, seed=5))
    out = tmp_path / "o"
    lora = ["--use_peft", "--learning_rate", "3e-2"] if mode == "lora" else []
    trainer = sft_qwen2.main(overfit_args(sft_demo, out, train, *lora))
    evals = evals_during_training(trainer)
    best = min(evals, key=evals.get)
    # stopped at the second evaluation after the best (patience 2), long before --max_steps 40
    assert trainer.state.global_step == best + 2 * 2 < 40 and max(evals) == best + 4, evals
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{best}")
    # rotation (--save_total_limit 2) kept the best checkpoint and deleted the newer checkpoint-{best + 2}; the final
    # save holds the best checkpoint's weights, not the last step's
    kept_folders = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept_folders == sorted([f"checkpoint-{best}", f"checkpoint-{best + 4}"])
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    final, kept, last = (safetensors.torch.load_file(os.path.join(d, weights))
                         for d in (out, out / f"checkpoint-{best}", out / f"checkpoint-{best + 4}"))
    assert all(torch.equal(final[k], kept[k]) for k in kept) and final.keys() == kept.keys()
    assert not all(torch.equal(final[k], last[k]) for k in last)
    assert trainer.metrics["eval_loss"] == pytest.approx(evals[best], rel=1e-6)  # the final evaluation is the best's
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.endswith(f"stopped early at step {best + 4} of 40 planned (eval_loss: no improvement in 2 "
                            f"evaluations); final weights from the best checkpoint, checkpoint-{best} (eval_loss "
                            f"{evals[best]:.4g})"), summary


def test_a_resumed_run_keeps_its_early_stopping_count(sft_demo, tmp_path):
    """Interrupted between the best evaluation and the stop, the run resumes with its count of evaluations without
    improvement (transformers alone would start it from 0 again) and stops where the uninterrupted run stopped; the
    resumed run's --eval_on_start evaluation, of weights already evaluated at that step, is not counted twice."""
    train = demo.write_jsonl(tmp_path / "four.jsonl", demo.make_sft_records(4, seed=5))
    straight = sft_qwen2.main(overfit_args(sft_demo, tmp_path / "straight", train, "--eval_on_start", "true"))
    evals = evals_during_training(straight)
    best = min(evals, key=evals.get)
    out = tmp_path / "resumed"
    sft_qwen2.main(overfit_args(sft_demo, out, train, "--eval_on_start", "true", "--max_steps", str(best + 2)))
    resumed = sft_qwen2.main(overfit_args(sft_demo, out, train, "--eval_on_start", "true"))
    assert resumed.state.global_step == straight.state.global_step == best + 4
    assert resumed.state.best_model_checkpoint == str(out / f"checkpoint-{best}")


def test_early_stopping_resumes_a_checkpoint_saved_without_it(sft_demo, tmp_path):
    """transformers' Trainer fails at the first save of such a run (KeyError: its record of the checkpoint's stateful
    callbacks has no entry for one added since)."""
    args = base_args(sft_demo, tmp_path / "o", None, "--eval_file", sft_demo[2], "--per_device_train_batch_size", "4",
                     "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    sft_qwen2.main(args + ["--max_steps", "2"])
    trainer = sft_qwen2.main(args + ["--max_steps", "4", "--early_stopping_patience", "2"])
    assert trainer.state.global_step == 4 and os.path.isdir(tmp_path / "o" / "checkpoint-4")


@pytest.mark.parametrize("flags, message", [
    (["--early_stopping_patience", "2"], "--early_stopping_patience 2 stops on evaluations, and this run has none: "
     "add --eval_strategy steps --eval_steps N (or epoch), with evaluation data"),
    (["--eval_file", "EVAL", "--eval_strategy", "steps", "--early_stopping_patience", "0"],
     "--early_stopping_patience 0: give a number of evaluations, at least 1"),
    (["--eval_file", "EVAL", "--eval_strategy", "steps", "--early_stopping_threshold", "0.01"],
     "--early_stopping_threshold 0.01: how much better than the best so far an evaluation must be to count as an "
     "improvement, in the metric's units: give a number >= 0, with --early_stopping_patience N"),
    (["--eval_strategy", "steps", "--eval_steps", "2"],
     "--eval_strategy steps needs evaluation data: --eval_file, or --val_size to hold out training examples"),
    (["--load_best_model_at_end", "--save_strategy", "steps"], "--load_best_model_at_end loads the checkpoint saved "
     "at the best evaluation, so checkpoints must be saved where evaluations run: --save_strategy steps and "
     "--eval_strategy no differ; give both the same"),
    (["--eval_file", "EVAL", "--eval_strategy", "steps", "--save_strategy", "best", "--load_best_model_at_end"],
     "--save_strategy best writes only new bests, so the checkpoint a stop signal (SIGTERM, pre-emption) asks for "
     "would be skipped; use --save_strategy steps (or epoch), as --eval_strategy, with --load_best_model_at_end to "
     "end on the best weights"),
    (["--eval_file", "EVAL", "--eval_strategy", "steps", "--early_stopping_patience", "2", "--save_total_limit", "1"],
     "--save_total_limit 1 with a best checkpoint (--metric_for_best_model, early stopping, --load_best_model_at_end): "
     "at the end of training the Trainer keeps the best alone, deleting the checkpoint a stop signal has just "
     "written; give 2 or more"),
    (["--eval_file", "EVAL", "--load_best_model_at_end", "--save_strategy", "steps", "--eval_strategy", "steps",
      "--eval_steps", "3", "--save_steps", "4"], "--load_best_model_at_end loads the checkpoint saved at the best "
     "evaluation, so every save must fall on an evaluation: --save_steps 4 is not a multiple of --eval_steps 3; give "
     "e.g. --save_steps 3"),
    (["--eval_file", "EVAL", "--eval_strategy", "steps", "--metric_for_best_model", "accuracy"],
     "--metric_for_best_model accuracy: not a metric of this script's evaluation; one of: eval_loss"),
])
def test_early_stopping_and_best_model_flag_errors_exit_2(sft_demo, tmp_path, capsys, flags, message):
    flags = [sft_demo[2] if f == "EVAL" else f for f in flags]
    line = exit_2_line(capsys, sft_qwen2.main, base_args(sft_demo, tmp_path / "o", None, "--max_steps", "1", *flags))
    assert line == f"error: {message}"


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


# --- LoRA ------------------------------------------------------------------------------------------------------

class TestLora:
    LORA = ["--use_peft", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant"]

    def test_only_adapters_train_and_the_merged_model_is_base_plus_adapters(self, sft_demo, tmp_path):
        from peft import PeftModel

        out = tmp_path / "out"
        sft_qwen2.main(base_args(sft_demo, out, None, *self.LORA, "--max_steps", "4", "--merge_lora"))
        saved = safetensors.torch.load_file(out / "adapter_model.safetensors")
        assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), list(saved)
        assert not (out / "model.safetensors").exists() and (out / "tokenizer_config.json").is_file()

        base = AutoModelForCausalLM.from_pretrained(sft_demo[0])
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # plain transformers, no peft
        targeted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        base_weights = base.state_dict()
        for name, w in merged.state_dict().items():
            if name.endswith(tuple(f"{t}.weight" for t in targeted)):  # base + B @ A * alpha / r
                assert not torch.equal(w, base_weights[name]), name
            else:  # embeddings, norms, biases, lm_head: never trained, so exactly the base
                assert torch.equal(w, base_weights[name]), name
        adapter = PeftModel.from_pretrained(base, out)
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        with torch.no_grad():
            torch.testing.assert_close(merged.eval()(ids).logits, adapter.eval()(ids).logits, rtol=1e-5, atol=1e-5)

    def test_adapter_round_trip_resume_and_gradient_checkpointing(self, sft_demo, tmp_path, capsys):
        from peft import PeftModel

        args = [*self.LORA, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
        straight = tmp_path / "straight"
        trainer = sft_qwen2.main(base_args(sft_demo, straight) + args)
        assert trainer.model.get_base_model().is_gradient_checkpointing  # the default, with LoRA too
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_demo[0]), straight)
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(ids).logits, trainer.model.eval()(ids).logits, rtol=0, atol=0)

        resumed = tmp_path / "resumed"
        sft_qwen2.main(base_args(sft_demo, resumed) + args)
        shutil.rmtree(resumed / "checkpoint-4")  # a crash after step 2
        os.remove(resumed / "trainer_state.json")
        capsys.readouterr()
        sft_qwen2.main(base_args(sft_demo, resumed) + args)
        assert f"resuming from {resumed / 'checkpoint-2'}" in capsys.readouterr().out
        a, b = losses(straight), losses(resumed)
        assert sorted(b) == [1, 2, 3, 4] and all(b[s] == pytest.approx(a[s], rel=1e-6) for s in b), (a, b)
        p, q = (safetensors.torch.load_file(d / "adapter_model.safetensors") for d in (straight, resumed))
        for name in p:
            torch.testing.assert_close(p[name], q[name], rtol=1e-6, atol=1e-7)

    def test_run_sh_two_processes(self, tmp_path):
        res = run_cli(["bash", "run.sh", "sft_qwen2.py", "--demo", "--use_peft", "--max_steps", "6",
                       "--output_dir", str(tmp_path / "out")], env={"NPROC_PER_NODE": "2"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert res.stdout.count("summary:") == 1 and "adapter saved to" in res.stdout
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--pure_bf16"], "--pure_bf16 needs bf16"),
    (["--bf16", "true", "--pure_bf16", "--use_peft"], "--pure_bf16 is for full fine-tunes"),
    (["--merge_lora"], "--merge_lora needs --use_peft"),
    (["--save_on_each_node", "true"], "--save_on_each_node: transformers writes a full model's weights only on global rank 0"),
    (["--bf16", "true", "--pure_bf16", "--weight_decay", "0.01"], "--pure_bf16 with --weight_decay 0.01: torch-optimi"),
])
def test_precision_and_lora_flags_that_cannot_train_together_exit_2(sft_demo, tmp_path, capsys, flags, message):
    line = exit_2_line(capsys, sft_qwen2.main, base_args(sft_demo, tmp_path / "o", None, *flags))
    assert message in line, line


# --- as users run it: bad input, run.sh -------------------------------------------------------------------------

def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def bad_input_cases(tmp):
    good = json.dumps({"query": "q", "answer": "a"})
    return [
        (write(tmp / "malformed.jsonl", good + "\n" + good + "\n{\"query\": \"q\", \"answer\": \n"),
         "malformed.jsonl: line 3: malformed JSON"),
        (write(tmp / "missing.jsonl", good + "\n" + json.dumps({"query": "q"}) + "\n"),
         "missing.jsonl: line 2: missing key 'answer'"),
        (write(tmp / "nonstring.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                  {"role": "assistant", "content": "y"}]}) + "\n"
               + json.dumps({"messages": [{"role": "user", "content": 5},
                                          {"role": "assistant", "content": "y"}]}) + "\n"),
         "nonstring.jsonl: line 2: key 'messages[0]'.content: expected a string, got int"),
        (write(tmp / "role.jsonl", good + "\n\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n"),
         "role.jsonl: line 3: key 'messages[0]': unknown role 'bot'"),
        (write(tmp / "empty.jsonl", ""), "empty.jsonl: empty file"),
        (str(tmp / "nowhere.jsonl"), "nowhere.jsonl: no such file or folder"),
    ]


@pytest.mark.parametrize("case", range(6), ids=["malformed", "missing", "nonstring", "role", "empty", "nowhere"])
def test_each_bad_input_exits_2_with_one_line(sft_demo, tmp_path, capsys, case):
    path, message = bad_input_cases(tmp_path)[case]
    line = exit_2_line(capsys, sft_qwen2.main, ["--model_name_or_path", sft_demo[0], "--train_file", path, "--use_cpu",
                                                 "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert message in line, (message, line)


def test_bad_input_from_the_command_line_has_no_traceback(sft_demo, tmp_path):
    path, message = bad_input_cases(tmp_path)[1]
    res = run_cli(["python", "sft_qwen2.py", "--model_name_or_path", sft_demo[0], "--train_file", path,
                   "--output_dir", str(tmp_path / "o")])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and message in res.stderr


def test_deepspeed_without_a_gpu_or_the_package_exits_2_with_one_line(sft_demo, tmp_path, capsys):
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    from transformers.integrations import unset_hf_deepspeed_config

    try:
        line = exit_2_line(capsys, sft_qwen2.main, base_args(sft_demo, tmp_path / "o", None, "--deepspeed",
                                                             str(config)))
    finally:  # parsing a ZeRO-3 config makes every model this process builds later a partitioned one
        unset_hf_deepspeed_config()
    assert "deepspeed" in line.lower(), line


def test_run_sh_passes_arguments_through_unchanged(tmp_path):
    script = tmp_path / "echo_args.py"
    script.write_text("import json, os, sys\nprint(json.dumps([os.environ['WORLD_SIZE'], sys.argv[1:]]))\n"
                      "sys.exit(3)\n")
    res = run_cli(["bash", "run.sh", str(script), "a b", 'quote"d', "--flag=x y", ""], env={"NPROC_PER_NODE": "1"})
    assert res.returncode == 3  # the script's own exit code, not torchrun's
    assert json.loads(res.stdout.strip().splitlines()[0]) == ["1", ["a b", 'quote"d', "--flag=x y", ""]]


def test_bad_record_found_by_a_worker_process_still_names_the_line(sft_demo, tmp_path):
    """From the command line: workers forked from the test process itself can deadlock on a lock some earlier test's
    thread held at the fork (a TensorBoard writer, a thread pool), which a real run never has."""
    good = json.dumps({"query": "q", "answer": "a"})
    path = write(tmp_path / "late.jsonl", "\n".join([good] * 9 + [json.dumps({"query": "q", "answer": None})]) + "\n")
    res = run_cli([sys.executable, "sft_qwen2.py", "--model_name_or_path", sft_demo[0], "--train_file", path,
                   "--use_cpu", "--preprocessing_num_workers", "2", "--output_dir", str(tmp_path / "o")])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "late.jsonl: line 10: missing key 'answer'" in res.stderr.strip().splitlines()[-1]


# --- data layouts and sources -------------------------------------------------------------------------------------

def test_layouts_folder_and_hub_id_train_on_what_their_messages_give(sft_demo, tmp_path, monkeypatch):
    """--dry_run encodes everything: a folder of every layout (JSON Lines + Parquet) counts the examples and tokens of
    the file of their {messages} records; a hub id reads --dataset_config and --dataset_split, and --eval_file the
    same id's --eval_split (offline: the id is answered from a local dataset repository)."""
    from test_collate import LAYOUTS
    from test_data import serve_hub_dataset
    from test_token_stats import write_layouts

    write_layouts(tmp_path / "layouts")
    same = demo.write_jsonl(tmp_path / "messages.jsonl", [{"messages": m} for _, _, m in LAYOUTS])
    dry = ["--dry_run", "--max_len", "512"]
    plan = sft_qwen2.main(base_args(sft_demo, tmp_path / "a", str(tmp_path / "layouts"), *dry))
    assert plan == sft_qwen2.main(base_args(sft_demo, tmp_path / "b", same, *dry))
    assert plan["train_examples"] == len(LAYOUTS)

    serve_hub_dataset(monkeypatch, tmp_path, "org/sft-data", {
        "chat": {"train": demo.make_sft_records(2), "test": demo.make_sft_records(1)},
        "plain": {"train": demo.make_sft_records(5, seed=5), "test": demo.make_sft_records(3, seed=3)}})
    plan = sft_qwen2.main(base_args(sft_demo, tmp_path / "c", "org/sft-data", *dry, "--dataset_config", "plain",
                                    "--eval_file", "org/sft-data", "--eval_split", "test"))
    assert (plan["train_examples"], plan["eval_examples"]) == (5, 3)


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt record: no assistant message to learn from"),
    ({"instruction": "i", "history": "q"}, "key 'history': expected a list of [query, answer] pairs, got str"),
    ({"prompt": "p"}, "missing key 'completion' (prompt_completion records have 'prompt', 'completion')"),
])
def test_bad_record_of_a_layout_in_a_folder_exits_2_naming_its_file_and_line(sft_demo, tmp_path, capsys, record,
                                                                             message):
    demo.write_jsonl(tmp_path / "data" / "a.jsonl", demo.make_sft_records(3))
    bad = demo.write_jsonl(tmp_path / "data" / "b.jsonl", [{"query": "q", "answer": "a"}, record])
    line = exit_2_line(capsys, sft_qwen2.main, base_args(sft_demo, tmp_path / "o", str(tmp_path / "data")))
    assert line == f"error: {bad}: line 2: {message}", line


def test_a_hub_id_that_does_not_load_exits_2_with_one_line(sft_demo, tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    line = exit_2_line(capsys, sft_qwen2.main, base_args(sft_demo, tmp_path / "o", "nobody/no-such-data"))
    assert line == ("error: nobody/no-such-data: no such file or folder, and not a dataset the hub gives (Couldn't "
                    "reach 'nobody/no-such-data' on the Hub (OfflineModeIsEnabled))"), line
