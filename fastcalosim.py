"""fastcalosim.py -- assemble the input folder C++ FastCaloSim's TFCSEnergyAndHitGANV2 loads, and check one.

FastCaloSim (ATLAS ISF_FastCaloSimEvent, and the stand-alone fcs-proj FastCaloSim with the same logic) is given
one folder per particle type and |eta| slice set and reads, for particle ``pid`` and slice ``etaMin`` (|eta| x 100,
``etaMax = etaMin + 5``):

* ``binning.xml``: ``<Bins><Particle pid latentDim symmetriseAlpha><Bin etaMin etaMax regionId ganVersion>
  <Layer id r_edges n_bin_alpha/>``. The Bin used is the one with etaMin < etaMid < etaMax (etaMid =
  (etaMin + etaMax) / 2, integers); photons read Particle 22, electrons 11, every other particle 211. A layer
  with one r edge is not "relevant". ``ganVersion`` absent reads as 0, and below 2 the condition gets only
  ``variable_0``: the folder's Bins say ``ganVersion="2"``.
* the networks ``neural_net_<pid>_eta_<etaMin>_<etaMax>_<name>.{onnx,json}`` (``.onnx`` first if both exist):
  e/gamma ``High12`` (momentum p > 4096 MeV, label anchors 2^12..2^22) and ``UltraLow12`` (p <= 4096, 2^6..2^12),
  pions ``All`` (2^8..2^22), protons ``High10`` (2^10..2^22). Inputs: ``Noise`` = {variable_0 ..} ~ N(0.5, 0.5)
  and ``mycond`` = {variable_0: log(Ekin/Ekin_min)/log(Ekin_max/Ekin_min), variable_1: 0}, Ekin_min/max the
  kinetic energies of those momenta with the particle's mass. The lwtnn handler renames them node_0/node_1 and
  looks each variable up by name; the ONNX handler fills each input tensor in the std::map order of the names
  (variable_0, variable_1, variable_10, ..., variable_19, variable_2, ...). Output ``i`` (after the common
  prefix of the output names is removed) is voxel ``i`` in FastCaloSim's order: layers by increasing id, inside
  a layer r bins outer and alpha bins inner (alpha fastest; ``n_bin_alpha="32"`` means FastCaloGAN's optimised
  alpha binning, 4/8/16/32 bins per r bin); it deposits Einit x output and refuses an event whose outputs sum to
  less than 0.
* ``rootFiles/pid<pid>_E1048576_eta_<etaMin>_<etaMin+5>.root``: TH1D ``r<layer>w`` (``r<layer>`` when that
  integral is NaN) per relevant layer; an exponential is fitted inside each r bin and its slope places the hits in
  r (ganVersion > 1).
* ``rootFiles/pid<pid>_E65536_eta_<etaMin>_<etaMin+5>_validation.root``: TTree ``rootTree`` with a branch
  ``extrapWeight_<layer>`` per relevant layer; the mean of its values inside a 100-bin [0.01, 1] histogram puts
  the layer's shower centre at r = (1 - w) r_entrance + w r_exit. Both ROOT files are opened unconditionally.

calokit networks output the CaloChallenge voxel order (layers in XML order, r fastest inside a layer); the
assembly writes each network with its outputs permuted into FastCaloSim's order (the last dense layer's rows
in the JSON, a Gather at the end of the ONNX graph), so ``Einit x output[i]`` lands in the voxel FastCaloSim
thinks it is. Networks must be exported by export_lwtnn.py (their ``.meta.json`` says particle, slice, range and
label anchors); a network whose label anchors are not FastCaloSim's for its slot is refused (e.g. ``Low12``, whose
label runs over 2^8..2^12 while FastCaloSim's low network is labelled over 2^6..2^12).

ROOT files (written with uproot, an optional dependency), from hits files (``preprocess.py toy`` or the hits
HDF5 layout) of the slice at p = 2^20 MeV (1 TeV) and 2^16 MeV (65 GeV):

* ``r<layer>w``: the hits' energy-weighted distance r (mm) from the shower axis, measured as voxelisation
  does (deta, dphi at the layer's extrapolated position, converted to mm); ``r<layer>``: the hit count.
  Binning: each voxel r bin of the layer split into 10 equal sub-bins (variable-width TH1D whose edges contain
  every voxel r edge; hits beyond the last edge go to the overflow). FastCaloSim fits each r bin after
  ``SetRangeUser(low, up)`` of that bin: with aligned edges the fit sees exactly that bin's 10 points and none
  of its neighbours' (8 degrees of freedom for the 2-parameter exponential), and the narrowest bins of the
  dataset-1 binning (2 mm) still get 0.2 mm sub-bins, filled at 1 TeV by hundreds of hits each.
* ``extrapWeight_<layer>`` per event: w = (r_E - r_entrance) / (r_exit - r_entrance), r_E the energy-weighted
  mean cylindrical radius of the event's hits in the layer, so that (1 - w) r_entrance + w r_exit is the
  shower's energy centre in depth (FastCaloSim's own use of the weight). The toy's layers have known
  boundaries: entrance and exit are toyshower.LAYER_RADII (e.g. layer 2 1590..1930 mm). An event without
  energy in the layer gets NaN (outside FastCaloSim's [0.01, 1] histogram, so not counted). Hits files of
  other origin carry no layer boundaries: the validation file is then not written, and the script says so.

Missing inputs (no hits at 1 TeV or 65 GeV, e.g. CaloChallenge files, which hold voxels only; a slice without
one of the networks FastCaloSim loads for it) are reported on stderr, one line each; everything that can be
written is written, never a made-up file.

``--check-folder DIR`` reads a folder the way FastCaloSim does and exits 2 with one line naming the first
missing or wrong item: the XML with FastCaloSim's rules; for every Bin and particle, every file LoadGAN opens;
the histograms and branches; the per-r-bin exponential fits (chi2, as ROOT's "expo" fit) finite; every network
(ONNX through ONNX Runtime with FastCaloSim's input maps and std::map order, lwtnn JSON through calokit's numpy
lwtnn evaluator with the node_0/node_1 renaming) run at each energy point 2^k MeV FastCaloSim routes to it:
outputs "0".."N-1" for the N voxels of the XML, finite, ONNX = JSON (given the noise in the order each handler
fills it) and the sum of Einit x output against E_kin. It prints a one-line summary (and ``--json FILE``).

Usage
-----
    python fastcalosim.py --out results/demo/fastcalosim \\
        --networks results/demo/photon_0.20/UltraLow12/lwtnn results/demo/photon_0.20/High12/lwtnn \\
        --hits work/demo/photon_0.20/hits
    python fastcalosim.py --check-folder results/demo/fastcalosim --json results/demo/fastcalosim-check.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np

from HighLevelFeatures import eta_to_mm, read_geometry, wrap_phi
from plumbing import (HelpFormatter, UserError, atomic_directory, atomic_output, ensure_dir, evaluate_graph_inputs,
                      particle_mass, run_cli, write_json, write_text)

# ----------------------------------------------------------------------------------------------
# configuration and FastCaloSim facts

DEFAULTS = {"sub_bins": 10, "check_events": 20, "seed": 1, "tolerance": 1e-5}
E_SHAPE, E_EXTRAP = 2 ** 20, 2 ** 16        # MeV: the hits of the r histograms (1 TeV) and of extrapWeight (65 GeV)
GAN_VERSION = 2
ONNX_INPUT_NAMES = ("Noise", "mycond")    # the keys of the map TFCSEnergyAndHitGANV2 fills (ONNX: looked up as is)
LWTNN_RENAMED = {"Noise": "node_0", "mycond": "node_1"}   # TFCSGANLWTNNHandler's renaming
PARTICLE_OF_PID = {22: "photon", 11: "electron", 211: "pion", 2212: "proton"}
#: FastCaloSim's networks per pid: (name, min exponent, max exponent of the label's momenta, exponents of the
#: momenta 2^k FastCaloSim routes to it)
FCS_NETWORKS = {
    22: (("High12", 12, 22, range(13, 23)), ("UltraLow12", 6, 12, range(6, 13))),
    11: (("High12", 12, 22, range(13, 23)), ("UltraLow12", 6, 12, range(6, 13))),
    211: (("All", 8, 22, range(8, 23)),),
    2212: (("High10", 10, 22, range(10, 23)),),
}
NET_RE = re.compile(r"^neural_net_(\d+)_eta_(\d+)_(\d+)_([A-Za-z0-9]+)\.(json|onnx)$")


def xml_pid(pid):
    """The Particle of binning.xml FastCaloSim reads for ``pid``: 22 and 11 their own, every other one 211."""
    return pid if pid in (22, 11) else 211


def net_stem(pid, eta_min, name):
    return f"neural_net_{pid}_eta_{eta_min}_{eta_min + 5}_{name}"


def root_names(pid, eta_min):
    """(r histogram file, validation file) names under rootFiles/ for a slice."""
    tag = f"eta_{eta_min}_{eta_min + 5}"
    return f"pid{pid}_E{E_SHAPE}_{tag}.root", f"pid{pid}_E{E_EXTRAP}_{tag}_validation.root"


def relevant(layers):
    """FastCaloSim's relevant layers: more than one r edge."""
    return [lay for lay in layers if len(lay["edges"]) > 1]


