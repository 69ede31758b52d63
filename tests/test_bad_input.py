"""Bad input, swept: every command line is a sensible run or one clear error, on every rank.

Each case is a command line of a script and what must come of it: exit 2 with exactly one `error: ` line, holding the
expected text (it names the flag or the file), and no `Traceback` in any rank's output; or exit 0 with the expected
text in the output (the warning or summary line that says what happened). One-process cases run the script's main()
in this process (most are refused before any model loads); two-process cases run `bash run.sh` as users do.
"""

import re

import pytest
from PIL import Image

import demo
import make_shards
import train_scorer
from conftest import run_cli

# --- train_scorer.py --------------------------------------------------------------------------------------------
# (id, argv, processes, exit code, expected text); placeholders: see PLACEHOLDERS.
SCORER_BASE = ["--model_name_or_path", "{scorer_model}", "--output_dir", "{tmp}/out", "--num_types", "3",
               "--min_pixels", "1024", "--max_pixels", "4096", "--use_cpu", "--disable_tqdm", "true",
               "--logging_steps", "1", "--save_strategy", "no", "--dataloader_num_workers", "0",
               "--per_device_train_batch_size", "4"]
SCORER_TRAIN = [*SCORER_BASE, "--train_shards", "{scorer_train}"]
SCORER_PREDICT = [*SCORER_BASE, "--predict_shards", "{scorer_eval}", "--do_predict"]
SCORER_CASES = [
    # a schedule that covers every step, or a learning rate the polynomial decay cannot reach (issue item 1)
    ("max_steps_1", [*SCORER_TRAIN, "--max_steps", "1"], 1, 0, "trained 1 steps"),
    ("warmup_all_steps", [*SCORER_TRAIN, "--max_steps", "2", "--warmup_steps", "2"], 1, 0, "trained 2 steps"),
    ("one_epoch_of_one_step", [*SCORER_TRAIN, "--epoch_samples", "4", "--num_train_epochs", "1"], 1, 0,
     "trained 1 steps"),
    ("lr_below_lr_end", [*SCORER_TRAIN, "--max_steps", "2", "--learning_rate", "1e-8"], 1, 2, "--learning_rate"),
    # paths that do not exist (2), pixel bounds (5), outputs (7)
    ("model_path_missing", [*SCORER_TRAIN, "--model_name_or_path", "{tmp}/out/no-such-model"], 1, 2,
     "--model_name_or_path"),
    ("model_path_typo", [*SCORER_TRAIN, "--model_name_or_path", "Qwen/Qwen3-VL-8B-Instruct/"], 1, 2,
     "--model_name_or_path"),
    ("resume_missing", [*SCORER_TRAIN, "--max_steps", "2", "--resume_from_checkpoint", "{tmp}/out/checkpoint-9"], 1, 2,
     "--resume_from_checkpoint"),
    ("min_pixels_above_max", [*SCORER_TRAIN, "--min_pixels", "8192", "--max_pixels", "4096"], 1, 2,
     "--min_pixels 8192 is above --max_pixels 4096"),
    ("predict_output_under_a_file", [*SCORER_PREDICT, "--predict_output", "{plain_file}/predictions.jsonl"], 1, 2,
     "--predict_output {plain_file}/predictions.jsonl"),
    ("predict_output_without_predicting", [*SCORER_TRAIN, "--predict_output", "{tmp}/out/p.jsonl"], 1, 2,
     "--predict_output"),
    ("predict_shards_without_do_predict", [*SCORER_TRAIN, "--predict_shards", "{scorer_eval}"], 1, 2, "--do_predict"),
    ("image_root_missing", [*SCORER_BASE, "--predict_file", "{plain_file}", "--image_root", "{tmp}/out/photos"], 1, 2,
     "--image_root {tmp}/out/photos"),
    # a shard whose samples are all bad, under two processes: one rank's verdict, every rank stops cleanly (6)
    ("rank_without_usable_samples", [*SCORER_BASE, "--train_shards", "{half_bad}", "--max_steps", "4",
                                     "--per_device_train_batch_size", "2"], 2, 2,
     "half-bad-000001.tar: no usable sample for rank 1"),
    # prediction from heads nothing trained (12)
    ("predict_untrained_heads", SCORER_PREDICT, 1, 2, "--allow_untrained_heads"),
    ("predict_untrained_heads_on_purpose", [*SCORER_PREDICT, "--allow_untrained_heads"], 1, 0,
     "predictions for 48 samples"),
    # an evaluation of bad samples only: an error, on one process and on two; many bad ones: a warning (12)
    ("eval_all_bad", [*SCORER_BASE, "--eval_shards", "{scorer_eval}", "--max_len", "8"], 1, 2,
     "evaluation: all 48 samples are bad, the first: "),
    ("eval_all_bad_two_processes", [*SCORER_BASE, "--eval_shards", "{scorer_eval}", "--max_len", "8"], 2, 2,
     "evaluation: all 48 samples are bad, the first: "),
    ("eval_num_types_below_labels", [*SCORER_BASE, "--eval_shards", "{scorer_eval}", "--num_types", "2"], 1, 0,
     "warning: 18 of 48 evaluation samples (38%) were skipped as bad"),
    ("train_num_types_below_labels", [*SCORER_TRAIN, "--max_steps", "2", "--num_types", "2"], 1, 0,
     "warning: 8 of 16 training samples (50%) were skipped as bad"),
    # legal-looking values that cannot mean what they say (13, and beyond)
    ("max_len_negative", [*SCORER_TRAIN, "--max_len", "-1"], 1, 2, "--max_len -1"),
    ("type_weight_negative", [*SCORER_TRAIN, "--type_weight", "-1"], 1, 2, "--type_weight -1"),
    ("score_weight_nan", [*SCORER_TRAIN, "--score_weight", "nan"], 1, 2, "--score_weight nan"),
    ("every_loss_weight_0", [*SCORER_TRAIN, "--score_weight", "0", "--type_weight", "0"], 1, 2, "weight 0"),
    ("epoch_samples_0", [*SCORER_TRAIN, "--epoch_samples", "0"], 1, 2, "--epoch_samples 0"),
    ("epoch_samples_0_two_processes", [*SCORER_TRAIN, "--epoch_samples", "0"], 2, 2, "--epoch_samples 0"),
    ("shuffle_buffer_negative", [*SCORER_TRAIN, "--shuffle_buffer", "-1"], 1, 2, "--shuffle_buffer -1"),
    ("head_lr_negative", [*SCORER_TRAIN, "--head_lr", "-1"], 1, 2, "--head_lr -1"),
    ("max_pixels_0", [*SCORER_TRAIN, "--min_pixels", "0", "--max_pixels", "0"], 1, 2, "--max_pixels 0"),
    ("schedule_options_not_json", [*SCORER_TRAIN, "--lr_scheduler_kwargs", "power=2"], 1, 2,
     "--lr_scheduler_kwargs power=2"),
    ("cosine_schedule_with_the_default_options", [*SCORER_TRAIN, "--max_steps", "2", "--lr_scheduler_type", "cosine"],
     1, 0, "trained 2 steps"),
    ("feature_cache_a_file", [*SCORER_TRAIN, "--freeze_backbone", "--feature_cache", "{plain_file}"], 1, 2,
     "--feature_cache {plain_file}"),
]


