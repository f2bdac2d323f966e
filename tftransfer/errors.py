"""The one exception type that means "the user gave us something wrong".

Entrypoints turn a `UserError` into a one-line message on stderr and exit
code 2 (no traceback); any other exception is a bug in tftransfer and keeps
its traceback.
"""


class UserError(ValueError):
    """Bad config, bad data, bad flag or an unreachable resource.

    The message must say what was wrong, where, and what to do, on one line.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))
