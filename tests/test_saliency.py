"""Saliency stage: every method against an independent computation, the faithfulness and randomisation
metrics against hand-worked or brute-force values, and the stage end to end."""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

from probe.errors import ConfigError, LayerNotFound, NumericalError
from probe.saliency import methods as sal_methods
from probe.saliency.batching import map_batches
from probe.pipeline.saliency.config import SaliencyConfig
from probe.saliency.faithfulness import (attribution_order, auc, deletion_insertion_auc, perturbation_curves,
                                         random_order, random_order_aucs, random_orders)
from probe.saliency.methods import MethodSettings, attribute, occlusion_geometry, reduce_channels
from probe.saliency.prepare import attribution_copy, default_gradcam_layer, gradcam_layer
from probe.saliency.randomisation import (average_ranks, cascade_order, cascading_randomisations, compare_maps,
                                          spearman, spearman_informative)
from probe.images import minmax
from probe.saliency.ssim import gaussian_window, ssim


def tiny_cnn(seed=0, channels=1, classes=5):
    from probe.models import build

    torch.manual_seed(seed)
    return build("tiny_cnn", in_channels=channels, num_classes=classes).eval()


class Smooth(nn.Module):
    """Conv, tanh, linear: smooth, so finite differences and IG completeness hold tightly."""

    def __init__(self, channels=1, side=6, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 3, 3, padding=1)
        self.fc = nn.Linear(3 * side * side, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TinyRes(nn.Module):
    """ResNet-like: ONE in-place ReLU module called twice, and an in-place residual add."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y += x
        y = self.relu(y)
        return self.fc(y.mean((2, 3)))


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()


def vgg11_features(classes):
    """torchvision's VGG-11 features (in-place ReLU after every conv) under a small head: cheap to build."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(features=make_layers(cfgs["A"]), pool=nn.AdaptiveAvgPool2d(1),
                                     flat=nn.Flatten(), fc=nn.Linear(512, classes))).eval()


def target_grad(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x).gather(1, target.view(-1, 1)).sum()
    return torch.autograd.grad(out, x)[0]


def run_method(method, model, x, target, **kw):
    return attribute(method, attribution_copy(model, x), x, target, MethodSettings(**kw))


# ---------------------------------------------------------------- methods vs independent computations

def test_saliency_is_abs_gradient_from_autograd():
    model = tiny_cnn()
    x, t = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4])
    assert torch.allclose(run_method("saliency", model, x, t), target_grad(model, x, t).abs(), atol=1e-6)


def test_saliency_matches_finite_differences_on_smooth_model():
    torch.manual_seed(1)
    model = Smooth().double().eval()
    x, t = torch.randn(2, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    got = run_method("saliency", model, x, t)
    eps = 1e-6
    for n in range(2):
        for p in (0, 7, 20, 35):
            i, j = divmod(p, 6)
            xp, xm = x.clone(), x.clone()
            xp[n, 0, i, j] += eps
            xm[n, 0, i, j] -= eps
            fd = (model(xp)[n, t[n]] - model(xm)[n, t[n]]) / (2 * eps)
            assert got[n, 0, i, j].item() == pytest.approx(abs(fd.item()), rel=1e-5, abs=1e-8)


def test_input_x_gradient_is_x_times_gradient():
    model = tiny_cnn(channels=3)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([4, 3, 2, 1])
    assert torch.allclose(run_method("input_x_gradient", model, x, t), x * target_grad(model, x, t), atol=1e-6)


@pytest.mark.parametrize("make, steps, rtol", [(lambda: Smooth().double().eval(), 64, 1e-4),
                                               (lambda: tiny_cnn().double(), 512, 2e-2)])
def test_integrated_gradients_completeness(make, steps, rtol):
    torch.manual_seed(2)
    model = make()
    side = 6 if isinstance(model, Smooth) else 16
    x, t = torch.randn(3, 1, side, side, dtype=torch.float64), torch.tensor([0, 1, 2])
    base = torch.full_like(x, -0.5)
    attr = run_method("integrated_gradients", model, x, t, ig_steps=steps, ig_internal_batch_size=200,
                      ig_baseline=lambda z: torch.full_like(z, -0.5))
    with torch.no_grad():
        delta = model(x).gather(1, t.view(-1, 1)).squeeze(1) - model(base).gather(1, t.view(-1, 1)).squeeze(1)
    total = attr.flatten(1).sum(1)
    assert torch.allclose(total, delta, rtol=rtol, atol=rtol * delta.abs().max())


def test_smoothgrad_is_mean_abs_gradient_over_the_same_seeded_noise():
    model = tiny_cnn()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3])
    stdev, samples, per_batch, seed = 0.3, 6, 4, 7
    got = run_method("smoothgrad", model, x, t, smoothgrad_samples=samples, smoothgrad_batch_size=per_batch,
                     smoothgrad_stdev=stdev, seed=seed)
    # by hand: Captum draws noise for 4 copies per image, then for the remaining 2
    torch.manual_seed(seed)
    total = torch.zeros_like(x)
    for k in (4, 2):
        noisy = x.repeat_interleave(k, 0) + torch.normal(0, torch.full((len(x) * k, 1, 16, 16), stdev))
        g = target_grad(model, noisy, t.repeat_interleave(k)).abs()
        total += g.view(len(x), k, 1, 16, 16).sum(1)
    assert torch.allclose(got, total / samples, atol=1e-6)
    # seeded: the same call again gives the same map, a different seed another
    assert torch.equal(got, run_method("smoothgrad", model, x, t, smoothgrad_samples=samples,
                                       smoothgrad_batch_size=per_batch, smoothgrad_stdev=stdev, seed=seed))
    assert not torch.allclose(got, run_method("smoothgrad", model, x, t, smoothgrad_samples=samples,
                                              smoothgrad_batch_size=per_batch, smoothgrad_stdev=stdev, seed=8))


