"""Bad input, swept: every command line is a sensible run or one clear error, on every rank.

The harness (generic; each script's cases are a table below, all run by `test_case`):
- A case is a `Case`: the script (`sft_qwen2.py`, `token_stats.py`, `train_scorer.py`), its argv, the number of
  processes, the expected exit code and the text expected in the output, plus optional `setup` / `check` hooks.
- argv may hold placeholders filled per test: {tmp} (the test's own folder; {tmp}/out is the usual --output_dir),
  {model} {train} {eval} (the tiny SFT fixture, `sft_demo`), {scorer_model} {scorer_train} {scorer_eval} (the tiny
  scorer fixture, `scorer_demo`), {gbk} {latin1} (SFT files that are not UTF-8). A fixture is built only when a
  case names it (`PLACEHOLDERS`).
- processes=1: the script's main(argv) runs in this process (fast: imports are paid once); keep such cases to
  refusals made before heavy work, or to a few steps of a tiny model. processes=2: `NPROC_PER_NODE=2 bash run.sh
  SCRIPT ARGV` (OMP_NUM_THREADS=1), both ranks' output together.
- exit 2: exactly one line starting with `error: ` in the output of every rank together, containing `expect` (which
  names the flag or the file), and no `Traceback` anywhere.
- exit 0: `expect` in the output (a `warning: ` line, or the line saying what was done), no `Traceback`, and
  `check(tmp, state, output)` holds, `state` being what `setup(tmp, argv)` returned (it runs before the case).
Tables: SFT_CASES, TOKEN_STATS_CASES, LAUNCHER_CASES (several processes through run.sh), as {name: Case};
SCORER_CASES (train_scorer.py) and SHARDS_CASES (make_shards.py) as rows (name, argv, processes, exit code, expected
text) that `as_cases` turns into Cases; ALL_CASES (at the end) names every table, and `test_case` runs them all.
Every case was seen to fail before the fix it tests (a traceback, another line, or a run that did what it should not).
"""

import importlib
import json
import re
from dataclasses import dataclass
from typing import Callable

import pytest
from PIL import Image

import demo
from conftest import run_cli


@dataclass
class Case:
    script: str
    argv: list
    code: int
    expect: str
    processes: int = 1
    setup: Callable = None  # (tmp, argv) -> state, run before the case
    check: Callable = None  # (tmp, state, output): asserts what an exit-0 case must have done (or not done)


def non_utf8_files(tmp):
    """{gbk}: JSON Lines whose third line is Chinese saved as GBK; {latin1}: a CSV whose third line is Latin-1."""
    good = json.dumps({"query": "q", "answer": "a"})
    gbk = tmp / "gbk.jsonl"
    gbk.write_bytes(f"{good}\n{good}\n".encode() + json.dumps({"query": "你好", "answer": "世界"},
                                                                  ensure_ascii=False).encode("gbk") + b"\n")
    latin1 = tmp / "latin1.csv"
    latin1.write_bytes("query,answer\nq,a\ncafé,crème brûlée\n".encode("latin-1"))
    return {"gbk": str(gbk), "latin1": str(latin1)}


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


PLACEHOLDERS = {  # name -> value, from the pytest `request` and the test's folder
    "tmp": lambda request, tmp: str(tmp),
    "model": lambda request, tmp: request.getfixturevalue("sft_demo")[0],
    "train": lambda request, tmp: request.getfixturevalue("sft_demo")[1],
    "eval": lambda request, tmp: request.getfixturevalue("sft_demo")[2],
    "scorer_model": lambda request, tmp: request.getfixturevalue("scorer_demo")[0],
    "scorer_train": lambda request, tmp: request.getfixturevalue("scorer_demo")[1],
    "scorer_eval": lambda request, tmp: request.getfixturevalue("scorer_demo")[2],
    "gbk": lambda request, tmp: non_utf8_files(tmp)["gbk"],
    "latin1": lambda request, tmp: non_utf8_files(tmp)["latin1"],
    "plain_file": lambda request, tmp: plain_file(tmp),
    "half_bad": lambda request, tmp: half_bad_shards(tmp),
    "manifest": lambda request, tmp: small_manifest(tmp),
}


