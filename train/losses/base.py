"""The contract between the trainer and a loss: :class:`KDBatch` in, :class:`KDLossOutput` out, a
:class:`DistillLoss` subclass per loss, the registry (:data:`LOSSES`, :func:`register`) and :func:`build_loss`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from kd_pipeline.errors import ConfigError
from kd_pipeline.train.losses.bins import Bins, StudentBins, coarse_bins, student_bins, temper
from kd_pipeline.train.losses.numerics import cross_entropy, forward_kl, masked_mean, soft_cross_entropy
from kd_pipeline.train.losses.options import DECLARED, KDOptions, LossOptions


@dataclass
class KDBatch:
    """One batch of cached teacher data, flattened to ``N`` positions (leading dims are flattened if given).

    - ``support_ids`` [N, k] int (int32 from the cache is fine): the teacher's top-k ids.
    - ``teacher_logprobs`` [N, k] float (fp16 from the cache is fine): their log-probs over the full vocab.
    - ``mask`` [N] bool: which positions are trained (loss_mask of the *target* token).
    - ``target_ids`` [N] int: the true next token (needed by ``atkd`` and for the CE term).
    - ``teacher_target_logprob`` [N] float: the teacher's log-prob of the true next token (needed by ``atkd``).
    - ``p_rest`` [N] float, optional: overrides ``tail_mass(teacher_logprobs)``.
    - ``teacher_own_logprobs`` [N, k'] float, optional: the teacher's top-k log-probs in its own vocabulary, where
      ``teacher_logprobs`` are something else (moved onto a student vocabulary, train/cross_tokenizer.py); ULD,
      which needs no vocabulary mapping, ranks these. Their tail is ``tail_mass`` of them.
    """

    support_ids: Tensor
    teacher_logprobs: Tensor
    mask: Tensor
    target_ids: Tensor | None = None
    teacher_target_logprob: Tensor | None = None
    p_rest: Tensor | None = None
    teacher_own_logprobs: Tensor | None = None

    def flat(self) -> KDBatch:
        k = self.support_ids.shape[-1]

        def f(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.reshape(-1)

        return KDBatch(
            support_ids=self.support_ids.reshape(-1, k),
            teacher_logprobs=self.teacher_logprobs.reshape(-1, k),
            mask=self.mask.reshape(-1).to(torch.bool),
            target_ids=f(self.target_ids),
            teacher_target_logprob=f(self.teacher_target_logprob),
            p_rest=f(self.p_rest),
            teacher_own_logprobs=None
            if self.teacher_own_logprobs is None
            else self.teacher_own_logprobs.reshape(-1, self.teacher_own_logprobs.shape[-1]),
        )


class KDLossOutput(NamedTuple):
    """What a loss returns for one batch; all scalars, masked means over the trained positions.

    - ``total``: what is backpropagated, ``kd + ce_weight·ce`` (``ce`` alone for the ``ce`` baseline).
    - ``kd``: the loss's distillation term, ``T²·D(p_T, q_T)`` at temperature T.
    - ``ce``: ``-log q_g`` on the true next token at T = 1 (None when the batch has no targets).
    - ``kl``: ``KL(p ‖ q)`` on the k+1 bins at T = 1, whatever the loss: one measure comparable across losses
      and temperatures (what eval reports as ``eval_kl``). Detached.
    - ``soft_ce``: its cross-entropy form ``-Σ p log q = kl + H(p)`` on the same bins (the number peers and
      papers plot as the distillation loss). Detached.
    """

    total: Tensor
    kd: Tensor
    ce: Tensor | None
    kl: Tensor
    soft_ce: Tensor


class FitTerms(NamedTuple):
    """How close the student is to the teacher and the data, masked means: ``ce`` (true token, None without
    targets), ``kl`` and ``soft_ce`` (k+1 bins, T = 1). ``ce`` keeps its gradient; the other two are detached."""

    ce: Tensor | None
    kl: Tensor
    soft_ce: Tensor


def fit_terms(student: StudentBins, batch: KDBatch) -> FitTerms:
    """:class:`FitTerms` of a flat batch; ``student`` as for :meth:`DistillLoss.__call__`."""
    ce = None
    if batch.target_ids is not None:
        if student.log_q_target is None:
            raise ValueError("target_ids given but the precomputed StudentBins have no log_q_target")
        ce = masked_mean(cross_entropy(student.log_q_target), batch.mask)
    with torch.no_grad():
        bins = coarse_bins(StudentBins(*(None if x is None else x.detach() for x in student)), batch)
        kl = masked_mean(forward_kl(bins.log_p, bins.log_q), batch.mask)
        soft_ce = masked_mean(soft_cross_entropy(bins.log_p, bins.log_q), batch.mask)
    return FitTerms(ce, kl, soft_ce)


class DistillLoss:
    """One loss behind the contract the trainer uses; :func:`register` puts a subclass in the registry.

    A loss is first declared in train/losses/options.py (its ``name``, ``summary`` and ``Options`` dataclass, all
    torch-free so that ``--help`` and config files see it); the subclass sets the same ``name`` and defines
    :meth:`per_position` on the bins, or :meth:`divergence` for a loss that is not a mean of per-position values;
    :func:`register` gives it the declared ``summary`` and ``Options``.
    Optional: ``needs_target_column`` (the student's bins are built on support ∪ {true token}, see
    :func:`~kd_pipeline.train.losses.atkd.atkd_ids`), ``needs_logits`` (its bins are read from the student's whole
    distribution, not the support: ULD ranks it; no fused bins then), ``requires`` (KDBatch fields it cannot do
    without), :meth:`bins` (other bins than the k+1 of the support), and state: :meth:`state_dict` /
    :meth:`load_state_dict` (checkpointed with the run) and :meth:`optimizer_step`, called once per optimizer step
    (never per micro-batch, never in eval).

    Calling the loss on a batch gives :class:`KDLossOutput`; temperature, the CE term and the comparable
    ``kl`` / ``soft_ce`` are handled here, the same for every loss.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = KDOptions
    needs_target_column: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: KDOptions | None = None):
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"the {self.name} loss takes {self.Options.__name__}, got {type(self.options).__name__}")
        self.options.check()

    # -- what a loss defines ---------------------------------------------------------------------------------

    def per_position(self, bins: Bins) -> Tensor:
        """The divergence per position [N] on (tempered) bins."""
        raise NotImplementedError(f"{type(self).__name__} defines neither per_position nor divergence")

    def divergence(self, bins: Bins, batch: KDBatch) -> Tensor:
        """The distillation term (scalar) of a flat batch on (tempered) bins: by default the masked mean of
        :meth:`per_position`."""
        return masked_mean(self.per_position(bins), batch.mask)

    def bins(self, student: StudentBins, batch: KDBatch, logits: Tensor | None = None) -> Bins:
        """The bins the loss compares, at T = 1: by default the k+1 bins of the support. ``logits`` [N, V]: the
        student's, given to a loss with ``needs_logits``."""
        return coarse_bins(student, batch)

    def combine(self, kd: Tensor, ce: Tensor | None) -> Tensor:
        """The training loss from its two terms."""
        return kd + self.options.ce_weight * ce if self.options.ce_weight else kd

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the {self.name} loss keeps no state, but the checkpoint holds {sorted(state)}")

    def optimizer_step(self, kd: float, step: int, total_steps: int) -> None:
        """After optimizer step ``step`` (0-based: steps completed before it) of ``total_steps``, with that step's
        ``kd`` averaged over its micro-batches and ranks (every rank passes the same value)."""

    def metrics(self) -> dict[str, float]:
        """Numbers to log beside the loss (e.g. TAID's t)."""
        return {}

    # -- the call --------------------------------------------------------------------------------------------

    def __call__(
        self, batch: KDBatch, student_logits: Tensor | None = None, *, student: StudentBins | None = None
    ) -> KDLossOutput:
        """The loss of one batch.

        Student side: ``student_logits`` [N, V] (or [..., V]; any float dtype, computed in fp32, fp64 if
        given fp64), or precomputed ``student`` bins (a fused path, or a support with repeated ids made empty bins),
        built on ``batch.support_ids`` (with ``include_target=self.needs_target_column``, and ``target_ids`` so that
        ``log_q_target`` is set); a loss with ``needs_logits`` takes the logits too.
        """
        b = batch.flat()
        for name in self.requires:
            if getattr(b, name) is None:
                raise ValueError(f"the {self.name} loss needs batch.{name}")
        if self.options.ce_weight and b.target_ids is None:
            raise ValueError("ce_weight > 0 needs batch.target_ids")
        if student_logits is None and (student is None or self.needs_logits):
            raise ValueError(
                f"the {self.name} loss needs the student's logits"
                if self.needs_logits
                else "pass exactly one of student_logits and student (precomputed StudentBins)"
            )
        if student_logits is not None and student is not None and not self.needs_logits:
            raise ValueError("pass exactly one of student_logits and student (precomputed StudentBins)")
        logits = None if student_logits is None else student_logits.reshape(-1, student_logits.shape[-1])
        if student is None:
            student = student_bins(logits, b.support_ids, b.target_ids, include_target=self.needs_target_column)
        else:
            want = b.support_ids.shape[-1] + int(self.needs_target_column)
            if student.log_q_support.shape[-1] != want:
                columns = "the support and the true token" if self.needs_target_column else "the support"
                raise ValueError(
                    f"the {self.name} loss needs student bins on {want} columns ({columns}), "
                    f"got {student.log_q_support.shape[-1]}"
                )
        bins = self.bins(student, b, logits)
        t = self.options.temperature
        kd = self.divergence(bins, b) if t == 1 else t * t * self.divergence(temper(bins, t), b)
        fit = fit_terms(student, b)
        return KDLossOutput(self.combine(kd, fit.ce), kd, fit.ce, fit.kl, fit.soft_ce)


