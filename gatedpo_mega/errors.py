"""Errors that reach the user as one line and a non-zero exit, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, arguments); the message names what and where."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration key or value is wrong."""
