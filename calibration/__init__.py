"""Calibration: measure the devices that are really here and fit the cost model's factors.

A stage of its own, between the backends (it compiles and loads through them) and the
runtime; what it produces is data, a `CalibrationProfile` (hetero.cluster.profile), which
the planner's cost model only reads. An entry is keyed by (device, backend): what is
measured is what that backend makes of the ops, since the planner prices each device
through the backend it runs there.

    run.py       calibrate(cluster, backends=...), calibrate_device, present
    eager.py     the eager backend: torch ops per class, the runner's dispatch, whole blocks
    compiled.py  a compiling backend: microbenchmarks compiled, loaded and timed through it
    units.py     those microbenchmarks (modules shaped like the planner's groups)
    fit.py       per op class, (e_compute, e_memory, overhead) by grid search; fit errors
    timing.py    the timing harness (short rounds, the fastest kept)
    links.py     host<->GPU copies: link bandwidth and latency
"""

from hetero.calibration.compiled import versions_string
from hetero.calibration.eager import runner_dispatch
from hetero.calibration.fit import Sample, fit, fit_errors, sample_prediction
from hetero.calibration.links import calibrate_link
from hetero.calibration.run import (
    Skipped,
    backends_to_measure,
    calibrate,
    calibrate_device,
    present,
)
from hetero.calibration.timing import time_call
from hetero.calibration.units import Prepared, Unit, prepare_units

__all__ = [
    "Prepared",
    "Sample",
    "Skipped",
    "Unit",
    "backends_to_measure",
    "calibrate",
    "calibrate_device",
    "calibrate_link",
    "fit",
    "fit_errors",
    "prepare_units",
    "present",
    "runner_dispatch",
    "sample_prediction",
    "time_call",
    "versions_string",
]
