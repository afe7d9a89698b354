"""pytest-benchmark timings of the alignment metrics (see compare_metrics.py for what is timed)."""
import pytest

from benchmarks.compare_metrics import METRICS, check_equal, make_maps

N_MAPS = 50


@pytest.fixture(scope="module")
def maps():
    return make_maps(N_MAPS)


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("variant", ["reference", "package"])
def test_metric(benchmark, maps, metric, variant):
    reference, package = METRICS[metric]
    values = benchmark(reference if variant == "reference" else package, *maps)
    check_equal(metric, reference(*maps), values)
