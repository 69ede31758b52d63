"""The training-curves picture: which series it draws, from a log history as the Trainer keeps it."""

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
