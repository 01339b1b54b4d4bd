"""evaluate.py -- compare generated calorimeter showers with a reference (drop-in for CaloChallenge's evaluate.py).

Same command line, same numbers, same output names as the CaloChallenge evaluation, plus: seeded (same inputs and
``--seed`` give the same ``metrics.json``, byte for byte), chunked reading with bounded memory, a reference
feature cache keyed by the reference file's content, text outputs overwritten (never appended), no LaTeX, clear errors.

Usage
-----
    python evaluate.py -i generated.h5 -r geant4.h5 -m all -d 1-photons --output_dir evaluation_results/
    python evaluate.py -i gen.h5 -r ref.h5 -m hist -d 2 --seed 7 --cache_dir ~/.cache/calokit

Modes (``-m``)
--------------
all             everything below (classifiers: cls-low and cls-high; plus FPD/KPD and prdc)
avg, avg-E      average shower (per layer, next to the reference) / average showers in incident-energy ranges
hist-p          histograms of the high-level features (PNG)
hist-chi        separation powers of those histograms -> histogram_chi2_<d>.txt (+ metrics.json)
hist            hist-p and hist-chi
cls-low         classifier on voxels/E_inc and log10 E_inc
cls-low-normed  classifier on voxels normalised to their layer energy and log10 layer energies
cls-high        classifier on the high-level features
fpd, kpd        Frechet / kernel physics distance of the high-level features (both are computed, x 1e3)
prdc            precision, recall, density, coverage (k-NN, ``--prdc_k``) of log10 voxel energies -> prdc_<d>.txt
cls-resnet      the reference's 3D ResNet classifier on the voxel image (datasets 2, 3; ``--cls_resnet_layers``)

Facts kept from the reference
-----------------------------
* Voxels below the dataset's readout threshold are set to 0 in both files before anything else
  (``E < 1 MeV`` for dataset 1, ``E < 0.5e-3/0.033 MeV`` for datasets 2 and 3); that threshold is also the low edge
  of the logarithmic energy binnings. Negative voxels, in the generated or the reference file, are below it and so
  become 0 as well; how many there were (count, fraction, most negative) is said on stderr and in metrics.json
  (``negative_voxels``). NaN/inf voxels and non-positive incident energies are bad input in either file.
* Separation power = 0.5 * sum((h1 - h2)^2 / (h1 + h2 + 1e-16)) over bin *fractions* (entries inside the binning).
  An empty histogram (no entry inside the binning) has all fractions 0, so two empty histograms give 0 (never NaN).
* The classifier is the reference MLP (an input layer and ``--cls_n_layer`` further hidden layers of ``--cls_n_hidden``
  units, LeakyReLU(0.01), optional dropout, sigmoid output, binary cross-entropy, Adam), trained for
  ``--cls_n_epochs`` epochs; the epoch with the best test accuracy is kept, calibrated with isotonic regression on the
  test split, and AUC and JSD = (ln 2 - BCE) / ln 2 are measured on the validation split.
* prdc follows the ``prdc`` package the reference calls: on the thresholded showers with zeros replaced by 0.1 MeV,
  log10, Euclidean; r_k(x) = distance to the k-th nearest other row of the same set (the (k+1)-th smallest
  including itself); precision = fraction of generated rows within some reference radius, recall = fraction of
  reference rows within some generated radius, density = pairs (reference i, generated j) with d < r_k(i) / (k M),
  coverage = fraction of reference rows whose nearest generated row is within r_k; strict "<". The reference
  builds N x N matrices (tens of GB for 121k events); calokit takes blocks of float32 distance products and
  recomputes exactly, in float64, every comparison closer to its threshold than the products' error bound, so the
  numbers equal a full-matrix computation on float64 distances. Datasets 2/3 use a seeded subsample by default
  (``--prdc_max_events``; metrics.json records it).
* FPD / KPD follow JetNet's definitions as the reference calls them: features normalised by the maximum |value| of the
  reference, FPD = intercept of a linear fit in 1/N of the mean Frechet distance over 20 bootstrap batches for 10
  batch sizes from 10k to 50k, KPD = median over 10 batches of 10k of the unbiased MMD^2 with kernel
  (x.y/d + 1)^4, both reported x 1e3 with their errors.

Binning: ``--binning``, else binning_dataset_<d>.xml in the current directory (as the reference), else the kit's
binning/ folder beside this script; the error names every place tried.

Reference cache: OUTPUT_DIR/reference_cache/ (or ``--cache_dir``), one .npz per key = sha256 of the reference's bytes,
of the binning XML, the dataset, the threshold and of this code; nothing is ever written beside the reference file.
Histogram PNGs are drawn by ``--jobs`` processes.

Memory: both files are read in chunks (``--chunk_mb``), each in its own dtype (float32 or float64: the energies
are summed in that dtype, as the reference sums them, so that the separation powers are the reference's to
rounding, ~1e-16); what stays in memory is a few dozen float64 numbers
per event (the high-level features), the mean showers and the histograms. The low-level classifiers (cls-low,
cls-low-normed, and ``all``) need their inputs in memory: events x (voxels + 1) float32 per file, e.g. 100k events of
dataset 3 = 2 x 16 GB; run ``-m cls-high`` / ``hist`` on machines with less memory.
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import math
import os
import sys
import time
import types
import warnings

import numpy as np

from HighLevelFeatures import (BINNING_DIR, DATASETS, chunk_events, compute_features, dataset_geometry, draw_layer,
                               draw_shower, separation_power)
from plumbing import (UserError, atomic_output, ensure_dir, import_keras, iter_calo_chunks, native_float,
                      negative_voxels, open_calo_file, run_cli, write_text)

# ----------------------------------------------------------------------------------------------
# facts and defaults

MODES = ("all", "avg", "avg-E", "hist-p", "hist-chi", "hist", "cls-low", "cls-low-normed", "cls-high", "cls-resnet",
         "fpd", "kpd", "prdc")

#: readout threshold per voxel in MeV: values strictly below are set to 0 (also the low edge of the log binnings)
MIN_ENERGY = {"1-photons": 1.0, "1-pions": 1.0, "2": 0.5e-3 / 0.033, "3": 0.5e-3 / 0.033}

#: classifier (train, test, validation) events per sample, scaled down proportionally for smaller files
CLS_SPLITS = {"1-photons": (80000, 20000, 21000), "1-pions": (80000, 20000, 20800),
              "2": (60000, 20000, 20000), "3": (60000, 20000, 20000)}

#: default --prdc_max_events (0 = every event): the k-NN cost grows as events^2 x voxels; these finish in minutes
PRDC_MAX_EVENTS = {"1-photons": 0, "1-pions": 0, "2": 10000, "3": 3000}

MIN_CLS_BATCH = 32            # smallest classifier batch classifier_batch() chooses (batch-norm needs a few events)
PROGRESS_EVERY_S = 5.0        # a file's reading progress is reported at most this often (and at its end)
CHANCE_AUC = 0.55             # a classifier AUC below this is "at chance" ...
CLEAR_SEPARATION = 0.2        # ... a warning when E_tot/E_inc separation power is above this at the same time
DEFAULT_SEED = 42               # also JetNet's FPD/KPD seed, so the default reproduces the reference's FPD/KPD
CACHE_VERSION = 2               # bump when anything stored in the reference cache changes meaning

CHI2_HEADER = "List of chi2 of the plotted histograms, see eq. 15 of 2009.03796 for its definition.\n"
CLS_HEADER = "Final result of classifier test (AUC / JSD):"


def energy_ranges(dataset):
    """Incident-energy range edges (MeV) of the avg-E plots and of the per-energy Etot/Einc histograms."""
    if dataset.startswith("1"):
        return 2.0 ** np.linspace(8, 23, 16)          # 2^8 .. 2^23: one range per discrete ds1 energy
    return 10.0 ** np.linspace(3, 6, 4)               # 1 GeV, 10 GeV, 100 GeV, 1 TeV


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError (one line on stderr, exit code 2)."""

    def error(self, message):
        raise UserError(f"command line: {message} (see python evaluate.py --help)")


def build_parser():
    p = _Parser(description="Evaluate generated calorimeter showers against a reference "
                            "(CaloChallenge-compatible).", formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Modes: " + ", ".join(MODES) + ".")
    p.add_argument("-i", "--input_file", required=True, help="generated showers (CaloChallenge HDF5)")
    p.add_argument("-r", "--reference_file", required=True,
                   help="reference showers (CaloChallenge HDF5), never modified")
    p.add_argument("-m", "--mode", default="all", help="what to evaluate (default all): " + ", ".join(MODES))
    p.add_argument("-d", "--dataset", required=True, help="1-photons, 1-pions, 2 or 3")
    p.add_argument("--output_dir", default="evaluation_results/",
                   help="where plots and scores go (default: evaluation_results/ in the working directory, as the "
                        "reference)")
    p.add_argument("--binning", default=None,
                   help="binning XML (default: binning_dataset_<d>.xml in the current directory, as the reference "
                        "finds it, else the kit's binning/ folder beside this script)")
    p.add_argument("--json", default=None, help="metrics file (default OUTPUT_DIR/metrics.json)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"random seed (default {DEFAULT_SEED}, the reference's FPD/KPD seed; make all passes its SEED, 1)")
    p.add_argument("--cache_dir", default=None,
                   help="reference feature cache folder (default OUTPUT_DIR/reference_cache)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--chunk_mb", type=float, default=16.0, help="shower MB read per chunk (default 16)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG plots (default 100)")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                   help="worker processes that stream the input file, hash and count, and draw the PNGs "
                        "(default: CPU count, at most 8; 1: everything in this process)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr (warnings stay)")
    p.add_argument("--label", default="generated", help="legend name of the evaluated model in the plots")
    p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)   # progress is on by default now
    p.add_argument("--allow_unit_mismatch", action="store_true",
                   help="evaluate even when the incident energies differ ~1000x from the reference's, match none of "
                        "its energies (dataset 1), or a file states a unit other than MeV (a GeV file against a MeV "
                        "one)")
    g = p.add_argument_group("classifier")
    g.add_argument("--cls_n_layer", type=int, default=2, help="hidden layers after the input layer (default 2)")
    g.add_argument("--cls_n_hidden", type=int, default=2048, help="units per hidden layer (default 2048)")
    g.add_argument("--cls_dropout_probability", type=float, default=0.0, help="dropout (default 0)")
    g.add_argument("--cls_batch_size", type=int, default=1000, help="batch size (default 1000)")
    g.add_argument("--cls_n_epochs", type=int, default=50, help="epochs (default 50)")
    g.add_argument("--cls_lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4)")
    g = p.add_argument_group("FPD / KPD (defaults as published)")
    g.add_argument("--fpd_min_samples", type=int, default=10000, help="smallest FPD batch (default 10000)")
    g.add_argument("--fpd_max_samples", type=int, default=50000, help="largest FPD batch (default 50000)")
    g.add_argument("--fpd_num_batches", type=int, default=20, help="batches per FPD batch size (default 20)")
    g.add_argument("--fpd_num_points", type=int, default=10, help="FPD batch sizes (default 10)")
    g.add_argument("--kpd_batch_size", type=int, default=10000, help="KPD batch size (default 10000)")
    g.add_argument("--kpd_num_batches", type=int, default=10, help="KPD batches (default 10)")
    g = p.add_argument_group("accepted for compatibility with CaloChallenge's command line")
    g.add_argument("--input_file_2", default=None, help="ignored: files are streamed, no need to split dataset 3")
    g.add_argument("--reference_file_2", default=None, help="ignored (see --input_file_2)")
    g.add_argument("--no_cuda", action="store_true", help="ignored (device chosen by the Keras backend)")
    g.add_argument("--which_cuda", type=int, default=0, help="ignored (use CUDA_VISIBLE_DEVICES)")
    g.add_argument("--save_mem", action="store_true", help="ignored (memory is always bounded)")
    g.add_argument("--cls_resnet_layers", type=int, default=18,
                   help="cls-resnet depth: 10, 18 (default) or 34 (same training flags as the other classifiers)")
    g.add_argument("--prdc_ext", action="store_true", help="ignored (the extended reference files are not read)")
    g = p.add_argument_group("prdc (precision, recall, density, coverage)")
    g.add_argument("--prdc_k", type=int, default=5, help="nearest neighbours (default 5)")
    g.add_argument("--prdc_max_events", type=int, default=None,
                   help="seeded subsample of events per file, the same for both (0: all; default: all for dataset 1, "
                        + ", ".join(f"{v} for {k}" for k, v in PRDC_MAX_EVENTS.items() if v) + ")")
    return p


def binning_places(dataset, binning=None):
    """Where the binning XML is looked for, in order: ``--binning``; else the reference's file name
    (binning_dataset_1_photons.xml, binning_dataset_1_pions.xml, binning_dataset_2.xml, binning_dataset_3.xml) in
    the current directory, as CaloChallenge's evaluate.py finds it; else the kit's binning/ beside this script
    (and beside HighLevelFeatures.py, if that lives elsewhere)."""
    if binning:
        return [binning]
    fname = DATASETS[dataset][0]
    places = [os.path.join(os.getcwd(), fname),
              os.path.join(os.path.dirname(os.path.abspath(__file__)), "binning", fname),
              os.path.join(BINNING_DIR, fname)]
    return list(dict.fromkeys(os.path.abspath(p) for p in places))


def find_binning(dataset, binning=None):
    """The first existing place of :func:`binning_places`; UserError naming every place tried otherwise."""
    places = binning_places(dataset, binning)
    for path in places:
        if os.path.isfile(path):
            return path
    if binning:
        raise UserError(f"--binning {binning}: binning file not found")
    raise UserError(f"binning file {DATASETS[dataset][0]} for dataset {dataset} not found; tried: "
                    + ", ".join(places) + " (give one with --binning)")


def what_to_do(mode):
    """Which parts of the evaluation a mode runs."""
    classifiers = {"all": ["cls-low", "cls-high"], "cls-low": ["cls-low"], "cls-low-normed": ["cls-low-normed"],
                   "cls-high": ["cls-high"], "cls-resnet": ["cls-resnet"]}.get(mode, [])
    return {
        "avg": mode in ("all", "avg"),
        "avg_e": mode in ("all", "avg-E"),
        "hist_plots": mode in ("all", "hist-p", "hist"),
        "hist_chi": mode in ("all", "hist-chi", "hist"),
        "hist": mode in ("all", "hist-p", "hist-chi", "hist"),
        "classifiers": classifiers,
        "fpd": mode in ("all", "fpd", "kpd"),
        "prdc": mode in ("all", "prdc"),
    }


# ----------------------------------------------------------------------------------------------
# separation power and histogram definitions

def bin_fractions(values, bins):
    """Histogram of ``values`` as fractions of the entries inside ``bins`` (zeros when nothing is inside)."""
    counts = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)[0].astype(np.float64)
    return fractions(counts)


