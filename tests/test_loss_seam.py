"""The losses' seam: a loss is declared torch-free in train/losses/options.py and registered by its module."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kd_pipeline.train import losses
from kd_pipeline.train.losses import options


def test_the_declarations_import_without_torch():
    code = (
        "import sys; from kd_pipeline.train.config import DistillConfig; "
        "from kd_pipeline.train.losses import LOSS_NAMES, LossOptions, loss_help; "
        "print(sorted(m for m in ('torch', 'numpy', 'pyarrow') if m in sys.modules), len(LOSS_NAMES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", str(len(losses.LOSS_NAMES))]


def test_every_declared_loss_is_registered_in_declaration_order():
    assert tuple(losses.LOSSES) == losses.LOSS_NAMES == tuple(options.DECLARED)
    for name, cls in losses.LOSSES.items():
        declared = options.DECLARED[name]
        assert (cls.name, cls.summary, cls.Options) == (declared.name, declared.summary, declared.Options)


@pytest.fixture
def scratch_declaration():
    """Declare `scratch` for one test, and leave the registry as it was."""
    assert "fkl" in losses.LOSSES  # the built-in losses load (and are checked) before the scratch declaration
    declaration = options.declare("scratch", "a test loss: half the forward KL")
    yield declaration
    options.DECLARED.pop("scratch")
    losses.LOSSES.pop("scratch", None)


def test_a_new_loss_is_a_declaration_and_a_registered_class(scratch_declaration):
    @losses.register
    class Scratch(losses.DistillLoss):
        name = "scratch"

        def per_position(self, bins):
            return 0.5 * losses.forward_kl(bins.log_p, bins.log_q)

    assert Scratch.summary == scratch_declaration.summary and Scratch.Options is options.KDOptions
    logits = torch.randn(6, 10, dtype=torch.float64)
    p = torch.randn(6, 10, dtype=torch.float64).log_softmax(-1)
    top = p.topk(4, dim=-1)
    batch = losses.KDBatch(top.indices, top.values, torch.ones(6, dtype=torch.bool))
    half, full = losses.build_loss("scratch")(batch, logits), losses.build_loss("fkl")(batch, logits)
    torch.testing.assert_close(half.kd, 0.5 * full.kd)
    torch.testing.assert_close(half.kl, full.kl)  # the comparable figure does not depend on the loss


def test_a_loss_must_be_declared_and_takes_its_summary_from_the_declaration(scratch_declaration):
    with pytest.raises(TypeError, match="not declared"):

        @losses.register
        class Undeclared(losses.DistillLoss):
            name = "undeclared"

    with pytest.raises(TypeError, match="come from the declaration"):

        @losses.register
        class Repeats(losses.DistillLoss):
            name = "scratch"
            summary = "a second summary"

    with pytest.raises(ValueError, match="declared already"):
        options.declare("fkl", "again")
    with pytest.raises(ValueError, match="registered already"):
        losses.register(type("Again", (losses.DistillLoss,), {"name": "fkl"}))
