"""Exception types of dwops (DESIGN.md section 1)."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here (package or GPU missing).

    The message says what to install.
    """
