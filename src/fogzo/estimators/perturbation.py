"""Former home of the perturbed set, the noise streams, FSDP sharding and the state guard,
now split by concern; re-exported here so that ``from fogzo.estimators.perturbation import X``
keeps working:

* :mod:`fogzo.estimators.perturbed_set` — which tensors are perturbed and how a pass puts
  ``W + δ`` in their place (:mod:`fogzo.estimators.read_plan`: where, and the read check);
* :mod:`fogzo.estimators.noise` — seeds and the block / counter noise streams;
* :mod:`fogzo.estimators.sharding` — FSDP2 / ``DTensor`` shards;
* :mod:`fogzo.estimators.state` — snapshots of buffers, the RNG and the state guard.

A module constant patched here (``NOISE_BLOCK``, ``COUNTER_CHUNK``) does not reach the code:
patch it in :mod:`fogzo.estimators.noise`, where it is read.
"""

from .noise import (
    COUNTER_CHUNK,
    NOISE_BLOCK,
    NOISE_STREAM,
    NOISE_STREAMS,
    SIGN_STREAM,
    block_noise,
    compiled_counter,
    counter_bits,
    counter_noise,
    derive_seed,
)
from .perturbed_set import PerturbedSet, PerturbedTensor
from .sharding import local_part
from .state import Snapshot, StateGuard, state_buffers

__all__ = [
    "COUNTER_CHUNK", "NOISE_BLOCK", "NOISE_STREAM", "NOISE_STREAMS", "SIGN_STREAM", "PerturbedSet",
    "PerturbedTensor", "Snapshot", "StateGuard", "block_noise", "compiled_counter", "counter_bits",
    "counter_noise", "derive_seed", "local_part", "state_buffers",
]
