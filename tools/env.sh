#!/usr/bin/env bash
# Creates or updates .venv with hetero (editable) and the pinned stack in
# constraints.txt. Re-installs only when pyproject.toml, constraints.txt or constraints-lock.txt
# change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HETERO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.hetero-stamp"
want="$({ cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" "$ROOT/constraints-lock.txt" 2>/dev/null || true; } | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[hetero] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]]; then
  echo "[hetero] installing hetero and its pinned dependencies (a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # The machine's local wheel mirrors print one harmless warning per package: filter them.
  log="$(mktemp)"
  # First every package of constraints-lock.txt (what pip resolved for the pins of
  # constraints.txt), without resolving and in two pip processes at once: pip unpacks one
  # wheel at a time on one core, and torch, triton and TVM are half of the 3 GB. The install
  # below then finds them there and only checks them (2-core box, 2026-12-06: 25.7 s for that
  # install alone, 13.8 s for the two halves then 2.8 s for it). A stale lock only costs
  # time: that install replaces or adds whatever the pins and pyproject.toml ask for.
  # After changing constraints.txt or pyproject.toml, rewrite the lock from the venv:
  #   .venv/bin/pip freeze --all --exclude-editable | grep -v '^pip==' >constraints-lock.txt
  lock="$ROOT/constraints-lock.txt"
  if [[ -f "$lock" ]]; then
    big='^(torch|triton|apache-tvm)=='
    quick=("$VENV/bin/python" -m pip install -q --no-deps --no-compile -r /dev/stdin)
    grep -E "$big" "$lock" | "${quick[@]}" >"$log.big" 2>&1 &
    grep -v -E "$big" "$lock" | "${quick[@]}" >"$log" 2>&1 || true
    wait $! || true
    rm -f "$log.big"
  fi
  # --no-compile: pip writes the packages' bytecode itself, one file at a time (~17,500 files,
  # 67 s of the 2-core CI box's set-up). Python writes a module's on its first import instead
  # (tools/test sees to it where PYTHONDONTWRITEBYTECODE is set): the suite imports ~5,600 of
  # them, and compiling all ahead, even on both cores, took 36 s of the CI box's set-up.
  if ! "$VENV/bin/python" -m pip install -q --no-compile -c "$ROOT/constraints.txt" \
    -e "$ROOT[test,bench]" >"$log" 2>&1; then
    grep -v -E "^WARNING: Location" "$log" >&2
    echo "[hetero] pip install failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$want" >"$STAMP"
fi
