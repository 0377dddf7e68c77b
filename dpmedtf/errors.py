"""Errors a user can act on. Each message says what is wrong, where, and what to do instead."""


class DpmedtfError(Exception):
    """Base for every error dpmedtf raises on purpose; the CLI prints these as one line."""


class ConfigError(DpmedtfError, ValueError):
    """A job configuration is malformed: unknown key, wrong type, value out of range."""


class PrivacyParameterError(DpmedtfError, ValueError):
    """DP-SGD parameters that are invalid or would make a privacy claim meaningless."""


class DataError(DpmedtfError):
    """Input data that cannot be used as given: bad manifest rows, unreadable or implausible files."""


class ModelError(DpmedtfError, ValueError):
    """A network that cannot be built as asked, or weights that do not fit the job's network."""


class RecordError(DpmedtfError, ValueError):
    """A file dpmedtf wrote earlier (ledger, stage record, training summary, cache) that is missing,
    damaged or edited by hand, so the run cannot continue from it."""


class OutputError(DpmedtfError, OSError):
    """An output that cannot be written: the path exists already, is a directory, or is not writable.
    Also an OSError, so callers that guard file writes with ``except OSError`` keep working."""


class OutputExistsError(OutputError, FileExistsError):
    """An output that already exists and that dpmedtf will not replace."""
