"""DeepSpeed ZeRO-3 through the Trainer with the shipped configs/deepspeed/zero3.json, run by tests/test_sharding.py.

    python tests/zero3_worker.py WORKDIR plain                          # the reference: 1 process, no DeepSpeed
    torchrun --nproc_per_node 2 tests/zero3_worker.py WORKDIR zero3     # ZeRO-3 over 2 CPU processes (gloo)
    torchrun --nproc_per_node 1 tests/zero3_worker.py WORKDIR resume    # ZeRO-3, 1 process, from zero3's checkpoint

Both train the same tiny Qwen2 with the scripts' lean loss (it reads lm_head.weight outside lm_head's forward; under
ZeRO-3 that weight is an empty partition unless gathered) on the same batches (each rank its half), write the
logged losses to WORKDIR/<mode>/losses.json and the final model with `trainer.save_model` to WORKDIR/<mode>/final;
the last step is also a checkpoint, which `resume` tries to continue with one process: WORKDIR/resume/error.txt.
The ZeRO-3 run then answers prompts with the trained, partitioned model (sft_qwen2.py --do_predict's generation,
ranks in lockstep), takes one bf16 step with the same JSON and adds the gradient dtypes its engine reports, and
runs once more with the scripts' early stopping and --load_best_model_at_end (`best_model_kept`).

The scripts refuse --deepspeed on a machine without GPUs (accelerate counts one process there, so DeepSpeed's batch
check fails); DeepSpeed itself runs on CPU with three adjustments made here, that GPU runs do not need: `use_cpu`,
DeepSpeed's communication set up (gloo) before the model is loaded partitioned, and no shared-memory all-reduce op
(DeepSpeed compiles it on first use on a CPU machine, 1-2.5 minutes on 2 cores, again for every new environment;
gloo runs the same collectives).
"""

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import demo  # noqa: E402
from collate import IGNORE_INDEX  # noqa: E402
from lean_loss import use_lean_causal_lm_loss  # noqa: E402
from plumbing import leave_process_group  # noqa: E402
from reliability import EarlyStopping, MarkComplete  # noqa: E402

STEPS, BATCH = 4, 4  # global batch: 4 rows, 2 per rank under ZeRO-3


class Rows(torch.utils.data.Dataset):
    """Fixed token rows, the first 5 tokens of each masked out of the loss (a prompt)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:5] = IGNORE_INDEX
        return {"input_ids": self.ids[i], "labels": labels}


class InOrder(Trainer):
    """Rows in order, so that rank r of step s gets rows [4s + 2r, 4s + 2r + 2): the reference's step s batch."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def arguments(out, world, zero3, **changes):
    return TrainingArguments(**{
        "output_dir": out, "per_device_train_batch_size": BATCH // world, "max_steps": STEPS, "learning_rate": 1e-3,
        "adam_epsilon": 1e-4, "lr_scheduler_type": "constant", "weight_decay": 0.0, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "seed": 0, "disable_tqdm": True, "use_cpu": True,
        "deepspeed": os.path.join(ROOT, "configs", "deepspeed", "zero3.json") if zero3 else None, **changes})


def bf16_gradient_dtypes(workdir, base, world):
    """One step of a bf16 run with the shipped JSON, its "auto" precision filled in by the Trainer as on a GPU with
    bf16: the dtypes the DeepSpeed engine reduces gradients in (`communication_data_type`) and accumulates them in
    (`get_data_types`), and the dtype of the gradient partitions its ZeRO-3 optimizer keeps."""
    args = arguments(os.path.join(workdir, "zero3-bf16"), world, True, bf16=True, max_steps=1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)  # loaded partitioned by the new args
    trainer = InOrder(model=model, args=args, train_dataset=Rows(torch.load(os.path.join(workdir, "rows.pt"))))
    trainer.train()
    engine = trainer.model_wrapped
    return {"model": str(engine.get_data_types()[0]), "reduced": str(engine.communication_data_type),
            "accumulated": str(engine.get_data_types()[1]),
            "partitions": str(engine.optimizer.grad_partitions_flat_buffer.dtype)}


