"""probe.similarity: linear CKA (full-data reference and the minibatch accumulator), unit correlation and
matching, and compare() over several models. Every assertion is against an independent computation: a
closed form, a brute-force U-statistic, numpy's corrcoef, an exhaustive search over permutations, or the
float64 full-data reference on outputs captured separately."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from probe.errors import ConfigError, LayerNotFound
from probe.hooks import layer_outputs
from probe.similarity import CKA, UnitCorrelation, compare, hsic_biased, hsic_unbiased, linear_cka, u_centre
from probe.similarity.cka import centred_gram


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests multiply many tiny matrices; on the shared 2-core machine, two BLAS threads per product wait
    on each other for a scheduler slice (~16 ms a product, measured) where one thread takes microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def latent_pair(n: int, g: torch.Generator, weights: tuple[torch.Tensor, torch.Tensor], noise: float = 2.0):
    """Two representations of one latent ``z (n, r)``: a noisy linear map and a noisy tanh of another."""
    wa, wb = weights
    z = torch.randn(n, wa.shape[0], generator=g)
    x = z @ wa + noise * torch.randn(n, wa.shape[1], generator=g)
    y = torch.tanh(z @ wb) + noise / 2 * torch.randn(n, wb.shape[1], generator=g)
    return x, y


def mixing(r: int, p: int, q: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, p, generator=g), torch.randn(r, q, generator=g)


def feed(acc: CKA, feats: dict[str, torch.Tensor], size: int) -> CKA:
    n = len(next(iter(feats.values())))
    for i in range(0, n, size):
        acc.update({k: v[i : i + size] for k, v in feats.items()})
    return acc


def gram64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = x - x.mean(0)
    return x @ x.T


# -- the estimators -------------------------------------------------------------------------------------------
def test_hsic_unbiased_is_the_u_statistic_over_four_distinct_images():
    """Song et al. 2012: HSIC_1 = 1/(n)_4 sum over ordered distinct (i, j, q, r) of
    K_ij L_ij + K_ij L_qr - 2 K_ij L_iq (the U-statistic whose closed form is their equation 5)."""
    rng = np.random.default_rng(0)
    n = 7
    K, L = gram64(rng.normal(size=(n, 5))), gram64(rng.normal(size=(n, 3)) + rng.normal(size=(n, 1)))
    total = sum(K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
                for i, j, q, r in itertools.permutations(range(n), 4))
    assert hsic_unbiased(K, L) == pytest.approx(total / (n * (n - 1) * (n - 2) * (n - 3)), rel=1e-12)


def test_hsic_biased_is_the_trace_formula():
    rng = np.random.default_rng(1)
    n = 9
    K, L = gram64(rng.normal(size=(n, 4))), gram64(rng.normal(size=(n, 6)))
    H = np.eye(n) - np.ones((n, n)) / n
    assert hsic_biased(K, L) == pytest.approx(np.trace(K @ H @ L @ H) / (n - 1) ** 2, rel=1e-12)


def test_u_centred_inner_product_is_unbiased_hsic_on_random_grams():
    rng = np.random.default_rng(2)
    for n in (4, 5, 17, 64):
        A, B = rng.normal(size=(n, n)), rng.normal(size=(n, n))
        K, L = A @ A.T, B @ B.T + 3.0  # any symmetric matrices; L with a constant offset
        U, V = u_centre(torch.tensor(K)), u_centre(torch.tensor(L))
        assert float((U * V).sum()) / (n * (n - 3)) == pytest.approx(hsic_unbiased(K, L), rel=1e-10, abs=1e-12)


def test_biased_linear_cka_is_kornblith_feature_space_formula():
    """Kornblith et al. 2019, eq. 3: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features."""
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(30, 8)), rng.normal(size=(30, 5))
    Y[:, :3] += X[:, :3]
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    ref = np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    assert linear_cka(X, Y) == pytest.approx(ref, rel=1e-12)


def test_cka_of_a_representation_with_itself_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    acc = feed(CKA(), {"a": x, "b": x.clone()}, 16)
    f, se = acc.matrices()
    np.testing.assert_allclose(f, 1.0, atol=1e-6)
    assert se[0, 1] < 1e-6


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_maps_and_isotropic_scaling_not_to_any_linear_map(debiased):
    """Kornblith et al. 2019, section 3: CKA is invariant to orthogonal transforms and isotropic scaling of
    either side, and not to an arbitrary invertible linear transform."""
    g = torch.Generator().manual_seed(4)
    x, y = latent_pair(200, g, mixing(3, 10, 12))
    q1, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    x, y = x.double(), y.double()
    ref = linear_cka(x, y, debiased)
    assert linear_cka(x @ q1, y, debiased) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x, 7.5 * (y @ q2), debiased) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(0.01 * x @ q1, y @ q2, debiased) == pytest.approx(ref, rel=1e-10)
    # an invertible but anisotropic map (condition number 1e2) changes it
    a = q1 @ torch.diag(torch.logspace(0, 2, 10, dtype=torch.float64)) @ q1.T
    assert abs(linear_cka(x @ a, y, debiased) - ref) > 0.05
    # the minibatch accumulator has the same invariances
    acc = feed(CKA("float64"), {"x": x, "xq": 3 * x @ q1, "xa": x @ a, "y": y}, 50).matrix()
    assert acc.loc["xq", "y"] == pytest.approx(acc.loc["x", "y"], rel=1e-9)
    assert abs(acc.loc["xa", "y"] - acc.loc["x", "y"]) > 0.05


def test_minibatch_estimate_converges_to_the_full_data_debiased_value():
    """2,000 images in 10 batches of 200 against linear_cka(debiased=True) on all 2,000 at once. Both estimate
    the population CKA from the same images; they differ only by the part of the minibatch estimator's
    noise that the full-data one does not share, which is below its standard error: tolerance 2 se (about
    0.014 here) and 0.01 absolute (observed 0.0005-0.003 over 5 seeds)."""
    g = torch.Generator().manual_seed(0)
    x, y = latent_pair(2000, g, mixing(4, 600, 400), noise=3.0)
    full = linear_cka(x, y, debiased=True)
    for precision in ("float32", "float64"):
        acc = feed(CKA(precision), {"x": x, "y": y}, 200)
        f, se = acc.matrices()
        assert acc.batches == 10 and acc.images == 2000
        assert abs(f[0, 1] - full) < min(2 * se[0, 1], 0.01), (precision, f[0, 1], full, se[0, 1])


def test_float32_grams_agree_with_float64_grams():
    """The accumulator's default float32 Gram (of batch-centred features) against float64 throughout, on
    ReLU features with a large common offset (what float32 would cancel without the centring)."""
    g = torch.Generator().manual_seed(5)
    x, y = latent_pair(400, g, mixing(3, 256, 128))
    feats = {"x": torch.relu(x) + 50.0, "y": y}
    f32, f64 = feed(CKA("float32"), feats, 100).matrices()[0], feed(CKA("float64"), feats, 100).matrices()[0]
    np.testing.assert_allclose(f32, f64, atol=1e-5)


def test_independent_gaussians_few_images_many_features_debiased_zero_biased_not():
    """PITFALLS.md: biased HSIC makes independent representations look similar when n << p. Ten pairs of
    independent Gaussians, 30 images, 2,000 and 1,500 features: biased CKA near 1 (about 0.98: the centred
    Grams of n << p Gaussians are all near the centring matrix); debiased CKA has mean 0 and, at n = 30, a
    spread of about 0.06 per pair: the mean of ten within 0.06 (about 3 sd of that mean), each within 0.3."""
    g = torch.Generator().manual_seed(6)
    biased, debiased, minibatch = [], [], []
    for _ in range(10):
        x, y = torch.randn(30, 2000, generator=g), torch.randn(30, 1500, generator=g)
        biased.append(linear_cka(x, y))
        debiased.append(linear_cka(x, y, debiased=True))
        minibatch.append(feed(CKA(), {"x": x, "y": y}, 30).matrices()[0][0, 1])
    assert min(biased) > 0.9
    assert abs(np.mean(debiased)) < 0.06 and max(map(abs, debiased)) < 0.3
    np.testing.assert_allclose(minibatch, debiased, atol=1e-5)  # one batch: the same estimator


def test_standard_error_matches_the_spread_over_independent_repetitions():
    """100 independent repetitions of 10 batches of 16 images: the standard deviation of the CKA estimates
    against the mean reported se. The sample sd of 100 values is itself uncertain by about 7%, the delta
    method is first order: tolerance a factor of 1.33 either way (observed ratio 0.95-1.04 over 300
    repetitions at several batch sizes)."""
    g = torch.Generator().manual_seed(0)
    w = mixing(5, 20, 30)
    est, ses = [], []
    for _ in range(100):
        acc = CKA()
        for _ in range(10):
            x, y = latent_pair(16, g, w)
            acc.update({"x": x, "y": y})
        f, se = acc.matrices()
        est.append(f[0, 1])
        ses.append(se[0, 1])
    ratio = np.std(est, ddof=1) / np.mean(ses)
    assert 0.75 < ratio < 1.33, ratio


def test_merge_of_shards_split_at_batches_equals_one_pass(tmp_path):
    g = torch.Generator().manual_seed(7)
    x, y = latent_pair(240, g, mixing(3, 12, 9))
    feats = {"x": x, "y": y, "z": torch.randn(240, 2, 3, 3, generator=g)}
    one = feed(CKA(), feats, 24)
    first = feed(CKA(), {k: v[:72] for k, v in feats.items()}, 24)
    # the second shard meets its keys in another order: merge lines them up by name
    second = feed(CKA(), {k: feats[k][72:] for k in ("z", "x", "y")}, 24)
    merged = CKA().merge(first).merge(second)
    a, b = one.state(), merged.state()
    for k in CKA.FIELDS:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12, atol=0)
    np.testing.assert_allclose(merged.matrices()[0], one.matrices()[0], rtol=1e-12)
    np.testing.assert_allclose(merged.matrices()[1], one.matrices()[1], rtol=1e-9)
    assert (merged.batches, merged.images) == (10, 240)
    # save / load: no pickle, same state, same bytes for the same state
    merged.save(tmp_path / "m.npz")
    loaded = CKA.load(tmp_path / "m.npz")
    assert loaded.keys == merged.keys and loaded.precision == merged.precision
    pd_a, pd_b = merged.result(), loaded.result()
    assert pd_a.equals(pd_b)
    loaded.save(tmp_path / "again.npz")
    assert (tmp_path / "m.npz").read_bytes() == (tmp_path / "again.npz").read_bytes()
    with pytest.raises(ValueError, match="different keys"):
        merged.merge(feed(CKA(), {"x": x[:24], "w": y[:24]}, 24))


def test_state_size_does_not_grow_with_the_images():
    g = torch.Generator().manual_seed(8)
    feats = {"a": torch.randn(400, 3, 5, 5, generator=g), "b": torch.randn(400, 7, generator=g)}
    small, big = feed(CKA(), {k: v[:40] for k, v in feats.items()}, 20), feed(CKA(), feats, 20)
    assert big.images == 10 * small.images
    s, b = small.state(), big.state()
    assert {k: v.shape for k, v in s.items()} == {k: v.shape for k, v in b.items()}
    assert sum(v.nbytes for v in s.values()) == sum(v.nbytes for v in b.values())
    assert max(v.size for v in b.values()) == 4  # 2 keys: (2, 2) arrays at most


def test_result_lists_each_unordered_pair_once_with_the_diagonal():
    g = torch.Generator().manual_seed(9)
    acc = feed(CKA(), {k: torch.randn(32, 4, generator=g) for k in ("m/c1", "m/c2", "n/c1")}, 8)
    df = acc.result()
    assert list(df.columns) == ["key_a", "key_b", "cka", "se", "batches", "images"]
    assert list(zip(df.key_a, df.key_b)) == [("m/c1", "m/c1"), ("m/c1", "m/c2"), ("m/c1", "n/c1"),
                                             ("m/c2", "m/c2"), ("m/c2", "n/c1"), ("n/c1", "n/c1")]
    assert (df.batches == 4).all() and (df.images == 32).all()
    mat = acc.matrix()
    np.testing.assert_array_equal(mat.to_numpy(), mat.to_numpy().T)


def test_constant_representation_gives_nan_not_an_error():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, 6, generator=g)
    feats = {"x": x, "zero": torch.zeros(40, 3, 2, 2), "const": torch.full((40, 5), 3.7), "y": x @ torch.randn(6, 4, generator=g)}
    f, se = feed(CKA(), feats, 10).matrices()
    keys = list(feats)
    for k in ("zero", "const"):
        i = keys.index(k)
        assert np.isnan(f[i]).all() and np.isnan(f[:, i]).all() and np.isnan(se[i]).all()
    assert np.isfinite(f[np.ix_([0, 3], [0, 3])]).all()
    assert math.isnan(linear_cka(x, torch.zeros(40, 3))) and math.isnan(linear_cka(x, torch.full((40, 2), 1.5), True))


def test_batches_too_small_or_inconsistent_raise():
    acc = CKA()
    with pytest.raises(ValueError, match="at least 4 images"):
        acc.update({"a": torch.randn(3, 5), "b": torch.randn(3, 2)})
    with pytest.raises(ValueError, match="same images"):
        acc.update({"a": torch.randn(8, 5), "b": torch.randn(9, 2)})
    acc.update({"a": torch.randn(8, 5), "b": torch.randn(8, 2)})
    with pytest.raises(ValueError, match="same keys"):
        acc.update({"a": torch.randn(8, 5), "c": torch.randn(8, 2)})
    with pytest.raises(ValueError, match="features"):
        acc.update({"a": torch.randn(8, 6), "b": torch.randn(8, 2)})


def test_centred_gram_does_not_touch_its_input_and_reports_the_raw_scale():
    x = torch.randn(10, 3, 2, 2) + 4.0
    before = x.clone()
    g = centred_gram(x)
    assert torch.equal(x, before) and g.features == 12
    np.testing.assert_allclose(g.matrix.numpy(), gram64(x.numpy()), rtol=1e-5, atol=1e-4)
    assert float(g.scale) == pytest.approx(float(x.reshape(10, -1).double().square().sum(1).mean()), rel=1e-6)


# -- unit correlation and matching ----------------------------------------------------------------------------
def test_unit_correlation_is_numpy_corrcoef_over_images_and_positions():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(30, 5, 4, 3, generator=g) * torch.tensor([1.0, 1e-3, 5, 1, 1]).view(1, 5, 1, 1) + 1e3
    b = torch.randn(30, 3, 4, 3, generator=g) + a[:, :3] * 0.01
    u = UnitCorrelation("net1/conv", "net2/conv")
    for i in range(0, 30, 7):  # uneven batches: correlation is over all rows whatever the batching
        u.update(a[i : i + 7], b[i : i + 7])
    A = a.permute(0, 2, 3, 1).reshape(-1, 5).double().numpy()
    B = b.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    ref = np.corrcoef(A.T, B.T)[:5, 5:]
    np.testing.assert_allclose(u.correlation(), ref, rtol=1e-9, atol=1e-10)
    # shards with other shifts merge to the same correlations
    s1, s2 = UnitCorrelation("a", "b"), UnitCorrelation("a", "b")
    s1.update(a[:10], b[:10])
    s2.update(a[10:] + 0.0, b[10:])
    np.testing.assert_allclose(s1.merge(s2).correlation(), ref, rtol=1e-9, atol=1e-10)
    assert s1.images == 30 and s1.count == 30 * 12


def test_linear_layers_correlate_and_mismatched_maps_raise_naming_both():
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(50, 6, generator=g), torch.randn(50, 4, generator=g)
    u = UnitCorrelation("m/fc1", "n/fc1")
    u.update(a, b)
    np.testing.assert_allclose(u.correlation(), np.corrcoef(a.T.double().numpy(), b.T.double().numpy())[:6, 6:], atol=1e-10)
    with pytest.raises(ConfigError, match=r"'m/conv2'.*8x8.*'n/conv3'.*4x4"):
        UnitCorrelation("m/conv2", "n/conv3").update(torch.randn(5, 3, 8, 8), torch.randn(5, 3, 4, 4))
    with pytest.raises(ConfigError, match=r"'m/conv'.*'n/fc'"):
        UnitCorrelation("m/conv", "n/fc").update(torch.randn(5, 3, 8, 8), torch.randn(5, 3))


def test_matching_recovers_a_planted_permutation_semi_and_one_to_one(tmp_path):
    g = torch.Generator().manual_seed(13)
    C = 12
    a = torch.randn(40, C, 5, 5, generator=g)
    perm = torch.randperm(C, generator=g)
    b = a[:, perm] + 0.05 * torch.randn(40, C, 5, 5, generator=g)  # unit j of B is unit perm[j] of A
    u = UnitCorrelation("a/conv", "b/conv")
    u.update(a, b)
    inverse = torch.argsort(perm).numpy()  # the unit of B that copies each unit of A
    semi, one = u.best_match(), u.one_to_one()
    np.testing.assert_array_equal(semi["unit_b"].to_numpy(int), inverse)
    np.testing.assert_array_equal(one["unit_b"].to_numpy(int), inverse)
    np.testing.assert_array_equal(u.permutation(), inverse)
    np.testing.assert_array_equal(u.best_match(of="b")["unit_a"].to_numpy(int), perm.numpy())
    assert torch.allclose(b[:, torch.as_tensor(u.permutation())], a, atol=0.5)
    s = u.summary()
    assert s["semi_frac_above_0.8"] == 1.0 and s["one_to_one_frac_above_0.5"] == 1.0
    u.save(tmp_path / "u.npz")
    np.testing.assert_array_equal(UnitCorrelation.load(tmp_path / "u.npz").correlation(), u.correlation())


def test_one_to_one_maximises_total_correlation_against_every_permutation():
    g = torch.Generator().manual_seed(14)
    a, b = torch.randn(60, 5, generator=g), torch.randn(60, 5, generator=g)
    b = b + a @ torch.randn(5, 5, generator=g) * 0.7  # correlated, no planted answer
    u = UnitCorrelation()
    u.update(a, b)
    r = u.correlation()
    best = max(sum(r[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    one = u.one_to_one()
    assert one["corr"].sum() == pytest.approx(best, rel=1e-12)
    assert sorted(one["unit_b"].to_numpy(int)) == list(range(5))
    # semi-matching is each row's max (partners may repeat)
    np.testing.assert_array_equal(u.best_match()["unit_b"].to_numpy(int), r.argmax(1))


def test_constant_units_have_nan_correlation_and_no_partner():
    g = torch.Generator().manual_seed(15)
    a = torch.randn(20, 4, 3, 3, generator=g)
    a[:, 1] = 0.0  # a dead unit
    a[:, 2] = 2.5  # a constant one
    b = a[:, [3, 0, 1, 2]] + 0.1 * torch.randn(20, 4, 3, 3, generator=g)
    b[:, 2] = 0.0
    u = UnitCorrelation()
    u.update(a, b)
    r = u.correlation()
    assert np.isnan(r[[1, 2]]).all() and np.isnan(r[:, 2]).all() and np.isfinite(r[np.ix_([0, 3], [0, 1, 3])]).all()
    for frame in (u.best_match(), u.one_to_one()):
        assert frame["unit_b"].isna().tolist() == [False, True, True, False]
        assert frame["unit_b"][0] == 1 and frame["unit_b"][3] == 0
    s = u.summary()
    assert s["constant_a"] == 2 and s["constant_b"] == 1 and s["one_to_one_frac_above_0.8"] == 0.5


# -- compare over models -------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """A conv followed by an in-place ReLU (torchvision's habit): hooks must see the pre-ReLU output."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 16, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.relu(self.bn(self.conv2(x)))
        return self.fc(x.flatten(1))


def captured(model, x, layers):
    model.eval()
    with torch.no_grad():
        return layer_outputs(model, x, layers)[1]


def test_compare_equals_brute_force_on_captured_outputs():
    torch.manual_seed(0)
    models = {"a": Tiny(4, 0), "b": Tiny(3, 1)}
    models["a"].train()  # compare switches to eval mode (BatchNorm's running statistics) and back
    models["b"].eval()
    x = torch.randn(70, 1, 8, 8)
    layers = {"a": ["conv1", "conv2", "fc"], "b": ["conv1", "bn"]}
    # the loader's batches of 7 are re-cut into minibatches of 20; the last 10 images are dropped
    sim = compare(models, [(x[i : i + 7], None) for i in range(0, 70, 7)], layers=layers, batch_size=20,
                  match=[("a/conv1", "b/conv1")])
    assert models["a"].training and not models["b"].training
    assert (sim.batch_size, sim.images, sim.images_dropped, sim.cka.batches) == (20, 60, 10, 3)
    outs = {f"{m}/{k}": v for m in models for k, v in captured(models[m], x[:60], layers[m]).items()}
    assert sim.cka.keys == ["a/conv1", "a/conv2", "a/fc", "b/conv1", "b/bn"]
    assert (outs["a/conv1"] < 0).any()  # the pre-ReLU output
    # brute force: Song et al.'s HSIC per minibatch of 20, averaged, in float64
    hs = {}
    for ka, kb in itertools.combinations_with_replacement(outs, 2):
        hs[ka, kb] = np.mean([hsic_unbiased(gram64(outs[ka][i : i + 20]), gram64(outs[kb][i : i + 20]))
                              for i in range(0, 60, 20)])
    df = sim.result()
    for row in df.itertuples():
        ref = hs[row.key_a, row.key_b] / math.sqrt(hs[row.key_a, row.key_a] * hs[row.key_b, row.key_b])
        assert row.cka == pytest.approx(ref, abs=2e-5), (row.key_a, row.key_b)
    u = sim.units[("a/conv1", "b/conv1")]
    A = outs["a/conv1"].permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    B = outs["b/conv1"].permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    np.testing.assert_allclose(u.correlation(), np.corrcoef(A.T, B.T)[:4, 4:], atol=1e-9)


def test_compare_one_batch_is_linear_cka_debiased_with_per_model_inputs():
    models = {"a": Tiny(4, 2), "b": Tiny(4, 3)}
    x = torch.randn(40, 1, 8, 8)
    xb = 2 * x + 1  # model b sees its own normalisation of the same images
    sim = compare(models, [{"a": x, "b": xb}], layers={"a": ["conv2"], "b": ["conv2"]})
    assert (sim.batch_size, sim.images, sim.images_dropped) == (40, 40, 0)
    oa, ob = captured(models["a"], x, ["conv2"])["conv2"], captured(models["b"], xb, ["conv2"])["conv2"]
    assert sim.cka.matrix().loc["a/conv2", "b/conv2"] == pytest.approx(linear_cka(oa, ob, debiased=True), abs=2e-5)


def test_compare_default_layers_and_bad_names():
    models = {"a": Tiny(2, 4), "b": Tiny(2, 5)}
    x = torch.randn(16, 1, 8, 8)
    sim = compare(models, [x])  # a plain tensor for every model; default layers of each
    assert sim.layers == {m: ["conv1", "pool", "conv2", "fc"] for m in models}
    assert len(sim.result()) == 8 * 9 // 2
    with pytest.raises(LayerNotFound, match="conv3"):
        compare(models, [x], layers={"a": ["conv3"]})
    with pytest.raises(LayerNotFound, match="nope"):
        compare(models, [x], match=[("a/conv1", "b/nope")])
    with pytest.raises(ConfigError, match="model"):
        compare(models, [x], match=[("c/conv1", "b/conv1")])
    with pytest.raises(ConfigError, match="at least 4"):
        compare(models, [x[:3]])


def test_compare_with_one_module_under_two_names_keeps_each_its_own_inputs():
    m = Tiny(3, 6)
    x = torch.randn(24, 1, 8, 8)
    sim = compare({"a": m, "b": m}, [{"a": x, "b": torch.flip(x, dims=[3])}], layers={"a": ["conv2"], "b": ["conv2"]})
    oa, ob = captured(m, x, ["conv2"])["conv2"], captured(m, torch.flip(x, dims=[3]), ["conv2"])["conv2"]
    assert sim.cka.matrix().loc["a/conv2", "b/conv2"] == pytest.approx(linear_cka(oa, ob, debiased=True), abs=2e-5)
    assert sim.cka.matrix().loc["a/conv2", "b/conv2"] < 0.99
