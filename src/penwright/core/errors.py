"""The one error type penwright raises for bad input: the CLI prints it without a traceback."""


class PenwrightError(Exception):
    """Bad input or config. The message names the file, key or value at fault and what to do."""


class ConfigError(PenwrightError):
    """A config key has a value penwright cannot use."""


class CorpusError(PenwrightError):
    """A corpus file cannot be read as documents."""
