"""What keeps a long run's work: a graceful stop on SIGTERM / SIGINT, checkpoints that resume can trust, the
choice of the checkpoint to resume from (none for a run that has finished: it is left as it is), and early stopping
that survives a resume.

Both training scripts give their Trainer `callbacks=[stop, SkipNonFinite(args.max_bad_steps), MarkComplete(),
*early_stopping(args)]`, refuse a missing --resume_from_checkpoint before any data is read
(`check_resume_flag(args)`), find the checkpoint with `checkpoint_to_resume(args)` (refusing one that
`resume_mismatch` names), train only when `finished_run(args)` does not say --output_dir holds the finished run the
command asks for, and call `exit_if_stopped(stop, args)` and `exit_if_failed(skip, args)` right after
`trainer.train()`.

- SIGTERM (Slurm, Kubernetes) or SIGINT (Ctrl-C), to one process or to the whole group: the current optimizer step
  finishes, every rank learns at its end whether any rank was asked to stop (one all-reduce of a flag per step), so
  all of them save the same checkpoint (collective under DDP, FSDP, ZeRO-3) and stop; the script then exits with
  143 or 130. A second signal, more than a second after the first, exits at once. transformers' own
  `enable_jit_checkpoint` does not do this: SIGTERM only, decided per rank, after a fixed 3 s wait.
- A step whose gradients are not finite (a NaN or inf loss, an overflow) is skipped: no optimizer update, counted,
  logged as `skipped_steps`; after `--max_bad_steps` such steps in a row the run saves and exits 2.
- A checkpoint gets a `checkpoint-complete` marker once every rank has written its part; resume skips a
  `checkpoint-N` without it (a save that a crash or a kill cut short), says so, and takes the newest complete one.
- Next to the marker, rank 0 writes `checkpoint-run.json`: what the run is (`run_record`: the model, what trains,
  the sharding and the number of processes). A resume compares it with the run at hand (`resume_mismatch`), not
  the checkpoint's `config.json`, which a sharded FSDP2 save does not write, and refuses with one line a checkpoint
  this run cannot load: another model or mode, another sharding, another number of processes under ZeRO, a file
  missing. Rank 0 chooses the checkpoint, every rank checks its own view of it, and all agree on the verdict.
- --early_stopping_patience: transformers' EarlyStoppingCallback, whose count of evaluations without improvement a
  resume restores (`EarlyStopping`); `best_model_summary` says where it stopped the run and, with
  --load_best_model_at_end, which checkpoint's weights the final save holds (the Trainer loads them back at the end
  of training; the best checkpoint is never rotated away).
- House rule: every file a sharded save writes and every file its resume reads is listed in `CHECKPOINT_FILES`,
  here and nowhere else; tests/test_sharding.py checks that list against what accelerate and DeepSpeed write.
"""

import glob
import json
import os
import shlex
import signal
import sys
import time

import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from plumbing import eval_metric, fail, first_problem, leave_process_group, log

