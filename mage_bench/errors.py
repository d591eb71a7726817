"""Exceptions that map to the CLI's exit codes (ARCHITECTURE.md: 2 = bad input, 1 = internal)."""


class UserError(Exception):
    """Bad input from the user (usage, config, data, files): the CLI prints one line and exits 2.

    The message must name the problem and, where there is one, the fix.
    """


class ConfigError(UserError):
    """A config value or key is wrong; the message names the key path."""


class DataError(UserError):
    """A data set cannot be read as asked; the message names the file or folder.

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    `DataError("Caught DataError in DataLoader worker process N.\nOriginal Traceback ...")`, and a
    FAILED record or the CLI's one line would keep only "Caught DataError ...". The message is turned
    back into the worker's own line (which names the file), with the worker's number after it.
    """

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(_unwrap_worker_message(message), *args)


def _unwrap_worker_message(message: str) -> str:
    first, _, rest = message.partition("\n")
    if not (first.startswith("Caught DataError") and "DataLoader worker" in first):
        return message
    lines = [line for line in rest.splitlines() if line.strip()]
    original = lines[-1].split("DataError: ", 1)[-1] if lines else first
    return f"{original} (in {first.removeprefix('Caught DataError in ').rstrip('.')})"


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe, or does not match the architecture it is loaded into."""
