"""Distill a student with the Hugging Face Trainer from a teacher cache, with kd_pipeline's losses.

    python examples/hf_trainer.py --cache CACHE --student STUDENT --out OUT [--loss fkl] [--max-steps 200]

The cache (``pipeline cache-teacher``) is a torch IterableDataset (kd_pipeline.CacheDataset); torch's
default_collate stacks its sequences into the batch dict the losses take; compute_loss forwards the student and
scores it against the cached top-k. STUDENT: a model folder with weights, or a config folder (from scratch).
Needs accelerate (the Trainer's own dependency): pip install 'kd-pipeline[peft]' or accelerate.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from torch.utils.data import default_collate
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from kd_pipeline import CacheDataset
from kd_pipeline.train import losses
from kd_pipeline.train.trainer import student_view


class DistillTrainer(Trainer):
    """The HF Trainer with a KD loss against the cache's teacher instead of the model's own LM loss."""

    def __init__(self, *args, kd_loss: losses.DistillLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss, self.kd_seen, self.kl_history = kd_loss, [], []
        self.add_callback(LossSchedule(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The student's logits at the trained positions and the teacher's top-k there (train/trainer.py's forward).
        view = student_view(model, inputs, self.args.device, contextlib.nullcontext())
        out = self.kd_loss(view.cached, view.logits)
        if model.training:
            self.kd_seen.append(float(out.kd.detach()))
            self.kl_history.append(float(out.kl))
        return (out.total, view.logits) if return_outputs else out.total


class LossSchedule(TrainerCallback):
    """A loss with a schedule (TAID's t) moves once per optimizer step, on that step's KD term."""

    def __init__(self, trainer: DistillTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        kd = self.trainer.kd_seen
        self.trainer.kd_loss.optimizer_step(sum(kd) / max(len(kd), 1), state.global_step - 1, state.max_steps)
        kd.clear()


def main(argv: list[str] | None = None) -> DistillTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--loss", default="fkl", choices=list(losses.LOSSES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    has_weights = any(Path(args.student).glob("*.safetensors"))
    model = (
        AutoModelForCausalLM.from_pretrained(args.student)
        if has_weights
        else AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.student))
    )
    # One process reads the whole cache; under torchrun, accelerate hands each rank its part of every batch.
    data = CacheDataset(args.cache, batch_size=args.batch_size, seed=args.seed, rank=0, world_size=1)
    training = TrainingArguments(
        output_dir=str(args.out),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        seed=args.seed,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the teacher's columns are no arguments of the model's forward: keep them
    )
    trainer = DistillTrainer(
        model=model,
        args=training,
        train_dataset=data,
        data_collator=default_collate,
        kd_loss=losses.build_loss(args.loss),
    )
    trainer.train()
    trainer.save_model(str(args.out / "final"))
    return trainer


if __name__ == "__main__":
    main()