COMPLETE = "checkpoint-complete"
RUN_RECORD = "checkpoint-run.json"
# Every file of a sharded checkpoint, per sharding kind (`sharding`): what a resume reads (checked to be there before
# it starts: a copy without the hidden `.metadata` files cannot load) and what the save writes besides. Glob patterns
# in which {rank} stands for each rank of the run that saved it, {_rank} for "_" and each rank, or for nothing after a
# run of one process (`checkpoint_files`). tests/test_sharding.py checks the lists against what transformers' Trainer,
# accelerate and DeepSpeed write (fp16 runs add the Trainer's scaler.pt).
TRAINER_FILES = ("trainer_state.json", "scheduler.pt", "rng_state{_rank}.pth", COMPLETE, RUN_RECORD)
CHECKPOINT_FILES = {
    # Trainer.save_model writes nothing here (it saves only FULL_STATE_DICT); accelerate's save_fsdp_model and
    # save_fsdp_optimizer write torch's distributed checkpoint (DCP): a file per rank and an index
    "FSDP2 SHARDED_STATE_DICT": {
        "resume reads": TRAINER_FILES + ("pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__{rank}_0.distcp",
                                         "optimizer_0/.metadata", "optimizer_0/__{rank}_0.distcp"),
        "also written": ()},
    # DeepSpeed's own checkpoint: each rank's partition of the weights and of the optimizer states (bf16_ prefixed
    # under bf16); besides, the gathered 16-bit model as an HF folder (stage3_gather_16bit_weights_on_model_save,
    # plus the tokenizer's or processor's files) and DeepSpeed's conversion scripts
    "DeepSpeed ZeRO-3": {
        "resume reads": TRAINER_FILES + ("latest", "global_step*/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                                         "global_step*/*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"),
        "also written": ("config.json", "generation_config.json", "model.safetensors", "training_args.bin",
                         "zero_to_fp32.py", "zero_to_torch.py")},
}
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
            keep_the_stop(args)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def keep_the_stop(args):
    """A run stopped to be resumed ends as stopped: the Trainer would otherwise load the best checkpoint's weights
    (--load_best_model_at_end: a sharded read at 7B, inside the scheduler's grace period) for a final save the stop
    never makes."""
    args.load_best_model_at_end = False


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
            keep_the_stop(args)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:  # a training log: printed after this, and kept in the history
            logs["skipped_steps"] = state.log_history[-1]["skipped_steps"] = self.skipped


class EarlyStopping(EarlyStoppingCallback):
    """transformers' EarlyStoppingCallback (stop after --early_stopping_patience evaluations in a row without an
    improvement of --metric_for_best_model by more than --early_stopping_threshold) that keeps its count across a
    resume and notes the step at which it stopped the run.

    The Trainer writes the count into each checkpoint's trainer_state.json (`stateful_callbacks`) but reads it back
    only with --restore_callback_states_from_checkpoint, and then with the checkpoint's patience in place of the
    flag's; without it a resumed run would count from 0 again. And a run resumed from a checkpoint saved without
    early stopping would fail at its first save (the Trainer updates the state of each stateful callback it finds in
    the checkpoint's record, and this one is not there): it is added.
    An evaluation at a step already evaluated (--eval_on_start after a resume, the final evaluation) is of weights
    already counted: counting it again would stop a resumed run earlier than an uninterrupted one."""

    def __init__(self, early_stopping_patience=1, early_stopping_threshold=0.0):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.stopped_step = None  # the step at which this callback stopped training, before --max_steps

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = state.stateful_callbacks.setdefault(type(self).__name__, self.state())  # resumed: the checkpoint's
        saved = saved[0] if isinstance(saved, list) else saved
        self.early_stopping_patience_counter = saved["attributes"]["early_stopping_patience_counter"]

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        metric = eval_metric(args.metric_for_best_model)
        # the Trainer logs an evaluation (log_history[-1]) before it calls this
        if any(h.get("step") == state.global_step and metric in h for h in state.log_history[:-1]):
            return
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if control.should_training_stop and self.stopped_step is None and state.global_step < state.max_steps \
                and self.early_stopping_patience_counter >= self.early_stopping_patience:
            self.stopped_step = state.global_step


def early_stopping(args):
    """The callbacks --early_stopping_patience asks for: [EarlyStopping] or []."""
    if args.early_stopping_patience is None:
        return []
    return [EarlyStopping(args.early_stopping_patience, args.early_stopping_threshold)]


def best_model_summary(trainer):
    """What the summary says about early stopping and --load_best_model_at_end: at which step of how many planned
    the run stopped, and which checkpoint's weights the final model holds, with its metric ("" when neither)."""
    state, args = trainer.state, trainer.args
    metric = args.metric_for_best_model
    parts = [f"stopped early at step {cb.stopped_step} of {state.max_steps} planned ({metric}: no improvement in "
             f"{cb.early_stopping_patience} evaluation{'s' if cb.early_stopping_patience > 1 else ''})"
             for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStopping) and cb.stopped_step]
    if args.load_best_model_at_end and state.best_metric is not None:
        if state.best_model_checkpoint:
            parts.append(f"final weights from the best checkpoint, {os.path.basename(state.best_model_checkpoint)} "
                         f"({metric} {state.best_metric:.4g})")
        else:  # its checkpoint was deleted before a resume (the Trainer said so)
            parts.append(f"the best checkpoint ({metric} {state.best_metric:.4g} at step {state.best_global_step}) is "
                         f"gone: the final weights are the last step's")
    return "; ".join(parts)


class MarkComplete(TrainerCallback):
    """Write the completeness marker and the run record into a checkpoint once every rank has finished writing it."""

    def on_save(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if args.should_save:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            write_run_record(path, run_record(model, args.world_size))
            with open(os.path.join(path, COMPLETE), "w") as f:
                f.write(f"step {state.global_step}\n")


def sharding(state=None):
    """How this run's checkpoints are written, from accelerate's `state` (default: the AcceleratorState that the
    Trainer set up): "FSDP2 SHARDED_STATE_DICT", "DeepSpeed ZeRO-3", or "none" (one process or DDP, whose
    checkpoints are the same files). Read from accelerate, not from the flags: it shards only on GPUs."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = state or AcceleratorState()
    if state.distributed_type == DistributedType.FSDP:
        return f"FSDP{state.fsdp_plugin.fsdp_version} {state.fsdp_plugin.state_dict_type.name}"
    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    return "none"


def run_record(model, world_size, state=None):
    """What a checkpoint of this run holds and how it is written: the model (a scorer: the base it refers to and the
    units its value heads learned, `scorer_targets`; SFT: the architecture's sizes), what trains (a scorer:
    `scorer_trains`; SFT: LoRA or full), `sharding(state)` and the number of processes. MarkComplete writes it into each
    checkpoint; resume_mismatch compares it."""
    config = model.config
    if hasattr(config, "scorer_trains"):
        identity = {"scorer_base_model": config.scorer_base_model,
                    "scorer_targets": getattr(config, "scorer_targets", None)}
        trains = config.scorer_trains
    else:
        identity = {key: getattr(config, key, None)
                    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
        trains = "LoRA" if getattr(model, "peft_config", None) else "full"  # a peft model carries its settings
    return {"model": identity, "trains": trains, "sharding": sharding(state), "world_size": world_size}


def write_run_record(path, record):
    with open(os.path.join(path, RUN_RECORD), "w") as f:
        json.dump(record, f, indent=1)


def checkpoint_to_resume(args):
    """`--resume_from_checkpoint` if given, else the newest complete `checkpoint-N` in `output_dir` (None: start
    afresh); newer incomplete ones are named and skipped. Rank 0's choice, on every rank (one broadcast): nodes may
    not share a disk, and every rank must resume from the same step (resume_mismatch then checks each rank's view)."""
    resume = args.resume_from_checkpoint
    if resume is None and os.path.isdir(args.output_dir):
        steps = sorted((int(name.split("-")[1]), name) for name in os.listdir(args.output_dir)
                       if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
                       and os.path.isdir(os.path.join(args.output_dir, name)))
        for _, name in reversed(steps):
            path = os.path.join(args.output_dir, name)
            if os.path.isfile(os.path.join(path, COMPLETE)):
                log(f"resuming from {path}")
                resume = path
                break
            log(f"skipping {path}: incomplete (no {COMPLETE} marker; its save was cut short)")
    return rank_0s(resume)


FINAL_STATE = "trainer_state.json"  # Trainer.save_state() in --output_dir: after the final model, at a run's very end


def check_resume_flag(args):
    """Before any data or model is read: exit 2 on every rank if --resume_from_checkpoint names no folder (rank 0's
    view, as `checkpoint_to_resume`'s choice; `resume_mismatch` later checks every rank's view of the files)."""
    resume = args.resume_from_checkpoint
    missing = resume is not None and not os.path.isdir(resume)
    if rank_0s(missing):
        fail(f"--resume_from_checkpoint {resume}: no such folder (leave the flag out to resume from the newest "
             f"complete checkpoint in --output_dir)", every_rank=True)


def finished_run(args):
    """The line saying that --output_dir already holds the finished run this command asks for, or None (train, or
    resume). Called where the run would resume (after `resume_mismatch`, so a command with other model flags is
    refused as a resume would be): running the same command again, which otherwise resumes, then changes nothing.
    Finished: its final `trainer_state.json` (written after the final model) says it trained all of its steps, and
    this command asks for no more steps (--max_steps) or epochs (--num_train_epochs) than it did; an explicit
    --resume_from_checkpoint is always resumed. Rank 0's view, on every rank (one broadcast)."""
    line = None
    path = os.path.join(args.output_dir, FINAL_STATE)
    if args.resume_from_checkpoint is None and args.process_index == 0 and os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)
        done, steps = state.get("global_step", 0), state.get("max_steps", 0)
        more = (args.max_steps > done if args.max_steps > 0
                else args.num_train_epochs > state.get("epoch", 0) + 1e-6)
        if 0 < steps <= done and not more:
            line = (f"{args.output_dir} holds this run, finished: {done} of {steps} steps trained and the final model "
                    f"saved; nothing to do (train more with a higher --max_steps or --num_train_epochs, or start anew "
                    f"with another --output_dir)")
    return rank_0s(line)


def rank_0s(value):
    """Rank 0's `value` on every rank (one broadcast; `value` itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def saved_record(path, run):
    """The run record of checkpoint `path`. A checkpoint of an earlier version has none: it is checked as that
    version checked it, by its `config.json` (the model) and `adapter_config.json` (LoRA), its sharding and
    process count taken as this run's; with neither file (an FSDP2 save, which that version could not resume
    either) nothing says what it holds: None."""
    if os.path.isfile(os.path.join(path, RUN_RECORD)):
        with open(os.path.join(path, RUN_RECORD)) as f:
            return json.load(f)
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
    if not adapter and not os.path.isfile(os.path.join(path, "config.json")):
        return None
    saved = {}
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
    scorer = "scorer_base_model" in run["model"]
    return {**run, "model": {key: saved.get(key) for key in run["model"]} if saved else run["model"],
            "trains": saved.get("scorer_trains") if scorer else ("LoRA" if adapter else "full")}


def checkpoint_files(sharding, world_size, part="resume reads"):
    """The file patterns of CHECKPOINT_FILES[sharding][part] ("resume reads" or "also written") in a checkpoint of a
    run of `world_size` processes (none for a sharding not listed there)."""
    return [pattern.format(rank=rank, _rank=f"_{rank}" if world_size > 1 else "")
            for pattern in CHECKPOINT_FILES.get(sharding, {}).get(part, ())
            for rank in (range(world_size) if "rank}" in pattern else [0])]


def n_processes(n):
    return f"{n} process" + ("es" if n > 1 else "")


def resume_mismatch(path, run):
    """Why checkpoint `path` cannot continue the run described by `run` (`run_record`), or None; found before
    training, not as a load error after the model, data and Trainer are set up. Every rank checks what it sees
    (`checkpoint_problem`), and all take the first problem in rank order, so that all exit together or none does;
    one that rank 0 does not meet says which process met it (its node does not see the files rank 0 sees)."""
    try:  # a rank that cannot read its view must still reach the all-gather below, or the others wait forever
        problem = checkpoint_problem(path, run)
    except (OSError, ValueError) as e:  # unreadable files, a cut-short checkpoint-run.json
        problem = f"{path}: cannot read it ({type(e).__name__}: {e}); use another --output_dir"
    rank, problem = first_problem(problem)
    return problem if rank == 0 else (f"{problem} (met by process {rank}, not by process 0: every node must see the "
                                      f"same --output_dir, on a shared filesystem, or a copy of the whole checkpoint)")


def shared_output_problem(args):
    """Why some process cannot see --output_dir as process 0 does, where the run will read back at its end what
    process 0 wrote there (--load_best_model_at_end: every rank loads the best checkpoint), or None; one verdict on
    every rank. Found at start: after training it is a crash in the load under FSDP2 and ZeRO-3, and under DDP a
    rank that keeps its last weights beside the others' best (a warning only). Process 0 writes a probe file, every
    rank looks for it."""
    import uuid

    import torch.distributed as dist

    if not (args.load_best_model_at_end and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        return None
    probe = os.path.join(args.output_dir, f".shared-probe-{rank_0s(uuid.uuid4().hex)}")
    if dist.get_rank() == 0:
        open(probe, "w").close()
    dist.barrier()
    rank, problem = first_problem(None if os.path.exists(probe) else "missing")
    if dist.get_rank() == 0:
        os.remove(probe)
    return problem and (f"--load_best_model_at_end: every process reads the best checkpoint back at the end, and "
                        f"process {rank} does not see what process 0 writes in --output_dir {args.output_dir} (a disk "
                        f"of its own node); put --output_dir on a filesystem every node sees")


def checkpoint_problem(path, run):
    """resume_mismatch's verdict from this process's view. The sharding must be the one the checkpoint was saved
    with (each writes other files; FSDP2 and DeepSpeed shard on GPUs only), with as many processes under ZeRO
    (DeepSpeed loads each rank's own partition of the optimizer states; torch's distributed checkpoint reshards an
    FSDP2 one to any number), and every file of that sharding there; what trains the same (a scorer: the same
    trained parameters on the same base, which its optimizer state fits; SFT: LoRA adapters or the full model), from
    the same model."""
    if not os.path.isdir(path):
        return f"{path}: no such folder"
    recorded = os.path.isfile(os.path.join(path, RUN_RECORD))
    saved = saved_record(path, run)
    if saved is None:
        return (f"{path}: holds no {RUN_RECORD}, config.json or adapter_config.json, so nothing says what it holds "
                f"(an FSDP2 checkpoint of an earlier version of this script, which could not resume it either, has "
                f"none); use another --output_dir")
    if saved["sharding"] != run["sharding"]:
        def kind(record):
            return (f"{'no sharding' if record['sharding'] == 'none' else record['sharding']} on "
                    f"{n_processes(record['world_size'])}")
        no_gpu = saved["sharding"] != "none" and not torch.cuda.is_available()
        return (f"{path}: saved with {kind(saved)}, this run has {kind(run)}"
                + (" (no GPU here: FSDP and DeepSpeed shard on GPUs only)" if no_gpu else "")
                + "; resume with the sharding it was saved with, or use another --output_dir")
    if saved["sharding"].startswith("DeepSpeed") and saved["world_size"] != run["world_size"]:
        return (f"{path}: saved with {saved['sharding']} on {n_processes(saved['world_size'])}, this run has "
                f"{run['world_size']}; DeepSpeed loads each rank's own partition of the optimizer states: resume on "
                f"{saved['world_size']} GPUs, or use another --output_dir")
    for name in checkpoint_files(saved["sharding"], saved["world_size"]) if recorded else ():
        if not glob.glob(os.path.join(glob.escape(path), name)):
            return (f"{path}: {name} is missing, which a {saved['sharding']} resume reads; copy the whole checkpoint "
                    f"(hidden files too), or use another --output_dir")
    scorer = "scorer_base_model" in run["model"]
    if saved["trains"] != run["trains"]:
        if scorer:
            return (f"{path}: saved with scorer_trains = {saved['trains']}, this run has {run['trains']}; use the "
                    f"same model and freezing flags to resume, or another --output_dir")
        holds = {"LoRA": "LoRA adapters", "full": "the full model"}
        return (f"{path}: holds {holds[saved['trains']]} and this run trains {holds[run['trains']]}; resume with the "
                f"flags it was saved with, or use another --output_dir")
    for key, value in run["model"].items():
        if saved["model"].get(key) != value:
            if key == "scorer_targets":  # the training labels changed, or the flags that standardize them
                return (f"{path}: its value heads learned targets standardized as {saved['model'].get(key)} "
                        f"({{label: [mean, std]}}), this run's are {value}; resume with those (--score_mean, "
                        f"--score_std, --score_norm), or use another --output_dir")
            if scorer:
                return (f"{path}: saved with {key} = {saved['model'].get(key)}, this run has {value}; use the same "
                        f"model and freezing flags to resume, or another --output_dir")
            return (f"{path}: saved from another model ({key} {saved['model'].get(key)}, this model's {value}); use "
                    f"another --output_dir")
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
    leave_process_group(exit_code=EXIT_CODES[stop.stopped])
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
