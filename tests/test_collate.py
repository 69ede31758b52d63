"""collate.py: SFT encoding (answer-only labels, overflow, bad records), SFT collators, VL sample checks, collate_vl."""

import copy
import json
import re

import pytest
import torch

import demo
from collate import (IGNORE_INDEX, LABELS, VL_IMAGE_PATCH_SIZE, ChatFormat, DataError, VLEncoder, apply_overflow,
                     collate_vl, encode_sft_batch, encode_sft_example, fast_encoding, open_image, parse_vl_sample,
                     prompt_messages, resized_size, sft_collator, to_messages, vl_messages)
from conftest import VL_PIXELS, VL_SAMPLES, image


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


class TestEncodeSFT:
    def test_single_turn_labels_are_answer_plus_im_end(self, qwen2_tokenizer):
        tok = qwen2_tokenizer
        enc = encode_sft_example({"query": "Please explain the moon.", "answer": "It orbits the earth."}, tok, 512)
        assert len(enc["input_ids"]) == len(enc["labels"])
        assert labelled_runs(tok, enc) == ["It orbits the earth.<|im_end|>"]
        text = tok.decode(enc["input_ids"])
        assert text == tok.apply_chat_template(
            [{"role": "user", "content": "Please explain the moon."},
             {"role": "assistant", "content": "It orbits the earth."}], tokenize=False)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")

    def test_multi_turn_every_assistant_turn_is_trained(self, qwen2_tokenizer):
        rec = chat(("Hi", "Hello there."), ("What is 2+2?", "4, of course."), ("And 3+3?", "6.\nDone."))
        enc = encode_sft_example(rec, qwen2_tokenizer, 1024)
        assert labelled_runs(qwen2_tokenizer, enc) == ["Hello there.<|im_end|>", "4, of course.<|im_end|>",
                                                       "6.\nDone.<|im_end|>"]

    def test_chinese_and_custom_system_prompt(self, qwen2_tokenizer):
        tok = qwen2_tokenizer
        rec = {"query": "请介绍大海。", "answer": "好的,大海很大,也很安静。"}
        enc = encode_sft_example(rec, tok, 512, fmt=ChatFormat(system_prompt="你是一个知识渊博的助手。"))
        assert labelled_runs(tok, enc) == ["好的,大海很大,也很安静。<|im_end|>"]
        text = tok.decode(enc["input_ids"])
        assert text.startswith("<|im_start|>system\n你是一个知识渊博的助手。<|im_end|>\n<|im_start|>user\n请介绍大海。")
        assert "You are a helpful assistant." not in text
        # a record's own system message wins over --system_prompt
        own = encode_sft_example(chat(("q", "a"), system="Be brief."), tok, 512,
                                 fmt=ChatFormat(system_prompt="ignored"))
        assert "Be brief." in tok.decode(own["input_ids"]) and "ignored" not in tok.decode(own["input_ids"])

    def test_query_answer_equals_messages(self, qwen2_tokenizer):
        a = encode_sft_example({"q": "Please describe old maps.", "a": "Old maps are calm."}, qwen2_tokenizer, 512,
                               fmt=ChatFormat(query_key="q", answer_key="a"))
        b = encode_sft_example(chat(("Please describe old maps.", "Old maps are calm.")), qwen2_tokenizer, 512)
        assert a == b

    @pytest.mark.parametrize("answer", ["  indented\n\nlines  ", "\n\nfoo"])
    def test_answers_starting_with_whitespace_keep_inference_tokens(self, qwen2_tokenizer, answer):
        """"\n\n" would merge across the prompt/answer edge; the prompt must still tokenize as it does alone."""
        tok = qwen2_tokenizer
        enc = encode_sft_example({"query": "x", "answer": answer}, tok, 512)
        assert labelled_runs(tok, enc) == [answer + "<|im_end|>"]
        prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][:len(prompt_ids)] == prompt_ids
        assert all(x == IGNORE_INDEX for x in enc["labels"][:len(prompt_ids)])

    def test_batch_equals_one_by_one(self, qwen2_tokenizer):
        recs = demo.make_sft_records(30, seed=3)
        batch = encode_sft_batch(recs, qwen2_tokenizer, 4096)
        assert [e for e, _ in batch] == [encode_sft_example(r, qwen2_tokenizer, 4096) for r in recs]

    @pytest.mark.parametrize("split_special_tokens", [False, True])
    def test_encoding_equals_tokenizing_each_segment(self, qwen2_tokenizer, split_special_tokens):
        """The one-call encoding == the plain definition: the rendered conversation cut at every answer edge, each
        piece through tokenizer(); labels on the answer pieces. With split_special_tokens the eos string is not one
        token, which sends every answer through the fallback path."""
        tok = copy.deepcopy(qwen2_tokenizer)
        tok.split_special_tokens = split_special_tokens
        records = demo.make_sft_records(40, seed=5) + [{"query": "x", "answer": "\n\nfoo <|im_end|> bar"}]
        for record, (enc, _) in zip(records, encode_sft_batch(records, tok)):
            messages = to_messages(record)
            full = tok.apply_chat_template(messages, tokenize=False)
            edges = [0]
            for j, m in enumerate(messages):
                if m["role"] == "assistant":
                    start = len(tok.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True))
                    edges += [start, full.index(m["content"] + "<|im_end|>", start) + len(m["content"] + "<|im_end|>")]
            edges.append(len(full))
            pieces = [tok(full[a:b], add_special_tokens=False)["input_ids"] for a, b in zip(edges, edges[1:])]
            assert enc["input_ids"] == [t for p in pieces for t in p]
            assert enc["labels"] == [t if k % 2 else IGNORE_INDEX for k, p in enumerate(pieces) for t in p]

    @pytest.mark.parametrize("record, message", [
        ({"query": "q"}, "missing key 'answer'"),
        ({"query": "q", "answer": 3}, "key 'answer': expected a string, got int"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
         "messages[0]'.content[0]: expected a text part"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
        ({"messages": []}, "non-empty list"),
        ([1, 2], "expected a JSON object, got list"),
    ])
    def test_bad_records_raise_data_error_with_their_index(self, qwen2_tokenizer, record, message):
        good = {"query": "q", "answer": "a"}
        with pytest.raises(DataError, match="record 1: .*" + re.escape(message)) as info:
            encode_sft_batch([good, record], qwen2_tokenizer, 512)
        assert info.value.index == 1

    def test_template_that_rewrites_earlier_turns_is_refused(self, qwen2_tokenizer):
        tok = copy.deepcopy(qwen2_tokenizer)
        # Like reasoning templates that strip earlier turns: the last assistant message renders differently.
        tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                             "{% if loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
                             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        with pytest.raises(DataError, match="prefix by prefix"):
            encode_sft_example(chat(("a", "b"), ("c", "d")), tok, 512)


# The same conversations in every record layout (layout, record, the messages it stands for): a multi-turn one with a
# system prompt, and a single turn in Chinese.
TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?\nShow the sum."},
         {"role": "assistant", "content": "2+2=4."}]
