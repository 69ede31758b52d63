"""Tiny offline checkpoints and synthetic data, shared by the tests, the benchmarks and every script's `--demo`.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in a fraction of a second on
built-in text, the models have random weights, and everything is written with `save_pretrained` so the
scripts load it back through `AutoTokenizer` / `AutoModelForCausalLM` exactly like a real checkpoint.
"""

import json
import random
from pathlib import Path

# The 14 special tokens of Qwen2 tokenizers, in Qwen's order (ids follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The chat template shipped with Qwen/Qwen2-7B-Instruct, verbatim: ChatML, a default system prompt, and no
# `{% generation %}` markers, so label masking is tested against the template real users have.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split (from its tokenizer.json), so the tiny BPE splits text the way the real one does.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_EN_TOPICS = ["the ocean", "a small robot", "green tea", "prime numbers", "the moon", "a quiet library",
              "mountain rivers", "old maps", "autumn leaves", "a paper boat", "city lights", "bread baking"]
_EN_VERBS = ["describe", "explain", "summarise", "write a short note about", "give two facts about"]
_ZH_TOPICS = ["大海", "小机器人", "绿茶", "质数", "月亮", "图书馆", "山间河流", "旧地图", "秋天的树叶", "纸船"]
_ZH_VERBS = ["请介绍", "请解释", "请总结", "简单说说", "写一句关于"]


def _corpus():
    """Text the tiny BPE is trained on: the demo vocabulary plus ChatML scaffolding."""
    lines = []
    for t in _EN_TOPICS:
        for v in _EN_VERBS:
            lines.append(f"Please {v} {t}. Sure! Here is what I know about {t}: it is simple and calm.")
    for t in _ZH_TOPICS:
        for v in _ZH_VERBS:
            lines.append(f"{v}{t}。好的,关于{t}:它很简单,也很安静。")
    lines += ["system\nYou are a helpful assistant.\nuser\nassistant\n\nParagraph.\n\n"] * 20
    return lines


def build_tokenizer(vocab_size=400, corpus=None):
    """A Qwen2Tokenizer with a tiny byte-level BPE, Qwen's special tokens and Qwen2-Instruct's chat template.
    `corpus` (an iterable of texts) and `vocab_size` can make it a real-size one (the speed benchmarks do)."""
    from tokenizers import Tokenizer, Regex, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_corpus() if corpus is None else corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for tok in QWEN_SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN2_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    return tok


def build_tiny_qwen2(out_dir, seed=0, hidden_size=64, num_layers=2, vocab_size=None, intermediate_size=None,
                     dtype="float32", tie_word_embeddings=False):
    """Save a random-weight Qwen2 causal LM (fp32, or `dtype` as real Qwen checkpoints are stored: bfloat16) plus its
    tokenizer to `out_dir` and return the path.

    `vocab_size` may exceed the tiny tokenizer's (benchmarks use Qwen2's real 151,936 so the output layer costs
    what it costs in real runs); the extra rows are simply never produced by the tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    out_dir = Path(out_dir)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tok), hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def make_sft_records(n=64, seed=0):
    """Synthetic chat data: `{query, answer}` and `{messages}` records, single- and multi-turn, English and Chinese."""
    rng = random.Random(seed)

    def qa():
        if rng.random() < 0.5:
            t = rng.choice(_EN_TOPICS)
            return (f"Please {rng.choice(_EN_VERBS)} {t}.",
                    f"Sure! Here is what I know about {t}: " + " ".join(rng.choices(_EN_TOPICS, k=rng.randint(1, 6))))
        t = rng.choice(_ZH_TOPICS)
        return f"{rng.choice(_ZH_VERBS)}{t}。", f"好的,关于{t}:" + ",".join(rng.choices(_ZH_TOPICS, k=rng.randint(1, 6)))

    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            q, a = qa()
            records.append({"query": q, "answer": a})
        else:
            messages = [{"role": "system", "content": "You are a concise assistant."}] if kind == 2 else []
            for _ in range(rng.randint(1, 3)):
                q, a = qa()
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            records.append({"messages": messages})
    return records


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def build_sft_demo(root, n_train=96, n_eval=16, seed=0):
    """Tiny model (with its tokenizer) + train/eval JSON Lines under `root`; returns (model_dir, train_file,
    eval_file). The SFT demo, the tests and `token_stats.py --demo` all start from it."""
    root = Path(root)
    model_dir = build_tiny_qwen2(root / "tiny-qwen2", seed=seed)
    train = write_jsonl(root / "train.jsonl", make_sft_records(n_train, seed=seed))
    evalf = write_jsonl(root / "eval.jsonl", make_sft_records(n_eval, seed=seed + 1))
    return model_dir, train, evalf


# ----------------------------------------------------------------------------------------------------------------
# Scorer side (Qwen3-VL): a tiny processor and checkpoint, webdataset shards
# ----------------------------------------------------------------------------------------------------------------

# Qwen3-VL-Instruct's chat template, reduced to what scorer samples use (system/user/assistant messages whose
# content is a string or a list of image and text items); the same text for those messages.
QWEN3VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def build_tiny_qwen3vl_processor(out_dir=None, patch_size=16, merge_size=2, min_pixels=32 * 32,
                                 max_pixels=4096 * 32 * 32):
    """A Qwen3VLProcessor (Qwen2-VL image processor, Qwen3-VL video processor, the tiny BPE tokenizer) with Qwen3-VL's
    patch (16), merge (2) and temporal patch (2) sizes; saved to `out_dir` when given. Returns the processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                              size=size),
        tokenizer=build_tokenizer(),
        video_processor=Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                              size=size),
        chat_template=QWEN3VL_CHAT_TEMPLATE)
    if out_dir is not None:
        processor.save_pretrained(out_dir)
    return processor


