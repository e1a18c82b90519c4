#!/usr/bin/env bash
# make containerd-api: daemon/nstap/runtime/containerd_api/, the Python gRPC stubs of the parts of
# containerd's API nstap calls (containers, tasks, events, version) and the event payloads it
# decodes (task and container events), generated from containerd's own .proto files (Debian's
# golang-github-containerd-containerd-dev, the API of the containerd Debian ships) and gogoproto's
# (golang-github-gogo-protobuf-dev) with grpcio-tools' protoc.
#   deploy/gen-containerd-api.sh [PYTHON]      PYTHON has grpc_tools (default .venv/bin/python)
# The .proto files are copied to a staging tree under nstap/runtime/containerd_api/ with their
# imports rewritten to match, so the generated modules import each other as
# nstap.runtime.containerd_api.* (protoc names Python modules after the .proto's path, and
# "github.com/..." is not a module path).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")  # absolute, not resolved: the venv's own
gocode=${GOCODE:-/usr/share/gocode/src}
api=$gocode/github.com/containerd/containerd/api
out=${OUT:-daemon/nstap/runtime/containerd_api}  # OUT: elsewhere (the test that the committed stubs match)
protos=(
  services/containers/v1/containers.proto
  services/tasks/v1/tasks.proto
  services/events/v1/events.proto
  services/version/v1/version.proto
  events/task.proto
  events/container.proto
  types/mount.proto
  types/metrics.proto
  types/descriptor.proto
  types/task/task.proto
)
test -d "$api" || { echo "nstap: $api missing: apt-get install golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=nstap/runtime/containerd_api
copy() {  # copy SRC to the staging tree as DEST with the imports rewritten
  mkdir -p "$(dirname "$stage/$pkg/$2")"
  sed -e "s#\"github.com/containerd/containerd/api/#\"$pkg/#" \
      -e "s#\"github.com/containerd/containerd/protobuf/plugin/#\"$pkg/plugin/#" \
      -e "s#\"gogoproto/gogo.proto\"#\"$pkg/gogoproto/gogo.proto\"#" "$1" > "$stage/$pkg/$2"
}
for proto in "${protos[@]}"; do copy "$api/$proto" "$proto"; done
copy "$gocode/github.com/containerd/containerd/protobuf/plugin/fieldpath.proto" plugin/fieldpath.proto
copy "$gocode/github.com/gogo/protobuf/gogoproto/gogo.proto" gogoproto/gogo.proto
include=$("$python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
mkdir -p "$stage/out"
(cd "$stage" && find "$pkg" -name '*.proto' -print0 | sort -z | xargs -0 "$python" -m grpc_tools.protoc -I . -I "$include" --python_out=out --grpc_python_out=out)
mkdir -p "$out"
# Keep the hand-written __init__.py; replace everything generated.
find "$out" -mindepth 1 \( -name '*_pb2*.py' -o -name __pycache__ \) -prune -exec rm -rf {} +
find "$out" -mindepth 1 -type d -empty -delete
cp -r "$stage/out/$pkg/." "$out/"
find "$out" -mindepth 1 -type d ! -name __pycache__ -exec sh -c 'test -e "$1/__init__.py" || : > "$1/__init__.py"' _ {} \;
echo "nstap: $out: $(find "$out" -name '*_pb2*.py' | wc -l) generated modules ($("$python" -c 'import grpc_tools.protoc as p, importlib.metadata as m; print("grpcio-tools", m.version("grpcio-tools"))'))"
