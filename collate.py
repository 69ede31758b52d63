"""The one shared module: example encoding, batch collation and the small helpers every script needs.

Pure functions and small classes only: no Trainer, no argument parsing, no exit policy. Errors in user data
raise `DataError` with a message naming the key and the problem; the scripts add the file and line and exit 2.
"""

import json
import os
from pathlib import Path

import torch

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad user data (file, record or field). Scripts print it as one line and exit with code 2.

    `index` is the position of the offending record in the batch being encoded, when there is one, so a script
    can turn it into the file's own line number.
    """

    def __init__(self, problem, index=None):
        super().__init__(problem, index)  # both in args: the error survives pickling out of map() workers
        self.problem, self.index = problem, index

    def __str__(self):
        return self.problem if self.index is None else f"record {self.index}: {self.problem}"


# ----------------------------------------------------------------------------------------------------------------
# Reading SFT data
# ----------------------------------------------------------------------------------------------------------------

SFT_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_sft_file(path, check_record=None):
    """One SFT data source as a `datasets.Dataset`: a .jsonl/.json/.parquet/.csv file or a `save_to_disk` folder.

    The fast Arrow readers do the work; only when one fails on JSON do we re-read the file in Python, checking each
    record with `check_record` (e.g. `to_messages`), to say which line is broken and why: Arrow's message names
    neither the line nor the key (a number where a string was expected fails type inference, for instance).
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - any failure here means "not a saved dataset"
            raise DataError(f"{path}: not a folder written by datasets.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split")
            ds = ds["train"]
    else:
        fmt = SFT_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unknown data format {p.suffix!r} (use .jsonl, .json, .parquet, .csv or a folder)")
        if p.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        except Exception as e:  # noqa: BLE001 - Arrow raises many types; the message is what the user needs
            if fmt == "json":
                _check_json_file(p, check_record)
            raise DataError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no records")
    return ds


def _check_json_file(p, check_record):
    """Raise a DataError naming the first bad line (JSON Lines) or record (one JSON array) of `p`."""
    with open(p, "rb") as f:
        if f.read(1).lstrip() == b"[":  # one JSON array
            f.seek(0)
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {e.lineno}: malformed JSON: {e.msg}") from None
            located = [(f"record {i + 1}", r) for i, r in enumerate(records)] if isinstance(records, list) else []
        else:
            f.seek(0)
            located = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        located.append((f"line {lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}: line {lineno}: malformed JSON: {e.msg}") from None
    for where, record in located:
        try:
            if check_record is not None:
                check_record(record)
            elif not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}")
        except DataError as e:
            raise DataError(f"{p}: {where}: {e}") from None


def record_location(path, index):
    """How to point a user at record `index` (0-based) of `path`: a line number for JSON Lines, else a row."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        with open(p, "rb") as f:  # blank lines are skipped by the reader, so count the non-blank ones
            seen = -1
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    seen += 1
                    if seen == index:
                        return f"{path}: line {lineno}"
    return f"{path}: record {index + 1}"


# ----------------------------------------------------------------------------------------------------------------
# Encoding one conversation: chat template + answer-only labels
# ----------------------------------------------------------------------------------------------------------------

def to_messages(record, system_prompt=None, query_key="query", answer_key="answer", messages_key="messages"):
    """A record (`{query, answer}` or `{messages: [...]}`) as a validated list of chat messages."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    messages = record.get(messages_key)
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise DataError(f"key '{messages_key}': expected a non-empty list of messages")
        for i, m in enumerate(messages):
            where = f"key '{messages_key}[{i}]'"
            if not isinstance(m, dict):
                raise DataError(f"{where}: expected an object with 'role' and 'content'")
            if m.get("role") not in ROLES:
                raise DataError(f"{where}: unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}.content: expected a string, got {type(m.get('content')).__name__}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        for key in (query_key, answer_key):
            if record.get(key) is None:
                raise DataError(f"missing key '{key}' (or '{messages_key}')")
            if not isinstance(record[key], str):
                raise DataError(f"key '{key}': expected a string, got {type(record[key]).__name__}")
        messages = [{"role": "user", "content": record[query_key]},
                    {"role": "assistant", "content": record[answer_key]}]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"key '{messages_key}': no assistant message to learn from")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def chat_renderer(tokenizer):
    """`render(messages, add_generation_prompt)`: the tokenizer's chat template applied exactly as
    `apply_chat_template(messages, tokenize=False)` applies it to plain `{role, content}` messages, minus that call's
    per-conversation conversions and copies (made for rich inputs we never pass), which cost a third of the encoding.
    """
    template = tokenizer.get_chat_template()
    try:  # the template transformers compiles (same sandbox, filters and globals), cached by transformers
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: the public call, slower, same text
        return lambda messages, add_generation_prompt: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    compiled = _compile_jinja_template(template)
    variables = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes the template besides messages

    def render(messages, add_generation_prompt):
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    return render


