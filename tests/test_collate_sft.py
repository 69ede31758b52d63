"""SFT collators: shapes and padding, and padded loss == padding-free loss on the same examples."""

import pytest
import torch

import demo
from collate import IGNORE_INDEX, encode_sft_batch, sft_collator


@pytest.fixture(scope="module")
def features(qwen2_tokenizer):
    return [e for e, _ in encode_sft_batch(demo.make_sft_records(5, seed=7), qwen2_tokenizer, 4096)]


def test_padded_collator(qwen2_tokenizer, features):
    lens = [len(f["input_ids"]) for f in features]
    batch = sft_collator(qwen2_tokenizer)(features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, max(lens))
    for row, n in enumerate(lens):
        assert batch["attention_mask"][row].sum() == n
        assert batch["input_ids"][row, :n].tolist() == features[row]["input_ids"]  # right padding
        assert (batch["input_ids"][row, n:] == qwen2_tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["labels"][row, :n].tolist() == features[row]["labels"]
    batch8 = sft_collator(qwen2_tokenizer, pad_to_multiple_of=8)(features)
    assert batch8["input_ids"].shape[1] % 8 == 0 and batch8["input_ids"].shape[1] >= max(lens)


def test_padding_free_collator(qwen2_tokenizer, features):
    lens = [len(f["input_ids"]) for f in features]
    batch = sft_collator(qwen2_tokenizer, padding_free=True)(features)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, sum(lens))
    assert batch["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)  # no example predicts the next one


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_loss_equals_padding_free_loss(sft_demo, qwen2_tokenizer, features, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_demo[0], dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    model.eval()
    with torch.no_grad():
        padded = model(**sft_collator(qwen2_tokenizer)(features), use_cache=False).loss
        packed = model(**sft_collator(qwen2_tokenizer, padding_free=True)(features), use_cache=False).loss
        one_by_one = [model(**sft_collator(qwen2_tokenizer)([f]), use_cache=False).loss for f in features]
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    # and the packed row really keeps examples apart: token-weighted mean of per-example losses
    n = torch.tensor([sum(x != IGNORE_INDEX for x in f["labels"][1:]) for f in features], dtype=torch.float32)
    torch.testing.assert_close(packed, (torch.stack(one_by_one) * n).sum() / n.sum(), rtol=1e-5, atol=1e-5)
