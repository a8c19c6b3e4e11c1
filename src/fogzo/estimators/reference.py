"""The FOGZO and n-SPSA step written plainly: the executable statement of docs/method.md §4.

This module is slow on purpose. It spells out every vector of the step, writes every
perturbed weight into the model, and accumulates the gradient term by term, so that it can
be checked against the equations by eye; the tests hold the fast estimators
(:class:`fogzo.FOGZO`, :class:`fogzo.SPSA`) to it. It is not used for training.

Coordinates (docs/method.md §1, §4). A perturbed tensor ``W`` is seen in normalised
coordinates ``x = W/c``: ``c = α`` (the quantizer's step: per tensor, per output channel or
per group, broadcast to ``W``) for a quantized weight, and ``c = ε/ε̄`` for a tensor
without a quantizer (a bias under ``perturb="all"``), so that one finite difference with
step ``ε̄`` in ``x`` serves every tensor. ``ε̄`` and the law ``p`` of the noise ``u`` are
those of the STE's smoothing (docs/method.md §2).

One FOGZO step at step ``t`` with ``n`` samples (docs/method.md §4)::

    1. STE pass      L0 = L(W),  g_W = ∂L/∂W (through the STE),  g_x = c·g_W,
                     ĝ = r·g_x/‖g_x‖                      (normalize="global", ‖·‖ over all
                                                            perturbed tensors together)
                     ĝ_k = r·g_x,k/(‖g_x,k‖·√K)            (normalize="tensor"; K = number of
                                                            tensors with g_x,k ≠ 0)
                     with ĝ_k = 0 wherever the norm it divides by is 0;  r = guide_norm.
    2. schedule      β_t = 1 − (1 − β_min)·min(t/T, 1)      (or a constant / user schedule)
    3. for i = 1..n  s_i ∈ {−1, +1},  u_i ~ p i.i.d. per coordinate,
                     v_i = √β_t·s_i·ĝ + √(1 − β_t)·u_i,
                     d_i = (L(x + ε̄v_i) − L(x − ε̄v_i)) / 2ε̄      (two-sided)
                     d_i = (L(x + ε̄v_i) − L0) / ε̄                 (one_sided=True)
                     where L(x + ε̄v) means the loss with W + c·ε̄·v in place of W.
    4. gradient      G_x = (1/n)·Σ_i d_i·v_i,   G_W = G_x/c   (term by term: G += d·v/c/n)
                     G_W replaces the STE gradient of the perturbed tensors; every other
                     trainable parameter keeps its back-propagated g_W.

n-SPSA is the same step with ``β = 0`` and no STE pass: ``v_i = u_i``, so
``G_W = (1/n)·Σ_i d_i·u_i/c`` (the one-sided form needs ``L0`` from an unperturbed pass).

Every loss of one step is evaluated on the same batch (the closure's), with the same
dropout masks (the global RNG is put back to where it was before the STE pass for every
perturbed pass) and with the buffers the STE pass left (running statistics are put back
before each perturbed pass). Afterwards the weights and buffers are as the STE pass left
them and the RNG as it was after the STE pass, which is what the fast estimators do.

The noise ``u_i`` and the signs ``s_i`` are arguments, so a test can hand in exactly what a
fast estimator drew (its draws are a pure function of ``(seed, step, tensor, sample)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .state import rng_state, set_rng_state  # saving the global RNG is not the method under test

__all__ = ["ReferenceStep", "beta_at", "fogzo_step", "guide", "spsa_step", "ste_pass"]

Scale = torch.Tensor | float
"""``c`` of one tensor: a tensor broadcastable to it (``α``) or a number (``ε/ε̄``)."""


@dataclass
class ReferenceStep:
    """Everything one reference step computed.

    Attributes:
        gradients: ``G_W`` for every perturbed tensor (in the order given).
        differences: the ``d_i``.
        losses: the perturbed losses in pass order (``+, −`` per sample; ``+`` only one-sided).
        directions: ``v_i`` per sample, one tensor per perturbed tensor (in ``x`` units).
        guide: ``ĝ`` per perturbed tensor (``None`` for n-SPSA).
        loss0: ``L0`` (``None`` for n-SPSA without a loss pass).
        ste_gradients: ``g_W`` of every parameter passed to :func:`ste_pass` (FOGZO only).
    """

    gradients: list[torch.Tensor]
    differences: list[float]
    losses: list[float]
    directions: list[list[torch.Tensor]]
    guide: list[torch.Tensor] | None
    loss0: float | None
    ste_gradients: list[torch.Tensor | None] | None = None


def beta_at(step: int, total_steps: int, beta_min: float) -> float:
    """``β_t = 1 − (1 − β_min)·min(t/T, 1)``: 1 at ``t = 0``, ``β_min`` from ``t = T`` on."""
    return 1.0 - (1.0 - beta_min) * min(step / total_steps, 1.0)


def guide(
    ste_gradients: Sequence[torch.Tensor],
    scales: Sequence[Scale],
    *,
    guide_norm: float = 1.0,
    normalize: str = "global",
) -> list[torch.Tensor]:
    """``ĝ`` from the STE gradients ``g_W`` of the perturbed tensors (step 1)."""
    g_x = [c * g for g, c in zip(ste_gradients, scales)]
    norms = [torch.sqrt((g * g).sum()) for g in g_x]
    if normalize == "global":
        total = math.sqrt(sum(float(norm) ** 2 for norm in norms))
        return [guide_norm * g / total if total > 0 else torch.zeros_like(g) for g in g_x]
    if normalize == "tensor":
        nonzero = sum(1 for norm in norms if norm > 0)
        return [
            guide_norm * g / (norm * math.sqrt(nonzero)) if norm > 0 else torch.zeros_like(g)
            for g, norm in zip(g_x, norms)
        ]
    raise ValueError(f"normalize must be 'global' or 'tensor', got {normalize!r}")


def ste_pass(
    closure: Callable[[], torch.Tensor], params: Sequence[nn.Parameter]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``L0 = closure()`` and ``g_W = ∂L0/∂W`` for every parameter in ``params`` (step 1)."""
    loss0 = closure()
    gradients = torch.autograd.grad(loss0, list(params), allow_unused=True)
    return loss0.detach(), list(gradients)


