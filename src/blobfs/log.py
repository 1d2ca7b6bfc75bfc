"""Logging setup: stderr, journald priority prefixes, and redaction of secrets.

Secrets (account keys, SAS signatures, connection strings, AWS secret keys) must never
reach a log line, whatever module formats them (SPEC §5).
"""

from __future__ import annotations

import logging
import os
import re
import sys

_SECRET_PATTERNS = [
    re.compile(r"(AccountKey=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"(SharedAccessSignature=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"([?&]sig=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(X-Amz-Signature=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(aws_secret_access_key\W+)\S+", re.IGNORECASE),
    re.compile(r"(Signature=)[0-9a-f]{16,}", re.IGNORECASE),
]
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY",
                "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1<redacted>", text)
    for name in _ENV_SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "<redacted>")
    return text


class RedactingFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        fmt = "%(name)s: %(message)s" if journald else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if self._journald:
            prio = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                    logging.ERROR: 3, logging.CRITICAL: 2}.get(record.levelno, 6)
            text = "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        return text


def setup(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(journald="JOURNAL_STREAM" in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "azure", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
