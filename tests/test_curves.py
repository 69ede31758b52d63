"""The pictures of a run: which series the training curves draw, from a log history as the Trainer keeps it; the
evaluation report and the calibration it draws, from evaluated samples as the scorer keeps them."""

import math

import pytest

import curves

# A scorer-like log history: two training logs, two evaluations, the end-of-training summary.
HISTORY = [
    {"loss": 3.0, "loss_score": 2.0, "loss_type": 1.0, "learning_rate": 1e-3, "grad_norm": 2.0, "epoch": 0.5,
     "step": 2, "skipped_steps": 0},
    {"eval_loss": 2.5, "eval_loss_score": 1.6, "eval_loss_type": 0.9, "eval_score_pearson": 0.3,
     "eval_type_accuracy": 0.5, "eval_runtime": 0.4, "eval_samples": 14, "eval_bad_samples": 0, "step": 2},
    {"loss": 2.0, "loss_score": 1.2, "loss_type": 0.8, "learning_rate": 5e-4, "grad_norm": 1.0, "epoch": 1.0,
     "step": 4, "skipped_steps": 0},
    {"eval_loss": 1.5, "eval_loss_score": 1.0, "eval_loss_type": 0.5, "eval_score_pearson": 0.9,
     "eval_type_accuracy": 1.0, "eval_runtime": 0.4, "eval_samples": 14, "eval_bad_samples": 0, "step": 4},
    {"train_runtime": 9.0, "train_loss": 2.5, "total_flos": 0.0, "step": 4, "is_done": True, "note": "text"},
]


class TestSeries:
    def test_every_numeric_key_against_its_steps(self):
        data = curves.series(HISTORY)
        assert data["loss_score"] == ([2, 4], [2.0, 1.2])
        assert data["eval_score_pearson"] == ([2, 4], [0.3, 0.9])
        assert "is_done" not in data and "note" not in data and "step" not in data  # booleans, text, the x axis


class TestPanels:
    def test_losses_together_then_learning_rate_then_each_eval_metric(self):
        assert curves.panels(curves.series(HISTORY)) == [
            ("loss", ["loss", "loss_score", "loss_type", "eval_loss", "eval_loss_score", "eval_loss_type"]),
            ("learning rate", ["learning_rate"]),
            ("score pearson", ["eval_score_pearson"]),
            ("type accuracy", ["eval_type_accuracy"]),
        ]


class TestWrite:
    def test_a_png_in_the_output_dir(self, tmp_path):
        path = curves.write_training_curves(HISTORY, tmp_path)
        assert path == str(tmp_path / "training_curves.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    def test_nothing_logged_nothing_drawn(self, tmp_path):
        assert curves.write_training_curves([{"train_runtime": 1.0, "step": 0}], tmp_path) is None
        assert not (tmp_path / "training_curves.png").exists()


class TestCalibration:
    def test_perfectly_calibrated_is_zero(self):
        # four samples at 0.75 confidence, three right: the bin's accuracy is its confidence
        ece, bins = curves.calibration([[0.75, 0.25]] * 4, [0, 0, 0, 1])
        assert ece == 0.0
        assert bins["count"] == [0, 0, 0, 0, 0, 0, 0, 4, 0, 0]
        assert bins["confidence"][7] == 0.75 and bins["accuracy"][7] == 0.75

    def test_two_occupied_bins_weighted_by_their_counts(self):
        # (0.9, 1]: confidence .95 twice, one right (accuracy .5); (0.6, 0.7]: .65 once, right (accuracy 1)
        ece, bins = curves.calibration([[0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.3, 0.05, 0.65]], [0, 1, 2])
        assert ece == pytest.approx(2 / 3 * abs(0.5 - 0.95) + 1 / 3 * abs(1.0 - 0.65))
        assert bins["edges"] == pytest.approx([i / 10 for i in range(11)])
        assert bins["count"] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 2]
        assert bins["confidence"][9] == pytest.approx(0.95) and bins["accuracy"][9] == 0.5
        assert bins["accuracy"][6] == 1.0
        assert math.isnan(bins["accuracy"][0]) and math.isnan(bins["confidence"][0])  # empty: no number made up


def report_rows(n, classes=3, seen=(0, 1)):
    """`n` evaluated samples as the scorer keeps them: a score and type logits; the labels cycle through `seen`."""
    return [{"heads": {"score": 0.5 * i + 1.0, "type": [float(c == i % classes) for c in range(classes)]},
             "labels": {"score": float(i), "type": seen[i % len(seen)]}} for i in range(n)]


class TestEvalReport:
    @pytest.mark.parametrize("rows", [report_rows(12), report_rows(1)], ids=["type-2-never-occurs", "one-sample"])
    def test_a_png_of_one_row_of_panels_per_label(self, tmp_path, rows):
        from PIL import Image

        path = curves.write_eval_report(rows, tmp_path)
        assert path == str(tmp_path / "eval_report.png")
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.size == (1000, 840)  # 10 x 4.2 inches per label at 100 dpi

    def test_no_sample_no_picture(self, tmp_path):
        assert curves.write_eval_report([], tmp_path) is None
        assert not (tmp_path / "eval_report.png").exists()

    def test_a_large_evaluation_draws_a_fixed_subset_of_points(self, tmp_path, monkeypatch):
        from matplotlib.axes import Axes

        drawn = []
        scatter = Axes.scatter
        monkeypatch.setattr(Axes, "scatter", lambda ax, x, y, **kw: drawn.append(list(x)) or scatter(ax, x, y, **kw))
        monkeypatch.setattr(curves, "MAX_POINTS", 5)
        curves.write_eval_report(report_rows(40), tmp_path)
        curves.write_eval_report(report_rows(40), tmp_path)
        assert [len(x) for x in drawn] == [5, 5, 5, 5]  # predicted vs true, residuals; twice
        assert drawn[0] == drawn[1] == drawn[2] and len(set(drawn[0])) == 5  # the same 5 distinct samples each time
