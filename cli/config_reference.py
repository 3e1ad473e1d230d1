"""The configuration reference (docs/config.md), generated from the code so that it cannot drift.

Three sources, each read from the code itself:
- every field of `stream.settings.Settings` (pydantic model: name, type, constraints, default,
  description), with its environment variable (MIND_<NAME>), its config-file key and the `mind` flags that
  set it (found by walking the typer app: an option whose envvar is the field's variable, or whose help
  names that variable, as the stream commands' flags do: "--bootstrap ... (MIND_KAFKA_BOOTSTRAP)");
- every other `mind` option that reads a MIND_* variable (typer `envvar=`);
- every other MIND_* variable the packages read from `os.environ` (found by scanning the sources for
  string literals that are MIND_* names).

`mind config-reference` writes the file; `mind config-reference --check` and
tests/cli/test_config_reference.py fail when the committed file differs from a fresh generation.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cli.options import fail
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "config.md"
PACKAGES = ("mind", "indexer", "stream", "workflows", "harness", "cli")
ENV_PREFIX = "MIND_"

# Descriptions of fields that carry none in stream/settings.py. Moving them into the fields'
# `description=` is better; tests fail if a key here stops being a field or duplicates a description.
_NOTES: dict[str, str] = {
    "kafka_client_id": "client.id prefix of every Kafka client (`-producer`, `-consumer`, `-admin`...).",
    "kafka_security_protocol": "librdkafka security.protocol; unset = PLAINTEXT.",
    "kafka_sasl_mechanism": "librdkafka sasl.mechanism (with SASL_PLAINTEXT / SASL_SSL).",
    "kafka_sasl_username": "librdkafka sasl.username.",
    "kafka_sasl_password": "librdkafka sasl.password (secret: hidden from logs and reprs).",
    "kafka_ssl_ca_location": "CA bundle file (librdkafka ssl.ca.location; the view's SSL context too).",
    "kafka_ssl_certificate_location": "Client certificate file for mutual TLS (ssl.certificate.location).",
    "kafka_ssl_key_location": "Client key file for mutual TLS (ssl.key.location).",
    "kafka_ssl_key_password": "Password of the client key (secret).",
    "clicks_topic": "Input topic of click.v1 events, keyed by user id.",
    "recall_topic": "Output topic of recall.v1 messages, keyed by user id, compacted.",
    "dlq_topic": "Dead letters (dlq.v1): code, reason, original bytes, partition, offset.",
    "dlq_partitions": "Partitions of the DLQ topic.",
    "group_id": "Consumer group of the workers (scale out by adding members, at most one per partition).",
    "max_poll_interval_ms": "librdkafka max.poll.interval.ms: a member silent this long leaves the group.",
    "producer_linger_ms": "librdkafka linger.ms of the recall / DLQ producer.",
    "redis_username": "Redis ACL user (unset = default user).",
    "redis_password": "Redis password (secret); a password inside redis_url is moved here.",
    "triton_model": "Model name of the user tower in the Triton repository.",
    "triton_timeout_s": "Timeout of one Triton call.",
    "milvus_token": "Milvus token or user:password (secret); one inside milvus_uri is moved here.",
    "log_level": "Worker log level.",
    "log_json": "JSON log lines (structlog); false = console format.",
    "embedded_kafka_port": "Port of the embedded broker (`mind up`; 0 = any free port).",
    "embedded_redis_port": "Port of the embedded key-value store (`mind up`; 0 = any free port).",
    "embedded_triton_grpc_port": "gRPC port of the embedded tritonserver (`mind up`; 0 = any).",
    "embedded_triton_http_port": "HTTP port of the embedded tritonserver (`mind up`; 0 = any).",
    "embedded_triton_metrics_port": "Metrics port of the embedded tritonserver (`mind up`; 0 = any).",
    "embedded_milvus_port": "Port of the embedded milvus-lite server (`mind up`; 0 = any).",
}

# MIND_* variables read straight from os.environ (not Settings fields, not CLI options). The scan of the
# sources finds them; a test fails when one is found that is not described here, or vice versa.
PROCESS_ENV: dict[str, str] = {
    "MIND_CONFIG": "Settings file (TOML, YAML, JSON or .env) when no `--config` is given.",
    "MIND_SCHEMA_DIR": "Folder of the event JSON schemas; default `schemas/` beside the packages.",
    "MIND_REDIS_SERVER_BIN": "valkey/redis-server binary for the embedded key-value store.",
}


def env_name(field_name: str) -> str:
    return f"{ENV_PREFIX}{field_name.upper()}"


# ---- the CLI -----------------------------------------------------------------------------------------


@dataclass
class Option:
    """One `mind` option, as typer/click declares it."""

    command: str
    name: str
    flags: list[str]
    envvar: str | None
    default: Any
    help: str


def cli_options(root: Any) -> list[Option]:
    """Every option of every `mind` command, walked from the root command (the app is passed in, never
    imported: the app registers this module's command)."""

    def walk(group: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
        for name, cmd in sorted(group.commands.items()):
            if hasattr(cmd, "commands"):
                yield from walk(cmd, (*path, name))
            else:
                yield " ".join((*path, name)), cmd

    out: list[Option] = []
    for command, cmd in [("(every command)", root), *walk(root, ())]:
        for p in cmd.params:
            if getattr(p, "param_type_name", "") != "option":
                continue
            env = p.envvar if isinstance(p.envvar, str) else None
            flags = [o for o in p.opts if o.startswith("--")] or list(p.opts)
            text = " ".join((p.help or "").split()).replace("\\[", "[")  # rich markup escapes
            out.append(Option(command, p.name, flags, env, p.default, text))
    return out


def _names_variable(text: str, var: str) -> bool:
    return re.search(rf"(?<![A-Z0-9_]){re.escape(var)}(?![A-Z0-9_])", text) is not None


def setting_flags(options: list[Option]) -> dict[str, dict[str, list[str]]]:
    """field -> {flag: [commands]}: the options that set a Settings field."""
    out: dict[str, dict[str, list[str]]] = {}
    for name in Settings.model_fields:
        var = env_name(name)
        for o in options:
            if o.envvar == var or _names_variable(o.help, var):
                out.setdefault(name, {}).setdefault(o.flags[0], []).append(o.command)
    return out


def other_cli_env(options: list[Option]) -> dict[str, list[Option]]:
    """MIND_* variables that `mind` options read and that are not Settings fields."""
    fields = {env_name(n) for n in Settings.model_fields}
    out: dict[str, list[Option]] = {}
    for o in options:
        if o.envvar and o.envvar.startswith(ENV_PREFIX) and o.envvar not in fields:
            out.setdefault(o.envvar, []).append(o)
    return dict(sorted(out.items()))


# ---- os.environ reads ---------------------------------------------------------------------------------

# A whole string literal that is a MIND_* name: the argument of os.environ.get or of a helper such as
# binary_from_env, or a typer envvar= (those are subtracted). Mentions inside prose never match.
_ENV_LITERAL = re.compile(r"""["'](MIND_[A-Z0-9_]+)["']""")


def process_env(cli: Any, root: Path = ROOT) -> set[str]:
    """MIND_* names the packages spell out as string literals (os.environ reads), less the Settings
    fields and the CLI options' variables (documented in their own tables)."""
    fields = {env_name(n) for n in Settings.model_fields}
    fields |= {o.envvar for o in cli_options(cli) if o.envvar}
    found: set[str] = set()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            found.update(_ENV_LITERAL.findall(path.read_text(encoding="utf-8")))
    return found - fields


def known_env_vars(cli: Any) -> set[str]:
    """Every MIND_* variable something in the code reads: Settings fields, CLI options, os.environ."""
    options = cli_options(cli)
    return (
        {env_name(n) for n in Settings.model_fields}
        | {o.envvar for o in options if o.envvar and o.envvar.startswith(ENV_PREFIX)}
        | process_env(cli)
    )


# ---- rendering ----------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(info: FieldInfo) -> str:
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        ann, origin, args = args[0], typing.get_origin(args[0]), list(typing.get_args(args[0]))
    if origin is typing.Literal:
        text = " | ".join(f"`{a}`" for a in args)
    elif ann is SecretStr:
        text = "secret string"
    elif origin is dict:
        text = "JSON object of strings"
    else:
        text = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}.get(
            ann, str(ann)
        )
    bounds = []
    for m in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sign} {getattr(m, attr)}")
    return text + (f", {', '.join(bounds)}" if bounds else "")


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _description(name: str, info: FieldInfo) -> str:
    return info.description or _NOTES.get(name, "")


