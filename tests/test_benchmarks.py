"""The benchmarks' timing: each mode is timed in a pair with the baseline; ratio = median of the pairs."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402


class FakeClock:
    """A clock that only moves when a fake run says how long it took."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def perf_counter(self):
        return self.now

    def run(self, name, durations):
        def call():
            self.calls.append(name)
            self.now += durations.pop(0)

        return call


def test_each_mode_runs_in_a_pair_with_the_baseline_and_the_ratio_is_the_median_of_pairs(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock.perf_counter)
    # A slow spell doubles everything in round 2: the pair ratios stay 1.5 and 1.2, the medians are unaffected.
    base = [9.0, 2.0, 2.0, 4.0, 4.0, 2.0, 2.0]  # warm-up, then two per round
    runs = {
        "base": clock.run("base", base),
        "a": clock.run("a", [9.0, 3.0, 6.0, 3.0]),
        "b": clock.run("b", [9.0, 2.4, 4.8, 2.4]),
    }
    timings = common.paired_timings(runs, "base", repeats=3)
    pairs_in_order, pairs_reversed = ["base", "a", "base", "b"], ["a", "base", "b", "base"]
    assert clock.calls == ["base", "a", "b"] + pairs_in_order + pairs_reversed + pairs_in_order
    assert timings.ratios == {"base": 1.0, "a": pytest.approx(1.5), "b": pytest.approx(1.2)}
    assert timings.seconds == pytest.approx({"base": 2.0, "a": 3.0, "b": 2.4})


@pytest.mark.parametrize("runs, repeats", [({"base": print}, 3), ({"base": print, "a": print}, 0), ({"a": print}, 3)])
def test_paired_timings_rejects_what_it_cannot_pair(runs, repeats):
    with pytest.raises(ValueError, match="repeats >= 1"):
        common.paired_timings(runs, "base", repeats)


def test_ratio_rows_report_misses_by_how_much():
    timings = common.Timings({"base": 1.0, "ours": 1.3}, {"base": 1.0, "ours": 1.3})
    rows, misses = common.ratio_rows(timings, {"ours": 1.25})
    assert "MISSED by 0.050" in rows[1] and misses == ["ours: 1.300 > 1.25 (missed by 0.050)"]
