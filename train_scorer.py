"""Train a scorer on Qwen3-VL: a `score` (regression) head and a `type` (classification) head on the hidden state
of the last token, trained from webdataset shards of multi-image samples; evaluate exactly; predict.

Data: `.tar` shards; per sample `KEY.json` = {"prompt": str, "score": float, "type": int} and images `KEY.0.jpg`,
`KEY.1.png`, ... (any format PIL reads), shown to the model in index order before the prompt. Keys contain no dots.
Shard flags take brace patterns, globs or comma lists: 'data/train-{000000..000099}.tar', 'data/*.tar', 'a.tar,b.tar'.
Prediction also reads plain files: a manifest of prompts and image paths (--predict_file, make_shards.py's format).
The label fields and their heads come from `collate.LABELS` (README "Forking": adding a field is one line there).

  # CPU demo: tiny random Qwen3-VL + synthetic shards, no downloads; trains, evaluates, predicts (under a minute;
  # it ends with score Pearson ~0.99 and type accuracy 1.0, and training_curves.png in its output folder)
  bash run.sh train_scorer.py --demo

  # before a long run: the same command with --dry_run reads and encodes every sample, builds the model without its
  # weights, prints the precision, the memory plan per GPU, samples, tokens and steps, and trains nothing
  bash run.sh train_scorer.py --train_shards 'data/train-{000000..000099}.tar' --num_types 5 --dry_run

  # one GPU: heads only, on a frozen backbone (saves hold the heads plus the base model's name); the backbone runs
  # once per sample, into OUTPUT_DIR/feature_cache, and epochs and evaluations read its features from there
  python train_scorer.py --train_shards 'data/train-{000000..000099}.tar' --eval_shards 'data/val-*.tar' \\
      --num_types 5 --freeze_backbone --learning_rate 1e-3 --output_dir outputs/scorer

  # one GPU: LoRA on the language model + heads (17.0 GB for the 8B; saves hold the adapters and the heads)
  python train_scorer.py --train_shards 'data/train-{000000..000099}.tar' --eval_shards 'data/val-*.tar' \\
      --num_types 5 --use_peft --learning_rate 2e-4 --head_lr 1e-3 --output_dir outputs/scorer-lora

  # every GPU of this node: LoRA + heads, heads at a higher learning rate, merged model for serving at the end
  bash run.sh train_scorer.py --train_shards 'data/train-{000000..000099}.tar' --eval_shards 'data/val-*.tar' \\
      --num_types 5 --use_peft --learning_rate 2e-4 --head_lr 1e-3 --per_device_train_batch_size 4 --merge_lora

  # every flag can come from one config file (keys = flag names); recipes in configs/, e.g. everything trained,
  # fp32 master weights sharded by FSDP2 over 8 GPUs, on two nodes: run this on each, NODE_RANK=0 on the master
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash run.sh train_scorer.py \\
      configs/scorer-qwen3vl-8b-full-fsdp2-8gpu.yaml

  # predictions (JSON Lines, one object per sample) from a trained scorer, any save format
  bash run.sh train_scorer.py --model_name_or_path outputs/scorer --predict_shards 'data/test-*.tar' \\
      --do_predict --predict_output outputs/scorer/test.jsonl

  # the same for plain files, no shards: a manifest as make_shards.py reads it (.jsonl or .csv; labels optional),
  # one prediction per good row in manifest order, bad rows counted as bad samples
  bash run.sh train_scorer.py --model_name_or_path outputs/scorer --predict_file new.csv \\
      --predict_output outputs/scorer/new.jsonl

  # from Python (serving): the same predictions for rows in memory, image paths or PIL images
  #   from train_scorer import predict
  #   predict("outputs/scorer", [{"prompt": "Rate the photo.", "images": ["a/1.jpg"]}])  # [{"key", "score", ...}]

Epochs: each rank reads its own share of the training shards and cycles through it, so every rank runs the same
number of steps whatever the shard sizes. One epoch is `--epoch_samples` samples across all ranks (default: the
number of samples in the training shards), i.e. ceil(epoch_samples / (ranks x batch x accumulation)) optimizer
steps; within it a rank's share is reshuffled and may wrap around, so a sample can be seen 0, 1 or 2 times in one
epoch. Training batches group samples of similar token length within each shuffle buffer, and at each step every
rank draws its batch from the same length band, so no step waits for one rank's long batch (--bucket_by_length).
Evaluation and prediction read every sample exactly once, whatever the number of ranks and shards.
Bad samples (undecodable image, missing image, bad json field, type out of range, NaN score) are skipped and
counted (`--on_bad_sample skip`) or stop the run with exit code 2 (`error`). More than 10% of a split skipped is a
warning naming the most common problem; an evaluation or prediction without one good sample is an error.
A run that finds `checkpoint-*` folders in --output_dir resumes from the newest one, its stream positioned at that step
without decoding the images of the steps before.
The score head learns standardized scores (the training labels' mean and std, counted at start and kept in the saved
config), so labels on any scale train alike; outputs, metrics and predictions are in the labels' units. Options:
class weights for imbalanced types, a pairwise ranking loss (README "Targets and losses").
Early stopping: --early_stopping_patience N stops after N evaluations without an improvement of
--metric_for_best_model, any metric of the evaluation (eval_score_spearman, eval_type_macro_f1, ...; whether higher is
better follows from it); --load_best_model_at_end then saves the best checkpoint's weights (any save format).
Precision and memory as in sft_qwen2.py (training_plan.py): under bf16 what trains is fp32 master weights, frozen
parts stay bf16, the heads are fp32; rank 0 prints the policy and a per-GPU memory plan at start.
"""

import collections
import functools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from torch import nn
from transformers import AutoConfig, AutoProcessor, HfArgumentParser, Trainer, TrainerCallback, set_seed
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel

from collate import LABELS, DataError, VLEncoder, missing_chat_template, pixel_bounds_problem
from curves import calibration, write_eval_report, write_training_curves
from data import (BadSample, ManifestSource, ShardStream, count_samples, expand_shards, label_statistics, make_loader,
                  manifest_rows)
from feature_cache import open_feature_cache
from feature_cache import settings as feature_settings
from plumbing import (TrainingDefaults, check_output_dir, check_output_file, demo_dir, fail, final_evaluation,
                      leave_process_group, load_pretrained, log, parse_arguments, patient_group, prepare_demo,
                      settle_best_metric, wait_for_every_rank, warn, weights_source)
from reliability import (GracefulStop, MarkComplete, SkipNonFinite, all_ranks_max, best_model_summary,
                         check_resume_flag, checkpoint_to_resume, early_stopping, exit_if_failed, exit_if_stopped,
                         finished_run, rank_0s, resume_mismatch, run_record, shared_output_problem)
from training_plan import (LoraArguments, add_lora, check_flags, check_loader_shm, checkpoint_dtype, fit_warmup,
                           keep_fp32_under_fsdp, load_dtype, load_device, loader_sample_bytes, loads_on_main_only,
                           lora_parameter_count, lora_settings, memory_plan, optimizer_steps, reduce_every_micro_batch,
                           save_final_model, steps_line, to_base_dtype, use_fsdp_precision, use_precision_policy)

CLASS_LABELS = [name for name, kind in LABELS.items() if kind == "class"]  # each has a `num_<name>s` setting


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
    allow_pickle: bool = field(default=False, metadata={
        "help": "Also load pickle weights (.bin), which can run arbitrary code; by default only safetensors."})
    allow_untrained_heads: bool = field(default=False, metadata={
        "help": "Predict (--do_predict without training) from a checkpoint that is not a trained scorer, with heads "
                "as new ones start (an untrained baseline); without it that is refused."})
    score_weight: float = field(default=1.0, metadata={"help": "Weight of the score loss (MSE) in the total."})
    type_weight: float = field(default=1.0, metadata={"help": "Weight of the type loss (cross-entropy) in the total."})
    score_norm: str = field(default="standardize", metadata={
        "help": "standardize: the score head learns (score - mean) / std, the training labels' mean and standard "
                "deviation (counted from the shards' json, or --score_mean/--score_std; kept in the saved config), so "
                "scores on any scale train alike; outputs, metrics and predictions stay in the labels' units. none: "
                "the head learns the raw scores."})
    score_mean: float = field(default=None, metadata={"help": "Mean for standardize (default: counted)."})
    score_std: float = field(default=None, metadata={"help": "Standard deviation for standardize (default: counted)."})
    type_class_weights: str = field(default="none", metadata={
        "help": "Class weights of the type loss: none, balanced (n / (classes x count), from the training labels' "
                "counts, printed at start) or one weight per class, w0,w1,..."})
    rank_weight: float = field(default=0.0, metadata={
        "help": "Weight of a pairwise logistic (RankNet) loss on the score over the pairs of a batch with different "
                "scores, logged as loss_rank. It depends only on the scores' order, so sources on different scales "
                "can be mixed."})


