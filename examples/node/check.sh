#!/usr/bin/env bash
# Checks that Node.js alone reproduces `dpmedtf predict` on pydicom-data's real chest radiograph: the
# DICOM decoded by dicom-parser, preprocess.onnx and model.onnx run by onnxruntime-node, against
# dpmedtf's CSV for the same file: probabilities within 1e-4, identical labels.
#   examples/node/check.sh [BUNDLE [PUBLIC_KEY]]
# BUNDLE defaults to runs/demo/bundle (made by `make demo`); PUBLIC_KEY, the publisher's key that
# `dpmedtf predict` checks the signature with, defaults to $DPMEDTF_PUBLIC_KEY, else the demo's key
# beside the bundle (runs/demo/keys/demo_signing.pub).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here="$repo/examples/node"
bundle=${1:-$repo/runs/demo/bundle}
key=${2:-${DPMEDTF_PUBLIC_KEY:-}}
python="$repo/.venv/bin/python"
if [ ! -d "$bundle" ]; then
  echo "no bundle at $bundle: run 'make demo' first, or pass BUNDLE=path/to/bundle" >&2
  exit 2
fi
if [ -z "$key" ] && [ -f "$(dirname "$bundle")/keys/demo_signing.pub" ]; then
  key="$(dirname "$bundle")/keys/demo_signing.pub"
fi
key_args=()
if [ -n "$key" ]; then key_args=(--public-key "$key"); fi
command -v node >/dev/null && command -v npm >/dev/null || { echo "Node.js and npm are needed for this example" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
radiograph=$("$python" -c "from pydicom.data import get_testdata_file; print(get_testdata_file('RG1_UNCR.dcm'))")
"$repo/.venv/bin/dpmedtf" predict "$bundle" "$radiograph" --out "$work/preds.csv" ${key_args[@]+"${key_args[@]}"}
# The CPU binaries ship inside the npm package; skip its optional CUDA download (no network for it).
(cd "$here" && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --silent)
node "$here/predict.mjs" "$bundle" "$radiograph" > "$work/node.json"
"$python" "$here/compare.py" "$work/preds.csv" "$work/node.json"