def best_model_kept(workdir, base, world):
    """Early stopping (the scripts' reliability.EarlyStopping, patience 1) and --load_best_model_at_end under ZeRO-3,
    evaluating and saving every step, the evaluation loss counted better when higher: it falls as the model learns
    the rows, so the first checkpoint is the best and the second evaluation stops the run. The Trainer then reads the
    best weights back from DeepSpeed's own checkpoint (deepspeed_load_checkpoint, every rank its partition), and the
    final save gathers them into WORKDIR/zero3-best/final; returns the step it stopped at and the best checkpoint."""
    out = os.path.join(workdir, "zero3-best")
    args = arguments(out, world, True, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                     per_device_eval_batch_size=BATCH // world, prediction_loss_only=True,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    use_lean_causal_lm_loss(model)
    rows = Rows(torch.load(os.path.join(workdir, "rows.pt")))
    trainer = InOrder(model=model, args=args, train_dataset=rows, eval_dataset=rows, callbacks=[EarlyStopping(1)])
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    return {"step": trainer.state.global_step, "best": os.path.basename(trainer.state.best_model_checkpoint)}


GENERATION_PROMPTS = [list(range(5, 5 + n)) for n in (9, 14, 20)]  # rank 0 answers 2, rank 1 one (+ a stand-in)


def generation_lockstep(trainer, base, world):
    """generation.generate on the ZeRO-3-partitioned model with uneven shares, batch 1, in lockstep, twice: then
    again with an extra eos that ends rank 0's first call early (fsdp2_worker.an_end_token), so the ranks' calls end
    at different passes. Every rank's forward passes in the second round (each gathers every layer from all ranks:
    equal counts, or the collectives mismatch), its answers, and the eos ids, for the saved model's answers to be
    compared with."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from fsdp2_worker import an_end_token
    from generation import generate, generation_config

    rank = dist.get_rank()
    config = generation_config(AutoTokenizer.from_pretrained(base), max_new_tokens=8)

    def answers():
        return generate(trainer.model, GENERATION_PROMPTS[rank::world], config, 1, "cpu", lockstep=True, calls=2)

    first = [None] * world
    dist.all_gather_object(first, answers())
    config.eos_token_id = [config.eos_token_id, an_end_token(first[0][1], first[1])]  # rank 0 starts with prompt 2
    forwards = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    second = answers()
    hook.remove()
    every = [None] * world
    dist.all_gather_object(every, {"forwards": len(forwards), "answers": second, "eos": config.eos_token_id})
    return every


def main(workdir, mode):
    zero3 = mode in ("zero3", "resume")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = os.path.join(workdir, "base")
    out = os.path.join(workdir, mode)
    if zero3:  # before the arguments: they set up DeepSpeed's communication
        import importlib

        # the module by its full name: in deepspeed.comm the attribute `torch` is torch itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # gloo alone: nothing to compile
    # one checkpoint, at the end: the files a sharded save writes
    args = arguments(out, world, zero3, save_strategy="steps", save_steps=STEPS)
    if zero3:
        import deepspeed

        _ = args.device  # torch.distributed (gloo), through accelerate
        deepspeed.init_distributed(dist_backend="gloo")  # before zero.Init reads the world size (from_pretrained)
    else:
        demo.build_tiny_qwen2(base, vocab_size=512)
        torch.save(torch.randint(0, 512, (STEPS * BATCH, 24), generator=torch.Generator().manual_seed(1)),
                   os.path.join(workdir, "rows.pt"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    partitioned = model.lm_head.weight.numel() == 0  # ZeRO-3 loaded every rank's share only
    use_lean_causal_lm_loss(model)
    losses = Losses()
    trainer = InOrder(model=model, args=args, train_dataset=Rows(torch.load(os.path.join(workdir, "rows.pt"))),
                      callbacks=[losses, MarkComplete()])
    if mode == "resume":  # what DeepSpeed says of a checkpoint of 2 processes
        os.makedirs(out, exist_ok=True)
        try:
            trainer.train(resume_from_checkpoint=os.path.join(workdir, "zero3", f"checkpoint-{STEPS}"))
            error = "none"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, "error.txt"), "w") as f:
            f.write(error)
        os._exit(0)
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))  # ZeRO-3: every rank takes part in gathering the weights
    generation = generation_lockstep(trainer, base, world) if zero3 else None
    dtypes = bf16_gradient_dtypes(workdir, base, world) if zero3 else None
    best = best_model_kept(workdir, base, world) if zero3 else None
    if args.process_index == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({"losses": losses.losses, "partitioned": partitioned, "bf16_gradient_dtypes": dtypes,
                       "best_model_kept": best, "generation": generation}, f)
    leave_process_group()  # the project's own exit: a collective's thread aborted a rank at interpreter exit (-6)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
