"""Build a nested system: L0 KVM on the silicon, one L1 VM whose vCPUs run L1's KVM (the same code)
through :class:`~navic.hv.l1.L1Cpu`, and L1's VM (L2) whose vCPUs run the scenario's ``l2.N``
programs. The design named by ``[l0] nested_apicv`` decides what L1 is offered."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from navic.config import Scenario
from navic.guest.kernel import GuestCpu
from navic.hv.guestmem import GuestMemory
from navic.hv.host import Host
from navic.hv.kvm import Kvm, Vcpu
from navic.hv.l1 import L1Cpu, L1Host
from navic.hv.nested.core import NestedSvm
from navic.hv.svm import SvmVendor
from navic.hw.avic import AvicEngine
from navic.hw.errata import Erratum1235
from navic.hw.features import features_for
from navic.hw.memory import Npt
from navic.hw.svm import Svm
from navic.sim.cost import CostModel
from navic.sim.engine import Engine
from navic.sim.record import Recorder
from navic.sim.trace import Trace


def build_nested(scn: Scenario, engine: Engine, costs: CostModel, rec: Recorder, tr: Trace,
                 l2_guest: Callable[[int], GuestCpu], unsupported: type[Exception]) -> tuple[Kvm, Kvm]:
    assert scn.l2 is not None
    features = features_for(scn.host.cpu)
    design = scn.l0.nested_apicv
    if features.vendor != "amd":
        from navic.hv.nested.vmx_core import VMX_DESIGNS

        if design not in VMX_DESIGNS:
            raise unsupported(f"{scn.source}: l0.nested_apicv: the \"{design}\" design is not implemented on "
                              f"VMX (\"{scn.host.cpu}\"); nested VMX supports {', '.join(VMX_DESIGNS)}")
        return build_nested_vmx(scn, engine, costs, rec, tr, l2_guest, features)
    if design == "shadow":
        try:
            import navic.hv.nested.shadow  # noqa: F401
        except ImportError:
            raise unsupported(f"{scn.source}: l0.nested_apicv: the \"shadow\" design is not available in "
                              "this version") from None

    # ---- L0 -------------------------------------------------------------------------------------
    host = Host(scn, engine, costs, rec, tr)
    errata = SvmVendor._errata(scn.l0, features)
    erratum = Erratum1235(engine, host.mem, window=scn.l0.erratum_1235_window,
                          p=scn.l0.erratum_1235_p) if "1235" in errata else None
    host.silicon = Svm(host, features, AvicEngine(host.mem, features, doorbell=host.doorbell, erratum=erratum))
    kvm0 = Kvm(host)
    kvm0.vendor = SvmVendor(kvm0, host, host.silicon, features)
    if erratum is not None:
        erratum.track_table(kvm0.vendor.avic.physical_table_hpa, kvm0.vendor.avic.physical_table_pages)
    npt = Npt()
    l1mem = GuestMemory(host.mem, npt)
    nested = NestedSvm(kvm0, host, l1mem, design)
    kvm0.vendor.nested = nested
    kvm0.vendor.check_nested_events = nested.check_nested_events   # kvm_x86_ops.nested_ops

    l1host = _l1_vcpus(scn, kvm0, l1mem)
    nested.l1host = l1host
    l1host.l0_nested = nested
    l1_vcpus = kvm0.vcpus
    for v in l1_vcpus:
        v.ctx01.npt = npt           # L1 runs on L0's nested page table (write tracking)

    # ---- L1's KVM -------------------------------------------------------------------------------
    offers_x2avic = nested.design.offers_avic and nested.design.offers_x2avic   # shadow (RFC v3): xAVIC only
    l1_features = dataclasses.replace(
        features, avic=nested.design.offers_avic, avic_enumerated=nested.design.offers_avic,
        x2avic=features.x2avic and offers_x2avic, x2avic_ext=features.x2avic_ext and offers_x2avic)
    l1host.silicon.features = l1_features
    kvm1 = Kvm(l1host, name="l2")
    kvm1.exit_level = "l1"
    kvm1.vendor = SvmVendor(kvm1, l1host, l1host.silicon, l1_features)
    def registered(v: Vcpu) -> None:
        host.backing_owner[l1mem.hpa(v.backing_hpa)] = v   # the silicon sees the page by its HPA
        v.ctx01 = v.ctx
        nested.vcpu_by_vmcb12[v.vmcb.hpa] = v

    kvm1.create_vcpus(scn.l2, l2_guest, "l2", poll_wake_of=lambda v: _l2_poll_wake(kvm0, v),
                      after_create=registered)
    for v in kvm1.vcpus:
        l1host.spawn(v, kvm1.vcpu_thread(v))
    for v in l1_vcpus:
        engine.spawn(kvm0.vcpu_thread(v), v.name)
    return kvm0, kvm1


def build_nested_vmx(scn: Scenario, engine: Engine, costs: CostModel, rec: Recorder, tr: Trace,
                     l2_guest: Callable[[int], GuestCpu], features: Any) -> tuple[Kvm, Kvm]:
    """The VMX counterpart (``cpu = "spr"``): L0 = KVM's VMX vendor on the VMX silicon with
    :class:`~navic.hv.nested.vmx_core.NestedVmx`; L1 = the same :class:`~navic.hv.vmx.VmxVendor` on
    :class:`~navic.hv.l1.VirtualVmx` (VMRESUME is an instruction), its vmcs12 named by an L1 GPA,
    its PIDs and PID-pointer table in L1 memory."""
    from navic.hv.l1 import VirtualVmx
    from navic.hv.nested.vmx_core import NestedVmx
    from navic.hv.vmx import VmxVendor
    from navic.hw.vmx_guest import Vmx

    assert scn.l2 is not None
    design = scn.l0.nested_apicv
    host = Host(scn, engine, costs, rec, tr)
    host.silicon = Vmx(host, features)
    kvm0 = Kvm(host)
    kvm0.vendor = VmxVendor(kvm0, host, host.silicon, features)
    npt = Npt()
    l1mem = GuestMemory(host.mem, npt)
    nested = NestedVmx(kvm0, host, l1mem, design)
    kvm0.vendor.nested = nested
    kvm0.vendor.check_nested_events = nested.check_nested_events   # kvm_x86_ops.nested_ops

    l1host = _l1_vcpus(scn, kvm0, l1mem, silicon=VirtualVmx)
    nested.l1host = l1host
    l1_vcpus = kvm0.vcpus

    # ---- L1's KVM: what L1 is offered is the design's --------------------------------------------
    offers = nested.design.offers_apicv
    l1_features = dataclasses.replace(features, apicv=features.apicv and offers,
                                      posted_interrupts=features.posted_interrupts and offers,
                                      ipiv=features.ipiv and offers)
    l1host.silicon.features = l1_features
    kvm1 = Kvm(l1host, name="l2")
    kvm1.exit_level = "l1"
    vm2 = scn.l2
    kvm1.vendor = VmxVendor(kvm1, l1host, l1host.silicon, l1_features, vm=vm2)
    def registered(v: Vcpu) -> None:
        host.backing_owner[l1mem.hpa(v.backing_hpa)] = v
        l1host.backing_owner[v.pid.hpa] = v        # L1 GPA of its PID (receive side of L0's posts)
        v.ctx.vmcs_gpa = l1mem.alloc(1)            # the VMCS region L1 VMPTRLDs (vmcs12)
        v.ctx.level = "L2"
        v.ctx01 = v.ctx
        nested.vcpu_by_vmcs12[v.ctx.vmcs_gpa] = v

    kvm1.create_vcpus(vm2, l2_guest, "l2", poll_wake_of=lambda v: _l2_poll_wake(kvm0, v),
                      after_create=registered)
    for v in kvm1.vcpus:
        l1host.spawn(v, kvm1.vcpu_thread(v))
    for v in l1_vcpus:
        engine.spawn(kvm0.vcpu_thread(v), v.name)
    return kvm0, kvm1


def _l1_vcpus(scn: Scenario, kvm0: Kvm, l1mem: GuestMemory, silicon: Any = None) -> L1Host:
    """L0's vCPUs for the L1 VM, each running the L1 kernel (an L1Cpu) over L1's host view, and
    that host view. L1's KVM parameters are [l0]'s but for apicv = [l1] apicv_for_l2,
    timeslice_us = [l1] timeslice_us and doorbell_strict (upstream KVM: always strict)."""
    vm1 = scn.l1
    # L1's kvm_amd is loaded with avic = 1 when it wants APIC virtualization for L2 (its "auto" would
    # look for X2AVIC, which only the shadow-x2avic design offers). avic_doorbell_strict is L0's (RFC)
    # kernel only: L1's KVM is always strict.
    params = dataclasses.replace(scn.l0, apicv=vm1.apicv_for_l2, avic=vm1.apicv_for_l2,
                                 timeslice_us=vm1.timeslice_us, force_avic=False, doorbell_strict=True)
    l1host = L1Host(kvm0, l1mem, vm1, params)
    if silicon is not None:
        l1host.silicon = silicon(l1host)
    kvm0.create_vcpus(vm1, lambda i: L1Cpu(l1host, i, f"l1.{i}", x2apic=vm1.apic == "x2apic"))
    return l1host


def _l2_poll_wake(kvm0: Kvm, v: Vcpu) -> Callable[[], None]:
    """A shared-memory store seen by an L2 vCPU spinning on it: wake the pCPU that runs the L1
    vCPU currently hosting it (as a pause loop sees the cache line change)."""

    def wake() -> None:
        if v.cpu is not None:
            host_vcpu = kvm0.vcpus[v.cpu]
            if host_vcpu.cpu is not None:
                host_vcpu.pcpu.wake.fire()

    return wake
