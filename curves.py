"""Pictures of a run: the training curves from the Trainer's log history, and the scorer's evaluation report from
the samples of its final evaluation.

`training_curves.png`, panels: the training loss with any per-part losses (`loss_score`, `loss_type`, ...) and the
evaluation losses against the step; the learning rate; then one panel per other evaluation metric (Pearson,
accuracy, ...). The same series reach TensorBoard with `--report_to tensorboard`: the Trainer's own callback logs
every key of each log.
`eval_report.png`, a row of two panels per label of `collate.LABELS`: a value label's predictions against the true
values (with y = x) and its residuals; a class label's confusion matrix and its reliability diagram, with the
expected calibration error (`calibration`, which the scorer's metrics report too).
matplotlib's object API (no pyplot, no display, no service): safe on a headless node and in a process that keeps
running.
"""

import math
import os

import numpy as np

from collate import LABELS

FILE = "training_curves.png"
REPORT = "eval_report.png"
# Equal-width confidence bins of the reliability diagram and the ECE: 10, the common choice, keeps a few samples in
# the occupied bins of a small evaluation set (15 as in Guo et al. 2017 splits them thinner for no other gain).
BINS = 10
# Points drawn per scatter at most: a million-sample evaluation would take minutes and megabytes to draw, and the
# cloud reads the same from a fixed random subset (the metrics and the other panels use every sample).
MAX_POINTS = 20_000
# Bookkeeping the Trainer logs along with the metrics: not curves anyone reads.
NOT_CURVES = ("runtime", "per_second", "samples", "epoch", "step", "num_input_tokens_seen", "skipped_steps",
              "grad_norm", "total_flos")


def series(log_history):
    """{name: ([steps], [values])} of every numeric key in the log history (train and eval logs alike)."""
    out = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(entry.get("step", 0))
            values.append(float(value))
    return out


def panels(data):
    """[(title, [keys])] of the picture for `series` data: the losses together, the learning rate, then each other
    evaluation metric alone (their scales differ)."""
    losses = [k for k in data if k in ("loss", "eval_loss") or k.startswith(("loss_", "eval_loss_"))]
    metrics = sorted(k for k in data if k.startswith("eval_") and k not in losses
                     and not any(k.endswith(part) for part in NOT_CURVES))
    return (([("loss", losses)] if losses else []) + ([("learning rate", ["learning_rate"])]
                                                      if "learning_rate" in data else [])
            + [(k[len("eval_"):].replace("_", " "), [k]) for k in metrics])


