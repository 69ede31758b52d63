"""Supervised fine-tuning of Qwen2(-Instruct) chat models with Hugging Face Trainer; loss on the answers only.

Data: JSON Lines / JSON / Parquet / CSV files, folders of them, a `datasets.save_to_disk` folder or a datasets hub
id (--dataset_split, --dataset_config). Each record is detected as one of the layouts of the README's formats table:
`{"messages": [{"role", "content"}]}` (content a string or text parts), ShareGPT `{"conversations": [{"from",
"value"}]}`, Alpaca `{"instruction", "input", "output"}`, `{"prompt", "completion"}` or `{"query", "answer"}`
(--data_format forces one). Every assistant answer (content + the closing <|im_end|>) is trained; system, user and
role headers are masked.

  # CPU demo: a tiny random model and generated data, no downloads (about a minute); trains, evaluates (with the
  # model's answers to two evaluation prompts each time), and answers the evaluation prompts into predictions.jsonl
  bash run.sh sft_qwen2.py --demo

  # before a long run: the same command with --dry_run encodes all of the data, builds the model without its
  # weights, prints the precision, the memory plan per GPU, examples, tokens and steps, and trains nothing
  bash run.sh sft_qwen2.py --train_file data/train.jsonl --use_peft --dry_run

  # one GPU, Qwen2-7B: LoRA (15.9 GB of weights + adapters + states; the merged model also goes to OUTPUT_DIR/merged)
  python sft_qwen2.py --train_file data/train.jsonl --val_size 0.01 --use_peft --learning_rate 2e-4 --merge_lora

  # one 80 GB+ GPU: full fine-tune, bf16 weights and states with Kahan-compensated AdamW (76.2 GB)
  python sft_qwen2.py --train_file data/train.jsonl --bf16 true --pure_bf16 --per_device_train_batch_size 1

  # every GPU of this node (torchrun via run.sh), LoRA, packed batches
  bash run.sh sft_qwen2.py --train_file data/train.jsonl --use_peft --learning_rate 2e-4 --padding_free

  # two nodes: run this on each, NODE_RANK=0 on the master
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash run.sh sft_qwen2.py --train_file data/train.jsonl \\
      --use_peft --learning_rate 2e-4

  # the answers of a saved model (full, merged, or a LoRA adapter folder on its recorded base) to prompts, one JSON
  # line each, {key, prompt, completion, reference}, in file order, every GPU answering its share
  bash run.sh sft_qwen2.py --model_name_or_path outputs/sft-qwen2 --predict_file prompts.jsonl \\
      --output_dir outputs/sft-qwen2 --max_new_tokens 512

  # every flag can come from one config file instead (keys = flag names); recipes in configs/, e.g. a full
  # fine-tune with fp32 master weights sharded by FSDP2 over 8 GPUs (15.2 GB a GPU)
  bash run.sh sft_qwen2.py configs/sft-qwen2-7b-full-fsdp2-8gpu.yaml

Precision: under bf16 the trained weights are fp32 masters (frozen ones stay bf16); rank 0 prints the policy and a
per-GPU memory plan at start (training_plan.py). Full fine-tuning with fp32 masters needs 16 bytes per parameter
(122 GB for 7B): shard it over several GPUs, or use --use_peft or --pure_bf16.
A run that finds `checkpoint-*` folders in --output_dir resumes from the newest one; the end of training writes
training_curves.png there (loss, learning rate, evaluation loss). With evaluation data, --early_stopping_patience N
stops after N evaluations without a lower eval loss, and --load_best_model_at_end saves the best checkpoint's weights.
Prediction (--predict_file, after training or from a saved model) and --eval_generate answer by generation,
greedy unless --do_sample (generation.py): prompts are records of any training format, a final assistant answer
becoming the reference.
"""

import functools
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, set_seed

from collate import (IGNORE_INDEX, ChatFormat, DataError, encode_prompts, encode_sft_batch, missing_chat_template,
                     sft_collator, to_messages)
