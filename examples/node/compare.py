"""Compares `dpmedtf predict`'s CSV with predict.mjs's JSON; exits 1 unless they agree.

Both run the same model on the same input file; Node.js decodes and preprocesses it on its own
(dicom-parser, preprocess.onnx), so the tolerance covers two onnxruntime builds, not two preprocessings:
preprocess.onnx reproduces dpmedtf's model input bit for bit."""

import json
import sys

import pandas as pd

TOLERANCE = 1e-4

python_rows = pd.read_csv(sys.argv[1])
node_rows = json.loads(open(sys.argv[2]).read())["rows"]
worst, label_mismatches, problems = 0.0, 0, []
for (_, python_row), node_row in zip(python_rows.iterrows(), node_rows, strict=True):
    if str(node_row["input"]) != str(python_row["input"]):
        problems.append(f"row order differs: {node_row['input']} vs {python_row['input']}")
    for name, probability in node_row["probabilities"].items():
        worst = max(worst, abs(probability - python_row[f"{name}_prob"]))
        label_mismatches += int(node_row["labels"][name] != python_row[f"{name}_label"])
print(f"onnxruntime-node vs dpmedtf predict: {len(node_rows)} input(s), max |Δ probability| = {worst:.2e} "
      f"(tolerance {TOLERANCE:.0e}), label mismatches = {label_mismatches}")
for problem in problems:
    print(problem)
sys.exit(0 if worst <= TOLERANCE and label_mismatches == 0 and not problems else 1)
