"""Exceptions raised by splitexit; every message says what went wrong and how to fix it."""


class SplitexitError(Exception):
    """Base class of every error splitexit raises on purpose."""


class InputError(SplitexitError, ValueError):
    """An input tensor, argument or file does not fit what the call expects."""


class CutError(InputError, KeyError):
    """A cut name that does not exist in the model; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetMissingError(SplitexitError, FileNotFoundError):
    """A data set is not installed; the message gives the exact install command."""


class CorruptFileError(InputError):
    """A data, checkpoint or profile file is truncated, corrupt or does not match."""


class PayloadError(InputError):
    """A wire payload whose header, sizes, shape or dtype is invalid."""