# --- make_shards.py -----------------------------------------------------------------------------------------------
# (id, argv, processes, exit code, expected text); placeholders: see PLACEHOLDERS.
SHARDS_CASES = [
    ("pixel_bounds_inverted", ["--manifest", "{manifest}", "--output_dir", "{tmp}/out", "--min_pixels", "8192",
                               "--max_pixels", "4096"], 1, 2, "--min_pixels 8192 is above --max_pixels 4096"),
    ("max_pixels_0", ["--manifest", "{manifest}", "--output_dir", "{tmp}/out", "--min_pixels", "0", "--max_pixels",
                      "0"], 1, 2, "--max_pixels 0"),
]


def plain_file(tmp):
    (tmp / "a-file").write_text("not a folder\n")
    return str(tmp / "a-file")


def half_bad_shards(tmp):
    """Two shards, the second one's samples all bad (a type out of range for --num_types 3)."""
    bad = demo.make_vl_samples(6, seed=8, prefix="bad")
    for sample in bad:
        sample["json"] = b'{"prompt": "p", "score": 1.0, "type": 9}'
    demo.write_shard(tmp / "half-bad-000000.tar", demo.make_vl_samples(8, seed=9, prefix="fine"))
    demo.write_shard(tmp / "half-bad-000001.tar", bad)
    return f"{tmp}/half-bad-{{000000..000001}}.tar"