ONE_TURN = [{"role": "user", "content": "请介绍大海。"}, {"role": "assistant", "content": "大海很大。"}]
LAYOUTS = [
    ("messages", {"messages": TURNS[:3] + [{"role": "user", "content": [
        {"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?\nShow the sum."}]}] + TURNS[4:]}, TURNS),
    ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello."},
                                    {"from": "human", "value": "What is 2+2?\nShow the sum."},
                                    {"from": "gpt", "value": "2+2=4."}]}, TURNS),
    ("sharegpt", {"conversations": [{"from": "user", "value": "请介绍大海。"},
                                    {"from": "assistant", "value": "大海很大。"}]}, ONE_TURN),
    ("alpaca", {"system": "Be brief.", "history": [["Hi", "Hello."]], "instruction": "What is 2+2?",
                "input": "Show the sum.", "output": "2+2=4."}, TURNS),
    ("alpaca", {"instruction": "请介绍大海。", "input": "", "output": "大海很大。"}, ONE_TURN),
    ("prompt_completion", {"prompt": TURNS[:4], "completion": TURNS[4:]}, TURNS),
    ("prompt_completion", {"prompt": "请介绍大海。", "completion": "大海很大。"}, ONE_TURN),
]


class TestRecordLayouts:
    def test_each_layout_encodes_as_its_messages(self, qwen2_tokenizer):
        """Detected or forced, with or without --system_prompt (a record's own system message wins): the same
        messages, token ids and labels as the {messages} record of the same conversation, one by one and batched."""
        tok = qwen2_tokenizer
        for system_prompt in (None, "你是一个知识渊博的助手。"):
            for data_format in ("auto", None):
                records, equivalents = [], []
                for layout, record, messages in LAYOUTS:
                    fmt = ChatFormat(data_format=data_format or layout, system_prompt=system_prompt)
                    head = [] if system_prompt is None or messages[0]["role"] == "system" else [
                        {"role": "system", "content": system_prompt}]
                    assert to_messages(record, fmt) == head + messages, (layout, record)
                    same = encode_sft_example({"messages": messages}, tok, 512,
                                              fmt=ChatFormat(system_prompt=system_prompt))
                    assert encode_sft_example(record, tok, 512, fmt=fmt) == same, (layout, record)
                    records.append(record)
                    equivalents.append({"messages": messages})
                if data_format == "auto":  # one batch of mixed layouts
                    fmt = ChatFormat(system_prompt=system_prompt)
                    assert encode_sft_batch(records, tok, 512, fmt=fmt) == encode_sft_batch(equivalents, tok, 512,
                                                                                          fmt=fmt)

    def test_a_prompt_to_answer_in_each_layout(self):
        """What prediction answers: the messages before the final answer, which becomes the reference; the same
        record without its answer is the same prompt, with no reference."""
        def without_answer(layout, record):
            if layout in ("messages", "sharegpt"):
                key = "messages" if layout == "messages" else "conversations"
                return {key: record[key][:-1]}
            return {k: v for k, v in record.items() if k not in ("output", "completion")}

        for layout, record, messages in LAYOUTS:
            assert prompt_messages(record) == (messages[:-1], messages[-1]["content"]), layout
            assert prompt_messages(without_answer(layout, record)) == (messages[:-1], None), layout
        assert prompt_messages({"query": "请介绍大海。"}) == (ONE_TURN[:1], None)

    def test_detection_precedence_and_forcing(self):
        # Arrow gives every record of a file every column, None where a record had none: None is absent
        assert to_messages({"messages": None, "conversations": LAYOUTS[2][1]["conversations"], "instruction": None,
                            "query": None}) == ONE_TURN
        # the richer layout first: messages before a prompt/completion copy, alpaca before a stray prompt
        assert to_messages({"messages": ONE_TURN, "prompt": "other", "completion": "other"}) == ONE_TURN
        assert to_messages({"prompt": "x", **LAYOUTS[4][1]}) == ONE_TURN
        # a layout whose keys the record holds all wins over one whose leading key alone it holds
        assert to_messages({"prompt": "请介绍大海。", "response": "大海很大。"},
                           ChatFormat(query_key="prompt", answer_key="response")) == ONE_TURN
        with pytest.raises(DataError, match=re.escape("missing key 'instruction' (alpaca records have "
                                                      "'instruction', 'output')")):
            to_messages({"query": "q", "answer": "a"}, ChatFormat(data_format="alpaca"))

    @pytest.mark.parametrize("record, message", [
        ({"conversations": [{"from": "bot", "value": "x"}]},
         "key 'conversations[0]': unknown role 'bot' (expected one of human, gpt, system, user, assistant)"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt record: no assistant message to learn from"),
        ({"instruction": "i", "input": "x"}, "missing key 'output' (alpaca records have 'instruction', 'output')"),
        ({"instruction": "i", "output": "o", "history": [["q"]]},
         "key 'history[0]': expected a [query, answer] pair of strings"),
        ({"instruction": 3, "output": "o"}, "key 'instruction': expected a string, got int"),
        ({"prompt": "p"}, "missing key 'completion' (prompt_completion records have 'prompt', 'completion')"),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]},
         "keys 'prompt' and 'completion': expected two strings or two lists of messages"),
        ({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "bot", "content": "c"}]},
         "key 'completion[0]': unknown role 'bot' (expected one of system, user, assistant)"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                                    {"type": "image_url", "image_url": {"url": "a.png"}}]},
                       {"role": "assistant", "content": "A cat."}]},
         "key 'messages[0]'.content[1]: a 'image_url' part; SFT trains on text parts only"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]},
         "key 'messages[0]'.content[0]: expected a text part"),
        ({"text": "x", "label": None}, "matches none of the formats tried: messages ('messages'), sharegpt "
         "('conversations'), alpaca ('instruction', 'output'), prompt_completion ('prompt', 'completion'), "
         "query_answer ('query', 'answer'); the record has keys 'text'"),
    ])
    def test_bad_record_of_each_layout(self, qwen2_tokenizer, record, message):
        with pytest.raises(DataError, match="record 1: " + re.escape(message)):
            encode_sft_batch([{"query": "q", "answer": "a"}, record], qwen2_tokenizer, 512)

    def test_prompts_without_their_answer(self):
        """What generation reads: a record's answer may be missing; one that is there is kept."""
        prompts = [({"messages": TURNS[:4]}, TURNS[:4]),
                   ({"conversations": LAYOUTS[1][1]["conversations"][:4]}, TURNS[:4]),
                   ({"instruction": "请介绍大海。"}, ONE_TURN[:1]), ({"prompt": "请介绍大海。"}, ONE_TURN[:1]),
                   ({"prompt": TURNS[:4]}, TURNS[:4]), ({"query": "请介绍大海。"}, ONE_TURN[:1])]
        for record, messages in prompts:
            assert to_messages(record, require_answer=False) == messages, record
        for _, record, messages in LAYOUTS:
            assert to_messages(record, require_answer=False) == messages, record
        with pytest.raises(DataError, match="messages record: no assistant message to learn from"):
            to_messages({"messages": TURNS[:2]})


