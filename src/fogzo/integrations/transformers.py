"""Hugging Face ``transformers.Trainer`` with a fogzo estimator (docs/integrations.md).

::

    from fogzo.integrations.transformers import FogzoTrainer

    model = fogzo.quantize(LlamaForCausalLM(config), fogzo.QuantConfig(bits=2), skip=["lm_head"])
    trainer = FogzoTrainer(
        model=model,
        args=TrainingArguments(output_dir="out", max_steps=1000, save_steps=200),
        train_dataset=dataset,
        estimator=lambda model, total_steps: fogzo.FOGZO(model, total_steps=total_steps, seed=0),
    )
    trainer.train()  # or trainer.train(resume_from_checkpoint=True)

:class:`FogzoTrainerMixin` replaces ``Trainer.training_step``: the estimator's closure is the
Trainer's own loss (``compute_loss`` with ``num_items_in_batch``, divided by the gradient
accumulation steps where the Trainer would divide it), and the STE pass back-propagates
through ``accelerator.backward`` (the estimator's ``backward=`` hook), so gradient
accumulation, mixed precision (the loss scale multiplies the zeroth-order part too), DDP
and the Trainer's clipping, optimizer and scheduler work as with ``loss.backward()``.

* ``estimator``: an estimator (``fogzo.STE``/``SPSA``/``FOGZO`` or your own with the same
  contract), or a factory ``(model, total_steps) -> estimator`` called at the first training
  step with ``total_steps = state.max_steps × gradient_accumulation_steps`` (the estimator
  counts ``estimate`` calls, one per micro-batch) and the model as the Trainer runs it
  (wrapped in DDP where it is).
* Checkpoints: ``fogzo_estimator.json`` (the estimator's class and ``state_dict()``) is
  written into every ``checkpoint-N`` folder and read back by
  ``train(resume_from_checkpoint=...)``.
* Logs: with each training log the mean ``β`` (``fogzo/beta``), the mean and mean absolute
  finite difference (``fogzo/difference_mean``, ``fogzo/difference_abs_mean``), the fraction
  of zero differences, skipped steps, the mean ``‖g_x‖`` and the estimator's step, over the
  micro-batches since the previous log.

Not supported: LOMO/AdaLomo optimizers (they fuse the backward with the update), and
DeepSpeed/FSDP through the Trainer (untested).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .._optional import require
from ..estimators import EstimateInfo, Estimator
from . import estimator_logs

transformers = require("transformers", "transformers", "fogzo.integrations.transformers")
from transformers import Trainer  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

__all__ = ["ESTIMATOR_STATE_NAME", "EstimatorFactory", "FogzoTrainer", "FogzoTrainerMixin"]

logger = logging.getLogger(__name__)

ESTIMATOR_STATE_NAME = "fogzo_estimator.json"
EstimatorFactory = Callable[[nn.Module, int], Estimator]
# The mixin goes before a Trainer class: the type checker sees it as one, Python as a plain mixin.
if TYPE_CHECKING:
    _MixinBase = Trainer
else:
    _MixinBase = object


class FogzoTrainerMixin(_MixinBase):
    """``training_step`` through a fogzo estimator; mix into any ``Trainer`` subclass first.

    ``class MyTrainer(FogzoTrainerMixin, SomeTrainer)``; the mixin takes the keyword
    ``estimator`` (see the module docstring) and passes everything else on.
    """

    def __init__(self, *args: Any, estimator: Estimator | EstimatorFactory, **kwargs: Any) -> None:
        if isinstance(estimator, type) or not (isinstance(estimator, Estimator) or callable(estimator)):
            raise TypeError(
                "estimator must be an estimator (estimate/state_dict/load_state_dict) or a factory "
                f"(model, total_steps) -> estimator, got {estimator!r}"
            )
        super().__init__(*args, **kwargs)
        if self.args.optim in ("lomo", "adalomo"):
            raise ValueError(
                f"optim={self.args.optim!r} fuses backward and update; fogzo estimators need a plain optimizer"
            )
        self._fogzo_factory = None if isinstance(estimator, Estimator) else estimator
        self.estimator: Estimator | None = estimator if isinstance(estimator, Estimator) else None
        if self.estimator is not None:
            self._fogzo_attach(self.estimator)
        self._fogzo_pending: dict | None = None
        self._fogzo_infos: list[EstimateInfo] = []

    # -- the training step ----------------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        estimator = self._fogzo_estimator(model)
        model.train()
        train = getattr(self.optimizer, "train", None)  # a schedule-free optimizer's mode switch
        if callable(train):
            train()
        inputs = self._prepare_inputs(inputs)
        scaled = self._fogzo_loss_is_scaled(num_items_in_batch)
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                # A copy: compute_loss may pop "labels" (label smoothing, compute_loss_func).
                loss = cast(
                    torch.Tensor, self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
                )  # the loss alone (no return_outputs)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            return loss if scaled else loss / accumulation

        info = estimator.estimate(closure)
        self._fogzo_infos.append(info)
        return torch.as_tensor(info.loss, device=self.args.device)

    def _fogzo_loss_is_scaled(self, num_items_in_batch: object) -> bool:
        """Whether ``compute_loss`` already divides by the accumulated batch (as ``Trainer`` decides)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _fogzo_backward(self, loss: torch.Tensor) -> None:
        kwargs = {}
        if self.accelerator.distributed_type == "DEEPSPEED":
            kwargs["scale_wrt_gas"] = False  # as Trainer.training_step: the loss is scaled already
        self.accelerator.backward(loss, **kwargs)

    def _fogzo_attach(self, estimator: Estimator) -> None:
        if getattr(estimator, "backward", None) is None and hasattr(estimator, "backward"):
            estimator.backward = self._fogzo_backward

    def _fogzo_estimator(self, model: nn.Module) -> Estimator:
        if self.estimator is None:
            assert self._fogzo_factory is not None
            total = max(1, int(self.state.max_steps) * int(self.args.gradient_accumulation_steps))
            estimator = self._fogzo_factory(model, total)
            if not isinstance(estimator, Estimator):
                raise TypeError(f"the estimator factory returned {type(estimator).__name__}, not an estimator")
            self._fogzo_attach(estimator)
            self.estimator = estimator
        if self._fogzo_pending is not None:
            self._fogzo_restore(self._fogzo_pending)
            self._fogzo_pending = None
        return self.estimator

    # -- checkpoints ----------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            path = os.path.join(checkpoint, ESTIMATOR_STATE_NAME)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as file:
                    self._fogzo_pending = json.load(file)
                if self.estimator is not None:
                    self._fogzo_restore(self._fogzo_pending)
                    self._fogzo_pending = None
            else:
                logger.warning(
                    "%s has no %s: the estimator starts from its initial state", checkpoint, ESTIMATOR_STATE_NAME
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _fogzo_restore(self, saved: dict) -> None:
        assert self.estimator is not None
        name = type(self.estimator).__name__
        if saved.get("estimator") != name:
            raise ValueError(
                f"the checkpoint holds the state of a {saved.get('estimator')} estimator, this run uses {name}; "
                f"resume with the same estimator (or delete {ESTIMATOR_STATE_NAME} from the checkpoint)"
            )
        self.estimator.load_state_dict(saved["state"])

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.estimator is None or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        record = {"estimator": type(self.estimator).__name__, "state": self.estimator.state_dict()}
        try:
            text = json.dumps(record, indent=1)
        except TypeError as error:
            raise TypeError(
                f"{type(self.estimator).__name__}.state_dict() must be JSON-serializable: {error}"
            ) from error
        partial = os.path.join(folder, ESTIMATOR_STATE_NAME + ".partial")
        with open(partial, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(partial, os.path.join(folder, ESTIMATOR_STATE_NAME))

    # -- logs -----------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._fogzo_infos:
            logs.update(estimator_logs(self._fogzo_infos, self.estimator))
            self._fogzo_infos = []
        super().log(logs, *args, **kwargs)


class FogzoTrainer(FogzoTrainerMixin, Trainer):
    """``transformers.Trainer`` whose training step runs a fogzo estimator (module docstring)."""
