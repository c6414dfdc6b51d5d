"""sevemu.abi: the specifications' byte layouts and constants, and nothing else.

One module per spec concept (status codes, command ids, command buffers, policies, states, the
mailbox registers, CPUID/MSR bits, paging, certificates, VMSA...), each declared once on the
framework in :mod:`sevemu.abi.struct`.  No behaviour, no I/O.  Nothing is re-exported here: import
the submodule that names the concept.
"""
