"""HighLevelFeatures.py -- the calorimeter geometry and shower features every calokit script shares.

One file, importable alone (numpy; matplotlib only for drawing). It holds:

* the binning-XML reader for both accepted forms (CaloChallenge ``<Bin>`` and the FastCaloGAN
  multi-slice ``<Particle><Bin>``, including FastCaloGAN's optimised alpha bins, merged first r bin and GAN
  settings), giving a :class:`Geometry`: layers, r/alpha edges, voxel order (``index = layer_offset +
  i_alpha * n_r + i_r``; r outer, alpha inner for layers with per-r-bin alpha bins), voxel centres and the
  (r, alpha) -> voxel mapping;
* the high-level features of CaloChallenge (E_tot, E_layer, centres of energy and widths in eta/phi/r,
  sparsity), vectorised over events and layers with float64 accumulation, and a streaming path for
  files that do not fit in memory;
* :class:`HighLevelFeatures`, API compatible with CaloChallenge's class of the same name (drop this file into
  CaloChallenge's code folder and its evaluate.py reports the same numbers);
* the geometry helpers of the hit -> (r, alpha) mapping: :func:`eta_to_mm` and :func:`wrap_phi`;
* :class:`UserError` / :class:`GeometryError`, raised for anything unusable in the user's input.

Everything else the calokit scripts share (atomic outputs, the command wrapper, file reading, FastCaloGAN
normalisations, generators) lives in plumbing.py, which imports this file; this file imports nothing of calokit.

Example
-------
>>> import numpy as np
>>> from HighLevelFeatures import HighLevelFeatures
>>> hlf = HighLevelFeatures("photon", filename="binning/binning_dataset_1_photons.xml")
>>> sum(hlf.num_voxel)
368
>>> showers = np.zeros((1, 368)); showers[0, 8 + 3 * 16 + 5] = 10.0   # layer 1, alpha bin 3, r bin 5
>>> hlf.CalculateFeatures(showers)
>>> float(hlf.GetElayers()[1][0]), float(hlf.GetWidthR()[1][0])
(10.0, 0.0)
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import xml.etree.ElementTree as ET

import numpy as np

# ----------------------------------------------------------------------------------------------
# facts

#: particle name -> (PDG id, mass in MeV)
PARTICLES = {
    "photon": (22, 0.0),
    "electron": (11, 0.511),
    "pion": (211, 139.57),
    "proton": (2212, 938.27),
}

BINNING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "binning")

#: CaloChallenge dataset name -> (binning file name in binning/, particle name, voxel count)
DATASETS = {
    "1-photons": ("binning_dataset_1_photons.xml", "photon", 368),
    "1-pions": ("binning_dataset_1_pions.xml", "pion", 533),
    "2": ("binning_dataset_2.xml", "electron", 6480),
    "3": ("binning_dataset_3.xml", "electron", 40500),
}

DEFAULT_CHUNK_BYTES = 16 * 2**20  # float32 shower bytes per streamed chunk

#: calokit range name -> the FastCaloGAN range it stands for in an XML's <EnergyRanges>
RANGE_ALIASES = {"low": "UltraLow12", "high": "High12", "all": "All"}
_PARTICLE_BY_PID = {str(pid): name for name, (pid, _) in PARTICLES.items()}

# ----------------------------------------------------------------------------------------------
# hit -> (r, alpha): the two geometry helpers of the voxeliser (and of the toy source)

def eta_to_mm(eta, r, z):
    """|2 e^-eta / (1 + e^-2 eta)| sqrt(r^2 + z^2): mm per unit of eta at (eta, r, z).

    >>> round(float(eta_to_mm(0.0, 1500.0, 0.0)), 6)
    1500.0
    """
    e = np.exp(-np.asarray(eta, dtype=np.float64))
    return np.abs(2.0 * e / (1.0 + e * e)) * np.sqrt(np.square(r) + np.square(z))


def wrap_phi(dphi, out=None):
    """Wrap angles into (-pi, pi] (pi stays pi, -pi becomes pi); in place when ``out`` is the input array.

    >>> wrap_phi(np.array([np.pi, -np.pi, 3 * np.pi / 2])).round(4).tolist()
    [3.1416, 3.1416, -1.5708]
    """
    dphi = np.asarray(dphi, dtype=np.float64)
    turns = np.ceil((dphi - math.pi) * (0.5 / math.pi))
    w = np.subtract(dphi, (2.0 * math.pi) * turns, out=np.empty_like(dphi) if out is None else out)
    # rounding puts inputs within an ulp or two of an odd multiple of pi just outside: fold them back in
    np.subtract(w, 2.0 * math.pi, out=w, where=w > math.pi)
    np.add(w, 2.0 * math.pi, out=w, where=w <= -math.pi)
    return w


class UserError(Exception):
    """Bad input from the user (file, flag, data). Scripts print it as one line and exit with code 2."""


class GeometryError(UserError, ValueError):
    """A binning XML that cannot be used; the message names the file and the element."""


# ----------------------------------------------------------------------------------------------
# geometry

class Layer:
    """One calorimeter layer of a slice: radial edges (mm) and its alpha bins.

    Most layers have the same number of alpha bins in every r bin (CaloChallenge and calokit XMLs); their
    voxels are ordered r fastest, then alpha: ``i = i_alpha * n_r + i_r``. FastCaloGAN's optimised alpha bins
    and merged first r bin give a number per r bin (``alpha_per_r``); such layers are ordered as FastCaloGAN
    orders them, r bins outer and alpha bins inner (``i = first voxel of r bin i_r + i_alpha``).
    ``n_alpha`` is always the XML's ``n_bin_alpha``. With ``merged_first`` the first r bin is one voxel whose
    centre is r = 0 (FastCaloGAN: the merged bin is a disc centred on the axis).

    >>> lay = Layer(1, [0, 2, 4], 4)
    >>> lay.n_voxels, lay.r_centres.tolist(), lay.alpha_centres.round(3).tolist()
    (8, [1.0, 3.0], [-2.356, -0.785, 0.785, 2.356])
    >>> opt = Layer(1, [0, 2, 4], 4, alpha_per_r=[1, 8], merged_first=True)
    >>> opt.n_voxels, opt.r_centres.tolist(), opt.index_of(np.array([0, 1, 1]), np.array([0, 0, 7])).tolist()
    (9, [0.0, 3.0], [0, 1, 8])
    """

    def __init__(self, layer_id, r_edges, n_alpha, symmetrise_alpha=False, alpha_per_r=None, merged_first=False):
        self.id = int(layer_id)
        self.r_edges = np.asarray(r_edges, dtype=np.float64)
        self.n_alpha = int(n_alpha)
        self.symmetrise_alpha = bool(symmetrise_alpha)
        self.merged_first = bool(merged_first) and self.n_r > 0
        per_r = np.full(self.n_r, self.n_alpha, dtype=np.int64) if alpha_per_r is None else \
            np.asarray(alpha_per_r, dtype=np.int64).reshape(-1)
        if per_r.size != self.n_r or (per_r < 1).any():
            raise ValueError(f"alpha_per_r needs {self.n_r} positive counts, got {per_r.tolist()}")
        self.alpha_per_r = per_r
        #: True when every r bin has n_alpha alpha bins (the CaloChallenge voxel order applies)
        self.regular = bool(np.all(per_r == self.n_alpha))
        if self.regular:   # voxel = base[i_r] + i_alpha * stride[i_r]
            self._base, self._stride = np.arange(self.n_r), np.full(self.n_r, self.n_r)
        else:
            self._base, self._stride = np.concatenate([[0], np.cumsum(per_r)[:-1]]).astype(np.int64), np.ones(self.n_r, np.int64)

    @property
    def n_r(self):
        return max(len(self.r_edges) - 1, 0)

    @property
    def n_voxels(self):
        return int(self.alpha_per_r.sum()) if self.n_r > 0 else 0

    @property
    def alpha_lo(self):
        """Lower end of the alpha range: 0 when alpha is symmetrised (|alpha| in [0, pi]), else -pi."""
        return 0.0 if self.symmetrise_alpha else -math.pi

    @property
    def r_centres(self):
        c = 0.5 * (self.r_edges[:-1] + self.r_edges[1:])
        if self.merged_first:
            c[0] = 0.0
        return c

    @property
    def alpha_edges(self):
        """Uniform alpha edges of ``n_alpha`` bins: over (-pi, pi], or [0, pi] when alpha is symmetrised."""
        return np.linspace(self.alpha_lo, math.pi, self.n_alpha + 1)

    @property
    def alpha_centres(self):
        if self.n_alpha == 1:
            return np.zeros(1)
        e = self.alpha_edges
        return 0.5 * (e[:-1] + e[1:])

    def voxel_bins(self):
        """(i_r, i_alpha) of every voxel of the layer, in the layer's voxel order."""
        if self.regular:
            return np.tile(np.arange(self.n_r), self.n_alpha), np.repeat(np.arange(self.n_alpha), self.n_r)
        ir = np.repeat(np.arange(self.n_r), self.alpha_per_r)
        return ir, np.arange(ir.size) - self._base[ir]

    def index_of(self, i_r, i_alpha):
        """Voxel index inside the layer of (r bin, alpha bin) pairs."""
        i_r = np.asarray(i_r, dtype=np.int64)
        return self._base[i_r] + np.asarray(i_alpha, dtype=np.int64) * self._stride[i_r]

    def voxel_coordinates(self):
        """Per-voxel (r, alpha, eta, phi) in the layer's voxel order; eta = r cos(alpha), phi = r sin(alpha).

        alpha is the centre of the voxel's alpha bin (0 for an r bin with a single alpha bin).
        """
        ir, ia = self.voxel_bins()
        n = self.alpha_per_r[ir]
        r = self.r_centres[ir]
        a = np.where(n > 1, self.alpha_lo + (ia + 0.5) * (math.pi - self.alpha_lo) / n, 0.0)
        return r, a, r * np.cos(a), r * np.sin(a)

    def r_bin(self, r):
        """r bin of distances r (mm >= 0); beyond the last edge -> the last bin."""
        ir = np.searchsorted(self.r_edges, np.asarray(r, dtype=np.float64), side="right") - 1
        return np.clip(ir, 0, self.n_r - 1, out=ir)

    def bin_index(self, r, alpha):
        """Voxel index inside the layer for positions (r in mm >= 0, alpha in (-pi, pi]).

        r beyond the last edge goes to the last r bin; with symmetrised alpha, |alpha| is binned.

        >>> Layer(0, [0, 1, 2], 2).bin_index(np.array([0.5, 1.5, 99.0]), np.array([-1.0, 1.0, 3.0])).tolist()
        [0, 3, 3]
        """
        alpha = np.asarray(alpha, dtype=np.float64)
        ir = self.r_bin(r)
        if self.n_alpha == 1 and self.regular:
            return ir
        a = np.abs(alpha) if self.symmetrise_alpha else alpha
        n = self.alpha_per_r[ir]
        ia = np.floor((a - self.alpha_lo) * (n / (math.pi - self.alpha_lo))).astype(np.int64)
        np.clip(ia, 0, n - 1, out=ia)
        return self.index_of(ir, ia)

    def __repr__(self):
        extra = "" if self.regular else f", alpha_per_r={self.alpha_per_r.tolist()}"
        return f"Layer(id={self.id}, n_r={self.n_r}, n_alpha={self.n_alpha}{extra})"


