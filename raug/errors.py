"""The toolkit's own errors, free of any framework (the Sacred glue adds its printing).

:class:`ConfigError` and :class:`StorageError` are raised by the config checks, the
runner and the methods; ``raug.run.experiment`` turns them into Sacred errors that print
one line instead of a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration (one line per problem), found before or while a run starts."""


class StorageError(OSError):
    """A run cannot write its files (disk full); ``errno`` is the cause's.

    The checkpoints already written stay intact; the message names the folder and
    what survives.
    """

    def __init__(self, message: str, errno_: int | None = None):
        """One line naming the folder; ``errno_`` of the underlying error."""
        super().__init__(message)
        self.errno = errno_

    def __str__(self) -> str:
        """The message alone (``OSError`` would prefix the errno)."""
        return str(self.args[0])
