"""Export of quantized models: packed integer codes, step sizes, and a safetensors file.

:func:`export` turns a model prepared with :func:`fogzo.quantize` into an
:class:`ExportedModel`:

* for every quantized layer a :class:`QuantizedWeight` holding the integer codes of
  ``h(W/α)`` (``code = level − low``, or ``1`` for ``+1`` / ``0`` for ``−1`` with sign
  levels) packed into ``uint8``, the step sizes ``α`` (float32, shape ``()`` or
  ``(C, 1, …, 1)``), the level set and the weight's shape and dtype, so that::

      weight = α · levels.from_codes(unpack_codes(packed, bits, numel)).reshape(shape)

  is exactly the fake-quantized weight ``Q(W)`` the layer uses in its forward pass;
* every other entry of the model's state dict (biases, norms, running statistics,
  unquantized layers, …) as it is, under its state-dict name. The latent weights and the
  weight quantizers' ``α`` entries are left out: ``α`` is stored once, with the codes.

:func:`rebuild_float_model` turns an export back into a plain float model (``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``) whose outputs equal the fake-quantized
model's.

One job per module:

* :mod:`~fogzo.export.packing`: bit-packing of the codes (:func:`pack_codes`,
  :func:`unpack_codes`, the container widths);
* :mod:`~fogzo.export.weights`: :class:`QuantizedWeight`, one layer's packed codes and ``α``;
* :mod:`~fogzo.export.exported`: :class:`ExportedModel`, all layers plus the other tensors;
* :mod:`~fogzo.export.format`: the file layout (tensor names, metadata, checksum order);
* :mod:`~fogzo.export.safetensors_io`: writing and reading safetensors files, the checksum;
* :mod:`~fogzo.export.conversion`: :func:`export` and :func:`rebuild_float_model`.
"""

from __future__ import annotations

from .conversion import export, rebuild_float_model
from .exported import ExportedModel
from .format import FORMAT_NAME, FORMAT_VERSION
from .packing import CONTAINER_BITS, container_bits, pack_codes, unpack_codes
from .weights import QuantizedWeight

__all__ = [
    "CONTAINER_BITS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ExportedModel",
    "QuantizedWeight",
    "container_bits",
    "export",
    "pack_codes",
    "rebuild_float_model",
    "unpack_codes",
]
