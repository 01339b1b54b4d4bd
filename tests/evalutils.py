"""Synthetic CaloChallenge files for the evaluate.py tests and benchmark (not physics: a smooth, seeded toy).

Each shower: incident energy E (dataset 1: 2^8..2^22 MeV, datasets 2/3: log-uniform 1 GeV..1 TeV), a fixed
template over the voxels (layer weights x exp(-r / R) radial profile, uniform in alpha) scaled by
``scale * E / sum(template)``, multiplied voxel by voxel by Gamma(k, 1/k) noise. ``scale`` and ``radius`` change
the distribution (for "clearly different" samples).
"""
import os

import numpy as np

from HighLevelFeatures import DATASETS, dataset_geometry
from plumbing import atomic_output


def template(geom, radius=1.0):
    """Mean energy fraction per voxel (sums to 1)."""
    r, _, _, _, lid = geom.voxel_coordinates()
    ids = np.unique(lid)
    depth = {l_id: k for k, l_id in enumerate(ids)}
    layer_w = np.array([np.exp(-0.5 * ((depth[i] - 0.35 * len(ids)) / (0.3 * len(ids) + 0.5)) ** 2) for i in lid])
    r_scale = np.array([40.0 + 15.0 * depth[i] for i in lid]) * radius
    if geom.n_voxels > 1000:            # datasets 2/3: r in units of ~mm cells of a few mm
        r_scale = r_scale / 10.0
    t = layer_w * np.exp(-r / r_scale)
    return t / t.sum()


def incident_energies(dataset, n, rng):
    if dataset.startswith("1"):
        return 2.0 ** rng.integers(8, 23, size=n)
    return 10.0 ** rng.uniform(3, 6, size=n)


def showers(geom, einc, rng, scale=1.0, radius=1.0, k=3.0):
    """float32 showers (len(einc), n_voxels) for the given incident energies."""
    t = template(geom, radius)
    noise = rng.gamma(k, 1.0 / k, size=(len(einc), geom.n_voxels))
    return (scale * einc[:, None] * t[None, :] * noise).astype(np.float32)


def write_synthetic(path, dataset, n, seed, scale=1.0, radius=1.0, chunk=2000, einc=None):
    """Write a synthetic CaloChallenge file atomically, chunk by chunk (bounded memory)."""
    import h5py

    geom = dataset_geometry(dataset)
    rng = np.random.default_rng(seed)
    einc = incident_energies(dataset, n, rng) if einc is None else np.asarray(einc, dtype=np.float64)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=einc.reshape(-1, 1))
            ds = f.create_dataset("showers", shape=(n, geom.n_voxels), dtype="float32")
            for i in range(0, n, chunk):
                ds[i:i + chunk] = showers(geom, einc[i:i + chunk], rng, scale, radius)
    return path


def n_voxels(dataset):
    return DATASETS[dataset][2]


def ensure_file(path, *args, **kwargs):
    """write_synthetic unless ``path`` exists already."""
    if not os.path.isfile(path):
        write_synthetic(path, *args, **kwargs)
    return path