class _Evaluator:
    """``L(W + shift)``: the shifted weights written into the parameters, the closure run,
    the weights put back; RNG and buffers as they were before the STE pass / after it."""

    def __init__(
        self,
        closure: Callable[[], torch.Tensor],
        params: Sequence[nn.Parameter],
        model: nn.Module | None,
        rng_before: tuple,
    ) -> None:
        self.closure = closure
        self.params = list(params)
        self.buffers = [] if model is None else list(model.buffers())
        self.rng_before = rng_before
        self.rng_after = rng_state()
        self.buffers_after = [b.clone() for b in self.buffers]  # as the STE pass left them

    def __call__(self, shifts: Sequence[torch.Tensor]) -> float:
        originals = [p.detach().clone() for p in self.params]
        set_rng_state(self.rng_before)
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.buffers_after):
                buffer.copy_(saved)
            for param, original, shift in zip(self.params, originals, shifts):
                param.copy_(original + shift)
            try:
                loss = float(self.closure())
            finally:
                for param, original in zip(self.params, originals):
                    param.copy_(original)
        return loss

    def close(self) -> None:
        with torch.no_grad():
            for buffer, saved in zip(self.buffers, self.buffers_after):
                buffer.copy_(saved)
        set_rng_state(self.rng_after)


def _measure(
    evaluate: _Evaluator,
    scales: Sequence[Scale],
    directions: list[list[torch.Tensor]],
    *,
    eps_bar: float,
    one_sided: bool,
    loss0: float | None,
) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """Steps 3 (the ``d_i``) and 4 (``G += d·v/c/n``) for the given directions ``v_i``."""
    n = len(directions)
    gradients = [torch.zeros_like(v) for v in directions[0]]
    differences: list[float] = []
    losses: list[float] = []
    for v in directions:
        plus = evaluate([c * eps_bar * vk for c, vk in zip(scales, v)])  # L(x + ε̄v)
        losses.append(plus)
        if one_sided:
            assert loss0 is not None
            d = (plus - loss0) / eps_bar
        else:
            minus = evaluate([-c * eps_bar * vk for c, vk in zip(scales, v)])  # L(x − ε̄v)
            losses.append(minus)
            d = (plus - minus) / (2 * eps_bar)
        differences.append(d)
        for k, (c, vk) in enumerate(zip(scales, v)):
            gradients[k] += d * vk / c / n
    evaluate.close()
    return gradients, differences, losses