class TestFastEncoding:
    """The speed shortcuts equal the plain calls they replace."""

    def test_render_equals_apply_chat_template(self, qwen2_tokenizer):
        render, _ = fast_encoding(qwen2_tokenizer)
        records = demo.make_sft_records(30, seed=9) + [chat(("x", "\n\nfoo"), system="S")]
        for messages in (to_messages(r) for r in records):
            for k in range(1, len(messages) + 1):
                for generation in (False, True):
                    assert render(messages[:k], generation) == qwen2_tokenizer.apply_chat_template(
                        messages[:k], tokenize=False, add_generation_prompt=generation)

    def test_token_ids_equal_the_tokenizer_and_leave_the_normalizer(self, qwen2_tokenizer):
        """Also for text that is not NFC (decomposed accents, which NFC composes)."""
        import unicodedata

        from tokenizers import normalizers

        texts = ["plain ascii", "e\u0301t\u00e9 cafe\u0301", "<|im_start|>user\n好<|im_end|>\n", "", "  \n\n x",
                 "\u212b ohm \u2126", "Ａｂｃ full width"]
        assert not all(unicodedata.is_normalized("NFC", t) for t in texts)
        _, token_ids = fast_encoding(qwen2_tokenizer)
        assert token_ids(texts) == qwen2_tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert isinstance(qwen2_tokenizer.backend_tokenizer.normalizer, normalizers.NFC)


