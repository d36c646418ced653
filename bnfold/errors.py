"""The one exception users see: something they can fix, with a message that says how."""


class BnfoldError(Exception):
    """A user-fixable problem (bad file, bad option, missing library).

    The message is one line that ends with what to do. The CLI prints it and exits 1;
    anything else escaping is a bug and keeps its traceback.
    """