def hand_gradcam(model, layer, x, t):
    """Grad-CAM by hand: weights = spatial mean of d target / d A, relu(sum_k w_k A_k), bilinear upsampling."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    kept = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda _m, _i, o: kept.setdefault("a", o))
    out = model(x).gather(1, t.view(-1, 1)).sum()
    h.remove()
    a = kept["a"]
    g = torch.autograd.grad(out, a)[0]
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).detach()


@pytest.mark.parametrize("name", ["tiny_cnn", "vgg11"])
def test_grad_cam_matches_hand_computation(name):
    if name == "tiny_cnn":
        model, layer, x = tiny_cnn(), "conv2", torch.randn(3, 1, 16, 16)
    else:  # torchvision VGG: features.18 is the last conv, an in-place ReLU follows it
        model, layer, x = vgg11_features(5), "features.18", torch.randn(5, 3, 64, 64)
    t = torch.arange(len(x)) % 5
    got = run_method("grad_cam", model, x, t, gradcam_layer=layer)
    want = hand_gradcam(model, layer, x, t)
    assert got.shape == (len(x), 1, *x.shape[-2:])
    assert want.abs().max() > 0
    assert torch.allclose(got, want, atol=1e-6 * want.abs().max().item() + 1e-8)


def test_default_gradcam_layer_skips_1x1_outputs():
    from probe.models import build

    lenet = build("lenet5")
    assert gradcam_layer(lenet, torch.zeros(1, 1, 32, 32), None) == "relu2"  # conv3 outputs 1x1
    assert gradcam_layer(tiny_cnn(), torch.zeros(1, 1, 16, 16), None) == "relu2"
    with pytest.raises(LayerNotFound, match="^gradcam_layer: layer 'conv22'.*conv2"):  # its own argument's name
        gradcam_layer(lenet, torch.zeros(1, 1, 32, 32), "conv22")


class ResNetShaped(nn.Module):
    """A stem, an identity block and a downsampling block whose 1x1 projection shortcut is the LAST conv executed."""

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
            self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))
                             if stride != 1 or c_in != c_out else nn.Identity())
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.conv2(self.relu1(self.conv1(x)))
            return self.relu(y + self.shortcut(x))

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block1 = self.Block(4, 4, 1)
        self.block2 = self.Block(4, 8, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


def outputs_by_name(model, x):
    """Every module's output (clones), and the conv names in execution order, from forward hooks."""
    outs, convs = {}, []

    def hook(name):
        def fn(mod, _i, o):
            outs[name] = o.detach().clone()
            if isinstance(mod, nn.Conv2d):
                convs.append(name)
        return fn

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return outs, convs


def test_default_gradcam_layer_is_the_block_output_of_a_resnet_shaped_net():
    torch.manual_seed(0)
    model = randomise_bn(ResNetShaped())
    x = torch.randn(2, 1, 12, 12)
    layer, rule = default_gradcam_layer(model, x)
    outs, convs = outputs_by_name(model, x[:1])
    assert convs[-1] == "block2.shortcut.0"  # the old rule ("last executed Conv2d") would take the shortcut
    assert rule == "last rectifier" and layer == "block2.relu"
    assert torch.equal(outs[layer], outs["block2"]) and (outs[layer] >= 0).all()  # the rectified block output
    # Grad-CAM there equals the hand computation on the block's output
    t = torch.tensor([0, 2])
    got = run_method("grad_cam", model, x, t, gradcam_layer=layer)
    assert torch.allclose(got, hand_gradcam(model, "block2", x, t), atol=1e-6)


def test_default_gradcam_layer_of_probe_and_torchvision_models():
    import torchvision

    from probe.models import build

    assert default_gradcam_layer(build("resnet_small"), torch.zeros(1, 1, 32, 32))[0] == "layer3.0.relu2"
    vgg = build("vgg_small")
    last_relu = [n for n, m in vgg.named_modules() if n.startswith("features.") and isinstance(m, nn.ReLU)][-1]
    assert default_gradcam_layer(vgg, torch.zeros(1, 1, 32, 32))[0] == last_relu
    # torchvision ResNet-18 reuses (in place) one relu module per block: the block itself is the layer
    r18 = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    assert default_gradcam_layer(r18, x)[0] == "layer4.1"
    outs, _ = outputs_by_name(r18, x)
    assert (outs["layer4.1"] >= 0).all() and outs["layer4.1"].shape[-2:] == (2, 2)


