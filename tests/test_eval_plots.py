"""The reliability diagram draws the metrics' bins."""

import torch

from bayeslora.metrics import reliability_bins
from bayeslora.plots import reliability_figure, save_reliability_diagram


def test_bars_show_accuracy_confidence_and_counts_of_the_bins(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.92, 0.08], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 1])
    bins = reliability_bins(probs, labels)
    figure = reliability_figure(probs, labels, "test")
    top, bottom = figure.axes
    occupied = (bins["count"] > 0).nonzero().squeeze(1)
    accuracy_bars, confidence_bars = top.patches[: len(occupied)], top.patches[len(occupied) :]
    assert [bar.get_height() for bar in accuracy_bars] == bins["accuracy"][occupied].tolist()
    assert [round(bar.get_height(), 9) for bar in confidence_bars] == [round(v, 9) for v in bins["confidence"][occupied].tolist()]
    assert [bar.get_height() for bar in bottom.patches] == bins["count"].tolist()
    save_reliability_diagram(probs, labels, tmp_path / "reliability.png", "test")
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert [path.name for path in tmp_path.iterdir()] == ["reliability.png"]