class Geometry:
    """The voxelisation of one (particle, |eta| slice): an ordered list of :class:`Layer`.

    Layers with no voxels (``r_edges="0"``) are kept in order but own no voxels.
    """

    def __init__(self, layers, particle, pid, filename="", eta_min=0, eta_max=0, region_id=None,
                 latent_dim=None, symmetrise_alpha=False, gan=None, ranges=None, optimised_alpha=False,
                 merge_first_r=False):
        self.layers = list(layers)
        #: FastCaloGAN settings of the particle and region: {XML attribute: (value, where it was read)}
        self.gan = dict(gan or {})
        #: the particle's <EnergyRanges>: {range name: {XML attribute: (value, where)}}
        self.ranges = dict(ranges or {})
        self.optimised_alpha = bool(optimised_alpha)
        self.merge_first_r = bool(merge_first_r)
        self.particle = particle
        self.pid = int(pid)
        self.filename = filename
        self.eta_min = eta_min          # |eta| x 100
        self.eta_max = eta_max
        self.region_id = region_id
        self.latent_dim = latent_dim
        self.symmetrise_alpha = symmetrise_alpha
        counts = [lay.n_voxels for lay in self.layers]
        self.bin_edges = [0] + np.cumsum(counts).astype(int).tolist()  # by layer position
        self.offsets = {lay.id: (self.bin_edges[i], self.bin_edges[i + 1]) for i, lay in enumerate(self.layers)}

    @property
    def n_voxels(self):
        return self.bin_edges[-1]

    @property
    def layer_ids(self):
        return [lay.id for lay in self.layers]

    @property
    def relevant_layers(self):
        """Ids of layers that own voxels."""
        return [lay.id for lay in self.layers if lay.n_voxels > 0]

    @property
    def layers_binned_in_alpha(self):
        return [lay.id for lay in self.layers if lay.n_voxels > 0 and lay.n_alpha > 1]

    def layer(self, layer_id):
        for lay in self.layers:
            if lay.id == layer_id:
                return lay
        raise KeyError(f"layer {layer_id} not in {self.filename}")

    def voxel_index(self, layer_id, i_alpha, i_r):
        """Flat index of voxel (layer, i_alpha, i_r): ``offset + i_alpha * n_r + i_r`` for layers with the same
        alpha bins in every r bin, ``offset + first voxel of r bin i_r + i_alpha`` otherwise."""
        lay = self.layer(layer_id)
        return self.offsets[layer_id][0] + lay.index_of(i_r, i_alpha)

    def voxel_names(self):
        """Names ``L<layer>_a<ialpha>_r<ir>`` in the flat voxel order (used as CSV header)."""
        return [f"L{lay.id}_a{ia}_r{ir}" for lay in self.layers if lay.n_voxels
                for ir, ia in zip(*lay.voxel_bins())]

    def fastcalogan_order(self):
        """Flat voxel indices in FastCaloGAN's order: layer by layer, r bins outer and alpha bins inner.

        ``showers[:, geom.fastcalogan_order()]`` gives FastCaloGAN's columns; its argsort undoes it.
        """
        parts = []
        for lay in self.layers:
            if lay.n_voxels:
                ir = np.repeat(np.arange(lay.n_r), lay.alpha_per_r)
                ia = np.arange(ir.size) - np.concatenate([[0], np.cumsum(lay.alpha_per_r)[:-1]])[ir]
                parts.append(self.offsets[lay.id][0] + lay.index_of(ir, ia))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def gan_settings(self, range_name=None):
        """FastCaloGAN settings for one energy range: {XML attribute: (value, source)}.

        Particle, then region (``<Bin>``), then the range (``<Range name=...>`` under ``<EnergyRanges>``):
        a later one overrides. calokit's range names map to FastCaloGAN's (low -> UltraLow12, high -> High12,
        all -> All) when the XML has no range of that name.
        """
        out = dict(self.gan)
        if range_name is not None:
            name = range_name if range_name in self.ranges else RANGE_ALIASES.get(range_name)
            out.update(self.ranges.get(name, {}))
        return out

    def voxel_coordinates(self):
        """Flat per-voxel arrays (r, alpha, eta, phi) and the layer id of each voxel."""
        parts = [lay.voxel_coordinates() for lay in self.layers if lay.n_voxels]
        if not parts:
            return tuple(np.zeros(0) for _ in range(4)) + (np.zeros(0, int),)
        cols = [np.concatenate([p[k] for p in parts]) for k in range(4)]
        lid = np.concatenate([np.full(lay.n_voxels, lay.id) for lay in self.layers if lay.n_voxels])
        return (*cols, lid)

    def slice_name(self):
        """``eta_<min>_<max>`` with |eta| x 100 as in FastCaloGAN file names."""
        return f"eta_{int(self.eta_min)}_{int(self.eta_max)}"

    def __repr__(self):
        return (f"Geometry({self.particle}, eta {self.eta_min}-{self.eta_max}, {len(self.layers)} layers, "
                f"{self.n_voxels} voxels, file={self.filename!r})")


