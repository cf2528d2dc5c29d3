import pytest

from hetero.backends.base import Backend
from hetero.backends.eager import EagerBackend
from hetero.backends.registry import BUILTIN, default_registry
from hetero.errors import ConfigError


def test_builtins_are_registered():
    reg = default_registry()
    assert set(BUILTIN) <= set(reg.names())
    assert isinstance(reg.get("eager"), EagerBackend)


def test_unknown_name_lists_the_known_ones():
    reg = default_registry()
    with pytest.raises(ConfigError) as e:
        reg.get("tmv")
    msg = str(e.value)
    assert "'tmv'" in msg
    for name in ("eager", "tvm"):
        assert name in msg


def test_duplicate_name_is_rejected():
    reg = default_registry()
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("eager", EagerBackend)
    with pytest.raises(ConfigError, match="already registered"):
        default_registry(extra=[("mine", EagerBackend), ("mine", EagerBackend)])


def test_extra_backends_and_kinds():
    class Npu(EagerBackend):
        name = "npu-only"
        device_kinds = ("npu",)

    reg = default_registry(extra=[("npu-only", Npu)])
    assert isinstance(reg.get("npu-only"), Backend)
    assert "npu-only" in reg.for_kind("npu")
    assert "npu-only" not in reg.for_kind("gpu")
    assert "tvm" in reg.for_kind("cpu")
