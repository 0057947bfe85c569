"""`pipeline plot`: curves of a distill run (or several) from their metrics.jsonl.

The default panels are the figures that compare across losses: the training loss itself does not (a TAID loss
rises by design as its interpolation anneals, a soft-CE loss sits above a KL one by the teacher's entropy), so
it is not drawn unless asked for. Each run's legend names its loss, from its distill_config.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kd_pipeline.errors import ConfigError, MissingDependency, PipelineError
from kd_pipeline.train.metrics import METRICS_FILE, read_metrics

# metric -> panel title: each is the same quantity whatever the loss that trained the student.
COMPARABLE = {
    "kl": "train KL(teacher || student) on the support",
    "soft_ce": "train soft CE against the teacher",
    "eval_kl": "eval KL(teacher || student)",
    "eval_bpb": "eval bits per byte",
    "eval_top1": "eval top-1 agreement with the teacher",
}
X_AXES = {"steps": "optimizer step", "tokens": "tokens seen"}
CONFIG_FILE = "distill_config.json"  # written by train/trainer.py into every run directory


def run_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise PipelineError(f"{path}: no metrics (is {run_dir} a `pipeline distill` --out directory?)")
    return read_metrics(path)


def run_loss(run_dir: Path) -> str | None:
    """The loss a run trained with, as its distill_config.json says (None where it has none)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("loss")
    except (OSError, ValueError, AttributeError):
        return None


def series(records: list[dict], key: str, x: str = "steps", where: str = "") -> tuple[list[float], list[float]]:
    """(x values, values) of ``key``, one point per step (the last record of a step wins: resumed runs).

    ``x="tokens"``: training tokens seen at that step, from the train records' ``tokens_seen`` (linear between
    logged steps, 0 at step 0, the last count after it: eval records carry no count of their own)."""
    points = {r["step"]: r[key] for r in records if key in r}
    steps = sorted(points)
    values = [points[s] for s in steps]
    if x == "steps":
        return [float(s) for s in steps], values
    seen = {0: 0, **{r["step"]: r["tokens_seen"] for r in records if "tokens_seen" in r}}
    if len(seen) == 1 and steps:
        raise PipelineError(f"{where}: no tokens_seen in its metrics (an older run); plot it with --x steps")
    known = sorted(seen)
    return np.interp(steps, known, [seen[s] for s in known]).tolist(), values


def run_labels(run_dirs: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``a/run``, ``b/run``): a curve per run, even
    when run folders share a name."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise ConfigError(f"the same run is given twice: {[str(d) for d in run_dirs]}")


def curves(
    run_dirs: list[Path], keys: tuple[str, ...] | None = None, x: str = "steps"
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{metric: {run label: (x values, values)}} for ``keys`` (default: those of COMPARABLE that any run logged);
    a run's label is the shortest path suffix that tells it apart, with its loss, e.g. ``a/run (taid)``."""
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    runs = {}
    for label, run_dir in zip(run_labels(run_dirs), run_dirs):
        loss = run_loss(run_dir)
        runs[f"{label} ({loss})" if loss else label] = (run_metrics(run_dir), str(Path(run_dir) / METRICS_FILE))
    if keys is None:
        logged = {key for records, _ in runs.values() for record in records for key in record}
        keys = tuple(key for key in COMPARABLE if key in logged)
        if not keys:
            raise PipelineError(f"{', '.join(map(str, run_dirs))}: no metric to plot yet ({', '.join(COMPARABLE)})")
    return {key: {name: series(records, key, x, path) for name, (records, path) in runs.items()} for key in keys}


def plot_runs(run_dirs: list[Path], out: Path, keys: tuple[str, ...] | None = None, x: str = "steps") -> Path:
    """One panel per metric (see :func:`curves`), one curve per run, against ``x`` (steps | tokens); writes the
    PNG ``out``."""
    panels = curves(run_dirs, keys, x)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependency("plotting needs matplotlib: pip install 'kd-pipeline[plot]'") from e
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for ax, (key, lines) in zip(axes.flat, panels.items()):
        for name, (xs, values) in lines.items():
            if xs:
                ax.plot(xs, values, label=name, marker="." if len(xs) < 30 else None)
        ax.set_title(COMPARABLE.get(key, key), fontsize=9)
        ax.set_ylabel(key)
        ax.set_xlabel(X_AXES[x])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