def test_default_gradcam_layer_without_rectifiers_and_without_feature_maps():
    torch.manual_seed(0)
    silu = nn.Sequential(nn.Conv2d(1, 3, 3), nn.SiLU(), nn.Conv2d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))
    assert default_gradcam_layer(silu, torch.zeros(1, 1, 8, 8)) == ("3", "last feature map")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="^gradcam_layer: .*name a layer"):
        gradcam_layer(mlp, torch.zeros(1, 1, 8, 8), None)


@pytest.mark.parametrize("window, stride", [(2, 2), (3, 1)])
def test_occlusion_matches_brute_force(window, stride):
    model = tiny_cnn(channels=2)
    x, t = torch.randn(2, 2, 6, 6), torch.tensor([1, 4])
    base = torch.full_like(x, 0.25)
    got = run_method("occlusion", model, x, t, occlusion_window=window, occlusion_stride=stride,
                     occlusion_baseline=lambda z: torch.full_like(z, 0.25), occlusion_batch_size=7)
    total, count = torch.zeros(2, 6, 6), torch.zeros(6, 6)
    with torch.no_grad():
        f0 = model(x).gather(1, t.view(-1, 1)).squeeze(1)
        for i in range(0, 6 - window + 1, stride):
            for j in range(0, 6 - window + 1, stride):
                xo = x.clone()
                xo[:, :, i:i + window, j:j + window] = base[:, :, i:i + window, j:j + window]
                diff = f0 - model(xo).gather(1, t.view(-1, 1)).squeeze(1)
                total[:, i:i + window, j:j + window] += diff.view(2, 1, 1)
                count[i:i + window, j:j + window] += 1
    want = (total / count).unsqueeze(1).expand(-1, 2, -1, -1)
    assert torch.allclose(got, want, atol=1e-6)


def test_occlusion_geometry_covers_the_image():
    for side in (8, 16, 28, 32, 64, 224):
        for wf, sf in ((0.125, 0.0625), (0.3, 0.17), (0.5, 0.5)):
            w, s = occlusion_geometry(side, wf, sf)
            assert 1 <= s <= w <= side and (side - w) % s == 0


class GuidedReLU(torch.autograd.Function):
    """Reference guided backprop: pass only positive gradients, and only where the input was positive."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0)


def reference_guided_backprop(model, x, t):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.forward = GuidedReLU.apply  # every call of a reused module goes through the Function
    return target_grad(ref, x, t)


@pytest.mark.parametrize("name", ["tiny_res", "resnet18", "vgg11"])
def test_guided_backprop_matches_custom_autograd_reference(name):
    import torchvision

    torch.manual_seed(3)
    if name == "tiny_res":
        model, x = randomise_bn(TinyRes()), torch.randn(3, 2, 8, 8)
    elif name == "resnet18":  # reuses self.relu in every BasicBlock, in place
        model, x = randomise_bn(torchvision.models.resnet18(num_classes=4)), torch.randn(2, 3, 32, 32)
    else:  # VGG's features (in-place ReLUs) with a small head, to keep the test cheap
        model, x = vgg11_features(4), torch.randn(2, 3, 32, 32)
    t = torch.tensor([0, 3, 1][: len(x)])
    want = reference_guided_backprop(model, x, t)
    got = run_method("guided_backprop", model, x, t)
    plain = target_grad(model, x, t)
    assert not torch.allclose(want, plain, atol=1e-6)  # the check can fail: guided differs from the gradient
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    # the model itself is left as it was (ReLUs still in place, no hooks)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_reduce_channels_per_method():
    a = torch.tensor([[[[1.0]], [[-3.0]]]])  # (1, 2, 1, 1)
    assert reduce_channels(a, "saliency").item() == 4.0
    assert reduce_channels(a, "guided_backprop").item() == 4.0
    assert reduce_channels(a, "integrated_gradients").item() == -2.0
    assert reduce_channels(a, "input_x_gradient").item() == -2.0


# ---------------------------------------------------------------- what is attributed: the logit

def lenet_logits(m, x):
    """LeNet-5's forward written out by hand, without its LogSoftmax: the logits."""
    x = m.pool1(m.relu1(m.conv1(x)))
    x = m.pool2(m.relu2(m.conv2(x)))
    x = torch.flatten(m.relu3(m.conv3(x)), 1)
    return m.fc2(m.relu4(m.fc1(x)))


class LeNetLogits(nn.Module):
    def __init__(self, lenet):
        super().__init__()
        self.m = lenet

    def forward(self, x):
        return lenet_logits(self.m, x)