def fcs_label(pid, p, min_exp, max_exp):
    """FastCaloSim's condition label of momentum ``p`` for a network with label anchors 2^min_exp, 2^max_exp."""
    m = particle_mass(PARTICLE_OF_PID[pid])
    e = np.sqrt(np.square(p) + m * m) - m
    lo, hi = (math.sqrt(float(2 ** k) ** 2 + m * m) - m for k in (min_exp, max_exp))
    return np.log(e / lo) / math.log(hi / lo), e


def _progress(msg):
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# voxel order: calokit (CaloChallenge) -> FastCaloSim

def fcs_alpha_bins(edges, n_alpha, symmetrise):
    """Alpha bins per r bin as FastCaloSim counts them (GetAlphaBinsForRBin): ``n_alpha`` in every r bin, except
    n_alpha = 32, FastCaloGAN's optimised binning: 4, 8, 16 or 32 by the circumference at the bin centre (pi r if
    symmetrised, else 2 pi r) over the bin width (< 4, < 8, < 16, else)."""
    edges = np.asarray(edges, dtype=np.float64)
    if n_alpha != 32:
        return [int(n_alpha)] * (edges.size - 1)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        n = (math.pi if symmetrise else 2 * math.pi) * 0.5 * (a + b) / (b - a)
        out.append(4 if n < 4 else 8 if n < 8 else 16 if n < 16 else 32)
    return out


def voxel_permutation(geom):
    """perm with FastCaloSim voxel j = calokit voxel perm[j]: layers by increasing id, r outer, alpha inner."""
    perm = []
    for lay in sorted(geom.layers, key=lambda lay: lay.id):
        if not lay.n_voxels:
            continue
        if lay.n_r == 1:
            raise UserError(f"{geom.filename}: layer {lay.id} has one r bin; FastCaloSim counts it relevant but skips "
                            "its voxels in fillEnergy, so every later voxel would be read one layer off")
        fcs = fcs_alpha_bins(lay.r_edges, lay.n_alpha, geom.symmetrise_alpha)
        if [int(n) for n in lay.alpha_per_r] != fcs:
            raise UserError(f"{geom.filename}: layer {lay.id} has {lay.alpha_per_r.tolist()} alpha bins per r bin, "
                            f"FastCaloSim reads {fcs} (n_bin_alpha 32 means its optimised binning, no merged first "
                            "r bin)")
        start = geom.offsets[lay.id][0]
        for ir, n in enumerate(fcs):
            perm.extend(start + lay.index_of(np.full(n, ir), np.arange(n)))
    return np.asarray(perm, dtype=np.int64)


def permute_graph(graph, perm):
    """A copy of an lwtnn graph JSON whose output i is the input graph's output perm[i].

    Walks back from the output node through element-wise layers (activation-only dense, normalization), whose
    parameters are permuted, to the first dense layer with weights, whose rows are permuted.
    """
    graph = json.loads(json.dumps(graph))
    out = next(iter(graph["outputs"].values()))
    if len(out["labels"]) != perm.size:
        raise UserError(f"lwtnn graph has {len(out['labels'])} outputs, the binning {perm.size} voxels")
    node = graph["nodes"][out["node_index"]]
    while True:
        if node["type"] != "feed_forward":
            raise UserError(f"lwtnn graph: cannot reorder the outputs through a '{node['type']}' node")
        layer = graph["layers"][node["layer_index"]]
        w, b = np.asarray(layer["weights"], float), np.asarray(layer["bias"], float)
        if layer["architecture"] == "normalization":
            layer["weights"], layer["bias"] = w[perm].tolist(), b[perm].tolist()
        elif layer["architecture"] == "dense" and w.size == 0 and b.size == 0:
            pass                                         # an activation alone: element-wise (softmax: equivariant)
        elif layer["architecture"] == "dense":
            n_out = b.size if b.size else w.size // perm.size
            layer["weights"] = w.reshape(n_out, -1)[perm].ravel().tolist()
            if b.size:
                layer["bias"] = b[perm].tolist()
            return graph
        else:
            raise UserError(f"lwtnn graph: cannot reorder the outputs of a '{layer['architecture']}' layer")
        node = graph["nodes"][node["sources"][0]]


