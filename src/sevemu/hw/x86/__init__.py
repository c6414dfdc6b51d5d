"""The x86 architecture as both vCPU engines see it: constants, decoding, shared instruction semantics.

* :mod:`~sevemu.hw.x86.arch` -- control-register, EFER and RFLAGS bits, exception vectors, MSR numbers;
* :mod:`~sevemu.hw.x86.decode` -- the few instruction encodings the engines must recognise themselves
  (prefixes, port I/O, VMMCALL / VMGEXIT / PVALIDATE / RMPADJUST);
* :mod:`~sevemu.hw.x86.insn` -- what the CPU does for a guest instruction and when it exits to the
  hypervisor instead, written once for the Python and the Unicorn engine;
* :mod:`~sevemu.hw.x86.state` -- the architectural states a vCPU starts in.
"""
