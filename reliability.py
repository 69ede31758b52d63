"""What keeps a long run's work: a graceful stop on SIGTERM / SIGINT, checkpoints that resume can trust, and the
choice of the checkpoint to resume from.

Both training scripts give their Trainer `callbacks=[stop, SkipNonFinite(args.max_bad_steps), MarkComplete()]`,
find the checkpoint with `checkpoint_to_resume(args)` (refusing one that `resume_mismatch` names), and call
`exit_if_stopped(stop, args)` and `exit_if_failed(skip, args)` right after `trainer.train()`.

- SIGTERM (Slurm, Kubernetes) or SIGINT (Ctrl-C), to one process or to the whole group: the current optimizer step
  finishes, every rank learns at its end whether any rank was asked to stop (one all-reduce of a flag per step), so
  all of them save the same checkpoint (collective under DDP, FSDP, ZeRO-3) and stop; the script then exits with
  143 or 130. A second signal, more than a second after the first, exits at once. transformers' own
  `enable_jit_checkpoint` does not do this: SIGTERM only, decided per rank, after a fixed 3 s wait.
- A step whose gradients are not finite (a NaN or inf loss, an overflow) is skipped: no optimizer update, counted,
  logged as `skipped_steps`; after `--max_bad_steps` such steps in a row the run saves and exits 2.
- A checkpoint gets a `checkpoint-complete` marker once every rank has written its part; resume skips a
  `checkpoint-N` without it (a save that a crash or a kill cut short), says so, and takes the newest complete one.
"""

import os
import shlex
import signal
import sys
import time

import torch
from transformers import TrainerCallback

from plumbing import fail, leave_process_group, log

COMPLETE = "checkpoint-complete"
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
# A signal this soon after the first is the same request: a launcher forwards to its workers what the process group
# has already received (torchrun does, for SIGTERM and SIGINT).
REPEAT_S = 1.0


def all_ranks_max(value, device):
    """The largest of every rank's integer `value` (one all-reduce; the value itself without a process group)."""
    import torch.distributed as dist

    flag = torch.tensor(value, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class GracefulStop(TrainerCallback):
    """Stop at the end of the optimizer step during which a SIGTERM or SIGINT arrived, with a checkpoint of it."""

    def __init__(self):
        self.first = None  # (signal number, monotonic time) of the first signal this process received
        self.stopped = self.stopped_step = None  # the signal every rank stopped for, and the step
        self.previous = {}
        self.pid = os.getpid()

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {s: signal.signal(s, self._on_signal) for s in EXIT_CODES}

    def _on_signal(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker forked from this rank, which inherited the handler:
            return  # its rank finishes the step with it, then stops it (a group's Ctrl-C reaches the workers too)
        if self.first is None:
            self.first = (signum, time.monotonic())
            print(f"{signal.Signals(signum).name} received: stopping after this optimizer step, with a checkpoint "
                  f"(a second signal stops at once)", file=sys.stderr, flush=True)
        elif time.monotonic() - self.first[1] > REPEAT_S:
            os._exit(EXIT_CODES[signal.Signals(signum)])

    def on_step_end(self, args, state, control, **kwargs):
        agreed = all_ranks_max(self.first[0] if self.first else 0, args.device)
        if agreed:
            self.stopped, self.stopped_step = signal.Signals(agreed), state.global_step
            control.should_save = control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class SkipNonFinite(TrainerCallback):
    """Skip the optimizer step when any rank's gradients hold a NaN or an inf; stop after `max_bad` in a row.

    Checked just before the optimizer step, after clipping (a non-finite norm makes every gradient NaN), on each
    rank's own gradients (FSDP2 shards them), then agreed across ranks like a stop: all skip together. A skipped step
    still counts as a step (the learning-rate schedule moves on), as when the step's batch had been left out.
    DeepSpeed's optimizer steps on its own gradients and is not guarded here.
    """

    def __init__(self, max_bad):
        self.max_bad = max_bad
        self.skipped = self.in_a_row = 0
        self.failed_step = None  # the step at which max_bad non-finite steps in a row ended the run

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in model.parameters() if p.grad is not None]
        bad = bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())
        if not all_ranks_max(int(bad), args.device):
            self.in_a_row = 0
            return control
        for p in model.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient (and their states) as they are
        self.skipped += 1
        self.in_a_row += 1
        log(f"step {state.global_step + 1}: non-finite loss or gradient, optimizer step skipped "
            f"({self.in_a_row} in a row, {self.skipped} in all)")
        if self.in_a_row >= self.max_bad:
            self.failed_step = state.global_step + 1
            control.should_save = control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:  # a training log: printed after this, and kept in the history
            logs["skipped_steps"] = state.log_history[-1]["skipped_steps"] = self.skipped


