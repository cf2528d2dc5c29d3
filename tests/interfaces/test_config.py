"""The deploy config schema: shipped configs load, and every error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hetero.errors import ConfigError
from hetero.interfaces.config import GRPC_DEFAULT_MESSAGE_BYTES, config_from_dict, load_config
from hetero.partitioner.decisions import HostPrecision

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def _write(tmp_path: Path, data: dict, name: str = "deploy.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_every_shipped_cluster_has_a_deploy_config_that_loads():
    clusters = sorted(p.stem for p in (CONFIGS / "clusters").glob("*.yaml"))
    # a `-generate` config serves a causal LM on a cluster that has its own config too
    deploys = sorted(p.stem for p in (CONFIGS / "deploy").glob("*.yaml"))
    generators = [d for d in deploys if d.endswith("-generate")]
    deploys = [d for d in deploys if d not in generators]
    assert clusters == deploys
    for name in generators:
        cfg = load_config(CONFIGS / "deploy" / f"{name}.yaml")
        assert cfg.task == "generate" and cfg.cluster_spec().name in clusters
    for name in deploys:
        cfg = load_config(CONFIGS / "deploy" / f"{name}.yaml")
        assert cfg.cluster_spec().name == name
        assert cfg.serving.host == "127.0.0.1"
        assert cfg.serving.max_message_bytes >= GRPC_DEFAULT_MESSAGE_BYTES


def test_demo_config_keeps_its_keys():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.model == "hetero.interfaces.models:tiny_gpt"
    assert Path(cfg.cluster).is_file() and cfg.objective == "throughput"
    assert cfg.serving.max_message_bytes == 4 * 2**20  # gRPC's default, stated not inherited


def test_dynamic_dims_become_export_dims(tmp_path):
    p = _write(
        tmp_path,
        {
            "model": "hetero.interfaces.models:tiny_gpt",
            "model_args": {"batch": 1, "seq": 16},
            "dynamic": {"idx": {1: "seq"}},
            "serving": {"max_message_bytes": "64 MiB", "deadline": "250 ms"},
        },
    )
    cfg = load_config(p)
    assert cfg.serving.max_message_bytes == 64 * 2**20 and cfg.serving.deadline == 0.25
    loaded = cfg.load_model()
    assert loaded.example_inputs[0].shape == (1, 16)
    dim = loaded.dynamic_shapes["idx"][1]
    assert dim.__name__ == "seq"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"model": "x.y:f", "objectve": "latency"}, ["objectve", "unknown key"]),
        ({"model": "x.y:f", "objective": "fast"}, ["objective", "latency"]),
        ({"model_args": {}}, ["model", "required"]),
        ({"model": "weights.pth"}, ["model", "pickle", ".pt2"]),
        (
            {"model": "x.y:f", "serving": {"max_message_bytes": "lots"}},
            ["serving.max_message_bytes"],
        ),
        ({"model": "x.y:f", "serving": {"port": 70000}}, ["serving.port"]),
        ({"model": "x.y:f", "cluster": "nowhere.yaml"}, ["cluster", "nowhere.yaml"]),
        ({"model": "x.y:f", "cluster": "bigbox"}, ["cluster", "ray://"]),
        ({"model": "x.y:f", "backends": {"tpu": "xla"}}, ["backends.tpu"]),
        ({"model": "x.y:f", "backends": {"gpuu": "triton"}}, ["backends", "'gpu'?"]),
        (
            {"model": "x.y:f", "backends": {"cpu": "tvmm"}},
            ["backends.cpu: no backend 'tvmm' (did you mean 'tvm'?)"],
        ),
        (
            {"model": "x.y:f", "backends": {"cpu": "triton"}},
            ["backends.cpu: triton compiles for gpu devices only; for cpu use one of:"],
        ),
        ({"model": "x.y:f", "objectiv": "latency"}, ["objectiv: unknown key (did you mean"]),
        ({"model": "x.y:f", "objective": "latncy"}, ["objective", "did you mean 'latency'"]),
        (
            {"model": "x.y:f", "serving": {"deadline": 30}},
            ["serving.deadline: 30 has no unit", "did you mean '30 s'?"],
        ),
        (
            {"model": "x.y:f", "constraints": {"memory": {"box/cpu": 24}}},
            ["constraints.memory.box/cpu: 24 has no unit", "'24 GB'"],
        ),
        ({"model": "missing.pt2"}, ["model", "missing.pt2"]),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path, data, words):
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    message = str(info.value)
    assert str(p) in message
    for w in words:
        assert w in message, message


def test_a_backend_for_a_kind_the_cluster_lacks_is_refused(tmp_path):
    cfg = config_from_dict(
        {
            "model": "hetero.interfaces.models:mlp_block",
            "cluster": str(CONFIGS / "clusters" / "cpu-2core.yaml"),
            "backends": {"gpu": "triton", "cpu": "tvm"},
        },
        tmp_path / "c.yaml",
    )
    with pytest.raises(ConfigError, match=r"c\.yaml: backends\.gpu: cluster cpu-2core has no gpu"):
        cfg.cluster_spec()


def test_a_factory_that_raises_names_the_users_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "def build():\n    weights = None\n    raise FileNotFoundError('no checkpoint here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config_from_dict({"model": "my_models:build"}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as info:
        cfg.load_model()
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'c.yaml'}: model: my_models:build raised FileNotFoundError")
    assert f"at {tmp_path / 'my_models.py'}:3 in build" in msg
    assert "raise FileNotFoundError('no checkpoint here')" in msg


def test_model_errors_name_the_key(tmp_path):
    cfg = config_from_dict({"model": "hetero.interfaces.models:nope"}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"c\.yaml: model: .*no 'nope'"):
        cfg.load_model()
    cfg = config_from_dict(
        {"model": "hetero.interfaces.models:mlp_block", "model_args": {"width": 3}},
        tmp_path / "c.yaml",
    )
    with pytest.raises(ConfigError, match="model_args"):
        cfg.load_model()
    cfg = config_from_dict(
        {"model": "hetero.interfaces.models:mlp_block", "dynamic": {"y": {0: "b"}}},
        tmp_path / "c.yaml",
    )
    with pytest.raises(ConfigError, match=r"dynamic: no input named y; .* x"):
        cfg.load_model()


def test_constraints_shape_the_cluster(tmp_path):
    cfg = config_from_dict(
        {
            "model": "hetero.interfaces.models:mlp_block",
            "cluster": str(CONFIGS / "clusters" / "dev-box-npu.yaml"),
            "constraints": {"exclude": ["local/npu"], "memory": {"local/cpu": "1 GiB"}},
        },
        tmp_path / "c.yaml",
    )
    spec = cfg.cluster_spec()
    assert [d.name for d in spec.devices] == ["local/cpu"]
    assert spec.devices[0].memory == 2**30


def test_dtype_casts_weights_and_float_inputs(tmp_path):
    cfg = config_from_dict(
        {"model": "hetero.interfaces.models:mlp_block", "dtype": "bfloat16"}, tmp_path / "c.yaml"
    )
    loaded = cfg.load_model()
    assert loaded.example_inputs[0].dtype == torch.bfloat16
    assert next(loaded.module.parameters()).dtype == torch.bfloat16


def test_a_generation_config_says_how_precise_its_host_cpus_compute(tmp_path):
    """generation.host_precision reaches hetero.compile as the typed decision (default:
    the model's mantissa); anything else names the key and what is known."""
    path = Path("configs/deploy/cpu-2core-generate.yaml")
    data = yaml.safe_load(path.read_text())
    data["cluster"] = str((path.parent / data["cluster"]).resolve())
    cfg = config_from_dict(data, tmp_path / "gen.yaml")
    assert cfg.compile_kwargs()["host_precision"] is HostPrecision.MODEL
    data["generation"]["host_precision"] = "fastest"
    cfg = config_from_dict(data, tmp_path / "gen.yaml")
    assert cfg.compile_kwargs()["host_precision"] is HostPrecision.FASTEST
    data["generation"]["host_precision"] = "bf16"
    with pytest.raises(ConfigError, match="host_precision"):
        config_from_dict(data, tmp_path / "gen.yaml")


def test_a_generation_config_bounds_its_feedback_rounds(tmp_path):
    """generation.feedback_budget reaches hetero.compile as FeedbackRounds' budget (a
    duration, "2 min" as 120 s); without `feedback: true` it is an error naming both keys."""
    from hetero.partitioner.decisions import FeedbackRounds

    path = Path("configs/deploy/cpu-2core-generate.yaml")
    data = yaml.safe_load(path.read_text())
    data["cluster"] = str((path.parent / data["cluster"]).resolve())
    data["feedback"] = True
    cfg = config_from_dict(data, tmp_path / "gen.yaml")
    assert cfg.compile_kwargs()["feedback"] is True
    data["generation"]["feedback_budget"] = "2 min"
    cfg = config_from_dict(data, tmp_path / "gen.yaml")
    assert cfg.compile_kwargs()["feedback"] == FeedbackRounds(budget_s=120.0)
    data["feedback"] = False
    with pytest.raises(ConfigError, match="feedback: true"):
        config_from_dict(data, tmp_path / "gen.yaml")
