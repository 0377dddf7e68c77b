"""The input path at hospital scale: prepare + Poisson loader, extrapolated to the paper's 153,502 radiographs.

The paper (UKA-CXR) trains on 153,502 chest radiographs at 512 px, logical batch 128, 150 epochs, DP-SGD
with Poisson sampling at q = 128/153,502. This benchmark builds a SYNTHETIC cohort of --images radiographs
and measures, on this machine, what that setting asks of the host:

1. generate: dpmedtf's own generator (``dpmedtf.data.synthetic.write_synthetic_cohort``) at --source-size px,
   in parallel chunks of one image per patient, merged into one manifest with every row in the train split
   (so the sampler's N is --images). It writes what it writes for radiographs: ~70 % 16-bit PNG, ~30 %
   uncompressed DICOM CR (12 bits stored, half of them MONOCHROME1); the counts are reported. Timed, not measured.
2. prepare: a job YAML (data.image_size 512, data.cache_dir, the shipped pipelines' dicom_decoder) run in a
   child process through ``load_config`` + ``training.job.prepare_data``, i.e. what ``dpmedtf train`` / ``run``
   do (``dpmedtf prepare`` calls the same ``cache.prepare``). Source files are evicted from the page cache
   first. Reported: images/s, CPU-seconds per image, GB on disk of the sources and of the cache, and peak
   memory of the preparing process (ru_maxrss of the child and its children; anonymous vs file-backed from
   /proc while it runs — the memory-mapped cache counts as file-backed RSS).
3. loader: the trainer's input path from the cache, exactly as ``trainer._fit`` builds it — ``plan_training``,
   ``sampler_for`` (``PoissonSampler``, expected batch 128 at q = 128/N, secret from ``RunSecret.fresh``),
   ``loop.distributed_epoch_dataset`` (``pipeline.training_dataset``: gather, uint8 → float32 3-channel
   model input; zipped with ``noise_inputs``) — iterated for --warmup then --steps steps in a child process.
   ``training_dataset`` fixes num_parallel_calls to AUTOTUNE, so parallelism is set by pinning the child to
   1 core and to every core (sched_setaffinity before TensorFlow starts). Runs: cold (the cache file evicted
   from the page cache, all cores) and warm (1 core, all cores).
4. GPU rate the loader must reach: --gpu-step-images-per-s, or derived from FLOPs: ResNet9's forward FLOPs at
   512 px counted from the trainer's network (conv + dense), ×3 for a training step, ×--dp-overhead for
   fast per-example clipping, against the FLOP/s an A100 achieves in a public TF32 ResNet-50 training figure
   (same counting on Keras' ResNet50). The --gpu-utilization share of TF32 peak is printed as an upper bound.
5. extrapolation to 153,502 images: preparation time, cache size, loader cores to feed the GPU, and the
   150 epochs' image reads; measured directly at the paper's N: the sampler's cost per step, and the host
   CPU that privacy.secure_rng's noise takes per step (only with that option).

Writes benchmarks/results/scale.json and scale.md. Not part of ``make test`` (``make bench-scale`` runs it).

  python benchmarks/scale.py [--images 20000] [--work DIR] [--keep] [--steps 40] [--warmup 5]
                             [--gpu-step-images-per-s R] [--dp-overhead 1.5] [--gen-workers N]
  python benchmarks/scale.py --images 200     # a quick check (~2 min); the full default takes ~30–40 min
Needs disk for the sources and the cache (≈ 0.7 MB per image at 512 px); the work directory is removed at
the end unless --keep (a kept one is reused: generation is skipped, preparation measured again).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).parent
PAPER = {"images": 153_502, "batch_size": 128, "epochs": 150, "image_size": 512,
         "source": "Tayebi Arasteh, Ziller et al., Commun Med 2024 (UKA-CXR training set)"}
MARKER = ".dpmedtf-scale-work"
# The public figure the GPU estimate is anchored on (FLOP/s an A100 really achieves on a ResNet in TensorFlow).
REFERENCE = {
    "images_per_s": 909.0,
    "model": "ResNet-50 v1.5 at 224 px (counted here as Keras ResNet50 v1; v1.5 costs ~5 % more)",
    "setting": "training, TF32 + XLA, batch 256 per GPU, 1× A100 40GB (DGX A100), TensorFlow 20.06 NGC container",
    "source": "NVIDIA/DeepLearningExamples TensorFlow/Classification/ConvNets/resnet50v1.5/README.md, "
              "'Training performance: NVIDIA DGX A100 (8x A100 40GB)'",
}
A100_TF32_PEAK_TFLOPS = 156.0  # dense TF32 tensor-core peak, NVIDIA A100 datasheet


# --- small helpers ------------------------------------------------------------------------------------

def say(text: str) -> None:
    print(text, flush=True)


class Progress:
    """Prints '  label: done/total (pct) elapsed, rate, ETA' every 5 % or 30 s, whichever comes first."""

    def __init__(self, label: str, total: int, unit: str = "images"):
        self.label, self.total, self.unit = label, total, unit
        self.start = time.perf_counter()
        self.last_print, self.last_fraction = self.start, -1.0

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        now = time.perf_counter()
        fraction = done / max(total, 1)
        if done < total and fraction < self.last_fraction + 0.05 and now - self.last_print < 30:
            return
        self.last_print, self.last_fraction = now, fraction
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        say(f"  {self.label}: {done}/{total} ({100 * fraction:.0f} %), {elapsed:.0f} s, {rate:.1f} {self.unit}/s"
            + (f", ETA {eta:.0f} s" if done < total else ""))


def disk_bytes(root: Path, suffixes: tuple[str, ...] | None = None) -> int:
    """Bytes allocated on disk (st_blocks) under ``root``, optionally only files with these suffixes."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if suffixes is None or name.endswith(suffixes):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux fincore), None when fincore is missing."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def evict(paths) -> None:
    """Drops files from the page cache (written back first): the next read comes from the disk."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(16 << 20):
            pass


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def load_average() -> float:
    return os.getloadavg()[0]


def gb(value: float) -> float:
    return value / 1e9


def duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return found


def _status_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def run_child(command: list[str]) -> dict:
    """Runs a child (its output goes straight to this console), sampling the RSS of it and its descendants."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    peak = {"rss": 0, "anon": 0, "file": 0}
    while process.poll() is None:
        totals = {"rss": 0, "anon": 0, "file": 0}
        for pid in _descendants(process.pid):
            status = _status_kb(pid)
            totals["rss"] += status.get("VmRSS", 0)
            totals["anon"] += status.get("RssAnon", 0)
            totals["file"] += status.get("RssFile", 0) + status.get("RssShmem", 0)
        peak = {k: max(peak[k], totals[k]) for k in peak}
        time.sleep(0.2)
    if process.returncode:
        raise SystemExit(f"child failed ({process.returncode}): {' '.join(command)}")
    return {"wall_s": time.perf_counter() - start, "sampled_peak_rss_bytes": peak["rss"] * 1024,
            "sampled_peak_anon_bytes": peak["anon"] * 1024, "sampled_peak_file_bytes": peak["file"] * 1024}


