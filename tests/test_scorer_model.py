"""The scorer model: pooling, padding sides, outputs, trainable parts per mode, dtypes, save/load formats."""

import os

import pytest
import torch

from collate import collate_vl
from test_scorer_data import vl_features
from train_scorer import ModelArguments, Qwen3VLScorer, load_scorer, pool_last_token

pytestmark = pytest.mark.usefixtures("one_thread")


def scorer(scorer_demo, dtype=torch.float32, **flags):
    torch.manual_seed(0)
    return load_scorer(ModelArguments(model_name_or_path=scorer_demo[0], num_types=3, **flags), dtype)


@pytest.fixture(scope="module")
def feats(vl_processor):
    return vl_features(vl_processor)


def right_padded(feats, pad_id):
    """The same batch with right padding (what collate_vl must not assume the model never sees)."""
    batch = collate_vl(feats, pad_id)
    width = batch["input_ids"].shape[1]
    for name, pad in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        rows = [f[name][0] for f in feats]
        batch[name] = torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])
    return batch


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "keys"}


def test_pool_last_token_left_and_right():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_last_token(hidden, left)[:, 0].tolist() == [3.0, 7.0]
    assert pool_last_token(hidden, right)[:, 0].tolist() == [1.0, 7.0]


def test_batch_runs_and_pools_like_each_sample_alone(scorer_demo, vl_processor, feats):
    model = scorer(scorer_demo).eval()
    pad = vl_processor.tokenizer.pad_token_id
    batch = collate_vl(feats, pad)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        pooled = model.pooled(**{k: v for k, v in batch.items() if not k.endswith(("_labels", "keys"))})
        alone = [model.pooled(**{k: v for k, v in collate_vl([f], pad).items() if not k.endswith(("_labels", "keys"))})
                 for f in feats]
    assert out.score.shape == (4,) and out.type_logits.shape == (4, 3)
    assert out.score.dtype == out.type_logits.dtype == torch.float32
    assert out.loss.ndim == 0 and out.loss_score.ndim == 0 and out.loss_type.ndim == 0
    torch.testing.assert_close(out.loss, out.loss_score + out.loss_type)
    torch.testing.assert_close(pooled, torch.cat(alone), rtol=1e-4, atol=1e-5)
    # the pooled row really depends on the sample (not e.g. always the shared generation prompt's hidden state)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


def test_left_and_right_padding_give_the_same_features_and_scores(scorer_demo, vl_processor, feats):
    model = scorer(scorer_demo).eval()
    pad = vl_processor.tokenizer.pad_token_id
    left, right = collate_vl(feats, pad), right_padded(feats, pad)
    assert not torch.equal(left["input_ids"], right["input_ids"])
    with torch.no_grad():
        a, b = model(**model_inputs(left)), model(**model_inputs(right))
        pa = model.pooled(**{k: v for k, v in left.items() if not k.endswith(("_labels", "keys"))})
        pb = model.pooled(**{k: v for k, v in right.items() if not k.endswith(("_labels", "keys"))})
    torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.score, b.score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.type_logits, b.type_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags, trained", [
    ({}, ("model.visual.", "model.language_model.", "score_head.", "type_head.")),
    ({"freeze_vision": True}, ("model.language_model.", "score_head.", "type_head.")),
    ({"freeze_backbone": True}, ("score_head.", "type_head.")),
])
def test_every_trainable_parameter_gets_a_gradient(scorer_demo, vl_processor, feats, flags, trained):
    """What DDP with find_unused_parameters=False needs, for a batch with images and a text-only batch."""
    model = scorer(scorer_demo, **flags).train()
    pad = vl_processor.tokenizer.pad_token_id
    for batch in (collate_vl(feats[:3], pad), collate_vl([feats[3], feats[3]], pad)):
        model.zero_grad(set_to_none=True)
        model(**model_inputs(batch)).loss.backward()
        for name, p in model.named_parameters():
            assert p.requires_grad == name.startswith(trained), name
            assert (p.grad is not None) == p.requires_grad, name


def test_heads_stay_fp32_on_a_bf16_backbone(scorer_demo, vl_processor, feats):
    model = scorer(scorer_demo, torch.bfloat16)
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.score_head.weight.dtype == model.type_head.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(**model_inputs(collate_vl(feats, vl_processor.tokenizer.pad_token_id)))
    assert out.score.dtype == out.type_logits.dtype == torch.float32


def test_frozen_backbone_saves_heads_only_and_loads_the_full_scorer(scorer_demo, vl_processor, feats, tmp_path):
    import safetensors.torch

    model = scorer(scorer_demo, freeze_backbone=True).eval()
    with torch.no_grad():
        model.score_head.weight.add_(0.5)  # heads that differ from any fresh initialisation
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == ["score_head.bias", "score_head.weight", "type_head.bias", "type_head.weight"]
    assert model.config.scorer_base_model == os.path.abspath(scorer_demo[0])
    loaded = Qwen3VLScorer.from_pretrained(tmp_path).eval()
    batch = model_inputs(collate_vl(feats, vl_processor.tokenizer.pad_token_id))
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=0)
    torch.testing.assert_close(a.type_logits, b.type_logits, rtol=0, atol=0)
    # training on from a heads-only save in full mode makes a full save again
    full = load_scorer(ModelArguments(model_name_or_path=str(tmp_path)), torch.float32)
    assert full.config.num_types == 3 and full.config.scorer_base_model is None
    full.save_pretrained(tmp_path / "full")
    assert len(safetensors.torch.load_file(tmp_path / "full" / "model.safetensors")) > 4
    with pytest.raises(Exception, match="has 3 types, not --num_types 4"):
        load_scorer(ModelArguments(model_name_or_path=str(tmp_path), num_types=4), torch.float32)


def test_a_qwen3_vl_checkpoint_needs_num_types(scorer_demo):
    with pytest.raises(Exception, match="--num_types is required"):
        load_scorer(ModelArguments(model_name_or_path=scorer_demo[0]), torch.float32)
