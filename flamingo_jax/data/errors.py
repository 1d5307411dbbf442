"""The errors a user's data or data config can cause (all `UserError`s: one line at the CLI)."""

from flamingo_jax.errors import UserError


class DataError(UserError, ValueError):
    """A data config, file or record layout the pipelines cannot use; the message says the fix."""


class DataFileMissing(UserError, FileNotFoundError):
    """A file or pattern that names nothing on disk."""


class DamagedData(UserError, RuntimeError):
    """A dataset whose files are (mostly) unreadable: it cannot feed training."""