def _answer_spans(messages, full, render, eos):
    """Character spans of each assistant answer (content + closing eos) in `full`, the rendered conversation.

    The prompt of answer j is the conversation before it rendered with the generation prompt; its turn is the
    conversation up to and including it (for the last message that is `full` itself, so a single-turn record costs
    one extra render). Both must be prefixes of `full`, else the template rewrites earlier turns and no mask can
    be derived from prefixes.
    """
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:j], True)
        turn = full if j == len(messages) - 1 else render(messages[:j + 1], False)
        if not (full.startswith(prompt) and full.startswith(turn) and len(prompt) <= len(turn)):
            raise DataError("the tokenizer's chat template does not render conversations prefix by prefix "
                            "(it rewrites earlier turns), so the answer mask cannot be derived")
        end = turn.rfind(eos, len(prompt))
        spans.append((len(prompt), end + len(eos) if end >= 0 else len(turn.rstrip())))
    return spans


def encode_sft_batch(records, tokenizer, max_len=None, overflow="truncate", system_prompt=None,
                     query_key="query", answer_key="answer", messages_key="messages"):
    """Encode many records at once. Returns a list of `(encoded | None, status)` with status in
    {"ok", "truncated", "dropped"}; `encoded` is `{"input_ids", "labels"}` (labels -100 outside answers).

    Each conversation is rendered once, plus once per answer prefix (see _answer_spans), then cut where each answer
    starts into segments (prompt | answer + what follows up to the next answer | ...); ONE tokenizer call encodes
    every segment of the batch and an example's ids are its segments' ids in order. Tokenizing the prompt apart
    from the answer is what the model sees at inference, and it gives the same ids as tokenizing the whole
    conversation except where an answer's first characters would merge with the end of its prompt into one token
    (an answer starting with a newline after "assistant\n"): there the prompt keeps its inference tokens.
    Each answer ends with the eos token (<|im_end|>), a special token: the answer ends on a token boundary, the text
    after it tokenizes as it does in the whole conversation, and the end is found by counting eos tokens
    (_answer_end).
    `max_len=None` keeps every example whole (token_stats measures untruncated lengths).
    Raises DataError naming the record index, key and problem.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', not {overflow!r}")
    render, eos = chat_renderer(tokenizer), tokenizer.eos_token
    segments, conversations = [], []
    for i, record in enumerate(records):
        try:
            messages = to_messages(record, system_prompt, query_key, answer_key, messages_key)
            full = render(messages, False)
            spans = _answer_spans(messages, full, render, eos)
        except DataError as e:
            raise DataError(e.problem, index=i) from None
        cuts = [0] + [start for start, _ in spans] + [len(full)]
        segments += [full[a:b] for a, b in zip(cuts, cuts[1:])]
        conversations.append((full, spans, cuts))

    pieces, results = iter(_token_ids(tokenizer, segments)), []
    for full, spans, cuts in conversations:
        ids = next(pieces)
        labels = [IGNORE_INDEX] * len(ids)
        for (start, end), stop in zip(spans, cuts[2:]):
            piece = next(pieces)
            split = _answer_end(piece, full, start, end, stop, eos, tokenizer.eos_token_id)
            if split is None:  # rare: tokenize the answer and what follows it apart
                answer, rest = _token_ids(tokenizer, [full[start:end], full[end:stop]])
                piece, split = answer + rest, len(answer)
            ids += piece
            labels += piece[:split] + [IGNORE_INDEX] * (len(piece) - split)
        results.append(_apply_overflow(ids, labels, max_len, overflow))
    return results


def _answer_end(piece, full, start, end, stop, eos, eos_id):
    """Number of tokens of `piece` (the ids of full[start:stop]) that belong to the answer full[start:end], which
    ends with the m-th `eos` of the segment; None when that cannot be read off the ids: no eos at the answer's end,
    or the segment's eos strings and eos tokens do not correspond one to one (e.g. split_special_tokens)."""
    m = full.count(eos, start, end)
    if (eos_id is None or m == 0 or not full.endswith(eos, start, end)
            or piece.count(eos_id) != full.count(eos, start, stop)
            or any(eos[:k] == eos[-k:] for k in range(1, len(eos)))):  # a self-overlapping eos would miscount
        return None
    at = -1
    for _ in range(m):
        at = piece.index(eos_id, at + 1)
    return at + 1


