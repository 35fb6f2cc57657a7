"""The event engine: time order, signals, callbacks, cancellation and the choice interface."""

from __future__ import annotations

from navic.sim.chooser import Chooser, ReplayChooser
from navic.sim.engine import Engine


def test_processes_advance_in_time_order():
    eng = Engine()
    log = []

    def proc(name, delays):
        for d in delays:
            yield d
            log.append((eng.now, name))

    eng.spawn(proc("a", [10, 10, 10]), "a")
    eng.spawn(proc("b", [15, 15]), "b")
    eng.run()
    # at t=30 b was scheduled first (at t=15), so FIFO runs it first
    assert log == [(10, "a"), (15, "b"), (20, "a"), (30, "b"), (30, "a")]
    assert eng.now == 30


def test_signal_wakes_waiters_with_value_and_only_current_ones():
    eng = Engine()
    sig = eng.signal("s")
    got = []

    def waiter(tag):
        v = yield sig
        got.append((tag, eng.now, v))

    eng.spawn(waiter("w1"), "w1")
    eng.spawn(waiter("w2"), "w2")
    eng.call_at(50, sig.fire, "hello")
    eng.call_at(60, sig.fire, "late")  # nobody waits any more: no effect
    eng.run()
    assert got == [("w1", 50, "hello"), ("w2", 50, "hello")]


def test_cancelled_callback_does_not_run_and_until_stops_the_clock():
    eng = Engine()
    ran = []
    h = eng.call_at(10, ran.append, "x")
    eng.call_at(20, ran.append, "y")
    eng.call_at(500, ran.append, "z")
    h.cancel()
    eng.run(until=100)
    assert ran == ["y"]
    assert eng.now == 100


def test_process_result_and_done_signal():
    eng = Engine()

    def child():
        yield 5
        return 42

    out = []

    def parent():
        p = eng.spawn(child(), "child")
        v = yield p.done
        out.append((eng.now, v, p.alive, p.result))

    eng.spawn(parent(), "parent")
    eng.run()
    assert out == [(5, 42, False, 42)]


class _Reverse(Chooser):
    wants_ties = True

    def pick(self, labels):
        return len(labels) - 1


def test_chooser_orders_simultaneous_events():
    for chooser, expected in ((None, ["a", "b", "c"]), (_Reverse(), ["c", "b", "a"])):
        eng = Engine(chooser=chooser)
        order = []
        for n in "abc":
            eng.call_at(7, order.append, n, label=n)
        eng.run()
        assert order == expected


def test_weighted_choice_is_deterministic_per_seed_and_replayable():
    def draws(seed):
        eng = Engine(seed=seed)
        return [eng.choose("coin", 2, [0.5, 0.5]) for _ in range(64)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    eng = Engine(chooser=ReplayChooser([("choose", "coin", 1), ("choose", "coin", 0)]))
    assert [eng.choose("coin", 2), eng.choose("coin", 2), eng.choose("coin", 2)] == [1, 0, 0]
    assert eng.choose("one", 1) == 0
