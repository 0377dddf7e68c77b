#!/usr/bin/env bash
# Checks that onnxruntime for Node.js reproduces `dpmedtf predict` on pydicom-data's real chest
# radiograph: same bundle, same preprocessed input, probabilities within 1e-5, identical labels.
#   examples/node/check.sh [BUNDLE]      (default: runs/demo/bundle, made by `make demo`)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here="$repo/examples/node"
bundle=${1:-$repo/runs/demo/bundle}
python="$repo/.venv/bin/python"
if [ ! -d "$bundle" ]; then
  echo "no bundle at $bundle: run 'make demo' first, or pass BUNDLE=path/to/bundle" >&2
  exit 2
fi
command -v node >/dev/null && command -v npm >/dev/null || { echo "Node.js and npm are needed for this example" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
radiograph=$("$python" -c "from pydicom.data import get_testdata_file; print(get_testdata_file('RG1_UNCR.dcm'))")
"$repo/.venv/bin/dpmedtf" predict "$bundle" "$radiograph" --out "$work/preds.csv" --save-inputs "$work/inputs"
# The CPU binaries ship inside the npm package; skip its optional CUDA download (no network for it).
(cd "$here" && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --silent)
node "$here/predict.mjs" "$bundle" "$work/inputs" > "$work/node.json"
"$python" "$here/compare.py" "$work/preds.csv" "$work/node.json"
