"""Checks on kvmem's Python modules that .ci/run runs next to `lint-imports`.

1. Size: no module of kvmem/ (every ``*.py``, nothing excluded) is over ``--max-lines`` lines
   (default 500); each offender is printed with its line count.
2. Module-level import cycles (``--cycles``): no module of kvmem imports, directly or through
   others, a module that imports it back. import-linter's ``acyclic_siblings`` contract looks at
   siblings (packages squashed); this looks at single modules, the package ``__init__`` files
   included, over every import in the source (lazy ones inside functions too), with grimp (which
   import-linter installs). Each cycle is printed as one chain.

    python tools/check_modules.py [--max-lines 500] [--cycles]

Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports grimp misreads: ``from kvmem import _C`` loads the compiled extension, which grimp cannot
# see (it reads .py files), so it reads as an import of the package ``kvmem`` itself.
NOT_IMPORTS = {("kvmem._ext", "kvmem")}


def oversized_modules(package_dir: str, max_lines: int) -> list[tuple[str, int]]:
    """Return ``(path, lines)`` for every ``*.py`` under ``package_dir`` longer than ``max_lines``."""
    found = []
    for folder, _, files in os.walk(package_dir):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    lines = sum(1 for _ in f)
                if lines > max_lines:
                    found.append((os.path.relpath(path, ROOT), lines))
    return sorted(found)


def import_cycles(package: str) -> list[tuple[list[str], list[str]]]:
    """Return ``(members, chain)`` per group of modules of ``package`` that import each other in a
    cycle (a strongly connected component), ``chain`` being one cycle ``[a, b, ..., a]`` in it."""
    import grimp

    sys.path.insert(0, ROOT)
    graph = grimp.build_graph(package)
    modules = sorted(graph.modules)
    for importer, imported in NOT_IMPORTS:
        if graph.direct_import_exists(importer=importer, imported=imported):
            graph.remove_import(importer=importer, imported=imported)
    imports = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
    # Tarjan's strongly connected components, iterative (module graphs can be deep).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in modules:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, child_pos = work.pop()
            if child_pos == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = imports[node]
            if child_pos < len(children):
                work.append((node, child_pos + 1))
                child = children[child_pos]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    chains = []
    for group in groups:
        first = group[0]
        back = graph.find_shortest_chain(importer=group[1], imported=first) or [group[1], first]
        there = graph.find_shortest_chain(importer=first, imported=group[1]) or [first, group[1]]
        chains.append((group, list(there) + list(back[1:])))
    return chains


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-lines", type=int, default=500)
    ap.add_argument("--cycles", action="store_true", help="also report module-level import cycles")
    args = ap.parse_args()
    failed = False
    big = oversized_modules(os.path.join(ROOT, "kvmem"), args.max_lines)
    for path, lines in big:
        print(f"check_modules: {path}: {lines} lines (over {args.max_lines})")
    print(f"check_modules: {len(big)} module(s) of kvmem/ over {args.max_lines} lines")
    failed |= bool(big)
    if args.cycles:
        chains = import_cycles("kvmem")
        for members, chain in chains:
            print(f"check_modules: import cycle among {len(members)} modules ({', '.join(members)}),"
                  f" e.g. " + " -> ".join(chain))
        print(f"check_modules: {len(chains)} group(s) of kvmem modules that import each other in a cycle")
        failed |= bool(chains)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
