// Runs a dpmedtf radiograph bundle from Node.js with no Python step: DICOM file → decoded pixels
// (dicom-parser) → preprocess.onnx → model.onnx (onnxruntime-node) → probabilities. Prints one JSON
// object: {labels, thresholds, rows: [{input, probabilities, labels}]}.
//
//   node predict.mjs BUNDLE INPUT...
//
// Each INPUT is an uncompressed little-endian greyscale DICOM (e.g. pydicom-data's RG1_UNCR.dcm), or a
// directory that `dpmedtf predict --save-inputs DIR` wrote (model inputs as raw float32 + inputs.json),
// which runs model.onnx alone. This checks the files it loads against the bundle's SHA256SUMS; whether
// the bundle is signed by its publisher is `dpmedtf verify`'s job: verify the bundle before trusting it.
//
// Decoding must give preprocess.onnx the values training's decoder gave (metadata.json
// preprocessing.graph.input_meaning). Training decodes DICOM with tensorflow-io (DCMTK) unless the
// bundle says dicom_decoder "pydicom"; both are reproduced below, as dpmedtf/data/radiograph_files.py
// does in Python. Equalisation makes the difference between them (a one-step jump in DCMTK's inversion)
// matter: a value one grey level off before it can be several levels off after it.
import { createHash } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import dicomParser from "dicom-parser";
import * as ort from "onnxruntime-node";

const MIN_SOURCE_PIXELS = 32; // as training: smaller is not a radiograph
const LITTLE_ENDIAN = new Set(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]); // implicit, explicit VR

const [bundle, ...inputs] = process.argv.slice(2);
if (!bundle || inputs.length === 0) {
  console.error("usage: node predict.mjs BUNDLE INPUT...  (INPUT: a DICOM file, or a `dpmedtf predict --save-inputs` directory)");
  process.exit(2);
}

function fail(message) {
  console.error(message);
  process.exit(1);
}

// --- the bundle ------------------------------------------------------------------------------------

const sums = new Map(readFileSync(join(bundle, "SHA256SUMS"), "utf8").trim().split("\n")
  .map((line) => line.match(/^([0-9a-f]{64}) [ *](.+)$/)).filter(Boolean).map((m) => [m[2], m[1]]));

function bundleFile(name) {
  const data = readFileSync(join(bundle, name));
  const digest = createHash("sha256").update(data).digest("hex");
  if (sums.get(name) !== digest) fail(`${join(bundle, name)}: does not match the bundle's SHA256SUMS; do not use this bundle`);
  return data;
}

const metadata = JSON.parse(bundleFile("metadata.json").toString("utf8"));
const spec = metadata.preprocessing;
if (spec.modality !== "radiograph") fail(`${bundle}: a ${spec.modality} model; this example handles radiograph bundles`);
const model = await ort.InferenceSession.create(bundleFile("model.onnx"), { executionProviders: ["cpu"] });
const graph = spec.graph; // {file, input, output, ...}: absent in bundles made before preprocess.onnx existed
const preprocess = graph ? await ort.InferenceSession.create(bundleFile(graph.file), { executionProviders: ["cpu"] }) : null;
const modelShape = metadata.input.shape.slice(1);

// --- decoding ---------------------------------------------------------------------------------------

