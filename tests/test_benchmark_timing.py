"""benchmarks._timing.measure_interleaved: every variant runs in every round, the order rotated,
memory probes around each run."""
from benchmarks._timing import measure_interleaved


def test_measure_interleaved_rotates_the_variants_each_round():
    calls, probes = [], []
    fns = [(name, lambda name=name: calls.append(name)) for name in "abc"]
    timings = measure_interleaved(fns, repeats=3, warmup=1, before_run=lambda i: probes.append(("before", i)),
                                  after_run=lambda i: probes.append(("after", i)))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert probes[:4] == [("before", 0), ("after", 0), ("before", 1), ("after", 1)]
    assert len(probes) == 2 * len(calls)
    assert [t.name for t in timings] == list("abc")
    assert all(t.repeats == 3 and 0 <= t.min_s <= t.median_s <= t.max_s for t in timings)