def permute_onnx(data, perm):
    """ONNX model bytes whose output is the input model's output gathered at ``perm`` along axis 1 (same name)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    if len(graph.output) != 1:
        raise UserError(f"ONNX model has {len(graph.output)} outputs; FastCaloSim's GAN reads one")
    name = graph.output[0].name
    inner = name + "_calokit_order"
    for node in graph.node:
        node.output[:] = [inner if o == name else o for o in node.output]
        node.input[:] = [inner if i == name else i for i in node.input]
    graph.initializer.append(numpy_helper.from_array(perm.astype(np.int64), name + "_fastcalosim_order"))
    graph.node.append(helper.make_node("Gather", [inner, name + "_fastcalosim_order"], [name], axis=1,
                                       name="fastcalosim_voxel_order"))
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


# ----------------------------------------------------------------------------------------------
# assembly: networks

def read_exports(dirs):
    """Every exported network (meta JSON + its files) in the export directories."""
    found = []
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(f"{d}: export directory not found")
        metas = sorted(f for f in os.listdir(d) if f.startswith("neural_net_") and f.endswith(".meta.json"))
        if not metas:
            raise UserError(f"{d}: no neural_net_*.meta.json (an export_lwtnn.py output directory?)")
        for m in metas:
            path = os.path.join(d, m)
            try:
                with open(path) as fh:
                    meta = json.load(fh)
            except (OSError, ValueError) as err:
                raise UserError(f"{path}: unreadable ({err})") from None
            files = {k: os.path.join(d, v) for k, v in meta.get("files", {}).items() if os.path.isfile(os.path.join(d, v))}
            found.append({"meta": meta, "path": path, "files": files})
    return found


def fcs_slot(meta, path):
    """The FastCaloSim network name this export fills, from its particle and label anchors; UserError if none."""
    pid = int(meta["pid"])
    if pid not in FCS_NETWORKS:
        raise UserError(f"{path}: pid {pid} has no FastCaloSim GAN (photons 22, electrons 11, pions 211, protons 2212)")
    if str(meta.get("label_scheme", "V2")) not in ("V2", "LogE"):
        raise UserError(f"{path}: label scheme {meta.get('label_scheme')}; FastCaloSim feeds "
                        "log(Ekin/Ekin_min)/log(Ekin_max/Ekin_min) (V2)")
    for name, lo, hi, _ in FCS_NETWORKS[pid]:
        if np.isclose(float(meta["p_min"]), 2.0 ** lo) and np.isclose(float(meta["p_max"]), 2.0 ** hi):
            return name
    wanted = ", ".join(f"{n} (2^{lo}..2^{hi} MeV)" for n, lo, hi, _ in FCS_NETWORKS[pid])
    raise UserError(f"{path}: range '{meta.get('range')}' has label anchors p {float(meta['p_min']):g}.."
                    f"{float(meta['p_max']):g} MeV; FastCaloSim labels pid {pid} networks as {wanted}")


def slice_of_meta(meta, path, eta):
    """(etaMin, etaMax) of the export's slice (|eta| x 100); ``eta`` (lower edge) for a non-0.05 slice."""
    lo, hi = float(meta["eta_min"]), float(meta["eta_max"])
    if abs(hi - lo - 5) < 1e-6 and abs(lo - round(lo)) < 1e-6:
        return int(round(lo)), int(round(hi))
    if eta is None:
        raise UserError(f"{path}: slice |eta| {lo / 100:g}..{hi / 100:g} is not a 0.05 FastCaloSim slice; pass "
                        "--eta (its lower edge, e.g. 0.20 for CaloChallenge dataset 1)")
    e = int(round(eta * 100))
    if e % 5 or not lo <= e < hi:
        raise UserError(f"--eta {eta}: not a 0.05 slice edge inside |eta| {lo / 100:g}..{hi / 100:g} of {path}")
    return e, e + 5


def geometry_of(meta, path):
    binning = meta.get("binning")
    if not binning or not os.path.isfile(binning):
        raise UserError(f"{path}: its binning file {binning!r} is not found (run from the directory it was "
                        "exported in)")
    eta = 0.5 * (float(meta["eta_min"]) + float(meta["eta_max"])) / 100
    geom = read_geometry(binning, meta["particle"], eta)
    if geom.n_voxels != int(meta["n_voxels"]):
        raise UserError(f"{path}: {binning} slice has {geom.n_voxels} voxels, the network {meta['n_voxels']}")
    return geom


def collect(exports, eta):
    """{(pid, etaMin): {"geom", "latent", "nets": {name: export}}}; UserError on clashes."""
    slices = {}
    for ex in exports:
        meta, path = ex["meta"], ex["path"]
        name = fcs_slot(meta, path)
        pid = int(meta["pid"])
        lo, hi = slice_of_meta(meta, path, eta)
        geom = geometry_of(meta, path)
        s = slices.setdefault((pid, lo), {"geom": geom, "latent": int(meta["latent_dim"]), "nets": {},
                                          "particle": meta["particle"]})
        if name in s["nets"]:
            raise UserError(f"{path}: a second {name} network for pid {pid} |eta| {lo}..{hi} "
                            f"(first: {s['nets'][name]['path']})")
        if geom.n_voxels != s["geom"].n_voxels or int(meta["latent_dim"]) != s["latent"]:
            raise UserError(f"{path}: voxels or latent size differ from the other network of pid {pid} slice {lo}")
        s["nets"][name] = ex
    return slices


def write_networks(folder, slices):
    """Permuted copies of every network under FastCaloSim's names; returns warnings for missing ones."""
    warnings = []
    for (pid, lo), s in sorted(slices.items()):
        perm = voxel_permutation(s["geom"])
        for name, *_ in FCS_NETWORKS[pid]:
            ex = s["nets"].get(name)
            stem = net_stem(pid, lo, name)
            if ex is None:
                warnings.append(f"{stem}.*: no {name} network given for pid {pid} |eta| {lo / 100:.2f}; "
                                "FastCaloSim's LoadGAN would fail for this slice")
                continue
            if "json" in ex["files"]:
                with open(ex["files"]["json"]) as fh:
                    graph = json.load(fh)
                write_text(os.path.join(folder, stem + ".json"), json.dumps(permute_graph(graph, perm)) + "\n")
            if "onnx" in ex["files"]:
                with open(ex["files"]["onnx"], "rb") as fh:
                    data = permute_onnx(fh.read(), perm)
                with atomic_output(os.path.join(folder, stem + ".onnx")) as tmp, open(tmp, "wb") as fh:
                    fh.write(data)
            for fmt in ("json", "onnx"):
                if fmt not in ex["files"]:
                    warnings.append(f"{stem}.{fmt}: not exported ({ex['path']} lists no {fmt} file)")
    return warnings