class TestOverflow:
    # Sentinel ids 11..16; labels -100 on the 3-token prompt
    IDS, LABELS_ = [11, 12, 13, 14, 15, 16], [IGNORE_INDEX] * 3 + [14, 15, 16]

    @pytest.mark.parametrize("max_len, overflow, expected", [
        (None, "truncate", ({"input_ids": IDS, "labels": LABELS_}, "ok")),
        (6, "drop", ({"input_ids": IDS, "labels": LABELS_}, "ok")),
        (5, "truncate", ({"input_ids": IDS[:5], "labels": LABELS_[:5]}, "truncated")),
        (5, "drop", (None, "dropped")),
        (4, "truncate", ({"input_ids": IDS[:4], "labels": LABELS_[:4]}, "truncated")),  # one answer token left
        (3, "truncate", (None, "dropped")),  # no answer token left: nothing to learn
    ])
    def test_apply_overflow(self, max_len, overflow, expected):
        assert apply_overflow(self.IDS, self.LABELS_, max_len, overflow) == expected

    def test_boundaries_on_a_real_encoding(self, qwen2_tokenizer):
        tok = qwen2_tokenizer
        rec = {"query": "Please explain prime numbers.", "answer": "Prime numbers have two divisors. " * 3}
        n = len(encode_sft_example(rec, tok, None)["input_ids"])
        assert [s for _, s in encode_sft_batch([rec] * 2, tok, n)] == ["ok", "ok"]
        [(enc, status)] = encode_sft_batch([rec], tok, n - 1, "truncate")
        assert status == "truncated" and len(enc["input_ids"]) == n - 1 == len(enc["labels"])
        assert encode_sft_example(rec, tok, n - 1, overflow="drop") is None


