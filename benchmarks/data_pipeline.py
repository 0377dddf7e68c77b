"""Throughput of the data path on this machine, written to benchmarks/results/data_pipeline.json.

Radiographs (512×512 output): copies of pydicom-data's real chest CR RG1_UNCR (1955×1841, 16-bit DICOM)
and the same image as a 16-bit PNG. "cold" = decode + preprocess into the cache (`cache.prepare`),
"cached" = the training input reading the prepared array (gather, 3 channels, scale) in batches.
CT: NIfTI volumes of 512×512×160 int16 → 224×224×128, cold and cached.
Usage: python benchmarks/data_pipeline.py [--images 48] [--volumes 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def manifest(folder: Path, paths: list[Path], column: str, extra: dict) -> Path:
    rows = [{column: str(p), "patient_id": f"P{i}", "sex": "F", "age": 60, **extra, "split": "train"}
            for i, p in enumerate(paths)]
    out = folder / f"{column}_{len(list(folder.glob('*.csv')))}.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_pipeline.json")
    args = parser.parse_args()

    import nibabel as nib
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    from dpmedtf.data import labels as L
    from dpmedtf.data.cache import PreprocessSpec, prepare
    from dpmedtf.data.manifests import load_manifest
    from dpmedtf.data.pipeline import training_dataset
    from dpmedtf.data.sampling import ShuffledBatches

    work = Path(tempfile.mkdtemp(prefix="dpmedtf-bench-"))
    results = {"machine": {"cpus": os.cpu_count()}, "radiograph": {}, "volume": {}}
    try:
        source = Path(get_testdata_file("RG1_UNCR.dcm"))
        pixels = pydicom.dcmread(source).pixel_array
        png = work / "rg1.png"
        Image.fromarray(pixels.astype(np.uint16)).save(png)
        findings = {f: 0 for f in L.FINDINGS}
        for kind, original, decoder in (("dicom", source, "tensorflow-io"), ("dicom", source, "pydicom"),
                                        ("png", png, "tensorflow-io")):
            copies = []
            for i in range(args.images):
                target = work / f"{kind}-{decoder}" / f"{i}{original.suffix}"
                target.parent.mkdir(exist_ok=True)
                shutil.copy(original, target)
                copies.append(target)
            cohort = load_manifest(manifest(work, copies, "image_path", findings), "radiograph")
            spec = PreprocessSpec("radiograph", image_size=512, dicom_decoder=decoder)
            kind = f"{kind} ({decoder})" if kind == "dicom" else kind
            # Warm-up on two files (graph tracing, thread pools) so order does not favour later rows.
            warm = load_manifest(manifest(work, copies[:2], "image_path", findings), "radiograph")
            prepare(warm, spec, work / "warm")
            prepared, cold = timed(lambda: prepare(cohort, spec, work / "cache"))
            batches = ShuffledBatches(len(copies), 16, 10 * -(-len(copies) // 16), seed=0)  # 10 epochs
            list(training_dataset(prepared, "train", list(ShuffledBatches(len(copies), 16, 1).shards())))  # warm-up
            _, cached = timed(lambda: sum(int(e["images"].shape[0]) for e in
                                          training_dataset(prepared, "train", list(batches.shards()))))
            results["radiograph"][kind] = {
                "source": f"{pixels.shape[0]}×{pixels.shape[1]} 16-bit", "images": len(copies),
                "cold_images_per_s": len(copies) / cold,
                "cached_images_per_s": batches.steps * 16 / cached if batches.steps else None}
            print(f"radiograph {kind:23s}: cold {len(copies) / cold:7.1f} images/s, "
                  f"cached {results['radiograph'][kind]['cached_images_per_s']:8.1f} images/s")

        volumes = []
        rng = np.random.default_rng(0)
        for i in range(args.volumes):
            data = rng.integers(-1024, 1500, (512, 512, 160), dtype=np.int16)
            path = work / f"ct{i}.nii"
            nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.0, 1.0])), str(path))
            volumes.append(path)
        cohort = load_manifest(manifest(work, volumes, "volume_path", {"label": 0}), "volume")
        spec = PreprocessSpec("volume", volume_shape=(224, 224, 128))
        prepared, cold = timed(lambda: prepare(cohort, spec, work / "cache"))
        list(training_dataset(prepared, "train", list(ShuffledBatches(len(volumes), 2, 1).shards())))  # warm-up
        batches = ShuffledBatches(len(volumes), 2, 10 * -(-len(volumes) // 2), seed=0)
        _, cached = timed(lambda: sum(int(e["images"].shape[0]) for e in
                                      training_dataset(prepared, "train", list(batches.shards()))))
        results["volume"] = {"source": "512×512×160 int16 NIfTI", "target": "224×224×128", "volumes": len(volumes),
                             "cold_volumes_per_s": len(volumes) / cold,
                             "cached_volumes_per_s": batches.steps * 2 / cached}
        print(f"CT volume {'':23s}: cold {len(volumes) / cold:7.2f} volumes/s, "
              f"cached {results['volume']['cached_volumes_per_s']:8.1f} volumes/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
