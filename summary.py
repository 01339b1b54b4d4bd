"""summary.py -- one view across every GAN of a dataset: response and resolution per slice, across |eta|, a table.

FastCaloGAN is one GAN per (particle, |eta| slice); this script reads every slice folder that the chain wrote
under a results folder and judges them together, so that 78 (or 300) GANs are one page, not 78 folders.

Usage (normally through ``make summary`` / ``make summary-now``)::

    python summary.py --results results/demo --out results/demo/summary
    python summary.py --results results/demo --slices "photon_0.20 electron_0.20 pion_0.20" \\
        --out results/demo/summary --energies 1024 16384 262144

Input layout, one folder per slice ``<results>/<particle>_<eta>/`` (``<eta>`` = the slice's lower |eta| edge):
``select/best.json`` (select_epoch.py: best iteration, chi2/ndf; ``reference_for_evaluate`` names the held-out
reference the generated file mirrors), ``select/generated.h5`` (showers of the chosen checkpoint),
``eval/metrics.json`` (evaluate.py) and ``lwtnn/*.json`` (+ ``*.onnx``; export_lwtnn.py). ``--slices`` names the slices
expected; one without a folder is listed as ``missing``. A slice lacking one of those files is listed as
``incomplete`` (still running, or failed) with what it lacks, and a slice whose files cannot be read as
``unreadable`` with the reason: none is skipped silently. Numbers are computed from what is there.

Outputs (in ``--out``, replaced as a whole, atomically):

* ``response_resolution.png``: per slice (one panel per slice, a row of panels per particle), versus E_kin, the
  response <E_tot>/E_kin, the resolution RMS(E_tot)/<E_tot> (generated and reference, with statistical
  errors) and the chi2/ndf of each energy point;
* ``response_resolution_vs_eta.png``: the same two quantities versus |eta| (slice centre) at a few energies
  (``--energies``, default 1, 16 and 262 GeV; each slice uses its energy point nearest in log E), one line per
  particle, reference solid and generated dashed;
* ``summary.csv`` and ``summary.md``: one row per GAN (particle, slice, state, energy range, best iteration,
  select chi2/ndf, response chi2/ndf, E_tot/E_inc separation power, mean separation power, cls-high AUC when
  evaluated, exported files with sizes, what is missing);
* ``summary.json``: the same numbers, every energy point of every slice, and the definitions below.

Definitions. Per event r = E_tot / E_kin (E_tot = sum of the voxel energies, E_kin = the kinetic energy of
the incident momentum for the slice's particle). Events are grouped by incident energy (discrete energy
points); a file with more than ``--max-points`` distinct energies (CaloChallenge datasets 2 and 3) is grouped
into ``--max-points`` log-spaced bins over the reference's range instead, E_kin of a point then being the bin's
mean. Per point: response m = mean(r) (= <E_tot>/E_kin at one energy), RMS s = the standard deviation of r
(divided by n, as ROOT's RMS), resolution s/m (= RMS(E_tot)/<E_tot>). Statistical errors: sigma_m = s/sqrt(n),
sigma_s = s/sqrt(2(n-1)) (the Gaussian approximation). The chi2 of a point compares the two moments of the
generated (g) and reference (r) samples::

    chi2 = (m_g - m_r)^2 / (sigma_m,g^2 + sigma_m,r^2) + (s_g - s_r)^2 / (sigma_s,g^2 + sigma_s,r^2),  ndf = 2

(a point with fewer than 2 events on either side has no chi2). A slice's response chi2/ndf is the sum of its
points' chi2 over the sum of their ndf. It tests whether the mean and the width agree within the statistics
of the two samples; the ``select chi2/ndf`` column is select_epoch.py's E_tot histogram test, kept beside it.
The mean separation power is the mean over every histogram in metrics.json's ``separation_power``.

The HDF5 files are streamed in chunks (memory: one chunk plus a few numbers per energy point).
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys

import numpy as np

from plumbing import (PARTICLES, HelpFormatter, UserError, atomic_directory, iter_calo_chunks, kinetic_energy,
                      read_run_config, run_cli, write_json, write_text)

SLICE_RE = re.compile(r"^([a-z]+)_(\d+(?:\.\d+)?)$")
SLICE_WIDTH = 0.05
DEFAULT_ENERGIES = (1024.0, 16384.0, 262144.0)     # ~1, 16 and 262 GeV: the toy's and dataset 1's 2^10, 2^14, 2^18
PARTICLE_ORDER = ("photon", "electron", "pion")
FILES = ("select/best.json", "select/generated.h5", "eval/metrics.json", "lwtnn")
GRID_COLUMNS = 6


# ----------------------------------------------------------------------------------------------
# which slices there are, and in what state


def parse_slice(name):
    """'photon_0.20' -> ('photon', 0.20); None if the name is not a slice folder name."""
    m = SLICE_RE.match(name)
    if not m or m.group(1) not in PARTICLES:
        return None
    return m.group(1), float(m.group(2))


def slice_sort_key(name):
    particle, eta = parse_slice(name)
    order = PARTICLE_ORDER.index(particle) if particle in PARTICLE_ORDER else len(PARTICLE_ORDER)
    return order, particle, eta


def list_slices(results, expected=()):
    """Sorted slice names: every slice folder under ``results`` plus the ``expected`` ones."""
    found = [d for d in os.listdir(results) if os.path.isdir(os.path.join(results, d)) and parse_slice(d)]
    for name in expected:
        if parse_slice(name) is None:
            raise UserError(f"--slices: '{name}' is not a slice name <particle>_<eta> "
                            f"(particle one of {', '.join(PARTICLES)})")
    return sorted(set(found) | set(expected), key=slice_sort_key)


def missing_files(folder):
    """Which of the slice's result files are absent (lwtnn counts when it holds a network: an lwtnn JSON, or an
    ONNX model alone for a generator lwtnn cannot hold)."""
    missing = []
    for rel in FILES:
        path = os.path.join(folder, rel)
        if rel == "lwtnn":
            if not any(_is_network(f) for f, _ in export_files(folder)):
                missing.append("lwtnn/*.json")
            elif os.path.isfile(os.path.join(folder, "select", "best.json")):
                combined = read_json(os.path.join(folder, "select", "best.json")).get("combined") or []
                names = [f for f, _ in export_files(folder)]
                missing += [f"{c['range']}/lwtnn/*.json" for c in combined
                            if not any(n.startswith(f"{c['range']}/") and _is_network(n) for n in names)]
        elif not os.path.isfile(path):
            missing.append(rel)
    return missing


EXPORT_SUFFIXES = (".json", ".onnx")


def _is_network(name):
    """An exported network file (lwtnn JSON or ONNX), not a meta JSON."""
    return name.endswith(".onnx") or (name.endswith(".json") and not name.endswith(".meta.json"))


def export_files(folder):
    """[(file name, bytes)] of the exported networks (lwtnn JSON, ONNX) and their meta files, sorted.

    A slice trained as several energy-range GANs (FastCaloGAN's Low12 + High12) has one export folder per range,
    ``<range>/lwtnn/``: its files are listed as ``<range>/<file>``, one network per range."""
    found = []
    for sub in [""] + sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                             if os.path.isdir(os.path.join(folder, n, "lwtnn"))):
        d = os.path.join(folder, sub, "lwtnn")
        if not os.path.isdir(d):
            continue
        found += [(os.path.join(sub, n) if sub else n, os.path.getsize(os.path.join(d, n))) for n in sorted(os.listdir(d))
                  if n.endswith(EXPORT_SUFFIXES) and not n.startswith(".") and os.path.isfile(os.path.join(d, n))]
    return found


def read_json(path):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


# ----------------------------------------------------------------------------------------------
# per-energy moments of r = E_tot / E_kin, streamed


def etot_moments(path, particle, chunk=None):
    """Per distinct incident energy of a CaloChallenge file: arrays (e_inc, n, sum r, sum r^2, sum E_kin)."""
    parts = []
    # negative voxels (FastCaloGAN's swish output) count as they are: FastCaloSim deposits them unchanged
    for _, einc, showers in iter_calo_chunks(path, chunk=chunk, allow_negative=True):
        ekin = np.asarray(kinetic_energy(einc, particle), dtype=np.float64)
        if (ekin <= 0).any():
            raise UserError(f"{path}: an incident energy at or below the {particle} mass (no kinetic energy)")
        r = showers.sum(axis=1, dtype=np.float64) / ekin
        keys, inv = np.unique(einc, return_inverse=True)
        parts.append((keys, np.bincount(inv), np.bincount(inv, r), np.bincount(inv, r * r), np.bincount(inv, ekin)))
    return merge_groups(*[np.concatenate(col) for col in zip(*parts)])


def merge_groups(keys, n, s1, s2, sk):
    """Sum the rows of equal ``keys``; returns the same five arrays with unique sorted keys."""
    u, inv = np.unique(keys, return_inverse=True)
    return (u, np.bincount(inv, n).astype(np.int64), np.bincount(inv, s1), np.bincount(inv, s2),
            np.bincount(inv, sk))


def rebin(moments, edges):
    """Group energy-point moments into log-energy bins ``edges`` (empty bins dropped; bin key = bin index)."""
    keys = moments[0]
    idx = np.clip(np.searchsorted(edges, keys, side="right") - 1, 0, len(edges) - 2)
    return merge_groups(idx.astype(np.float64), *moments[1:])


def point_table(ref, gen):
    """Per energy point of the reference: the moments of both samples, errors and the two-moment chi2."""
    rows = []
    for i, key in enumerate(ref[0]):
        row = {"e_kin": float(ref[4][i] / ref[1][i])}
        row.update(_side(ref, i, "ref"))
        j = int(np.searchsorted(gen[0], key))
        if j < len(gen[0]) and gen[0][j] == key:
            row.update(_side(gen, j, "gen"))
        else:   # no generated event at this energy
            row.update({f"{q}_gen": None for q in ("response", "response_err", "rms", "rms_err", "resolution",
                                                   "resolution_err")}, n_gen=0)
        row["chi2"], row["ndf"] = point_chi2(row)
        rows.append(row)
    return rows


def _side(mom, i, tag):
    """Response, RMS, resolution and their errors of one sample at row ``i``."""
    n = int(mom[1][i])
    m = mom[2][i] / n
    s = math.sqrt(max(mom[3][i] / n - m * m, 0.0))
    err_m = s / math.sqrt(n)
    err_s = s / math.sqrt(2 * (n - 1)) if n > 1 else float("nan")
    res = s / m if m > 0 else float("nan")
    err_res = res * math.sqrt((err_s / s) ** 2 + (err_m / m) ** 2) if s > 0 and m > 0 and n > 1 else float("nan")
    return {f"n_{tag}": n, f"response_{tag}": m, f"response_err_{tag}": err_m, f"rms_{tag}": s,
            f"rms_err_{tag}": err_s, f"resolution_{tag}": res, f"resolution_err_{tag}": err_res}


def point_chi2(row):
    """chi2 of the means plus chi2 of the RMS values (ndf 2); (None, 0) with fewer than 2 events on a side."""
    if row["n_ref"] < 2 or row["n_gen"] < 2:
        return None, 0
    chi2 = 0.0
    for q in ("response", "rms"):
        diff = row[f"{q}_gen"] - row[f"{q}_ref"]
        var = row[f"{q}_err_gen"] ** 2 + row[f"{q}_err_ref"] ** 2
        chi2 += (diff * diff / var) if var > 0 else (0.0 if diff == 0 else float("inf"))
    return chi2, 2


def slice_points(generated, reference, particle, max_points, chunk=None):
    """Energy points of one slice (see :func:`point_table`); binned in log E past ``max_points`` energies."""
    ref = etot_moments(reference, particle, chunk)
    gen = etot_moments(generated, particle, chunk)
    binned = len(ref[0]) > max_points
    if binned:
        lo, hi = ref[0][0], ref[0][-1]
        edges = np.geomspace(lo, hi * (1 + 1e-12), max_points + 1)
        ref, gen = rebin(ref, edges), rebin(gen, edges)
    rows = point_table(ref, gen)
    keys = ref[0]
    for row, key in zip(rows, keys):
        row["e_inc"] = None if binned else float(key)
    return rows, binned


# ----------------------------------------------------------------------------------------------
# one slice


def summarise_slice(results, name, max_points, chunk=None):
    """Everything the summary knows about one slice, as a JSON-ready dict."""
    particle, eta = parse_slice(name)
    folder = os.path.join(results, name)
    out = {"slice": name, "particle": particle, "eta_min": eta, "eta_max": round(eta + SLICE_WIDTH, 6),
           "state": "missing", "missing": [], "error": None, "range": None, "best_iteration": None,
           "select_chi2_ndf": None, "response_chi2_ndf": None, "etot_einc_separation": None,
           "mean_separation": None, "cls_high_auc": None, "exports": [], "points": [], "binned": False}
    if not os.path.isdir(folder):
        out["missing"] = ["the slice folder"]
        return out
    out["missing"] = missing_files(folder)
    out["exports"] = [{"file": f, "bytes": b} for f, b in export_files(folder)]
    out["state"] = "complete" if not out["missing"] else "incomplete"
    try:
        _fill_from_files(folder, particle, out, max_points, chunk)
    except UserError as err:
        out["state"], out["error"] = "unreadable", str(err)
    return out


def _fill_from_files(folder, particle, out, max_points, chunk):
    best_path = os.path.join(folder, "select", "best.json")
    if os.path.isfile(best_path):
        best = read_json(best_path)
        out["best_iteration"] = best.get("best_iteration")
        out["select_chi2_ndf"] = best.get("chi2_ndf")
        out["range"] = _energy_range(best, out["exports"])
        if best.get("combined"):          # several range GANs: the slice's row names each range's choice
            parts = best["combined"]
            out["range"] = " + ".join(str(c.get("range")) for c in parts)
            out["best_iteration"] = ", ".join(f"{c.get('range')} {c.get('best_iteration')}" for c in parts)
            out["ranges"] = [{k: c.get(k) for k in ("range", "best_iteration", "chi2_ndf", "energies_served")}
                             for c in parts]
        generated = best.get("generated") or os.path.join(folder, "select", "generated.h5")
        generated = generated if os.path.isfile(generated) else os.path.join(folder, "select", "generated.h5")
        reference = best.get("reference_for_evaluate")
        if not reference:
            raise UserError(f"{best_path}: no 'reference_for_evaluate' (the held-out file the generated one mirrors)")
        if not os.path.isfile(reference):
            out["missing"].append(reference)
            out["state"] = "incomplete"
        elif os.path.isfile(generated):
            out["points"], out["binned"] = slice_points(generated, reference, particle, max_points, chunk)
            chi2 = [p["chi2"] for p in out["points"] if p["chi2"] is not None]
            ndf = sum(p["ndf"] for p in out["points"])
            out["response_chi2_ndf"] = float(sum(chi2) / ndf) if ndf else None
    metrics_path = os.path.join(folder, "eval", "metrics.json")
    if os.path.isfile(metrics_path):
        metrics = read_json(metrics_path)
        seps = metrics.get("separation_power") or {}
        vals = [float(v) for v in seps.values() if isinstance(v, (int, float)) and math.isfinite(v)]
        out["etot_einc_separation"] = seps.get("Etot / Einc")
        out["mean_separation"] = float(np.mean(vals)) if vals else None
        cls = (metrics.get("classifier") or {}).get("cls-high") or {}
        out["cls_high_auc"] = cls.get("auc")


def _energy_range(best, exports):
    """The GAN's energy range name (all/low/high) from its run configuration, else from the export's name."""
    run = best.get("run")
    if run and os.path.isfile(os.path.join(run, "config.json")):
        try:
            rng = read_run_config(run).get("range")
            if rng:
                return str(rng)
        except UserError:
            pass
    for e in exports:
        m = re.match(r"neural_net_\d+_eta_\d+_\d+_(\w+)\.(json|onnx)$", e["file"])
        if m:
            return m.group(1)
    return None


# ----------------------------------------------------------------------------------------------
# across slices: the quantities versus |eta| at a few energies


def versus_eta(slices, energies):
    """{energy: {particle: [(eta centre, e_kin, point row)]}}: each slice's energy point nearest in log E."""
    out = {}
    for target in energies:
        per = {}
        for s in slices:
            pts = [p for p in s["points"] if p["n_gen"] and p["n_ref"]]
            if not pts:
                continue
            x = np.array([p["e_inc"] if p["e_inc"] is not None else p["e_kin"] for p in pts])
            p = pts[int(np.argmin(np.abs(np.log(x / target))))]
            per.setdefault(s["particle"], []).append((s["eta_min"] + SLICE_WIDTH / 2, p))
        out[float(target)] = per
    return out


# ----------------------------------------------------------------------------------------------
# outputs: table, JSON, plots

COLUMNS = ("particle", "slice", "state", "range", "best_iteration", "select_chi2_ndf", "response_chi2_ndf",
           "etot_einc_separation", "mean_separation", "cls_high_auc", "exports", "missing")


def table_rows(slices):
    """One flat row per GAN (strings/numbers) for the CSV and Markdown tables."""
    rows = []
    for s in slices:
        row = {k: s.get(k) for k in COLUMNS}
        row["slice"] = f"{s['eta_min']:.2f}-{s['eta_max']:.2f}"
        row["exports"] = "; ".join(f"{e['file']} ({e['bytes']} B)" for e in s["exports"])
        row["missing"] = "; ".join(s["missing"]) + (f"; error: {s['error']}" if s["error"] else "")
        rows.append(row)
    return rows


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def csv_text(rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r[k]) for k in COLUMNS})
    return buf.getvalue()