class TestSFTCollator:
    @pytest.fixture(scope="class")
    def features(self, qwen2_tokenizer):
        return [e for e, _ in encode_sft_batch(demo.make_sft_records(5, seed=7), qwen2_tokenizer, 4096)]

    def test_padded_literal(self, qwen2_tokenizer):
        pad = qwen2_tokenizer.pad_token_id
        batch = sft_collator(qwen2_tokenizer)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                               {"input_ids": [8, 9], "labels": [-100, 9]}])
        assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, pad]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]

    def test_padding_free_literal(self, qwen2_tokenizer):
        batch = sft_collator(qwen2_tokenizer, padding_free=True)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                                                  {"input_ids": [8, 9], "labels": [8, 9]}])
        assert "attention_mask" not in batch
        assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
        assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # no example learns to predict the next one
        assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]

    def test_padded_to_a_multiple(self, qwen2_tokenizer, features):
        lens = [len(f["input_ids"]) for f in features]
        batch = sft_collator(qwen2_tokenizer, pad_to_multiple_of=8)(features)
        assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= max(lens)
        for row, n in enumerate(lens):
            assert batch["input_ids"][row, :n].tolist() == features[row]["input_ids"]  # right padding

    @pytest.mark.parametrize("attn", ["sdpa", "eager"])
    def test_padded_loss_equals_padding_free_loss(self, sft_demo, qwen2_tokenizer, features, attn):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(sft_demo[0], dtype=torch.float32, attn_implementation=attn)
        model.eval()
        with torch.no_grad():
            padded = model(**sft_collator(qwen2_tokenizer)(features), use_cache=False).loss
            packed = model(**sft_collator(qwen2_tokenizer, padding_free=True)(features), use_cache=False).loss
            one_by_one = [model(**sft_collator(qwen2_tokenizer)([f]), use_cache=False).loss for f in features]
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
        # and the packed row really keeps examples apart: token-weighted mean of per-example losses
        n = torch.tensor([sum(x != IGNORE_INDEX for x in f["labels"][1:]) for f in features], dtype=torch.float32)
        torch.testing.assert_close(packed, (torch.stack(one_by_one) * n).sum() / n.sum(), rtol=1e-5, atol=1e-5)


GOOD = {"prompt": "p", "score": 1.0, "type": 0}


def raw_sample(record=GOOD, images=(("0.jpg", None),), raw_json=None):
    """A webdataset sample; an image given as None is a valid 32x32 picture in its member's format."""
    sample = {"__key__": "k", "json": raw_json if raw_json is not None else json.dumps(record).encode()}
    for name, data in images:
        sample[name] = data if data is not None else demo.encode_image(image(32, 32), name.split(".")[-1])
    return sample


