"""The one exception type cotune raises for problems the user can fix (and its one "retry later" kind)."""


class CotuneError(ValueError):
    """Bad input, configuration or state; the message says what to fix."""


class Unavailable(CotuneError):
    """Not now, through no fault of the request (the service's trainer is restarting): retry it (HTTP 503)."""