def tiny_qwen3_vl_config(tok):
    """The tiny Qwen3-VL config (2-block ViT with deepstack, 2-layer LM; patch 16, merge 2), token ids from the
    tokenizer `tok`."""
    from transformers import Qwen3VLConfig

    token_id = tok.convert_tokens_to_ids
    return Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_tiny_qwen3_vl(out_dir, seed=0):
    """Save a random-weight fp32 Qwen3-VL (`tiny_qwen3_vl_config`) and its processor to `out_dir`.

    Same layout as a real Qwen3-VL checkpoint (`Qwen3VLForConditionalGeneration` with an LM head, loadable with
    `AutoProcessor` / `from_pretrained`); patch 16, merge 2, so images are resized to multiples of 32 px.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    out_dir = Path(out_dir)
    processor = build_tiny_qwen3vl_processor()
    tok = processor.tokenizer
    tok.chat_template = QWEN3VL_CHAT_TEMPLATE  # the saved tokenizer and processor then agree
    torch.manual_seed(seed)
    Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(tok)).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def encode_image(image, fmt):
    import io

    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def vl_sample(key, record, images, formats=("jpg", "png")):
    """One sample as webdataset stores it: `{"__key__", "json", "0.jpg", "1.png", ...}` (values are bytes).
    `record` is KEY.json's object; an image is a PIL image (saved as formats[i % len(formats)]) or (extension,
    bytes)."""
    sample = {"__key__": key, "json": json.dumps(record, ensure_ascii=False).encode()}
    for i, image in enumerate(images):
        ext = image[0] if isinstance(image, tuple) else formats[i % len(formats)]
        sample[f"{i}.{ext}"] = image[1] if isinstance(image, tuple) else encode_image(image, ext)
    return sample


def make_vl_samples(n, seed=0, num_types=3, prefix="s", min_side=32, max_side=96):
    """Synthetic scorer samples: 2 or 3 solid-colour images of random sizes (every fourth sample has 1) and an
    English prompt. Both heads have something to learn from the pixels: `type` is the colour channel that dominates
    every image of the sample (red, green, blue, then again), `score` is 10 x the images' mean brightness.

    A sample's images share one brightness level (0.3 to 1: the dominant channel; the others at 15-25% of it), so
    the score is a clean function of what each image shows; independent random colours per image left the score
    mostly to the minor channels' noise, averaged over the images, and the tiny demo model learnt nothing of it."""
    from PIL import Image

    rng = random.Random(seed)
    samples = []
    for i in range(n):
        count = 2 + i % 2 if i % 4 else 1
        kind = rng.randrange(num_types)
        level = rng.uniform(0.3, 1.0)  # not darker: near black the three types look alike
        colours = []
        for _ in range(count):
            colour = [level * rng.uniform(0.15, 0.25) for _ in range(3)]
            colour[kind % 3] = level
            colours.append(tuple(round(255 * c) for c in colour))
        images = [Image.new("RGB", (rng.randint(min_side, max_side), rng.randint(min_side, max_side)), c)
                  for c in colours]
        brightness = sum(sum(c) / 765 for c in colours) / count
        prompt = f"Please {rng.choice(_EN_VERBS)} {rng.choice(_EN_TOPICS)}."
        samples.append(vl_sample(f"{prefix}{i:05d}", {"prompt": prompt, "score": round(10 * brightness, 3),
                                                      "type": kind}, images))
    return samples


def write_shard(path, samples):
    """Write samples (`vl_sample` dicts) to one .tar shard, members `KEY.EXT` in sample order."""
    import io
    import tarfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_shards(root, name, samples, sizes):
    """Split `samples` into shards `root/name-000000.tar`, ... of the given sizes; returns their paths."""
    assert sum(sizes) == len(samples), (sizes, len(samples))
    paths, start = [], 0
    for i, size in enumerate(sizes):
        paths.append(write_shard(Path(root) / f"{name}-{i:06d}.tar", samples[start:start + size]))
        start += size
    return paths


def build_scorer_demo(root, seed=0, num_types=3):
    """Tiny Qwen3-VL + train shards of uneven sizes (128 samples) and eval shards (48 samples) under `root`.

    Images of 32-47 px: one visual token each at the demo's pixel bounds, so a CPU step is short and the demo
    affords the steps it needs to learn; 48 eval samples, so its metrics are not luck.
    Returns (model_dir, train_pattern, eval_pattern) with brace patterns as the scorer's flags take them.
    """
    root = Path(root)
    model_dir = build_tiny_qwen3_vl(root / "tiny-qwen3-vl", seed=seed)
    small = dict(min_side=32, max_side=47)
    write_shards(root, "train", make_vl_samples(128, seed, num_types, prefix="t", **small), [40, 28, 36, 24])
    write_shards(root, "eval", make_vl_samples(48, seed + 1, num_types, prefix="e", **small), [29, 19])
    return model_dir, f"{root}/train-{{000000..000003}}.tar", f"{root}/eval-{{000000..000001}}.tar"
