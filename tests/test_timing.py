"""Timing of callables side by side (``flowmatch_fast.timing``, used by the demo and bench/)."""

from flowmatch_fast.timing import Timing, time_interleaved


def test_each_variant_is_warmed_up_then_timed_reps_times_in_rotating_rounds():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timings = time_interleaved(fns, "cpu", reps=6, rounds=3, warmup=1)
    assert order[:3] == list("abc")  # one warm-up call each
    # 3 rounds of 6 // 3 = 2 calls per variant, the first variant moving one place per round
    assert order[3:] == list("aabbcc" "bbccaa" "ccaabb")
    assert list(timings) == list("abc")
    for t in timings.values():
        assert isinstance(t, Timing) and 0 <= t.p10 <= t.median <= t.p90


def test_warm_up_is_at_most_a_third_of_the_timed_calls():
    calls = []
    time_interleaved({"f": lambda: calls.append(1)}, "cpu", reps=3, rounds=1, warmup=10)
    assert len(calls) == 1 + 3  # min(10, max(1, 3 // 3)) warm-up calls, then 3 timed
