"""Train a scorer on Qwen3-VL: a `score` (regression) head and a `type` (classification) head on the hidden state
of the last token, trained from webdataset shards of multi-image samples; evaluate exactly; predict.

Data: `.tar` shards; per sample `KEY.json` = {"prompt": str, "score": float, "type": int} and images `KEY.0.jpg`,
`KEY.1.png`, ... (any format PIL reads), shown to the model in index order before the prompt. Keys contain no dots.
Shard flags take brace patterns, globs or comma lists: 'data/train-{000000..000099}.tar', 'data/*.tar', 'a.tar,b.tar'.

  # CPU demo: tiny random Qwen3-VL + synthetic shards, no downloads; trains, evaluates, predicts (under 2 minutes)
  bash run.sh train_scorer.py --demo

  # one GPU: heads only, on a frozen backbone (saves hold the heads plus the base model's name)
  python train_scorer.py --train_shards 'data/train-{000000..000099}.tar' --eval_shards 'data/val-*.tar' \\
      --num_types 5 --freeze_backbone --learning_rate 1e-3 --output_dir outputs/scorer

  # every GPU of this node: language model + heads, vision tower frozen, heads at a higher learning rate
  bash run.sh train_scorer.py --train_shards 'data/train-{000000..000099}.tar' --eval_shards 'data/val-*.tar' \\
      --num_types 5 --freeze_vision --learning_rate 1e-5 --head_lr 1e-4 --per_device_train_batch_size 4

  # two nodes: run this on each, NODE_RANK=0 on the master; every flag can come from one config file
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash run.sh train_scorer.py configs/scorer.yaml

  # predictions (JSON Lines, one object per sample) from a trained scorer, either save format
  bash run.sh train_scorer.py --model_name_or_path outputs/scorer --predict_shards 'data/test-*.tar' \\
      --do_predict --predict_output outputs/scorer/test.jsonl

Epochs: each rank reads its own share of the training shards and cycles through it, so every rank runs the same
number of steps whatever the shard sizes. One epoch is `--epoch_samples` samples across all ranks (default: the
number of samples in the training shards), i.e. ceil(epoch_samples / (ranks x batch x accumulation)) optimizer
steps; within it a rank's share is reshuffled and may wrap around, so a sample can be seen 0, 1 or 2 times in one
epoch. Evaluation and prediction read every sample exactly once, whatever the number of ranks and shards.
Bad samples (undecodable image, missing image, bad json field, type out of range, NaN score) are skipped and
counted (`--on_bad_sample skip`) or stop the run with exit code 2 (`error`).
A run that finds `checkpoint-*` folders in --output_dir resumes from the newest one.
"""

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoProcessor, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments,
                          set_seed)
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel

from collate import (DataError, SampleEncoder, ShardStream, count_samples, expand_shards, fail,
                     last_checkpoint_to_resume, parse_arguments, prepare_demo, resolve_mixed_precision)