@dataclass
class DataArguments:
    train_shards: str = field(default=None, metadata={"help": "Training shards: brace pattern, glob or comma list."})
    eval_shards: str = field(default=None, metadata={"help": "Evaluation shards (every sample evaluated once)."})
    predict_shards: str = field(default=None, metadata={"help": "Shards to predict with --do_predict (default: eval)."})
    predict_file: str = field(default=None, metadata={
        "help": "Predict the rows of a manifest instead of shards (implies --do_predict): make_shards.py's format, "
                ".jsonl or .csv, with prompt and images (labels, if any, are left unused); the predictions file then "
                "has one line per good row, in manifest order, a bad row counted as a bad sample (FILE: line N: "
                "problem)."})
    image_root: str = field(default=None, metadata={
        "help": "Folder the relative image paths of --predict_file start from (default: the manifest's folder)."})
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
    bucket_by_length: bool = field(default=True, metadata={
        "help": "Form training batches of samples of similar token length within each shuffle buffer, every rank "
                "drawing from the same length band at each step (less padding, no rank waiting for another's long "
                "batch; bands still random across steps and epochs)."})
    on_bad_sample: str = field(default="skip", metadata={
        "help": "skip (count and go on) or error (exit 2 naming the shard, key and problem; in training at the "
                "next logging step, when every rank stops together).",
        "choices": ["skip", "error"]})
    feature_cache: str = field(default=None, metadata={
        "help": "Folder of the frozen backbone's features, computed once per sample and reused by every epoch, "
                "evaluation and prediction (default with --freeze_backbone: OUTPUT_DIR/feature_cache; `none`: off)."})
    allow_pipe_shards: bool = field(default=False, metadata={
        "help": "Accept `pipe:COMMAND` shards, which run a shell command to read a shard (off: a shard list from "
                "someone else could run anything)."})
    demo: bool = field(default=False, metadata={
        "help": "Build a tiny random Qwen3-VL and synthetic shards in a temporary folder; train, evaluate, predict."})


CUBIC = {"power": 3.0}  # the default schedule's options: a polynomial decay of power 3


