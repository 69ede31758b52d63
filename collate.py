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
    """Bad user data (file, record or field). Scripts print it as one line and exit with code 2."""


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
            raise DataError(f"record {i}: {e}") from None
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

def parse_arguments(parser, argv=None):
    """Parse flags, or a single `.yaml`/`.yml`/`.json` config file given in their place (keys = flag names)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
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
