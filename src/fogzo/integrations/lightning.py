"""Lightning: a ``LightningModule`` mixin for fogzo estimators (docs/integrations.md).

Estimators fill ``.grad`` themselves, so the module uses manual optimization::

    import lightning as L
    from fogzo.integrations.lightning import FogzoLightningMixin

    class Classifier(FogzoLightningMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = fogzo.quantize(make_net(), fogzo.QuantConfig(bits=2))

        def configure_estimator(self):  # called at the first training step
            steps = self.trainer.estimated_stepping_batches
            return fogzo.FOGZO(self.net, total_steps=steps, seed=0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            optimizer = self.optimizers()
            optimizer.zero_grad()
            info = self.estimate(lambda: F.cross_entropy(self.net(x), y))  # manual_backward inside
            optimizer.step()
            return torch.as_tensor(info.loss)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

:meth:`FogzoLightningMixin.estimate` runs the estimator with ``backward=self.manual_backward``
(so precision plugins' loss scaling and the strategy's hooks apply; the zeroth-order part is
multiplied by the same loss scale), logs β and the finite differences with ``self.log_dict``,
and the estimator's ``state_dict()`` travels in the checkpoint under ``"fogzo_estimator"``
(``on_save_checkpoint`` / ``on_load_checkpoint``). The mixin itself imports nothing from
Lightning: it only calls ``manual_backward`` and ``log_dict`` on ``self``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..estimators import EstimateInfo, Estimator
from ..estimators.base import Closure
from . import estimator_logs

__all__ = ["CHECKPOINT_KEY", "FogzoLightningMixin"]

CHECKPOINT_KEY = "fogzo_estimator"
# The mixin goes before a LightningModule: the type checker sees it as one, Python as a plain mixin.
if TYPE_CHECKING:
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object


class FogzoLightningMixin(_MixinBase):
    """Mix into a ``LightningModule`` (first in the bases) that sets ``automatic_optimization = False``.

    Provide the estimator as ``self.estimator`` (in ``__init__``) or return it from
    :meth:`configure_estimator`, which is called once, at the first :meth:`estimate`.
    """

    estimator: Estimator | None = None
    _fogzo_pending: dict | None = None

    def configure_estimator(self) -> Estimator:
        """Return the estimator (override this, or set ``self.estimator`` in ``__init__``)."""
        raise NotImplementedError(
            f"{type(self).__name__}: set self.estimator in __init__ or override configure_estimator()"
        )

    def estimate(self, closure: Closure, *, log: bool = True) -> EstimateInfo:
        """``estimator.estimate(closure)`` with ``manual_backward``; logs the step's statistics."""
        if getattr(self, "automatic_optimization", False):
            raise RuntimeError(
                "fogzo estimators fill .grad themselves: set self.automatic_optimization = False and "
                "call optimizer.zero_grad()/step() in training_step"
            )
        estimator = self._fogzo_estimator()
        info = estimator.estimate(closure)
        if log:
            self.log_dict(estimator_logs([info], estimator), on_step=True, on_epoch=False)
        return info

    def _fogzo_estimator(self) -> Estimator:
        if self.estimator is None:
            estimator = self.configure_estimator()
            if not isinstance(estimator, Estimator):
                raise TypeError(f"configure_estimator() returned {type(estimator).__name__}, not an estimator")
            self.estimator = estimator
        if hasattr(self.estimator, "backward") and self.estimator.backward is None:
            self.estimator.backward = self.manual_backward
        if self._fogzo_pending is not None:
            _restore(self.estimator, self._fogzo_pending)
            self._fogzo_pending = None
        return self.estimator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.estimator is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "estimator": type(self.estimator).__name__,
                "state": self.estimator.state_dict(),
            }
        elif self._fogzo_pending is not None:  # saved again before the first step of a resumed run
            checkpoint[CHECKPOINT_KEY] = self._fogzo_pending

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        if self.estimator is not None:
            _restore(self.estimator, saved)
        else:
            self._fogzo_pending = saved


def _restore(estimator: Estimator, saved: dict) -> None:
    if saved.get("estimator") != type(estimator).__name__:
        raise ValueError(
            f"the checkpoint holds the state of a {saved.get('estimator')} estimator, this module uses "
            f"{type(estimator).__name__}; resume with the same estimator (or drop '{CHECKPOINT_KEY}' from the checkpoint)"
        )
    estimator.load_state_dict(saved["state"])