def confident_lenet(seed=0):
    """Random LeNet-5 whose last layer is scaled so that p(target) rounds to 1 in float32."""
    from probe.models import build

    torch.manual_seed(seed)
    lenet = build("lenet5").eval()
    with torch.no_grad():
        lenet.fc2.weight.mul_(2000.0)
        lenet.fc2.bias.mul_(2000.0)
    return lenet


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_lenet5_gradient_is_of_the_logit_float64_reference():
    lenet = confident_lenet()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        logp = lenet(x)
    t = logp.argmax(1)
    assert (logp.gather(1, t.view(-1, 1)) == 0).all()  # log p == 0: p rounds to 1 in float32
    # float64 reference: autograd of the hand-written logit of a float64 copy
    m64 = copy.deepcopy(lenet).double()
    x64 = x.double().requires_grad_(True)
    ref = torch.autograd.grad(lenet_logits(m64, x64).gather(1, t.view(-1, 1)).sum(), x64)[0].abs()
    new = run_method("saliency", lenet, x, t)
    old = target_grad(lenet, x, t).abs()  # the log-softmax gradient in float32, as before
    assert rel_err(new, ref) < 1e-4
    assert rel_err(old, ref) > 0.5  # the check can fail: the old target is off by a lot here


def test_lenet5_grad_cam_is_of_the_logit_float64_reference():
    lenet = confident_lenet(1)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        t = lenet(x).argmax(1)
    layer = default_gradcam_layer(lenet, x)[0]
    assert layer == "relu2"
    got = run_method("grad_cam", lenet, x, t, gradcam_layer=layer)
    want = hand_gradcam(LeNetLogits(copy.deepcopy(lenet).double()), "m.relu2", x.double(), t)
    old = hand_gradcam(copy.deepcopy(lenet), "relu2", x, t)  # Grad-CAM of the float32 log-probability
    assert want.abs().max() > 0
    assert rel_err(got, want) < 1e-4
    assert rel_err(old, want) > 0.5


def test_attribution_copy_returns_logits_and_leaves_the_model_alone():
    import torchvision

    base = tiny_cnn()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        z = base(x)
        for head in (nn.Softmax(1), nn.LogSoftmax(1)):
            model = nn.Sequential(base, head).eval()
            a = attribution_copy(model, x)
            assert torch.allclose(a(x), z, atol=1e-6)  # the head is bypassed
            assert not any(p.requires_grad for p in a.parameters())
            assert torch.allclose(model(x), head(z))  # the model still ends in its head
            assert torch.allclose(copy.deepcopy(a)(x), z, atol=1e-6)  # survives deepcopy (the cascade copies it)
        r18 = randomise_bn(torchvision.models.resnet18(num_classes=5))
        xr = torch.randn(2, 3, 32, 32)
        a = attribution_copy(r18, xr)
        assert torch.equal(a(xr), r18(xr))  # already logits: unchanged
        assert all(m.inplace for m in r18.modules() if isinstance(m, nn.ReLU))
        assert not any(m.inplace for m in a.modules() if isinstance(m, nn.ReLU))


# ---------------------------------------------------------------- deletion / insertion

