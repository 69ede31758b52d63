"""Prediction by generation (sft_qwen2.py --do_predict --predict_file, generation.py): batched left-padded greedy
answers equal the model's own generate on each prompt alone, token for token, from a full save, after training
and from a LoRA adapter, over 2 processes; prompt records read as training reads them; --eval_generate."""

import glob
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sft_qwen2
from collate import encode_prompts
from conftest import exit_2_line, read_jsonl, run_cli
from generation import generate, generation_config, load_for_generation

# Prompts of different lengths and layouts; blank lines in between (keys are the records' line numbers).
PROMPTS = [
    {"key": "ocean", "query": "Please explain the ocean."},  # line 1: its own key, no answer
    {"query": "请介绍长城。", "answer": "好的"},  # line 3: the answer is the reference
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Please describe how tea is made, in a few words."}]},  # line 4
    {"messages": [{"role": "user", "content": "Please explain rivers."}, {"role": "assistant", "content": "Sure!"},
                  {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]},  # line 6
    {"query": "Hi."},  # line 7
]
MAX_NEW = 16


def write_prompts(path):
    lines = [json.dumps(r, ensure_ascii=False) for r in PROMPTS]
    path.write_text("\n".join([lines[0], "", lines[1], lines[2], "", lines[3], lines[4]]) + "\n", encoding="utf-8")
    return path


EXPECTED = [  # key, prompt, reference
    ("ocean", [{"role": "user", "content": "Please explain the ocean."}], None),
    (3, [{"role": "user", "content": "请介绍长城。"}], "好的"),
    (4, PROMPTS[2]["messages"], None),
    (6, PROMPTS[3]["messages"][:3], "No."),
    (7, [{"role": "user", "content": "Hi."}], None),
]


def alone(model, ids, config):
    """The model's own generate on one prompt, no padding: the answer ids."""
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              generation_config=config)[0, len(ids):].tolist()


def expected_rows(model, tokenizer):
    """predictions.jsonl as it must be: each prompt answered alone by `model`, decoded without special tokens."""
    model.eval()
    config = generation_config(tokenizer, MAX_NEW)
    ids = encode_prompts([p for _, p, _ in EXPECTED], tokenizer)
    return [{"key": k, "prompt": p, "completion": tokenizer.decode(alone(model, i, config), skip_special_tokens=True)}
            | ({"reference": r} if r else {}) for (k, p, r), i in zip(EXPECTED, ids)]


