"""bench_summary.py -- wall time of summary.py over 78 slices (3 particles x 26 barrel slices) of synthetic results.

Each slice gets what the chain leaves behind: a held-out reference and a generated file (15 energies 2^8..2^22
MeV x N events, 368 float32 voxels, seeded), select/best.json, eval/metrics.json and two lwtnn JSON files.
summary.py is then run as a command (a fresh process: imports, streaming every file, the two PNGs and the tables),
as `make summary-now` would. Prints one JSON object on stdout:

    {"slices": 78, "events_per_file": ..., "input_mb": ..., "summary_s": ..., "summary_cpu_s": ..., "build_s": ...}

summary_s is wall time, summary_cpu_s the CPU time of the summary.py process (user + system): on a shared
machine the second is the one that does not depend on the other users.

Usage:
    python bench/bench_summary.py            # 300 events per energy (the 3x2 demo's EVENTS=300), 4500 per file
    python bench/bench_summary.py --quick    # 60 events per energy
    python bench/bench_summary.py --keep DIR # build into DIR and keep it

The printed keys are listed in KEYS (numbers) and OTHER_KEYS below; tests/test_bench.py runs --quick and checks
every one of them is printed.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plumbing import kinetic_energy, write_calo_file  # noqa: E402

PARTICLES = {"photon": 22, "electron": 11, "pion": 211}
ENERGIES = [2.0 ** k for k in range(8, 23)]
N_VOXELS = 368


#: the keys of the printed JSON object (dotted = nested), checked by tests/test_bench.py on every --quick run:
#: KEYS hold numbers, OTHER_KEYS anything else (text, true/false, objects)
KEYS = ("slices", "events_per_file", "input_mb", "summary_s", "summary_cpu_s", "build_s")
OTHER_KEYS = ("states",)


def showers(rng, einc, particle, scale):
    """Totals scale * E_kin * (1 + 0.05 N(0,1)) spread over the voxels with Dirichlet weights (float32)."""
    tot = scale * kinetic_energy(einc, particle) * (1.0 + 0.05 * rng.standard_normal(len(einc)))
    w = rng.dirichlet(np.full(N_VOXELS, 0.3), len(einc)).astype(np.float32)
    return np.abs(tot).astype(np.float32)[:, None] * w


def build(results, work, events, seed=1):
    """The 78 slice folders; returns the bytes of HDF5 written."""
    total = 0
    for k, (particle, pid) in enumerate(PARTICLES.items()):
        for j in range(26):
            name = f"{particle}_{0.05 * j:.2f}"
            rng = np.random.default_rng([seed, k, j])
            einc = np.repeat(ENERGIES, events)
            folder = os.path.join(results, name)
            for d in ("select", "eval", "lwtnn"):
                os.makedirs(os.path.join(folder, d), exist_ok=True)
            os.makedirs(os.path.join(work, name), exist_ok=True)
            ref = os.path.join(work, name, "voxels_heldout.h5")
            gen = os.path.join(folder, "select", "generated.h5")
            write_calo_file(ref, einc, showers(rng, einc, particle, 1.0))
            write_calo_file(gen, einc, showers(rng, einc, particle, 0.98))
            total += os.path.getsize(ref) + os.path.getsize(gen)
            with open(os.path.join(folder, "select", "best.json"), "w") as f:
                json.dump({"best_iteration": 1000 + j, "chi2_ndf": 2.0, "generated": gen,
                           "reference_for_evaluate": ref}, f)
            with open(os.path.join(folder, "eval", "metrics.json"), "w") as f:
                json.dump({"separation_power": {"Etot / Einc": 0.05, "E layer 1": 0.1},
                           "classifier": {"cls-high": {"auc": 0.7}}}, f)
            stem = f"neural_net_{pid}_eta_{5 * j}_{5 * j + 5}_all"
            for suffix in (".json", ".meta.json"):
                with open(os.path.join(folder, "lwtnn", stem + suffix), "w") as f:
                    f.write("{}")
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 events per energy instead of 300")
    p.add_argument("--keep", default=None, help="build into this folder and keep it")
    args = p.parse_args(argv)
    events = 60 if args.quick else 300
    base = args.keep or tempfile.mkdtemp(prefix="bench_summary-")
    try:
        t0 = time.perf_counter()
        nbytes = build(os.path.join(base, "results"), os.path.join(base, "work"), events)
        t1 = time.perf_counter()
        env = dict(os.environ, MPLBACKEND="Agg")
        subprocess.run([sys.executable, os.path.join(ROOT, "summary.py"), "--results", os.path.join(base, "results")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        t2 = time.perf_counter()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(os.path.join(base, "results", "summary", "summary.json")) as f:
            states = json.load(f)["states"]
        print(json.dumps({"slices": sum(states.values()), "states": states, "events_per_file": events * len(ENERGIES),
                          "input_mb": round(nbytes / 2**20, 1), "summary_s": round(t2 - t1, 2),
                          "summary_cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
                          "build_s": round(t1 - t0, 2)}))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
