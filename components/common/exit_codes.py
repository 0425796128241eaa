"""The exit-code rule of every clipline command: ``clipline``'s subcommands (pipelines/cli.py) and the training
processes torchrun starts (components/train/main.py).

    0  done
    1  the work ran and failed (bad data, a failed job or download, too many rejects, the store gone mid-run)
    2  the command cannot run as given (arguments, recipe or config, device, the store's settings or a URI or object
       the arguments name), found before the work starts

The reason goes to stderr as one line naming the command, never a traceback.
"""

from __future__ import annotations

import sys

DONE, FAILED, USAGE = 0, 1, 2


def exit_code(exc: BaseException) -> int:
    from components.common.config import ConfigError
    from components.common.device import DeviceError
    from components.common.store import StoreError, StoreUnavailable

    if isinstance(exc, StoreUnavailable):
        return FAILED
    return USAGE if isinstance(exc, (ConfigError, DeviceError, StoreError)) else FAILED


def report(command: str, problem: BaseException | str, code: int | None = None) -> int:
    """Print the reason on stderr; returns ``code``, by default the rule's code for the exception ``problem``."""
    print(f"clipline {command}: {problem}", file=sys.stderr)
    if code is None:
        assert isinstance(problem, BaseException), "a message needs its code"
        return exit_code(problem)
    return code
