"""Profile one ping-pong configuration of bench/speed.py: wall rate, Python calls per simulated
IPI (deterministic: the figure to compare between two trees), and the top functions.

    .venv/bin/python bench/callprofile.py "bare metal"          # or "L1 AVIC (zen4)", "L2 dummy (zen4)", ...
    .venv/bin/python bench/callprofile.py "L2 dummy (zen4)" --top 40 --iterations 2000
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402

from navic.runner import simulate  # noqa: E402
from navic.scenario import loads_scenario  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", choices=list(speed.CONFIGS), nargs="?", default="bare metal")
    ap.add_argument("--iterations", type=int, default=5000)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    cfg = speed.CONFIGS[args.config]
    text = speed.PINGPONG.format(n=args.iterations, **cfg)
    gc.collect()
    t0 = time.perf_counter()
    run = simulate(loads_scenario(text, "bench"))
    dt = time.perf_counter() - t0
    ipis = sum(1 for d in run.recorder.deliveries if d["sent_by"] is not None)
    prof = cProfile.Profile()
    prof.enable()
    simulate(loads_scenario(text, "bench"))
    prof.disable()
    st = pstats.Stats(prof)
    calls = sum(v[1] for v in st.stats.values())  # type: ignore[attr-defined]
    print(f"$ bench/callprofile.py {args.config!r} --iterations {args.iterations}")
    print(f"{args.config}: {ipis} IPIs in {dt:.3f} s = {ipis / dt:,.0f} IPIs/s; "
          f"{calls / ipis:.1f} Python calls per IPI (incl. setup)")
    st.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