class Linear2x2(nn.Module):
    """Two classes on a 2x2 one-channel image: logits (w . x, 0), so p(class 0) = sigmoid(w . x)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float64)

    def forward(self, x):
        s = (x.flatten(1) * self.w).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_deletion_and_insertion_auc_by_hand():
    model = Linear2x2([3.0, 2.0, 1.0, -1.0])
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    order = attribution_order(torch.tensor([[[3.0, 2.0], [1.0, -1.0]]]))  # pixels 0, 1, 2, 3
    assert order.tolist() == [[0, 1, 2, 3]]
    sub = torch.zeros_like(x)
    t = torch.tensor([0])
    # deletion, one pixel per step: scores w.x = 5, 2, 0, -1, 0
    d = perturbation_curves(model, x, t, order, sub, 4, "deletion")
    want_d = [sig(5), sig(2), sig(0), sig(-1), sig(0)]
    assert d[0].tolist() == pytest.approx(want_d)
    # insertion from the substrate: 0, 3, 5, 6, 5
    i = perturbation_curves(model, x, t, order, sub, 4, "insertion")
    want_i = [sig(0), sig(3), sig(5), sig(6), sig(5)]
    assert i[0].tolist() == pytest.approx(want_i)
    trap = lambda p: sum((p[k] + p[k + 1]) / 2 for k in range(4)) / 4  # noqa: E731
    dauc, iauc = deletion_insertion_auc(model, x, t, order, sub, 4, batch_size=3)
    assert dauc.item() == pytest.approx(trap(want_d))
    assert iauc.item() == pytest.approx(trap(want_i))
    # two steps: 0, 2 then 4 pixels deleted -> 5, 0, 0
    d2 = perturbation_curves(model, x, t, order, sub, 2, "deletion")
    assert d2[0].tolist() == pytest.approx([sig(5), sig(0), sig(0)])
    assert auc(d2).item() == pytest.approx(((sig(5) + sig(0)) / 2 + sig(0)) / 2)
    # target class 1 has p = 1 - sigmoid: the curve mirrors
    d1 = perturbation_curves(model, x, torch.tensor([1]), order, sub, 4, "deletion")
    assert d1[0].tolist() == pytest.approx([1 - p for p in want_d])


def test_perturbation_curves_batched_equal_unbatched_and_log_softmax_models():
    torch.manual_seed(0)
    model = nn.Sequential(tiny_cnn(), nn.LogSoftmax(1))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2])
    order, sub = random_order(3, 256, seed=1), torch.zeros_like(x)
    a = perturbation_curves(model, x, t, order, sub, 8, "deletion", batch_size=1000)
    b = perturbation_curves(model, x, t, order, sub, 8, "deletion", batch_size=5)
    assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():  # step 0 is the image itself; softmax of log-probabilities = probabilities
        p = torch.softmax(model[0](x), 1).gather(1, t.view(-1, 1)).squeeze(1)
    assert torch.allclose(a[:, 0], p, atol=1e-6)


def test_random_order_is_a_seeded_permutation():
    o = random_order(4, 10, seed=3)
    assert torch.equal(o.sort(1).values, torch.arange(10).expand(4, 10))
    assert torch.equal(o, random_order(4, 10, seed=3)) and not torch.equal(o, random_order(4, 10, seed=4))


def test_auc_is_the_rise_convention():
    g = torch.Generator().manual_seed(0)
    for steps in (1, 4, 16, 100):
        curve = torch.rand(3, steps + 1, generator=g, dtype=torch.float64)
        xs = np.linspace(0.0, 1.0, steps + 1)
        want = [np.trapezoid(c, xs) for c in curve.numpy()]
        # RISE's reference implementation (eclique/RISE, evaluation.py): (sum - first/2 - last/2) / (len - 1)
        rise = [(c.sum() - c[0] / 2 - c[-1] / 2) / (len(c) - 1) for c in curve.numpy()]
        assert auc(curve).numpy() == pytest.approx(want, rel=1e-12)
        assert auc(curve).numpy() == pytest.approx(rise, rel=1e-12)
    # a straight line from 1 to 0 has area 1/2 at any number of steps
    for steps in (2, 7, 64):
        assert auc(torch.linspace(1, 0, steps + 1).view(1, -1)).item() == pytest.approx(0.5)


def test_random_order_aucs_equal_one_order_at_a_time(monkeypatch):
    import probe.saliency.faithfulness as faith

    torch.manual_seed(0)
    model = tiny_cnn()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 3, 1])
    sub = torch.zeros_like(x)
    d, i = random_order_aucs(model, x, t, sub, 4, 5, seed=7, batch_size=13)
    orders = random_orders(3, 256, 5, seed=7)
    assert orders.shape == (5, 3, 256)
    assert all(torch.equal(o.sort(1).values, torch.arange(256).expand(3, 256)) for o in orders)
    assert len({tuple(o[0].tolist()) for o in orders}) == 5  # five different orders
    for r in range(5):  # brute force: the hand-checked single-order AUC, one order at a time
        dr, ir = deletion_insertion_auc(model, x, t, orders[r], sub, 4)
        assert torch.allclose(d[r], dr, atol=1e-6) and torch.allclose(i[r], ir, atol=1e-6)
    monkeypatch.setattr(faith, "ORDER_CHUNK_ELEMENTS", 256 * 3 * 2)  # chunks of two orders: same numbers
    d2, i2 = random_order_aucs(model, x, t, sub, 4, 5, seed=7, batch_size=13)
    assert torch.allclose(d, d2, atol=1e-6) and torch.allclose(i, i2, atol=1e-6)
    # the first orders do not depend on how many are drawn
    d3, _ = random_order_aucs(model, x, t, sub, 4, 2, seed=7)
    assert torch.allclose(d3, d[:2], atol=1e-6)


class LinearEvidence(nn.Module):
    """Two classes: logits (w . x, 0). The exact evidence of each pixel for class 0 is w * x."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        s = (x.flatten(1) * self.w).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def comparison_summary(model, x, t, maps, seed, orders=32, steps=8):
    """The stage's own path: faithfulness_table then summary (Holm over the methods x {deletion, insertion})."""
    from probe.pipeline.saliency.stage import Items, faithfulness_table, summary

    n = len(x)
    items = Items(x, t, ["true"] * n, torch.arange(n), t.clone(), t.clone())
    sc = SaliencyConfig(auc_steps=steps, random_orders=orders)
    table = faithfulness_table(model, items, maps, torch.zeros_like(x), sc, seed)
    return table, summary(table, None)