# --- 1. the synthetic cohort --------------------------------------------------------------------------

def _generate_part(out: str, images: int, source_size: int, seed: int) -> tuple[str, int]:
    from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort

    write_synthetic_cohort(out, SyntheticCohortSpec(patients=images, max_images_per_patient=1,
                                                    image_size=source_size, seed=seed))
    return out, images


def generate(cohort: Path, images: int, source_size: int, workers: int, chunk: int, seed: int) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import pandas as pd

    from dpmedtf.data.synthetic import NOTICE

    cohort.mkdir(parents=True, exist_ok=True)
    parts = [(cohort / f"part-{i:04d}", min(chunk, images - i * chunk)) for i in range(math.ceil(images / chunk))]
    progress = Progress("generating", images)
    start, done = time.perf_counter(), 0
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_generate_part, str(path), n, source_size, seed * 100_003 + i)
                   for i, (path, n) in enumerate(parts)]
        for future in as_completed(futures):
            done += future.result()[1]
            progress(done)
    seconds = time.perf_counter() - start
    frames = []
    for path, _ in parts:
        frame = pd.read_csv(path / "radiographs.csv", dtype=str, keep_default_na=False)
        frame["image_path"] = path.name + "/" + frame["image_path"]
        frame["patient_id"] = path.name + "-" + frame["patient_id"]  # patient IDs restart in every chunk
        frames.append(frame)
    merged = pd.concat(frames, ignore_index=True)
    merged["split"] = "train"  # the sampler's N is the whole cohort, as the paper's 153,502 is its training set
    merged.to_csv(cohort / "radiographs.csv", index=False)
    (cohort / "SYNTHETIC.txt").write_text(NOTICE + "\n")
    return {"seconds": seconds, "images_per_s": images / seconds, "workers": workers, "reused": False}


def cohort_facts(cohort: Path) -> dict:
    import pandas as pd

    frame = pd.read_csv(cohort / "radiographs.csv", dtype=str, keep_default_na=False)
    kinds = frame["image_path"].str.rsplit(".", n=1).str[-1].value_counts().to_dict()
    source = disk_bytes(cohort, (".png", ".dcm"))
    return {"images": len(frame), "files_by_type": kinds, "source_bytes": source,
            "source_bytes_per_image": source / max(len(frame), 1)}


# --- the job a user would run -------------------------------------------------------------------------