# ----------------------------------------------------------------------------------------------
# assembly: binning.xml

def _num(x):
    return str(int(x)) if float(x) == int(x) else repr(float(x))


def binning_xml(slices):
    """binning.xml text: one Particle per XML pid, one Bin (ganVersion 2) per slice, layers by id."""
    by_xml = {}
    for (pid, lo), s in sorted(slices.items()):
        by_xml.setdefault(xml_pid(pid), []).append((pid, lo, s))
    lines = ['<?xml version="1.0"?>',
             "<!-- calokit: the FastCaloSim GAN input binning (TFCSGANXMLParameters): one Bin per |eta| slice "
             "(etaMin/etaMax = |eta| x 100), ganVersion 2, layers by id; voxel order of the networks = layers by id, "
             "r bins outer, alpha bins inner -->", "<Bins>"]
    for xpid, entries in sorted(by_xml.items()):
        geoms = {}
        for pid, lo, s in entries:        # protons read the pions' Particle: one binning per slice for both
            if lo in geoms and layer_dicts(geoms[lo]) != layer_dicts(s["geom"]):
                raise UserError(f"Particle {xpid} |eta| {lo / 100:.2f}: pid {pid} has another binning than the "
                                "particle sharing its binning.xml entry")
            geoms.setdefault(lo, s["geom"])
        sym = {g.symmetrise_alpha for g in geoms.values()}
        latent = {s["latent"] for *_, s in entries}
        if len(sym) > 1 or len(latent) > 1:
            raise UserError(f"Particle {xpid}: the slices differ in symmetriseAlpha or latentDim, which "
                            "FastCaloSim reads once per particle")
        name = PARTICLE_OF_PID.get(xpid, "pion")
        lines.append(f'  <Particle pid="{xpid}" name="{name}" latentDim="{latent.pop()}" '
                     f'symmetriseAlpha="{"true" if sym.pop() else "false"}">')
        for lo in sorted(geoms):
            g = geoms[lo]
            region = g.region_id if g.region_id is not None and g.eta_max - g.eta_min == 5 else lo // 5
            lines.append(f'    <Bin etaMin="{lo}" etaMax="{lo + 5}" regionId="{region}" ganVersion="{GAN_VERSION}">')
            for lay in sorted(g.layers, key=lambda lay: lay.id):
                edges = ",".join(_num(e) for e in lay.r_edges) if lay.n_r else "0"
                lines.append(f'      <Layer id="{lay.id}" r_edges="{edges}" n_bin_alpha="{lay.n_alpha if lay.n_r else 1}"/>')
            lines.append("    </Bin>")
        lines.append("  </Particle>")
    lines.append("</Bins>")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# assembly: ROOT files from hits

def find_hits(dirs, particle, energy, eta_min):
    """The hits file of (particle, momentum, slice) among ``dirs`` (by its attributes), or None."""
    import h5py

    for d in dirs:
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            if not (f.startswith("hits_") and f.endswith(".h5")):
                continue
            path = os.path.join(d, f)
            try:
                with h5py.File(path, "r") as h:
                    a = h.attrs
                    if (str(a.get("particle", "")) == particle and np.isclose(float(a.get("energy", -1)), energy)
                            and int(round(float(a.get("eta_min", -1)))) == eta_min):
                        return path
            except OSError:
                continue
    return None


def read_hits(path):
    """Hits columns, the per-event extrapolation and the file's attributes."""
    import h5py

    with h5py.File(path, "r") as h:
        cols = {k: np.asarray(h[k][:]) for k in ("event", "layer", "eta", "phi", "r", "energy")}
        ext = {k: np.asarray(h["extrap_" + k][:], dtype=np.float64) for k in ("eta", "phi", "r", "z")}
        attrs = dict(h.attrs)
        n_events = int(h["truth_p"].shape[0])
    return cols, ext, attrs, n_events


def hit_distance(cols, ext):
    """Distance (mm) of each hit from the shower axis in its layer, as voxelisation measures it."""
    ev, lay = cols["event"].astype(np.int64), cols["layer"].astype(np.int64)
    e_eta, e_phi, e_r, e_z = (ext[k][ev, lay] for k in ("eta", "phi", "r", "z"))
    deta_mm = (cols["eta"] - e_eta) * eta_to_mm(e_eta, e_r, e_z)
    dphi_mm = wrap_phi(cols["phi"] - e_phi) * e_r
    return np.hypot(deta_mm, dphi_mm)


def sub_binned_edges(r_edges, sub_bins):
    """Histogram edges: each voxel r bin split into ``sub_bins`` equal parts (every voxel edge is an edge)."""
    parts = [np.linspace(a, b, sub_bins + 1)[:-1] for a, b in zip(r_edges[:-1], r_edges[1:])]
    return np.concatenate(parts + [r_edges[-1:]])


def r_histograms(cols, ext, layers, sub_bins):
    """{layer: (edges, sum w, sum w^2, counts)} with under/overflow (n + 2 entries), w = hit energy (MeV)."""
    dist = hit_distance(cols, ext)
    out = {}
    for lay in layers:
        edges = sub_binned_edges(np.asarray(lay["edges"], float), sub_bins)
        m = cols["layer"] == lay["id"]
        idx = np.searchsorted(edges, dist[m], side="right")         # 0 underflow .. n+1 overflow
        n = edges.size + 1
        w = cols["energy"][m].astype(np.float64)
        out[lay["id"]] = (edges, np.bincount(idx, w, n), np.bincount(idx, w * w, n),
                          np.bincount(idx, minlength=n).astype(np.float64), dist[m], w)
    return out


