"""Storage beyond the host: finished captures uploaded to an S3-compatible bucket (``storage.s3``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..capture.store import CaptureStore
    from ..config import S3Config
    from .uploader import CaptureUploader


def make_uploader(cfg: S3Config, store: CaptureStore) -> CaptureUploader:
    """The uploader of ``storage.s3`` (ValueError/OSError naming what is wrong with the credentials, never their values)."""
    from .s3 import S3Client, load_credentials
    from .uploader import CaptureUploader, default_prefix

    creds = load_credentials(cfg.access_key_file, cfg.secret_key_file)
    client = S3Client(cfg.endpoint, cfg.bucket, cfg.region, creds, cfg.path_style, cfg.verify_tls)
    prefix = cfg.prefix if cfg.prefix is not None else default_prefix()
    return CaptureUploader(store, client, prefix, cfg.concurrency, cfg.multipart_bytes, cfg.max_backoff)
