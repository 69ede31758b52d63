"""token_stats.py vs the per-example loop of the background post, on the same generated data, in one run.

  python bench/token_stats_speed.py                 # 50,000 examples, real-size tokenizer (first run builds it, ~1 min)
  python bench/token_stats_speed.py --examples 400 --vocab_size 1000 --corpus_docs 500 --rounds 1  # smoke

The loop (what the post does): read the JSON Lines file, format each example's ChatML prompt as a string,
`tokenizer.encode(prompt)` and `tokenizer.encode(answer)`, keep the length. token_stats.py computes the full training
encoding (chat template + answer mask, as sft_qwen2.py) with its defaults (batched fast tokenizer, one worker per
core). Both include loading the tokenizer and reading the file. Rounds alternate loop / token_stats and the best
time of each is kept, so load from other processes on the machine hurts neither side more than the other.

Data: mixed English/Chinese text over a large synthetic vocabulary, lengths log-normal (median ~300 tokens, long tail
to ~4,000), a fifth multi-turn, some with system prompts. Tokenizer: Qwen2's pipeline (NFC, Qwen's pre-tokenizer
regex, byte-level BPE, Qwen's special tokens and chat template) with a 151,643-token BPE trained on that text, so
per-token cost is that of the real Qwen2 tokenizer, which cannot be downloaded here.
Ends with `token_stats_speedup_vs_loop: X` (wall-clock examples/s ratio). The cpu-s column (all processes) shows
whether other load on the machine skewed a round: token_stats needs every core to itself for its ratio.
"""

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402
import token_stats  # noqa: E402

DEFAULT_SYSTEM = "You are a helpful assistant."  # what Qwen2-Instruct's template adds when a record has none


# ---------------------------------------------------------------------------------------------------------------
# Generated text and data
# ---------------------------------------------------------------------------------------------------------------

