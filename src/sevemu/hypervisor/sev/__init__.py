"""The host-side SEV flows, one module per API family (as Linux splits arch/x86/kvm/svm/sev.c):
:mod:`.common` (firmware exchange, flushes, pinning), :mod:`.legacy` (SEV), :mod:`.es` (SEV-ES);
SNP's flows go in a sibling ``snp.py`` over the same primitives."""
