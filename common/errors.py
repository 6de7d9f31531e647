"""The one exception a user sees as a sentence instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint, full disk): `main` prints it as one
    `error: ...` line and exits with status 2."""
