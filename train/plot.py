"""`pipeline plot`: curves of a distill run (or several) from their metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from kd_pipeline.errors import ConfigError, MissingDependency, PipelineError
from kd_pipeline.train.trainer import METRICS_FILE


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise PipelineError(f"{path}: no metrics (is {run_dir} a `pipeline distill` --out directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = {r["step"]: r[key] for r in records if key in r}  # last record per step wins (resumed runs)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``a/run``, ``b/run``): a curve per run, even
    when run folders share a name."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise ConfigError(f"the same run is given twice: {[str(d) for d in run_dirs]}")


def plot_runs(
    run_dirs: list[Path], out: Path, keys: tuple[str, ...] = ("loss", "eval_ce", "eval_kl", "eval_top1")
) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependency("plotting needs matplotlib: pip install 'kd-pipeline[plot]'") from e
    runs = dict(zip(run_labels(run_dirs), (read_metrics(d) for d in run_dirs)))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs.items():
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
