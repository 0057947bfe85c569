"""`pipeline plan-teacher`: which teacher (or chain of teacher assistants) to distill a student from.

Law of capacity gap (Zhang, Li, Song, Ye, Gao, Hu, "Towards the Law of Capacity Gap in Distilling Language
Models", arXiv 2311.07052, ACL 2025; code and models: github.com/GeneZC/MiniMA). A larger teacher does not
always give a better student; from pruning-and-distilling studies on GPT-2 and Pythia (< 3B) the authors
find that the optimal teacher's size grows linearly with the student's, at about 2.5 times the student
(``LAW_RATIO``), and they distil MiniMA-3B from LLaMA-2-7B accordingly (their comparison with 13B and 70B
teachers favours 7B). The 2.5 is read off their fits as summarised by the authors' team and by paper notes;
the abstract itself says only "linearly". Sizes here are total parameter counts (tied weights once), the
scale the paper's model names use; the embedding share is reported alongside, since it is large in small
models.

Teacher-assistant chain. When the largest available teacher is more than ``ratio²`` times the student (two
optimal gaps: 6.25x at 2.5), one distillation across the whole gap is expected to lose to a chain
teacher → assistant(s) → student whose hops are close to the law's ratio. The chain's ideal sizes are
spaced geometrically between the student and the largest teacher, with ``round(log(T/S) / log(ratio))``
hops; each ideal size takes the nearest candidate (in log-size), duplicates merged. Every hop is the same
two commands: ``cache-teacher`` with the bigger model, ``distill`` the smaller one (docs/stage-one.md, "Teacher-
assistant chains").

MiniDisc (Zhang et al., "MiniDisc: Minimal Distillation Schedule for Language Model Compression", arXiv
2205.14570; github.com/GeneZC/MiniDisc). Among trained assistants, pick the one maximizing the λ-tradeoff
``score = dev_metric + λ · sparsity`` with λ = 0.2 (the repository's ``--lam`` default). In the code
(``run_minidisc_cls.py``), sparsity is the percentage of the teacher's parameters removed divided by 100,
so a smaller assistant scores higher at equal metric, and higher scores win; the metric is a dev-set
accuracy/F1 in [0, 1] (higher is better). Here ``sparsity = 1 − params / teacher_params``. Given an eval
loss instead of a metric (lower is better), the metric is ``−loss``: an adaptation, since MiniDisc was
defined for accuracies, and losses live on another scale than λ was tuned for. Candidates must lie
strictly between the student and the teacher in size.

Parameters are counted without loading weights: the config is instantiated on the meta device (works for
hub ids, config-only directories and config.json files); where the architecture cannot be built, the
safetensors headers of a local checkpoint are summed.
"""

from __future__ import annotations

import csv
import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd_pipeline.config import Group, option
from kd_pipeline.errors import ConfigError

LAW_RATIO = 2.5  # optimal teacher size / student size (law of capacity gap)
MINIDISC_LAMBDA = 0.2  # λ of MiniDisc's λ-tradeoff

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


class CapacityError(ConfigError):
    """A model, candidate or assistant table that cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class ModelSize:
    name: str
    params: int  # total parameters, tied weights counted once
    embedding_params: int | None = None  # input embeddings, where known
    source: str = "given"  # "config" (meta-device instantiation) | "safetensors" | "given"


def parse_count(text: str | int | float) -> int:
    """``7B``, ``350M``, ``1.5e9``, ``125000000`` → an integer count."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _COUNT.match(str(text))
    if match is None:
        raise CapacityError(f"not a parameter count: {text!r} (examples: 7B, 350M, 1.5e9)")
    return int(round(float(match[1]) * _SUFFIXES[match[2].upper()]))


