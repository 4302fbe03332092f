"""Second-level dispatch (`megalite bench index`, `megalite plan pipeline`): a name -> module with main(argv)."""
from __future__ import annotations

import importlib
import sys


def dispatch(prog: str, table: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """Run `table[argv[0]]`'s module `main(argv[1:])`; print the choices for no or an unknown name."""
    width = max(map(len, table))
    usage = "\n".join([f"usage: {prog} NAME [FLAGS]", "", "names:"]
                      + [f"  {n:<{width}}  {doc}" for n, (_, doc) in table.items()])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in table:
        print(f"{prog}: unknown name {argv[0]!r}\n\n{usage}", file=sys.stderr)
        return 2
    return int(importlib.import_module(table[argv[0]][0]).main(argv[1:]) or 0)
