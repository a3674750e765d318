"""An S3-compatible object store as the shared storage of a scale-out (docs/scale-out.md).

Instead of one shared folder, receivers and workers may share a bucket. Each process
then keeps ``storage.path`` on its own disk as a working folder: a receiver writes an
instance there (fsynced) and puts it in the bucket before it answers success; a
worker fetches the series it analyses into its folder, puts its results in the
bucket, and drops the fetched copies afterwards; a sender fetches the results it
sends. Object keys are ``<prefix><relative path>``, the same relative paths the
journal records.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from dicom_node.config import ObjectStoreSection

log = logging.getLogger(__name__)


class ObjectStoreError(OSError):
    """The object store did not take or give an object (a network or permission error)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class ObjectStore:
    def __init__(self, settings: ObjectStoreSection) -> None:
        import boto3
        from botocore.config import Config

        secret = settings.secret_access_key
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=None if secret is None else secret.get_secret_value(),
            config=Config(
                connect_timeout=settings.timeout_seconds,
                read_timeout=settings.timeout_seconds,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def check(self) -> None:
        """Raise :class:`ObjectStoreError` unless the bucket can be reached."""
        self._call("head_bucket", "the bucket", Bucket=self.bucket)

    def put(self, relpath: str, data: bytes | bytearray | memoryview) -> None:
        self._call("put_object", relpath, Bucket=self.bucket, Key=self._key(relpath), Body=data)

    def get(self, relpath: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(relpath))
            return bytes(response["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise ObjectStoreError(f"object store: cannot get {relpath}: {_code(exc)}") from None
        except Exception as exc:
            raise ObjectStoreError(
                f"object store: cannot get {relpath}: {type(exc).__name__}"
            ) from None

    def delete(self, relpath: str) -> None:
        self._call("delete_object", relpath, Bucket=self.bucket, Key=self._key(relpath))

    def _key(self, relpath: str) -> str:
        return f"{self.prefix}{relpath}"

    def _call(self, operation: str, what: str, **arguments: Any) -> Any:
        from botocore.exceptions import ClientError

        try:
            return getattr(self._client, operation)(**arguments)
        except ClientError as exc:
            raise ObjectStoreError(f"object store: {operation} {what}: {_code(exc)}") from None
        except Exception as exc:  # connection refused, timeouts, ...
            raise ObjectStoreError(
                f"object store: {operation} {what}: {type(exc).__name__}"
            ) from None


def _code(exc: Any) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