class TestParseVLSample:
    def test_images_in_index_order_and_labels(self):
        sample = demo.vl_sample("k", {"prompt": "rate", "score": 2, "type": 1},
                                [image(40, 30, (255, 0, 0)), image(50, 60, (0, 255, 0)), image(70, 20, (0, 0, 255))],
                                formats=("png",))
        sample = {k: sample[k] for k in ("__key__", "2.png", "json", "0.png", "1.png")}  # members in any order
        s = parse_vl_sample(sample, {"type": 3})
        assert (s.key, s.prompt, s.labels) == ("k", "rate", {"score": 2.0, "type": 1})
        assert isinstance(s.labels["score"], float)
        assert [m for m, _ in s.images] == ["0.png", "1.png", "2.png"]
        decoded = [open_image(m, d) for m, d in s.images]
        assert [im.size for im in decoded] == [(40, 30), (50, 60), (70, 20)]
        assert [im.getpixel((0, 0)) for im in decoded] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]

    def test_prediction_data_needs_no_labels_and_may_have_no_image(self):
        s = parse_vl_sample({"__key__": "t", "json": b'{"prompt": "hi"}'}, {"type": 3}, with_labels=False)
        assert (s.prompt, s.images, s.labels) == ("hi", [], {})

    @pytest.mark.parametrize("sample, message", [
        ({"__key__": "k", "0.jpg": b""}, "no .json member"),
        (raw_sample(raw_json=b"{not json"), "malformed json"),
        (raw_sample(raw_json=b"[1, 2]"), "expected an object, got list"),
        (raw_sample({"score": 1.0, "type": 0}), "missing field 'prompt'"),
        (raw_sample({"prompt": 3, "score": 1.0, "type": 0}), "field 'prompt': expected str, got int"),
        (raw_sample({"prompt": "p", "type": 0}), "missing field 'score'"),
        (raw_sample({"prompt": "p", "score": "high", "type": 0}), "field 'score': expected float, got str"),
        (raw_sample({"prompt": "p", "score": 1.0, "type": 1.5}), "field 'type': expected int, got float"),
        (raw_sample({"prompt": "p", "score": 1.0, "type": True}), "field 'type': expected int, got bool"),
        (raw_sample({"prompt": "p", "score": 1.0, "type": 3}), r"field 'type' is 3, outside 0..2 \(--num_types 3\)"),
        (raw_sample({"prompt": "p", "score": 1.0, "type": -1}), "field 'type' is -1, outside 0..2"),
        (raw_sample(raw_json=b'{"prompt": "p", "score": NaN, "type": 0}'), "field 'score' is nan"),
        (raw_sample(images=[("0.jpg", None), ("2.png", None)]), r"image 1 is missing \(found .0.jpg, .2.png\)"),
        (raw_sample(images=[("1.jpg", None)]), "image 0 is missing"),
        (raw_sample(images=[("0.jpg", None), ("0.png", None)]), "two files for image 0: .0.jpg and .0.png"),
    ])
    def test_rejects(self, sample, message):
        with pytest.raises(DataError, match=message):
            parse_vl_sample(sample, {"type": 3})

    def test_out_of_range_type_passes_when_the_class_count_is_unknown(self):
        assert parse_vl_sample(raw_sample({"prompt": "p", "score": 1.0, "type": 7})).labels["type"] == 7

    @pytest.mark.parametrize("data", [b"\xff\xd8\xff\xe0 this is not a jpeg",
                                      demo.encode_image(image(64, 64), "png")[:60]])
    def test_undecodable_image(self, data):
        with pytest.raises(DataError, match=r"image .0.x: cannot decode"):
            open_image("0.x", data)

    @pytest.mark.parametrize("size, bounds, expected", [
        ((64, 48), (32 * 32, 64 * 64), (64, 64)),  # (w, h) -> (h, w) in multiples of 32 within the bounds
        ((1000, 700), (None, 200 * 200), (160, 224)),
        ((33, 500), (None, 96 * 96), DataError),  # no width left within max_pixels
        ((10, 2500), (None, None), DataError),  # aspect ratio over 200
    ])
    def test_resized_size(self, size, bounds, expected):
        if expected is DataError:
            with pytest.raises(DataError, match=r"image .0.png \("):
                resized_size("0.png", *size, *bounds)
        else:
            assert resized_size("0.png", *size, *bounds) == expected


