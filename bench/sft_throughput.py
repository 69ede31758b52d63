"""SFT training throughput on CPU: real (non-pad) tokens/s of our batching options vs the background post's recipe
and TRL's SFTTrainer, on the same model, data and optimizer steps, measured in one run.

    python bench/sft_throughput.py                  # the full bench (about 10-15 minutes on 2 cores)
    python bench/sft_throughput.py --examples 8     # a quick look

Model: Qwen2 architecture, hidden 256, 4 layers, fp32, sdpa, with the REAL 151,936-token vocabulary (the output
layer and its loss dominate a step at that size, as in real runs). Data: single-turn chats whose answer lengths
are log-normal (median ~250 tokens, p99 ~2,500), max_len 4096, fixed seed. Variants, each in its own process
(so peak RSS is its own):
  static     the background post: every example padded to max_len, stock transformers loss. The stock loss
             cannot hold batch 4 x 4096 x 151,936 fp32 logits in 24 GB, so it runs micro-batch 1 x 4
             accumulation steps: the same examples per optimizer step, the same loss.
  dynamic    sft_qwen2.py defaults: pad to the longest in the batch, random order
  grouped    sft_qwen2.py --train_sampling_strategy group_by_length
  packed     sft_qwen2.py --padding_free
  trl-*      TRL SFTTrainer on the same data as prompt/completion pairs (loss on the completion)
static, dynamic and packed see the same batches in the same order, so their losses agree.
All variants run without gradient checkpointing (a 4-layer model needs none) and with the same learning rate.
Ends with `sft_speedup_vs_static_padding: X` (best of ours / static) and `sft_speedup_vs_trl: Y` (best of ours /
best TRL setting that runs).
"""

import argparse
import os
import sys
import tempfile
import time

from common import build_bench_model, emit, make_records, peak_rss_gb, run_child

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = ("dynamic", "grouped", "packed")
TRL_SETTINGS = {"trl-padding-free": {"padding_free": True}, "trl-dynamic": {"padding_free": False}}


class CountingCollator:
    """Wraps a collator to count real and padded tokens of every batch it builds."""

    def __init__(self, collate, pad_id):
        self.collate, self.pad_id, self.real, self.total = collate, pad_id, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        ids = batch["input_ids"]
        self.total += ids.numel()
        self.real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        return batch


def common_training_args(a, out):
    return dict(output_dir=out, max_steps=a.examples // a.batch, learning_rate=1e-4, lr_scheduler_type="constant",
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                activation_checkpointing=False)


def run_ours(a, variant):
    import sft_qwen2

    counter = {}
    make = sft_qwen2.sft_collator

    def counting(tokenizer, *args, **kw):
        counter["c"] = CountingCollator(make(tokenizer, *args, **kw), tokenizer.pad_token_id)
        return counter["c"]

    sft_qwen2.sft_collator = counting
    flags = {"dynamic": [], "grouped": ["--train_sampling_strategy", "group_by_length"],
             "packed": ["--padding_free"]}[variant]
    argv = ["--model_name_or_path", a.model, "--train_file", a.data, "--max_len", str(a.max_len),
            "--per_device_train_batch_size", str(a.batch)] + flags
    for k, v in common_training_args(a, os.path.join(a.workdir, variant)).items():
        argv += [f"--{k}", str(v)]
    trainer = sft_qwen2.main(argv)
    return trainer, counter["c"]


def run_static(a):
    """The background recipe: pad everything to max_len, stock model and loss, plain Trainer."""
    import datasets
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from collate import encode_sft_batch
    from data import load_sft_file

    tok = AutoTokenizer.from_pretrained(a.model)
    records = load_sft_file(a.data).to_list()
    encoded = [e for e, _ in encode_sft_batch(records, tok, a.max_len)]
    ds = datasets.Dataset.from_list(encoded)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    collator = CountingCollator(DataCollatorForSeq2Seq(tok, padding="max_length", max_length=a.max_len,
                                                       label_pad_token_id=-100), tok.pad_token_id)
    args = TrainingArguments(per_device_train_batch_size=1, gradient_accumulation_steps=a.batch,
                             **common_training_args(a, os.path.join(a.workdir, "static")))
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer.train()
    return trainer, collator


