"""The one exception type for errors a user can cause and fix."""


class N6QATError(Exception):
    """A problem with the user's input (config, audio, model) and what to do about it.

    The message names the offending file or config key; the workflow prints it
    without a traceback.
    """
