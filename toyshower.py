"""toyshower.py -- a seeded, physics-shaped TOY calorimeter shower source. It is NOT Geant4.

Real Geant4 single-particle samples cannot be produced offline, so calokit ships this toy so that the whole
chain (hits -> voxels -> GAN -> evaluation) runs and is tested in minutes, on showers with real structure:
energy-dependent longitudinal and lateral shapes, fluctuations that shrink with energy, electrons that
shower earlier than photons, and both looking different from pions. Nothing here is tuned to ATLAS data;
numbers are textbook-plausible choices.

It writes *hits* in the calokit hits format (see preprocess.py and docs/formats-and-exports.md) for the
CaloChallenge dataset-1 layer ids: 0-3 EM barrel (presampler, strips, middle, back), 12-14 Tile barrel (A, BC, D), plus
layer 15, a toy "leakage catcher" behind Tile D that no dataset-1 XML voxelises (its hits exercise the
voxeliser's dropped-hit counter; it is a toy convention, not ATLAS geometry).

Usage (normally through ``python preprocess.py toy``)::

    >>> import toyshower
    >>> hits = toyshower.generate("photon", 4096.0, n_events=20, eta_range=(0.20, 0.25), seed=1)
    >>> sorted(hits["hits"]), hits["extrap_eta"].shape
    (['energy', 'eta', 'event', 'layer', 'phi', 'r', 'z'], (20, 24))

Parametrisation (all per event, vectorised over events; E in MeV unless said otherwise)
------------------------------------------------------------------------------------
Geometry (barrel, |eta| ~ 0.2). Layer radial extents (mm): 0 presampler 1410-1450, 1 strips 1500-1590,
2 middle 1590-1930, 3 back 1930-1980, 12 Tile A 2300-2600, 13 Tile BC 2600-3440, 14 Tile D 3440-3820,
15 toy catcher 3820-3900. The extrapolated position of the particle in a layer is at the layer's mid radius
(``extrap_r``), ``extrap_z = r sinh(eta)``; columns of layers the toy does not model (4-11, 16-23) are NaN.
The particle direction: |eta| uniform in the slice with a random sign, phi uniform in (-pi, pi]. Charged
particles are bent in the 2 T solenoid (toy: one phi kink q asin(min(0.3 B r_sol / 2 pT, 1)), r_sol = 1.2 m,
same in every layer; pi+ turns one way, e- the other); photons fly straight. Slices up to |eta| 1.30 (the 26
barrel slices of the FastCaloGAN binning) are allowed; the toy keeps its barrel layers there (no extended
barrel, no path-length growth with |eta|), a convention that lets every barrel slice run end to end.

Longitudinal depth is counted along the particle path, in radiation lengths X0 for photons and electrons
and in nuclear interaction lengths lambda for pions. Each depth interval belongs to a layer or to dead
material (energy deposited there is lost, as in a real calorimeter; it is not written as hits):

* photon and electron (X0): dead 0-1.3, PS 1.3-1.6, dead 1.6-2.0, strips 2.0-6.4, middle 6.4-22.4,
  back 22.4-24.8, dead 24.8-27, Tile A 27-45, BC 45-90, D 90-110;
* pion (lambda): dead 0-0.05, PS 0.05-0.07, dead 0.07-0.09, strips 0.09-0.33, middle 0.33-1.21,
  back 1.21-1.34, dead 1.34-1.5, Tile A 1.5-3.0, BC 3.0-7.1, D 7.1-8.9, catcher (15) 8.9-9.4.

Photons (Longo/Grindhammer EM profile): the photon converts at depth s ~ Exp(9/7 X0); from there
dE/dt follows a gamma distribution Gamma(a, 1/b) with b = 0.5 and a = 1 + b T, where the depth of the
maximum T = ln(E/E_c) - 0.5 (E_c = 10 MeV) fluctuates log-normally with sigma = 1/(-1.4 + 1.26 ln(E/E_c))
(capped at 0.5): showers get deeper like log E and fluctuate less at high E. Layer energies are the
gamma CDF differences (scipy.special.gammainc) over the layer intervals.

Electrons: the same EM profile, settings and lateral shape as photons, but an electron starts showering where
it enters the material (s = 0): it radiates from the first X0 on, while a photon first has to convert, so the
electron shower sits on average 9/7 X0 earlier (more energy in the presampler and strips, less in the back).

Pions: the first inelastic interaction is at t0 ~ Exp(1 lambda). Before it, the pion ionises like a MIP
(220 MeV per lambda, seen at 0.75 of the EM scale); a pion whose range E_kin / 220 MeV ends before t0
stops there and makes no shower. Otherwise the rest E_sh = E_kin - 220 t0 showers: an EM fraction
f_em ~ Beta(8m, 8(1-m)) with mean m = clip(1 - (E_sh/1 GeV)^-0.18, 0.05, 0.9) (Groom-style, large event-
by-event fluctuations) is seen at the EM scale with the profile Gamma(2.5, 0.16 lambda) from t0; the
hadronic rest is seen at h/e = 0.65 (the remainder is invisible: binding energy, neutrinos, slow neutrons)
with profile Gamma(1 + 0.9 T_h, 1/0.9 lambda) from t0, T_h = max(0.2 ln(E_sh/GeV) + 0.7, 0.2) lambda,
log-normal sigma 0.25. Pions therefore start late, reach deep into the Tile, and fluctuate a lot.

Resolution. Hits carry energy at the EM scale (active-medium energy divided by the layer's sampling
fraction f_s), so f_s cancels in the mean but sets the sampling fluctuations: the visible energy of a
layer is Gamma-distributed with mean E_l and variance a_l^2 E_l [GeV], a_l = 0.045 / sqrt(f_s) (f_s = 0.2
for LAr: 10%/sqrt(E); f_s = 1/36 for Tile: 27%/sqrt(E)). A constant term b (0.7% photons, 3% pions)
multiplies the whole event: sigma/E = a/sqrt(E) (+) b, falling with E.

Lateral profile (Grindhammer-Peters style): a hit lies at a transverse distance rho from the shower axis
drawn from a core + tail mixture of f(rho) = 2 rho R^2 / (rho^2 + R^2)^2 (inverse CDF
rho = R sqrt(u / (1 - u)), u capped at 0.99, i.e. rho < 10 R), at a uniform azimuth. Photons: with
tau = (depth of the layer centre - s) / T clipped to [0, 2.5] and E in GeV, in Moliere radii R_M = 35 mm:
R_C = 0.0251 + 0.00319 ln E + 0.085 tau, R_T = 0.405 (exp(-2.59 (tau - 0.645)) + exp((0.3585 +
0.0421 ln E)(tau - 0.645))), core probability p = 2.555 exp(v - exp(v)), v = (0.554 - tau) / (1.313 -
0.0686 ln E); the phi offsets are stretched by 1 + 0.3 sqrt(1 GeV / E) (conversion pairs opening in the
field) and the axis jitters by 1 mm. Pions, per component (mm; Tile layers x1.6, a coarser medium):
MIP core 1, tail 6, p 0.85; EM core 10, tail 45, p 0.7, axis jitter 12; hadronic core 30 (1 + 0.25 tau_h),
tail 110 (1 + 0.3 tau_h), p 0.5, axis jitter 20, tau_h = depth after t0 in lambda clipped to [0, 6].
A hit at transverse offset (x_eta, x_phi) mm is written at eta = eta_extrap + x_eta / F_eta and
phi = wrap(phi_extrap + x_phi / r_extrap), F_eta = |2 e^-eta / (1 + e^-2 eta)| sqrt(r^2 + z^2) at the
layer's extrapolated position -- exactly the inverse of the voxeliser's mapping, so the voxelised radial
profile is the generated one. Hit radius: uniform over the layer depth; z = r sinh(eta_hit).

Hit multiplicity. Each event gets N ~ Poisson(n(E)) hits with n(E) a power law through ``hits_low`` at
2^8 MeV and ``hits_high`` at 2^22 MeV (defaults 50 and 2000), shared between (component, layer) cells by a
multinomial in their visible energies (at least one hit in every cell with energy); inside a cell the hit
energies are the cell energy times normalised Gamma(2) weights, so hits sum exactly to the cell energy.

Randomness: one numpy Generator per (seed, PDG id, energy, |eta| slice), so every file is reproducible on
its own and no two slices share showers.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import gammainc

from HighLevelFeatures import PARTICLES, eta_to_mm, wrap_phi
from plumbing import UserError, kinetic_energy

GENERATOR = "calokit toy (not Geant4)"
N_LAYER_COLUMNS = 24          # dataset-1 layer ids 0..23: one extrapolation column per id
DEFAULT_ENERGIES = [2.0 ** k for k in range(8, 23)]   # 256 MeV .. 4 TeV, 15 points
TOY_PARTICLES = ("photon", "electron", "pion")
EM_PARTICLES = ("photon", "electron")

#: layer id -> (inner, outer) radius in mm of the toy barrel layers
LAYER_RADII = {0: (1410.0, 1450.0), 1: (1500.0, 1590.0), 2: (1590.0, 1930.0), 3: (1930.0, 1980.0),
               12: (2300.0, 2600.0), 13: (2600.0, 3440.0), 14: (3440.0, 3820.0), 15: (3820.0, 3900.0)}
LAYER_IDS = np.array(sorted(LAYER_RADII), dtype=np.int64)
TILE_LAYERS = (12, 13, 14, 15)
MAX_ETA = 1.30                # the 26 barrel slices of binning_fastcalogan.xml (see the docstring)
U_MAX = 0.99                  # lateral CDF cap: no hit beyond ~10 core/tail radii

#: sampling fraction per layer; a_l = SAMPLING_A0 / sqrt(f_s) is the layer's stochastic term (sqrt(GeV))
SAMPLING_FRACTION = {lid: (1.0 / 36.0 if lid in TILE_LAYERS else 0.2) for lid in LAYER_RADII}
SAMPLING_A0 = 0.045

#: depth regions (edges along the path; X0 for photons, lambda for pions) and the layer of each (-1 = dead)
REGIONS = {
    "photon": (np.array([0.0, 1.3, 1.6, 2.0, 6.4, 22.4, 24.8, 27.0, 45.0, 90.0, 110.0]),
               np.array([-1, 0, -1, 1, 2, 3, -1, 12, 13, 14])),
    "electron": (np.array([0.0, 1.3, 1.6, 2.0, 6.4, 22.4, 24.8, 27.0, 45.0, 90.0, 110.0]),
                 np.array([-1, 0, -1, 1, 2, 3, -1, 12, 13, 14])),
    "pion": (np.array([0.0, 0.05, 0.07, 0.09, 0.33, 1.21, 1.34, 1.5, 3.0, 7.1, 8.9, 9.4]),
             np.array([-1, 0, -1, 1, 2, 3, -1, 12, 13, 14, 15])),
}

PHOTON = {"E_c": 10.0, "b": 0.5, "conv_X0": 9.0 / 7.0, "sigma_lnT_max": 0.5, "moliere_mm": 35.0,
          "const_term": 0.007, "axis_jitter_mm": 1.0, "phi_stretch": 0.3, "tau_max": 2.5}
PION = {"mip_per_lambda": 220.0, "mip_scale": 0.75, "fem_k": 0.18, "fem_conc": 8.0, "h_over_e": 0.65,
        "em_late": 0.5, "x0_per_lambda": 0.06, "had_b": 0.9, "had_tmax_slope": 0.25, "had_sigma": 0.25,
        "const_term": 0.03,
        "tile_factor": 1.6, "B_tesla": 2.0, "r_solenoid_m": 1.2,
        # per component: (core mm, tail mm, core probability, axis jitter mm)
        "mip": (1.0, 6.0, 0.85, 0.0), "em": (10.0, 45.0, 0.7, 12.0), "had": (30.0, 110.0, 0.5, 20.0)}


def hits_expected(energy, hits_low=50.0, hits_high=2000.0):
    """Mean hit multiplicity: power law through hits_low at 2^8 MeV and hits_high at 2^22 MeV.

    >>> round(hits_expected(256.0)), round(hits_expected(2.0 ** 22))
    (50, 2000)
    """
    gamma = math.log(hits_high / hits_low) / math.log(2.0 ** 14)
    return hits_low * (np.asarray(energy, dtype=np.float64) / 256.0) ** gamma


def region_fractions(edges, start, shape, scale):
    """Fraction of a Gamma(shape, scale) profile starting at depth ``start`` inside each region (events, R)."""
    x = np.clip(edges[None, :] - start[:, None], 0.0, None) / scale[:, None]
    cdf = gammainc(shape[:, None], x)
    return np.diff(cdf, axis=1)


def segment_fractions(edges, length):
    """Fraction of a uniform deposit over depth [0, length) inside each region (events, R)."""
    length = np.maximum(length, 1e-12)
    x = np.clip(edges[None, :], None, length[:, None])
    return np.diff(x, axis=1) / length[:, None]


def _to_layers(region_energy, region_layer):
    """Sum region energies (events, R) into the toy layers (events, len(LAYER_IDS)); dead regions dropped."""
    out = np.zeros(region_energy.shape[:-1] + (len(LAYER_IDS),))
    for k, lid in enumerate(LAYER_IDS):
        sel = region_layer == lid
        if sel.any():
            out[..., k] = region_energy[..., sel].sum(axis=-1)
    return out


def _layer_centres(particle):
    """Depth (X0 or lambda) of the centre of each toy layer (NaN where the particle's table lacks it)."""
    edges, lay = REGIONS[particle]
    mids = 0.5 * (edges[:-1] + edges[1:])
    return np.array([mids[lay == lid][0] if (lay == lid).any() else np.nan for lid in LAYER_IDS])


def _sampling(rng, e_layer, const_term):
    """Visible layer energies: Gamma sampling fluctuations per layer times a per-event constant term."""
    a = np.array([SAMPLING_A0 / math.sqrt(SAMPLING_FRACTION[int(lid)]) for lid in LAYER_IDS])
    shape = (e_layer / 1000.0) / (a * a)                   # variance a^2 E[GeV] (in GeV^2)
    vis = np.where(shape > 0, rng.gamma(np.maximum(shape, 1e-300)) * (e_layer / np.maximum(shape, 1e-300)), 0.0)
    return vis * np.exp(rng.normal(0.0, const_term, size=(e_layer.shape[0],) + (1,) * (e_layer.ndim - 1)))


def photon_cells(rng, energy, n, particle="photon"):
    """Photon (or electron) layer energies and lateral parameters: arrays (n, 1 component, L layers).

    A photon's shower starts at its conversion depth ~ Exp(9/7 X0); an electron's at the front (depth 0).
    """
    P = PHOTON
    edges, lay = REGIONS[particle]
    lny = math.log(energy / P["E_c"])
    sigma = min(1.0 / max(-1.4 + 1.26 * lny, 1e-3), P["sigma_lnT_max"])
    T = max(lny - 0.5, 0.3) * np.exp(rng.normal(0.0, sigma, n))
    start = rng.exponential(P["conv_X0"], n) if particle == "photon" else np.zeros(n)
    shape = 1.0 + P["b"] * T
    frac = region_fractions(edges, start, shape, np.full(n, 1.0 / P["b"]))
    e_layer = _sampling(rng, energy * _to_layers(frac, lay), P["const_term"])[:, None, :]
    # Grindhammer-Peters lateral parameters at each layer centre
    tau = np.clip((_layer_centres(particle)[None, :] - start[:, None]) / T[:, None], 0.0, P["tau_max"])
    tau = np.nan_to_num(tau, nan=P["tau_max"])
    lnE = math.log(energy / 1000.0)
    rc = (0.0251 + 0.00319 * lnE + 0.085 * tau) * P["moliere_mm"]
    rt = 0.405 * (np.exp(-2.59 * (tau - 0.645)) + np.exp((0.3585 + 0.0421 * lnE) * (tau - 0.645))) * P["moliere_mm"]
    u = (0.554 - tau) / (1.313 - 0.0686 * lnE)
    pc = np.clip(2.555 * np.exp(u - np.exp(u)), 0.0, 1.0)
    jitter = rng.normal(0.0, P["axis_jitter_mm"], (n, 1, 2))
    stretch = 1.0 + P["phi_stretch"] * math.sqrt(1000.0 / energy)
    return e_layer, rc[:, None, :], rt[:, None, :], pc[:, None, :], jitter, stretch


def pion_cells(rng, energy, n):
    """Pion layer energies and lateral parameters: arrays (n, 3 components [mip, em, had], L layers)."""
    P = PION
    edges, lay = REGIONS["pion"]
    ekin = float(kinetic_energy(energy, "pion"))
    t0 = rng.exponential(1.0, n)
    rng_len = ekin / P["mip_per_lambda"]
    stops = t0 >= rng_len
    track = np.where(stops, rng_len, t0)
    e_mip = np.where(stops, ekin, P["mip_per_lambda"] * t0)
    e_sh = np.maximum(ekin - e_mip, 0.0)
    m = np.clip(1.0 - (np.maximum(e_sh, 1e-3) / 1000.0) ** (-P["fem_k"]), 0.05, 0.9)
    f_em = rng.beta(P["fem_conc"] * m, P["fem_conc"] * (1.0 - m))
    T_h = np.maximum(P["had_tmax_slope"] * np.log(np.maximum(e_sh, 1.0) / 1000.0) + 0.7, 0.2)
    T_h = T_h * np.exp(rng.normal(0.0, P["had_sigma"], n))
    frac_mip = segment_fractions(edges, track)
    frac_had = region_fractions(edges, t0, 1.0 + P["had_b"] * T_h, np.full(n, 1.0 / P["had_b"]))
    # EM part: pi0 showers of the first interaction (EM profile in X0 converted to lambda) and, for the
    # fraction em_late, pi0s of later generations, which follow the hadronic cascade
    t_em = np.maximum(np.log(np.maximum(f_em * e_sh, 1.0) / PHOTON["E_c"]) - 0.5, 0.5)
    frac_first = region_fractions(edges, t0, 1.0 + 0.5 * t_em, np.full(n, 2.0 * P["x0_per_lambda"]))
    frac_em = (1.0 - P["em_late"]) * frac_first + P["em_late"] * frac_had
    e_cells = np.stack([_to_layers(frac_mip * (P["mip_scale"] * e_mip)[:, None], lay),
                        _to_layers(frac_em * (f_em * e_sh)[:, None], lay),
                        _to_layers(frac_had * ((1.0 - f_em) * e_sh * P["h_over_e"])[:, None], lay)], axis=1)
    e_cells = _sampling(rng, e_cells, P["const_term"])
    mat = np.where(np.isin(LAYER_IDS, TILE_LAYERS), P["tile_factor"], 1.0)[None, :]
    tau_h = np.clip(np.nan_to_num(_layer_centres("pion")[None, :] - t0[:, None], nan=6.0), 0.0, 6.0)
    ones = np.ones((n, len(LAYER_IDS)))
    rc = np.stack([P["mip"][0] * mat * ones, P["em"][0] * mat * ones, P["had"][0] * (1 + 0.25 * tau_h) * mat], axis=1)
    rt = np.stack([P["mip"][1] * mat * ones, P["em"][1] * mat * ones, P["had"][1] * (1 + 0.3 * tau_h) * mat], axis=1)
    pc = np.stack([np.full((n, len(LAYER_IDS)), P[c][2]) for c in ("mip", "em", "had")], axis=1)
    jitter = rng.normal(0.0, 1.0, (n, 3, 2)) * np.array([P[c][3] for c in ("mip", "em", "had")])[None, :, None]
    return e_cells, rc, rt, pc, jitter, 1.0


def extrapolation(rng, particle, energy, n, eta_range):
    """Per-event direction and (n, 24) extrapolated eta, phi, r, z (NaN for layers the toy does not model)."""
    lo, hi = eta_range
    eta = rng.uniform(lo, hi, n) * rng.choice([-1.0, 1.0], n)
    phi = rng.uniform(-math.pi, math.pi, n)
    charge = {"pion": 1.0, "electron": -1.0}.get(particle, 0.0)
    if charge:   # pi+ / e- bent in the solenoid: one phi kink, same for every calorimeter layer
        pt_gev = energy / 1000.0 / np.cosh(eta)
        s = np.minimum(0.3 * PION["B_tesla"] * PION["r_solenoid_m"] / (2.0 * pt_gev), 1.0)
        phi = wrap_phi(phi + charge * np.arcsin(s))
    cols = {k: np.full((n, N_LAYER_COLUMNS), np.nan) for k in ("eta", "phi", "r", "z")}
    for lid, (r_in, r_out) in LAYER_RADII.items():
        r = 0.5 * (r_in + r_out)
        cols["eta"][:, lid] = eta
        cols["phi"][:, lid] = phi
        cols["r"][:, lid] = r
        cols["z"][:, lid] = r * np.sinh(eta)
    return cols


def _block(rng, particle, energy, n, eta_range, hits_low, hits_high):
    """Generate ``n`` events of one energy: per-event arrays and the hit arrays (event ids local to the block)."""
    ext = extrapolation(rng, particle, energy, n, eta_range)
    if particle in EM_PARTICLES:
        e_cell, rc, rt, pc, jitter, stretch = photon_cells(rng, energy, n, particle)
    else:
        e_cell, rc, rt, pc, jitter, stretch = pion_cells(rng, energy, n)
    n_comp, n_lay = e_cell.shape[1], e_cell.shape[2]
    flat_e = e_cell.reshape(n, -1)
    # hit multiplicity: Poisson total, multinomial over (component, layer) cells, >= 1 hit per cell with energy
    n_hits = rng.poisson(hits_expected(energy, hits_low, hits_high), n)
    tot = flat_e.sum(axis=1, keepdims=True)
    p = np.where(tot > 0, flat_e / np.where(tot > 0, tot, 1.0), 1.0 / flat_e.shape[1])
    p /= p.sum(axis=1, keepdims=True)
    counts = rng.multinomial(n_hits, p)
    counts = np.where(flat_e > 0, np.maximum(counts, 1), 0)
    cell = np.repeat(np.arange(flat_e.size), counts.ravel())
    event = cell // flat_e.shape[1]
    comp = (cell // n_lay) % n_comp
    k_lay = cell % n_lay
    # hit energies: the cell energy shared by normalised Gamma(2) weights (exact per-cell sums)
    w = rng.gamma(2.0, 1.0, cell.size)
    wsum = np.bincount(cell, weights=w, minlength=flat_e.size)
    energy_hit = flat_e.ravel()[cell] * (w / wsum[cell])
    # lateral position around the (jittered) axis
    core = rng.random(cell.size) < pc.reshape(-1)[cell]
    radius = np.where(core, rc.reshape(-1)[cell], rt.reshape(-1)[cell])
    u = np.minimum(rng.random(cell.size), U_MAX)
    rho = radius * np.sqrt(u / (1.0 - u))
    theta = rng.uniform(0.0, 2.0 * math.pi, cell.size)
    jit = jitter.reshape(n * n_comp, 2)[event * n_comp + comp]
    x_eta = rho * np.cos(theta) + jit[:, 0]
    x_phi = (rho * np.sin(theta) + jit[:, 1]) * stretch
    lid = LAYER_IDS[k_lay]
    e_eta, e_phi = ext["eta"][event, lid], ext["phi"][event, lid]
    e_r, e_z = ext["r"][event, lid], ext["z"][event, lid]
    eta_hit = e_eta + x_eta / eta_to_mm(e_eta, e_r, e_z)
    phi_hit = wrap_phi(e_phi + x_phi / e_r)
    r_in = np.array([LAYER_RADII[int(i)][0] for i in LAYER_IDS])[k_lay]
    r_out = np.array([LAYER_RADII[int(i)][1] for i in LAYER_IDS])[k_lay]
    r_hit = r_in + rng.random(cell.size) * (r_out - r_in)
    hits = {"event": event.astype(np.int64), "layer": lid.astype(np.int16), "eta": eta_hit, "phi": phi_hit,
            "r": r_hit, "z": r_hit * np.sinh(eta_hit), "energy": energy_hit}
    return ext, hits


def generate(particle, energy, n_events, eta_range=(0.20, 0.25), seed=1, hits_low=50.0, hits_high=2000.0,
             max_block_hits=2 ** 20):
    """Toy showers of one particle and momentum ``energy`` (MeV): a dict in the hits-file layout.

    Keys: ``hits`` (dict of per-hit arrays event, layer, eta, phi, r, z, energy), ``truth_p``, ``truth_pdg``,
    ``extrap_eta/phi/r/z`` (n_events, 24). Events are generated in blocks of a size fixed by the arguments,
    so the output depends only on (particle, energy, n_events, eta_range, seed, hits_low, hits_high).
    """
    if particle not in TOY_PARTICLES:
        raise UserError(f"the toy source makes {' and '.join(TOY_PARTICLES)} only, not '{particle}'")
    if not (energy > 0 and math.isfinite(energy)):
        raise UserError(f"toy energy must be a positive number of MeV, got {energy}")
    if n_events < 1:
        raise UserError(f"--events-per-energy must be >= 1, got {n_events}")
    if not (0 <= eta_range[0] < eta_range[1] <= MAX_ETA + 1e-9):
        raise UserError(f"toy |eta| range {eta_range} must lie inside the barrel, 0 <= min < max <= {MAX_ETA}")
    if not (hits_low > 0 and hits_high > 0):
        raise UserError("hit multiplicities must be positive")
    pid = PARTICLES[particle][0]
    # the slice's lower edge (|eta| x 100) is part of the seed: every slice gets its own showers
    rng = np.random.default_rng([int(seed), pid, int(round(energy)), int(round(100 * eta_range[0]))])
    block = int(max(1, min(n_events, max_block_hits // max(1.0, float(hits_expected(energy, hits_low, hits_high))))))
    parts_h, parts_x = [], []
    for first in range(0, n_events, block):
        n = min(block, n_events - first)
        ext, hits = _block(rng, particle, energy, n, eta_range, hits_low, hits_high)
        hits["event"] += first
        parts_h.append(hits)
        parts_x.append(ext)
    out = {"hits": {k: np.concatenate([h[k] for h in parts_h]) for k in parts_h[0]}}
    for k in ("eta", "phi", "r", "z"):
        out["extrap_" + k] = np.concatenate([x[k] for x in parts_x])
    out["truth_p"] = np.full(n_events, float(energy))
    out["truth_pdg"] = np.full(n_events, pid, dtype=np.int32)
    return out


def hits_filename(particle, energy, eta_min, eta_max):
    """``hits_<particle>_E<MeV>_eta_<min:03d>_<max:03d>.h5`` (eta x 100)."""
    return f"hits_{particle}_E{int(round(energy))}_eta_{int(round(eta_min)):03d}_{int(round(eta_max)):03d}.h5"


def write_hits(path, data, attrs):
    """Write one hits file (the dict of :func:`generate`) to ``path`` (caller makes it atomic)."""
    import h5py

    with h5py.File(path, "w") as f:
        for k, v in data["hits"].items():
            f.create_dataset(k, data=v)
        for k in ("truth_p", "truth_pdg", "extrap_eta", "extrap_phi", "extrap_r", "extrap_z"):
            f.create_dataset(k, data=data[k])
        for k, v in attrs.items():
            f.attrs[k] = v
