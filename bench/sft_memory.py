"""Peak memory of one SFT optimizer step at the background post's shape (batch 4 x 4096 tokens) with Qwen2's real
151,936-token vocabulary: sft_qwen2.py vs a plain transformers Trainer with the stock loss, in one run.

    python bench/sft_memory.py          # a few minutes on 2 cores

Same bench model as sft_throughput.py (Qwen2 architecture, hidden 256, 4 layers, fp32, sdpa). Each side runs in
its own process (peak RSS is per process) under an address-space cap, so a side that needs more memory than the
machine has fails with an allocation error instead of taking the machine down. The stock loss materialises fp32
(tokens x vocab) logits (10 GB at 4 x 4096) and more tensors of that size in backward; ours computes logits only
at answer tokens, a chunk at a time. If the stock side cannot run at batch 4, the largest batch it survives is
measured and the ratio uses that (so the ratio understates the difference).
Ends with `sft_peak_rss_gb: M` (ours, batch 4) and `sft_memory_ratio_vs_stock: R` (stock peak / ours).
"""

import argparse
import os
import resource
import sys
import tempfile

from common import build_bench_model, emit, peak_rss_gb, run_child

HERE = os.path.dirname(os.path.abspath(__file__))
CAP_GB = 20  # of the machine's 24 GB; what a side needs beyond this it cannot have


def long_records(tokenizer, n, max_len):
    """Examples that fill max_len: a short question and an answer long enough to be cut at max_len."""
    return [{"query": f"Please write at length, part {i}.", "answer": " ocean" * max_len} for i in range(n)]


def child(a):
    import torch

    if a.child == "ours":
        import sft_qwen2

        sft_qwen2.main(["--model_name_or_path", a.model, "--train_file", a.data, "--max_len", str(a.max_len),
                        "--per_device_train_batch_size", str(a.batch), "--max_steps", "1", "--use_cpu",
                        "--output_dir", os.path.join(a.workdir, "ours"), "--save_strategy", "no",
                        "--report_to", "none", "--disable_tqdm", "true"])
    else:
        import datasets
        from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                                  TrainingArguments)

        from collate import encode_sft_batch
        from data import load_sft_file

        tok = AutoTokenizer.from_pretrained(a.model)
        encoded = [e for e, _ in encode_sft_batch(load_sft_file(a.data).to_list(), tok, a.max_len)]
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
        args = TrainingArguments(output_dir=os.path.join(a.workdir, "stock"), per_device_train_batch_size=a.batch,
                                 max_steps=1, use_cpu=True, save_strategy="no", report_to="none",
                                 disable_tqdm=True, activation_checkpointing=True)
        Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(encoded),
                data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)).train()
    emit({"side": a.child, "batch": a.batch, "peak_rss_gb": peak_rss_gb()})


def run_side(side, batch, a, model, data, workdir):
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (CAP_GB << 30, CAP_GB << 30))

    cmd = [sys.executable, os.path.join(HERE, "sft_memory.py"), "--child", side, "--batch", str(batch),
           "--max_len", str(a.max_len), "--model", model, "--data", data, "--workdir", workdir]
    res, error = run_child(cmd, preexec_fn=cap)
    return res if res is not None else {"error": error[:200]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max_len", type=int, default=4096)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    from transformers import AutoTokenizer

    import demo
    workdir = tempfile.mkdtemp(prefix="sft-memory-")
    model = build_bench_model(os.path.join(workdir, "model"))
    data = demo.write_jsonl(os.path.join(workdir, "train.jsonl"),
                            long_records(AutoTokenizer.from_pretrained(model), a.batch, a.max_len))

    ours = run_side("ours", a.batch, a, model, data, workdir)
    if "error" in ours:
        sys.exit(f"ours failed at batch {a.batch}: {ours['error']}")
    print(f"ours  batch {a.batch} x {a.max_len}: peak RSS {ours['peak_rss_gb']:.2f} GB", flush=True)
    stock, batch = None, a.batch
    while batch >= 1:
        res = run_side("stock", batch, a, model, data, workdir)
        if "error" not in res:
            stock = res
            print(f"stock batch {batch} x {a.max_len}: peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
            break
        print(f"stock batch {batch} x {a.max_len}: cannot run within {CAP_GB} GB ({res['error']})", flush=True)
        batch //= 2
    print(f"sft_peak_rss_gb: {ours['peak_rss_gb']:.2f}")
    if stock is None:
        print("sft_memory_ratio_vs_stock: stock cannot run even at batch 1")
    else:
        note = "" if stock["batch"] == a.batch else f" (stock at batch {stock['batch']}, ours at batch {a.batch})"
        print(f"sft_memory_ratio_vs_stock: {stock['peak_rss_gb'] / ours['peak_rss_gb']:.2f}{note}")


if __name__ == "__main__":
    main()
