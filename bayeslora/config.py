"""`BayesLoraConfig`: peft's LoRA settings plus the Bayesian ones, validated when built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def names_module(name: str, key: str) -> bool:
    """Whether a module name from a config (`q_proj`) names the module at dotted path `key`, as in peft."""
    return key == name or key.endswith("." + name)


#: The published constants (the paper and its released code), for reproduction: at these the posterior
#: barely moves the model and its draws do not disagree (docs/method.md, "Defaults"). The released
#: LLaMA-2-7B setting also makes only q_proj and lm_head Bayesian (`bayesian_modules`).
PAPER_CONSTANTS = {"prior_sd": 0.1, "lambda_init": 1e-3, "max_lambda": 0.03, "sd_init": 1e-3, "max_sd_u": 0.1}


@dataclass
class BayesLoraConfig(LoraConfig):
    """LoRA whose A and B factors on `bayesian_modules` are inducing-weight factors.

    The paper's structure (a 9 x 9 whitened inducing matrix per factor, a row-wise
    masked autoregressive flow of hidden width 16 with two residual blocks) with
    scales at which the posterior moves the model and its draws disagree
    (docs/method.md, "Defaults", has the measurements): prior_sd 1.0 (prior scale
    prior_sd / sqrt(d_in), the authors' later setting), lambda 1, where the
    conditional posterior of W given U is the prior's and its KL is 0 (the conditional
    KL pushes lambda up to its cap whatever the data, so a smaller cap only fixes the
    noise by hand, and starting below it wastes steps), q0 standard deviation initialised at 0.5
    and capped at 1.0, the prior's own scale. `BayesLoraConfig.paper(...)` builds
    the published constants instead.
    """

    bayesian_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Targets whose LoRA factors are Bayesian (names or a regex, as target_modules); None = all."},
    )
    inducing_rows: int = field(default=9, metadata={"help": "Rows m_r of each factor's inducing matrix."})
    inducing_cols: int = field(default=9, metadata={"help": "Columns m_c of each factor's inducing matrix."})
    prior_sd: float = field(default=1.0, metadata={"help": "Prior scale numerator: sigma_p = prior_sd / sqrt(d_in)."})
    lambda_init: float = field(default=1.0, metadata={"help": "Initial conditional noise scale lambda."})
    max_lambda: float = field(default=1.0, metadata={"help": "lambda is clamped at this value."})
    sd_init: float = field(default=0.5, metadata={"help": "Initial standard deviation of q0 over the inducing matrix."})
    max_sd_u: float = field(default=1.0, metadata={"help": "q0's standard deviations are clamped at this value."})
    flow: bool = field(default=True, metadata={"help": "Push q0 through a row-wise masked autoregressive flow."})
    flow_hidden: int = field(default=16, metadata={"help": "Hidden width of the flow's conditioner."})
    flow_blocks: int = field(default=2, metadata={"help": "Residual blocks in the flow's conditioner."})
    learn_prior_lambda: bool = field(
        default=False,
        metadata={"help": "Empirical Bayes on the conditional prior's scale: it follows lambda, the conditional KL is 0 "
                          "and the data alone set lambda (an ablation; docs/method.md, \"Defaults\")."},
    )
    noise_scales: bool = field(
        default=False,
        metadata={"help": "Learn a scale of the conditional noise per row and per column of each factor, with their "
                          "exact KL, so the data choose where the draws spread (docs/method.md, \"Noise scales\")."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("inducing_rows", "inducing_cols", "flow_hidden"):
            if not _is_integer(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _is_integer(self.flow_blocks) or self.flow_blocks < 0:
            raise ValueError(f"flow_blocks must be a non-negative integer, got {self.flow_blocks!r}")
        for name in ("prior_sd", "lambda_init", "max_lambda", "sd_init", "max_sd_u"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("flow", "learn_prior_lambda", "noise_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bayesian_modules is not None and not isinstance(self.bayesian_modules, (str, list, tuple, set)):
            raise ValueError(f"bayesian_modules must be a name pattern or a list of names, got {self.bayesian_modules!r}")
        if self.lambda_init > self.max_lambda:
            raise ValueError(f"lambda_init={self.lambda_init} exceeds max_lambda={self.max_lambda}")
        if self.sd_init > self.max_sd_u:
            raise ValueError(f"sd_init={self.sd_init} exceeds max_sd_u={self.max_sd_u}")
        if isinstance(self.bayesian_modules, (list, tuple, set)):
            self.bayesian_modules = list(self.bayesian_modules)
            if isinstance(self.target_modules, (set, list, tuple)):
                outside = sorted(set(self.bayesian_modules) - set(self.target_modules))
                if outside:
                    raise ValueError(f"bayesian_modules {outside} are not in target_modules {sorted(self.target_modules)}")
        # peft's extension point for custom LoRA layers: every nn.Linear target (bitsandbytes' quantised ones
        # included) gets our layer class, which keeps plain LoRA factors on non-Bayesian targets.
        from bayeslora.layer import custom_layers

        self._register_custom_module(custom_layers())

    @classmethod
    def paper(cls, **settings) -> "BayesLoraConfig":
        """A config with the published constants (`PAPER_CONSTANTS`); other settings as given."""
        return cls(**{**PAPER_CONSTANTS, **settings})

    def is_bayesian_module(self, key: str) -> bool:
        """Whether the module at dotted path `key` (a LoRA target) gets Bayesian factors."""
        if self.bayesian_modules is None:
            return True
        if isinstance(self.bayesian_modules, str):
            return re.fullmatch(self.bayesian_modules, key) is not None
        return any(names_module(name, key) for name in self.bayesian_modules)

    def factor_settings(self) -> dict:
        """Keyword arguments of `InducingFactor` taken from this config."""
        return {
            "inducing_rows": self.inducing_rows,
            "inducing_cols": self.inducing_cols,
            "prior_sd": self.prior_sd,
            "lambda_init": self.lambda_init,
            "max_lambda": self.max_lambda,
            "sd_init": self.sd_init,
            "max_sd_u": self.max_sd_u,
            "flow": self.flow,
            "flow_hidden": self.flow_hidden,
            "flow_blocks": self.flow_blocks,
            "learn_prior_lambda": self.learn_prior_lambda,
            "noise_scales": self.noise_scales,
        }
