"""What every script does the same way: config files, exit 2 and the early checks (model paths, output files),
warnings, training defaults, precision, demo, rank-0 logs.

Kept out of the scripts so that each of them reads as its own story (arguments -> data -> model -> trainer -> run)
and out of `collate.py`, whose functions stay pure.
"""

import atexit
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


def log(*args, **kwargs):
    """print() on the global main process only (RANK 0 under torchrun), so N processes say things once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def fail(error, every_rank=False):
    """Exit 2 with one line on stderr: the house rule for bad arguments and bad data.

    `every_rank`: all ranks met this error at the same step (a verdict they agreed on). Rank 0 says it, and no rank
    leaves before the others are here too: torchrun stops every process as soon as one has exited.
    """
    import torch.distributed as dist

    shared = every_rank and dist.is_available() and dist.is_initialized()
    if not shared or dist.get_rank() == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    if shared:
        leave_process_group(exit_code=2)
    sys.exit(2)


def warn(message):
    """One `warning: ` line on stderr, on the global main process only: legal but surprising input, said once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def first_problem(problem):
    """The first of every rank's `problem` (None: none) in rank order, with its rank: (rank, problem), (0, None) when
    no rank has one; one all-gather, so that every rank takes the same verdict (this rank's own without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, problem
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, problem)
    return next(((r, p) for r, p in enumerate(every) if p is not None), (0, None))


def fail_together(problem):
    """Every rank calls this at the same point with its own verdict (a problem line, or None): if any rank has one,
    all exit 2 together and rank 0 says the first in rank order (naming the process that met it, when not rank 0),
    so N processes print one line, not N, and none is left waiting for the others; one all-gather."""
    rank, problem = first_problem(problem)
    if problem is not None:
        fail(f"{problem}" + (f" (met by process {rank})" if rank else ""), every_rank=True)


_exit_code = None  # set by leave_process_group: the process then ends with it, skipping interpreter finalization


def leave_process_group(exit_code=0):
    """Every rank waits for the others, then leaves the process group (a no-op in a single process); the process
    will end with `exit_code` (the caller then returns or exits) without the interpreter's finalization.

    Why skip it: a collective's background thread (gloo's, NCCL's) releases the tensors of a finished collective a
    moment after the caller has moved on. On a busy machine that moment can fall after the main thread has begun
    finalizing; the thread then needs the GIL, Python ends it mid-destructor, and C++ aborts the process: a finished
    run exits -6 ("terminate called without an active exception"; seen on 2 gloo processes, core dump in
    ~AsyncAllgatherWork). atexit handlers (loggers' final syncs) still run; only the object teardown is skipped.
    So a program that calls a script's main() and then exits with a code of its own still ends with `exit_code`
    (atexit cannot see a pending exit status): run main() in a process of its own if the code matters."""
    import torch.distributed as dist

    global _exit_code
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _exit_code = exit_code


@atexit.register  # registered on import, before any logger's, so it runs after theirs (atexit runs last-in first)
def _end_without_finalizing():
    if _exit_code is None:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    shutil.rmtree(_socket_folder, ignore_errors=True)  # multiprocessing's own clean-up is part of what is skipped
    # an uncaught exception after leaving (its traceback already printed) still exits 1
    os._exit(1 if getattr(sys, "last_value", None) is not None else _exit_code)


def _short_socket_folder():
    """Give this process's multiprocessing its temporary folder now, short enough for Unix sockets (multiprocessing
    removes it at exit; `_end_without_finalizing` does when it skips that). DataLoader workers hand each batch's tensors
    over through a socket in that folder (and the fork server listens on one there); a socket path holds at most 107
    bytes, and a deep TMPDIR (a scheduler's per-job folder, pytest's) exceeds it: the worker then fails to send and,
    when it was forked, the run waits for its batch forever (seen with a 90-character TMPDIR). Workers of every start
    method inherit the folder from this process. Only the sockets move to /tmp when TMPDIR is too deep; other temporary
    files stay where TMPDIR says."""
    import tempfile
    from multiprocessing import util

    deepest = len("/pymp-12345678/listener-12345678")  # what multiprocessing appends to the temporary folder
    old = tempfile.tempdir
    if len(tempfile.gettempdir()) + deepest > 107 and os.access("/tmp", os.W_OK):
        tempfile.tempdir = "/tmp"
    try:
        folder = util.get_temp_dir()
    finally:
        tempfile.tempdir = old
    return folder


_socket_folder = _short_socket_folder()

_patient = None  # the process group of wait_for_every_rank, made once


def patient_group():
    """A gloo group with no practical timeout, for waits that grow with the data (see `wait_for_every_rank`); made on
    the first call, which every rank must reach at about the same moment (making a group is itself a collective).
    None in a single process."""
    import datetime

    import torch.distributed as dist

    global _patient
    if _patient is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _patient = dist.new_group(backend="gloo")  # made within gloo's default timeout: a rank that never comes fails
        dist.set_timeout(datetime.timedelta(days=7), _patient)
    return _patient


def wait_for_every_rank():
    """A barrier for ranks that wait while another one works for as long as its data takes: a local main encoding
    the SFT data (3.4M short examples take about 30 min), a rank with a larger share of an exact evaluation or of the
    feature cache. --ddp_timeout (30 min by default) is meant for collectives that should be quick; here it would
    end a healthy run at real sizes. A rank that dies still ends the run: torchrun stops the others, and a node that
    goes away closes its connections. A no-op in a single process."""
    import torch.distributed as dist

    if group := patient_group():
        dist.barrier(group=group)


@contextlib.contextmanager
def local_main_first(args):
    """TrainingArguments.main_process_first(local=True) whose wait is `wait_for_every_rank`'s: the local main runs
    the block first (encoding, building the demo), the node's other ranks then run it (reading what it wrote)."""
    local_main = args.local_process_index == 0
    patient_group()  # made here, where every rank arrives together
    try:
        if not local_main:
            wait_for_every_rank()
        yield
    finally:
        if local_main:
            wait_for_every_rank()