def _where(filename, elem):
    attrs = " ".join(f'{k}="{v}"' for k, v in elem.attrib.items())
    return f"{filename}: <{elem.tag} {attrs}>"


def _attr(filename, elem, name, conv=str, default=None):
    raw = elem.attrib.get(name)
    if raw is None:
        if default is not None:
            return default
        raise GeometryError(f"{_where(filename, elem)}: missing attribute '{name}'")
    try:
        return conv(raw)
    except ValueError:
        raise GeometryError(f"{_where(filename, elem)}: attribute {name}={raw!r} is not a valid {conv.__name__}") from None


def _parse_bool(raw):
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(raw)


_parse_bool.__name__ = "bool"


def optimised_alpha_bins(r_low, r_high, symmetrise=False):
    """FastCaloGAN's alpha bins for one r bin: b = circumference at the bin centre / bin width (half the
    circumference when alpha is symmetrised), rounded up to 4, 8, 16 or 32 (b < 4 -> 4, < 8 -> 8, < 16 -> 16,
    else 32).

    >>> [optimised_alpha_bins(lo, hi) for lo, hi in ((0, 10), (10, 20), (20, 25), (100, 110))]
    [4, 16, 32, 32]
    >>> optimised_alpha_bins(10, 20, symmetrise=True)
    8
    """
    centre = 0.5 * (r_low + r_high)
    b = centre * (math.pi if symmetrise else 2 * math.pi) / (r_high - r_low)
    return 4 if b < 4 else 8 if b < 8 else 16 if b < 16 else 32


