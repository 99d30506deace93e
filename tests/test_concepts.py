"""probe.concepts (CRAFT): each result checked against an independent computation (planted concepts, closed-form
Sobol indices, a planted permutation, the inputs' own rows, the model's own forward pass)."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from probe.concepts import (ActivationSample, activation_rows, fit_concepts, head_from_layer, k_curve,
                            match_by_coefficients, match_concepts, sobol_design, sobol_importance, split_halves_stability)
from probe.errors import ConfigError, LayerNotFound


def planted(n=2000, k=5, C=24, noise=0.01, seed=0):
    """``A = clamp(U W + noise, 0)``: ``k`` distinct, non-orthogonal non-negative directions ``W`` and sparse
    non-negative coefficients ``U`` (each concept present in about half the samples)."""
    rng = np.random.default_rng(seed)
    W = rng.random((k, C)) ** 3
    U = rng.exponential(1.0, (n, k)) * (rng.random((n, k)) < 0.5)
    A = np.clip(U @ W + noise * rng.standard_normal((n, C)), 0, None).astype(np.float32)
    return A, W


# -- factorisation ------------------------------------------------------------------------------------
def test_fit_concepts_recovers_planted_directions():
    A, W_true = planted()
    assert (np.abs(np.corrcoef(W_true)[np.triu_indices(5, 1)]) > 0.05).any()  # not orthogonal
    c = fit_concepts(A, 5, seed=0)
    assert c.W.shape == (5, 24) and c.U.shape == (2000, 5)
    assert (c.W >= 0).all() and (c.U >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(c.W, axis=1), 1.0, rtol=1e-5)
    assert (np.diff(c.U.sum(0)) <= 0).all()  # ordered by coefficient mass, descending
    m = match_concepts(W_true, c.W)
    assert m.scores.min() > 0.95, m.scores
    # relative error, recomputed here
    err = np.linalg.norm(A - c.U.astype(np.float64) @ c.W) / np.linalg.norm(A)
    assert err < 0.05
    # new activations from the same concepts: NNLS coefficients with W fixed reconstruct them as well
    rng = np.random.default_rng(1)
    U_new = rng.exponential(1.0, (300, 5)) * (rng.random((300, 5)) < 0.5)
    A_new = np.clip(U_new @ W_true + 0.01 * rng.standard_normal((300, 24)), 0, None).astype(np.float32)
    U_fit = c.transform(A_new)
    assert U_fit.shape == (300, 5) and (U_fit >= 0).all()
    assert np.isclose(c.reconstruction_error(A_new),
                      np.linalg.norm(A_new - U_fit.astype(np.float64) @ c.W) / np.linalg.norm(A_new))
    assert c.reconstruction_error(A_new) < 0.05
    # deterministic for a seed
    again = fit_concepts(A, 5, seed=0)
    np.testing.assert_array_equal(again.W, c.W)


def test_k_curve_decreases_to_planted_k():
    A, _ = planted(n=1000)
    ks = [1, 2, 3, 4, 5]
    curve = k_curve(A, ks, seed=0)
    assert (np.diff(curve) < 0).all(), curve
    assert curve[-1] < 0.05 < curve[-2]
    for k, e in zip(ks[::2], curve[::2]):  # each value is the fit's own relative error
        c = fit_concepts(A, k, seed=0)
        assert np.isclose(e, np.linalg.norm(A - c.U.astype(np.float64) @ c.W) / np.linalg.norm(A), rtol=1e-5)


def test_split_halves_stability_of_planted_concepts():
    A, _ = planted(n=1200)
    assert split_halves_stability(A, 5, seed=0) == 1.0


# -- matching -----------------------------------------------------------------------------------------
def test_match_recovers_planted_permutation():
    rng = np.random.default_rng(3)
    W = rng.random((6, 10))
    perm = rng.permutation(6)
    m = match_concepts(W, W[perm])  # row j of W_b is row perm[j] of W_a
    assert (m.pairs[:, 0] == np.arange(6)).all()
    assert (perm[m.pairs[:, 1]] == m.pairs[:, 0]).all()
    np.testing.assert_allclose(m.scores, 1.0, rtol=1e-12)
    assert match_concepts(W, W).share_above() == 1.0
    part = match_concepts(W[:4], W[perm])  # fewer concepts on one side: each of them matched
    assert len(part.pairs) == 4 and part.share_above(0.999) == 1.0
    # cosines are those of the matrix, recomputed here
    a = W / np.linalg.norm(W, axis=1, keepdims=True)
    b = W[perm] / np.linalg.norm(W[perm], axis=1, keepdims=True)
    np.testing.assert_allclose(m.similarity, a @ b.T)


def test_match_by_coefficients_recovers_a_permuted_rescaled_noisy_bank():
    # network b's concepts are network a's, permuted, each on its own positive scale, with noise: the
    # correlation over images ignores the scale (a different network's channels and norms are its own)
    rng = np.random.default_rng(4)
    U = rng.gamma(2.0, size=(400, 6))
    perm = rng.permutation(6)
    Ub = U[:, perm] * rng.uniform(0.1, 10, 6) + 0.05 * rng.standard_normal((400, 6))
    m = match_by_coefficients(U, Ub)
    assert (perm[m.pairs[:, 1]] == m.pairs[:, 0]).all()
    assert m.scores.min() > 0.99
    # the similarity is numpy's Pearson correlation, recomputed here
    np.testing.assert_allclose(m.similarity, np.corrcoef(U.T, Ub.T)[:6, 6:], atol=1e-12)
    # unrelated banks: nothing matched above 0.8, although the Hungarian algorithm picks the best pairs
    assert match_by_coefficients(U, rng.gamma(2.0, size=(400, 6))).share_above(0.8) == 0.0
    # a constant concept correlates with nothing; different images are refused
    flat = match_by_coefficients(np.c_[U[:, :2], np.ones(400)], U[:, :3])
    assert (flat.similarity[2] == 0).all()
    with pytest.raises(ConfigError, match="U_b: 300 images"):
        match_by_coefficients(U, U[:300])


# -- Sobol importance ---------------------------------------------------------------------------------
def test_sobol_design_replicates_one_column():
    k, n = 4, 16
    masks = sobol_design(k, n, seed=0)
    assert masks.shape == (n * (k + 1), k) and ((masks >= 0) & (masks < 1)).all()
    a = masks[:n]
    for i in range(k):
        c = masks[n * (i + 1) : n * (i + 2)]
        others = [j for j in range(k) if j != i]
        np.testing.assert_array_equal(c[:, others], a[:, others])
        assert (c[:, i] != a[:, i]).all()
    np.testing.assert_array_equal(sobol_design(k, n, seed=0), masks)
    assert not np.array_equal(sobol_design(k, n, seed=1), masks)


def test_sobol_head_reading_one_concept():
    k, C = 4, 6
    W = torch.zeros(k, C)
    W[:, :k] = torch.eye(k)
    W[:, k:] = 0.1  # identity-like, with a shared part that the head ignores
    lin = nn.Linear(C, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = 3.0  # class 0 reads concept 0 only
        lin.weight[1, 1], lin.weight[1, 2] = 1.0, -2.0  # class 1 reads concepts 1 and 2
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin).eval()
    U = torch.rand(6, 4, k, generator=torch.Generator().manual_seed(0)) + 0.1  # 6 images, 2x2 positions
    classes = torch.tensor([0, 0, 0, 1, 1, 1])
    st = sobol_importance(head, U, W, classes, n_designs=32, seed=0, spatial=(2, 2), batch_size=1024)
    assert st.shape == (2, k)
    assert st[0, 0] > 0.9 and (st[0, 1:] < 0.05).all()
    # class 1 is additive in concepts 1 and 2: their total indices add up to 1, the others are 0
    assert st[1, 0] < 0.05 and st[1, 3] < 0.05 and st[1, 1] + st[1, 2] > 0.9


def test_sobol_additive_head_matches_closed_form():
    # class 0: y = a x1 + b x2 with x_i = u_i m_i and independent uniform masks: Var(a x1) = a^2 u1^2 / 12, so
    # S_T1 = a^2 u1^2 / (a^2 u1^2 + b^2 u2^2), S_T2 = 1 - S_T1, S_T3 = 0; class 1: y = x3, so S_T = (0, 0, 1)
    a, b = 2.0, 1.0
    W = torch.eye(3)
    head = lambda x: torch.stack([a * x[:, 0] + b * x[:, 1], x[:, 2]], 1)  # noqa: E731
    U = torch.rand(12, 3, generator=torch.Generator().manual_seed(1)) + 0.5
    classes = np.array([0, 1] * 6)
    per = sobol_importance(head, U, W, classes, n_designs=256, seed=0, batch_size=8192, per_image=True)
    v1, v2 = (a * U[:, 0]).double() ** 2, (b * U[:, 1]).double() ** 2
    expected = torch.stack([v1 / (v1 + v2), v2 / (v1 + v2), torch.zeros(12, dtype=torch.double)], 1).numpy()
    expected[classes == 1] = [0.0, 0.0, 1.0]
    np.testing.assert_allclose(per, expected, atol=0.02)
    # per class: the mean over that class's images
    per_class = sobol_importance(head, U, W, classes, n_designs=256, seed=0, batch_size=8192)
    np.testing.assert_allclose(per_class, np.stack([per[classes == 0].mean(0), per[classes == 1].mean(0)]))


# -- ActivationSample -----------------------------------------------------------------------------------
def feed(sample, acts, batches):
    for chunk in torch.chunk(acts, batches):
        sample.update(chunk)
        assert len(sample) <= sample.max_samples and sample._rows.shape[0] == sample.max_samples
    return sample


def test_activation_sample_bounded_genuine_and_deterministic():
    acts = torch.randn(200, 3, 4, 5, generator=torch.Generator().manual_seed(0))  # negatives: rectified
    few = feed(ActivationSample(500, seed=7), acts, 10)
    many = feed(ActivationSample(500, seed=7), acts, 100)
    for s in (few, many):
        assert s.matrix().shape == (500, 3) and s.seen == 200 * 20 and s.seen_images == 200
        img, pos = s.images, s.positions
        np.testing.assert_array_equal(s.matrix(), acts[img, :, pos[:, 0], pos[:, 1]].clamp_min(0).numpy())
        assert len({(i, h, w) for i, (h, w) in zip(img, pos)}) == 500  # no row kept twice
    # one draw per row in stream order: the sample does not depend on how the stream is batched
    np.testing.assert_array_equal(few.matrix(), many.matrix())
    np.testing.assert_array_equal(few.images, many.images)
    assert not np.array_equal(feed(ActivationSample(500, seed=8), acts, 10).images, few.images)
    # fewer rows than max_samples: all of them, in order
    small = feed(ActivationSample(500, seed=0), acts[:3], 2)
    np.testing.assert_array_equal(small.matrix(), activation_rows(acts[:3]))


def test_activation_sample_is_uniform():
    # 100 images x 9 positions; kept image indices have mean (N - 1) / 2, sd (N / sqrt(12)) / sqrt(n)
    acts = torch.rand(100, 2, 3, 3)  # the values do not matter here, only how many rows
    s = feed(ActivationSample(300, seed=0), acts, 25)
    sd = 100 / np.sqrt(12) / np.sqrt(300)
    assert abs(s.images.mean() - 49.5) < 4 * sd
    # inclusion frequency of each of 40 rows over 400 seeds: Binomial(400, 10/40), sd 8.7
    rows = torch.arange(40, dtype=torch.float32)[:, None]
    counts = np.zeros(40)
    for seed in range(400):
        counts[feed(ActivationSample(10, seed=seed), rows, 4).images] += 1
    assert np.abs(counts - 100).max() < 40, counts


# -- head_from_layer ----------------------------------------------------------------------------------
def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 6, 3, padding=1)), ("relu2", nn.ReLU(inplace=True)),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(6, 3)),
    ])).eval()


def test_head_from_layer_reproduces_model():
    model, x = tiny_cnn(), torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    head = head_from_layer(model, "conv2", x[:1])
    with torch.no_grad():
        true = model[:3](x)  # conv2's output, by slicing the Sequential
        kept = true.clone()
        assert torch.allclose(head(true), model(x))
        assert torch.equal(true, kept)  # the in-place ReLU after conv2 did not edit the caller's tensor
        other = torch.randn(true.shape, generator=torch.Generator().manual_seed(1))  # the replacement is used
        assert torch.allclose(head(other), model[3:](other))
    with pytest.raises(LayerNotFound, match="conv3.*did you mean"):
        head_from_layer(model, "conv3", x[:1])
    with pytest.raises(ValueError, match="acts: shape"):
        head(torch.zeros(5, 6, 4, 4))


def test_head_from_layer_explains_the_logit_before_a_final_log_softmax():
    model, x = tiny_cnn(), torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with_softmax = nn.Sequential(OrderedDict([*model.named_children(), ("log_softmax", nn.LogSoftmax(dim=1))])).eval()
    head = head_from_layer(with_softmax, "conv2", x[:1])
    with torch.no_grad():
        other = torch.randn(5, 6, 8, 8, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(head(other), model[3:](other))  # the logits the LogSoftmax would take
        assert not torch.allclose(head(other), with_softmax[3:](other))


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 3, 1), nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(self.relu(x)))


def test_head_from_layer_refuses_a_shared_module():
    head = head_from_layer(SharedReLU(), "relu", torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="relu.*more than once"):
        head(torch.zeros(1, 3, 2, 2))


def test_concepts_end_to_end_on_a_cnn():
    model, x = tiny_cnn(), torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acts = model[:4](x)  # after relu2: rectified
    s = ActivationSample(400, seed=0)
    s.update(acts[:4])
    s.update(acts[4:])
    c = fit_concepts(s.matrix(), 3, seed=0)
    U = c.transform_maps(acts)
    assert U.shape == (8, 64, 3)
    head = head_from_layer(model, "relu2", x[:1])
    st = sobol_importance(head, torch.from_numpy(U), torch.from_numpy(c.W), [0, 1] * 4, n_designs=8,
                          spatial=(8, 8), batch_size=512)
    assert st.shape == (2, 3) and np.isfinite(st).all() and (st >= 0).all()


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    A, _ = planted(n=50)
    with pytest.raises(ValueError, match=r"^A: .*negative"):
        fit_concepts(A - 1, 2)
    with pytest.raises(ValueError, match=r"^A: .*empty"):
        fit_concepts(np.zeros((0, 24)), 2)
    with pytest.raises(ValueError, match=r"^A: .*2-D"):
        fit_concepts(np.zeros(24), 2)
    with pytest.raises(ValueError, match=r"^k: 0"):
        fit_concepts(A, 0)
    with pytest.raises(ValueError, match=r"^k: 25"):
        fit_concepts(A, 25)
    with pytest.raises(ValueError, match=r"^max_samples"):
        ActivationSample(0)
    with pytest.raises(ValueError, match=r"^acts: shape"):
        ActivationSample(10).update(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"^n_designs"):
        sobol_design(3, 24)
    with pytest.raises(ValueError, match=r"^spatial"):
        sobol_importance(lambda t: t, torch.ones(2, 4, 3), torch.eye(3), 0)
    with pytest.raises(ValueError, match=r"^classes"):
        sobol_importance(lambda t: t, torch.ones(2, 3), torch.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match=r"^W_b"):
        match_concepts(np.ones((2, 3)), np.ones((2, 4)))
