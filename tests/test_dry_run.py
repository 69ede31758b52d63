"""--dry_run: every record read and checked, the model built without its weights, the plan printed, nothing trained."""

import json
import shutil

import demo
from conftest import exit_2_line, run_cli


def without_weights(model_dir, dest):
    """A copy of a checkpoint folder without its weights: a dry run that read them would fail."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(dest.glob("*.safetensors"))
    return str(dest)


def dry_run_line(text):
    (line,) = [line for line in text.splitlines() if line.startswith("dry run: ")]
    return line


class TestSFT:
    def test_counts_every_token_and_step_and_trains_nothing(self, sft_demo, tmp_path, qwen2_tokenizer, capsys):
        import sft_qwen2
        from collate import IGNORE_INDEX, encode_sft_batch

        records = demo.make_sft_records(10, seed=3)
        train = demo.write_jsonl(tmp_path / "train.jsonl", records)
        out = tmp_path / "o"
        plan = sft_qwen2.main(["--model_name_or_path", without_weights(sft_demo[0], tmp_path / "config-only"),
                               "--train_file", train, "--output_dir", str(out), "--use_cpu", "--max_len", "256",
                               "--per_device_train_batch_size", "3", "--num_train_epochs", "2", "--dry_run"])
        encoded = [enc for enc, _ in encode_sft_batch(records, qwen2_tokenizer, 256)]
        answer = sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in encoded)
        prompt = sum(len(e["input_ids"]) for e in encoded) - answer
        assert plan == {"train_examples": 10, "train_tokens": (prompt, answer), "steps_per_epoch": 4, "steps": 8,
                        "eval_examples": 0}  # ceil(10 / 3) = 4 steps an epoch, 2 epochs
        line = dry_run_line(capsys.readouterr().out)
        assert line == (f"dry run: 10 training examples, {prompt + answer:,} tokens ({prompt:,} prompt + {answer:,} "
                        f"answer); 4 optimizer steps per epoch of 1 x 3 x 1 examples, 8 in all (2 epochs). Nothing "
                        f"was trained.")
        assert not any(p.name.startswith("checkpoint-") or p.suffix == ".safetensors" for p in out.iterdir())

    def test_a_bad_record_still_exits_2(self, sft_demo, tmp_path, capsys):
        import sft_qwen2

        lines = [json.dumps(r) for r in demo.make_sft_records(6)] + ['{"query": "q"}']
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        line = exit_2_line(capsys, sft_qwen2.main, ["--model_name_or_path", sft_demo[0], "--train_file", str(path),
                                                     "--output_dir", str(tmp_path / "o"), "--use_cpu", "--dry_run"])
        assert line == f"error: {path}: line 7: missing key 'answer' (query_answer records have 'query', 'answer')"


class TestScorer:
    def test_every_sample_encoded_and_counted_without_the_weights(self, scorer_demo, vl_processor, tmp_path, capsys):
        import train_scorer
        from collate import VLEncoder

        samples = demo.make_vl_samples(9, seed=11, prefix="d")
        bad = dict(samples[4], **{"0.jpg": b"not a jpeg"})
        shard = demo.write_shard(tmp_path / "d.tar", samples[:4] + [bad] + samples[5:])
        out = tmp_path / "o"
        plan = train_scorer.main([
            "--model_name_or_path", without_weights(scorer_demo[0], tmp_path / "config-only"), "--train_shards", shard,
            "--num_types", "3", "--output_dir", str(out), "--use_cpu", "--min_pixels", "1024", "--max_pixels", "4096",
            "--per_device_train_batch_size", "2", "--num_train_epochs", "3", "--dataloader_num_workers", "0",
            "--dry_run"])
        image_token = vl_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        encode = VLEncoder(vl_processor, {"type": 3}, True, 1024, 4096, 8192)  # each sample as training encodes it
        text = image = 0
        for s in samples[:4] + samples[5:]:
            ids = encode(s)["input_ids"].reshape(-1)
            image += int((ids == image_token).sum())
            text += len(ids) - int((ids == image_token).sum())
        # the epoch counts every sample in the shard (the tar headers), as the run's own step count does
        assert plan == {"train": {"samples": 8, "bad_samples": 1, "text_tokens": text, "image_tokens": image},
                        "steps_per_epoch": 5, "steps": 15}
        assert "dry run: train: 8 samples (1 bad), " in capsys.readouterr().out
        assert not any(p.name.startswith("checkpoint-") for p in out.iterdir())

    def test_two_processes_count_each_sample_once(self, tmp_path):
        """The demo's 128 training and 48 evaluation samples, read half on each rank, each counted once; steps for
        two ranks: ceil(128 / (2 x 8)) = 8 an epoch."""
        res = run_cli(["bash", "run.sh", "train_scorer.py", "--demo", "--dry_run", "--output_dir",
                       str(tmp_path / "o")], env={"NPROC_PER_NODE": "2"})
        assert res.returncode == 0, res.stderr[-3000:]
        parts = dry_run_line(res.stdout).split("; ")
        assert [p.split(", ")[0] for p in parts[:3]] == ["dry run: train: 128 samples (0 bad)",
                                                         "eval: 48 samples (0 bad)", "predict: 48 samples (0 bad)"]
        assert parts[3] == "8 optimizer steps per epoch of 2 x 8 x 1 samples, 80 in all (--max_steps). Nothing was " \
                           "trained.", parts
