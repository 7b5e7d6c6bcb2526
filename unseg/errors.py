"""The one exception type for user mistakes (bad params, missing files, wrong checkpoints).

Stages print a ``UserError`` as a single line and exit with status 2, never with a traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the key, path or value at fault."""
