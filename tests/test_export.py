"""Tests of model export (``fogzo.export``): code packing, safetensors files, rebuilding."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fogzo
from fogzo.export import (
    CONTAINER_BITS,
    ExportedModel,
    QuantizedWeight,
    container_bits,
    export,
    pack_codes,
    rebuild_float_model,
    unpack_codes,
)
from fogzo.layers import QuantizedLayer

BITS = (1, "ternary", 2, 3, 4, 8)
EXPECTED_CONTAINER = {1: 1, "ternary": 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}

# ---------------------------------------------------------------------------------------
# Small models
# ---------------------------------------------------------------------------------------


def conv_model() -> tuple[nn.Module, torch.Tensor]:
    """Conv2d + BatchNorm (F32 running stats, an I64 counter) + Linear; 8x8 images."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )
    x = torch.randn(3, 1, 8, 8)
    model(x)  # training-mode pass: non-trivial running statistics
    return model, x


def embedding_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(20, 8, padding_idx=0), nn.Linear(8, 3))
    return model, torch.randint(0, 20, (4, 6))


MODELS = {"conv": conv_model, "embedding": embedding_model}


def quantized(
    kind: str, bits: int | str, per_channel: bool, step_size: str, **extra: object
) -> tuple[nn.Module, torch.Tensor]:
    """A model of ``kind`` quantized with these settings, in eval mode, and an input."""
    model, x = MODELS[kind]()
    config = fogzo.QuantConfig(
        bits=bits, per_channel=per_channel, step_size=step_size, **extra  # type: ignore[arg-type]
    )
    fogzo.quantize(model, config)
    if step_size == "lsq":
        # Simulate training: the export must use the current learned step sizes.
        with torch.no_grad():
            for _, layer in fogzo.quantized_layers(model):
                alpha = layer.weight_quantizer.alpha
                alpha.mul_(torch.empty_like(alpha).uniform_(0.8, 1.2))
    return model.eval(), x


CASES = [
    (kind, bits, per_channel, step_size)
    for kind in MODELS
    for bits in BITS
    for per_channel in (False, True)
    for step_size in ("fixed", "lsq")
]


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    per_byte = 8 // bits
    packed = []
    for start in range(0, len(codes), per_byte):
        byte = 0
        for i, code in enumerate(codes[start : start + per_byte]):
            byte |= code << (i * bits)
        packed.append(byte)
    return packed


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[list[int], int]:
    bits = draw(st.sampled_from(CONTAINER_BITS))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=67))
    return codes, bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_round_trip(case: tuple[list[int], int]) -> None:
    codes, bits = case
    tensor = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_codes(tensor, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(len(codes) * bits / 8)
    assert packed.tolist() == _reference_pack(codes, bits)  # little-endian within a byte
    unpacked = unpack_codes(packed, bits, len(codes))
    assert unpacked.dtype == torch.uint8
    assert unpacked.tolist() == codes


def test_pack_is_little_endian_within_a_byte() -> None:
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b1000_0001]
    assert pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b00_11_10_01]
    assert pack_codes(torch.tensor([0xA, 0x5, 0x3], dtype=torch.uint8), 4).tolist() == [0x5A, 0x03]
    assert pack_codes(torch.tensor([[7, 255]], dtype=torch.uint8), 8).tolist() == [7, 255]


def test_pack_and_unpack_reject_bad_arguments() -> None:
    codes = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(codes, 3)
    with pytest.raises(ValueError, match="does not fit in 1 bits"):
        pack_codes(codes, 1)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(codes.long(), 2)
    with pytest.raises(ValueError, match="pack into 1 bytes, got 2"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 2, 3)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), True, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", list(EXPECTED_CONTAINER))
def test_container_bits(bits: int | str) -> None:
    assert container_bits(fogzo.level_set(bits)) == EXPECTED_CONTAINER[bits]


