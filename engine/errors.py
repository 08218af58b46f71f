"""User-facing errors. The CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a flag, a knob)."""


class ModelRefError(UserError):
    """A model reference that cannot be resolved or loaded."""


class KnobError(UserError):
    """A knob value the loaded model cannot run with."""
