"""Knowledge distillation (Hinton et al., 2015): a student learns from a teacher's soft outputs.

The student trains on a blend of the teacher's outputs softened at a temperature T and the usual
next-token cross-entropy:

    loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · CE

(T² keeps the soft term's gradients on the scale of the hard term's as T grows). The teacher is a
trained plait run, loaded once per process, in eval mode with no gradients; for each micro-batch
it runs under `torch.inference_mode` on the same tokens just before the student, and its logits
live only until the loss has used them: nothing is stored on disk.

:func:`attach_teacher` wires this into a plain GPT before `parallelize`, so distillation runs
under every data-parallel layout (dp, ZeRO 1–3, compression) unchanged: a forward pre-hook runs
the teacher on the batch in flight, and the model's `loss_fn` module becomes a
:class:`DistillationLoss`. The teacher is kept outside the student's module tree, so it is never
reduced, sharded, checkpointed or put in train mode. Held-out evaluation (the model in eval mode)
reports the plain cross-entropy, comparable with the teacher's and with any other run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from plait.config import Config, ModelConfig
from plait.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, targets).

    Logits are (N, vocab) (or any (..., vocab), flattened), targets (N,); the KL is the mean over
    the N positions of the per-position KL, as the cross-entropy is their mean.
    """
    vocab = student_logits.size(-1)
    s = student_logits.float().reshape(-1, vocab)
    t = teacher_logits.float().reshape(-1, vocab)
    ce = F.cross_entropy(s, targets.reshape(-1))
    if alpha == 0.0:
        return ce
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce


class _TeacherHolder:
    """Keeps the teacher out of the student's module tree (a plain attribute, not a submodule)."""

    def __init__(self, model: nn.Module):
        self.model = model


class DistillationLoss(nn.Module):
    """The student's `loss_fn` while distilling: the blended loss in training, plain
    cross-entropy in eval mode. The teacher's logits for the batch in flight are handed over by
    :meth:`run_teacher` (the student's forward pre-hook) and used once."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float):
        super().__init__()
        self._teacher = _TeacherHolder(teacher)
        self.temperature = temperature
        self.alpha = alpha
        self._pending: torch.Tensor | None = None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher.model

    def run_teacher(self, student: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the student: the teacher's logits for these tokens (training only)."""
        self._pending = None
        idx = args[0] if args else kwargs.get("idx")
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if not student.training or targets is None or not isinstance(idx, torch.Tensor):
            return
        with torch.inference_mode():
            logits = self.teacher(idx)
        # Inference tensors cannot be saved for backward; a copy outside inference mode can.
        self._pending = logits.clone()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        teacher, self._pending = self._pending, None
        if not self.training or teacher is None:
            return F.cross_entropy(logits.float(), targets)
        if teacher.numel() != logits.numel():
            raise RuntimeError(f"the teacher's logits {tuple(teacher.shape)} do not match the "
                               f"student's {tuple(logits.shape)}")
        return distillation_loss(logits, teacher, targets, self.temperature, self.alpha)


def check_teacher(student: ModelConfig, teacher: ModelConfig, where: str) -> None:
    """The teacher must score the student's tokens: the same vocabulary, a context at least as long."""
    if teacher.arch != "gpt":
        raise CheckpointError(f"distill.teacher={where!r} holds a model.arch={teacher.arch!r} model; "
                              "the teacher must be a GPT run")
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"model.vocab_size={student.vocab_size} of the student does not match the teacher's "
            f"vocab_size={teacher.vocab_size} (distill.teacher={where!r}): the distillation loss "
            f"compares the two over the same tokens; set model.vocab_size={teacher.vocab_size}")
    if student.block_size > teacher.block_size:
        raise ConfigError(
            f"model.block_size={student.block_size} of the student exceeds the teacher's "
            f"block_size={teacher.block_size} (distill.teacher={where!r}): the teacher cannot read "
            f"sequences that long; use model.block_size ≤ {teacher.block_size}")


def load_teacher(cfg: Config, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """The teacher of `cfg.distill.teacher` on `device`: eval mode, no gradients, checked
    against the student's config. A missing or damaged checkpoint is a CheckpointError naming
    distill.teacher."""
    from plait.generate import load_model  # the same loader `plait generate` uses

    where = cfg.distill.teacher
    if not where:
        raise ConfigError("distill.teacher is empty; pass --teacher RUN_DIR (a trained run folder "
                          "or a step_* checkpoint folder)")
    if not Path(where).exists():
        raise CheckpointError(f"distill.teacher={where!r} does not exist; pass a trained run folder "
                              "(its train.out_dir) or a step_* checkpoint folder")
    try:
        with torch.random.fork_rng(devices=[]):  # building it leaves the run's seeds alone
            teacher, teacher_cfg = load_model(where, device=str(device))
    except CheckpointError as exc:
        raise CheckpointError(f"distill.teacher={where!r}: {exc}") from None
    check_teacher(cfg.model, teacher_cfg.model, where)
    teacher.eval().requires_grad_(False)
    return teacher, teacher_cfg


def attach_teacher(model: nn.Module, cfg: Config, device: torch.device | str) -> DistillationLoss:
    """Make `model` (a plain GPT, before `parallelize`) train on cfg.distill's blended loss."""
    if not isinstance(getattr(model, "loss_fn", None), nn.Module):
        raise ConfigError(f"distillation needs a model with a `loss_fn` module (a GPT); got "
                          f"{type(model).__name__}")
    teacher, teacher_cfg = load_teacher(cfg, device)
    d = cfg.distill
    loss = DistillationLoss(teacher, d.temperature, d.alpha)
    model.loss_fn = loss
    model.register_forward_pre_hook(loss.run_teacher, with_kwargs=True)
    log.info("distilling from %s (%d blocks × %d wide) at temperature %.2g, alpha %.2g",
             d.teacher, teacher_cfg.model.n_layer, teacher_cfg.model.n_embd, d.temperature, d.alpha)
    return loss
