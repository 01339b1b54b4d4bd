"""bench_bigfile.py -- evaluate.py on two dataset-3-shaped files (40500 voxels): wall time and peak memory.

Writes two synthetic CaloChallenge files with the dataset-3 voxelisation (full: 20k events each, 3.2 GB each as
float32; --quick: 500 events) chunk by chunk into a scratch folder (default under /tmp; the free space is checked
first), drops them from the page cache (posix_fadvise DONTNEED after fsync, so evaluate.py reads from disk), then
runs ``python evaluate.py -m hist -d 3`` twice as a subprocess: first with an empty reference cache (every file
read and all plots drawn), then again with the cache written by the first run. Peak RSS is measured two ways:
the largest single process of the run (``os.wait4`` in bench_evaluate's small launcher, so this process's own
size is not counted; it covers the workers evaluate.py reaped),
and the largest sum over the evaluate.py process tree sampled every 0.1 s from /proc. The issue's limit is
3 GiB; the script exits 1 (after printing the JSON) if a run goes over it. The files are deleted at the end
(unless --keep).

Showers: incident energy log-uniform 1 GeV .. 1 TeV; per voxel E * template * Exp(1) noise, where the template
is a smooth longitudinal x exp(-r) profile over the 45 layers (tests/evalutils.py); not physics, but the same
shape, dtype and size as the CaloChallenge dataset-3 files.

Prints one JSON object on stdout:
    {"ds3_events", "voxels", "file_gb", "generate_s", "evaluate_hist_s", "evaluate_hist_cached_s",
     "evaluate_peak_rss_mb", "evaluate_tree_peak_rss_mb", "evaluate_cached_peak_rss_mb", "rss_limit_mb",
     "rss_below_limit", "histograms"}

    python bench/bench_bigfile.py --quick
    python bench/bench_bigfile.py                      # 2 x 20k events, 6.5 GB on disk for a few minutes
    python bench/bench_bigfile.py --events 50000 --dir /scratch

The printed keys are listed in KEYS (numbers) and OTHER_KEYS below; tests/test_bench.py runs --quick and checks
every one of them is printed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_evaluate import LAUNCHER  # noqa: E402  (peak RSS of the command alone, not of this process)

RSS_LIMIT_MB = 3 * 1024.0
CHUNK_EVENTS = 250                 # events generated and written per block (40 MB of float32)


#: the keys of the printed JSON object (dotted = nested), checked by tests/test_bench.py on every --quick run:
#: KEYS hold numbers, OTHER_KEYS anything else (text, true/false, objects)
KEYS = ("ds3_events", "voxels", "file_gb", "generate_s", "evaluate_hist_s", "evaluate_hist_cached_s",
        "evaluate_peak_rss_mb", "evaluate_tree_peak_rss_mb", "evaluate_cached_peak_rss_mb", "rss_limit_mb",
        "histograms")
OTHER_KEYS = ("rss_below_limit",)


def write_ds3_file(path, n_events, seed):
    """A dataset-3-shaped CaloChallenge file written in chunks; returns its size in bytes."""
    import h5py

    import evalutils
    from HighLevelFeatures import dataset_geometry
    from plumbing import atomic_output

    geom = dataset_geometry("3")
    template = evalutils.template(geom).astype(np.float32)
    rng = np.random.default_rng(seed)
    einc = 10.0 ** rng.uniform(3.0, 6.0, n_events)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=einc.reshape(-1, 1))
            ds = f.create_dataset("showers", shape=(n_events, geom.n_voxels), dtype=np.float32)
            for i in range(0, n_events, CHUNK_EVENTS):
                e = einc[i:i + CHUNK_EVENTS].astype(np.float32)
                block = rng.standard_exponential((e.size, geom.n_voxels), dtype=np.float32)
                block *= template
                block *= e[:, None]
                ds[i:i + e.size] = block
        _drop_from_page_cache(tmp)
    return os.path.getsize(path)


def _drop_from_page_cache(path):
    """fsync, then ask the kernel to forget the file's cached pages (only this file's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _tree_rss_mb(root_pid):
    """Sum of the resident sets (MB) of ``root_pid`` and all its descendants, from /proc."""
    parents, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(name)
        parents[pid] = int(fields[1])
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    total = 0.0
    for pid in rss:
        p = pid
        while p > 1:
            if p == root_pid:
                total += rss[pid]
                break
            p = parents.get(p, 0)
    return total


