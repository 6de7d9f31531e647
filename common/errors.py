"""The one exception a user sees as a sentence instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint, full disk): `main` prints it as one
    `error: ...` line and exits with status 2."""


class TooShort(UserError):
    """No video holds the frames a clip needs. `longest` is the longest video's frame count (0 when none could be
    read), so that a script whose later stages read longer clips can skip them and say why (lvdm.py)."""

    def __init__(self, message, longest=0):
        super().__init__(message)
        self.longest = longest
