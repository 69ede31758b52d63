"""encode_sft_example: answer-only label masks, overflow handling and data errors."""

import pytest

from collate import IGNORE_INDEX, DataError, encode_sft_batch, encode_sft_example


def labelled_runs(tok, enc):
    """Decoded text of each contiguous run of trained (non -100) tokens."""
    runs, cur = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i  # a trained token's label is the token itself (the model shifts)
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def test_single_turn_labels_are_answer_plus_im_end(qwen2_tokenizer):
    tok = qwen2_tokenizer
    enc = encode_sft_example({"query": "Please explain the moon.", "answer": "It orbits the earth."}, tok, 512)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert labelled_runs(tok, enc) == ["It orbits the earth.<|im_end|>"]
    text = tok.decode(enc["input_ids"])
    assert text == tok.apply_chat_template(
        [{"role": "user", "content": "Please explain the moon."},
         {"role": "assistant", "content": "It orbits the earth."}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_multi_turn_every_assistant_turn_is_trained(qwen2_tokenizer):
    tok = qwen2_tokenizer
    rec = chat(("Hi", "Hello there."), ("What is 2+2?", "4, of course."), ("And 3+3?", "6.\nDone."))
    enc = encode_sft_example(rec, tok, 1024)
    assert labelled_runs(tok, enc) == ["Hello there.<|im_end|>", "4, of course.<|im_end|>", "6.\nDone.<|im_end|>"]


def test_chinese_and_custom_system_prompt(qwen2_tokenizer):
    tok = qwen2_tokenizer
    rec = {"query": "请介绍大海。", "answer": "好的,大海很大,也很安静。"}
    enc = encode_sft_example(rec, tok, 512, system_prompt="你是一个知识渊博的助手。")
    assert labelled_runs(tok, enc) == ["好的,大海很大,也很安静。<|im_end|>"]
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\n你是一个知识渊博的助手。<|im_end|>\n<|im_start|>user\n请介绍大海。")
    assert "You are a helpful assistant." not in text
    # a record's own system message wins over --system_prompt
    own = encode_sft_example(chat(("q", "a"), system="Be brief."), tok, 512, system_prompt="ignored")
    assert "Be brief." in tok.decode(own["input_ids"]) and "ignored" not in tok.decode(own["input_ids"])


def test_query_answer_equals_messages(qwen2_tokenizer):
    tok = qwen2_tokenizer
    a = encode_sft_example({"q": "Please describe old maps.", "a": "Old maps are calm."}, tok, 512,
                           query_key="q", answer_key="a")
    b = encode_sft_example(chat(("Please describe old maps.", "Old maps are calm.")), tok, 512)
    assert a == b


def test_answer_starting_with_whitespace_and_newlines(qwen2_tokenizer):
    tok = qwen2_tokenizer
    enc = encode_sft_example({"query": "x", "answer": "  indented\n\nlines  "}, tok, 512)
    assert labelled_runs(tok, enc) == ["  indented\n\nlines  <|im_end|>"]


def test_overflow_boundaries(qwen2_tokenizer):
    tok = qwen2_tokenizer
    rec = {"query": "Please explain prime numbers.", "answer": "Prime numbers have two divisors. " * 3}
    n = len(encode_sft_example(rec, tok, None)["input_ids"])
    for overflow in ("truncate", "drop"):
        [(enc, status)] = encode_sft_batch([rec], tok, n, overflow)
        assert status == "ok" and len(enc["input_ids"]) == n
    [(enc, status)] = encode_sft_batch([rec], tok, n - 1, "truncate")
    assert status == "truncated" and len(enc["input_ids"]) == n - 1 == len(enc["labels"])
    assert enc["labels"][-1] != IGNORE_INDEX
    [(enc, status)] = encode_sft_batch([rec], tok, n - 1, "drop")
    assert enc is None and status == "dropped"
    assert encode_sft_example(rec, tok, n - 1, overflow="drop") is None
    # truncation that cuts away every answer token drops the example instead of training on nothing
    prompt_len = encode_sft_example(rec, tok, None)["labels"].index(next(
        x for x in encode_sft_example(rec, tok, None)["labels"] if x != IGNORE_INDEX))
    [(enc, status)] = encode_sft_batch([rec], tok, prompt_len, "truncate")
    assert enc is None and status == "dropped"
    [(enc, status)] = encode_sft_batch([rec], tok, prompt_len + 2, "truncate")
    assert status == "truncated" and sum(x != IGNORE_INDEX for x in enc["labels"]) == 2


def test_batch_equals_one_by_one(qwen2_tokenizer):
    import demo

    recs = demo.make_sft_records(30, seed=3)
    batch = encode_sft_batch(recs, qwen2_tokenizer, 4096)
    assert [e for e, _ in batch] == [encode_sft_example(r, qwen2_tokenizer, 4096) for r in recs]


@pytest.mark.parametrize("record, message", [
    ({"query": "q"}, "missing key 'answer'"),
    ({"query": "q", "answer": 3}, "key 'answer': expected a string, got int"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
     "messages[0]'.content: expected a string, got list"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ({"messages": []}, "non-empty list"),
])
def test_bad_records_raise_data_error(qwen2_tokenizer, record, message):
    with pytest.raises(DataError, match="record 0: .*" + __import__("re").escape(message)):
        encode_sft_example(record, qwen2_tokenizer, 512)


def test_template_that_rewrites_earlier_turns_is_refused(qwen2_tokenizer):
    import copy

    tok = copy.deepcopy(qwen2_tokenizer)
    # Like reasoning templates that strip earlier turns: the last assistant message renders differently.
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{% if loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match="prefix by prefix"):
        encode_sft_example(chat(("a", "b"), ("c", "d")), tok, 512)


def test_answer_starting_with_newline_keeps_inference_tokenization(qwen2_tokenizer):
    """"\n\n" would merge across the prompt/answer edge; the prompt must still tokenize as it does alone."""
    tok = qwen2_tokenizer
    rec = {"query": "x", "answer": "\n\nfoo"}
    enc = encode_sft_example(rec, tok, 512)
    assert labelled_runs(tok, enc) == ["\n\nfoo<|im_end|>"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][:len(prompt_ids)] == prompt_ids
    assert all(x == IGNORE_INDEX for x in enc["labels"][:len(prompt_ids)])
