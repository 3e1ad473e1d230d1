"""deploy/Dockerfile copies what the installed code looks for beside its packages, sends only that in
the build context, installs torch from the CPU index, and runs as the user the manifests expect."""

from __future__ import annotations

import fnmatch
import json
import re

from deploykit import DEPLOY, ROOT, pod_spec, workloads

import mind.export
import stream.schemas

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def copied() -> set[str]:
    """Repository paths the COPY instructions take (the last word is the destination)."""
    return {src.rstrip("/") for line in instructions("COPY") for src in line.split()[:-1]}


def allowed_by_dockerignore(path: str) -> bool:
    """BuildKit semantics for this file's patterns: later lines win, `!` re-includes."""
    keep = True
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg, pat = line.startswith("!"), line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*") or path.startswith(pat + "/"):
            keep = neg
    return keep


def test_sources_the_code_reads_beside_its_packages_are_copied() -> None:
    paths = copied()
    for p in paths:
        assert (ROOT / p).exists(), f"COPY {p}: not in the repository"
        assert allowed_by_dockerignore(p), f"{p} is excluded from the build context"
    template = mind.export.TEMPLATE.relative_to(ROOT).as_posix()  # model_repo/python_model.py
    schemas = stream.schemas.schema_dir().relative_to(ROOT).as_posix()  # schemas
    assert {"pyproject.toml", "mind", "indexer", "stream", "workflows", "cli", template, schemas} <= paths
    assert "harness" not in paths  # the image is the runtime
    assert not allowed_by_dockerignore(".venv") and not allowed_by_dockerignore("runs")
    # editable: TEMPLATE and schema_dir() resolve from the package files, which stay in /app
    assert any(line.startswith("pip install -e .") for line in instructions("RUN"))


def test_torch_from_the_cpu_index_and_the_cli_as_entrypoint() -> None:
    runs = " ".join(instructions("RUN"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs and '"torch' in runs
    assert json.loads(instructions("ENTRYPOINT")[0]) == ["mind"]
    assert instructions("FROM")[0].startswith("python:3.11-slim")


def test_image_user_matches_the_manifests() -> None:
    (user,) = instructions("USER")
    for doc in workloads():
        ctx = pod_spec(doc).get("securityContext", {})
        images = {c["image"] for c in pod_spec(doc)["containers"]}
        if "mind-stream" in images:
            assert ctx == {"runAsNonRoot": True, "runAsUser": int(user)}, doc["metadata"]["name"]