def evidence_case(seed, n=12, side=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(side * side, generator=g, dtype=torch.float64) / 4
    x = torch.rand(n, 1, side, side, generator=g, dtype=torch.float64)
    model = LinearEvidence(w)
    with torch.no_grad():
        t = model(x).argmax(1)
    sign = torch.where(t == 0, 1.0, -1.0).double().view(-1, 1, 1)
    evidence = sign * (w.view(side, side) * x[:, 0])  # each pixel's contribution to the target's logit margin
    return model, x, t, evidence, g


def test_random_attributions_are_not_distinguishable_from_random():
    not_distinguishable = 0
    for seed in range(10):
        model, x, t, _, g = evidence_case(seed)
        maps = {"random_maps": torch.rand(x.shape[0], 8, 8, generator=g, dtype=torch.float64)}
        _, out = comparison_summary(model, x, t, maps, seed=100 + seed)
        m = out["random_maps"]
        flags = [m["deletion_vs_random"]["distinguishable"], m["insertion_vs_random"]["distinguishable"]]
        verdicts = {m["deletion_verdict"], m["insertion_verdict"]}
        not_distinguishable += not any(flags)
        if not any(flags):
            assert verdicts == {"not distinguishable from random"}
    assert not_distinguishable >= 8


def test_exact_evidence_beats_random_with_p_below_001():
    model, x, t, evidence, g = evidence_case(0)
    table, out = comparison_summary(model, x, t, {"evidence": evidence,
                                                  "random_maps": torch.rand(12, 8, 8, generator=g, dtype=torch.float64)},
                                    seed=3)
    e = out["evidence"]
    for k, sign in (("deletion", -1), ("insertion", 1)):
        c = e[f"{k}_vs_random"]
        assert c["p_adjusted"] < 0.01 and c["distinguishable"] and sign * c["effect"] > 0
        assert e[f"{k}_verdict"] == "better than random"
        # the effect is the mean over images of (method AUC - the image's mean over the random orders)
        rows = table[table.method == "evidence"]
        assert c["effect"] == pytest.approx(float((rows[f"{k}_auc"] - rows[f"{k}_auc_random"]).mean()), rel=1e-12)
        assert c["low"] < c["effect"] < c["high"] and c["n"] == 12
        # Holm over a family of 4 (2 methods x 2 metrics): the adjusted p is at least the raw one, at most 4x
        assert c["p"] <= c["p_adjusted"] <= min(1.0, 4 * c["p"]) + 1e-15
    # the random-order columns: mean and std over the orders, by brute force
    d, _ = random_order_aucs(model, x, t, torch.zeros_like(x), 8, 32, seed=3)
    rows = table[table.method == "evidence"]
    assert rows.deletion_auc_random.to_numpy() == pytest.approx(d.double().mean(0).numpy(), rel=1e-9)
    assert rows.deletion_auc_random_std.to_numpy() == pytest.approx(d.double().numpy().std(0, ddof=1), rel=1e-6)


# ---------------------------------------------------------------- similarity and randomisation

def test_ssim_closed_forms():
    a = torch.full((1, 12, 12), 0.2, dtype=torch.float64)
    b = torch.full((1, 12, 12), 0.7, dtype=torch.float64)
    c1 = 0.01 ** 2
    # constant maps: the structure term is (0 + C2) / (0 + C2) = 1, the luminance term closed form
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.7 + c1) / (0.2 ** 2 + 0.7 ** 2 + c1), rel=1e-9)
    r = torch.rand(2, 16, 16, dtype=torch.float64)
    assert torch.allclose(ssim(r, r), torch.ones(2, dtype=torch.float64))
    assert (ssim(r, 1 - r) < 0).all()  # anti-correlated structure


def test_ssim_matches_brute_force_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 13, 14, generator=g, dtype=torch.float64), torch.rand(1, 13, 14, generator=g, dtype=torch.float64)
    b = 0.5 * a + 0.5 * b
    w = gaussian_window(11, 1.5).numpy()
    x, y = a[0].numpy(), b[0].numpy()
    vals = []
    for i in range(13 - 10):
        for j in range(14 - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert ssim(a, b).item() == pytest.approx(float(np.mean(vals)), rel=1e-9)
    assert gaussian_window(7, 1.5).shape == (7, 7)
    assert ssim(a[:, :8, :8], b[:, :8, :8]).shape == (1,)  # 7x7 window for small maps


def test_minmax_guards_constant_maps():
    m = minmax(torch.stack([torch.full((3, 3), 5.0), torch.arange(9.0).view(3, 3)]), (1, 2), eps=1e-12)
    assert torch.equal(m[0], torch.zeros(3, 3)) and m[1].min() == 0 and m[1].max() == 1


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import rankdata, spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).double()
    b = a + torch.randint(0, 4, (3, 40), generator=g).double()
    got = spearman(a, b)
    for n in range(3):
        assert got[n].item() == pytest.approx(spearmanr(a[n].numpy(), b[n].numpy()).statistic, rel=1e-12)
        assert average_ranks(a)[n].numpy() == pytest.approx(rankdata(a[n].numpy()))
    assert math.isnan(spearman(torch.ones(1, 5), torch.arange(5.0).view(1, 5)).item())


