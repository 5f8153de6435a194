"""Models: SPEC §1 parameter counts and layouts, the ConvNet name grammar, the zoo, flat parameters (§4.5, P10)."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from distillery.errors import UserError
from distillery.models import FunctionalModel, create_model, has_batchnorm, init_seeded, list_models

ZOO = ["MLP", "LeNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18_AP",
       "ResNet18BN_AP"]


@lru_cache(maxsize=None)
def built(name: str, channels: int = 3, num_classes: int = 10, size: int = 32) -> nn.Module:
    """One seeded instance per configuration, shared by tests that only read it."""
    return init_seeded(name, channels, num_classes, (size, size), seed=0)


def images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- hand-derived parameter counts from the SPEC §1.2 layer lists (independent of the implementation) ----
def conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def norm(c: int) -> int:  # GroupNorm(C, C) and BatchNorm2d both have a weight and a bias per channel
    return 2 * c


def resnet18_body(c: int) -> int:
    total = conv(c, 64, 3, bias=False) + norm(64)
    in_planes = 64
    for planes, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        total += conv(in_planes, planes, 3, bias=False) + norm(planes)
        total += conv(planes, planes, 3, bias=False) + norm(planes)
        if stride != 1 or in_planes != planes:
            total += conv(in_planes, planes, 1, bias=False) + norm(planes)
        in_planes = planes
    return total


ALEXNET_CONVS = conv(3, 128, 5) + conv(128, 192, 5) + conv(192, 256, 3) + conv(256, 192, 3) + conv(192, 192, 3)
VGG11_CONVS = sum(conv(i, o, 3) + norm(o) for i, o in
                  [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)])
EXPECTED_CIFAR10 = {
    "MLP": linear(3 * 32 * 32, 128) + linear(128, 128) + linear(128, 10),
    "LeNet": conv(3, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84) + linear(84, 10),
    "AlexNet": ALEXNET_CONVS + linear(192 * 4 * 4, 10),
    "AlexNetBN": ALEXNET_CONVS + norm(128 + 192 + 256 + 192 + 192) + linear(192 * 4 * 4, 10),
    "VGG11": VGG11_CONVS + linear(512, 10),
    "VGG11BN": VGG11_CONVS + linear(512, 10),
    "ResNet18": resnet18_body(3) + linear(512, 10),
    "ResNet18BN": resnet18_body(3) + linear(512, 10),
    "ResNet18_AP": resnet18_body(3) + linear(512 * 4 * 4, 10),
    "ResNet18BN_AP": resnet18_body(3) + linear(512 * 4 * 4, 10),
}


def test_hand_derivation_matches_published_cifar_sizes():
    # the widely quoted CIFAR-10 sizes of ResNet-18 (BasicBlock, 512->10 head) and of VGG11 (conv bias + norm)
    assert EXPECTED_CIFAR10["ResNet18"] == 11_173_962 and EXPECTED_CIFAR10["VGG11"] == 9_231_114


# ---- ConvNet family (SPEC §1.1) ----
@pytest.mark.parametrize("name, channels, num_classes, size, expected", [
    ("ConvNet", 3, 10, 32, 320_010),        # CIFAR-10
    ("ConvNet", 3, 100, 32, 504_420),       # CIFAR-100
    ("ConvNet", 1, 10, 28, 317_706),        # MNIST
    ("ConvNetD4", 3, 200, 64, 857_160),     # Tiny-ImageNet
    ("ConvNetD4", 3, 1000, 64, 2_496_360),  # ImageNet-1K @ 64
    ("ConvNetD5", 3, 10, 128, 615_690),     # ImageNet subsets @ 128
])
def test_convnet_parameter_counts_match_spec(name, channels, num_classes, size, expected):
    assert count(create_model(name, channels, num_classes, (size, size))) == expected


def test_convnet_on_grey_28x28_has_2048_features():
    model = create_model("ConvNetD3", 1, 10, (28, 28))
    feats = model.features(images(2, 1, 28)).flatten(1)
    assert feats.shape == (2, 2048)
    assert model.classifier.in_features == 2048
    assert model.features[0].padding == (3, 3)


def layers_of(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_convnet_default_is_depth3_width128_instance_norm_relu_avgpool():
    model = create_model("ConvNet", 3, 10, (32, 32))
    convs, norms = layers_of(model, nn.Conv2d), layers_of(model, nn.GroupNorm)
    assert [c.out_channels for c in convs] == [128, 128, 128]
    assert [(g.num_groups, g.num_channels, g.affine) for g in norms] == [(128, 128, True)] * 3
    assert len(layers_of(model, nn.ReLU)) == 3 and len(layers_of(model, nn.AvgPool2d)) == 3
    assert [type(m) for m in model.children()] == [nn.Sequential, nn.Linear]  # one linear head, nothing else


@pytest.mark.parametrize("name, check", [
    ("ConvNetD4", lambda m: len(layers_of(m, nn.Conv2d)) == 4),
    ("ConvNetW64", lambda m: {c.out_channels for c in layers_of(m, nn.Conv2d)} == {64}),
    ("ConvNetBN", lambda m: len(layers_of(m, nn.BatchNorm2d)) == 3 and not layers_of(m, nn.GroupNorm)),
    ("ConvNetNN", lambda m: not layers_of(m, nn.GroupNorm) and not layers_of(m, nn.BatchNorm2d)),
    ("ConvNetAS", lambda m: len(layers_of(m, nn.Sigmoid)) == 3 and not layers_of(m, nn.ReLU)),
    ("ConvNetKIP", lambda m: {c.out_channels for c in layers_of(m, nn.Conv2d)} == {1024}
     and not layers_of(m, nn.GroupNorm)),
    ("ConvNetD2W32MP", lambda m: [c.out_channels for c in layers_of(m, nn.Conv2d)] == [32, 32]
     and len(layers_of(m, nn.MaxPool2d)) == 2 and not layers_of(m, nn.AvgPool2d)),
])
def test_convnet_name_grammar_builds_the_named_layers(name, check):
    assert check(create_model(name, 3, 10, (32, 32)))


def test_unknown_model_name_lists_choices():
    with pytest.raises(UserError, match="unknown model 'NoSuchNet'") as err:
        create_model("NoSuchNet", 3, 10, (32, 32))
    assert "ResNet18" in str(err.value) and "ConvNet" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="ConvNetQQ"):
        create_model("ConvNetQQ", 3, 10, (32, 32))


# ---- the zoo (SPEC §1.2) ----
def test_zoo_is_registered():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_parameter_counts_follow_spec_layers(name):
    assert count(built(name)) == EXPECTED_CIFAR10[name]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_zoo_forward_gives_logits(name, channels, size):
    logits = built(name, channels, 7, size)(images(2, channels, size))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name, in_features", [
    ("MLP", 784), ("LeNet", 400), ("AlexNet", 192 * 4 * 4), ("VGG11", 512), ("ResNet18", 512),
    ("ResNet18_AP", 512 * 3 * 3),  # the reference's 3x3 map for grey inputs
])
def test_grey_28x28_paddings_match_reference_feature_sizes(name, in_features):
    first_linear = layers_of(built(name, 1, 7, 28), nn.Linear)[0]  # the one that takes the flattened features
    assert first_linear.in_features == in_features


@pytest.mark.parametrize("name", ["LeNet", "AlexNet", "VGG11", "ResNet18", "ResNet18_AP"])
def test_zoo_runs_on_64x64(name):
    model = create_model(name, 3, 5, (64, 64))
    assert model(images(1, 3, 64)).shape == (1, 5)


@pytest.mark.parametrize("name", ["LeNet", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18_AP"])
def test_zoo_rejects_images_too_small_for_the_architecture(name):
    with pytest.raises(UserError, match=rf"{name} cannot take 1x8x8 images.*32x32"):
        create_model(name, 1, 10, (8, 8))


@pytest.mark.parametrize("name, key", [
    ("LeNet", "features.3.weight"), ("AlexNet", "fc.weight"), ("AlexNetBN", "features.1.running_mean"),
    ("VGG11", "classifier.weight"), ("ResNet18", "layer2.0.shortcut.1.weight"),
    ("ResNet18_AP", "layer2.0.shortcut.2.weight"), ("MLP", "fc_3.bias"),
])
def test_zoo_state_dict_keys_match_reference_names(name, key):
    assert key in built(name).state_dict()


# ---- flat parameters (SPEC §4.5, P10) ----
def reference_order(module: nn.Module) -> list[str]:
    """MTT reparam_module order: named_modules() x named_parameters(recurse=False), shared tensors once."""
    seen, names = set(), []
    for prefix, mod in module.named_modules():
        for n, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                names.append(f"{prefix}.{n}" if prefix else n)
    return names


@pytest.mark.parametrize("name", ["ConvNet", *ZOO])
def test_flat_order_is_parameters_order_and_reference_order(name):
    module = built(name)
    fm = FunctionalModel(module)
    assert fm.names == [n for n, _ in module.named_parameters()] == reference_order(module)
    assert fm.num_params == count(module)
    assert torch.equal(fm.flatten(module), parameters_to_vector(module.parameters()))


def test_unflatten_load_flatten_is_identity():
    fm = FunctionalModel(built("ConvNet"))
    flat = torch.randn(fm.num_params, generator=torch.Generator().manual_seed(3))
    parts = fm.unflatten(flat)
    assert list(parts) == fm.names and [tuple(t.shape) for t in parts.values()] == fm.shapes
    assert torch.equal(fm.flatten(fm.load_into(flat)), flat)


@pytest.mark.parametrize("name, channels, size", [("ConvNet", 3, 32), ("ResNet18_AP", 1, 16)])
def test_functional_call_equals_a_normally_loaded_snapshot(name, channels, size):
    def make(seed: int) -> nn.Module:
        return init_seeded(name, channels, 10, (size, size), seed=seed)

    template, expert, loaded = make(0), make(1), make(2)
    snapshot = [p.detach().clone() for p in expert.parameters()]  # how expert checkpoints are stored
    flat = torch.cat([p.reshape(-1) for p in snapshot])
    vector_to_parameters(flat, loaded.parameters())  # torch's own loader, independent of FunctionalModel
    fm = FunctionalModel(template)
    x = images(4, channels, size)
    with torch.no_grad():
        out = fm(flat, x)
        torch.testing.assert_close(out, loaded(x))
        torch.testing.assert_close(out, expert(x))
        assert not torch.allclose(out, template(x))  # the template's own weights are not used
        torch.testing.assert_close(fm.load_into(flat, template)(x), out)


def test_vmap_over_three_parameter_vectors_equals_three_calls():
    fm = FunctionalModel(built("ConvNet"))
    flats = torch.stack([fm.flatten(init_seeded("ConvNet", 3, 10, (32, 32), seed=s)) for s in range(3)])
    xs = torch.stack([images(4, 3, 32, seed=s) for s in range(3)])
    batched = torch.func.vmap(fm, in_dims=(0, 0))(flats, xs)
    separate = torch.stack([fm(flats[k], xs[k]) for k in range(3)])
    assert batched.shape == (3, 4, 10)
    torch.testing.assert_close(batched, separate)


@pytest.mark.parametrize("name, channels, size", [  # the cheapest input each architecture accepts
    ("MLP", 1, 8), ("LeNet", 3, 16), ("AlexNet", 1, 8), ("VGG11", 3, 32), ("ResNet18", 3, 25), ("ResNet18_AP", 1, 16),
])
def test_zoo_models_work_under_vmap_and_grad(name, channels, size):
    model = built(name, channels, 10, size)
    fm = FunctionalModel(model)
    base = fm.flatten(model).detach()
    flats = torch.stack([base, base * 0.5])
    xs = torch.stack([images(1, channels, size, seed=s) for s in range(2)])
    batched = torch.func.vmap(fm)(flats, xs)
    torch.testing.assert_close(batched, torch.stack([fm(flats[k], xs[k]) for k in range(2)]))
    g = torch.func.grad(lambda f: fm(f, xs[0]).square().mean())(base)
    assert g.shape == base.shape and torch.isfinite(g).all() and g.abs().sum() > 0


# ---- seeding and BatchNorm detection ----
def test_init_seeded_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = init_seeded("ConvNet", 3, 10, (32, 32), seed=5)
    b = init_seeded("ConvNet", 3, 10, (32, 32), seed=5)
    c = init_seeded("ConvNet", 3, 10, (32, 32), seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(parameters_to_vector(a.parameters()), parameters_to_vector(b.parameters()))
    assert not torch.equal(parameters_to_vector(a.parameters()), parameters_to_vector(c.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_init_seeded_leaves_cuda_rng_alone():
    states = torch.cuda.get_rng_state_all()
    init_seeded("ConvNet", 3, 10, (32, 32), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), states))


@pytest.mark.parametrize("name, expected", [
    ("ConvNet", False), ("ConvNetBN", True), ("ResNet18", False), ("ResNet18BN", True), ("AlexNet", False),
    ("AlexNetBN", True), ("VGG11", False), ("VGG11BN", True), ("ResNet18BN_AP", True),
])
def test_has_batchnorm(name, expected):
    assert has_batchnorm(built(name)) is expected
