"""Peak host memory of loading a diffusers UNet folder, against the size of what it loads.

``diffusion_jax.pretrained.sd_unet.load_unet`` reads the safetensors weights one tensor at a time
and places each parameter as it is converted, so the host should need about one copy of the
parameters (in the dtype they are loaded in) plus the tensor in flight, on top of what Python, JAX
and the library take before anything is read. This script checks that claim: each load runs in a
fresh subprocess (so nothing the parent holds, such as a PyTorch model it just wrote, is counted),
which resets its peak-RSS counter after its imports, loads, and reports

    peak RSS = X GiB = params Y GiB + largest tensor Z GiB + baseline W GiB (+ residual R GiB)

where the peak is the kernel's VmHWM (``ru_maxrss`` where /proc is missing), the baseline the RSS
just before loading, the params the bytes of the loaded parameter tree and the largest tensor the
biggest one in the files as stored (what one read allocates). A thread sampling /proc also splits
the peak into anonymous memory and file-backed pages (the memory-mapped safetensors file).

    python benchmarks/load_memory.py --folder path/to/model            # a pipeline or unet/ folder
    python benchmarks/load_memory.py --folder DIR --dtype float32 bfloat16
    python benchmarks/load_memory.py --write-sd15 /tmp/sd15_unet --dtype float32 bfloat16 \
        --name load_memory_sd15_cpu

``--write-sd15 DIR`` first writes diffusers' UNet2DConditionModel with Stable Diffusion 1.5's
configuration (859,520,964 parameters) and random weights to DIR with ``save_pretrained`` (a
3.4 GB float32 safetensors file; it needs torch and diffusers, and about twice that in free
memory while writing), frees it, and then measures that folder. With ``--dtype bfloat16`` each
tensor is cast as it is read, so the parameters take half the bytes. Writes
``benchmarks/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import threading
import time

GIB = 1024 ** 3
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# The UNet of Stable Diffusion 1.5 (diffusers' defaults give the rest of its configuration).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
SD15_UNET_PARAMETERS = 859_520_964
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# -- the measurement (in the child process) ------------------------------------------------------

def _status() -> dict:
    """Fields of /proc/self/status in bytes ({} where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def _peak_rss() -> int:
    """The process's peak resident set size in bytes (VmHWM, else ru_maxrss)."""
    hwm = _status().get("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux: "5" > /proc/self/clear_refs); False if it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Samples RssAnon and RssFile every few milliseconds; keeps those at the largest total."""

    def __init__(self, interval=0.005):
        super().__init__(daemon=True)
        self.interval, self.stop, self.at_peak = interval, threading.Event(), {}

    def run(self):
        best = -1
        while not self.stop.is_set():
            status = _status()
            total = status.get("RssAnon", 0) + status.get("RssFile", 0) + status.get("RssShmem", 0)
            if total > best:
                best, self.at_peak = total, {k: status.get(k, 0) for k in
                                             ("RssAnon", "RssFile", "RssShmem")}
            time.sleep(self.interval)


def safetensors_tensors(folder) -> dict:
    """name -> (dtype, shape, bytes) of every tensor in the folder's safetensors files (headers)."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            tensors[key] = (info["dtype"], tuple(info["shape"]), end - begin)
    return tensors


def unet_folder(folder) -> str:
    """``folder`` itself if it holds a UNet's config.json, else its ``unet/`` subfolder."""
    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        return os.path.join(folder, "unet")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    raise SystemExit(f"load_memory.py: {folder} is neither a diffusers UNet folder (config.json "
                     "and safetensors weights) nor a pipeline folder with unet/ in it")


def measure_here(folder, dtype_name) -> dict:
    """Loads the UNet in ``folder`` in this process; returns what it cost (bytes)."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax.pretrained import sd_unet

    jax.devices()  # start the backend before the baseline
    gc.collect()
    reset = _reset_peak()
    before = _status()
    baseline = before.get("VmRSS") or _peak_rss()
    peak_before = _peak_rss()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    dtype = jnp.dtype(dtype_name)
    _, params, _ = sd_unet.load_unet(folder, dtype=dtype, param_dtype=dtype)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    peak = _peak_rss()
    after = _status()
    leaves = jax.tree_util.tree_leaves(params)
    stored = safetensors_tensors(folder)
    return {
        "folder": os.path.abspath(folder), "dtype": dtype_name, "load_s": seconds,
        "device": f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})",
        "jax": jax.__version__, "python": platform.python_version(),
        "parameters": int(sum(x.size for x in leaves)),
        "param_bytes": int(sum(x.nbytes for x in leaves)),
        "largest_param_bytes": int(max(x.nbytes for x in leaves)),
        "file_bytes": int(sum(b for _, _, b in stored.values())),
        "largest_tensor_bytes": int(max(b for _, _, b in stored.values())),
        "largest_tensor": max(stored, key=lambda k: stored[k][2]),
        "stored_dtypes": sorted({d for d, _, _ in stored.values()}),
        "baseline_bytes": int(baseline), "peak_before_bytes": int(peak_before),
        "peak_reset": reset, "peak_bytes": int(peak),
        "baseline_anon_bytes": int(before.get("RssAnon", 0)),
        "baseline_file_bytes": int(before.get("RssFile", 0)),
        "rss_after_bytes": int(after.get("VmRSS", 0)),
        "rss_after_file_bytes": int(after.get("RssFile", 0)),
        "at_peak_anon_bytes": int(sampler.at_peak.get("RssAnon", 0)),
        "at_peak_file_bytes": int(sampler.at_peak.get("RssFile", 0)),
    }


# -- the parent: write, spawn, report ------------------------------------------------------------

def _host_memory_gib():
    """The machine's memory (MemTotal) in GiB, or None where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None


def write_sd15_unet(folder) -> int:
    """Writes SD 1.5's UNet with random weights to ``folder``; returns its parameter count."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD15_UNET)
    count = sum(p.numel() for p in model.parameters())
    if count != SD15_UNET_PARAMETERS:
        raise SystemExit(f"load_memory.py: diffusers built {count:,} parameters for SD 1.5's "
                         f"UNet, expected {SD15_UNET_PARAMETERS:,}")
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    return count


def measure_in_subprocess(folder, dtype_name, timeout=1800) -> dict:
    """:func:`measure_here` in a fresh Python process (JAX on the CPU unless told otherwise)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-here", folder,
                          "--dtype", dtype_name], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if run.returncode != 0:
        raise SystemExit(f"load_memory.py: loading {folder} in {dtype_name} failed:\n"
                         + run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def decompose(row) -> dict:
    """The peak split into its parts, in GiB (adds the ``*_gib`` keys to ``row``)."""
    for key in ("peak", "param", "largest_tensor", "baseline", "at_peak_anon", "at_peak_file",
                "file", "rss_after"):
        row[f"{key}_gib"] = row[f"{key}_bytes"] / GIB
    row["residual_gib"] = (row["peak_gib"] - row["param_gib"] - row["largest_tensor_gib"]
                           - row["baseline_gib"])
    # File-backed pages that appeared during the load: the safetensors file, memory-mapped.
    row["mapped_file_gib"] = max(0, row["at_peak_file_bytes"] - row["baseline_file_bytes"]) / GIB
    row["other_residual_gib"] = row["residual_gib"] - row["mapped_file_gib"]
    return row


def summary_lines(row) -> list:
    """The peak as params + largest tensor + baseline (+ residual), and the residual's parts."""
    return [
        f"{row['dtype']}: peak RSS = {row['peak_gib']:.3f} GiB = params {row['param_gib']:.3f} "
        f"GiB + largest tensor {row['largest_tensor_gib']:.3f} GiB + baseline "
        f"{row['baseline_gib']:.3f} GiB (+ residual {row['residual_gib']:.3f} GiB)",
        f"    residual = {row['mapped_file_gib']:.3f} GiB of file pages mapped during the load "
        f"(the safetensors files, {row['file_gib']:.3f} GiB, memory-mapped by the reader) "
        f"{row['other_residual_gib']:+.3f} GiB other; anonymous memory at the peak "
        f"{row['at_peak_anon_gib']:.3f} GiB; RSS after loading {row['rss_after_gib']:.3f} GiB",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="a diffusers UNet folder, or a pipeline folder with unet/")
    parser.add_argument("--write-sd15", metavar="DIR",
                        help="first write SD 1.5's UNet (random weights) to DIR, then measure it")
    parser.add_argument("--dtype", nargs="+", default=["float32"],
                        choices=["float32", "bfloat16", "float16"],
                        help="the parameters' dtype, cast as each tensor is read")
    parser.add_argument("--name", default="load_memory", help="results file stem")
    parser.add_argument("--measure-here", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_here:  # the child: one load, its numbers as the last line of stdout
        print(json.dumps(measure_here(args.measure_here, args.dtype[0])))
        return
    if bool(args.folder) == bool(args.write_sd15):
        parser.error("give one of --folder DIR or --write-sd15 DIR")
    written = None
    if args.write_sd15:
        start = time.perf_counter()
        count = write_sd15_unet(args.write_sd15)
        written = {"parameters": count, "write_s": time.perf_counter() - start}
        print(f"wrote SD 1.5's UNet ({count:,} parameters) to {args.write_sd15} in "
              f"{written['write_s']:.0f} s")
    folder = unet_folder(args.folder or args.write_sd15)
    rows = [measure_in_subprocess(folder, dtype) for dtype in args.dtype]
    rows = [decompose(row) for row in rows]
    columns = ["dtype", "parameters", "load_s", "peak_gib", "param_gib", "largest_tensor_gib",
               "baseline_gib", "residual_gib", "mapped_file_gib", "at_peak_anon_gib"]
    print("  ".join(columns))
    for row in rows:
        print("  ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                        for c in columns))
    for row in rows:
        print("\n".join(summary_lines(row)))
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{args.name}.json")
    with open(path, "w") as f:
        json.dump({"device": rows[0]["device"], "jax": rows[0]["jax"],
                   "python": platform.python_version(), "folder": folder,
                   "host": {"cpus": os.cpu_count(), "memory_gib": _host_memory_gib()},
                   "written": written, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
