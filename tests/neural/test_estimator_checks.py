"""RidgeCV and PLSRegression as scikit-learn estimators: scikit-learn's own estimator checks.

``parametrize_with_checks`` runs every check ``check_estimator`` runs (the multi-output
regressor ones included, from the ``MultiOutputMixin`` tag; the transformer ones for PLS), one
test each. PLS is checked with ``n_components=1``: the checks' data have as few as 1-2
features, below the default 25 components (scikit-learn's own PLS is checked at 1-2 too).
"""
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from harmonizer_fast.neural.pls import PLSRegression
from harmonizer_fast.neural.ridge import RidgeCV


@parametrize_with_checks([RidgeCV(), RidgeCV(cv=3, alpha_per_target=True), PLSRegression(n_components=1)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_clone_get_set_params_and_grid_search():
    import numpy as np
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 8))
    Y = X[:, :3] @ rng.standard_normal((3, 4)) + 0.1 * rng.standard_normal((60, 4))
    ridge = RidgeCV(alphas=(0.1, 1.0), alpha_per_target=True)
    assert clone(ridge).get_params() == ridge.get_params()
    assert ridge.set_params(fit_intercept=False).fit_intercept is False
    search = GridSearchCV(PLSRegression(), {"n_components": [1, 3, 5]}, cv=3).fit(X, Y)
    assert search.best_params_["n_components"] >= 3  # the targets depend on three directions
    search = GridSearchCV(make_pipeline(StandardScaler(), RidgeCV()), {"ridgecv__alphas": [(0.1,), (1e4,)]}, cv=3)
    assert search.fit(X, Y).best_params_ == {"ridgecv__alphas": (0.1,)}
