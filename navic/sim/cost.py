"""Cost model: named cycle costs per operation and CPU model, loaded from ``navic/data/costs.toml``.

Each entry there has ``cycles`` and a ``source`` (a publication, or "assumption: ..." where none
exists). A CPU section may override any cost and sets the nominal clock used to turn cycles
into nanoseconds. Access costs as attributes: ``costs.IPI_WIRE`` (plain instance attributes, set
once from ``cycles``: a cost lookup is a dictionary hit, not a Python call).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


@dataclass
class CostModel:
    cpu: str
    ghz: float
    cycles: dict[str, int]
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every cost as a plain attribute (``cycles`` is not changed after construction; a name
        # that is already an attribute -- a field or a method -- is only reachable via ``cycles``).
        d = self.__dict__
        for name, value in self.cycles.items():
            if name not in d and not hasattr(type(self), name):
                d[name] = value

    def __getattr__(self, name: str) -> int:
        # Only reached for names that are not attributes: a cost added to ``cycles`` later, or an
        # unknown name.
        try:
            return self.__dict__["cycles"][name]
        except KeyError:
            raise AttributeError(f"no cost named {name!r} in the cost model") from None

    def ns(self, cycles: float) -> float:
        return cycles / self.ghz

    def with_overrides(self, overrides: dict[str, int]) -> CostModel:
        c = dict(self.cycles)
        c.update(overrides)
        return CostModel(self.cpu, self.ghz, c, dict(self.sources))


def _load_table() -> dict[str, Any]:
    data = resources.files("navic.data").joinpath("costs.toml").read_text(encoding="utf-8")
    return tomllib.loads(data)


_TABLE: dict[str, Any] | None = None


def load_costs(cpu: str) -> CostModel:
    global _TABLE
    if _TABLE is None:
        _TABLE = _load_table()
    base = _TABLE.get("cost", {})
    cycles = {k: int(v["cycles"]) for k, v in base.items()}
    sources = {k: str(v["source"]) for k, v in base.items()}
    prof = _TABLE.get("cpu", {}).get(cpu)
    if prof is None:
        raise KeyError(f"no cost profile for cpu {cpu!r}")
    for k, v in prof.get("cost", {}).items():
        cycles[k] = int(v["cycles"])
        sources[k] = str(v["source"])
    return CostModel(cpu=cpu, ghz=float(prof.get("ghz", 3.0)), cycles=cycles, sources=sources)