from curves import write_training_curves
from data import SFTSource, load_sft_file, record_location, sft_sources
from generation import EvalAnswers, generation_config, load_for_generation, predict, read_prompts, write_predictions
from lean_loss import use_lean_causal_lm_loss
from plumbing import (TrainingDefaults, attention_problem, check_output_dir, demo_dir, fail, fail_together,
                      final_evaluation, leave_process_group, load_pretrained, local_main_first, log, parse_arguments,
                      prepare_demo, settle_best_metric, weights_source)
from reliability import (GracefulStop, MarkComplete, SkipNonFinite, best_model_summary, check_resume_flag,
                         checkpoint_to_resume, early_stopping, exit_if_failed, exit_if_stopped, finished_run,
                         resume_mismatch, run_record, shared_output_problem)
from training_plan import (LoraArguments, add_lora, build_without_weights, check_flags, check_loader_shm,
                           checkpoint_dtype, fit_warmup, half_dtype, load_dtype, load_device, loader_sample_bytes,
                           lora_parameter_count, lora_settings, memory_plan, optimizer_steps, reads_weights,
                           reduce_every_micro_batch, save_final_model, sharding, steps_line, to_base_dtype,
                           use_fsdp_precision, use_precision_policy)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2-7B-Instruct",
                                    metadata={"help": "Hub id or local folder of a Qwen2 chat checkpoint."})
    attn_implementation: str = field(default="sdpa",
                                     metadata={"help": "sdpa, flash_attention_2 or eager."})
    trust_remote_code: bool = field(default=False,
                                    metadata={"help": "Run code from the checkpoint's repo (Qwen2 does not need it)."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Also load pickle weights (.bin), which can run arbitrary code; by default only safetensors."})


@dataclass
class DataArguments(ChatFormat, SFTSource):  # --data_format, --system_prompt, keys; --dataset_split/_config
    train_file: list[str] = field(default=None, metadata={
        "help": "One or more training files, folders of them, datasets folders or datasets hub ids."})
    eval_file: list[str] = field(default=None, metadata={"help": "Evaluation sources, as --train_file (else see "
                                                                 "--val_size)."})
    eval_split: str = field(default=None, metadata={
        "help": "Split read from an --eval_file hub id or saved DatasetDict (default: --dataset_split)."})
    val_size: float = field(default=0.0, metadata={
        "help": "Hold out this share (< 1) or number (>= 1) of training examples for evaluation."})
    max_len: int = field(default=8192, metadata={"help": "Longest sequence in tokens (see token_stats.py)."})
    overflow: str = field(default="truncate", metadata={
        "help": "Longer examples: 'truncate' (cut from the right, dropped if no answer token is left) or 'drop'.",
        "choices": ["truncate", "drop"]})
    padding_free: bool = field(default=None, metadata={
        "help": "Pack each batch into one row without padding (exact: attention stays within each example). "
                "Default: on with flash-attention, whose variable-length kernels make packing free; sdpa and "
                "eager need a (tokens x tokens) mask for a packed row, so there it is opt-in."})
    pad_to_multiple_of: int = field(default=None, metadata={
        "help": "Pad batch length to a multiple of this (default: 8 on GPU for tensor cores, none on CPU)."})
    preprocessing_num_workers: int = field(default=None, metadata={"help": "Processes for encoding the data."})
    demo: bool = field(default=False, metadata={
        "help": "Build a tiny random Qwen2 and demo data in a temporary folder and train a few steps on CPU."})

    def __post_init__(self):  # a config file may give one file as a plain string
        self.train_file, self.eval_file = ([f] if isinstance(f, str) else f for f in (self.train_file, self.eval_file))


@dataclass
class PredictArguments:
    predict_file: str = field(default=None, metadata={
        "help": "Prompts to answer (implies --do_predict): records in any training data format; a record's final "
                "assistant answer, if it has one, is left out of the prompt and kept as the reference."})
    predict_output: str = field(default=None, metadata={
        "help": "Predictions file, JSON Lines, one {key, prompt, completion[, reference]} per record in file order "
                "(default: OUTPUT_DIR/predictions.jsonl)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample the answers (default: greedy)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (with --do_sample)."})
    eval_generate: int = field(default=0, metadata={
        "help": "At each evaluation, print greedy answers to the first N evaluation examples' last prompts (and "
                "log them to TensorBoard as text with --report_to tensorboard)."})


@dataclass
class SFTArguments(TrainingDefaults):
    # Defaults a real full fine-tune wants; any flag overrides them.
    output_dir: str = field(default="outputs/sft-qwen2", metadata={"help": "Checkpoints and the final model."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup: steps, or a share of all steps if < 1."})
    activation_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute activations in backward (gradient checkpointing): much less memory, about 20%% slower."})
    prediction_loss_only: bool = field(default=True, metadata={
        "help": "Evaluate the loss only (gathering 152k-wide logits of every eval token would exhaust memory)."})
    include_num_input_tokens_seen: str = field(default="non_padding", metadata={
        "help": "Count the tokens trained, for the logs and the summary's tokens/s: non_padding (real tokens), all, "
                "or no (one small all-gather per step, negligible next to a real step).",
        "choices": ["non_padding", "all", "no"]})


ARGUMENTS = (ModelArguments, DataArguments, LoraArguments, PredictArguments, SFTArguments)  # flags and config-file keys

DEMO_DIR = demo_dir("sft-qwen2")
# Flags the demo puts before the user's own (so a user flag still wins): tiny model, a few fast steps on CPU.
DEMO_ARGS = [
    "--model_name_or_path", f"{DEMO_DIR}/tiny-qwen2", "--train_file", f"{DEMO_DIR}/train.jsonl",
    "--eval_file", f"{DEMO_DIR}/eval.jsonl", "--output_dir", f"{DEMO_DIR}/output", "--max_len", "256",
    "--max_steps", "24", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "2",
    "--logging_steps", "4", "--eval_strategy", "steps", "--eval_steps", "12", "--eval_on_start", "true",
    "--save_steps", "12", "--use_cpu", "--disable_tqdm", "true", "--eval_generate", "2",
    "--predict_file", f"{DEMO_DIR}/eval.jsonl", "--max_new_tokens", "32",
]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def encode_files(paths, tokenizer, data_args, num_proc, split):
    """Read and encode each source (a folder: each of its files; a hub id or DatasetDict: its `split`); returns
    (dataset, counts). Errors name the file and the line or record.

    Your data: records become chat messages in `collate.to_messages` (layout detected per record, or --data_format;
    keys from --query_key, --answer_key, --messages_key); another record layout is one reader there.
    """
    import datasets

    parts, counts = [], {"examples": 0, "truncated": 0, "dropped": 0}

    def encode(batch, indices, path):
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        try:
            results = encode_sft_batch(records, tokenizer, data_args.max_len, data_args.overflow, data_args)
        except DataError as e:  # record i of this batch -> the file's own line number
            raise DataError(f"{record_location(path, indices[e.index])}: {e.problem}") from None
        kept = [(enc, status) for enc, status in results if enc is not None]
        return {"input_ids": [e["input_ids"] for e, _ in kept], "labels": [e["labels"] for e, _ in kept],
                "length": [len(e["input_ids"]) for e, _ in kept],
                "truncated": [s == "truncated" for _, s in kept]}

    for path in sft_sources(paths):
        raw = load_sft_file(path, functools.partial(to_messages, fmt=data_args), split, data_args.dataset_config)
        enc = raw.map(encode, batched=True, with_indices=True, fn_kwargs={"path": path}, num_proc=num_proc,
                      remove_columns=raw.column_names, desc=f"encoding {os.path.basename(path)}")
        counts["examples"] += len(raw)
        counts["dropped"] += len(raw) - len(enc)
        if len(enc):  # a file whose every example was dropped has no columns at all
            counts["truncated"] += sum(enc["truncated"])
            parts.append(enc.remove_columns("truncated"))
    if not parts:
        return datasets.Dataset.from_dict({"input_ids": [], "labels": [], "length": []}), counts
    return datasets.concatenate_datasets(parts), counts


def check_data_flags(data_args, args):
    """The one-line reason the data flags cannot run, or None: checked with `check_flags`, before any data is read."""
    for flag, least in (("max_len", 1), ("pad_to_multiple_of", 1), ("preprocessing_num_workers", 0)):
        if (value := getattr(data_args, flag)) is not None and value < least:
            return f"--{flag} {value}: must be at least {least}"
    val = data_args.val_size
    if val < 0 or val >= 1 and val != int(val):
        return f"--val_size {val:g}: a share of the training examples (< 1) or a whole number of them"
    if val > 0 and data_args.eval_file:
        return "--val_size and --eval_file: evaluation data comes from one of them; give one"
    asked = [flag for flag, on in (("--eval_strategy " + args.eval_strategy.value, args.eval_strategy != "no"),
                                   ("--eval_on_start", args.eval_on_start),
                                   ("--load_best_model_at_end", args.load_best_model_at_end)) if on]
    if asked and not (data_args.eval_file or val > 0):  # the Trainer's own error is a traceback, or silence
        return f"{asked[0]} needs evaluation data: --eval_file, or --val_size to hold out training examples"
    return None


def show_example(example, tokenizer):
    """One encoded example with the trained part inside ⟪ ⟫, so users can check their template's mask."""
    ids, labels = example["input_ids"], example["labels"]
    pieces, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i])
            pieces.append(text if labels[start] == IGNORE_INDEX else f"⟪{text}⟫")
            start = i
    return (f"--- first training example ({len(ids)} tokens; loss only on the text inside ⟪ ⟫) ---\n"
            + "".join(pieces) + "\n---")


def dry_run_plan(train_ds, eval_ds, args):
    """--dry_run: say what the run would train (examples, prompt and answer tokens, optimizer steps for this many
    processes) after the data was encoded and the precision and memory plans printed; returns the figures."""
    def tokens(ds):  # (prompt, answer): the answer tokens are the trained ones
        answer = sum(sum(1 for t in labels if t != IGNORE_INDEX) for batch in ds.iter(batch_size=1024)
                     for labels in batch["labels"])
        return sum(ds["length"]) - answer, answer

    per_epoch, steps = optimizer_steps(len(train_ds), args)
    plan = {"train_examples": len(train_ds), "train_tokens": tokens(train_ds), "steps_per_epoch": per_epoch,
            "steps": steps, "eval_examples": len(eval_ds) if eval_ds is not None else 0}
    sets = [("training", len(train_ds), plan["train_tokens"])]
    if eval_ds is not None:
        plan["eval_tokens"] = tokens(eval_ds)
        sets.append(("evaluation", len(eval_ds), plan["eval_tokens"]))
    log("dry run: " + "; ".join(f"{n:,} {name} examples, {p + a:,} tokens ({p:,} prompt + {a:,} answer)"
                                for name, n, (p, a) in sets)
        + f"; {steps_line(len(train_ds), args, 'examples')}. Nothing was trained.")
    leave_process_group()
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Prediction: what the model answers (generation.py), after training or from a saved model
# ---------------------------------------------------------------------------------------------------------------

def settle_prediction(predict_args, data_args, args):
    """Refuse prediction flags that cannot work (one line, exit 2, before any model loads); returns the predictions
    file, checked writable now rather than after training, or None without --do_predict."""
    if predict_args.predict_file is not None:
        args.do_predict = True
    elif args.do_predict:
        fail("--do_predict needs --predict_file (the prompts to answer)")
    if predict_args.eval_generate and (args.eval_strategy == "no"
                                       or not (data_args.eval_file or data_args.val_size > 0)):
        fail("--eval_generate answers evaluation examples at each evaluation: it needs --eval_strategy (steps or "
             "epoch) and --eval_file or --val_size")
    if not args.do_predict:
        return None
    path = predict_args.predict_output or os.path.join(args.output_dir, "predictions.jsonl")
    if os.path.isdir(path):
        fail(f"--predict_output {path}: a folder, not a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), "--predict_output")
    return path


def read_predict_file(predict_args, data_args, args, tokenizer):
    """The prompts of --predict_file (generation.read_prompts), read by the local main process first (datasets
    caches the file, the others then read that cache); a bad record, or a prompt longer than --max_len (the longest
    the model trains on, and what bounds the KV cache of a batch), exits 2 on every rank."""
    error = None
    with local_main_first(args):
        try:
            prompts = read_prompts(predict_args.predict_file, data_args)
            lengths = [len(ids) for ids in encode_prompts([row["prompt"] for row in prompts], tokenizer)]
            if (longest := max(lengths, default=0)) > data_args.max_len:
                row = prompts[lengths.index(longest)]
                raise DataError(f"{predict_args.predict_file}: prompt {row['key']}: {longest} tokens with the chat "
                                f"template, more than --max_len {data_args.max_len}; shorten it, or raise --max_len")
        except DataError as e:
            error = e
    if error is not None:
        fail(error, every_rank=True)
    return prompts


def answer_prompts(model, tokenizer, prompts, predict_args, args, path, lockstep=False):
    """Every rank answers its share of `prompts`; process 0 writes them all to `path`. Returns the rows."""
    config = generation_config(tokenizer, predict_args.max_new_tokens, predict_args.do_sample,
                               predict_args.temperature, predict_args.top_p)
    set_seed(args.seed + args.process_index)  # --do_sample: the same --seed and processes, the same answers
    rows = predict(model, tokenizer, prompts, config, args, lockstep, half_dtype(args))
    if args.process_index == 0:
        write_predictions(rows, path)
    shares = [len(prompts[r::args.world_size]) for r in range(args.world_size)]
    log(f"predictions: {len(rows)} answers written to {path} (answered per rank: {shares})")
    return rows


def predict_saved_model(model_args, data_args, predict_args, args, tokenizer, path):
    """--do_predict without --train_file: the model saved at --model_name_or_path (a full or merged save, or a LoRA
    adapter folder on its recorded base) answers --predict_file, each rank its share. Returns the rows."""
    prompts = read_predict_file(predict_args, data_args, args, tokenizer)
    load = dict(dtype=load_dtype(args), attn_implementation=model_args.attn_implementation,
                trust_remote_code=model_args.trust_remote_code)
    try:
        model = load_for_generation(model_args.model_name_or_path, **load,
                                    **weights_source(model_args.model_name_or_path, model_args.allow_pickle))
    except DataError as e:
        fail(e)
    rows = answer_prompts(model.to(args.device), tokenizer, prompts, predict_args, args, path)
    leave_process_group()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Main: data -> model -> trainer (the stock one; the collator and the loss hook are ours) -> run -> summary
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    start = time.time()
    parser = HfArgumentParser(ARGUMENTS)
    model_args, data_args, lora_args, predict_args, args = parse_arguments(parser, argv, demo_args=DEMO_ARGS)
    reduce_every_micro_batch(args)  # with --fsdp: no unsharded gradients held across micro-batches
    predictions = settle_prediction(predict_args, data_args, args)  # the predictions file, or None
    if not data_args.train_file and predictions is None:
        fail("--train_file is required (or --demo, or --predict_file to answer prompts with a saved model)")
    if problem := (check_flags(args, lora_args) or check_data_flags(data_args, args)
                   or attention_problem(model_args.attn_implementation)):
        fail(problem, every_rank=True)  # every rank meets it at the same point
    settle_best_metric(args, {"eval_loss": False})  # the evaluation computes the loss only (prediction_loss_only)
    check_output_dir(args.output_dir)
    if problem := shared_output_problem(args):
        fail(problem, every_rank=True)
    # DataLoader workers hand batches over in /dev/shm: too small for them, say so now, not at a bus error
    loader_shm = check_loader_shm(args, args.per_device_train_batch_size * loader_sample_bytes(data_args.max_len))
    if data_args.demo:
        import demo
        prepare_demo(DEMO_DIR, demo.build_sft_demo, args)
    check_resume_flag(args)

    # Data: the local main process encodes first and caches, the others then load that cache. A data error is
    # raised on every rank (the others meet it too), so no rank is left waiting at a barrier.
    tokenizer = load_pretrained("AutoTokenizer", model_args.model_name_or_path, "--model_name_or_path",
                                trust_remote_code=model_args.trust_remote_code)
    if problem := missing_chat_template(tokenizer, model_args.model_name_or_path):
        fail(problem)
    if not data_args.train_file:  # prediction alone
        return predict_saved_model(model_args, data_args, predict_args, args, tokenizer, predictions)
    error = None
    with local_main_first(args):  # the others wait as long as the encoding takes, whatever --ddp_timeout says
        try:
            train_ds, counts = encode_files(data_args.train_file, tokenizer, data_args,
                                            data_args.preprocessing_num_workers, data_args.dataset_split)
            eval_ds = None
            if data_args.eval_file:
                eval_ds, _ = encode_files(data_args.eval_file, tokenizer, data_args,
                                          data_args.preprocessing_num_workers,
                                          data_args.eval_split or data_args.dataset_split)
            elif data_args.val_size > 0:
                n = data_args.val_size if data_args.val_size >= 1 else data_args.val_size * len(train_ds)
                if max(1, int(n)) >= len(train_ds):
                    raise DataError(f"--val_size {data_args.val_size:g}: holds out {max(1, int(n))} of the "
                                    f"{len(train_ds)} training examples, leaving none to train on; hold out fewer")
                split = train_ds.train_test_split(test_size=max(1, int(n)), seed=args.seed)
                train_ds, eval_ds = split["train"], split["test"]
        except DataError as e:
            error = e
    fail_together(str(error) if error is not None else None)  # every rank met it: one line, all exit together
    log(f"data: {counts['examples']} examples read, {len(train_ds)} for training, {counts['truncated']} truncated, "
        f"{counts['dropped']} dropped (max_len {data_args.max_len}, overflow {data_args.overflow})"
        + (f"; {len(eval_ds)} for evaluation" if eval_ds is not None else ""))
    if len(train_ds) == 0:
        fail(f"{', '.join(data_args.train_file)}: every example was dropped (max_len {data_args.max_len}: no answer "
             f"token fits after the prompt and the chat template; token_stats.py shows the lengths)", every_rank=True)
    if eval_ds is not None and len(eval_ds) == 0:
        fail(f"{', '.join(data_args.eval_file or data_args.train_file)}: no usable evaluation example (max_len "
             f"{data_args.max_len}, overflow {data_args.overflow})", every_rank=True)
    log(show_example(train_ds[0], tokenizer))
    # a bad prompt exits now, not after training
    prompts = read_predict_file(predict_args, data_args, args, tokenizer) if predictions else None
    fit_warmup(args, optimizer_steps(len(train_ds), args)[1])

    # Model: loaded in the half dtype of the run; what trains becomes fp32 master weights (training_plan.py). A dry
    # run, and under --fsdp with cpu_ram_efficient_loading every rank but the first (accelerate broadcasts rank 0's
    # weights to them as it shards), build the architecture alone, on the meta device.
    path = model_args.model_name_or_path
    base_dtype = checkpoint_dtype(path, trust_remote_code=model_args.trust_remote_code)
    load = dict(dtype=load_dtype(args), attn_implementation=model_args.attn_implementation,
                trust_remote_code=model_args.trust_remote_code)
    source = weights_source(path, model_args.allow_pickle)  # on every rank: a refusal exits all of them together
    if reads_weights(args):
        model = AutoModelForCausalLM.from_pretrained(path, **load, **source, device_map=load_device(args))
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        model = build_without_weights(lambda: AutoModelForCausalLM.from_config(config, **load), load["dtype"])
    # Packed rows rely on position_ids to keep examples apart, which the model only does without a KV cache.
    model.config.use_cache = False
    if not args.use_liger_kernel:  # Liger brings its own fused linear + cross-entropy
        use_lean_causal_lm_loss(model)  # logits only at answer tokens, in chunks: never (tokens x 152k) at once
    head = model.lm_head  # the output layer (peft leaves it as it is: not a target)
    lora = lora_settings(model, lora_args, "model")  # the decoder's linear layers; lm_head is outside it
    adapters = lora_parameter_count(model, lora)
    if lora_args.use_peft:
        model = add_lora(model, lora)
        if not args.use_liger_kernel and hasattr(model.get_base_model().lm_head, "lora_A"):
            fail("--lora_target_modules: the lean loss reads lm_head.weight directly and would skip an adapter "
                 "there; leave lm_head out")
    optimizer = use_precision_policy(model, args)
    memory_plan(model, args, adapters, lean_loss=None if args.use_liger_kernel else head, loader_shm=loader_shm)
    if args.dry_run:
        return dry_run_plan(train_ds, eval_ds, args)

    # Trainer
    pad_multiple = data_args.pad_to_multiple_of
    if pad_multiple is None and not args.use_cpu and torch.cuda.is_available():
        pad_multiple = 8
    flash = model_args.attn_implementation.startswith("flash")
    padding_free = flash if data_args.padding_free is None else data_args.padding_free
    collator = sft_collator(tokenizer, padding_free, pad_multiple, flash_attn_kwargs=flash)
    stop = GracefulStop()  # SIGTERM / SIGINT: a checkpoint at the step every rank agrees on, then exit 143 / 130
    skip = SkipNonFinite(args.max_bad_steps)  # a NaN/inf gradient: no update; too many in a row: save, exit 2
    trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, optimizer_cls_and_kwargs=optimizer,
                      callbacks=[stop, skip, MarkComplete(), *early_stopping(args)])
    use_fsdp_precision(trainer, args)  # with --fsdp: bf16 compute, fp32 gradient reduction
    # FSDP2 / ZeRO-3 gather each layer from every rank in every forward pass: every rank generates in lockstep
    sharded = sharding(args)
    lockstep = args.world_size > 1 and sharded is not None and "weights" in sharded[2]
    if predict_args.eval_generate:
        trainer.add_callback(EvalAnswers(
            eval_ds.select(range(min(predict_args.eval_generate, len(eval_ds)))), tokenizer,
            generation_config(tokenizer, predict_args.max_new_tokens), trainer.callback_handler.callbacks,
            lockstep, half_dtype(args)))

    # Run: train (resuming from the newest complete checkpoint in output_dir), save, evaluate
    resume = checkpoint_to_resume(args)
    if resume and (problem := resume_mismatch(resume, run_record(model, args.world_size))):
        fail(problem, every_rank=True)
    if done := finished_run(args):  # the same command again: nothing to train, nothing to overwrite
        log(done)
        leave_process_group()
        return None
    result = trainer.train(resume_from_checkpoint=resume)
    exit_if_stopped(stop, args)
    exit_if_failed(skip, args)
    # Model (LoRA: the adapter, fp32: small) + tokenizer, HF format, the fp32 masters back in the checkpoint's dtype
    save_final_model(trainer, model, args.output_dir, base_dtype, keep=("lora_",))
    trainer.save_state()
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(final_evaluation(trainer))
    if prompts:
        metrics["predict_samples"] = len(answer_prompts(trainer.model, tokenizer, prompts, predict_args, args,
                                                        predictions, lockstep))
    curves = write_training_curves(trainer.state.log_history, args.output_dir) if args.should_save else None
    if lora_args.merge_lora:  # base weights + adapters in one model that plain from_pretrained loads
        merged = model.merge_and_unload()
        to_base_dtype(merged, base_dtype)
        if args.should_save:
            merged.save_pretrained(os.path.join(args.output_dir, "merged"))
            tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.metrics = metrics  # for callers of main()

    # Summary: the Trainer's own token counts (all ranks; tokens/s of this run, as of the last log)
    speed = next((h["train_tokens_per_second"] for h in reversed(trainer.state.log_history)
                  if "train_tokens_per_second" in h), None)
    log(f"summary: {len(train_ds)} examples used ({counts['truncated']} truncated, {counts['dropped']} dropped), "
        f"{trainer.state.num_input_tokens_seen} tokens trained in {trainer.state.global_step} steps, "
        f"wall {time.time() - start:.1f}s, " + (f"{speed:.0f} tokens/s, " if speed else "")
        + f"final train loss {metrics['train_loss']:.4f}"
        + (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
        + f"; {'adapter' if lora_args.use_peft else 'model'} saved to {args.output_dir}"
        + (f" (merged model in {args.output_dir}/merged)" if lora_args.merge_lora else "")
        + (f"; curves in {curves}" if curves else "")
        + (f"; {best}" if (best := best_model_summary(trainer)) else ""))
    leave_process_group()  # every rank is here: leave together
    return trainer


if __name__ == "__main__":
    main()
