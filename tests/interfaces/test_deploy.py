"""hetero.deploy's parts that need no Ray cluster (the Ray flow is in test_ray_ways_in.py)."""

from __future__ import annotations

import pickle

import pytest
import torch
from cluster_fakes import write_config

import hetero
from hetero.errors import HeteroError
from hetero.interfaces.config import load_config
from hetero.interfaces.deploy import Recipe, _shippable, build_compiled, deploy
from hetero.interfaces.jobs import BUNDLE_CONFIG, bundle
from hetero.interfaces.models import mlp_block


def test_a_compiled_model_ships_to_an_actor_as_a_recipe(tmp_path):
    model, _ = mlp_block(batch=2, seq=4)
    cm = build_compiled(load_config(write_config(tmp_path)))
    shipped = _shippable(cm)  # loaded kernels do not pickle; the recipe does
    assert isinstance(shipped, Recipe)
    rebuilt = pickle.loads(pickle.dumps(shipped)).build()
    x = torch.randn(2, 4, 256)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-4, atol=1e-5)
    assert rebuilt.input_names == cm.input_names


def test_deploy_says_what_it_needs_before_touching_ray(tmp_path):
    with pytest.raises(HeteroError, match="needs a name"):
        deploy(write_config(tmp_path), detached=True)
    with pytest.raises(HeteroError, match="takes a CompiledModel"):
        deploy(object())
    assert hetero.deploy is not None  # the public name resolves


def test_a_job_bundle_carries_the_config_and_its_files(tmp_path):
    cfg = load_config(write_config(tmp_path, cluster="auto"))
    path = bundle(cfg, tmp_path / "bundle")
    assert path.name == BUNDLE_CONFIG
    moved = load_config(path)
    assert moved.cluster == "auto" and moved.cache_dir is None and moved.model == cfg.model
    cfg = load_config(write_config(tmp_path))
    moved = load_config(bundle(cfg, tmp_path / "bundle2"))
    assert moved.cluster == str((tmp_path / "bundle2" / "cluster.yaml").resolve())


def test_a_recipe_ships_the_plan_and_its_pins(mlp, tmp_path):
    """The actor runs the plan the driver made (pins included), not a fresh one."""
    model, x = mlp
    cm = hetero.compile(
        model,
        x,
        cluster="configs/clusters/dev-box-npu.yaml",
        backends={"cpu": "eager", "npu": "eager"},
        pins={"l2": "local/npu"},
        cache_dir=tmp_path,
        executor="local",
    )
    rebuilt = pickle.loads(pickle.dumps(Recipe.from_compiled(cm))).build()
    try:
        where = [(p.nodes, p.device) for p in cm.plan.partitions]
        assert [(p.nodes, p.device) for p in rebuilt.plan.partitions] == where
        assert any(d == "local/npu" for _, d in where)
        assert rebuilt.settings == cm.settings
        torch.testing.assert_close(rebuilt(*x), model(*x))
    finally:
        cm.shutdown()
        rebuilt.shutdown()
