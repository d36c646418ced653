"""Statistics and the interleaved harness, with stand-in sessions (no real model)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.deploy.bench import BenchResult, ModelBench, Stats, measure, warnings_for
from bnfold.deploy.engines import Timing
from bnfold.errors import BnfoldError


def test_stats_match_numpy():
    samples = np.random.default_rng(0).gamma(4.0, 0.5, 1000)
    stats = Stats.from_samples(samples)
    for key, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert getattr(stats, key) == pytest.approx(np.percentile(samples, q))
    assert stats.mean == pytest.approx(samples.mean())
    assert stats.std == pytest.approx(samples.std(ddof=1))
    assert stats.cov == pytest.approx(samples.std(ddof=1) / samples.mean())
    assert stats.runs == 1000
    assert stats.throughput(8) == pytest.approx(8 * 1000 / np.median(samples))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=200))
def test_percentiles_are_ordered(values):
    stats = Stats.from_samples(values)
    assert stats.min <= stats.p50 <= stats.p90 <= stats.p95 <= stats.p99 <= stats.max
    assert stats.cov >= 0


class FakeSession:
    """Appends its label to a shared log on every run; optionally returns GPU timings."""

    def __init__(self, label, log, timing=None):
        self.label, self.log, self.timing = label, log, timing

    def run(self):
        self.log.append(self.label)
        return self.timing

    def close(self):
        pass


def test_measure_warms_up_interleaves_and_meets_both_floors():
    log = []
    sessions = [FakeSession("a", log), FakeSession("b", log)]
    samples = measure(sessions, runs=30, min_time=0.0, warmup_time=0.0, block=5)
    warmup_a = log.index("b")  # session a warms up fully before b starts
    assert warmup_a >= 10
    timed = log[len(log) - 2 * len(samples[0]["host"]):]
    assert all(len(s["host"]) >= 30 for s in samples)
    # round-robin blocks of 5: a×5, b×5, a×5, ...
    assert timed[:10] == ["a"] * 5 + ["b"] * 5
    assert timed.count("a") == timed.count("b")


def test_measure_runs_at_least_min_time():
    log = []
    samples = measure([FakeSession("a", log)], runs=1, min_time=0.05, warmup_time=0.0, block=1)
    assert sum(samples[0]["host"]) >= 50.0  # ms


def test_measure_collects_gpu_and_enqueue_samples():
    session = FakeSession("g", [], Timing(gpu_ms=2.0, enqueue_ms=0.1))
    samples = measure([session], runs=12, min_time=0.0, warmup_time=0.0, block=4)
    assert samples[0]["gpu"] == [2.0] * len(samples[0]["host"])
    assert samples[0]["enqueue"] == [0.1] * len(samples[0]["host"])


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"min_time": -1.0}])
def test_measure_refuses_bad_budgets(kwargs):
    with pytest.raises(BnfoldError):
        measure([FakeSession("a", [])], **{"runs": 5, "min_time": 0.0, **kwargs})


def _result(*models):
    return BenchResult("ort-cpu", list(models), {}, {})


def test_warns_on_noise_and_on_enqueue_bound_gpu_runs():
    steady = Stats.from_samples([1.0, 1.001, 0.999, 1.0])
    noisy = Stats.from_samples([1.0, 2.0, 1.0, 3.0])
    gpu = Stats.from_samples([0.1, 0.1, 0.1])
    enqueue = Stats.from_samples([0.5, 0.5, 0.5])
    found = warnings_for(_result(ModelBench("steady", steady), ModelBench("noisy", noisy),
                                 ModelBench("launch", steady, gpu, enqueue)))
    assert any(w.startswith("noisy: timings are noisy") for w in found)
    assert not any(w.startswith("steady") for w in found)
    assert any(w.startswith("launch: host enqueue") for w in found)


def test_to_dict_has_stats_in_ms_and_raw_samples():
    stats = Stats.from_samples([1.0, 2.0, 3.0])
    result = _result(ModelBench("original", stats, samples={"host": [1.0, 2.0, 3.0]}),
                     ModelBench("folded", Stats.from_samples([1.0, 1.0, 1.0])))
    data = result.to_dict()
    assert data["unit"] == "ms"
    first = data["models"][0]
    for key in ("p50", "p90", "p95", "p99", "mean", "std", "cov", "runs"):
        assert key in first
    assert first["p50"] == 2.0 and first["runs"] == 3
    assert first["samples_ms"]["host"] == [1.0, 2.0, 3.0]
    assert result.speedup("folded") == pytest.approx(2.0)


def test_items_per_second_and_speedup_use_the_same_statistic():
    # Skewed samples: mean and median disagree, so mixing them would show here.
    slow = Stats.from_samples([10.0] * 9 + [100.0] * 3)
    fast = Stats.from_samples([5.0] * 9 + [6.0] * 3)
    result = BenchResult("ort-cpu", [ModelBench("original", slow, batch=4),
                                     ModelBench("folded", fast, batch=4)], {}, {})
    ratio = result.models[1].throughput / result.models[0].throughput
    assert result.speedup("folded") == pytest.approx(ratio) == pytest.approx(2.0)
