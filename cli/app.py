"""`mind`: the command line. It wires the commands of every layer into one typer app; every option also
reads an environment variable (MIND_<NAME>) and a TOML file of defaults (`--defaults`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import config_reference, harness, model, stream, workflows

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

app = typer.Typer(no_args_is_help=True, add_completion=False, help="MIND Stream: multi-interest retrieval.")


@app.callback()
def _defaults_from_file(
    ctx: typer.Context,
    defaults: Annotated[
        Path | None,
        typer.Option(
            "--defaults",
            envvar="MIND_DEFAULTS",
            exists=True,
            dir_okay=False,
            # rich markup would eat "[train]": the brackets are escaped
            help="TOML file of option defaults, one table per command (\\[train], \\[evaluate], "
            "\\[bench.train]).",
        ),
    ] = None,
) -> None:
    """Option defaults from a file; flags and MIND_* variables still win (click's default_map)."""
    if defaults is not None:
        with defaults.open("rb") as f:
            tables = {k: v for k, v in tomllib.load(f).items() if isinstance(v, dict)}
        ctx.default_map = _by_param_name(ctx.command, tables)


def _by_param_name(group: Any, tables: dict[str, Any]) -> dict[str, Any]:
    """Keys may be spelt like the flags (`dim`, `max-len`); click's default_map wants parameter names.
    (typer vendors its own click, so groups are told by their `commands`, not by isinstance.)"""
    out: dict[str, Any] = {}
    for name, table in tables.items():
        cmd = group.commands.get(name) if hasattr(group, "commands") else None
        if cmd is None:
            raise typer.BadParameter(f"no command {name!r}", param_hint="--defaults")
        if hasattr(cmd, "commands"):  # a group such as `bench`
            out[name] = _by_param_name(cmd, table)
            continue
        names = {o.lstrip("-").replace("-", "_"): p.name for p in cmd.params for o in p.opts}
        names.update({p.name: p.name for p in cmd.params})
        unknown = sorted(set(k.replace("-", "_") for k in table) - set(names))
        if unknown:
            raise typer.BadParameter(f"[{name}] has no option {', '.join(unknown)}", param_hint="--defaults")
        out[name] = {names[k.replace("-", "_")]: v for k, v in table.items()}
    return out


app.add_typer(model.commands)
app.add_typer(workflows.commands)
app.add_typer(stream.commands)
app.add_typer(harness.commands)
app.add_typer(harness.bench, name="bench")
app.add_typer(config_reference.commands)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
