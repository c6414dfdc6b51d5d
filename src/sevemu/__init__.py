"""sevemu: a software AMD SEV platform.

The SoC model (:mod:`sevemu.hw`), the AMD Secure Processor firmware (:mod:`sevemu.firmware`), a
KVM-like hypervisor (:mod:`sevemu.hypervisor`), guests (:mod:`sevemu.guest`), the guest owner's tools
(:mod:`sevemu.owner`) and the manufacturer (:mod:`sevemu.amd`), composed by :mod:`sevemu.scenario`.
"""

__version__ = "0.1.0"