def predict_args(model, prompts, out, *extra):
    return ["--model_name_or_path", str(model), "--predict_file", str(prompts), "--output_dir", str(out),
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--max_new_tokens", str(MAX_NEW), *extra]


def test_batched_left_padded_greedy_equals_each_prompt_alone(sft_demo, qwen2_tokenizer, one_thread):
    model = AutoModelForCausalLM.from_pretrained(sft_demo[0])
    model.config.use_cache = False  # as sft_qwen2.py leaves it for training
    model.train()
    ids = encode_prompts([p for _, p, _ in EXPECTED], qwen2_tokenizer)
    assert sorted(map(len, ids)) == [22, 31, 32, 47, 54]  # one batch, four paddings
    config = generation_config(qwen2_tokenizer, MAX_NEW)
    answers = generate(model, ids, config, batch_size=len(ids), device="cpu")
    assert model.training and model.config.use_cache is False  # the training settings are left as they were
    model.eval()
    assert answers == [alone(model, i, config) for i in ids]
    assert {len(a) for a in answers} == {MAX_NEW, 13}  # one answer ended at its eos (kept), the others ran out
    # one-token stand-in calls (lockstep) add nothing
    assert generate(model, ids, config, batch_size=2, device="cpu", calls=5) == answers


def test_predict_from_a_full_save(sft_demo, qwen2_tokenizer, tmp_path, one_thread):
    rows = sft_qwen2.main(predict_args(sft_demo[0], write_prompts(tmp_path / "p.jsonl"), tmp_path / "out",
                                       "--per_device_eval_batch_size", "4"))
    expected = expected_rows(AutoModelForCausalLM.from_pretrained(sft_demo[0]), qwen2_tokenizer)
    assert read_jsonl(tmp_path / "out" / "predictions.jsonl") == rows == expected


def test_predict_after_lora_training_and_from_the_adapter(sft_demo, qwen2_tokenizer, tmp_path, one_thread):
    """In the same run as the training, then from the saved adapter folder (base + adapter through peft): the same
    answers, those of the trained model alone, and not the base model's."""
    prompts, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "lora"
    sft_qwen2.main(predict_args(sft_demo[0], prompts, out, "--train_file", sft_demo[1], "--use_peft",
                                "--max_steps", "3", "--learning_rate", "3e-2", "--warmup_steps", "0", "--max_len",
                                "256", "--save_strategy", "no", "--per_device_train_batch_size", "4"))
    trained = read_jsonl(out / "predictions.jsonl")
    rows = sft_qwen2.main(predict_args(out, prompts, tmp_path / "again"))
    assert read_jsonl(tmp_path / "again" / "predictions.jsonl") == rows == trained
    assert trained == expected_rows(load_for_generation(str(out)), qwen2_tokenizer)
    base = expected_rows(AutoModelForCausalLM.from_pretrained(sft_demo[0]), qwen2_tokenizer)
    assert [r["completion"] for r in trained] != [r["completion"] for r in base]


def test_two_processes_answer_each_prompt_once_in_file_order(sft_demo, qwen2_tokenizer, tmp_path):
    out = tmp_path / "out"
    res = run_cli(["bash", "run.sh", "sft_qwen2.py", *predict_args(sft_demo[0], write_prompts(tmp_path / "p.jsonl"),
                                                                    out, "--per_device_eval_batch_size", "2")],
                  env={"NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "(answered per rank: [3, 2])" in res.stdout
    expected = expected_rows(AutoModelForCausalLM.from_pretrained(sft_demo[0]), qwen2_tokenizer)
    assert read_jsonl(out / "predictions.jsonl") == expected


@pytest.mark.parametrize("extra, message", [
    (["--predict_output", "{tmp}/a_file/predictions.jsonl"], "--predict_output {tmp}/a_file: cannot write there"),
    (["--predict_output", "{tmp}"], "--predict_output {tmp}: a folder, not a file name"),
])
def test_an_unwritable_predictions_file_exits_before_any_model_loads(tmp_path, capsys, extra, message):
    (tmp_path / "a_file").write_text("")
    flags = predict_args(tmp_path / "no-model", tmp_path / "no-prompts.jsonl", tmp_path / "out")
    line = exit_2_line(capsys, sft_qwen2.main, flags + [e.format(tmp=tmp_path) for e in extra])
    assert line.startswith("error: " + message.format(tmp=tmp_path)), line


def test_a_bad_prompt_record_exits_2_with_its_line(sft_demo, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"query": "fine"}\n\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    line = exit_2_line(capsys, sft_qwen2.main, predict_args(sft_demo[0], path, tmp_path / "out"))
    assert line == f"error: {path}: line 3: key 'messages[0]': unknown role 'robot' (expected one of system, user, " \
                   "assistant)", line


def test_eval_generate_prints_and_logs_answers_at_each_evaluation(sft_demo, qwen2_tokenizer, tmp_path, capsys,
                                                                  one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    trainer = sft_qwen2.main(["--model_name_or_path", sft_demo[0], "--train_file", sft_demo[1], "--eval_file",
                              sft_demo[2], "--output_dir", str(out), "--use_cpu", "--report_to", "tensorboard",
                              "--disable_tqdm", "true", "--max_len", "256", "--max_steps", "2", "--eval_strategy",
                              "steps", "--eval_steps", "1", "--save_strategy", "no", "--eval_generate", "2",
                              "--max_new_tokens", "8", "--padding_free"])
    printed = capsys.readouterr().out
    assert printed.count("eval_generate, step 1:") == 1 and printed.count("eval_generate, step 2:") == 1
    assert printed.count("  answer: ") == 4 and "example 1 prompt:" in printed and "example 2 " not in printed
    assert trainer.model.config.use_cache is False  # packed training still needs it off
    events = EventAccumulator(glob.glob(str(out / "runs" / "*"))[0]).Reload()
    texts = events.Tensors("eval_generate/text_summary")
    assert [t.step for t in texts] == [1, 2]
    assert "answer: " in texts[1].tensor_proto.string_val[0].decode()


def test_eval_generate_needs_evaluations(sft_demo, tmp_path, capsys):
    line = exit_2_line(capsys, sft_qwen2.main, ["--model_name_or_path", sft_demo[0], "--train_file", sft_demo[1],
                                                "--output_dir", str(tmp_path), "--use_cpu", "--eval_generate", "2"])
    assert line == "error: --eval_generate answers evaluation examples at each evaluation: it needs --eval_strategy " \
                   "(steps or epoch) and --eval_file or --val_size", line
