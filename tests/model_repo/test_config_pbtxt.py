"""The config.pbtxt that `mind export` writes parses with Triton's own protobuf schema and says what the
deployment relies on: the model name the workers and the Triton command use, dynamic batching, the
instance group kind (CPU, or GPU with --gpu), and the tensor names and dims the worker sends.

Parsed here with tritonclient's model_config_pb2.ModelConfig + google.protobuf.text_format.Parse (an
unknown or misspelt field raises), independently of mind.export.parse_config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from cli.app import app
from mind.model import MIND
from mind.synthetic import generate
from mind.train import feature_tables, model_config_for, save_checkpoint
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = Settings.model_construct().triton_model  # the default every deploy file uses


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A small random-init MIND checkpoint (60 items, d=8, K=3, window 6), as `mind train` saves one."""
    inter = generate(n_users=30, n_items=60, n_categories=4, seq_len=(4, 8), seed=5)
    cfg = model_config_for(inter, d=8, K=3, max_len=6)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mind.pt"
    save_checkpoint(path, MIND(cfg).eval(), inter, None)
    return path, (cfg, feature_tables(inter))


def export(repo: Path, ckpt: Path, *flags: str) -> mc.ModelConfig:
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--repo", str(repo), *flags])
    assert res.exit_code == 0, res.output
    return text_format.Parse((repo / MODEL / "config.pbtxt").read_text(), mc.ModelConfig())


def test_exported_config_parses_with_tritons_schema(tmp_path: Path, checkpoint: tuple[Path, object]) -> None:
    ckpt, (cfg, (side_t, prof_t)) = checkpoint
    config = export(tmp_path, ckpt)
    assert config.name == MODEL and config.backend == "python"
    assert config.max_batch_size >= 64
    # dynamic batching: requests of every worker merge; preferred sizes fit the maximum
    assert config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 10_000
    assert list(config.dynamic_batching.preferred_batch_size)
    assert max(config.dynamic_batching.preferred_batch_size) <= config.max_batch_size
    # explicit model control loads each new version beside the old one and keeps one
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.count == 1
    L, S, P = cfg.max_len, side_t.shape[1], prof_t.shape[1]
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in config.input] == [
        ("ITEM_IDS", mc.TYPE_INT64, [L], False),
        ("SIDE_IDS", mc.TYPE_INT64, [L, S], False),
        ("PROFILE_IDS", mc.TYPE_INT64, [P], False),
        ("TIMES", mc.TYPE_INT64, [L], True),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("INTERESTS", mc.TYPE_FP32, [cfg.K, cfg.d]),
        ("ACTIVE", mc.TYPE_BOOL, [cfg.K]),
        ("META", mc.TYPE_STRING, [2]),
        ("COUPLING", mc.TYPE_FP32, [L, cfg.K]),
    ]
    assert config.parameters["torch_threads"].string_value == "1"  # `mind export`'s default
    assert sorted(p.name for p in (tmp_path / MODEL).iterdir()) == ["1", "config.pbtxt"]


def test_gpu_export_asks_for_gpu_instances(tmp_path: Path, checkpoint: tuple[Path, object]) -> None:
    ckpt, _ = checkpoint
    config = export(tmp_path, ckpt, "--gpu", "--instances", "2")
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 2
    with pytest.raises(text_format.ParseError):  # the schema is strict: a misspelt field is refused
        text_format.Parse(
            (tmp_path / MODEL / "config.pbtxt").read_text().replace("max_batch_size", "max_batchsize"),
            mc.ModelConfig(),
        )


def test_deploy_files_serve_the_exported_model_name() -> None:
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    assert f"--load-model={MODEL}" in services["triton"]["command"]
    (triton,) = [
        d
        for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "triton.yaml").read_text())
        if d["kind"] == "Deployment"
    ]
    assert f"--load-model={MODEL}" in triton["spec"]["template"]["spec"]["containers"][0]["args"]
