"""Run sft_qwen2.py or train_scorer.py (argv[1], the rest its flags) with a 5 s collective timeout and slow phases
whose waits grow with the data at real sizes, 10 s here: the SFT local main's encoding and rank 1's share of the
prediction (the demo answers its evaluation prompts), or rank 1's share of the scorer's exact evaluation and process
0's count of the training labels (standardized scores). Under run.sh with 2 processes (gloo).

On CPU, TrainingArguments creates the gloo group without --ddp_timeout (gloo's 30 min), so the group gets the short
timeout here, where accelerate creates it."""

import datetime
import os
import sys
import time

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SLOW = 10

init_process_group = dist.init_process_group


def with_short_timeout(*args, **kwargs):
    return init_process_group(*args, **{**kwargs, "timeout": datetime.timedelta(seconds=5)})


def run():
    dist.init_process_group = with_short_timeout
    script, sys.argv = sys.argv[1], sys.argv[1:]
    if script == "sft_qwen2.py":
        import sft_qwen2 as module

        encode_files = module.encode_files

        def slow_encoding(*args, **kwargs):
            if int(os.environ["LOCAL_RANK"]) == 0:
                time.sleep(SLOW)
            return encode_files(*args, **kwargs)

        module.encode_files = slow_encoding
        predict = module.predict

        def slow_prediction(*args, **kwargs):
            if int(os.environ["RANK"]) == 1:
                time.sleep(SLOW)
            return predict(*args, **kwargs)

        module.predict = slow_prediction
    else:
        import train_scorer as module

        exact_pass = module.exact_pass

        def slow_share(stream, args, on_bad_sample, rows_of, *rest, **kwargs):
            slept = []

            def slow_rows(batch):
                if args.process_index == 1 and not slept:
                    slept.append(time.sleep(SLOW))
                return rows_of(batch)

            return exact_pass(stream, args, on_bad_sample, slow_rows, *rest, **kwargs)

        module.exact_pass = slow_share
        label_statistics = module.label_statistics

        def slow_count(*args, **kwargs):  # process 0 reads every training label while the others wait
            time.sleep(SLOW)
            return label_statistics(*args, **kwargs)

        module.label_statistics = slow_count
    module.main()


if __name__ == "__main__":  # DataLoader workers' fork server imports this file too
    run()