def markdown_text(rows, counts):
    head = ["# calokit summary", "", ", ".join(f"{n} {state}" for state, n in counts.items()), "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(_fmt(r[k]).replace("|", "/") for k in COLUMNS) + " |" for r in rows]
    return "\n".join(head + body) + "\n"


def _clean(obj):
    """NaN/inf -> None, numpy scalars -> Python, so summary.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


#: the grid's title: two lines, each broken between these pieces where the figure is too narrow (one slice)
GRID_TITLE = (("response <E_tot>/E_kin,", "resolution RMS/<E_tot>,", "chi2/ndf per energy"),
              ("reference: black dots,", "generated: red squares"))
GRID_TITLE_FONTSIZE = 10


def wrap_to_width(fig, groups, fontsize, max_px):
    """Lines of text: each group of pieces joined by spaces, broken between pieces where a line would be wider
    than ``max_px`` display pixels of ``fig`` (measured with its renderer at ``fontsize``)."""
    renderer = fig.canvas.get_renderer()

    def width(text):
        t = fig.text(0, 0, text, fontsize=fontsize)
        w = t.get_window_extent(renderer).width
        t.remove()
        return w

    lines = []
    for pieces in groups:
        line = pieces[0]
        for piece in pieces[1:]:
            if width(f"{line} {piece}") <= max_px:
                line = f"{line} {piece}"
            else:
                lines.append(line)
                line = piece
        lines.append(line)
    return lines


def plot_grid(slices, path, dpi):
    """response_resolution.png: per slice response / resolution / chi2-per-point versus E_kin."""
    import matplotlib.pyplot as plt

    fig = grid_figure(slices)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def grid_figure(slices):
    """The figure of response_resolution.png: a panel per slice (6 a row, a new row per particle) under a title
    wrapped to the figure's width; the top margin grows with the title's lines."""
    import matplotlib.pyplot as plt

    particles = list(dict.fromkeys(s["particle"] for s in slices))
    rows_of = {p: max(1, math.ceil(sum(s["particle"] == p for s in slices) / GRID_COLUMNS)) for p in particles}
    n_rows = sum(rows_of.values())
    n_cols = min(GRID_COLUMNS, max(sum(s["particle"] == p for s in slices) for p in particles))
    width = 3.3 * n_cols + 0.9                                       # inches: panels plus fixed margins
    fig = plt.figure(figsize=(width, 1.0))
    title = wrap_to_width(fig, GRID_TITLE, GRID_TITLE_FONTSIZE, 0.94 * fig.bbox.width)
    top = 0.5 + 1.25 * GRID_TITLE_FONTSIZE / 72 * len(title)         # title lines plus the panels' 2-line titles
    height = 4.3 * n_rows + 0.45 + top
    fig.set_size_inches(width, height)
    outer = fig.add_gridspec(n_rows, n_cols, hspace=0.32, wspace=0.38, left=0.7 / width, right=1 - 0.2 / width,
                             top=1 - top / height, bottom=0.45 / height)
    row0 = 0
    for p in particles:
        for k, s in enumerate([s for s in slices if s["particle"] == p]):
            inner = outer[row0 + k // GRID_COLUMNS, k % GRID_COLUMNS].subgridspec(3, 1, height_ratios=(2, 2, 1),
                                                                                 hspace=0.08)
            _panel(fig, inner, s)
        row0 += rows_of[p]
    fig.suptitle("\n".join(title), fontsize=GRID_TITLE_FONTSIZE, y=1 - 0.08 / height, va="top")
    return fig


def _few_ticks(ax, logx=True, logy=False):
    """Few fixed ticks, no minor ones: tick making dominates the drawing time of a 78-panel grid otherwise."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

    ax.xaxis.set_major_locator(LogLocator(numticks=4) if logx else MaxNLocator(4))
    ax.yaxis.set_major_locator(LogLocator(numticks=3) if logy else MaxNLocator(3))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())


