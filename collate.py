"""Record -> example -> batch: SFT record layouts -> chat messages, chat encoding and answer mask, prompts to answer,
SFT collators, VL sample checks and encoding, collate_vl.

Pure functions and small classes only: no file reading, no argument parsing, no process exit, no Trainer, no streams.
Errors in user data raise `DataError` naming the key and the problem; the callers add the file, line or shard.
"""

import json
import math
import re
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad user data (file, record or field). Scripts print it as one line and exit with code 2.

    `index` is the position of the offending record in the batch being encoded, when there is one, so a caller
    can turn it into the file's own line number.
    """

    def __init__(self, problem, index=None):
        super().__init__(problem, index)  # both in args: the error survives pickling out of worker processes
        self.problem, self.index = problem, index

    def __str__(self):
        return self.problem if self.index is None else f"record {self.index}: {self.problem}"


# ----------------------------------------------------------------------------------------------------------------
# SFT: one conversation -> input_ids + labels (loss on the answers only)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ChatFormat:
    """How an SFT record becomes chat messages: its layout, its keys, and the system prompt of records without one.
    These are flags of sft_qwen2.py and token_stats.py (their argument dataclasses derive from this one), so both
    read alike."""
    data_format: str = field(default="auto", metadata={
        "help": "Record layout: auto (detected per record, see README 'Data'), or one for every record.",
        "choices": ["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "query_answer"]})
    system_prompt: str = field(default=None, metadata={
        "help": "System prompt for records without one (default: the chat template's own)."})
    query_key: str = field(default="query", metadata={"help": "Key of the question in {query, answer} records."})
    answer_key: str = field(default="answer", metadata={"help": "Key of the answer in {query, answer} records."})
    messages_key: str = field(default="messages", metadata={"help": "Key of the message list in chat records."})


# Role names as each layout writes them -> chat roles. ShareGPT writes human/gpt; some exports write user/assistant.
MESSAGE_ROLES = {role: role for role in ROLES}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def record_layouts(fmt):
    """The keys each layout's records hold, its answer's key last, in the order auto-detection tries them: the
    richer layouts first, so a record carrying an extra column (a `prompt` copy beside its `messages`, say) is read
    by its whole conversation."""
    return {"messages": (fmt.messages_key,), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion"), "query_answer": (fmt.query_key, fmt.answer_key)}


def detect_format(record, fmt, require_answer=True):
    """The layout `record` is read as: --data_format when one is forced; else the first layout whose keys the record
    all holds (without the answer's key when `require_answer` is false: a prompt to generate from), else the first
    whose leading key it holds (its reader then names the missing key). A key holding None counts as absent: Arrow
    gives every record of a file every column, None where the record had none."""
    layouts = record_layouts(fmt)
    if fmt.data_format != "auto":
        if fmt.data_format not in layouts:
            raise ValueError(f"data_format must be 'auto' or one of {', '.join(layouts)}, not {fmt.data_format!r}")
        return fmt.data_format
    held = {k for k, v in record.items() if v is not None}
    for name, keys in layouts.items():
        if held.issuperset(keys if require_answer else keys[:1]):
            return name
    for name, keys in layouts.items():
        if keys[0] in held:
            return name
    tried = ", ".join(f"{name} ({', '.join(map(repr, keys))})" for name, keys in layouts.items())
    raise DataError(f"matches none of the formats tried: {tried}; the record has "
                    + (f"keys {', '.join(map(repr, sorted(held)))}" if held else "no keys with a value"))


def to_messages(record, fmt=None, require_answer=True):
    """A record of any layout (`fmt`, a ChatFormat: forced or detected layout, keys, system prompt) as validated chat
    messages `[{"role", "content"}, ...]`; every layout of one conversation gives the same messages.

    `require_answer=False` reads a prompt to generate from: the answer (last assistant message, `output`,
    `completion`, the answer key) may be missing; when present it is kept.
    Your data: another record layout is one more reader in READERS, its keys in record_layouts and its name in
    ChatFormat.data_format's choices.
    """
    fmt = fmt or ChatFormat()
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    name = detect_format(record, fmt, require_answer)
    messages = READERS[name](record, name, record_layouts(fmt)[name], require_answer)
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{name} record: no assistant message to learn from")
    if fmt.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": fmt.system_prompt}] + messages
    return messages


def _missing(key, name, keys):
    return DataError(f"missing key '{key}' ({name} records have {', '.join(map(repr, keys))})")


def _value(record, key, name, keys, required=True):
    """record[key], a string; None when it is absent and not `required` (layout `name` needs `keys`)."""
    value = record.get(key)
    if value is None:
        if required:
            raise _missing(key, name, keys)
        return None
    if not isinstance(value, str):
        raise DataError(f"key '{key}': expected a string, got {type(value).__name__}")
    return value


def _text(content, where):
    """A message's content: a string, or a list of `{"type": "text", "text": ...}` parts joined with no separator."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: expected a string, got {type(content).__name__}")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(f"{where}[{j}]: " + (f"a {kind!r} part; SFT trains on text parts only"
                                                  if isinstance(kind, str) and kind != "text" else
                                                  "expected a text part {\"type\": \"text\", \"text\": ...}"))
    return "".join(part["text"] for part in content)


