"""MACO, the PCA parametrisation, feature accentuation, diversity, transparency maps and the judges of synthetic
images (saturation, transfer), each against a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from probe.synthesis import objectives as O
from probe.synthesis.accentuate import accentuate
from probe.synthesis.judge import predict, saturation, saturation_limit, transfer
from probe.synthesis.param import (ImageParam, antisymmetric, maco_magnitude, pca_basis, sigmoid_moments,
                                   value_map)
from probe.synthesis.render import Normalize, render
from probe.synthesis.transform import RandomCrop, Transforms, add_noise


def tiny_cnn(seed: int = 0, channels: int = 1, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 8 * 8, classes)).eval()


# -- MACO -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,h,w", [(1, 12, 12), (3, 10, 7)])
def test_maco_keeps_the_template_magnitude_exactly(channels, h, w):
    """The spectrum of the image MACO makes has the template's magnitude at every frequency, for any phase,
    including after optimisation steps; the template is the mean |fft2| of the (decorrelated) images."""
    torch.manual_seed(0)
    images = torch.rand(30, channels, h, w)
    color = torch.linalg.qr(torch.randn(channels, channels))[0] * 0.7 + torch.eye(channels) * 0.5
    mag = maco_magnitude(images, color)
    # the template, directly: decorrelate, remove each image's mean, |fft2| averaged, DC 0, unit energy per value
    x = torch.einsum("dc,nchw->ndhw", torch.linalg.inv(color.double()), images.double() - images.double().mean((2, 3), keepdim=True))
    ref = torch.fft.fft2(x, norm="ortho").abs().mean(0)
    ref[:, 0, 0] = 0
    ref = ref * math.sqrt(channels * h * w) / ref.norm()
    assert torch.allclose(mag.double(), ref, atol=1e-5)
    p = ImageParam(4, channels, (h, w), kind="maco", magnitude=mag, color=color, seeds=[3, 1, 4, 1])
    with torch.no_grad():
        p.params.add_(torch.randn_like(p.params) * 5)  # any phase
    lin = p.linear().double()
    assert torch.allclose(torch.fft.fft2(lin, norm="ortho").abs(), mag.double().expand_as(lin), atol=1e-5)
    assert torch.allclose(lin.pow(2).mean((1, 2, 3)), torch.ones(4, dtype=torch.float64), atol=1e-5)  # unit energy


def test_antisymmetric_phase_is_odd_and_leaves_an_odd_phase_alone():
    t = torch.randn(2, 3, 6, 5)
    a = antisymmetric(t)
    for i in range(6):
        for j in range(5):
            assert torch.allclose(a[..., i, j], -a[..., (-i) % 6, (-j) % 5])
    assert torch.allclose(antisymmetric(a), a)


def test_value_map_gives_the_images_brightness_and_contrast():
    """sigmoid(gain * z + offset), z ~ N(0, sd^2): its mean and sd (by Monte Carlo) are the images' own."""
    pixels = torch.rand(200, 2, 8, 8) ** torch.tensor([3.0, 0.5]).view(1, 2, 1, 1)
    sd = torch.tensor([1.0, 0.6])
    gain, offset = value_map(pixels, sd)
    z = torch.randn(400_000, dtype=torch.float64)
    for c in range(2):
        y = torch.sigmoid(gain[c].double() * sd[c] * z + offset[c].double())
        assert float(y.mean()) == pytest.approx(float(pixels[:, c].mean()), abs=3e-3)
        assert float(y.std()) == pytest.approx(float(pixels[:, c].std()), abs=3e-3)
    m, s = sigmoid_moments(0.0, 0.0, 1.0)
    assert m == pytest.approx(0.5) and s == pytest.approx(0.0, abs=1e-12)


# -- PCA parametrisation and Gaussian prior ----------------------------------------------------------------
def test_pca_basis_against_numpy_and_its_images_stay_in_the_span():
    rng = np.random.default_rng(0)
    basis_true = rng.normal(size=(5, 2 * 6 * 6))
    pixels = torch.from_numpy(0.5 + 0.02 * rng.normal(size=(300, 5)) @ basis_true).float().view(300, 2, 6, 6)
    b = pca_basis(pixels, variance=0.999)
    assert len(b.sd) == 5  # five directions explain all of it
    flat = pixels.reshape(300, -1).double().numpy()
    sv = np.linalg.svd(flat - flat.mean(0), compute_uv=False)
    assert np.allclose(b.sd.numpy(), sv[:5] / np.sqrt(299), rtol=1e-4)
    assert torch.allclose(b.components @ b.components.T, torch.eye(5), atol=1e-5)
    assert len(pca_basis(pixels, k=3).sd) == 3
    p = ImageParam(4, 2, 6, kind="pca", basis=b, seeds=range(4), init_sd=1.0)
    x = p().detach().reshape(4, -1).double()
    residual = (x - b.mean.double()) - (x - b.mean.double()) @ b.components.double().T @ b.components.double()
    assert float(residual.abs().max()) < 1e-5  # nothing outside the span (no pixel is clamped here)
    # whitening: the coefficients of the parameters come back, and set_pixels inverts the map
    assert torch.allclose(b.whiten(p().detach()), p.params.detach(), atol=1e-3)
    q = ImageParam(4, 2, 6, kind="pca", basis=b).set_pixels(p().detach())
    assert torch.allclose(q(), p(), atol=1e-5)
    # the Gaussian prior of an image is the mean squared whitened coefficient
    prior = O.gaussian_prior(b)({}, p().detach())
    assert torch.allclose(prior, p.params.detach().pow(2).mean(1), atol=1e-3)


