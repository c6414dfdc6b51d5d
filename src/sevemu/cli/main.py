"""``sevemu`` command line: a thin layer over :mod:`sevemu.scenario` and the owner/amd packages.

Every command catches :class:`~sevemu.errors.SevemuError` and prints its message (exit status 2)
instead of a traceback: a user given a wrong file or value is told what is wrong with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sevemu.errors import SevemuError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from sevemu.cli import bench, demo, launch, owner, platform, run

    parser = argparse.ArgumentParser(
        prog="sevemu",
        description="A software AMD SEV platform: SoC, Secure Processor firmware, hypervisor, guests.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(sub)
    launch.register(sub)
    platform.register(sub)
    owner.register(sub)
    run.register(sub)
    bench.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except SevemuError as exc:
        print(f"sevemu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
