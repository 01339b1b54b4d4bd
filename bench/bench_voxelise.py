"""bench_voxelise.py -- hits/s of preprocess.py's vectorised voxeliser next to a plain per-hit Python loop.

    python bench/bench_voxelise.py            # full: >= 10^7 toy photon hits (1 TeV photons, dataset-1 XML)
    python bench/bench_voxelise.py --quick    # 2 * 10^6 hits, under a minute

Prints one JSON object on stdout (fixed keys ``hits``, ``hits_per_s``, ``python_loop_hits_per_s``, ``speedup``,
plus ``file_hits_per_s``, ``python_loop_hits``, ``quick``); progress goes to stderr.

What is timed, in one process on one core:
* ``hits_per_s``: the voxelisation of hits already in memory, as ``voxelise`` does after reading a chunk:
  int16 -> int64 layer ids, validation (NaN/inf/negative energies, event and layer ids), the (event, layer)
  extrapolation tables, the hit -> (r, alpha) -> voxel mapping and the float64 accumulation into (events,
  voxels). HDF5 reading is excluded here (best of 3 runs);
* ``file_hits_per_s``: the same from an HDF5 hits file on local disk (preprocess.voxelise_file: chunked reads
  included; the page cache is warm);
* ``python_loop_hits_per_s``: preprocess.voxelise_python_loop (the mapping hit by hit with the math module) on a
  subsample; the vectorised result on that subsample must agree with it (else exit 1).

The printed keys are listed in KEYS (numbers) and OTHER_KEYS below; tests/test_bench.py runs --quick and checks
every one of them is printed.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import preprocess  # noqa: E402
import toyshower  # noqa: E402
from HighLevelFeatures import read_geometry  # noqa: E402

ENERGY = 2.0 ** 20          # 1 TeV photons: ~1200 hits per event with the toy defaults
XML = os.path.join(ROOT, "binning", "binning_dataset_1_photons.xml")


#: the keys of the printed JSON object (dotted = nested), checked by tests/test_bench.py on every --quick run:
#: KEYS hold numbers, OTHER_KEYS anything else (text, true/false, objects)
KEYS = ("hits", "hits_per_s", "python_loop_hits_per_s", "speedup", "file_hits_per_s", "python_loop_hits")
OTHER_KEYS = ("quick",)


def make_hits(n_hits, seed=7):
    """Toy photon hits with at least ``n_hits`` hits (one energy)."""
    per_event = float(toyshower.hits_expected(ENERGY))
    n_events = int(np.ceil(n_hits / per_event * 1.02))
    data = toyshower.generate("photon", ENERGY, n_events, seed=seed)
    return data, n_events


def time_in_memory(geom, data, n_events, repeats=3):
    """Best wall time of the in-memory voxelisation of every hit; returns (seconds, showers)."""
    h = data["hits"]
    extrap = [data[k] for k in preprocess.EXTRAP_FIELDS]
    best, showers = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        mapper = preprocess.VoxelMapper(geom)
        tables = mapper.event_tables(*extrap)
        acc = preprocess.Accumulator(mapper, n_events)
        n = h["energy"].size
        for a in range(0, n, preprocess.DEFAULT_CHUNK_HITS):
            b = a + preprocess.DEFAULT_CHUNK_HITS
            acc.add(tables, h["event"][a:b], h["layer"][a:b].astype(np.int64), h["eta"][a:b], h["phi"][a:b],
                    h["energy"][a:b], where="bench", first_row=a)
        best = min(best, time.perf_counter() - t0)
        showers = acc.showers
    return best, showers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2e6 hits (< 60 s)")
    args = ap.parse_args(argv)
    n_target = 2 * 10 ** 6 if args.quick else 10 ** 7
    n_loop = 20_000 if args.quick else 100_000
    geom = read_geometry(XML, "photon")

    print(f"bench_voxelise: generating {n_target} toy hits", file=sys.stderr)
    data, n_events = make_hits(n_target)
    h = data["hits"]
    n_hits = int(h["energy"].size)

    dt, showers = time_in_memory(geom, data, n_events)
    kept = np.isin(h["layer"], geom.relevant_layers)
    if not np.isclose(showers.sum(), h["energy"][kept].sum(), rtol=1e-9, atol=0):
        print("bench_voxelise: energy not conserved", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hits.h5")
        toyshower.write_hits(path, data, {"particle": "photon"})
        t0 = time.perf_counter()
        preprocess.voxelise_file((path, geom, n_events, preprocess.DEFAULT_CHUNK_HITS))
        dt_file = time.perf_counter() - t0

    # plain per-hit loop on the first events (whole events, about n_loop hits)
    n_ev_loop = int(h["event"][min(n_loop, n_hits) - 1]) + 1     # hits are ordered by event
    m = int(np.searchsorted(h["event"], n_ev_loop))
    sub = {k: v[:m] for k, v in h.items()}
    extrap = {k: data[k][:n_ev_loop] for k in preprocess.EXTRAP_FIELDS}
    t0 = time.perf_counter()
    ref = preprocess.voxelise_python_loop(geom, sub, extrap, n_ev_loop)
    dt_loop = time.perf_counter() - t0
    got, _ = preprocess.voxelise_arrays(geom, sub, extrap, n_ev_loop)
    if not np.allclose(got, ref, rtol=1e-12, atol=1e-9):
        print("bench_voxelise: vectorised and per-hit loop results differ", file=sys.stderr)
        return 1

    rate, loop_rate = n_hits / dt, m / dt_loop
    print(json.dumps({"hits": n_hits, "hits_per_s": rate, "python_loop_hits_per_s": loop_rate,
                      "speedup": rate / loop_rate, "file_hits_per_s": n_hits / dt_file,
                      "python_loop_hits": m, "quick": bool(args.quick)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
