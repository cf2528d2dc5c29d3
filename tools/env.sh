#!/usr/bin/env bash
# Creates or updates .venv with hetero (editable) and the pinned stack in
# constraints.txt. Re-installs only when pyproject.toml or constraints.txt change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HETERO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.hetero-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[hetero] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]]; then
  echo "[hetero] installing hetero and its pinned dependencies (a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # The machine's local wheel mirrors print one harmless warning per package: filter them.
  log="$(mktemp)"
  # --no-compile, then compileall on every core: pip writes the packages' bytecode itself,
  # one file at a time (~17,500 files, 67 s of the 2-core CI box's set-up; 36 s on both).
  if ! "$VENV/bin/python" -m pip install -q --no-compile -c "$ROOT/constraints.txt" \
    -e "$ROOT[test,bench]" >"$log" 2>&1; then
    grep -v -E "^WARNING: Location" "$log" >&2
    echo "[hetero] pip install failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  # As pip does, a file that does not compile (a package's templates, Python 2 examples) is
  # left to be compiled, or not, when imported.
  "$VENV/bin/python" - <<'PY' || true
import compileall, sysconfig

for path in sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}):
    compileall.compile_dir(path, quiet=2, workers=0)
PY
  echo "$want" >"$STAMP"
fi