class TextMaker:
    """English-like text over a 200,000-word synthetic lexicon and Chinese text over 5,000 CJK characters, both
    Zipf-distributed, with punctuation, numbers, paragraphs and lists: the mix the real tokenizer sees."""

    def __init__(self, seed=0):
        rng = random.Random(seed)
        onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
                  "ch", "sh", "st", "th", "tr"]
        vowels = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ea", "ou", "y"]
        codas = ["", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st"]
        words = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
                 "by", "this", "are", "or", "from", "at", "an", "which", "but", "not", "can", "you", "we", "they"]
        seen = set(words)
        while len(words) < 200_000:
            w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                         for _ in range(rng.choice([1, 1, 1, 2, 2, 2, 3])))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        self.chars = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA6), 5000)]
        self.word_cum = list(itertools.accumulate(1 / (r + 1) ** 1.05 for r in range(len(self.words))))
        self.char_cum = list(itertools.accumulate(1 / (r + 1) ** 0.9 for r in range(len(self.chars))))

    def english(self, rng, n_words):
        words = rng.choices(self.words, cum_weights=self.word_cum, k=n_words)
        out, i = [], 0
        while i < n_words:
            s = words[i:i + rng.randint(4, 22)]
            i += len(s)
            if rng.random() < 0.15:
                s.insert(rng.randrange(len(s)), str(rng.randint(0, 5000)))
            if len(s) > 6 and rng.random() < 0.4:
                s[len(s) // 2] += ","
            sentence = " ".join(s)
            out.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!:"))
            r = rng.random()
            out.append("\n\n" if r < 0.12 else "\n- " if r < 0.17 else " ")
        return "".join(out).strip()

    def chinese(self, rng, n_chars):
        chars = rng.choices(self.chars, cum_weights=self.char_cum, k=n_chars)
        out, i = [], 0
        while i < n_chars:
            k = rng.randint(4, 30)
            out.append("".join(chars[i:i + k]))
            i += k
            out.append(rng.choice("，，，。。、？！：；"))
            if rng.random() < 0.05:
                out.append(rng.choice(self.words[:3000]) + " ")
            if rng.random() < 0.05:
                out.append(str(rng.randint(0, 2024)))
            if rng.random() < 0.06:
                out.append("\n\n")
        return "".join(out)

    def text(self, rng, lang, n_tokens):
        """About `n_tokens` tokens of the trained tokenizer (~4.7 characters per English token, ~1.3 per Chinese)."""
        if lang == "en":
            return self.english(rng, max(1, round(n_tokens * 0.8)))
        return self.chinese(rng, max(1, round(n_tokens * 1.3)))


def make_records(maker, n, seed):
    """SFT records: 60% of single-turn ones as {query, answer}, the rest {messages}; a fifth multi-turn (2-4 turns);
    40% of the {messages} ones with a system prompt; half English, half Chinese."""
    rng = random.Random(seed)
    for _ in range(n):
        total = min(4000, max(24, int(rng.lognormvariate(math.log(280), 0.75))))
        lang = "en" if rng.random() < 0.5 else "zh"
        turns = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        pairs = []
        for _ in range(turns):
            q = rng.uniform(0.1, 0.5)
            n = total / turns
            pairs.append((maker.text(rng, lang, int(n * q)), maker.text(rng, lang, int(n * (1 - q)))))
        if turns == 1 and rng.random() < 0.6:
            yield {"query": pairs[0][0], "answer": pairs[0][1]}
            continue
        messages = []
        if rng.random() < 0.4:
            system = {"en": "You are a careful assistant.", "zh": "你是一个乐于助人的助手，请用中文回答。"}[lang]
            messages.append({"role": "system", "content": system})
        for q, a in pairs:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        yield {"messages": messages}


def build_tokenizer(cache, maker, vocab_size, docs):
    """The real-size Qwen2-like tokenizer, trained once on `docs` generated texts and cached under `cache`."""
    path = os.path.join(cache, f"tokenizer-{vocab_size}-{docs}")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        rng = random.Random(1)
        corpus = [maker.english(rng, 300) if i % 2 else maker.chinese(rng, 400) for i in range(docs)]
        demo.build_tokenizer(vocab_size=vocab_size, corpus=corpus).save_pretrained(path + ".tmp")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The two contenders
# ---------------------------------------------------------------------------------------------------------------

def post_loop(data_file, tokenizer_path):
    """The background post's loop, for {query, answer} and {messages} records: the ChatML prompt up to the last
    answer as a formatted string, encode it, encode the answer, keep len(prompt ids + answer ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    template = "<|im_start|>{role}\n{content}<|im_end|>\n"
    lengths = []
    with open(data_file, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "messages" in record:
                messages = record["messages"]
            else:
                messages = [{"role": "user", "content": record["query"]},
                            {"role": "assistant", "content": record["answer"]}]
            if messages[0]["role"] != "system":
                messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + messages
            prompt = "".join(template.format(**m) for m in messages[:-1]) + "<|im_start|>assistant\n"
            in_ids = tokenizer.encode(prompt)
            out_ids = tokenizer.encode(messages[-1]["content"])
            lengths.append((len(in_ids + out_ids), len(in_ids)))
    return lengths


def run_token_stats(data_file, tokenizer_path, out_file):
    # A fresh datasets cache, so each round converts the file to Arrow again, as a first run does.
    import datasets

    cache = tempfile.mkdtemp(prefix="token-stats-bench-cache-")
    saved, datasets.config.HF_DATASETS_CACHE = datasets.config.HF_DATASETS_CACHE, cache
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its JSON report; the numbers are printed below
            return token_stats.main(["--data", data_file, "--tokenizer", tokenizer_path, "--format", "json",
                                     "--output", out_file, "--max_len", "4096"])
    finally:
        datasets.config.HF_DATASETS_CACHE = saved
        shutil.rmtree(cache, ignore_errors=True)


def cpu_seconds():
    """CPU time of this process and its finished children (token_stats' workers), user + system."""
    import resource

    return sum(x.ru_utime + x.ru_stime for x in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--vocab_size", type=int, default=151_643, help="BPE entries (Qwen2: 151,643)")
    parser.add_argument("--corpus_docs", type=int, default=20_000, help="generated texts the BPE is trained on")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best time of each side counts")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), f"token-stats-bench-{os.getuid()}"))
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)

    t = time.time()
    maker = TextMaker(seed=0)
    tokenizer_path = build_tokenizer(args.cache, maker, args.vocab_size, args.corpus_docs)
    data_file = os.path.join(args.cache, f"sft-{args.examples}.jsonl")
    if not os.path.isfile(data_file):
        demo.write_jsonl(data_file + ".tmp", make_records(maker, args.examples, seed=2))
        os.replace(data_file + ".tmp", data_file)
    print(f"setup (cached after the first run): {time.time() - t:.1f} s; data {data_file}; "
          f"tokenizer: Qwen2 pipeline with a {args.vocab_size:,}-token byte-level BPE trained on the generated text")

    out_file = os.path.join(args.cache, "lengths.jsonl")
    loop_s, ours_s, loop_cpu, ours_cpu = [], [], [], []
    for r in range(args.rounds):
        t, c = time.time(), cpu_seconds()
        loop_lengths = post_loop(data_file, tokenizer_path)
        loop_s.append(time.time() - t)
        loop_cpu.append(cpu_seconds() - c)
        t, c = time.time(), cpu_seconds()
        report = run_token_stats(data_file, tokenizer_path, out_file)
        ours_s.append(time.time() - t)
        ours_cpu.append(cpu_seconds() - c)
        print(f"round {r + 1}: loop {loop_s[-1]:.1f} s ({loop_cpu[-1]:.1f} cpu-s), token_stats {ours_s[-1]:.1f} s "
              f"({ours_cpu[-1]:.1f} cpu-s in all processes); machine load {os.getloadavg()[0]:.1f}", flush=True)

    # Agreement. The loop's length leaves out the closing "<|im_end|>\n" of the last answer, which the training
    # encoding has; so for every example, token_stats' total must be the loop's + 2, and for single-turn ones its
    # answer tokens (labelled) the answer's own tokens + the <|im_end|>.
    with open(out_file, encoding="utf-8") as f:
        ours = [json.loads(line) for line in f]
    with open(data_file, encoding="utf-8") as f:
        single = ["query" in json.loads(line) for line in f]
    n = len(loop_lengths)
    total_ok = sum(o["total"] == lo + 2 for o, (lo, _) in zip(ours, loop_lengths))
    split_ok = sum(o["prompt"] == p + 1 and o["answer"] == lo - p + 1
                   for o, (lo, p), s in zip(ours, loop_lengths, single) if s)
    loop_total = [lo for lo, _ in loop_lengths]
    agree = (len(ours) == n == report["count"] and total_ok == n and split_ok == sum(single)
             and report["min"] == min(loop_total) + 2 and report["max"] == max(loop_total) + 2
             and abs(report["mean"] - (sum(loop_total) / n + 2)) < 1e-9)

    loop_rate, ours_rate = n / min(loop_s), n / min(ours_s)
    p = report["percentiles"]
    print(f"data: {n:,} examples ({sum(single):,} single-turn query/answer), tokens per example: median "
          f"{p['p50']:.0f}, p99 {p['p99']:.0f}, max {report['max']:,}, {report['total_tokens']:,} in all")
    print(f"{'':34}{'seconds':>10}{'examples/s':>14}{'cpu-s':>10}")
    print(f"{'post loop (format + encode)':34}{min(loop_s):>10.2f}{loop_rate:>14,.0f}{min(loop_cpu):>10.1f}")
    print(f"{'token_stats.py (exact encoding)':34}{min(ours_s):>10.2f}{ours_rate:>14,.0f}{min(ours_cpu):>10.1f}"
          f"   ({report['num_proc']} process{'es' if report['num_proc'] > 1 else ''}; best of {args.rounds} "
          f"round{'s' if args.rounds > 1 else ''} each)")
    print(f"agreement with the loop: count {report['count']:,} vs {n:,}; total = loop's + 2 (the closing "
          f"<|im_end|>\\n) for {total_ok:,}/{n:,}; single-turn prompt = loop's prompt ids + 1 (the final \\n) and "
          f"answer = answer ids + 1 (<|im_end|>) for {split_ok:,}/{sum(single):,}; all exact: {agree}")
    print(f"token_stats_examples_per_s: {ours_rate:.0f}")
    print(f"loop_examples_per_s: {loop_rate:.0f}")
    print(f"token_stats_speedup_vs_loop: {loop_rate and ours_rate / loop_rate:.2f}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