def final_evaluation(trainer):
    """The final model's evaluation metrics: those of the evaluation at the last step when there was one (the same
    model: no second pass over the evaluation set), else a new evaluation (also when --load_best_model_at_end has
    just loaded another checkpoint)."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    steps = trainer.state.global_step
    if steps > 0 and last.get("step") == steps and not trainer.args.load_best_model_at_end:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def check_output_dir(path, flag="--output_dir"):
    """Exit 2 now if the folder `path` (of `flag`) cannot be created or written, not at the first checkpoint after
    an hour of training."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror or e})")


def check_output_file(path, flag):
    """Exit 2 now if the file `path` (--plot, --output, --predict_output) cannot be written: its folder missing or
    not writable, or a folder in its place. Checked before the work, not after it (the file itself is not made)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: no folder {folder}; create it first (mkdir -p {folder}) or give another path")
    if not os.access(folder, os.W_OK):
        fail(f"{flag} {path}: cannot write in {folder}")


def looks_local(name):
    """Whether `name` can only be a local path, not a hub id ("org/name"): absolute, relative with ./ or ../, ~,
    or more than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_pretrained(kind, name, flag, hint="", **kwargs):
    """`transformers.<kind>.from_pretrained(name, **kwargs)` (AutoTokenizer, AutoProcessor, AutoConfig), or exit 2
    with one line naming `flag` and why: a local path that does not exist (a typo would otherwise be taken for a hub
    repo id: a long huggingface_hub traceback), or the first line of the library's reason (not found, offline, no
    access); `hint` ends the line. Every rank calls it at the same point (`fail_together`: one line from N
    processes). The first thing each script loads from a model goes through here."""
    import transformers

    what, loaded, problem = kind[4:].lower(), None, None
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        problem = f"cannot load the {what} {name!r} (no such folder); pass a local copy with {flag} PATH{hint}"
    else:
        try:
            loaded = getattr(transformers, kind).from_pretrained(name, **kwargs)
        except Exception as e:  # noqa: BLE001 - not found, offline, no access: the user needs the same advice
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problem = f"cannot load the {what} {name!r} ({reason}); pass a local copy with {flag} PATH{hint}"
    fail_together(problem)
    return loaded


