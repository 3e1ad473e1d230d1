"""Milvus search over gRPC, read as flat numpy arrays instead of pymilvus' per-hit Python objects.

`MilvusClient.search` builds one Python `Hit` per hit (pymilvus 3.0.2 `client/search_result.py`) and no
option skips it: at nq=256, top-50 that is 12,800 objects and 30-48% of the call (indexer/README.md).
The wire response already holds the answer as three flat lists (`SearchResultData.ids.int_id.data`,
`.scores`, `.topks`), so this module sends the same `SearchRequest` that pymilvus sends, through the
stub generated from Milvus' protos (`pymilvus.grpc_gen`, the wire contract), and reads those lists
into numpy.

The request mirrors pymilvus 3.0.2 `Prepare.search_requests_with_expr` field by field (search_params
key/value pairs topk, round_decimal, ignore_growing, metric_type, anns_field, params; dsl_type
BoolExprV1; a serialized PlaceholderGroup with tag `$0` of FloatVector rows; nq; output_fields), and the
call mirrors `GrpcHandler._execute_search` (timeout, a non-zero status becomes
`MilvusException.from_status`). Authorization and database travel as metadata, as pymilvus' interceptor
and call context send them. tests/indexer/test_store.py compares the two requests byte for byte
through a recording proxy.

The channel is our own (one per ItemIndex): pymilvus keeps its channel and stub in private attributes
and swaps them on reconnect, so borrowing them would tie us to internals. Local `.db` URIs have no
address (pymilvus starts milvus-lite on a private socket), so `SearchChannel.for_uri` returns None there
and the caller keeps the pymilvus path.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import grpc
import numpy as np
from pymilvus.exceptions import MilvusException
from pymilvus.grpc_gen import common_pb2, milvus_pb2, milvus_pb2_grpc

DEFAULT_PORT = 19530  # pymilvus' default when the URI names none (443 for https)
# The channel options pymilvus 3.0.2 opens its own channel with (GrpcHandler._create_grpc_channel), plus a
# short reconnect backoff: gRPC's grows to 120 s, so after a Milvus restart a worker could wait minutes for
# its next search (the same cap as the Triton client's, stream/tower.py).
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", True),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach a Milvus server, parsed from a URI as pymilvus parses it."""

    address: str  # host:port, or unix:PATH
    secure: bool
    token: str  # "" = none; "user:password" for credentials in the URI
    db_name: str  # "" = the server's default database


def parse_uri(uri: str, token: str | None = None) -> Endpoint | None:
    """The endpoint of a server URI; None for a local `.db` file (no address: pymilvus' private server).

    Same rules as pymilvus 3.0.2 ConnectionConfig: http/https/tcp, default port 19530 (443 for https),
    credentials in the URI become the token unless one is passed, the first path segment is the database.
    """
    if uri.endswith(".db"):
        return None
    if uri.startswith("unix:"):
        return Endpoint(uri, False, token or "", "")
    p = urlparse(uri)
    scheme = p.scheme.lower()
    if scheme not in ("http", "https", "tcp"):
        return None
    port = p.port or (443 if scheme == "https" else DEFAULT_PORT)
    uri_token = f"{p.username}:{p.password}" if p.username and p.password else (p.username or "")
    parts = [s for s in p.path.split("/") if s]
    return Endpoint(
        f"{p.hostname or 'localhost'}:{port}",
        scheme == "https",
        token or uri_token,
        parts[0] if parts else "",
    )


def search_params_pairs(limit: int, metric: str, params: dict[str, Any], anns_field: str) -> list[Any]:
    """The search_params key/value pairs pymilvus sends for `search(..., search_params={"metric_type":
    metric, "params": params}, limit=limit, anns_field=...)`: scalars as str(), the merged params as JSON.

    `params` also carries metric_type, as pymilvus' `get_params` merges the outer keys into it.
    """
    merged = dict(params)
    if merged.get("metric_type", metric) != metric:
        raise ValueError(f"ambiguous metric: {metric!r} and params.metric_type {merged['metric_type']!r}")
    merged["metric_type"] = metric
    pairs = {
        "topk": str(int(limit)),
        "round_decimal": "-1",
        "ignore_growing": "False",
        "metric_type": metric,
        "anns_field": anns_field,
        "params": json.dumps(merged, separators=(",", ":")),
    }
    return [common_pb2.KeyValuePair(key=k, value=v) for k, v in pairs.items()]


