"""The SEV-SNP API (SNP ABI 56860): one module per group of commands, over the same firmware core,
NV store and identity as the legacy API (:mod:`sevemu.firmware.core`).

Importing the package registers every handler in :data:`SNP_API`; the composition root hands that
table to the firmware beside the legacy one (:mod:`sevemu.firmware.apis`).

==============  ===========================================================================
``platform``    SNP_INIT, SNP_INIT_EX, SNP_SHUTDOWN(_EX), SNP_PLATFORM_STATUS, SNP_DF_FLUSH,
                SNP_CONFIG, SNP_COMMIT, SNP_FEATURE_INFO
``guest``       SNP_GCTX_CREATE, SNP_LAUNCH_START, SNP_ACTIVATE(_EX), SNP_DECOMMISSION,
                SNP_GUEST_STATUS, SNP_PAGE_RECLAIM, SNP_PAGE_UNSMASH, SNP_DBG_DECRYPT/ENCRYPT
``launch``      SNP_LAUNCH_UPDATE (every page type), SNP_LAUNCH_FINISH (ID block, ID auth)
``guest_request``  SNP_GUEST_REQUEST: MSG_REPORT_REQ, MSG_KEY_REQ, MSG_TSC_INFO_REQ
``vlek``        SNP_VLEK_LOAD: a CSP's wrapped VLEK hashstick unwrapped and loaded
``cpuid``       the CPUID page check
``state``       the SNP platform and guest contexts (what SNP_GUEST_REQUEST reads)
==============  ===========================================================================
"""

from __future__ import annotations

from sevemu.firmware.snp import guest, guest_request, launch, platform, vlek  # noqa: F401 - registers
from sevemu.firmware.snp.api import SNP_API
from sevemu.firmware.snp.state import SnpGuest, SnpPlatform, snp_state

__all__ = ["SNP_API", "SnpGuest", "SnpPlatform", "snp_state"]
