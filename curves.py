"""Training curves: one picture of a run, drawn from the Trainer's log history at the end of training.

Panels: the training loss with any per-part losses (`loss_score`, `loss_type`, ...) and the evaluation losses
against the step; the learning rate; then one panel per other evaluation metric (Pearson, accuracy, ...). The same
series reach TensorBoard with `--report_to tensorboard`: the Trainer's own callback logs every key of each log.
matplotlib's object API (no pyplot, no display, no service): safe on a headless node and in a process that keeps
running.
"""

import math
import os

FILE = "training_curves.png"
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
