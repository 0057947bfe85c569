"""metrics.jsonl, the log of a `pipeline distill` run: one JSON object per line, appended (and flushed) as the run
goes, ``{"step": ..., ...}``. Written by train/trainer.py; read by its resume, `pipeline plot` and the benches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kd_pipeline.errors import PipelineError

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order (a resumed run may log a step twice: the later one holds).

    A last line without its newline that does not parse is an append cut short (a killed run, or a run still
    writing): it is dropped with a warning. Any other line that is not a JSON object is damage, a
    :class:`PipelineError` naming the file and the line."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")  # a complete file ends in "\n": its last piece is ""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the write was cut
                # On the console as the CLI's other warnings are: a resume or a plot goes on without that record.
                print(
                    f"warning: {path}: line {number} is cut short (a run killed while writing it); ignored",
                    file=sys.stderr,
                )
                break
            raise PipelineError(
                f"{path}: line {number} is not a JSON record ({error.msg}); the file is damaged"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PipelineError(
                f"{path}: line {number} is not a metrics record (no integer 'step'); the file is damaged"
            )
        records.append(record)
    return records
