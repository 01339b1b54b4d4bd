"""bench_hlf.py -- events/s of HighLevelFeatures.CalculateFeatures on one core, and peak memory.

Synthetic, seeded showers for the CaloChallenge dataset-1 photon (368 voxels) and dataset-2 (6,480 voxels)
geometries: float32, exponential voxel energies, about 65% of the voxels zero (real showers are sparse).
BLAS and OpenMP are held to one thread (set before numpy is imported), so the numbers are for one core.
Each geometry is timed several times on the same in-memory array; the best run is reported, which is the
most repeatable figure on a shared machine. Prints one JSON object on stdout (keys fixed for outside checks):

    {"ds1_photons_events_per_s": ..., "ds2_events_per_s": ..., "peak_rss_mb": ...}

Usage:
    python bench/bench_hlf.py            # full: 200,000 ds1 / 10,000 ds2 events, 7 runs each
    python bench/bench_hlf.py --quick    # under a minute: 50,000 / 2,500 events, 5 runs each
    python bench/bench_hlf.py --hlf OLD/HighLevelFeatures.py   # time another revision of the module

The printed keys are listed in KEYS (numbers) and OTHER_KEYS below; tests/test_bench.py runs --quick and checks
every one of them is printed.
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"              # one core: before numpy (and its BLAS) is imported

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- configuration (defaults) ----------------------------------------------------------------
FULL = {"ds1_events": 200_000, "ds2_events": 10_000, "runs": 7}
QUICK = {"ds1_events": 50_000, "ds2_events": 2_500, "runs": 5}
ZERO_FRACTION = 0.65      # share of empty voxels
MEAN_ENERGY_MEV = 40.0    # mean of the exponential voxel energies
SEED = 1234


#: the keys of the printed JSON object (dotted = nested), checked by tests/test_bench.py on every --quick run:
#: KEYS hold numbers, OTHER_KEYS anything else (text, true/false, objects)
KEYS = ("ds1_photons_events_per_s", "ds2_events_per_s", "peak_rss_mb")
OTHER_KEYS = ()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, under 60 s")
    p.add_argument("--hlf", default=os.path.join(ROOT, "HighLevelFeatures.py"),
                   help="HighLevelFeatures.py to benchmark (default: the repository's)")
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args(argv)


def load_module(path):
    """Import a HighLevelFeatures.py from ``path`` (lets one compare revisions in a single run)."""
    spec = importlib.util.spec_from_file_location("hlf_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_showers(n_events, n_voxels, seed, chunk=5000):
    """Seeded float32 showers: exponential energies, ZERO_FRACTION of the voxels empty.

    Built in chunks so that the random-number temporaries do not dominate the peak memory.
    """
    rng = np.random.default_rng(seed)
    x = np.empty((n_events, n_voxels), dtype=np.float32)
    for i in range(0, n_events, chunk):
        block = x[i:i + chunk]
        rng.standard_exponential(block.shape, dtype=np.float32, out=block)
        block *= np.float32(MEAN_ENERGY_MEV)
        block[rng.random(block.shape, dtype=np.float32) < ZERO_FRACTION] = 0.0
    return x


def events_per_second(mod, xml, particle, showers, runs):
    """Best-of-``runs`` events/s of CalculateFeatures on ``showers`` (one warm-up call first)."""
    hlf = mod.HighLevelFeatures(particle, filename=xml)
    hlf.CalculateFeatures(showers[: min(len(showers), 1000)])
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        hlf.CalculateFeatures(showers)
        best = min(best, time.perf_counter() - t0)
    return len(showers) / best


def peak_rss_mb():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0   # bytes on macOS, KiB on Linux


def main(argv=None):
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    mod = load_module(args.hlf)
    binning = os.path.join(ROOT, "binning")
    result = {}
    for key, fname, particle, n_voxels, n_events in (
            ("ds1_photons_events_per_s", "binning_dataset_1_photons.xml", "photon", 368, cfg["ds1_events"]),
            ("ds2_events_per_s", "binning_dataset_2.xml", "electron", 6480, cfg["ds2_events"])):
        showers = synthetic_showers(n_events, n_voxels, args.seed)
        rate = events_per_second(mod, os.path.join(binning, fname), particle, showers, cfg["runs"])
        print(f"{key}: {rate:,.0f} events/s ({n_events} events, best of {cfg['runs']})", file=sys.stderr)
        result[key] = round(rate, 1)
        del showers
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
