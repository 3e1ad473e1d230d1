"""The offline comparison end to end: `mind evaluate` on a small planted log, report and plot."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from mind import experiment
from mind.evaluate import paired_difference
from mind.experiment import run_offline, table
from mind.model import MIND
from mind.split import comirec_split
from mind.synthetic import generate, to_jsonl
from mind.train import TrainConfig, model_config_for


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
    # the same seed trains different models on different CPU kernels: the report names the kernels it ran
    assert saved["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert saved["machine"]["cpu"]


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


def test_seeds_give_standard_errors_paired_intervals_and_the_k_reached(tmp_path):
    inter = generate(n_users=240, n_items=150, n_categories=8, seed=4)
    report = run_offline(
        inter,
        out=tmp_path / "r.json",
        models=("mostpop", "mind_1", "mind"),
        model_overrides={"d": 16},
        train_overrides={"epochs": 1, "neg": 50, "threads": 1},
        seeds=2,
        progress=False,
    )
    assert report["seeds"] == [42, 43] and len(report["per_seed"]["mind"]) == 2
    assert set(report["stderr"]) == {"mind_1", "mind"}  # a baseline has no seed noise
    for pair in ("mind_vs_mind_1", "mind_vs_mostpop"):
        r = report["paired"][pair]["recall@50"]
        assert r["ci_low"] <= r["diff"] <= r["ci_high"] and r["users"] == report["users"]["test"]
        assert r["diff"] == pytest.approx(
            report["models"]["mind"]["recall@50"] - report["models"][pair.split("_vs_")[1]]["recall@50"]
        )
    reached = report["interests"]["mind"]["k_reached_test"]
    assert sum(reached.values()) == report["users"]["test"] and max(map(int, reached)) <= 4
    groups = report["by_k_reached"]["recall@50"]
    assert sum(g["users"] for g in groups.values()) == report["users"]["test"]
    assert report["settings"]["mind"]["why"]["max_len"].startswith("rule:")
    assert (tmp_path / "r_coupling.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_difference_hand_computed():
    a = np.array([1.0, 0.0, 1.0, 1.0])
    b = np.array([0.0, 0.0, 1.0, 0.0])
    r = paired_difference(a, b)
    # differences 1, 0, 0, 1: mean 0.5, sample sd 0.57735, se 0.288675, t(0.975, 3) = 3.182446
    assert r["diff"] == pytest.approx(0.5) and r["se"] == pytest.approx(0.288675, rel=1e-5)
    assert r["ci_low"] == pytest.approx(0.5 - 3.182446 * 0.288675, rel=1e-5)
    assert r["ci_high"] == pytest.approx(0.5 + 3.182446 * 0.288675, rel=1e-5)
    assert r["relative"] == pytest.approx(0.5 / 0.25)


class _NoTestUsers(list):
    """A test-case list that fails on any access: the search must never look at the test users."""

    def __iter__(self):
        raise AssertionError("the search looked at the test users")

    def __getitem__(self, i):
        raise AssertionError("the search looked at the test users")

    def __len__(self):
        raise AssertionError("the search looked at the test users")


def test_tune_keeps_the_best_validation_candidate_and_never_reads_test_users(monkeypatch):
    inter = generate(n_users=200, n_items=120, n_categories=6, seed=2)
    split = comirec_split(inter)
    split.test = _NoTestUsers()
    seen = []

    def fake_score(inter, split, name, settings, seed, progress):
        seen.append(dict(settings.model, **settings.train))
        # a made-up validation surface: lr 3e-3 and K = 4 are best, the window prefers the largest
        score = (settings.train.get("lr") == 3e-3) + (settings.model.get("K") == 4)
        score += settings.model.get("max_len", 0) / 1000
        return {"valid": {"recall@50": score}, "best_epoch": 1}

    monkeypatch.setattr(experiment, "valid_score", fake_score)
    start = experiment.rule_settings(inter, split, "mind")
    chosen, trials = experiment.tune(inter, split, "mind", start, seed=0, progress=False)
    windows = [
        c["model"]["max_len"]
        for s, cands in experiment.search_space(inter, split, "mind")
        for c in cands
        if s == "max_len"
    ]
    assert chosen.train["lr"] == 3e-3 and chosen.model["K"] == 4 and chosen.model["max_len"] == max(windows)
    assert all(t["setting"] in {"negatives", "lr", "max_len", "K", "lever"} for t in trials)
    assert chosen.why["lever"].startswith("tune: {} ")  # no lever beat the defaults: none is kept
    assert len(trials) == len(seen)  # each distinct candidate trained once
    assert chosen.why["K"].startswith("tune:")


def test_the_choice_of_tune_is_recorded_and_is_what_the_next_run_trains_with(tmp_path, monkeypatch):
    inter = generate(n_users=150, n_items=80, n_categories=4, seed=3)

    def fake_score(inter, split, name, settings, seed, progress):
        # a made-up validation surface: lr 3e-3 and hard negatives win
        score = (settings.train.get("lr") == 3e-3) + (settings.train.get("hard_beta") == 1.0)
        return {"valid": {"recall@50": score}, "best_epoch": 1}

    monkeypatch.setattr(experiment, "valid_score", fake_score)
    run = dict(models=("mind",), train_overrides={"epochs": 1}, progress=False)
    tuned = experiment.run_offline(inter, do_tune=True, tuned_dir=tmp_path, **run)
    recorded = experiment.tuned_file(tmp_path, inter)
    assert tuned["tuned_file"] == str(recorded) and recorded.exists()

    again = experiment.run_offline(inter, tuned_dir=tmp_path, **run)  # no --tune: the recorded choice
    assert again["tuned_file"] == str(recorded)
    assert again["config"]["train"]["mind"]["lr"] == 3e-3
    assert again["config"]["train"]["mind"]["hard_beta"] == 1.0
    assert again["settings"]["mind"]["why"]["lr"].startswith("tune:")
    assert again["settings"]["mind"]["why"]["lr"].endswith(f"[{recorded.name}]")

    rules = experiment.run_offline(inter, **run)  # no recorded choice to read: the rules
    assert "tuned_file" not in rules
    assert rules["config"]["train"]["mind"]["lr"] == 1e-3
    assert rules["config"]["train"]["mind"]["hard_beta"] == 0.0
    other = generate(n_users=160, n_items=80, n_categories=4, seed=4)  # another data set keeps its rules
    assert experiment.tuned_file(tmp_path, other) != recorded
    settings, read = experiment.model_settings(other, comirec_split(other), "mind", tmp_path)
    assert read is None and settings.train.get("lr") is None


def test_mind_k_defaults_to_cosine_capsule_dropout_and_a_merge_lean_one_vector_models_keep_the_paper():
    inter = generate(n_users=120, n_items=80, n_categories=4, seed=5)
    split = comirec_split(inter)
    rules = {name: experiment.rule_settings(inter, split, name) for name in experiment.LEARNED}
    cfgs = {name: experiment.build(inter, split, name, s)[0] for name, s in rules.items()}
    assert {name: (c.temperature, c.dropout, c.merge_decay) for name, c in cfgs.items()} == {
        "mind": (0.1, 0.3, 0.9),
        "mind_1": (0.0, 0.0, 1.0),
        "youtube_dnn": (0.0, 0.0, 1.0),
    }
    flagged = rules["mind"].merged({"temperature": 0.0, "dropout": 0.0})  # flags win over the defaults
    assert experiment.build(inter, split, "mind", flagged)[0].temperature == 0.0
    assert experiment.build(inter, split, "mind", flagged)[0].dropout == 0.0
    levers = dict(experiment.search_space(inter, split, "mind"))["lever"]
    assert {"model": {"temperature": 0.0}} in levers  # --tune can still pick the paper's model for MIND-K
    assert {"model": {"dropout": 0.0}} in levers
    assert {"model": {"merge_decay": 1.0}} in levers  # ... and the plain max-merge
    assert {"model": {"recency": 16}} in levers  # lifted MIND-K on LastFM only: a choice, not a default
    assert {"model": {"dropout": 0.3}} in dict(experiment.search_space(inter, split, "mind_1"))["lever"]


def test_mind_k_leaves_the_profile_out_one_vector_models_read_it_and_tune_tries_the_other_way():
    inter = generate(n_users=120, n_items=80, n_categories=4, seed=5)  # profiles: age bucket, gender
    split = comirec_split(inter)
    rules = {name: experiment.rule_settings(inter, split, name) for name in experiment.LEARNED}
    cfgs = {name: experiment.build(inter, split, name, s)[0] for name, s in rules.items()}
    assert all(c.n_profile_fields == 2 for c in cfgs.values())
    assert {name: MIND(c).use_profile for name, c in cfgs.items()} == {
        "mind": False,
        "mind_1": True,
        "youtube_dnn": True,
    }
    assert MIND(cfgs["mind"]).unread_tables() == ["time_emb", "recency_emb", "profile_emb"]
    assert {"model": {"profile": True}} in dict(experiment.search_space(inter, split, "mind"))["lever"]
    assert {"model": {"profile": False}} in dict(experiment.search_space(inter, split, "youtube_dnn"))[
        "lever"
    ]
    no_profiles = generate(n_users=120, n_items=80, n_categories=4, seed=5, with_profile=False)
    levers = dict(experiment.search_space(no_profiles, comirec_split(no_profiles), "mind"))["lever"]
    assert not any("profile" in c.get("model", {}) for c in levers)  # nothing to switch, so no such lever


def test_tune_weighs_shorter_windows_where_every_percentile_passes_the_cap():
    inter = generate(n_users=200, n_items=150, n_categories=6, seed=3, seq_len=(70, 90))
    split = comirec_split(inter)
    assert model_config_for(inter, split.train_users).max_len == 50  # long histories: the rule's cap
    windows = [
        c["model"]["max_len"] for c in dict(experiment.search_space(inter, split, "youtube_dnn"))["max_len"]
    ]
    assert windows == [12, 25, 50]  # the cap, halved and quartered, instead of one candidate


def test_the_window_rule_reads_training_users_only():
    inter = generate(n_users=300, n_items=150, n_categories=6, seed=1, seq_len=(10, 20))
    split = comirec_split(inter)
    before = model_config_for(inter, split.train_users).max_len
    for u in np.concatenate([split.valid_users, split.test_users]).tolist():
        inter.sequences[u] = np.concatenate([inter.sequences[u]] * 5)  # held-out users get long histories
    assert model_config_for(inter, split.train_users).max_len == before
    assert model_config_for(inter).max_len > before  # (all users would have moved it)


def test_ablation_flips_one_lever_against_the_defaults(tmp_path):
    inter = generate(n_users=200, n_items=120, n_categories=6, seed=3)
    inter.timestamps = None  # a data set without a clock, like Beauty
    report = run_offline(
        inter,
        models=("mind",),
        model_overrides={"d": 16},
        train_overrides={"epochs": 1, "neg": 40, "threads": 1},
        do_ablate=True,
        levers=("ihn", "time", "K2"),
        progress=False,
    )
    abl = report["ablation"]
    assert abl["base"]["valid"]["recall@50"] == report["train"]["mind"]["valid_recall@50"]
    rows = {r["key"]: r for r in abl["levers"]}
    assert set(rows) == {"ihn", "time", "K2"}
    assert rows["time"]["applies"] is False  # no timestamps, no time lever
    ihn = rows["ihn"]
    assert (
        ihn["applies"]
        and ihn["patch"]["train"]["hard_beta"] != report["config"]["train"]["mind"]["hard_beta"]
    )
    assert ihn["delta"]["recall@50"] == pytest.approx(
        ihn["valid"]["recall@50"] - abl["base"]["valid"]["recall@50"]
    )
    assert rows["K2"]["max_len"] == report["interests"]["mind"]["max_len"]
