"""Shared fixtures: one real tritonserver per test session, serving towers exported by mind.export."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import nn
from towerkit import ToyTower, export, real_mind

from stream.embedded.triton import EmbeddedTriton, free_port


@dataclass
class Served:
    server: EmbeddedTriton
    repo: Path
    towers: dict[str, nn.Module]  # model name -> the eager tower its version 1 was exported from


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real tritonserver serving `toy` (ToyTower), `flip` (version switches), `mind` (mind.model.MIND)."""
    base = tmp_path_factory.mktemp("triton")
    repo = base / "repo"
    towers: dict[str, nn.Module] = {"toy": ToyTower(0), "flip": ToyTower(1)}
    mind = real_mind()
    if mind is not None:
        towers["mind"] = mind
    for name, tower in towers.items():
        export(tower, repo, name, f"{name}-1")
    server = EmbeddedTriton(
        repo,
        base / "run",
        models=list(towers),
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        ready_timeout_s=180,
    )
    server.start()
    print(f"\ntritonserver ready in {server.start_seconds:.1f}s serving {sorted(towers)}")
    yield Served(server, repo, towers)
    server.stop()


# ---- Milvus (indexer/ and stream/recall tests) -------------------------------------------------------


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real milvus-lite server (own process, TCP) for the session; tests isolate by collection prefix."""
    from stream.embedded.milvus import EmbeddedMilvus

    server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus"))
    uri = server.start()
    print(f"\nmilvus-lite ready in {server.start_seconds:.1f}s at {uri}")
    yield uri
    server.stop()