def extrap_weights(cols, n_events, layers, boundaries):
    """{layer: per-event w = (r_E - r_entrance)/(r_exit - r_entrance)}, NaN for events without energy there."""
    out = {}
    for lay in layers:
        r_in, r_out = boundaries[lay["id"]]
        m = cols["layer"] == lay["id"]
        ev, e = cols["event"][m].astype(np.int64), cols["energy"][m].astype(np.float64)
        se = np.bincount(ev, e, n_events)
        ser = np.bincount(ev, e * cols["r"][m].astype(np.float64), n_events)
        with np.errstate(invalid="ignore", divide="ignore"):
            r_mean = np.where(se > 0, ser / se, np.nan)
        out[lay["id"]] = ((r_mean - r_in) / (r_out - r_in)).astype(np.float32)
    return out


def _th1d(uproot, name, title, edges, sumw, sumw2, entries, values=None):
    """A TH1D (variable bins) for uproot; statistics from the in-range contents (or the filled ``values``)."""
    centres = 0.5 * (edges[:-1] + edges[1:])
    inner, inner2 = sumw[1:-1], sumw2[1:-1]
    if values is not None:
        x, w = values
        inside = (x >= edges[0]) & (x < edges[-1])
        tsumwx, tsumwx2 = float(np.sum(w[inside] * x[inside])), float(np.sum(w[inside] * x[inside] ** 2))
    else:
        tsumwx, tsumwx2 = float(np.sum(inner * centres)), float(np.sum(inner * centres ** 2))
    axis = uproot.writing.identify.to_TAxis("xaxis", "r [mm]", edges.size - 1, float(edges[0]), float(edges[-1]),
                                           fXbins=edges.astype(np.float64))
    return uproot.writing.identify.to_TH1x(name, title, sumw.astype(np.float64), float(entries), float(inner.sum()),
                                           float(inner2.sum()), tsumwx, tsumwx2, sumw2.astype(np.float64), axis)


def _uproot():
    try:
        import uproot
    except ImportError:
        raise UserError("writing and reading rootFiles/ needs uproot (pip install uproot, pinned in "
                        "requirements.txt)") from None
    return uproot


def write_shape_file(path, cols, ext, layers, sub_bins, source):
    uproot = _uproot()
    hists = r_histograms(cols, ext, layers, sub_bins)
    with atomic_output(path) as tmp, uproot.recreate(tmp) as f:
        for lid, (edges, sumw, sumw2, counts, dist, w) in hists.items():
            f[f"r{lid}w"] = _th1d(uproot, f"r{lid}w", f"layer {lid}: hit energy [MeV] vs distance from the axis "
                                  f"[mm] ({source})", edges, sumw, sumw2, w.size, (dist, w))
            f[f"r{lid}"] = _th1d(uproot, f"r{lid}", f"layer {lid}: hits vs distance from the axis [mm] ({source})",
                                 edges, counts, counts, w.size, (dist, np.ones_like(w)))
    return hists


def write_validation_file(path, weights):
    uproot = _uproot()
    with atomic_output(path) as tmp, uproot.recreate(tmp) as f:
        f["rootTree"] = {f"extrapWeight_{lid}": w for lid, w in weights.items()}


def layer_dicts(geom):
    return [{"id": lay.id, "edges": lay.r_edges.tolist() if lay.n_r else [0.0], "n_alpha": lay.n_alpha}
            for lay in sorted(geom.layers, key=lambda lay: lay.id)]


def write_root_files(folder, slices, hit_dirs, sub_bins):
    """Both ROOT files per slice (pid) from its 1 TeV and 65 GeV hits; returns warnings for what is missing."""
    import toyshower

    warnings = []
    root_dir = ensure_dir(os.path.join(folder, "rootFiles"))
    for (pid, lo), s in sorted(slices.items()):
        layers = relevant(layer_dicts(s["geom"]))
        shape_name, valid_name = root_names(pid, lo)
        for energy, name in ((E_SHAPE, shape_name), (E_EXTRAP, valid_name)):
            path = find_hits(hit_dirs, s["particle"], energy, lo)
            if path is None:
                warnings.append(f"rootFiles/{name}: not written: no {s['particle']} hits at p = {energy} MeV, "
                                f"|eta| {lo / 100:.2f} in {' '.join(hit_dirs) or '(no --hits given)'}"
                                f"{' (CaloChallenge files hold voxels, not hits)' if not hit_dirs else ''}")
                continue
            cols, ext, attrs, n_events = read_hits(path)
            if energy == E_SHAPE:
                write_shape_file(os.path.join(root_dir, name), cols, ext, layers, sub_bins, os.path.basename(path))
                continue
            if str(attrs.get("generator", "")) != toyshower.GENERATOR:
                warnings.append(f"rootFiles/{name}: not written: {path} has no layer entrance/exit radii to "
                                "define extrapWeight from (only the toy's layer boundaries are known)")
                continue
            missing = [lay["id"] for lay in layers if lay["id"] not in toyshower.LAYER_RADII]
            if missing:
                warnings.append(f"rootFiles/{name}: not written: the toy has no layer {missing[0]}")
                continue
            write_validation_file(os.path.join(root_dir, name),
                                  extrap_weights(cols, n_events, layers, toyshower.LAYER_RADII))
    return warnings


def assemble(args):
    exports = read_exports(args.networks)
    slices = collect(exports, args.eta)
    ensure_dir(os.path.dirname(os.path.abspath(args.out)))
    with atomic_directory(args.out) as tmp:
        write_text(os.path.join(tmp, "binning.xml"), binning_xml(slices))
        warnings = write_networks(tmp, slices)
        warnings += write_root_files(tmp, slices, args.hits or [], args.sub_bins)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    n_files = sum(len(fs) for _, _, fs in os.walk(args.out))
    print(f"fastcalosim: wrote {args.out} ({len(slices)} slice(s): "
          f"{', '.join(f'pid {p} |eta| {lo / 100:.2f}' for p, lo in sorted(slices))}; {n_files} files"
          f"{f'; {len(warnings)} missing item(s), see the warnings' if warnings else ''})")
    return 0


# ----------------------------------------------------------------------------------------------
# the folder check: what FastCaloSim would do with it

class FolderError(UserError):
    """The first missing or wrong item of a FastCaloSim folder."""


def _stoi(text, where):
    """std::stoi of an attribute as FastCaloSim's getXmlAttrInt: empty -> 0, leading integer, else it throws."""
    if text is None or text == "":
        return 0
    m = re.match(r"^\s*([+-]?\d+)", text)
    if not m:
        raise FolderError(f"{where}: '{text}' is not an integer (std::stoi throws)")
    return int(m.group(1))


