"""plumbing.py -- what every calokit stage script shares besides the geometry (HighLevelFeatures.py).

One small module, importable alone with HighLevelFeatures.py beside it (numpy; h5py, Keras and scipy only
inside the functions that need them). It holds, top to bottom:

* FastCaloGAN's normalisations and their inverses side by side: E_kin from the momentum, energy ranges,
  the condition label (V1/V2) and :func:`label_to_ekin`, the condition vector [label, 0];
* CaloShowerGAN's layer representation (:func:`to_layer_representation`) and its exact inverse, and
  :func:`to_voxels`, the one place a generator's output becomes voxel / E_kin;
* atomic outputs (:func:`atomic_output`, :func:`write_text`, :func:`atomic_directory`), HDF5 opening and the
  validated, chunked reading and writing of CaloChallenge files;
* the command wrapper :func:`run_cli` (``UserError`` -> one line on stderr and exit code 2);
* the run layout of train.py (``<run>/config.json``, ``<run>/ckpt_<iteration>/generator.keras``),
  loading a generator and generating showers from it (:func:`generate`), and the quiet Keras import.

Example
-------
>>> import numpy as np
>>> from plumbing import condition_label, label_to_ekin
>>> label = condition_label(np.array([256.0, 4096.0]), 256.0, 65536.0)
>>> label.tolist(), label_to_ekin(label, 256.0, 65536.0).tolist()
([0.0, 0.5], [256.0, 4096.0])
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import weakref

import numpy as np

from HighLevelFeatures import PARTICLES, GeometryError, UserError, chunk_events  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------------------------
# FastCaloGAN normalisations

MAX_EXP = 22                     # V1 label: E_kin / 2^22

#: FastCaloGAN energy ranges by momentum p (MeV), one GAN each: (p_min, p_max, p_min included?).
#: "high" takes p > 2^12 but keeps 2^12 as p_min of its label; "all" for e/gamma is a calokit extension.
ENERGY_RANGES = {
    "photon": {"low": (2.0**6, 2.0**12, True), "high": (2.0**12, 2.0**22, False), "all": (2.0**6, 2.0**22, True)},
    "electron": {"low": (2.0**6, 2.0**12, True), "high": (2.0**12, 2.0**22, False), "all": (2.0**6, 2.0**22, True)},
    "pion": {"all": (2.0**8, 2.0**22, True)},
    "proton": {"all": (2.0**10, 2.0**22, True)},
}


#: FastCaloGAN's energy ranges: name -> (lowest, highest) exponent of the momenta 2^k MeV, both included
FASTCALOGAN_RANGES = {
    "All": (8, 22), "UltraLow12": (6, 12), "Low10": (8, 10), "Low12": (8, 12), "Low13": (8, 13), "Low14": (8, 14),
    "Low15": (8, 15), "High10": (10, 22), "High12": (12, 22), "High15": (15, 22), "High16": (16, 22),
    "High17": (17, 22), "High18": (18, 22), "High19": (19, 22), "Mid1017": (10, 17), "Mid1217": (12, 17),
    "Mid1218": (12, 18), "Mid1317": (13, 17), "Mid1318": (13, 18), "Cell": (10, 18), "Single65": (16, 16),
}

#: label scheme -> (label from E_kin, E_kin from label). V2 = FastCaloGAN's LogE, V1 = E_kin / 2^max_exp;
#: MaxE and Exp are FastCaloGAN's other label_definition values. E_min / E_max: E_kin at the range's p_min / p_max.
LABEL_FORMULAS = {
    "V2": ("label = log(E_kin / ekin_min) / log(ekin_max / ekin_min)", "E_kin = ekin_min * (ekin_max / ekin_min)**label"),
    "LogE": ("label = log(E_kin / ekin_min) / log(ekin_max / ekin_min)", "E_kin = ekin_min * (ekin_max / ekin_min)**label"),
    "V1": ("label = E_kin / 2**max_exp", "E_kin = label * 2**max_exp"),
    "MaxE": ("label = E_kin / ekin_max", "E_kin = label * ekin_max"),
    "Exp": ("label = log2(E_kin)", "E_kin = 2**label"),
}


def particle_mass(particle):
    """Mass in MeV of a particle name (photon, electron, pion, proton)."""
    if particle not in PARTICLES:
        raise UserError(f"unknown particle '{particle}' (choose from {', '.join(PARTICLES)})")
    return PARTICLES[particle][1]


def kinetic_energy(p, particle):
    """E_kin = sqrt(p^2 + m^2) - m in MeV (FastCaloGAN's normalisation energy).

    >>> float(kinetic_energy(1000.0, "photon")), round(float(kinetic_energy(1000.0, "pion")), 3)
    (1000.0, 870.123)
    """
    m = particle_mass(particle)
    p = np.asarray(p, dtype=np.float64)
    return np.sqrt(p * p + m * m) - m


def energy_range(particle, name):
    """(p_min, p_max, p_min_included) of an energy range; UserError if undefined.

    calokit's names (``low``, ``high``, ``all``, per particle) or FastCaloGAN's (``High12``: 2^12..2^22 MeV,
    both ends included; see ``FASTCALOGAN_RANGES``).

    >>> energy_range("photon", "High12") == (2.0**12, 2.0**22, True), energy_range("photon", "high")[2]
    (True, False)
    """
    ranges = ENERGY_RANGES.get(particle, {})
    if name in ranges:
        return ranges[name]
    if name in FASTCALOGAN_RANGES and particle in ENERGY_RANGES:
        lo, hi = FASTCALOGAN_RANGES[name]
        return 2.0**lo, 2.0**hi, True
    raise UserError(f"energy range '{name}' is not defined for {particle} (choose from "
                    f"{', '.join(list(ranges) + list(FASTCALOGAN_RANGES)) if ranges else 'none'})")


def in_energy_range(p, particle, name):
    """Boolean mask of momenta p (MeV) inside the range (2^-20 relative tolerance on the edges)."""
    lo, hi, inc = energy_range(particle, name)
    p = np.asarray(p, dtype=np.float64)
    tol = 2.0**-20
    above = p >= lo * (1 - tol) if inc else p > lo * (1 + tol)
    return above & (p <= hi * (1 + tol))


def condition_label(ekin, ekin_min, ekin_max, scheme="V2", max_exp=MAX_EXP):
    """FastCaloGAN condition label of kinetic energies (see ``LABEL_FORMULAS``).

    V2 / LogE log(E/E_min)/log(E_max/E_min) (default), V1 E/2^max_exp, MaxE E/E_max, Exp log2 E.

    >>> condition_label(np.array([256.0, 4096.0, 65536.0]), 256.0, 65536.0).tolist()
    [0.0, 0.5, 1.0]
    >>> condition_label(np.array([4096.0]), 256.0, 65536.0, "MaxE").tolist(), condition_label(4096.0, 1, 2, "Exp").tolist()
    ([0.0625], 12.0)
    """
    ekin = np.asarray(ekin, dtype=np.float64)
    if scheme in ("V2", "LogE"):
        return np.log(ekin / ekin_min) / np.log(ekin_max / ekin_min)
    if scheme == "V1":
        return ekin / 2.0**max_exp
    if scheme == "MaxE":
        return ekin / ekin_max
    if scheme == "Exp":
        return np.log2(ekin)
    raise UserError(f"unknown label scheme '{scheme}' (choose from {', '.join(LABEL_FORMULAS)})")


def condition_vector(label, eta=None):
    """The (N, 2) condition FastCaloSim feeds lwtnn node_1: [label, |eta| or 0]."""
    label = np.asarray(label, dtype=np.float32).reshape(-1)
    second = np.zeros_like(label) if eta is None else np.full_like(label, abs(float(eta)))
    return np.stack([label, second], axis=1)


def label_to_ekin(label, ekin_min, ekin_max, scheme="V2", max_exp=MAX_EXP):
    """Inverse of :func:`condition_label`: E_kin (MeV) from labels.

    >>> float(label_to_ekin(0.5, 256.0, 65536.0))
    4096.0
    """
    label = np.asarray(label, dtype=np.float64)
    if scheme in ("V2", "LogE"):
        return ekin_min * np.power(ekin_max / ekin_min, label)
    if scheme == "V1":
        return label * 2.0 ** max_exp
    if scheme == "MaxE":
        return label * ekin_max
    if scheme == "Exp":
        return np.exp2(label)
    raise UserError(f"unknown label scheme '{scheme}' (choose from {', '.join(LABEL_FORMULAS)})")


# ----------------------------------------------------------------------------------------------
# CaloShowerGAN's layer representation and its inverse (``preprocess.py prepare --norm layer``)

#: CaloShowerGAN's fill: every zero voxel is set to this many MeV before the fractions are taken
LAYER_FILL_MEV = 1e-4
#: the output layer of a generator of the layer representation (train.py); :func:`representation_spans` finds
#: its voxel-fraction heads (``voxel_fractions_<i>``) by name
LAYER_OUTPUT = "layer_representation"
LAYER_HEAD = "voxel_fractions_"


def check_spans(spans, n_voxels=None):
    """The layer spans as a list of (first, last + 1) int tuples; UserError unless they are non-empty and tile
    0 .. n_voxels without gaps (the voxelised layers of a slice, in XML order).

    >>> check_spans([[0, 2], [2, 5]], 5)
    [(0, 2), (2, 5)]
    """
    out = [(int(a), int(b)) for a, b in spans]
    if not out or out[0][0] != 0 or any(b <= a for a, b in out) or any(a != pb for (a, _), (_, pb) in
                                                                        zip(out[1:], out[:-1])):
        raise UserError(f"layer spans {out}: expected non-empty spans tiling 0..n_voxels without gaps")
    if n_voxels is not None and out[-1][1] != int(n_voxels):
        raise UserError(f"layer spans end at voxel {out[-1][1]}, the slice has {n_voxels} voxels")
    return out


def layer_representation_size(spans):
    """Values per shower in the layer representation: voxels + layers + 1."""
    return int(spans[-1][1]) + len(spans) + 1


def to_layer_representation(voxels_over_ekin, spans, ekin, fill_mev=LAYER_FILL_MEV):
    """CaloShowerGAN's representation of showers given as voxel / E_kin (N, V): float64 (N, V + L + 1) =
    [each voxel / its layer's energy (each layer sums to 1), each layer's energy / E_tot (they sum to 1),
    E_tot / E_kin].

    ``spans`` = [(first, last + 1)] of the L voxelised layers (layers without voxels are not in it); ``ekin``
    (N,) the kinetic energies in MeV. First every zero voxel is set to ``fill_mev`` (1e-4 MeV, CaloShowerGAN's
    code), so no layer is empty: a layer with no energy in an event becomes ``n_voxels_of_layer`` x 1e-4 MeV
    spread evenly (fractions 1/n), and E_tot is never 0. The fill *adds energy*: (zero voxels) x 1e-4 MeV per
    shower, at most V x 1e-4 MeV (0.037 MeV for the 368 voxels of dataset 1 photons). Relative to E_tot, on the
    demo's toy photons (88 % of voxels zero at 256 MeV, 55 % at 4 TeV): median 1.3e-4 (at most 2.7e-4) at
    256 MeV, 1.4e-5 at 2 GeV, 3.6e-7 at 65 GeV, 5e-9 at 4 TeV. :func:`from_layer_representation` returns the
    filled showers (it cannot tell a filled voxel from a real one of the same energy).

    >>> rep = to_layer_representation(np.array([[0.2, 0.2, 0.6, 0.0]]), [(0, 2), (2, 4)], np.array([1e4]))
    >>> np.round(rep, 6).tolist()
    [[0.5, 0.5, 1.0, 0.0, 0.4, 0.6, 1.0]]
    >>> bool(np.allclose(from_layer_representation(rep, [(0, 2), (2, 4)]), [[0.2, 0.2, 0.6, 1e-8]], rtol=1e-9, atol=0))
    True
    """
    spans = check_spans(spans)
    x = np.array(voxels_over_ekin, dtype=np.float64, ndmin=2)
    if x.shape[1] != spans[-1][1]:
        raise UserError(f"showers have {x.shape[1]} voxels, the layer spans {spans[-1][1]}")
    ekin = np.asarray(ekin, dtype=np.float64).reshape(-1, 1)
    x = np.where(x == 0.0, fill_mev / ekin, x)
    lengths = np.array([b - a for a, b in spans])
    layer = np.add.reduceat(x, [a for a, _ in spans], axis=1)
    etot = layer.sum(axis=1, keepdims=True)
    return np.concatenate([x / np.repeat(layer, lengths, axis=1), layer / etot, etot], axis=1)


def from_layer_representation(rep, spans):
    """The exact inverse of :func:`to_layer_representation`: voxel / E_kin = (E_tot / E_kin) x layer fraction x
    voxel fraction, (N, V) in the dtype of ``rep`` (float32 stays float32).

    >>> x = from_layer_representation(np.array([[0.25, 0.75, 1.0, 0.5, 0.5, 0.2]], np.float32), [(0, 2), (2, 3)])
    >>> x.dtype.name, np.round(x.astype(float), 6).tolist()
    ('float32', [[0.025, 0.075, 0.1]])
    """
    spans = check_spans(spans)
    rep = np.asarray(rep)
    v, n_layers = spans[-1][1], len(spans)
    if rep.ndim != 2 or rep.shape[1] != v + n_layers + 1:
        raise UserError(f"layer representation of shape {rep.shape}: expected (N, {v + n_layers + 1})")
    lengths = np.array([b - a for a, b in spans])
    out = rep[:, :v] * np.repeat(rep[:, v:v + n_layers], lengths, axis=1)
    out *= rep[:, v + n_layers:]
    return out


def representation_spans(model):
    """The layer spans of a Keras generator of the layer representation (output layer ``layer_representation``,
    heads ``voxel_fractions_<i>``), or None for a generator whose output already is voxel / E_kin."""
    names = {layer.name: layer for layer in model.layers}
    if LAYER_OUTPUT not in names:
        return None
    units, i = [], 0
    while f"{LAYER_HEAD}{i}" in names:
        units.append(int(names[f"{LAYER_HEAD}{i}"].units))
        i += 1
    edges = np.concatenate([[0], np.cumsum(units)]).astype(int).tolist()
    return check_spans(list(zip(edges[:-1], edges[1:])))


def to_voxels(model, output):
    """The ONE place a generator's output becomes voxel / E_kin: the layer representation's product for a
    generator of that kind (:func:`representation_spans`), the output itself otherwise. :func:`generate` and the
    export checks go through it, so no stage can forget the product."""
    spans = representation_spans(model)
    return output if spans is None else from_layer_representation(output, spans)


# ----------------------------------------------------------------------------------------------
# shared I/O: atomic outputs, validated chunked reading, CLI error handling

@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path`` (same extension); rename it to ``path`` only on success.

    A crash or kill never leaves a truncated file under the final name.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"{path}: output directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise UserError(f"{path}: output directory {d} is not writable")
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + base, dir=d)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a finished output gets the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path, text):
    """Write a text file atomically (temporary file + rename); returns the path."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)
    return path


def write_json(path, obj):
    """Write ``obj`` as indented JSON atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=1) + "\n")


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory beside ``path``; rename it to ``path`` when the block succeeds.

    An existing ``path`` is first renamed aside and deleted only after the new one is in place, so a kill never
    leaves a half-deleted directory under the final name. The directory gets the usual mode (0777 & ~umask),
    not mkdtemp's 0700.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = None
        if os.path.isdir(path):
            old = tmp + "-old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_dir(path):
    """Create an output directory, or raise a :class:`UserError` naming it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"{path}: cannot create output directory ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{path}: output directory is not writable")
    return path


