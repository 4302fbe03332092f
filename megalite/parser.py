"""The argument parser every `megalite` command uses: no abbreviated flags (`--micro 2` is an error, not
`--micro-batch-size 2`), and a mistake costs one line, not the whole usage block."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with `allow_abbrev=False` and a one-line error pointing at --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