class AllRanksError(DataError):
    """Bad input every rank knows about at the same step: rank 0 reports it, the others just exit 2."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen3-VL-8B-Instruct", metadata={
        "help": "Hub id or folder of a Qwen3-VL checkpoint, or of a scorer saved by this script (either format)."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, flash_attention_2 or eager."})
    num_types: int = field(default=None, metadata={
        "help": "Classes of the type head (required unless the checkpoint is a scorer)."})
    freeze_backbone: bool = field(default=False, metadata={
        "help": "Train the heads only; saves then hold only the heads and the base model's name."})
    freeze_vision: bool = field(default=False, metadata={"help": "Freeze the vision tower; train LLM + heads."})
    score_weight: float = field(default=1.0, metadata={"help": "Weight of the score loss (MSE) in the total."})
    type_weight: float = field(default=1.0, metadata={"help": "Weight of the type loss (cross-entropy) in the total."})


@dataclass
class DataArguments:
    train_shards: str = field(default=None, metadata={"help": "Training shards: brace pattern, glob or comma list."})
    eval_shards: str = field(default=None, metadata={"help": "Evaluation shards (every sample evaluated once)."})
    predict_shards: str = field(default=None, metadata={"help": "Shards to predict with --do_predict (default: eval)."})
    predict_output: str = field(default=None, metadata={
        "help": "Predictions file, JSON Lines (default: OUTPUT_DIR/predictions.jsonl)."})
    min_pixels: int = field(default=64 * 32 * 32, metadata={"help": "Images smaller than this are upscaled."})
    max_pixels: int = field(default=1024 * 32 * 32, metadata={
        "help": "Images larger than this are downscaled (each 32x32 px is one visual token)."})
    max_len: int = field(default=8192, metadata={
        "help": "Longest sample in tokens; longer ones are bad samples (cutting would split an image)."})
    epoch_samples: int = field(default=None, metadata={
        "help": "Samples per epoch across all ranks (default: counted from the training shards' tar headers)."})
    shuffle_buffer: int = field(default=256, metadata={"help": "Training samples shuffled in a buffer per worker."})
    on_bad_sample: str = field(default="skip", metadata={
        "help": "skip (count and go on) or error (exit 2 naming the shard, key and problem; in training at the "
                "next logging step, when every rank stops together).",
        "choices": ["skip", "error"]})
    demo: bool = field(default=False, metadata={
        "help": "Build a tiny random Qwen3-VL and synthetic shards in a temporary folder; train, evaluate, predict."})


@dataclass
class ScorerArguments(TrainingArguments):
    output_dir: str = field(default="outputs/scorer-qwen3-vl", metadata={"help": "Checkpoints and the final model."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (backbone)."})
    head_lr: float = field(default=None, metadata={"help": "Peak learning rate of the heads (default: learning_rate)."})
    lr_scheduler_type: str = field(default="polynomial", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"power": 3.0}, metadata={
        "help": "Schedule options (JSON), default a cubic decay."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup: steps, or a share of all steps if < 1."})
    weight_decay: float = field(default=0.02, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    activation_checkpointing: bool = field(default=None, metadata={
        "help": "Recompute activations in backward (default: on when the backbone trains)."})
    ddp_find_unused_parameters: bool = field(default=False, metadata={
        "help": "Every trainable parameter gets a gradient every step in every mode, so DDP need not search."})
    dataloader_num_workers: int = field(default=4, metadata={"help": "Processes decoding and encoding samples."})
    bf16: bool = field(default=None, metadata={"help": "bf16 mixed precision (default: if the GPU supports it)."})
    fp16: bool = field(default=None, metadata={"help": "fp16 mixed precision (default: on GPUs without bf16)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_total_limit: int = field(default=3, metadata={"help": "Keep this many checkpoints (plus the best)."})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb, ..."})

    def __post_init__(self):
        resolve_mixed_precision(self)
        # Unset means "when the backbone trains": main() decides once it knows the freezing flags.
        self.activation_checkpointing_auto = self.activation_checkpointing is self.gradient_checkpointing is None
        super().__post_init__()


DEMO_DIR = os.path.join(tempfile.gettempdir(), f"scorer-qwen3-vl-demo-{os.getuid()}")
# Flags the demo puts before the user's own (so a user flag still wins): tiny model and images, a few CPU steps.
DEMO_ARGS = [
    "--model_name_or_path", f"{DEMO_DIR}/tiny-qwen3-vl", "--train_shards", f"{DEMO_DIR}/train-{{000000..000003}}.tar",
    "--eval_shards", f"{DEMO_DIR}/eval-{{000000..000001}}.tar", "--do_predict", "--output_dir", f"{DEMO_DIR}/output",
    "--num_types", "3", "--min_pixels", "1024", "--max_pixels", "4096", "--max_steps", "60",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "2e-3",
    "--head_lr", "1e-2", "--warmup_steps", "6", "--logging_steps", "10", "--eval_strategy", "steps",
    "--eval_steps", "30", "--save_steps", "30", "--dataloader_num_workers", "1", "--use_cpu", "--disable_tqdm", "true",
]


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ScorerOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    loss_score: torch.FloatTensor | None = None
    loss_type: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None
    type_logits: torch.FloatTensor | None = None


def pool_last_token(hidden, attention_mask):
    """Each row's hidden state at its last attended position: right for left and right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


HEADS = ("score_head.", "type_head.")  # parameter-name prefixes of the heads


