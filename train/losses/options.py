"""What each loss is called, says and takes, declared without torch: ``pipeline distill --help`` and the config file
reader see every loss from here, so they never import the loss maths.

A loss is declared once, with :func:`declare` (its ``--loss`` name, a one-line summary for the help, and its
``Options`` dataclass: :class:`KDOptions` or a subclass whose fields are declared with :func:`option`); its
implementation, in a module of this package, is registered under the same name (``base.register``), which takes
the summary and the options from here. DistillConfig inherits :data:`LossOptions`, the option fields of every
declared loss, flat: a field is a ``--flag`` and a config-file key like any other. Field names are global across
losses; two losses share an option by sharing its dataclass (sfkl and srkl share :class:`SkewOptions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass, make_dataclass
from functools import partial
from typing import NamedTuple

from kd_pipeline.config import Group, option
from kd_pipeline.errors import ConfigError

loss_option = partial(option, group=Group.LOSS)

TEMPERATURE_HELP = (
    "Distillation temperature T (every loss): both sides' k+1 bins (the top-k and the tail as one bin, each at "
    "T = 1) become log_softmax(log b / T) and the KD term is scaled by T²; with k = V exactly softmax(z / T). CE on "
    "the true tokens, kl and soft_ce stay at T = 1 (docs/losses.md: Temperature)."
)


@dataclass
class KDOptions:
    """Options every loss takes."""

    temperature: float = loss_option(1.0, TEMPERATURE_HELP)
    ce_weight: float = loss_option(0.0, "Weight w of cross-entropy on the true next token: loss = KD + w·CE.")

    def check(self) -> None:
        """Raise ConfigError naming the option (as its --flag) if a value is out of range."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be a positive number, got {self.temperature}")
        if not (math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise ConfigError(f"--ce-weight must be >= 0, got {self.ce_weight}")


@dataclass
class TAIDOptions(KDOptions):
    taid_t_start: float = loss_option(0.4, "TAID initial interpolation t.")
    taid_t_end: float = loss_option(1.0, "TAID final t.")
    taid_alpha: float = loss_option(5e-4, "TAID adaptive step size α.")
    taid_beta: float = loss_option(0.99, "TAID momentum β of the relative loss change.")

    def check(self) -> None:
        super().check()
        # The schedule owns its rules; it is plain Python, but lives with the TAID loss (which imports torch).
        from kd_pipeline.train.losses.taid import TAIDSchedule

        try:
            TAIDSchedule(self.taid_t_start, self.taid_t_end, self.taid_alpha, self.taid_beta)
        except ValueError as error:
            raise ConfigError(f"--taid-t-start/--taid-t-end/--taid-alpha/--taid-beta: {error}") from None


@dataclass
class JSOptions(KDOptions):
    js_beta: float = loss_option(0.5, "Mixture weight β of the JS divergence (0.5: symmetric).")

    def check(self) -> None:
        super().check()
        if not 0.0 < self.js_beta < 1.0:
            raise ConfigError(f"--js-beta must be in (0, 1), got {self.js_beta}")


@dataclass
class SkewOptions(KDOptions):
    skew_alpha: float = loss_option(0.1, "Skew KL mixing α (DistiLLM) for sfkl/srkl.")

    def check(self) -> None:
        super().check()
        if not 0.0 < self.skew_alpha <= 1.0:
            raise ConfigError(f"--skew-alpha must be in (0, 1], got {self.skew_alpha}")


@dataclass
class ATKDOptions(KDOptions):
    atkd_alpha: float = loss_option(0.2, "ATKD weight of the easy tokens' diversity term.")

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.atkd_alpha <= 1.0:
            raise ConfigError(f"--atkd-alpha must be in [0, 1], got {self.atkd_alpha}")


@dataclass
class ULDOptions(KDOptions):
    uld_weight: float = loss_option(
        1.0,
        "ULD: weight λ of the distillation term, loss = λ·ULD + w·CE (GOLD's uld_distillation_weight; defaults as TRL's "
        "GOLD: λ 1, CE weight 0, T 1; the paper's code uses CE weight 1).",
    )

    def check(self) -> None:
        super().check()
        if not (math.isfinite(self.uld_weight) and self.uld_weight >= 0):
            raise ConfigError(f"--uld-weight must be >= 0, got {self.uld_weight}")


class LossDeclaration(NamedTuple):
    name: str
    summary: str
    Options: type


DECLARED: dict[str, LossDeclaration] = {}


def declare(name: str, summary: str, options: type = KDOptions) -> LossDeclaration:
    """Declare the loss ``name``: ``summary`` is its line in ``--loss``'s help, ``options`` its Options dataclass."""
    if name in DECLARED:
        raise ValueError(f"a loss named {name!r} is declared already")
    if not (is_dataclass(options) and issubclass(options, KDOptions)):
        raise TypeError(f"the options of loss {name!r} must be a dataclass subclassing KDOptions")
    DECLARED[name] = LossDeclaration(name, summary, options)
    return DECLARED[name]


# In --loss's order. The implementations: taid.py, kl.py (fkl ... tvd), atkd.py, uld.py, ce.py.
declare(
    "taid",
    "TAID (Sakana AI): KL to an interpolation of student and teacher, t scheduled up to the teacher",
    TAIDOptions,
)
declare("fkl", "forward KL(p‖q)")
declare("rkl", "reverse KL(q‖p)")
declare("js", "generalized Jensen-Shannon, mixture β·p + (1-β)·q", JSOptions)
declare("sfkl", "DistiLLM skew KL(p ‖ α·p + (1-α)·q)", SkewOptions)
declare("srkl", "DistiLLM skew reverse KL(q ‖ (1-α)·p + α·q)", SkewOptions)
declare("tvd", "total variation distance ½·Σ|p - q|")
declare("atkd", "ATKD (Zhong et al. 2024): target/diversity split, hard tokens weighted apart", ATKDOptions)
declare(
    "uld",
    "ULD (Boizard et al. 2024): teacher and student probabilities each sorted and compared rank by rank, no "
    "vocabulary mapping (--uld-weight; the paper adds CE: --ce-weight 1); needs the logits (no --fused-loss)",
    ULDOptions,
)
declare("ce", "no distillation: cross-entropy on the true tokens only (the baseline; kd is 0)")


def _merged_options() -> type:
    """Every declared loss's option fields in one dataclass (DistillConfig inherits it: one declaration each)."""
    classes = list(dict.fromkeys(d.Options for d in DECLARED.values()))
    leaves = [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]
    owners: dict[str, type] = {}
    for c in leaves:
        for f in fields(c):
            owner = next(base for base in c.__mro__ if f.name in getattr(base, "__annotations__", {}))
            if owners.setdefault(f.name, owner) is not owner:
                raise TypeError(f"option {f.name!r} is declared by both {owners[f.name].__name__} and {owner.__name__}")
    return make_dataclass("LossOptions", [], bases=tuple(leaves))


LossOptions = _merged_options()
LossOptions.__doc__ = "The option fields of every declared loss, flat (DistillConfig inherits them)."
LOSS_NAMES: tuple[str, ...] = tuple(DECLARED)
DEFAULT_LOSS = "fkl"


def loss_help() -> str:
    """``--loss``'s help: every declared loss with its summary."""
    return (
        "KD loss over the teacher's top-k + tail: "
        + "; ".join(f"{d.name}: {d.summary}" for d in DECLARED.values())
        + "."
    )