def test_spearman_on_informative_pixels_hand_made():
    from scipy.stats import spearmanr

    # 100 pixels: 70 zero in both maps, 20 non-zero in both with reversed ranks, 5 non-zero in one map only each
    a = torch.zeros(100, dtype=torch.float64)
    b = torch.zeros(100, dtype=torch.float64)
    a[:20] = torch.arange(1, 21)
    b[:20] = torch.arange(20, 0, -1)
    a[20:25] = torch.tensor([3.5, 7.5, 11.5, 15.5, 19.5])  # b is 0 there
    b[25:30] = torch.tensor([2.5, 6.5, 10.5, 14.5, 18.5])  # a is 0 there
    a2, b2 = a.view(1, 10, 10), b.view(1, 10, 10)
    rho_i, count = spearman_informative(a2, b2)
    keep = np.arange(30)  # the informative pixels: non-zero in a or in b
    assert count.item() == 30
    assert rho_i.item() == pytest.approx(spearmanr(a[keep].numpy(), b[keep].numpy()).statistic, rel=1e-12)
    assert spearman(a2, b2).item() == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, rel=1e-12)
    assert spearman(a2, b2).item() > 0.3 > rho_i.item()  # the shared zeros inflate the all-pixel correlation
    # only the 20 shared non-zero pixels, reversed: exactly -1 there
    a3, b3 = a2.clone(), b2.clone()
    a3.view(-1)[20:30] = 0
    b3.view(-1)[20:30] = 0
    assert spearman_informative(a3, b3)[0].item() == pytest.approx(-1.0)
    sim = compare_maps(-a3, b3)  # |maps|: the sign does not matter
    assert sim["spearman_informative"].item() == pytest.approx(-1.0) and sim["informative_pixels"].item() == 20
    # fewer than two informative pixels: undefined
    one = torch.zeros(1, 3, 3)
    one[0, 1, 1] = 1.0
    assert math.isnan(spearman_informative(one, one)[0].item())


def test_cascading_randomisation_order_and_copies():
    from probe.models import build

    torch.manual_seed(0)
    lenet = build("lenet5")
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    layers = cascade_order(lenet, torch.zeros(1, 1, 32, 32))
    assert layers == ["fc2", "fc1", "conv3", "conv2", "conv1"]
    seen = []
    for step, name, m in cascading_randomisations(lenet, layers, seed=0):
        sd = m.state_dict()
        changed = [n for n in layers if not torch.equal(sd[f"{n}.weight"], before[f"{n}.weight"])]
        seen.append((step, name, sorted(changed)))
    assert [s[2] for s in seen] == [sorted(layers[:k]) for k in range(1, 6)]
    assert all(torch.equal(v, before[k]) for k, v in lenet.state_dict().items())  # original untouched
    # the same seed re-initialises to the same weights
    again = list(cascading_randomisations(lenet, layers[:1], seed=0))[0][2]
    first = list(cascading_randomisations(lenet, layers[:1], seed=0))[0][2]
    assert torch.equal(again.fc2.weight, first.fc2.weight)


# ---------------------------------------------------------------- batching

def test_map_batches_halves_on_oom_and_logs(caplog):
    calls = []

    def fn(lo, hi):
        calls.append(hi - lo)
        if hi - lo > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.arange(lo, hi)

    with caplog.at_level(logging.WARNING):
        out = map_batches(fn, 10, 16, what="test")
    assert torch.equal(out, torch.arange(10))
    assert calls[:3] == [10, 8, 4] and calls[3:] == [2, 2, 2, 2, 2]
    assert "out of memory" in caplog.text and "retrying with 8" in caplog.text and "retrying with 2" in caplog.text


