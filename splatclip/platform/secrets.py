"""Keeping secrets out of every message, log line and tracked value.

Two kinds of secret reach a job: fields whose name says so (`secret_access_key`, a token, a
password), held as pydantic `SecretStr`, and credentials inside URLs (`https://user:pass@host`, a
tracking URI with a password). `redact` removes the second kind from any text; `is_secret_field`
names the first kind, so that validation errors can name such a field without showing its value.
`RedactingFilter` does both to every record a job's log handlers write.
"""

from __future__ import annotations

import logging
import re

SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential")
# scheme://user:password@ -> scheme://***@ (a user name alone, without a password, is left alone)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:'\"]*:[^/@\s'\"]*@")
MASK = "***"


def redact(text: str) -> str:
    """`text` with the user:password part of every URL in it replaced by ***."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def is_secret_field(name: str) -> bool:
    """Whether a field's name (any part of a dotted path) says it holds a secret."""
    return any(word in str(name).lower() for word in SECRET_WORDS)


class RedactingFilter(logging.Filter):
    """Redacts URL credentials, and the given secret values, from every record it passes."""

    def __init__(self, secrets: list[str] = ()):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.scrub(message)
        if record.exc_info and record.exc_info[1] is not None:
            clean += "\n" + self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info, record.exc_text = None, None
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def secret_values(model) -> list[str]:
    """Every SecretStr value held anywhere in a pydantic model (a job spec)."""
    from pydantic import BaseModel, SecretStr

    found = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            found += secret_values(value)
    return found


def install_log_filter(secrets: list[str] = ()) -> None:
    """Put a RedactingFilter on every handler of the root logger (call after logging is configured)."""
    flt = RedactingFilter(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