LOSSES: dict[str, type[DistillLoss]] = {}


def register(cls: type[DistillLoss]) -> type[DistillLoss]:
    """Class decorator: add a loss to the registry under ``cls.name``, with the summary and Options its
    declaration (train/losses/options.py) gives it."""
    declared = DECLARED.get(cls.name)
    if declared is None:
        raise TypeError(f"loss {cls.name!r} is not declared: add declare({cls.name!r}, ...) to train/losses/options.py")
    if cls.name in LOSSES:
        raise ValueError(f"a loss named {cls.name!r} is registered already")
    if "summary" in vars(cls) or "Options" in vars(cls):
        raise TypeError(f"{cls.__name__}: summary and Options come from the declaration in train/losses/options.py")
    cls.summary, cls.Options = declared.summary, declared.Options
    LOSSES[cls.name] = cls
    return cls


def build_loss(name: str, source: object = None, **options) -> DistillLoss:
    """A fresh loss ``name`` (no state yet) with its options read from ``source`` (any object with the option
    attributes, such as a DistillConfig, or a mapping), then from ``options``; missing ones keep their defaults.

    Option names that belong to other losses are ignored (one config serves every loss); unknown ones raise.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    known = {f.name for f in fields(LossOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown loss options {unknown}; the options are {sorted(known)}")
    cls = LOSSES[name]
    values = {}
    for f in fields(cls.Options):
        if f.name in options:
            values[f.name] = options[f.name]
        elif isinstance(source, dict) and f.name in source:
            values[f.name] = source[f.name]
        elif source is not None and not isinstance(source, dict) and hasattr(source, f.name):
            values[f.name] = getattr(source, f.name)
    return cls(cls.Options(**values))
