"""The model zoo: every model builds, parameter counts match the lecture, receptive fields are right."""

import pytest
import torch
import torch.nn as nn

from probe.models import build, list_models, spec
from probe.models.registry import _REGISTRY
from probe.models.summary import format_table, layer_table

# the totals printed in the lecture's tables
LECTURE_TOTALS = {"lenet5": 61_706, "alexnet": 61_100_840, "vgg16": 138_357_544, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", sorted(_REGISTRY))
def test_every_registered_model_builds_and_runs(name):
    s = spec(name)
    model = build(name)
    out = model(torch.randn(2, s.channels, s.image_size, s.image_size))
    assert out.shape == (2, s.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "googlenet"])
def test_torchvision_classifiers_build_and_run(name):
    model = build(name, num_classes=7)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


def test_registry_lists_probe_and_torchvision_models():
    names = list_models()
    assert {"lenet5", "vgg_small", "resnet_small", "alexnet", "vgg16", "resnet50", "googlenet"} <= set(names)
    assert list_models("resnet") == [n for n in names if "resnet" in n]


@pytest.mark.parametrize("name,total", sorted(LECTURE_TOTALS.items()))
def test_parameter_totals_match_the_lecture(name, total):
    model = build(name)
    s = spec(name)
    assert sum(p.numel() for p in model.parameters()) == total
    rows = layer_table(model, s.channels, s.image_size)
    # every parameter belongs to exactly one leaf row
    assert sum(r.params for r in rows) == total
    assert f"Total params: {total:,}" in format_table(rows, model)


def test_lenet5_table_is_the_lectures():
    rows = layer_table(build("lenet5"), 1, 32)
    got = [(r.type, r.output_shape, r.params) for r in rows]
    assert got == [
        ("Conv2d", [6, 28, 28], 156), ("ReLU", [6, 28, 28], 0), ("MaxPool2d", [6, 14, 14], 0),
        ("Conv2d", [16, 10, 10], 2416), ("ReLU", [16, 10, 10], 0), ("MaxPool2d", [16, 5, 5], 0),
        ("Conv2d", [120, 1, 1], 48120), ("ReLU", [120, 1, 1], 0), ("Linear", [84], 10164),
        ("ReLU", [84], 0), ("Linear", [10], 850), ("LogSoftmax", [10], 0),
    ]


def test_lenet5_receptive_fields_by_hand():
    # r_out = r_in + (k - 1) * j_in ; j_out = j_in * s
    # conv1 k5: r 5 j 1 | pool1 k2 s2: r 6 j 2 | conv2 k5: r 6 + 4*2 = 14 j 2
    # pool2 k2 s2: r 14 + 1*2 = 16 j 4 | conv3 k5: r 16 + 4*4 = 32 j 4 | fc: all of conv3's 1x1 map
    rows = {r.name: r for r in layer_table(build("lenet5"), 1, 32)}
    expected = {"conv1": (5, 1), "relu1": (5, 1), "pool1": (6, 2), "conv2": (14, 2), "pool2": (16, 4),
                "conv3": (32, 4), "fc1": (32, 4), "fc2": (32, 4)}
    for name, (size, stride) in expected.items():
        assert rows[name].receptive_field == [size, size], name
        assert rows[name].rf_stride == [stride, stride], name