def _panel(fig, inner, s):
    axes = [fig.add_subplot(inner[i]) for i in range(3)]
    title = f"{s['particle']} |eta| {s['eta_min']:.2f}-{s['eta_max']:.2f}"
    if s["response_chi2_ndf"] is not None:
        title += f"\nchi2/ndf {s['response_chi2_ndf']:.3g}"
    axes[0].set_title(title if s["points"] else f"{title}\n{s['state']}", fontsize=8)
    pts = [p for p in s["points"] if p["n_ref"]]
    if not pts:
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1].text(0.5, 0.5, s["state"] + ("\n" + "\n".join(s["missing"][:3]) if s["missing"] else ""),
                     ha="center", va="center", fontsize=7, transform=axes[1].transAxes)
        return
    x = np.array([p["e_kin"] for p in pts]) / 1000.0
    for ax, q, label in ((axes[0], "response", "<E_tot>/E_kin"), (axes[1], "resolution", "RMS/<E_tot>")):
        for tag, style in (("ref", dict(fmt="o", color="black", ms=3)), ("gen", dict(fmt="s", color="red", ms=3,
                                                                                        mfc="none"))):
            y = np.array([np.nan if p[f"{q}_{tag}"] is None else p[f"{q}_{tag}"] for p in pts], dtype=float)
            e = np.array([np.nan if p[f"{q}_err_{tag}"] is None else p[f"{q}_err_{tag}"] for p in pts], dtype=float)
            ax.errorbar(x, y, yerr=np.nan_to_num(e), lw=0.8, elinewidth=0.8, **style)
        ax.set_xscale("log")
        ax.set_ylabel(label, fontsize=7)
        ax.tick_params(labelsize=6, labelbottom=False)
    res = np.array([p[f"resolution_{t}"] or np.nan for p in pts for t in ("ref", "gen")], dtype=float)
    res = res[np.isfinite(res) & (res > 0)]
    wide = res.size > 0 and res.max() > 3 * res.min()          # log y only when it spans a factor 3 or more
    if wide:
        axes[1].set_yscale("log")
    _few_ticks(axes[0])
    _few_ticks(axes[1], logy=wide)
    chi = np.array([np.nan if p["chi2"] is None else max(p["chi2"] / p["ndf"], 1e-3) for p in pts], dtype=float)
    axes[2].plot(x, np.minimum(chi, 1e4), "v", color="tab:blue", ms=3)
    axes[2].axhline(1.0, color="grey", lw=0.6, ls=":")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("chi2/ndf", fontsize=7)
    axes[2].set_xlabel("E_kin [GeV]", fontsize=7)
    axes[2].tick_params(labelsize=6)
    _few_ticks(axes[2], logy=True)
    lim = (x.min() / 1.5, x.max() * 1.5)
    for ax in axes:
        ax.set_xlim(*lim)


