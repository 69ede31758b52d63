"""What the model answers: prompts read as training reads its data, batched left-padded `generate` over the ranks
(every prompt once, in file order) into predictions.jsonl, a saved model (full, LoRA adapter, merged) loaded to
answer, and the answers to the first evaluation examples at each evaluation (--eval_generate).

Left padding changes nothing in the answers: the model reads each row's positions from its attention mask, so a
prompt answered in a padded batch gets the ids it gets alone (tests/test_generation.py compares them token by token).
"""

import contextlib
import json
import math
import os

import torch
from transformers import GenerationConfig, TrainerCallback

from collate import IGNORE_INDEX, DataError, encode_prompts, prompt_messages
from data import load_sft_file, record_lines, record_location
from plumbing import log, wait_for_every_rank


def generation_config(tokenizer, max_new_tokens=256, do_sample=False, temperature=1.0, top_p=1.0):
    """How to answer: greedy unless `do_sample`, at most `max_new_tokens`, ending at the tokenizer's eos (Qwen's
    <|im_end|>, the end of an assistant turn), with a KV cache (whatever model.config.use_cache says for training).
    A checkpoint's own generation_config.json (Qwen's: sampling at temperature 0.7 with a repetition penalty) is not
    used: the flags say what runs."""
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=pad, use_cache=True, **sampling)


def load_for_generation(path, **load):
    """A saved model to answer with: a full or merged save with AutoModelForCausalLM, a LoRA adapter folder
    (adapter_config.json, as sft_qwen2.py --use_peft saves it) as its recorded base with the adapter on top.
    `load`: from_pretrained keyword arguments (dtype, attn_implementation, ...), for the base too."""
    from transformers import AutoModelForCausalLM

    adapter = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter):
        return AutoModelForCausalLM.from_pretrained(path, **load)
    from peft import PeftModel

    with open(adapter) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise DataError(f"{adapter}: no base_model_name_or_path: which model the adapter belongs to is unknown")
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **load), path)


def read_prompts(path, fmt):
    """Every record of `path` (any SFT data source) as a prediction row without its completion, in file order:
    `key` (the record's own `key`, else its line number, 1-based, or its record number where there are no lines),
    `prompt` (its messages before the final assistant answer) and, where the record holds that answer,
    `reference`. A bad record raises DataError naming its line."""
    ds = load_sft_file(path, lambda record: prompt_messages(record, fmt))
    lines = record_lines(path) or range(1, len(ds) + 1)
    rows = []
    for i, record in enumerate(ds):
        try:
            prompt, reference = prompt_messages(record, fmt)
        except DataError as e:
            raise DataError(f"{record_location(path, i)}: {e.problem}") from None
        key = record.get("key")
        rows.append({"key": lines[i] if key is None else key, "prompt": prompt}
                    | ({"reference": reference} if reference is not None else {}))
    return rows


def generate(model, prompt_ids, config, batch_size, device, dtype=None, lockstep=False, calls=None):
    """The answer ids of each prompt (lists of ids; each answer up to and including the eos that ended it),
    `batch_size` prompts a `generate` call, left-padded, longest prompts first (least padding).

    `lockstep`: the model is sharded (FSDP2, ZeRO-3), so each forward pass gathers every layer from every rank and
    every rank must run as many as the others: `generate(synced_gpus=True)` keeps a rank whose answers are done
    running passes until every rank's are, and `calls` (the most calls any rank needs) makes a rank with fewer
    prompts run one-token stand-in calls, whose answers are dropped. `dtype`: autocast dtype (mixed precision), or
    None. The model's train/eval mode is restored afterwards (it answers in eval mode: no dropout)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    answers = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        for b in range(len(batches) if calls is None else calls):
            chunk = batches[b] if b < len(batches) else []
            rows = [prompt_ids[i] for i in chunk] or [[config.pad_token_id]]
            width = max(map(len, rows))
            input_ids = torch.tensor([[config.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                     synced_gpus=lockstep)
            for i, ids in zip(chunk, out[:, width:].tolist()):
                end = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))  # after it: padding
                answers[i] = ids[:end]
    finally:
        model.train(was_training)
    return answers


def predict(model, tokenizer, rows, config, args, lockstep=False, dtype=None):
    """`rows` (read_prompts) with their `completion` (decoded, special tokens skipped), in the same order, on every
    rank: row i is answered by rank i % world_size, in batches of --per_device_eval_batch_size, and the answers
    are gathered. `lockstep`: see `generate`; every rank then makes as many calls as the rank with the most rows.
    Unsharded, ranks finish at different times (answer lengths differ): at real sizes the last can come hours
    after the first, far beyond a collective's timeout, so they meet in `wait_for_every_rank` before the gather."""
    from accelerate.utils import gather_object

    rank, world, batch = args.process_index, args.world_size, args.per_device_eval_batch_size
    mine = rows[rank::world]
    answers = generate(model, encode_prompts([r["prompt"] for r in mine], tokenizer), config, batch, args.device,
                       dtype, lockstep, calls=math.ceil(math.ceil(len(rows) / world) / batch) if lockstep else None)
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    done = [(rank + world * j, {"key": r["key"], "prompt": r["prompt"], "completion": t}
             | ({"reference": r["reference"]} if "reference" in r else {}))
            for j, (r, t) in enumerate(zip(mine, texts))]
    if world > 1:
        wait_for_every_rank()
        done = sorted(gather_object(done), key=lambda d: d[0])
    return [row for _, row in done]


def write_predictions(rows, path):
    """predictions.jsonl: one JSON object per row, in order (UTF-8, non-ASCII text as it is)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def last_prompt(example):
    """(prompt ids, answer ids) of an encoded example's last answer: the ids before the last labelled run, and
    that run (the answer as trained, its eos included)."""
    labels = example["labels"]
    end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return example["input_ids"][:start], example["input_ids"][start:end]


class EvalAnswers(TrainerCallback):
    """--eval_generate N: at each evaluation, greedy answers to the last prompt of the first N evaluation examples
    (as encoded for training), printed by rank 0 and, where TensorBoard reporting is on, logged there as text
    (tag `eval_generate`) so the answers can be watched changing. Every rank answers the same prompts: a handful
    costs little, and a sharded model (`lockstep`) needs every rank in every forward pass."""

    def __init__(self, examples, tokenizer, config, callbacks, lockstep=False, dtype=None):
        self.prompts, self.references = zip(*(last_prompt(e) for e in examples))
        self.tokenizer, self.config, self.callbacks = tokenizer, config, callbacks  # callbacks: the Trainer's list
        self.lockstep, self.dtype = lockstep, dtype

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        answers = generate(model, list(self.prompts), self.config, args.per_device_eval_batch_size, args.device,
                           self.dtype, self.lockstep)
        def text(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        shown = [f"example {i} prompt: ...{text(p)[-200:]!r}\n  answer: {text(a)!r}\n  reference: {text(r)!r}"
                 for i, (p, a, r) in enumerate(zip(self.prompts, answers, self.references))]
        log(f"eval_generate, step {state.global_step}:\n" + "\n".join(shown))
        from transformers.integrations import TensorBoardCallback

        writer = next((c.tb_writer for c in self.callbacks if isinstance(c, TensorBoardCallback)), None)
        if writer is not None and state.is_world_process_zero:
            writer.add_text("eval_generate", "\n\n".join(f"```\n{s}\n```" for s in shown), state.global_step)
            writer.flush()
