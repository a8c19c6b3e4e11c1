"""The straight-through estimator: one forward, one backward through the STE surrogates."""

from __future__ import annotations

from torch import nn

from .base import Backward, Closure, EstimateInfo, differentiable_loss
from .state import CallState, Snapshot, StepCounter, run_guarded

__all__ = ["STE"]


class STE:
    """``G = ∇_W L`` with every quantizer's backward replaced by its surrogate slope.

    Cost: 1 forward + 1 backward (3 units). ``model`` is accepted for the common
    ``Estimator(model, ...)`` signature. ``backward``: a hook called with the loss instead
    of ``loss.backward()`` (see :data:`~fogzo.estimators.base.Backward`).

    Example::

        estimator = fogzo.STE(model)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
    """

    def __init__(self, model: nn.Module | None = None, *, backward: Backward | None = None) -> None:
        self.model = model
        self.backward = backward
        self.counter = StepCounter(0)
        self._snapshots = (Snapshot(),)  # reused by every call

    def estimate(self, closure: Closure) -> EstimateInfo:
        """``closure().backward()``; on failure (an exception in the closure or the backward,
        ``KeyboardInterrupt`` too) ``.grad``, buffers, the step counter and the global RNG
        are as before the call (``.grad`` and buffers only when ``model`` was given). A
        non-finite loss is not checked: it back-propagates as with plain ``backward``."""
        params = [] if self.model is None else [p for p in self.model.parameters() if p.requires_grad]
        state = CallState(self.model, params, self.counter, self._snapshots[0])
        return run_guarded(state, lambda: self._step(closure, state))

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        loss = differentiable_loss(closure(), state.params)
        if self.backward is None:
            loss.backward()
        else:
            self.backward(loss)
        info = EstimateInfo(  # loss: the 0-d tensor, no host sync in the step (see EstimateInfo)
            loss=loss.detach(), forward_passes=1, backward_passes=1, beta=None, seed=None, step=self.counter.step
        )
        state.commit()
        return info

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)