def small_manifest(tmp):
    """A make_shards.py manifest of two rows, one with an image."""
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp / "a.png")
    (tmp / "m.jsonl").write_text('{"prompt": "p", "score": 1.0, "type": 0, "images": ["a.png"]}\n'
                                 '{"prompt": "q", "score": 2.0, "type": 1, "images": []}\n')
    return str(tmp / "m.jsonl")


PLACEHOLDERS = {  # name -> value, from the pytest `request` and the test's folder ({tmp}/out: the output folder)
    "tmp": lambda request, tmp: str(tmp),
    "scorer_model": lambda request, tmp: request.getfixturevalue("scorer_demo")[0],
    "scorer_train": lambda request, tmp: request.getfixturevalue("scorer_demo")[1],
    "scorer_eval": lambda request, tmp: request.getfixturevalue("scorer_demo")[2],
    "plain_file": lambda request, tmp: plain_file(tmp),
    "half_bad": lambda request, tmp: half_bad_shards(tmp),
    "manifest": lambda request, tmp: small_manifest(tmp),
}


def fill(texts, request, tmp):
    """`texts` with each {name} of PLACEHOLDERS replaced (other braces, as in shard patterns, stay)."""
    pattern = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
    values = {}

    def value(match):
        if match[1] not in values:
            values[match[1]] = PLACEHOLDERS[match[1]](request, tmp)
        return values[match[1]]

    return [pattern.sub(value, text) for text in texts]


def outcome(main, script, argv, processes, capsys):
    """(exit code, output) of a command line: main(argv) in this process, or `bash run.sh` with N processes."""
    if processes > 1:
        result = run_cli(["bash", "run.sh", script, *argv], env={"NPROC_PER_NODE": str(processes),
                                                                 "OMP_NUM_THREADS": "1"}, timeout=180)
        return result.returncode, result.stdout + result.stderr
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def check_case(main, script, case, request, tmp, capsys):
    argv, processes, expected_code, expected = case
    *argv, expected = fill([*argv, expected], request, tmp)
    code, output = outcome(main, script, argv, processes, capsys)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in output, output[-3000:]
    assert code == expected_code, output[-3000:]
    if expected_code == 2:
        assert len(errors) == 1 and expected in errors[0], errors or output[-3000:]
    else:
        assert not errors and expected in output, output[-3000:]


@pytest.mark.parametrize("case", [case[1:] for case in SCORER_CASES], ids=[case[0] for case in SCORER_CASES])
def test_scorer_bad_input(case, request, tmp_path, capsys):
    check_case(train_scorer.main, "train_scorer.py", case, request, tmp_path, capsys)


@pytest.mark.parametrize("case", [case[1:] for case in SHARDS_CASES], ids=[case[0] for case in SHARDS_CASES])
def test_make_shards_bad_input(case, request, tmp_path, capsys):
    check_case(make_shards.main, "make_shards.py", case, request, tmp_path, capsys)
