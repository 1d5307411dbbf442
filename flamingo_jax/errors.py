"""The base of every error a user can cause and fix.

A bad config value, a mesh that does not fit the devices, a missing or damaged
checkpoint, a malformed prompt or data file: each error type for these inherits
`UserError` (and the builtin it refines, e.g. ValueError), and its message names
the value and the fix. Command-line entry points print such an error as one line
and exit 1 (`flamingo_jax.cli`); anything else keeps its traceback, since it is
a bug to report. This module imports nothing, so every layer may use it.
"""


class UserError(Exception):
    """A mistake in what the user gave (config, files, flags, prompts); the message says the fix."""
