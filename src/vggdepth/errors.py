"""The one exception type a user is meant to read."""


class VggdepthError(Exception):
    """A failure the user can act on; its message says what was expected, what was found and what to do."""


class TrainingError(VggdepthError):
    """Training cannot go on."""