# ---------------------------------------------------------------------------------------
# export / rebuild: equality with the fake-quantized model
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, bits, per_channel, step_size", CASES)
def test_rebuilt_float_model_matches_fake_quantized(
    kind: str, bits: int | str, per_channel: bool, step_size: str
) -> None:
    model, x = quantized(kind, bits, per_channel, step_size)
    exported = export(model)
    assert [layer.module for layer in exported.layers] == [name for name, _ in fogzo.quantized_layers(model)]
    for layer, (_, source) in zip(exported.layers, fogzo.quantized_layers(model)):
        assert layer.levels == fogzo.level_set(bits)
        assert layer.per_channel == per_channel
        assert torch.equal(layer.codes(), source.weight_quantizer.codes(source.weight))
        with torch.no_grad():
            assert torch.equal(layer.dequantize(), source.quantized_weight())

    rebuilt = rebuild_float_model(model, exported).eval()
    assert not any(isinstance(m, QuantizedLayer) for m in rebuilt.modules())
    plain = {fogzo.QuantLinear: nn.Linear, fogzo.QuantConv2d: nn.Conv2d, fogzo.QuantEmbedding: nn.Embedding}
    assert [type(m) for m in rebuilt.children()] == [plain.get(type(m), type(m)) for m in model.children()]
    for module in rebuilt.modules():
        assert not hasattr(module, "weight_quantizer") and not hasattr(module, "quantization_enabled")
    assert set(rebuilt.state_dict()) == set(exported.dequantized_state_dict())
    # Same weights, same torch kernels, same summation order: bit-for-bit equal outputs.
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # The quantized model itself is untouched.
    assert sum(isinstance(m, QuantizedLayer) for m in model.modules()) == len(exported.layers)


def test_rebuild_from_the_unquantized_original() -> None:
    original, x = conv_model()
    model = fogzo.quantize(copy.deepcopy(original), fogzo.QuantConfig(bits=2, per_channel=True)).eval()
    rebuilt = rebuild_float_model(original, export(model)).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
        assert not torch.equal(original.eval()(x), model(x))  # the test can tell them apart


def test_export_excludes_latent_weights_and_stores_alpha_once() -> None:
    model, _ = quantized("conv", 2, True, "lsq")
    exported = export(model)
    assert set(exported.tensors) == {
        "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked", "4.bias"
    }
    assert exported.tensors["1.num_batches_tracked"].dtype == torch.int64
    conv = exported.layers[0]
    assert conv.layer_type == "Conv2d" and conv.shape == (4, 1, 3, 3) and conv.dtype == torch.float32
    assert conv.alpha.dtype == torch.float32 and conv.alpha.shape == (4, 1, 1, 1)
    assert torch.equal(conv.alpha, model[0].weight_quantizer.alpha.detach())
    assert not conv.alpha.requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.module = "x"  # type: ignore[misc]


def test_skipped_layers_are_exported_as_float_tensors() -> None:
    original, x = conv_model()
    model = fogzo.quantize(copy.deepcopy(original), fogzo.QuantConfig(bits=4), skip=["4"]).eval()
    exported = export(model)
    assert [layer.module for layer in exported.layers] == ["0"]
    assert torch.equal(exported.tensors["4.weight"], original[4].weight.detach())
    with torch.no_grad():
        assert torch.equal(rebuild_float_model(model, exported).eval()(x), model(x))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_tied_weights() -> None:
    torch.manual_seed(2)
    tokens = torch.randint(0, 10, (2, 5))
    model = fogzo.quantize(TiedLM(), fogzo.QuantConfig(bits=2, step_size="lsq")).eval()
    rebuilt = rebuild_float_model(model, export(model))  # same α from the same weight: fine
    assert rebuilt.head.weight is rebuilt.embed.weight
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), model(tokens))
        model.head.weight_quantizer.alpha.mul_(1.5)
    with pytest.raises(ValueError, match="share one weight"):
        rebuild_float_model(model, export(model))


