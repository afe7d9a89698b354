"""Memory-bounded layer Grams: exactness without projection, bounded storage with it, dual ridge."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge as SkRidge
from sklearn.linear_model import RidgeCV as SkRidgeCV

from harmonizer_fast.neural.features import (
    LayerFeatureAccumulator,
    extract_layer_grams,
    gram_embedding,
    gram_ridge_predict,
)
from harmonizer_fast.neural.image_level import score_image_level
from harmonizer_fast.neural.simulate import simulate_image_level


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, stride=2), torch.nn.Flatten()
    )


def test_streamed_grams_equal_full_feature_grams():
    net, images = _small_net(), torch.randn(23, 3, 20, 20)
    grams = extract_layer_grams(net, torch.split(images, 5), ["0", "2", "3"], progress=False)
    with torch.no_grad():
        feats = {"0": net[0](images), "2": net[:3](images), "3": net(images)}
    for key, f in feats.items():
        f = f.reshape(23, -1).double().numpy()
        np.testing.assert_allclose(grams[key], f @ f.T, rtol=1e-5, atol=1e-6 * np.abs(f @ f.T).max())
    # DataLoader-style (images, labels) batches are accepted.
    grams2 = extract_layer_grams(net, [(b, None) for b in torch.split(images, 7)], ["2"], progress=False)
    np.testing.assert_allclose(grams2["2"], grams["2"], rtol=1e-5, atol=1e-6)


def test_accumulator_storage_is_bounded_by_construction():
    net, images = _small_net(), torch.randn(30, 3, 20, 20)
    accs = extract_layer_grams(net, torch.split(images, 4), ["0", "2"], projection_dim=64, keep_features=True, progress=False)
    n, d_proj = 30, 64
    for key, acc in accs.items():
        assert acc.in_dim > d_proj  # 8*9*9 = 648 and 12*4*4 = 192 features, both projected
        assert acc.width == d_proj and acc.stored_values == n * d_proj
        assert acc.stored_values + n * n <= n * n + n * d_proj
    wide = LayerFeatureAccumulator(projection_dim=1000)
    wide.update(torch.randn(3, 10))
    assert wide.width == 10 and wide.stored_values == 30  # narrower than projection_dim: kept exactly


@pytest.mark.parametrize("projection", ["sparse", "gaussian"])
def test_projection_preserves_inner_products(projection):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(12, 20000)).astype(np.float32)) + 0.3
    acc = LayerFeatureAccumulator(projection_dim=4096, projection=projection, seed=3)
    for chunk in torch.split(x, 5):
        acc.update(chunk)
    exact = (x.double() @ x.double().T).numpy()
    err = np.linalg.norm(acc.gram() - exact) / np.linalg.norm(exact)
    assert err < 4 * np.sqrt(2 / 4096)
    again = LayerFeatureAccumulator(projection_dim=4096, projection=projection, seed=3)
    again.update(x)
    np.testing.assert_allclose(again.gram(), acc.gram(), rtol=1e-5)  # seeded: same projection


def test_gram_ridge_matches_primal_ridge():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 200)) + 1.0
    y = x @ rng.normal(size=(200, 4)) * 0.1 + rng.normal(size=(60, 4)) + 3.0
    train, test = np.arange(48), np.arange(48, 60)
    gram = x @ x.T
    for alpha in (0.5, 50.0):
        expected = SkRidge(alpha=alpha).fit(x[train], y[train]).predict(x[test])
        np.testing.assert_allclose(gram_ridge_predict(gram, y, train, test, alphas=[alpha]), expected, rtol=1e-7, atol=1e-9)
    alphas = np.logspace(-2, 4, 7)
    expected = SkRidgeCV(alphas=alphas).fit(x[train], y[train]).predict(x[test])
    np.testing.assert_allclose(gram_ridge_predict(gram, y, train, test, alphas=alphas), expected, rtol=1e-6, atol=1e-8)
    phi_tr, phi_te = gram_embedding(gram, train, test)
    np.testing.assert_allclose(phi_te @ phi_tr.T, gram[np.ix_(test, train)], rtol=1e-7, atol=1e-8 * gram.max())


def test_gram_readout_scores_like_feature_ridge():
    sim = simulate_image_level(n_images=120, n_neuroids=6, n_features=30, seed=4)
    gram = sim.features @ sim.features.T
    by_gram = score_image_level(gram, sim.assembly, readout="gram_ridge", n_splits=3)
    by_features = score_image_level(sim.features, sim.assembly, readout="ridge", n_splits=3)
    np.testing.assert_allclose(by_gram.split_scores, by_features.split_scores, rtol=1e-6)


def test_layer_feature_store_in_memory_and_spooled_agree(tmp_path):
    from harmonizer_fast.neural.features import LayerFeatureStore

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 2, 3)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    stores = [LayerFeatureStore(["a", "b"], 10), LayerFeatureStore(["a", "b"], 10, memory_budget=0, spool_dir=str(tmp_path))]
    for store in stores:
        for start in (0, 4, 8):
            store.update({"a": torch.from_numpy(a[start:start + 4]), "b": torch.from_numpy(b[start:start + 4])})
    assert not stores[0].spooled and stores[1].spooled and len(list(tmp_path.iterdir())) == 1
    for store in stores:
        np.testing.assert_array_equal(store.features("a"), a.reshape(10, -1))
        np.testing.assert_array_equal(store.features("b"), b)
        store.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="more images than announced"):
        LayerFeatureStore(["a"], 2).update({"a": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="n_images"):
        LayerFeatureStore(["a"], 0)


def test_exact_embedding_gives_the_same_pls_and_ridge_predictions():
    from harmonizer_fast.neural.features import exact_embedding
    from harmonizer_fast.neural.pls import PLSRegression
    from harmonizer_fast.neural.ridge import RidgeCV

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 500)).astype(np.float32)
    y = x[:, :3].astype(np.float64) @ rng.normal(size=(3, 5)) + rng.normal(size=(40, 5))
    phi = exact_embedding(x)
    assert phi.shape == (40, 40)
    train, test = np.arange(30), np.arange(30, 40)
    for make in (lambda: PLSRegression(5, scale=False), lambda: RidgeCV(alphas=(0.1, 10.0))):
        full = np.asarray(make().fit(x[train].astype(np.float64), y[train]).predict(x[test].astype(np.float64)))
        small = np.asarray(make().fit(phi[train], y[train]).predict(phi[test]))
        np.testing.assert_allclose(small, full, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("block", [4096, 7, 3])
def test_gram_in_column_blocks_equals_the_float64_product(block, monkeypatch):
    # the Gram of the exact embeddings and of ridge's dual form: blocks of columns converted into
    # one reused buffer, partial last blocks included
    from harmonizer_fast.neural import ridge_solvers

    monkeypatch.setattr(ridge_solvers, "_FEATURE_BLOCK", block)
    rng = np.random.default_rng(2)
    for shape in ((13, 50), (6, 7), (1, 9)):
        x = rng.normal(size=shape).astype(np.float32)
        x64 = x.astype(np.float64)
        got = ridge_solvers.sample_gram(x, None)
        np.testing.assert_allclose(got, x64 @ x64.T, rtol=1e-13, atol=1e-13)
        np.testing.assert_array_equal(got, got.T)
        mean = x64.mean(axis=0)
        np.testing.assert_allclose(ridge_solvers.sample_gram(x, mean), (x64 - mean) @ (x64 - mean).T,
                                   rtol=1e-13, atol=1e-13)
    strided = rng.normal(size=(9, 40)).astype(np.float32)[:, ::2]  # a non-contiguous layer view
    np.testing.assert_allclose(ridge_solvers.sample_gram(strided, None),
                               strided.astype(np.float64) @ strided.astype(np.float64).T, rtol=1e-13, atol=1e-13)


def test_layer_grams_refuse_no_batches_and_non_finite_values():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="yielded no batches"):
        extract_layer_grams(model, [], ["0"], progress=False)
    images = torch.randn(4, 3, 8, 8)
    images[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch 1 .*non-finite"):
        extract_layer_grams(model, [torch.randn(2, 3, 8, 8), images], ["0"], progress=False)
    huge = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    torch.nn.init.constant_(huge[0].weight, 3e38)  # finite weights, an output that overflows float32
    with pytest.raises(ValueError, match="layer '0': layer output of images 0..1 holds non-finite"):
        extract_layer_grams(huge, [torch.ones(2, 3, 8, 8)], ["0"], projection_dim=8, progress=False)
