"""The offline comparison end to end: `mind evaluate` on a small planted log, report and plot."""

import json

from typer.testing import CliRunner

from mind.cli import app
from mind.experiment import run_offline, table
from mind.synthetic import generate, to_jsonl
from mind.train import TrainConfig


def test_run_offline_reports_every_model_and_both_protocols(tmp_path):
    inter = generate(n_users=300, n_items=200, n_categories=10, seed=3)
    out = tmp_path / "report.json"
    report = run_offline(
        inter,
        out=out,
        model_overrides={"d": 16, "max_len": 20},
        train_cfg=TrainConfig(epochs=2, neg=100, threads=1),
        progress=False,
    )
    saved = json.loads(out.read_text())
    assert saved["protocol"] == "comirec" and saved["secondary"]["protocol"] == "mind_paper"
    assert set(saved["models"]) == {"mostpop", "itemcf", "youtube_dnn", "mind_1", "mind"}
    for metrics in saved["models"].values():
        for n in (10, 20, 50, 100):
            assert 0.0 <= metrics[f"recall@{n}"] <= 1.0 and 0.0 <= metrics[f"hr@{n}"] <= 1.0
    assert set(saved["secondary"]["models"]["mind"]) == {"hr@10", "hr@20", "hr@50", "hr@100"}
    assert saved["train"]["mind"]["samples_per_s"] > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "mind_1" in table(report)


def test_cli_evaluate_on_a_jsonl_click_log(tmp_path):
    log = tmp_path / "clicks.jsonl"
    to_jsonl(generate(n_users=200, n_items=150, n_categories=8, seed=5), log)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--data",
            str(log),
            "--out",
            str(out),
            "--models",
            "mostpop,mind",
            "--epochs",
            "1",
            "--dim",
            "16",
            "--neg",
            "50",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "mind" in res.output and out.exists()
    assert set(json.loads(out.read_text())["models"]) == {"mostpop", "mind"}


def test_cli_reports_a_malformed_file_with_its_line(tmp_path):
    bad = tmp_path / "seq.txt"
    bad.write_text("1 2 3 4\n2\n")
    res = CliRunner().invoke(
        app, ["evaluate", "--data", str(bad), "--format", "sequences", "--out", str(tmp_path / "r.json")]
    )
    assert res.exit_code == 2
    assert "seq.txt:2" in res.output


def test_cli_reads_option_defaults_from_a_file_and_flags_win(tmp_path, monkeypatch):
    log = tmp_path / "clicks.jsonl"
    to_jsonl(generate(n_users=120, n_items=80, n_categories=4, seed=7), log)
    cfg = tmp_path / "mind.toml"
    cfg.write_text(f'[train]\ndata = "{log}"\nepochs = 1\ndim = 8\nneg = 20\nbudget = 30\n')
    runner = CliRunner()
    res = runner.invoke(app, ["--defaults", str(cfg), "train", "--out", str(tmp_path / "a.pt")])
    assert res.exit_code == 0, res.output
    assert "best epoch 1/1" in res.output
    res = runner.invoke(
        app, ["--defaults", str(cfg), "train", "--out", str(tmp_path / "b.pt"), "--epochs", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "/2" in res.output
    from mind.train import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "a.pt")
    assert model.cfg.d == 8
    cfg.write_text("[train]\nepoch = 1\n")
    res = runner.invoke(app, ["--defaults", str(cfg), "train"])
    assert res.exit_code == 2 and "has no option epoch" in res.output
