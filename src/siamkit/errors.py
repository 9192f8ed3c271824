"""The one exception type that the command line turns into a single clear error line."""


class SiamkitError(Exception):
    """A problem with the user's input (data, options, files): the message names it and the fix."""
