"""The one exception type cotune raises for problems the user can fix."""


class CotuneError(ValueError):
    """Bad input, configuration or state; the message says what to fix."""
