"""The tests' S3 server is the one local mode embeds: SeaweedFS with credentials enforced.

One bucket per test session with a prefix per test (tests/conftest.py): every bucket costs SeaweedFS
volume slots, and writes fail with "No writable volumes" when many buckets exist.
"""

from dhad_trainer.storage.embedded_s3 import EmbeddedS3 as S3Server

__all__ = ["S3Server"]
