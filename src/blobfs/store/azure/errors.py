"""Azure failures as `blobfs.errors` (the one `classify`), and the redaction (by
`blobfs.log.redact`) of SAS signatures, account keys and known secrets in the SDK's log
records.
"""

from __future__ import annotations

import logging

import requests
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from blobfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StoreError,
    Throttled,
    TransientError,
)
from blobfs.log import redact

log = logging.getLogger(__name__)

#: Secret values of every store built in this process, masked wherever they could show.
_KNOWN_SECRETS: set[str] = set()


class _RedactFilter(logging.Filter):
    """Masks SAS signatures, account keys and known secrets in third-party log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text, _KNOWN_SECRETS)
        if clean != text:
            record.msg, record.args = clean, None
        return True


# The SDK's HTTP logging policy logs request headers at INFO: only its warnings get
# through. urllib3 logs every request URL, SAS query string included, at DEBUG: those
# records are redacted (a filter on the logger itself, so it holds whatever the handlers).
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
for _name in (
    "urllib3.connectionpool",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.storage.blob._shared.policies",
):
    logging.getLogger(_name).addFilter(_RedactFilter())


# --- errors ------------------------------------------------------------------------------
_THROTTLE_CODES = {"ServerBusy", "OperationTimedOut", "InternalError"}
_TOO_LARGE_CODES = {
    "RequestBodyTooLarge",
    "BlockCountExceedsLimit",
    "BlockListTooLong",
    "BlobTooLarge",
    "MaxBlobSizeConditionNotMet",
}
_PRECONDITION_CODES = {
    "ConditionNotMet",
    "BlobAlreadyExists",
    "SourceConditionNotMet",
    "TargetConditionNotMet",
    "BlobOverwritten",
}


def _error_code(exc: HttpResponseError) -> str:
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    if not code and exc.response is not None:
        code = getattr(exc.response, "headers", {}).get("x-ms-error-code")
    return str(code or "")


def classify(exc: BaseException) -> StoreError:
    """Map whatever the Azure SDK (or its transport) raised to a `blobfs.errors.StoreError`.

    Messages are built from the status, the service error code and the reason phrase only,
    never from the SDK's text, which can hold request URLs with SAS tokens.

    Returns:
        NotFound (404, BlobNotFound, ContainerNotFound), AccessDenied (401/403, credential
        failures), PreconditionFailed (412, ConditionNotMet, BlobAlreadyExists),
        ObjectTooLarge (413, block-count limits), Throttled (429, 503, ServerBusy),
        TransientError (other 5xx, 408, timeouts, resets, transport failures), and
        BadRequest for everything else (a request Azure refuses: a bug or a bad option).
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        code = _error_code(exc)
        reason = (exc.reason or "") if exc.response is not None else ""
        msg = f"Azure {status} {code or reason}".strip()
        if code in _TOO_LARGE_CODES or status == 413:
            return ObjectTooLarge(msg)
        if status == 412 or code in _PRECONDITION_CODES:
            return PreconditionFailed(msg)
        if status == 404:
            return NotFound(msg)
        if status in (401, 403):
            return AccessDenied(msg)
        if status in (429, 503) or code in _THROTTLE_CODES:
            return Throttled(msg)
        if status == 408 or (status >= 500 and status != 501):
            return TransientError(msg)
        return BadRequest(msg)
    if isinstance(exc, ClientAuthenticationError):
        # A credential (azure-identity) that could not produce a token: no HTTP status.
        return AccessDenied(f"Azure credential failed: {type(exc).__name__}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return TransientError(f"Azure endpoint unreachable or reset: {type(exc).__name__}")
    if isinstance(exc, OSError | requests.RequestException):
        return TransientError(f"network error: {type(exc).__name__}")
    if isinstance(exc, AzureError):
        # IncompleteReadError, DecodeError and friends: a response cut short.
        return TransientError(f"Azure response failed: {type(exc).__name__}")
    return BadRequest(f"Azure SDK rejected the request: {type(exc).__name__}")