def open_h5(path, what="file"):
    """Open an HDF5 file for reading; a missing or unreadable file is a :class:`UserError` naming it."""
    import h5py

    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None


CKPT_RE = re.compile(r"^ckpt_(\d+)$")


def list_checkpoints(run, required=("generator.keras",)):
    """[(iteration, path)] of the complete checkpoints ``<run>/ckpt_<N>/`` (holding every ``required`` file), sorted.

    Checkpoints are renamed into place only when complete, so temporary directories never match.
    """
    if not os.path.isdir(run):
        raise UserError(f"{run}: run directory not found")
    found = []
    for name in os.listdir(run):
        m = CKPT_RE.match(name)
        path = os.path.join(run, name)
        if m and all(os.path.isfile(os.path.join(path, r)) for r in required):
            found.append((int(m.group(1)), path))
    return sorted(found)


def open_calo_file(path, n_voxels=None):
    """Open and validate a CaloChallenge HDF5 file; returns (h5py.File, n_events, n_voxels).

    Checks: readable HDF5, datasets ``incident_energies`` (N,1)/(N,) and ``showers`` (N, V), same N > 0,
    V = ``n_voxels`` when given. Every failure is a :class:`UserError` naming the file and the field.
    """
    import h5py

    f = open_h5(path)
    try:
        for name in ("incident_energies", "showers"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise UserError(f"{path}: missing dataset '{name}' (CaloChallenge files have "
                                f"'incident_energies' and 'showers')")
        einc, sh = f["incident_energies"], f["showers"]
        if sh.ndim != 2:
            raise UserError(f"{path}: 'showers' has shape {sh.shape}, expected (events, voxels)")
        if einc.ndim not in (1, 2) or (einc.ndim == 2 and einc.shape[1] != 1):
            raise UserError(f"{path}: 'incident_energies' has shape {einc.shape}, expected (events, 1)")
        if einc.shape[0] != sh.shape[0]:
            raise UserError(f"{path}: 'incident_energies' has {einc.shape[0]} events but 'showers' has {sh.shape[0]}")
        if sh.shape[0] == 0:
            raise UserError(f"{path}: 'showers' has zero events")
        if n_voxels is not None and sh.shape[1] != n_voxels:
            raise UserError(f"{path}: 'showers' has {sh.shape[1]} voxels per event, expected {n_voxels}")
        return f, sh.shape[0], sh.shape[1]
    except BaseException:
        f.close()
        raise


def iter_calo_chunks(path, n_voxels=None, chunk=None, check=True, start=0, stop=None, dtype=np.float32,
                     allow_negative=False):
    """Yield (start_index, incident_energies (n,) float64, showers (n, V) float32) chunks of a CaloChallenge file.

    ``dtype=None`` keeps the showers in the file's own dtype (float32 or float64; other dtypes become float64).

    With ``check``, NaN/inf or negative values raise a :class:`UserError` naming file, dataset and event
    (negative voxels pass with ``allow_negative``; non-positive incident energies never do).
    """
    f, n, v = open_calo_file(path, n_voxels)
    with f:
        stop = n if stop is None else min(stop, n)
        chunk = chunk or chunk_events(v)
        for i in range(start, stop, chunk):
            j = min(i + chunk, stop)
            try:
                e = np.asarray(f["incident_energies"][i:j], dtype=np.float64).reshape(-1)
                s = np.asarray(f["showers"][i:j], dtype=dtype or native_float(f["showers"].dtype))
            except OSError as err:
                raise UserError(f"{path}: cannot read events {i}..{j} (truncated or corrupt file: {err})") from None
            if check:
                check_finite(path, "incident_energies", e, i, positive=True)
                check_finite(path, "showers", s, i, allow_negative=allow_negative)
            yield i, e, s


def native_float(dtype):
    """The float dtype showers of ``dtype`` are computed in without a cast: float32 or float64 as they are, else
    float64."""
    return np.dtype(dtype) if np.dtype(dtype) in (np.float32, np.float64) else np.dtype(np.float64)


def check_finite(path, name, arr, first_event=0, positive=False, allow_negative=False):
    """Raise :class:`UserError` if ``arr`` has NaN/inf or negative (or, with positive, non-positive) values.

    ``allow_negative`` lets negative values through (NaN/inf stay errors): generated showers of FastCaloGAN's
    swish network (Dense -> BatchNorm -> swish output) hold negative voxels, which CaloChallenge's evaluate.py
    sets to zero with its threshold; :func:`negative_voxels` counts them.
    """
    bad = ~np.isfinite(arr)
    if bad.any():
        ev = first_event + int(np.argwhere(bad)[0][0])
        raise UserError(f"{path}: '{name}' has NaN/inf values (first at event {ev})")
    if allow_negative and not positive:
        return
    neg = arr <= 0 if positive else arr < 0
    if neg.any():
        ev = first_event + int(np.argwhere(neg)[0][0])
        what = "non-positive" if positive else "negative"
        raise UserError(f"{path}: '{name}' has {what} values (first at event {ev})")


def negative_voxels(showers):
    """(number of negative voxels, most negative value or 0.0) of an array of showers.

    >>> negative_voxels(np.array([[1.0, -2.0], [-0.5, 0.0]]))
    (2, -2.0)
    """
    neg = showers < 0
    n = int(np.count_nonzero(neg))
    return n, (float(showers.min()) if n else 0.0)


def write_calo_file(path, incident_energies, showers, compression=None, **extra):
    """Write a CaloChallenge HDF5 file atomically (float32 showers, (N,1) incident energies)."""
    import h5py

    einc = np.asarray(incident_energies, dtype=np.float64).reshape(-1, 1)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=einc)
            f.create_dataset("showers", data=np.asarray(showers, dtype=np.float32), compression=compression)
            for k, v in extra.items():
                f.create_dataset(k, data=v)