def fogzo_step(
    closure: Callable[[], torch.Tensor],
    params: Sequence[nn.Parameter],
    scales: Sequence[Scale],
    noises: Sequence[Sequence[torch.Tensor]],
    signs: Sequence[float],
    *,
    beta: float,
    eps_bar: float,
    guide_norm: float = 1.0,
    normalize: str = "global",
    one_sided: bool = False,
    model: nn.Module | None = None,
    others: Sequence[nn.Parameter] = (),
) -> ReferenceStep:
    """One FOGZO step (module docstring), computed plainly.

    Args:
        closure: the loss closure (a forward pass reading ``params``).
        params: the perturbed tensors; ``scales``: their ``c``.
        noises: ``noises[i][k]`` is ``u_i`` of tensor ``k``; ``signs[i]`` is ``s_i``.
        beta: ``β_t`` of this step (:func:`beta_at`).
        model: whose buffers the perturbed passes must not change (and see as the STE pass
            left them); ``None`` if it has none.
        others: trainable parameters outside the perturbed set: their ``g_W`` is returned
            in ``ste_gradients`` after those of ``params``.
    """
    rng_before = rng_state()
    loss0, gradients = ste_pass(closure, [*params, *others])
    evaluate = _Evaluator(closure, params, model, rng_before)
    g_hat = guide(
        [g if g is not None else torch.zeros_like(p) for g, p in zip(gradients, params)],
        scales,
        guide_norm=guide_norm,
        normalize=normalize,
    )
    directions = [
        [math.sqrt(beta) * s * gk + math.sqrt(1.0 - beta) * uk for gk, uk in zip(g_hat, u)]
        for s, u in zip(signs, noises)
    ]
    result, differences, losses = _measure(
        evaluate, scales, directions, eps_bar=eps_bar, one_sided=one_sided, loss0=float(loss0)
    )
    return ReferenceStep(result, differences, losses, directions, g_hat, float(loss0), gradients)


def spsa_step(
    closure: Callable[[], torch.Tensor],
    params: Sequence[nn.Parameter],
    scales: Sequence[Scale],
    noises: Sequence[Sequence[torch.Tensor]],
    *,
    eps_bar: float,
    one_sided: bool = False,
    report_loss: bool = True,
    model: nn.Module | None = None,
) -> ReferenceStep:
    """One n-SPSA step: ``v_i = u_i``, no STE pass; an unperturbed pass for ``L0`` when
    ``report_loss`` (the perturbed passes then see the buffers it left) or one-sided."""
    rng_before = rng_state()
    loss0 = None
    if report_loss or one_sided:
        with torch.no_grad():
            loss0 = float(closure())
    evaluate = _Evaluator(closure, params, model, rng_before)
    directions = [list(u) for u in noises]
    result, differences, losses = _measure(
        evaluate, scales, directions, eps_bar=eps_bar, one_sided=one_sided, loss0=loss0
    )
    return ReferenceStep(result, differences, losses, directions, None, loss0)