def _message_list(record, key, name, keys, role_key="role", content_key="content", roles=MESSAGE_ROLES):
    items = record.get(key)
    if items is None:
        raise _missing(key, name, keys)
    if not isinstance(items, list) or not items:
        raise DataError(f"key '{key}': expected a non-empty list of messages")
    messages = []
    for i, m in enumerate(items):
        where = f"key '{key}[{i}]'"
        if not isinstance(m, dict):
            raise DataError(f"{where}: expected an object with '{role_key}' and '{content_key}'")
        if m.get(role_key) not in roles:
            raise DataError(f"{where}: unknown role {m.get(role_key)!r} (expected one of {', '.join(roles)})")
        messages.append({"role": roles[m[role_key]], "content": _text(m.get(content_key), f"{where}.{content_key}")})
    return messages


def _exchange(query, answer):
    """A user turn and its answer, when there is one (None: a prompt to generate from)."""
    return [{"role": "user", "content": query}] + ([{"role": "assistant", "content": answer}]
                                                   if answer is not None else [])


def _read_messages(record, name, keys, require_answer):
    return _message_list(record, keys[0], name, keys)


def _read_sharegpt(record, name, keys, require_answer):
    return _message_list(record, keys[0], name, keys, "from", "value", SHAREGPT_ROLES)


def _read_alpaca(record, name, keys, require_answer):
    """LLaMA-Factory's reading: `system` (when not empty) first, then `history` ([[query, answer], ...]) as earlier
    turns, then the instruction with a non-empty `input` after a newline, then `output`."""
    instruction = _value(record, "instruction", name, keys)
    extra, system = _value(record, "input", name, keys, False), _value(record, "system", name, keys, False)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"key 'history': expected a list of [query, answer] pairs, got {type(history).__name__}")
    messages = [{"role": "system", "content": system}] if system else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"key 'history[{i}]': expected a [query, answer] pair of strings")
        messages += _exchange(*pair)
    query = "\n".join(t for t in (instruction, extra) if t)
    return messages + _exchange(query, _value(record, "output", name, keys, require_answer))


