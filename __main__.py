"""``python -m kd_pipeline``: the `pipeline` command."""

from kd_pipeline.pipeline import main

main()
