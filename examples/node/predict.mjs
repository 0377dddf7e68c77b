// Runs a dpmedtf bundle's model.onnx with onnxruntime for Node.js on inputs that `dpmedtf predict
// --save-inputs DIR` preprocessed (raw little-endian float32, listed with their shapes in
// DIR/inputs.json), and prints one JSON object: {labels, thresholds, rows: [{input, probabilities, labels}]}.
//
// Preprocessing stays in dpmedtf (it is the training code); this shows that any ONNX runtime reproduces
// the probabilities from the same model input. Verify the bundle (`dpmedtf verify`) before trusting it.
//
//   node predict.mjs BUNDLE INPUTS_DIR
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";

const [bundle, inputsDir] = process.argv.slice(2);
if (!bundle || !inputsDir) {
  console.error("usage: node predict.mjs BUNDLE INPUTS_DIR");
  process.exit(2);
}

const metadata = JSON.parse(readFileSync(join(bundle, "metadata.json"), "utf8"));
const session = await ort.InferenceSession.create(join(bundle, "model.onnx"), { executionProviders: ["cpu"] });
const inputName = metadata.input.name;   // "image"
const outputName = metadata.output.name; // "probabilities"
const expectedShape = metadata.input.shape.slice(1);

const rows = [];
for (const entry of JSON.parse(readFileSync(join(inputsDir, "inputs.json"), "utf8"))) {
  if (JSON.stringify(entry.shape.slice(1)) !== JSON.stringify(expectedShape)) {
    throw new Error(`${entry.file}: shape ${entry.shape} does not match the model input ${expectedShape}`);
  }
  const bytes = readFileSync(join(inputsDir, entry.file));
  const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  const feeds = { [inputName]: new ort.Tensor("float32", data, entry.shape) };
  const probabilities = Array.from((await session.run(feeds))[outputName].data);
  rows.push({
    input: entry.input,
    probabilities: Object.fromEntries(metadata.labels.map((name, j) => [name, probabilities[j]])),
    labels: Object.fromEntries(metadata.labels.map((name, j) => [name, probabilities[j] >= metadata.thresholds[name] ? 1 : 0])),
  });
}
console.log(JSON.stringify({ labels: metadata.labels, thresholds: metadata.thresholds, rows }, null, 2));