def one_call_batch(processor):
    from qwen_vl_utils import process_vision_info

    texts, images = [], []
    for ims, prompt in VL_SAMPLES:
        messages = vl_messages(ims, prompt, **VL_PIXELS)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images += process_vision_info(messages, image_patch_size=VL_IMAGE_PATCH_SIZE)[0] or []
    return processor(text=texts, images=images, do_resize=False, padding=True, padding_side="left",
                     return_tensors="pt")


@pytest.mark.usefixtures("one_thread")
class TestCollateVL:
    def test_equals_one_processor_call(self, vl_processor, vl_features):
        assert [len(f.get("image_grid_thw", [])) for f in vl_features] == [2, 1, 3, 0]
        assert len({tuple(g.tolist()) for f in vl_features[:3] for g in f["image_grid_thw"]}) > 2  # varied sizes
        batch = collate_vl(vl_features, vl_processor.tokenizer.pad_token_id)
        ref = one_call_batch(vl_processor)
        assert set(ref) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
        for name in ref:
            assert batch[name].dtype == ref[name].dtype, name
            assert torch.equal(batch[name], ref[name]), name
        assert batch["attention_mask"][:, -1].all()  # left padding: every row ends with a real token
        assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()
        image_token = vl_processor.image_token_id
        assert (batch["input_ids"] == image_token).sum() == batch["image_grid_thw"].prod(-1).sum() // 4
        assert batch["score_labels"].tolist() == [0.0, 1.0, 2.0, 3.0] and batch["score_labels"].dtype == torch.float32
        assert batch["type_labels"].tolist() == [0, 1, 2, 0] and batch["type_labels"].dtype == torch.long
        assert batch["keys"] == ["k0", "k1", "k2", "k3"]

    def test_text_only_batch_and_no_labels(self, vl_processor, vl_features):
        text = dict(vl_features[3], score_labels=None, type_labels=None)
        batch = collate_vl([text, text], vl_processor.tokenizer.pad_token_id)
        assert "pixel_values" not in batch and "image_grid_thw" not in batch
        assert "score_labels" not in batch and "type_labels" not in batch
        assert batch["input_ids"].shape == (2, text["input_ids"].shape[1])

    def test_encoder_gives_labels_key_and_refuses_long_samples(self, vl_processor):
        sample = demo.vl_sample("k7", {"prompt": "Rate it.", "score": 2.5, "type": 2}, [image(64, 48)])
        feature = VLEncoder(vl_processor, {"type": 3}, True, **VL_PIXELS, max_len=4096)(sample)
        assert (feature["key"], feature["score_labels"], feature["type_labels"]) == ("k7", 2.5, 2)
        assert set(LABELS) == {"score", "type"}
        n = feature["input_ids"].shape[-1]
        assert VLEncoder(vl_processor, {"type": 3}, True, **VL_PIXELS, max_len=n)(sample)["key"] == "k7"
        with pytest.raises(DataError, match=f"{n} tokens, more than --max_len {n - 1}"):
            VLEncoder(vl_processor, {"type": 3}, True, **VL_PIXELS, max_len=n - 1)(sample)

    def test_length_from_headers_is_the_encoded_length(self, vl_processor):
        """What bucketing sorts by: the encoded length, known from the json, the prompt and the image headers
        (2, 1, 3 and no images of different sizes, in png and jpg); 0 for a sample it cannot read."""
        encoder = VLEncoder(vl_processor, {"type": 3}, True, **VL_PIXELS, max_len=4096)
        for i, (images, prompt) in enumerate(VL_SAMPLES):
            sample = demo.vl_sample(f"k{i}", {"prompt": prompt, "score": 1.0, "type": 0}, images,
                                    formats=("png", "jpg"))
            assert encoder.length(sample) == encoder(sample)["input_ids"].shape[-1] > 0, i
        assert encoder.length({"__key__": "k", "json": b"{not json"}) == 0


