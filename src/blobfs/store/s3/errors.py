"""S3 and botocore failures as `blobfs.errors`: the one `classify` every S3 call's
failure goes through, and the private `_Redo` a multipart commit turns into a redo.
"""

from __future__ import annotations

import logging

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

log = logging.getLogger(__name__)

_THROTTLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "TooManyRequestsException", "RequestThrottled",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
}
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "OperationAborted", "ServerBusy", "500", "502", "503", "504",
}
_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
    "InvalidSecurity", "UnauthorizedAccess", "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
#: The upload vanished or S3 saw a conflicting concurrent conditional write: start over.
_REDO_CODES = {"ConditionalRequestConflict", "NoSuchUpload"}


class _Redo(StoreError):
    """The multipart upload cannot be completed any more; the whole commit is redone.

    Private to this package: `S3Upload.commit` turns it into a redo, every other caller into
    `TransientError`, so it never crosses `store/base.py`.
    """


# --- error classification ----------------------------------------------------------------
def classify(exc: BaseException) -> StoreError:
    """Map anything boto3, botocore or urllib3 raised to a `blobfs.errors` store error.

    Throttling and 5xx/408/resets/timeouts become `Throttled`/`TransientError` (retried by
    `Blocking`); 404 `NotFound`; 403 and credential problems `AccessDenied`; 412
    `PreconditionFailed`; `EntityTooLarge` `ObjectTooLarge`; everything else `BadRequest`.
    """
    # botocore is imported here, not at module level, only to keep import order obvious:
    # this function only ever runs after a client exists.
    import botocore.exceptions as bce

    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0))
        op = getattr(exc, "operation_name", "") or "request"
        msg = f"{op}: {code or status} {err.get('Message', '') or ''}".strip()
        if code in _REDO_CODES:
            return _Redo(msg)
        if code in _THROTTLE_CODES or status == 429:
            return Throttled(msg)
        if code in _TRANSIENT_CODES or status >= 500 or status == 408:
            return TransientError(msg)
        if code == "EntityTooLarge" or status == 413:
            return ObjectTooLarge(msg)
        if code == "PreconditionFailed" or status == 412:
            return PreconditionFailed(msg)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(msg)
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDenied(msg)
        if status == 409:
            # Other 409s (a bucket operation in progress, ...) settle on their own.
            return TransientError(msg)
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed") or status == 301:
            region = (exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get(
                "x-amz-bucket-region", "another region")
            return BadRequest(f"{msg}: the bucket is in {region}; set AWS_REGION={region}")
        return BadRequest(msg)
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError
                  | bce.CredentialRetrievalError):
        return AccessDenied(
            f"no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
        )
    if isinstance(exc, bce.HTTPClientError | bce.ConnectionError | bce.ResponseStreamingError
                  | bce.IncompleteReadError):
        # Connection refused/reset, timeouts, truncated bodies: the network, not the request.
        return TransientError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, bce.BotoCoreError):
        return BadRequest(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError | EOFError):
        return TransientError(f"{type(exc).__name__}: {exc}")
    try:
        import urllib3.exceptions

        if isinstance(exc, urllib3.exceptions.HTTPError):
            return TransientError(f"{type(exc).__name__}: {exc}")
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        pass
    return BadRequest(f"unexpected {type(exc).__name__} from the S3 client: {exc}")
