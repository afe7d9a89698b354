"""Spatial IT benchmark pieces: resizing against the reference fixtures, scoring against sklearn/scipy."""
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.cross_decomposition import PLSRegression as SkPLS

from harmonizer_fast.neural.neural_benchmark import (
    _group_channels,
    extract_activations,
    resizing_activity,
    score_features,
    score_model,
)
from tests.conftest import load_fixture
from tests.neural.conftest import tf_resize


@pytest.fixture(scope="module")
def ref():
    return load_fixture("neural.npz")


def _minmax_per_image(x):
    flat = x.reshape(x.shape[0], -1)
    flat = flat - flat.min(1, keepdims=True)
    return (flat / flat.max(1, keepdims=True)).reshape(x.shape)


def test_block_mean_branch_matches_reference(ref):
    out = resizing_activity(ref["ra_activity"], grid_size=17)
    assert out.dtype == torch.float64 and out.shape == (14, 17, 17, 8)
    np.testing.assert_allclose(out.numpy(), ref["ra_output"], rtol=1e-5, atol=1e-7)


def test_upsampling_branch_reference_compat(ref):
    out = resizing_activity(ref["ra_small_activity"], grid_size=17, reference_bug_compat=True)
    np.testing.assert_allclose(out.numpy(), ref["ra_small_output"], rtol=1e-5, atol=1e-7)
    assert not out[..., 7].any()


def test_upsampling_branch_fixed_resizes_every_channel(ref):
    act = ref["ra_small_activity"]
    out = resizing_activity(act, grid_size=17).numpy()
    resized = np.stack([tf_resize(img, (17, 17)) for img in act])
    np.testing.assert_allclose(out, _minmax_per_image(resized), rtol=1e-10, atol=1e-12)
    # Channels 0..6 agree with the reference up to its min-max, whose minimum was the zero channel.
    ref_scaled = ref["ra_small_output"][..., :7]
    ratio = resized[..., :7] / ref_scaled.clip(1e-12)
    per_image = ratio.reshape(14, -1)
    np.testing.assert_allclose(per_image, per_image[:, :1].repeat(per_image.shape[1], 1), rtol=1e-5)


def test_resizing_non_square_and_constant(rng):
    act = rng.uniform(size=(2, 40, 7, 3))
    out = resizing_activity(act, grid_size=10).numpy()
    bounds = [int(i * 40 / 10.0) for i in range(11)]
    rows = np.stack([act[:, a:b].mean(1) for a, b in zip(bounds[:-1], bounds[1:])], 1)
    expected = np.stack([tf_resize(r, (10, 10, 3)) for r in rows])
    np.testing.assert_allclose(out, _minmax_per_image(expected), rtol=1e-10, atol=1e-12)
    assert not resizing_activity(np.ones((1, 4, 4, 2)), grid_size=6).any()
    with pytest.raises(ValueError, match="activity_array"):
        resizing_activity(np.ones((4, 4, 2)))


def test_score_features_matches_independent_loop(rng):
    n, g, c, t = 4, 8, 6, 3
    x = rng.uniform(size=(n, g, g, c))
    y = x @ rng.normal(size=(c, t)) + 0.5 * rng.normal(size=(n, g, g, t))
    score, sim4, sim1 = score_features(x, y, grid_size=g)
    scores, s4, s1 = [], [], []
    for out in range(n):
        rest = [j for j in range(n) if j != out]
        pls = SkPLS(6, scale=False, tol=1e-4).fit(x[rest].reshape(-1, c), y[rest].reshape(-1, t))
        pred = pls.predict(x[out].reshape(-1, c))
        truth = y[out].reshape(-1, t)
        scores.append(np.median([np.corrcoef(pred[:, k], truth[:, k])[0, 1] for k in range(t)]))
        pmap, tmap = pred.reshape(g, g, t).mean(2), y[out].mean(2)
        s1.append(spearmanr(pmap.ravel(), tmap.ravel())[0])
        s4.append(spearmanr(tf_resize(pmap, (2, 2)).ravel(), tf_resize(tmap, (2, 2)).ravel())[0])
    np.testing.assert_allclose(score, [np.mean(scores), np.std(scores)], rtol=1e-6)
    np.testing.assert_allclose(sim1, [np.mean(s1), np.std(s1)], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sim4, [np.mean(s4), np.std(s4)], rtol=1e-5, atol=1e-7)


def test_group_channels_like_reference(rng):
    act = rng.normal(size=(2, 3, 3, 603))
    expected = np.average(act.reshape(-1, 3), axis=1).reshape(2, 3, 3, -1)
    np.testing.assert_allclose(_group_channels(torch.from_numpy(act)).numpy(), expected, rtol=1e-12)
    act4 = rng.normal(size=(2, 3, 3, 604))
    expected4 = np.average(act4.reshape(-1, 4), axis=1).reshape(2, 3, 3, -1)
    np.testing.assert_allclose(_group_channels(torch.from_numpy(act4)).numpy(), expected4, rtol=1e-12)
    with pytest.raises(ValueError, match="602"):
        _group_channels(torch.zeros(1, 2, 2, 602))
    assert _group_channels(torch.zeros(1, 2, 2, 600)).shape[-1] == 600


def test_score_model_is_resize_then_score_features(rng):
    act = rng.uniform(size=(3, 12, 12, 5))  # 12 > 8: block means
    y = rng.normal(size=(3, 8, 8, 2))
    features = resizing_activity(act, grid_size=8)
    expected_score, expected_sim4, _ = score_features(features, y, grid_size=8)
    score, sim4 = score_model(act, y, grid_size=8)
    assert score == expected_score and sim4 == expected_sim4


def test_extract_activations_hooks_and_timm_indices():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    images = torch.randn(5, 3, 16, 16)
    acts = extract_activations(model, images, ["0", "2"], batch_size=2)
    np.testing.assert_allclose(acts["0"].numpy(), model[0](images).permute(0, 2, 3, 1).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert acts["2"].shape == (5, 5, 5, 5)

    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).eval()
    images = torch.randn(3, 3, 32, 32)
    acts = extract_activations(vit, images, [1, "blocks.1"], batch_size=2)
    with torch.no_grad():
        expected = vit.forward_intermediates(images, indices=[1], intermediates_only=True)[0]
    np.testing.assert_allclose(acts["1"].numpy(), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    # The hooked block output is the same map with the class token dropped.
    np.testing.assert_allclose(acts["blocks.1"].numpy(), acts["1"].numpy(), rtol=1e-5, atol=1e-5)


def test_timm_indices_given_out_of_depth_order_keep_their_own_outputs():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    acts = extract_activations(vit, images, [2, 0], batch_size=2)
    with torch.no_grad():
        expected = vit.forward_intermediates(images, indices=[0, 2], intermediates_only=True)
    for index, out in zip([0, 2], expected):
        np.testing.assert_allclose(acts[str(index)].numpy(), out.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_an_unknown_layer_name_is_a_value_error_with_close_names():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"`layers` \['3'\] are not modules of Sequential.*closest names"):
        extract_activations(model, torch.randn(2, 3, 8, 8), ["0", "3"])