def _token_ids(tokenizer, texts):
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, ~30% fewer instructions. Exact shortcuts only:
    - ONE batched call of the Rust backend, without character offsets (nothing here needs them) and without the
      per-text conversion into a BatchEncoding; a call of the tokenizer on "" first puts the backend in the
      state that call would (no truncation, no padding, its special-token handling);
    - texts already in NFC skip an NFC normalizer (Qwen's), which would only copy them unchanged. The backend's
      normalizer is switched off for that call and restored after it, so the tokenizer must not be used by
      another thread meanwhile (datasets.map and DataLoader workers are processes: unaffected).
    """
    import unicodedata

    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python tokenizer
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    tokenizer("", add_special_tokens=False)
    normalizer = backend.normalizer
    if not isinstance(normalizer, normalizers.NFC):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    is_nfc = [unicodedata.is_normalized("NFC", t) for t in texts]
    backend.normalizer = None
    try:
        nfc = iter(backend.encode_batch_fast([t for t, n in zip(texts, is_nfc) if n], add_special_tokens=False))
    finally:
        backend.normalizer = normalizer
    rest = iter(backend.encode_batch_fast([t for t, n in zip(texts, is_nfc) if not n], add_special_tokens=False))
    return [(next(nfc) if n else next(rest)).ids for n in is_nfc]


def _apply_overflow(ids, labels, max_len, overflow):
    if max_len is None or len(ids) <= max_len:
        return {"input_ids": ids, "labels": labels}, "ok"
    if overflow == "drop":
        return None, "dropped"
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # label 0 is never predicted (labels shift by one)
        return None, "dropped"
    return {"input_ids": ids, "labels": labels}, "truncated"


def encode_sft_example(record, tokenizer, max_len, overflow="truncate", system_prompt=None,
                       query_key="query", answer_key="answer", messages_key="messages"):
    """Encode one record: `{"input_ids": [...], "labels": [...]}` (equal lengths), or None when it is dropped.

    Loss is on every assistant answer plus the `<|im_end|>` closing it; system, user and role headers get -100.
    `overflow="truncate"` cuts to `max_len` from the right (dropped if no answer token is left), `"drop"` drops
    any example longer than `max_len`.
    """
    return encode_sft_batch([record], tokenizer, max_len, overflow, system_prompt,
                            query_key, answer_key, messages_key)[0][0]


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------

def sft_collator(tokenizer, padding_free=False, pad_to_multiple_of=None, flash_attn_kwargs=False):
    """The SFT batch builder: padded to the longest example, or padding-free (one packed row).

    Padded: ids padded with the pad token, labels with -100, plus an attention mask (transformers'
    DataCollatorForSeq2Seq). Padding-free: examples concatenated into one row with `position_ids` restarting at
    0 for each; the first label of every example becomes -100 so no example learns to predict the next one, and
    attention stays within each example (the model must run with `use_cache=False`; see DataCollatorWithFlattening).
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_flash_attn_kwargs=flash_attn_kwargs)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------
# Helpers every script needs
# ----------------------------------------------------------------------------------------------------------------

