"""The Unicorn vCPU engine, one module per concept (``docs/cpu-engine.md``).

* :mod:`~sevemu.hw.uc.binding` -- libunicorn through ctypes: constants, prototypes, callback types;
* :mod:`~sevemu.hw.uc.pool` -- the plaintext page pool, a private cache level kept coherent by snooping;
* :mod:`~sevemu.hw.uc.ports` -- port I/O: finding IN/OUT in code pages, precise stops, IOIO exits;
* :mod:`~sevemu.hw.uc.exits` -- the private VMCB Unicorn runs its guest from, and turning its
  intercepts and exceptions into the shared instruction semantics (:mod:`sevemu.hw.x86.insn`);
* :mod:`~sevemu.hw.uc.watchdog` -- the thread that ends over-long time slices;
* :mod:`~sevemu.hw.uc.engine` -- :class:`~sevemu.hw.uc.engine.UcEngine`: lifecycle, VMRUN/#VMEXIT,
  the run loop and the TLB-fill hook;
* :mod:`~sevemu.hw.uc.bare` -- the same Unicorn without the SoC, the benchmark's baseline.

The public entry point is :mod:`sevemu.hw.ucengine`.
"""