def _layer_edges(filename, el):
    """r edges of a <Layer>: ``r_edges="0,..."`` or ``nbins``, ``r_min``, ``r_max`` (uniform bins)."""
    if "r_edges" in el.attrib or "nbins" not in el.attrib:
        raw = _attr(filename, el, "r_edges")
        try:
            edges = [float(s) for s in raw.split(",") if s.strip() != ""]
        except ValueError:
            raise GeometryError(f"{_where(filename, el)}: r_edges must be comma-separated numbers") from None
    else:
        n = _attr(filename, el, "nbins", int)
        lo, hi = _attr(filename, el, "r_min", float), _attr(filename, el, "r_max", float)
        if n < 0 or (n > 0 and not hi > lo):
            raise GeometryError(f"{_where(filename, el)}: nbins must be >= 0 and r_max > r_min")
        edges = [lo + i * (hi - lo) / n for i in range(n + 1)] if n else [lo]
    if not edges or edges[0] != 0.0:
        raise GeometryError(f"{_where(filename, el)}: r edges must start at 0")
    if not all(np.isfinite(edges)) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise GeometryError(f"{_where(filename, el)}: r_edges must be finite, non-negative and strictly increasing")
    return edges


def _read_layers(filename, bin_elem, symmetrise, optimised=False, merge_first=False):
    layers, seen = [], set()
    for el in bin_elem:
        if el.tag != "Layer":
            continue
        lid = _attr(filename, el, "id", int)
        if lid < 0 or lid in seen:
            raise GeometryError(f"{_where(filename, el)}: layer id {lid} is negative or repeated")
        seen.add(lid)
        edges = _layer_edges(filename, el)
        n_alpha = _attr(filename, el, "n_bin_alpha", int, default=1)
        if n_alpha < 1:
            raise GeometryError(f"{_where(filename, el)}: n_bin_alpha must be >= 1")
        per_r = [n_alpha] * (len(edges) - 1)
        if optimised and n_alpha > 1:
            per_r = [optimised_alpha_bins(lo, hi, symmetrise) for lo, hi in zip(edges, edges[1:])]
        if merge_first and per_r:
            per_r[0] = 1
        layers.append(Layer(lid, edges, n_alpha, symmetrise, per_r, merge_first))
    if not layers:
        raise GeometryError(f"{_where(filename, bin_elem)}: no <Layer> elements")
    return layers


