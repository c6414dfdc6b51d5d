"""Build hook for the optional C accelerators: the memory-encryption engine's, the transport
packets' (the latter links OpenSSL's libcrypto), the memory model's and the Unicorn engine's exit path.

Everything else lives in pyproject.toml.  Every extension is optional: without a C compiler (or
Python headers, or OpenSSL's headers for those linking libcrypto) the build prints a warning, the install still
succeeds, and ``sevemu.crypto.memenc`` / ``sevemu.crypto.transport`` fall back to their Python
implementations (same bytes, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sevemu.crypto._memenc_accel",
            sources=["csrc/memenc_accel.c"],
            libraries=["crypto"],  # xex_pages' AES-128 (OpenSSL's libcrypto)
            optional=True,
        ),
        Extension(
            "sevemu.crypto._transport_accel",
            sources=["csrc/transport_accel.c"],
            libraries=["crypto"],
            optional=True,
        ),
        Extension(
            "sevemu.crypto._sha384_accel",
            sources=["csrc/sha384_accel.c"],
            libraries=["crypto"],  # OpenSSL's SHA-384
            optional=True,
        ),
        Extension(
            "sevemu.hw._mem_accel",
            sources=["csrc/mem_accel.c"],
            libraries=["crypto"],  # the line cipher's AES (OpenSSL's libcrypto)
            optional=True,
        ),
        Extension(
            "sevemu.hw.uc._uc_accel",
            sources=["csrc/uc_accel.c"],  # libunicorn's functions come from the engine's ctypes handle
            optional=True,
        ),
    ]
)
