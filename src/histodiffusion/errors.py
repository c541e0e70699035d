"""Errors a user can act on: the CLI prints their message and exits with code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, field, data) that they can fix; message says how."""

    exit_code = 2


class ConfigError(UserError):
    """An experiment config that does not validate: names the key path and what was expected."""


class StagePaused(Exception):
    """A training stage stopped at its time limit after checkpointing; rerunning continues it.

    ``reached``: the step its checkpoint holds (recorded in the stage's STATE.json, so the run may
    later be asked for fewer steps than it first was, as long as not fewer than it has trained)."""

    exit_code = 3

    def __init__(self, message: str, reached: int | None = None):
        super().__init__(message)
        self.reached = reached