def _int_list(raw):
    values = [int(v) for v in raw.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise ValueError(raw)
    return values


_int_list.__name__ = "comma-separated list of positive integers"

#: FastCaloGAN's GAN settings, read from <Particle>, <Bin> and <Range> (in that order, later ones override)
GAN_PROPERTIES = {"latentDim": int, "generator": _int_list, "discriminator": _int_list, "learningRate": float,
                  "batchSize": int, "lambda": float, "gdratio": int, "beta": float, "label_definition": str,
                  "voxel_normalisation": str}
#: settings only a <Range> carries
RANGE_PROPERTIES = {"useBatchNormalisation": None, "activationFunction": str}


def _gan_props(filename, elem, what, extra=None):
    """{attribute: (value, source)} of the GAN settings present on an XML element."""
    props = dict(GAN_PROPERTIES, **(extra or {}))
    source = f"{os.path.basename(filename)} {what}"
    out = {}
    for name, conv in props.items():
        if name in elem.attrib:
            out[name] = (_attr(filename, elem, name, conv or _parse_bool), source)
    return out


def _read_ranges(filename, part_el):
    """The <EnergyRanges><Range name=...> of a particle: {name: {attribute: (value, source)}}."""
    out = {}
    for group in part_el.findall("EnergyRanges"):
        for rng in group.findall("Range"):
            name = _attr(filename, rng, "name")
            out[name] = _gan_props(filename, rng, f'<Range name="{name}">', RANGE_PROPERTIES)
    return out


def _read_root(filename):
    if not os.path.isfile(filename):
        raise GeometryError(f"{filename}: binning file not found")
    try:
        root = ET.parse(filename).getroot()
    except ET.ParseError as err:
        raise GeometryError(f"{filename}: malformed XML ({err})") from None
    if root.tag != "Bins":
        raise GeometryError(f"{filename}: root element is <{root.tag}>, expected <Bins>")
    return root


def _matches(filename, elem, particle):
    name = elem.attrib.get("name")
    pid = elem.attrib.get("pid")
    known = str(PARTICLES[particle][0]) if particle in PARTICLES else None
    return particle == name or (pid is not None and (str(particle) == pid or (name is None and known == pid)))


def list_slices(filename, particle):
    """All (etaMin, etaMax, <Bin> element, owning element) slices of ``particle`` in ``filename``; etaMin/Max are |eta| x 100.

    >>> [s[:2] for s in list_slices("binning/binning_fastcalogan.xml", "photon")][:2]
    [(0.0, 5.0), (5.0, 10.0)]
    """
    root = _read_root(filename)
    out, names = [], []
    for el in root:
        names.append(el.attrib.get("name", "?"))
        if not _matches(filename, el, particle):
            continue
        if el.tag == "Bin":  # CaloChallenge form
            out.append((_attr(filename, el, "etaMin", float, 0.0), _attr(filename, el, "etaMax", float, 500.0), el, el))
        elif el.tag == "Particle":  # FastCaloGAN form
            for b in el:
                if b.tag == "Bin":
                    out.append((_attr(filename, b, "etaMin", float), _attr(filename, b, "etaMax", float), b, el))
        else:
            raise GeometryError(f"{_where(filename, el)}: expected <Bin> or <Particle>")
    if not out:
        raise GeometryError(f"{filename}: no <Bin>/<Particle> for particle '{particle}' (file has: {', '.join(names)})")
    return out


def read_geometry(filename, particle, eta=None):
    """Read the slice of ``particle`` (name like "photon" or PDG id) covering ``|eta|`` from a binning XML.

    ``eta`` may be omitted when the file has one slice for the particle. Raises :class:`GeometryError`
    (a :class:`UserError`) naming the file and element for anything unusable.

    >>> g = read_geometry("binning/binning_fastcalogan.xml", "pion", eta=0.22)
    >>> g.eta_min, g.eta_max, g.n_voxels, g.latent_dim
    (20.0, 25.0, 533, 50)
    """
    slices = list_slices(filename, particle)
    if eta is None:
        if len(slices) > 1:
            raise GeometryError(f"{filename}: particle '{particle}' has {len(slices)} eta slices; say which |eta|")
        chosen = slices[0]
    else:
        try:
            eta = abs(float(eta))
        except (TypeError, ValueError):
            raise UserError(f"{filename}: |eta| must be a number, not {eta!r}") from None
        x = round(eta * 100.0, 6)
        hits = [s for s in slices if s[0] <= x < s[1]]
        if not hits:
            ranges = f"{min(s[0] for s in slices) / 100:.2f}-{max(s[1] for s in slices) / 100:.2f}"
            raise GeometryError(f"{filename}: no <Bin> of particle '{particle}' covers |eta|={eta:.4g} "
                                f"(slices cover {ranges})")
        chosen = hits[0]
    lo, hi, bin_el, part_el = chosen
    root = _read_root(filename)
    optimised = _attr(filename, root, "optimisedAlphaBins", _parse_bool, default=False)
    merge = _attr(filename, root, "mergeAlphaBinsInFirstRBin", _parse_bool, default=False)
    if not _attr(filename, root, "isPolar", _parse_bool, default=True):
        raise GeometryError(f"{filename}: isPolar=\"false\" (cartesian eta/phi binning) is not supported")
    symmetrise = _attr(filename, part_el, "symmetriseAlpha", _parse_bool, default=False)
    name = part_el.attrib.get("name") or _PARTICLE_BY_PID.get(part_el.attrib.get("pid"), str(particle))
    pid = _attr(filename, part_el, "pid", int, default=PARTICLES.get(name, (0, 0))[0])
    region = bin_el.attrib.get("regionId")
    gan = _gan_props(filename, part_el, f'<Particle pid="{pid}">')
    ranges = {}
    if part_el is not bin_el:
        gan.update(_gan_props(filename, bin_el, f'<Bin etaMin="{lo:g}" etaMax="{hi:g}">'))
        ranges = _read_ranges(filename, part_el)
    latent = gan.get("latentDim", (50, None))[0]
    layers = _read_layers(filename, bin_el, symmetrise, optimised, merge)
    return Geometry(layers, name, pid, filename, lo, hi, None if region is None else int(region), latent, symmetrise,
                    gan, ranges, optimised, merge)


def dataset_geometry(dataset, binning=None):
    """Geometry of a CaloChallenge dataset name ('1-photons', '1-pions', '2', '3'), optionally from another XML."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}' (choose from {', '.join(DATASETS)})")
    fname, particle, _ = DATASETS[dataset]
    return read_geometry(binning or os.path.join(BINNING_DIR, fname), particle)


# ----------------------------------------------------------------------------------------------
# features

#: voxels per block of the feature loop: the float32 input, its float64 copy and the mask of one block
#: (about 13 bytes a voxel, ~7 MB) stay in cache, which measured fastest on 1 MiB-L2 / 32 MiB-L3 CPUs
FEATURE_BLOCK_VOXELS = 2**19

# rows of the (8, layers, events) feature table built by _LayerPlan, in the order of its weight rows
_FEATURE_ROWS = ("E_layer", "EC_r", "EC_eta", "EC_phi", "width_r", "width_eta", "width_phi", "sparsity")
_ALPHA_ONLY = ("EC_eta", "EC_phi", "width_eta", "width_phi")


def one_blas_thread():
    """Context manager keeping BLAS on one thread (a no-op without threadpoolctl, which scikit-learn brings).

    The feature products are small (8 x voxels by voxels x events): BLAS threads only spin on them (measured on
    dataset 1: same wall time, 1.5-2x the CPU time) and starve a second process reading another file beside.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class _LayerPlan:
    """Precomputed weights that turn the features into one matrix product per layer (or one for all layers).

    For a layer with voxel coordinates r, eta = r cos(alpha), phi = r sin(alpha), the 8 weight rows are
    ``1, r, eta, phi, r^2, eta^2, phi^2, 0`` (eta/phi rows are 0 for layers without alpha bins); their
    product with the float64 voxel energies gives every energy-weighted sum the features need.
    When all voxelised layers share one binning (datasets 2 and 3) the showers are viewed as
    (events x layers, voxels of a layer) and a single product serves every layer.
    Blocks of ``block_voxels`` voxels keep the work in cache; buffers are reused between blocks.

    With ``native_sums`` the layer energies, the total energy and the energy denominators of the centres and
    widths are instead summed as CaloChallenge's HighLevelFeatures sums them: numpy's (pairwise) ``sum`` over each
    event's voxels *in the input's own dtype* (float32 sums for float32 showers), the denominator being
    ``E_layer + 1e-16`` in that dtype. That is what makes the reference's log binnings, whose top edge comes from the
    maximum layer energy, bit-for-bit reproducible (see evaluate.py); the energy-weighted numerators stay float64
    products, as in the reference.
    """

    def __init__(self, geom, block_voxels=FEATURE_BLOCK_VOXELS, native_sums=False):
        self.native_sums = bool(native_sums)
        rel = [lay for lay in geom.layers if lay.n_voxels]
        self.n_voxels = geom.n_voxels
        self.layer_ids = [lay.id for lay in rel]
        self.alpha_ids = {lay.id for lay in rel if lay.n_alpha > 1}
        self.block = max(1, int(block_voxels) // max(geom.n_voxels, 1))
        self.spans = [geom.offsets[lay.id] for lay in rel]
        self.starts = np.array([a for a, _ in self.spans], dtype=np.intp)
        self.inv_n_voxels = 1.0 / np.array([lay.n_voxels for lay in rel], dtype=np.float64)
        # uint16 counts are exact below 65536 voxels per layer and reduce faster than int32
        self.count_dtype = np.uint16 if max((lay.n_voxels for lay in rel), default=0) < 2**16 else np.int64
        self.weights = []
        for lay in rel:
            r, _, eta, phi = lay.voxel_coordinates()
            zero = np.zeros_like(r)
            first = [r, eta, phi] if lay.n_alpha > 1 else [r, zero, zero]
            self.weights.append(np.stack([np.ones_like(r)] + first + [c * c for c in first] + [zero]))  # (8, nv)
        self.shared = len(rel) > 1 and all(lay.n_alpha == rel[0].n_alpha and np.array_equal(lay.r_edges, rel[0].r_edges)
                                           and np.array_equal(lay.alpha_per_r, rel[0].alpha_per_r)
                                           and lay.merged_first == rel[0].merged_first for lay in rel)
        self._buffers = None

    def buffers(self, m):
        """Reused scratch for a block of ``m`` events: float64 showers, bool mask, moments."""
        if self._buffers is None or self._buffers[0].shape[0] < m:
            self._buffers = (np.empty((m, self.n_voxels)), np.empty((m, self.n_voxels), dtype=bool),
                             np.empty(8 * len(self.layer_ids) * m))
        x64, mask, mom = self._buffers
        return x64[:m], mask[:m], mom[:8 * len(self.layer_ids) * m]

    def new_table(self, n):
        """What :meth:`fill` writes: the (8, layers, events) float64 table (rows as ``_FEATURE_ROWS``) and the
        (events,) total energies (filled with ``native_sums`` only; else the sum of the layer energies)."""
        return np.empty((8, len(self.layer_ids), n)), np.empty(n if self.native_sums else 0)

    def fill(self, table, first, showers, threshold=0.0):
        """Write the features of ``showers`` (float32 or float64, (m, n_voxels)) to events first..first+m of
        ``table`` (from :meth:`new_table`)."""
        rows, etot = table
        if self.native_sums:
            etot[first:first + showers.shape[0]] = showers.sum(axis=-1)     # the reference's E_tot, input dtype
        nl = len(self.layer_ids)
        if nl == 0:
            return
        with one_blas_thread():
            self._fill(rows, first, showers, threshold, nl)

    def _native_layer_sums(self, xb, nl):
        """(m, layers) layer energies summed like the reference: ``x[:, a:b].sum(-1)`` in the input dtype."""
        if self.shared:
            return xb.reshape(xb.shape[0] * nl, -1).sum(axis=-1).reshape(xb.shape[0], nl)
        return np.stack([xb[:, a:b].sum(axis=-1) for a, b in self.spans], axis=1)

    def _fill(self, table, first, showers, threshold, nl):
        for s in range(0, showers.shape[0], self.block):
            xb = showers[s:s + self.block]
            m = xb.shape[0]
            x64, mask, mom = self.buffers(m)
            if xb.dtype == np.float64 and xb.flags.c_contiguous:
                x64 = xb
            else:
                np.copyto(x64, xb)                      # one float64 conversion per block: float64 sums
            if self.shared:
                mom = mom.reshape(8, m, nl)
                np.matmul(self.weights[0], x64.reshape(m * nl, -1).T, out=mom.reshape(8, m * nl))
            else:
                mom = mom.reshape(8, nl, m)
                for li, ((a, b), w) in enumerate(zip(self.spans, self.weights)):
                    np.matmul(w, x64[:, a:b].T, out=mom[:, li, :])
            # mom[0] = sum E; mom[1:4] = sum x E -> EC; mom[4:7] = sum x^2 E -> width (x = r, eta, phi)
            centre, width = mom[1:4], mom[4:7]
            if self.native_sums:
                e_layer = self._native_layer_sums(np.ascontiguousarray(xb), nl)        # (m, nl), input dtype
                denom = (e_layer + e_layer.dtype.type(1e-16)).astype(np.float64)
                denom = denom if self.shared else denom.T                             # as mom: (m, nl) / (nl, m)
                mom[0] = e_layer if self.shared else e_layer.T
                centre /= denom
                width /= denom
            else:
                inv = 1.0 / (mom[0] + 1e-16)
                centre *= inv
                width *= inv
            width -= centre * centre
            np.maximum(width, 0.0, out=width)
            np.sqrt(width, out=width)
            np.greater(xb, threshold, out=mask)
            count = np.add.reduceat(mask.view(np.uint8), self.starts, axis=1, dtype=self.count_dtype)  # (m, nl)
            out = table[:, :, first + s:first + s + m]
            out[:7] = mom[:7].transpose(0, 2, 1) if self.shared else mom[:7]
            out[7] = (1.0 - count * self.inv_n_voxels).T

    def as_dict(self, table):
        """Feature dict (``Etot`` and per-layer dicts) of views into ``table``."""
        table, etot = table
        out = {k: {} for k in ("E_layer", "EC_eta", "EC_phi", "width_eta", "width_phi", "EC_r", "width_r", "sparsity")}
        for li, lid in enumerate(self.layer_ids):
            for row, key in enumerate(_FEATURE_ROWS):
                if lid in self.alpha_ids or key not in _ALPHA_ONLY:
                    out[key][lid] = table[row, li]
        out["Etot"] = etot if self.native_sums else table[0].sum(axis=0)
        return out


def _float_block(block):
    """A block of showers as an ndarray that :meth:`_LayerPlan.fill` takes (float32/float64 kept as they are)."""
    if isinstance(block, np.ndarray) and block.dtype in (np.float32, np.float64):
        return block
    block = np.asarray(block)
    return block if block.dtype in (np.float32, np.float64) else block.astype(np.float64)


def compute_features(geom, showers, threshold=0.0, plan=None, native_sums=False):
    """High-level features of ``showers`` (events, n_voxels) in MeV, as a dict of float64 arrays.

    Keys: ``Etot`` (events,), and per layer id dicts ``E_layer``, ``EC_eta``, ``EC_phi``, ``width_eta``,
    ``width_phi`` (layers binned in alpha only), ``EC_r``, ``width_r`` and ``sparsity`` (all voxelised layers).
    Definitions (s = layer energy): EC = sum(x E)/(s + 1e-16); width = sqrt(max(sum(x^2 E)/(s + 1e-16) - EC^2, 0));
    sparsity = 1 - mean(E > threshold). Sums are accumulated in float64 whatever the input dtype
    (float32 and float64 inputs are read as they are, other dtypes converted to float64); with ``native_sums``
    the energies (E_layer, Etot, the denominators) are summed as CaloChallenge's class does, in the input dtype
    (see :class:`_LayerPlan`).

    >>> g = read_geometry("binning/binning_dataset_1_photons.xml", "photon")
    >>> x = np.zeros((1, g.n_voxels)); x[0, g.voxel_index(2, 0, 1)] = 1; x[0, g.voxel_index(2, 5, 1)] = 1
    >>> f = compute_features(g, x)
    >>> round(float(f["EC_r"][2][0]), 3), round(float(f["width_eta"][2][0]), 3)   # r centre 3.5, alpha +-pi/10
    (3.5, 3.329)
    """
    x = _float_block(showers)
    if x.ndim != 2 or x.shape[1] != geom.n_voxels:
        raise UserError(f"showers have shape {x.shape}, expected (events, {geom.n_voxels}) for {geom.filename}")
    plan = plan or _LayerPlan(geom, native_sums=native_sums)
    table = plan.new_table(x.shape[0])
    plan.fill(table, 0, x, threshold)
    return plan.as_dict(table)


def chunk_events(n_voxels, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """Events per chunk so that one float32 chunk of showers takes about ``chunk_bytes``."""
    return max(1, int(chunk_bytes // (4 * max(n_voxels, 1))))


def features_streaming(geom, showers, threshold=0.0, chunk=None, plan=None, native_sums=False):
    """:func:`compute_features` over an array-like (numpy, h5py dataset) read in chunks of ``chunk`` events.

    Memory stays at one chunk of showers plus the per-event features (8 floats per layer and event).
    """
    if len(showers.shape) != 2 or showers.shape[1] != geom.n_voxels:
        raise UserError(f"showers have shape {showers.shape}, expected (events, {geom.n_voxels}) for {geom.filename}")
    n = showers.shape[0]
    chunk = chunk or chunk_events(geom.n_voxels)
    plan = plan or _LayerPlan(geom, native_sums=native_sums)
    table = plan.new_table(n)
    for i in range(0, n, chunk):
        plan.fill(table, i, _float_block(showers[i:i + chunk]), threshold)
    return plan.as_dict(table)


def separation_power(frac1, frac2):
    """Triangular discrimination 0.5 * sum((h1 - h2)^2 / (h1 + h2 + 1e-16)) of two bin-fraction vectors.

    0 for identical histograms, 1 for disjoint ones (eq. 15 of arXiv:2009.03796). Where one sample has no entry
    inside the binning and the other has, the two have nothing in common: 1 (the reference gives NaN); two empty
    histograms give 0.

    >>> round(separation_power([0.5, 0.5, 0.0], [0.0, 0.0, 1.0]), 12), separation_power([0.2, 0.8], [0.2, 0.8])
    (1.0, 0.0)
    >>> separation_power([0.0, 0.0], [0.3, 0.7]), separation_power([0.0, 0.0], [0.0, 0.0])
    (1.0, 0.0)
    """
    h1 = np.asarray(frac1, dtype=np.float64)
    h2 = np.asarray(frac2, dtype=np.float64)
    if (h1.sum() > 0) != (h2.sum() > 0):
        return 1.0
    return float(0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + 1e-16)))


# ----------------------------------------------------------------------------------------------
# CaloChallenge-compatible class

class HighLevelFeatures:
    """Computes the CaloChallenge high-level features for one binning (API of CaloChallenge's class).

    ``HighLevelFeatures(particle, filename=xml)``; ``CalculateFeatures(showers)``; getters return dicts keyed
    by layer id. ``eta`` picks the slice in a multi-slice (FastCaloGAN) XML.
    """

    def __init__(self, particle, filename="binning.xml", eta=None):
        geom = read_geometry(filename, particle, eta)
        self.geometry = geom
        self.particle = particle
        self.bin_edges = list(geom.bin_edges)
        self.relevantLayers = geom.relevant_layers
        self.layersBinnedInAlpha = geom.layers_binned_in_alpha
        rel = [lay for lay in geom.layers if lay.n_voxels]
        self.r_edges = [lay.r_edges.tolist() for lay in rel]
        self.num_alpha = [lay.n_alpha for lay in rel]
        self.num_voxel = [lay.n_voxels for lay in rel]
        coords = [lay.voxel_coordinates() for lay in geom.layers]
        self.eta_all_layers = [c[2] for c in coords]
        self.phi_all_layers = [c[3] for c in coords]
        self.Einc = None
        self._f = None
        # energies summed in the input's dtype, as CaloChallenge's class does: the same E_layer and E_tot bits
        self._plan = _LayerPlan(geom, native_sums=True)

    def CalculateFeatures(self, data, threshold=0.0):
        """Compute all features of ``data`` (events, voxels): numpy array or h5py dataset (streamed)."""
        self._f = features_streaming(self.geometry, data, threshold, plan=self._plan)

    def _get(self, key):
        if self._f is None:
            raise RuntimeError("call CalculateFeatures first")
        return self._f[key]

    def GetEtot(self):
        return self._get("Etot")

    def GetElayers(self):
        return self._get("E_layer")

    def GetECEtas(self):
        return self._get("EC_eta")

    def GetECPhis(self):
        return self._get("EC_phi")

    def GetWidthEtas(self):
        return self._get("width_eta")

    def GetWidthPhis(self):
        return self._get("width_phi")

    def GetECR(self):
        return self._get("EC_r")

    def GetWidthR(self):
        return self._get("width_r")

    def GetSparsity(self):
        return self._get("sparsity")

    # reference attribute names, for code written against CaloChallenge's class
    E_tot = property(lambda self: None if self._f is None else self._f["Etot"])
    E_layers = property(lambda self: {} if self._f is None else self._f["E_layer"])
    EC_etas = property(lambda self: {} if self._f is None else self._f["EC_eta"])
    EC_phis = property(lambda self: {} if self._f is None else self._f["EC_phi"])
    width_etas = property(lambda self: {} if self._f is None else self._f["width_eta"])
    width_phis = property(lambda self: {} if self._f is None else self._f["width_phi"])
    EC_r = property(lambda self: {} if self._f is None else self._f["EC_r"])
    width_r = property(lambda self: {} if self._f is None else self._f["width_r"])
    sparsity = property(lambda self: {} if self._f is None else self._f["sparsity"])

    def DrawAverageShower(self, data, filename=None, title=None):
        """Plot the mean of ``data`` (events, voxels), one polar panel per voxelised layer."""
        mean = np.asarray(features_mean(data), dtype=np.float64)
        draw_shower(self.geometry, mean, filename, title)

    def DrawSingleShower(self, data, filename=None, title=None):
        """Plot each shower of ``data`` to ``<name>_<i><ext>``."""
        data = np.atleast_2d(np.asarray(data))
        for i, shower in enumerate(data):
            name = None
            if filename is not None:
                stem, ext = os.path.splitext(filename)
                name = f"{stem}_{i}{ext}"
            draw_shower(self.geometry, shower, name, title)


def features_mean(data, chunk=None):
    """Mean shower over events, float64 accumulation, streamed over an array or h5py dataset."""
    n = data.shape[0]
    chunk = chunk or chunk_events(data.shape[1])
    acc = np.zeros(data.shape[1])
    for i in range(0, n, chunk):
        acc += np.asarray(data[i:i + chunk], dtype=np.float64).sum(axis=0)
    return acc / max(n, 1)


def draw_layer(ax, lay, values, norm):
    """One layer's voxel energies on polar axes (radius log(1 + r/mm)); alpha bins are subdivided so that
    layers with a single alpha bin still draw as full rings."""
    values = np.asarray(values, dtype=np.float64)
    if lay.regular:
        img = values.reshape(lay.n_alpha, lay.n_r)
        splits = max(1, 64 // lay.n_alpha)
        img = np.repeat(img, splits, axis=0)
        n_theta = lay.n_alpha * splits
    else:   # alpha bins per r bin (1, 4, 8, 16, 32): each ring repeated onto 64 angular cells
        n_theta = 64
        ir, ia = lay.voxel_bins()
        rep = n_theta // lay.alpha_per_r[ir]
        img = np.zeros((n_theta, lay.n_r))
        for v in range(values.size):
            img[ia[v] * rep[v]:(ia[v] + 1) * rep[v], ir[v]] = values[v]
    edges = lay.alpha_edges if lay.n_alpha > 1 else np.array([-math.pi, math.pi])
    theta = np.linspace(edges[0], edges[-1], n_theta + 1)
    tt, rr = np.meshgrid(theta, np.log1p(lay.r_edges))
    pcm = ax.pcolormesh(tt, rr, img.T + 1e-16, norm=norm, shading="flat")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return pcm


def draw_shower(geom, shower, filename=None, title=None, vmin=1e-2, dpi=100):
    """Polar plot of one shower vector, a panel per voxelised layer (log colour scale), Agg backend, no LaTeX."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    shower = np.asarray(shower, dtype=np.float64)
    rel = [lay for lay in geom.layers if lay.n_voxels]
    ncol = min(len(rel), 9)
    nrow = int(math.ceil(len(rel) / ncol))
    fig = plt.figure(figsize=(2.2 * ncol, 2.4 * nrow + 0.8), dpi=dpi)
    norm = LogNorm(vmin=vmin, vmax=max(float(shower.max()), vmin * 10))
    pcm = None
    for k, lay in enumerate(rel):
        a, b = geom.offsets[lay.id]
        ax = fig.add_subplot(nrow, ncol, k + 1, polar=True)
        pcm = draw_layer(ax, lay, shower[a:b], norm)
        ax.set_title(f"Layer {lay.id}", fontsize=9)
    fig.subplots_adjust(bottom=0.36 if nrow == 1 else 0.12, top=0.85 if nrow == 1 else 0.93)
    cax = fig.add_axes([0.2, 0.2 if nrow == 1 else 0.05, 0.6, 0.04 if nrow == 1 else 0.015])
    fig.colorbar(pcm, cax=cax, orientation="horizontal", label="Energy (MeV)  [radius: log(1 + r/mm)]")
    if title:
        fig.suptitle(title)
    if filename is not None:      # temporary name + rename: a kill never leaves a truncated PNG
        tmp = os.path.join(os.path.dirname(os.path.abspath(filename)), ".tmp-" + os.path.basename(filename))
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white", pil_kwargs={"compress_level": 1})
        os.replace(tmp, filename)
    plt.close(fig)
    return filename


def main(argv=None):
    """``python HighLevelFeatures.py BINNING.xml PARTICLE [ETA]``: print the geometry of one slice."""
    import argparse

    p = argparse.ArgumentParser(
        prog="HighLevelFeatures.py",
        description="Print the voxel geometry (layers, r edges, alpha bins, voxel count) of one slice of a binning XML "
                    "(CaloChallenge or FastCaloGAN form).",
        epilog="example: python HighLevelFeatures.py binning/binning_dataset_1_photons.xml photon")
    p.add_argument("binning", help="binning XML file")
    p.add_argument("particle", help="particle name: " + ", ".join(PARTICLES))
    p.add_argument("eta", nargs="?", help="|eta| inside the wanted slice (needed when the file has several)")
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:               # --help (0) or a usage error (2), as a return code
        return stop.code
    try:
        g = read_geometry(args.binning, args.particle, args.eta)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(g)
    for lay in g.layers:
        if lay.n_voxels:
            alpha = lay.n_alpha if lay.regular else f"{lay.alpha_per_r.tolist()}"
            print(f"  layer {lay.id:2d}: {lay.n_r} r x {alpha} alpha, r_edges {lay.r_edges.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
