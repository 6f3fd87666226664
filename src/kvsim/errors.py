"""The one exception type that reaches users as a one-line message."""


class KvsimError(Exception):
    """A problem with the user's input or environment, worded as: what is wrong, and what to do.

    The CLI prints the message on one line and exits non-zero; library callers can catch it.
    Anything else that escapes is a bug in kvsim.
    """
