"""The two kinds of bad input: a config value (``ConfigError``) and a data/model input (``InputError``)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another."""


class InputError(ValueError):
    """An input the config names (a prompt file, a prompt in it) cannot be used as it is."""