def attention_problem(name):
    """Why --attn_implementation `name` cannot load (found before the data, not inside from_pretrained), or None:
    eager, an implementation transformers registers (sdpa, flash_attention_2, ...; `paged|` ones too), or a kernel
    from the hub ("org/repo")."""
    from transformers import AttentionInterface

    known = ["eager", *AttentionInterface().valid_keys()]
    if name in known or name.split("|")[-1] in known or "/" in name:
        return None
    return f"--attn_implementation {name}: not one transformers knows ({', '.join(known)}, or a hub kernel org/repo)"


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def weights_source(path, allow_pickle):
    """`from_pretrained` keyword arguments that load weights from safetensors only: a pickle file (`.bin`) can run
    arbitrary code when loaded. A local folder that holds only pickle weights exits 2 saying so, unless
    `allow_pickle` (--allow_pickle)."""
    if allow_pickle:
        return {}
    if os.path.isdir(path):
        files = os.listdir(path)
        pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHTS))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            fail(f"{path}: its weights are pickle files ({', '.join(pickles)}), which can run arbitrary code when "
                 f"loaded; convert them to safetensors, or pass --allow_pickle if you trust their source")
    return {"use_safetensors": True}


def parse_arguments(parser, argv=None, demo_args=()):
    """Parse flags, or a single `.yaml`/`.yml`/`.json` config file given in their place (keys = flag names).

    With `--demo` among the flags, `demo_args` go first, so the user's own flags still win. A config file that is
    missing or has unknown keys, and flags that TrainingArguments rejects (invalid combinations, a backend such as
    --deepspeed that is not installed), exit 2 with one line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--demo" in argv:
        argv = list(demo_args) + argv
    config = len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json"))
    if config and not os.path.isfile(argv[0]):
        fail(f"{argv[0]}: config file not found")
    try:
        if not config:
            parsed = parser.parse_args_into_dataclasses(args=argv)
        else:
            path = os.path.abspath(argv[0])
            parsed = parser.parse_json_file(path) if path.endswith(".json") else parser.parse_yaml_file(path)
    except (ValueError, ImportError) as e:  # unknown keys, invalid combinations, missing backends
        fail((f"{argv[0]}: " if config else "") + " ".join(str(e).split()))
    if getattr(parsed[-1], "disable_tqdm", False):  # one switch for every progress bar: also the per-file ones of
        import datasets  # loading, encoding and saving (a line per file: noise in a log)
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    return parsed


@dataclass
class TrainingDefaults(TrainingArguments):
    """TrainingArguments with the defaults both training scripts share; each script's own subclass adds its own."""
    bf16: bool = field(default=None, metadata={"help": "bf16 mixed precision (default: if the GPU supports it)."})
    fp16: bool = field(default=None, metadata={"help": "fp16 mixed precision (default: on GPUs without bf16)."})
    pure_bf16: bool = field(default=False, metadata={
        "help": "bf16 weights, gradients and AdamW states (10 instead of 16 bytes per trained parameter) with a "
                "Kahan-compensated AdamW (torch-optimi), for full fine-tunes short of memory. Default under bf16: "
                "fp32 master weights and bf16 autocast."})
    max_bad_steps: int = field(default=10, metadata={
        "help": "Optimizer steps with a non-finite loss or gradient are skipped (logged as skipped_steps); this many "
                "in a row save a checkpoint and stop the run with exit code 2."})
    dry_run: bool = field(default=False, metadata={
        "help": "Read and check all of the data (every bad record reported, exit 2 as in a run), build the model from "
                "its config on the meta device (no weights read), print the plan (data, tokens, optimizer steps, "
                "precision, memory per GPU for this many processes) and exit 0 without training."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_total_limit: int = field(default=3, metadata={"help": "Keep this many checkpoints (plus the best)."})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb, ..."})
    metric_for_best_model: str | None = field(default=None, metadata={
        "help": "The evaluation metric that picks the best checkpoint (--load_best_model_at_end, kept by "
                "--save_total_limit) and that early stopping watches; default eval_loss where one is needed. Any "
                "metric the script's evaluation logs (a name it does not log exits 2 listing them)."})
    greater_is_better: bool | None = field(default=None, metadata={
        "help": "Whether a higher --metric_for_best_model is better (default: as the metric says: lower for losses, "
                "MAE, RMSE and calibration error, higher for the others)."})
    early_stopping_patience: int = field(default=None, metadata={
        "help": "Stop training after this many evaluations in a row without an improvement of "
                "--metric_for_best_model (default eval_loss) by more than --early_stopping_threshold "
                "(transformers' EarlyStoppingCallback); needs --eval_strategy. Default: off."})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "How much better than the best so far (in the metric's units) --metric_for_best_model must be to count "
                "as an improvement."})

    def __post_init__(self):
        distribute_on_cpu(self)
        resolve_mixed_precision(self)
        # Unset means "as the metric says" (settle_best_metric), which the script knows; TrainingArguments would
        # guess from the name alone (only names ending in "loss" lower is better: eval_score_mae would be wrong).
        self.greater_is_better_given = self.greater_is_better is not None
        check_best_model_flags(self)
        super().__post_init__()


