"""One rule for secrets in everything the job writes down: MLflow params and tags, ``catalog-enrich
config``, log lines, run reports and error messages.

A value is a secret when its key names one (``password``, ``passwd``, ``secret``, ``token``,
``credential``, ``key`` as a word of a dotted, underscored or camelCase name:
``spark.hadoop.fs.s3a.secret.key``, ``api_key``, ``accessKey``; not ``keep_memory`` or
``tokenizer``) or when it is the password of a URI (``scheme://user:password@host``).
Free text (an error message) is scrubbed of both shapes: URIs with credentials, and ``name=value``
pairs whose name is a secret's (a libpq connection string's ``password=...``).
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MASK",
    "RedactingFilter",
    "is_secret_name",
    "redact_records",
    "redact_text",
    "redact_traceback",
    "redact_tree",
    "redact_uri",
    "redact_value",
]

MASK = "***"
_SECRET_WORDS = frozenset(
    {"pass", "passwd", "password", "secret", "token", "credential", "credentials", "key"}
)
_WORD_BREAK = re.compile(r"[._\-\s/]+|(?<=[a-z0-9])(?=[A-Z])")  # separators and camelCase humps
_URI_PASSWORD = re.compile(r"(\w[\w+.-]*://[^/\s:@]*):[^/\s@]*@")
_PAIR = re.compile(r"([\w.\-]+)(\s*=\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&)]+)")


def is_secret_name(name: str) -> bool:
    """Whether a config key, a Spark conf key or a parameter name names a secret: one of its words
    (split at . _ - and camelCase) is a secret word, or ends in ``password`` (``PGPASSWORD``)."""
    words = [w.lower() for w in _WORD_BREAK.split(name) if w]
    return any(w in _SECRET_WORDS or w.endswith("password") for w in words)


def redact_uri(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` in it replaced by ``***``."""
    return _URI_PASSWORD.sub(rf"\1:{MASK}@", text)


def redact_text(text: str) -> str:
    """Free text with URI passwords and ``secret-name=value`` pairs masked."""

    def pair(m: re.Match[str]) -> str:
        return f"{m.group(1)}{m.group(2)}{MASK}" if is_secret_name(m.group(1)) else m.group(0)

    return _PAIR.sub(pair, redact_uri(text))


def redact_traceback(exc: BaseException) -> str:
    """The traceback Python prints for ``exc`` (its causes and context too), masked as free text:
    what ``-v`` shows of an unexpected error."""
    return redact_text("".join(traceback.format_exception(exc)))


def redact_value(name: str, value: Any) -> Any:
    """``value`` as it may be shown under ``name``: masked whole when the name is a secret's; a
    string's URI passwords masked otherwise."""
    if is_secret_name(name) and value not in (None, "", {}, []):
        return MASK
    return redact_uri(value) if isinstance(value, str) else value


def redact_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested mapping (a config dump) with every secret masked (see :func:`redact_value`)."""
    return {
        key: redact_tree(value) if isinstance(value, Mapping) else redact_value(str(key), value)
        for key, value in tree.items()
    }


class RedactingFilter(logging.Filter):
    """Masks secrets in every record a handler emits (message and arguments, then the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_MASKING = RedactingFilter()


class _RedactingFactory:
    """A log record factory whose records come out of ``made`` masked (:class:`RedactingFilter`)."""

    def __init__(self, made: Any) -> None:
        self.made = made

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self.made(*args, **kwargs)
        _MASKING.filter(record)
        return record


def redact_records() -> None:
    """Mask secrets in every log record made from now on, whichever logger makes it and whichever
    handler emits it: MLflow's loggers do not propagate to the root's handlers but print through
    their own, which exist only once MLflow is imported. Calling it again changes nothing."""
    made = logging.getLogRecordFactory()
    if not isinstance(made, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(made))