def format_count(n: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


# ----------------------------------------------------------------------------------------- counting
def count_from_config(config, name: str, trust_remote_code: bool = False) -> ModelSize:
    """Build the model on the meta device (no memory, no weights) and count its parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once
    return ModelSize(name, int(total), int(model.get_input_embeddings().weight.numel()), "config")


def count_from_safetensors(directory: Path) -> int:
    """Sum of the tensor sizes in the headers of ``directory/*.safetensors`` (8-byte length + JSON)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CapacityError(f"{directory}: no *.safetensors files")
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def _load_config(spec: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from kd_pipeline.models import load_config

    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        raw = json.loads(path.read_text())
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    return load_config(spec, "model", trust_remote_code=trust_remote_code)


def count_parameters(spec: str, trust_remote_code: bool = False) -> ModelSize:
    """Parameters of a model dir / hub id / config.json, without loading weights."""
    try:
        return count_from_config(_load_config(spec, trust_remote_code), spec, trust_remote_code)
    except (ValueError, KeyError, OSError, ImportError) as error:
        if Path(spec).is_dir() and any(Path(spec).glob("*.safetensors")):
            return ModelSize(spec, count_from_safetensors(Path(spec)), None, "safetensors")
        raise CapacityError(f"{spec}: cannot count its parameters ({error})") from error


def given_count(text: str, where: str) -> int:
    """A size typed on the command line: ``7B``, ``350M``, ``1.5e9``. A bare number (``7``) is refused rather than
    read with an assumed unit: both readings (7 parameters, 7 billion) are plausible, and a wrong guess gives a plan
    that looks sound."""
    match = _COUNT.match(text)
    if match is not None and not match[2] and "e" not in match[1].lower():
        number = match[1]
        raise CapacityError(
            f"{where}: a bare number has no unit; write {number}B for {number} billion parameters "
            f"({number}M million, {number}K thousand) or a count such as {number}e9"
        )
    return parse_count(text)


def model_size(spec: str, trust_remote_code: bool = False, option: str = "--candidate") -> ModelSize:
    """A model as given on the command line (as ``option``): ``NAME=SIZE``, a size (``7B``), or a model/config."""
    where = f"{option} {spec}"
    if Path(spec).exists():
        size = count_parameters(spec, trust_remote_code)
    elif "=" in spec:
        name, _, count = spec.rpartition("=")
        size = ModelSize(name, given_count(count, where))
    elif _COUNT.match(spec):
        size = ModelSize(spec, given_count(spec, where))
    else:
        size = count_parameters(spec, trust_remote_code)
    if size.params < 1:
        raise CapacityError(f"{where}: {size.params} parameters; a model has at least one (sizes read like 1B, 350M)")
    return size


# ------------------------------------------------------------------------------------ law of the gap
def _log_distance(size: ModelSize, target: float) -> float:
    return abs(math.log(size.params / target))


def recommend_teacher(student: ModelSize, candidates: list[ModelSize], ratio: float = LAW_RATIO) -> ModelSize:
    """The candidate nearest (in log-size) to ``ratio × student`` among those larger than the student."""
    teachers = [c for c in candidates if c.params > student.params]
    if not teachers:
        raise CapacityError(f"no candidate is larger than the student ({format_count(student.params)})")
    optimal = ratio * student.params
    return min(teachers, key=lambda c: (_log_distance(c, optimal), c.params))  # a tie goes to the smaller


def assistant_chain(student: ModelSize, candidates: list[ModelSize], ratio: float = LAW_RATIO) -> list[ModelSize]:
    """Largest teacher → assistants → student when the gap exceeds ``ratio²``, else ``[]`` (see module doc)."""
    teachers = sorted((c for c in candidates if c.params > student.params), key=lambda c: c.params)
    if not teachers or teachers[-1].params <= ratio**2 * student.params:
        return []
    top, pool = teachers[-1], teachers[:-1]
    gap = top.params / student.params
    hops = round(math.log(gap) / math.log(ratio))  # >= 2 since gap > ratio²
    ideals = [student.params * gap ** (k / hops) for k in range(1, hops)]
    picks = {min(pool, key=lambda c: _log_distance(c, ideal)) for ideal in ideals} if pool else set()
    return [top, *sorted(picks, key=lambda c: -c.params), student]


# ------------------------------------------------------------------------------------------ MiniDisc
@dataclass
class AssistantScore:
    name: str
    params: int
    metric: float  # higher is better (−eval_loss when a loss was given)
    sparsity: float  # fraction of the teacher's parameters removed
    score: float | None  # metric + λ·sparsity; None when not a valid assistant
    note: str = ""


def read_assistants(path: str | Path) -> list[dict]:
    """Rows ``{name, params, metric}`` (metric: higher is better) from a CSV with a header or a JSON list.

    Columns: ``name``, ``params`` (a count such as 1.2e9 or 350M) and either ``metric`` (higher is better,
    e.g. accuracy) or ``eval_loss`` (lower is better, e.g. `pipeline distill`'s eval_ce or eval_kl)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        raw = json.loads(path.read_text())
    else:
        with open(path, newline="") as f:
            raw = list(csv.DictReader(f))
    if not isinstance(raw, list) or not raw:
        raise CapacityError(f"{path}: expected a non-empty list of assistants")
    rows, kinds = [], set()
    for i, item in enumerate(raw, 1):
        row = {str(k).strip().lower(): v for k, v in dict(item).items()}
        where = f"{path}: row {i}"
        if "name" not in row or "params" not in row:
            raise CapacityError(f"{where}: needs 'name' and 'params' (has {sorted(row)})")
        if row.get("metric") not in (None, ""):
            kind, metric = "metric", float(row["metric"])
        elif row.get("eval_loss") not in (None, ""):
            kind, metric = "eval_loss", -float(row["eval_loss"])
        else:
            raise CapacityError(f"{where}: needs a 'metric' (higher is better) or an 'eval_loss' (lower is better)")
        kinds.add(kind)
        rows.append({"name": str(row["name"]), "params": parse_count(row["params"]), "metric": metric})
    if len(kinds) > 1:
        raise CapacityError(f"{path}: mixes 'metric' and 'eval_loss' rows; their scores cannot be compared")
    return rows


def rank_assistants(
    rows: list[dict], teacher_params: int, student_params: int | None = None, lam: float = MINIDISC_LAMBDA
) -> list[AssistantScore]:
    """MiniDisc's λ-tradeoff, best first; rows that are not between student and teacher come last, unscored."""
    scored = []
    for row in rows:
        sparsity = 1.0 - row["params"] / teacher_params
        note = ""
        if row["params"] >= teacher_params:
            note = "not smaller than the teacher"
        elif student_params is not None and row["params"] <= student_params:
            note = "not larger than the student"
        score = None if note else row["metric"] + lam * sparsity
        scored.append(AssistantScore(row["name"], row["params"], row["metric"], sparsity, score, note))
    return sorted(scored, key=lambda a: (a.score is None, -(a.score or 0.0)))


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class PlanConfig:
    """`pipeline plan-teacher`'s settings; each field is also one of its options and a key of its ``--config``."""

    student: str = option(
        help="Student: a model dir / hub id / config.json, or a size such as 1B.", group=Group.STUDENT
    )
    candidates: list[str] = option(
        help="A possible teacher (repeat): model dir / hub id / config.json, NAME=SIZE, or a size such as 7B.",
        flag="--candidate",
        default_factory=list,
        group=Group.TEACHER,
    )
    ratio: float = option(
        LAW_RATIO, "Optimal teacher / student size (law of capacity gap, arXiv 2311.07052).", group=Group.TEACHER
    )
    assistants: Path | None = option(
        None,
        "CSV/JSON of trained assistants (name, params, metric or eval_loss) to rank with MiniDisc.",
        group=Group.TEACHER,
    )
    teacher: str | None = option(
        None,
        "The teacher the assistants come from (their sparsity is relative to it); default: the largest candidate.",
        group=Group.TEACHER,
    )
    lam: float = option(MINIDISC_LAMBDA, "MiniDisc lambda: score = metric + lambda * sparsity.", group=Group.TEACHER)
    trust_remote_code: bool = option(
        False, "Allow custom model code from the hub (to count parameters).", group=Group.STUDENT
    )
    json_output: bool = option(False, "Print the plan as JSON.", flag="--json", group=Group.LOGGING)

    def validate(self) -> None:
        if self.ratio <= 1:
            raise CapacityError("--ratio must be > 1")
        if not self.candidates and self.assistants is None:
            raise CapacityError("give --candidate (teachers to choose from) and/or --assistants (to rank)")
        if self.assistants is not None and self.teacher is None and not self.candidates:
            raise CapacityError("ranking --assistants needs --teacher (their sparsity is relative to it)")


@dataclass
class TeacherPlan:
    student: ModelSize
    ratio: float
    candidates: list[ModelSize]  # by size
    recommended: ModelSize | None
    chain: list[ModelSize]  # largest teacher → assistants → student; [] when one hop is enough
    teacher: ModelSize | None = None  # the reference of the assistants' sparsity
    lam: float = MINIDISC_LAMBDA
    assistants: list[AssistantScore] = field(default_factory=list)

    @property
    def optimal_params(self) -> float:
        return self.ratio * self.student.params

    @property
    def warnings(self) -> list[str]:
        """One line per hop of the chain that stays above ratio²: the candidates leave a gap the law says is too
        wide for one distillation, and where an assistant would split it."""
        out = []
        for big, small in zip(self.chain, self.chain[1:]):
            gap = big.params / small.params
            if gap > self.ratio**2:
                hops = max(2, round(math.log(gap) / math.log(self.ratio)))
                ideal = ", ".join(format_count(small.params * gap ** (j / hops)) for j in range(hops - 1, 0, -1))
                out.append(
                    f"{big.name} -> {small.name} is {gap:.2f}x, above {self.ratio:g}² = {self.ratio**2:g}x: no "
                    f"candidate lies between them; {'an assistant' if hops == 2 else 'assistants'} near {ideal} "
                    "would split it (--candidate NAME=SIZE)"
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "optimal_params": self.optimal_params, "warnings": self.warnings}

    def render(self) -> str:
        s = self.student
        lines = [
            f"student: {s.name}  {format_count(s.params)} parameters ({s.source})",
            f"law of capacity gap (arXiv 2311.07052): optimal teacher ≈ {self.ratio:g} × student "
            f"= {format_count(self.optimal_params)}",
        ]
        if self.candidates:
            lines += ["", f"{'candidate':<32} {'params':>8} {'× student':>10}"]
            for c in self.candidates:
                mark = "  <- recommended" if c == self.recommended else ""
                lines.append(f"{c.name:<32} {format_count(c.params):>8} {c.params / s.params:>9.2f}x{mark}")
        if self.chain:
            top = self.chain[0]
            lines += [
                "",
                f"the largest teacher is {top.params / s.params:.1f}x the student, more than {self.ratio:g}² = "
                f"{self.ratio**2:g}x: distill through teacher assistants, one cache-teacher + distill per hop:",
            ]
            for big, small in zip(self.chain, self.chain[1:]):
                lines.append(
                    f"  {big.name} ({format_count(big.params)}) -> {small.name} ({format_count(small.params)}): "
                    f"{big.params / small.params:.2f}x"
                )
            lines += [f"warning: {warning}" for warning in self.warnings]
        if self.assistants:
            lines += [
                "",
                f"MiniDisc (arXiv 2205.14570): score = metric + {self.lam:g} × sparsity, "
                f"sparsity = 1 - params / {format_count(self.teacher.params)} (teacher {self.teacher.name})",
                f"{'rank':>4} {'assistant':<32} {'params':>8} {'metric':>9} {'sparsity':>9} {'score':>9}",
            ]
            for rank, a in enumerate(self.assistants, 1):
                score = f"{a.score:9.4f}" if a.score is not None else f"{'-':>9}  ({a.note})"
                lines.append(
                    f"{rank:>4} {a.name:<32} {format_count(a.params):>8} {a.metric:>9.4f} {a.sparsity:>9.3f} {score}"
                )
        return "\n".join(lines)


def plan_teacher(cfg: PlanConfig) -> TeacherPlan:
    cfg.validate()
    student = model_size(cfg.student, cfg.trust_remote_code, "--student")
    candidates = sorted((model_size(c, cfg.trust_remote_code) for c in cfg.candidates), key=lambda c: c.params)
    plan = TeacherPlan(
        student=student,
        ratio=cfg.ratio,
        candidates=candidates,
        recommended=recommend_teacher(student, candidates, cfg.ratio) if candidates else None,
        chain=assistant_chain(student, candidates, cfg.ratio),
        lam=cfg.lam,
    )
    if cfg.assistants is not None:
        plan.teacher = model_size(cfg.teacher, cfg.trust_remote_code, "--teacher") if cfg.teacher else candidates[-1]
        rows = read_assistants(cfg.assistants)
        plan.assistants = rank_assistants(rows, plan.teacher.params, student.params, cfg.lam)
    return plan
