"""Shared CLI plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from vidtron.errors import EXIT_USER_ERROR, ConfigError, DataError


def user_errors(prog: str) -> Callable:
    """Decorate a `main(argv) -> int`: ConfigError / DataError print `prog: error: ...` and return 2."""

    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def inner(*args, **kwargs) -> int:
            try:
                return fn(*args, **kwargs)
            except (ConfigError, DataError) as err:
                print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
                return EXIT_USER_ERROR

        return inner

    return wrap