def run_measured(cmd, env):
    """Run ``cmd``: (wall s, peak RSS MB of the largest single process, peak RSS MB of the whole tree)."""
    with tempfile.TemporaryFile() as errfile:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.DEVNULL, stderr=errfile,
                                env=env)
        peak = [0.0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
                except OSError:
                    pass
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        errfile.seek(0)
        err = errfile.read().decode(errors="replace").strip()
        if rc != 0 or not err:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}: {err[-800:]}")
        maxrss_kb = int(err.splitlines()[-1].split()[1])      # the launcher's last line: wall, maxrss, rc
    return wall, maxrss_kb / 1024.0, peak[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 events per file (< 60 s)")
    ap.add_argument("--events", type=int, default=None, help="events per file (default 20000, --quick 500)")
    ap.add_argument("--dir", default="/tmp", help="where the scratch folder goes (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (files and outputs)")
    args = ap.parse_args(argv)
    from HighLevelFeatures import DATASETS

    n = args.events or (500 if args.quick else 20000)
    voxels = DATASETS["3"][2]
    need = 2 * n * voxels * 4
    free = shutil.disk_usage(args.dir).free
    if free < 1.5 * need + 2**30:
        print(f"bench_bigfile: {args.dir} has {free / 2**30:.1f} GiB free; two {n}-event dataset-3 files need "
              f"{need / 2**30:.1f} GiB (+50% margin): use --dir or --events", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bench_bigfile_", dir=args.dir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg", PYTHONHASHSEED="0")
    try:
        t0 = time.perf_counter()
        gen, ref = os.path.join(work, "gen_ds3.h5"), os.path.join(work, "ref_ds3.h5")
        size = write_ds3_file(gen, n, 1) + write_ds3_file(ref, n, 2)
        generate_s = time.perf_counter() - t0
        out, cache = os.path.join(work, "eval"), os.path.join(work, "cache")
        cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "-i", gen, "-r", ref, "-m", "hist", "-d", "3",
               "--output_dir", out, "--cache_dir", cache]
        wall, rss, tree = run_measured(cmd, env)
        with open(os.path.join(out, "metrics.json")) as fh:
            metrics = json.load(fh)
        seps = list(metrics["separation_power"].values())
        if metrics["n_events"] != n or not seps or not all(np.isfinite(seps)):
            raise RuntimeError(f"{out}/metrics.json: unexpected content (n_events {metrics['n_events']})")
        wall_cached, rss_cached, tree_cached = run_measured(cmd, env)
        peak = max(rss, tree, rss_cached, tree_cached)
        result = {
            "ds3_events": n, "voxels": voxels, "file_gb": round(size / 2 / 1e9, 3),
            "generate_s": round(generate_s, 1),
            "evaluate_hist_s": round(wall, 1), "evaluate_hist_cached_s": round(wall_cached, 1),
            "evaluate_peak_rss_mb": round(rss, 1), "evaluate_tree_peak_rss_mb": round(tree, 1),
            "evaluate_cached_peak_rss_mb": round(max(rss_cached, tree_cached), 1),
            "rss_limit_mb": RSS_LIMIT_MB, "rss_below_limit": bool(peak < RSS_LIMIT_MB),
            "histograms": len(seps),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    if not result["rss_below_limit"]:
        print(f"bench_bigfile: peak RSS {peak:.0f} MB is above the {RSS_LIMIT_MB:.0f} MB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