@dataclass
class ScorerArguments(TrainingDefaults):
    output_dir: str = field(default="outputs/scorer-qwen3-vl", metadata={"help": "Checkpoints and the final model."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (backbone)."})
    head_lr: float = field(default=None, metadata={"help": "Peak learning rate of the heads (default: learning_rate)."})
    lr_scheduler_type: str = field(default="polynomial", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: dict(CUBIC), metadata={
        "help": "Schedule options (JSON), default a cubic decay (for another --lr_scheduler_type: none)."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup: steps, or a share of all steps if < 1."})
    weight_decay: float = field(default=0.02, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    activation_checkpointing: bool = field(default=None, metadata={
        "help": "Recompute activations in backward (default: on when the backbone trains)."})
    ddp_find_unused_parameters: bool = field(default=False, metadata={
        "help": "Every trainable parameter gets a gradient every step in every mode, so DDP need not search."})
    dataloader_num_workers: int = field(default=4, metadata={"help": "Processes decoding and encoding samples."})

    def __post_init__(self):
        # Unset means "when the backbone trains" (main() knows the freezing flags); the Trainer turns None into False.
        unset = self.activation_checkpointing is None and self.gradient_checkpointing is None
        self.activation_checkpointing_auto = unset
        super().__post_init__()
        if self.lr_scheduler_type != "polynomial" and self.lr_scheduler_kwargs == CUBIC:
            self.lr_scheduler_kwargs = {}  # the default's `power` is the polynomial schedule's option alone


ARGUMENTS = (ModelArguments, DataArguments, LoraArguments, ScorerArguments)  # flags and config-file keys

DEMO_DIR = demo_dir("scorer-qwen3-vl")
# Flags the demo puts before the user's own (so a user flag still wins): tiny model and images, a few CPU steps.
# The heads at 5x the backbone's rate (their score targets are standardized, so the score head starts at the labels'
# mean; at 1x the demo ends near Pearson 0.94) and a linear decay (the default cubic one spends most steps at a tiny
# rate): the demo then learns both labels in 80 steps (score Pearson ~0.99, type accuracy 1.0).
DEMO_ARGS = [
    "--model_name_or_path", f"{DEMO_DIR}/tiny-qwen3-vl", "--train_shards", f"{DEMO_DIR}/train-{{000000..000003}}.tar",
    "--eval_shards", f"{DEMO_DIR}/eval-{{000000..000001}}.tar", "--do_predict", "--output_dir", f"{DEMO_DIR}/output",
    "--num_types", "3", "--min_pixels", "1024", "--max_pixels", "4096", "--max_steps", "80",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "2e-3",
    "--head_lr", "1e-2", "--lr_scheduler_kwargs", '{"power": 1.0}', "--warmup_steps", "6", "--logging_steps", "10",
    "--eval_strategy", "steps", "--eval_steps", "40", "--eval_on_start", "true", "--save_steps", "40",
    "--dataloader_num_workers", "1", "--use_cpu", "--disable_tqdm", "true",
]


class AllRanksError(DataError):
    """Bad input every rank knows about at the same step: rank 0 reports it, the others just exit 2."""


# ---------------------------------------------------------------------------------------------------------------
# Model: the backbone, one fp32 head per label field (collate.LABELS), losses
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ScorerOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    head_losses: dict | None = None  # {label: loss}, detached
    heads: dict | None = None  # {label: (batch,) values or (batch, classes) logits}


def pool_last_token(hidden, attention_mask):
    """Each row's hidden state at its last attended position: right for left and right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


HEADS = tuple(f"{name}_head." for name in LABELS)  # parameter-name prefixes of the heads
SAVED_WITH_BASE = HEADS + ("lora_",)  # name parts of what a save holds when it names its base: heads, adapters


def saved_with_base(key):
    return any(part in key for part in SAVED_WITH_BASE)


class Qwen3VLScorer(Qwen3VLPreTrainedModel):
    """Qwen3-VL backbone (no LM head) + one fp32 head per label on the last real token.

    `config` is the Qwen3-VL config plus `num_<class label>s`, `<label>_weight`, `scorer_targets` ({value label:
    [mean, std]} of standardized targets, see `standardization`), `scorer_class_weights` ({class label: weights}),
    `rank_weight`, `scorer_trains` (what trained),
    `scorer_lora` (LoRA settings, when the backbone carries adapters) and `scorer_base_model`: set when the backbone
    is frozen or carries adapters; saves then hold only the heads and adapters, and `from_pretrained` rebuilds the
    backbone from there.
    """

    _keep_in_fp32_modules_strict = [f"{name}_head" for name in LABELS]  # fp32 even on a bf16 backbone
    # Starting from a Qwen3-VL checkpoint the heads are new by design: no "missing weights" report for them
    _keys_to_ignore_on_load_missing = [rf"^{name}_head\." for name in LABELS]
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    accepts_loss_kwargs = False  # losses are per-batch means; the Trainer scales them for gradient accumulation

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen3VLModel(config)
        for name, kind in LABELS.items():
            outputs = 1 if kind == "value" else getattr(config, f"num_{name}s")
            setattr(self, f"{name}_head", nn.Linear(config.text_config.hidden_size, outputs))
        self.post_init()

    def head(self, name):
        return getattr(self, f"{name}_head")

    def _init_weights(self, module):
        """New value heads start at zero: an untrained scorer predicts each value label's mean (its standardized
        output is 0), not a random offset from it that depends on the scale of the backbone's hidden states."""
        super()._init_weights(module)
        if any(module is getattr(self, f"{name}_head", None) for name, kind in LABELS.items() if kind == "value"):
            init.zeros_(module.weight)

    def loss_weights(self):
        """{loss: its weight in the total}: each label's (`<label>_weight` in the config, 1.0 where a fork set none),
        and the ranking loss's when it is on."""
        rank = getattr(self.config, "rank_weight", 0.0)
        return {**{name: getattr(self.config, f"{name}_weight", 1.0) for name in LABELS}, **({"rank": rank} if rank
                                                                                              else {})}

    def standardization(self, name):
        """(mean, std) of a value label: its head's raw output is (label - mean) / std. The head then starts near
        the labels' mean whatever their scale (the raw output starts near 0), and its loss is comparable across
        datasets. (0, 1) for a scorer trained on raw labels."""
        return tuple((getattr(self.config, "scorer_targets", None) or {}).get(name, (0.0, 1.0)))

    def class_weights(self, name):
        """A class label's cross-entropy weights (one per class), or None: unweighted."""
        return (getattr(self.config, "scorer_class_weights", None) or {}).get(name)

    @classmethod
    def from_pretrained(cls, path, *args, config=None, meta=False, **kwargs):
        """Load a scorer (full, or heads-only on a recorded base) or start one from a Qwen3-VL checkpoint. `meta`
        (--dry_run): the same model without its weights, on the meta device (shapes and dtypes, nothing read)."""
        config = config or AutoConfig.from_pretrained(path)
        base = getattr(config, "scorer_base_model", None)
        if meta:
            with torch.device("meta"):
                model = cls(config).to(kwargs.get("dtype") or torch.float32)
        else:
            model = super().from_pretrained(base or path, *args, config=config, **kwargs)
        for name in LABELS:  # heads created here (not loaded) come in the backbone's dtype
            model.head(name).float()
        if getattr(config, "scorer_lora", None):  # a LoRA save: the base backbone with these adapters
            model.add_lora(config.scorer_lora)
        if base and not meta:
            import safetensors.torch

            saved = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
            result = model.load_state_dict(saved, strict=False)
            if result.unexpected_keys or any(saved_with_base(k) for k in result.missing_keys):
                raise ValueError(f"{path}: not a heads/adapter scorer save ({result})")
        return model

    def add_lora(self, settings):
        """Put LoRA adapters (training_plan.lora_settings) into the backbone; the heads stay outside, fully trained."""
        self.model = add_lora(self.model, settings)
        self.config.scorer_lora = settings

    def merge_lora(self):
        """Fold the adapters into the backbone's weights: a plain full scorer that needs no base and no peft."""
        self.model = self.model.merge_and_unload()
        self.config.scorer_lora = self.config.scorer_base_model = None
        self._keys_to_ignore_on_save = set()

    def set_trainable(self, freeze_backbone, freeze_vision, base_record):
        """Choose what trains. A frozen backbone, or one with adapters, is saved as a reference to `base_record`
        (plus the adapters), not as weights."""
        lora = bool(getattr(self.config, "scorer_lora", None))
        for name, p in self.model.named_parameters():  # with LoRA only the adapters of the backbone train
            p.requires_grad_(not freeze_backbone and (not lora or "lora_" in name))
        if freeze_vision:
            self.model.visual.requires_grad_(False)
        for name in LABELS:
            self.head(name).requires_grad_(True)
        by_reference = freeze_backbone or lora
        self.config.scorer_base_model = base_record if by_reference else None
        self.config.scorer_trains = ("heads" if freeze_backbone else ("lora-" if lora else "")
                                     + ("llm+heads" if freeze_vision else "all"))
        self._keys_to_ignore_on_save = {k for k in self.state_dict() if not saved_with_base(k)} \
            if by_reference else set()

    def pooled(self, input_ids, attention_mask, mm_token_type_ids=None, pixel_values=None, image_grid_thw=None):
        """Hidden state of each sample's last real token (the backbone runs without autograd when frozen)."""
        trains = any(p.requires_grad for p in self.model.parameters())
        blank, hook = [], None
        if pixel_values is None:  # the tower runs anyway, where a batch with images runs it: after the embedding
            hook = self.model.get_input_embeddings().register_forward_hook(
                lambda *_: blank.append(self.vision_tower_on_nothing(input_ids.device)))
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    mm_token_type_ids=mm_token_type_ids, pixel_values=pixel_values,
                                    image_grid_thw=image_grid_thw, use_cache=False)
        finally:
            if hook:
                hook.remove()
        pooled = pool_last_token(hidden.last_hidden_state, attention_mask)
        return pooled + 0.0 * blank[0] if blank else pooled

    def vision_tower_on_nothing(self, device):
        """The vision tower's outputs for one blank minimal image, summed: what a text-only batch adds, times zero,
        to its features. Other ranks' batches may have images at the same step, and every rank must run the same
        collectives in the same order: DDP waits for the tower's gradients, FSDP2 and ZeRO-3 gather the tower's
        layers (between the embedding's and the language model's) and reduce their gradients. Costs one 4-patch
        pass of the tower."""
        vision = self.config.vision_config
        m = vision.spatial_merge_size
        pixels = torch.zeros(m * m, vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2,
                             device=device)
        out = self.model.get_image_features(pixels, torch.tensor([[1, m, m]], device=device))
        return sum(t.sum() for t in out.pooler_output) + sum(f.sum() for fs in out.deepstack_features for f in fs)

    def forward(self, input_ids=None, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
                image_grid_thw=None, features=None, **labels):
        """`labels`: `<name>_labels` for every label (training, evaluation) or none (prediction). `features`: the
        pooled states of a frozen backbone from feature_cache.py, in place of the inputs: only the heads run."""
        pooled = self.pooled(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw) \
            if features is None else features
        with torch.autocast(pooled.device.type, enabled=False):
            pooled = pooled.float()
            raw = {name: self.head(name)(pooled) for name in LABELS}
        raw = {name: out.squeeze(-1) if LABELS[name] == "value" else out for name, out in raw.items()}
        heads = {name: out * self.standardization(name)[1] + self.standardization(name)[0]
                 if LABELS[name] == "value" else out for name, out in raw.items()}  # values in the labels' units
        if not labels:
            return ScorerOutput(heads=heads)
        losses, targets = {}, {}
        for name, out in raw.items():
            label = labels[f"{name}_labels"]
            if LABELS[name] == "value":
                mean, std = self.standardization(name)
                targets[name] = (label.float() - mean) / std
                losses[name] = nn.functional.mse_loss(out, targets[name])
            else:
                weight = self.class_weights(name)
                losses[name] = nn.functional.cross_entropy(
                    out, label, weight=None if weight is None else torch.tensor(weight, device=out.device))
        weights = self.loss_weights()
        if "rank" in weights:
            losses["rank"] = sum(rank_loss(raw[name], targets[name]) for name in targets)
        loss = sum(weights[name] * value for name, value in losses.items())
        return ScorerOutput(loss=loss, head_losses={k: v.detach() for k, v in losses.items()}, heads=heads)


def rank_loss(predicted, target):
    """RankNet's pairwise logistic loss: the mean of log(1 + exp(-(p_i - p_j))) over the pairs of the batch with
    target_i > target_j (each unordered pair once; ties left out), 0 where there is no such pair. It reads only the
    targets' order, so datasets scored on different scales can share a batch. (torch has no pairwise ranking loss
    for real-valued targets: MarginRankingLoss is a hinge on given pairs.)"""
    above = target[:, None] > target[None, :]
    if not above.any():
        return predicted.sum() * 0.0  # keeps the graph: every rank's backward reaches the same parameters
    return nn.functional.softplus(-(predicted[:, None] - predicted[None, :])[above]).mean()


def load_scorer(model_args, dtype, lora_args=None, meta=False, device=None):
    """The scorer, from a Qwen3-VL checkpoint (new heads) or a scorer save; with `lora_args.use_peft` new adapters
    (unless the save has them); trainable parts set from the flags. `meta`: without weights (--dry_run). `device`:
    where the weights load (training_plan.load_device; None: the CPU)."""
    path = model_args.model_name_or_path
    config = AutoConfig.from_pretrained(path)
    for name in CLASS_LABELS:  # the class count: from the flag, else from a scorer save; never two different ones
        key = f"num_{name}s"
        given, saved = getattr(model_args, key, None), getattr(config, key, None)
        if given is None and saved is None:
            raise DataError(f"{path}: not a scorer checkpoint, so --{key} is required")
        if given is not None and saved is not None and given != saved:
            raise DataError(f"{path}: this scorer has {saved} {name}s, not --{key} {given}")
        setattr(config, key, saved or given)
        if getattr(config, key) < 1:
            raise DataError(f"--{key} must be at least 1, not {getattr(config, key)}")
    for name in LABELS:
        setattr(config, f"{name}_weight", getattr(model_args, f"{name}_weight", 1.0))
    config.rank_weight = model_args.rank_weight
    weights = getattr(config, "scorer_base_model", None) or path  # a heads/adapter save names its base
    model = Qwen3VLScorer.from_pretrained(path, config=config, dtype=dtype, meta=meta,
                                          attn_implementation=model_args.attn_implementation, device_map=device,
                                          **weights_source(weights, model_args.allow_pickle))
    if lora_args is not None and lora_args.use_peft and not getattr(config, "scorer_lora", None):
        model.add_lora(lora_settings(model.model, lora_args, "language_model"))  # vision tower: only when named
    # The base a frozen or adapted backbone refers to: the one a heads/adapter save already names, else this one.
    base = getattr(config, "scorer_base_model", None) or (os.path.abspath(path) if os.path.isdir(path) else path)
    model.set_trainable(model_args.freeze_backbone, model_args.freeze_vision, base)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Metrics: exact, over every evaluated sample
# ---------------------------------------------------------------------------------------------------------------

def _correlation(statistic, a, b):
    """A scipy correlation, or NaN where it is undefined (fewer than two samples, or either side constant): saying
    so beats a made-up number (scipy also answers NaN there, with a warning per call)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(statistic(a, b).statistic)


def scorer_metrics(rows, weights, prefix="eval", std=None, class_weights=None):
    """Metrics over every evaluated sample (rows: dicts with `heads` and `labels`, each {label: ...}, values in the
    labels' units); returns (metrics for the logs, details for eval_results.json).

    Per value label: loss (the MSE of the standardized values, as training computes it: MSE / std^2, `std` {label: std},
    1 where absent), MAE, RMSE, Pearson, Spearman (average ranks for ties), in the labels' units; per class label: loss
    (cross-entropy, weighted by `class_weights` {label: weights or None} as in training: the mean over samples of weight
    x loss divided by the mean weight), accuracy, macro-F1 over the classes that occur as a label or a guess, and the
    mean of the classes' one-vs-rest ROC-AUCs; the details hold each class's ROC-AUC (NaN for a class that is every
    label or none) and the confusion matrix (a row per label, a column per guess). Computed by scipy and scikit-learn.
    Losses are means over samples (not over batches); `loss` is their sum weighted by `weights` ({label: weight}; the
    ranking loss, a loss over a batch's pairs, is a training loss only: Spearman measures the order here).

    Per class label also the expected calibration error of its top-class probability (`<label>_ece`, numpy:
    curves.calibration), with its reliability bins in the details.
    """
    from scipy.special import log_softmax
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, mean_absolute_error, mean_squared_error,
                                 roc_auc_score)

    if not rows:
        return {f"{prefix}_samples": 0}, {}
    metrics, details = {f"{prefix}_loss": 0.0}, {}
    for name, kind in LABELS.items():
        out = np.array([r["heads"][name] for r in rows], dtype=np.float64)
        label = np.array([r["labels"][name] for r in rows], dtype=np.float64 if kind == "value" else np.int64)
        if kind == "value":
            mse = float(mean_squared_error(label, out))
            metrics.update({f"{prefix}_loss_{name}": mse / (std or {}).get(name, 1.0) ** 2,
                            f"{prefix}_{name}_rmse": math.sqrt(mse),
                            f"{prefix}_{name}_mae": float(mean_absolute_error(label, out)),
                            f"{prefix}_{name}_pearson": _correlation(pearsonr, out, label),
                            f"{prefix}_{name}_spearman": _correlation(spearmanr, out, label)})
        else:
            log_probs, guess, classes = log_softmax(out, axis=1), out.argmax(axis=1), list(range(out.shape[1]))
            auc = [float(roc_auc_score(label == c, log_probs[:, c])) if 0 < np.sum(label == c) < len(label)
                   else float("nan") for c in classes]
            defined = [a for a in auc if not math.isnan(a)]
            weight = np.asarray((class_weights or {}).get(name) or [1.0] * out.shape[1])[label]
            nll = -log_probs[np.arange(len(label)), label]
            ece, bins = calibration(np.exp(log_probs), label)
            metrics.update({f"{prefix}_loss_{name}": float((weight * nll).sum() / weight.sum()),
                            f"{prefix}_{name}_accuracy": float(accuracy_score(label, guess)),
                            f"{prefix}_{name}_macro_f1": float(f1_score(label, guess, average="macro")),
                            f"{prefix}_{name}_roc_auc": float(np.mean(defined)) if defined else float("nan"),
                            f"{prefix}_{name}_ece": ece})
            details.update({f"{prefix}_{name}_roc_auc_per_class": auc, f"{prefix}_{name}_confusion_matrix":
                            confusion_matrix(label, guess, labels=classes).tolist(),
                            f"{prefix}_{name}_reliability": bins})
        metrics[f"{prefix}_loss"] += weights[name] * metrics[f"{prefix}_loss_{name}"]
    metrics[f"{prefix}_samples"] = len(rows)
    return metrics, details


MANY_BAD = 0.1  # more than this share of a split's samples skipped as bad: a warning says what they had


def warn_if_many_bad(split, bad, samples, warned=None):
    """One warning line when more than MANY_BAD of a split's `samples` (good and bad) were skipped as `bad`
    (data.BadSample list): how many, the most common problem (its numbers aside) with an example, and a hint: so many
    usually means a flag that does not fit the data (--num_types below the labels, --max_len below the samples).
    Once per split in a run when `warned` (a set) keeps count."""
    if len(bad) <= MANY_BAD * samples or split in (warned if warned is not None else ()):
        return
    kinds = collections.Counter(re.sub(r"\d+", "#", b.problem) for b in bad)
    kind, count = kinds.most_common(1)[0]
    example = next(b for b in bad if re.sub(r"\d+", "#", b.problem) == kind)
    warn(f"{len(bad)} of {samples} {split} samples ({len(bad) / samples:.0%}) were skipped as bad, {count} of them "
         f"like {example}; if the data is right, a flag does not fit it (e.g. --num_types, --max_len, --max_pixels)")
    if warned is not None:
        warned.add(split)


def check_bad_share(split, rows, bad, warned=None):
    """After an exact pass (evaluation, prediction; `rows` and `bad` the same on every rank): no good sample at all is
    an error of every rank (exit 0 with no metrics or an empty file would hide it), many bad ones a warning."""
    if not rows:
        raise AllRanksError(f"{split}: all {len(bad)} samples are bad, the first: {bad[0]}" if bad
                            else f"{split}: no sample to read")
    warn_if_many_bad(split, bad, len(rows) + len(bad), warned)


def per_sample(heads):
    """A batch's head outputs ({label: tensor}) as one {label: float or list of logits} per sample: one
    device-to-host copy per head and batch, not one sync per sample."""
    heads = {name: out.float().tolist() for name, out in heads.items()}
    return [{name: out[i] for name, out in heads.items()} for i in range(len(next(iter(heads.values()))))]


def prediction(row):
    """One predictions.jsonl object: the key, each value label's output, each class label's guess and probabilities."""
    out = {"key": row["key"]}
    for name, kind in LABELS.items():
        if kind == "value":
            out[name] = row["heads"][name]
        else:
            probs = torch.tensor(row["heads"][name], dtype=torch.float64).softmax(-1)
            out.update({name: int(probs.argmax()), f"{name}_probs": probs.tolist()})
    return out


# Whether higher is better, for each metric scorer_metrics computes per kind of label (the losses: lower)
METRIC_DIRECTIONS = {"value": {"mae": False, "rmse": False, "pearson": True, "spearman": True},
                     "class": {"accuracy": True, "macro_f1": True, "roc_auc": True, "ece": False}}


def eval_metric_directions(prefix="eval"):
    """{metric name: greater is better} for every metric the evaluation logs for the labels of collate.LABELS: what
    --metric_for_best_model accepts."""
    directions = {f"{prefix}_loss": False}
    for name, kind in LABELS.items():
        directions[f"{prefix}_loss_{name}"] = False
        directions.update({f"{prefix}_{name}_{metric}": up for metric, up in METRIC_DIRECTIONS[kind].items()})
    return directions


# ---------------------------------------------------------------------------------------------------------------
# Trainer: the scorer's loaders, head learning rate, per-head loss logs, bad samples, exact evaluation/prediction
# ---------------------------------------------------------------------------------------------------------------

def exact_pass(stream, args, on_bad_sample, rows_of, unique=True, lockstep=None, rows_to=None, desc="exact pass"):
    """Every sample of `stream` once over all ranks, as `rows_of(batch)` describes each (a dict per sample, in batch
    order); returns (rows, each with its `order` and `key`, sorted by shard and position; data.BadSample list, one
    per shard and key), the same on every rank. Each rank runs its own samples with no collective in between (ranks
    may hold very different numbers), then everything is gathered with its key; bad-sample errors are raised after
    the gather, by every rank alike, so no rank is left waiting for one that stopped. A key met twice is a bad
    sample the second time, unless `unique` is off (the feature cache keeps every sample, as training reads them).
    `rows_to`: the rows are gathered on that rank only (the others get none; bad samples still reach every rank),
    for rows only one process needs and that may be large (the feature cache's writer).
    `lockstep` (a sharded model, --fsdp, whose forward gathers each layer from every rank): every rank must run as
    many forwards as the others, so a rank without a batch to run calls `lockstep()` (a stand-in forward) until all
    are done, agreed by one all-reduce per batch. Process 0 shows a progress bar of its samples (`desc`)."""
    rows, found = [], []
    loader = make_loader(stream, args)
    progress = _progress_bar(stream, args, desc)
    for batch in _until_every_rank_is_done(loader, args.device) if lockstep else loader:
        if batch is not None:
            found += batch["bad_samples"]
            progress.update(len(batch["order"]) + sum(not bad.fatal for bad in batch["bad_samples"]))
        if batch is None or not batch["order"]:  # this rank is done, or only bad samples were left for this batch
            if lockstep:
                lockstep()
            continue
        for i, row in enumerate(rows_of(batch)):
            rows.append({"order": batch["order"][i], "key": batch["keys"][i], **row})
    progress.close()
    wait_for_every_rank()  # ranks done early wait for the others as long as their shares take (not --ddp_timeout)
    rows, found = _gathered(rows, rows_to), gather_object(found)
    rows.sort(key=lambda r: tuple(r["order"]))
    if unique:
        first, kept = {}, []
        for r in rows:  # a key twice in the data would break "one prediction per key"
            if r["key"] in first:
                found.append(BadSample(stream.shards[r["order"][0]], r["key"],
                                       f"duplicate key (first in {stream.shards[first[r['key']][0]]})"))
            else:
                first[r["key"]] = r["order"]
                kept.append(r)
        rows = kept
    for bad in found:  # --on_bad_sample error (or a fatal one): every rank raises the same first error
        if bad.fatal or on_bad_sample == "error":
            raise AllRanksError(str(bad))
    if unique:  # a bad sample counts once
        once = {}
        for bad in found:
            once.setdefault((bad.shard, bad.key), bad)
        found = list(once.values())
    return rows, found


def _progress_bar(stream, args, desc):
    """tqdm on stderr for process 0's share of an exact pass (its size known from the tar headers of local shards,
    else open-ended), so an evaluation, a prediction or the feature cache's backbone epoch (hours at full size) shows
    samples, rate and time left. Other processes, and --disable_tqdm, get a silent one."""
    from tqdm.auto import tqdm

    show = args.process_index == 0 and not args.disable_tqdm
    total = None
    if show and all(os.path.isfile(s) for s in stream.shards):
        total = stream.share(stream.count(stream.shards), max(1, args.dataloader_num_workers))
    return tqdm(total=total, desc=f"{desc} (process 0)", unit=" samples", disable=not show, file=sys.stderr,
                dynamic_ncols=True)


def _gathered(rows, to):
    """Every rank's `rows` in one list, on every rank (`to` None) or on rank `to` only (the others get [])."""
    if to is None:
        return gather_object(rows)
    if not dist.is_initialized():
        return rows
    parts = [None] * dist.get_world_size() if dist.get_rank() == to else None
    dist.gather_object(rows, parts, dst=to)
    return [row for part in parts for row in part] if parts else []


def _until_every_rank_is_done(batches, device):
    """`batches`, then None until every rank has run out of its own."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not all_ranks_max(int(batch is not None), device):
            return
        yield batch


class _SetStreamEpoch(TrainerCallback):
    """Tell the training stream which epoch starts (also right after a resume, where the Trainer does not)."""

    def __init__(self, stream, steps_per_epoch):
        self.stream, self.steps_per_epoch = stream, steps_per_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.stream.set_epoch(state.global_step // self.steps_per_epoch)


BAD_POSITIONS = "bad_samples.json"  # in each checkpoint: see _KeepBadPositions


class _KeepBadPositions(TrainerCallback):
    """Process 0 writes into each checkpoint where the bad training samples of the run so far were, on every rank, as
    (shard, index in shard) pairs: what a resume needs to position the stream without encoding the trained steps
    (ScorerTrainer.get_resumed_dataloader). One file of positions in the data, not one per rank, so a resume on
    another number of processes reads it too. Written before MarkComplete's marker (this callback comes first)."""

    def __init__(self, positions):
        self.positions = positions

    def on_save(self, args, state, control, **kwargs):
        every = sorted({tuple(p) for p in gather_object(sorted(self.positions))})  # every rank saves at this step
        if args.process_index == 0:
            with open(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", BAD_POSITIONS), "w") as f:
                json.dump(every, f)


class ScorerTrainer(Trainer):
    """Trainer with the scorer's loaders, head learning rate, per-head loss logging, bad-sample accounting, a resume
    that positions the stream instead of replaying it, and an exact evaluation/prediction pass (each rank runs its
    own samples, then everything is gathered with its key)."""

    META = ("keys", "order", "lengths", "bad_samples")

    def __init__(self, *args, head_lr=None, on_bad_sample="skip", callbacks=None, **kwargs):
        self.bad_positions = set()  # (shard, index) of every bad training sample this rank met, resumed runs' too
        self.resumed_bad = None  # bad_positions as the checkpoint resumed from recorded them
        super().__init__(*args, callbacks=[_KeepBadPositions(self.bad_positions), *(callbacks or [])], **kwargs)
        self.head_lr, self.on_bad_sample = head_lr, on_bad_sample
        self.train_bad = {}  # {(shard, key): problem} skipped on this rank while training
        self.last_keys = []  # the sample keys of this rank's latest training batch
        self._train_error = None  # the first bad training sample in `error` mode, or the first fatal one
        self.loss_names = list(self.model.loss_weights())  # each label's, and "rank" with the ranking loss
        self._head_sums, self._head_steps = torch.zeros(len(self.loss_names), device=self.args.device), 0
        self.eval_details = {}  # the latest evaluation's per-class ROC-AUCs, confusion matrices, reliability bins
        self.eval_rows = []  # the latest evaluation's samples (heads and labels), for eval_report.png where it is drawn
        self.warned = set()  # splits warn_if_many_bad has warned about (once per run, not at every evaluation)

    def get_train_dataloader(self):
        return make_loader(self.train_dataset, self.args)

    def train(self, resume_from_checkpoint=None, **kwargs):
        record = (os.path.join(resume_from_checkpoint, BAD_POSITIONS)
                  if isinstance(resume_from_checkpoint, str) else None)  # True: the Trainer's own pick
        readable = bool(record) and os.path.isfile(record)
        # every rank positions its stream, or every rank replays: a rank replaying hours of batches while the others
        # wait in the first step's all-reduce would outlast the collective timeout
        if record and not all_ranks_max(int(not readable), self.args.device):
            with open(record) as f:
                self.resumed_bad = {tuple(position) for position in json.load(f)}
            self.bad_positions |= self.resumed_bad  # the next checkpoints' records cover the steps before this run
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_resumed_dataloader(self, dataloader, num_batches):
        """The Trainer replays the trained batches of the resumed epoch, decoding every image of them (hours at
        step 50,000); the stream is positioned at the resumed batch instead, the bad samples of the trained steps
        left out as the checkpoint records them (ShardStream.resume_at), so the batches are those of an
        uninterrupted run. A checkpoint without that record (an earlier version's) is replayed."""
        if self.resumed_bad is None:
            return super().get_resumed_dataloader(dataloader, num_batches)
        self.train_dataset.resume_at(num_batches, self.resumed_bad)
        return dataloader

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
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, model)  # the first: --pure_bf16's compensated AdamW
            self.optimizer = optimizer_cls(params, **optimizer_kwargs)
        return self.optimizer

    def _note_train_bad(self, found):
        """Bad samples met in a training batch: counted, or in `error` mode kept until every rank stops together at
        the next logging step (a rank that stopped alone would leave the others waiting in a collective). So is a
        fatal one (this rank's stream cannot go on), whatever the mode: the stream then gives stand-in batches."""
        for bad in found:
            if bad.fatal or self.on_bad_sample == "error":
                self._train_error = self._train_error or bad
            else:
                self.train_bad[(bad.shard, bad.key)] = bad.problem
            if not bad.fatal:
                self.bad_positions.add((bad.shard, bad.index))

    def one_token(self):
        """The inputs of a stand-in forward, one pad token: the same collectives as a real batch (FSDP's per-layer
        gathers, DDP's buffer broadcast and gradient reduction; the vision tower's too, on a blank image)."""
        pad = torch.tensor([[self.processing_class.tokenizer.pad_token_id]], device=self.args.device)
        return {"input_ids": pad, "attention_mask": torch.ones_like(pad)}

    def last_batches(self):
        """Every rank's latest training batch, as sample keys (a collective: every rank calls it together)."""
        return " | ".join(", ".join(keys) for keys in gather_object([self.last_keys]))

    def raise_train_error(self):
        """Stop every rank with the first training error any rank met (every rank calls this at the same step)."""
        errors = gather_object([self._train_error] if self._train_error else [])
        if errors:
            raise AllRanksError(str(errors[0]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._note_train_bad(inputs.get("bad_samples", []))
        if "keys" not in inputs:  # a stand-in batch after a fatal error (data.ShardStream): a step that changes
            heads = model(**self.one_token()).heads  # nothing, with a real step's collectives, until the next log
            loss = sum(out.sum() for out in heads.values()) * 0.0
            return (loss, None) if return_outputs else loss
        self.last_keys = inputs["keys"]  # named if non-finite losses stop the run
        outputs = model(**{k: v for k, v in inputs.items() if k not in self.META})
        if model.training:  # window sums of the per-head losses, logged as means across ranks by log()
            self._head_sums += torch.stack([outputs.head_losses[name] for name in self.loss_names])
            self._head_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log: every rank is here at the same step
            self.raise_train_error()
            means = self.accelerator.reduce(self._head_sums / max(self._head_steps, 1), reduction="mean")
            logs.update({f"loss_{name}": value for name, value in zip(self.loss_names, means.tolist())})
            self._head_sums.zero_()
            self._head_steps = 0
        super().log(logs, start_time)

    def exact_pass(self, stream, features=False, desc="evaluation"):
        """`exact_pass` with the model: each sample's head outputs and labels; with `features`, what the feature
        cache keeps instead: its pooled backbone state (on the CPU, as computed), labels and length, gathered on
        process 0 only (the cache's writer)."""
        model, was_training = self.model, self.model.training
        model.eval()

        def rows_of(batch):
            inputs = self._prepare_inputs({k: v for k, v in batch.items()
                                           if k not in self.META and not k.endswith("_labels")})
            labels = {name: batch[f"{name}_labels"].tolist() for name in LABELS if f"{name}_labels" in batch}
            labels = [{name: values[i] for name, values in labels.items()} for i in range(len(batch["keys"]))]
            with torch.no_grad(), self.accelerator.autocast():
                if features:  # one copy per row: a view would carry the whole batch's storage into the gather
                    pooled = model.pooled(**inputs).cpu()
                    return [{"features": pooled[i].clone(), "labels": labels[i], "length": batch["lengths"][i]}
                            for i in range(len(labels))]
                heads = per_sample(model(**inputs).heads)
            return [{"heads": h, "labels": label} for h, label in zip(heads, labels)]
        def one_token():
            with torch.no_grad(), self.accelerator.autocast():
                model(**self.one_token())
        try:
            return exact_pass(stream, self.args, self.on_bad_sample, rows_of, unique=not features,
                              lockstep=one_token if self.args.fsdp else None, rows_to=0 if features else None,
                              desc=desc)
        finally:
            model.train(was_training)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.time()
        rows, bad = self.exact_pass(eval_dataset or self.eval_dataset)
        check_bad_share("evaluation", rows, bad, warned=self.warned)
        model = self.model
        metrics, self.eval_details = scorer_metrics(
            rows, model.loss_weights(), metric_key_prefix, std={n: model.standardization(n)[1] for n in LABELS
                                                                if LABELS[n] == "value"},
            class_weights={n: model.class_weights(n) for n in LABELS if LABELS[n] == "class"})
        self.eval_rows = rows if self.args.should_save else []  # the other ranks free theirs now
        metrics[f"{metric_key_prefix}_bad_samples"] = len(bad)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def write_predictions(self, streams, shards, path):
        """Predictions for `shards`, one exact pass per stream (those read from the feature cache, the others), in
        shard order."""
        position = {shard: i for i, shard in enumerate(shards)}
        rows, bad = [], []
        for stream in streams:
            r, b = self.exact_pass(stream, desc="prediction")
            rows += [((position[stream.shards[x["order"][0]]], x["order"][1]), x) for x in r]
            bad += b
        check_bad_share("prediction", rows, bad)
        rows = [x for _, x in sorted(rows, key=lambda t: t[0])]
        if self.args.process_index == 0:  # its folder was checked before any work (settle_prediction)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(prediction(r)) + "\n" for r in rows)
        return len(rows), len(bad)

    def gathered_train_bad(self):
        """Bad training samples skipped on each rank (how many), and their union over ranks (data.BadSample list; a
        sample met twice counts once)."""
        per_rank = gather_object([sorted(self.train_bad.items())])
        union = {where: problem for part in per_rank for where, problem in part}
        return [len(part) for part in per_rank], [BadSample(*where, problem) for where, problem in union.items()]


# ---------------------------------------------------------------------------------------------------------------
# Scoring from Python: a saved scorer on rows in memory (serving)
# ---------------------------------------------------------------------------------------------------------------

def predict(model_dir, rows, batch_size=8, device=None, dtype=None, image_root=".",
            min_pixels=DataArguments.min_pixels, max_pixels=DataArguments.max_pixels, max_len=DataArguments.max_len):
    """Scores for `rows` from the scorer saved in `model_dir` (any save format: full, heads-only or LoRA on their
    recorded base, merged): one predictions.jsonl object per row, in order, as `--predict_file` writes them
    (`{"key", "score", "type", "type_probs"}`).

    A row is a manifest row as a dict: `prompt`, `images` (paths, relative to `image_root` or absolute, or PIL
    images, kept as PNG: lossless), an optional `key` (default: its index, zero-padded); labels are ignored. Each is
    checked and encoded exactly as training and --predict_file do; a bad row raises collate.DataError naming it
    (`rows: row 2: ./photos/x.jpg: no such image file`). `min_pixels`, `max_pixels`, `max_len`: as the scorer was
    trained (the flags' defaults unless you changed them). `device`: default the GPU if there is one; `dtype` of the
    weights: default bf16 on a GPU that has it, else fp32. The scorer and its processor are loaded once per
    (folder, device, dtype) and kept for the next call (a server calls this per request).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model, processor = _loaded_scorer(model_dir, device, dtype)
    encoder = VLEncoder(processor, None, False, min_pixels, max_pixels, max_len)
    stream = ManifestSource(manifest_rows(rows), image_root, where="row").attach(
        ShardStream(["rows"], encoder, batch_size, processor.tokenizer.pad_token_id, stop_at_bad=True))
    out = []
    for batch in stream:
        if batch["bad_samples"]:
            raise DataError(str(batch["bad_samples"][0]))
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ScorerTrainer.META}
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            heads = per_sample(model(**inputs).heads)
        out += [prediction({"key": key, "heads": h}) for key, h in zip(batch["keys"], heads)]
    return out


@functools.lru_cache(maxsize=1)
def _loaded_scorer(model_dir, device, dtype):
    model = load_scorer(ModelArguments(model_name_or_path=model_dir), dtype,
                        device=None if device.type == "cpu" else device)
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------------------------
# Dry run
# ---------------------------------------------------------------------------------------------------------------

def dry_run_plan(streams, epoch_samples, image_token_id, on_bad_sample, args):
    """--dry_run: read and encode every sample of every split once over all ranks (bad samples counted, or the
    first one an error as in a run), then say what the run would train: samples, text and image tokens, optimizer
    steps for this many processes. The precision and memory plans are printed before. Returns the figures."""
    def tokens(batch):
        real = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        return [{"image": int((ids == image_token_id).sum()), "text": int((ids != image_token_id).sum())}
                for ids in real]

    plan, parts = {}, []
    for name, stream in streams.items():
        rows, bad = exact_pass(stream, args, on_bad_sample, tokens, desc=f"dry run, {name}")
        text, image = sum(r["text"] for r in rows), sum(r["image"] for r in rows)
        plan[name] = {"samples": len(rows), "bad_samples": len(bad), "text_tokens": text, "image_tokens": image}
        parts.append(f"{name}: {len(rows):,} samples ({len(bad):,} bad), {text + image:,} tokens ({text:,} text + "
                     f"{image:,} image)")
    if "train" in streams:
        plan["steps_per_epoch"], plan["steps"] = optimizer_steps(epoch_samples, args)
        parts.append(steps_line(epoch_samples, args, "samples"))
    log("dry run: " + "; ".join(parts) + ". Nothing was trained.")
    leave_process_group()
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def settle_prediction(data_args, args):
    """What --do_predict predicts: the spec of its shards (--predict_shards, else --eval_shards), or None where it
    predicts the rows of --predict_file (which turns --do_predict on)."""
    predict_shards = None
    if data_args.predict_file is None:
        if data_args.image_root is not None:
            fail("--image_root is where the image paths of --predict_file start: it needs --predict_file")
        predict_shards = data_args.predict_shards if data_args.predict_shards is not None else data_args.eval_shards
        if args.do_predict and predict_shards is None:
            fail("--do_predict needs --predict_shards, --eval_shards or --predict_file")
    elif data_args.predict_shards is not None:
        fail("--predict_file and --predict_shards: one predictions file holds one set of items, give one of them")
    else:
        args.do_predict = True
        if data_args.image_root is not None and not os.path.isdir(data_args.image_root):
            fail(f"--image_root {data_args.image_root}: no such folder")
    if data_args.predict_shards is not None and not args.do_predict:
        fail("--predict_shards are read with --do_predict: add it", every_rank=True)
    if data_args.predict_output is not None:  # (the default, in --output_dir, is checked with it)
        if not args.do_predict:
            fail("--predict_output is where --do_predict or --predict_file writes: add one of them", every_rank=True)
        check_output_file(data_args.predict_output, "--predict_output")  # before the work, not after it
    return predict_shards


def target_flags_problem(model_args):
    """What is wrong with the flags that shape the losses' targets (settle_targets applies them), or None."""
    for name in (n for n, kind in LABELS.items() if kind == "value"):
        norm = getattr(model_args, f"{name}_norm", "standardize")
        mean, std = getattr(model_args, f"{name}_mean", None), getattr(model_args, f"{name}_std", None)
        if norm not in ("standardize", "none"):
            return f"--{name}_norm {norm}: choose standardize or none"
        if (mean is None) != (std is None):
            return f"--{name}_mean and --{name}_std: give both (or neither: they are counted)"
        if mean is not None and norm == "none":
            return f"--{name}_mean/--{name}_std standardize the {name}: they contradict --{name}_norm none"
        if mean is not None and not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            return f"--{name}_mean {mean} --{name}_std {std}: need a finite mean and a standard deviation above 0"
    for name in CLASS_LABELS:
        flag = getattr(model_args, f"{name}_class_weights", "none")
        if flag in ("none", "balanced"):
            continue
        try:
            weights = [float(w) for w in flag.split(",")]
        except ValueError:
            weights = []
        if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
            return (f"--{name}_class_weights {flag}: give none, balanced, or one weight above 0 per class, "
                    f"comma-separated (e.g. 1,4.5,2)")
    rank = model_args.rank_weight
    if not (math.isfinite(rank) and rank >= 0):
        return f"--rank_weight {rank}: give a weight of 0 (off) or more"
    return None


def value_flags_problem(model_args, data_args, args):
    """What is wrong with the value of a flag of the scorer's own (the shared ones: training_plan.check_flags), or
    None."""
    trains = data_args.train_shards is not None  # then some loss must count
    weights = {name: getattr(model_args, f"{name}_weight", 1.0) for name in LABELS}
    for name, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):  # a negative weight trains its head to be wrong
            return f"--{name}_weight {weight:g}: give a weight of 0 (its head learns nothing) or more"
    if trains and not any(weights.values()) and not model_args.rank_weight:
        return (f"every loss has weight 0 ({', '.join(f'--{name}_weight' for name in LABELS)}, --rank_weight): "
                f"nothing would train")
    if args.head_lr is not None and not (math.isfinite(args.head_lr) and args.head_lr >= 0):
        return f"--head_lr {args.head_lr:g}: give a learning rate of 0 or more (or leave it out: --learning_rate)"
    if not isinstance(args.lr_scheduler_kwargs, dict | None):
        return (f"--lr_scheduler_kwargs {args.lr_scheduler_kwargs}: give the schedule's options as a JSON object, "
                f"e.g. '{{\"power\": 2.0}}'")
    if problem := pixel_bounds_problem(data_args.min_pixels, data_args.max_pixels):
        return problem
    if data_args.max_len < 1:
        return f"--max_len {data_args.max_len}: give the longest sample in tokens (at least 1)"
    if data_args.epoch_samples is not None and data_args.epoch_samples < 1:
        return (f"--epoch_samples {data_args.epoch_samples}: give at least 1, or leave it out (an epoch is then the "
                f"training shards' samples)")
    if data_args.shuffle_buffer < 0:
        return f"--shuffle_buffer {data_args.shuffle_buffer}: give 0 (no shuffling) or more"
    return None


def check_model(model_args, data_args, args):
    """Exit 2 now if --model_name_or_path cannot be loaded (a typo is one line, not the hub client's traceback), or if
    this run would predict with heads that nothing trained: from a checkpoint that is not a scorer, without training
    here (unless --allow_untrained_heads)."""
    path = model_args.model_name_or_path
    config = load_pretrained("AutoConfig", path, "--model_name_or_path")
    if args.do_predict and data_args.train_shards is None and getattr(config, "scorer_trains", None) is None \
            and not model_args.allow_untrained_heads:
        fail(f"--model_name_or_path {path} is not a scorer saved by this script: its heads would predict as they "
             f"start, untrained; give a trained scorer, train one here (--train_shards), or pass "
             f"--allow_untrained_heads for an untrained baseline", every_rank=True)


def settle_flags(model_args, data_args, lora_args, args):
    """Refuse what cannot run (one line, exit 2, before any model loads) and settle what follows from the flags;
    returns (the predict shards' spec or None, the feature cache folder or None)."""
    predict_shards = settle_prediction(data_args, args)
    if problem := target_flags_problem(model_args):
        fail(problem)
    if problem := value_flags_problem(model_args, data_args, args):
        fail(problem, every_rank=True)  # flags alone: every rank meets it at the same point, rank 0 says it
    if data_args.train_shards is None and data_args.eval_shards is None and not args.do_predict:
        fail("nothing to do: give --train_shards, --eval_shards, --predict_file or --do_predict (or --demo)")
    if args.eval_strategy != "no" and data_args.eval_shards is None:
        fail(f"--eval_strategy {args.eval_strategy.value} needs --eval_shards")
    settle_best_metric(args, eval_metric_directions())
    if lora_args.use_peft and model_args.freeze_backbone:
        fail("--use_peft trains adapters in the backbone, --freeze_backbone only the heads: choose one")
    if loads_on_main_only(args):  # measured under 2 gloo processes: load_state_dict then fails on a size mismatch
        fail("--fsdp with cpu_ram_efficient_loading: accelerate would broadcast rank 0's tensors whole into the "
             "sharded model, but the scorer's fp32 heads are sharded before it (keep_fp32_under_fsdp), so rank 0 "
             "would send one shard of each head where the other ranks wait for all of it; leave the option out",
             every_rank=True)
    if problem := check_flags(args, lora_args):
        fail(problem, every_rank=True)  # every rank meets it at the same point
    if args.deepspeed:
        fail("--deepspeed: DeepSpeed casts the whole model to bf16, the scorer's fp32 heads too; shard the scorer "
             "with --fsdp (configs/scorer-qwen3vl-8b-full-fsdp2-8gpu.yaml)", every_rank=True)
    cache_folder = None if data_args.feature_cache == "none" else data_args.feature_cache
    if cache_folder and data_args.train_shards is not None and not model_args.freeze_backbone:
        fail("--feature_cache keeps a frozen backbone's features: add --freeze_backbone (or --feature_cache none)")
    if cache_folder and args.fsdp:
        fail("--feature_cache with --fsdp: the cache is built with each rank running its own samples, which FSDP's "
             "per-layer gathers cannot do; a frozen backbone needs no --fsdp")
    if data_args.feature_cache is None and model_args.freeze_backbone and not args.fsdp and not args.dry_run:
        cache_folder = os.path.join(args.output_dir, "feature_cache")
    if cache_folder and os.path.exists(cache_folder) and not os.path.isdir(cache_folder):
        fail(f"--feature_cache {cache_folder}: not a folder; give a folder (or none)")
    check_model(model_args, data_args, args)  # after the flags: their problems need no model to find
    if model_args.freeze_backbone:
        args.activation_checkpointing = False  # nothing to recompute: the backbone runs without autograd
    elif args.activation_checkpointing_auto:  # under FSDP its own checkpointing (fsdp_config) replaces the Trainer's
        args.activation_checkpointing = not (args.fsdp and args.fsdp_config.get("activation_checkpointing"))
    return predict_shards, cache_folder


def settle_targets(model, model_args, classes, train_shards, process_index):
    """This run's targets, into the model's config (saves keep them): each value label's standardization and each class
    label's loss weights (`classes`: {class label: its number of classes}); returns a line for the log, or None. A
    scorer that has a standardization keeps it (its head learned those units); else --<label>_mean/--<label>_std, else
    the training labels' mean and standard deviation. Labels are counted (data.label_statistics) only where needed, by
    process 0, and sent to every rank: one reading of the shards, one answer on every node."""
    config, path = model.config, model_args.model_name_or_path
    saved, targets, todo = dict(getattr(config, "scorer_targets", None) or {}), {}, []
    for name in (n for n, kind in LABELS.items() if kind == "value"):
        norm = getattr(model_args, f"{name}_norm", "standardize")
        mean, std = getattr(model_args, f"{name}_mean", None), getattr(model_args, f"{name}_std", None)
        given = None if mean is None else [float(mean), float(std)]
        if name in saved:
            if norm == "none" or given not in (None, saved[name]):
                raise DataError(f"{path}: its {name} head learned {name}s standardized with mean {saved[name][0]:g} "
                                f"and std {saved[name][1]:g}; --{name}_norm none or other statistics would change "
                                f"what its outputs mean: leave those flags out")
            targets[name] = saved[name]
        elif norm == "standardize" and given:
            targets[name] = given
        elif norm == "standardize" and train_shards:
            todo.append(name)
    flags = {name: getattr(model_args, f"{name}_class_weights", "none") for name in CLASS_LABELS}
    counted = None
    if todo or "balanced" in flags.values():
        if not train_shards:
            raise DataError("--type_class_weights balanced counts the training labels: it needs --train_shards")
        try:
            counted = label_statistics(train_shards, classes) if process_index == 0 else None
        except DataError as e:
            counted = str(e)
        wait_for_every_rank()  # as long as process 0 reads: 1M samples on a network disk take minutes
        counted = rank_0s(counted)
        if isinstance(counted, str):
            raise AllRanksError(counted)
    parts = []
    for name in todo:
        n, mean, std = counted[0][name]
        if n == 0:
            raise AllRanksError(f"--train_shards: no sample has a usable '{name}' to standardize by")
        if std == 0:  # every label the same: nothing to scale by
            std = 1.0
        targets[name] = [mean, std]
        parts.append(f"{name} standardized with mean {mean:.6g} and std {std:.6g} (counted over {n} training samples)")
    parts += [f"{name} standardized with mean {m:.6g} and std {s:.6g} (as given{' and saved' if name in saved else ''})"
              for name, (m, s) in targets.items() if name not in todo]
    weights = {}
    for name, flag in flags.items():
        if flag == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            counts = counted[1][name]
            present = [c for c in range(classes[name]) if counts[c]]
            balanced = compute_class_weight("balanced", classes=np.array(present),
                                            y=np.repeat(np.arange(classes[name]), counts))
            weights[name] = [1.0] * classes[name]  # a class no training sample has: no term of the loss to weigh
            for c, w in zip(present, balanced):
                weights[name][c] = float(w)
            shown = [round(w, 4) for w in weights[name]]
            parts.append(f"{name} class weights {shown} (balanced, from counts {counts})")
        elif flag != "none":
            weights[name] = [float(w) for w in flag.split(",")]
            if len(weights[name]) != classes[name]:
                raise DataError(f"--{name}_class_weights: {len(weights[name])} weights for {classes[name]} {name}s "
                                f"(--num_{name}s)")
            parts.append(f"{name} class weights {weights[name]}")
    config.scorer_targets, config.scorer_class_weights = targets or None, weights or None
    return "targets: " + "; ".join(parts) if parts else None


def shard_lists(data_args, predict_shards, do_predict):
    """({split: shard list}, samples an epoch, most images in a training sample, most in an evaluation sample),
    from the flags and the tar headers of local shards: a typo or an empty set exits before any model loads. The
    --predict_file manifest is the predict split's one "shard" (data.ManifestSource)."""
    shards = {"predict": [data_args.predict_file]} if data_args.predict_file is not None else {}
    for name, spec in (("train", data_args.train_shards), ("eval", data_args.eval_shards),
                       ("predict", predict_shards if do_predict else None)):
        if spec is not None:
            try:
                shards[name] = expand_shards(spec, data_args.allow_pipe_shards)
            except DataError as e:
                raise DataError(f"--{name}_shards: {e}") from None
    epoch_samples, most_images = data_args.epoch_samples or 0, None
    if "train" in shards and (not epoch_samples or all(os.path.isfile(s) for s in shards["train"])):
        counted, most_images = count_samples(shards["train"], most_images=True)
        epoch_samples = epoch_samples or counted
    local_eval = "eval" in shards and all(os.path.isfile(s) for s in shards["eval"])
    eval_samples, eval_images = count_samples(shards["eval"], most_images=True) if local_eval else (None, None)
    if eval_samples == 0:  # found now, not at the first evaluation
        raise DataError(f"--eval_shards: {', '.join(shards['eval'])}: no sample in these shards")
    return shards, epoch_samples, most_images, eval_images


def train_and_save(trainer, model, args, stop, skip, save_dtype, epoch_samples):
    """Train (resuming the last complete checkpoint), stop or fail as the callbacks decided, save the model;
    returns (metrics, summary line), or None where --output_dir holds this run, finished (nothing is changed)."""
    resume = checkpoint_to_resume(args)
    if resume and (problem := resume_mismatch(resume, run_record(model, args.world_size))):
        fail(problem, every_rank=True)
    if done := finished_run(args):  # the same command again: nothing to train, nothing to overwrite
        log(done)
        return None
    result = trainer.train(resume_from_checkpoint=resume)
    exit_if_stopped(stop, args)
    exit_if_failed(skip, args, batch=trainer.last_batches)
    trainer.raise_train_error()  # a bad sample met after the last logging step
    # The fp32 masters back in the checkpoint's dtype (heads and adapters stay fp32: small); a save holds the heads
    # (+ adapters) when the backbone is frozen (has adapters), else everything.
    save_final_model(trainer, model, args.output_dir, save_dtype, keep=SAVED_WITH_BASE)
    trainer.save_state()
    per_rank, bad = trainer.gathered_train_bad()
    total = len(bad)
    trained = trainer.state.global_step * args.world_size * args.per_device_train_batch_size \
        * args.gradient_accumulation_steps  # good samples: batches are filled with them
    warn_if_many_bad("training", bad, max(total, min(epoch_samples, trained + total)))  # each sample met once
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
    heads = ", ".join(f"{name} {last.get(f'loss_{name}', 0):.4f}" for name in trainer.loss_names)
    best = best_model_summary(trainer)
    return {**result.metrics, "train_bad_samples": total}, (
        f"trained {trainer.state.global_step} steps, last logged loss {last.get('loss', 0):.4f} ({heads}); bad "
        f"samples skipped {total} (per rank {per_rank}); model saved to {args.output_dir}"
        + (f"; {best}" if best else ""))


def predict_to_file(trainer, cache, shards, path, stream):
    """Predictions for `shards` written to `path`: those the feature cache covers read from it, new ones through
    the backbone (`stream(only)` makes a prediction stream); returns (samples, bad samples)."""
    todo = cache.load_agreed(shards) if cache else shards
    covered = [s for s in shards if s not in todo]
    streams = ([cache.attach(stream(covered))] if covered else []) + ([stream(todo)] if todo else [])
    return trainer.write_predictions(streams, shards, path)


def save_merged(model, processor, save_dtype, args):
    """The adapters merged: one full scorer that from_pretrained loads without the base or peft; its summary line."""
    model.merge_lora()
    to_base_dtype(model, save_dtype, keep=HEADS)
    if args.should_save:
        model.save_pretrained(os.path.join(args.output_dir, "merged"))
        processor.save_pretrained(os.path.join(args.output_dir, "merged"))
    return f"merged model saved to {os.path.join(args.output_dir, 'merged')}"


def main(argv=None):
    start = time.time()
    model_args, data_args, lora_args, args = parse_arguments(HfArgumentParser(ARGUMENTS), argv, demo_args=DEMO_ARGS)
    reduce_every_micro_batch(args)  # with --fsdp: no unsharded gradients held across micro-batches
    if data_args.demo:
        import demo
        prepare_demo(DEMO_DIR, demo.build_scorer_demo, args)
    predict_shards, cache_folder = settle_flags(model_args, data_args, lora_args, args)
    check_output_dir(args.output_dir)
    check_resume_flag(args)
    patient_group()  # for exact_pass's wait: made while every rank is here together, before any loader forks
    if problem := shared_output_problem(args):
        fail(problem, every_rank=True)

    # Data: shard lists now; samples are read and encoded by the loaders. Then the processor and the model.
    try:
        shards, epoch_samples, most_images, eval_images = shard_lists(data_args, predict_shards, args.do_predict)
        manifest = data_args.predict_file and ManifestSource.from_file(data_args.predict_file, data_args.image_root)
        processor = load_pretrained("AutoProcessor", model_args.model_name_or_path, "--model_name_or_path")
        if problem := missing_chat_template(processor, model_args.model_name_or_path):
            raise DataError(problem)
        # The DataLoader workers hand their pixel batches over in /dev/shm: too small, say so now, not hours in. An
        # evaluation's workers fill theirs while the training loader's still hold their prefetched batches.
        def batch_bytes(batch_size, images=None):
            return batch_size * loader_sample_bytes(data_args.max_len, processor.image_processor, images,
                                                    data_args.max_pixels)
        loader_shm = check_loader_shm(args, (batch_bytes(args.per_device_train_batch_size, most_images)
                                             if "train" in shards else 0)
                                      + (batch_bytes(args.per_device_eval_batch_size, eval_images)
                                         if "eval" in shards or "predict" in shards else 0))
        set_seed(args.seed)  # new heads start the same way in every run with this seed
        model = load_scorer(model_args, load_dtype(args), lora_args, meta=args.dry_run, device=load_device(args))
        save_dtype = checkpoint_dtype(model_args.model_name_or_path)
    except DataError as e:
        fail(e)
    if getattr(model.config, "scorer_lora", None) and not lora_args.use_peft and "train" in shards:
        fail(f"{model_args.model_name_or_path}: a LoRA scorer (adapters + heads); train it further with --use_peft")
    classes = {name: getattr(model.config, f"num_{name}s") for name in CLASS_LABELS}
    try:  # the same verdict on every rank: from the config, the flags and what process 0 counted
        if line := settle_targets(model, model_args, classes, shards.get("train"), args.process_index):
            log(line)
    except DataError as e:
        fail(e, every_rank=True)

    # Your data: each sample is checked (collate.parse_vl_sample: the json fields of collate.LABELS, image order) and
    # encoded (collate.encode_vl_example) by VLEncoder, in the DataLoader workers.
    def stream(name, batch_size, bucketed=False, only=None, **kw):
        encoder = VLEncoder(processor, classes, name != "predict", data_args.min_pixels, data_args.max_pixels,
                            data_args.max_len)
        s = ShardStream(only or shards[name], encoder, batch_size, processor.tokenizer.pad_token_id,
                        args.process_index, args.world_size,
                        stop_at_bad=data_args.on_bad_sample == "error" and name != "train", seed=args.seed,
                        length_of=encoder.length if bucketed else None, **kw)
        return manifest.attach(s) if manifest and name == "predict" else s  # --predict_file: its rows, read alike

    train_stream = eval_stream = None
    stop = GracefulStop()  # SIGTERM / SIGINT: a checkpoint at the step every rank agrees on, then exit 143 / 130
    skip = SkipNonFinite(args.max_bad_steps)  # a NaN/inf gradient: no update; too many in a row: save, exit 2
    callbacks = [stop, skip, MarkComplete(), *early_stopping(args)]
    if "train" in shards:
        accumulation = args.gradient_accumulation_steps
        steps, total = optimizer_steps(epoch_samples, args)
        fit_warmup(args, total)
        train_stream = stream("train", args.per_device_train_batch_size, batches_per_epoch=steps * accumulation,
                              shuffle_buffer=data_args.shuffle_buffer, bucketed=data_args.bucket_by_length)
        callbacks.append(_SetStreamEpoch(train_stream, steps))
        log(f"data: {len(shards['train'])} training shards, an epoch is {epoch_samples} samples = {steps} steps "
            f"of {args.world_size} x {args.per_device_train_batch_size} x {accumulation}")
    if "eval" in shards:
        eval_stream = stream("eval", args.per_device_eval_batch_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {trainable:,} trained "
        f"({model.config.scorer_trains})")
    optimizer = use_precision_policy(model, args)  # trainable -> fp32 masters (training_plan.py)
    keep_fp32_under_fsdp([model.head(name) for name in LABELS], args)  # with --fsdp: heads compute in fp32
    lora = getattr(model.config, "scorer_lora", None)
    memory_plan(model, args, 0 if lora else lora_parameter_count(
        model.model, lora_settings(model.model, lora_args, "language_model")), loader_shm=loader_shm)
    if args.dry_run:
        try:
            return dry_run_plan({name: stream(name, args.per_device_eval_batch_size) for name in shards},
                                epoch_samples, model.config.image_token_id, data_args.on_bad_sample, args)
        except DataError as e:
            fail(e, every_rank=isinstance(e, AllRanksError))

    trainer = ScorerTrainer(model=model, args=args, train_dataset=train_stream, eval_dataset=eval_stream,
                            processing_class=processor, callbacks=callbacks, head_lr=args.head_lr,
                            on_bad_sample=data_args.on_bad_sample, optimizer_cls_and_kwargs=optimizer)
    use_fsdp_precision(trainer, args)  # with --fsdp: bf16 compute, fp32 gradient reduction, outputs as computed

    # Feature cache (frozen backbone): each training and evaluation sample's pooled state computed once, by exact
    # passes over every rank; the streams then read it and only the heads run.
    cache = cache_folder and open_feature_cache(
        cache_folder, feature_settings(model, processor, model_args, data_args,
                                       f"{load_dtype(args)}, bf16 {args.bf16}, fp16 {args.fp16}", classes),
        list(dict.fromkeys(shards.get("train", []) + shards.get("eval", []))),
        lambda chunk, desc: trainer.exact_pass(stream("eval", args.per_device_eval_batch_size, bucketed=True,
                                                      only=chunk), features=True, desc=desc),
        writer=args.process_index == 0)
    for s, split in ((train_stream, "training"), (eval_stream, "evaluation")):
        if cache and s is not None:
            cache.attach(s)
            log(f"feature cache: {cache_folder}: {split} reads the backbone's features from it")

    # Run: train, evaluate, predict. A bad sample in `error` mode stops every rank together (AllRanksError).
    metrics, summary = {}, []
    try:
        if train_stream is not None:
            if (trained := train_and_save(trainer, model, args, stop, skip, save_dtype, epoch_samples)) is None:
                leave_process_group()
                return None
            trained, line = trained
            metrics.update(trained)
            summary.append(line)
        if eval_stream is not None:
            metrics.update(final_evaluation(trainer))
            trainer.save_metrics("eval", {**{k: v for k, v in metrics.items() if k.startswith("eval_")},
                                          **trainer.eval_details})  # eval_results.json
            summary.append("eval: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()
                                                  if k.startswith("eval_") and k != "eval_runtime"))
        if train_stream is not None and args.should_save and (
                curves := write_training_curves(trainer.state.log_history, args.output_dir)):
            summary.append(f"training curves in {curves}")
        if eval_stream is not None and args.should_save and (report := write_eval_report(trainer.eval_rows,
                                                                                         args.output_dir)):
            summary.append(f"evaluation report in {report}")
        if "predict" in shards:
            path = data_args.predict_output or os.path.join(args.output_dir, "predictions.jsonl")
            n, bad = predict_to_file(trainer, cache, shards["predict"], path,
                                     lambda only: stream("predict", args.per_device_eval_batch_size, only=only))
            metrics.update(predict_samples=n, predict_bad_samples=bad)
            summary.append(f"predictions for {n} samples written to {path} ({bad} bad samples skipped)")
    except DataError as e:
        fail(e, every_rank=isinstance(e, AllRanksError))
    if lora_args.merge_lora:
        summary.append(save_merged(model, processor, save_dtype, args))
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)  # all_results.json
    trainer.metrics = metrics  # for callers of main()
    log(f"summary ({time.time() - start:.1f}s):\n  " + "\n  ".join(summary))
    leave_process_group()  # every rank is here: leave together
    return trainer


if __name__ == "__main__":
    main()
