"""Mutation testing of one module: change each check in turn, run the tests that guard it, report
the mutants no test notices (a small tool of the project's own; no dependency).

    python3 tools/mutate.py src/sevemu/hw/cache.py tests/hw/test_hw_cache.py tests/hw/test_hw_memctl.py

Mutations (one at a time, each on a copy of ``src/`` so the working tree is never touched):
comparison operators swapped (< <=, > >=, == !=, in / not in, is / is not), ``and`` <-> ``or``,
arithmetic and bit operators swapped (+ -, << >>, & |, ^ |), integer constants n -> n + 1 (and
1 -> 0), ``True`` <-> ``False``, ``not x`` -> ``x``, an ``if`` condition negated, and statements
removed (an ``if``, a ``raise``, an expression statement such as a call, an augmented assignment).
Docstrings, ``__all__`` and annotations are left alone.  A mutant is *killed* when the tests fail
(or time out); the kill rate is killed / all.  ``--list`` prints the mutants without running.
Survivors are printed with their line; name the equivalent ones in a comment of the module.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
        ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
        ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr, ast.Mult: ast.FloorDiv,
        ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv}


def _skip_nodes(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, __all__, annotations."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(id(n) for n in ast.walk(body[0]))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skip.update(id(n) for n in ast.walk(node))
        for ann in [getattr(node, "annotation", None), getattr(node, "returns", None)]:
            if ann is not None:
                skip.update(id(n) for n in ast.walk(ann))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.update(id(n) for n in ast.walk(node))  # attribute docstrings
    return skip


def mutants(source: str) -> Iterator[tuple[int, str, str]]:
    """(line, description, mutated source) for every mutation of ``source``."""
    tree = ast.parse(source)
    skip = _skip_nodes(tree)
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        for desc, apply in _mutations_of(node):
            mutated = copy.deepcopy(tree)  # ast.walk visits the copy in the same order
            target = next(n for i, n in enumerate(ast.walk(mutated)) if i == index)
            if apply(target):
                try:
                    text = ast.unparse(ast.fix_missing_locations(mutated))
                except Exception:  # noqa: BLE001, S112 - an impossible tree: not a mutant
                    continue
                yield node.lineno if hasattr(node, "lineno") else 0, desc, text


def _mutations_of(node: ast.AST) -> Iterator[tuple[str, object]]:
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP:
                def swap(n: ast.Compare, i: int = i) -> bool:
                    n.ops[i] = _CMP[type(n.ops[i])]()
                    return True
                yield f"{type(op).__name__} -> {_CMP[type(op)].__name__}", swap
    elif isinstance(node, ast.BoolOp):
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        def flip(n: ast.BoolOp) -> bool:
            n.op = other()
            return True
        yield f"{type(node.op).__name__} -> {other.__name__}", flip
    elif isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        def binswap(n: ast.BinOp) -> bool:
            n.op = _BIN[type(n.op)]()
            return True
        yield f"{type(node.op).__name__} -> {_BIN[type(node.op)].__name__}", binswap
    elif isinstance(node, ast.AugAssign) and type(node.op) in _BIN:
        def augswap(n: ast.AugAssign) -> bool:
            n.op = _BIN[type(n.op)]()
            return True
        yield f"{type(node.op).__name__}= -> {_BIN[type(node.op)].__name__}=", augswap
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        def notb(n: ast.Constant) -> bool:
            n.value = not n.value
            return True
        yield f"{node.value} -> {not node.value}", notb
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        def inc(n: ast.Constant) -> bool:
            n.value = n.value + 1
            return True
        yield f"{node.value} -> {node.value + 1}", inc
        if node.value == 1:
            def zero(n: ast.Constant) -> bool:
                n.value = 0
                return True
            yield "1 -> 0", zero
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not x -> x", _replace_with_operand
    if isinstance(node, (ast.If, ast.While)):
        def negate(n: ast.If) -> bool:
            n.test = ast.UnaryOp(op=ast.Not(), operand=n.test)
            return True
        yield f"{type(node).__name__.lower()} condition negated", negate
    for field in ("body", "orelse", "finalbody"):
        stmts = getattr(node, field, None)
        if not isinstance(stmts, list):
            continue
        for i, stmt in enumerate(stmts):
            if isinstance(stmt, (ast.If, ast.Raise, ast.AugAssign)) or \
                    (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
                def remove(n: ast.AST, field: str = field, i: int = i) -> bool:
                    getattr(n, field)[i] = ast.Pass()
                    return True
                yield f"line {stmt.lineno}: {type(stmt).__name__} removed", remove


def _replace_with_operand(n: ast.UnaryOp) -> bool:
    # mutate in place: turn `not x` into `bool(x)` (same node, no parent needed)
    n.op = ast.UAdd()
    n.operand = ast.Call(func=ast.Name(id="bool", ctx=ast.Load()), args=[n.operand], keywords=[])
    return True


def _preload() -> None:
    """Import what every test run needs but the mutant cannot change (pytest, the third-party
    libraries): each mutant then runs in a fork of this process, importing only sevemu afresh."""
    import cryptography.hazmat.primitives.ciphers  # noqa: F401
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401


def _run_forked(args: list[str], limit: float) -> bool:
    """Run pytest with ``args`` in a forked child; True when the tests failed or timed out."""
    pid = os.fork()
    if pid == 0:  # the child: quiet, run, report through the exit status
        import pytest

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            code = int(pytest.main(args))
        except BaseException:  # noqa: BLE001 - anything escaping is a failure
            code = 3
        os._exit(code)
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) != 0
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return True
        time.sleep(0.05)


def run(module: Path, tests: list[str], timeout: float, only: set[int] | None, progress: bool = False) -> int:
    rel = module.resolve().relative_to(ROOT / "src")
    source = module.read_text()
    work = Path(tempfile.mkdtemp(prefix="sevemu-mutate-"))
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    target = work / "src" / rel
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    t = time.perf_counter()
    base = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    base_s = time.perf_counter() - t
    if base.returncode != 0:
        print(base.stdout[-2000:], base.stderr[-2000:])
        raise SystemExit("the tests fail on the unmutated module")
    limit = max(timeout, 4 * base_s)
    all_mutants = list(mutants(source))
    killed = 0
    survivors: list[tuple[int, str]] = []
    _preload()
    sys.path.insert(0, str(work / "src"))
    os.chdir(ROOT)
    for n, (line, desc, text) in enumerate(all_mutants):
        if only is not None and n not in only:
            continue
        target.write_text(text)
        dead = _run_forked(cmd[3:], limit)
        if progress:
            print(f"#{n} {'killed' if dead else 'SURVIVED'}", file=sys.stderr, flush=True)
        if dead:
            killed += 1
        else:
            survivors.append((line, desc))
            print(f"SURVIVED #{n} line {line}: {desc}", flush=True)
    target.write_text(source)
    shutil.rmtree(work, ignore_errors=True)
    total = len(all_mutants) if only is None else len(only)
    print(f"{rel}: {killed}/{total} mutants killed ({100 * killed / max(total, 1):.1f}%), "
          f"{len(survivors)} survived; baseline {base_s:.1f} s per run")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("module", type=Path)
    p.add_argument("tests", nargs="+")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    p.add_argument("--only", type=int, nargs="*", help="run only these mutant numbers")
    p.add_argument("--progress", action="store_true", help="one line per mutant on stderr")
    args = p.parse_args()
    if args.list:
        for n, (line, desc, _) in enumerate(mutants(args.module.read_text())):
            print(f"#{n} line {line}: {desc}")
        return 0
    return run(args.module, args.tests, args.timeout, set(args.only) if args.only else None, args.progress)


if __name__ == "__main__":
    raise SystemExit(main())