def _image_file(case):
    """(extension, bytes) of a 96x40 noise image in one of the formats and modes users' shards hold; alpha, where
    there is one, runs from transparent to opaque, so compositing shows in the pixels."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 96, 3), dtype=np.uint8))
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), np.tile(np.linspace(0, 255, 96).astype(np.uint8), (40, 1))]))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    ext, image, options = {
        "jpeg rgb": ("jpg", rgb, {}), "jpeg grey": ("jpg", rgb.convert("L"), {}),
        "jpeg cmyk": ("jpg", rgb.convert("CMYK"), {}), "jpeg exif rotated": ("jpg", rgb, {"exif": exif}),
        "png rgba": ("png", rgba, {}), "png grey+alpha": ("png", rgba.convert("LA"), {}),
        "png palette transparency": ("png", palette, {"transparency": 3}),
        "png 16 bits": ("png", Image.fromarray(np.asarray(rgb)[..., 0].astype(np.uint16) * 257), {}),
        "webp rgba": ("webp", rgba, {"lossless": True}), "webp lossy": ("webp", rgb, {}),
        "gif transparency": ("gif", palette, {"transparency": 3}), "bmp": ("bmp", rgb, {}),
        "tiff rgba": ("tiff", rgba, {}),
    }[case]
    out = io.BytesIO()
    image.save(out, {"jpg": "JPEG"}.get(ext, ext.upper()), **options)
    return ext, out.getvalue()


class TestImageParity:
    """The pixels and tokens the scorer trains on are those Qwen's own inference path gives the same file: the user
    serves with `process_vision_info` on the file and the processor. Every format and mode PIL opens; the EXIF
    orientation is ignored by both (the grid of a 96x40 image stays 40 high)."""

    BOUNDS = dict(min_pixels=32 * 32, max_pixels=128 * 128)

    @pytest.mark.parametrize("case", ["jpeg rgb", "jpeg grey", "jpeg cmyk", "jpeg exif rotated", "png rgba",
                                      "png grey+alpha", "png palette transparency", "png 16 bits", "webp rgba",
                                      "webp lossy", "gif transparency", "bmp", "tiff rgba"])
    def test_encoder_equals_qwen_inference_on_the_file(self, vl_processor, tmp_path, case):
        from qwen_vl_utils import process_vision_info

        from collate import image_tokens

        ext, data = _image_file(case)
        path = tmp_path / f"image.{ext}"
        path.write_bytes(data)
        messages = [{"role": "user", "content": [{"type": "image", "image": f"file://{path}", **self.BOUNDS},
                                                 {"type": "text", "text": "Rate it."}]}]
        images, _ = process_vision_info(messages, image_patch_size=VL_IMAGE_PATCH_SIZE)
        served = vl_processor(text=[vl_processor.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)],
                              images=images, return_tensors="pt")
        encoder = VLEncoder(vl_processor, None, False, **self.BOUNDS, max_len=4096)
        sample = {"__key__": "k", "json": b'{"prompt": "Rate it."}', f"0.{ext}": data}
        trained = encoder(sample)
        assert served["image_grid_thw"].tolist() == trained["image_grid_thw"].tolist() == [[1, 2, 6]]  # 32 x 96 px in 16 px patches
        assert torch.equal(trained["input_ids"], served["input_ids"])
        assert torch.equal(trained["pixel_values"], served["pixel_values"])  # bit for bit
        # token_stats.py and bucketing count from the header by the same rule
        assert image_tokens(f"0.{ext}", data, vl_processor.image_processor, **self.BOUNDS) == 2 * 6 // 4  # 2x2 patches a token
        assert encoder.length(sample) == trained["input_ids"].shape[-1]
