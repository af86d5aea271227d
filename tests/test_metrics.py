"""Metrics against hand-computed cases and against torchmetrics."""

import json
import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from bayeslora.metrics import accuracy, all_metrics, brier, ece, error_detection_auroc, mce, nll, reliability_bins

# three questions, hand-checked below
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.6, 0.0], [0.5, 0.25, 0.25]])
LABELS = torch.tensor([0, 0, 2])


def test_hand_computed_values():
    # predictions 0, 1, 0 -> one correct of three
    assert accuracy(PROBS, LABELS) == pytest.approx(1 / 3)
    assert nll(PROBS, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.25)) / 3)
    brier_terms = [0.3**2 + 0.2**2 + 0.1**2, 0.6**2 + 0.6**2 + 0.0, 0.5**2 + 0.25**2 + 0.75**2]
    assert brier(PROBS, LABELS) == pytest.approx(sum(brier_terms) / 3)
    # confidences 0.7 (bin [10/15, 11/15), correct), 0.6 ([9/15, 10/15), wrong), 0.5 ([7/15, 8/15), wrong)
    assert ece(PROBS, LABELS) == pytest.approx((0.3 + 0.6 + 0.5) / 3)
    assert mce(PROBS, LABELS) == pytest.approx(0.6)


def test_bins_pool_questions_of_equal_confidence_band():
    probs = torch.tensor([[0.9, 0.1], [0.92, 0.08], [0.05, 0.95]])  # all in [13/15, 14/15) or [14/15, 1]
    labels = torch.tensor([0, 1, 1])
    bins = reliability_bins(probs, labels)
    assert bins["count"].tolist()[13:] == [2, 1] and bins["count"].sum() == 3
    assert bins["confidence"][13].item() == pytest.approx(0.91) and bins["accuracy"][13].item() == pytest.approx(0.5)
    assert ece(probs, labels) == pytest.approx(2 / 3 * 0.41 + 1 / 3 * 0.05)


def test_confidence_one_joins_the_last_bin_where_torchmetrics_opens_a_sixteenth():
    """Documented disagreement: torchmetrics bins conf = 1.0 on its own (an extra bin past 1.0);
    the protocol puts it into the last bin [14/15, 1]."""
    probs = torch.tensor([[1.0, 0.0], [0.95, 0.05]])
    labels = torch.tensor([1, 0])  # the certain prediction is wrong, the 0.95 one right
    assert ece(probs, labels) == pytest.approx(abs(0.5 - 0.975))
    reference = MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")(probs, labels).item()
    assert reference == pytest.approx(0.5 * 1.0 + 0.5 * 0.05)
    assert ece(probs, labels) != pytest.approx(reference)


def test_agrees_with_torchmetrics_on_random_predictions_below_confidence_one():
    generator = torch.Generator().manual_seed(0)
    for n_choices in (2, 4, 5):
        probs = (3 * torch.randn(500, n_choices, generator=generator)).softmax(-1)
        labels = torch.randint(0, n_choices, (500,), generator=generator)
        assert probs.max() < 1.0
        for norm, ours in (("l1", ece), ("max", mce)):
            reference = MulticlassCalibrationError(num_classes=n_choices, n_bins=15, norm=norm)(probs, labels)
            assert ours(probs, labels) == pytest.approx(reference.item(), abs=1e-6)
        reference_accuracy = MulticlassAccuracy(num_classes=n_choices, average="micro")(probs, labels)
        assert accuracy(probs, labels) == pytest.approx(reference_accuracy.item(), abs=1e-6)
        reference_nll = torch.nn.functional.nll_loss(probs.log(), labels)
        assert nll(probs, labels) == pytest.approx(reference_nll.item(), rel=1e-5)


def test_padded_choices_with_zero_probability_do_not_change_anything():
    padded = torch.cat([PROBS, torch.zeros(3, 2)], dim=1)
    assert all_metrics(padded, LABELS) == pytest.approx(all_metrics(PROBS, LABELS))


def test_all_metrics_reports_percent_and_nats():
    values = all_metrics(PROBS, LABELS)
    assert values["accuracy_percent"] == pytest.approx(100 / 3)
    assert values["ece_percent"] == pytest.approx(100 * 1.4 / 3)
    assert values["mce_percent"] == pytest.approx(60)
    assert values["nll"] == pytest.approx(nll(PROBS, LABELS))


def test_read_predictions_pools_files_and_pads_fewer_choices_with_zero(tmp_path):
    from bayeslora.evaluate import read_predictions

    (tmp_path / "a.jsonl").write_text(json.dumps({"gold": 1, "probabilities": [0.25, 0.75]}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"gold": 2, "probabilities": [0.1, 0.2, 0.7]}) + "\n")
    probs, labels = read_predictions([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert torch.allclose(probs, torch.tensor([[0.25, 0.75, 0.0], [0.1, 0.2, 0.7]]))
    assert labels.tolist() == [1, 2]


def test_error_detection_auroc_counts_the_pairs_an_uncertainty_orders_right():
    uncertainty = torch.tensor([0.9, 0.3, 0.5, 0.3, 0.1])
    wrong = torch.tensor([True, True, False, False, False])
    # wrong 0.9 beats all 3 right ones; wrong 0.3 beats 0.1, ties 0.3 (half) and loses to 0.5: 4.5 of 6 pairs
    assert error_detection_auroc(uncertainty, wrong) == pytest.approx(4.5 / 6)
    assert error_detection_auroc(-uncertainty, wrong) == pytest.approx(1.5 / 6)
    with pytest.raises(ValueError, match="both wrongly and rightly"):
        error_detection_auroc(uncertainty, torch.ones(5, dtype=torch.bool))


def test_error_detection_auroc_matches_the_pair_count_on_random_scores():
    generator = torch.Generator().manual_seed(0)
    uncertainty = torch.randint(0, 20, (300,), generator=generator).double()  # many ties
    wrong = torch.rand(300, generator=generator) < 0.4
    above = (uncertainty[wrong][:, None] > uncertainty[~wrong][None, :]).double()
    tied = (uncertainty[wrong][:, None] == uncertainty[~wrong][None, :]).double()
    assert error_detection_auroc(uncertainty, wrong) == pytest.approx((above + tied / 2).mean().item(), abs=1e-6)