class MarkComplete(TrainerCallback):
    """Write the completeness marker into a checkpoint once every rank has finished writing it."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if args.should_save:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", COMPLETE)
            with open(path, "w") as f:
                f.write(f"step {state.global_step}\n")


def checkpoint_to_resume(args):
    """`--resume_from_checkpoint` if given, else the newest complete `checkpoint-N` in `output_dir` (None: start
    afresh); newer incomplete ones are named and skipped."""
    resume = args.resume_from_checkpoint
    if resume is not None or not os.path.isdir(args.output_dir):
        return resume
    steps = sorted((int(name.split("-")[1]), name) for name in os.listdir(args.output_dir)
                   if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
                   and os.path.isdir(os.path.join(args.output_dir, name)))
    for _, name in reversed(steps):
        path = os.path.join(args.output_dir, name)
        if os.path.isfile(os.path.join(path, COMPLETE)):
            log(f"resuming from {path}")
            return path
        log(f"skipping {path}: incomplete (no {COMPLETE} marker; its save was cut short)")
    return None


def resume_mismatch(path, config, use_peft=False):
    """Why checkpoint `path` cannot continue this run, or None; found before training, not as a load error after the
    model, data and Trainer are set up. A scorer (`config.scorer_trains`) needs the same trained parameters on the
    same base (its optimizer state fits only those); SFT needs LoRA adapters for a LoRA run and the full model for a
    full one, saved from this model."""
    from transformers import AutoConfig

    if hasattr(config, "scorer_trains"):
        saved = AutoConfig.from_pretrained(path)
        for key in ("scorer_trains", "scorer_base_model"):
            if getattr(saved, key, None) != getattr(config, key):
                return (f"{path}: saved with {key} = {getattr(saved, key, None)}, this run has "
                        f"{getattr(config, key)}; use the same model and freezing flags to resume, or another "
                        f"--output_dir")
        return None
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    if adapter != use_peft:
        saved, here = ("LoRA adapters", "the full model") if adapter else ("the full model", "LoRA adapters")
        return (f"{path}: holds {saved} and this run trains {here}; resume with the flags it was saved with, or "
                f"use another --output_dir")
    if not adapter:
        saved = AutoConfig.from_pretrained(path)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            if getattr(saved, key, None) != getattr(config, key, None):
                return (f"{path}: saved from another model ({key} {getattr(saved, key, None)}, this model's "
                        f"{getattr(config, key, None)}); use another --output_dir")
    return None


def exit_if_stopped(stop, args):
    """After `trainer.train()`: if a signal stopped the run, say where its checkpoint is and how to resume, and exit
    143 (SIGTERM) or 130 (SIGINT) on every rank together."""
    if stop.stopped is None:
        return
    path = os.path.join(args.output_dir, f"checkpoint-{stop.stopped_step}")
    launcher = ["python"] if args.world_size == 1 else ["bash", "run.sh"]  # run.sh: on each node, as before
    log(f"stopped by {stop.stopped.name} at step {stop.stopped_step}: checkpoint saved to {path}; the same command "
        f"resumes from it: {shlex.join(launcher + sys.argv)}")
    leave_process_group()
    sys.exit(EXIT_CODES[stop.stopped])


def exit_if_failed(skip, args, batch=None):
    """After `trainer.train()`: if non-finite steps ended the run, exit 2 on every rank naming the step and, with
    `batch` (a function every rank calls: the scorer's), the last batch's samples; its checkpoint is saved."""
    if skip.failed_step is None:
        return
    batch = batch() if batch else None
    path = os.path.join(args.output_dir, f"checkpoint-{skip.failed_step}")
    fail(f"{skip.max_bad} optimizer steps in a row had a non-finite loss or gradient, the last at step "
         f"{skip.failed_step}" + (f" (its batch: {batch})" if batch else "") + f"; checkpoint saved to {path}. "
         f"Look for a bad sample, lower the learning rate or raise --max_bad_steps", every_rank=True)
