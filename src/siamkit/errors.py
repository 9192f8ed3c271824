"""The one exception type that the command line turns into a single clear error line."""


class SiamkitError(Exception):
    """A problem with the user's input (data, options, files): the message names it and the fix."""


def warn(message: str) -> None:
    """One warning line on stderr, in the same voice as the error lines."""
    import sys

    print(f"siamkit: warning: {message}", file=sys.stderr, flush=True)