def fractions(counts):
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def log_bins(min_energy, max_value, n_edges):
    """The reference's logarithmic binning from the threshold to a reference maximum.

    ``max_value`` must carry the dtype the reference computes it in (np.float32 for float32 files): the reference
    takes ``np.log10`` of that maximum in its own dtype, so a float32 maximum gives a float32 logarithm, and the
    top edge 10**log10(max) is then not the maximum itself. Reference quirk kept for equal numbers: that top edge
    often rounds *below* the maximum (by an ulp in float64, by up to ~1e-6 relative in float32), and then the
    event (or voxel) holding the maximum falls outside the histogram, in both files' histograms alike.
    A reference maximum at or below the threshold (nothing above threshold) would give invalid edges; a decade
    above the threshold is used then, so that such histograms are simply empty.
    """
    hi = max_value if isinstance(max_value, np.floating) else np.float64(max_value)
    if not np.isfinite(hi) or hi <= min_energy:
        hi = np.float64(10.0 * min_energy)
    return np.logspace(np.log10(min_energy), np.log10(hi), n_edges)


def _lims(dataset, lid, wide_layers, ds23, wide, normal):
    if dataset in ("2", "3"):
        return ds23
    return wide if lid in wide_layers else normal


def histogram_specs(dataset, geom, ref_features, min_energy, ref_dtype=np.float64):
    """Per-layer histogram definitions ``(name, feature_key, layer, bins, reported)``, in the reference's order.

    ``reported`` marks the histograms whose separation power the reference writes to histogram_chi2_<d>.txt;
    the others (EC r, width r, sparsity) are calokit additions that only go to metrics.json and plots.
    ``ref_dtype``: the reference showers' dtype, the dtype of its layer energies (see :func:`log_bins`).
    """
    specs = []
    as_ref = np.dtype(ref_dtype).type
    for lid in geom.relevant_layers:
        e_layer = ref_features["E_layer"][lid]            # float64 copies of the reference's float32/64 sums
        specs.append((f"E layer {lid}", "E_layer", lid, log_bins(min_energy, as_ref(e_layer.max())
                                                                 if len(e_layer) else 0.0, 40), True))
    alpha = geom.layers_binned_in_alpha
    for label, key, lims in (("EC Eta", "EC_eta", ((-30., 30.), (-500., 500.), (-100., 100.))),
                             ("EC Phi", "EC_phi", ((-30., 30.), (-500., 500.), (-100., 100.))),
                             ("Width Eta", "width_eta", ((0., 30.), (0., 400.), (0., 100.))),
                             ("Width Phi", "width_phi", ((0., 30.), (0., 400.), (0., 100.)))):
        for lid in alpha:
            lo, hi = _lims(dataset, lid, (12, 13), *lims)
            specs.append((f"{label} layer {lid}", key, lid, np.linspace(lo, hi, 101), True))
    for label, key, lims in (("EC R", "EC_r", ((0., 42.), (0., 1500.), (0., 500.))),
                             ("Width R", "width_r", ((0., 20.), (0., 1500.), (0., 500.)))):
        for lid in geom.relevant_layers:
            lo, hi = _lims(dataset, lid, (12, 13, 14), *lims)
            specs.append((f"{label} layer {lid}", key, lid, np.linspace(lo, hi, 101), False))
    for lid in geom.relevant_layers:
        specs.append((f"Sparsity layer {lid}", "sparsity", lid, np.linspace(0.0, 1.0, 21), False))
    return specs


ETOT_BINS = np.linspace(0.5, 1.5, 101)         # the reference's Etot/Einc binning over all energies


def per_energy_bins(dataset, index):
    """Etot/Einc binning of the i-th dataset-1 energy (photons from 2^12 MeV on: a narrower range)."""
    if index > 3 and "photons" in dataset:
        return np.linspace(0.9, 1.1, 21)
    return np.linspace(0.4, 1.4, 21)


# ----------------------------------------------------------------------------------------------
# streaming scan of one file

class Scan:
    """Everything evaluate.py keeps of one file after one streamed pass (a few numbers per event)."""

    def __init__(self, n_events, n_voxels, n_ranges, dtype=np.float32, einc_dtype=np.float64):
        self.n = n_events
        self.dtype = np.dtype(dtype)                  # the file's shower dtype: features are summed in it
        self.einc_dtype = np.dtype(einc_dtype)        # and its incident-energy dtype (for Etot / Einc)
        self.einc = np.zeros(n_events)
        self.features = None
        self.shower_sum = np.zeros(n_voxels)
        self.range_sums = np.zeros((n_ranges, n_voxels))
        self.range_counts = np.zeros(n_ranges, dtype=np.int64)
        self.voxel_max = self.dtype.type(0.0)        # kept in the file's dtype (see log_bins)
        self.voxel_counts = None
        self.cls_low = None
        self.prdc = None
        self.n_negative = 0                           # voxels below zero before the threshold, and the lowest
        self.min_negative = 0.0

    def etot_over_einc(self, sel=slice(None)):
        """Etot / Einc computed in the dtypes the reference divides (showers' and incident energies' own)."""
        return (self.features["Etot"][sel].astype(self.dtype, copy=False)
                / self.einc[sel].astype(self.einc_dtype, copy=False))

    @property
    def mean_shower(self):
        return self.shower_sum / max(self.n, 1)

    def range_mean(self, i):
        return self.range_sums[i] / max(int(self.range_counts[i]), 1)


def _concat(parts):
    out = {"Etot": np.concatenate([p["Etot"] for p in parts])}
    for key, val in parts[0].items():
        if isinstance(val, dict):
            out[key] = {lid: np.concatenate([p[key][lid] for p in parts]) for lid in val}
    return out


def low_level_width(geom, kind):
    return 1 + geom.n_voxels + (len(geom.relevant_layers) if kind == "cls-low-normed" else 0)


def low_level_inputs(geom, einc, showers, e_layer, kind):
    """Classifier inputs of one chunk: cls-low [log10 Einc, voxels/Einc];
    cls-low-normed [log10 Einc, voxels/(E_layer + 1e-16), log10(E_layer + 1e-8)] (float32)."""
    n = len(einc)
    out = np.empty((n, low_level_width(geom, kind)), dtype=np.float32)
    out[:, 0] = np.log10(einc)
    if kind == "cls-low":
        out[:, 1:] = showers / einc[:, None]
        return out
    col = 1 + geom.n_voxels
    for lid in geom.relevant_layers:
        a, b = geom.offsets[lid]
        el = e_layer[lid]
        out[:, 1 + a:1 + b] = showers[:, a:b] / (el[:, None] + 1e-16)
        out[:, col] = np.log10(el + 1e-8)
        col += 1
    return out


def file_dtypes(path, n_voxels):
    """(shower dtype, incident-energy dtype) the file is computed in: its own (float32 or float64)."""
    f, _, _ = open_calo_file(path, n_voxels)
    with f:
        return native_float(f["showers"].dtype), native_float(f["incident_energies"].dtype)


