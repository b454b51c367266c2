"""Blob storage: the protocol and its local-directory and S3 implementations."""

from __future__ import annotations

from app.config import Settings
from app.storage.base import BlobNotFound, BlobStore


def get_blob_store(settings: Settings) -> BlobStore:
    """The store COMPAAS_BLOB_BACKEND names: a local directory or an S3 bucket."""
    if settings.blob_backend == "s3":
        from app.storage.s3 import S3BlobStore

        return S3BlobStore(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
    from app.storage.local import LocalBlobStore

    assert settings.blob_dir is not None
    return LocalBlobStore(settings.blob_dir)


__all__ = ["BlobNotFound", "BlobStore", "get_blob_store"]
