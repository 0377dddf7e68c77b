"""Errors a user can act on. Each message says what is wrong, where, and what to do instead."""


class DpmedtfError(Exception):
    """Base for every error dpmedtf raises on purpose; the CLI prints these as one line."""


class ConfigError(DpmedtfError, ValueError):
    """A job configuration is malformed: unknown key, wrong type, value out of range."""


class PrivacyParameterError(DpmedtfError, ValueError):
    """DP-SGD parameters that are invalid or would make a privacy claim meaningless."""


class DataError(DpmedtfError):
    """Input data that cannot be used as given: bad manifest rows, unreadable or implausible files."""
