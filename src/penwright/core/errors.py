"""The one error type penwright raises for bad input: the CLI prints it without a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class PenwrightError(Exception):
    """Bad input or config. The message names the file, key or value at fault and what to do."""


class ConfigError(PenwrightError):
    """A config key has a value penwright cannot use."""


class CorpusError(PenwrightError):
    """A corpus file cannot be read as documents."""


class InvalidValue(PenwrightError):
    """A library function's argument it cannot use: the message names the argument (``top_p=1.5: must be in
    (0, 1]``), not a config key; the stage that passed it says which key it came from (``config_keys``)."""

    def __init__(self, name: str, value, why: str):
        super().__init__(f"{name}={value!r}: {why}")
        self.name, self.value, self.why = name, value, why


@contextmanager
def config_keys(group: str, keys: dict[str, str] | None = None) -> Iterator[None]:
    """Inside, an ``InvalidValue`` becomes a ``ConfigError`` naming the config key the value came from:
    ``group.name`` (``keys`` maps an argument to another key: ``{"max_new_tokens": "response_tokens"}``)."""
    try:
        yield
    except InvalidValue as err:
        key = f"{group}.{(keys or {}).get(err.name, err.name)}"
        raise ConfigError(f"{key}={err.value!r}: {err.why}") from None
