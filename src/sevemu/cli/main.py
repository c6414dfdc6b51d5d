"""``sevemu`` command line: a thin layer over :mod:`sevemu.scenario` and the owner/amd packages.

Exit statuses (docs/cli.md):

* 0 -- success;
* 1 -- a check failed: a chain, signature, MAC or measurement did not verify, a guest crashed or
  timed out, a benchmark did not verify its result, the VMM got no secret in time;
* 2 -- bad input: a usage error, a wrong file, value or option, a platform directory that cannot be
  used, a firmware refusal;
* 130 -- interrupted (Ctrl-C).

Every error is one line on stderr, ``sevemu: error: <what is wrong>``, naming the file or option at
fault; never a traceback.  With ``--json`` the error is also a JSON object on stdout
(``{"ok": false, "error": {...}}``).  A warning the model raises (Python :mod:`warnings`, e.g. the
firmware noticing a lost NV store) is printed as one ``sevemu: warning:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO

from sevemu import __version__
from sevemu.errors import SevemuError, VerificationError

__all__ = ["EXIT_BAD_INPUT", "EXIT_CHECK_FAILED", "EXIT_INTERRUPTED", "CliParser", "UsageError", "main"]

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_STATE_HELP = """\
state the project keeps (docs/cli.md, "Where sevemu keeps state"):
  platform directories   $SEVEMU_HOME/<generation>, else $XDG_DATA_HOME/sevemu/<generation>
                         (~/.local/share/sevemu/<generation>); --platform-dir DIR overrides
  guest builds           $SEVEMU_BUILD_DIR, else $XDG_CACHE_HOME/sevemu/guests (sevemu run)
  fetched OVMF images    $SEVEMU_OVMF_DIR, else $XDG_CACHE_HOME/sevemu/ovmf (sevemu ovmf fetch)
  emulated AMD's vault   $SEVEMU_AMD_VAULT, else $XDG_DATA_HOME/sevemu-amd-vault
                         (~/.local/share/sevemu-amd-vault): the emulated manufacturer's private
                         keys, apart from platforms and host (SEVEMU_AMD_VAULT="" keeps them in the
                         process only; docs/threat-model.md)

exit status: 0 success, 1 a check failed, 2 bad input, 130 interrupted
"""


class UsageError(SevemuError):
    """Raised when the command line itself is wrong (unknown option, missing argument); exit 2."""

    def __init__(self, message: str, prog: str) -> None:
        self.prog = prog
        super().__init__(f"{message} (see '{prog} --help')")


class CliParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors are :class:`UsageError` (so they are
    reported like every other error: one ``sevemu: error:`` line, exit 2) and whose help keeps the
    epilog's line breaks (the examples)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def build_parser() -> CliParser:
    from sevemu.cli import (
        attest,
        bench,
        demo,
        display,
        guest_attest,
        launch,
        ok,
        ovmf_fetch,
        owner,
        platform,
        run,
        snp_tools,
        tsm,
        vmm,
        vmsa,
    )

    parser = CliParser(
        prog="sevemu",
        description="A software AMD SEV platform: SoC, Secure Processor firmware, hypervisor, guests,\n"
                    "and the sevctl-style tools of the platform owner and the guest owner.",
        epilog="examples:\n"
               "  sevemu demo                    two SEV guests and what each party sees\n"
               "  sevemu ok                      the emulated platform's SEV capabilities\n"
               "  sevemu export --full chain.cert && sevemu verify --sev chain.cert --emulated\n"
               "  sevemu launch                  the owner <-> host exchange, step by step\n\n" + _STATE_HELP,
    )
    parser.add_argument("--version", action="version", version=f"sevemu {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(sub)
    launch.register(sub)
    vmm.register(sub)
    ok.register(sub)
    platform.register(sub)
    owner.register(sub)
    vmsa.register(sub)
    snp_tools.register(sub)
    display.register(sub)
    run.register(sub)
    ovmf_fetch.register(sub)
    bench.register(sub)
    attest.register(sub)
    guest_attest.register(sub)
    tsm.register(sub)
    _add_quiet(parser)
    return parser


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    """Let ``-q`` follow the command too (``sevemu ok -q``), on every command that runs."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                if child.get_default("func") is not None and "--quiet" not in child._option_string_actions:
                    child.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                                       help="print nothing but errors")
                _add_quiet(child)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _report(message: str, kind: str, status: int, as_json: bool, out: TextIO) -> None:
    print(f"sevemu: error: {message}", file=sys.stderr)
    if as_json:
        json.dump({"ok": False, "error": {"message": message, "type": kind, "exit_status": status}}, out)
        out.write("\n")


def _os_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    return f"{where}: {what}" if where else what


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Print each warning as one ``sevemu: warning:`` line on stderr."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        print(f"sevemu: warning: {_one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from sevemu.cli.attest import route  # `verify certs|attestation DIR`, `display report FILE` (SNP)

    argv = route(argv)
    out = sys.stdout
    wants_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        _report(_one_line(str(exc)), "UsageError", EXIT_BAD_INPUT, wants_json, out)
        return EXIT_BAD_INPUT
    as_json = bool(getattr(args, "json", False))
    quiet = bool(getattr(args, "quiet", False))
    try:
        with _warnings_as_lines(), contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            rc: int = args.func(args)
            return rc
    except VerificationError as exc:
        _report(_one_line(str(exc)), type(exc).__name__, EXIT_CHECK_FAILED, as_json and not quiet, out)
        return EXIT_CHECK_FAILED
    except SevemuError as exc:
        _report(_one_line(str(exc)), type(exc).__name__, EXIT_BAD_INPUT, as_json and not quiet, out)
        return EXIT_BAD_INPUT
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):  # `sevemu ... | head`: the reader went away
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            return EXIT_CHECK_FAILED
        _report(_os_message(exc), type(exc).__name__, EXIT_BAD_INPUT, as_json and not quiet, out)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sevemu: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