def _gradient_support(model: nn.Module, layer: str, size: int, channels: int = 1) -> int:
    """Brute force: the side of the input region on which the centre unit of ``layer`` depends.

    All weights positive, max pooling replaced by average pooling and ReLU removed, so every path
    from an input pixel to the unit carries a non-zero gradient.
    """
    import copy

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(mod, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
            elif isinstance(child, nn.ReLU):
                setattr(mod, child_name, nn.Identity())
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    x = torch.zeros(1, channels, size, size, requires_grad=True)
    out = {}
    h = dict(m.named_modules())[layer].register_forward_hook(lambda _m, _i, o: out.setdefault("y", o))
    m(x)
    h.remove()
    y = out["y"]
    y[0, 0, y.shape[2] // 2, y.shape[3] // 2].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1) > 0)
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("layer", ["features.0", "features.2", "features.4", "features.7", "features.9"])
def test_vgg_small_receptive_fields_match_gradient_support(layer):
    model = build("vgg_small")
    rows = {r.name: r for r in layer_table(model, 1, 64)}
    assert rows[layer].receptive_field[0] == _gradient_support(model, layer, 64)


class _PermutedHead(nn.Module):
    """A conv whose map is permuted to (N, H, W, C) before a per-position linear head (issue 15, item 11)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 5)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        f = self.conv2(self.conv1(x))
        return self.head(f.permute(0, 2, 3, 1)).mean((1, 2))


def test_a_layer_after_a_permute_gets_no_receptive_field_never_a_wrong_one():
    rows = {r.name: r for r in layer_table(_PermutedHead(), 1, 28)}
    assert rows["conv2"].receptive_field == [_gradient_support(_PermutedHead(), "conv2", 28)] * 2 == [7, 7]
    assert rows["conv2"].rf_stride == [2, 2]
    # the head's output is (N, 11, 11, 3): its last two axes are width and classes, not a map
    assert rows["head"].output_shape == [11, 11, 3]
    assert rows["head"].receptive_field is None and rows["head"].rf_stride is None
    # a flatten to (N, features) before a linear layer stays the union of every position (LeNet-5's fc1)
    lenet = {r.name: r for r in layer_table(build("lenet5"), 1, 32)}
    assert lenet["fc1"].receptive_field == [32, 32]


def test_published_receptive_fields_of_alexnet_and_vgg16():
    # Araujo et al., "Computing receptive fields of convolutional neural networks", Distill 2019
    alex = {r.name: r for r in layer_table(build("alexnet"), 3, 224)}
    vgg = {r.name: r for r in layer_table(build("vgg16"), 3, 224)}
    assert alex["features.12"].receptive_field == [195, 195] and alex["features.12"].rf_stride == [32, 32]
    assert vgg["features.30"].receptive_field == [212, 212] and vgg["features.30"].rf_stride == [32, 32]


def test_a_keyword_the_factory_does_not_take_is_named_with_the_accepted_ones():
    from probe.models import ModelError

    with pytest.raises(ModelError) as e:
        build("tiny_cnn", kwargs={"widht": 8})
    assert e.value.key == "kwargs"
    assert "'widht'" in str(e.value) and "accepted: in_channels, num_classes, width" in str(e.value)
    # conv1 1->w 3x3, conv2 w->2w 3x3, fc 2w->10, with biases: 18 w^2 + 32 w + 10 parameters
    assert sum(p.numel() for p in build("tiny_cnn", kwargs={"width": 8}).parameters()) == 18 * 64 + 32 * 8 + 10


def test_the_check_on_the_configured_input_says_what_the_model_returned():
    from probe.models import ModelError

    model = build("tiny_cnn", in_channels=3, num_classes=5, image_size=16)  # (2, 5) on zeros (2, 3, 16, 16): fine
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 5)
    with pytest.raises(ModelError) as e:  # LeNet-5 only takes 32 x 32
        build("lenet5", image_size=28)
    assert e.value.key == "input" and "zeros (2x1x28x28) raised RuntimeError" in str(e.value)
    with pytest.raises(ModelError) as e:
        build("tiny_cnn", output=0, image_size=16)
    assert e.value.key == "output" and "the model returns Tensor (2, 10) float32" in str(e.value)


def test_sources_by_name_prefix_and_path():
    from probe.models import parse_source

    assert [parse_source(s).kind for s in ("lenet5", "resnet18", "torchvision:vgg16", "timm:resnet18",
                                           "mypkg.nets:make_net", "mynets.leaves.LeafNet")] == \
        ["probe", "torchvision", "torchvision", "timm", "import", "import"]
    assert parse_source("torchvision:vgg16").name == "vgg16"
    from probe.models import ModelError

    with pytest.raises(ModelError) as e:
        parse_source("resnet_smal")
    assert "did you mean 'resnet_small'" in str(e.value)