def _read_prompt_completion(record, name, keys, require_answer):
    """TRL's prompt-completion records: two strings (a user turn and its answer), or two message lists (the
    conversational form: the prompt's messages, then the completion's)."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if prompt is None:
        raise _missing("prompt", name, keys)
    if completion is None and require_answer:
        raise _missing("completion", name, keys)
    if isinstance(prompt, list) != isinstance(completion, list) and completion is not None:
        raise DataError("keys 'prompt' and 'completion': expected two strings or two lists of messages")
    if isinstance(prompt, list):
        return _message_list(record, "prompt", name, keys) + (_message_list(record, "completion", name, keys)
                                                        if completion is not None else [])
    completion = _value(record, "completion", name, keys, require_answer)
    return _exchange(_value(record, "prompt", name, keys), completion)


def _read_query_answer(record, name, keys, require_answer):
    return _exchange(_value(record, keys[0], name, keys), _value(record, keys[1], name, keys, require_answer))


READERS = {"messages": _read_messages, "sharegpt": _read_sharegpt, "alpaca": _read_alpaca,
           "prompt_completion": _read_prompt_completion, "query_answer": _read_query_answer}


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


def encode_sft_batch(records, tokenizer, max_len=None, overflow="truncate", fmt=None):
    """Encode many records at once. Returns a list of `(encoded | None, status)` with status in
    {"ok", "truncated", "dropped"}; `encoded` is `{"input_ids", "labels"}` (labels -100 outside answers). `fmt`: the
    records' ChatFormat (default: `{query, answer}` / `{messages}` keys, the template's own system prompt).

    Each conversation is rendered once, plus once per answer prefix (see _answer_spans), then cut where each answer
    starts into segments (prompt | answer + what follows up to the next answer | ...); ONE tokenizer call encodes
    every segment of the batch and an example's ids are its segments' ids in order. Tokenizing the prompt apart
    from the answer is what the model sees at inference, and it gives the same ids as tokenizing the whole
    conversation except where an answer's first characters would merge with the end of its prompt into one token
    (an answer starting with a newline after "assistant\n"): there the prompt keeps its inference tokens.
    Each answer ends with the eos token (<|im_end|>), a special token: the answer ends on a token boundary, the text
    after it tokenizes as it does in the whole conversation, and the end is found by counting eos tokens
    (_answer_end). `max_len=None` keeps every example whole (token_stats measures untruncated lengths).
    Raises DataError naming the record index, key and problem.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', not {overflow!r}")
    eos, (render, token_ids) = tokenizer.eos_token, fast_encoding(tokenizer)
    segments, conversations = [], []
    for i, record in enumerate(records):
        try:
            messages = to_messages(record, fmt)
            full = render(messages, False)
            spans = _answer_spans(messages, full, render, eos)
        except DataError as e:
            raise DataError(e.problem, index=i) from None
        cuts = [0] + [start for start, _ in spans] + [len(full)]
        segments += [full[a:b] for a, b in zip(cuts, cuts[1:])]
        conversations.append((full, spans, cuts))

    pieces, results = iter(token_ids(segments)), []
    for full, spans, cuts in conversations:
        ids = next(pieces)
        labels = [IGNORE_INDEX] * len(ids)
        for (start, end), stop in zip(spans, cuts[2:]):
            piece = next(pieces)
            split = _answer_end(piece, full, start, end, stop, eos, tokenizer.eos_token_id)
            if split is None:  # rare: tokenize the answer and what follows it apart
                answer, rest = token_ids([full[start:end], full[end:stop]])
                piece, split = answer + rest, len(answer)
            ids += piece
            labels += piece[:split] + [IGNORE_INDEX] * (len(piece) - split)
        results.append(apply_overflow(ids, labels, max_len, overflow))
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


# ----------------------------------------------------------------------------------------------------------------
# Speed shortcuts: the one place with clever code. Exact (tests/test_collate.py::TestFastEncoding compares them with
# the plain calls) and needed: bench/token_stats_speed.py measured token_stats_speedup_vs_loop 2.49 with them and
# 1.63 with the plain calls (2026-12-02, the 2-core CPU machine, same data and tokenizer).
# ----------------------------------------------------------------------------------------------------------------

