"""The argument parser every `blobfs` command builds: a usage error is one line.

argparse prints usage and exits 2 on bad arguments; blobfs's commands raise `UsageError`
instead ("MESSAGE (see PROG --help)"), so the CLI prints one line, through its redactor,
with the documented exit code.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from blobfs.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser(*, prog: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An `argparse.ArgumentParser` for command `prog` whose errors raise `UsageError`."""
    return _Parser(prog=prog, **kwargs)
