"""Tuner-side user errors. All derive from `engine.errors.UserError`, so the CLI prints them as one line."""
from __future__ import annotations

from engine.errors import UserError


class SearchSpaceError(UserError):
    """A search-space YAML that does not validate; the message names the field and the line."""


class GpuMismatchError(UserError):
    """The device that really runs differs from the `--gpu` profile asked for."""


class RecipeError(UserError):
    """A recipe that cannot be read, does not validate, or fails its content-hash check."""


class WorkloadError(UserError):
    """A workload file that is missing or malformed."""


class StudyError(UserError):
    """A study that cannot start or resume (locked, wrong flags, no workers left)."""
