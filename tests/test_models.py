"""Tests of the model zoo (``fogzo.models``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from fogzo.models import (
    LLAMA_CONFIGS,
    MODEL_REGISTRY,
    MLP,
    BasicBlock,
    Bottleneck,
    CausalSelfAttention,
    Llama,
    LlamaConfig,
    ResNet,
    RMSNorm,
    RotaryEmbedding,
    SelfAttention,
    VisionTransformer,
    apply_rotary,
    build_model,
    count_parameters,
    list_models,
    resnet20,
    vit_tiny_cifar,
)

# ---------------------------------------------------------------------------
# Small models and matching inputs, shared by several tests.
# ---------------------------------------------------------------------------

SMALL_LLAMA = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=32)


def _images(channels: int = 3, size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _tokens(vocab: int, length: int = 16, batch: int = 2) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(2))


# name -> (constructor, input factory, expected output shape)
SMALL_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], tuple[int, ...]]] = {
    "mlp": (lambda: MLP((784, 10, 10)), lambda: _images(1, 28), (2, 10)),
    "mlp_deep_gelu": (lambda: MLP((48, 32, 16, 5), activation="gelu"), lambda: _images(3, 4), (2, 5)),
    "resnet20": (lambda: resnet20(), lambda: _images(3), (2, 10)),
    "resnet20_gray": (lambda: resnet20(num_classes=7, in_channels=1), lambda: _images(1), (2, 7)),
    "resnet_imagenet_basic": (
        lambda: ResNet(BasicBlock, (1, 1, 1, 1), num_classes=5, width=8),
        lambda: _images(3, 64),
        (2, 5),
    ),
    "resnet_imagenet_bottleneck": (
        lambda: ResNet(Bottleneck, (1, 1, 1, 1), num_classes=5, width=8, in_channels=1),
        lambda: _images(1, 64),
        (2, 5),
    ),
    "vit_tiny_cifar": (lambda: vit_tiny_cifar(), lambda: _images(3), (2, 10)),
    "vit_gray_small": (
        lambda: VisionTransformer(
            image_size=16, patch_size=4, in_channels=1, num_classes=4, dim=24, depth=2, heads=2
        ),
        lambda: _images(1, 16),
        (2, 4),
    ),
    "llama-1m": (lambda: build_model("llama-1m"), lambda: _tokens(96), (2, 16, 96)),
    "llama_small_tied": (
        lambda: Llama(dataclasses.replace(SMALL_LLAMA, tie_embeddings=True)),
        lambda: _tokens(50),
        (2, 16, 50),
    ),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor, tuple[int, ...]]:
    constructor, make_input, shape = SMALL_MODELS[name]
    torch.manual_seed(0)
    return constructor().eval(), make_input(), shape


# ---------------------------------------------------------------------------
# Sizes and shapes
# ---------------------------------------------------------------------------


def test_mlp_has_7960_parameters_and_indexed_linear_layers() -> None:
    model = MLP((784, 10, 10))
    assert count_parameters(model) == 7_960
    assert [name for name, m in model.named_modules() if isinstance(m, nn.Linear)] == ["layers.0", "layers.1"]
    assert model.boundary_layers == ("layers.0", "layers.1")


def test_resnet20_size_and_names() -> None:
    model = resnet20()
    assert count_parameters(model) == 272_474  # 269,722 (option A) + 2,752 for two projections
    names = dict(model.named_modules())
    assert isinstance(names["conv1"], nn.Conv2d) and isinstance(names["fc"], nn.Linear)
    assert isinstance(names["layer2.0.downsample.0"], nn.Conv2d)
    assert "layer4" not in names
    stages = (model.layer1, model.layer2, model.layer3)
    assert [len(stage) for stage in stages] == [3, 3, 3]
    assert [stage[0].conv1.out_channels for stage in stages] == [16, 32, 64]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)],
)
def test_imagenet_resnets_match_reference_sizes(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = build_model(name)
    assert count_parameters(model) == expected  # torchvision's counts


def test_vit_tiny_cifar_is_small_and_deit_has_reference_size() -> None:
    assert count_parameters(vit_tiny_cifar()) < 1_000_000
    with torch.device("meta"):
        assert count_parameters(build_model("deit_tiny", num_classes=1000)) == 5_717_416
        assert count_parameters(build_model("deit_small", num_classes=1000)) == 22_050_664


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_output_shape(name: str) -> None:
    model, inputs, shape = _build(name)
    with torch.no_grad():
        out = model(inputs)
    assert out.shape == shape
    assert torch.isfinite(out).all()


PAPER_LLAMA_SIZES = ["llama-9m", "llama-20m", "llama-30m", "llama-95m", "llama-200m", "llama-300m"]


@pytest.mark.parametrize("name", PAPER_LLAMA_SIZES)
def test_llama_preset_size_matches_its_name(name: str) -> None:
    millions = float(re.fullmatch(r"llama-(\d+)m", name).group(1))  # type: ignore[union-attr]
    with torch.device("meta"):
        model = build_model(name)
    assert abs(count_parameters(model) / 1e6 - millions) <= 0.15 * millions


def test_tied_embeddings_share_one_parameter() -> None:
    untied = Llama(SMALL_LLAMA)
    tied = Llama(dataclasses.replace(SMALL_LLAMA, tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert count_parameters(untied) - count_parameters(tied) == SMALL_LLAMA.vocab_size * SMALL_LLAMA.dim


def test_llama_config_default_hidden_dim() -> None:
    assert LlamaConfig(dim=128, n_heads=4).hidden_dim == 352  # int(8/3 * 128) = 341 -> 352
    assert LlamaConfig(dim=96, n_heads=3, hidden_dim=200).hidden_dim == 200
    with pytest.raises(ValueError):
        LlamaConfig(dim=100, n_heads=3)


# ---------------------------------------------------------------------------
# Transformer behaviour
# ---------------------------------------------------------------------------


def test_llama_is_causal() -> None:
    torch.manual_seed(0)
    model = Llama(SMALL_LLAMA).eval()
    tokens = _tokens(SMALL_LLAMA.vocab_size, length=12)
    changed = tokens.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % SMALL_LLAMA.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-4


def test_rotary_scores_depend_only_on_relative_position() -> None:
    head_dim, length = 16, 24
    rotary = RotaryEmbedding(head_dim, max_seq_len=length)
    cos, sin = rotary(length)
    generator = torch.Generator().manual_seed(3)
    query, key = torch.randn(2, head_dim, generator=generator)
    # The same query/key vector at every position: score[m, n] = <R_m q, R_n k>.
    rotated_q = apply_rotary(query.expand(length, head_dim), cos, sin)
    rotated_k = apply_rotary(key.expand(length, head_dim), cos, sin)
    scores = rotated_q @ rotated_k.T
    # Toeplitz: score[m + 1, n + 1] == score[m, n].
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], rtol=0, atol=1e-5)
    # ... but it does depend on the offset m - n, and the rotation preserves norms.
    assert (scores[0] - scores[0, 0]).abs().max() > 1e-2
    torch.testing.assert_close(rotated_q.norm(dim=-1), query.norm().expand(length))
    # Position 0 is not rotated.
    torch.testing.assert_close(rotated_q[0], query)


def test_attention_matches_an_explicit_softmax_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 24)
    # ViT: fused qkv, no mask.
    vit_attention = SelfAttention(dim=24, heads=3).eval()
    q, k, v = vit_attention.qkv(x).view(2, 6, 3, 3, 8).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = vit_attention.proj((probs @ v).transpose(1, 2).reshape(2, 6, 24))
    torch.testing.assert_close(vit_attention(x), expected)
    # LLaMA: separate projections, rotary q/k, causal mask.
    config = LlamaConfig(vocab_size=10, dim=24, n_layers=1, n_heads=3, max_seq_len=6)
    llama_attention = CausalSelfAttention(config).eval()
    cos, sin = RotaryEmbedding(8, 6)(6)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 6, 3, 8).transpose(1, 2)

    q = apply_rotary(heads(llama_attention.q_proj(x)), cos, sin)
    k = apply_rotary(heads(llama_attention.k_proj(x)), cos, sin)
    v = heads(llama_attention.v_proj(x))
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(future, float("-inf"))
    expected = llama_attention.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 24))
    torch.testing.assert_close(llama_attention(x, cos, sin), expected)


def test_rms_norm_matches_its_equation() -> None:
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)


def test_rotary_tables_are_non_persistent_buffers() -> None:
    model = Llama(SMALL_LLAMA)
    buffers = dict(model.named_buffers())
    assert buffers["rotary.cos"].shape == (SMALL_LLAMA.max_seq_len, SMALL_LLAMA.head_dim)
    assert not any("rotary" in key for key in model.state_dict())


def test_input_size_checks() -> None:
    with pytest.raises(ValueError):
        Llama(SMALL_LLAMA)(_tokens(SMALL_LLAMA.vocab_size, length=SMALL_LLAMA.max_seq_len + 1))
    with pytest.raises(ValueError):
        vit_tiny_cifar()(_images(3, 28))


# ---------------------------------------------------------------------------
# Training-related properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_backward_gives_finite_gradients_for_every_parameter(name: str) -> None:
    model, inputs, _ = _build(name)
    model.train()
    out = model(inputs)
    out.float().pow(2).mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vit_tiny_cifar", "llama-1m"])
def test_construction_is_deterministic_given_the_seed(name: str) -> None:
    first, _, _ = _build(name)
    second, _, _ = _build(name)
    torch.manual_seed(123)
    third = SMALL_MODELS[name][0]()
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), third.parameters()))


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny_cifar", "llama-1m"])
def test_forward_uses_no_global_rng_without_dropout(name: str) -> None:
    model, inputs, _ = _build(name)
    model.train()
    state = torch.get_rng_state()
    model(inputs)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------
# Parameter ownership: estimators swap a module's parameters inside its forward
# ---------------------------------------------------------------------------


def _owned_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module._parameters.items() if p is not None}


@contextmanager
def _swap_inside_forward(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """During ``module``'s forward, its parameters are replaced by ``values`` (as the estimators do)."""
    originals = _owned_parameters(module)

    def swap_in(mod: nn.Module, args: object) -> None:
        mod._parameters.update(values)

    def swap_back(mod: nn.Module, args: object, output: object) -> None:
        mod._parameters.update(originals)

    handles = [module.register_forward_pre_hook(swap_in), module.register_forward_hook(swap_back)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        module._parameters.update(originals)


@contextmanager
def _poison_outside_forward(model: nn.Module) -> Iterator[None]:
    """Every parameter reads as NaN except while its owning module's forward runs."""
    handles = []
    saved: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    for module in model.modules():
        originals = _owned_parameters(module)
        if not originals:
            continue
        poisoned = {name: torch.full_like(p, float("nan")) for name, p in originals.items()}
        saved.append((module, originals))

        def restore(mod: nn.Module, args: object, originals: dict[str, torch.Tensor] = originals) -> None:
            mod._parameters.update(originals)

        def poison(
            mod: nn.Module, args: object, output: object, poisoned: dict[str, torch.Tensor] = poisoned
        ) -> None:
            mod._parameters.update(poisoned)

        handles += [module.register_forward_pre_hook(restore), module.register_forward_hook(poison)]
        module._parameters.update(poisoned)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, originals in saved:
            module._parameters.update(originals)


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_parameters_are_read_only_inside_their_owners_forward(name: str) -> None:
    model, inputs, _ = _build(name)
    with torch.no_grad():
        baseline = model(inputs)
        # 1. No parameter is read outside its owner's forward (it would read NaN).
        with _poison_outside_forward(model):
            poisoned = model(inputs)
        assert torch.equal(poisoned, baseline)
        # 2. Perturbing a module's parameters inside its forward reaches the output.
        owners = [module for module in model.modules() if _owned_parameters(module)]
        assert owners
        generator = torch.Generator().manual_seed(4)
        for module in owners:
            # Random (not constant) shifts: a constant shift of a layer feeding the residual
            # stream of a transformer is removed by the following LayerNorms.
            shifted = {
                key: p + torch.randn(p.shape, generator=generator)
                for key, p in _owned_parameters(module).items()
            }
            with _swap_inside_forward(module, shifted):
                perturbed = model(inputs)
            assert not torch.allclose(perturbed, baseline), module
        # 3. Hooks removed and parameters restored: bit-identical output again.
        assert torch.equal(model(inputs), baseline)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

SMALL_REGISTRY_INPUTS: dict[str, Callable[[], torch.Tensor]] = {
    "mlp": lambda: _images(1, 28),
    "resnet20": _images,
    "resnet32": _images,
    "resnet44": _images,
    "resnet56": _images,
    "vit_tiny_cifar": _images,
    "llama-1m": lambda: _tokens(96),
}


def test_registry_lists_the_expected_names() -> None:
    expected = {"mlp", "resnet20", "resnet18", "resnet50", "vit_tiny_cifar", "deit_tiny", "deit_small"}
    expected |= {"llama-1m", "llama-10m", "llama-9m", "llama-20m", "llama-30m", "llama-95m", "llama-200m"}
    expected |= {"llama-300m"}
    assert expected <= set(list_models())
    assert set(LLAMA_CONFIGS) <= set(MODEL_REGISTRY)


@pytest.mark.parametrize("name", list_models())
def test_build_model_knows_every_name(name: str) -> None:
    if name in SMALL_REGISTRY_INPUTS:
        model = build_model(name).eval()
        with torch.no_grad():
            out = model(SMALL_REGISTRY_INPUTS[name]())
        assert torch.isfinite(out).all()
    else:  # large models: shapes only, no memory
        with torch.device("meta"):
            model = build_model(name)
            if name.startswith("llama"):
                out = model(torch.zeros(2, 8, dtype=torch.long))
            else:
                size = 224 if name.startswith(("resnet", "deit")) else 32
                out = model(torch.empty(2, 3, size, size))
        assert out.device.type == "meta"
    assert out.shape[0] == 2
    assert count_parameters(model) > 0


def test_build_model_normalises_names_and_forwards_kwargs() -> None:
    assert isinstance(build_model("LLAMA_1M"), Llama)
    assert isinstance(build_model("vit-tiny-cifar", num_classes=3), VisionTransformer)
    assert build_model("resnet20", num_classes=100).fc.out_features == 100
    llama = build_model("llama-1m", dropout=0.1, dim=64, n_heads=2)
    assert llama.config.dropout == 0.1 and llama.config.hidden_dim == 192  # re-derived from dim 64
    with pytest.raises(KeyError):
        build_model("resnet21")
