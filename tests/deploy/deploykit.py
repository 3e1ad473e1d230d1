"""What the deploy/ tests share: the parsed files, compose interpolation, and the code's own names
(settings, environment variables, CLI commands, exported metrics) that the files must agree with.

A module, not a conftest.py, as tests/towerkit.py: no other conftest can shadow it.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import typer.main
import yaml
from pydantic import SecretStr

from cli.app import app
from cli.config_reference import known_env_vars
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

_INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_INTERP_OR_ESCAPE = re.compile(r"\$\$|" + _INTERP.pattern)


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}: the default, or `env`'s value, or "<VAR>"."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env and name in env:
            return env[name]
        if op in (":-", "-"):
            return arg
        return f"<{name}>"

    return _INTERP_OR_ESCAPE.sub(sub, value)


def is_interpolated(value: Any) -> bool:
    return isinstance(value, str) and _INTERP.fullmatch(value.strip()) is not None


@functools.cache
def compose() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((DEPLOY / "compose.yaml").read_text()))
    assert len(docs) == 1
    return docs[0]


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service_env(name: str) -> dict[str, Any]:
    env = services()[name].get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return dict(env)


def service_ports(name: str) -> set[int]:
    """Container ports a service listens on, as declared (ports: "H:C" and expose:)."""
    svc = services()[name]
    out: set[int] = set()
    for p in svc.get("ports", []):
        out.add(int(str(p).split(":")[-1].split("/")[0]))
    for p in svc.get("expose", []):
        out.add(int(str(p).split("/")[0]))
    return out


def mounts(name: str) -> dict[str, str]:
    """Container path -> source (host path or volume name) of a service's volumes, interpolated."""
    out = {}
    for v in services()[name].get("volumes", []):
        parts = interpolate(v).split(":")
        out[parts[1]] = parts[0]
    return out


def hostnames() -> dict[str, str]:
    """DNS name on the compose network -> service: service names, hostnames and network aliases."""
    out: dict[str, str] = {}
    for name, svc in services().items():
        out[name] = name
        if "hostname" in svc:
            out[svc["hostname"]] = name
        nets = svc.get("networks") or {}
        if isinstance(nets, dict):
            for net in nets.values():
                for alias in (net or {}).get("aliases", []):
                    out.setdefault(alias, name)
    return out


@functools.cache
def k8s_docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every manifest under deploy/k8s (kustomization.yaml is not one)."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return tuple(out)


def k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for _, d in k8s_docs() if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment, Job or CronJob."""
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d.get("kind") in ("Deployment", "Job", "CronJob")]


# ---- the code's names ----------------------------------------------------------------------------------


def settings_env_names() -> dict[str, str]:
    """MIND_<FIELD> -> field."""
    return {f"MIND_{n.upper()}": n for n in Settings.model_fields}


def secret_env_names() -> set[str]:
    """MIND_* variables of SecretStr settings: they must come from a secret store, never a literal."""
    out = set()
    for name, info in Settings.model_fields.items():
        if SecretStr in (info.annotation, *getattr(info.annotation, "__args__", ())):
            out.add(f"MIND_{name.upper()}")
    return out


@functools.cache
def known_env_names() -> frozenset[str]:
    """Every MIND_* variable something in the code reads (settings, CLI options, os.environ)."""
    return frozenset(known_env_vars(typer.main.get_command(app)))


def settings_from_env(env: dict[str, Any]) -> Settings:
    """Validate the MIND_* settings of a service as the worker would read them (interpolated first)."""
    fields = settings_env_names()
    values = {fields[k]: interpolate(v) for k, v in env.items() if k in fields}
    for k, v in values.items():
        if isinstance(v, str) and v.startswith("{"):
            values[k] = json.loads(v)
    return Settings(_env_prefix="NOT_THIS_PROCESS_", **values)  # only the file's values, not os.environ


@functools.cache
def mind_commands() -> frozenset[str]:
    """Top-level `mind` commands (typer app)."""
    return frozenset(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def seconds(text: str) -> float:
    """Compose durations: "60s", "1m30s", "500ms"."""
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total