class SharedTwice(nn.Module):
    """The same Linear applied twice, reachable under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_module_reachable_under_two_names() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4)
    model = fogzo.quantize(SharedTwice(), fogzo.QuantConfig(bits=3)).eval()
    exported = export(model)
    assert len(exported.layers) == 1 and exported.layers[0].aliases == ("b",)
    assert "b.weight" not in exported.tensors and "b.weight_quantizer.alpha" not in exported.tensors
    rebuilt = rebuild_float_model(model, exported)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


# ---------------------------------------------------------------------------------------
# Sizes and repr
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_packed_size_is_bits_over_32_of_fp32(bits: int | str) -> None:
    model, _ = quantized("conv", bits, False, "fixed")
    exported = export(model)
    width = EXPECTED_CONTAINER[bits]
    for layer in exported.layers:
        assert layer.bits == width
        assert layer.packed.numel() == math.ceil(layer.numel * width / 8)
        assert abs(layer.packed.numel() - layer.fp32_nbytes * width / 32) < 1  # up to padding
    # 36 and 720 weights: 36 codes of 1 bit leave a padded byte.
    assert exported.layers[0].numel == 36
    other = sum(t.numel() * t.element_size() for t in exported.tensors.values())
    weights = sum(layer.numel for layer in exported.layers)
    assert exported.fp32_nbytes == 4 * weights + other
    assert exported.nbytes == sum(layer.packed.numel() + 4 for layer in exported.layers) + other
    assert exported.compression_ratio == pytest.approx(exported.fp32_nbytes / exported.nbytes)
    assert exported.compression_ratio > 1


def test_repr_is_readable() -> None:
    model, _ = quantized("conv", "ternary", True, "fixed")
    exported = export(model)
    text = repr(exported)
    assert text.startswith("ExportedModel(2 quantized layers, 7 other tensors")
    assert f"{exported.nbytes:,} B" in text and f"{exported.fp32_nbytes:,} B" in text
    assert f"compression {exported.compression_ratio:.2f}x" in text
    assert "'0': Conv2d ternary [-1..1] in 2-bit codes, shape (4, 1, 3, 3), " in text
    assert "per-channel alpha (4, 1, 1, 1); 25 B vs 144 B fp32" in text
    assert "tensor(" not in text  # no tensor dumps


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def assert_same_export(a: ExportedModel, b: ExportedModel) -> None:
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        for field in ("module", "layer_type", "levels", "shape", "dtype", "input_levels", "aliases", "bits"):
            assert getattr(x, field) == getattr(y, field), field
        for tensor in ("packed", "alpha"):
            u, v = getattr(x, tensor), getattr(y, tensor)
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), tensor
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        u, v = a.tensors[name], b.tensors[name]
        assert u.dtype == v.dtype and torch.equal(u, v), name


def read_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return size, json.loads(data[8 : 8 + size])


@pytest.mark.parametrize("kind, bits, per_channel, step_size", [c for c in CASES if c[3] == "lsq"])
def test_save_load_round_trip(
    tmp_path: Path, kind: str, bits: int | str, per_channel: bool, step_size: str
) -> None:
    model, x = quantized(kind, bits, per_channel, step_size)
    exported = export(model)
    path = tmp_path / "model.safetensors"
    exported.save(path)
    loaded = ExportedModel.load(path)
    assert_same_export(exported, loaded)
    assert repr(loaded) == repr(exported)
    with torch.no_grad():
        assert torch.equal(rebuild_float_model(model, loaded)(x), model(x))

    size, header = read_header(path)
    assert size % 8 == 0
    metadata = header.pop("__metadata__")
    assert metadata["format"] == "fogzo.export"
    layers = json.loads(metadata["layers"])
    assert [(e["module"], e["levels"]["name"], e["bits"], e["shape"]) for e in layers] == [
        (layer.module, layer.levels.name, layer.bits, list(layer.shape)) for layer in exported.layers
    ]
    assert json.loads(metadata["tensors"]) == list(exported.tensors)
    assert header["0.weight.codes"]["dtype"] == "U8" and header["0.weight.alpha"]["dtype"] == "F32"
    data_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    assert path.stat().st_size == 8 + size + data_bytes


def test_activation_quantizer_state_round_trips(tmp_path: Path) -> None:
    model, x = quantized("conv", 2, False, "fixed", activation_bits=4)
    model.train()(x)  # initialise the input quantizers' α
    exported = export(model)
    assert exported.layers[0].input_levels == fogzo.level_set(4)
    assert exported.tensors["0.input_quantizer.initialized"].dtype == torch.bool
    exported.save(tmp_path / "a.safetensors")
    assert_same_export(exported, ExportedModel.load(tmp_path / "a.safetensors"))


def test_safetensors_package_reads_our_files(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    model, _ = quantized("conv", 3, True, "lsq")
    exported = export(model)
    path = tmp_path / "model.safetensors"
    exported.save(path)
    theirs = load_file(str(path))
    ours = {}
    for layer in exported.layers:
        ours[f"{layer.module}.weight.codes"] = layer.packed
        ours[f"{layer.module}.weight.alpha"] = layer.alpha
    ours.update(exported.tensors)
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["format"] == "fogzo.export"
    assert json.loads(metadata["layers"])[0]["levels"]["name"] == "int3"


def test_our_reader_reads_safetensors_package_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fogzo.export.safetensors_io import _read_safetensors

    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "f64": torch.randn(1, 3, 1).double(),
        "i64": torch.tensor([-(2**40), 0, 5]),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(11, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    read, metadata = _read_safetensors(path)
    assert metadata == {"k": "v"}
    assert set(read) == set(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape
        assert torch.equal(read[name], tensor), name


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, _ = quantized("conv", "ternary", False, "fixed")
    path = tmp_path / "model.safetensors"
    export(model).save(path)
    return path


def _corrupt(path: Path, data: bytes) -> Path:
    bad = path.with_name("bad.safetensors")
    bad.write_bytes(data)
    return bad


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d[:5], "too short"),
        (lambda d: d[:40], "exceeds"),
        (lambda d: d + b"\0", "trailing bytes"),
        (lambda d: struct.pack("<Q", 2**40) + d[8:], "exceeds"),
        (lambda d: d[:8] + b"[" + d[9:], "not valid UTF-8 JSON"),
        (lambda d: d[:-3] + bytes([d[-3] ^ 0x40]) + d[-2:], "checksum"),
        (lambda d: b"", "too short"),
    ],
    ids=[
        "minus-one-byte", "five-bytes", "cut-in-header", "extra-byte",
        "huge-header", "bad-json", "flipped-data", "empty",
    ],
)
def test_corrupted_files_raise_value_error(saved: Path, damage, message: str) -> None:
    bad = _corrupt(saved, damage(saved.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        ExportedModel.load(bad)
    assert str(bad) in str(info.value)


def test_edited_header_offsets_are_rejected(saved: Path) -> None:
    size, header = read_header(saved)
    header["0.weight.codes"]["data_offsets"][1] += 1
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    bad = _corrupt(saved, struct.pack("<Q", len(encoded)) + encoded + saved.read_bytes()[8 + size :])
    with pytest.raises(ValueError, match="do not match"):
        ExportedModel.load(bad)


def test_the_checksum_does_not_depend_on_the_file_layout(tmp_path: Path, saved: Path) -> None:
    """Another writer may order the tensors differently; the sha256 covers them in metadata order."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(saved), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in reversed(list(file.keys()))}
    rewritten = tmp_path / "rewritten.safetensors"
    save_file(tensors, str(rewritten), metadata=metadata)
    assert_same_export(ExportedModel.load(saved), ExportedModel.load(rewritten))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] += 1  # a changed value, in a well-formed file
    save_file(tensors, str(rewritten), metadata=metadata)
    with pytest.raises(ValueError, match="checksum"):
        ExportedModel.load(rewritten)
    for key, value, message in [("sha256", None, "no 'sha256'"), ("format_version", "1", "export the model again")]:
        changed = {k: v for k, v in metadata.items() if k != key}
        if value is not None:
            changed[key] = value
        save_file(tensors, str(rewritten), metadata=changed)
        with pytest.raises(ValueError, match=message):
            ExportedModel.load(rewritten)