def test_pca_needs_a_basis_of_the_right_shape():
    b = pca_basis(torch.rand(20, 1, 4, 4), k=3)
    with pytest.raises(ValueError, match="pca parametrisation needs a basis"):
        ImageParam(2, 1, 5, kind="pca", basis=b)
    with pytest.raises(ValueError, match="allowed pixel, fourier, maco, pca"):
        ImageParam(2, 1, 4, kind="wavelet")


# -- transparency, copies, crops, noise -------------------------------------------------------------------
def test_transparency_is_the_sum_of_absolute_input_gradients():
    """With lr 0 the image never moves, so after s steps the map is s times |d objective / d pixels| at the
    start, which autograd gives directly; with one step and lr > 0 it is the first gradient alone."""
    model = tiny_cnn()
    mean, std = [0.3], [0.5]

    def gradient(param):
        x = param().detach().requires_grad_(True)
        out = model(Normalize(mean, std)(x))
        (g,) = torch.autograd.grad(out[torch.arange(2), torch.tensor([0, 2])].sum(), x)
        return g.abs()

    for steps, lr in ((3, 0.0), (1, 0.1)):
        param = ImageParam(2, 1, 12, kind="fourier", seeds=[0, 1])
        expected = steps * gradient(param)
        res = render(model, O.class_logit([0, 2]), param, steps=steps, lr=lr, mean=mean, std=std)
        assert torch.allclose(res.transparency, expected, rtol=1e-5, atol=1e-8)


def test_copies_average_the_objective_over_transformed_versions():
    """With noise as the only transform, render's objective per step is the mean over the copies; the last
    step's gradient (the transparency map after one step) equals the mean of the copies' gradients."""
    model = tiny_cnn()
    t = Transforms(noise=0.1, copies=3)
    param = ImageParam(2, 1, 12, kind="pixel", seeds=[5, 6])
    x0 = param().detach()
    gen = torch.Generator().manual_seed(7)
    noisy = add_noise(x0.repeat(3, 1, 1, 1), 0.1, gen).requires_grad_(True)
    out = model(Normalize([0.0], [1.0])(noisy))[:, 1].view(3, 2)
    (g,) = torch.autograd.grad(out.mean(0).sum(), noisy)
    expected = g.view(3, 2, 1, 12, 12).sum(0).abs()  # d mean_j f(x + n_j) / dx = mean_j f'(x + n_j), summed over 1/3 each
    res = render(model, O.class_logit(1), param, steps=1, lr=0.0, transforms=t, seed=7)
    assert torch.allclose(res.transparency, expected, rtol=1e-5, atol=1e-8)


def test_random_crop_is_a_box_resized_to_the_full_image():
    """RandomCrop's map, for a box of half the side at a pixel-aligned place, equals slicing that box out and
    resizing it (bilinear); drawn boxes lie inside the image; a full box is the identity."""
    from probe.synthesis.transform import affine

    x = torch.rand(2, 1, 16, 16)
    m = RandomCrop(0.5, 0.5).matrix(2, 16, 16, torch.Generator().manual_seed(0))
    assert torch.all(m[:, :2, 2].abs() <= 0.5 + 1e-12) and torch.all(m[:, 0, 0] == 0.5)
    for left, top in ((2, 6), (8, 0)):
        m[:, 0, 2], m[:, 1, 2] = (left + 4) / 8 - 1, (top + 4) / 8 - 1  # box centre, normalised
        ref = F.interpolate(x[:, :, top:top + 8, left:left + 8], size=(16, 16), mode="bilinear", align_corners=False)
        inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # the outermost samples reach past the box
        assert torch.allclose(affine(x, m)[inner], ref[inner], atol=1e-5)
    assert torch.allclose(RandomCrop(1.0, 1.0)(x, torch.Generator().manual_seed(1)), x, atol=1e-5)


def test_noise_has_the_stated_spread():
    gen = torch.Generator().manual_seed(0)
    n = add_noise(torch.zeros(200_000), 0.1, gen)
    # Gaussian sd s plus uniform of width s: variance s^2 + s^2 / 12
    assert float(n.std()) == pytest.approx(0.1 * math.sqrt(1 + 1 / 12), rel=0.01)


