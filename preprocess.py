"""preprocess.py -- hits -> voxels -> training file, driven by the binning XML (and the toy hit source).

Three sub-commands, one stage each (the pipeline in README.md), plus ``fetch`` for the CaloChallenge files::

    python preprocess.py toy      --particle photon --eta 0.20 --events-per-energy 1000 --seed 1 --out hits/
    python preprocess.py voxelise --binning binning/binning_dataset_1_photons.xml --particle photon \\
                                  --out voxels.h5 [--csv csv/] hits/hits_photon_E*_eta_020_025.h5
    python preprocess.py prepare  --binning binning/binning_dataset_1_photons.xml --particle photon \\
                                  --range high --out train/ voxels.h5
    python preprocess.py fetch    --dataset 1-photons --dir data/   # Zenodo download, MD5-verified

``toy`` writes one hits file per energy (default the 15 energies 2^8..2^22 MeV) from the seeded toy shower
source in toyshower.py -- a physics-shaped toy, NOT Geant4 (its parametrisation is in that module's
docstring). ``--eta`` is any |eta| inside the 0.05-wide FastCaloGAN slice to fill (0.20 -> 0.20-0.25).

``voxelise`` reads hits files (format: docs/formats-and-exports.md; per hit ``event``, ``layer``, ``eta``, ``phi``, ``energy``
[, ``r``, ``z``]; per event ``truth_p`` [, ``truth_pdg``] and ``extrap_eta/phi/r/z`` (events, layer-id columns);
file attributes are optional) and maps every hit to its voxel FastCaloGAN's way: at the extrapolated
particle position
of the hit's layer, deta_mm = (eta - eta_x) |2 e^-eta_x / (1 + e^-2 eta_x)| sqrt(r_x^2 + z_x^2),
dphi_mm = wrap(phi - phi_x) r_x with wrap into (-pi, pi], r = sqrt(deta_mm^2 + dphi_mm^2),
alpha = atan2(dphi_mm, deta_mm) (atan2(|dphi_mm|, deta_mm) with symmetriseAlpha), deta_mm negated where eta_x < 0
and dphi_mm for the negative charges of FastCaloGAN's convention (``NEGATIVE_PDG``, from ``truth_pdg``); hits beyond the last r edge
go to the last r bin; hits in layers listed in the XML without voxels are dropped and counted. The |eta| slice
is the one of the XML that holds the median over events of |extrap_eta| (every event must lie in it, within
``--eta-tolerance``). Output: CaloChallenge HDF5 (``incident_energies`` = truth_p in MeV, (N, 1) float64;
``showers`` (N, V) float32 MeV, the XML's voxel order), events in input-file order, plus attributes
(particle, pid, eta_min, eta_max, binning) that ``prepare`` uses and other readers ignore. With ``--csv DIR``
also one FastCaloGAN-style CSV per energy, ``pid<pid>_E<MeV>_eta_<min>_<max>.csv``: a header row of voxel
names ``L<layer>_a<ialpha>_r<ir>`` and one row per event (MeV, float32 values written with 9 significant
digits, so they read back bit-identical). The column order is this project's flat order (layers in XML order,
then alpha, r fastest) -- not FastCaloGAN's alpha-fastest order; the names say which is which.
Read with ``np.loadtxt(f, delimiter=",", skiprows=1)`` or ``pandas.read_csv(f)``. ``--csv-layout fastcalogan``
writes what FastCaloGAN's own reader takes instead: ``DIR/csvFiles/pid<pid>/eta_<min>_<max>/pid<pid>_E<p>_eta_
<min>_<max>_voxalisation.csv``, no header, one event per row, within a layer r bins outer and alpha bins inner
(``Geometry.fastcalogan_order()`` gives the columns; layers with per-r-bin alpha bins are stored that way).

Speed: hits are read in chunks (``--chunk`` hits at a time, never a whole file), mapped in cache-sized blocks
by a vectorised kernel (a per-layer look-up table for the r bin, exact against the edges; cross-checked against
HighLevelFeatures' ``Layer.bin_index`` and a plain per-hit Python loop in the tests) and accumulated with
``np.bincount`` into a dense (events, voxels) float64 array per file (memory: 8 bytes x events x voxels of
the files in flight): some 5 x 10^7 hits/s on one core once in memory (bench/bench_voxelise.py). Files are
processed in parallel (``--jobs``, default 2). Energy is conserved per event and layer to float64 rounding
(the file stores float32).

``prepare`` writes the training file of one GAN (docs/formats-and-exports.md): ``voxels`` = showers / E_kin (float32),
``label`` (V2 by default: log(E_kin/E_kin,min)/log(E_kin,max/E_kin,min); V1: E_kin/2^22), ``incident_energies``
(p, MeV), ``e_kin``, for the events of the FastCaloGAN energy range (``--range low|high|all``). ``--out`` may be
a directory (existing, or a path ending in /): the file is then ``train_<particle>_eta_<min>_<max>_<range>.h5``.
Inverse: showers = voxels * e_kin, and e_kin = ``plumbing.label_to_ekin``(label, ekin_min, ekin_max, scheme).
``--norm layer`` adds ``representation`` (float32, events x (voxels + layers + 1)): CaloShowerGAN's layer
representation of the same showers (``plumbing.to_layer_representation``: zero voxels set to 1e-4 MeV, each
voxel / its layer's energy, each layer's energy / E_tot, E_tot / E_kin), what train.py then trains on; the
attributes ``norm`` (ekin | layer), ``layer_spans`` (first, last + 1 voxel of each voxelised layer),
``layer_fill_mev`` and ``n_features`` say so. Inverse: ``plumbing.from_layer_representation``.

Exit codes: 0 done (one summary line on stdout), 2 bad input (one line on stderr naming file and reason,
nothing written), 1 internal error. Outputs are written to temporary files and renamed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings

import numpy as np

from HighLevelFeatures import PARTICLES, GeometryError, eta_to_mm, list_slices, read_geometry, wrap_phi
from plumbing import (LABEL_FORMULAS, LAYER_FILL_MEV, MAX_EXP, HelpFormatter, UserError,
                      atomic_output, check_spans, condition_label, energy_range, ensure_dir, in_energy_range,
                      iter_calo_chunks, kinetic_energy, layer_representation_size, open_calo_file, open_h5, run_cli,
                      to_layer_representation)

# ----------------------------------------------------------------------------------------------
# configuration (defaults of the command line)

DEFAULT_JOBS = 2                 # hits files voxelised in parallel
DEFAULT_CHUNK_HITS = 2 ** 21     # hits read from a file at a time (~100 MB of columns)
KERNEL_BLOCK = 2 ** 15           # hits mapped per vectorised block (temporaries stay in the L2 cache)
DEFAULT_ETA_TOLERANCE = 0.01     # |eta| an event may lie outside its file's slice
LUT_MAX_CELLS = 2 ** 22          # above this the r look-up table falls back to Layer.bin_index
SLICE_WIDTH = 5                  # FastCaloGAN |eta| slices are 0.05 wide (x100 units)

HIT_FIELDS = ("event", "layer", "eta", "phi", "energy")   # hit columns the mapping uses (r, z are optional)
EXTRAP_FIELDS = ("extrap_eta", "extrap_phi", "extrap_r", "extrap_z")
LAYER_ABSENT, LAYER_DROPPED = -2, -1   # layer codes of the look-up table besides voxelised positions 0..L-1
#: PDG ids whose dphi FastCaloGAN negates (BoloGAN rootToCsv's GetCharge < 0: e+, pi-, anti-proton, K-; it counts
#: pdg 11 as charge +1, so e- and pi+ keep their sign). With symmetriseAlpha (|dphi|) the flip changes nothing.
NEGATIVE_PDG = frozenset((-11, -211, -2212, -321))



# ----------------------------------------------------------------------------------------------
# toy: seeded hits files


def slice_of(eta, width=SLICE_WIDTH):
    """The 0.05-wide |eta| slice (x100 units) containing |eta|: 0.22 -> (20, 25).

    >>> slice_of(0.20), slice_of(-0.249)
    ((20, 25), (20, 25))
    """
    x = round(abs(float(eta)) * 100.0, 6)
    lo = int(math.floor(x / width)) * width
    return lo, lo + width


def run_toy(args):
    """``toy``: one hits file per energy in ``args.out``; returns the summary line."""
    import toyshower
    from tqdm import tqdm

    if args.particle not in toyshower.TOY_PARTICLES:
        raise UserError(f"--particle {args.particle}: the toy source makes {' and '.join(toyshower.TOY_PARTICLES)}")
    energies = args.energies or toyshower.DEFAULT_ENERGIES
    if any(not (e > 0 and math.isfinite(e)) for e in energies):
        raise UserError(f"--energies must be positive MeV values, got {energies}")
    if args.events_per_energy < 1:
        raise UserError(f"--events-per-energy must be >= 1, got {args.events_per_energy}")
    if not (args.hits_low > 0 and args.hits_high > 0):
        raise UserError("--hits-low and --hits-high must be positive")
    eta_min, eta_max = slice_of(args.eta)
    if eta_max > round(toyshower.MAX_ETA * 100):
        raise UserError(f"--eta {args.eta}: the toy geometry is the barrel, |eta| < {toyshower.MAX_ETA:.2f}")
    ensure_dir(args.out)
    pid = PARTICLES[args.particle][0]
    n_hits = 0
    for energy in tqdm(energies, desc=f"toy {args.particle}", unit="file", file=sys.stderr, disable=None):
        data = toyshower.generate(args.particle, float(energy), args.events_per_energy, (eta_min / 100, eta_max / 100),
                                  args.seed, args.hits_low, args.hits_high)
        n_hits += data["hits"]["energy"].size
        attrs = {"particle": args.particle, "pid": pid, "energy": float(energy), "eta_min": float(eta_min),
                 "eta_max": float(eta_max), "seed": int(args.seed), "generator": toyshower.GENERATOR}
        path = os.path.join(args.out, toyshower.hits_filename(args.particle, energy, eta_min, eta_max))
        with atomic_output(path) as tmp:
            toyshower.write_hits(tmp, data, attrs)
    return (f"toy: wrote {len(energies)} hits files to {args.out} ({args.particle}, |eta| {eta_min / 100:.2f}-"
            f"{eta_max / 100:.2f}, {args.events_per_energy} events per energy, {n_hits} hits, seed {args.seed}; "
            f"{toyshower.GENERATOR})")


# ----------------------------------------------------------------------------------------------
# voxelise: the vectorised hit -> voxel kernel


def phi_signs(pdg):
    """Per-event factor of dphi: -1 for FastCaloGAN's negative charges (``NEGATIVE_PDG``), else +1.

    >>> phi_signs([22, 11, -11, 211, -211]).tolist()
    [1.0, 1.0, -1.0, 1.0, -1.0]
    """
    pdg = np.asarray(pdg, dtype=np.int64).reshape(-1)
    return np.where(np.isin(pdg, sorted(NEGATIVE_PDG)), -1.0, 1.0)


class VoxelMapper:
    """Vectorised FastCaloGAN mapping of hits to flat voxel indices for one :class:`Geometry` slice.

    Layer ids map through ``code`` to the position k of the layer among the voxelised layers
    (``LAYER_DROPPED`` for layers the XML lists without voxels, ``LAYER_ABSENT`` for ids it does not list).
    The r bin comes from a look-up table over uniform cells no wider than the narrowest r bin of the slice
    (so a cell holds at most one edge), corrected by one exact comparison with the bin's lower and upper
    edges (not needed when every edge is a multiple of the power-of-two cell width, as in the CaloChallenge
    dataset-1 XMLs); alpha bins and the r bin then index one (r bin, alpha bin) -> voxel table. The result
    is identical to ``Layer.bin_index`` (tested) without a binary search per hit: a few ns per hit.
    """

    def __init__(self, geom):
        self.geom = geom
        self.layers = [lay for lay in geom.layers if lay.n_voxels]
        if not self.layers:
            raise UserError(f"{geom.filename}: the slice has no voxelised layer")
        self.n_layers = len(self.layers)
        self.n_voxels = geom.n_voxels
        self.layer_ids = np.array([lay.id for lay in self.layers], dtype=np.int64)
        self.code = np.full(max(lay.id for lay in geom.layers) + 1, LAYER_ABSENT, dtype=np.int64)
        for lay in geom.layers:
            self.code[lay.id] = LAYER_DROPPED
        for k, lay in enumerate(self.layers):
            self.code[lay.id] = k
        self.symmetrise = bool(geom.symmetrise_alpha)
        self.alpha_lo = 0.0 if self.symmetrise else -math.pi
        span = math.pi - self.alpha_lo
        # alpha bins per global r bin g (all layers' r bins concatenated; FastCaloGAN's optimised binning
        # gives each r bin its own count): scale = n_alpha(g) / span, 0 for r bins with a single alpha bin
        n_a = np.concatenate([lay.alpha_per_r for lay in self.layers])
        self.alpha_scale = np.where(n_a > 1, n_a / span, 0.0)
        self.any_alpha = bool((self.alpha_scale > 0).any())
        # global r bins g: lower/upper edge, and the voxel of (g, alpha bin j) in ``vox_of`` (row length
        # n_alpha_max + 1 so that alpha == pi, which bins to n_alpha, maps to the last bin)
        lower, upper, vox_of = [], [], []
        self.alpha_row = int(n_a.max()) + 1
        for lay in self.layers:
            e = lay.r_edges
            lower.append(np.concatenate([[-np.inf], e[1:-1]]))
            upper.append(np.concatenate([e[1:-1], [np.nan]]))   # NaN: r >= upper is False even for r = inf
            j = np.minimum(np.arange(self.alpha_row)[None, :], lay.alpha_per_r[:, None] - 1)
            vox_of.append(geom.offsets[lay.id][0] + lay.index_of(np.arange(lay.n_r)[:, None], j))
        self.lower, self.upper = np.concatenate(lower), np.concatenate(upper)
        self.vox_of = np.concatenate(vox_of).ravel().astype(np.int64)
        self.vox_base = self.vox_of[::self.alpha_row].copy()
        # r look-up table over uniform cells of width w <= the narrowest r bin (at most one edge per cell);
        # when every edge is a multiple of a power-of-two w, rr / w is exact and no edge lies inside a cell:
        # the table alone is exact. Otherwise one comparison with the bin's edges each way corrects it.
        spacing = min(float(np.diff(lay.r_edges).min()) for lay in self.layers)
        all_edges = np.concatenate([lay.r_edges for lay in self.layers])
        width, self.exact_cells = spacing, False
        w = 2.0 ** math.floor(math.log2(spacing))
        while w >= spacing / 64:
            if np.all(np.mod(all_edges, w) == 0):
                width, self.exact_cells = w, True
                break
            w /= 2
        r_max = float(all_edges.max())
        n_cells = int(math.ceil(r_max / width)) + 2
        self.table = None
        if n_cells * self.n_layers <= LUT_MAX_CELLS:
            self.cell_inv = 1.0 / width
            self.n_cells = n_cells
            first = np.cumsum([0] + [lay.n_r for lay in self.layers])[:-1]
            lows = np.arange(n_cells) * width
            rows = [first[k] + np.clip(np.searchsorted(lay.r_edges, lows, side="right") - 1, 0, lay.n_r - 1)
                    for k, lay in enumerate(self.layers)]
            self.table = np.concatenate(rows).astype(np.int64)   # cell (k, c) -> r bin of the cell's lower end

    # -- per-event geometry --------------------------------------------------------------------

    def event_tables(self, ex_eta, ex_phi, ex_r, ex_z, pdg=None):
        """Per (event, voxelised layer) constants of the mapping from (n_events, n_columns) extrapolations.

        Returns flat arrays over ``event * n_layers + k``: eta_x, phi_x, mm per unit eta (signed), r_x
        (signed), and a bool array marking (event, layer) pairs whose extrapolation is not finite (their
        constants are set to 0), or None when every pair is finite. FastCaloGAN's sign flips live in the
        signs: deta is negated where eta_x < 0 (showers at -eta are mirrored onto +eta) and dphi for the
        events whose PDG id ``pdg`` (per event, optional) is one of ``NEGATIVE_PDG`` (see :func:`phi_signs`).
        """
        cols = self.layer_ids
        eta = np.asarray(ex_eta, dtype=np.float64)[:, cols]
        phi = np.asarray(ex_phi, dtype=np.float64)[:, cols]
        r = np.asarray(ex_r, dtype=np.float64)[:, cols]
        z = np.asarray(ex_z, dtype=np.float64)[:, cols]
        with np.errstate(invalid="ignore", over="ignore"):
            feta = eta_to_mm(eta, r, z)
        bad = ~(np.isfinite(eta) & np.isfinite(phi) & np.isfinite(r) & np.isfinite(feta))
        feta = np.where(eta < 0, -feta, feta)
        if pdg is not None:
            r = r * phi_signs(pdg)[:, None]
        out = [np.where(bad, 0.0, a).ravel() for a in (eta, phi, feta, r)]
        return (*out, bad.ravel() if bad.any() else None)

    # -- the hot path --------------------------------------------------------------------------

    def r_bins(self, k, rr):
        """Global r bin (layer k's bins, concatenated over layers) of distances ``rr`` (mm)."""
        if self.table is None:   # very fine binning: per-layer searchsorted through Layer.bin_index
            g = np.empty(rr.size, dtype=np.int64)
            first = np.cumsum([0] + [lay.n_r for lay in self.layers])
            for j, lay in enumerate(self.layers):
                m = k == j
                g[m] = first[j] + lay.r_bin(rr[m])
            return g
        cell = np.minimum(rr * self.cell_inv, self.n_cells - 1).astype(np.int64)
        cell += k * self.n_cells
        g = np.take(self.table, cell)
        if not self.exact_cells:
            g += rr >= np.take(self.upper, g)
            g -= rr < np.take(self.lower, g)
        return g

    def voxels(self, tables, ev, k, eta, phi):
        """Flat voxel index of hits (event ids local to ``tables``, voxelised-layer positions k, eta, phi)."""
        t_eta, t_phi, t_feta, t_r = tables[:4]
        c = ev * self.n_layers + k
        x = eta - np.take(t_eta, c)
        x *= np.take(t_feta, c)                             # deta in mm (negated where eta_x < 0)
        d = phi - np.take(t_phi, c)
        wrap_phi(d, out=d)                                   # (-pi, pi], in place
        d *= np.take(t_r, c)                                # dphi in mm (negated for NEGATIVE_PDG)
        g = self.r_bins(k, np.sqrt(x * x + d * d))
        if not self.any_alpha:
            return np.take(self.vox_base, g)
        alpha = np.arctan2(np.abs(d) if self.symmetrise else d, x)
        alpha -= self.alpha_lo
        alpha *= np.take(self.alpha_scale, g)               # 0 for r bins with one alpha bin
        g *= self.alpha_row
        g += alpha.astype(np.int64)
        return np.take(self.vox_of, g)


class Accumulator:
    """Dense float64 (events, voxels) sums of hit energies of one file, plus the run counters."""

    def __init__(self, mapper, n_events):
        self.mapper = mapper
        self.n_events = n_events
        self.showers = np.zeros((n_events, mapper.n_voxels))
        self.hits = 0
        self.dropped_hits = 0
        self.dropped_energy = 0.0
        self.energy = 0.0

    def add(self, tables, ev, layer, eta, phi, energy, where="", first_row=0):
        """Validate and accumulate a chunk of hits (equal-length arrays; event ids of this file).

        Works in blocks of ``KERNEL_BLOCK`` hits so that every temporary stays in cache.
        """
        for a in range(0, energy.size, KERNEL_BLOCK):
            b = a + KERNEL_BLOCK
            self._add_block(tables, ev[a:b], layer[a:b], eta[a:b], phi[a:b], energy[a:b], where, first_row + a)

    def _add_block(self, tables, ev, layer, eta, phi, energy, where, first_row):
        m = self.mapper
        n = energy.size
        if n == 0:
            return
        k = _check_hits(where, first_row, ev, layer, eta, phi, energy, self.n_events, m.code)
        if k.min() < 0:   # hits in layers listed without voxels: counted, then dropped
            keep = k >= 0
            self.dropped_hits += int(n - np.count_nonzero(keep))
            self.dropped_energy += float(energy[~keep].sum())
            ev, k, eta, phi, energy = ev[keep], k[keep], eta[keep], phi[keep], energy[keep]
            if energy.size == 0:
                self.hits += n
                return
        if tables[4] is not None:
            bad = np.take(tables[4], ev * m.n_layers + k)
            if bad.any():
                i = int(np.argmax(bad))
                raise UserError(f"{where}: a hit of event {int(ev[i])} in layer {int(m.layer_ids[k[i]])} has no "
                                f"finite extrapolated position (extrap_eta/phi/r/z)")
        self.hits += n
        self.energy += float(energy.sum())
        V = m.n_voxels
        vox = m.voxels(tables, ev, k, eta, phi)
        lo, hi = int(ev.min()), int(ev.max()) + 1
        if (hi - lo) * V <= 4 * ev.size + 2 ** 16:   # hits ordered by event (the usual case): one dense block
            vox += (ev - lo) * V
            sums = np.bincount(vox, weights=energy, minlength=(hi - lo) * V)
            self.showers[lo:hi] += sums.reshape(hi - lo, V)
        else:                                        # scattered events: sum over the events present only
            rows, compact = np.unique(ev, return_inverse=True)
            vox += compact * V
            sums = np.bincount(vox, weights=energy, minlength=rows.size * V)
            self.showers[rows] += sums.reshape(rows.size, V)


def _first_bad(mask):
    return int(np.argmax(mask))


def _check_hits(where, first_row, ev, layer, eta, phi, energy, n_events, code):
    """Validate a block of hits; return the layer codes. UserError names the file and the first bad hit row."""
    for name, a in (("energy", energy), ("eta", eta), ("phi", phi)):
        if not math.isfinite(float(a.sum())):   # one cheap reduction; the scan for the row only on failure
            bad = ~np.isfinite(a)
            if bad.any():                       # (a finite sum can only overflow on absurd values)
                row = first_row + _first_bad(bad)
                raise UserError(f"{where}: '{name}' has NaN/inf values (first at hit row {row})")
    if energy.min() < 0:
        row = first_row + _first_bad(energy < 0)
        raise UserError(f"{where}: 'energy' has negative values (first at hit row {row})")
    if ev.min() < 0 or ev.max() >= n_events:
        i = _first_bad((ev < 0) | (ev >= n_events))
        raise UserError(f"{where}: 'event' id {int(ev[i])} at hit row {first_row + i} is out of range "
                        f"(the file has {n_events} events: ids 0..{n_events - 1})")
    k = None
    if layer.min() >= 0 and layer.max() < code.size:
        k = np.take(code, layer)
    if k is None or k.min() == LAYER_ABSENT:
        absent = [int(i) for i in np.unique(layer) if i < 0 or i >= code.size or code[i] == LAYER_ABSENT]
        raise UserError(f"{where}: hits in layer id(s) {absent} that the binning XML does not list")
    return k


def voxelise_arrays(geom, hits, extrap, n_events, mapper=None):
    """Voxelise in-memory hits: ``hits`` dict (event, layer, eta, phi, [r, z,] energy), ``extrap`` dict of
    (n_events, n_columns) arrays (extrap_eta/phi/r/z) [and per-event ``truth_pdg``].
    Returns (float64 showers (n_events, V), Accumulator)."""
    mapper = mapper or VoxelMapper(geom)
    tables = mapper.event_tables(*(extrap[k] for k in EXTRAP_FIELDS), pdg=extrap.get("truth_pdg"))
    acc = Accumulator(mapper, n_events)
    acc.add(tables, np.asarray(hits["event"], dtype=np.int64), np.asarray(hits["layer"], dtype=np.int64),
            np.asarray(hits["eta"], dtype=np.float64), np.asarray(hits["phi"], dtype=np.float64),
            np.asarray(hits["energy"], dtype=np.float64), where="hits")
    return acc.showers, acc


def voxelise_python_loop(geom, hits, extrap, n_events):
    """Reference implementation: the hit -> (r, alpha) mapping written hit by hit with the math module (slow; for tests and bench),
    FastCaloGAN's sign flips included (deta negated where eta_x < 0, dphi for ``NEGATIVE_PDG`` events).

    Independent of :class:`VoxelMapper`: bisect on the edges, math.remainder for the phi wrap.
    """
    import bisect

    out = np.zeros((n_events, geom.n_voxels))
    by_id = {lay.id: lay for lay in geom.layers}
    edges = {lay.id: lay.r_edges.tolist() for lay in geom.layers}
    sym = bool(geom.symmetrise_alpha)
    lo = 0.0 if sym else -math.pi
    cols = [np.asarray(hits[k]).tolist() for k in ("event", "layer", "eta", "phi", "energy")]
    ex = [np.asarray(extrap[k], dtype=np.float64).tolist() for k in EXTRAP_FIELDS]
    pdg = extrap.get("truth_pdg")
    flip_phi = [False] * n_events if pdg is None else [int(p) in NEGATIVE_PDG for p in np.ravel(pdg)]
    for ev, lid, eta, phi, e in zip(*cols):
        lay = by_id[lid]
        if lay.n_voxels == 0:
            continue
        eta0, phi0, r0, z0 = ex[0][ev][lid], ex[1][ev][lid], ex[2][ev][lid], ex[3][ev][lid]
        dphi = math.remainder(phi - phi0, 2.0 * math.pi)
        if dphi <= -math.pi:
            dphi += 2.0 * math.pi
        scale = abs(2.0 * math.exp(-eta0) / (1.0 + math.exp(-2.0 * eta0))) * math.sqrt(r0 * r0 + z0 * z0)
        x = (eta - eta0) * scale * (-1.0 if eta0 < 0 else 1.0)
        y = dphi * r0 * (-1.0 if flip_phi[ev] else 1.0)
        r = math.sqrt(x * x + y * y)
        ir = min(bisect.bisect_right(edges[lid], r) - 1, lay.n_r - 1)
        ia, n_a = 0, int(lay.alpha_per_r[ir])
        if n_a > 1:
            alpha = math.atan2(abs(y) if sym else y, x)
            ia = min(int((alpha - lo) * n_a / (math.pi - lo)), n_a - 1)
        out[ev, geom.offsets[lid][0] + int(lay.index_of(ir, ia))] += e
    return out


# ----------------------------------------------------------------------------------------------
# voxelise: files


class HitsFile:
    """What the pre-pass learns about one hits file (small per-event arrays only)."""

    def __init__(self, path, n_events, n_hits, truth_p, event_eta):
        self.path = path
        self.n_events = n_events
        self.n_hits = n_hits
        self.truth_p = truth_p
        self.event_eta = event_eta
        self.root = None       # ROOT ntuples: form, reference points, PDG ids, selected entries
        self.skipped = 0       # ROOT ntuples: entries outside the slice (FastCaloGAN's selection)

    def select(self, keep):
        """Keep only the entries ``keep`` (ROOT ntuples: the events inside the slice)."""
        self.root["keep"] = keep
        self.skipped = int((~keep).sum())
        self.n_events = int(keep.sum())
        self.truth_p = self.truth_p[keep]
        self.event_eta = self.event_eta[keep]


def _check_particle_attr(f, path, particle, what):
    """The file's optional 'particle' attribute must agree with --particle."""
    attr = f.attrs.get("particle")
    if attr is not None:
        attr = attr.decode() if isinstance(attr, bytes) else str(attr)
        if attr != particle:
            raise UserError(f"{path}: the file holds {attr} {what} (attribute 'particle') but --particle is {particle}")


def inspect_hits_file(path, particle):
    """Validate the structure of a hits file and read its per-event arrays; UserError names file and field."""
    import h5py

    with open_h5(path) as f:
        for name in HIT_FIELDS + ("truth_p",) + EXTRAP_FIELDS:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise UserError(f"{path}: missing dataset '{name}' (hits files have {', '.join(HIT_FIELDS)}, "
                                f"truth_p and {', '.join(EXTRAP_FIELDS)})")
        n_hits = f["energy"].shape[0] if f["energy"].ndim == 1 else -1
        for name in HIT_FIELDS + tuple(k for k in ("r", "z") if k in f):
            if f[name].shape != (n_hits,):
                raise UserError(f"{path}: '{name}' has shape {f[name].shape}, expected ({max(n_hits, 0)},) "
                                f"like 'energy'")
        n_events = f["truth_p"].shape[0] if f["truth_p"].ndim == 1 else -1
        if n_events < 0:
            raise UserError(f"{path}: 'truth_p' has shape {f['truth_p'].shape}, expected (events,)")
        if n_events == 0:
            raise UserError(f"{path}: empty input (no events in 'truth_p')")
        if n_hits == 0:
            raise UserError(f"{path}: empty input (no hits)")
        shape = f["extrap_eta"].shape
        for name in EXTRAP_FIELDS:
            if f[name].ndim != 2 or f[name].shape[0] != n_events or f[name].shape != shape:
                raise UserError(f"{path}: '{name}' has shape {f[name].shape}, expected ({n_events}, layers)")
        want = PARTICLES[particle][0]
        _check_particle_attr(f, path, particle, "hits")
        if "truth_pdg" in f:
            pdg = np.abs(np.asarray(f["truth_pdg"][:]).reshape(-1))
            if pdg.size and (pdg != want).any():
                got = int(pdg[np.argmax(pdg != want)])
                raise UserError(f"{path}: 'truth_pdg' has PDG id {got} but --particle {particle} is {want}")
        truth_p = np.asarray(f["truth_p"][:], dtype=np.float64)
        bad = ~np.isfinite(truth_p) | (truth_p <= 0)
        if bad.any():
            raise UserError(f"{path}: 'truth_p' has NaN/inf or non-positive values (first at event {_first_bad(bad)})")
        event_eta = np.empty(n_events)
        ds = f["extrap_eta"]
        for a in range(0, n_events, 2 ** 16):
            block = np.abs(np.asarray(ds[a:a + 2 ** 16], dtype=np.float64))
            block[~np.isfinite(block)] = np.nan
            empty = np.isnan(block).all(axis=1)
            if empty.any():
                raise UserError(f"{path}: event {a + _first_bad(empty)} has no finite 'extrap_eta' in any layer")
            event_eta[a:a + block.shape[0]] = np.nanmedian(block, axis=1)
    return HitsFile(path, n_events, n_hits, truth_p, event_eta)


def choose_slice(binning, particle, files, tolerance):
    """The XML slice (a Geometry) holding the hits files; every event must lie in it within ``tolerance``."""
    list_slices(binning, particle)   # XML errors first, naming the XML
    geom = None
    for hf in files:
        eta = float(np.median(hf.event_eta))
        try:
            g = read_geometry(binning, particle, eta)
        except GeometryError as err:
            raise UserError(f"{hf.path}: |eta| {eta:.4f} of the hits is outside the XML's slices ({err})") from None
        lo, hi = g.eta_min / 100.0, g.eta_max / 100.0
        if hf.root is not None:   # FastCaloGAN: only entries with |eta| x 100 in [etaMin, etaMax] are used
            hf.select((hf.event_eta * 100 >= g.eta_min) & (hf.event_eta * 100 <= g.eta_max))
            if hf.n_events == 0:
                raise UserError(f"{hf.path}: no entry has |{ROOT_BOUNDARY}| inside the slice {lo:.2f}-{hi:.2f}")
        out = (hf.event_eta < lo - tolerance) | (hf.event_eta > hi + tolerance)
        if out.any():
            i = _first_bad(out)
            raise UserError(f"{hf.path}: {int(out.sum())} events lie outside the |eta| slice {lo:.2f}-{hi:.2f} of "
                            f"{binning} (first: event {i} at |eta| {hf.event_eta[i]:.4f}); "
                            f"voxelise one slice at a time")
        if geom is None:
            geom = g
        elif (g.eta_min, g.eta_max) != (geom.eta_min, geom.eta_max):
            raise UserError(f"{hf.path}: its hits are in the |eta| slice {lo:.2f}-{hi:.2f} but {files[0].path} is in "
                            f"{geom.eta_min / 100:.2f}-{geom.eta_max / 100:.2f}; voxelise one slice at a time")
    return geom


def voxelise_file(task):
    """Worker: voxelise one hits file in chunks; returns (path, float32 showers, counters dict)."""
    path, geom, n_events, chunk = task
    mapper = VoxelMapper(geom)
    with open_h5(path) as f:
        n_cols = f["extrap_eta"].shape[1]
        if int(mapper.layer_ids.max()) >= n_cols:
            raise UserError(f"{path}: extrapolation arrays have {n_cols} layer columns but the XML voxelises layer "
                            f"{int(mapper.layer_ids.max())}")
        pdg = f["truth_pdg"][:] if "truth_pdg" in f else None
        tables = mapper.event_tables(*(f[k][:] for k in EXTRAP_FIELDS), pdg=pdg)
        acc = Accumulator(mapper, n_events)
        n = f["energy"].shape[0]
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            try:
                cols = {k: f[k][a:b] for k in HIT_FIELDS}
            except OSError as err:
                raise UserError(f"{path}: cannot read hits {a}..{b} (truncated or corrupt file: {err})") from None
            acc.add(tables, cols["event"].astype(np.int64, copy=False), cols["layer"].astype(np.int64),
                    cols["eta"].astype(np.float64, copy=False), cols["phi"].astype(np.float64, copy=False),
                    cols["energy"].astype(np.float64, copy=False), where=path, first_row=a)
    stats = {"hits": acc.hits, "dropped_hits": acc.dropped_hits, "dropped_energy": acc.dropped_energy,
             "energy": acc.energy, "voxel_energy": float(acc.showers.sum())}
    return path, acc.showers.astype(np.float32), stats


# ----------------------------------------------------------------------------------------------
# voxelise: FastCaloSim input ntuples (ROOT, read through the optional uproot)

ROOT_TREE = "FCS_ParametrizationInput"
#: the hit branches of each ntuple form: (x, y, z, energy, sampling[, sampling fraction])
ROOT_FORMS = {
    "ATLAS SaveAllBranches": ("HitX", "HitY", "HitZ", "HitE", "HitSampling", "HitSamplingFraction"),
    "Open Data Detector": ("hits.hit_x", "hits.hit_y", "hits.hit_z", "hits.hit_energy", "hits.sampling"),
}
ROOT_SAMPLING_BRANCHES = tuple(f"Sampling_{i}" for i in range(25))   # 24 = hits of invalid cells
ROOT_TRUTH = ("TruthPx", "TruthPy", "TruthPz", "TruthPDG")
ROOT_MID = ("newTTC_mid_eta", "newTTC_mid_phi", "newTTC_mid_r", "newTTC_mid_z")
ROOT_BOUNDARY = "newTTC_IDCaloBoundary_eta"
ODD_GEV = 1000.0                  # Open Data Detector ntuples carry EDM4hep energies in GeV
TILE_SAMPLINGS = (12, 20)         # ATLAS Tile samplings: energy = raw x sampling fraction (LAr: raw / fraction)
PLACEHOLDER = -998.0              # extrapolated values at or below this are placeholders (-999)


def is_root_input(path):
    """True for ROOT file names: ``*.root`` and the grid's ``*.root.1``.

    >>> is_root_input("a/pid22_E65536.root.1"), is_root_input("hits.h5")
    (True, False)
    """
    import re
    return re.search(r"\.root(\.\d+)?$", path) is not None


def expand_inputs(paths):
    """Command-line inputs -> files: a directory gives its ROOT files, an unmatched pattern is globbed."""
    import glob
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(q for q in glob.glob(os.path.join(p, "*")) if is_root_input(q))
            if not found:
                raise UserError(f"{p}: directory holds no ROOT files (*.root, *.root.N)")
            out += found
        elif not os.path.exists(p) and any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise UserError(f"{p}: no file matches")
            out += found
        else:
            out.append(p)
    return out


def _uproot(path):
    try:
        import awkward  # noqa: F401
        import uproot
    except ImportError:
        raise UserError(f"{path}: reading ROOT input needs the optional uproot and awkward packages "
                        f"(pip install -r requirements.txt, or make .venv)") from None
    return uproot


class RootNtuple:
    """One FastCaloSim input ntuple: the tree, its form and the branch names (uproot and awkward)."""

    def __init__(self, path):
        uproot = _uproot(path)
        self.path = path
        try:
            f = uproot.open(path)
            tree = f[ROOT_TREE] if ROOT_TREE in f else None
        except Exception as err:   # uproot raises many types on damaged files; all mean the same here
            raise UserError(f"{path}: not a readable ROOT file (truncated or corrupt: {_one_line(err)})") from None
        if tree is None:
            raise UserError(f"{path}: no TTree '{ROOT_TREE}' (FastCaloSim input ntuples have one)")
        kind = str(getattr(tree, "classname", type(tree).__name__))
        if kind != "TTree":
            raise UserError(f"{path}: '{ROOT_TREE}' is a {kind}, not the TTree of a FastCaloSim input ntuple")
        self.tree = tree
        self.names = {}
        for key in tree.keys(recursive=True):
            self.names.setdefault(key.rsplit("/", 1)[-1], key)
        self.n_entries = int(tree.num_entries)
        self.form = next((name for name, br in ROOT_FORMS.items() if all(b in self.names for b in br)), None)
        if self.form is None:
            self._no_hit_branches()
        self.hit_branches = ROOT_FORMS[self.form]
        self.energy_scale = ODD_GEV if self.form == "Open Data Detector" else 1.0

    def _no_hit_branches(self):
        sampling = [b for b in ROOT_SAMPLING_BRANCHES if b in self.names]
        flat = ROOT_FORMS["ATLAS SaveAllBranches"]
        if sampling:   # FCS_matchedcellvector: a ROOT dictionary class uproot does not deserialise reliably
            raise UserError(f"{self.path}: hits only in the FCS_matchedcellvector branches {sampling[0]}.."
                            f"{sampling[-1]}, which calokit does not read; it needs the flat hit branches "
                            f"{', '.join(flat)} (ISF_HitAnalysis with SaveAllBranches) or the Open Data Detector "
                            f"'hits' branch")
        have = [n for n in flat + ROOT_FORMS["Open Data Detector"] if n in self.names]
        raise UserError(f"{self.path}: missing hit branches: expected {', '.join(flat)} (ATLAS) or "
                        f"{', '.join(ROOT_FORMS['Open Data Detector'])} (Open Data Detector)"
                        f"{'; found only ' + ', '.join(have) if have else ''}")

    def read(self, name, start=0, stop=None):
        """Branch ``name`` of entries start..stop as an awkward array; UserError on damaged baskets."""
        import awkward as ak
        try:
            return ak.Array(self.tree[self.names[name]].array(entry_start=start, entry_stop=stop, library="ak"))
        except Exception as err:
            raise UserError(f"{self.path}: cannot read branch '{name}' entries {start}..{stop or self.n_entries} "
                            f"(truncated or corrupt file, or an unreadable type: {_one_line(err)})") from None


def _one_line(err):
    return " ".join(str(err).split())[:200] or type(err).__name__


def _numeric(nt, name, arr, depth):
    """Check that ``arr`` (branch ``name``) is numeric with ``depth`` list levels (vector<...>); UserError if not."""
    import awkward as ak
    try:
        lead = ak.to_layout(arr).purelist_depth - 1
        kind = np.dtype(str(ak.type(ak.flatten(arr, axis=None)).content)).kind
    except Exception:
        lead, kind = -1, "O"
    if kind not in "fiu" or (depth is not None and lead not in depth):
        want = {1: "vector<float/int>", 2: "vector<vector<float>> or float[N]"}[max(depth or (1,))]
        raise UserError(f"{nt.path}: branch '{name}' has type {ak.type(arr)} but a FastCaloSim ntuple has {want}")
    return lead


def _first_particle(nt, name, arr):
    """vector<...>[particle] per event -> particle 0 per event (float64); NaN where the vector is empty."""
    import awkward as ak
    _numeric(nt, name, arr, (1,))
    out = np.full(len(arr), np.nan)
    has = ak.to_numpy(ak.num(arr, axis=1)) > 0
    if has.any():
        out[has] = ak.to_numpy(ak.firsts(arr[has]), allow_missing=False).astype(np.float64)
    return out


def _per_layer(nt, name, arr):
    """Extrapolated positions per event and sampling of particle 0: vector<vector<float>> [particle][layer],
    or one level less ([layer], as float[N] or vector<float>) -> (events, layers) float64, NaN for empty or
    placeholder (<= -998) entries."""
    import awkward as ak
    lead = _numeric(nt, name, arr, (1, 2))
    if lead == 2:
        arr = ak.firsts(arr, axis=1)                       # particle 0 (None where there is no particle)
        arr = ak.fill_none(arr, [], axis=0)
    n_cols = int(ak.max(ak.num(arr, axis=1), initial=0)) if len(arr) else 0
    if n_cols == 0:
        return np.full((len(arr), 1), np.nan)
    padded = ak.fill_none(ak.pad_none(arr, n_cols, axis=1, clip=True), np.nan)
    out = ak.to_numpy(padded).astype(np.float64)
    out[~np.isfinite(out) | (out <= PLACEHOLDER)] = np.nan
    return out


def energy_from_name(path):
    """The incident energy a FastCaloSim file name carries (``..._E65536_...`` -> 65536.0), or None.

    >>> energy_from_name("mc16_13TeV.pid22_E65536_disj_eta_m25_m20_20_25_zv_0.root.1")
    65536.0
    """
    import re
    m = re.search(r"(?:^|[._-])E(\d+(?:\.\d+)?)(?=[._-]|$)", os.path.basename(path))
    return float(m.group(1)) if m else None


def _entry_steps(nt, chunk):
    """Entry ranges of about ``chunk`` hits each (from the branches' stored sizes), so memory stays bounded."""
    try:
        step = int(nt.tree.num_entries_for(chunk * 4 * len(nt.hit_branches), filter_name=list(nt.hit_branches)))
    except Exception:
        step = 10_000
    step = max(1, min(step, nt.n_entries))
    return [(a, min(a + step, nt.n_entries)) for a in range(0, nt.n_entries, step)]


def read_root_hits(nt, start, stop):
    """Hits of entries start..stop: (hits per entry, x, y, z [mm], energy [MeV], sampling) as numpy arrays.

    ATLAS flat branches hold raw energies: LAr hits are divided by their sampling fraction and Tile hits
    (samplings 12-20) multiplied by it, as ISF_HitAnalysis does for its FCS_hit (a zero fraction gives 0);
    Open Data Detector energies are GeV and become MeV.
    """
    import awkward as ak
    arrs = [nt.read(name, start, stop) for name in nt.hit_branches]
    energy_name = nt.hit_branches[3]
    for name, arr in zip(nt.hit_branches, arrs):
        _numeric(nt, name, arr, (1,))
    counts = ak.to_numpy(ak.num(arrs[3], axis=1)).astype(np.int64)
    for name, arr in zip(nt.hit_branches, arrs):
        if not np.array_equal(ak.to_numpy(ak.num(arr, axis=1)), counts):
            raise UserError(f"{nt.path}: branch '{name}' has a different number of hits than '{energy_name}' "
                            f"(entries {start}..{stop})")
    x, y, z, e = (ak.to_numpy(ak.flatten(a)).astype(np.float64) for a in arrs[:4])
    sampling = ak.to_numpy(ak.flatten(arrs[4])).astype(np.int64)
    if len(arrs) > 5:   # ATLAS: raw energies and their sampling fractions
        frac = ak.to_numpy(ak.flatten(arrs[5])).astype(np.float64)
        tile = (sampling >= TILE_SAMPLINGS[0]) & (sampling <= TILE_SAMPLINGS[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            e = np.where(frac == 0, 0.0, np.where(tile, e * frac, e / frac))
    if nt.energy_scale != 1.0:
        e *= nt.energy_scale
    return counts, x, y, z, e, sampling


def hit_eta_phi(x, y, z):
    """Pseudorapidity and azimuth of hit positions (mm), as ROOT's TVector3 Eta() and Phi().

    >>> [round(float(v[0]), 6) for v in hit_eta_phi(np.array([0.0]), np.array([1500.0]), np.array([0.0]))]
    [0.0, 1.570796]
    """
    rt = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.arcsinh(z / rt)
    return eta, np.arctan2(y, x)


def root_barycentres(nt, chunk):
    """Per entry and sampling, the energy-weighted mean hit position as (eta, phi, r, z) arrays (NaN where a
    layer has no energy), and per entry the |eta| of the whole shower's energy-weighted position."""
    n = nt.n_entries
    n_cols = 32
    sums = np.zeros((8, n, n_cols))   # E x, E y, E z, E, then x, y, z, 1 for layers whose hits carry no energy
    for a, b in _entry_steps(nt, chunk):
        counts, x, y, z, e, s = read_root_hits(nt, a, b)
        ok = (s >= 0) & np.isfinite(x) & np.isfinite(y) & np.isfinite(z) & np.isfinite(e)
        entry = np.repeat(np.arange(a, b), counts)[ok]
        s, x, y, z, e = s[ok], x[ok], y[ok], z[ok], e[ok]
        if s.size and s.max() >= n_cols:
            grown = np.zeros((8, n, int(s.max()) + 1))
            grown[:, :, :n_cols] = sums
            sums, n_cols = grown, int(s.max()) + 1
        idx = entry * n_cols + s
        for j, w in enumerate((e * x, e * y, e * z, e, x, y, z, np.ones_like(x))):
            sums[j] += np.bincount(idx, weights=w, minlength=n * n_cols).reshape(n, n_cols)
    weighted = sums[3] > 0
    sums[:4] = np.where(weighted, sums[:4], sums[4:])
    with np.errstate(divide="ignore", invalid="ignore"):
        cx, cy, cz = (sums[j] / sums[3] for j in range(3))
        eta, phi = hit_eta_phi(cx, cy, cz)
        tot = sums[:4].sum(axis=2)
        ev_eta = np.abs(hit_eta_phi(tot[0] / tot[3], tot[1] / tot[3], tot[2] / tot[3])[0])
    empty = ~(sums[3] > 0)
    out = [np.where(empty, np.nan, a) for a in (eta, phi, np.hypot(cx, cy), cz)]
    return out, ev_eta


def inspect_root_file(path, particle, centre, energy, chunk):
    """Pre-pass over a FastCaloSim ntuple: form, truth momentum and PDG id of particle 0, the reference point
    per entry and sampling, and |eta| per entry (newTTC_IDCaloBoundary_eta); hits are read only for
    ``centre == "barycentre"``. Returns a :class:`HitsFile` whose events are selected later by the slice."""
    nt = RootNtuple(path)
    n = nt.n_entries
    if n == 0:
        raise UserError(f"{path}: empty input (no entries in '{ROOT_TREE}')")
    p, pdg = _root_truth(nt, particle, energy)
    if centre == "barycentre":
        extrap, ev_eta = root_barycentres(nt, chunk)
    else:
        missing = [b for b in ROOT_MID if b not in nt.names]
        if missing:
            raise UserError(f"{path}: missing extrapolation branches {', '.join(missing)} (pass --centre barycentre "
                            f"to centre each layer on its energy-weighted hit position instead)")
        extrap = [_per_layer(nt, b, nt.read(b)) for b in ROOT_MID]
        n_cols = max(a.shape[1] for a in extrap)
        extrap = [np.pad(a, ((0, 0), (0, n_cols - a.shape[1])), constant_values=np.nan) for a in extrap]
        if np.isnan(extrap[0]).all():
            raise UserError(f"{path}: no usable extrapolation: newTTC_mid_eta holds only placeholders (-999 or empty "
                            f"per-layer vectors); pass --centre barycentre to centre each layer on its "
                            f"energy-weighted hit position")
        with warnings.catch_warnings():   # all-NaN rows give NaN (reported below), not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            ev_eta = np.nanmedian(np.abs(extrap[0]), axis=1)
    if ROOT_BOUNDARY in nt.names:   # FastCaloGAN selects events by the calorimeter-boundary |eta|
        boundary = np.abs(_first_particle(nt, ROOT_BOUNDARY, nt.read(ROOT_BOUNDARY)))
        boundary[boundary >= -PLACEHOLDER] = np.nan
        ev_eta = np.where(np.isfinite(boundary), boundary, ev_eta)
    bad = ~np.isfinite(ev_eta)
    if bad.any():
        raise UserError(f"{path}: entry {_first_bad(bad)} has no |eta| (no finite {ROOT_BOUNDARY}, extrapolation or "
                        f"hit)")
    hf = HitsFile(path, n, -1, p, ev_eta)
    hf.root = {"form": nt.form, "extrap": extrap, "pdg": pdg, "keep": np.ones(n, dtype=bool)}
    return hf


def _root_truth(nt, particle, energy):
    """(momentum p in MeV, PDG id) of particle 0 per entry, from TruthPx/Py/Pz/PDG, else from --energy or the
    file name (and --particle's PDG id)."""
    want = PARTICLES[particle][0]
    n, path = nt.n_entries, nt.path
    if all(b in nt.names for b in ROOT_TRUTH[:3]):
        px, py, pz = (_first_particle(nt, b, nt.read(b)) for b in ROOT_TRUTH[:3])
        p = np.sqrt(px * px + py * py + pz * pz)
        bad = ~np.isfinite(p) | (p <= 0)
        if bad.any():
            raise UserError(f"{path}: entry {_first_bad(bad)} has no truth particle (TruthPx/Py/Pz empty or zero)")
        pdg = np.full(n, want, dtype=np.int64)
        if "TruthPDG" in nt.names:
            got = _first_particle(nt, "TruthPDG", nt.read("TruthPDG"))
            if (~np.isfinite(got)).any() or (np.abs(got) != want).any():
                i = _first_bad(~np.isfinite(got) | (np.abs(got) != want))
                raise UserError(f"{path}: 'TruthPDG' of entry {i} is {got[i]:g} but --particle {particle} is {want}")
            pdg = got.astype(np.int64)
        return p, pdg
    e = energy if energy is not None else energy_from_name(path)
    if e is None:
        raise UserError(f"{path}: no truth branches (TruthPx, TruthPy, TruthPz) to take the incident momentum from; "
                        f"pass --energy MeV, or name the file like ..._E65536_...")
    return np.full(n, float(e)), np.full(n, want, dtype=np.int64)


def voxelise_root_file(task):
    """Worker: voxelise one FastCaloSim ntuple in entry chunks through the same mapper and accumulator as
    the HDF5 hits; returns (path, float32 showers, counters dict)."""
    path, geom, n_events, chunk, info = task
    nt = RootNtuple(path)
    mapper = VoxelMapper(geom)
    keep = info["keep"]
    sel = np.flatnonzero(keep)
    n_cols = max(mapper.code.size, info["extrap"][0].shape[1])
    ex = [np.pad(a[sel], ((0, 0), (0, n_cols - a.shape[1])), constant_values=np.nan) for a in info["extrap"]]
    tables = mapper.event_tables(*ex, pdg=info["pdg"][sel])
    row_of = np.full(nt.n_entries, -1, dtype=np.int64)
    row_of[sel] = np.arange(sel.size)
    acc = Accumulator(mapper, n_events)
    unlisted = unlisted_energy = 0
    first = 0
    for a, b in _entry_steps(nt, chunk):
        counts, x, y, z, e, s = read_root_hits(nt, a, b)
        ev = np.repeat(row_of[a:b], counts)
        m = ev >= 0
        # samplings the XML does not list (ATLAS writes -1 for hits without a cell) are dropped and counted
        listed = (s >= 0) & (s < mapper.code.size)
        listed[listed] = mapper.code[s[listed]] != LAYER_ABSENT
        drop = m & ~listed
        unlisted += int(drop.sum())
        unlisted_energy += float(e[drop].sum())
        m &= listed
        eta, phi = hit_eta_phi(x[m], y[m], z[m])
        acc.add(tables, ev[m], s[m], eta, phi, e[m], where=path, first_row=first)
        first += int(m.sum())
    acc.hits += unlisted
    acc.dropped_hits += unlisted
    acc.dropped_energy += unlisted_energy
    stats = {"hits": acc.hits, "dropped_hits": acc.dropped_hits, "dropped_energy": acc.dropped_energy,
             "energy": acc.energy, "voxel_energy": float(acc.showers.sum())}
    return path, acc.showers.astype(np.float32), stats


def voxelise_task(task):
    """Worker entry: a ROOT ntuple task carries its pre-pass results (5 items), a hits HDF5 task 4."""
    return voxelise_root_file(task) if len(task) == 5 else voxelise_file(task)


def _map_tasks(tasks, jobs):
    """Yield voxelise_file results in task order, with ``jobs`` worker processes when there is more than one file."""
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield voxelise_task(t)
        return
    import multiprocessing as mp

    # spawn, not fork: safe even when the caller has threads (e.g. TensorFlow loaded in the same process)
    pool = mp.get_context("spawn").Pool(min(jobs, len(tasks)))
    try:
        yield from pool.imap(voxelise_task, tasks)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def csv_name(pid, energy, geom):
    """``pid<pid>_E<MeV>_eta_<min>_<max>.csv``."""
    return f"pid{pid}_E{int(round(energy))}_{geom.slice_name()}.csv"


def fastcalogan_csv_path(root, pid, energy, geom):
    """FastCaloGAN's reader path: ``<root>/csvFiles/pid<pid>/eta_<min>_<max>/pid<pid>_E<p>_eta_<min>_<max>_voxalisation.csv``.

    >>> from HighLevelFeatures import Geometry
    >>> fastcalogan_csv_path("vox", 22, 65536.0, Geometry([], "photon", 22, eta_min=20, eta_max=25))
    'vox/csvFiles/pid22/eta_20_25/pid22_E65536_eta_20_25_voxalisation.csv'
    """
    name = f"pid{pid}_E{int(round(energy))}_{geom.slice_name()}_voxalisation.csv"
    return os.path.join(root, "csvFiles", f"pid{pid}", geom.slice_name(), name)


def write_csv(path, names, rows_iter):
    """Header row of voxel names (none when ``names`` is None), then float32 rows with 9 significant digits
    (exact round trip)."""
    with open(path, "w") as fh:
        if names is not None:
            fh.write(",".join(names) + "\n")
        for block in rows_iter:
            np.savetxt(fh, block, fmt="%.9g", delimiter=",")


def write_csvs(root, layout, geom, d_e, d_s, stack):
    """One CSV per incident energy of the voxelised file (datasets ``d_e``, ``d_s``); returns the paths.

    ``calokit``: ``<root>/pid<pid>_E<p>_eta_<min>_<max>.csv`` with a header of voxel names, this project's
    column order. ``fastcalogan``: the path and layout FastCaloGAN's reader takes (no header; within a layer
    r bins outer, alpha bins inner). Each file is renamed into place when the ExitStack ``stack`` closes.
    """
    ensure_dir(root)
    fcg = layout == "fastcalogan"
    names = None if fcg else geom.voxel_names()
    cols = geom.fastcalogan_order() if fcg else None
    energies = np.rint(d_e[:, 0])
    V = d_s.shape[1]
    paths = []
    for energy in np.unique(energies):
        idx = np.flatnonzero(energies == energy)
        path = (fastcalogan_csv_path(root, geom.pid, energy, geom) if fcg
                else os.path.join(root, csv_name(geom.pid, energy, geom)))
        ensure_dir(os.path.dirname(path))
        tmp_csv = stack.enter_context(atomic_output(path))
        step = max(1, 2 ** 22 // max(V, 1))
        blocks = (idx[i:i + step] for i in range(0, idx.size, step))
        rows = (d_s[b[0]:b[-1] + 1] if b[-1] - b[0] + 1 == b.size else d_s[b] for b in blocks)
        write_csv(tmp_csv, names, (r[:, cols] if fcg else r for r in rows))
        paths.append(path)
    return paths


def run_voxelise(args):
    """``voxelise``: hits files -> CaloChallenge HDF5 (+ CSVs); returns the summary line."""
    import h5py
    from tqdm import tqdm

    if args.jobs < 1 or args.chunk < 1:
        raise UserError("--jobs and --chunk must be >= 1")
    particle = _particle(args.particle)
    inputs = expand_inputs(args.hits)
    if os.path.abspath(args.out) in {os.path.abspath(p) for p in inputs}:
        raise UserError(f"{args.out}: --out would overwrite an input file")
    if args.energy is not None and not (args.energy > 0 and math.isfinite(args.energy)):
        raise UserError(f"--energy must be a positive momentum in MeV, got {args.energy}")
    files = [inspect_root_file(p, particle, args.centre, args.energy, args.chunk) if is_root_input(p)
             else inspect_hits_file(p, particle) for p in inputs]
    geom = choose_slice(args.binning, particle, files, args.eta_tolerance)
    VoxelMapper(geom)   # geometry errors before any work
    if args.csv:        # checked now, created only once the voxels are done (nothing is left behind on errors)
        parent = args.csv if os.path.isdir(args.csv) else os.path.dirname(os.path.abspath(args.csv))
        if not os.access(parent, os.W_OK):
            raise UserError(f"{args.csv}: CSV directory (or its parent) is not writable")
    n_total = sum(hf.n_events for hf in files)
    V = geom.n_voxels
    tasks = [(hf.path, geom, hf.n_events, args.chunk) + ((hf.root,) if hf.root is not None else ()) for hf in files]
    totals = {"hits": 0, "dropped_hits": 0, "dropped_energy": 0.0, "energy": 0.0, "voxel_energy": 0.0}
    csv_paths = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(args.out))
        out = stack.enter_context(h5py.File(tmp, "w"))
        d_e = out.create_dataset("incident_energies", shape=(n_total, 1), dtype=np.float64)
        d_s = out.create_dataset("showers", shape=(n_total, V), dtype=np.float32,
                                 chunks=(max(1, min(n_total, 2 ** 20 // max(V, 1))), V))
        out.attrs.update({"particle": geom.particle, "pid": geom.pid, "eta_min": float(geom.eta_min),
                          "eta_max": float(geom.eta_max), "binning": args.binning, "n_hits_files": len(files),
                          "creator": "calokit preprocess.py voxelise"})
        forms = sorted({hf.root["form"] for hf in files if hf.root is not None})
        if forms:
            out.attrs.update({"root_forms": ", ".join(forms), "reference_point": args.centre})
        known = all(hf.n_hits >= 0 for hf in files)   # ROOT ntuples: hits counted as they are read
        bar = tqdm(total=sum(hf.n_hits for hf in files) if known else None, desc=f"voxelise {geom.slice_name()}", unit="hit",
                   unit_scale=True, file=sys.stderr, disable=None)
        start = 0
        results = stack.enter_context(contextlib.closing(_map_tasks(tasks, args.jobs)))   # pool ends with the block
        for hf, (_, showers, stats) in zip(files, results):
            d_e[start:start + hf.n_events, 0] = hf.truth_p
            d_s[start:start + hf.n_events] = showers
            start += hf.n_events
            for key in totals:
                totals[key] += stats[key]
            bar.update(stats["hits"])
        bar.close()
        if args.csv:
            csv_paths = write_csvs(args.csv, args.csv_layout, geom, d_e, d_s, stack)
        out.close()
    msg = (f"voxelise: wrote {args.out} ({n_total} events x {V} voxels, {geom.particle}, |eta| "
           f"{geom.eta_min / 100:.2f}-{geom.eta_max / 100:.2f} of {args.binning}) from {len(files)} input files: "
           f"{totals['hits']} hits, {totals['dropped_hits']} dropped in non-voxelised layers "
           f"({totals['dropped_energy']:.6g} MeV), {totals['voxel_energy']:.6g} MeV voxelised")
    skipped = sum(hf.skipped for hf in files)
    if skipped:
        msg += f"; {skipped} ROOT entries outside the slice skipped"
    if args.csv:
        msg += f"; {len(csv_paths)} CSV files in {args.csv}"
    return msg


# ----------------------------------------------------------------------------------------------
# prepare: the training file of one GAN


def train_filename(geom, range_name):
    """``train_<particle>_eta_<min>_<max>_<range>.h5``."""
    return f"train_{geom.particle}_{geom.slice_name()}_{range_name}.h5"


def run_prepare(args):
    """``prepare``: CaloChallenge HDF5 -> the training file (docs/formats-and-exports.md); returns the summary line."""
    import h5py

    particle = _particle(args.particle)
    p_min, p_max, _ = energy_range(particle, args.range)
    eta = args.eta
    if eta is None:   # a voxelise output says its slice; a CaloChallenge file does not (then the XML must have one)
        with open_h5(args.voxels[0]) as f:
            if "eta_min" in f.attrs and "eta_max" in f.attrs:
                eta = 0.5 * (float(f.attrs["eta_min"]) + float(f.attrs["eta_max"])) / 100.0
    try:
        geom = read_geometry(args.binning, particle, eta)
    except GeometryError as err:
        raise UserError(f"{err}{' (pass --eta)' if eta is None else ''}") from None
    if args.label is None:   # the XML's label_definition (FastCaloGAN), else V2
        args.label = str(geom.gan_settings(args.range).get("label_definition", ("V2", None))[0])
    if args.label not in LABEL_FORMULAS:
        raise UserError(f"--label {args.label}: choose from {', '.join(LABEL_FORMULAS)}")
    V = geom.n_voxels
    # pass 1: validate every input and select the events of the range (incident energies only)
    masks = []
    for path in args.voxels:
        f, n, _ = open_calo_file(path, V)
        with f:
            _check_particle_attr(f, path, particle, "showers")
            p = np.asarray(f["incident_energies"][:], dtype=np.float64).reshape(-1)
        if not np.isfinite(p).all() or (p <= 0).any():
            raise UserError(f"{path}: 'incident_energies' has NaN/inf or non-positive values")
        masks.append(in_energy_range(p, particle, args.range))
    n_sel = int(sum(int(m.sum()) for m in masks))
    if n_sel == 0:
        raise UserError(f"{', '.join(args.voxels)}: no events with p in the '{args.range}' range of {particle} "
                        f"({p_min:g}-{p_max:g} MeV)")
    out_path = args.out
    if os.path.isdir(out_path) or out_path.endswith(os.sep):
        ensure_dir(out_path)
        out_path = os.path.join(out_path, train_filename(geom, args.range))
    if os.path.abspath(out_path) in {os.path.abspath(p) for p in args.voxels}:
        raise UserError(f"{out_path}: --out would overwrite an input file")
    ekin_min, ekin_max = float(kinetic_energy(p_min, particle)), float(kinetic_energy(p_max, particle))
    attrs = {"particle": particle, "pid": int(geom.pid), "eta_min": float(geom.eta_min),
             "eta_max": float(geom.eta_max), "range": args.range, "binning": args.binning,
             "label_scheme": args.label, "max_exp": MAX_EXP, "p_min": float(p_min), "p_max": float(p_max),
             "ekin_min": ekin_min, "ekin_max": ekin_max, "latent_dim": int(geom.latent_dim or 50),
             "n_voxels": int(V), "source": ",".join(args.voxels), "norm": args.norm}
    spans = None
    if args.norm == "layer":
        spans = check_spans([geom.offsets[lay.id] for lay in geom.layers if lay.n_voxels], V)
        attrs.update(layer_spans=np.asarray(spans, dtype=np.int64), layer_fill_mev=LAYER_FILL_MEV,
                     n_features=layer_representation_size(spans))
    # pass 2: stream, normalise, write
    with atomic_output(out_path) as tmp, h5py.File(tmp, "w") as out:
        d_v = out.create_dataset("voxels", shape=(n_sel, V), dtype=np.float32,
                                 chunks=(max(1, min(n_sel, 2 ** 20 // max(V, 1))), V))
        d_l = out.create_dataset("label", shape=(n_sel,), dtype=np.float32)
        d_p = out.create_dataset("incident_energies", shape=(n_sel, 1), dtype=np.float64)
        d_k = out.create_dataset("e_kin", shape=(n_sel,), dtype=np.float64)
        d_r = None if spans is None else out.create_dataset(
            "representation", shape=(n_sel, layer_representation_size(spans)), dtype=np.float32,
            chunks=(max(1, min(n_sel, 2 ** 20 // max(V, 1))), layer_representation_size(spans)))
        out.attrs.update(attrs)
        row = 0
        for path, mask in zip(args.voxels, masks):
            for start, p, showers in iter_calo_chunks(path, V):
                sel = mask[start:start + p.size]
                if not sel.any():
                    continue
                p, showers = p[sel], showers[sel]
                ekin = kinetic_energy(p, particle)
                m = p.size
                v32 = (showers / ekin[:, None]).astype(np.float32)
                d_v[row:row + m] = v32
                if d_r is not None:     # from the float32 voxels / E_kin the file holds: both describe one shower
                    d_r[row:row + m] = to_layer_representation(v32, spans, ekin).astype(np.float32)
                d_l[row:row + m] = condition_label(ekin, ekin_min, ekin_max, args.label, MAX_EXP).astype(np.float32)
                d_p[row:row + m, 0] = p
                d_k[row:row + m] = ekin
                row += m
    return (f"prepare: wrote {out_path} ({n_sel} events x {V} voxels, {particle} |eta| {geom.eta_min / 100:.2f}-"
            f"{geom.eta_max / 100:.2f}, range {args.range} p {p_min:g}-{p_max:g} MeV, label {args.label}, "
            f"voxels / E_kin{'' if spans is None else ' and the layer representation'})")


# ----------------------------------------------------------------------------------------------
# fetch: the CaloChallenge files (the kit's only network access, and only when asked)

ZENODO = {  # dataset -> (record id, files: the first trains, the second is the held-out reference)
    "1-photons": ("8099322", ["dataset_1_photons_1.hdf5", "dataset_1_photons_2.hdf5"]),
    "1-pions": ("8099322", ["dataset_1_pions_1.hdf5", "dataset_1_pions_2.hdf5"]),
    "2": ("6366270", ["dataset_2_1.hdf5", "dataset_2_2.hdf5"]),
    "3": ("6366323", ["dataset_3_1.hdf5", "dataset_3_2.hdf5"]),
}


def _record_md5(record, timeout):
    """{file name: md5} from the Zenodo record's metadata."""
    import json
    import urllib.request
    with urllib.request.urlopen(f"https://zenodo.org/api/records/{record}", timeout=timeout) as r:
        meta = json.load(r)
    sums = {}
    for f in meta.get("files", []):
        algo, _, value = str(f.get("checksum", "")).partition(":")
        if algo == "md5":
            sums[f.get("key")] = value
    return sums


def run_fetch(args):
    """Download the dataset's files into --dir, each verified against the record's MD5; never a toy stand-in."""
    import hashlib
    import urllib.error
    import urllib.request

    record, names = ZENODO[args.dataset]
    page = f"https://zenodo.org/records/{record}"
    ensure_dir(args.dir)
    missing = [n for n in names if not os.path.isfile(os.path.join(args.dir, n))]
    if not missing:
        return f"fetch: {', '.join(names)} already in {args.dir}"
    try:
        sums = _record_md5(record, args.timeout)
        for name in missing:
            if name not in sums:
                raise UserError(f"{page}: the record lists no MD5 for {name}; fetch it by hand into {args.dir}/")
            dest = os.path.join(args.dir, name)
            md5 = hashlib.md5()
            with atomic_output(dest) as tmp, open(tmp, "wb") as f, \
                    urllib.request.urlopen(f"{page}/files/{name}?download=1", timeout=args.timeout) as r:
                for block in iter(lambda: r.read(1 << 22), b""):
                    md5.update(block)
                    f.write(block)
                if md5.hexdigest() != sums[name]:
                    raise UserError(f"{dest}: MD5 {md5.hexdigest()} differs from the record's {sums[name]}; not kept")
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise UserError(f"cannot download {', '.join(missing)} ({getattr(err, 'reason', err)}): fetch them by hand "
                        f"from {page} into {args.dir}/") from None
    return f"fetch: wrote {', '.join(missing)} to {args.dir} (MD5 verified against {page})"


# ----------------------------------------------------------------------------------------------
# command line


def _particle(name):
    """Accept a particle name or its PDG id; return the name."""
    for pname, (pid, _) in PARTICLES.items():
        if name == pname or name == str(pid):
            return pname
    raise UserError(f"unknown particle '{name}' (choose from {', '.join(PARTICLES)})")


def build_parser():
    ap = argparse.ArgumentParser(prog="preprocess.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("toy", formatter_class=HelpFormatter, help="write toy hits files (seeded; not Geant4)")
    t.add_argument("--particle", default="photon", help="photon, electron or pion (default photon)")
    t.add_argument("--eta", type=float, default=0.20, help="|eta| inside the 0.05-wide slice to fill (default 0.20)")
    t.add_argument("--events-per-energy", type=int, default=1000, help="events per energy (default 1000)")
    t.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    t.add_argument("--energies", type=float, nargs="+", default=None, help="momenta in MeV (default 2^8..2^22)")
    t.add_argument("--hits-low", type=float, default=50.0, help="mean hits per event at 2^8 MeV (default 50)")
    t.add_argument("--hits-high", type=float, default=2000.0, help="mean hits per event at 2^22 MeV (default 2000)")
    t.add_argument("--out", required=True, help="output directory")

    v = sub.add_parser("voxelise", formatter_class=HelpFormatter,
                       help="hits HDF5 -> CaloChallenge HDF5 (+ CSV per energy)")
    v.add_argument("--binning", required=True, help="binning XML")
    v.add_argument("--particle", required=True, help="particle name or PDG id")
    v.add_argument("--out", required=True, help="output CaloChallenge HDF5")
    v.add_argument("--csv", default=None, help="also write one CSV per energy into this directory")
    v.add_argument("--csv-layout", default="calokit", choices=["calokit", "fastcalogan"],
                   help="calokit: DIR/pid<pid>_E<p>_eta_<min>_<max>.csv, header of voxel names, this project's "
                        "voxel order; fastcalogan: DIR/csvFiles/pid<pid>/eta_<min>_<max>/pid<pid>_E<p>_eta_<min>_"
                        "<max>_voxalisation.csv, no header, r bins outer and alpha bins inner as FastCaloGAN's "
                        "reader takes (default calokit)")
    v.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help=f"files in parallel (default {DEFAULT_JOBS})")
    v.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_HITS, help="hits read at a time")
    v.add_argument("--eta-tolerance", type=float, default=DEFAULT_ETA_TOLERANCE,
                   help=f"|eta| an event may lie outside its slice (default {DEFAULT_ETA_TOLERANCE})")
    v.add_argument("--centre", default="extrapolation", choices=["extrapolation", "barycentre"],
                   help="ROOT input: reference point of each layer: the extrapolated position newTTC_mid_* of "
                        "particle 0 (FastCaloGAN), or each layer's energy-weighted hit position (for ntuples whose "
                        "extrapolation is a placeholder; default extrapolation)")
    v.add_argument("--energy", type=float, default=None,
                   help="ROOT input without truth branches: the incident momentum in MeV (default: the file "
                        "name's E<MeV>, e.g. pid22_E65536_...)")
    v.add_argument("hits", nargs="+",
                   help="inputs of one |eta| slice: hits HDF5 files and/or FastCaloSim input ntuples (*.root, "
                        "*.root.N; a directory or a quoted glob is expanded)")

    p = sub.add_parser("prepare", formatter_class=HelpFormatter,
                       help="CaloChallenge HDF5 -> training file of one GAN")
    p.add_argument("--binning", required=True, help="binning XML")
    p.add_argument("--particle", required=True, help="particle name or PDG id")
    p.add_argument("--range", default="all",
                   help="energy range by momentum p, one GAN each: low = 2^6..2^12 MeV, high = above 2^12 up to 2^22 "
                        "MeV (photons/electrons); all = 2^6..2^22 (photons/electrons), 2^8..2^22 (pions), 2^10..2^22 "
                        "(protons); or FastCaloGAN's names, both ends included: All, UltraLow12, Low12, High12, "
                        "High15, Mid1218, ... (default: all)")
    p.add_argument("--label", default=None,
                   help="label scheme: V2 = LogE (log(E_kin/E_min)/log(E_max/E_min)), V1 (E_kin/2^22), MaxE "
                        "(E_kin/E_max), Exp (log2 E_kin); default: the XML's label_definition, else V2")
    p.add_argument("--eta", type=float, default=None,
                   help="|eta| of the slice in a multi-slice XML (default: from the voxel file's attributes)")
    p.add_argument("--norm", default="ekin", choices=["ekin", "layer"],
                   help="what the network learns: ekin = voxels / E_kin (FastCaloGAN); layer = CaloShowerGAN's "
                        "layer representation (zero voxels set to 1e-4 MeV, voxel / layer energy, layer energy / "
                        "E_tot, E_tot / E_kin), stored beside the voxels (train.py --recipe caloshowergan needs it)")
    p.add_argument("--out", required=True,
                   help="training file, or a directory for train_<particle>_eta_<min>_<max>_<range>.h5")
    p.add_argument("voxels", nargs="+", help="CaloChallenge HDF5 file(s)")

    f = sub.add_parser("fetch", formatter_class=HelpFormatter,
                       help="download CaloChallenge files with MD5 check (the only network access)")
    f.add_argument("--dataset", required=True, choices=sorted(ZENODO), help="CaloChallenge dataset")
    f.add_argument("--dir", default="data", help="download directory (default data/)")
    f.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    return ap


def _main(argv):
    args = build_parser().parse_args(argv)
    run = {"toy": run_toy, "voxelise": run_voxelise, "prepare": run_prepare, "fetch": run_fetch}[args.command]
    print(run(args))
    return 0


def main(argv=None):
    """Run a sub-command; returns the exit code (also for --help and command-line errors, instead of exiting)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
