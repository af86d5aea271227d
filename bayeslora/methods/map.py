"""MAP: plain LoRA trained with (decoupled AdamW) weight decay.

The "MAP" baseline of Laplace-LoRA (Yang et al., ICLR 2024) and BLoB (Wang et
al., NeurIPS 2024): LoRA with weight decay on the adapter, read as a Gaussian
prior on the LoRA factors. AdamW's decay is decoupled from the adaptive step,
so the correspondence to a fixed prior precision is only approximate; the
released Bayesian-LoRA code uses 0.01-0.03 and we take 0.01 by default
(option `weight_decay`). Laplace, temperature scaling and TFB start from this
adapter.
"""

from __future__ import annotations

from typing import Any, ClassVar

from bayeslora.methods.base import register_method
from bayeslora.methods.mle import MLE


@register_method
class MAP(MLE):
    name: ClassVar[str] = "map"

    def __init__(self, weight_decay: float = 0.01, **options: Any) -> None:
        super().__init__(**options)
        self.weight_decay = weight_decay  # instance value shadows the class default read by the loop


class PostHocMAP(MAP):
    """Base of the methods that fit a trained MAP adapter after training (temperature, Laplace, TFB):
    their training is MAP's, so `compare` reuses the map unit's adapter instead of training it again."""

    post_hoc_of: ClassVar[str | None] = "map"
    needs_run_folder: ClassVar[bool] = True
