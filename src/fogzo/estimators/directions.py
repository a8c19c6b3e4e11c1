"""What a perturbation direction is made of: ``v_i = guide_weight · ĝ + noise_weight · u_i``
(:class:`Direction`), the STE direction ``ĝ`` of one tensor (:class:`Guide`), and the
coordinate scales ``c`` of all perturbed tensors for one step (:class:`ScaleSet`)
(docs/method.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .perturbed_set import PerturbedSet

__all__ = ["Direction", "Guide", "ScaleSet"]


@dataclass(frozen=True)
class Direction:
    """Sample ``i`` of the perturbation ``v_i = guide_weight · ĝ + noise_weight · u_i``.

    ``guide_weight = √β·s_i`` and ``noise_weight = √(1−β)`` are numbers (the noise tensor
    ``u_i`` itself comes from :meth:`PerturbedSet.noise`); ``ĝ`` for one tensor is
    ``Guide.norm_factor · c · g_W``.
    """

    sample: int
    guide_weight: float
    noise_weight: float


@dataclass(frozen=True)
class Guide:
    """The STE direction of one tensor: ``ĝ = norm_factor · c · gradient`` (``gradient = g_W``).

    ``norm_factor`` is ``r/‖g_x‖`` (``normalize="global"``) or ``r/(‖g_x,k‖·√K)``
    (``"tensor"``), 0 where that norm is 0; a device scalar (no host sync). The guide holds
    ``g_W`` and this factor, not ``ĝ``: ``c`` is applied where ``ĝ`` is used."""

    gradient: torch.Tensor
    norm_factor: torch.Tensor | float


class ScaleSet:
    """The coordinate scales ``c`` of the perturbed tensors for one step, arranged so that a
    per-tensor coefficient ``f(c)`` costs a few operators for all tensors together.

    ``values[k]`` is ``c`` of tensor ``k``: a 0-d tensor (one ``α`` per tensor), a tensor
    broadcastable to the weight (per-channel/per-group ``α``) or a Python float
    (``c = ε/ε̄``). The 0-d ones are stacked into one vector, so :meth:`per_tensor` evaluates
    ``f`` once on the vector (one kernel per operator of ``f``, whatever the number of
    tensors) and hands each tensor a view of its element; the others get ``f(c)`` one by one.
    """

    def __init__(self, perturbed: PerturbedSet) -> None:
        eps_bar = perturbed.smoothing.eps_bar
        self.values: list[torch.Tensor | float] = [entry.coordinate_scale(eps_bar) for entry in perturbed.tensors]
        self.stacked = [i for i, c in enumerate(self.values) if isinstance(c, torch.Tensor) and c.dim() == 0]
        self.others = [i for i in range(len(self.values)) if i not in set(self.stacked)]
        self.vector = torch.stack([self.values[i] for i in self.stacked]) if self.stacked else None  # type: ignore[misc]
        self._squares: ScaleSet | None = None

    def squares(self) -> ScaleSet:
        """``c²`` per tensor, as a :class:`ScaleSet` (computed once per step)."""
        if self._squares is None:
            squares = ScaleSet.__new__(ScaleSet)
            squares.stacked, squares.others, squares._squares = self.stacked, self.others, None
            squares.vector = None if self.vector is None else self.vector * self.vector
            squares.values = [0.0 if i in set(self.stacked) else c * c for i, c in enumerate(self.values)]  # type: ignore[operator]
            self._squares = squares
        return self._squares

    def per_tensor(self, f: Callable[[torch.Tensor | float], torch.Tensor | float]) -> list[torch.Tensor | float]:
        """``[f(c_k) for every tensor k]`` (elementwise ``f``; the stacked scales in one call)."""
        out: list[torch.Tensor | float] = [0.0] * len(self.values)
        if self.vector is not None:
            for i, value in zip(self.stacked, f(self.vector).unbind()):  # type: ignore[union-attr]
                out[i] = value
        for i in self.others:
            out[i] = f(self.values[i])
        return out