def write_job(work: Path, image_size: int, dicom_decoder: str, steps: int) -> Path:
    """A DP job on the cohort as a user would write it (pipelines/cxr_eps_sweep.yaml's per-image setting);
    training.steps is only the loader's planned length, and σ does not touch the input path."""
    job = work / "job.yaml"
    job.write_text(
        "# Written by benchmarks/scale.py: the paper's per-image DP setting on the SYNTHETIC cohort.\n"
        "name: scale-benchmark\n"
        "data:\n"
        f"  manifest: {work / 'cohort' / 'radiographs.csv'}\n"
        "  modality: radiograph\n"
        f"  image_size: {image_size}\n"
        f"  dicom_decoder: {dicom_decoder}\n"
        f"  cache_dir: {work / 'cache'}\n"
        "privacy:\n"
        "  noise_multiplier: 1.0\n"
        "  delta: 6.0e-6\n"
        "  clip_norm: 1.5\n"
        "  unit: image\n"
        "training:\n"
        f"  batch_size: {PAPER['batch_size']}\n"
        f"  steps: {steps}\n")
    return job


# --- 2. prepare (child) ---------------------------------------------------------------------------------

def child_prepare(job: Path, result: Path) -> None:
    started = time.perf_counter()
    from dpmedtf.config import load_config
    from dpmedtf.training.job import prepare_data

    config = load_config(job)
    imported = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF)
    first: list[float] = []
    progress = Progress("preparing", 0)

    def advance(done: int, total: int) -> None:
        if not first:
            first.append(time.perf_counter())
        progress(done, total)

    start = time.perf_counter()
    prepared = prepare_data(config, job.parent / "run", progress=advance)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.write_text(json.dumps({
        "seconds": seconds, "startup_s": imported - started,
        "before_first_image_s": (first[0] - start) if first else None,
        "images": int(prepared.array.shape[0]), "quarantined": len(prepared.quarantine),
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "maxrss_bytes": after.ru_maxrss * 1024, "children_maxrss_bytes": children.ru_maxrss * 1024,
        "cache_file": str(prepared.directory / "data.npy"), "spec": prepared.spec.as_dict()}))


# --- 3. loader (child) ----------------------------------------------------------------------------------

def forward_flops(model) -> dict:
    """2 × multiply-adds of every Conv2D and Dense layer (normalisation, activations, pooling left out)."""
    import tensorflow as tf

    total, by_kind = 0, {"conv": 0, "dense": 0}
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            kh, kw = layer.kernel_size
            in_channels = int(layer.input.shape[-1]) // layer.groups
            flops = 2 * height * width * kh * kw * in_channels * out_channels
            by_kind["conv"] += flops
        elif isinstance(layer, tf.keras.layers.Dense):
            flops = 2 * int(layer.input.shape[-1]) * layer.units
            by_kind["dense"] += flops
        else:
            continue
        total += flops
    return {"total": total, **by_kind}


