"""The one error a conversion raises for anything a user can cause."""

from flamingo_jax.errors import UserError


class ConversionError(UserError, ValueError):
    """A source that cannot be converted as asked; the message names the tensors or
    files involved and what to do. Nothing is left at the output path."""