def search_request(
    collection: str, queries: np.ndarray, limit: int, metric: str, params: dict[str, Any], anns_field: str
) -> Any:
    """One `milvus_pb2.SearchRequest` for float32 query rows [nq, d], strongly consistent.

    Strong (guarantee_timestamp 0: the server takes its newest timestamp) rather than pymilvus' default
    of the collection's level with a per-process cache of the last write: the collections are created
    Strong, and an upsert from another process must be visible to the next search (incremental mode).
    """
    q = np.ascontiguousarray(queries, dtype="<f4")
    group = common_pb2.PlaceholderGroup(
        placeholders=[
            common_pb2.PlaceholderValue(
                tag="$0", type=common_pb2.PlaceholderType.FloatVector, values=[row.tobytes() for row in q]
            )
        ]
    )
    return milvus_pb2.SearchRequest(
        collection_name=collection,
        dsl="",
        dsl_type=common_pb2.DslType.BoolExprV1,
        placeholder_group=group.SerializeToString(),
        nq=int(q.shape[0]),
        output_fields=[],
        search_params=search_params_pairs(limit, metric, params, anns_field),
        guarantee_timestamp=0,
        consistency_level=common_pb2.ConsistencyLevel.Strong,
        use_default_consistency=False,
    )


def read_results(data: Any, nq: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`SearchResultData` -> ids [nq, n] int64 (-1 padding), scores [nq, n] float32 (-inf padding).

    Hits arrive query after query (`topks[i]` hits for query i), best first, so one boolean mask puts
    them in place without a Python loop.
    """
    ids = np.full((nq, n), -1, dtype=np.int64)
    scores = np.full((nq, n), -np.inf, dtype=np.float32)
    topks = np.array(data.topks, dtype=np.int64)
    flat_ids = np.array(data.ids.int_id.data, dtype=np.int64)
    flat_sc = np.array(data.scores, dtype=np.float32)
    if len(topks) == 0 and len(flat_ids) == 0:
        return ids, scores  # nothing to search (an empty collection answers without topks)
    if len(topks) != nq or topks.sum() != len(flat_ids) or len(flat_sc) != len(flat_ids) or (topks > n).any():
        if data.ids.HasField("str_id"):
            raise MilvusException(message="search returned string ids; the item index uses INT64 ids")
        raise MilvusException(
            message=f"malformed search response: {len(topks)} topks for nq={nq}, {len(flat_ids)} ids, "
            f"{len(flat_sc)} scores, limit {n}"
        )
    mask = np.arange(n) < topks[:, None]
    ids[mask], scores[mask] = flat_ids, flat_sc
    return ids, scores


class SearchChannel:
    """One gRPC channel to a Milvus server, used for Search only; the rest stays with MilvusClient."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        if endpoint.secure:
            self._channel = grpc.secure_channel(
                endpoint.address, grpc.ssl_channel_credentials(), options=_CHANNEL_OPTIONS
            )
        else:
            self._channel = grpc.insecure_channel(endpoint.address, options=_CHANNEL_OPTIONS)
        self._stub = milvus_pb2_grpc.MilvusServiceStub(self._channel)
        md: list[tuple[str, str]] = []
        if endpoint.token:  # pymilvus sends base64(token) under `authorization` (GrpcHandler)
            md.append(("authorization", base64.b64encode(endpoint.token.encode()).decode("ascii")))
        if endpoint.db_name:
            md.append(("dbname", endpoint.db_name))
        self.metadata = tuple(md)

    @classmethod
    def for_uri(cls, uri: str, token: str | None = None) -> SearchChannel | None:
        """A channel for a server URI; None for a local `.db` file (the caller keeps the pymilvus path)."""
        ep = parse_uri(uri, token)
        return cls(ep) if ep is not None else None

    def search(self, request: Any, timeout_s: float | None) -> Any:
        """Send one SearchRequest; returns its `SearchResultData`. A non-zero status raises the same
        MilvusException pymilvus raises; transport failures stay grpc.RpcError (the caller retries)."""
        resp = self._stub.Search(request, timeout=timeout_s, metadata=self.metadata)
        st = resp.status
        if st.code != 0 or st.error_code != 0:
            raise MilvusException.from_status(st)
        return resp.results

    def close(self) -> None:
        self._channel.close()


__all__ = [
    "Endpoint",
    "SearchChannel",
    "parse_uri",
    "read_results",
    "search_params_pairs",
    "search_request",
]