function decodeDicom(path, dicomDecoder) {
  const bytes = readFileSync(path);
  let ds;
  try {
    ds = dicomParser.parseDicom(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
  } catch (error) {
    fail(`${path}: not a readable DICOM file (${error.exception ?? error})`);
  }
  const syntax = ds.string("x00020010") ?? "1.2.840.10008.1.2";
  const rows = ds.uint16("x00280010"), columns = ds.uint16("x00280011");
  const photometric = (ds.string("x00280004") ?? "").toUpperCase();
  const pixelData = ds.elements.x7fe00010;
  if (!rows || !columns || !pixelData) fail(`${path}: DICOM has no image (rows, columns or pixel data missing)`);
  if (!LITTLE_ENDIAN.has(syntax)) fail(`${path}: transfer syntax ${syntax} is compressed or big-endian; this example reads uncompressed little-endian DICOM only (use dpmedtf predict)`);
  if (!["MONOCHROME1", "MONOCHROME2"].includes(photometric) || (ds.uint16("x00280002") ?? 1) !== 1) fail(`${path}: ${photometric} DICOM; this example reads greyscale DICOM only (use dpmedtf predict)`);
  if ((ds.intString("x00280008") ?? 1) !== 1) fail(`${path}: DICOM has several frames; a radiograph is a single image`);
  if (Math.min(rows, columns) < MIN_SOURCE_PIXELS) fail(`${path}: DICOM image is ${rows}×${columns} pixels; too small to be a radiograph`);
  if (ds.elements.x00283000) fail(`${path}: DICOM has a Modality LUT Sequence; this example applies rescale slope/intercept only (use dpmedtf predict)`);
  const bitsAllocated = ds.uint16("x00280100"), bitsStored = ds.uint16("x00280101") ?? bitsAllocated;
  const signed = ds.uint16("x00280103") === 1;
  const count = rows * columns;
  if (![8, 16].includes(bitsAllocated) || pixelData.length < count * bitsAllocated / 8) fail(`${path}: pixel data is truncated or not 8/16-bit`);
  // Stored values: the low BitsStored bits, sign-extended for signed data.
  const view = new DataView(bytes.buffer, bytes.byteOffset + pixelData.dataOffset, count * bitsAllocated / 8);
  const stored = new Float64Array(count);
  const mask = 2 ** bitsStored;
  for (let i = 0; i < count; i++) {
    const word = bitsAllocated === 16 ? view.getUint16(2 * i, true) : view.getUint8(i);
    const value = word % mask;
    stored[i] = signed && value >= mask / 2 ? value - mask : value;
  }
  const slope = ds.floatString("x00281053"), intercept = ds.floatString("x00281052");
  const pixels = dicomDecoder === "pydicom" ? likePydicom(stored, photometric, slope, intercept)
    : likeTensorflowIo(path, ds, stored, photometric, bitsStored, signed, slope, intercept);
  return { pixels, rows, columns };
}

// pydicom's path (decode_with_pydicom): modality LUT in float64, then float32, MONOCHROME1 as max + min − x.
function likePydicom(stored, photometric, slope, intercept) {
  const rescale = slope !== undefined && intercept !== undefined;
  const pixels = Float32Array.from(stored, (x) => (rescale ? x * slope + intercept : x));
  if (photometric === "MONOCHROME1") {
    let low = Infinity, high = -Infinity;
    for (const v of pixels) { low = Math.min(low, v); high = Math.max(high, v); }
    const sum = Math.fround(low + high);
    for (let i = 0; i < pixels.length; i++) pixels[i] = sum - pixels[i]; // float32 subtraction: stored rounded
  }
  return pixels;
}

// tensorflow-io's DCMTK rendering without a VOI window (decode_like_tensorflow_io): the modality values'
// possible range mapped onto 0 … 2^bits − 1, descending when shown inverted, truncated.
function likeTensorflowIo(path, ds, stored, photometric, bitsStored, signed, slope, intercept) {
  for (let group = 0x6000; group < 0x6020; group += 2) {
    if (ds.elements[`x${group.toString(16)}0010`]) fail(`${path}: DICOM has overlay planes, which tensorflow-io burns into the image; this example does not (use dpmedtf predict)`);
  }
  let absmin = signed ? -(2 ** (bitsStored - 1)) : 0, absmax = signed ? 2 ** (bitsStored - 1) - 1 : 2 ** bitsStored - 1;
  let values = stored;
  if (slope !== undefined && intercept !== undefined && slope !== 0) { // DCMTK rescales only with both present
    values = stored.map((x) => Math.trunc(x * slope + intercept)); // its intermediate image is an integer type
    [absmin, absmax] = [absmin * slope + intercept, absmax * slope + intercept].sort((a, b) => a - b);
  }
  const bits = rangeBits(absmin, absmax);
  const shape = (ds.string("x20500020") ?? "").toUpperCase();
  const inverse = shape === "INVERSE" || (shape !== "IDENTITY" && photometric === "MONOCHROME1");
  const maxval = 2 ** bits - 1;
  const [low, high] = inverse ? [maxval, 0] : [0, maxval];
  const gradient = (high - low + 1) / (absmax - absmin + 1);
  // DCMTK's lookup-table shortcut indexes by (value − (int) absmin); it differs only for a fractional absmin.
  if (absmin !== Math.trunc(absmin) && bits <= 16 && values.length > 3 * Math.trunc(absmax - absmin + 1)) absmin = Math.trunc(absmin);
  return Float32Array.from(values, (m) => Math.trunc(low + (m - absmin) * gradient));
}

function rangeBits(low, high) { // DCMTK's DicomImageClass::rangeToBits: one more bit for a signed range
  const toBits = (value, subtract = 0) => {
    const v = value > 0 ? value - subtract : value;
    return v > 0 ? v.toString(2).length : 1;
  };
  if (low < 0) return Math.abs(low) > Math.abs(high) ? toBits(Math.trunc(Math.abs(low)), 1) + 1 : toBits(Math.trunc(Math.abs(high))) + 1;
  return toBits(Math.trunc(high));
}

// --- running --------------------------------------------------------------------------------------

async function probabilitiesOf(data, shape) {
  const feeds = { [metadata.input.name]: new ort.Tensor("float32", data, shape) };
  return Array.from((await model.run(feeds))[metadata.output.name].data);
}

async function modelInputs(input) {
  if (statSync(input).isDirectory()) { // `dpmedtf predict --save-inputs` output: model inputs as they are
    return JSON.parse(readFileSync(join(input, "inputs.json"), "utf8")).map((entry) => {
      if (JSON.stringify(entry.shape.slice(1)) !== JSON.stringify(modelShape)) fail(`${join(input, entry.file)}: shape ${entry.shape} does not match the model input ${modelShape}`);
      const bytes = readFileSync(join(input, entry.file));
      return { input: entry.input, data: new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)), shape: entry.shape };
    });
  }
  if (!preprocess) fail(`${bundle}: has no preprocess.onnx (made by an older dpmedtf); run \`dpmedtf predict --save-inputs DIR\` and pass DIR instead`);
  const { pixels, rows, columns } = decodeDicom(input, spec.dicom_decoder ?? "tensorflow-io");
  const output = (await preprocess.run({ [graph.input]: new ort.Tensor("float32", pixels, [rows, columns]) }))[graph.output];
  return [{ input, data: output.data, shape: output.dims }];
}

const rows = [];
for (const input of inputs) {
  for (const { input: name, data, shape } of await modelInputs(input)) {
    const probabilities = await probabilitiesOf(data, shape);
    rows.push({
      input: name,
      probabilities: Object.fromEntries(metadata.labels.map((label, j) => [label, probabilities[j]])),
      labels: Object.fromEntries(metadata.labels.map((label, j) => [label, probabilities[j] >= metadata.thresholds[label] ? 1 : 0])),
    });
  }
}
console.log(JSON.stringify({ labels: metadata.labels, thresholds: metadata.thresholds, rows }, null, 2));