def plot_vs_eta(across, path, dpi):
    """response_resolution_vs_eta.png: both quantities versus |eta| at each chosen energy, a line per particle."""
    import matplotlib.pyplot as plt

    energies = list(across)
    fig, axes = plt.subplots(2, len(energies), figsize=(4.2 * len(energies), 6.4), squeeze=False)
    colors = {"photon": "tab:orange", "electron": "tab:blue", "pion": "tab:green"}
    for j, target in enumerate(energies):
        for p, items in across[target].items():
            items = sorted(items, key=lambda t: t[0])
            eta = [t[0] for t in items]
            c = colors.get(p, None)
            e_lab = ", ".join(sorted({f"{t[1]['e_kin'] / 1000:.3g}" for t in items}))
            for i, q in enumerate(("response", "resolution")):
                for tag, ls, mk in (("ref", "-", "o"), ("gen", "--", "s")):
                    y = [t[1][f"{q}_{tag}"] for t in items]
                    y = [np.nan if v is None else v for v in y]
                    axes[i, j].plot(eta, y, ls=ls, marker=mk, ms=3, color=c, mfc="none" if tag == "gen" else c,
                                    label=f"{p} {'generated' if tag == 'gen' else 'reference'} (E_kin {e_lab} GeV)")
        axes[0, j].set_title(f"E near {target / 1000:.3g} GeV", fontsize=9)
        axes[0, j].set_ylabel("<E_tot>/E_kin")
        axes[1, j].set_ylabel("RMS(E_tot)/<E_tot>")
        axes[1, j].set_xlabel("|eta| (slice centre)")
        axes[0, j].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_outputs(out_dir, slices, across, energies, dpi, results):
    """Every output file into ``out_dir`` (replaced as a whole)."""
    counts = {}
    for s in slices:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    rows = table_rows(slices)
    doc = {"results": os.path.abspath(results), "states": counts, "energies_vs_eta": list(energies),
           "definitions": {"r": "E_tot / E_kin per event", "response": "mean(r)", "rms": "standard deviation of r "
                           "(divided by n)", "resolution": "rms / response = RMS(E_tot)/<E_tot>",
                           "chi2": "(m_g-m_r)^2/(s_g^2/n_g+s_r^2/n_r) + (s_g-s_r)^2/(s_g^2/(2(n_g-1))+"
                           "s_r^2/(2(n_r-1))), ndf 2 per energy point",
                           "response_chi2_ndf": "sum of the points' chi2 / sum of their ndf",
                           "mean_separation": "mean of every separation power in eval/metrics.json"},
           "versus_eta": {str(int(t)) if float(t).is_integer() else str(t):
                          {p: [{"eta": e, **pt} for e, pt in v] for p, v in per.items()} for t, per in across.items()},
           "slices": slices}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with atomic_directory(out_dir) as tmp:
        write_json(os.path.join(tmp, "summary.json"), _clean(doc))
        write_text(os.path.join(tmp, "summary.csv"), csv_text(rows))
        write_text(os.path.join(tmp, "summary.md"), markdown_text(rows, counts))
        if any(s["state"] != "missing" for s in slices):
            plot_grid(slices, os.path.join(tmp, "response_resolution.png"), dpi)
        if any(across[t] for t in across):
            plot_vs_eta(across, os.path.join(tmp, "response_resolution_vs_eta.png"), dpi)
    return counts


