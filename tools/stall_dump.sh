#!/usr/bin/env bash
# Dumps every thread's stack (Python and native) of process PID with py-spy each time its
# LOG has not grown for QUIET_S seconds, appending to OUT; ends when PID does.
# Why: a GPU run once hung with no stack (BENCHMARKS.md, run 16): faulthandler's in-process
# dumps printed nothing or stopped the process mid-dump; py-spy reads the stacks from
# outside, also while a thread holds the GIL or waits in CUDA.
#   usage: tools/stall_dump.sh PID LOG QUIET_S OUT   (py-spy on PATH; .whl carries its wheel)
set -u
pid=$1 log=$2 quiet=$3 out=$4
while kill -0 "$pid" 2>/dev/null; do
  sleep "$quiet"
  age=$(( $(date +%s) - $(stat -c %Y "$log" 2>/dev/null || date +%s) ))
  if (( age >= quiet )); then
    { echo "=== $(date -u +%T): no output for ${age} s"; py-spy dump --native --pid "$pid"; } >>"$out" 2>&1
  fi
done
