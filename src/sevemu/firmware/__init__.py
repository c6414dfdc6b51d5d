"""The AMD Secure Processor firmware: one dispatcher, NV store and identity (:mod:`.core`,
:mod:`.nvstore`, :mod:`.identity`) under every command API (:mod:`.sev`; SEV-SNP to come), chosen by
the composition root through :mod:`.apis`.  See ``docs/firmware.md``."""