def import_keras():
    """Import Keras (lazily, so ``--help`` stays fast) without TensorFlow's import-time C++ log lines on stderr.

    TensorFlow prints absl/oneDNN notices from C++ before its logging is configured, whatever the environment
    says, so stderr is pointed at /dev/null for the import alone; TF_CPP_MIN_LOG_LEVEL=2 silences the rest.
    An import error is still raised (and printed) normally.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras
        if keras.backend.backend() == "tensorflow":
            import tensorflow  # noqa: F401  (its C++ start-up logs happen here)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that shows each default once: "(default: X)" is added only to optional arguments that have a
    default (not None, not a bare on/off switch) and whose help text does not already state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.required or not action.option_strings
                or isinstance(action.default, bool) or "default" in text or action.default == []):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def run_cli(fn, argv=None):
    """Run ``fn(argv)`` as a command: UserError -> one line on stderr and 2; other errors -> 1; else fn's code."""
    try:
        rc = fn(argv)
        return 0 if rc is None else int(rc)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), as a return code in-process too
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try a smaller --chunk / fewer events)", file=sys.stderr)
        return 1
    except Exception as err:  # internal error: still one readable line, but a distinct code
        print(f"internal error: {type(err).__name__}: {err}", file=sys.stderr)
        if os.environ.get("CALOKIT_DEBUG"):
            raise
        return 1


