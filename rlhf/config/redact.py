"""Keeping values read from the environment out of what a run writes.

A config value written ``${oc.env:NAME}`` (an API token in a reward header or URL) is used by the
run, but its resolved value must not reach the run dir or W&B: not in names, status, tracebacks or
logs. ``Redactor`` knows a config's environment values and replaces them by ``<env NAME>`` in any
text; as a ``logging.Filter`` it does the same to every record a handler writes (Hydra's
``train.log``). ``mask_url`` hides a URL's query string and user info in error messages.
Light on imports: it runs before torch is loaded.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from typing import Any

from omegaconf import OmegaConf

# Shorter environment values are not scrubbed: replacing "1" or "on" everywhere would mangle every
# number and word of a log, and such values are no secrets.
MIN_SECRET_LENGTH = 4


# The start of each ${oc.env:NAME...} and the variable's name, also written `${oc.env: NAME}`,
# `${oc.env:"NAME"}` or inside another's default (`${oc.env:A,${oc.env:B}}`): OmegaConf reads all of
# these. The one pattern for "a value read from the environment": env_names finds the names with it,
# redact_env replaces each interpolation it starts (to its matching brace) by <env NAME>.
ENV_READ = re.compile(r"""\$\{\s*oc\.env\s*:\s*['"]?([^,}'"\s]+)""")


def env_names(node: Any) -> set[str]:
    """Names of the environment variables read by ``${oc.env:NAME}`` anywhere in ``node``, a config
    or an override list (read unresolved: resolving is what would expose the values)."""
    raw = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if isinstance(raw, dict):
        return {name for value in raw.values() for name in env_names(value)}
    if isinstance(raw, list):
        return {name for value in raw for name in env_names(value)}
    return set(ENV_READ.findall(raw)) if isinstance(raw, str) else set()


def _interpolation_end(text: str, start: int) -> int:
    """The index after the brace closing the interpolation that opens at ``text[start]`` (``${``), or the
    end of ``text`` when it is not closed."""
    depth = 0
    for i in range(start + 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def redact_env(text: str) -> str:
    """``text`` with each ``${oc.env:NAME...}`` (its default included) written as ``<env NAME>``."""
    parts, done = [], 0
    for match in ENV_READ.finditer(text):
        if match.start() >= done:
            parts += [text[done : match.start()], f"<env {match.group(1)}>"]
            done = _interpolation_end(text, match.start())
    return "".join(parts) + text[done:]


def mask_url(url: str) -> str:
    """``url`` with its user info and query string replaced by ``***``, for error messages:
    ``http://user:token@host/score?key=token`` -> ``http://***@host/score?***``."""
    parts = urllib.parse.urlsplit(url)
    _, at, host = parts.netloc.rpartition("@")
    netloc = f"***@{host}" if at else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else "", fragment=""))


def mask_url_in(text: str, url: str) -> str:
    """``text`` (an error about ``url``) with ``url``'s user info and query string replaced by ``***``
    wherever they appear, the URL whole or in pieces (``nonnumeric port: 'token@host'``)."""
    parts = urllib.parse.urlsplit(url)
    text = text.replace(url, mask_url(url))
    secrets = [parts.query, parts.netloc.rpartition("@")[0] if "@" in parts.netloc else "", parts.password or ""]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class Redactor(logging.Filter):
    """Replaces the values of the environment variables ``names`` (as they are now) by ``<env NAME>``
    in text (``scrub``) and in log records (as a filter on handlers)."""

    def __init__(self, names: set[str]):
        super().__init__()
        values = {name: os.environ.get(name, "") for name in names}
        # Longest first: a value that contains another is replaced whole.
        self.values = sorted(
            ((value, name) for name, value in values.items() if len(value) >= MIN_SECRET_LENGTH),
            key=lambda item: -len(item[0]),
        )

    def scrub(self, text: str) -> str:
        for value, name in self.values:
            text = text.replace(value, f"<env {name}>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.values:
            return True
        record.msg, record.args = self.scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True

    def install(self) -> list[logging.Handler]:
        """Filter every handler of the root logger and of loggers that do not propagate to it (Hydra's
        file and console handlers); returns them, for ``uninstall``."""
        loggers = [logging.getLogger()] + [
            logger
            for logger in logging.Logger.manager.loggerDict.values()
            if isinstance(logger, logging.Logger) and not logger.propagate
        ]
        handlers = [handler for logger in loggers for handler in logger.handlers]
        for handler in handlers:
            handler.addFilter(self)
        return handlers

    def uninstall(self, handlers: list[logging.Handler]) -> None:
        for handler in handlers:
            handler.removeFilter(self)


def _redact_node(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _redact_node(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_redact_node(value) for value in node]
    return redact_env(node) if isinstance(node, str) else node


def loggable_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain values, for W&B and checkpoints, with each value read from the
    environment (``${oc.env:NAME}``) replaced by ``<env NAME>``: a secret passed that way (an API
    token) is used by the run but never logged or saved."""
    raw = OmegaConf.to_container(cfg, resolve=False)  # interpolations still as text
    return OmegaConf.to_container(OmegaConf.create(_redact_node(raw)), resolve=True)
