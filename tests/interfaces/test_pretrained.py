"""Models by name: `hf:<id>` from a local Hugging Face cache (offline: nothing can be
downloaded here, so the cache is made with save_pretrained), safetensors weights in the
config, and plans exported as accelerate device_maps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import hetero
from hetero.errors import ConfigError
from hetero.interfaces.cli import app
from hetero.interfaces.config import config_from_dict
from hetero.interfaces.devicemap import device_map
from hetero.interfaces.models import mlp_block, tiny_gpt

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "configs" / "clusters"
REPO = "tiny-org/tiny-gpt2"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face hub cache holding one small GPT-2, laid out as `hf download` leaves it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cache = tmp_path_factory.mktemp("hf") / "hub"
    entry = cache / f"models--{REPO.replace('/', '--')}"
    commit = "0" * 40
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(entry / "snapshots" / commit)  # safetensors
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return cache, model


def _device_of(mapping: dict, tensor: str) -> str:
    """Where accelerate puts `tensor`: the entry of its longest module prefix."""
    keys = [k for k in mapping if k == "" or tensor == k or tensor.startswith(k + ".")]
    return mapping[max(keys, key=len)]


def test_an_hf_model_loads_from_the_local_cache_and_runs_as_transformers_does(hub, monkeypatch):
    cache, reference = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = config_from_dict(
        {"model": f"hf:{REPO}", "model_args": {"batch": 2, "seq": 12}, "dtype": "float32"},
        ROOT / "c.yaml",
    )
    loaded = cfg.load_model()
    (ids,) = loaded.example_inputs
    assert ids.shape == (2, 12) and int(ids.max()) < 128
    # the model transformers builds, with its own module names
    assert "transformer.h.0.attn.c_attn.weight" in loaded.module.state_dict()
    with torch.no_grad():
        logits = loaded.module(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits)
    graph = hetero.capture(loaded.module, loaded.example_inputs)
    assert graph.param_bytes > 0


def test_an_hf_model_missing_from_the_cache_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    cfg = config_from_dict({"model": "hf:nobody/nothing"}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as info:
        cfg.load_model()
    msg = str(info.value)
    assert "c.yaml: model: nobody/nothing is not in the local Hugging Face cache" in msg
    assert "never downloads" in msg and "HF_HUB_CACHE" in msg
    cfg = config_from_dict(
        {"model": f"hf:{REPO}", "model_args": {"layers": 2}}, tmp_path / "c.yaml"
    )
    with pytest.raises(ConfigError, match=r"model_args: an hf: model takes batch, seq, revision"):
        cfg.load_model()


def test_the_cli_plans_an_hf_model_and_exports_its_device_map(hub, tmp_path, monkeypatch):
    cache, reference = hub
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = tmp_path / "device_map.json"
    result = CliRunner().invoke(
        app,
        ["plan", f"hf:{REPO}", "--cluster", str(CLUSTERS / "cpu-2core.yaml"),
         "--device-map", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["partitions"] and plan["written"]["device_map"] == str(out)
    mapping = json.loads(out.read_text())
    assert mapping == {"": "cpu"}  # one CPU: the whole model in one entry, as accelerate writes it
    from accelerate.utils import check_device_map

    check_device_map(reference, mapping)


def test_a_mixed_plan_becomes_a_device_map_accelerate_accepts():
    """The demo model on an H100 node whose GPU holds only part of it: some modules'
    weights on cuda:0, the rest in host memory ("cpu": on the CPU, or streamed from it)."""
    from accelerate.utils import check_device_map

    model, inputs = tiny_gpt()
    graph = hetero.capture(model, inputs)
    cluster = hetero.Cluster.from_yaml(CLUSTERS / "h100-sxm-node.yaml")
    cluster = cluster.with_device("node0/gpu", memory=float(2 * 2**20))
    plan = hetero.plan(graph, cluster, backends={"gpu": "eager", "cpu": "eager"})
    mapping = device_map(model, graph, plan, cluster)
    assert set(mapping.values()) == {"cuda:0", "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key a module of the model
        check_device_map(model, mapping)
    # each tensor goes where its partition keeps its weights
    for p in plan.partitions:
        home = "cuda:0" if p.device == "node0/gpu" and p.weights == "resident" else "cpu"
        for name in p.nodes:
            for placeholder in graph[name].params:
                fqn = graph.params[placeholder][0]
                if fqn in model.state_dict():
                    assert _device_of(mapping, fqn) == home, (fqn, p.index)


def test_safetensors_weights_load_into_the_model(tmp_path):
    model, _ = mlp_block(batch=2, seq=4)
    tuned = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(tuned, tmp_path / "tuned.safetensors")
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "model": "hetero.interfaces.models:mlp_block",
                "model_args": {"batch": 2, "seq": 4},
                "weights": "tuned.safetensors",  # relative to the config's folder
            }
        )
    )
    loaded = hetero.interfaces.config.load_config(tmp_path / "c.yaml").load_model()
    for k, v in loaded.module.state_dict().items():
        torch.testing.assert_close(v, tuned[k])

    wrong = dict(tuned)
    wrong.pop(next(iter(wrong)))
    wrong["extra.weight"] = torch.zeros(3)
    save_file(wrong, tmp_path / "wrong.safetensors")
    cfg = config_from_dict(
        {"model": "hetero.interfaces.models:mlp_block", "weights": "wrong.safetensors"},
        tmp_path / "c.yaml",
    )
    with pytest.raises(ConfigError, match=r"c\.yaml: weights: .* does not fit MLPBlock: missing"):
        cfg.load_model()
    with pytest.raises(ConfigError, match=r"weights: .*\.safetensors files only"):
        config_from_dict({"model": "a.b:c", "weights": "w.bin"}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"weights: no file nowhere\.safetensors"):
        config_from_dict({"model": "a.b:c", "weights": "nowhere.safetensors"}, tmp_path / "c.yaml")
