"""Compares `dpmedtf predict`'s CSV with predict.mjs's JSON; exits 1 unless they agree."""

import json
import sys

import pandas as pd

TOLERANCE = 1e-5

python_rows = pd.read_csv(sys.argv[1])
node_rows = json.loads(open(sys.argv[2]).read())["rows"]
worst, label_mismatches = 0.0, 0
for (_, python_row), node_row in zip(python_rows.iterrows(), node_rows, strict=True):
    for name, probability in node_row["probabilities"].items():
        worst = max(worst, abs(probability - python_row[f"{name}_prob"]))
        label_mismatches += int(node_row["labels"][name] != python_row[f"{name}_label"])
print(f"onnxruntime-node vs dpmedtf predict: {len(node_rows)} input(s), max |Δ probability| = {worst:.2e}, "
      f"label mismatches = {label_mismatches}")
sys.exit(0 if worst <= TOLERANCE and label_mismatches == 0 else 1)
