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

from probe.errors import ConfigError, NumericalError
from probe.saliency import methods as sal_methods
from probe.saliency.batching import map_batches
from probe.saliency.config import SaliencyConfig
from probe.saliency.faithfulness import (attribution_order, auc, deletion_insertion_auc, perturbation_curves,
                                         random_order)
from probe.saliency.methods import MethodSettings, attribute, occlusion_geometry, reduce_channels
from probe.saliency.prepare import attribution_copy, gradcam_layer
from probe.saliency.randomisation import average_ranks, cascade_order, cascading_randomisations, spearman
from probe.saliency.ssim import gaussian_window, minmax, ssim


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
    return attribute(method, attribution_copy(model), x, target, MethodSettings(**kw))


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
    assert gradcam_layer(lenet, torch.zeros(1, 1, 32, 32), None) == "conv2"  # conv3 outputs 1x1
    assert gradcam_layer(tiny_cnn(), torch.zeros(1, 1, 16, 16), None) == "conv2"
    with pytest.raises(ConfigError, match="saliency.gradcam_layer.*conv2"):
        gradcam_layer(lenet, torch.zeros(1, 1, 32, 32), "conv22")


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
    m = minmax(torch.stack([torch.full((3, 3), 5.0), torch.arange(9.0).view(3, 3)]))
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

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from probe.cli import main

    d = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "model=tiny_cnn", "data.image_size=16", "train.epochs=1", f"run_dir={d}",
                 "progress=false", f"hydra.run.dir={d}/logs"]) == 0
    return d


CHEAP = ["saliency.ig_steps=8", "saliency.smoothgrad_samples=4", "saliency.auc_steps=8",
         "saliency.overlays=false"]


def stage_cfg(run, **kw):
    from probe.saliency.config import SaliencyStage

    return SaliencyStage(run=str(run), device="cpu",
                         saliency=SaliencyConfig(ig_steps=8, smoothgrad_samples=4, auc_steps=8, overlays=False, **kw))


def test_cli_end_to_end_writes_every_file(tiny_run):
    from probe.cli import main
    from probe.saliency.config import METHODS

    assert main(["saliency", f"run={tiny_run}", "device=cpu"] + CHEAP[:-1]) == 0
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
    assert set(summary) == set(METHODS)
    assert summary["saliency"]["spearman_randomised"] is not None


def test_bad_method_exits_2(tiny_run, capsys):
    from probe.cli import main

    assert main(["saliency", f"run={tiny_run}", "saliency.methods=[saliency,grad_cm]"]) == 2
    err = capsys.readouterr().err
    assert "saliency.methods" in err and "grad_cam" in err


def test_stage_is_deterministic(tiny_run, tmp_path):
    import shutil

    from probe.saliency.stage import run

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

    from probe.saliency.stage import run

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
