#!/usr/bin/env bash
# Regenerates interfaces/hetero_pb2.py and interfaces/hetero_pb2_grpc.py from interfaces/hetero.proto.
# Needs grpcio-tools in the venv (`pip install grpcio-tools`); the generated modules are
# committed, so users never need it. The proto is mapped to the virtual path
# hetero/interfaces/ so the generated stub imports `from hetero.interfaces import hetero_pb2`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${HETERO_VENV:-$ROOT/.venv}/bin/python"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
"$PY" -m grpc_tools.protoc \
  --proto_path="hetero/interfaces=$ROOT/interfaces" \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  "$ROOT/interfaces/hetero.proto"
cp "$OUT/hetero/interfaces/hetero_pb2.py" \
   "$OUT/hetero/interfaces/hetero_pb2_grpc.py" "$ROOT/interfaces/"
echo "generated interfaces/hetero_pb2.py, hetero_pb2_grpc.py" >&2
