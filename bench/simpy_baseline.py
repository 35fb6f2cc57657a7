"""The bare-metal IPI ping-pong written idiomatically on SimPy, for comparison with navic's engine.

Same model as navic's bare metal at the level of events: two CPUs; the sender writes the ICR
(APIC access cost), the message lands in the target's IRR after the wire delay, the target takes
the interrupt at its next instruction boundary (entry cost), its handler writes the ICR back and
EOIs, and so on. Costs are navic's (navic/data/costs.toml). Run: `python bench/speed.py`.
"""

from __future__ import annotations

import time

from navic.sim.cost import load_costs


def ipis_per_second(n_ipis: int) -> tuple[float, int, float]:
    import simpy

    c = load_costs("zen4")
    env = simpy.Environment()
    irr = [simpy.Store(env), simpy.Store(env)]   # per-CPU pending interrupts
    delivered = [0]

    def send(dst: int, vector: int):
        yield env.timeout(c.IPI_WIRE)
        yield irr[dst].put(vector)

    def cpu(me: int, other: int, starts: bool):
        if starts:
            yield env.timeout(c.APIC_ACCESS)
            env.process(send(other, 0xF0))
        while delivered[0] < n_ipis:
            vector = yield irr[me].get()           # wait (spin) for the interrupt
            yield env.timeout(c.INTR_ENTRY)        # vectoring
            delivered[0] += 1
            if delivered[0] >= n_ipis:
                return
            yield env.timeout(c.APIC_ACCESS)       # handler: ICR write back
            env.process(send(other, vector ^ 1))
            yield env.timeout(c.APIC_ACCESS)       # EOI
            yield env.timeout(c.IRET)

    env.process(cpu(0, 1, True))
    env.process(cpu(1, 0, False))
    t0 = time.perf_counter()
    env.run()
    dt = time.perf_counter() - t0
    return delivered[0] / dt, delivered[0], dt


if __name__ == "__main__":
    rate, n, dt = ipis_per_second(10_000)
    print(f"SimPy ping-pong: {rate:,.0f} IPIs/s ({n} in {dt:.2f} s)")