def child_loader(job: Path, cores: int, warmup: int, steps: int, result: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    os.sched_setaffinity(0, cpus)  # before TensorFlow sizes its thread pools
    import numpy as np
    import tensorflow as tf

    from dpmedtf.config import load_config
    from dpmedtf.data.pipeline import split_rows
    from dpmedtf.privacy.randomness import RunSecret
    from dpmedtf.training.distribution import strategy_for
    from dpmedtf.training.job import prepare_data
    from dpmedtf.training.loop import distributed_epoch_dataset
    from dpmedtf.training.network import build_network
    from dpmedtf.training.noise_inputs import noise_inputs
    from dpmedtf.training.plan import plan_training, sampler_for

    config = load_config(job)
    prepared = prepare_data(config, job.parent / "run")  # the cache is complete: this finds it
    plan = plan_training(config, prepared)
    secret = RunSecret.fresh()  # a new run's secret, as trainer.train draws it
    strategy = strategy_for(config.training)
    labels = prepared.cohort.labels(prepared.cohort.frame.loc[split_rows(prepared, "train")])
    with strategy.scope():
        network = build_network(config, prepared, labels.shape[1])
    sampler = sampler_for(config, plan, prepared, secret)
    noise = functools.partial(noise_inputs, secret=secret, variables=network.trainable_variables,
                              mechanism=plan.mechanism, secure_rng=config.privacy.secure_rng)
    total = warmup + steps
    start = time.perf_counter()
    dataset = distributed_epoch_dataset(strategy, sampler, prepared, range(0, total),
                                        augment=bool(config.training.augment), seed=config.training.seed,
                                        volume_channels=1, noise=noise)
    build_s = time.perf_counter() - start
    iterator = iter(dataset)
    sizes, step_s = [], []
    shape = dtype = None
    for step in range(total):
        if step == warmup:
            cpu_before = resource.getrusage(resource.RUSAGE_SELF)
            measured_start = time.perf_counter()
        tick = time.perf_counter()
        element = next(iterator)
        images = element["images"]
        sizes.append(int(images.shape[0]))
        step_s.append(time.perf_counter() - tick)
        shape, dtype = list(images.shape[1:]), images.dtype.name
    seconds = time.perf_counter() - measured_start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    # Which reads of the measured steps hit rows no earlier step had read (cold, after an eviction).
    seen: set[int] = set()
    first_reads = reads = 0
    for step in range(total):
        rows = set(sampler.indices(step).tolist())
        if step >= warmup:
            reads += len(rows)
            first_reads += len(rows - seen)
        seen |= rows
    measured = sum(sizes[warmup:])
    result.write_text(json.dumps({
        "cores": len(cpus), "cpus": cpus, "warmup_steps": warmup, "steps": steps,
        "dataset_size": plan.dataset_size, "expected_batch": plan.batch_size, "sampling_rate": plan.sampling_rate,
        "images": measured, "seconds": seconds, "images_per_s": measured / seconds, "batches_per_s": steps / seconds,
        "mean_batch": float(np.mean(sizes[warmup:])), "min_batch": min(sizes[warmup:]), "max_batch": max(sizes[warmup:]),
        "step_s_median": float(np.median(step_s[warmup:])), "step_s_max": float(np.max(step_s[warmup:])),
        "first_step_s": step_s[0], "dataset_build_s": build_s,
        "cpu_s": (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
        "first_read_fraction": first_reads / max(reads, 1),
        "model_input": {"shape": shape, "dtype": dtype},
        "maxrss_bytes": cpu_after.ru_maxrss * 1024,
        "network": {"parameters": int(sum(np.prod(v.shape) for v in network.trainable_variables)),
                    "variable_sizes": [int(np.prod(v.shape)) for v in network.trainable_variables],
                    "input_shape": list(network.input_shape[1:]), "forward_flops": forward_flops(network)},
        "tensorflow": tf.__version__}))


# --- 4./5. GPU rate, sampler at the paper's N, extrapolation --------------------------------------------

def reference_flops() -> int:
    import tensorflow as tf

    model = tf.keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    flops = forward_flops(model)["total"]
    del model
    tf.keras.backend.clear_session()
    return flops


def sampler_at_paper_scale(steps: int) -> dict:
    """The sampler's own cost per step at N = 153,502: a ChaCha20 uniform per image, compared with q."""
    from dpmedtf.data.sampling import PoissonSampler
    from dpmedtf.privacy.accounting import steps_for_epochs
    from dpmedtf.privacy.randomness import RunSecret

    total_steps = steps_for_epochs(PAPER["images"], PAPER["batch_size"], PAPER["epochs"])
    sampler = PoissonSampler(PAPER["images"], PAPER["batch_size"], total_steps, RunSecret.fresh())
    start = time.perf_counter()
    shards = list(sampler.shards(0, steps))
    seconds = time.perf_counter() - start
    sizes = [len(s.indices) for s in shards]
    per_step = seconds / steps
    return {"steps_timed": steps, "ms_per_step": 1e3 * per_step, "mean_batch": sum(sizes) / len(sizes),
            "epoch_list_s": per_step * PAPER["images"] / PAPER["batch_size"], "total_steps": total_steps,
            "all_epochs_s": per_step * total_steps}


def secure_noise_cost(variable_sizes: list[int], repeats: int = 2) -> dict:
    """privacy.secure_rng: the noise of one step drawn on the host (only with that option)."""
    from dpmedtf.privacy.randomness import RunSecret

    secret = RunSecret.fresh()
    secret.secure_gaussian("noise", 0, variable_sizes[:1], 1.0)
    start = time.perf_counter()
    for step in range(repeats):
        secret.secure_gaussian("noise", step, variable_sizes, 1.0)
    return {"s_per_step": (time.perf_counter() - start) / repeats, "values": int(sum(variable_sizes))}


def gpu_rate(args, network: dict, reference_forward: int) -> dict:
    forward = network["forward_flops"]["total"]
    step_flops = 3 * forward * args.dp_overhead  # forward + backward (≈ 2× forward), × fast clipping's overhead
    achieved = REFERENCE["images_per_s"] * 3 * reference_forward
    derived = achieved / step_flops
    optimistic = A100_TF32_PEAK_TFLOPS * 1e12 * args.gpu_utilization / step_flops
    chosen = args.gpu_step_images_per_s or derived
    return {"resnet9_forward_gflops": forward / 1e9, "resnet50_forward_gflops": reference_forward / 1e9,
            "dp_overhead": args.dp_overhead, "dp_step_gflops_per_image": step_flops / 1e9,
            "reference": REFERENCE, "achieved_tflops": achieved / 1e12,
            "achieved_share_of_tf32_peak": achieved / (A100_TF32_PEAK_TFLOPS * 1e12),
            "derived_images_per_s": derived, "tf32_peak_tflops": A100_TF32_PEAK_TFLOPS,
            "utilization_upper_bound": args.gpu_utilization, "upper_bound_images_per_s": optimistic,
            "images_per_s": chosen, "given": args.gpu_step_images_per_s is not None,
            "host_to_device_gb_per_s": chosen * math.prod(network["input_shape"]) * 4 / 1e9}


def extrapolate(args, facts: dict, prep: dict, loaders: dict, gpu: dict, sampler: dict, secure: dict) -> dict:
    n, paper_n = facts["images"], PAPER["images"]
    epochs_reads = PAPER["epochs"] * paper_n
    cache_per_image = prep["cache_bytes"] / n
    one, every, cold = loaders["warm-1"], loaders[f"warm-{loaders['all_cores']}"], loaders["cold"]
    cpu_per_loaded_image = every["cpu_s"] / every["images"]
    target = gpu["images_per_s"]
    memory = meminfo("MemTotal")
    real_size = None
    try:
        measured = json.loads((HERE / "results" / "data_pipeline.json").read_text())["radiograph"]
        key = f"dicom ({args.dicom_decoder})"
        if key in measured:
            rate = measured[key]["cold_images_per_s"]
            real_size = {"source": measured[key]["source"], "decoder": args.dicom_decoder,
                         "images_per_s_this_machine": rate, "hours_this_machine": paper_n / rate / 3600,
                         "from": "benchmarks/results/data_pipeline.json"}
    except (OSError, KeyError, ValueError):
        pass
    return {
        "images": paper_n,
        "prepare_hours_this_machine": paper_n * prep["seconds"] / n / 3600,
        "prepare_cpu_s_per_image": prep["cpu_s"] / n,
        "prepare_core_hours": paper_n * prep["cpu_s"] / n / 3600,
        "prepare_hours_on_server_cores": paper_n * prep["cpu_s"] / n / 3600 / args.server_cores,
        "server_cores": args.server_cores,
        "prepare_real_size_sources": real_size,
        "source_gb_at_synthetic_size": gb(paper_n * facts["source_bytes_per_image"]),
        "cache_gb": gb(paper_n * cache_per_image),
        "cache_fits_in_this_machines_ram": paper_n * cache_per_image < memory,
        "ram_gb": gb(memory),
        "gpu_images_per_s": target,
        "loader_images_per_s_per_core": one["images_per_s"],
        "loader_cores_needed_by_rate": target / one["images_per_s"],
        "loader_cpu_s_per_image": cpu_per_loaded_image,
        "loader_cores_needed_by_cpu_time": target * cpu_per_loaded_image,
        "loader_cold_images_per_s": cold["images_per_s"],
        "loader_cold_first_read_fraction": cold["first_read_fraction"],
        "cache_read_mb_per_s_needed": target * cache_per_image / 1e6,
        "secure_rng_cores_needed": secure["s_per_step"] * target / PAPER["batch_size"],
        "steps": sampler["total_steps"],
        "image_reads_150_epochs": epochs_reads,
        "cache_read_tb_150_epochs": epochs_reads * cache_per_image / 1e12,
        "model_input_tb_150_epochs": epochs_reads * math.prod(one["model_input"]["shape"]) * 4 / 1e12,
        "gpu_hours_150_epochs": epochs_reads / target / 3600,
        "loader_hours_150_epochs_this_machine": epochs_reads / every["images_per_s"] / 3600,
        "sampler_s_150_epochs": sampler["all_epochs_s"],
    }


# --- report -----------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    f, g, p = results["cohort"], results["generation"], results["prepare"]
    gpu, x, sampler = results["gpu"], results["extrapolation"], results["sampler_at_paper_n"]
    loaders = results["loader"]
    n = f["images"]
    lines = [
        f"Input path at hospital scale, measured on this machine ({results['machine']['cpus']} cores, "
        f"{results['machine']['ram_gb']:.0f} GB RAM, load average {results['machine']['load_average_start']:.1f} at the "
        f"start) on a SYNTHETIC cohort of {n:,} radiographs ({f['source_size']} px sources: "
        + ", ".join(f"{count:,} {kind.upper()}" for kind, count in sorted(f["files_by_type"].items()))
        + f") prepared at {p['image_size']} px; extrapolated to the paper's {PAPER['images']:,} images.",
        "",
        "| stage | measured |",
        "|---|---|",
        "| generate (not measured, for the record) | "
        + ("reused from a kept --work |" if g["reused"] else
           f"{g['seconds']:.0f} s, {g['images_per_s']:.1f} images/s on {g['workers']} processes |"),
        f"| sources on disk | {gb(f['source_bytes']):.2f} GB ({f['source_bytes_per_image'] / 1e6:.2f} MB/image) |",
        f"| prepare (`prepare_data`, {p['dicom_decoder']} for DICOM, child process, sources evicted from the page "
        f"cache) | {p['images_per_s']:.1f} images/s "
        f"({p['seconds']:.0f} s; {p['before_first_image_s']:.1f} s of it digests + header checks before the first "
        f"image), {p['cpu_s_per_image'] * 1e3:.0f} CPU-ms/image |",
        f"| cache on disk | {gb(p['cache_bytes']):.2f} GB ({p['cache_bytes'] / n / 1e3:.0f} kB/image) |",
        f"| prepare peak memory (ru_maxrss, process + children) | {gb(p['maxrss_bytes']):.2f} GB; sampled: anonymous "
        f"{gb(p['sampled_peak_anon_bytes']):.2f} GB, file-backed {gb(p['sampled_peak_file_bytes']):.2f} GB |",
    ]
    for name, run in loaders["runs"].items():
        lines.append(
            f"| loader {name} ({run['cores']} core{'s' if run['cores'] > 1 else ''}, AUTOTUNE) | "
            f"{run['images_per_s']:.0f} images/s, {run['batches_per_s']:.2f} batches/s (mean batch "
            f"{run['mean_batch']:.1f}, {run['steps']} steps after {run['warmup_steps']}), "
            f"{run['cpu_s'] / run['images'] * 1e3:.1f} CPU-ms/image, peak RSS {gb(run['maxrss_bytes']):.2f} GB, "
            f"{100 * run['first_read_fraction']:.0f} % first reads, load average {run['load_average']:.1f} |")
    lines += [
        f"| model input per step | {loaders['model_input']['dtype']} {'×'.join(map(str, loaders['model_input']['shape']))} "
        f"per image, {PAPER['batch_size'] * math.prod(loaders['model_input']['shape']) * 4 / 1e6:.0f} MB per batch of "
        f"{PAPER['batch_size']} |",
        f"| sampler at N = {PAPER['images']:,} (PoissonSampler, ChaCha20) | {sampler['ms_per_step']:.2f} ms/step; "
        f"an epoch's shards listed up front in {sampler['epoch_list_s']:.1f} s |",
        f"| secure_rng noise (only with privacy.secure_rng) | {results['secure_rng']['s_per_step']:.2f} s/step on one core |",
        "",
        f"GPU rate to feed (ResNet9, {p['image_size']} px, B = {PAPER['batch_size']}, DP): "
        + (f"{gpu['images_per_s']:.0f} images/s (given)." if gpu["given"] else
           f"{gpu['images_per_s']:.0f} images/s, derived: ResNet9 forward {gpu['resnet9_forward_gflops']:.2f} GFLOP/image "
           f"(conv + dense, counted from the network) × 3 (training) × {gpu['dp_overhead']:g} (fast clipping) = "
           f"{gpu['dp_step_gflops_per_image']:.1f} GFLOP/image, against the {gpu['achieved_tflops']:.1f} TFLOP/s "
           f"({100 * gpu['achieved_share_of_tf32_peak']:.0f} % of TF32 peak) an A100 achieves in NVIDIA's TF32 ResNet-50 "
           f"training figure ({REFERENCE['images_per_s']:.0f} images/s × 3 × {gpu['resnet50_forward_gflops']:.2f} GFLOP). "
           f"At {100 * gpu['utilization_upper_bound']:.0f} % of TF32 peak it would be {gpu['upper_bound_images_per_s']:.0f} "
           "images/s (upper bound)."),
        "",
        f"Extrapolated to {PAPER['images']:,} images: preparation takes {duration(x['prepare_hours_this_machine'])} on "
        f"this machine ({x['prepare_core_hours']:.1f} core-hours, {duration(x['prepare_hours_on_server_cores'])} on "
        f"{x['server_cores']} cores if it scales with cores) for {f['source_size']} px sources"
        + (f"; real-size CRs ({x['prepare_real_size_sources']['source']}, {x['prepare_real_size_sources']['decoder']}) "
           f"measured {x['prepare_real_size_sources']['images_per_s_this_machine']:.0f} images/s here "
           f"→ {duration(x['prepare_real_size_sources']['hours_this_machine'])}" if x["prepare_real_size_sources"] else "")
        + f". The cache holds {x['cache_gb']:.1f} GB "
        + ("(fits in this machine's RAM)" if x["cache_fits_in_this_machines_ram"] else
           f"(more than this machine's {x['ram_gb']:.0f} GB RAM, so training reads it from disk: "
           f"{x['cache_read_mb_per_s_needed']:.0f} MB/s of random {p['cache_bytes'] / n / 1e3:.0f} kB reads at the GPU rate; "
           + (f"the loader measured {x['loader_cold_images_per_s']:.0f} images/s from an evicted cache here, "
              f"{100 * x['loader_cold_first_read_fraction']:.0f} % of its reads first reads)"
              if x["loader_cold_first_read_fraction"] >= 0.5 else
              f"a cold-read rate is not measurable at N = {n:,}: only {100 * x['loader_cold_first_read_fraction']:.0f} % "
              "of the cold run's reads were first reads)"))
        + f"; the sources {x['source_gb_at_synthetic_size']:.0f} GB at the synthetic size. Feeding "
        f"{x['gpu_images_per_s']:.0f} images/s takes {x['loader_cores_needed_by_rate']:.1f} loader cores at the measured "
        f"{x['loader_images_per_s_per_core']:.0f} images/s per core ({x['loader_cores_needed_by_cpu_time']:.1f} by CPU "
        f"time per image), plus {x['secure_rng_cores_needed']:.1f} cores for secure_rng noise if enabled. 150 epochs "
        f"are {x['steps']:,} steps and {x['image_reads_150_epochs'] / 1e6:.1f} M image reads: "
        f"{x['cache_read_tb_150_epochs']:.1f} TB from the cache and {x['model_input_tb_150_epochs']:.0f} TB of float32 "
        f"model input to the GPU ({gpu['host_to_device_gb_per_s']:.1f} GB/s at the GPU rate), "
        f"{x['gpu_hours_150_epochs']:.0f} GPU-hours at {x['gpu_images_per_s']:.0f} images/s "
        f"(this machine's loader alone would need {x['loader_hours_150_epochs_this_machine']:.0f} h); the sampler's "
        f"own draws add {x['sampler_s_150_epochs'] / 60:.0f} min over the run.",
    ]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------------

def prepare_work(path: Path | None) -> Path:
    if path is None:
        work = Path(tempfile.mkdtemp(prefix="dpmedtf-scale-"))
    else:
        work = path.resolve()
        if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
            raise SystemExit(f"{work} exists and is not a work directory of this benchmark; give an empty or new --work")
        work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="synthetic radiographs (default 20,000)")
    parser.add_argument("--work", type=Path, help="work directory (default: a new one under the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (cohort, cache)")
    parser.add_argument("--source-size", type=int, default=512, help="side of the generated source images (px)")
    parser.add_argument("--image-size", type=int, default=PAPER["image_size"], help="data.image_size of the job")
    parser.add_argument("--dicom-decoder", default="pydicom", choices=["pydicom", "tensorflow-io"],
                        help="data.dicom_decoder (default pydicom, as the shipped pipelines/cxr*.yaml)")
    parser.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=250, help="images per generator call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=5, help="loader steps before measuring")
    parser.add_argument("--steps", type=int, default=40, help="loader steps measured (≥ 30)")
    parser.add_argument("--gpu-step-images-per-s", type=float,
                        help="the GPU's DP training rate to feed (default: derived from FLOPs, printed)")
    parser.add_argument("--dp-overhead", type=float, default=1.5, help="fast clipping's step cost ÷ non-private")
    parser.add_argument("--gpu-utilization", type=float, default=0.4, help="share of TF32 peak for the upper bound")
    parser.add_argument("--server-cores", type=int, default=32, help="cores of the preparing server in the extrapolation")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    parser.add_argument("--child", choices=["prepare", "loader"], help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "prepare":
        return child_prepare(args.job, args.result)
    if args.child == "loader":
        return child_loader(args.job, args.cores, args.warmup, args.steps, args.result)
    if args.steps < 30:
        parser.error("--steps must be ≥ 30")
    if args.images < PAPER["batch_size"]:
        parser.error(f"--images must be ≥ the batch size {PAPER['batch_size']}")

    cpus = len(os.sched_getaffinity(0))
    work = prepare_work(args.work)
    estimate = args.images * (0.6e6 * (args.source_size / 512) ** 2 + args.image_size ** 2)
    free = shutil.disk_usage(work).free
    if free < 1.2 * estimate:
        raise SystemExit(f"{work}: {gb(free):.1f} GB free, the cohort and cache need ≈ {gb(estimate):.1f} GB")
    results = {"machine": {"cpus": cpus, "ram_gb": gb(meminfo("MemTotal")), "load_average_start": load_average()},
               "paper": PAPER, "work": str(work)}
    say(f"work directory {work} ({gb(free):.0f} GB free, ≈ {gb(estimate):.1f} GB needed); {cpus} cores, "
        f"load average {load_average():.1f}")
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        # 1. cohort
        cohort = work / "cohort"
        manifest = cohort / "radiographs.csv"
        reuse = manifest.is_file() and sum(1 for _ in manifest.open()) - 1 == args.images
        if reuse:
            say(f"[1/5] reusing the synthetic cohort in {cohort}")
            generation = {"seconds": None, "images_per_s": None, "workers": None, "reused": True}
        else:
            if cohort.exists():
                shutil.rmtree(cohort)
            say(f"[1/5] generating {args.images:,} SYNTHETIC radiographs at {args.source_size} px "
                f"({args.gen_workers} processes)")
            generation = generate(cohort, args.images, args.source_size, args.gen_workers, args.chunk, args.seed)
        facts = {**cohort_facts(cohort), "source_size": args.source_size}
        say(f"      {facts['images']:,} files {facts['files_by_type']}, {gb(facts['source_bytes']):.2f} GB"
            + ("" if generation["reused"] else f"; generation {generation['seconds']:.0f} s"))
        results["generation"], results["cohort"] = generation, facts

        # 2. prepare
        job = write_job(work, args.image_size, args.dicom_decoder, args.warmup + args.steps)
        shutil.rmtree(work / "cache", ignore_errors=True)  # measure a first preparation, digests included
        evict(str(p) for p in cohort.rglob("*") if p.suffix in (".png", ".dcm"))
        say(f"[2/5] preparing {facts['images']:,} images at {args.image_size} px (prepare_data in a child process; "
            f"load average {load_average():.1f})")
        outcome = work / "prepare.json"
        sampled = run_child([*me, "--child", "prepare", "--job", str(job), "--result", str(outcome)])
        prep = {**json.loads(outcome.read_text()), **sampled}
        cache_file = Path(prep["cache_file"])
        prep.update({"image_size": args.image_size, "dicom_decoder": args.dicom_decoder,
                     "images_per_s": prep["images"] / prep["seconds"], "cpu_s_per_image": prep["cpu_s"] / prep["images"],
                     "cache_bytes": disk_bytes(cache_file.parent), "cache_file_bytes": cache_file.stat().st_size,
                     "maxrss_bytes": max(prep["maxrss_bytes"], prep["children_maxrss_bytes"])})
        say(f"      {prep['images_per_s']:.1f} images/s ({prep['seconds']:.0f} s, {prep['cpu_s_per_image'] * 1e3:.0f} "
            f"CPU-ms/image); cache {gb(prep['cache_bytes']):.2f} GB; peak RSS {gb(prep['maxrss_bytes']):.2f} GB "
            f"(anonymous {gb(prep['sampled_peak_anon_bytes']):.2f} GB)")
        results["prepare"] = prep

        # 3. loader
        say(f"[3/5] loader: Poisson batches of expected size {PAPER['batch_size']} at q = {PAPER['batch_size']}/"
            f"{facts['images']}, {args.warmup} + {args.steps} steps per run")
        runs = {}
        for name, cores, cold in (("cold", cpus, True), ("warm-1", 1, False), (f"warm-{cpus}", cpus, False)):
            if cold:
                evict([cache_file])
            elif cache_file.stat().st_size < 0.5 * meminfo("MemAvailable"):
                read_through(cache_file)
            resident = resident_bytes(cache_file)
            say(f"  run {name}: {cores} core(s), cache {'evicted' if cold else 'read into page cache'}"
                + (f" ({gb(resident):.2f} of {gb(cache_file.stat().st_size):.2f} GB resident)" if resident is not None else ""))
            outcome = work / f"loader-{name}.json"
            sampled = run_child([*me, "--child", "loader", "--job", str(job), "--cores", str(cores), "--warmup",
                                 str(args.warmup), "--steps", str(args.steps), "--result", str(outcome)])
            run = {**json.loads(outcome.read_text()), **sampled, "resident_before_bytes": resident,
                   "load_average": load_average()}
            say(f"      {run['images_per_s']:.0f} images/s, {run['batches_per_s']:.2f} batches/s (mean batch "
                f"{run['mean_batch']:.1f}, median step {run['step_s_median'] * 1e3:.0f} ms), "
                f"{run['cpu_s'] / run['images'] * 1e3:.1f} CPU-ms/image, peak RSS {gb(run['maxrss_bytes']):.2f} GB")
            runs[name] = run
        network = runs["cold"]["network"]
        results["loader"] = {"runs": {k: {key: v for key, v in r.items() if key != "network"} for k, r in runs.items()},
                             "model_input": runs["cold"]["model_input"], "network": {
                                 k: v for k, v in network.items() if k != "variable_sizes"}}

        # 4. GPU rate, sampler and secure noise at the paper's scale
        say("[4/5] GPU rate (FLOPs), sampler at the paper's N, secure_rng noise")
        gpu = gpu_rate(args, network, reference_flops())
        say(f"      ResNet9 at {args.image_size} px: forward {gpu['resnet9_forward_gflops']:.2f} GFLOP/image "
            f"(conv {network['forward_flops']['conv'] / 1e9:.2f}, dense {network['forward_flops']['dense'] / 1e9:.6f}); "
            f"× 3 (training) × {args.dp_overhead:g} (fast clipping) = {gpu['dp_step_gflops_per_image']:.1f} GFLOP/image")
        say(f"      A100 reference: {REFERENCE['images_per_s']:.0f} images/s × 3 × {gpu['resnet50_forward_gflops']:.2f} "
            f"GFLOP (ResNet-50) = {gpu['achieved_tflops']:.1f} TFLOP/s achieved "
            f"({100 * gpu['achieved_share_of_tf32_peak']:.1f} % of {A100_TF32_PEAK_TFLOPS:.0f} TFLOP/s TF32 peak)")
        say(f"      → {gpu['derived_images_per_s']:.0f} images/s derived; upper bound at "
            f"{100 * args.gpu_utilization:.0f} % of TF32 peak: {gpu['upper_bound_images_per_s']:.0f} images/s; "
            f"using {gpu['images_per_s']:.0f} images/s{' (given)' if gpu['given'] else ''}")
        sampler = sampler_at_paper_scale(200)
        say(f"      PoissonSampler at N = {PAPER['images']:,}: {sampler['ms_per_step']:.2f} ms/step "
            f"(mean batch {sampler['mean_batch']:.1f}); an epoch's shard list {sampler['epoch_list_s']:.1f} s")
        secure = secure_noise_cost(network["variable_sizes"])
        say(f"      secure_rng noise for {secure['values']:,} values: {secure['s_per_step']:.2f} s/step")
        results.update(gpu=gpu, sampler_at_paper_n=sampler, secure_rng=secure)

        # 5. extrapolation
        loaders_for_extrapolation = {**runs, "all_cores": cpus}
        results["extrapolation"] = extrapolate(args, facts, prep, loaders_for_extrapolation, gpu, sampler, secure)
        say("[5/5] extrapolation")
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