def _flags_cell(flags: dict[str, list[str]]) -> str:
    return "<br>".join(f"`{flag}` ({', '.join(cmds)})" for flag, cmds in sorted(flags.items()))


def _cli_default(options: list[Option]) -> str:
    values = {repr(o.default) for o in options}
    if len(values) > 1:
        return "per command"
    value = options[0].default
    if value is None:
        return "unset"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


HEADER = """\
# Configuration reference

<!-- Generated by `mind config-reference` from stream/settings.py and the `mind` CLI; do not edit by hand.
     tests/cli/test_config_reference.py fails when this file differs from a fresh generation. -->

**Where a setting comes from**, highest precedence first:

1. a command-line flag, where the command has one (the *flag* column);
2. the environment variable `MIND_<NAME>` (the *environment variable* column; `MIND_KAFKA_EXTRA` takes a
   JSON object, booleans take `true`/`false`);
3. the settings file given by `--config FILE` (every stream command has it) or, without the flag, by
   `$MIND_CONFIG`: TOML, YAML or JSON with the *setting* names as top-level keys
   (`kafka_bootstrap = "kafka-1:9092"`), or a `.env` file of `MIND_<NAME>=value` lines;
4. the default.

An address left unset (`kafka_bootstrap`, `redis_url`, `triton_url`, `milvus_uri`) means the embedded
server that `mind up` starts on loopback. Secret settings are `SecretStr`: logs, reprs and reports show
`**********`; pass them as environment variables from a secret store (deploy/k8s/ uses `secretKeyRef`).

## Settings (`stream/settings.py`)

| setting | environment variable | flag | type | default | description |
|---|---|---|---|---|---|
"""


