"""hetero/environment.py: the thread settings hetero's processes get, and whose wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hetero.environment import (
    FILLED,
    OWN_CORES,
    SPIN_COUNT,
    THREAD_ENV,
    THREAD_VARIABLES,
    child_env,
)
from hetero.errors import ConfigError

CLEAN = {k: v for k, v in os.environ.items() if k not in (*THREAD_VARIABLES, FILLED, OWN_CORES)}
OWNED = {**CLEAN, OWN_CORES: "1"}


def test_idle_threads_sleep_at_once_unless_the_person_owns_the_cores():
    for env in (child_env(CLEAN), child_env(OWNED, shares_cores=True)):
        assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env[SPIN_COUNT] == "0"
    # owned cores, and no other compute process of hetero's on them: a bounded spin
    alone = child_env(OWNED)
    assert alone["OMP_WAIT_POLICY"] == "PASSIVE" and alone[SPIN_COUNT] == "300000"


def test_a_persons_own_setting_wins_but_not_one_hetero_filled_in():
    mine = child_env({**OWNED, SPIN_COUNT: "5", "OMP_WAIT_POLICY": "ACTIVE"}, shares_cores=True)
    assert mine[SPIN_COUNT] == "5" and mine["OMP_WAIT_POLICY"] == "ACTIVE"
    # the CLI applied hetero's settings to itself; a worker it starts beside another still
    # sleeps at once: the parent's 300000 was hetero's, not the person's
    parent = {**OWNED, **child_env(OWNED)}
    assert parent[SPIN_COUNT] == "300000"
    assert child_env(parent, shares_cores=True)[SPIN_COUNT] == "0"
    assert child_env(parent)[SPIN_COUNT] == "300000"


def test_a_wrong_own_cores_value_says_what_to_set():
    with pytest.raises(ConfigError, match=r"HETERO_OWN_CORES='yes'.*What to do: set it to 1"):
        child_env({**CLEAN, OWN_CORES: "yes"})


def test_every_setting_is_part_of_what_a_measured_choice_is_valid_for():
    assert set(THREAD_ENV) <= set(THREAD_VARIABLES)


@pytest.mark.parametrize("owned", [False, True])
def test_torchs_openmp_reads_the_wait_settings(owned):
    # OMP_DISPLAY_ENV makes libgomp print what it read when torch loads it
    env = {**child_env(OWNED if owned else CLEAN), "OMP_DISPLAY_ENV": "VERBOSE"}
    code = "import torch; torch.ones(256, 256).sum()"
    run = subprocess.run([sys.executable, "-c", code], env={**CLEAN, **env}, text=True,
                         capture_output=True, check=True)  # fmt: skip
    shown = run.stdout + run.stderr
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown
    assert f"GOMP_SPINCOUNT = '{300000 if owned else 0}'" in shown
