"""sevemu.abi: the specifications' byte layouts and constants, and nothing else.

One module per spec concept: status codes, command ids, the mailbox registers, legacy SEV command
buffers (``sev``), policies, states, CPUID/MSR bits, paging, certificates, the VMSA, the VMCB control
fields (``vmcb``), the GHCB (``ghcb``), the SNP firmware ABI (``snp``), the RMP (``rmp``) and the
attestation report and guest messages (``report``), each declared once on the framework in
:mod:`sevemu.abi.struct`.  No behaviour beyond codecs, no I/O.  Nothing is re-exported here: import
the submodule that names the concept.
"""
