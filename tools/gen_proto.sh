#!/usr/bin/env bash
# Regenerates the gRPC modules next to their protos in interfaces/:
#   hetero.proto          -> hetero_pb2.py, hetero_pb2_grpc.py            (hetero.v1)
#   grpc_predict_v2.proto -> grpc_predict_v2_pb2.py, grpc_predict_v2_pb2_grpc.py  (the Open
#                            Inference Protocol, package `inference`)
# Needs grpcio-tools 1.85.1 in the venv (`pip install grpcio-tools==1.85.1`); the generated
# modules are committed, so users never need it. The protos are mapped to the virtual path
# hetero/interfaces/ so the generated stubs import `from hetero.interfaces import ..._pb2`.
#
# One edit after protoc: the Open Inference Protocol's messages go into a descriptor pool of
# their own instead of protobuf's default pool. tritonclient (and KServe's and MLServer's
# stubs) put the same names (`inference.ModelInferRequest`, ...) in the default pool, and
# protobuf refuses a second definition of a name there ("duplicate symbol"), so without this
# a process could not serve with hetero and call another server with tritonclient.
# The wire format does not depend on the pool; reflection is given this pool explicitly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${HETERO_VENV:-$ROOT/.venv}/bin/python"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for proto in hetero grpc_predict_v2; do
  "$PY" -m grpc_tools.protoc \
    --proto_path="hetero/interfaces=$ROOT/interfaces" \
    --python_out="$OUT" --grpc_python_out="$OUT" \
    "$ROOT/interfaces/$proto.proto"
done
OIP="$OUT/hetero/interfaces/grpc_predict_v2_pb2.py"
grep -q "_descriptor_pool.Default().AddSerializedFile" "$OIP"
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' "$OIP"
for proto in hetero grpc_predict_v2; do
  cp "$OUT/hetero/interfaces/${proto}_pb2.py" "$OUT/hetero/interfaces/${proto}_pb2_grpc.py" \
    "$ROOT/interfaces/"
done
echo "generated interfaces/{hetero,grpc_predict_v2}_pb2.py and _pb2_grpc.py" >&2
