"""Exception types of dwops (the errors table of the guide, docs/guide.md)."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here (package or GPU missing).

    The message says what to install.
    """