def missing_chat_template(tokenizer, source):
    """Why `tokenizer` (or processor) from `source` cannot encode chats, or None: the encoding renders every example
    with its chat template, and a base model's tokenizer may have none."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return (f"{source}: its tokenizer has no chat template (a base model's?); use the -Instruct checkpoint's "
            f"tokenizer, or put the template in the folder (chat_template.jinja, or chat_template in "
            f"tokenizer_config.json)")


def fast_encoding(tokenizer):
    """`(render, token_ids)`: exact shortcuts of the two tokenizer calls SFT encoding makes most.

    - `render(messages, add_generation_prompt)` == `tokenizer.apply_chat_template(messages, tokenize=False,
      add_generation_prompt=...)` for plain `{role, content}` messages: the template transformers compiles (same
      sandbox, filters and globals; `_compile_jinja_template` is private, so a transformers without it gets the
      public call), rendered without that call's per-conversation conversions and copies, made for rich inputs
      never passed here.
    - `token_ids(texts)` == `tokenizer(texts, add_special_tokens=False)["input_ids"]`: ONE batched call of the Rust
      backend without character offsets and without the per-text BatchEncoding (a call of the tokenizer on "" first
      puts the backend in the state that call would: no truncation, no padding); texts already in NFC skip an NFC
      normalizer (Qwen's), which would only copy them. The normalizer is switched off for that call and restored
      after it, so the tokenizer must not be used by another thread meanwhile (datasets.map and DataLoader workers
      are processes: unaffected).
    """
    import unicodedata

    from tokenizers import normalizers

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled, variables = _compile_jinja_template(tokenizer.get_chat_template()), dict(tokenizer.special_tokens_map)

        def render(messages, add_generation_prompt):
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
    except ImportError:
        def render(messages, add_generation_prompt):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    backend = getattr(tokenizer, "backend_tokenizer", None)

    def token_ids(texts):
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

    return render, token_ids


def apply_overflow(ids, labels, max_len, overflow):
    """`(encoded | None, status)` of one encoded example under `max_len`: "truncate" cuts from the right and drops
    the example when no answer token is left; "drop" drops any example longer than `max_len`."""
    if max_len is None or len(ids) <= max_len:
        return {"input_ids": ids, "labels": labels}, "ok"
    if overflow == "drop":
        return None, "dropped"
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # label 0 is never predicted (labels shift by one)
        return None, "dropped"
    return {"input_ids": ids, "labels": labels}, "truncated"


def encode_sft_example(record, tokenizer, max_len, overflow="truncate", fmt=None):
    """Encode one record: `{"input_ids": [...], "labels": [...]}` (equal lengths), or None when it is dropped.

    Loss is on every assistant answer plus the `<|im_end|>` closing it; system, user and role headers get -100.
    """
    return encode_sft_batch([record], tokenizer, max_len, overflow, fmt)[0][0]


def prompt_messages(record, fmt=None):
    """A record to answer, read as training reads it (`to_messages`, any layout, the answer optional): `(prompt,
    reference)`, the messages before its final assistant answer and that answer's text; a record of a question alone
    (no answer, or messages ending on the user's turn) has no reference (None)."""
    messages = to_messages(record, fmt, require_answer=False)
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"] or None
    return messages, None


def encode_prompts(prompts, tokenizer):
    """Token ids of each prompt (a message list) followed by the chat template's generation prompt: exactly the
    ids training gives the text before an answer (`encode_sft_batch` tokenizes that segment on its own)."""
    render, token_ids = fast_encoding(tokenizer)
    return token_ids([render(messages, True) for messages in prompts])


def sft_collator(tokenizer, padding_free=False, pad_to_multiple_of=None, flash_attn_kwargs=False):
    """The SFT batch builder: padded to the longest example, or padding-free (one packed row).

    Padded (transformers' DataCollatorForSeq2Seq), right padding:
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
        -> input_ids [[5, 6, 7], [8, 9, PAD]], labels [[-100, 6, 7], [-100, 9, -100]],
           attention_mask [[1, 1, 1], [1, 1, 0]]
    Padding-free (DataCollatorWithFlattening): one row, `position_ids` restarting at 0 for each example, the first
    label of every example -100 so no example learns to predict the next one; attention stays within each example
    (the model must run with `use_cache=False`):
        -> input_ids [[5, 6, 7, 8, 9]], labels [[-100, 6, 7, -100, 9]], position_ids [[0, 1, 2, 0, 1]]
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_flash_attn_kwargs=flash_attn_kwargs)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------
# VL (train_scorer.py, token_stats.py): one webdataset sample -> its parts -> one processor output -> batches
# ----------------------------------------------------------------------------------------------------------------

VL_IMAGE_PATCH_SIZE = 16  # Qwen3-VL's ViT patch; qwen_vl_utils defaults to Qwen2.5-VL's 14, which mis-sizes images
IMAGE_MEMBER = re.compile(r"^(\d+)\.([a-z0-9]+)$")  # "0.jpg", "1.png", ...: the image's index, then its format

# Your data: the label fields of a scorer sample's KEY.json and their kind. "value": a finite number (a regression
# head, MSE); "class": an int in 0..num_<name>s-1 (a classification head, cross-entropy). train_scorer.py gives each
# field a head (`<name>_head`), a weighted loss (`loss_<name>`, weight `<name>_weight`), metrics and a prediction.
LABELS = {"score": "value", "type": "class"}


@dataclass
class VLSample:
    """A checked scorer sample: its key, prompt, raw images `[(member, bytes)]` in index order, labels by name."""
    key: str
    prompt: str
    images: list
    labels: dict


def parse_vl_sample(sample, classes=None, with_labels=True):
    """Check one webdataset sample (`{"__key__", "json": bytes, "0.jpg": bytes, ...}`) without decoding images.

    `classes` maps each "class" label to its number of classes (a label outside the range is refused; a label
    missing from `classes` is only type-checked). `with_labels=False`: prediction data, which needs no labels.
    Raises DataError naming the problem; training and token_stats.py reject exactly the same samples.
    """
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
        fields.update({name: (int, float) if kind == "value" else (int,) for name, kind in LABELS.items()})
    for name, types in fields.items():
        value = record.get(name)
        if value is None:
            raise DataError(f"json: missing field '{name}'")
        if not isinstance(value, types) or isinstance(value, bool):
            raise DataError(f"json: field '{name}': expected {types[-1].__name__}, got {type(value).__name__}")
    labels = {name: record[name] for name in fields if name != "prompt"}
    for name, value in labels.items():
        n = (classes or {}).get(name)
        if LABELS[name] == "value" and not math.isfinite(value):
            raise DataError(f"json: field '{name}' is {value}")
        if LABELS[name] == "class" and n is not None and not 0 <= value < n:
            raise DataError(f"json: field '{name}' is {value}, outside 0..{n - 1} (--num_{name}s {n})")
        labels[name] = float(value) if LABELS[name] == "value" else value

    members = {}
    for name in sample:
        m = IMAGE_MEMBER.match(name)
        if m:
            index = int(m.group(1))
            if index in members:
                raise DataError(f"two files for image {index}: .{members[index]} and .{name}")
            members[index] = name
    if sorted(members) != list(range(len(members))):
        missing = min(set(range(len(members) + 1)) - set(members))
        raise DataError(f"image {missing} is missing (found {', '.join('.' + members[i] for i in sorted(members))})")
    images = [(members[i], sample[members[i]]) for i in range(len(members))]
    return VLSample(sample.get("__key__"), record["prompt"], images, labels)


def open_image(member, data, decode=True):
    """A PIL image of one image member: decoded to RGB (`decode`), or only its header read (for its size).

    Decoded exactly as Qwen's own inference path decodes a file (`qwen_vl_utils.process_vision_info`, then the
    processor), so the scorer is trained on the pixels it will be served: its `to_rgb` composites RGBA over white
    (a plain convert("RGB") keeps whatever colour transparent pixels hold) and converts every other mode with PIL.
    The EXIF orientation tag is not applied, there or here: an image is used as stored, and its header size (what
    token_stats.py counts) is the size that is encoded. Rotate such files when making shards if that is wrong."""
    import io

    from PIL import Image
    from qwen_vl_utils.vision_process import to_rgb

    try:
        image = Image.open(io.BytesIO(data))
        return to_rgb(image) if decode else image  # to_rgb decodes the whole file: corrupt data fails here
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise DataError(f"image .{member}: cannot decode ({type(e).__name__}: {e})") from None


def pixel_bounds(min_pixels=None, max_pixels=None, patch_size=VL_IMAGE_PATCH_SIZE):
    """(min_pixels, max_pixels) as `resized_size` applies them: None is qwen_vl_utils' own bound."""
    from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM, IMAGE_MIN_TOKEN_NUM, SPATIAL_MERGE_SIZE

    factor = patch_size * SPATIAL_MERGE_SIZE
    return (IMAGE_MIN_TOKEN_NUM * factor ** 2 if min_pixels is None else min_pixels,
            IMAGE_MAX_TOKEN_NUM * factor ** 2 if max_pixels is None else max_pixels)


def pixel_bounds_problem(min_pixels=None, max_pixels=None):
    """Why --min_pixels / --max_pixels cannot resize any image (qwen_vl_utils asserts on it inside the data
    stream), or None: the flags checked before any data is read."""
    low, high = pixel_bounds(min_pixels, max_pixels)
    if low < 1 or high < 1:
        return f"--min_pixels {low} / --max_pixels {high}: both must be positive"
    if low > high:
        return (f"--min_pixels {low} is above --max_pixels {high}"
                + ("" if min_pixels is not None and max_pixels is not None else " (qwen_vl_utils' default for the "
                                                                                 "other one)")
                + ": no image size satisfies both; lower --min_pixels or raise --max_pixels")
    return None


def resized_size(member, width, height, min_pixels=None, max_pixels=None, patch_size=VL_IMAGE_PATCH_SIZE):
    """(height, width) that `qwen_vl_utils.process_vision_info` resizes an image to (multiples of patch x merge
    size within the pixel bounds; None: qwen_vl_utils' own bounds). DataError where it cannot (aspect ratio over
    200, a side that would become 0): training checks this before encoding, token_stats counts tokens from it."""
    from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE, smart_resize

    factor = patch_size * SPATIAL_MERGE_SIZE
    min_pixels, max_pixels = pixel_bounds(min_pixels, max_pixels, patch_size)
    try:
        h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        raise DataError(f"image .{member} ({width}x{height}): {e}") from None
    if h <= 0 or w <= 0:
        raise DataError(f"image .{member} ({width}x{height}) resizes to {w}x{h} within max_pixels {max_pixels}")
    return h, w


def image_tokens(member, data, image_processor, min_pixels=None, max_pixels=None):
    """Visual tokens of one image member: its size after qwen_vl_utils' resize, from its header alone (no pixel
    decode), in patches merged by the processor's merge size; the number process_vision_info + the processor give."""
    ip = image_processor
    h, w = resized_size(member, *open_image(member, data, decode=False).size, min_pixels, max_pixels, ip.patch_size)
    return (h // ip.patch_size) * (w // ip.patch_size) // ip.merge_size ** 2


def decode_vl_sample(sample, classes=None, with_labels=True, min_pixels=None, max_pixels=None):
    """`(VLSample, [RGB images])`: parse_vl_sample, then every image decoded whole and its resize checked within the
    pixel bounds (None: qwen_vl_utils' own; an aspect ratio over 200 is refused whatever they are). Every verdict
    training gives a sample short of encoding it (VLEncoder) and of its --max_len; make_shards.py gives the same."""
    s = parse_vl_sample(sample, classes, with_labels)
    images = [open_image(member, data) for member, data in s.images]
    for (member, _), image in zip(s.images, images):
        resized_size(member, *image.size, min_pixels, max_pixels)  # the verdict token_stats.py gives
    return s, images


def vl_messages(images, prompt, min_pixels=None, max_pixels=None):
    """One user turn: the images in order, then the prompt (each image carries its pixel bounds for qwen_vl_utils)."""
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    content = [{"type": "image", "image": image, **bounds} for image in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]


def vl_text(processor, n_images, prompt):
    """The text a scorer encodes: the chat template over the images and the prompt, ending with the generation
    prompt, so the last token is where the model would start its answer and its hidden state sums up the sample."""
    return processor.apply_chat_template(vl_messages([None] * n_images, prompt), tokenize=False,
                                         add_generation_prompt=True)


def encode_vl_example(images, prompt, processor, min_pixels=None, max_pixels=None):
    """One sample's processor output (tensors with batch dim 1), as the scorer sees it. `process_vision_info`
    resizes each image to a multiple of 32 px within the pixel bounds; the processor must then not resize again."""
    from qwen_vl_utils import process_vision_info

    resized, _ = process_vision_info(vl_messages(images, prompt, min_pixels, max_pixels),
                                     image_patch_size=VL_IMAGE_PATCH_SIZE)
    return processor(text=[vl_text(processor, len(images), prompt)], images=resized, do_resize=False,
                     return_tensors="pt")


class VLEncoder:
    """Raw webdataset sample -> one processor output + `<label>_labels` + `key` (runs in the DataLoader workers).

    `max_len`: a longer sample is refused (cutting it could split an image's tokens, which the model rejects).
    """

    def __init__(self, processor, classes, with_labels, min_pixels, max_pixels, max_len):
        self.processor, self.classes, self.with_labels = processor, classes, with_labels
        self.min_pixels, self.max_pixels, self.max_len = min_pixels, max_pixels, max_len

    def __call__(self, sample):
        s, images = decode_vl_sample(sample, self.classes, self.with_labels, self.min_pixels, self.max_pixels)
        try:
            feature = dict(encode_vl_example(images, s.prompt, self.processor, self.min_pixels, self.max_pixels))
        except (ValueError, OSError) as e:  # anything else the processor refuses: a bad sample, not a crash
            raise DataError(f"cannot encode: {e}") from None
        if feature["input_ids"].shape[-1] > self.max_len:
            raise DataError(f"{feature['input_ids'].shape[-1]} tokens, more than --max_len {self.max_len}")
        return {**feature, **{f"{name}_labels": value for name, value in s.labels.items()}, "key": s.key}

    def length(self, sample):
        """Tokens `self(sample)` will have, from the json, the prompt's tokens and the image headers: no pixel is
        decoded, so a pool of raw samples can be sorted by length (data.ShardStream's bucketing) at the cost of a
        tokenizer call. 0 for a sample this cannot read (encoding then refuses it as a bad sample)."""
        try:
            s = parse_vl_sample(sample, self.classes, self.with_labels)
            text = self.processor.tokenizer(vl_text(self.processor, len(s.images), s.prompt),
                                            add_special_tokens=False)["input_ids"]
            # each image is one <|image_pad|> in the rendered text; the processor expands it to the image's tokens
            return len(text) - len(s.images) + sum(image_tokens(member, data, self.processor.image_processor,
                                                                self.min_pixels, self.max_pixels)
                                                   for member, data in s.images)
        except DataError:
            return 0


def collate_vl(features, pad_token_id):
    """Batch per-sample processor outputs exactly as one processor call over the batch would (left padding).

    `input_ids` are left-padded with `pad_token_id`, `attention_mask` and `mm_token_type_ids` with 0, so every row
    ends with a real token. `pixel_values` and `image_grid_thw` are concatenated along dim 0 in sample order (the
    model walks one grid iterator over the whole batch; stacking breaks on different image sizes or counts);
    text-only samples contribute none, and a batch without images has neither key. Each label's `<name>_labels`
    (float for values, long for classes) is stacked when every feature has it; `key`s come back as `keys`.
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
    return _with_labels_and_keys(batch, features)


def collate_features(features, pad_token_id=None):
    """Batch cached backbone features (feature_cache.py): `features` stacked, labels and keys as collate_vl.
    `pad_token_id` is unused: the signature is collate_vl's, so data.ShardStream takes either."""
    return _with_labels_and_keys({"features": torch.stack([f["features"] for f in features])}, features)


def _with_labels_and_keys(batch, features):
    for label, kind in LABELS.items():
        name = f"{label}_labels"
        if all(f.get(name) is not None for f in features):
            dtype = torch.float32 if kind == "value" else torch.long
            batch[name] = torch.stack([torch.as_tensor(f[name], dtype=dtype).reshape(()) for f in features])
    if all("key" in f for f in features):
        batch["keys"] = [f["key"] for f in features]
    return batch