# ----------------------------------------------------------------------------------------------
# command line


def build_parser():
    ap = argparse.ArgumentParser(prog="summary.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                 epilog="Inputs, outputs and definitions: see the module docstring (docs/ too).")
    ap.add_argument("--results", required=True, help="the results folder of one dataset (slice folders inside)")
    ap.add_argument("--out", default=None, help="output folder (default RESULTS/summary)")
    ap.add_argument("--slices", default="", help='slices expected, e.g. "photon_0.20 pion_0.20" (absent ones are '
                    "listed as missing); default: the slice folders found")
    ap.add_argument("--energies", type=float, nargs="+", default=list(DEFAULT_ENERGIES),
                    help="incident energies (MeV) for the plots versus |eta| (default 1024 16384 262144)")
    ap.add_argument("--max-points", type=int, default=40,
                    help="past this many distinct incident energies, group into as many log-E bins (default 40)")
    ap.add_argument("--chunk", type=int, default=None, help="events read at a time (default: ~16 MB of showers)")
    ap.add_argument("--dpi", type=int, default=90, help="PNG resolution (default 90)")
    return ap


def _main(argv):
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.results):
        raise UserError(f"{args.results}: results folder not found")
    if any(not (e > 0 and math.isfinite(e)) for e in args.energies):
        raise UserError(f"--energies must be positive MeV values, got {args.energies}")
    if args.max_points < 1 or (args.chunk is not None and args.chunk < 1) or args.dpi < 10:
        raise UserError("--max-points and --chunk must be >= 1, --dpi >= 10")
    names = list_slices(args.results, args.slices.split())
    if not names:
        raise UserError(f"{args.results}: no slice folders (<particle>_<eta>, e.g. photon_0.20) and no --slices")
    slices = [summarise_slice(args.results, n, args.max_points, args.chunk) for n in names]
    across = versus_eta(slices, args.energies)
    out = args.out or os.path.join(args.results, "summary")
    counts = write_outputs(out, slices, across, args.energies, args.dpi, args.results)
    print(f"summary.py: {len(slices)} slice(s) ({', '.join(f'{n} {s}' for s, n in counts.items())}) -> {out}")
    return 0


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
