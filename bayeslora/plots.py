"""Reliability diagram with a confidence histogram (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bayeslora.files import write_atomically  # noqa: E402
from bayeslora.metrics import ece, reliability_bins  # noqa: E402


def reliability_figure(probs: torch.Tensor, labels: torch.Tensor, title: str) -> plt.Figure:
    """Top: accuracy and mean confidence per confidence bin, against the diagonal of perfect calibration.
    Bottom: how many questions fall in each bin. Bins as in `metrics` (15 equal-width, last includes 1.0)."""
    bins = reliability_bins(probs, labels)
    edges = bins["edges"].numpy()
    left, width = edges[:-1], edges[1] - edges[0]
    occupied = (bins["count"] > 0).numpy()
    accuracy, confidence = bins["accuracy"].numpy(), bins["confidence"].numpy()

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar(left[occupied], accuracy[occupied], width=width, align="edge", edgecolor="black", label="accuracy")
    top.bar(
        left[occupied],
        confidence[occupied],
        width=width,
        align="edge",
        fill=False,
        edgecolor="tab:red",
        hatch="//",
        label="mean confidence",
    )
    top.set_ylabel("accuracy in bin")
    top.set_ylim(0, 1)
    top.set_title(f"{title}\nECE {100 * ece(probs, labels):.2f}%  (n = {len(labels)})")
    top.legend(loc="upper left")
    bottom.bar(left, bins["count"].numpy(), width=width, align="edge", edgecolor="black", color="tab:grey")
    bottom.set_xlabel("top-label confidence")
    bottom.set_ylabel("questions")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    return figure


def save_reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str) -> None:
    """Write the figure as PNG, atomically."""
    figure = reliability_figure(probs, labels, title)
    png = io.BytesIO()
    try:
        figure.savefig(png, format="png", dpi=120)
    finally:
        plt.close(figure)
    write_atomically(path, png.getvalue())