def fill(argv, request, tmp):
    """`argv` with each {name} of PLACEHOLDERS replaced (other braces stay as they are)."""
    pattern = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
    values = {}

    def value(match):
        if match[1] not in values:
            values[match[1]] = PLACEHOLDERS[match[1]](request, tmp)
        return values[match[1]]

    return [pattern.sub(value, arg) for arg in argv]


def run_case(case, argv, capsys):
    """(exit code, stdout + stderr of every process)."""
    if case.processes == 1:
        main = importlib.import_module(case.script.removesuffix(".py")).main
        capsys.readouterr()
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out + out.err
    res = run_cli(["bash", "run.sh", case.script, *argv],
                  env={"NPROC_PER_NODE": str(case.processes), "OMP_NUM_THREADS": "1"})
    return res.returncode, res.stdout + res.stderr


# --- sft_qwen2.py -----------------------------------------------------------------------------------------------

def sft(*flags, cpu=True):
    """sft_qwen2.py argv: a 2-step run of the tiny model on the demo data, no saves; `flags` last, so they win."""
    return ["--model_name_or_path", "{model}", "--train_file", "{train}", "--output_dir", "{tmp}/out",
            "--report_to", "none", "--disable_tqdm", "true", "--max_len", "256", "--max_steps", "2", "--seed", "1",
            "--save_strategy", "no", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            *(["--use_cpu"] if cpu else []), *flags]


def final_model_saved(tmp, state, output):
    assert (tmp / "out" / "model.safetensors").is_file()


def first_run(tmp, argv):
    """Train the case's command once; returns what its output folder then holds (names and modification times)."""
    import sft_qwen2

    sft_qwen2.main(list(argv))
    return files_and_times(tmp / "out")