def run_trl(a, variant):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from data import load_sft_file

    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [{"prompt": [{"role": "user", "content": r["query"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in load_sft_file(a.data).to_list()]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    config = SFTConfig(per_device_train_batch_size=a.batch, max_length=None, **TRL_SETTINGS[variant],
                       **common_training_args(a, os.path.join(a.workdir, variant)))
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    trainer.data_collator = CountingCollator(trainer.data_collator, tok.pad_token_id)
    trainer.train()
    return trainer, trainer.data_collator


def child(a):
    if a.child == "static":
        trainer, counter = run_static(a)
    elif a.child in OURS:
        trainer, counter = run_ours(a, a.child)
    else:
        trainer, counter = run_trl(a, a.child)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    # the run's own figure: the last one (with include_num_input_tokens_seen every log carries a running one)
    runtime = [h["train_runtime"] for h in history if "train_runtime" in h][-1]
    emit({"variant": a.child, "real_tokens": counter.real, "total_tokens": counter.total, "runtime_s": runtime,
          "losses": losses, "steps": trainer.state.global_step, "peak_rss_gb": peak_rss_gb()})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=32, help="training examples (steps = examples / batch)")
    p.add_argument("--batch", type=int, default=4, help="examples per optimizer step")
    p.add_argument("--max_len", type=int, default=4096)
    p.add_argument("--variants", default="static,dynamic,grouped,packed," + ",".join(TRL_SETTINGS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    workdir = tempfile.mkdtemp(prefix="sft-throughput-")
    model = build_bench_model(os.path.join(workdir, "model"))
    from transformers import AutoTokenizer

    import demo
    records = make_records(AutoTokenizer.from_pretrained(model), a.examples, seed=0)
    data = demo.write_jsonl(os.path.join(workdir, "train.jsonl"), records)

    results = {}
    for variant in a.variants.split(","):
        t = time.time()
        cmd = [sys.executable, os.path.join(HERE, "sft_throughput.py"), "--child", variant, "--workdir", workdir,
               "--model", model, "--data", data, "--examples", str(a.examples), "--batch", str(a.batch),
               "--max_len", str(a.max_len)]
        res, error = run_child(cmd)
        if res is None:
            results[variant] = {"error": error}
            print(f"{variant}: FAILED ({error})", flush=True)
            continue
        res["tokens_per_s"] = res["real_tokens"] / res["runtime_s"]
        res["padding_share"] = 1 - res["real_tokens"] / res["total_tokens"]
        res["mean_loss"] = sum(res["losses"]) / len(res["losses"])
        results[variant] = res
        print(f"{variant}: done in {time.time() - t:.0f}s", flush=True)

    print(f"\n{'variant':<18}{'real tok/s':>11}{'padding':>9}{'peak RSS GB':>13}{'mean loss':>11}{'steps':>7}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18}  refused to run: {r['error']}")
        else:
            print(f"{name:<18}{r['tokens_per_s']:>11.1f}{r['padding_share']:>9.1%}{r['peak_rss_gb']:>13.2f}"
                  f"{r['mean_loss']:>11.4f}{r['steps']:>7}")
    same = [results[v]["losses"] for v in ("static", "dynamic", "packed") if "losses" in results.get(v, {})]
    if len(same) > 1:
        worst = max(abs(x - y) / abs(y) for other in same[1:] for x, y in zip(other, same[0]))
        print(f"static/dynamic/packed per-step losses agree within {worst:.2e} (relative)")
    best_ours = max((results[v]["tokens_per_s"] for v in OURS if "tokens_per_s" in results.get(v, {})), default=None)
    trl = [r["tokens_per_s"] for v, r in results.items() if v.startswith("trl") and "tokens_per_s" in r]
    if best_ours and "tokens_per_s" in results.get("static", {}):
        print(f"sft_speedup_vs_static_padding: {best_ours / results['static']['tokens_per_s']:.2f}")
    if best_ours and trl:
        print(f"sft_speedup_vs_trl: {best_ours / max(trl):.2f}")


if __name__ == "__main__":
    main()
