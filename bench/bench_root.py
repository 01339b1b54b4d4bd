"""bench_root.py -- hits/s of preprocess.py voxelise from a FastCaloSim input ntuple (ROOT, uproot) next to the same
hits from a calokit hits HDF5 file.

    python bench/bench_root.py            # ~2 * 10^6 toy photon hits (1 TeV photons, dataset-1 XML)
    python bench/bench_root.py --quick    # ~3 * 10^5 hits, well under a minute

Prints one JSON object on stdout: ``hits``, ``events``, ``root_hits_per_s`` (ATLAS SaveAllBranches form: the
pre-pass over truth and extrapolation branches plus the chunked hit reading, sampling-fraction scaling, x/y/z ->
eta/phi and the voxelisation), ``hdf5_hits_per_s`` (the same two steps from the HDF5 twin), ``root_over_hdf5``,
``root_file_mb``, ``hdf5_file_mb``, ``quick``. One process, one core, best of 2, page cache warm; the voxels
of both must agree (else exit 1). Progress on stderr.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import preprocess  # noqa: E402
import toyshower  # noqa: E402
from HighLevelFeatures import read_geometry  # noqa: E402

ENERGY = 2.0 ** 20
#: the keys of the printed JSON object (the test suite runs --quick and checks each): numbers, then the rest
KEYS = ("hits", "events", "root_hits_per_s", "hdf5_hits_per_s", "root_over_hdf5", "root_file_mb", "hdf5_file_mb")
OTHER_KEYS = ("quick",)
XML = os.path.join(ROOT, "binning", "binning_dataset_1_photons.xml")


def write_files(d, n_events):
    """The same toy showers as an ATLAS flat ntuple (float32 positions, raw energy = E x 0.25) and as hits HDF5."""
    import awkward as ak
    import uproot
    data = toyshower.generate("photon", ENERGY, n_events, (0.20, 0.25), 11)
    h = data["hits"]
    x, y = (h["r"] * np.cos(h["phi"])).astype(np.float32), (h["r"] * np.sin(h["phi"])).astype(np.float32)
    z, e = h["z"].astype(np.float32), h["energy"].astype(np.float32)
    counts = np.bincount(h["event"], minlength=n_events)
    one = np.ones(n_events, dtype=np.int64)
    tile = (h["layer"] >= 12) & (h["layer"] <= 20)
    sf = np.where(tile, 0.5, 0.25).astype(np.float32)
    branches = {"HitX": x, "HitY": y, "HitZ": z, "HitE": np.where(tile, e / sf, e * sf).astype(np.float32),
                "HitSampling": h["layer"].astype(np.int32), "HitSamplingFraction": sf}
    tree = {k: ak.unflatten(v, counts) for k, v in branches.items()}
    p = np.full(n_events, ENERGY, np.float32)
    tree.update({"TruthPx": ak.unflatten(p, one), "TruthPy": ak.unflatten(np.zeros_like(p), one),
                 "TruthPz": ak.unflatten(np.zeros_like(p), one),
                 "TruthPDG": ak.unflatten(np.full(n_events, 22, np.int32), one),
                 "newTTC_IDCaloBoundary_eta": ak.unflatten(data["extrap_eta"][:, 0].astype(np.float32), one)})
    for k, b in zip(preprocess.EXTRAP_FIELDS, preprocess.ROOT_MID):
        tree[b] = data[k].astype(np.float32)
    rpath = os.path.join(d, "pid22_E1048576.root")
    with uproot.recreate(rpath) as f:
        f.mktree(preprocess.ROOT_TREE, {k: ("var * " + str(ak.type(ak.flatten(v)).content)) if isinstance(v, ak.Array)
                                        else (v.dtype, v.shape[1:]) for k, v in tree.items()})
        f[preprocess.ROOT_TREE].extend(tree)
    hpath = os.path.join(d, "hits.h5")
    eta, phi = preprocess.hit_eta_phi(x.astype(np.float64), y.astype(np.float64), z.astype(np.float64))
    with h5py.File(hpath, "w") as f:
        f["event"], f["layer"], f["eta"], f["phi"], f["energy"] = h["event"], h["layer"], eta, phi, e
        f["truth_p"], f["truth_pdg"] = np.full(n_events, ENERGY), np.full(n_events, 22)
        for k in preprocess.EXTRAP_FIELDS:
            f[k] = data[k].astype(np.float32)
    return rpath, hpath, int(e.size)


def timed(fn, repeats=2):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~3e5 hits (well under a minute)")
    args = ap.parse_args(argv)
    n_events = 250 if args.quick else 1700
    geom = read_geometry(XML, "photon")
    chunk = preprocess.DEFAULT_CHUNK_HITS
    with tempfile.TemporaryDirectory() as d:
        print(f"bench_root: writing {n_events} toy photon showers as ROOT and HDF5", file=sys.stderr)
        rpath, hpath, n_hits = write_files(d, n_events)

        def from_root():
            hf = preprocess.inspect_root_file(rpath, "photon", "extrapolation", None, chunk)
            preprocess.choose_slice(XML, "photon", [hf], 0.01)
            return preprocess.voxelise_root_file((rpath, geom, hf.n_events, chunk, hf.root))

        def from_hdf5():
            hf = preprocess.inspect_hits_file(hpath, "photon")
            return preprocess.voxelise_file((hpath, geom, hf.n_events, chunk))

        print("bench_root: timing ROOT input", file=sys.stderr)
        t_root, (_, v_root, st_root) = timed(from_root)
        print("bench_root: timing HDF5 input", file=sys.stderr)
        t_h5, (_, v_h5, st_h5) = timed(from_hdf5)
        if st_root["hits"] != n_hits or st_h5["hits"] != n_hits or not np.allclose(v_root, v_h5, rtol=1e-5, atol=1e-3):
            print("bench_root: ROOT and HDF5 voxels differ", file=sys.stderr)
            return 1
        sizes = [os.path.getsize(p) / 1e6 for p in (rpath, hpath)]
    out = {"hits": n_hits, "events": n_events, "root_hits_per_s": n_hits / t_root, "hdf5_hits_per_s": n_hits / t_h5,
           "root_over_hdf5": t_h5 / t_root, "root_file_mb": round(sizes[0], 2), "hdf5_file_mb": round(sizes[1], 2),
           "quick": bool(args.quick)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
