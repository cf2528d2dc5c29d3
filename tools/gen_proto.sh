#!/usr/bin/env bash
# Regenerates cluster/hetero_pb2.py and cluster/hetero_pb2_grpc.py from cluster/hetero.proto.
# Needs grpcio-tools in the venv (`pip install grpcio-tools`); the generated modules are
# committed, so users never need it. The proto is mapped to the virtual path
# hetero/cluster/ so the generated stub imports `from hetero.cluster import hetero_pb2`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${HETERO_VENV:-$ROOT/.venv}/bin/python"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
"$PY" -m grpc_tools.protoc \
  --proto_path="hetero/cluster=$ROOT/cluster" \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  "$ROOT/cluster/hetero.proto"
cp "$OUT/hetero/cluster/hetero_pb2.py" \
   "$OUT/hetero/cluster/hetero_pb2_grpc.py" "$ROOT/cluster/"
echo "generated cluster/hetero_pb2.py, hetero_pb2_grpc.py" >&2