def parse_binning(path):
    """binning.xml as FastCaloSim reads it: {xml pid: {"latent", "symmetrise", "bins": [...]}}."""
    if not os.path.isfile(path):
        raise FolderError(f"{path}: missing (FastCaloSim reads <folder>/binning.xml)")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise FolderError(f"{path}: not parseable XML ({err})") from None
    if root.tag != "Bins":
        raise FolderError(f"{path}: root element <{root.tag}>, FastCaloSim reads <Bins>")
    particles = {}
    for part in root.findall("Particle"):
        pid = _stoi(part.get("pid"), f"{path}: Particle pid")
        where = f"{path}: Particle {pid}"
        bins = []
        for b in part.findall("Bin"):
            lo, hi = _stoi(b.get("etaMin"), f"{where} Bin etaMin"), _stoi(b.get("etaMax"), f"{where} Bin etaMax")
            bw = f"{where} Bin {lo}..{hi}"
            layers = []
            for lay in b.findall("Layer"):
                try:
                    edges = [float(t) for t in (lay.get("r_edges") or "").split(",") if t != ""]
                except ValueError:
                    raise FolderError(f"{bw}: Layer {lay.get('id')} r_edges '{lay.get('r_edges')}' (std::stod throws)") from None
                layers.append({"id": _stoi(lay.get("id"), f"{bw} Layer id"), "edges": edges,
                               "n_alpha": _stoi(lay.get("n_bin_alpha"), f"{bw} Layer n_bin_alpha")})
            bins.append({"etaMin": lo, "etaMax": hi, "regionId": _stoi(b.get("regionId"), f"{bw} regionId"),
                         "ganVersion": _stoi(b.get("ganVersion"), f"{bw} ganVersion"), "layers": layers})
        particles[pid] = {"latent": _stoi(part.get("latentDim"), f"{where} latentDim"),
                          "symmetrise": part.get("symmetriseAlpha") == "true", "bins": bins}
    return particles


def check_bin(path, xpid, info, b):
    """FastCaloSim's view of one Bin: the Bin etaMid selects, the relevant layers, the voxel count."""
    lo = b["etaMin"]
    where = f"{path}: Particle {xpid} Bin etaMin={lo} etaMax={b['etaMax']}"
    if b["etaMax"] != lo + 5:
        raise FolderError(f"{where}: FastCaloSim's slices are 0.05 wide (it opens files for etaMin..etaMin+5)")
    mid = (lo + lo + 5) // 2
    chosen = [c for c in info["bins"] if c["etaMin"] < mid < c["etaMax"]]
    if len(chosen) != 1:
        raise FolderError(f"{where}: etaMid {mid} lies inside {len(chosen)} Bins; FastCaloSim needs exactly one")
    if b["ganVersion"] < 2:
        raise FolderError(f"{where}: ganVersion {b['ganVersion'] or 'absent (read as 0)'}; below 2 FastCaloSim fills "
                          "only variable_0 of mycond and loads one network for every momentum")
    if info["latent"] < 1:
        raise FolderError(f"{path}: Particle {xpid}: latentDim {info['latent']} (absent reads as 0)")
    ids = [lay["id"] for lay in b["layers"]]
    if len(set(ids)) != len(ids):
        raise FolderError(f"{where}: a layer id appears twice")
    layers = sorted(b["layers"], key=lambda lay: lay["id"])        # std::map<int, TH2D>: by id
    n_vox = 0
    for lay in relevant(layers):
        e = lay["edges"]
        if any(b2 <= a for a, b2 in zip(e, e[1:])) or lay["n_alpha"] < 1:
            raise FolderError(f"{where}: Layer {lay['id']}: r_edges not increasing or n_bin_alpha < 1")
        if len(e) == 2:
            raise FolderError(f"{where}: Layer {lay['id']} has one r bin: FastCaloSim counts it relevant but skips "
                              "its voxels in fillEnergy")
        n_vox += sum(fcs_alpha_bins(e, lay["n_alpha"], info["symmetrise"]))
    return layers, n_vox


def expo_slope(x, y, err):
    """Slope of a chi2 fit of exp(p0 + p1 x) to the non-empty points (ROOT's "expo"); 0 when it cannot fit."""
    from scipy.optimize import least_squares

    m = (y > 0) & (err > 0)
    if m.sum() < 2 or y.sum() <= 0:
        return 0.0
    x, y, err = x[m], y[m], err[m]
    sw = y / err                                          # weights of the log-linear start values
    a = np.stack([np.ones_like(x), x - x[0]], axis=1) * sw[:, None]
    p = np.linalg.lstsq(a, np.log(y) * sw, rcond=None)[0]
    fit = least_squares(lambda q: (y - np.exp(q[0] + q[1] * (x - x[0]))) / err, p, method="lm")
    return float(fit.x[1]) if np.all(np.isfinite(fit.x)) else math.nan


def open_root_file(path):
    """One of the ROOT files LoadGAN opens, open for reading with uproot (FolderError when it is missing)."""
    uproot = _uproot()
    if not os.path.isfile(path):
        raise FolderError(f"{path}: missing (LoadGAN opens it unconditionally)")
    return uproot.open(path)


def root_keys(f):
    """The object names of an open ROOT file, without their ;cycle."""
    return {k.split(";")[0] for k in f.keys()}


def check_shape_file(path, layers):
    """Every relevant layer's r<l>w (or r<l>) present; the fit in every r bin finite. Returns the slopes."""
    slopes = {}
    with open_root_file(path) as f:
        keys = root_keys(f)
        for lay in relevant(layers):
            name = f"r{lay['id']}w"
            if name not in keys:
                raise FolderError(f"{path}: no histogram {name} (FastCaloSim fits it for layer {lay['id']})")
            h = f[name]
            if math.isnan(float(np.sum(h.values()))):
                name = f"r{lay['id']}"
                if name not in keys:
                    raise FolderError(f"{path}: r{lay['id']}w integral is NaN and there is no {name}")
                h = f[name]
            edges, values, var = h.axis().edges(), h.values(), h.variances()
            if h.values().size <= 2:
                raise FolderError(f"{path}: {name} has {h.values().size} bins; FastCaloSim fits only above 2")
            centres = 0.5 * (edges[:-1] + edges[1:])
            res = []
            for a, b in zip(lay["edges"][:-1], lay["edges"][1:]):
                sel = (centres > a) & (centres < b)
                res.append(expo_slope(centres[sel], values[sel], np.sqrt(np.maximum(var[sel], 0))))
            if not all(math.isfinite(r) for r in res):
                raise FolderError(f"{path}: {name}: the exponential fit of an r bin is not finite ({res})")
            slopes[lay["id"]] = res
    return slopes


