"""The exact gradient of the smoothed loss, by single-level moves (an oracle estimator).

Every STE is a smoothing (docs/method.md): the quantized loss seen through the STE's noise is

    L_s(x) = E_u[ L(h(x + ε̄u)) ],        u_j ~ p i.i.d.,  x = W / c,

where ``h`` rounds each coordinate to its levels. Coordinate ``j`` lands on the level above
threshold ``t_k`` with probability ``P(x_j + ε̄u_j ≥ t_k)``, whose derivative in ``x_j`` is the
scaled density ``p_ε̄(t_k − x_j)``. Summing the level probabilities against the loss and
differentiating gives, exactly,

    ∂L_s/∂x_j = Σ_k p_ε̄(t_k − x_j) · E[ L(x_j at the level above t_k) − L(x_j at the level below t_k) ],

the expectation over the *other* coordinates, each drawn from its own smoothed (stochastically
rounded) distribution. For the identity STE on round (uniform noise one step wide) exactly one
threshold is in reach and its density is 1: the partial derivative is the expected loss change
of moving weight ``j`` between its two neighbouring levels, the other weights stochastically
rounded.

:class:`SmoothedGradient` estimates this with ``draws`` stochastic-rounding draws of all
quantized weights per step; for each draw it evaluates the loss with every needed single-level
move of every (or of a random subset of) quantized coordinate. The estimate is unbiased for
``∇L_s`` — the only randomness is the draw of the other coordinates, so there is no ``1/d``
variance as in n-SPSA. Its cost is one forward pass per (coordinate, level in reach) besides
the drawn one: about ``d`` forwards per draw for the identity STE, ``(levels − 1)·d`` for
smoothings with unbounded noise.

Two ways to evaluate a move, same numbers up to float rounding:

* **generic**: the moved weight tensors are stacked and evaluated by ``torch.func.vmap`` over
  the closure (a full forward per move; any model that ``vmap`` can run).
* **linear fast path** (``fast=True``, the default): for a :class:`~fogzo.layers.QuantLinear`
  without input quantization whose weight has no other owner, moving ``Q[i, j]`` by ``Δ``
  changes the layer's output by ``Δ·x[..., j]`` in column ``i``; a forward hook adds that to
  the output computed once with the drawn weights, so under ``vmap`` everything upstream of
  the layer runs once and only the downstream part runs per move. The first call checks a
  few moves of every such layer against full forwards; a layer whose weight is also read
  outside its forward (``nn.MultiheadAttention``'s ``out_proj``) fails the check and takes
  the generic path.

Models whose forward writes buffers (BatchNorm in training mode) cannot run under ``vmap``:
the moves are then evaluated one at a time (``vectorize=False``, chosen automatically with a
warning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import QuantLinear
from ..quantizers import LevelSet
from ..smoothing import Smoothing
from .base import Closure, EstimateInfo, checked_loss, differentiable_loss
from .noise import block_noise, derive_seed
from .perturbed_set import PerturbedSet, PerturbedTensor
from .state import CallState, StateGuard, StepCounter, run_guarded

__all__ = ["LevelMoves", "SmoothedGradient", "smoothed_partials"]

ROUNDING_STREAM = 2  # noise stream of the stochastic-rounding draws (0: ZO noise, 1: signs)
COORDINATE_STREAM = 3  # stream of the coordinate subsets
# Default moves per vectorized forward: about this many elements in each batched tensor
# (cache-sized on the fast path, where the layer's output is batched; larger on the generic
# path, where the stacked weights are).
FAST_CHUNK_ELEMENTS = 1 << 19
GENERIC_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LevelMoves:
    """The exact smoothed partial derivatives of one tensor at some of its coordinates.

    Attributes:
        name: the parameter's name in the model.
        coordinates: flat indices into the tensor, ``[m]``.
        partials: ``∂L_s/∂x`` at those coordinates for each draw, ``[draws, m]`` (normalised
            coordinates ``x = W/c``; divide by ``c`` for ``∂L_s/∂W``).
        moves: how many single-level moves (forward passes) were evaluated over all draws.
    """

    name: str
    coordinates: torch.Tensor
    partials: torch.Tensor
    moves: int

    @property
    def mean(self) -> torch.Tensor:
        """The estimate averaged over the draws, ``[m]``."""
        return self.partials.mean(dim=0)


def _level_values(levels: LevelSet, indices: torch.Tensor) -> torch.Tensor:
    """Level index ``0..num_levels-1`` → level value (sign: −1, +1)."""
    return levels.from_codes(indices.to(torch.uint8)) if indices.numel() else indices.float()


def _level_indices(levels: LevelSet, values: torch.Tensor) -> torch.Tensor:
    """Level value → index ``0..num_levels-1`` (int64)."""
    return levels.to_codes(values).long()


def broadcast_scale(entry: PerturbedTensor, eps_bar: float) -> torch.Tensor:
    """``c`` broadcast to the full shape of the tensor (per-tensor or per-channel α)."""
    scale = entry.coordinate_scale(eps_bar)
    param = entry.local_param()
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), device=param.device)
    return scale.to(param.dtype).expand_as(param)


def quantizer_levels(entry: PerturbedTensor) -> LevelSet:
    """The levels of the tensor's quantizer; ``ValueError`` without a quantizer, or for one whose
    view has no ``levels`` (torchao's, say: :class:`fogzo.WeightQuantizer` has them)."""
    if entry.quantizer is None:
        raise ValueError(f"{entry.name} has no quantizer: the smoothed gradient needs its levels")
    levels = getattr(entry.quantizer, "levels", None)
    if not isinstance(levels, LevelSet):
        raise ValueError(
            f"{entry.name}: the smoothed gradient needs the quantizer's levels, and its "
            f"{type(entry.quantizer).__name__} has none (a model quantized with fogzo.quantize has them)"
        )
    return levels


def _fast_layer(entry: PerturbedTensor, excluded: frozenset[int] | set[int] = frozenset()) -> QuantLinear | None:
    """The owning :class:`QuantLinear` if the linear fast path applies to ``entry``."""
    if entry.index in excluded or len(entry.owners) != 1:
        return None
    module, name = entry.owners[0]
    if type(module) is not QuantLinear or name != "weight":
        return None
    if module.input_quantizer is not None or not module.quantization_enabled:
        return None
    return module


def smoothed_partials(
    perturbed: PerturbedSet,
    closure: Closure,
    guard: StateGuard,
    *,
    seed: int,
    coordinates: Sequence[torch.Tensor],
    draws: int = 1,
    chunk: int | None = None,
    fast: bool = True,
    vectorize: bool = True,
    engine: _MoveEngine | None = None,
) -> list[LevelMoves]:
    """``∂L_s/∂x`` of every perturbed tensor at ``coordinates`` (flat indices), per draw.

    ``perturbed`` must hold quantized tensors only (each needs its levels). ``guard`` must
    have seen the unperturbed pass (:meth:`StateGuard.after_first_pass`); every pass here
    rewinds it, and it is closed on exit. The draws come from private generators seeded with
    ``(seed, tensor, draw)``. ``engine`` (internal) carries what earlier calls learned (that
    the model cannot run under vmap) from step to step.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws!r}")
    smoothing = perturbed.smoothing
    for entry in perturbed.tensors:
        quantizer_levels(entry)  # (raises without them)
        if entry.sharded:
            raise ValueError("the smoothed-gradient oracle does not support FSDP-sharded models")
    if engine is None:
        engine = _MoveEngine(perturbed, closure, guard, chunk=chunk, fast=fast, vectorize=vectorize)
    else:
        engine.closure, engine.guard = closure, guard
    per_tensor: list[list[torch.Tensor]] = [[] for _ in perturbed.tensors]
    moves = [0] * len(perturbed.tensors)
    try:
        for draw in range(draws):
            drawn = [
                _draw_levels(entry, smoothing, derive_seed(seed, ROUNDING_STREAM, entry.index, draw))
                for entry in perturbed.tensors
            ]
            engine.set_draw([scale * level for scale, level in drawn])
            base_loss = engine.base_loss()
            for entry, coords, (scale, level) in zip(perturbed.tensors, coordinates, drawn):
                partial, count = _tensor_partials(engine, entry, smoothing, coords, scale, level, base_loss)
                per_tensor[entry.index].append(partial)
                moves[entry.index] += count
    finally:
        guard.close()
    return [
        LevelMoves(entry.name, coords, torch.stack(values), count)
        for entry, coords, values, count in zip(perturbed.tensors, coordinates, per_tensor, moves)
    ]


def _draw_levels(entry: PerturbedTensor, smoothing: Smoothing, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, h(x + ε̄u))``: the coordinate scale and one stochastic rounding of the tensor."""
    param = entry.local_param()
    scale = broadcast_scale(entry, smoothing.eps_bar)
    noise = block_noise(smoothing, (seed,), param.shape, param.device, param.dtype)
    levels = quantizer_levels(entry).round(param / scale + smoothing.eps_bar * noise)
    return scale, levels


def _tensor_partials(
    engine: _MoveEngine,
    entry: PerturbedTensor,
    smoothing: Smoothing,
    coords: torch.Tensor,
    scale: torch.Tensor,
    drawn_levels: torch.Tensor,
    base_loss: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """``Σ_k p_ε̄(t_k − x_j)·(L(above t_k) − L(below t_k))`` at ``coords``; and the moves run."""
    levels = quantizer_levels(entry)
    flat_x = (entry.local_param() / scale).reshape(-1)
    x = flat_x[coords].double()
    thresholds = levels.first_threshold + torch.arange(levels.num_thresholds, dtype=torch.float64, device=x.device)
    density = smoothing.density(thresholds[None, :] - x[:, None])  # [m, K]
    reach = density > 0
    # Level k+1 lies above threshold k: a level is needed when a threshold next to it is in reach.
    needed = torch.zeros(len(coords), levels.num_levels, dtype=torch.bool, device=x.device)
    needed[:, :-1] |= reach
    needed[:, 1:] |= reach
    drawn_index = _level_indices(levels, drawn_levels.reshape(-1)[coords])
    losses = torch.full(needed.shape, math.nan, dtype=torch.float64, device=x.device)
    losses[torch.arange(len(coords), device=x.device), drawn_index] = base_loss.double()
    needed[torch.arange(len(coords), device=x.device), drawn_index] = False
    rows, level_index = needed.nonzero(as_tuple=True)
    if len(rows):
        flat_coords = coords[rows]
        new_levels = _level_values(levels, level_index).to(scale.dtype)
        old_levels = drawn_levels.reshape(-1)[flat_coords]
        delta = scale.reshape(-1)[flat_coords] * (new_levels - old_levels)  # the move of Q in weight units
        losses[rows, level_index] = engine.move_losses(entry, flat_coords, delta).double()
    differences = losses[:, 1:] - losses[:, :-1]  # L(above t_k) − L(below t_k)
    partial = torch.where(reach, density * differences, 0.0).sum(dim=1)
    return partial.to(flat_x.dtype), len(rows)


class _MoveEngine:
    """Evaluates the loss at the drawn weights and at single-coordinate moves from them."""

    def __init__(
        self,
        perturbed: PerturbedSet,
        closure: Closure,
        guard: StateGuard,
        *,
        chunk: int | None,
        fast: bool,
        vectorize: bool,
    ) -> None:
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")
        self.perturbed = perturbed
        self.closure = closure
        self.guard = guard
        self.chunk = chunk
        self.fast = fast
        self.vectorize = vectorize
        self.drawn: list[torch.Tensor] = []
        self._output_numel: dict[int, int] = {}
        self.slow: set[int] = set()  # tensors whose fast path failed its check: generic path

    def set_draw(self, weights: list[torch.Tensor]) -> None:
        self.drawn = weights

    def _loss(self) -> torch.Tensor:
        return checked_loss(self.closure()).detach().float()

    def base_loss(self) -> torch.Tensor:
        """The loss at the drawn weights (records each fast layer's output size)."""
        handles = []
        for entry in self.perturbed.tensors:
            layer = _fast_layer(entry, self.slow) if self.fast else None
            if layer is not None:

                def record(module: nn.Module, args: object, output: torch.Tensor, index: int = entry.index) -> None:
                    self._output_numel[index] = output.numel()

                handles.append(layer.register_forward_hook(record))
        try:
            self.guard.rewind()
            with torch.inference_mode(), self.perturbed.swapped(lambda e: self.drawn[e.index]):
                loss = self._loss()
        finally:
            for handle in handles:
                handle.remove()
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"non-finite loss {float(loss)} at a stochastic rounding of the weights")
        return loss

    def _chunk_size(self, entry: PerturbedTensor, fast: bool) -> int:
        if self.chunk is not None:
            return self.chunk
        if fast:
            budget, per_move = FAST_CHUNK_ELEMENTS, self._output_numel.get(entry.index, 1)
        else:
            budget, per_move = GENERIC_CHUNK_ELEMENTS, entry.param.numel()
        return int(max(1, min(4096, budget // max(per_move, 1))))

    def move_losses(self, entry: PerturbedTensor, coords: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The loss with ``Q.flatten()[coords[r]] += delta[r]`` for each ``r`` (others at the draw)."""
        results = []
        start = 0
        while start < len(coords):
            layer = _fast_layer(entry, self.slow) if self.fast and self.vectorize else None
            size = self._chunk_size(entry, layer is not None) if self.vectorize else len(coords)
            c, d = coords[start : start + size], delta[start : start + size]
            if not self.vectorize:
                results.append(self._looped_chunk(entry, c, d))
                start += len(c)
                continue
            try:
                if layer is not None:
                    results.append(self._fast_chunk(entry, layer, c, d))
                else:
                    results.append(self._generic_chunk(entry, c, d))
            except RuntimeError as error:
                if not _is_vmap_error(error):
                    raise
                warnings.warn(
                    f"the smoothed-gradient moves cannot run under torch.func.vmap ({error}); "
                    "evaluating them one at a time (pass vectorize=False to skip this attempt)",
                    stacklevel=4,
                )
                self.vectorize = False
                continue
            start += len(c)
        return torch.cat(results)

    def _moved_stack(self, entry: PerturbedTensor, coords: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        base = self.drawn[entry.index]
        stack = base.reshape(1, -1).repeat(len(coords), 1)
        rows = torch.arange(len(coords), device=stack.device)
        stack[rows, coords] += delta
        return stack.reshape(len(coords), *base.shape)

    def _replacement(self, entry: PerturbedTensor, weight: torch.Tensor):
        return lambda e: weight if e.index == entry.index else self.drawn[e.index]

    def _generic_chunk(self, entry: PerturbedTensor, coords: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        stack = self._moved_stack(entry, coords, delta)

        def loss_of(weight: torch.Tensor) -> torch.Tensor:
            with self.perturbed.swapped(self._replacement(entry, weight)):
                return self._loss()

        self.guard.rewind()
        with torch.no_grad():
            return torch.func.vmap(loss_of, randomness="same")(stack)

    def _looped_chunk(self, entry: PerturbedTensor, coords: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        losses = []
        for coord, change in zip(coords, delta):
            weight = self.drawn[entry.index].clone()
            weight.view(-1)[coord] += change
            self.guard.rewind()
            with torch.inference_mode(), self.perturbed.swapped(self._replacement(entry, weight)):
                losses.append(self._loss())
        return torch.stack(losses)

    def _fast_chunk(
        self, entry: PerturbedTensor, layer: QuantLinear, coords: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        columns = layer.in_features
        rows, cols = coords // columns, coords % columns
        outputs = torch.arange(layer.out_features, device=coords.device)

        def loss_of(row: torch.Tensor, col: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
            def add_move(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                column = torch.index_select(args[0], -1, col.reshape(1))  # x[..., j], kept as [..., 1]
                return output + change.to(output.dtype) * column * (outputs == row).to(output.dtype)

            handle = layer.register_forward_hook(add_move)
            try:
                with self.perturbed.swapped(lambda e: self.drawn[e.index]):
                    return self._loss()
            finally:
                handle.remove()

        self.guard.rewind()
        with torch.no_grad():
            return torch.func.vmap(loss_of, randomness="same")(rows, cols, delta)


def _is_vmap_error(error: RuntimeError) -> bool:
    """Whether ``error`` says the model cannot run under vmap (not an error of the closure)."""
    text = str(error).lower()
    return "vmap" in text or "batched" in text or "batching rule" in text


class SmoothedGradient:
    """The exact gradient of the smoothed loss (unbiased, by single-level moves): an oracle.

    ``G_W = ∂L_s/∂x / c`` for every quantized weight (see the module docstring for the
    equation); every other parameter (biases, norms, learned step sizes) keeps the gradient of
    the STE pass, which runs first as in FOGZO. Use it as an estimator to descend the smoothed
    loss itself, or through :func:`fogzo.diagnose` to measure how far the STE is from it.

    Args:
        model: a model quantized with :func:`fogzo.quantize`.
        draws: stochastic-rounding draws per step (the estimate averages them).
        coordinates: ``None`` for every quantized coordinate, or ``m``: a fresh random subset
            of ``m`` coordinates per tensor each step; their partial derivatives are scaled by
            ``numel/m`` and the rest get 0, so the gradient stays unbiased (random-coordinate
            descent on the smoothed loss).
        seed: base seed of the draws and of the coordinate subsets.
        smoothing: the noise law and ``ε̄`` (default: the quantized layers' own, i.e. the STE's).
        chunk: moves per vectorized forward (default: sized from the layer's output or weight).
        fast: use the linear fast path where it applies (see the module docstring).
        vectorize: evaluate moves under ``torch.func.vmap`` (``False``: one forward each).

    Cost per step: 1 forward + 1 backward (the STE pass) plus, per draw, 1 forward at the drawn
    weights and one forward per (coordinate, level in reach other than the drawn one) —
    ``info.forward_passes`` counts them all. Practical up to ~10⁴–10⁵ quantized weights on a
    CPU; use ``coordinates=m`` beyond.

    Example::

        oracle = fogzo.SmoothedGradient(model, seed=0)
        info = oracle.estimate(lambda: F.cross_entropy(model(x), y))  # fills .grad
        optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        draws: int = 1,
        coordinates: int | None = None,
        seed: int = 0,
        smoothing: Smoothing | None = None,
        chunk: int | None = None,
        fast: bool = True,
        vectorize: bool = True,
    ) -> None:
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
            raise ValueError(f"draws must be an int >= 1, got {draws!r}")
        if coordinates is not None and (
            not isinstance(coordinates, int) or isinstance(coordinates, bool) or coordinates < 1
        ):
            raise ValueError(f"coordinates must be None or an int >= 1, got {coordinates!r}")
        self.model = model
        self.draws = draws
        self.coordinates = coordinates
        self.chunk = chunk
        self.fast = fast
        self.vectorize = vectorize
        self.perturbed = PerturbedSet.from_model(model, "quantized", smoothing=smoothing)
        self.counter = StepCounter(seed)
        self._checked = not fast
        self._engine: _MoveEngine | None = None

    def select_coordinates(self, step_seed: int) -> list[torch.Tensor]:
        """The flat coordinates of each tensor evaluated at a step (all, or a random subset)."""
        chosen = []
        for entry in self.perturbed.tensors:
            numel = entry.param.numel()
            device = entry.param.device
            if self.coordinates is None or self.coordinates >= numel:
                chosen.append(torch.arange(numel, device=device))
                continue
            generator = torch.Generator().manual_seed(derive_seed(step_seed, COORDINATE_STREAM, entry.index))
            chosen.append(torch.randperm(numel, generator=generator)[: self.coordinates].sort().values.to(device))
        return chosen

    def estimate(self, closure: Closure) -> EstimateInfo:
        """One step: fills ``.grad``; the state contract of FOGZO and n-SPSA
        (:mod:`fogzo.estimators.state`): a call that fails changes nothing."""
        self.perturbed.check_trainable()
        params = [p for p in self.model.parameters() if p.requires_grad]  # the STE backward writes these
        state = CallState(self.model, params, self.counter)
        return run_guarded(state, lambda: self._step(closure, state))

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        step, step_seed = self.counter.step, self.counter.step_seed()
        guard = StateGuard(self.model)
        loss0 = differentiable_loss(closure(), state.params)
        loss0.backward()
        guard.after_first_pass()
        coordinates = self.select_coordinates(step_seed)
        if self._engine is None:
            self._engine = _MoveEngine(
                self.perturbed, closure, guard, chunk=self.chunk, fast=self.fast, vectorize=self.vectorize
            )
        if not self._checked:
            self._check_fast_path(closure, guard, step_seed)
        results = smoothed_partials(
            self.perturbed,
            closure,
            guard,
            seed=step_seed,
            coordinates=coordinates,
            draws=self.draws,
            engine=self._engine,
        )
        eps_bar = self.perturbed.smoothing.eps_bar
        moves = 0
        gradients = []
        for entry, result in zip(self.perturbed.tensors, results):
            gradient = torch.zeros_like(entry.param)
            weight = entry.param.numel() / len(result.coordinates)
            scale = broadcast_scale(entry, eps_bar).reshape(-1)[result.coordinates]
            gradient.view(-1)[result.coordinates] = result.mean * (weight / scale)
            gradients.append(gradient)
            moves += result.moves
        self.perturbed.mask_padding_rows(gradients)
        for entry, gradient in zip(self.perturbed.tensors, gradients):
            entry.param.grad = gradient  # replaces this call's STE gradient
        state.commit()  # adds the gradients from before the call
        return EstimateInfo(
            loss=float(loss0.detach()),
            forward_passes=1 + self.draws + moves,
            backward_passes=1,
            beta=None,
            seed=step_seed,
            step=step,
        )

    def _check_fast_path(self, closure: Closure, guard: StateGuard, step_seed: int) -> None:
        """Compare a few fast-path moves with full forwards, once per estimator.

        A weight read outside its :class:`QuantLinear`'s forward (``nn.MultiheadAttention``
        reads ``out_proj.weight`` itself; a parent may call ``F.linear(x, child.weight)``) is
        invisible to the output hook: its moves then take the generic path.
        """
        smoothing = self.perturbed.smoothing
        engine = self._engine
        assert engine is not None
        engine.closure, engine.guard = closure, guard
        drawn = [
            _draw_levels(e, smoothing, derive_seed(step_seed, ROUNDING_STREAM, e.index, 0))
            for e in self.perturbed.tensors
        ]
        engine.set_draw([scale * level for scale, level in drawn])
        base = engine.base_loss()
        for entry in self.perturbed.tensors:
            if _fast_layer(entry) is None or not engine.vectorize:
                continue
            numel = entry.param.numel()
            coords = torch.linspace(0, numel - 1, min(4, numel)).long().to(entry.param.device)
            scale, level = drawn[entry.index]
            levels = quantizer_levels(entry)
            current = level.reshape(-1)[coords]
            step = 2.0 if levels.is_sign else 1.0
            target = torch.where(current < levels.high, current + step, current - step)
            delta = scale.reshape(-1)[coords] * (target - current)
            fast = engine.move_losses(entry, coords, delta)
            engine.slow.add(entry.index)
            generic = engine.move_losses(entry, coords, delta)
            # Float32 losses of the same moves, summed in another order: a few ulps of |L|.
            if torch.allclose(fast, generic, rtol=0.0, atol=1e-4 * (1.0 + float(base.abs()))):
                engine.slow.discard(entry.index)
        self._checked = True

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)