def check_best_model_flags(args):
    """Raise ValueError (parse_arguments: one line, exit 2) naming the flags and the fix where early stopping or
    --load_best_model_at_end cannot work as given, before TrainingArguments' own checks (whose messages name no fix)
    and the Trainer's (a traceback at the start of training); fill in what is implied."""
    patience = args.early_stopping_patience
    if patience is not None and patience < 1:
        raise ValueError(f"--early_stopping_patience {patience}: give a number of evaluations, at least 1")
    threshold = args.early_stopping_threshold
    if threshold < 0 or (threshold and patience is None):
        raise ValueError(f"--early_stopping_threshold {threshold:g}: how much better than the best so far an "
                         f"evaluation must be to count as an improvement, in the metric's units: give a number >= 0, "
                         f"with --early_stopping_patience N")
    if patience is not None and args.eval_strategy == "no":
        raise ValueError(f"--early_stopping_patience {patience} stops on evaluations, and this run has none: add "
                         f"--eval_strategy steps --eval_steps N (or epoch), with evaluation data")
    if patience is not None and args.metric_for_best_model is None:
        args.metric_for_best_model = "eval_loss"
        log("early stopping: on eval_loss (no --metric_for_best_model given)")
    # The checkpoint a stop signal (or a run of non-finite steps) asks for must be written and kept: "best" saves
    # only new bests, and a limit of 1 makes the Trainer delete every checkpoint but the best at the end of train()
    if args.save_strategy == "best":
        raise ValueError("--save_strategy best writes only new bests, so the checkpoint a stop signal (SIGTERM, "
                         "pre-emption) asks for would be skipped; use --save_strategy steps (or epoch), as "
                         "--eval_strategy, with --load_best_model_at_end to end on the best weights")
    if (args.metric_for_best_model or args.load_best_model_at_end) and args.save_total_limit == 1:
        raise ValueError("--save_total_limit 1 with a best checkpoint (--metric_for_best_model, early stopping, "
                         "--load_best_model_at_end): at the end of training the Trainer keeps the best alone, deleting "
                         "the checkpoint a stop signal has just written; give 2 or more")
    if not args.load_best_model_at_end:
        return
    if args.save_strategy != args.eval_strategy:
        save, evaluate = (getattr(s, "value", s) for s in (args.save_strategy, args.eval_strategy))  # str or enum
        raise ValueError(f"--load_best_model_at_end loads the checkpoint saved at the best evaluation, so checkpoints "
                         f"must be saved where evaluations run: --save_strategy {save} and --eval_strategy {evaluate} "
                         f"differ; give both the same")
    eval_steps = args.eval_steps or args.logging_steps  # TrainingArguments' own default for eval_steps
    if args.eval_strategy == "steps" and eval_steps >= 1 and args.save_steps >= 1 and args.save_steps % eval_steps:
        raise ValueError(f"--load_best_model_at_end loads the checkpoint saved at the best evaluation, so every save "
                         f"must fall on an evaluation: --save_steps {args.save_steps:g} is not a multiple of "
                         f"--eval_steps {eval_steps:g}; give e.g. --save_steps {eval_steps:g}")