def generate(cli: Any) -> str:
    """The whole of docs/config.md."""
    options = cli_options(cli)
    flags = setting_flags(options)
    lines = [HEADER.rstrip("\n")]
    for name, info in Settings.model_fields.items():
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    f"`{name}`",
                    f"`{env_name(name)}`",
                    _flags_cell(flags.get(name, {})),
                    _type(info),
                    _default(info),
                    _description(name, info),
                )
            )
            + " |"
        )
    lines += [
        "",
        "## Other command options read from `MIND_*` variables",
        "",
        "These belong to one command each (training, export, indexing, the view...), not to the settings",
        "file; the flag wins over the variable. `mind <command> --help` shows them all.",
        "",
        "| environment variable | flag | commands | default | description |",
        "|---|---|---|---|---|",
    ]
    for var, opts in other_cli_env(options).items():
        flags_used = sorted({o.flags[0] for o in opts})
        helps = sorted({o.help for o in opts if o.help}, key=len)
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    f"`{var}`",
                    ", ".join(f"`{f}`" for f in flags_used),
                    ", ".join(sorted({o.command for o in opts})),
                    _cli_default(opts),
                    helps[-1] if helps else "",
                )
            )
            + " |"
        )
    lines += [
        "",
        "## Variables read directly from the environment",
        "",
        "| environment variable | description |",
        "|---|---|",
    ]
    for var in sorted(process_env(cli)):
        lines.append(f"| `{var}` | {_cell(PROCESS_ENV.get(var, ''))} |")
    return "\n".join(lines) + "\n"


@dataclass
class Drift:
    """What a check found: the committed file's path and whether it equals a fresh generation."""

    path: Path
    fresh: str
    current: str | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.current == self.fresh


def check(cli: Any, path: Path = DEFAULT_OUT) -> Drift:
    return Drift(path, generate(cli), path.read_text(encoding="utf-8") if path.is_file() else None)


def write(cli: Any, path: Path = DEFAULT_OUT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generate(cli), encoding="utf-8")
    return path


commands = typer.Typer()


@commands.command("config-reference")
def config_reference_cmd(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Default: docs/config.md.")] = None,
    check_only: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the file differs from a fresh one.")
    ] = False,
) -> None:
    """Write docs/config.md: every setting, its flag, environment variable and default, from the code."""
    root = ctx.find_root().command
    path = out or DEFAULT_OUT
    if check_only:
        if not check(root, path).ok:
            raise fail(f"{path} is out of date: run `mind config-reference --out {path}`", 1)
        typer.echo(f"{path} is up to date")
        return
    typer.echo(f"wrote {write(root, path)}")
