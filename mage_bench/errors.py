"""Exceptions that map to the CLI's exit codes (ARCHITECTURE.md: 2 = bad input, 1 = internal)."""


class UserError(Exception):
    """Bad input from the user (usage, config, data, files): the CLI prints one line and exits 2.

    The message must name the problem and, where there is one, the fix.
    """


class ConfigError(UserError):
    """A config value or key is wrong; the message names the key path."""


class DataError(UserError):
    """A data set cannot be read as asked; the message names the file or folder."""


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe, or does not match the architecture it is loaded into."""
