"""The milvus-lite launcher: start/health/stop, clear failures, and the same client on a local-file URI."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.store import ItemIndex
from stream.embedded import milvus as launcher
from stream.embedded.milvus import EmbeddedMilvus, MilvusLaunchError


def test_start_health_stop(tmp_path: Path) -> None:
    server = EmbeddedMilvus(tmp_path)
    with server as uri:
        assert uri.startswith("http://127.0.0.1:")
        pid = server.pid
        assert pid is not None and ItemIndex(uri).versions() == []
        with pytest.raises(MilvusLaunchError, match="already served by this process"):
            EmbeddedMilvus(tmp_path).start()  # a second server on the same data dir
        code = (
            "from stream.embedded.milvus import EmbeddedMilvus\n"
            f"try: EmbeddedMilvus({str(tmp_path)!r}).start()\n"
            "except Exception as e: print(e)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "already served by another process" in out.stdout
        assert ItemIndex(uri).versions() == []  # the first server still answers
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "milvus" / "milvus.log").exists()


def test_port_taken_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(MilvusLaunchError, match="is taken"):
            EmbeddedMilvus(tmp_path, port=s.getsockname()[1]).start()


def test_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    with pytest.raises(MilvusLaunchError, match="pip install 'milvus-lite"):
        launcher.find_milvus_lite()


def test_local_file_uri_uses_the_same_client_code(tmp_path: Path) -> None:
    """pymilvus starts milvus-lite in-process for a `.db` path: no launcher, same ItemIndex."""
    index = ItemIndex(str(tmp_path / "items.db"))
    assert not index.flat  # no server address to open a channel to: the pymilvus search path
    index.create_version("v1", dim=4)
    index.insert("v1", np.arange(2, 6), np.eye(4, dtype=np.float32), progress=False)
    index.build("v1")
    index.flip("v1")
    assert index.search(np.eye(4, dtype=np.float32), 1).ids[:, 0].tolist() == [2, 3, 4, 5]
    index.close()
