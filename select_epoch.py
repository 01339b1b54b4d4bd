"""select_epoch.py -- FastCaloGAN's epoch choice: the checkpoint whose E_tot best matches the reference.

For every checkpoint of a train.py run and every energy point of the reference file inside the run's energy
range, N showers are generated (condition label of that energy, scaled back to MeV with E_kin), their total
energy E_tot is histogrammed and compared with the reference's E_tot by ROOT's Chi2TestX "WW" test:

* binning: 30 bins over [peak - a * RMS, peak + b * RMS] of the reference E_tot at that energy,
  a, b = 3, 3 for photons/electrons and 4, 3.5 for pions/protons; events outside the range are not counted
  (ROOT keeps them in under/overflow, which Chi2TestX ignores). ``--window mode`` (the default, FastCaloGAN's
  own choice in BoloGAN's plotting/selectBestEpoch_Energy.py): the reference E_tot is first histogrammed in
  100 bins over [0, 2 p] (p = the momentum of the energy point); peak = the centre of its tallest bin (the
  first of equal ones, as ROOT's GetMaximumBin), RMS = the standard deviation of the entries inside [0, 2 p)
  (ROOT's GetRMS), and the lower edge is clipped at 0. ``--window mean``: peak = the reference mean, RMS = its
  standard deviation (calokit's earlier choice);
* histograms are unit-normalised with their errors scaled alike (ROOT ``Scale(1/Integral)`` with Sumw2):
  w_i = n_i / n_in, s_i^2 = n_i / n_in^2 (n_in = events inside the range). The WW statistic
  chi2 = sum_i (W1 w2_i - W2 w1_i)^2 / (W1^2 s2_i^2 + W2^2 s1_i^2), W = sum_i w_i, is unchanged by such a
  scaling of either histogram, so it equals the statistic of the raw counts (W1 = W2 = 1 after normalising);
  bins empty in both histograms are skipped, ndf = (bins non-empty in either) - 1;
* a checkpoint whose generated E_tot falls entirely outside the range at some energy gets chi2 = inf there;
  ``--overflow`` adds an under- and an overflow bin to the test (ROOT "WW UF OF"), so that showers outside
  the window count against a checkpoint (best.json also reports the fraction outside per energy);
* E_tot of a generated shower is the plain sum of its voxels, negative ones included (BoloGAN sums the
  network's output as it is);
* best = argmin over checkpoints of (sum chi2) / (sum ndf) over the run's energy points (with ``--window mode``
  compared at 3 decimals as BoloGAN writes them, ties going to the later checkpoint; with ``mean`` exact, ties
  to the earlier), never counting an
  energy left out of training with ``train.py --exclude-energy``: such energies are reported separately in
  best.json (chi2/ndf and the E_tot/E_inc separation power, evaluate.py's per-energy binning);
* ``--smooth K`` (odd, default 1 = the above): the choice compares, for every checkpoint, the median total chi2/ndf
  of the K checkpoints centred on it (fewer at the ends of the run), so that a checkpoint is chosen for a good
  neighbourhood rather than one lucky value (neighbouring checkpoints' chi2 often differs 2-5x). best.json then
  records K and the chosen checkpoint's smoothed value next to its own.

Continuous incident energies (CaloChallenge datasets 2 and 3 draw E_inc log-uniformly from 1 GeV to 1 TeV, so
nearly every event has its own energy and a per-energy histogram would hold one shower): the events are grouped
into log-energy bins and each bin compares E_tot / E_inc instead of E_tot, since E_inc varies inside a bin (the
response varies slowly with log E, E_tot itself by the bin's full width). Per bin, N showers are generated at
incident energies drawn (seeded, with replacement) from the reference events of that bin, so both samples have the
same E_inc distribution; the histogram, window (``mode``: the 100-bin histogram over [0, 2], the ratio's [0, 2p]),
test and choice are as above, with the bins in place of the energy points.

* detection (``--energy-bins auto``, the default): the energies are a small set of discrete points when the
  reference has at most :data:`MAX_POINTS` distinct energies (within 0.1 %) and at least two events per energy on
  average. Dataset 1 and the demo (15 energies 2^8..2^22 MeV, thousands of events each) are discrete and keep the
  per-energy test exactly; a log-uniform file has about one distinct energy per event (a 1e-3 merge window groups
  a few at 100k events: thousands of "points") and is binned;
* number of bins: one per factor 2 of E_inc over the run's events (FastCaloGAN's dataset-1 points are one per
  factor 2, so the choice sees the energy dependence at the same granularity), at most :data:`MAX_ENERGY_BINS`,
  and fewer when a bin would average under :data:`MIN_BIN_EVENTS` reference events (a 30-bin chi2 needs a few
  hundred). Datasets 2/3 (100k events, 1 GeV..1 TeV): High12 (4.1 GeV..1 TeV) gets 8 bins of ~10k events, Low12
  (1..4.1 GeV) 2 bins; N = ``--events`` showers per bin, as per energy point;
* ``--energy-bins N`` (1..:data:`MAX_ENERGY_BINS`) groups any reference, discrete or not, into N bins;
  ``--energy-bins points`` keeps one group per distinct energy. Bins are equal in log E between the lowest and
  highest in-range reference energy (the highest inside the last bin). An energy excluded from training
  (``--exclude-energy``) needs the points: bins refuse it.

best.json's ``energy_grouping`` records the choice (points or bins, the rule, the edges in MeV, events per bin,
the compared quantity); ``per_energy`` is then keyed by bin (``"<lo>..<hi>"`` MeV) and chi2.csv's energy column
names the bin the same way; the plot labels each bin's curve with its energy range.

Outputs in --out:
  best.json               {"run", "best_iteration", "checkpoint", "chi2_ndf", "per_energy", "excluded", ...}
  chi2.csv                one row per (checkpoint, energy) plus a "total" row per checkpoint
  chi2_vs_iteration.png   total and per-energy chi2/ndf against the iteration
  generated.h5            CaloChallenge HDF5 (MeV) of the best generator: one shower per reference event
                          inside the run's energy range, with that event's incident energy, in reference order
                          (events of --generate-like FILE instead, e.g. the held-out sample, when given)
  reference_inrange.h5    only when some of those events lie outside the run's energy range: the ones
                          inside, so that evaluate.py compares files with equal event counts (best.json names
                          the file to compare with as "reference_for_evaluate")

``--combine DIR [DIR ...]`` (no --run): one generated file for a slice trained as several energy-range GANs
(FastCaloGAN's photons and electrons: Low12 + High12; CaloShowerGAN's photons: Low12 + Mid1218 + High18, p <= 2^12,
2^12..2^18, >= 2^18 MeV). Each DIR is a selection of one range, made with the same
``--generate-like`` file; every event of that file takes its shower from the range FastCaloSim uses for its
momentum: among the ranges that contain p, the one with the lowest upper end (FastCaloSim's TFCSGANEtaSlice
takes the high network for p > 2^12 MeV, so the point 2^12 that Low12 and High12 share comes from Low12; BoloGAN
itself generates it with both and keeps them in separate files). Writes generated.h5 and best.json (the ranges,
their best iterations and the energies each served; ``reference_for_evaluate`` as above).

Usage:
    python select_epoch.py --run runs/photon_20_25_high --reference voxels.h5 --events 10000 --out select/
    python select_epoch.py --combine sel_Low12/ sel_High12/ --generate-like heldout.h5 --out select/
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import numpy as np

from HighLevelFeatures import separation_power
from plumbing import (HelpFormatter, UserError, atomic_output, condition_label, ensure_dir, generate,
                      in_energy_range, iter_calo_chunks, kinetic_energy, list_checkpoints, load_generator_file,
                      read_run_config, run_cli, write_json)

N_BINS = 30
MODE_BINS = 100             # BoloGAN's histogram over [0, 2p] that finds the peak and RMS of the mode window
WINDOWS = {"mode": "FastCaloGAN (BoloGAN selectBestEpoch_Energy.py)", "mean": "reference mean and SD"}
#: (a, b): histogram range [peak - a RMS, peak + b RMS] per particle
RANGE_RMS = {"photon": (3.0, 3.0), "electron": (3.0, 3.0), "pion": (4.0, 3.5), "proton": (4.0, 3.5)}
ENERGY_RTOL = 1e-3          # energies within this relative tolerance are one energy point
MAX_POINTS = 32             # at most this many distinct energies (and >= 2 events each on average): discrete points
MAX_ENERGY_BINS = 16        # log-energy bins of a continuous reference: one per factor 2, at most this many,
MIN_BIN_EVENTS = 500        # and at least this many reference events per bin on average
GEN_FLOATS = 2**26          # voxels generated at once (256 MB of float32) when summing showers


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="select_epoch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--run", help="run directory of train.py (required unless --combine)")
    p.add_argument("--reference", help="reference voxel file (CaloChallenge HDF5, MeV; required unless --combine)")
    p.add_argument("--combine", nargs="+", metavar="SELECT_DIR", default=None,
                   help="combine the generated files of these per-range selections into one (see above)")
    p.add_argument("--events", type=int, default=10000, help="showers generated per checkpoint and energy point")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=1, help="seed of the generator noise")
    p.add_argument("--batch-size", type=int, default=10000, help="showers per generator call")
    p.add_argument("--overflow", action="store_true",
                   help="count E_tot outside the histogram range in an under- and an overflow bin (ROOT \"WW UF OF\")")
    p.add_argument("--window", default="mode", choices=list(WINDOWS),
                   help="the chi2 histogram's range: mode = FastCaloGAN's (peak of a 100-bin histogram over "
                        "[0, 2p], its RMS, lower edge clipped at 0, ties to the later checkpoint); mean = the "
                        "reference mean and standard deviation")
    p.add_argument("--generate-like", metavar="VOXELS.h5", default=None,
                   help="write generated.h5 for the events of this CaloChallenge file (e.g. the held-out sample "
                        "evaluate.py will compare with) instead of --reference")
    p.add_argument("--no-generated", action="store_true", help="do not write generated.h5")
    p.add_argument("--energy-bins", default="auto", metavar="auto|points|N",
                   help="how events are grouped for the test: auto = the reference's discrete energy points, or "
                        "log-energy bins (E_tot/E_inc compared) when its energies are continuous; points = one "
                        f"group per energy; N = N log-energy bins (1..{MAX_ENERGY_BINS})")
    p.add_argument("--smooth", type=int, default=1, metavar="K",
                   help="choose by the median total chi2/ndf of K neighbouring checkpoints (odd; 1 = each alone)")
    args = p.parse_args(argv)
    if args.smooth < 1 or args.smooth % 2 == 0:
        raise UserError(f"--smooth must be an odd integer >= 1 (got {args.smooth})")
    if args.energy_bins not in ("auto", "points"):
        try:
            n = int(args.energy_bins)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_ENERGY_BINS:
            raise UserError(f"--energy-bins must be auto, points or an integer 1..{MAX_ENERGY_BINS} "
                            f"(got {args.energy_bins!r})")
        args.energy_bins = n
    if args.combine is not None:
        if not args.generate_like:
            raise UserError("--combine needs --generate-like (the file every selection generated for)")
        return args
    if not args.run or not args.reference:
        raise UserError("--run and --reference are required (or --combine SELECT_DIR ...)")
    if args.events < 2:
        raise UserError(f"--events must be >= 2 (got {args.events})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    return args


# ----------------------------------------------------------------------------------------------
# the chi-square test

def histogram(values, lo, hi, n_bins=N_BINS, overflow=False):
    """Counts in ``n_bins`` equal bins over [lo, hi) as ROOT fills a TH1.

    Values outside are not counted, or with ``overflow`` counted in an underflow and an overflow bin
    (returned first and last: n_bins + 2 values, ROOT's Chi2Test options "UF OF").
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    idx = np.floor((v - lo) / (hi - lo) * n_bins)
    if overflow:
        idx = np.clip(np.where(v < lo, -1, np.where(v >= hi, n_bins, idx)), -1, n_bins).astype(np.int64) + 1
        return np.bincount(idx, minlength=n_bins + 2).astype(np.float64)
    ok = (v >= lo) & (v < hi)
    idx = np.clip(idx[ok], 0, n_bins - 1).astype(np.int64)
    return np.bincount(idx, minlength=n_bins).astype(np.float64)


def unit_normalised(counts):
    """(w, s^2) of a histogram of unweighted counts scaled to unit integral (errors scaled alike)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return np.zeros_like(counts), np.zeros_like(counts)
    return counts / total, counts / total**2


def chi2_ww(w1, s1sq, w2, s2sq):
    """ROOT TH1::Chi2TestX "WW" (weighted-weighted): returns (chi2, ndf).

    chi2 = sum_i (W1 w2_i - W2 w1_i)^2 / (W1^2 s2_i^2 + W2^2 s1_i^2) with W = sum of bin contents and
    s_i^2 the per-bin sums of squared weights; bins with no content in either histogram are skipped and
    ndf = (number of bins used) - 1. If either histogram is empty, chi2 = inf (ndf as above).

    >>> chi2_ww([1, 2], [1, 2], [1, 2], [1, 2])
    (0.0, 1)
    """
    w1, s1sq, w2, s2sq = (np.asarray(a, dtype=np.float64) for a in (w1, s1sq, w2, s2sq))
    used = (w1 * w1 > 0) | (w2 * w2 > 0)
    ndf = int(used.sum()) - 1
    W1, W2 = w1.sum(), w2.sum()
    if W1 <= 0 or W2 <= 0:
        return math.inf, ndf
    sigma = W1 * W1 * s2sq[used] + W2 * W2 * s1sq[used]
    delta = W2 * w1[used] - W1 * w2[used]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(sigma > 0, delta * delta / np.where(sigma > 0, sigma, 1.0), np.where(delta == 0, 0.0, np.inf))
    return float(terms.sum()), ndf


def histogram_range(ref_etot, particle, window="mean", momentum=None):
    """The chi2 histogram's [lo, hi) for one energy point (see the module docstring).

    ``mean``: [mean - a SD, mean + b SD] of the reference E_tot. ``mode`` (needs ``momentum`` p, MeV):
    [max(0, mode - a RMS), mode + b RMS] with mode and RMS of the reference's 100-bin histogram over [0, 2p].

    >>> histogram_range([1.0, 2.0, 3.0], "photon", "mode", momentum=2.0)   # peak 1.02 (first tallest), RMS 0.816
    (0.0, 3.469489742783178)
    """
    a, b = RANGE_RMS.get(particle, (3.0, 3.0))
    ref = np.asarray(ref_etot, dtype=np.float64)
    if window == "mode":
        peak, rms = mode_and_rms(ref, momentum)
        rms = max(rms, 1e-6 * abs(peak), 1e-12)
        return max(0.0, peak - a * rms), peak + b * rms
    peak, rms = float(ref.mean()), float(ref.std())
    rms = max(rms, 1e-6 * abs(peak), 1e-12)
    return peak - a * rms, peak + b * rms


def mode_and_rms(values, momentum, n_bins=MODE_BINS):
    """(centre of the tallest bin, RMS) of a ROOT TH1 of ``values`` in ``n_bins`` over [0, 2 momentum).

    As ROOT: the first bin of equal maxima; the RMS of the entries inside the range (under/overflow not in the
    statistics), from the values themselves, not the bin centres.
    """
    if momentum is None or not momentum > 0:
        raise UserError("the mode window needs the energy point's momentum")
    hi = 2.0 * float(momentum)
    v = np.asarray(values, dtype=np.float64)
    counts = histogram(v, 0.0, hi, n_bins)
    width = hi / n_bins
    peak = (int(np.argmax(counts)) + 0.5) * width
    inside = v[(v >= 0.0) & (v < hi)]
    return peak, (float(inside.std()) if inside.size else 0.0)


def etot_chi2(ref_etot, gen_etot, particle, n_bins=N_BINS, overflow=False, window="mean", momentum=None):
    """chi2, ndf of the unit-normalised E_tot histograms of reference and generated showers (WW test).

    ``overflow`` adds the under- and overflow bins to the test (ROOT "WW UF OF"); ``window`` and ``momentum``
    choose the histogram's range (:func:`histogram_range`).
    """
    lo, hi = histogram_range(ref_etot, particle, window, momentum)
    w1, s1 = unit_normalised(histogram(ref_etot, lo, hi, n_bins, overflow))
    w2, s2 = unit_normalised(histogram(gen_etot, lo, hi, n_bins, overflow))
    return chi2_ww(w1, s1, w2, s2)


def outside_fraction(ref_etot, etot, particle, window="mean", momentum=None):
    """Fraction of ``etot`` outside the chi2 histogram range defined by ``ref_etot``."""
    lo, hi = histogram_range(ref_etot, particle, window, momentum)
    e = np.asarray(etot, dtype=np.float64)
    return float(np.mean((e < lo) | (e >= hi))) if e.size else 0.0


def ratio_bins(energy, particle):
    """evaluate.py's per-energy E_tot/E_inc binning (dataset 1): 0.4..1.4, photons/electrons >= 2^12 MeV 0.9..1.1."""
    if particle in ("photon", "electron") and energy >= 2.0**12 * (1 - ENERGY_RTOL):
        return np.linspace(0.9, 1.1, 21)
    return np.linspace(0.4, 1.4, 21)


def etot_separation(a, b, bins):
    """CaloChallenge separation power of two samples' histograms in ``bins`` (fractions of in-range entries)."""
    h1 = np.histogram(a, bins)[0].astype(np.float64)
    h2 = np.histogram(b, bins)[0].astype(np.float64)
    h1 = h1 / h1.sum() if h1.sum() > 0 else h1
    h2 = h2 / h2.sum() if h2.sum() > 0 else h2
    return separation_power(h1, h2)


def total_chi2(per_energy, fit_energies):
    """(sum chi2, sum ndf, sum chi2 / sum ndf) over ``fit_energies`` of {energy: (chi2, ndf)}.

    Energies not listed (left out of training, out of range) never enter the total.
    """
    c = sum(per_energy[e][0] for e in fit_energies)
    n = sum(per_energy[e][1] for e in fit_energies)
    return c, n, (c / n if n > 0 else math.inf)


def best_index(totals, window="mean"):
    """Index of the smallest finite total chi2/ndf; the last checkpoint if none is finite.

    ``mean``: exact values, the first on ties. ``mode`` (BoloGAN): values rounded to 3 decimals as its chi2
    table stores them, the later checkpoint on ties.

    >>> best_index([2.0, 1.0, 1.0]), best_index([2.0, 1.0, 1.0004], "mode")
    (1, 2)
    """
    t = np.asarray(totals, dtype=np.float64)
    ok = np.isfinite(t)
    if not ok.any():
        return len(t) - 1
    if window == "mode":
        r = np.where(ok, np.round(t, 3), np.inf)
        return int(np.flatnonzero(r == r.min())[-1])
    return int(np.argmin(np.where(ok, t, np.inf)))


def smoothed(totals, k):
    """Running median of ``totals`` over windows of ``k`` (odd) values centred on each, shorter at the ends.

    >>> smoothed([5.0, 1.0, 6.0, 7.0, 2.0], 3).tolist()
    [3.0, 5.0, 6.0, 6.0, 4.5]
    >>> smoothed([5.0, 1.0, 6.0], 1).tolist()
    [5.0, 1.0, 6.0]
    """
    t = np.asarray(totals, dtype=np.float64)
    h = int(k) // 2
    return np.array([np.median(t[max(0, i - h):i + h + 1]) for i in range(t.size)])


# ----------------------------------------------------------------------------------------------
# reference and run

def energy_points(einc, rtol=ENERGY_RTOL):
    """Distinct incident energies (MeV) and the point index of every event (energies within rtol merge)."""
    u = np.unique(np.asarray(einc, dtype=np.float64))
    points = []
    for e in u:
        if not points or e > points[-1] * (1 + rtol):
            points.append(e)
    points = np.asarray(points)
    idx = np.searchsorted(points * (1 + rtol), einc, side="left")
    return points, np.clip(idx, 0, len(points) - 1)


def is_discrete(points, n_events):
    """True when ``points`` (distinct energies) are a small set of discrete energies for ``n_events`` events.

    >>> is_discrete(2.0 ** np.arange(8, 23), 15000), is_discrete(np.geomspace(1e3, 1e6, 900), 1000)
    (True, False)
    """
    return len(points) <= MAX_POINTS and n_events >= 2 * len(points)


def auto_bin_count(einc):
    """Log-energy bins for a continuous sample: one per factor 2 of E_inc, 1..MAX_ENERGY_BINS, and at most one
    per MIN_BIN_EVENTS events.

    >>> auto_bin_count(np.geomspace(4096.0, 2.0**20, 80000)), auto_bin_count(np.geomspace(1e3, 4096.0, 20000))
    (8, 2)
    """
    e = np.asarray(einc, dtype=np.float64)
    octaves = int(round(math.log2(e.max() / e.min()))) if e.size else 1
    return int(max(1, min(octaves, MAX_ENERGY_BINS, e.size // MIN_BIN_EVENTS)))


def log_energy_bins(einc, n_bins):
    """(edges (n_bins + 1,), bin index per event) of ``n_bins`` equal bins in log E between the lowest and the
    highest energy (that one inside the last bin).

    >>> edges, idx = log_energy_bins([1000.0, 2000.0, 3999.0, 4000.0], 2)
    >>> edges.tolist(), idx.tolist()
    ([1000.0, 2000.0, 4000.0], [0, 1, 1, 1])
    """
    e = np.asarray(einc, dtype=np.float64)
    lo, hi = float(e.min()), float(e.max())
    if not hi > lo:
        return np.array([lo, hi]), np.zeros(e.shape, dtype=np.int64)
    edges = lo * (hi / lo) ** (np.arange(n_bins + 1) / n_bins)
    edges[0], edges[-1] = lo, hi
    idx = np.floor(np.log(e / lo) / math.log(hi / lo) * n_bins).astype(np.int64)
    return edges, np.clip(idx, 0, n_bins - 1)


def bin_name(lo, hi):
    """best.json / chi2.csv key of a log-energy bin (MeV): '1000..2000'."""
    return f"{lo:g}..{hi:g}"


def read_reference(path, n_voxels):
    """Per-event incident energy and E_tot (MeV, float64) of a CaloChallenge file, streamed."""
    einc, etot = [], []
    for _, e, s in iter_calo_chunks(path, n_voxels):
        einc.append(e)
        etot.append(s.sum(axis=1, dtype=np.float64))
    return np.concatenate(einc), np.concatenate(etot)


def labels_for(einc, cfg):
    """Condition labels of incident energies (p, MeV) with the run's scheme and E_kin range."""
    ekin = kinetic_energy(einc, cfg["particle"])
    return condition_label(ekin, float(cfg["ekin_min"]), float(cfg["ekin_max"]), cfg.get("label_scheme", "V2"),
                           int(cfg.get("max_exp", 22))).astype(np.float32), ekin


def run_mask(einc, cfg):
    """Events inside the run's energy range (by momentum p)."""
    if cfg.get("range") is not None:
        try:
            return in_energy_range(einc, cfg["particle"], cfg["range"])
        except UserError:
            pass
    lo, hi = float(cfg["p_min"]), float(cfg["p_max"])
    return (einc >= lo * (1 - 2.0**-20)) & (einc <= hi * (1 + 2.0**-20))


def is_excluded(energy, cfg):
    rtol = float(cfg.get("exclude_rtol", ENERGY_RTOL))
    return any(abs(energy - e) <= rtol * abs(e) for e in cfg.get("excluded_energies", []))


# ----------------------------------------------------------------------------------------------
# outputs

def write_chi2_csv(path, rows):
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["iteration", "energy_mev", "role", "chi2", "ndf", "chi2_ndf"])
            for r in rows:
                e = r["energy"]         # an energy point (MeV) or a log-energy bin's name
                w.writerow([r["iteration"], "" if e is None else e if isinstance(e, str) else f"{e:g}", r["role"],
                            f"{r['chi2']:.6g}", r["ndf"], f"{r['chi2_ndf']:.6g}"])


def energy_text(mev):
    """256 -> '256 MeV', 1048576 -> '1.05 TeV' (3 significant digits, the unit that keeps the number short).

    >>> energy_text(256.0), energy_text(65536.0), energy_text(1048576.0)
    ('256 MeV', '65.5 GeV', '1.05 TeV')
    """
    for unit, scale in (("TeV", 1e6), ("GeV", 1e3)):
        if mev >= scale:
            return f"{mev / scale:.3g} {unit}"
    return f"{mev:.3g} MeV"


def plot_chi2(path, iterations, total, per_energy, excluded, best_it, labels=None, grouping=None):
    """chi2/ndf against the iteration: the total, one curve per energy point or log-energy bin (``labels``: its
    legend text by key), the excluded energies dashed; the title names the grouping."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.92, max(len(per_energy), 1)))   # low E dark, high E light
    for colour, (e, vals) in zip(colours, sorted(per_energy.items())):
        ax.plot(iterations, _plottable(vals), lw=0.9, alpha=0.8, color=colour, label=labels.get(e, energy_text(e)))
    for e, vals in excluded.items():
        ax.plot(iterations, _plottable(vals), lw=1.2, ls="--", color="k",
                label=f"{labels.get(e, energy_text(e))} (excluded)")
    ax.plot(iterations, _plottable(total), lw=2.2, color="tab:red", label="all (selection)")
    ax.axvline(best_it, color="tab:red", ls=":", lw=1)
    ax.set_xlabel("generator iteration")
    binned = bool(grouping) and grouping.get("kind") != "points"
    ax.set_ylabel("E_tot / E_inc chi2 / ndf" if binned else "E_tot chi2 / ndf")
    finite = [v for v in list(total) + [x for vals in per_energy.values() for x in vals] if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_title(f"best iteration {best_it}" + (f" ({grouping['bins']} log-energy bins, E_tot / E_inc)" if binned
                                                 else ""))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plottable(vals):
    return [v if math.isfinite(v) else np.nan for v in vals]


def _num(x):
    """JSON-safe float (inf/nan -> None)."""
    return float(x) if math.isfinite(x) else None


def write_generated(path, generator, einc, label, ekin, seed, batch_size, chunk=100_000):
    """Generate one shower per event (MeV) in chunks and write a CaloChallenge file atomically."""
    import h5py

    rng = np.random.default_rng(seed)
    n, n_vox = einc.shape[0], int(generator.outputs[0].shape[-1])
    chunk = max(1, min(chunk, GEN_FLOATS // n_vox))    # dataset 3: 1657 showers (256 MB) at a time
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=einc.reshape(-1, 1).astype(np.float64))
            ds = None
            for i in range(0, n, chunk):
                x = generate(generator, label[i:i + chunk], rng, batch_size=batch_size)   # voxel / E_kin
                x *= ekin[i:i + chunk, None].astype(np.float32)
                if ds is None:
                    ds = f.create_dataset("showers", shape=(n, x.shape[1]), dtype=np.float32, chunks=True)
                ds[i:i + chunk] = x


def copy_events(src, dst, mask, n_voxels):
    """Write the masked events of a CaloChallenge file to ``dst`` (streamed, atomic)."""
    import h5py

    n = int(mask.sum())
    with atomic_output(dst) as tmp:
        with h5py.File(tmp, "w") as f:
            de = f.create_dataset("incident_energies", shape=(n, 1), dtype=np.float64)
            ds = f.create_dataset("showers", shape=(n, n_voxels), dtype=np.float32, chunks=True)
            j = 0
            for start, e, s in iter_calo_chunks(src, n_voxels):
                m = mask[start:start + e.shape[0]]
                k = int(m.sum())
                de[j:j + k, 0] = e[m]
                ds[j:j + k] = s[m]
                j += k


# ----------------------------------------------------------------------------------------------
# the command: inputs, the scan over checkpoints, outputs

def load_inputs(args):
    """Run config, checkpoints, the reference and its groups (energy points or log-energy bins, see
    :func:`energy_groups`): a namespace the later parts share."""
    import types

    cfg = read_run_config(args.run)
    for key in ("particle", "n_voxels", "ekin_min", "ekin_max"):
        if key not in cfg:
            raise UserError(f"{os.path.join(args.run, 'config.json')}: missing key '{key}'")
    ckpts = list_checkpoints(args.run)
    if not ckpts:
        raise UserError(f"{args.run}: no complete checkpoint (ckpt_<iteration>/generator.keras)")
    einc, etot = read_reference(args.reference, int(cfg["n_voxels"]))   # validates the file as it streams
    like_einc = None
    if args.generate_like and not args.no_generated:
        like_einc = read_reference(args.generate_like, int(cfg["n_voxels"]))[0]
    inrange = run_mask(einc, cfg)
    if not inrange.any():
        raise UserError(f"{args.reference}: no event inside the run's energy range "
                        f"({cfg.get('range')}: p {cfg.get('p_min')}..{cfg.get('p_max')} MeV)")
    if like_einc is not None and not run_mask(like_einc, cfg).any():
        raise UserError(f"{args.generate_like}: no event inside the run's energy range to generate")
    inp = types.SimpleNamespace(cfg=cfg, ckpts=ckpts, particle=cfg["particle"], einc=einc, like_einc=like_einc)
    inp.groups, inp.grouping = energy_groups(args, cfg, einc, etot, inrange)
    inp.fit = [g for g in inp.groups if g.role == "fit"]
    inp.held = [g for g in inp.groups if g.role == "excluded"]
    if not inp.fit:
        raise UserError(f"{args.reference}: every energy point in range is excluded from training; nothing to "
                        f"choose the epoch on")
    return inp


def energy_groups(args, cfg, einc, etot, inrange):
    """([group, ...], best.json's "energy_grouping") of the reference: its discrete energy points (E_tot compared,
    FastCaloGAN's test) or log-energy bins (E_tot / E_inc compared), as the module docstring says. Each group has
    key (plot), name (best.json, chi2.csv), role (fit / excluded), ref (the reference's compared values), label and
    scale (the N generated showers' condition labels, and what turns their voxel sum into the compared value),
    momentum (the mode window's p), sep_bins (the E_tot / E_inc separation binning) and text (plot legend)."""
    import types

    points, point_of = energy_points(einc)
    discrete = is_discrete(points, einc.size)
    choice = args.energy_bins
    rule = (f"auto: {len(points)} distinct energies (within {ENERGY_RTOL:g}) for {einc.size} events: "
            f"{'at most' if discrete else 'not'} {MAX_POINTS} points with >= 2 events each on average"
            if choice == "auto" else f"--energy-bins {choice}")
    if choice == "points" or (choice == "auto" and discrete):
        used = [i for i, e in enumerate(points) if inrange[point_of == i].all() and (point_of == i).any()]
        ekin, label = kinetic_energy(points, cfg["particle"]), labels_for(points, cfg)[0]
        groups = [types.SimpleNamespace(
            key=points[i], name=f"{points[i]:g}", role="excluded" if is_excluded(points[i], cfg) else "fit",
            ref=etot[point_of == i], label=np.full(args.events, label[i]), scale=ekin[i], momentum=points[i],
            sep_bins=ratio_bins(points[i], cfg["particle"]), text=energy_text(points[i])) for i in used]
        grouping = {"kind": "points", "compared": "E_tot", "rule": rule, "points": len(used),
                    "out_of_range_energies": [float(e) for i, e in enumerate(points) if i not in used]}
        return groups, grouping
    if cfg.get("excluded_energies"):
        raise UserError(f"{args.run}: trained with --exclude-energy {cfg['excluded_energies']}, which needs the "
                        f"reference's discrete energy points; log-energy bins cannot leave one energy out")
    e_in, r_in = einc[inrange], etot[inrange] / einc[inrange]
    n_bins = auto_bin_count(e_in) if choice in ("auto", "points") else int(choice)
    edges, idx = log_energy_bins(e_in, n_bins)
    rng = np.random.default_rng(args.seed + 2)            # the generated showers' incident energies, per bin
    groups = []
    for k in range(n_bins):
        e_bin = e_in[idx == k]
        if not e_bin.size:
            continue
        e_gen = rng.choice(e_bin, size=args.events, replace=True)
        label, ekin = labels_for(e_gen, cfg)
        lo, hi = float(edges[k]), float(edges[k + 1])
        groups.append(types.SimpleNamespace(
            key=lo, name=bin_name(lo, hi), role="fit", ref=r_in[idx == k], label=label, scale=ekin / e_gen,
            momentum=1.0, sep_bins=ratio_bins(math.sqrt(lo * hi), cfg["particle"]),
            text=f"{energy_text(lo)}..{energy_text(hi)}", edges=(lo, hi)))
    grouping = {"kind": "log-energy bins", "compared": "E_tot / E_inc", "rule": rule, "bins": n_bins,
                "edges_mev": [float(e) for e in edges],
                "reference_events": [int(n) for n in np.bincount(idx, minlength=n_bins)],
                "generated_per_bin": int(args.events),
                "generated_energies": "drawn with replacement from the bin's reference events (seed + 2)",
                "out_of_range_events": int((~inrange).sum())}
    return groups, grouping


def generated_sums(gen, label, rng, batch_size):
    """Voxel sums (float64) of showers generated for ``label``; at most GEN_FLOATS voxels in memory at once
    (dataset 3: 40500 voxels, so 10000 showers would be 1.6 GB), the noise drawn in the same order either way."""
    rows = max(1, GEN_FLOATS // int(gen.outputs[0].shape[-1]))
    if label.size <= rows:
        return generate(gen, label, rng, batch_size=batch_size).sum(axis=1, dtype=np.float64)
    return np.concatenate([generate(gen, label[i:i + rows], rng, batch_size=batch_size).sum(axis=1, dtype=np.float64)
                           for i in range(0, label.size, rows)])


def scan_checkpoints(args, inp):
    """chi2 of every checkpoint in every group; returns (rows, totals, per_e, per_x, best_k, best_res)."""
    rows, totals = [], []
    per_e, per_x = {g.key: [] for g in inp.fit}, {g.key: [] for g in inp.held}
    best_k, best_res = None, None
    from tqdm import tqdm
    for k_ckpt, (it, path) in enumerate(tqdm(inp.ckpts, desc="select", unit="ckpt", file=sys.stderr, disable=None,
                                             mininterval=1.0 if sys.stderr.isatty() else 60.0)):
        res = checkpoint_chi2(args, inp, path)
        for g in inp.groups:
            chi2, ndf, _ = res[g.name]
            rows.append({"iteration": it, "energy": g.key if inp.grouping["kind"] == "points" else g.name,
                         "role": g.role, "chi2": chi2, "ndf": ndf, "chi2_ndf": chi2 / ndf if ndf > 0 else math.inf})
            (per_x if g.role == "excluded" else per_e)[g.key].append(rows[-1]["chi2_ndf"])
        c_sum, n_sum, total = total_chi2({g.name: res[g.name][:2] for g in inp.groups}, [g.name for g in inp.fit])
        rows.append({"iteration": it, "energy": None, "role": "total", "chi2": c_sum, "ndf": n_sum,
                     "chi2_ndf": total})
        totals.append(total)
        if best_index(totals, args.window) == k_ckpt:     # keep the generated values of the best so far only
            best_k, best_res = k_ckpt, res
    if args.smooth > 1:
        best_k = best_index(smoothed(totals, args.smooth), args.window)
        best_res = checkpoint_chi2(args, inp, inp.ckpts[best_k][1])     # the same noise: the scan's values
    return rows, totals, per_e, per_x, best_k, best_res


def checkpoint_chi2(args, inp, path):
    """{group name: (chi2, ndf, generated values)} of the checkpoint at ``path``, the same noise for every one."""
    gen = load_generator_file(os.path.join(path, "generator.keras"))
    rng = np.random.default_rng(args.seed)
    res = {}
    for g in inp.groups:
        g_val = generated_sums(gen, g.label, rng, args.batch_size) * g.scale
        chi2, ndf = etot_chi2(g.ref, g_val, inp.particle, overflow=args.overflow, window=args.window,
                              momentum=g.momentum)
        res[g.name] = (chi2, ndf, g_val)
    return res


def energy_report(args, inp, res, g):
    """best.json's numbers for group ``g`` (an energy point or a log-energy bin) of the chosen checkpoint."""
    chi2, ndf, g_val = res[g.name]
    ref = g.ref
    win = {"window": args.window, "momentum": g.momentum}
    out = {"chi2": _num(chi2), "ndf": ndf, "chi2_ndf": _num(chi2 / ndf) if ndf > 0 else None}
    if inp.grouping["kind"] == "points":
        p = g.momentum
        out.update({"etot_einc_separation": etot_separation(ref / p, g_val / p, g.sep_bins),
                    "ref_mean_etot": float(ref.mean()), "gen_mean_etot": float(g_val.mean())})
    else:
        out.update({"energy_range_mev": list(g.edges), "etot_einc_separation": etot_separation(ref, g_val, g.sep_bins),
                    "ref_mean_etot_einc": float(ref.mean()), "gen_mean_etot_einc": float(g_val.mean())})
    out.update({"ref_outside_fraction": outside_fraction(ref, ref, inp.particle, **win),
                "gen_outside_fraction": outside_fraction(ref, g_val, inp.particle, **win),
                "histogram_range": list(histogram_range(ref, inp.particle, **win)),
                "ref_events": int(ref.size)})
    return out


def write_best_generated(args, inp, out, best_path):
    """generated.h5 of the best checkpoint for the events of --generate-like (or the reference) in the run's range;
    returns (path of generated.h5, events written, file evaluate.py should compare it with)."""
    generated = os.path.join(out, "generated.h5")
    like = args.reference if inp.like_einc is None else args.generate_like
    ref_for_eval = os.path.abspath(like)
    e_like = inp.einc if inp.like_einc is None else inp.like_einc
    m_like = run_mask(e_like, inp.cfg)
    if not m_like.any():
        raise UserError(f"{like}: no event inside the run's energy range to generate")
    best_gen = load_generator_file(os.path.join(best_path, "generator.keras"))
    e_in = e_like[m_like]
    lab, ekin = labels_for(e_in, inp.cfg)
    write_generated(generated, best_gen, e_in, lab, ekin, args.seed + 1, args.batch_size)
    if not m_like.all():
        ref_for_eval = os.path.join(out, "reference_inrange.h5")
        copy_events(like, ref_for_eval, m_like, int(inp.cfg["n_voxels"]))
        ref_for_eval = os.path.abspath(ref_for_eval)
    return generated, int(e_in.size), ref_for_eval, like


def _main(argv):
    args = parse_args(argv)
    if args.combine is not None:
        return combine(args)
    inp = load_inputs(args)
    t0 = time.perf_counter()
    rows, totals, per_e, per_x, best_k, res = scan_checkpoints(args, inp)
    best_it, best_path = inp.ckpts[best_k]
    particle, binned = inp.particle, inp.grouping["kind"] != "points"

    out = ensure_dir(args.out)
    write_chi2_csv(os.path.join(out, "chi2.csv"), rows)
    plot_chi2(os.path.join(out, "chi2_vs_iteration.png"), [it for it, _ in inp.ckpts], totals, per_e, per_x, best_it,
              labels={g.key: g.text for g in inp.groups}, grouping=inp.grouping)
    generated, n_gen, ref_for_eval = None, 0, None
    like = args.reference if inp.like_einc is None else args.generate_like
    if not args.no_generated:
        generated, n_gen, ref_for_eval, like = write_best_generated(args, inp, out, best_path)
    if ref_for_eval is None:
        ref_for_eval = os.path.abspath(like)
    rms = "standard deviation" if args.window == "mean" else "RMS of the 100-bin histogram over [0, 2p]"
    best = {
        "run": os.path.abspath(args.run), "range": inp.cfg.get("range"), "best_iteration": int(best_it),
        "checkpoint": os.path.abspath(best_path), "chi2_ndf": _num(totals[best_k]),
        "smooth": {"checkpoints": int(args.smooth), "statistic": "median of the total chi2/ndf",
                   "chi2_ndf": _num(smoothed(totals, args.smooth)[best_k])},
        "per_energy": {g.name: energy_report(args, inp, res, g) for g in inp.fit},
        "excluded": {g.name: energy_report(args, inp, res, g) for g in inp.held},
        "excluded_energies": inp.cfg.get("excluded_energies", []),
        "out_of_range_energies": inp.grouping.pop("out_of_range_energies", []),
        "energy_grouping": inp.grouping,
        "reference": os.path.abspath(args.reference), "events_per_energy": int(args.events), "seed": int(args.seed),
        "checkpoints": len(inp.ckpts),
        "histogram": {"bins": N_BINS, "range_rms": list(RANGE_RMS.get(particle, (3.0, 3.0))),
                      "window": args.window, "peak": "mean" if args.window == "mean" else "mode", "rms": rms,
                      "lower_edge_clipped_at_0": args.window == "mode", "overflow_bins": bool(args.overflow),
                      "ties": "earlier checkpoint" if args.window == "mean" else "later checkpoint (3 decimals)",
                      "test": "ROOT Chi2TestX WW" + (" UF OF" if args.overflow else "") + ", unit-normalised"},
        "generated": os.path.abspath(generated) if generated else None,
        "generated_events": n_gen,
        "generated_like": os.path.abspath(like),
        "reference_for_evaluate": ref_for_eval,
    }
    write_json(os.path.join(out, "best.json"), best)
    dt = time.perf_counter() - t0
    print(f"select_epoch.py: {out}: best iteration {best_it} of {len(inp.ckpts)} checkpoints "
          f"(chi2/ndf {totals[best_k]:.3g} over {len(inp.fit)} "
          f"{'log-energy bins of E_tot/E_inc' if binned else 'energies'}, {len(inp.held)} excluded, window "
          f"{args.window}), wrote best.json, chi2.csv, chi2_vs_iteration.png"
          + ("" if args.no_generated else f", generated.h5 ({n_gen} showers)") + f" in {dt:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------
# --combine: one generated file from the selections of a slice's energy ranges

def serving_range(einc, ranges):
    """Per event, the index of the range that generates it, -1 if none: among the ranges containing p (each a
    (p_min, p_max, p_min included) tuple), the one with the lowest p_max, as FastCaloSim picks its network
    (p > 2^12 MeV: High12; else Low12). Any number of ranges: every momentum inside one of them is served by
    exactly one, so CaloShowerGAN's three photon ranges (Low12, Mid1218, High18) share 2^12 and 2^18 as FastCaloGAN's
    two share 2^12: the shared point comes from the lower range.

    >>> serving_range(np.array([256.0, 4096.0, 8192.0, 1e7]), [(4096.0, 2.0**22, True), (256.0, 4096.0, True)])
    array([ 1,  1,  0, -1])
    >>> serving_range(2.0 ** np.arange(8, 23), [(2.0**8, 2.0**12, True), (2.0**12, 2.0**18, True),
    ...                                          (2.0**18, 2.0**22, True)]).tolist()
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]
    """
    e = np.asarray(einc, dtype=np.float64)
    owner = np.full(e.shape, -1, dtype=np.int64)
    best_hi = np.full(e.shape, np.inf)
    tol = 2.0**-20
    for k, (lo, hi, inc) in enumerate(ranges):
        inside = ((e >= lo * (1 - tol)) if inc else (e > lo * (1 + tol))) & (e <= hi * (1 + tol))
        take = inside & (hi < best_hi)
        owner[take], best_hi[take] = k, hi
    return owner


def _combine_inputs(args, like_einc):
    """[(select dir, best.json, run config, (p_min, p_max, included), generated path)] of --combine, checked."""
    from plumbing import energy_range

    parts = []
    for d in args.combine:
        path = os.path.join(d, "best.json")
        if not os.path.isfile(path):
            raise UserError(f"{path}: not found (run select_epoch.py for that range first)")
        import json
        with open(path) as f:
            best = json.load(f)
        cfg = read_run_config(best["run"])
        gen = best.get("generated")
        if not gen or not os.path.isfile(gen):
            raise UserError(f"{path}: its generated.h5 is missing (selected with --no-generated?)")
        if os.path.abspath(best.get("generated_like", "")) != os.path.abspath(args.generate_like):
            raise UserError(f"{path}: generated for {best.get('generated_like')}, not for {args.generate_like}")
        try:
            bounds = energy_range(cfg["particle"], cfg["range"])
        except (KeyError, UserError):
            bounds = (float(cfg["p_min"]), float(cfg["p_max"]), True)
        parts.append((d, best, cfg, bounds, gen))
    n_vox = {int(c["n_voxels"]) for _, _, c, _, _ in parts}
    if len(n_vox) != 1:
        raise UserError(f"--combine: the runs have different voxel counts {sorted(n_vox)}")
    return parts, n_vox.pop()


def combine(args):
    """--combine: write generated.h5 (and best.json) for the events of --generate-like, each from its range."""
    import h5py

    t0 = time.perf_counter()
    like_einc = read_reference(args.generate_like, None)[0]
    parts, n_vox = _combine_inputs(args, like_einc)
    owner = serving_range(like_einc, [b for _, _, _, b, _ in parts])
    covered = owner >= 0
    if not covered.any():
        raise UserError(f"{args.generate_like}: no event inside any of the ranges {[c['range'] for _, _, c, _, _ in parts]}")
    out_row = np.cumsum(covered) - 1
    out = ensure_dir(args.out)
    generated = os.path.join(out, "generated.h5")
    served = {}
    with atomic_output(generated) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=like_einc[covered].reshape(-1, 1))
            ds = f.create_dataset("showers", shape=(int(covered.sum()), n_vox), dtype=np.float32, chunks=True)
            for k, (d, best, cfg, _, gen) in enumerate(parts):
                pos = np.flatnonzero(run_mask(like_einc, cfg))      # the rows of this range's generated file
                for start, e, s in iter_calo_chunks(gen, n_vox, check=False):
                    rows = pos[start:start + e.shape[0]]
                    if rows.size != e.shape[0] or not np.allclose(e, like_einc[rows], rtol=1e-12):
                        raise UserError(f"{gen}: its events are not those of {args.generate_like} in range "
                                        f"{cfg.get('range')} (regenerate the selection)")
                    keep = owner[rows] == k
                    if keep.any():
                        ds[out_row[rows[keep]]] = s[keep]
                served[d] = sorted({float(x) for x in like_einc[owner == k]})
    ref_for_eval = os.path.abspath(args.generate_like)
    if not covered.all():
        ref_for_eval = os.path.abspath(os.path.join(out, "reference_inrange.h5"))
        copy_events(args.generate_like, ref_for_eval, covered, n_vox)
    result = {
        "combined": [{"select": os.path.abspath(d), "range": c.get("range"), "run": best["run"],
                      "best_iteration": best["best_iteration"], "chi2_ndf": best.get("chi2_ndf"),
                      "p_min": b[0], "p_max": b[1], "energies_served": served[d]} for d, best, c, b, _ in parts],
        "rule": "each event from the range containing its momentum with the lowest upper end (FastCaloSim: "
                "p > 2^12 MeV -> High12, else Low12; likewise for any set of ranges)",
        "best_iteration": {c.get("range"): best["best_iteration"] for _, best, c, _, _ in parts},
        "chi2_ndf": None,
        "generated": os.path.abspath(generated), "generated_events": int(covered.sum()),
        "generated_like": os.path.abspath(args.generate_like), "reference_for_evaluate": ref_for_eval,
    }
    write_json(os.path.join(out, "best.json"), result)
    ranges = ", ".join(f"{c.get('range')} (iteration {best['best_iteration']}, {len(served[d])} energies)"
                       for d, best, c, _, _ in parts)
    print(f"select_epoch.py: {out}: combined {ranges} into generated.h5 ({int(covered.sum())} showers) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