def check_validation_file(path, layers):
    """rootTree with extrapWeight_<l> per relevant layer; FastCaloSim's weight = mean inside [0.01, 1]."""
    weights = {}
    with open_root_file(path) as f:
        if "rootTree" not in root_keys(f):
            raise FolderError(f"{path}: no TTree rootTree")
        tree = f["rootTree"]
        for lay in relevant(layers):
            name = f"extrapWeight_{lay['id']}"
            if name not in tree.keys():
                raise FolderError(f"{path}: rootTree has no branch {name}")
            w = np.asarray(tree[name].array(library="np"), dtype=np.float64)
            inside = w[(w >= 0.01) & (w < 1.0)]
            if inside.size == 0:
                raise FolderError(f"{path}: {name} has no value inside FastCaloSim's [0.01, 1] histogram (its mean "
                                  "would put the layer centre at the entrance)")
            weights[lay["id"]] = float(inside.mean())
    return weights


def remove_prefix(names):
    """VNetworkBase::removePrefixes: drop the characters common to the start of every name."""
    first, n = names[0], len(names[0])
    for s in names:
        for i in range(n):
            if i >= len(s) or s[i] != first[i]:
                n = i
                break
    return [s[n:] for s in names]


def fcs_inputs(noise, label):
    """The maps TFCSEnergyAndHitGANV2 fills (ganVersion >= 2): Noise {variable_i}, mycond {variable_0, _1}."""
    return {"Noise": {f"variable_{i}": float(v) for i, v in enumerate(noise)},
            "mycond": {"variable_0": float(label), "variable_1": 0.0}}


class OnnxNet:
    """An .onnx file run as TFCSONNXHandler does: inputs by name from the map, values in the map's key order."""

    def __init__(self, path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as err:                            # noqa: BLE001  (any ONNX Runtime load failure)
            raise FolderError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0][:200]})") from None
        self.path = path
        self.inputs = []
        types = set()
        for i in self.sess.get_inputs():
            dims = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
            self.inputs.append((i.name, dims, int(np.prod(dims))))
            types.add(i.type)
        if not types <= {"tensor(float)"} and not types <= {"tensor(double)"}:
            raise FolderError(f"{path}: input element types {sorted(types)}; the handler needs all float or all double")
        self.dtype = np.float64 if types == {"tensor(double)"} else np.float32
        outs = self.sess.get_outputs()
        self.out_names = [o.name for o in outs]
        sizes = [int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in o.shape])) for o in outs]
        self.labels = remove_prefix([f"{o}_{i}" for o, n in zip(self.out_names, sizes) for i in range(n)])

    def compute(self, inputs):
        feed = {}
        for name, dims, n in self.inputs:
            if name not in inputs:
                raise FolderError(f"{self.path}: ONNX input '{name}' is not one FastCaloSim fills "
                                  f"({', '.join(ONNX_INPUT_NAMES)}); TFCSONNXHandler's inputs.at() throws")
            values = [inputs[name][k] for k in sorted(inputs[name])]     # std::map<std::string, double> order
            if len(values) != n:
                raise FolderError(f"{self.path}: input '{name}' holds {n} values, FastCaloSim fills {len(values)}")
            feed[name] = np.asarray(values, dtype=self.dtype).reshape(dims)
        outs = self.sess.run(self.out_names, feed)
        flat = np.concatenate([np.asarray(o, dtype=np.float64).ravel() for o in outs])
        return dict(zip(self.labels, flat))


class LwtnnNet:
    """A graph .json run as TFCSGANLWTNNHandler does (Noise -> node_0, mycond -> node_1, variables by name)."""

    def __init__(self, path):
        try:
            with open(path) as fh:
                self.graph = json.load(fh)
        except (OSError, ValueError) as err:
            raise FolderError(f"{path}: not a readable lwtnn graph JSON ({err})") from None
        self.path = path
        name, out = next(iter(self.graph["outputs"].items()))
        self.labels = remove_prefix([f"{name}_{lab}" for lab in out["labels"]])

    def compute(self, inputs):
        renamed = {LWTNN_RENAMED.get(k, k): v for k, v in inputs.items()}
        arrays = {}
        for node in self.graph["inputs"]:
            if node["name"] not in renamed:
                raise FolderError(f"{self.path}: lwtnn input node '{node['name']}' is not filled by FastCaloSim "
                                  "(Noise -> node_0, mycond -> node_1)")
            try:
                arrays[node["name"]] = [[renamed[node["name"]][v["name"]] for v in node["variables"]]]
            except KeyError as err:
                raise FolderError(f"{self.path}: lwtnn variable {err} of {node['name']} is not filled") from None
        return dict(zip(self.labels, evaluate_graph_inputs(self.graph, arrays)[0]))


def _outputs_vector(outputs, n_vox, path):
    if len(outputs) != n_vox:
        raise FolderError(f"{path}: {len(outputs)} outputs for the {n_vox} voxels FastCaloSim reads from binning.xml")
    try:
        return np.array([outputs[str(i)] for i in range(n_vox)])
    except KeyError as err:
        raise FolderError(f"{path}: no output {err} for the {n_vox} voxels of binning.xml (outputs.at() throws; "
                          f"it has {len(outputs)} outputs)") from None


def check_network(pid, name, lo_exp, hi_exp, exps, nets, n_vox, latent, args, rng):
    """Run the network's files at each momentum FastCaloSim routes to it; returns the per-energy summary."""
    per_energy, max_diff = [], 0.0
    paths = {fmt: n.path for fmt, n in nets.items()}
    for k in exps:
        p = float(2 ** k)
        label, ekin = fcs_label(pid, p, lo_exp, hi_exp)
        totals, negative = [], 0
        for _ in range(args.check_events):
            noise = rng.normal(0.5, 0.5, latent)
            inputs = fcs_inputs(noise, label)
            vec = {fmt: _outputs_vector(n.compute(inputs), n_vox, paths[fmt]) for fmt, n in nets.items()}
            if "onnx" in vec and "json" in vec:
                # ONNX gets the noise in the map's key order: the JSON given that permuted noise must agree exactly
                order = [int(kk.split("_")[1]) for kk in sorted(inputs["Noise"])]
                same = _outputs_vector(nets["json"].compute(fcs_inputs(noise[order], label)), n_vox, paths["json"])
                d = float(np.max(np.abs(vec["onnx"] - same) / np.maximum(1.0, np.abs(same))))
                max_diff = max(max_diff, d)
                if not d <= args.tolerance:
                    raise FolderError(f"{paths['onnx']}: differs from {os.path.basename(paths['json'])} by {d:.3g} "
                                      f"(> {args.tolerance:g}) at p = {p:g} MeV with the same inputs")
            for fmt, v in vec.items():
                if not np.all(np.isfinite(v)):
                    raise FolderError(f"{paths[fmt]}: non-finite output at p = {p:g} MeV")
            v = vec.get("onnx", vec.get("json"))
            total = float(np.sum(ekin * v))                      # Einit x output, summed over the voxels
            negative += total < 0
            totals.append(total)
        if negative:
            print(f"warning: {min(paths.values())}: {negative} of {args.check_events} showers at p = {p:g} MeV sum to "
                  "less than 0; FastCaloSim skips such a particle", file=sys.stderr)
        per_energy.append({"p_mev": p, "ekin_mev": float(ekin), "label": float(label),
                           "mean_sum_over_ekin": float(np.mean(totals) / ekin), "negative_events": int(negative)})
    return per_energy, max_diff