def files_and_times(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def unchanged(tmp, state, output):
    assert files_and_times(tmp / "out") == state


SFT_CASES = {
    # 2: a model or checkpoint that is not there (a typo) is one line, not a huggingface_hub traceback
    "missing-model-folder": Case("sft_qwen2.py", sft("--model_name_or_path", "{tmp}/no/such/model"), 2,
                                 "cannot load the tokenizer '{tmp}/no/such/model' (no such folder); pass a local copy "
                                 "with --model_name_or_path PATH"),
    "unknown-hub-id-offline": Case("sft_qwen2.py", sft("--model_name_or_path", "Qwen/No-Such-Model-7B"), 2,
                                   "cannot load the tokenizer 'Qwen/No-Such-Model-7B' ("),
    "missing-checkpoint": Case("sft_qwen2.py", sft("--resume_from_checkpoint", "{tmp}/out/checkpoint-3"), 2,
                               "--resume_from_checkpoint {tmp}/out/checkpoint-3: no such folder"),
    # 3: a file that is not UTF-8: the file, the line of the first bad byte, the fix
    "gbk-train-file": Case("sft_qwen2.py", sft("--train_file", "{gbk}"), 2,
                           "gbk.jsonl: line 3: not UTF-8 (byte 0xc4 at byte 12 of the line); save it as UTF-8, "
                           "e.g. iconv -f GBK -t UTF-8"),
    "latin1-eval-csv": Case("sft_qwen2.py", sft("--eval_file", "{latin1}"), 2,
                            "latin1.csv: line 3: not UTF-8 (byte 0xe9"),
    # 4: evaluation asked for without evaluation data; more held out than there is
    "eval-strategy-without-eval-data": Case("sft_qwen2.py", sft("--eval_strategy", "steps", "--eval_steps", "1"), 2,
                                            "--eval_strategy steps needs evaluation data: --eval_file, or --val_size"),
    "eval-on-start-without-eval-data": Case("sft_qwen2.py", sft("--eval_on_start", "true"), 2,
                                            "--eval_on_start needs evaluation data"),
    "best-model-without-eval-data": Case("sft_qwen2.py", sft("--load_best_model_at_end", "true"), 2,
                                         "--load_best_model_at_end needs evaluation data"),
    "val-size-above-the-data": Case("sft_qwen2.py", sft("--val_size", "100"), 2,
                                    "--val_size 100: holds out 100 of the 96 training examples, leaving none"),
    "val-size-and-eval-file": Case("sft_qwen2.py", sft("--val_size", "0.1", "--eval_file", "{eval}"), 2,
                                   "--val_size and --eval_file: evaluation data comes from one of them"),
    "val-size-negative": Case("sft_qwen2.py", sft("--val_size", "-3"), 2, "--val_size -3: a share"),
    # 5 / 13: shared flags out of range (training_plan.check_flags, before data and model)
    "train-batch-0": Case("sft_qwen2.py", sft("--per_device_train_batch_size", "0"), 2,
                          "--per_device_train_batch_size 0: must be at least 1"),
    "accumulation-0": Case("sft_qwen2.py", sft("--gradient_accumulation_steps", "0"), 2,
                           "--gradient_accumulation_steps 0: must be at least 1"),
    "eval-batch-0": Case("sft_qwen2.py", sft("--per_device_eval_batch_size", "0", "--eval_file", "{eval}"), 2,
                         "--per_device_eval_batch_size 0: must be at least 1"),
    # 9: --max_steps 0 trained a step; a finished run run again trained a step more and saved again
    "max-steps-0": Case("sft_qwen2.py", sft("--max_steps", "0"), 2, "--max_steps 0 trains nothing"),
    "finished-run-again": Case("sft_qwen2.py", sft("--save_strategy", "steps", "--save_steps", "1"), 0,
                               "{tmp}/out holds this run, finished: 2 of 2 steps trained and the final model saved; "
                               "nothing to do", setup=first_run, check=unchanged),
    # 10, 11
    "save-total-limit-0": Case("sft_qwen2.py", sft("--save_total_limit", "0"), 2,
                               "--save_total_limit 0: keep at least 1 checkpoint"),
    "fp16-on-cpu": Case("sft_qwen2.py", sft("--fp16", "true"), 2,
                        "--fp16 on CPU: there is no fp16 autocast there"),
    # 13: legal but odd
    "max-len-negative": Case("sft_qwen2.py", sft("--max_len", "-1"), 2, "--max_len -1: must be at least 1"),
    "warmup-longer-than-the-run": Case("sft_qwen2.py", sft("--warmup_steps", "5"), 0,
                                       "warning: --warmup_steps: a warmup of 5 steps is not shorter than the run's 2 "
                                       "steps, so the learning rate never reaches --learning_rate 1e-05 (at most 20% "
                                       "of it)", check=final_model_saved),
    # 1 (its shared part): the polynomial schedule divides by the steps after the warmup; lr_end above the peak
    "polynomial-warmup-of-every-step": Case("sft_qwen2.py", sft("--lr_scheduler_type", "polynomial",
                                                                "--warmup_steps", "2"), 0,
                                            "warning: --warmup_steps: a warmup of all 2 steps leaves the polynomial "
                                            "schedule no step to decay over; warmup cut to 1 steps",
                                            check=final_model_saved),
    "polynomial-one-step-default-warmup": Case("sft_qwen2.py", sft("--lr_scheduler_type", "polynomial", "--max_steps",
                                                                   "1"), 0, "warmup cut to 0 steps",
                                               check=final_model_saved),
    "polynomial-lr-below-lr-end": Case("sft_qwen2.py", sft("--lr_scheduler_type", "polynomial", "--learning_rate",
                                                           "1e-8"), 2,
                                       "--learning_rate 1e-08 is not above the polynomial schedule's lr_end 1e-07"),
    # a prompt to answer longer than the model trains on (its batch's KV cache grows with it)
    "predict-prompt-above-max-len": Case("sft_qwen2.py", [
        "--model_name_or_path", "{model}", "--predict_file", "{eval}", "--output_dir", "{tmp}/out", "--use_cpu",
        "--report_to", "none", "--max_len", "20"], 2, "tokens with the chat template, more than --max_len 20; "
        "shorten it, or raise --max_len"),
    # beyond the list (a sweep of sft_qwen2.py's own and the shared flags)
    "epochs-0": Case("sft_qwen2.py", sft("--max_steps", "-1", "--num_train_epochs", "0"), 2,
                     "--num_train_epochs 0 trains nothing"),
    "learning-rate-negative": Case("sft_qwen2.py", sft("--learning_rate", "-1"), 2,
                                   "--learning_rate -1: must not be negative"),
    "weight-decay-negative": Case("sft_qwen2.py", sft("--weight_decay", "-1"), 2,
                                  "--weight_decay -1: must not be negative"),
    "save-steps-0": Case("sft_qwen2.py", sft("--save_strategy", "steps", "--save_steps", "0"), 2,
                         "--save_steps 0 with --save_strategy steps: must be positive"),
    "logging-steps-negative": Case("sft_qwen2.py", sft("--logging_steps", "-1"), 2,
                                   "--logging_steps -1 with --logging_strategy steps: must be positive"),
    "save-best": Case("sft_qwen2.py", sft("--save_strategy", "best"), 2,
                      "--save_strategy best writes only new bests, so the checkpoint a stop signal"),
    "seed-negative": Case("sft_qwen2.py", sft("--seed", "-1"), 2, "--seed -1: must be in 0 .. 2**32 - 1"),
    "prefetch-0": Case("sft_qwen2.py", sft("--dataloader_num_workers", "1", "--dataloader_prefetch_factor", "0"), 2,
                       "--dataloader_prefetch_factor 0: must be at least 1"),
    "max-bad-steps-0": Case("sft_qwen2.py", sft("--max_bad_steps", "0"), 2, "--max_bad_steps 0: must be at least 1"),
    "pad-multiple-0": Case("sft_qwen2.py", sft("--pad_to_multiple_of", "0"), 2,
                           "--pad_to_multiple_of 0: must be at least 1"),
    "lora-rank-0": Case("sft_qwen2.py", sft("--use_peft", "--lora_r", "0"), 2, "--lora_r 0 / --lora_alpha 32"),
    "lora-dropout-1.5": Case("sft_qwen2.py", sft("--use_peft", "--lora_dropout", "1.5"), 2,
                             "--lora_dropout 1.5: must be in [0, 1)"),
    "lora-target-typo": Case("sft_qwen2.py", sft("--use_peft", "--lora_target_modules", "q_prjo"), 2,
                             "--lora_target_modules: Target modules {'q_prjo'} not found in the base model"),
    "attention-typo": Case("sft_qwen2.py", sft("--attn_implementation", "sdpa2"), 2,
                           "--attn_implementation sdpa2: not one transformers knows"),
}

# --- token_stats.py ---------------------------------------------------------------------------------------------

def stats(*flags):
    """token_stats.py argv: `flags`, measured in this process (its workers are forked: not from inside pytest)."""
    return ["--num_proc", "1", *flags]


TOKEN_STATS_CASES = {
    # 7: an output that cannot be written fails before the work, not after it
    "plot-into-a-missing-folder": Case("token_stats.py", stats("--demo", "--plot", "{tmp}/no/such/lengths.png"), 2,
                                       "--plot {tmp}/no/such/lengths.png: no folder {tmp}/no/such; create it first"),
    "plot-format-unknown": Case("token_stats.py", stats("--demo", "--plot", "{tmp}/lengths.txt"), 2,
                                "--plot {tmp}/lengths.txt: matplotlib cannot write .txt files"),
    "output-is-a-folder": Case("token_stats.py", stats("--demo", "--output", "{tmp}"), 2,
                               "--output {tmp}: is a folder; give a file name"),
    # 13: --shards and --data together (--data was ignored); SFT data with scorer-only flags
    "shards-and-data": Case("token_stats.py", stats("--shards", "{tmp}/x-{000..003}.tar", "--data", "{train}"), 2,
                            "--shards measures scorer shards, --data SFT files"),
    "num-types-without-shards": Case("token_stats.py", stats("--data", "{train}", "--num_types", "3"), 2,
                                     "--num_types: only with --shards"),
    # 5: --min_pixels above --max_pixels asserted inside qwen_vl_utils
    "min-pixels-above-max": Case("token_stats.py", stats("--shards", "{tmp}/x.tar", "--min_pixels", "4096",
                                                         "--max_pixels", "1024"), 2,
                                 "--min_pixels 4096 is above --max_pixels 1024: no image size satisfies both"),
    # 3, 2
    "gbk-data": Case("token_stats.py", stats("--tokenizer", "{model}", "--data", "{gbk}"), 2,
                     "gbk.jsonl: line 3: not UTF-8"),
    "missing-tokenizer-folder": Case("token_stats.py", stats("--tokenizer", "{tmp}/no/tokenizer", "--data",
                                                             "{train}"), 2,
                                     "cannot load the tokenizer '{tmp}/no/tokenizer' (no such folder)"),
}

# --- several processes (run.sh) ---------------------------------------------------------------------------------

def one_dry_run_of_two(output):
    """One dry run over 2 processes (2 x 4 examples a step), not two runs of one process each."""
    dry = [line for line in output.splitlines() if line.startswith("dry run:")]
    assert len(dry) == 1 and "optimizer steps per epoch of 2 x 4 x 1 examples" in dry[0], dry


LAUNCHER_CASES = {
    # 8: two processes on a machine without a GPU and without --use_cpu trained twice, undistributed
    "two-processes-no-gpu-no-use-cpu": Case("sft_qwen2.py", sft("--dry_run", cpu=False), 0,
                                            "no GPU here: the 2 processes train distributed on the CPU (gloo)",
                                            processes=2, check=lambda tmp, state, output: one_dry_run_of_two(output)),
    "two-processes-flag-refusal": Case("sft_qwen2.py", sft("--gradient_accumulation_steps", "0"), 2,
                                       "--gradient_accumulation_steps 0", processes=2),
    "two-processes-non-utf8": Case("sft_qwen2.py", sft("--train_file", "{gbk}"), 2,
                                   "gbk.jsonl: line 3: not UTF-8", processes=2),
    "two-processes-missing-model": Case("sft_qwen2.py", sft("--model_name_or_path", "{tmp}/nothing"), 2,
                                        "cannot load the tokenizer '{tmp}/nothing' (no such folder)", processes=2),
}


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
    ("train_batch_0", [*SCORER_TRAIN, "--per_device_train_batch_size", "0"], 1, 2, "--per_device_train_batch_size 0"),
    ("accumulation_0", [*SCORER_TRAIN, "--gradient_accumulation_steps", "0"], 1, 2, "--gradient_accumulation_steps 0"),
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

def as_cases(script, rows):
    """The (id, argv, processes, exit code, expected text) rows of a table as {id: Case}."""
    return {name: Case(script, argv, code, expect, processes=processes)
            for name, argv, processes, code, expect in rows}


ALL_CASES = {f"{table}-{name}": case for table, cases in (
    ("sft", SFT_CASES), ("token_stats", TOKEN_STATS_CASES), ("launcher", LAUNCHER_CASES),
    ("scorer", as_cases("train_scorer.py", SCORER_CASES)), ("make_shards", as_cases("make_shards.py", SHARDS_CASES)))
             for name, case in cases.items()}


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_case(name, request, tmp_path, capsys):
    case = ALL_CASES[name]
    argv = fill(case.argv, request, tmp_path)
    expect = fill([case.expect], request, tmp_path)[0]
    state = case.setup(tmp_path, argv) if case.setup else None
    code, output = run_case(case, argv, capsys)
    assert "Traceback" not in output, output[-4000:]
    assert code == case.code, output[-4000:]
    if case.code == 2:
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expect in errors[0], (expect, errors, output[-3000:])
    else:
        assert expect in output, (expect, output[-3000:])
        if case.check:
            case.check(tmp_path, state, output)