def test_plain_safetensors_file_is_not_an_export(tmp_path: Path) -> None:
    from fogzo.export.safetensors_io import _write_safetensors

    path = tmp_path / "plain.safetensors"
    _write_safetensors(path, {"w": torch.ones(2)}, {})
    with pytest.raises(ValueError, match="not a fogzo export"):
        ExportedModel.load(path)


def test_invalid_codes_are_rejected() -> None:
    model, _ = quantized("conv", "ternary", False, "fixed")
    layer = export(model).layers[0]  # 36 ternary codes, 2 bits each: 9 bytes, no padding
    with pytest.raises(ValueError, match="code out of range"):
        dataclasses.replace(layer, packed=torch.full_like(layer.packed, 0xFF))  # code 3: no level
    model, _ = quantized("conv", 3, False, "fixed")
    layer = export(model).layers[0]  # 36 codes of 4 bits: 18 bytes, no padding
    with pytest.raises(ValueError, match="need 18 bytes, got 17"):
        dataclasses.replace(layer, packed=layer.packed[:-1])
    with pytest.raises(ValueError, match="alpha must be float32"):
        dataclasses.replace(layer, alpha=layer.alpha.double())


def test_export_without_quantized_layers_raises() -> None:
    with pytest.raises(ValueError, match="no quantized layer.*fogzo.quantize"):
        export(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError):
        export("model")  # type: ignore[arg-type]


def test_rebuild_rejects_activation_quantization() -> None:
    model, x = quantized("conv", 2, False, "fixed", activation_bits=4)
    with pytest.raises(ValueError, match="activation quantization is not representable"):
        rebuild_float_model(model, export(model))


def test_rebuild_rejects_a_different_architecture() -> None:
    model, _ = quantized("conv", 2, False, "fixed")
    exported = export(model)
    with pytest.raises(ValueError, match="Linear"):
        wrong_width = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 6)
        )
        rebuild_float_model(wrong_width, exported)
    with pytest.raises(ValueError, match="is Identity with weight None"):  # a module without a weight
        rebuild_float_model(nn.Sequential(nn.Identity(), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)), exported)
    with pytest.raises(ValueError, match="no module '4'"):
        rebuild_float_model(nn.Sequential(nn.Conv2d(1, 4, 3)), exported)
    with pytest.raises(ValueError, match="does not match"):  # missing BatchNorm entries
        no_norm = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Identity(), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
        rebuild_float_model(no_norm, exported)