def chunk_for(dtype, chunk):
    """Events per chunk for showers of ``dtype`` (``chunk`` counts float32 events: float64 chunks are halved)."""
    return max(1, chunk * 4 // np.dtype(dtype).itemsize)


def threshold_showers(showers, threshold):
    """Set voxels below the threshold to 0, in place, as the reference does: ``showers < threshold`` compares in
    the showers' own dtype (numpy casts the Python float threshold to float32 for float32 showers)."""
    showers[showers < showers.dtype.type(threshold)] = 0.0
    return showers


def scan_file(path, geom, threshold, ranges, chunk, voxel_bins=None, low_kind=None, features=True, log=None,
              prdc_rows=None):
    """One pass over a CaloChallenge file in its own dtype: threshold, features, sums, voxel histogram, classifier
    inputs. The energies are summed as the reference sums them (in that dtype), so that E_layer, Etot and the
    binnings derived from their maxima are the reference's to the bit. ``prdc_rows`` (sorted event indices): keep
    their prdc inputs (:func:`prdc_features`) in ``scan.prdc``."""
    dtype, einc_dtype = file_dtypes(path, geom.n_voxels)
    f, n, _ = open_calo_file(path, geom.n_voxels)
    f.close()
    scan = Scan(n, geom.n_voxels, len(ranges) - 1, dtype, einc_dtype)
    if voxel_bins is not None:
        scan.voxel_counts = np.zeros(len(voxel_bins) - 1, dtype=np.int64)
    if low_kind:
        scan.cls_low = np.empty((n, low_level_width(geom, low_kind)), dtype=np.float32)
    if prdc_rows is not None:
        scan.prdc = np.empty((len(prdc_rows), geom.n_voxels), dtype=dtype)
    parts = []
    last_log = time.monotonic()
    # negative voxels pass in either file: zeroed by the threshold as CaloChallenge's evaluate.py does for both,
    # and counted (NaN/inf and non-positive incident energies stay bad-input errors)
    for start, einc, showers in iter_calo_chunks(path, geom.n_voxels, chunk_for(dtype, chunk), dtype=None,
                                                 allow_negative=True):
        stop = start + len(einc)
        count_negative(scan, showers)
        threshold_showers(showers, threshold)
        scan.einc[start:stop] = einc
        feats = (compute_features(geom, showers, native_sums=True) if (features or low_kind == "cls-low-normed")
                 else None)
        if features:
            parts.append(feats)
        scan.shower_sum += showers.sum(axis=0, dtype=np.float64)
        which = np.searchsorted(ranges, einc, side="right") - 1
        for k in np.unique(which):
            if 0 <= k < len(ranges) - 1:
                sel = which == k
                scan.range_sums[k] += showers[sel].sum(axis=0, dtype=np.float64)
                scan.range_counts[k] += int(sel.sum())
        if showers.size:
            scan.voxel_max = max(scan.voxel_max, showers.max())
        if voxel_bins is not None:     # values below the first edge (the threshold) are not counted
            scan.voxel_counts += np.histogram(showers, bins=voxel_bins)[0]
        if prdc_rows is not None:
            a, b = np.searchsorted(prdc_rows, [start, stop])
            scan.prdc[a:b] = prdc_features(showers[prdc_rows[a:b] - start])
        if low_kind:
            scan.cls_low[start:stop] = low_level_inputs(geom, einc, showers, feats["E_layer"] if feats else None,
                                                        low_kind)
        if log and (stop == n or time.monotonic() - last_log > PROGRESS_EVERY_S):
            last_log = time.monotonic()
            log(f"{path}: {stop}/{n} events")
    if features:
        scan.features = _concat(parts)
    return scan


def count_negative(scan, showers):
    """Add a chunk's negative voxels to ``scan`` (count and most negative value): CaloChallenge's evaluate.py sets
    every voxel below its threshold, negative ones included, to zero and goes on; so does this one, and says so."""
    n, lowest = negative_voxels(showers)
    scan.n_negative += n
    scan.min_negative = min(scan.min_negative, lowest)


def negative_voxel_report(scans, names, metrics):
    """metrics["negative_voxels"] and one stderr line per file that had negative voxels (set to zero by the
    threshold, as the reference does)."""
    report = {}
    for scan, name in zip(scans, names):
        n, lowest = int(getattr(scan, "n_negative", 0)), float(getattr(scan, "min_negative", 0.0))
        report[name] = {"count": n, "fraction": n / max(scan.n * scan.shower_sum.size, 1),
                        "most_negative_mev": lowest if n else None}
        if n:
            print(f"evaluate.py: note: {n} negative voxels in the {name} file (most negative {lowest:.6g} MeV), "
                  f"set to zero by the threshold as CaloChallenge's evaluate.py does", file=sys.stderr)
    metrics["negative_voxels"] = report


def voxel_histogram(path, geom, threshold, bins, chunk, start=0, stop=None):
    """Counts of thresholded voxel energies of events [start, stop) of a file in ``bins`` (a second pass, once the
    reference maximum has fixed the bins)."""
    counts = np.zeros(len(bins) - 1, dtype=np.int64)
    dtype, _ = file_dtypes(path, geom.n_voxels)
    for _, _, showers in iter_calo_chunks(path, geom.n_voxels, chunk_for(dtype, chunk), check=False, start=start,
                                          stop=stop, dtype=None):
        threshold_showers(showers, threshold)
        counts += np.histogram(showers, bins=bins)[0]    # values below the first edge are not counted
    return counts


def split_voxel_histogram(pool, path, geom, threshold, bins, chunk, n_events):
    """:func:`voxel_histogram` of a whole file, the second half counted in a ``pool`` worker meanwhile (if any)."""
    half = (n_events // 2 // chunk) * chunk
    if pool is None or half == 0:
        return voxel_histogram(path, geom, threshold, bins, chunk)
    other = pool.submit(voxel_histogram, path, geom, threshold, bins, chunk, half)
    return voxel_histogram(path, geom, threshold, bins, chunk, 0, half) + other.result()


# ----------------------------------------------------------------------------------------------
# reference cache (content-addressed, never beside the reference file)

def file_sha256(path, block=8 * 2**20):
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(block)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def cache_key(ref_sha, geom_xml, dataset, threshold):
    """Key of a reference cache entry: reference content, binning content, dataset, threshold, and the code that
    computes the cached numbers (this file and HighLevelFeatures.py), so an entry can never be stale."""
    import HighLevelFeatures

    text = json.dumps({"reference_sha256": ref_sha, "binning_sha256": file_sha256(geom_xml),
                       "dataset": dataset, "threshold": repr(float(threshold)), "version": CACHE_VERSION,
                       "code_sha256": [file_sha256(os.path.abspath(__file__)),
                                       file_sha256(HighLevelFeatures.__file__)]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_entry(cache_dir, ref_sha, geom, dataset, threshold):
    """(path, key) of the cached reference scan for this content, binning, dataset, threshold and code."""
    key = cache_key(ref_sha, geom.filename, dataset, threshold)
    return os.path.join(cache_dir, f"reference_{key[:24]}.npz"), key


def save_cache(path, key, scan):
    arrays = {"key": np.array(key), "n": np.array(scan.n), "einc": scan.einc, "shower_sum": scan.shower_sum,
              "range_sums": scan.range_sums, "range_counts": scan.range_counts,
              "voxel_max": np.array(scan.voxel_max), "voxel_counts": scan.voxel_counts,
              "dtypes": np.array([scan.dtype.str, scan.einc_dtype.str]),
              "negative": np.array([scan.n_negative, scan.min_negative]),
              "f__Etot": scan.features["Etot"]}
    for name, val in scan.features.items():
        if isinstance(val, dict):
            for lid, arr in val.items():
                arrays[f"f__{name}__{lid}"] = arr
    ensure_dir(os.path.dirname(os.path.abspath(path)))
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_cache(path, key, n_voxels):
    """The cached reference scan, or None when absent, unreadable or for another key."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            scan = Scan(int(z["n"]), n_voxels, len(z["range_counts"]), *[str(t) for t in z["dtypes"]])
            scan.einc = z["einc"]
            scan.shower_sum = z["shower_sum"]
            scan.range_sums = z["range_sums"]
            scan.range_counts = z["range_counts"]
            scan.voxel_max = z["voxel_max"][()]
            scan.voxel_counts = z["voxel_counts"]
            if "negative" in z.files:
                scan.n_negative, scan.min_negative = int(z["negative"][0]), float(z["negative"][1])
            feats = {"Etot": z["f__Etot"]}
            for name in z.files:
                if name.startswith("f__") and name != "f__Etot":
                    _, key_name, lid = name.split("__")
                    feats.setdefault(key_name, {})[int(lid)] = z[name]
            for key_name in feats:
                if isinstance(feats[key_name], dict):
                    feats[key_name] = dict(sorted(feats[key_name].items()))
            scan.features = feats
            return scan
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------
# classifier

def high_level_inputs(features, einc, geom):
    """cls-high inputs (also the FPD/KPD features), float64, in the reference's column order."""
    rel, alpha = geom.relevant_layers, geom.layers_binned_in_alpha
    f = features
    cols = [np.log10(einc)]
    cols += [np.log10(f["E_layer"][lid] + 1e-8) for lid in rel]
    for key in ("EC_eta", "EC_phi", "width_eta", "width_phi"):
        cols += [f[key][lid] / 1e2 for lid in alpha]
    cols.append(np.log10(f["Etot"] + 1e-8))
    cols += [f["sparsity"][lid] for lid in rel]
    cols += [f["EC_r"][lid] / 1e2 for lid in rel]
    cols += [f["width_r"][lid] / 1e2 for lid in rel]
    return np.stack(cols, axis=1)


def split_sizes(n_events, dataset):
    """(train, test, validation) events per sample: the reference's numbers, scaled down for smaller files."""
    full = CLS_SPLITS[dataset]
    total = sum(full)
    if n_events >= total:
        return full
    sizes = tuple(int(n_events * k / total) for k in full)
    if min(sizes) < 1:
        raise UserError(f"{n_events} events are too few for the classifier (needs at least "
                        f"{math.ceil(total / min(full))} per file)")
    return sizes


def _split(x_gen, x_ref, sizes, rng):
    """Seeded train/test/validation sets: the same number of generated (label 0) and reference (label 1) events."""
    bounds = np.cumsum((0,) + tuple(sizes))
    pg = rng.permutation(len(x_gen))
    pr = rng.permutation(len(x_ref))
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        x = np.concatenate([x_gen[pg[a:b]], x_ref[pr[a:b]]]).astype(np.float32, copy=False)
        y = np.concatenate([np.zeros(b - a, np.float32), np.ones(b - a, np.float32)])
        order = rng.permutation(len(y))
        out.append((x[order], y[order]))
    return out


def _keras(seed):
    """Import Keras lazily, quietly and deterministically."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")     # quieter, and bit-for-bit reruns on CPU
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    return keras


def build_classifier(keras, input_dim, n_layer=2, n_hidden=2048, dropout=0.0):
    """The reference DNN: input layer + ``n_layer`` hidden layers (LeakyReLU 0.01, dropout), one logit out."""
    inp = keras.Input((input_dim,), name="features")
    x = inp
    for _ in range(n_layer + 1):
        x = keras.layers.Dense(n_hidden)(x)
        x = keras.layers.LeakyReLU(negative_slope=0.01)(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout)(x)
    out = keras.layers.Dense(1)(x)
    return keras.Model(inp, out, name="calokit_classifier")


#: ResNet depth -> basic blocks per stage (the reference's depths 10, 18, 34)
RESNET_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
RESNET_FILTERS = (32, 64, 64, 128)
RESNET_STRIDES = (1, 2, 2, 2)


def resnet_image_shape(geom):
    """(layers, alpha bins, r bins) of a dataset whose layers share one binning (datasets 2, 3), else None.

    The voxels of a file run layer by layer, alpha bin by alpha bin, r fastest, so a C-order reshape of the
    voxel columns gives this image."""
    layers = [lay for lay in geom.layers if lay.n_voxels]
    first = layers[0]
    if any(lay.n_alpha != first.n_alpha or lay.n_voxels != first.n_voxels for lay in layers):
        return None
    return len(layers), first.n_alpha, first.n_voxels // first.n_alpha


def build_resnet(keras, input_dim, image_shape, depth=18):
    """The reference's 3D ResNet classifier on [log10 E_inc term, voxels / E_inc] rows, one logit out.

    The first column goes through a batch-norm; the voxels become one channel of ``image_shape`` (layers, alpha,
    r); stem: 7x7x7 convolution, stride 2, padding 3, no bias, batch-norm, ReLU, 3x3x3 max-pool, stride 2,
    padding 1; four stages of basic residual blocks (filters 32, 64, 64, 128; strides 1, 2, 2, 2; blocks per
    stage by depth: 10 -> 1,1,1,1, 18 -> 2,2,2,2, 34 -> 3,4,6,3); global average pool; a dense layer on
    [pooled features, normalised energy]. Symmetric paddings are explicit ZeroPadding3D before 'valid' layers
    (Keras 'same' pads asymmetrically for stride 2); the max-pool's zero padding equals the reference's -inf
    padding because it follows a ReLU. Batch-norms use the reference's epsilon 1e-5 and momentum (0.9 here).
    """
    if depth not in RESNET_BLOCKS:
        raise UserError(f"--cls_resnet_layers must be one of {', '.join(map(str, RESNET_BLOCKS))}, got {depth}")
    L = keras.layers
    init = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")

    def conv(x, filters, size, stride, pad):
        if pad:
            x = L.ZeroPadding3D(pad)(x)
        return L.Conv3D(filters, size, strides=stride, padding="valid", use_bias=False, kernel_initializer=init)(x)

    def norm(x):
        return L.BatchNormalization(epsilon=1e-5, momentum=0.9)(x)

    def basic_block(x, filters, stride):
        y = L.ReLU()(norm(conv(x, filters, 3, stride, 1)))
        y = norm(conv(y, filters, 3, 1, 1))
        if stride != 1 or x.shape[-1] != filters:
            x = norm(conv(x, filters, 1, stride, 0))
        return L.ReLU()(L.Add()([y, x]))

    inp = keras.Input((input_dim,), name="features")
    energy = norm(L.Lambda(lambda t: t[:, :1], output_shape=(1,))(inp))
    x = L.Lambda(lambda t: t[:, 1:], output_shape=(input_dim - 1,))(inp)
    x = L.Reshape(tuple(image_shape) + (1,))(x)
    x = L.ReLU()(norm(conv(x, RESNET_FILTERS[0], 7, 2, 3)))
    x = L.MaxPooling3D(3, strides=2, padding="valid")(L.ZeroPadding3D(1)(x))
    for filters, stride, blocks in zip(RESNET_FILTERS, RESNET_STRIDES, RESNET_BLOCKS[depth]):
        for i in range(blocks):
            x = basic_block(x, filters, stride if i == 0 else 1)
    x = L.GlobalAveragePooling3D()(x)
    out = L.Dense(1)(L.Concatenate()([x, energy]))
    return keras.Model(inp, out, name=f"calokit_resnet{depth}")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _predict(model, x, batch=8192):
    """Sigmoid probabilities of a logit model, batch by batch."""
    return _sigmoid(np.concatenate([np.asarray(model(x[i:i + batch], training=False)).reshape(-1)
                                    for i in range(0, len(x), batch)]))


def _bce(p, y):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def classifier_batch(batch_size, n_train, dataset):
    """Batch size giving a small file the reference's optimizer steps per epoch on the full-size files.

    The reference trains on 2 x 80000 (dataset 1) or 2 x 60000 (datasets 2, 3) events in batches of 1000: 160 or
    120 steps an epoch. A smaller file keeps that number of steps (the same optimisation budget for the same
    ``--cls_n_epochs``) with proportionally smaller batches, so it costs no more time per epoch: batches of
    n_train / 80 (n_train / 60) events, at least MIN_CLS_BATCH and at most ``batch_size``.

    >>> classifier_batch(1000, 80000, "1-photons"), classifier_batch(1000, 9917, "1-photons")
    (1000, 124)
    """
    steps = math.ceil(CLS_SPLITS[dataset][0] / 1000)
    return max(1, min(int(batch_size), max(MIN_CLS_BATCH, math.ceil(n_train / steps))))


def train_classifier(x_gen, x_ref, sizes, n_layer=2, n_hidden=2048, dropout=0.0, batch_size=1000, n_epochs=50,
                     lr=2e-4, seed=DEFAULT_SEED, log=None, builder=None, standardise=True):
    """Train the generated-vs-reference classifier and return its calibrated validation scores.

    ``standardise``: inputs are shifted and scaled by the mean and standard deviation of the training split.

    ``builder(keras, input_dim)`` makes the model (one logit out); default the reference MLP
    (:func:`build_classifier` with ``n_layer``, ``n_hidden``, ``dropout``).

    Returns a dict: auc, jsd (calibrated, validation), auc_uncalibrated, jsd_uncalibrated, accuracy, best_epoch,
    n_train/n_test/n_val (events per sample).
    """
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    (xtr, ytr), (xte, yte), (xva, yva) = _split(x_gen, x_ref, sizes, rng)
    if standardise:          # mean / std of the training split, applied to all three (calokit; the reference does not)
        mu, sd = xtr.mean(axis=0), xtr.std(axis=0)
        sd[sd == 0] = 1.0
        xtr, xte, xva = ((x - mu) / sd for x in (xtr, xte, xva))
    keras = _keras(seed)
    model = (builder or functools.partial(build_classifier, n_layer=n_layer, n_hidden=n_hidden,
                                          dropout=dropout))(keras, xtr.shape[1])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    best_acc, best_epoch, best_weights = -np.inf, 0, model.get_weights()
    for epoch in range(1, n_epochs + 1):
        order = rng.permutation(len(ytr))      # seeded numpy shuffling, plain batches (no tf.data pipeline)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            model.train_on_batch(xtr[idx], ytr[idx])
        p = _predict(model, xte)
        acc = float(np.mean((p > 0.5) == (yte > 0.5)))
        if log:
            log(f"classifier epoch {epoch}/{n_epochs}: test accuracy {acc:.4f}")
        if acc > best_acc:
            best_acc, best_epoch, best_weights = acc, epoch, model.get_weights()
        if acc == 1.0:
            break
    model.set_weights(best_weights)
    p_test = _predict(model, xte)
    p_val = _predict(model, xva)
    calib = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1.0 - 1e-6).fit(p_test, yte)
    r_val = calib.predict(p_val)
    ln2 = math.log(2.0)
    return {
        "auc": float(roc_auc_score(yva, r_val)),
        "jsd": float((ln2 - _bce(r_val, yva)) / ln2),
        "accuracy": float(np.mean((r_val > 0.5) == (yva > 0.5))),
        "auc_uncalibrated": float(roc_auc_score(yva, p_val)),
        "jsd_uncalibrated": float((ln2 - _bce(p_val, yva)) / ln2),
        "best_epoch": int(best_epoch),
        "best_test_accuracy": float(best_acc),
        "batch_size": int(batch_size), "epochs": int(n_epochs), "lr": float(lr),
        "n_layer": int(n_layer), "n_hidden": int(n_hidden), "dropout": float(dropout),
        "optimizer_steps": int(n_epochs * math.ceil(len(ytr) / batch_size)),
        "input_standardisation": "mean/std of the training split" if standardise else "none",
        "n_train": int(sizes[0]), "n_test": int(sizes[1]), "n_val": int(sizes[2]),
        "n_parameters": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
    }


def histogram_separation(scan_a, scan_b, ranges, dataset):
    """The largest E_tot/E_inc separation power between two files, over all events and per energy range:
    (value, where). What the classifier warning compares with."""
    best = (separation_power(bin_fractions(scan_a.etot_over_einc(), ETOT_BINS),
                             bin_fractions(scan_b.etot_over_einc(), ETOT_BINS)), "all energies")
    for i in range(len(ranges) - 1):
        sel_a = (scan_a.einc >= ranges[i]) & (scan_a.einc < ranges[i + 1])
        sel_b = (scan_b.einc >= ranges[i]) & (scan_b.einc < ranges[i + 1])
        if sel_a.sum() >= 50 and sel_b.sum() >= 50:
            bins = per_energy_bins(dataset, i)
            sep = separation_power(bin_fractions(scan_a.etot_over_einc(sel_a), bins),
                                   bin_fractions(scan_b.etot_over_einc(sel_b), bins))
            if sep > best[0]:
                best = (sep, energy_label(ranges[i]))
    return best


def classifier_warning(kind, res, separation, args):
    """A warning (str) when a classifier ended at chance although E_tot/E_inc separates the files, else None."""
    sep, where = separation
    if res["auc"] < CHANCE_AUC and sep > CLEAR_SEPARATION:
        return (f"{kind}: AUC {res['auc']:.3f} (best test accuracy {res['best_test_accuracy']:.3f}) is chance level, "
                f"yet E_tot/E_inc separates the files (separation power {sep:.2f} at {where}): the classifier did "
                f"not learn in {res['optimizer_steps']} steps; raise --cls_n_epochs (now {args.cls_n_epochs}) "
                f"or --cls_lr")
    return None


# ----------------------------------------------------------------------------------------------
# FPD / KPD (numpy/scipy; JetNet's definitions as called by the reference)

def normalise_by_reference(real, gen):
    """Divide every feature by its maximum |value| in the reference (features that are all 0 are left alone)."""
    m = np.max(np.abs(real), axis=0)
    m[m == 0] = 1.0
    return real / m, gen / m


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) of two Gaussians."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fpd(real, gen, min_samples=10000, max_samples=50000, num_batches=20, num_points=10, seed=DEFAULT_SEED,
        normalise=True):
    """Frechet physics distance extrapolated to infinite batch size, and its error (JetNet's procedure).

    For ``num_points`` batch sizes N evenly spaced in 1/N, the Frechet distance of ``num_batches`` bootstrap
    batches is averaged; a straight line in 1/N (non-negative intercept and slope) gives the value at 1/N = 0.
    """
    from scipy.optimize import curve_fit

    x, y = (normalise_by_reference(real, gen) if normalise else (np.asarray(real), np.asarray(gen)))
    batches = (1.0 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype("int32")
    rng = np.random.default_rng(seed)
    vals = []
    for size in batches:
        points = []
        for _ in range(num_batches):
            a = x[rng.choice(len(x), size=size)]
            b = y[rng.choice(len(y), size=size)]
            points.append(frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False),
                                           b.mean(axis=0), np.cov(b, rowvar=False)))
        vals.append(np.mean(points))

    def line(t, intercept, slope):
        return intercept + slope * t

    params, cov = curve_fit(line, 1.0 / batches, vals, bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(np.diag(cov)[0]))


def _kernel_sum(a, b, degree, same, block=1024):
    """Sum of the polynomial kernel (a.b/d + 1)^degree over all pairs (minus the diagonal when a is b)."""
    gamma = 1.0 / a.shape[1]
    total = 0.0
    for i in range(0, len(a), block):
        k = (a[i:i + block] @ b.T * gamma + 1.0) ** degree
        total += float(k.sum())
        if same:
            r = np.arange(k.shape[0])
            total -= float(k[r, i + r].sum())
    return total


def mmd2_poly_unbiased(x, y, degree=4):
    """Unbiased estimate of MMD^2 with the polynomial kernel (x.y/d + 1)^degree (blocked: bounded memory)."""
    m, n = len(x), len(y)
    return (_kernel_sum(x, x, degree, True) / (m * (m - 1)) + _kernel_sum(y, y, degree, True) / (n * (n - 1))
            - 2.0 * _kernel_sum(x, y, degree, False) / (m * n))


def kpd(real, gen, num_batches=10, batch_size=10000, seed=DEFAULT_SEED, normalise=True):
    """Kernel physics distance: median of unbiased MMD^2 over bootstrap batches; error = half the 16-84% range."""
    from scipy.stats import iqr

    x, y = (normalise_by_reference(real, gen) if normalise else (np.asarray(real), np.asarray(gen)))
    vals = []
    for i in range(num_batches):
        rng = np.random.default_rng(seed + i * 1000)
        a = x[rng.choice(len(x), size=batch_size)]
        b = y[rng.choice(len(y), size=batch_size)]
        vals.append(mmd2_poly_unbiased(a, b))
    return float(np.median(vals)), float(iqr(vals, rng=(16.275, 83.725)) / 2)


# ----------------------------------------------------------------------------------------------
# precision, recall, density, coverage (Naeem et al. 2020) with bounded memory

#: the distance products are float32 up to this many features (dataset 1), float64 above (datasets 2, 3): the
#: float32 error bound grows with the features, and with it the share of comparisons that must be recomputed
PRDC_FLOAT32_MAX_FEATURES = 1024
PRDC_BLOCK_MB = 256            # float32 distance rows held at once (one block of rows x all columns)
PRDC_RECOMPUTE_MB = 32         # float64 differences of the pairs recomputed exactly per batch


def prdc_features(showers):
    """The reference's prdc inputs for thresholded ``showers``: log10 of the energies, zeros replaced by 0.1 MeV
    (in the showers' dtype, as the reference computes them)."""
    return np.log10(np.where(showers == 0, showers.dtype.type(0.1), showers))


def exact_sq_distances(x, y, rows, cols):
    """Squared Euclidean distances of the pairs (x[rows], y[cols]) as ``sum((x - y)^2)`` in float64, in batches.

    This is the definition the prdc numbers follow: every decision that the fast float32 products cannot settle
    is taken on these values, so results equal a straightforward full-matrix implementation on them.
    """
    out = np.empty(len(rows))
    batch = max(1, PRDC_RECOMPUTE_MB * 2**20 // (16 * x.shape[1]))
    for s in range(0, len(rows), batch):
        r, c = rows[s:s + batch], cols[s:s + batch]
        out[s:s + len(r)] = ((x[r].astype(np.float64) - y[c].astype(np.float64)) ** 2).sum(axis=-1)
    return out


class _DistanceBlocks:
    """Approximate squared distances of row blocks of ``x`` to all of ``y`` as one matrix product per block.

    Both sets are centred on the mean of ``x`` (distances do not change, the norms and hence the rounding shrink)
    and augmented so that the product gives the distance directly:
    [-2 x, |x|^2, 1] . [y, 1, |y|^2] = |x - y|^2. The product is float32 for up to
    :data:`PRDC_FLOAT32_MAX_FEATURES` features, else float64. ``tol_rows`` / ``tol_cols`` bound the error of an
    entry: the dot-product bound (d + 2) u sum|terms| <= 2 (d + 2) u (|x|^2 + |y|^2), with a factor 2 for the
    rounding of the inputs and as margin.
    """

    def __init__(self, x, y, centre, block_mb=PRDC_BLOCK_MB):
        self.x, self.y, self.centre = x, y, centre
        self.dtype = np.dtype(np.float32 if x.shape[1] <= PRDC_FLOAT32_MAX_FEATURES else np.float64)
        budget = block_mb * 2**20                 # the block of products, and the float64 temporaries of a row block
        self.rows = max(1, int(min(budget // (self.dtype.itemsize * max(len(y), 1)),
                                   budget // (24 * (y.shape[1] + 2)))))
        self.y_aug = np.empty((len(y), y.shape[1] + 2), dtype=self.dtype)
        ny = np.empty(len(y))
        for s in range(0, len(y), self.rows):                 # block by block: no float64 copy of a whole set
            self.y_aug[s:s + self.rows], ny[s:s + self.rows] = self._augment(y[s:s + self.rows], right=True)
        nx = ny if x is y else np.concatenate([self._augment(x[s:s + self.rows], False)[1]
                                               for s in range(0, len(x), self.rows)])
        tol = 4 * (x.shape[1] + 8) * float(np.finfo(self.dtype).eps) / 2
        self.tol_rows = tol * (nx + ny.max(initial=0.0))
        self.tol_cols = tol * (ny + nx.max(initial=0.0))

    def _augment(self, a, right):
        """[a, 1, |a|^2] (right) or [-2 a, |a|^2, 1] (left) of the centred rows ``a`` in the product dtype, and
        the norms."""
        c = a.astype(np.float64) - self.centre
        n = np.einsum("ij,ij->i", c, c)
        ones = np.ones((len(c), 1))
        parts = [c, ones, n[:, None]] if right else [-2.0 * c, n[:, None], ones]
        return np.concatenate(parts, axis=1).astype(self.dtype), n

    def __iter__(self):
        """Yield (start, stop, approximate squared distances (stop - start, len(y)))."""
        for s in range(0, len(self.x), self.rows):
            e = min(s + self.rows, len(self.x))
            yield s, e, self._augment(self.x[s:e], right=False)[0] @ self.y_aug.T


def _decide_less(blocks, a, s, thresholds, tol, axis):
    """Exact ``d^2 < threshold`` for a block of approximate distances ``a``: settled where the product entry is
    farther than ``tol`` from the threshold, recomputed exactly where it is not. ``axis`` 1: thresholds per row
    of the block (indices s..), 0: per column."""
    shape = (-1, 1) if axis == 1 else (1, -1)
    thr, t = (thresholds[s:s + len(a)], tol[s:s + len(a)]) if axis == 1 else (thresholds, tol)
    less = a < (thr - t).astype(a.dtype).reshape(shape)
    maybe = a <= (thr + t).astype(a.dtype).reshape(shape)
    maybe &= ~less
    r, c = np.nonzero(maybe)
    if len(r):
        below = exact_sq_distances(blocks.x, blocks.y, r + s, c) < thr[r if axis == 1 else c]
        less[r[below], c[below]] = True
    return less


def _block_progress(log, what, n):
    """A callable reporting ``what: done/n rows`` through ``log`` at most every PROGRESS_EVERY_S (and at the end)."""
    last = [time.monotonic()]

    def tick(done):
        if log and (done >= n or time.monotonic() - last[0] > PROGRESS_EVERY_S):
            last[0] = time.monotonic()
            log(f"{what}: {done}/{n} rows")
    return tick


def knn_radii(x, k, centre=None, block_mb=PRDC_BLOCK_MB, n_probe=4096, log=None, what="prdc radii"):
    """Squared distance of each row of ``x`` to its k-th nearest *other* row: the (k+1)-th smallest of
    ``exact_sq_distances`` to all rows including itself (at distance 0), the reference's rule (duplicates count).

    Per block of rows, on the approximate distances a: an upper bound of the (k+1)-th smallest from ``n_probe``
    seeded columns (``np.partition`` on those only); the entries below it (a few per row); among them the (k+1)-th
    smallest t of the row; every entry within twice the error bound above t recomputed exactly; the (k+1)-th
    smallest of those exact values is the radius (every entry that can be at or below it was recomputed).
    """
    if len(x) <= k:
        raise UserError(f"prdc needs more than k = {k} events per sample, got {len(x)}")
    blocks = _DistanceBlocks(x, x, np.mean(x, axis=0, dtype=np.float64) if centre is None else centre, block_mb)
    probe = np.sort(np.random.default_rng(0).permutation(len(x))[:max(n_probe, k + 1)])
    radii = np.empty(len(x))
    tick = _block_progress(log, what, len(x))
    for s, e, a in blocks:
        tol2 = 2.0 * blocks.tol_rows[s:e]
        bound = np.partition(a[:, probe], k, axis=1)[:, k] + tol2
        r, c = np.nonzero(a <= bound.astype(a.dtype)[:, None])
        v = a[r, c]
        t = _kth_per_row(r, v, k, e - s)                      # the (k+1)-th smallest approximate entry of each row
        near = v <= (t + tol2).astype(a.dtype)[r]
        r, c = r[near], c[near]
        radii[s:e] = _kth_per_row(r, exact_sq_distances(x, x, r + s, c), k, e - s)
        tick(e)
    return radii


def _kth_per_row(rows, values, k, n_rows):
    """The (k+1)-th smallest of ``values`` per row index (each row 0..n_rows-1 has more than k entries)."""
    order = np.lexsort((values, rows))
    return values[order][np.searchsorted(rows[order], np.arange(n_rows)) + k]


def prdc(real, fake, k=5, block_mb=PRDC_BLOCK_MB, log=None):
    """Precision, recall, density and coverage of ``fake`` (M rows) against ``real`` (N rows), k-NN radii as in
    the reference (prdc package): r_k(X_i) = distance to the k-th nearest other row of the same set.

    precision = fraction of fake rows within some real row's radius; recall = fraction of real rows within some
    fake row's radius; density = (1 / (k M)) * #pairs (real i, fake j) with d < r_k(real i); coverage = fraction of
    real rows whose nearest fake row is within their radius. Strict ``<`` on squared distances throughout.
    Memory: the two feature sets, an augmented copy of one (float32; float64 above 1024 features) and one block of
    products (``block_mb``).
    """
    real, fake = np.asarray(real), np.asarray(fake)
    centre = np.mean(real, axis=0, dtype=np.float64)
    r_real = knn_radii(real, k, centre, block_mb, log=log, what="prdc 1/3, reference radii")
    r_fake = knn_radii(fake, k, centre, block_mb, log=log, what="prdc 2/3, generated radii")
    tick = _block_progress(log, "prdc 3/3, reference x generated", len(real))
    blocks = _DistanceBlocks(real, fake, centre, block_mb)
    precise = np.zeros(len(fake), dtype=bool)           # fake j inside some real radius
    recalled = np.zeros(len(real), dtype=bool)          # real i with some fake radius around it
    covered = np.zeros(len(real), dtype=bool)
    pairs = 0
    for s, e, a in blocks:
        inside_real = _decide_less(blocks, a, s, r_real, blocks.tol_rows, axis=1)
        precise |= inside_real.any(axis=0)
        pairs += int(np.count_nonzero(inside_real))
        covered[s:e] = inside_real.any(axis=1)
        del inside_real
        recalled[s:e] = _decide_less(blocks, a, s, r_fake, blocks.tol_cols, axis=0).any(axis=1)
        tick(e)
    return {"precision": float(precise.mean()), "recall": float(recalled.mean()),
            "density": (1.0 / float(k)) * (pairs / len(fake)), "coverage": float(covered.mean())}


def build_histograms(dataset, geom, ref, gen, threshold, ranges, voxel_bins):
    """Every histogram of the evaluation as dicts (name, bins, ref/gen bin fractions, plot file, reported flag).

    Order = the reference's order in histogram_chi2_<d>.txt: Etot/Einc, E layer, EC Eta, EC Phi, Width Eta,
    Width Phi, (dataset 1) Etot/Einc per incident energy, voxel distribution; then the calokit additions
    (EC R, Width R, sparsity), which are not written to the text file.
    """
    d = dataset
    files = {"E_layer": "E_layer", "EC_eta": "ECEta_layer", "EC_phi": "ECPhi_layer", "width_eta": "WidthEta_layer",
             "width_phi": "WidthPhi_layer"}
    grids = {"EC_r": "ECR", "width_r": "WidthR", "sparsity": "Sparsity"}      # calokit additions: one grid each

    def item(name, bins, values_ref, values_gen, file, xlabel, logx=False, reported=True, **extra):
        return dict(name=name, bins=bins, ref=bin_fractions(values_ref, bins), gen=bin_fractions(values_gen, bins),
                    file=file, xlabel=xlabel, logx=logx, reported=reported, **extra)

    out = [item("Etot / Einc", ETOT_BINS, ref.etot_over_einc(), gen.etot_over_einc(),
                f"Etot_Einc_dataset_{d}.png", "Etot / Einc")]
    extras = []
    for name, key, lid, bins, reported in histogram_specs(d, geom, ref.features, threshold, ref.dtype):
        xlabel = "E (MeV)" if key == "E_layer" else ("fraction of empty voxels" if key == "sparsity" else "mm")
        if key in grids:
            h = item(name, bins, ref.features[key][lid], gen.features[key][lid], None, xlabel, reported=reported,
                     grid=f"{grids[key]}_dataset_{d}.png", panel=f"layer {lid}")
        else:
            h = item(name, bins, ref.features[key][lid], gen.features[key][lid],
                     f"{files[key]}_{lid}_dataset_{d}.png", xlabel, logx=key == "E_layer", reported=reported)
        (out if reported else extras).append(h)
    if d.startswith("1"):
        for i in range(len(ranges) - 1):
            lo, hi = ranges[i], ranges[i + 1]
            sr = (ref.einc >= lo) & (ref.einc < hi)
            sg = (gen.einc >= lo) & (gen.einc < hi)
            out.append(item(f"Etot / Einc at E = {float(lo)}", per_energy_bins(d, i),
                            ref.etot_over_einc(sr), gen.etot_over_einc(sg),
                            None, "Etot / Einc", grid=f"Etot_Einc_dataset_{d}_E_i.png",
                            panel=energy_label(float(lo))))
    out.append(dict(name="Voxel distribution", bins=voxel_bins, ref=fractions(ref.voxel_counts),
                    gen=fractions(gen.voxel_counts), file=f"voxel_energy_dataset_{d}.png", xlabel="E (MeV)",
                    logx=True, reported=True))
    return out + extras


# ----------------------------------------------------------------------------------------------
# plots (Agg, no LaTeX)

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["text.usetex"] = False
    return plt


def _savefig(fig, path, dpi):
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return path


class HistPlotter:
    """Draws reference-vs-generated histograms by updating the artists of one figure (fast for hundreds of plots)."""

    def __init__(self, dpi, label="generated"):
        from matplotlib.ticker import NullLocator

        self.plt = _plt()
        self.null = NullLocator
        self.fig, self.ax = self.plt.subplots(figsize=(5, 5))
        self.fig.subplots_adjust(left=0.16, right=0.96, bottom=0.11, top=0.93)
        self.dpi = dpi
        ax = self.ax
        self.ref = ax.stairs([0.0], [0.0, 1.0], fill=True, alpha=0.25, color="tab:gray", label="reference")
        self.gen = ax.stairs([0.0], [0.0, 1.0], linewidth=2, color="tab:blue", label=label)
        self.text = ax.text(0.02, 0.98, "", transform=ax.transAxes, va="top", fontsize=8)
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylabel("density")

    def draw(self, path, bins, frac_ref, frac_gen, title, xlabel, sep, logx=False, logy=True):
        ax = self.ax
        width = np.diff(bins)
        dens_ref, dens_gen = frac_ref / width, frac_gen / width
        self.ref.set_data(dens_ref, bins)
        self.gen.set_data(dens_gen, bins)
        ax.set_xscale("log" if logx else "linear")
        ax.set_xlim(bins[0], bins[-1])
        both = np.concatenate([dens_ref, dens_gen])
        positive = both[both > 0]
        if logy and positive.size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)     # fill baseline at 0 on a log axis
                ax.set_yscale("log")
            ax.set_ylim(positive.min() / 2.0, positive.max() * 3.0)
        else:
            ax.set_yscale("linear")
            ax.set_ylim(0.0, max(float(both.max()), 1e-12) * 1.2)
        ax.xaxis.set_minor_locator(self.null())
        ax.yaxis.set_minor_locator(self.null())
        ax.set_title(title, fontsize=10, y=1.0)       # a fixed position: no overlap search at each draw
        ax.set_xlabel(xlabel)
        self.text.set_text(f"separation power {sep:.4g}")
        return _savefig(self.fig, path, self.dpi)

    def close(self):
        self.plt.close(self.fig)


def _draw_histogram_batch(dpi, jobs, label="generated"):
    plotter = HistPlotter(dpi, label)
    try:
        return [plotter.draw(path, bins, fr, fg, title, xlabel, sep, logx=logx)
                for path, bins, fr, fg, title, xlabel, sep, logx in jobs]
    finally:
        plotter.close()


def _fork_context():
    """The multiprocessing 'fork' context where forking is quick and safe, else None.

    Never fork a process that already runs TensorFlow's thread pools (classifier modes, tests).
    """
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods() or "tensorflow" in sys.modules:
        return None
    return multiprocessing.get_context("fork")


def worker_pool(n_workers):
    """``n_workers`` forked worker processes (None for none, or where forking is unsafe).

    Started before any file is read, so each worker stays small (its resident set is what the main process held
    at the fork).
    """
    context = _fork_context()
    if n_workers < 1 or context is None:
        return None
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(n_workers, mp_context=context)


def load_matplotlib():
    """Import matplotlib in a worker ahead of its plots (returns None: nothing to ship back)."""
    _plt()


def scan_in_worker(plots, *args, **kwargs):
    """:func:`scan_file` in a worker, which then loads matplotlib for the plots to come."""
    scan = scan_file(*args, **kwargs)
    if plots:
        load_matplotlib()
    return scan


def draw_histograms(jobs, dpi, n_workers=1, extra=(), pool=None, label="generated"):
    """Draw every histogram PNG; in ``pool`` or, with n_workers > 1, in that many processes (PNG rendering is
    CPU-bound).

    ``extra`` are picklable zero-argument callables returning a written path (the larger summary figures); they
    are queued to the same workers, biggest first, so the cores stay busy until the last plot.
    """
    if pool is None:
        n_workers = max(1, min(int(n_workers), len(jobs) // 10))     # a worker only pays off for many plots
        if n_workers == 1:
            return _draw_histogram_batch(dpi, jobs, label) + [draw() for draw in extra]
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = _fork_context() or multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n_workers, mp_context=context) as own_pool:
            return draw_histograms(jobs, dpi, n_workers, extra, own_pool, label)
    n_workers = max(1, int(n_workers))
    batches = [jobs[k::n_workers] for k in range(n_workers)]     # one figure each: its first draw costs 3x
    own = [pool.submit(draw) for draw in extra]
    futures = [pool.submit(_draw_histogram_batch, dpi, batch, label) for batch in batches]
    return [path for fut in futures for path in fut.result()] + [fut.result() for fut in own]


def plot_layer_comparison(geom, mean_gen, mean_ref, out_dir, dataset, dpi):
    """Average_Layer_<L>_dataset_<d>.png: reference and generated mean shower of each layer, same colour scale."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    written = []
    vmax = max(float(np.max(mean_ref)), 1e-1)
    norm = LogNorm(vmin=1e-2, vmax=vmax)
    for lid in geom.relevant_layers:
        lay = geom.layer(lid)
        a, b = geom.offsets[lid]
        fig = plt.figure(figsize=(8, 4))
        ax1 = fig.add_subplot(1, 2, 1, polar=True)
        draw_layer(ax1, lay, mean_ref[a:b], norm)
        ax1.set_title(f"Reference layer {lid}")
        ax2 = fig.add_subplot(1, 2, 2, polar=True)
        pcm = draw_layer(ax2, lay, mean_gen[a:b], norm)
        ax2.set_title(f"Generated layer {lid}")
        fig.colorbar(pcm, ax=[ax1, ax2], label="mean energy (MeV)", shrink=0.8)
        written.append(_savefig(fig, os.path.join(out_dir, f"Average_Layer_{lid}_dataset_{dataset}.png"), dpi))
        plt.close(fig)
    return written


def plot_average_shower(geom, mean, path, title, dpi):
    """All layers of a mean shower, drawn by HighLevelFeatures.draw_shower."""
    return draw_shower(geom, mean, path, title, dpi=dpi)


def occupied_range(bins, *fracs, margin=1, tail=1e-3):
    """(lo, hi) x range covering the bins that hold all but a fraction ``tail`` of the entries of ``fracs`` (split
    between both ends; ``margin`` bins added each side), so a distribution that fills a few bins of a wide
    reference binning is not drawn as a spike at the edge.

    >>> occupied_range(np.linspace(0, 10, 11), np.array([0, 0, 1, 2, 0, 0, 0, 0, 0, 0.]))
    (1.0, 5.0)
    """
    total = np.sum([np.asarray(f, dtype=np.float64) for f in fracs], axis=0)
    if not total.sum() > 0:
        return float(bins[0]), float(bins[-1])
    c = np.cumsum(total) / total.sum()
    first = int(np.searchsorted(c, 0.5 * tail, side="right"))
    last = int(np.searchsorted(c, 1.0 - 0.5 * tail, side="left"))
    lo = max(first - margin, 0)
    hi = min(last + 1 + margin, len(bins) - 1)
    return float(bins[lo]), float(bins[hi])


def plot_histogram_grid(titles, fracs, bins_list, seps, path, xlabel, dpi, label="generated"):
    """Reference-vs-generated histograms on one grid of panels, the legend in the panel after the last.

    Used for the per-energy Etot/Einc histograms of dataset 1 (``Etot_Einc_dataset_<d>_E_i.png``) and for the
    calokit additions EC R, Width R and sparsity (one figure per quantity, a panel per layer).
    """
    plt = _plt()
    n_cols = max(2, math.ceil(math.sqrt(len(titles) + 1)))
    n_rows = math.ceil((len(titles) + 1) / n_cols)
    fig = plt.figure(figsize=(3 * n_cols, 3 * n_rows))
    for i, title in enumerate(titles):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        bins = bins_list[i]
        fr, fg = fracs[i]
        ax.stairs(fr / np.diff(bins), bins, fill=True, alpha=0.25, color="tab:gray", label="reference")
        ax.stairs(fg / np.diff(bins), bins, linewidth=2, color="tab:blue", label=label)
        ax.set_title(f"{title}  (sep {seps[i]:.3g})", fontsize=9, y=1.0)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xlim(*occupied_range(bins, fr, fg))
        ax.tick_params(labelsize=7)
        if i % n_cols == 0:
            ax.set_ylabel("density (1 / x unit)", fontsize=8)
        ax.locator_params(axis="x", nbins=4)
        ax.locator_params(axis="y", nbins=4)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax = fig.add_subplot(n_rows, n_cols, len(titles) + 1)
    ax.legend(handles=[Patch(color="tab:gray", alpha=0.25, label="reference"),
                       Line2D([], [], color="tab:blue", linewidth=2, label=label)], loc="center", fontsize=14)
    ax.axis("off")
    height = 3 * n_rows                                          # margins fixed in inches: titles, x labels
    fig.subplots_adjust(left=0.6 / (3 * n_cols), right=0.98, bottom=0.55 / height, top=1 - 0.35 / height,
                        wspace=0.3, hspace=0.4)
    _savefig(fig, path, dpi)
    plt.close(fig)
    return path


def energy_label(energy):
    """256 -> 'E = 256 MeV', 4096 -> 'E = 4.1 GeV', 2097152 -> 'E = 2.1 TeV'."""
    if energy < 1e3:
        return f"E = {energy:.0f} MeV"
    return f"E = {energy / 1e3:.1f} GeV" if energy < 1e6 else f"E = {energy / 1e6:.1f} TeV"


def display_name(name):
    """A histogram name for a plot: 'Etot / Einc at E = 4194304.0' -> 'Etot / Einc at E = 4.2 TeV'."""
    head, sep, energy = name.partition(" at E = ")
    if not sep:
        return name
    try:
        return f"{head} at {energy_label(float(energy))}"
    except ValueError:
        return name


def plot_separation_summary(seps, path, dataset, dpi):
    """separation_power_dataset_<d>.png: every separation power by feature family and layer (log scale)."""
    plt = _plt()
    families = {}
    singles = {}
    for name, val in seps.items():
        if " layer " in name:
            fam, lid = name.rsplit(" layer ", 1)
            families.setdefault(fam, []).append((int(lid), val))
        else:
            singles[name] = val
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": (3, 1.3)})
    floor = 1e-6
    markers = "osD^v<>px*h"
    for k, (fam, pts) in enumerate(families.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [max(p[1], floor) for p in pts], marker=markers[k % len(markers)],
                linestyle="-", linewidth=0.8, markersize=4, label=fam)
    from matplotlib.ticker import NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())      # minor log ticks cost a third of the figure's drawing time
    ax.set_xlabel("layer")
    ax.set_ylabel("separation power")
    ax.set_title(f"Per-layer separation powers, dataset {dataset}", y=1.0)
    ax.legend(fontsize=7, ncol=2)
    names = list(singles)
    ax2.barh(range(len(names)), [max(singles[n], floor) for n in names], color="tab:blue")
    ax2.set_yticks(range(len(names)), [display_name(n) for n in names], fontsize=7)
    ax2.set_xlabel("separation power")
    ax2.set_xscale("log")
    ax2.xaxis.set_minor_locator(NullLocator())
    ax2.invert_yaxis()
    ax2.set_title("Other histograms", y=1.0)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.93, wspace=0.45)   # fixed: tight_layout
    _savefig(fig, path, dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# text outputs



def chi2_text(reported):
    """histogram_chi2_<d>.txt content: header, then one "<name>: \\n<value>\\n\\n" block per histogram."""
    return CHI2_HEADER + "".join(f"{name}: \n{value!r}\n\n" for name, value in reported)


def read_chi2_file(path):
    """Parse a histogram_chi2 file (ours or the reference's) into {name: value}."""
    with open(path) as fh:
        lines = fh.read().split("\n")[1:]
    out = {}
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.endswith(":"):
            out[line[:-1].strip()] = float(lines[i + 1])
            i += 2
        else:
            i += 1
    return out


def classifier_text(auc, jsd):
    return f"{CLS_HEADER}\n{auc:.4f} / {jsd:.4f}\n\n"


def fpd_text(fpd_val, fpd_err, kpd_val, kpd_err):
    return (f"FPD (x10^3): {fpd_val * 1e3:.4f} \u00b1 {fpd_err * 1e3:.4f}\n"
            f"KPD (x10^3): {kpd_val * 1e3:.4f} \u00b1 {kpd_err * 1e3:.4f}")


# ----------------------------------------------------------------------------------------------
# main

def _check_pair(args, geom):
    """Open both files before any work: existence, datasets, voxel count, event counts (UserError otherwise)."""
    counts = {}
    for which, path in (("input", args.input_file), ("reference", args.reference_file)):
        f, n, v = open_calo_file(path)
        f.close()
        if v != geom.n_voxels:
            raise UserError(f"{path}: 'showers' has {v} voxels per event, but dataset {args.dataset} "
                            f"({os.path.basename(geom.filename)}) has {geom.n_voxels}")
        counts[which] = n
    if counts["input"] != counts["reference"]:
        raise UserError(f"{args.input_file}: {counts['input']} events, but the reference {args.reference_file} has "
                        f"{counts['reference']}; evaluate equal-sized samples")
    return counts["input"]


UNIT_ATTRS = ("unit", "units", "energy_unit", "energy_units")


def stated_unit(f):
    """(where, unit) of the first energy unit an open CaloChallenge file states in its attributes (on the root,
    'incident_energies' or 'showers': one of UNIT_ATTRS), or None; CaloChallenge files state none."""
    for where, obj in (("/", f), ("incident_energies", f["incident_energies"]), ("showers", f["showers"])):
        for key in UNIT_ATTRS:
            if key in obj.attrs:
                value = obj.attrs[key]
                value = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
                return f"{where} attribute '{key}'", value.strip()
    return None


def check_units(input_file, reference_file, dataset, n_probe=2000):
    """Refuse (UserError) a generated file that is in other units than the reference (GeV vs MeV); return the
    warnings (strings) for a file whose showers alone are off by about that factor.

    Refused: a file that states an energy unit other than MeV in its attributes (see :func:`stated_unit`); median
    incident energies that differ by a factor 10^(3 +- 0.5) either way (a model does not generate its incident
    energies: they are the conditions it was given); for dataset 1 (15 discrete energies), no generated incident
    energy on one of the reference's (relative 1e-3). Only warned: the median total energies of the first
    ``n_probe`` showers differ by more than 10^2.5 while the incident energies agree; this is a shower file in GeV
    or a model far from trained (an early checkpoint sums to ~0.002 x the reference's), which the metrics then show.
    Values that are not finite and positive are ignored here: the scans report them, naming the event."""
    import h5py

    hint = "calokit and CaloChallenge files are in MeV; --allow_unit_mismatch evaluates anyway"

    def probe(path):
        with h5py.File(path, "r") as f:
            said = stated_unit(f)
            einc = np.asarray(f["incident_energies"][:], dtype=np.float64).reshape(-1)
            etot = np.asarray(f["showers"][:n_probe], dtype=np.float64).sum(axis=1)
        if said and said[1].lower() != "mev":
            raise UserError(f"{path}: its {said[0]} says its energies are in '{said[1]}'; {hint}")
        return [x[np.isfinite(x) & (x > 0)] for x in (einc, etot)]

    (e_gen, t_gen), (e_ref, t_ref) = probe(input_file), probe(reference_file)
    if e_gen.size and e_ref.size:
        mg, mr = float(np.median(e_gen)), float(np.median(e_ref))
        if abs(abs(math.log10(mg / mr)) - 3.0) < 0.5:
            raise UserError(f"{input_file}: its incident energies are ~{mg / mr:.3g} times the reference's (median "
                            f"{mg:.4g} vs {mr:.4g}): a unit mistake (GeV vs MeV)? {hint}")
    if dataset.startswith("1") and e_gen.size and e_ref.size:
        levels = np.unique(e_ref)
        near = np.abs(e_gen[:, None] / levels[None, :] - 1.0).min(axis=1) < 1e-3
        if not near.any():
            raise UserError(f"{input_file}: none of its incident energies ({e_gen.min():.4g}..{e_gen.max():.4g}) is "
                            f"one of the reference's {len(levels)} energies ({levels.min():.4g}..{levels.max():.4g} "
                            f"MeV): wrong units or the wrong dataset? {hint}")
    found = []
    if t_gen.size and t_ref.size:
        mg, mr = float(np.median(t_gen)), float(np.median(t_ref))
        if abs(math.log10(mg / mr)) > 2.5:
            found.append(f"{input_file}: its total shower energies are ~{mg / mr:.3g} times the reference's "
                         f"(median {mg:.4g} vs {mr:.4g} MeV, first {n_probe} events) while the incident energies "
                         f"agree: either the showers alone are in other units (GeV vs MeV: convert and evaluate "
                         f"again) or the model is far from trained (an early checkpoint); evaluated as it is")
    return found


def _check_output_place(path, what):
    """UserError before any work if the folder ``path`` could not be created or written into."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p) or not os.access(p, os.W_OK | os.X_OK):
        why = "is not a directory" if not os.path.isdir(p) else "is not writable"
        raise UserError(f"{path}: cannot write the {what} there ({p} {why})")


def _validate_args(args):
    if args.mode == "cls-resnet" and args.dataset not in ("2", "3"):
        raise UserError(f"cls-resnet is defined for datasets 2 and 3 (voxel images), not {args.dataset}")
    if args.cls_resnet_layers not in RESNET_BLOCKS:
        raise UserError(f"--cls_resnet_layers must be one of {', '.join(map(str, RESNET_BLOCKS))}")
    if args.mode not in MODES:
        raise UserError(f"unknown mode '{args.mode}' (choose from {', '.join(MODES)})")
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}' (choose from {', '.join(DATASETS)})")
    if args.prdc_k < 1 or (args.prdc_max_events is not None and args.prdc_max_events < 0):
        raise UserError("--prdc_k must be >= 1 and --prdc_max_events >= 0")
    for name in ("cls_n_layer", "cls_n_hidden", "cls_batch_size", "cls_n_epochs", "fpd_min_samples",
                 "fpd_max_samples", "fpd_num_batches", "fpd_num_points", "kpd_batch_size", "kpd_num_batches"):
        low = 0 if name == "cls_n_layer" else 1
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be >= {low}")
    if args.fpd_num_points < 2 or args.kpd_batch_size < 2:
        raise UserError("--fpd_num_points and --kpd_batch_size must be >= 2")
    if not 0.0 <= args.cls_dropout_probability < 1.0:
        raise UserError("--cls_dropout_probability must be in [0, 1)")
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if args.chunk_mb <= 0:
        raise UserError("--chunk_mb must be > 0")


def histogram_outputs(args, todo, geom, ref, gen, threshold, ranges, voxel_bins, metrics, pool=None):
    """Histograms and separation powers (into ``metrics``), the chi2 text file and the PNGs; returns the paths."""
    d, out_dir = args.dataset, args.output_dir
    hists = build_histograms(d, geom, ref, gen, threshold, ranges, voxel_bins)
    seps = {h["name"]: separation_power(h["ref"], h["gen"]) for h in hists}
    metrics["separation_power"] = seps
    metrics["separation_power_mean"] = {"value": float(np.mean(list(seps.values()))), "histograms": len(seps)}
    metrics["etot_einc_per_energy"] = [{"energy_mev": float(name.rsplit(" = ", 1)[1]), "separation_power": v}
                                       for name, v in seps.items() if name.startswith("Etot / Einc at E = ")]
    metrics["empty_histograms"] = [h["name"] for h in hists if not h["ref"].any() or not h["gen"].any()]
    ensure_dir(out_dir)
    written = []
    if todo["hist_chi"]:
        reported = [(h["name"], seps[h["name"]]) for h in hists if h["reported"]]
        written.append(write_text(os.path.join(out_dir, f"histogram_chi2_{d}.txt"), chi2_text(reported)))
    if todo["hist_plots"]:
        jobs = [(os.path.join(out_dir, h["file"]), h["bins"], h["ref"], h["gen"], h["name"], h["xlabel"],
                 seps[h["name"]], h["logx"]) for h in hists if h["file"]]
        grids = {}                                            # grid file -> (panel titles, histograms)
        for h in hists:
            if h.get("grid"):
                grids.setdefault(h["grid"], []).append(h)
        extra = [functools.partial(plot_histogram_grid, [h["panel"] for h in group],
                                   [(h["ref"], h["gen"]) for h in group], [h["bins"] for h in group],
                                   [seps[h["name"]] for h in group], os.path.join(out_dir, grid),
                                   group[0]["xlabel"], args.dpi, args.label)
                 for grid, group in sorted(grids.items(), key=lambda kv: -len(kv[1]))]     # biggest first
        extra.append(functools.partial(plot_separation_summary, seps,
                                       os.path.join(out_dir, f"separation_power_dataset_{d}.png"), d, args.dpi))
        written += draw_histograms(jobs, args.dpi, args.jobs, extra, pool, args.label)
    return written


def prdc_subsample(n_events, args):
    """Sorted event indices used for prdc (the same in both files): all, or a seeded subsample of
    ``--prdc_max_events`` (default per dataset: :data:`PRDC_MAX_EVENTS`)."""
    m = PRDC_MAX_EVENTS[args.dataset] if args.prdc_max_events is None else args.prdc_max_events
    if m <= 0 or m >= n_events:
        return np.arange(n_events)
    return np.sort(np.random.default_rng(args.seed).choice(n_events, size=m, replace=False))


def prdc_text(values):
    """prdc_<d>.txt: one ``name: value`` line per metric (the reference writes the same names, unseparated)."""
    return "".join(f"{name}: {values[name]!r}\n" for name in ("precision", "recall", "density", "coverage"))


def prdc_outputs(args, ref, gen, rows, n_events, metrics, log=None):
    """prdc of the generated vs the reference rows, into ``metrics['prdc']`` and prdc_<d>.txt; returns the path."""
    if log:
        log(f"prdc: {len(rows)} events per file, k = {args.prdc_k}")
    values = prdc(ref.prdc, gen.prdc, args.prdc_k, log=log)
    ref.prdc = gen.prdc = None                    # the largest arrays of the run: free them now
    metrics["prdc"] = dict(values, k=args.prdc_k, n_events=len(rows), subsampled=len(rows) < n_events,
                           max_events=int(PRDC_MAX_EVENTS[args.dataset] if args.prdc_max_events is None
                                          else args.prdc_max_events))
    ensure_dir(args.output_dir)
    return write_text(os.path.join(args.output_dir, f"prdc_{args.dataset}.txt"), prdc_text(values))


def _progress(msg):
    """One progress line on stderr, written in one call (worker processes write beside this one)."""
    sys.stderr.write(f"[evaluate] {msg}\n")
    sys.stderr.flush()


def scan_both(args, todo, geom, n_events, run, pool, n_workers, in_worker):
    """Read both files once: the reference from the cache or a streamed pass, its content hash, both voxel
    histograms (their bins need the reference maximum) and the input's pass, spread over ``pool``.

    With ``in_worker`` a worker streams the input file while this process reads the reference; the reference is
    hashed first where a cache entry may match, else in a worker; the other workers count half of each voxel
    histogram, then load matplotlib for the plots to come. ``run`` holds threshold, ranges, chunk, low_kind,
    prdc_rows, voxels and log. Returns a namespace: ref, gen, ref_sha, cache_hit, cache_dir, voxel_bins.
    """
    threshold, ranges, chunk, low_kind, prdc_rows, voxels, log = (run.threshold, run.ranges, run.chunk, run.low_kind,
                                                                   run.prdc_rows, run.voxels, run.log)
    d, out_dir = args.dataset, args.output_dir
    if in_worker:
        gen_scan = pool.submit(scan_in_worker, todo["hist_plots"], args.input_file, geom, threshold, ranges,
                               chunk, log=log)
    # the reference's content hash (cache key): first where a cache entry may match, else in a worker
    cache_dir = args.cache_dir or os.path.join(out_dir, "reference_cache")
    may_hit = not args.no_cache and bool(glob.glob(os.path.join(glob.escape(cache_dir), "reference_*.npz")))
    ref_sha = None if pool and not may_hit else file_sha256(args.reference_file)
    hashing = pool.submit(file_sha256, args.reference_file) if ref_sha is None else None
    # the other workers get ready to plot: now, or once they have helped with the voxel histograms
    warm_ups = n_workers - in_worker if pool and todo["hist_plots"] else 0
    for _ in range(0 if in_worker else warm_ups):
        pool.submit(load_matplotlib)

    # --- reference: from the cache, or one streamed pass and the voxel histogram (its bins need the maximum)
    ref = load_cache(*cache_entry(cache_dir, ref_sha, geom, d, threshold), geom.n_voxels) if may_hit else None
    cache_hit = ref is not None
    if ref is None:
        ref = scan_file(args.reference_file, geom, threshold, ranges, chunk, low_kind=low_kind, log=log,
                        prdc_rows=prdc_rows)
    elif voxels:     # the low-level classifier and prdc need the reference voxels themselves
        again = scan_file(args.reference_file, geom, threshold, ranges, chunk, low_kind=low_kind,
                          features=False, log=log, prdc_rows=prdc_rows)
        ref.cls_low, ref.prdc = again.cls_low, again.prdc
    voxel_bins = log_bins(threshold, ref.voxel_max, 50)   # both voxel histograms need the reference max
    if not cache_hit:
        ref.voxel_counts = split_voxel_histogram(pool, args.reference_file, geom, threshold, voxel_bins, chunk,
                                                 n_events)
    ref_sha = ref_sha or hashing.result()

    # --- input: one streamed pass here, or the worker's pass plus its voxel histogram in the reference bins
    if in_worker:
        counts = split_voxel_histogram(pool, args.input_file, geom, threshold, voxel_bins, chunk, n_events)
        for _ in range(warm_ups):
            pool.submit(load_matplotlib)
        gen = gen_scan.result()
        gen.voxel_counts = counts
    else:
        gen = scan_file(args.input_file, geom, threshold, ranges, chunk, voxel_bins=voxel_bins,
                        low_kind=low_kind, log=log, prdc_rows=prdc_rows)
    return types.SimpleNamespace(ref=ref, gen=gen, ref_sha=ref_sha, cache_hit=cache_hit, cache_dir=cache_dir,
                                 voxel_bins=voxel_bins)


def prepare_run(args):
    """Everything decided before a file is read: arguments, geometry, both files' shapes and units, writable
    output places, classifier split sizes (too few events fail now), and the per-run settings. Returns a namespace:
    todo, geom, n_events, threshold, ranges, chunk, low_kind, prdc_rows, voxels, sizes, log, warnings."""
    _validate_args(args)
    log = None if args.quiet else _progress
    todo = what_to_do(args.mode)
    geom = dataset_geometry(args.dataset, find_binning(args.dataset, args.binning))
    n_events = _check_pair(args, geom)
    unit_warnings = [] if args.allow_unit_mismatch else check_units(args.input_file, args.reference_file,
                                                                    args.dataset)
    for warning in unit_warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _check_output_place(args.output_dir, "outputs")                  # fail now, not after reading the files
    if not args.no_cache:
        _check_output_place(args.cache_dir or os.path.join(args.output_dir, "reference_cache"), "reference cache")
    if args.json:
        _check_output_place(os.path.dirname(os.path.abspath(args.json)), "metrics file")
    sizes = split_sizes(n_events, args.dataset) if todo["classifiers"] else None    # too few events: fail first
    chunk = chunk_events(geom.n_voxels, int(args.chunk_mb * 2**20))
    low_kind = next(("cls-low" if k == "cls-resnet" else k for k in todo["classifiers"] if k != "cls-high"), None)
    prdc_rows = prdc_subsample(n_events, args) if todo["prdc"] else None
    voxels = bool(low_kind) or prdc_rows is not None      # per-event voxel inputs kept in memory
    return types.SimpleNamespace(todo=todo, geom=geom, n_events=n_events, threshold=MIN_ENERGY[args.dataset],
                                 ranges=energy_ranges(args.dataset), chunk=chunk, low_kind=low_kind,
                                 prdc_rows=prdc_rows, voxels=voxels, sizes=sizes, log=log, warnings=unit_warnings)


def scan_and_histograms(args, run):
    """Both files read (scan_both) and, for the histogram modes, their outputs, with worker processes when
    --jobs > 1. Returns (scans, metrics, written files)."""
    todo, geom, n_events = run.todo, run.geom, run.n_events
    # --- worker processes (--jobs > 1), forked now while this process is small: one streams the input file while
    # this process reads the reference (big files without per-event voxel inputs, which would be too large to ship
    # back; otherwise the input is read here, after the reference); the others hash the reference, count half of
    # each voxel histogram and draw the PNGs
    in_worker = n_events > run.chunk and not run.voxels
    n_workers = (args.jobs if todo["hist_plots"] else 1 if in_worker else 0) if args.jobs > 1 else 0
    pool = worker_pool(n_workers)
    in_worker = in_worker and pool is not None
    try:
        scans = scan_both(args, todo, geom, n_events, run, pool, n_workers, in_worker)
        metrics = {
            "dataset": args.dataset, "mode": args.mode, "seed": args.seed,
            "input_file": os.path.abspath(args.input_file), "reference_file": os.path.abspath(args.reference_file),
            "reference_sha256": scans.ref_sha, "binning": os.path.abspath(geom.filename),
            "threshold_mev": run.threshold, "n_events": n_events,
        }
        if run.warnings:
            metrics["warnings"] = list(run.warnings)
        negative_voxel_report((scans.gen, scans.ref), ("generated", "reference"), metrics)
        written = []
        if todo["hist"]:
            written += histogram_outputs(args, todo, geom, scans.ref, scans.gen, run.threshold, run.ranges,
                                         scans.voxel_bins, metrics, pool)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return scans, metrics, written


def average_outputs(args, run, ref, gen):
    """The average-shower PNGs of modes avg (per layer, whole file) and avg-E (per energy range); their paths."""
    geom, ranges, out_dir, d = run.geom, run.ranges, args.output_dir, args.dataset
    written = []
    if run.todo["avg"]:
        ensure_dir(out_dir)
        written += plot_layer_comparison(geom, gen.mean_shower, ref.mean_shower, out_dir, d, args.dpi)
        written.append(plot_average_shower(geom, gen.mean_shower,
                                           os.path.join(out_dir, f"average_shower_dataset_{d}.png"),
                                           "Shower average", args.dpi))
        written.append(plot_average_shower(geom, ref.mean_shower,
                                           os.path.join(out_dir, f"reference_average_shower_dataset_{d}.png"),
                                           "Shower average reference dataset", args.dpi))
    if run.todo["avg_e"]:
        ensure_dir(out_dir)
        for i in range(len(ranges) - 1):
            lo, hi = ranges[i], ranges[i + 1]
            title = (f"shower average at E = {int(lo)} MeV" if d.startswith("1")
                     else f"shower average for E in [{lo:.0f}, {hi:.0f}] MeV")
            fname = f"average_shower_dataset_{d}_E_{float(lo)}.png"
            for prefix, scan, extra in (("", gen, ""), ("reference_", ref, "reference ")):
                n_sel = int(scan.range_counts[i])
                written.append(plot_average_shower(geom, scan.range_mean(i), os.path.join(out_dir, prefix + fname),
                                                   f"{extra}{title} ({n_sel} events)", args.dpi))
    return written


def classifier_outputs(args, run, ref, gen, metrics):
    """Train each classifier of the mode; metrics["classifier"], the chance warnings, and the
    classifier_<kind>_<d>.txt files (their paths)."""
    todo, geom, sizes, log, out_dir, d = run.todo, run.geom, run.sizes, run.log, args.output_dir, args.dataset
    if "cls-resnet" in todo["classifiers"]:
        # TensorFlow's own CPU Conv3D gradients (oneDNN off, the quieter default of _keras) take minutes per
        # batch; oneDNN's take a fraction of a second. Only effective before TensorFlow is imported.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    metrics["classifier"] = {}
    separation = histogram_separation(gen, ref, run.ranges, d)
    cls_batch = classifier_batch(args.cls_batch_size, sizes[0], d)
    written = []
    for kind in todo["classifiers"]:
        if log:
            log(f"{kind}: {args.cls_n_epochs} epochs of batch {cls_batch} on {sizes[0]} + {sizes[0]} events")
        if kind == "cls-high":
            x_gen = high_level_inputs(gen.features, gen.einc, geom)
            x_ref = high_level_inputs(ref.features, ref.einc, geom)
        else:                     # cls-low, cls-low-normed, and cls-resnet (on the cls-low inputs)
            x_gen, x_ref = gen.cls_low, ref.cls_low
        builder = (functools.partial(build_resnet, image_shape=resnet_image_shape(geom),
                                     depth=args.cls_resnet_layers) if kind == "cls-resnet" else None)
        res = train_classifier(x_gen, x_ref, sizes, args.cls_n_layer, args.cls_n_hidden,
                               args.cls_dropout_probability, cls_batch, args.cls_n_epochs, args.cls_lr,
                               args.seed, log, builder=builder)
        metrics["classifier"][kind] = res
        warning = classifier_warning(kind, res, separation, args)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
            metrics.setdefault("warnings", []).append(warning)
        ensure_dir(out_dir)
        text = classifier_text(res["auc"], res["jsd"])
        written.append(write_text(os.path.join(out_dir, f"classifier_{kind}_{d}.txt"), text))
        if args.mode == "all" and kind == "cls-low":   # the reference's 'all' runs the low-level classifier
            written.append(write_text(os.path.join(out_dir, f"classifier_all_{d}.txt"), text))
    return written


def fpd_kpd_outputs(args, run, ref, gen, metrics):
    """FPD and KPD (x 1e3) into metrics and fpd_kpd_<d>.txt; returns that file's path."""
    if run.log:
        run.log("FPD / KPD")
    x_gen = high_level_inputs(gen.features, gen.einc, run.geom)
    x_ref = high_level_inputs(ref.features, ref.einc, run.geom)
    fv, fe = fpd(x_ref, x_gen, args.fpd_min_samples, args.fpd_max_samples, args.fpd_num_batches,
                 args.fpd_num_points, args.seed)
    kv, ke = kpd(x_ref, x_gen, args.kpd_num_batches, args.kpd_batch_size, args.seed)
    metrics["fpd_x1e3"] = fv * 1e3
    metrics["fpd_err_x1e3"] = fe * 1e3
    metrics["kpd_x1e3"] = kv * 1e3
    metrics["kpd_err_x1e3"] = ke * 1e3
    metrics["fpd_kpd_settings"] = {k: int(getattr(args, k)) for k in (
        "fpd_min_samples", "fpd_max_samples", "fpd_num_batches", "fpd_num_points", "kpd_batch_size", "kpd_num_batches")}
    ensure_dir(args.output_dir)
    return write_text(os.path.join(args.output_dir, f"fpd_kpd_{args.dataset}.txt"), fpd_text(fv, fe, kv, ke))


def finish_run(args, run, scans, metrics, written):
    """The reference cache (only now: a bad input file leaves nothing behind), metrics.json and the one summary
    line on stdout."""
    if not scans.cache_hit and not args.no_cache:
        save_cache(*cache_entry(scans.cache_dir, scans.ref_sha, run.geom, args.dataset, run.threshold), scans.ref)
    json_path = args.json or os.path.join(args.output_dir, "metrics.json")
    ensure_dir(os.path.dirname(os.path.abspath(json_path)))
    written.append(write_text(json_path, json.dumps(metrics, indent=1) + "\n"))
    note = "" if args.input_file_2 is None and args.reference_file_2 is None else \
        " (--input_file_2/--reference_file_2 ignored: files are streamed whole)"
    cache = "used" if scans.cache_hit else "off" if args.no_cache else "written"
    print(f"evaluate.py: mode {args.mode}, dataset {args.dataset}, {run.n_events} events: wrote {len(written)} "
          f"files to {args.output_dir} (metrics {json_path}; reference cache {cache}){note}")


def _main(argv):
    args = build_parser().parse_args(argv)
    run = prepare_run(args)
    scans, metrics, written = scan_and_histograms(args, run)
    ref, gen = scans.ref, scans.gen
    written += average_outputs(args, run, ref, gen)
    if run.todo["classifiers"]:
        written += classifier_outputs(args, run, ref, gen, metrics)
    if run.todo["fpd"]:
        written.append(fpd_kpd_outputs(args, run, ref, gen, metrics))
    if run.todo["prdc"]:
        written.append(prdc_outputs(args, ref, gen, run.prdc_rows, run.n_events, metrics, run.log))
    finish_run(args, run, scans, metrics, written)
    return 0


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
