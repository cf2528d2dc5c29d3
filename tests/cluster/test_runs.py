"""Run logs: what deployments measured, as JSON that `hetero calibrate --from-runs` reads."""

from __future__ import annotations

import json

import pytest

from hetero.cluster.runs import HopRun, PartitionRun, RunLog, Term
from hetero.errors import ConfigError


def _log(cluster: str = "c") -> RunLog:
    part = PartitionRun(
        "h/cpu", "x86", "cpu", "tvm", "ray", 12, 2e-3, 2.1e-3, 1.5e-3,
        (Term("matmul", 5, 1.2e-3), Term("norm", 1, 1e-4)), 2e-5, "m/p0",
    )  # fmt: skip
    hop = HopRun("h/cpu", "h/npu", "ray", 12, 4096, 9e-4, 1e-5)
    return RunLog(cluster, (part,), (hop,))


def test_a_run_log_round_trips_through_json(tmp_path):
    log = _log()
    path = tmp_path / "runs.json"
    log.to_json(path)
    assert RunLog.load(path) == log


def test_logs_of_one_cluster_merge_and_of_two_do_not():
    merged = RunLog.merge("c", [_log(), _log()])
    assert len(merged.partitions) == 2 and len(merged.hops) == 2
    with pytest.raises(ConfigError, match="do not mix"):
        _log("c") + _log("d")


def test_a_file_that_is_no_run_log_says_so(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"schema_version": 7}))
    with pytest.raises(ConfigError, match="run log schema 7"):
        RunLog.load(path)
    path.write_text(json.dumps({"schema_version": 1, "cluster": "c", "partitions": [{"x": 1}]}))
    with pytest.raises(ConfigError, match="not a hetero run log"):
        RunLog.load(path)