def eval_metric(name):
    """The logged name of --metric_for_best_model `name`: the Trainer takes `score_rmse` for `eval_score_rmse`."""
    return name if name.startswith("eval_") else f"eval_{name}"


def settle_best_metric(args, metrics):
    """Check --metric_for_best_model against `metrics` ({name: greater is better}, the evaluation metrics this script
    logs) and set --greater_is_better from it unless the user gave it; exits 2 naming the valid ones. Call before
    any model loads. A name without the `eval_` prefix means the same metric, as in the Trainer."""
    name = args.metric_for_best_model
    if name is None:
        return
    full = args.metric_for_best_model = eval_metric(name)
    if full not in metrics:
        fail(f"--metric_for_best_model {name}: not a metric of this script's evaluation; one of: "
             f"{', '.join(metrics)}", every_rank=True)
    if not args.greater_is_better_given:
        args.greater_is_better = metrics[full]
    if args.early_stopping_patience is not None:
        patience = args.early_stopping_patience
        log(f"early stopping: after {patience} evaluation{'s' if patience > 1 else ''} in a row without {full} "
            f"{'rising above' if args.greater_is_better else 'falling below'} the best so far by more than "
            f"{args.early_stopping_threshold:g}")


def distribute_on_cpu(args):
    """Several processes (torchrun's WORLD_SIZE) on a machine without an accelerator train distributed on the CPU,
    as with --use_cpu, said in one line. Without it accelerate sets up no distributed training there: every process
    would train alone on all of the data, each writing the same --output_dir (transformers only warns)."""
    if not args.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        args.use_cpu = True
        log(f"no GPU here: the {os.environ['WORLD_SIZE']} processes train distributed on the CPU (gloo), as with "
            f"--use_cpu")


def resolve_mixed_precision(args):
    """Fill unset `args.bf16`/`args.fp16` (None) from the hardware, before TrainingArguments validates them:
    bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU (never guessed from the GPU's name)."""
    if args.bf16 is None and args.fp16 is None:
        gpu = torch.cuda.is_available() and not args.use_cpu
        args.bf16, args.fp16 = gpu and torch.cuda.is_bf16_supported(), gpu and not torch.cuda.is_bf16_supported()
    args.bf16, args.fp16 = bool(args.bf16), bool(args.fp16)


def demo_dir(name):
    """The demo's folder: in this machine's temporary folder, named for the user and the host (two nodes whose
    TMPDIR is one shared folder must not rebuild the same demo at once)."""
    import socket
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"{name}-demo-{os.getuid()}-{socket.gethostname()}")


def prepare_demo(demo_dir, build, args=None):
    """Rebuild the demo's model and data in `demo_dir` with `build(demo_dir)` (a function of demo.py): a fresh folder
    each time (a demo run is a new run, not a resume of the last one). With TrainingArguments, once per node while the
    other ranks wait. Another node's local main builds it in a fresh process: once a process group exists,
    transformers' save_pretrained writes only on global rank 0, and that node's demo folder would stay empty."""
    import shutil
    import subprocess

    with local_main_first(args) if args else contextlib.nullcontext():
        if args is None or args.local_process_index == 0:
            shutil.rmtree(demo_dir, ignore_errors=True)
            if args is not None and args.process_index != 0:
                subprocess.run([sys.executable, "-c", f"import demo; demo.{build.__name__}({str(demo_dir)!r})"],
                               cwd=os.path.dirname(os.path.abspath(__file__)), check=True, stdout=subprocess.DEVNULL)
            else:
                build(demo_dir)