# ----------------------------------------------------------------------------------------------
# train.py's run layout: config.json, ckpt_<iteration>/generator.keras

NOISE_MEAN, NOISE_STD = 0.5, 0.5         # FastCaloGAN's latent noise N(0.5, 0.5), what FastCaloSim feeds node_0


def read_run_config(run):
    """``<run>/config.json`` as a dict; a missing or unreadable file is a :class:`UserError` naming it."""
    path = os.path.join(run, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: run configuration not found") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable run configuration ({err})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def load_generator(run, iteration=None):
    """The generator of checkpoint ``iteration`` of ``run`` (None = the last complete one) as a Keras model."""
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise UserError(f"{run}: no complete checkpoint (ckpt_<iteration>/generator.keras)")
    if iteration is None:
        return load_generator_file(os.path.join(ckpts[-1][1], "generator.keras"))
    hits = [p for it, p in ckpts if it == int(iteration)]
    if not hits:
        raise UserError(f"{run}: no complete checkpoint for iteration {iteration} "
                        f"(have {', '.join(str(it) for it, _ in ckpts[-10:])})")
    return load_generator_file(os.path.join(hits[0], "generator.keras"))


def load_generator_file(path):
    """Load a ``generator.keras`` for inference; a :class:`UserError` if it cannot be read."""
    keras = import_keras()
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # corrupt zip, foreign model: the user's file
        msg = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: cannot load the Keras model ({type(err).__name__}: {msg[:300]})") from None


# ----------------------------------------------------------------------------------------------
# generation: a numpy pass for small batches, the same folded chain compiled for large ones

#: up to this many showers per call, :func:`generate` runs the network as numpy matrix products (no framework
#: dispatch: ~20x faster than a Keras call for one shower); larger calls run the same chain compiled
SMALL_BATCH = 256


def draw_noise(rng, n, latent, mean=NOISE_MEAN, std=NOISE_STD):
    """(n, latent) float32 noise N(mean, std) from the numpy Generator ``rng``.

    Values come off the generator's stream in order, so drawing in chunks gives the same numbers as one draw.
    """
    z = rng.standard_normal((n, latent), dtype=np.float32)
    z *= np.float32(std)
    z += np.float32(mean)
    return z


def _np_activation(name, alpha, x):
    """Activation ``name`` applied in place to the float32 array ``x`` (None if not supported here)."""
    from scipy.special import expit

    if name == "linear":
        return x
    if name == "relu":
        return np.maximum(x, 0, out=x)
    if name == "leaky_relu":
        return np.where(x > 0, x, x * np.float32(alpha)).astype(np.float32, copy=False)
    if name == "swish":
        return np.multiply(x, expit(x), out=x)
    if name == "sigmoid":
        return expit(x, out=x)
    if name == "tanh":
        return np.tanh(x, out=x)
    return None


def _activation_of(layer):
    """(name, alpha) of a Dense/Activation/LeakyReLU/ReLU layer's activation, or None if it is not a plain one."""
    keras = import_keras()
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu", float(layer.negative_slope)
    if isinstance(layer, keras.layers.ReLU):
        plain = layer.max_value is None and not layer.threshold and not layer.negative_slope
        return ("relu", 0.0) if plain else None
    try:
        name = keras.activations.serialize(layer.activation)
    except (AttributeError, TypeError, ValueError):
        return None
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    name = {"silu": "swish"}.get(name, name)
    return (name, 0.0) if name in ("linear", "relu", "swish", "sigmoid", "tanh") else None


def generator_chain(model):
    """The generator as a list of float32 (kernel, bias, activation, alpha) with every batch-norm folded into
    the Dense layer before it (inference mode: moving statistics), or None if the model is not a
    [noise, condition] -> Concatenate -> Dense / BatchNormalization / activation chain."""
    L = import_keras().layers
    if len(model.inputs) != 2 or representation_spans(model) is not None:
        return None
    chain = []
    for layer in model.layers:
        if isinstance(layer, (L.InputLayer, L.Concatenate)) and not chain:
            continue
        if isinstance(layer, L.Dense):
            w = layer.get_weights()
            bias = w[1] if layer.use_bias else np.zeros(w[0].shape[1])
            chain.append([np.asarray(w[0], np.float64), np.asarray(bias, np.float64), _activation_of(layer)])
        elif isinstance(layer, L.BatchNormalization) and chain and chain[-1][2] == ("linear", 0.0):
            n = layer.moving_mean.shape[-1]
            gamma = np.asarray(layer.gamma.value, np.float64) if layer.scale else np.ones(n)
            beta = np.asarray(layer.beta.value, np.float64) if layer.center else np.zeros(n)
            scale = gamma / np.sqrt(np.asarray(layer.moving_variance.value, np.float64) + layer.epsilon)
            chain[-1][0] = chain[-1][0] * scale
            chain[-1][1] = (chain[-1][1] - np.asarray(layer.moving_mean.value, np.float64)) * scale + beta
        elif chain and chain[-1][2] == ("linear", 0.0) and not isinstance(layer, L.BatchNormalization):
            chain[-1][2] = _activation_of(layer)
        else:
            return None
        if chain[-1][2] is None:
            return None
    return [(k.astype(np.float32), b.astype(np.float32)) + act for k, b, act in chain] or None


_COMPILED = {}          # (backend, architecture or activations) -> compiled function: one compilation per run


def _compiled_call(model):
    """The model's inference call compiled with the weights as arguments (XLA with TensorFlow, jax.jit with JAX),
    shared by every model of the same architecture (all checkpoints of a run). The first model of each
    architecture stays referenced here: its graph runs the others' weights."""
    keras = import_keras()
    backend = keras.backend.backend()
    key = (backend, model.to_json())
    if key not in _COMPILED:
        def call(trainable, non_trainable, noise, condition):
            return model.stateless_call(trainable, non_trainable, [noise, condition], training=False)[0]

        _COMPILED[key] = _compile(call, backend)
    return _COMPILED[key]


def _compile(fn, backend):
    """``fn`` compiled by the backend: XLA with TensorFlow, jax.jit with JAX (else as it is)."""
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.function(fn, jit_compile=True, autograph=False)
    if backend == "jax":
        import jax
        return jax.jit(fn)
    return fn


def _compiled_chain(acts):
    """Compiled ``f(h, weights) -> output`` of a Dense chain with activations ``acts`` ((name, alpha) per layer),
    shared by every model with those activations (all checkpoints of a run)."""
    keras = import_keras()
    backend = keras.backend.backend()
    key = (backend, "chain", acts)
    if key not in _COMPILED:
        ops = keras.ops
        funcs = {"linear": lambda x, a: x, "relu": lambda x, a: ops.relu(x), "swish": lambda x, a: ops.silu(x),
                 "leaky_relu": lambda x, a: ops.leaky_relu(x, negative_slope=a),
                 "sigmoid": lambda x, a: ops.sigmoid(x), "tanh": lambda x, a: ops.tanh(x)}

        def forward(h, weights):
            for (kernel, bias), (name, alpha) in zip(weights, acts):
                h = funcs[name](ops.matmul(h, kernel) + bias, alpha)
            return h

        _COMPILED[key] = _compile(forward, backend)
    return _COMPILED[key]


def _writable_float32(t):
    """A backend tensor as a writable float32 numpy array, copied only when it has to be."""
    arr = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
    return arr if arr.dtype == np.float32 and arr.flags.writeable else np.array(arr, dtype=np.float32)


class _Runner:
    """A generator's ways to run: numpy over the folded chain (small batches), the same chain compiled (large
    batches), or the compiled Keras model (networks that are not a plain Dense chain)."""

    def __init__(self, model):
        self.model = weakref.ref(model)       # the runner lives as long as its model (see _RUNNERS)
        self.spans = representation_spans(model)     # heads whose product is the shower: see to_voxels
        self.n_out = int(model.outputs[0].shape[-1]) if self.spans is None else int(self.spans[-1][1])
        self.chain = generator_chain(model) if self.spans is None else None
        self.weights = None
        if self.chain is not None:        # never trust the folding blindly: compare with Keras once (eager call:
            rng = np.random.default_rng(12345)                    # nothing is compiled for the check)
            z, lab = draw_noise(rng, 16, int(model.inputs[0].shape[-1])), rng.random(16).astype(np.float32)
            ref = _writable_float32(model([z, condition_vector(lab)], training=False))
            mine = self.numpy(np.concatenate([z, condition_vector(lab)], axis=1))
            if not np.allclose(mine, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max()))):
                self.chain = None

    def numpy(self, h):
        for kernel, bias, act, alpha in self.chain:
            h = _np_activation(act, alpha, np.add(h @ kernel, bias, dtype=np.float32))
        return h

    def keras(self, z, label):
        model = self.model()
        fn = _compiled_call(model)
        out = fn([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                 z, condition_vector(label))
        return _writable_float32(out)

    def compiled(self, h):
        """The folded chain as one compiled function (XLA / jax.jit), weights as arguments: large batches."""
        if self.weights is None:
            ops = import_keras().ops
            self.weights = tuple((ops.convert_to_tensor(k), ops.convert_to_tensor(b)) for k, b, _, _ in self.chain)
        fn = _compiled_chain(tuple((act, alpha) for _, _, act, alpha in self.chain))
        out = fn(h, self.weights)
        return _writable_float32(out)

    def __call__(self, z, label):
        """voxel / E_kin (N, n_out) float32 for noise ``z`` and labels."""
        if self.chain is None:
            out = self.keras(z, label)
            return out if self.spans is None else from_layer_representation(out, self.spans)
        h = np.concatenate([z, condition_vector(label)], axis=1)         # [noise, condition], as the Concatenate
        return self.numpy(h) if z.shape[0] <= SMALL_BATCH else self.compiled(h)


def generate(generator, label, rng_or_seed=None, batch_size=10000, noise_mean=NOISE_MEAN, noise_std=NOISE_STD,
             refresh=False):
    """Showers as voxel / E_kin (N, V) float32 of a Keras ``generator`` for condition labels (N,) (condition
    [label, 0]). A generator of the layer representation (CaloShowerGAN's heads) gives voxel / E_kin too: its
    output goes through :func:`from_layer_representation` here (:func:`to_voxels`), so every stage gets showers.

    Noise: N(noise_mean, noise_std) from the numpy Generator ``rng_or_seed`` (or ``default_rng(seed)``); the
    result does not depend on ``batch_size``. Calls of up to :data:`SMALL_BATCH` showers run as numpy matrix
    products over the network with batch-norm folded in; larger ones run the same folded chain as one compiled
    function (XLA with TensorFlow, jax.jit with JAX; one compilation per run), in chunks of ``batch_size`` (the last
    one padded, so one compiled shape). Networks that are not a plain Dense chain run the compiled Keras model.
    The weights are read once per model object: pass ``refresh=True`` after changing them in place.

    >>> import keras
    >>> noise, cond = keras.Input((4,), name="noise"), keras.Input((2,), name="condition")
    >>> out = keras.layers.Dense(3, activation="relu")(keras.layers.Concatenate()([noise, cond]))
    >>> x = generate(keras.Model([noise, cond], out), [0.5, 0.7], rng_or_seed=1)
    >>> x.shape, x.dtype.name, bool((x >= 0).all())
    ((2, 3), 'float32', True)
    """
    label = np.asarray(label, dtype=np.float32).reshape(-1)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    run = _runner(generator, refresh)
    latent, n, bs = int(generator.inputs[0].shape[-1]), label.shape[0], max(1, int(batch_size))
    if n <= bs:
        return run(draw_noise(rng, n, latent, noise_mean, noise_std), label)
    out = np.empty((n, run.n_out), dtype=np.float32)
    for i in range(0, n, bs):
        m = min(bs, n - i)
        z = np.full((bs, latent), noise_mean, dtype=np.float32)
        z[:m] = draw_noise(rng, m, latent, noise_mean, noise_std)
        lab = np.zeros(bs, dtype=np.float32)
        lab[:m] = label[i:i + m]
        out[i:i + m] = run(z, lab)[:m]
    return out


_RUNNERS = weakref.WeakKeyDictionary()          # model -> its _Runner (weights read once per model object)


def _runner(model, refresh=False):
    if refresh or model not in _RUNNERS:
        _RUNNERS[model] = _Runner(model)
    return _RUNNERS[model]


# ----------------------------------------------------------------------------------------------
# the numpy evaluator of an lwtnn graph JSON (independent of Keras), as lwtnn computes it in C++:
# export_lwtnn.py checks its JSON with it, fastcalosim.py runs the networks of a FastCaloSim folder with it

def _sigmoid(x):
    """lwtnn's sigmoid: exactly 0 below -30 and 1 above 30."""
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))
    return np.where(x < -30.0, 0.0, np.where(x > 30.0, 1.0, s))


