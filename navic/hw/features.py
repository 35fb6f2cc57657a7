"""CPU models and their virtualisation features (digest §1, §4.6, §7, §8).

name   part             family  AVIC  enumerated  x2AVIC  max phys ID (x2AVIC)  notes
zen1   Naples           0x17    yes   yes         no      -                     erratum 1235
zen2   Rome             0x17    yes   yes         no      -                     1235; vector<16 dropped
zen3   Milan            0x19    yes   NO          no      -                     KVM needs force_avic
zen4   Genoa            0x19    yes   yes         yes     0x1FF (512 entries)
zen5   Turin            0x1A    yes   yes         yes     0xFFF (x2AVIC_EXT, assumed)
spr    Sapphire Rapids  6       Intel: VMX, APICv, posted interrupts, IPIv

zen5's X2AVIC_EXT is an assumption: KVM supports 4096 x2AVIC IDs when CPUID Fn8000_000A_ECX[6] is set,
but no source found says which parts set it (docs/model.md "KVM fidelity (issue 13)").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from navic.hw.errata import errata_for

__all__ = ["CpuFeatures", "CPU_MODELS", "features_for", "AVIC_MAX_PHYSICAL_ID", "X2AVIC_MAX_PHYSICAL_ID",
           "X2AVIC_4K_MAX_PHYSICAL_ID"]

AVIC_MAX_PHYSICAL_ID = 0xFE  # KVM: xAVIC max guest physical APIC ID (0xFF = broadcast)
X2AVIC_MAX_PHYSICAL_ID = 0x1FF
X2AVIC_4K_MAX_PHYSICAL_ID = 0xFFF


@dataclass(frozen=True)
class CpuFeatures:
    name: str
    vendor: str  # "amd" | "intel"
    family: int
    part: str
    # AMD SVM / AVIC
    svm: bool = False
    avic: bool = False  # implemented (usable by a hypervisor that forces it on)
    avic_enumerated: bool = False  # CPUID Fn8000_000A_EDX[13]
    x2avic: bool = False  # CPUID Fn8000_000A_EDX[18]
    x2avic_ext: bool = False  # CPUID Fn8000_000A_ECX[6] (4096 vCPUs)
    ext_lvt_avic_access_chg: bool = False  # CPUID Fn8000_000A_EDX[27]
    idle_hlt: bool = False  # CPUID Fn8000_000A_EDX[30]
    avic_drops_low_vector_ipi: bool = False  # vector < 16 IPI silently dropped instead of exit ID 4
    # Intel VMX
    vmx: bool = False
    apicv: bool = False  # APIC-register virtualisation + virtual-interrupt delivery
    posted_interrupts: bool = False
    ipiv: bool = False  # tertiary control bit 4
    errata: frozenset[str] = field(default_factory=frozenset)

    @property
    def avic_max_physical_id(self) -> int:
        """KVM's arch maximum for xAVIC mode (``AVIC_MAX_PHYSICAL_ID``)."""
        return AVIC_MAX_PHYSICAL_ID

    @property
    def x2avic_max_physical_id(self) -> int:
        """KVM's ``x2avic_max_physical_id``: 0x1FF, or 0xFFF with x2AVIC_EXT (0 without x2AVIC)."""
        if not self.x2avic:
            return 0
        return X2AVIC_4K_MAX_PHYSICAL_ID if self.x2avic_ext else X2AVIC_MAX_PHYSICAL_ID

    def has_erratum(self, number: str) -> bool:
        return number in self.errata

    def cpuid_8000000a(self) -> tuple[int, int]:
        """(ECX, EDX) of CPUID Fn8000_000A for the AVIC-related bits only."""
        edx = ((1 << 13) if self.avic_enumerated else 0) | ((1 << 18) if self.x2avic else 0)
        edx |= ((1 << 27) if self.ext_lvt_avic_access_chg else 0) | ((1 << 30) if self.idle_hlt else 0)
        ecx = (1 << 6) if self.x2avic_ext else 0
        return ecx, edx


def _amd(name: str, family: int, part: str, **kw: bool) -> CpuFeatures:
    return CpuFeatures(name=name, vendor="amd", family=family, part=part, svm=True,
                       errata=errata_for(name), **kw)


CPU_MODELS: dict[str, CpuFeatures] = {
    "zen1": _amd("zen1", 0x17, "Naples", avic=True, avic_enumerated=True, avic_drops_low_vector_ipi=True),
    "zen2": _amd("zen2", 0x17, "Rome", avic=True, avic_enumerated=True, avic_drops_low_vector_ipi=True),
    "zen3": _amd("zen3", 0x19, "Milan", avic=True, avic_enumerated=False),
    "zen4": _amd("zen4", 0x19, "Genoa", avic=True, avic_enumerated=True, x2avic=True),
    "zen5": _amd("zen5", 0x1A, "Turin", avic=True, avic_enumerated=True, x2avic=True, x2avic_ext=True),
    "spr": CpuFeatures(name="spr", vendor="intel", family=6, part="Sapphire Rapids", vmx=True, apicv=True,
                       posted_interrupts=True, ipiv=True, errata=errata_for("spr")),
}

_ALIASES = {
    "naples": "zen1", "rome": "zen2", "milan": "zen3", "genoa": "zen4", "turin": "zen5",
    "sapphire_rapids": "spr", "sapphirerapids": "spr", "sapphire-rapids": "spr",
}


def features_for(cpu_name: str) -> CpuFeatures:
    """Features of a CPU model by name (``zen2``, ``rome``, ``zen4``, ``spr``, ... case-insensitive)."""
    key = cpu_name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return CPU_MODELS[key]
    except KeyError:
        raise ValueError(f"unknown CPU model {cpu_name!r}; known: {', '.join(sorted(CPU_MODELS))}") from None
