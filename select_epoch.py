"""select_epoch.py -- FastCaloGAN's epoch choice: the checkpoint whose E_tot best matches the reference.

For every checkpoint of a train.py run and every energy point of the reference file inside the run's energy
range, N showers are generated (condition label of that energy, scaled back to MeV with E_kin), their total
energy E_tot is histogrammed and compared with the reference's E_tot by ROOT's Chi2TestX "WW" test:

* binning: 30 bins over [peak - a * RMS, peak + b * RMS] of the reference E_tot at that energy, where
  **peak = the reference mean** and RMS = the reference standard deviation (ROOT's TH1::GetRMS);
  a, b = 3, 3 for photons/electrons and 4, 3.5 for pions/protons; events outside the range are not counted
  (ROOT keeps them in under/overflow, which Chi2TestX ignores);
* histograms are unit-normalised with their errors scaled alike (ROOT ``Scale(1/Integral)`` with Sumw2):
  w_i = n_i / n_in, s_i^2 = n_i / n_in^2 (n_in = events inside the range). The WW statistic
  chi2 = sum_i (W1 w2_i - W2 w1_i)^2 / (W1^2 s2_i^2 + W2^2 s1_i^2), W = sum_i w_i, is unchanged by such a
  scaling of either histogram, so it equals the statistic of the raw counts (W1 = W2 = 1 after normalising);
  bins empty in both histograms are skipped, ndf = (bins non-empty in either) - 1;
* a checkpoint whose generated E_tot falls entirely outside the range at some energy gets chi2 = inf there;
  ``--overflow`` adds an under- and an overflow bin to the test (ROOT "WW UF OF"), so that showers outside
  the window count against a checkpoint (best.json also reports the fraction outside per energy);
* best = argmin over checkpoints of (sum chi2) / (sum ndf) over the run's energy points, never counting an
  energy left out of training with ``train.py --exclude-energy``: such energies are reported separately in
  best.json (chi2/ndf and the E_tot/E_inc separation power, evaluate.py's per-energy binning).

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

Usage:
    python select_epoch.py --run runs/photon_20_25_high --reference voxels.h5 --events 10000 --out select/
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
#: (a, b): histogram range [peak - a RMS, peak + b RMS] per particle
RANGE_RMS = {"photon": (3.0, 3.0), "electron": (3.0, 3.0), "pion": (4.0, 3.5), "proton": (4.0, 3.5)}
ENERGY_RTOL = 1e-3          # energies within this relative tolerance are one energy point


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="select_epoch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="run directory of train.py")
    p.add_argument("--reference", required=True, help="reference voxel file (CaloChallenge HDF5, MeV)")
    p.add_argument("--events", type=int, default=10000, help="showers generated per checkpoint and energy point")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=1, help="seed of the generator noise")
    p.add_argument("--batch-size", type=int, default=10000, help="showers per generator call")
    p.add_argument("--overflow", action="store_true",
                   help="count E_tot outside the histogram range in an under- and an overflow bin (ROOT \"WW UF OF\")")
    p.add_argument("--generate-like", metavar="VOXELS.h5", default=None,
                   help="write generated.h5 for the events of this CaloChallenge file (e.g. the held-out sample "
                        "evaluate.py will compare with) instead of --reference")
    p.add_argument("--no-generated", action="store_true", help="do not write generated.h5")
    args = p.parse_args(argv)
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


def histogram_range(ref_etot, particle):
    """[peak - a RMS, peak + b RMS] with peak = mean and RMS = standard deviation of the reference E_tot."""
    a, b = RANGE_RMS.get(particle, (3.0, 3.0))
    ref = np.asarray(ref_etot, dtype=np.float64)
    peak, rms = float(ref.mean()), float(ref.std())
    rms = max(rms, 1e-6 * abs(peak), 1e-12)
    return peak - a * rms, peak + b * rms


def etot_chi2(ref_etot, gen_etot, particle, n_bins=N_BINS, overflow=False):
    """chi2, ndf of the unit-normalised E_tot histograms of reference and generated showers (WW test).

    ``overflow`` adds the under- and overflow bins to the test (ROOT "WW UF OF").
    """
    lo, hi = histogram_range(ref_etot, particle)
    w1, s1 = unit_normalised(histogram(ref_etot, lo, hi, n_bins, overflow))
    w2, s2 = unit_normalised(histogram(gen_etot, lo, hi, n_bins, overflow))
    return chi2_ww(w1, s1, w2, s2)


def outside_fraction(ref_etot, etot, particle):
    """Fraction of ``etot`` outside the chi2 histogram range defined by ``ref_etot``."""
    lo, hi = histogram_range(ref_etot, particle)
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


def best_index(totals):
    """Index of the smallest finite total chi2/ndf (the first on ties); the last checkpoint if none is finite."""
    t = np.asarray(totals, dtype=np.float64)
    ok = np.isfinite(t)
    if not ok.any():
        return len(t) - 1
    return int(np.argmin(np.where(ok, t, np.inf)))


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
                w.writerow([r["iteration"], "" if r["energy"] is None else f"{r['energy']:g}", r["role"],
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


def plot_chi2(path, iterations, total, per_energy, excluded, best_it):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.92, max(len(per_energy), 1)))   # low E dark, high E light
    for colour, (e, vals) in zip(colours, sorted(per_energy.items())):
        ax.plot(iterations, _plottable(vals), lw=0.9, alpha=0.8, color=colour, label=energy_text(e))
    for e, vals in excluded.items():
        ax.plot(iterations, _plottable(vals), lw=1.2, ls="--", color="k", label=f"{energy_text(e)} (excluded)")
    ax.plot(iterations, _plottable(total), lw=2.2, color="tab:red", label="all (selection)")
    ax.axvline(best_it, color="tab:red", ls=":", lw=1)
    ax.set_xlabel("generator iteration")
    ax.set_ylabel("E_tot chi2 / ndf")
    finite = [v for v in list(total) + [x for vals in per_energy.values() for x in vals] if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_title(f"best iteration {best_it}")
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
    n = einc.shape[0]
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=einc.reshape(-1, 1).astype(np.float64))
            ds = f.create_dataset("showers", shape=(n, int(generator.outputs[0].shape[-1])), dtype=np.float32,
                                  chunks=True)
            for i in range(0, n, chunk):
                x = generate(generator, label[i:i + chunk], rng, batch_size=batch_size)
                x *= ekin[i:i + chunk, None].astype(np.float32)
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
# the command

def _main(argv):
    args = parse_args(argv)

    cfg = read_run_config(args.run)
    for key in ("particle", "n_voxels", "ekin_min", "ekin_max"):
        if key not in cfg:
            raise UserError(f"{os.path.join(args.run, 'config.json')}: missing key '{key}'")
    ckpts = list_checkpoints(args.run)
    if not ckpts:
        raise UserError(f"{args.run}: no complete checkpoint (ckpt_<iteration>/generator.keras)")
    particle = cfg["particle"]
    einc, etot = read_reference(args.reference, int(cfg["n_voxels"]))   # validates the file as it streams
    like_einc = None
    if args.generate_like and not args.no_generated:
        like_einc = read_reference(args.generate_like, int(cfg["n_voxels"]))[0]
    inrange = run_mask(einc, cfg)
    if not inrange.any():
        raise UserError(f"{args.reference}: no event inside the run's energy range "
                        f"({cfg.get('range')}: p {cfg.get('p_min')}..{cfg.get('p_max')} MeV)")
    points, point_of = energy_points(einc)
    used = [i for i, e in enumerate(points) if inrange[point_of == i].all() and (point_of == i).any()]
    fit = [i for i in used if not is_excluded(points[i], cfg)]
    held = [i for i in used if is_excluded(points[i], cfg)]
    if not fit:
        raise UserError(f"{args.reference}: every energy point in range is excluded from training; nothing to "
                        f"choose the epoch on")
    ref_etot = {i: etot[point_of == i] for i in used}
    if like_einc is not None and not run_mask(like_einc, cfg).any():
        raise UserError(f"{args.generate_like}: no event inside the run's energy range to generate")
    ekin_pt = kinetic_energy(points, particle)
    label_pt, _ = labels_for(points, cfg)

    rows, totals, per_e, per_x = [], [], {points[i]: [] for i in fit}, {points[i]: [] for i in held}
    best_k, best_res = None, None
    t0 = time.perf_counter()
    from tqdm import tqdm
    for k_ckpt, (it, path) in enumerate(tqdm(ckpts, desc="select", unit="ckpt", file=sys.stderr, disable=None,
                                             mininterval=1.0 if sys.stderr.isatty() else 60.0)):
        gen = load_generator_file(os.path.join(path, "generator.keras"))
        rng = np.random.default_rng(args.seed)       # the same noise for every checkpoint
        res = {}
        for i in used:
            x = generate(gen, np.full(args.events, label_pt[i]), rng, batch_size=args.batch_size)
            g_etot = x.sum(axis=1, dtype=np.float64) * ekin_pt[i]
            chi2, ndf = etot_chi2(ref_etot[i], g_etot, particle, overflow=args.overflow)
            res[i] = (chi2, ndf, g_etot)
            role = "excluded" if i in held else "fit"
            rows.append({"iteration": it, "energy": points[i], "role": role, "chi2": chi2, "ndf": ndf,
                         "chi2_ndf": chi2 / ndf if ndf > 0 else math.inf})
            (per_x if i in held else per_e)[points[i]].append(rows[-1]["chi2_ndf"])
        c_sum, n_sum, total = total_chi2({points[i]: res[i][:2] for i in used}, [points[i] for i in fit])
        rows.append({"iteration": it, "energy": None, "role": "total", "chi2": c_sum, "ndf": n_sum,
                     "chi2_ndf": total})
        totals.append(total)
        if best_index(totals) == k_ckpt:             # keep the generated E_tot of the best so far only
            best_k, best_res = k_ckpt, res
    best_it, best_path = ckpts[best_k]
    res = best_res

    def report(i):
        chi2, ndf, g_etot = res[i]
        ratio_ref = ref_etot[i] / points[i]
        ratio_gen = g_etot / points[i]
        return {"chi2": _num(chi2), "ndf": ndf, "chi2_ndf": _num(chi2 / ndf) if ndf > 0 else None,
                "etot_einc_separation": etot_separation(ratio_ref, ratio_gen, ratio_bins(points[i], particle)),
                "ref_mean_etot": float(ref_etot[i].mean()), "gen_mean_etot": float(g_etot.mean()),
                "ref_outside_fraction": outside_fraction(ref_etot[i], ref_etot[i], particle),
                "gen_outside_fraction": outside_fraction(ref_etot[i], g_etot, particle),
                "ref_events": int(ref_etot[i].size)}

    out = ensure_dir(args.out)
    write_chi2_csv(os.path.join(out, "chi2.csv"), rows)
    plot_chi2(os.path.join(out, "chi2_vs_iteration.png"), [it for it, _ in ckpts], totals, per_e, per_x, best_it)

    generated = os.path.join(out, "generated.h5")
    like = args.reference if like_einc is None else args.generate_like
    ref_for_eval = os.path.abspath(like)
    n_gen = 0
    if not args.no_generated:
        e_like = einc if like_einc is None else like_einc
        m_like = run_mask(e_like, cfg)
        if not m_like.any():
            raise UserError(f"{like}: no event inside the run's energy range to generate")
        best_gen = load_generator_file(os.path.join(best_path, "generator.keras"))
        e_in = e_like[m_like]
        lab, ekin = labels_for(e_in, cfg)
        write_generated(generated, best_gen, e_in, lab, ekin, args.seed + 1, args.batch_size)
        n_gen = int(e_in.size)
        if not m_like.all():
            ref_for_eval = os.path.join(out, "reference_inrange.h5")
            copy_events(like, ref_for_eval, m_like, int(cfg["n_voxels"]))
            ref_for_eval = os.path.abspath(ref_for_eval)

    best = {
        "run": os.path.abspath(args.run), "best_iteration": int(best_it), "checkpoint": os.path.abspath(best_path),
        "chi2_ndf": _num(totals[best_k]),
        "per_energy": {f"{points[i]:g}": report(i) for i in fit},
        "excluded": {f"{points[i]:g}": report(i) for i in held},
        "excluded_energies": cfg.get("excluded_energies", []),
        "out_of_range_energies": [float(e) for i, e in enumerate(points) if i not in used],
        "reference": os.path.abspath(args.reference), "events_per_energy": int(args.events), "seed": int(args.seed),
        "checkpoints": len(ckpts),
        "histogram": {"bins": N_BINS, "range_rms": list(RANGE_RMS.get(particle, (3.0, 3.0))), "peak": "mean",
                      "rms": "standard deviation", "overflow_bins": bool(args.overflow),
                      "test": "ROOT Chi2TestX WW" + (" UF OF" if args.overflow else "") + ", unit-normalised"},
        "generated": os.path.abspath(generated) if not args.no_generated else None,
        "generated_events": n_gen,
        "generated_like": os.path.abspath(like),
        "reference_for_evaluate": ref_for_eval,
    }
    write_json(os.path.join(out, "best.json"), best)
    dt = time.perf_counter() - t0
    print(f"select_epoch.py: {out}: best iteration {best_it} of {len(ckpts)} checkpoints "
          f"(chi2/ndf {totals[best_k]:.3g} over {len(fit)} energies, {len(held)} excluded), "
          f"wrote best.json, chi2.csv, chi2_vs_iteration.png" + ("" if args.no_generated else
                                                                 f", generated.h5 ({n_gen} showers)")
          + f" in {dt:.1f} s")
    return 0


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
