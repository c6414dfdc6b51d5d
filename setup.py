"""Build hook for the optional C accelerator of the memory-encryption engine.

Everything else lives in pyproject.toml.  The extension is optional: without a C compiler (or
Python headers) the build prints a warning, the install still succeeds, and
``sevemu.crypto.memenc`` falls back to its numpy implementation (same bytes, slower), and the
memory model's bulk paths (``sevemu.hw.dram``, ``sevemu.hw.cache``) to their Python loops.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sevemu.crypto._memenc_accel",
            sources=["csrc/memenc_accel.c"],
            optional=True,
        ),
        Extension(
            "sevemu.hw._mem_accel",
            sources=["csrc/mem_accel.c"],
            optional=True,
        ),
    ]
)