def apply_activation(act, x):
    """Apply an lwtnn activation (string or {function, alpha}) to rows of ``x`` as lwtnn does.

    A parametrised function given as a plain string gets alpha = NaN, as in lwtnn (except elu: alpha 1).
    """
    if isinstance(act, dict):
        fn, alpha = act["function"], float(act["alpha"])
    else:
        fn, alpha = act, (1.0 if act == "elu" else math.nan)
    if fn == "linear":
        return x
    if fn == "rectified":
        return np.where(np.isnan(x) | (x > 0), x, 0.0)
    if fn == "sigmoid":
        return _sigmoid(x)
    if fn == "tanh":
        return np.tanh(x)
    if fn == "hard_sigmoid":
        return np.clip(0.2 * x + 0.5, 0.0, 1.0)
    if fn == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if fn == "swish":
        return x * _sigmoid(alpha * x)
    if fn == "leakyrelu":
        return np.where(x > 0, x, alpha * x)
    if fn == "elu":
        with np.errstate(over="ignore"):
            return np.where(x >= 0, x, alpha * np.expm1(np.minimum(x, 0.0)))
    if fn == "abs":
        return np.abs(x)
    raise ValueError(f"activation function {fn!r} not recognised by lwtnn")


def _apply_layer(layer, x):
    """One lwtnn layer (dense or normalization) on rows of ``x`` (N, n_in)."""
    arch = layer["architecture"]
    w = np.asarray(layer["weights"], dtype=np.float64)
    b = np.asarray(layer["bias"], dtype=np.float64)
    if arch == "normalization":
        if w.size != x.shape[1] or b.size != x.shape[1]:
            raise ValueError(f"normalization layer has {w.size} weights / {b.size} biases for {x.shape[1]} inputs")
        return w * (x + b)
    if arch != "dense":
        raise ValueError(f"layer architecture {arch!r} is not evaluated here (dense, normalization only)")
    if "activation" not in layer:
        raise ValueError("dense layer without an activation (lwtnn refuses it)")
    if w.size:
        n_in = x.shape[1]
        if w.size % n_in:
            raise ValueError(f"dense layer: {w.size} weights not divisible by {n_in} inputs")
        x = x @ w.reshape(w.size // n_in, n_in).T
    if b.size:
        if b.size != x.shape[1]:
            raise ValueError(f"dense layer: {b.size} biases for {x.shape[1]} outputs")
        x = x + b
    return apply_activation(layer["activation"], x)


def evaluate_graph_inputs(graph, inputs, output=None):
    """Evaluate an lwtnn graph JSON (dict) on ``inputs`` = {input node name: array (N, n_vars)}.

    Returns the output node (``output`` name, or the only one) as float64 (N, n_labels).
    """
    arrays = []
    for node in graph["inputs"]:
        if node["name"] not in inputs:
            raise ValueError(f"no values given for input node {node['name']}")
        x = np.asarray(inputs[node["name"]], dtype=np.float64)
        x = np.atleast_2d(x)
        var = node["variables"]
        if x.shape[1] != len(var):
            raise ValueError(f"input {node['name']}: {x.shape[1]} columns for {len(var)} variables")
        offset = np.array([v["offset"] for v in var], dtype=np.float64)
        scale = np.array([v["scale"] for v in var], dtype=np.float64)
        arrays.append((x + offset) * scale)
    nodes, layers, cache = graph["nodes"], graph["layers"], {}

    def value(i, stack=()):
        if i in cache:
            return cache[i]
        if i in stack or not 0 <= i < len(nodes):
            raise ValueError(f"node {i}: cycle or index out of range")
        node = nodes[i]
        kind, src = node["type"], node["sources"]
        if kind == "input":
            out = arrays[src[0]]
            if out.shape[1] != node["size"]:
                raise ValueError(f"input node {i}: size {node['size']} but {out.shape[1]} variables")
        elif kind == "concatenate":
            out = np.concatenate([value(s, stack + (i,)) for s in src], axis=1)
        elif kind == "feed_forward":
            if len(src) != 1:
                raise ValueError(f"feed_forward node {i} needs one source, has {len(src)}")
            out = _apply_layer(layers[node["layer_index"]], value(src[0], stack + (i,)))
        else:
            raise ValueError(f"node {i}: type {kind!r} is not evaluated here")
        cache[i] = out
        return out

    outputs = graph["outputs"]
    name = output if output is not None else next(iter(outputs))
    out = value(outputs[name]["node_index"])
    if out.shape[1] != len(outputs[name]["labels"]):
        raise ValueError(f"output {name}: {out.shape[1]} values for {len(outputs[name]['labels'])} labels")
    return out