def parse_arguments(parser, argv=None, demo_args=()):
    """Parse flags, or a single `.yaml`/`.yml`/`.json` config file given in their place (keys = flag names).

    With `--demo` among the flags, `demo_args` go first, so the user's own flags still win.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        argv = list(demo_args) + argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise DataError(f"{argv[0]}: config file not found")
        try:
            if path.endswith(".json"):
                return parser.parse_json_file(path)
            return parser.parse_yaml_file(path)
        except ValueError as e:  # unknown keys etc.
            raise DataError(f"{argv[0]}: {e}") from None
    return parser.parse_args_into_dataclasses(args=argv)


def auto_precision():
    """"bf16" on a GPU that supports it, "fp16" on other GPUs, "fp32" on CPU (never guess from the GPU's name)."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def fail(message, code=2):
    """Print one line to stderr and exit: the house rule for bad input."""
    import sys

    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------------------------
# Memory-lean causal-LM loss
# ----------------------------------------------------------------------------------------------------------------

class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), computed `chunk` rows at a time.

    Qwen2's 152k vocabulary makes the (tokens x vocab) fp32 logits the largest tensor of a step (10 GB at 4 x 4096
    tokens), and the stock loss keeps several of them. Here each chunk's logits live only inside the loop, in fp32
    for an exact log-softmax, and the gradients are computed in the same pass (softmax - one_hot is known once the
    logits are), so backward only scales them: the head costs the same three matmuls as the stock path.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        w = weight.to(hidden.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits (fp64 stays fp64, for tests)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_grad else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            logp = torch.log_softmax((h @ w.T).to(acc), dim=-1)  # one fused pass; the logits die here
            loss -= logp.gather(1, t[:, None]).sum()
            if need_grad:
                p = logp.exp_()  # softmax, in place: no second chunk-sized buffer
                p[torch.arange(len(t), device=t.device), t] -= 1
                p = p.to(hidden.dtype)
                grad_h[s:s + chunk] = p @ w
                grad_w.addmm_(p.T.to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None


def chunked_linear_cross_entropy(hidden, weight, targets, chunk=None):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` without ever holding all the logits.

    `chunk` rows at a time (default: about 256 MB of fp32 logits per chunk). Exact to fp32 rounding.
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps every parameter in the graph (DDP needs that)
    chunk = chunk or max(64, (64 << 20) // weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)


def use_lean_causal_lm_loss(model, chunk=None):
    """Make `model(..., labels=...)` compute the loss from the hidden states of labelled positions only, in chunks.

    Prompt and padding positions have label -100: their logits would be computed and thrown away, and they are
    most of a chat batch. Without labels (generation, inference) the model's own forward runs unchanged. The loss
    follows transformers' contract: summed over labelled tokens, divided by `num_items_in_batch` when the Trainer
    passes it (gradient accumulation, token averaging across devices), else by this batch's labelled tokens.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original_forward = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None,
                **kwargs):
        if labels is None:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    **kwargs)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **kwargs).last_hidden_state
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # position i predicts i+1
        keep = targets != IGNORE_INDEX
        loss = chunked_linear_cross_entropy(hidden[keep], model.lm_head.weight, targets[keep], chunk)
        denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        return CausalLMOutputWithPast(loss=loss / denominator)

    model.forward = forward
    return model


# ----------------------------------------------------------------------------------------------------------------
# Steps every training script takes the same way
# ----------------------------------------------------------------------------------------------------------------

def resolve_mixed_precision(args):
    """Fill unset `args.bf16`/`args.fp16` (None) from the hardware, before TrainingArguments validates them."""
    if args.bf16 is None and args.fp16 is None:
        precision = "fp32" if args.use_cpu else auto_precision()
        args.bf16, args.fp16 = precision == "bf16", precision == "fp16"
    args.bf16, args.fp16 = bool(args.bf16), bool(args.fp16)


def prepare_demo(args, demo_dir, build):
    """Rebuild the demo's model and data in `demo_dir` (`build(demo_dir)`), once per node, other ranks waiting.

    A fresh folder each time: a demo run is a new run, not a resume of the last one.
    """
    import shutil

    with args.main_process_first(local=True, desc="building the demo"):
        if args.local_process_index == 0:
            shutil.rmtree(demo_dir, ignore_errors=True)
            build(demo_dir)


def last_checkpoint_to_resume(args, log=print):
    """`--resume_from_checkpoint` if given, else the newest `checkpoint-*` in `output_dir` (None: start afresh)."""
    from transformers.trainer_utils import get_last_checkpoint

    resume = args.resume_from_checkpoint
    if resume is None and os.path.isdir(args.output_dir):
        resume = get_last_checkpoint(args.output_dir)
        if resume:
            log(f"resuming from {resume}")
    return resume

# ----------------------------------------------------------------------------------------------------------------
# VL half: webdataset shards of multi-image samples -> one processor output per sample -> batches (train_scorer.py)
# ----------------------------------------------------------------------------------------------------------------

VL_IMAGE_PATCH_SIZE = 16  # Qwen3-VL's ViT patch; qwen_vl_utils defaults to Qwen2.5-VL's 14, which mis-sizes images
_IMAGE_MEMBER = r"^(\d+)\.([a-z0-9]+)$"  # "0.jpg", "1.png", ...: the image's index, then its format


def _split_top_level_commas(spec):
    """Split "a,b{0,1}.tar" on the commas outside braces: ["a", "b{0,1}.tar"]."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in parts + [current] if p.strip()]


def expand_shards(spec):
    """The shard list a `--*_shards` value names, in order and without repeats.

    `spec` mixes brace patterns (`data/train-{000000..000099}.tar`), globs (`data/*.tar`) and comma lists. Local
    paths must exist; URLs (`pipe:...`, `http://...`) are passed through unchecked. An empty spec, a glob that matches
    nothing, or a named file that does not exist raise DataError: none of them is a run anyone meant to start.
    """
    import glob

    import braceexpand

    items = _split_top_level_commas(spec or "")
    if not items:
        raise DataError("empty shard list")
    shards = []
    for item in items:
        for path in braceexpand.braceexpand(item):
            if "://" in path or path.startswith("pipe:"):
                shards.append(path)
            elif any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f"{path}: pattern matches no file")
                shards += matches
            elif not os.path.isfile(path):
                raise DataError(f"{path}: no such shard file")
            else:
                shards.append(path)
    return list(dict.fromkeys(shards))


def read_vl_sample(sample, num_types=None, with_labels=True):
    """Check and decode one webdataset sample (`{"json": bytes, "0.jpg": bytes, ...}`).

    Returns `(prompt, images, score, type)`: PIL RGB images in index order; score and type are None when
    `with_labels` is False (prediction data needs no labels). Raises DataError naming the problem.
    """
    import io
    import math
    import re

    from PIL import Image

    if "json" not in sample:
        raise DataError("no .json member")
    try:
        record = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"malformed json: {e}") from None
    if not isinstance(record, dict):
        raise DataError(f"json: expected an object, got {type(record).__name__}")
    fields = {"prompt": (str,)}
    if with_labels:
        fields.update(score=(int, float), type=(int,))
    for name, types in fields.items():
        value = record.get(name)
        if value is None:
            raise DataError(f"json: missing field '{name}'")
        if not isinstance(value, types) or isinstance(value, bool):
            raise DataError(f"json: field '{name}': expected {types[-1].__name__}, got {type(value).__name__}")
    score = kind = None
    if with_labels:
        score, kind = float(record["score"]), record["type"]
        if not math.isfinite(score):
            raise DataError(f"json: field 'score' is {record['score']}")
        if num_types is not None and not 0 <= kind < num_types:
            raise DataError(f"json: field 'type' is {kind}, outside 0..{num_types - 1} (--num_types {num_types})")

    members = {}
    for name in sample:
        m = re.match(_IMAGE_MEMBER, name)
        if m:
            index = int(m.group(1))
            if index in members:
                raise DataError(f"two files for image {index}: .{members[index]} and .{name}")
            members[index] = name
    if sorted(members) != list(range(len(members))):
        missing = min(set(range(len(members) + 1)) - set(members))
        raise DataError(f"image {missing} is missing (found {', '.join('.' + members[i] for i in sorted(members))})")
    images = []
    for index in range(len(members)):
        try:
            with Image.open(io.BytesIO(sample[members[index]])) as image:
                images.append(image.convert("RGB"))  # convert() decodes the whole file: corrupt data fails here
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise DataError(f"image .{members[index]}: cannot decode ({type(e).__name__}: {e})") from None
    return record["prompt"], images, score, kind


def vl_messages(images, prompt, min_pixels=None, max_pixels=None):
    """One user turn: the images in order, then the prompt (each image carries its pixel bounds for qwen_vl_utils)."""
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    content = [{"type": "image", "image": image, **bounds} for image in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]


def encode_vl_example(images, prompt, processor, min_pixels=None, max_pixels=None):
    """One sample's processor output (tensors with batch dim 1), as a scorer sees it.

    The chat template ends with the generation prompt, so the last token is where the model would start its
    answer: its hidden state summarises the images and the prompt. `process_vision_info` resizes each image to a
    multiple of 32 px within the pixel bounds; the processor must then not resize again.
    """
    from qwen_vl_utils import process_vision_info

    messages = vl_messages(images, prompt, min_pixels, max_pixels)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    resized, _ = process_vision_info(messages, image_patch_size=VL_IMAGE_PATCH_SIZE)
    return processor(text=[text], images=resized, do_resize=False, return_tensors="pt")


def collate_vl(features, pad_token_id):
    """Batch per-sample processor outputs exactly as one processor call over the batch would (left padding).

    `input_ids` are left-padded with `pad_token_id`, `attention_mask` and `mm_token_type_ids` with 0, so every row
    ends with a real token. `pixel_values` and `image_grid_thw` are concatenated along dim 0 in sample order (the
    model walks one grid iterator over the whole batch; stacking breaks on different image sizes or counts);
    text-only samples contribute none, and a batch without images has neither key. `score_labels` (float) and
    `type_labels` (long) are stacked when every feature has them; `key`s come back as the list `keys`.
    """
    if not features:
        raise ValueError("collate_vl needs at least one feature")
    width = max(f["input_ids"].shape[-1] for f in features)
    batch = {}
    for name, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if all(name in f for f in features):
            rows = [f[name].reshape(-1) for f in features]
            batch[name] = torch.stack([torch.cat([row.new_full((width - len(row),), pad), row]) for row in rows])
    with_images = [f for f in features if f.get("pixel_values") is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in with_images])
    for name, dtype in (("score_labels", torch.float32), ("type_labels", torch.long)):
        if all(f.get(name) is not None for f in features):
            batch[name] = torch.stack([torch.as_tensor(f[name], dtype=dtype).reshape(()) for f in features])
    if all("key" in f for f in features):
        batch["keys"] = [f["key"] for f in features]
    return batch


# Reading shards: each rank and DataLoader worker its own share ------------------------------------------------

class SampleEncoder:
    """Raw webdataset sample -> one processor output + labels + key (runs in the DataLoader workers)."""

    def __init__(self, processor, num_types, with_labels, min_pixels, max_pixels, max_len):
        self.processor, self.num_types, self.with_labels = processor, num_types, with_labels
        self.min_pixels, self.max_pixels, self.max_len = min_pixels, max_pixels, max_len

    def __call__(self, sample):
        prompt, images, score, kind = read_vl_sample(sample, self.num_types, self.with_labels)
        try:
            feature = dict(encode_vl_example(images, prompt, self.processor, self.min_pixels, self.max_pixels))
        except (ValueError, OSError) as e:  # e.g. qwen_vl_utils refuses extreme aspect ratios
            raise DataError(f"cannot encode: {e}") from None
        if feature["input_ids"].shape[-1] > self.max_len:
            raise DataError(f"{feature['input_ids'].shape[-1]} tokens, more than --max_len {self.max_len}")
        return {**feature, "score_labels": score, "type_labels": kind, "key": sample["__key__"]}


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from webdataset shards, split over `world_size` ranks x DataLoader workers ("slots").

    With at least as many shards as slots, each slot reads its own shards; with fewer, every slot reads all of them
    and keeps every n-th sample, so even one shard splits exactly over two ranks. Exact mode (`batches_per_epoch`
    None): each slot yields its samples once, in order. Training mode: each slot cycles through its share,
    reshuffled every pass, and the workers of a rank yield `batches_per_epoch` full batches between them, so every
    rank runs the same number of steps. A batch is `collate_vl`'s dict plus `order` ((shard, index) per sample)
    and `bad_samples` (dicts naming shard, key and problem) that the main process counts or turns into an error;
    `stop_at_bad` ends an exact stream at its first bad sample (no point reading on when the run will stop).
    """

    def __init__(self, shards, encoder, batch_size, pad_token_id, rank=0, world_size=1, batches_per_epoch=None,
                 seed=0, shuffle_buffer=0, stop_at_bad=False):
        super().__init__()
        self.shards, self.encoder, self.batch_size, self.pad_token_id = shards, encoder, batch_size, pad_token_id
        self.rank, self.world_size, self.batches_per_epoch = rank, world_size, batches_per_epoch
        self.seed, self.shuffle_buffer, self.stop_at_bad, self.epoch = seed, shuffle_buffer, stop_at_bad, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):  # batches per rank per epoch; exact streams have no length known in advance
        if self.batches_per_epoch is None:
            raise TypeError("an exact stream has no length")
        return self.batches_per_epoch

    def _raw(self, shard_ids, slot, slots, sample_level):
        """(shard id, index in shard, raw sample) of this slot, shards in the given order."""
        from webdataset.tariterators import tarfile_samples

        n = 0
        for sid in shard_ids:
            try:
                for i, sample in enumerate(tarfile_samples([{"url": self.shards[sid]}])):
                    if not sample_level or n % slots == slot:
                        yield sid, i, sample
                    n += 1
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: tarfile and gopen raise many types
                raise DataError(f"{self.shards[sid]}: cannot read as a tar shard ({type(e).__name__}: {e})") from None

    def __iter__(self):
        import random

        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        ids = list(range(len(self.shards)))
        if self.batches_per_epoch is not None:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(ids)  # the same permutation in every slot
        sample_level = len(ids) < slots
        mine = ids if sample_level else ids[slot::slots]
        if self.batches_per_epoch is None:
            return self._batches(self._raw(mine, slot, slots, sample_level), None)
        quota = len(range(worker, self.batches_per_epoch, workers))  # batch j of the epoch comes from worker j % n
        return self._batches(self._cycle(mine, slot, slots, sample_level), quota) if quota else iter(())

    def _cycle(self, mine, slot, slots, sample_level):
        """Endless training samples of one slot: pass after pass over its share, each pass in a new order.

        Slots split by sample keep the epoch's shard order in every pass: the n-th sample then always belongs to the
        same slot, so the ranks' shares stay disjoint even when one rank wraps around before another.
        """
        import random

        rng, n_pass = random.Random(f"{self.seed}/{self.epoch}/{slot}"), 0
        while True:
            order = list(mine)
            if not sample_level:
                random.Random(f"{self.seed}/{self.epoch}/{slot}/{n_pass}").shuffle(order)
            yield from _shuffled(self._raw(order, slot, slots, sample_level), self.shuffle_buffer, rng)
            yield None, mine, None  # end of a pass: no shard, the pass's shard ids, no sample
            n_pass += 1

    def _batches(self, items, quota):
        features, order, bad, made, good_in_pass = [], [], [], 0, 0
        try:
            for sid, index, sample in items:
                if sample is None:  # a training pass over this slot's share ended; `index` holds its shard ids
                    if not good_in_pass:
                        raise DataError(f"{', '.join(self.shards[i] for i in index) or 'training shards'}: no usable "
                                        f"sample for rank {self.rank} (all bad, or fewer than ranks x workers)")
                    good_in_pass = 0
                    continue
                try:
                    features.append(self.encoder(sample))
                    order.append((sid, index))
                    good_in_pass += 1
                except DataError as e:
                    bad.append({"shard": self.shards[sid], "key": sample.get("__key__"), "problem": str(e)})
                    if self.stop_at_bad:
                        break
                if len(features) == self.batch_size:
                    yield {**collate_vl(features, self.pad_token_id), "order": order, "bad_samples": bad}
                    features, order, bad, made = [], [], [], made + 1
                    if made == quota:
                        return
        except DataError as e:  # unreadable shard or no samples at all: fatal whatever the policy
            bad.append({"problem": str(e), "fatal": True})
        if features or bad:
            yield {**(collate_vl(features, self.pad_token_id) if features else {}), "order": order, "bad_samples": bad}


def _shuffled(items, size, rng):
    """Shuffle a stream through a buffer of `size` items."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def count_samples(shards):
    """Samples in local shards, from their tar headers (no image is decoded)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    total = 0
    for shard in shards:
        if not os.path.isfile(shard):
            raise DataError(f"{shard}: not a local file, so its samples cannot be counted (pass --epoch_samples)")
        try:
            with tarfile.open(shard) as tar:
                keys = [base_plus_ext(m.name)[0] for m in tar if m.isreg()]
        except tarfile.TarError as e:
            raise DataError(f"{shard}: cannot read as a tar shard ({e})") from None
        keys = [k for k in keys if k is not None]
        total += sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
    return total
