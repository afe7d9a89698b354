"""Neural metrics against the TensorFlow reference fixtures (neural.npz) and numpy/scipy/sklearn."""
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.cross_decomposition import PLSRegression as SkPLS

from harmonizer_fast.neural.metrics import (
    brain_score,
    ceiling_score,
    highest_off_diagonal,
    pearson_correlation,
    resize_bilinear,
    spearmanr_sim,
    tf_pearson_loss,
)
from tests.conftest import load_fixture


@pytest.fixture(scope="module")
def ref():
    return load_fixture("neural.npz")


def test_pearson_matches_reference(ref):
    out = tf_pearson_loss(ref["pearson_x"], ref["pearson_y"])
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref["pearson_out"], rtol=1e-5)
    assert pearson_correlation is tf_pearson_loss


def test_pearson_axis_and_errors(rng):
    x, y = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(7)]
    np.testing.assert_allclose(tf_pearson_loss(x, y, axis=0).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="zero variance"):
        tf_pearson_loss(np.ones((2, 4)), y[:2, :4])
    with pytest.raises(ValueError, match="same shape"):
        tf_pearson_loss(x, y[:, :3])


def test_brain_score_matches_reference(ref):
    score, kernel, y_pred = brain_score(ref["bs_X_train"], ref["bs_Y_train"], ref["bs_X_test"], ref["bs_Y_test"])
    # The fix adds the intercept: predictions are sklearn's predict(), not the reference's X @ coef.
    np.testing.assert_allclose(y_pred.numpy(), ref["bs_Y_pred_sklearn_predict"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel.numpy(), ref["bs_pls_kernel"], rtol=1e-4, atol=1e-6)
    assert kernel.shape == (64, 30)
    # Pearson does not see the per-target offset: the reference correlations and score are unchanged.
    corr = tf_pearson_loss(y_pred.T, ref["bs_Y_test"].T).numpy()
    np.testing.assert_allclose(corr, ref["bs_correlations_sklearn_predict_f64"], rtol=1e-6)
    np.testing.assert_allclose(corr, ref["bs_correlations"], rtol=1e-5)
    assert score == pytest.approx(float(ref["bs_score"]), rel=1e-5)
    # The reference's X_test @ kernel differs from the prediction by a constant per target.
    offset = y_pred.numpy() - ref["bs_X_test"] @ kernel.numpy()
    np.testing.assert_allclose(offset, np.broadcast_to(offset[:1], offset.shape), atol=1e-8)


def _small_problem(rng, n_train=80, n_test=30, n_features=12, n_targets=5):
    w = rng.normal(size=(n_features, n_targets))
    x_train, x_test = rng.uniform(size=(n_train, n_features)), rng.uniform(size=(n_test, n_features))
    noise = lambda n: 0.3 * rng.normal(size=(n, n_targets))  # noqa: E731
    return x_train, x_train @ w + 1.0 + noise(n_train), x_test, x_test @ w + 1.0 + noise(n_test)


def test_brain_score_honours_n_components_and_reducers(rng):
    x_train, y_train, x_test, y_test = _small_problem(rng)
    sk = SkPLS(3, scale=False, tol=1e-4).fit(x_train, y_train)
    expected = sk.predict(x_test)
    score, _, y_pred = brain_score(x_train, y_train, x_test, y_test, n_components=3, reducer="mean")
    np.testing.assert_allclose(y_pred.numpy(), expected, rtol=1e-6, atol=1e-9)
    per_target = [np.corrcoef(expected[:, j], y_test[:, j])[0, 1] for j in range(5)]
    assert score == pytest.approx(np.mean(per_target), rel=1e-6)
    with pytest.raises(ValueError, match="reducer"):
        brain_score(x_train, y_train, x_test, y_test, reducer="max")
    with pytest.raises(ValueError, match="correlation_fn"):
        brain_score(x_train, y_train, x_test, y_test, correlation_fn="kendall")
    with pytest.raises(ValueError, match="same number of samples"):
        brain_score(x_train, y_train[:-1], x_test, y_test)


def test_brain_score_spearman_branch(rng):
    x_train, y_train, x_test, y_test = _small_problem(rng)
    score, _, y_pred = brain_score(x_train, y_train, x_test, y_test, n_components=4, correlation_fn="spearman")
    rhos = [spearmanr(y_pred.numpy()[:, j], y_test[:, j])[0] for j in range(5)]
    assert score == pytest.approx(np.median(rhos), rel=1e-9)


def test_spearmanr_sim_matches_reference(ref):
    sims = spearmanr_sim(ref["sp_e1"], ref["sp_e2"], reducers=[1, 4])
    np.testing.assert_allclose(sims[1], ref["sp_sims_r1"], rtol=1e-6)
    np.testing.assert_allclose(sims[4], ref["sp_sims_r4"], rtol=1e-6)
    resized = resize_bilinear(torch.from_numpy(ref["sp_e1"])[:, None], (4, 4))
    np.testing.assert_allclose(resized[:, 0].numpy(), ref["sp_e1_resized_r4"][..., 0], rtol=1e-5)
    # (N, H, W, 1) input is accepted like the reference.
    sims4d = spearmanr_sim(ref["sp_e1"][..., None], ref["sp_e2"][..., None], reducers=[1])
    np.testing.assert_allclose(sims4d[1], ref["sp_sims_r1"], rtol=1e-6)
    with pytest.raises(ValueError, match="reducer 16"):
        spearmanr_sim(ref["sp_e1"], ref["sp_e2"], reducers=[16])


def test_highest_off_diagonal(rng):
    m = rng.normal(size=(6, 6))
    m[np.diag_indices(6)] = 10.0
    expected = m[~np.eye(6, dtype=bool)].max()
    assert highest_off_diagonal(m) == pytest.approx(expected)
    m[0, 1] = np.nan
    assert highest_off_diagonal(m) == pytest.approx(np.nanmax(m[~np.eye(6, dtype=bool)]))
    with pytest.raises(ValueError, match="square"):
        highest_off_diagonal(m[:3])


def _recordings(rng, images=3, side=5, time=20, channels=4):
    common = rng.normal(size=(images, side, side, 1, 1))
    return common + 0.7 * rng.normal(size=(images, side, side, time, channels))


def test_ceiling_score_full_maps(rng):
    arr = _recordings(rng)
    expected = []
    for image in arr[:, :, :, 5:15].mean(3):
        corr = np.corrcoef(image.reshape(-1, image.shape[-1]).T)
        expected.append(corr[~np.eye(corr.shape[0], dtype=bool)].max())
    assert ceiling_score(arr, 5, 15) == pytest.approx(np.mean(expected), rel=1e-10)
    ranked = []
    for image in arr[:, :, :, 5:15].mean(3):
        rho = spearmanr(image.reshape(-1, image.shape[-1]))[0]
        ranked.append(rho[~np.eye(rho.shape[0], dtype=bool)].max())
    assert ceiling_score(arr, 5, 15, correlation_fn="spearman") == pytest.approx(np.mean(ranked), rel=1e-10)
    with pytest.raises(ValueError, match="time_a"):
        ceiling_score(arr, 15, 5)


def test_ceiling_score_reference_compat(rng):
    arr = _recordings(rng)
    n, _, _, _, r = arr.shape
    corr = np.zeros((n, r, r))
    lo, hi = arr[..., 5:15, :].mean(3).min(), arr[..., 5:15, :].mean(3).max()
    for k in range(n):  # literal transcription of the reference loops
        for i in range(r - 1):
            a = np.flipud(arr[k, :, :, 5:15, i].mean(axis=2)) - lo / (hi - lo)
            for j in range(r - 1):
                if i >= j:
                    continue
                b = np.flipud(arr[k, :, :, 5:15, j].mean(axis=2)) - lo / (hi - lo)
                corr[k, i, j] = np.mean([np.corrcoef(a[row], b[row])[0, 1] for row in range(a.shape[0])])
    expected = np.mean([max(c[~np.eye(r, dtype=bool)]) for c in corr])
    assert ceiling_score(arr, 5, 15, reference_bug_compat=True) == pytest.approx(expected, rel=1e-10)
