"""The one exception type a user is meant to read."""


class VggdepthError(Exception):
    """A failure the user can act on; its message says what was expected, what was found and what to do."""


class TrainingError(VggdepthError):
    """Training cannot go on."""


def excerpt(value: object, limit: int = 80) -> str:
    """A bounded excerpt of a bad value, for an error message: a message never quotes a whole value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