class Qwen3VLScorer(Qwen3VLPreTrainedModel):
    """Qwen3-VL backbone (no LM head) + fp32 `score` and `type` heads on the last real token.

    `config` is the Qwen3-VL config plus `num_types`, `score_weight`, `type_weight`, `scorer_trains` (what trained)
    and `scorer_base_model`: set when the backbone is frozen, saves then hold only the heads and `from_pretrained`
    rebuilds the backbone from there.
    """

    _keep_in_fp32_modules_strict = ["score_head", "type_head"]  # fp32 even on a bf16 backbone
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    accepts_loss_kwargs = False  # losses are per-batch means; the Trainer scales them for gradient accumulation

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen3VLModel(config)
        hidden = config.text_config.hidden_size
        self.score_head = nn.Linear(hidden, 1)
        self.type_head = nn.Linear(hidden, config.num_types)
        self.post_init()

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        """Load a scorer (full, or heads-only on a recorded base) or start one from a Qwen3-VL checkpoint."""
        config = config or AutoConfig.from_pretrained(path)
        base = getattr(config, "scorer_base_model", None)
        model = super().from_pretrained(base or path, *args, config=config, **kwargs)
        model.score_head.float()  # heads created here (not loaded) come in the backbone's dtype
        model.type_head.float()
        if base:
            import safetensors.torch

            heads = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
            result = model.load_state_dict(heads, strict=False)
            if result.unexpected_keys or any(k.startswith(HEADS) for k in result.missing_keys):
                raise ValueError(f"{path}: not a heads-only scorer save ({result})")
        return model

    def set_trainable(self, freeze_backbone, freeze_vision, base_record):
        """Choose what trains. A frozen backbone is saved as a reference to `base_record`, not as weights."""
        self.model.requires_grad_(not freeze_backbone)
        self.model.visual.requires_grad_(not (freeze_backbone or freeze_vision))
        self.score_head.requires_grad_(True)
        self.type_head.requires_grad_(True)
        self.config.scorer_base_model = base_record if freeze_backbone else None
        self.config.scorer_trains = "heads" if freeze_backbone else "llm+heads" if freeze_vision else "all"
        self._keys_to_ignore_on_save = {k for k in self.state_dict() if not k.startswith(HEADS)} \
            if freeze_backbone else set()

    def pooled(self, input_ids, attention_mask, mm_token_type_ids=None, pixel_values=None, image_grid_thw=None):
        """Hidden state of each sample's last real token (the backbone runs without autograd when frozen)."""
        trains = any(p.requires_grad for p in self.model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                                pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        return pool_last_token(hidden.last_hidden_state, attention_mask)

    def forward(self, input_ids, attention_mask, mm_token_type_ids=None, pixel_values=None, image_grid_thw=None,
                score_labels=None, type_labels=None):
        pooled = self.pooled(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw)
        with torch.autocast(pooled.device.type, enabled=False):
            pooled = pooled.float()
            score = self.score_head(pooled).squeeze(-1)
            type_logits = self.type_head(pooled)
        if score_labels is None or type_labels is None:
            return ScorerOutput(score=score, type_logits=type_logits)
        loss_score = nn.functional.mse_loss(score, score_labels.float())
        loss_type = nn.functional.cross_entropy(type_logits, type_labels)
        loss = self.config.score_weight * loss_score + self.config.type_weight * loss_type
        if pixel_values is None and self.training:
            # A text-only batch leaves the vision tower out of the graph; DDP without find_unused_parameters
            # would then wait forever for its gradients. Zero-valued terms give it zero gradients instead.
            unused = [p.sum() for p in self.model.visual.parameters() if p.requires_grad]
            if unused:
                loss = loss + 0.0 * torch.stack(unused).sum()
        return ScorerOutput(loss=loss, loss_score=loss_score.detach(), loss_type=loss_type.detach(), score=score,
                            type_logits=type_logits)


def load_scorer(model_args, dtype):
    """The scorer, from a Qwen3-VL checkpoint (new heads) or a scorer save; trainable parts set from the flags."""
    path = model_args.model_name_or_path
    config = AutoConfig.from_pretrained(path)
    saved_types = getattr(config, "num_types", None)
    if model_args.num_types is None and saved_types is None:
        raise DataError(f"{path}: not a scorer checkpoint, so --num_types is required")
    if model_args.num_types is not None and saved_types is not None and model_args.num_types != saved_types:
        raise DataError(f"{path}: this scorer has {saved_types} types, not --num_types {model_args.num_types}")
    config.num_types = saved_types or model_args.num_types
    if config.num_types < 1:
        raise DataError(f"--num_types must be at least 1, not {config.num_types}")
    config.score_weight, config.type_weight = model_args.score_weight, model_args.type_weight
    model = Qwen3VLScorer.from_pretrained(path, config=config, dtype=dtype,
                                          attn_implementation=model_args.attn_implementation)
    # The base a frozen backbone refers to: the one a heads-only save already names, else this checkpoint.
    base = getattr(config, "scorer_base_model", None) or (os.path.abspath(path) if os.path.isdir(path) else path)
    model.set_trainable(model_args.freeze_backbone, model_args.freeze_vision, base)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Data: collate.ShardStream deals the shards out to ranks and workers; each worker decodes and encodes its samples
# ---------------------------------------------------------------------------------------------------------------

def _as_is(batch):  # streams yield whole batches; the default would turn their tuples into lists
    return batch


def make_loader(stream, args):
    """A DataLoader over a ShardStream, not accelerator.prepare()d: each rank reads its own shards (no batches
    dispatched from rank 0, whose slicing would also break the concatenated pixel_values)."""
    workers = args.dataloader_num_workers
    return torch.utils.data.DataLoader(
        stream, batch_size=None, collate_fn=_as_is, num_workers=workers,
        pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        multiprocessing_context=args.dataloader_multiprocessing_context if workers else None)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

def _average_ranks(x):
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _pearson(a, b):
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")  # undefined, and saying so beats a made-up number
    return float(np.corrcoef(a, b)[0, 1])


def scorer_metrics(rows, score_weight, type_weight, prefix="eval"):
    """Exact metrics over every evaluated sample (rows: dicts with score, type_logits, score_label, type_label).

    Losses are means over samples (not over batches); macro-F1 averages the classes that occur as a label or a guess.
    """
    if not rows:
        return {f"{prefix}_samples": 0}
    pred = np.array([r["score"] for r in rows], dtype=np.float64)
    label = np.array([r["score_label"] for r in rows], dtype=np.float64)
    logits = np.array([r["type_logits"] for r in rows], dtype=np.float64)
    kind = np.array([r["type_label"] for r in rows])
    mse = float(np.mean((pred - label) ** 2))
    top = logits.max(axis=1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
    ce = float(np.mean(log_z - logits[np.arange(len(kind)), kind]))
    guess = logits.argmax(axis=1)
    f1 = []
    for c in np.union1d(kind, guess):
        tp, fp, fn = np.sum((guess == c) & (kind == c)), np.sum((guess == c) & (kind != c)), np.sum(
            (guess != c) & (kind == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return {f"{prefix}_loss": score_weight * mse + type_weight * ce, f"{prefix}_loss_score": mse,
            f"{prefix}_loss_type": ce, f"{prefix}_score_mae": float(np.mean(np.abs(pred - label))),
            f"{prefix}_score_rmse": math.sqrt(mse), f"{prefix}_score_pearson": _pearson(pred, label),
            f"{prefix}_score_spearman": _pearson(_average_ranks(pred), _average_ranks(label)),
            f"{prefix}_type_accuracy": float(np.mean(guess == kind)), f"{prefix}_type_macro_f1": float(np.mean(f1)),
            f"{prefix}_samples": len(rows)}


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------

class _SetStreamEpoch(TrainerCallback):
    """Tell the training stream which epoch starts (also right after a resume, where the Trainer does not)."""

    def __init__(self, stream, steps_per_epoch):
        self.stream, self.steps_per_epoch = stream, steps_per_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.stream.set_epoch(state.global_step // self.steps_per_epoch)


def _describe(bad):
    return (f"{bad['shard']}: {bad['key']}: " if "shard" in bad else "") + bad["problem"]


class ScorerTrainer(Trainer):
    """Trainer with the scorer's loaders, head learning rate, per-head loss logging, bad-sample accounting and an
    exact evaluation/prediction pass (each rank runs its own samples, then everything is gathered with its key)."""

    META = ("keys", "order", "bad_samples")

    def __init__(self, *args, head_lr=None, on_bad_sample="skip", **kwargs):
        super().__init__(*args, **kwargs)
        self.head_lr, self.on_bad_sample = head_lr, on_bad_sample
        self.train_bad = set()  # (shard, key) skipped on this rank while training
        self._train_error = None  # the first bad training sample in `error` mode
        self._head_sums, self._head_steps = torch.zeros(2, device=self.args.device), 0

    def get_train_dataloader(self):
        return make_loader(self.train_dataset, self.args)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model or self.model
            decay = set(self.get_decay_parameter_names(model))
            groups = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((name.startswith(HEADS), name in decay), []).append(p)
            head_lr = self.head_lr or self.args.learning_rate
            params = [{"params": ps, "weight_decay": self.args.weight_decay if d else 0.0, "lr": head_lr if h else
                       self.args.learning_rate} for (h, d), ps in sorted(groups.items())]  # backbone groups first
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(params, **optimizer_kwargs)
        return self.optimizer

    def _apply_policy(self, found):
        """--on_bad_sample for the bad-sample records every rank holds (gathered): raise the first in `error` mode
        (or when fatal), else return their (shard, key) pairs to count."""
        for bad in found:
            if bad.get("fatal") or self.on_bad_sample == "error":
                raise AllRanksError(_describe(bad))
        return {(bad["shard"], bad["key"]) for bad in found}

    def _note_train_bad(self, found):
        """Bad samples met in a training batch: counted, or in `error` mode kept until every rank stops together at
        the next logging step (a rank that stopped alone would leave the others waiting in a collective)."""
        for bad in found:
            if bad.get("fatal"):  # this rank's stream cannot go on
                raise DataError(_describe(bad))
            if self.on_bad_sample == "error":
                self._train_error = self._train_error or bad
            else:
                self.train_bad.add((bad["shard"], bad["key"]))

    def raise_train_error(self):
        """Stop every rank with the first training error any rank met (every rank calls this at the same step)."""
        errors = [self._train_error] if self._train_error else []
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            errors = gather_object(errors)
        if errors:
            raise AllRanksError(_describe(errors[0]))

    def _model_inputs(self, batch):
        return {k: v for k, v in batch.items() if k not in self.META}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._note_train_bad(inputs.get("bad_samples", []))
        outputs = model(**self._model_inputs(inputs))
        if model.training:  # window sums of the per-head losses, logged as means across ranks by log()
            self._head_sums += torch.stack([outputs.loss_score, outputs.loss_type]).detach()  # no graph kept
            self._head_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log: every rank is here at the same step
            self.raise_train_error()
            means = self.accelerator.reduce(self._head_sums / max(self._head_steps, 1), reduction="mean")
            logs["loss_score"], logs["loss_type"] = means.tolist()
            self._head_sums.zero_()
            self._head_steps = 0
        super().log(logs, start_time)

    def exact_pass(self, stream):
        """Run every sample of `stream` once over all ranks; returns (rows sorted by shard and position, bad
        (shard, key) pairs), the same on every rank. Each rank runs its own samples with no collective in between
        (ranks may hold very different numbers), then everything is gathered with its key; bad-sample errors are
        raised after the gather, by every rank alike, so no rank is left waiting for one that stopped."""
        model, rows, found = self.model, [], []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in make_loader(stream, self.args):
                found += batch["bad_samples"]
                if "input_ids" not in batch:  # only bad samples were left for this batch
                    continue
                inputs = self._model_inputs(batch)
                inputs = self._prepare_inputs({k: v for k, v in inputs.items() if not k.endswith("_labels")})
                with self.accelerator.autocast():
                    out = model(**inputs)
                # one device-to-host copy per batch, not one sync per sample
                scores, logits = out.score.float().tolist(), out.type_logits.float().tolist()
                n = len(batch["keys"])
                score_labels = batch["score_labels"].tolist() if "score_labels" in batch else [None] * n
                type_labels = batch["type_labels"].tolist() if "type_labels" in batch else [None] * n
                for i, key in enumerate(batch["keys"]):
                    rows.append({"order": batch["order"][i], "key": key, "score": scores[i], "type_logits": logits[i],
                                 "score_label": score_labels[i], "type_label": type_labels[i]})
        model.train(was_training)
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            rows, found = gather_object(rows), gather_object(found)
        rows.sort(key=lambda r: tuple(r["order"]))
        first, unique = {}, []
        for r in rows:  # a key twice in the data would break "one prediction per key"
            if r["key"] in first:
                found.append({"shard": stream.shards[r["order"][0]], "key": r["key"],
                              "problem": f"duplicate key (first in {stream.shards[first[r['key']][0]]})"})
            else:
                first[r["key"]] = r["order"]
                unique.append(r)
        return unique, self._apply_policy(found)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.time()
        rows, bad = self.exact_pass(eval_dataset or self.eval_dataset)
        model = self.model
        metrics = scorer_metrics(rows, model.config.score_weight, model.config.type_weight, metric_key_prefix)
        metrics[f"{metric_key_prefix}_bad_samples"] = len(bad)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def write_predictions(self, stream, path):
        rows, bad = self.exact_pass(stream)
        if self.args.process_index == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for r in rows:
                    probs = torch.tensor(r["type_logits"], dtype=torch.float64).softmax(-1)
                    f.write(json.dumps({"key": r["key"], "score": r["score"], "type": int(probs.argmax()),
                                        "type_probs": probs.tolist()}) + "\n")
        return len(rows), len(bad)

    def gathered_train_bad(self):
        """Bad training samples skipped on each rank, and their union over ranks (a sample met twice counts once)."""
        per_rank = [sorted(self.train_bad)]
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            per_rank = gather_object(per_rank)
        return [len(r) for r in per_rank], len({b for r in per_rank for b in r})


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def stop(error):
    """Exit 2 with the error's one line. One that every rank met at once (AllRanksError) is said once, by rank 0,
    and no rank leaves before it is said: torchrun stops every process as soon as one has exited."""
    import torch.distributed as dist

    shared = isinstance(error, AllRanksError) and dist.is_available() and dist.is_initialized()
    try:
        if shared and dist.get_rank() != 0:
            sys.exit(2)
        fail(error)
    finally:
        if shared:
            dist.barrier()
            dist.destroy_process_group()  # left to interpreter exit, gloo aborts when a peer is already gone


def main(argv=None):
    start = time.time()
    parser = HfArgumentParser((ModelArguments, DataArguments, ScorerArguments))
    try:
        model_args, data_args, args = parse_arguments(parser, argv, demo_args=DEMO_ARGS)
    except DataError as e:
        fail(e)
    if data_args.demo:
        import demo
        prepare_demo(args, DEMO_DIR, demo.build_scorer_demo)
    predict_shards = data_args.predict_shards if data_args.predict_shards is not None else data_args.eval_shards
    if args.do_predict and predict_shards is None:
        fail("--do_predict needs --predict_shards (or --eval_shards)")
    if data_args.train_shards is None and data_args.eval_shards is None and not args.do_predict:
        fail("nothing to do: give --train_shards, --eval_shards or --do_predict (or --demo)")
    if args.eval_strategy != "no" and data_args.eval_shards is None:
        fail(f"--eval_strategy {args.eval_strategy} needs --eval_shards")
    if model_args.freeze_backbone:
        args.activation_checkpointing = False  # nothing to recompute: the backbone runs without autograd
    elif args.activation_checkpointing_auto:
        args.activation_checkpointing = True
    is_main = args.process_index == 0
    log = print if is_main else (lambda *a, **k: None)

    try:
        shards = {}
        for name, spec in (("train", data_args.train_shards), ("eval", data_args.eval_shards),
                           ("predict", predict_shards if args.do_predict else None)):
            if spec is not None:
                try:
                    shards[name] = expand_shards(spec)
                except DataError as e:
                    raise DataError(f"--{name}_shards: {e}") from None
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
        set_seed(args.seed)  # new heads start the same way in every run with this seed
        model = load_scorer(model_args, torch.bfloat16 if args.bf16 else torch.float32)
    except DataError as e:
        fail(e)
    num_types, pad_id = model.config.num_types, processor.tokenizer.pad_token_id

    def stream(name, batch_size, **kw):
        encoder = SampleEncoder(processor, num_types, name != "predict", data_args.min_pixels, data_args.max_pixels,
                                data_args.max_len)
        return ShardStream(shards[name], encoder, batch_size, pad_id, args.process_index, args.world_size,
                           stop_at_bad=data_args.on_bad_sample == "error" and name != "train", seed=args.seed, **kw)

    train_stream = eval_stream = None
    callbacks = []
    if "train" in shards:
        try:
            epoch_samples = data_args.epoch_samples or count_samples(shards["train"])
        except DataError as e:
            fail(e)
        accumulation = args.gradient_accumulation_steps
        steps = max(1, math.ceil(epoch_samples / (args.world_size * args.per_device_train_batch_size * accumulation)))
        train_stream = stream("train", args.per_device_train_batch_size, batches_per_epoch=steps * accumulation,
                              shuffle_buffer=data_args.shuffle_buffer)
        callbacks.append(_SetStreamEpoch(train_stream, steps))
        log(f"data: {len(shards['train'])} training shards, an epoch is {epoch_samples} samples = {steps} steps "
            f"of {args.world_size} x {args.per_device_train_batch_size} x {accumulation}")
    if "eval" in shards:
        eval_stream = stream("eval", args.per_device_eval_batch_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {trainable:,} trained "
        f"({'heads only' if model_args.freeze_backbone else 'LLM + heads' if model_args.freeze_vision else 'all'})")

    trainer = ScorerTrainer(model=model, args=args, train_dataset=train_stream, eval_dataset=eval_stream,
                            processing_class=processor, callbacks=callbacks, head_lr=args.head_lr,
                            on_bad_sample=data_args.on_bad_sample)
    metrics, summary = {}, []
    try:
        if train_stream is not None:
            resume = last_checkpoint_to_resume(args, log)
            if resume:  # its optimizer state fits only the same trainable parameters on the same base
                saved = AutoConfig.from_pretrained(resume)
                for key in ("scorer_trains", "scorer_base_model"):
                    if getattr(saved, key, None) != getattr(model.config, key):
                        fail(f"{resume}: saved with {key} = {getattr(saved, key, None)}, this run has "
                             f"{getattr(model.config, key)}; use the same model and freezing flags to resume, "
                             f"or another --output_dir")
            result = trainer.train(resume_from_checkpoint=resume)
            trainer.raise_train_error()  # a bad sample met after the last logging step
            trainer.save_model(args.output_dir)  # heads-only when the backbone is frozen, else everything
            trainer.save_state()
            metrics.update(result.metrics)
            per_rank, total = trainer.gathered_train_bad()
            metrics["train_bad_samples"] = total
            last = next((h for h in reversed(trainer.state.log_history) if "loss_score" in h), {})
            summary.append(f"trained {trainer.state.global_step} steps, last logged loss {last.get('loss', 0):.4f} "
                           f"(score {last.get('loss_score', 0):.4f}, type {last.get('loss_type', 0):.4f}); "
                           f"bad samples skipped {total} (per rank {per_rank}); model saved to {args.output_dir}")
        if eval_stream is not None:
            last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
            if last_eval.get("step") == trainer.state.global_step > 0 and not args.load_best_model_at_end:
                metrics.update({k: v for k, v in last_eval.items() if k.startswith("eval_")})  # this very model
            else:
                metrics.update(trainer.evaluate())
            trainer.save_metrics("eval", {k: v for k, v in metrics.items() if k.startswith("eval_")})
            summary.append("eval: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()
                                                  if k.startswith("eval_") and k != "eval_runtime"))
        if "predict" in shards:
            path = data_args.predict_output or os.path.join(args.output_dir, "predictions.jsonl")
            n, bad = trainer.write_predictions(stream("predict", args.per_device_eval_batch_size), path)
            metrics.update(predict_samples=n, predict_bad_samples=bad)
            summary.append(f"predictions for {n} samples written to {path} ({bad} bad samples skipped)")
    except DataError as e:
        stop(e)
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)  # all_results.json
    trainer.metrics = metrics  # for callers of main()
    log(f"summary ({time.time() - start:.1f}s):\n  " + "\n  ".join(summary))
    return trainer


if __name__ == "__main__":
    main()
