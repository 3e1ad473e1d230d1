"""Versioned item-embedding index in Milvus: one collection per model version and an atomic active pointer."""

from indexer.store import (
    IndexUnavailable,
    InvalidQuery,
    ItemIndex,
    SearchResult,
    VersionInfo,
    VersionMismatch,
    normalize_version,
)

__all__ = [
    "IndexUnavailable",
    "InvalidQuery",
    "ItemIndex",
    "SearchResult",
    "VersionInfo",
    "VersionMismatch",
    "normalize_version",
]