# -- objectives -------------------------------------------------------------------------------------------
def test_diversity_of_identical_images_is_its_closed_form():
    """k identical images: every normalised Gram product is 1, so each image scores (k - 1) / k and a block
    sums to Lucid's k - 1; two orthogonal Gram matrices score 0."""
    h = torch.rand(1, 4, 5, 5).repeat(6, 1, 1, 1)
    for k in (2, 3):
        d = O.diversity("l", k)({"l": h}, None)
        assert torch.allclose(d, torch.full((6,), (k - 1) / k), atol=1e-6)
    a = torch.zeros(2, 2, 1, 1)
    a[0, 0], a[1, 1] = 1.0, 1.0  # Grams e1 e1^T and e2 e2^T: orthogonal
    assert torch.allclose(O.diversity("l", 2)({"l": a}, None), torch.zeros(2))
    # against a direct loop over Lucid's definition for random activations
    h = torch.randn(4, 3, 2, 2)
    g = [torch.einsum("cp,dp->cd", h[i].reshape(3, -1), h[i].reshape(3, -1)) for i in range(4)]
    g = [x / x.norm() for x in g]
    ref = [sum(float((g[i] * g[j]).sum()) for j in range(2 * (i // 2), 2 * (i // 2) + 2) if j != i) / 2 for i in range(4)]
    assert torch.allclose(O.diversity("l", 2)({"l": h}, None), torch.tensor(ref), atol=1e-6)


def test_diversity_term_spreads_the_k_images_of_a_unit():
    model = tiny_cnn()
    base = O.channel("2", [1, 1, 1])
    res = [render(model, base - w * O.diversity("2", 3), ImageParam(3, 1, 12, kind="pixel", seeds=[0, 0, 0]), steps=30,
                  lr=0.05) for w in (0.0, 5.0)]
    spread = [float(torch.pdist(r.pixels.flatten(1)).mean()) for r in res]
    assert spread[0] < 1e-6 < spread[1]  # same seed and no term: identical; with it they part


def test_direction_objective_is_a_dot_product_averaged_over_positions():
    h = torch.randn(2, 3, 4, 4)
    v = torch.randn(3)
    ref = (h * v.view(1, 3, 1, 1)).sum(1).mean((1, 2))
    assert torch.allclose(O.direction("l", v)({"l": h}, None), ref, atol=1e-6)
    assert torch.allclose(O.direction("l", torch.eye(3)[[0, 2]])({"l": h}, None), h[[0, 1], [0, 2]].mean((1, 2)))


# -- feature accentuation -------------------------------------------------------------------------------
def test_accentuation_with_an_infinite_penalty_returns_the_seed_and_a_finite_one_moves_it():
    model = tiny_cnn()
    seeds = torch.rand(2, 1, 12, 12) * 0.8 + 0.1
    obj = O.channel("2", [0, 3])
    still = accentuate(model, obj, seeds, weight=math.inf, steps=20)
    assert torch.equal(still.pixels, seeds)
    with torch.no_grad():
        from probe.synthesis.render import forward_capture
        assert torch.allclose(still.objective, obj(forward_capture(model, seeds, ["2"]), seeds))
    results = {w: accentuate(model, obj, seeds, weight=w, steps=40, lr=0.05) for w in (1e6, 10.0, 0.0)}
    dist = {w: float((r.pixels - seeds).pow(2).mean()) for w, r in results.items()}
    assert dist[1e6] < 1e-5 < dist[10.0] < dist[0.0]  # a stronger pull stays closer
    assert (results[0.0].objective > still.objective).all()  # free ascent raises the unit
    with pytest.raises(ValueError, match="maco fixes the magnitude"):
        accentuate(model, obj, seeds, weight=1.0, steps=1, kind="maco")


# -- judges -----------------------------------------------------------------------------------------------
def test_saturation_counts_values_near_the_ends_by_brute_force():
    x = torch.tensor([[0.0, 0.019, 0.021, 0.5, 0.979, 0.981, 1.0, 0.3]]).view(1, 2, 2, 2)
    assert saturation(x).tolist() == [4 / 8]  # 0, 0.019, 0.981, 1
    assert saturation_limit(np.array([0.1, 0.2, 0.3])) == 0.5  # never below a half
    assert saturation_limit(np.linspace(0, 1, 101)) == pytest.approx(0.99)


def test_transfer_of_a_model_with_itself_is_its_own_predictions():
    """Judged by the model that made them, the matrix is that model's softmax; a model ending in a
    log-softmax is read as probabilities."""
    model = tiny_cnn(classes=4)
    with_log_softmax = nn.Sequential(model, nn.LogSoftmax(dim=1)).eval()
    pixels = torch.rand(6, 1, 12, 12)
    classes = [0, 1, 2, 3, 0, 1]
    mean, std = [0.4], [0.3]
    with torch.no_grad():
        prob = torch.softmax(model(Normalize(mean, std)(pixels)).double(), 1)
    df = transfer({"self": (model, mean, std), "self_log": (with_log_softmax, mean, std)}, pixels, classes)
    for name in ("self", "self_log"):
        d = df[df.judge == name]
        assert np.allclose(d.probability, prob[torch.arange(6), classes].numpy(), atol=1e-6)
        assert d.predicted.tolist() == prob.argmax(1).tolist()
        assert d.recognised.tolist() == (prob.argmax(1) == torch.tensor(classes)).tolist()
    assert torch.allclose(predict(model, pixels, mean, std), prob)