def check_slice(folder, pid, info, b, layers, n_vox, args, rng):
    lo = b["etaMin"]
    report = {"pid": pid, "etaMin": lo, "etaMax": lo + 5, "voxels": n_vox, "networks": {}}
    for name, lo_exp, hi_exp, exps in FCS_NETWORKS[pid]:
        stem = os.path.join(folder, net_stem(pid, lo, name))
        nets = {}
        if os.path.isfile(stem + ".onnx"):
            nets["onnx"] = OnnxNet(stem + ".onnx")
        if os.path.isfile(stem + ".json"):
            nets["json"] = LwtnnNet(stem + ".json")
        if not nets:
            raise FolderError(f"{stem}.*: missing (TFCSNetworkFactory finds neither .onnx nor .json)")
        per_energy, diff = check_network(pid, name, lo_exp, hi_exp, exps, nets, n_vox, info["latent"], args, rng)
        report["networks"][name] = {"files": sorted(os.path.basename(n.path) for n in nets.values()),
                                    "loaded_by_fastcalosim": os.path.basename(nets.get("onnx", nets.get("json")).path),
                                    "max_diff_onnx_json": diff, "energies": per_energy}
    shape, valid = root_names(pid, lo)
    if not args.networks_only:
        report["fit_slopes"] = {str(k): v for k, v in
                                check_shape_file(os.path.join(folder, "rootFiles", shape), layers).items()}
        report["extrap_weights"] = {str(k): v for k, v in
                                    check_validation_file(os.path.join(folder, "rootFiles", valid), layers).items()}
    return report


def check_folder(args):
    folder = args.check_folder
    if not os.path.isdir(folder):
        raise FolderError(f"{folder}: not a directory")
    xml = os.path.join(folder, "binning.xml")
    particles = parse_binning(xml)
    files = os.listdir(folder)
    slices = []
    for xpid, info in sorted(particles.items()):
        pids = [xpid] + ([2212] if xpid == 211 and any(f.startswith("neural_net_2212_") for f in files) else [])
        for b in info["bins"]:
            for pid in pids:
                if pid not in FCS_NETWORKS:
                    raise FolderError(f"{xml}: Particle pid {pid}: FastCaloSim's GAN reads 22, 11 and 211")
                slices.append((pid, xpid, b))
    if not slices:
        raise FolderError(f"{xml}: no Particle with a Bin")
    rng = np.random.default_rng(args.seed)
    reports = []
    for pid, xpid, b in slices:
        layers, n_vox = check_bin(xml, xpid, particles[xpid], b)
        reports.append(check_slice(folder, pid, particles[xpid], b, layers, n_vox, args, rng))
    stray = [f for f in files if NET_RE.match(f) and not any(
        f.startswith(net_stem(r["pid"], r["etaMin"], n) + ".") for r in reports for n in r["networks"])]
    result = {"folder": os.path.abspath(folder), "ok": True, "slices": reports, "unused_files": stray,
              "root_files_checked": not args.networks_only, "events_per_energy": args.check_events}
    if args.json:
        write_json(args.json, result)
    n_nets = sum(len(r["networks"]) for r in reports)
    ratios = [e["mean_sum_over_ekin"] for r in reports for n in r["networks"].values() for e in n["energies"]]
    print(f"check-folder: {folder} loads as FastCaloSim reads it: {len(reports)} slice(s), {n_nets} network(s) "
          f"run at {len(ratios)} energy points (sum of Einit x output / E_kin {min(ratios):.3g}..{max(ratios):.3g})"
          f"{'' if not args.networks_only else '; rootFiles not checked (--networks-only)'}")
    return 0


# ----------------------------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(
        description="Assemble the input folder FastCaloSim's TFCSEnergyAndHitGANV2 loads (binning.xml, the "
                    "networks under the names it opens, rootFiles/), or check one.",
        formatter_class=HelpFormatter)
    p.add_argument("--out", help="folder to write (replaced as a whole, atomically)")
    p.add_argument("--networks", nargs="+", default=[], help="export_lwtnn.py output directories")
    p.add_argument("--hits", nargs="+", default=[],
                   help="directories with the slices' hits files (the 1 TeV and 65 GeV ones are used)")
    p.add_argument("--eta", type=float, help="lower |eta| edge of the slice for networks of a wider slice "
                                             "(CaloChallenge dataset 1: 0.20)")
    p.add_argument("--sub-bins", type=int, default=DEFAULTS["sub_bins"],
                   help="histogram bins per voxel r bin in r<layer>w")
    p.add_argument("--check-folder", metavar="DIR", help="check a FastCaloSim folder instead of writing one")
    p.add_argument("--networks-only", action="store_true",
                   help="--check-folder: do not require rootFiles/ (e.g. networks trained on CaloChallenge voxels)")
    p.add_argument("--check-events", type=int, default=DEFAULTS["check_events"],
                   help="--check-folder: events per energy point and network")
    p.add_argument("--tolerance", type=float, default=DEFAULTS["tolerance"],
                   help="--check-folder: max |ONNX - lwtnn JSON| (relative above 1)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="--check-folder: seed of the noise")
    p.add_argument("--json", help="--check-folder: also write the check as JSON")
    return p


def _main(argv):
    args = build_parser().parse_args(argv)
    if args.check_folder:
        if args.check_events < 1:
            raise UserError("--check-events must be >= 1")
        return check_folder(args)
    if not args.out or not args.networks:
        raise UserError("give --out DIR and --networks EXPORT_DIR ... (or --check-folder DIR)")
    if args.sub_bins < 3:
        raise UserError("--sub-bins must be >= 3 (FastCaloSim fits only histograms of more than 2 bins)")
    return assemble(args)


def main(argv=None):
    """Run the command; returns the exit code instead of exiting."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
