"""Errors a user can act on: the CLI prints their message and exits with code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, field, data) that they can fix; message says how."""

    exit_code = 2


class ConfigError(UserError):
    """An experiment config that does not validate: names the key path and what was expected."""


class StagePaused(Exception):
    """A training stage stopped at its time limit after checkpointing; rerunning continues it."""

    exit_code = 3