def test_map_batches_gives_up_at_one_and_passes_other_errors():
    def always_oom(lo, hi):
        raise torch.cuda.OutOfMemoryError("out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        map_batches(always_oom, 4, 4)

    def other(lo, hi):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        map_batches(other, 4, 4)


# ---------------------------------------------------------------- config

def test_unknown_method_names_the_key_and_closest_match():
    with pytest.raises(ConfigError, match=r"saliency.methods: 'smothgrad'.*did you mean 'smoothgrad'"):
        SaliencyConfig(methods=["saliency", "smothgrad"])
    with pytest.raises(ConfigError, match="saliency.smoothgrad_noise"):
        SaliencyConfig(smoothgrad_noise=0.0)
    with pytest.raises(ConfigError, match="saliency.substrate"):
        SaliencyConfig(substrate="gray")


# ---------------------------------------------------------------- the stage

CHEAP = ["saliency.ig_steps=8", "saliency.smoothgrad_samples=4", "saliency.auc_steps=8",
         "saliency.overlays=false"]


def stage_cfg(run, **kw):
    from probe.pipeline.saliency.config import SaliencyStage

    return SaliencyStage(run=str(run), device="cpu",
                         saliency=SaliencyConfig(ig_steps=8, smoothgrad_samples=4, auc_steps=8, overlays=False, **kw))


def test_cli_end_to_end_writes_every_file(tiny_run):
    from probe.pipeline.cli import main
    from probe.pipeline.saliency.config import METHODS

    assert main(["saliency", f"run={tiny_run}", "device=cpu", "data.probe_per_class=1"] + CHEAP[:-1]) == 0
    out = tiny_run / "saliency"
    for f in ["maps.npz", "metrics.parquet", "randomisation.parquet", "metrics.json"] + \
             [f"overlays/{m}.png" for m in METHODS]:
        assert (out / f).is_file(), f
    maps = np.load(out / "maps.npz")
    n = len(maps["targets"])
    assert n >= 10 and maps["images"].shape == (n, 1, 16, 16)
    for m in METHODS:
        assert maps[m].shape == (n, 16, 16) and np.isfinite(maps[m]).all()
    kinds = maps["target_kind"]
    assert (kinds[:10] == "true").all() and set(kinds[10:]) <= {"predicted"}
    assert (maps["targets"][:10] == maps["labels"][:10]).all()
    wrong = maps["labels"][:10] != maps["predictions"][:10]
    assert (kinds == "predicted").sum() == wrong.sum()
    df = pd.read_parquet(out / "metrics.parquet")
    assert len(df) == n * len(METHODS) and set(df.substrate) == {"zeros"}
    assert df[["deletion_auc", "insertion_auc", "deletion_auc_random"]].apply(lambda c: c.between(0, 1).all()).all()
    r = pd.read_parquet(out / "randomisation.parquet")
    assert set(r.method) == {"saliency", "integrated_gradients", "grad_cam", "guided_backprop"}
    assert set(r.layer) == {"fc", "conv2", "conv1"}
    import json

    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary) == set(METHODS) | {"target", "head_bypassed", "gradcam_layer", "random_orders", "auc_steps",
                                               "weights_sha256"}
    assert summary["target"] == "logit" and summary["head_bypassed"] is None  # tiny_cnn ends in logits
    assert summary["gradcam_layer"] == "relu2" and summary["random_orders"] == SaliencyConfig().random_orders == df.random_orders.iloc[0]
    assert maps["target_output"].tolist() == ["logit"]
    true = df[df.target_kind == "true"]
    pvalues = []
    for m in METHODS:
        s = summary[m]
        g = true[true.method == m]
        for k in ("deletion", "insertion"):
            c = s[f"{k}_vs_random"]
            # independent recomputation from the per-row table: mean difference and its t interval
            d = (g[f"{k}_auc"] - g[f"{k}_auc_random"]).to_numpy()
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            assert c["effect"] == pytest.approx(d.mean(), abs=1e-12) and c["n"] == len(d) == 10
            assert c["low"] == pytest.approx(d.mean() - half, abs=1e-12)
            assert s[f"{k}_auc"] - s[f"{k}_auc_random"] == pytest.approx(c["effect"], abs=1e-12)
            assert s[f"{k}_verdict"] in ("better than random", "worse than random", "not distinguishable from random")
            pvalues.append((c["p"], c["p_adjusted"]))
        assert (g.deletion_auc_random_std > 0).all()
        randomised = m in set(r.method)
        assert (s["spearman_randomised"] is not None) == randomised
        assert (s["spearman_randomised_informative"] is not None) == randomised
    # Holm over the family of 2 x 7 tests, by hand
    raw = sorted(p for p, _ in pvalues)
    want, running = {}, 0.0
    for rank, p in enumerate(raw):
        running = max(running, min(1.0, (len(raw) - rank) * p))
        want.setdefault(p, running)
    assert all(q == pytest.approx(want[p]) for p, q in pvalues)
    last = r[(r.step == r.step.max()) & (r.target_kind == "true") & (r.method == "integrated_gradients")]
    ig = summary["integrated_gradients"]
    assert ig["spearman_randomised"]["value"] == pytest.approx(last.spearman.mean())
    assert ig["spearman_randomised_informative"]["value"] == pytest.approx(last.spearman_informative.dropna().mean())
    assert (last.informative_pixels <= 256).all() and (r.informative_pixels > 0).all()


def test_bad_method_exits_2(tiny_run, capsys):
    from probe.pipeline.cli import main

    assert main(["saliency", f"run={tiny_run}", "saliency.methods=[saliency,grad_cm]"]) == 2
    err = capsys.readouterr().err
    assert "saliency.methods" in err and "grad_cam" in err


def test_stage_is_deterministic(tiny_run, tmp_path):
    import shutil

    from probe.pipeline.saliency.stage import run

    copies = []
    for k in range(2):
        d = tmp_path / f"r{k}"
        shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("saliency", "logs"))
        run(stage_cfg(d, methods=["saliency", "smoothgrad", "integrated_gradients"],
                      randomisation_methods=["saliency"]))
        copies.append(d / "saliency")
    for f in ("metrics.parquet", "randomisation.parquet", "maps.npz", "metrics.json"):
        assert (copies[0] / f).read_bytes() == (copies[1] / f).read_bytes(), f


def test_nan_in_a_map_is_reported_and_nothing_written(tiny_run, tmp_path, monkeypatch):
    import shutil

    from probe.pipeline.saliency.stage import run

    d = tmp_path / "r"
    shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("saliency", "logs"))
    real = sal_methods.METHODS["input_x_gradient"]

    def poisoned(model, x, target, s):
        a = real(model, x, target, s)
        a[1, 0, 2, 3] = float("nan")
        a[4, 0, 0, 0] = float("inf")
        return a

    monkeypatch.setitem(sal_methods.METHODS, "input_x_gradient", poisoned)
    with pytest.raises(NumericalError, match=r"input_x_gradient: map rows \[1, 4\]"):
        run(stage_cfg(d, methods=["saliency", "input_x_gradient"], randomisation=False))
    assert not (d / "saliency").exists()
