"""User errors: what a command prints when what it was asked cannot work.

Every command (massl-train, massl-eval, massl-export, massl-shard) reports a user error as one
line on stderr, `error: <what>: <why, what to do>`, and exits with status 2; anything else is a
bug or a system failure and keeps its traceback (exit 1).
"""
from __future__ import annotations

import sys
from typing import NoReturn

USAGE_EXIT = 2  # argparse's status for bad arguments


class UserError(ValueError):
    """The request cannot work; the message starts with what (a config key, a flag, a path) and
    says why and what to do. `massl.config.ConfigError` is the one for config keys."""


def fail(message: object) -> NoReturn:
    """Print `error: <message>` on one line (whitespace, newlines included, collapsed) and exit 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)
