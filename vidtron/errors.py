"""User-facing errors: one line naming the field, the value and the fix; exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value, layout, shape or input path. Printed as one line; the CLI exits with code 2."""

    def __init__(self, field: str, value: object, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r}: {fix}")


class DataError(RuntimeError):
    """Unreadable or corrupt input data (a shard, a sample, a checkpoint). The CLI exits with code 2."""


EXIT_USER_ERROR = 2
