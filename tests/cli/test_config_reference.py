"""cli.config_reference: docs/config.md is what the code generates, and every setting is described."""

from __future__ import annotations

from pathlib import Path

import typer.main
from typer.testing import CliRunner

from cli import config_reference as ref
from cli.app import app
from stream.settings import Settings

ROOT = typer.main.get_command(app)


def test_committed_reference_equals_a_fresh_generation() -> None:
    drift = ref.check(ROOT)
    assert drift.current is not None, f"{drift.path} is missing: run `mind config-reference`"
    assert drift.ok, f"{drift.path} is out of date: run `mind config-reference` and commit it"


def test_every_setting_has_one_description_and_notes_name_real_fields() -> None:
    fields = Settings.model_fields
    assert set(ref._NOTES) <= set(fields), "notes for fields that no longer exist"
    twice = sorted(n for n in ref._NOTES if fields[n].description)
    assert not twice, f"described in settings.py already, drop the note: {twice}"
    missing = sorted(n for n, f in fields.items() if not (f.description or n in ref._NOTES))
    assert not missing, f"settings without a description: {missing}"


def test_process_environment_variables_are_all_described() -> None:
    assert ref.process_env(ROOT) == set(ref.PROCESS_ENV)
    assert "MIND_CONFIG" in ref.process_env(ROOT)  # read by stream.settings, not a field


def test_flags_are_found_from_the_cli() -> None:
    flags = ref.setting_flags(ref.cli_options(ROOT))
    assert "worker" in flags["kafka_bootstrap"]["--bootstrap"]
    assert "topics" in flags["partitions"]["--partitions"]
    assert "index" in flags["milvus_uri"]["--milvus-uri"]
    row = next(line for line in ref.generate(ROOT).splitlines() if line.startswith("| `kafka_bootstrap` "))
    assert "`MIND_KAFKA_BOOTSTRAP`" in row and "`--bootstrap`" in row


def test_command_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    runner = CliRunner()
    assert runner.invoke(app, ["config-reference", "--out", str(out), "--check"]).exit_code == 1  # missing
    res = runner.invoke(app, ["config-reference", "--out", str(out)])
    assert res.exit_code == 0 and out.read_text() == ref.generate(ROOT)
    assert runner.invoke(app, ["config-reference", "--out", str(out), "--check"]).exit_code == 0
    out.write_text(out.read_text().replace("`mind-worker`", "`workers`"))
    res = runner.invoke(app, ["config-reference", "--out", str(out), "--check"])
    assert res.exit_code == 1 and "out of date" in res.output