def write_training_curves(log_history, output_dir):
    """Draw the curves of `log_history` into OUTPUT_DIR/training_curves.png and return its path (None: nothing was
    logged). Call on the process that saves (rank 0)."""
    from matplotlib.figure import Figure

    data = series(log_history)
    chosen = panels(data)
    if not chosen:
        return None
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows), layout="constrained")
    for i, (title, keys) in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in keys:
            steps, values = data[key]
            evaluation = key.startswith("eval_")
            ax.plot(steps, values, marker="o" if evaluation else None, linestyle="--" if evaluation else "-",
                    markersize=4, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "loss" and all(v > 0 for key in keys for v in data[key][1]):
            ax.set_yscale("log")  # a loss falls by orders of magnitude: the late steps stay readable
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    path = os.path.join(output_dir, FILE)
    fig.savefig(path, dpi=100)
    return path


def calibration(probs, labels, bins=BINS):
    """Top-label calibration of class probabilities `probs` (samples x classes) against the true classes `labels`:
    (expected calibration error, reliability bins {"edges", "count", "confidence", "accuracy"}). A sample's
    confidence is its top probability, right when that class is its label; bin i holds the confidences in
    (edges[i], edges[i + 1]]; ECE = sum over bins of count / samples x |accuracy - mean confidence| (an empty bin
    adds nothing; its mean confidence and accuracy are NaN). numpy: scikit-learn's calibration_curve is for one
    binary class and has no ECE."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, right = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):  # an empty bin: 0 / 0, NaN on purpose
        mean_confidence = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, right, minlength=bins) / count
    occupied = count > 0
    ece = float(np.sum(count[occupied] / len(labels) * np.abs(accuracy[occupied] - mean_confidence[occupied])))
    return ece, {"edges": edges.tolist(), "count": count.tolist(), "confidence": mean_confidence.tolist(),
                 "accuracy": accuracy.tolist()}


def write_eval_report(rows, output_dir):
    """Draw the evaluation of `rows` (the scorer's evaluated samples: dicts with `heads` and `labels`, each
    {label: value, or a class label's logits}) into OUTPUT_DIR/eval_report.png and return its path (None: no
    sample). Call on the process that saves (rank 0)."""
    from matplotlib.figure import Figure
    from scipy.special import softmax
    from sklearn.metrics import confusion_matrix

    if not rows:
        return None
    n = len(rows)
    shown = (np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False)) if n > MAX_POINTS
             else np.arange(n))
    fig = Figure(figsize=(10, 4.2 * len(LABELS)), layout="constrained")
    axes = fig.subplots(len(LABELS), 2, squeeze=False)
    for (left, right), (name, kind) in zip(axes, LABELS.items()):
        out = np.array([r["heads"][name] for r in rows], dtype=np.float64)
        label = np.array([r["labels"][name] for r in rows], dtype=np.float64 if kind == "value" else np.int64)
        if kind == "value":
            points = f"{len(shown):,} of {n:,} samples (a fixed random subset)" if n > MAX_POINTS else f"{n:,} samples"
            true, predicted = label[shown], out[shown]
            left.scatter(true, predicted, s=6, alpha=0.5)
            low, high = min(true.min(), predicted.min()), max(true.max(), predicted.max())
            left.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
            left.set(title=f"{name}: predicted vs true, {points}", xlabel=f"true {name}", ylabel=f"predicted {name}")
            left.legend(fontsize=8)
            right.scatter(true, predicted - true, s=6, alpha=0.5)
            right.axhline(0, color="black", linewidth=1)
            right.set(title=f"{name}: residuals", xlabel=f"true {name}", ylabel="predicted - true")
            for ax in (left, right):
                ax.grid(alpha=0.3)
        else:
            classes = out.shape[1]
            matrix = confusion_matrix(label, out.argmax(axis=1), labels=list(range(classes)))
            image = left.imshow(matrix, cmap="Blues")
            fig.colorbar(image, ax=left, shrink=0.8)
            if classes <= 20:  # beyond, the numbers no longer fit their cells: the colours say it
                left.set(xticks=range(classes), yticks=range(classes))
                for (i, j), count in np.ndenumerate(matrix):
                    left.text(j, i, str(count), ha="center", va="center", fontsize=8,
                              color="white" if count > matrix.max() / 2 else "black")
            left.set(title=f"{name}: confusion matrix ({n:,} samples)", xlabel=f"predicted {name}",
                     ylabel=f"true {name}")
            ece, bins = calibration(softmax(out, axis=1), label)
            edges, accuracy = np.array(bins["edges"]), np.nan_to_num(bins["accuracy"])
            right.bar(edges[:-1], accuracy, width=np.diff(edges), align="edge", edgecolor="black", alpha=0.6,
                      label="accuracy in bin")
            right.plot(bins["confidence"], bins["accuracy"], "o", color="tab:red", clip_on=False,
                       label="(mean confidence, accuracy)")
            right.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="calibrated")
            right.set(title=f"{name}: reliability, ECE {ece:.3f} ({len(bins['count'])} bins)", xlim=(0, 1),
                      ylim=(0, 1), xlabel=f"confidence (top {name} probability)", ylabel="accuracy")
            right.legend(fontsize=8, loc="upper left")
    path = os.path.join(output_dir, REPORT)
    fig.savefig(path, dpi=100)
    return path
