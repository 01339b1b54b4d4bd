"""Property-based tests (hypothesis) of the binning-XML reader and the hit -> voxel mapping.

* Random valid binnings, written as XML in either accepted form (CaloChallenge ``<Bin>``, FastCaloGAN
  ``<Particle><Bin>`` with several |eta| slices), read back by ``read_geometry`` with the same layers in the
  same order, the same r edges (bit for bit), alpha bins, voxel counts, offsets and voxel names; damaging one
  layer (unsorted or negative edge, zero alpha bins) always gives a GeometryError naming the file and element.
* Random hits around random extrapolated positions, voxelised by ``preprocess.voxelise_arrays``: energy is
  conserved per event and layer (hits in layers without voxels are dropped and counted), and every hit lands
  in the voxel whose r bin and alpha bin contain its (r, alpha) computed here from the mapping's definition with the
  math module (r beyond the last edge: last r bin).

Examples are drawn with a fixed seed (``derandomize``), so a run is reproducible; no example database is written.
"""
import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import HighLevelFeatures as H
import preprocess
from HighLevelFeatures import GeometryError, list_slices, read_geometry

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PARTICLE_IDS = {"photon": 22, "electron": 11, "pion": 211, "proton": 2212}


# ----------------------------------------------------------------------------------------------
# strategies

@st.composite
def layer_lists(draw, max_layers=5, need_voxels=True):
    """[(layer id, r edges (list of float, [0.0] = no voxels), n_alpha)] in XML order (ids unique, any order)."""
    n = draw(st.integers(1, max_layers))
    ids = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n, unique=True))
    layers = []
    for lid in ids:
        if draw(st.integers(0, 4)) == 0:
            edges = [0.0]
        else:
            widths = draw(st.lists(st.one_of(st.integers(1, 200).map(float),
                                             st.floats(0.05, 300.0, allow_nan=False, allow_infinity=False)),
                                   min_size=1, max_size=12))
            edges = [0.0] + np.cumsum(widths).tolist()
        layers.append((lid, edges, draw(st.integers(1, 16))))
    if need_voxels and all(len(e) == 1 for _, e, _ in layers):
        lid, _, na = layers[0]
        layers[0] = (lid, [0.0, 5.0, 12.5], na)
    return layers


def _edges_text(edges, style):
    parts = [(str(int(x)) if style == 1 and float(x).is_integer() else repr(float(x))) for x in edges]
    return (", " if style == 2 else ",").join(parts)


def _layer_xml(layer, style):
    lid, edges, n_alpha = layer
    return f'<Layer id="{lid}" r_edges="{_edges_text(edges, style)}" n_bin_alpha="{n_alpha}"/>'


@st.composite
def binning_files(draw):
    """(xml text, description) of a random valid binning in one of the two forms."""
    particle = draw(st.sampled_from(sorted(PARTICLE_IDS)))
    style = draw(st.integers(0, 2))
    if draw(st.booleans()):                      # CaloChallenge form: one slice
        layers = draw(layer_lists())
        lo, hi = 0, draw(st.integers(1, 500))
        body = "\n".join("    " + _layer_xml(x, style) for x in layers)
        text = (f'<Bins>\n  <Bin pid="{PARTICLE_IDS[particle]}" etaMin="{lo}" etaMax="{hi}" name="{particle}">\n'
                f'{body}\n  </Bin>\n</Bins>\n')
        return text, {"form": "calochallenge", "particle": particle, "slices": [(lo, hi, layers)],
                      "symmetrise": False, "latent": 50}
    n_slices = draw(st.integers(1, 3))
    start, width = draw(st.integers(0, 90)) * 5, draw(st.sampled_from([5, 10, 20]))
    symmetrise = draw(st.booleans())
    latent = draw(st.integers(1, 128))
    slices, bins = [], []
    for k in range(n_slices):
        lo, hi = start + k * width, start + (k + 1) * width
        layers = draw(layer_lists())
        slices.append((lo, hi, layers))
        body = "\n".join("      " + _layer_xml(x, style) for x in layers)
        bins.append(f'    <Bin etaMin="{lo}" etaMax="{hi}" regionId="{k}">\n{body}\n    </Bin>')
    flag = "true" if symmetrise else "false"
    text = (f'<Bins>\n  <Particle pid="{PARTICLE_IDS[particle]}" name="{particle}" latentDim="{latent}" '
            f'symmetriseAlpha="{flag}">\n' + "\n".join(bins) + "\n  </Particle>\n</Bins>\n")
    return text, {"form": "fastcalogan", "particle": particle, "slices": slices, "symmetrise": symmetrise,
                  "latent": latent}


def _write(folder, text, name="binning.xml"):
    path = os.path.join(folder, name)
    with open(path, "w") as fh:
        fh.write(text)
    return path


# ----------------------------------------------------------------------------------------------
# XML round trip

def check_geometry(g, layers, desc, path, lo, hi):
    assert g.filename == path and g.particle == desc["particle"] and g.pid == PARTICLE_IDS[desc["particle"]]
    assert (g.eta_min, g.eta_max) == (lo, hi)
    assert g.symmetrise_alpha == desc["symmetrise"] and g.latent_dim == desc["latent"]
    assert g.layer_ids == [lid for lid, _, _ in layers]                       # XML order kept
    offset, names = 0, []
    for lay, (lid, edges, n_alpha) in zip(g.layers, layers):
        assert lay.r_edges.tolist() == edges                                  # bit for bit
        assert lay.n_alpha == n_alpha
        n_r = len(edges) - 1
        assert lay.n_r == n_r and lay.n_voxels == n_r * n_alpha
        assert g.offsets[lid] == (offset, offset + lay.n_voxels)
        for ia in range(n_alpha if n_r else 0):
            for ir in range(n_r):
                assert g.voxel_index(lid, ia, ir) == offset + ia * n_r + ir   # r fastest, then alpha
                names.append(f"L{lid}_a{ia}_r{ir}")
        offset += lay.n_voxels
        span = (0.0 if desc["symmetrise"] else -math.pi, math.pi)
        assert lay.alpha_edges[0] == span[0] and lay.alpha_edges[-1] == span[1] and len(lay.alpha_edges) == n_alpha + 1
    assert g.n_voxels == offset and g.voxel_names() == names
    assert g.relevant_layers == [lid for lid, e, _ in layers if len(e) > 1]
    assert g.layers_binned_in_alpha == [lid for lid, e, na in layers if len(e) > 1 and na > 1]
    r, alpha, eta, phi, lid = g.voxel_coordinates()
    assert len(r) == g.n_voxels and np.allclose(eta, r * np.cos(alpha)) and np.allclose(phi, r * np.sin(alpha))


@PROPERTY_SETTINGS
@given(binning_files())
def test_random_binnings_round_trip(case):
    text, desc = case
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, text)
        slices = list_slices(path, desc["particle"])
        assert [(s[0], s[1]) for s in slices] == [(lo, hi) for lo, hi, _ in desc["slices"]]
        for lo, hi, layers in desc["slices"]:
            eta = None if len(desc["slices"]) == 1 else (lo + hi) / 200.0
            check_geometry(read_geometry(path, desc["particle"], eta), layers, desc, path, lo, hi)
            check_geometry(read_geometry(path, str(PARTICLE_IDS[desc["particle"]]), lo / 100.0), layers, desc, path,
                           lo, hi)                                           # by PDG id, at the slice's low edge
        beyond = desc["slices"][-1][1] / 100.0 + 0.001
        with pytest.raises(GeometryError, match="binning.xml"):
            read_geometry(path, desc["particle"], beyond)                    # |eta| no slice covers
        if len(desc["slices"]) > 1:
            with pytest.raises(GeometryError, match="say which"):
                read_geometry(path, desc["particle"])


@PROPERTY_SETTINGS
@given(layer_lists(), st.data())
def test_damaged_layer_is_rejected_naming_file_and_element(layers, data):
    k = data.draw(st.integers(0, len(layers) - 1))
    lid, edges, n_alpha = layers[k]
    kinds = ["alpha"] + (["unsorted", "negative", "repeated"] if len(edges) > 2 else []) + ["not-zero"]
    kind = data.draw(st.sampled_from(kinds))
    if kind == "alpha":
        n_alpha = data.draw(st.integers(-3, 0))
    elif kind == "unsorted":
        i = data.draw(st.integers(1, len(edges) - 2))
        edges = edges[:i] + [edges[i + 1], edges[i]] + edges[i + 2:]
    elif kind == "negative":
        i = data.draw(st.integers(1, len(edges) - 1))
        edges = edges[:i] + [-edges[i]] + edges[i + 1:]
    elif kind == "repeated":
        i = data.draw(st.integers(1, len(edges) - 1))
        edges = edges[:i] + [edges[i - 1]] + edges[i + 1:]
    else:                                        # every edge shifted: the first is no longer 0
        shift = data.draw(st.floats(0.25, 50.0))
        edges = [e + shift for e in edges]
    bad = layers[:k] + [(lid, edges, n_alpha)] + layers[k + 1:]
    body = "\n".join("    " + _layer_xml(x, 0) for x in bad)
    text = f'<Bins>\n  <Bin pid="22" etaMin="0" etaMax="130" name="photon">\n{body}\n  </Bin>\n</Bins>\n'
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, text, "damaged.xml")
        with pytest.raises(GeometryError) as err:
            read_geometry(path, "photon")
    msg = str(err.value)
    assert path in msg and f'<Layer id="{lid}"' in msg, (kind, msg)


# ----------------------------------------------------------------------------------------------
# hits -> voxels

def spec_position(eta, phi, eta_x, phi_x, r_x, z_x, symmetrise):
    """(r, alpha) of a hit by the mapping's definition, written with the math module, hit by hit
    (FastCaloGAN negates deta where the extrapolated eta is negative)."""
    dphi = phi - phi_x
    while dphi > math.pi:
        dphi -= 2 * math.pi
    while dphi <= -math.pi:
        dphi += 2 * math.pi
    scale = abs(2 * math.exp(-eta_x) / (1 + math.exp(-2 * eta_x))) * math.hypot(r_x, z_x)
    x, y = (eta - eta_x) * scale * (-1 if eta_x < 0 else 1), dphi * r_x
    return math.hypot(x, y), math.atan2(abs(y) if symmetrise else y, x)


@st.composite
def hit_sets(draw, one_per_event=False):
    """(geometry, hits dict, extrap dict, n_events) with hits around each event's extrapolated positions."""
    layers = draw(layer_lists(max_layers=4))
    symmetrise = draw(st.booleans())
    body = "\n".join("      " + _layer_xml(x, 0) for x in layers)
    text = (f'<Bins>\n  <Particle pid="22" name="photon" symmetriseAlpha="{"true" if symmetrise else "false"}">\n'
            f'    <Bin etaMin="0" etaMax="500">\n{body}\n    </Bin>\n  </Particle>\n</Bins>\n')
    with tempfile.TemporaryDirectory() as d:
        geom = read_geometry(_write(d, text), "photon")
    n_hits = draw(st.integers(1, 40))
    n_events = n_hits if one_per_event else draw(st.integers(1, 4))
    n_cols = max(lid for lid, _, _ in layers) + 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    extrap = {"extrap_eta": rng.uniform(-2.5, 2.5, (n_events, n_cols)),
              "extrap_phi": rng.uniform(-math.pi, math.pi, (n_events, n_cols)),
              "extrap_r": rng.uniform(1000.0, 4000.0, (n_events, n_cols)),
              "extrap_z": rng.uniform(-3000.0, 3000.0, (n_events, n_cols))}
    ev = np.arange(n_hits) if one_per_event else rng.integers(0, n_events, n_hits)
    lids = np.array([layers[i][0] for i in rng.integers(0, len(layers), n_hits)])
    r_max = max(e[-1] for _, e, _ in layers)
    # distances: uniform out to 1.3 x the outermost edge, plus exact edges and zero (the boundaries)
    r = rng.uniform(0.0, 1.3 * max(r_max, 1.0), n_hits)
    edges = np.concatenate([e for _, e, _ in layers])
    on_edge = rng.random(n_hits) < 0.2
    r[on_edge] = rng.choice(edges, int(on_edge.sum()))
    alpha = rng.uniform(-math.pi, math.pi, n_hits)
    eta_x, phi_x = extrap["extrap_eta"][ev, lids], extrap["extrap_phi"][ev, lids]
    r_x, z_x = extrap["extrap_r"][ev, lids], extrap["extrap_z"][ev, lids]
    scale = H.eta_to_mm(eta_x, r_x, z_x)
    hits = {"event": ev, "layer": lids, "eta": eta_x + r * np.cos(alpha) / scale,
            "phi": phi_x + r * np.sin(alpha) / r_x,
            "energy": rng.uniform(0.0, 1.0, n_hits) * 10.0 ** rng.uniform(-3, 4, n_hits)}
    return geom, hits, extrap, n_events


@PROPERTY_SETTINGS
@given(hit_sets())
def test_voxelisation_conserves_energy_per_event_and_layer(case):
    geom, hits, extrap, n_events = case
    showers, acc = preprocess.voxelise_arrays(geom, hits, extrap, n_events)
    assert showers.shape == (n_events, geom.n_voxels) and (showers >= 0).all()
    dropped = 0.0
    for lay in geom.layers:
        m = hits["layer"] == lay.id
        want = np.bincount(hits["event"][m], weights=hits["energy"][m], minlength=n_events)
        if lay.n_voxels == 0:
            dropped += want.sum()
            continue
        a, b = geom.offsets[lay.id]
        np.testing.assert_allclose(showers[:, a:b].sum(axis=1), want, rtol=1e-12, atol=1e-300)
    voxelised = np.isin(hits["layer"], geom.relevant_layers)
    assert acc.hits == len(hits["energy"]) and acc.dropped_hits == int((~voxelised).sum())
    assert math.isclose(acc.dropped_energy, dropped, rel_tol=1e-12, abs_tol=1e-300)
    assert math.isclose(showers.sum() + acc.dropped_energy, hits["energy"].sum(), rel_tol=1e-12)


def _contains(lo, hi, x, tol, open_above):
    return lo - tol <= x and (open_above or x <= hi + tol)


@PROPERTY_SETTINGS
@given(hit_sets(one_per_event=True))
def test_every_hit_lands_in_the_voxel_containing_it(case):
    geom, hits, extrap, n_events = case
    showers, _ = preprocess.voxelise_arrays(geom, hits, extrap, n_events)
    starts = np.array([geom.offsets[lay.id][0] for lay in geom.layers if lay.n_voxels])
    by_start = [lay for lay in geom.layers if lay.n_voxels]
    for i in range(n_events):
        lay = geom.layer(int(hits["layer"][i]))
        nz = np.flatnonzero(showers[i])
        if lay.n_voxels == 0:
            assert nz.size == 0                                   # dropped, not voxelised
            continue
        if hits["energy"][i] == 0.0:
            assert nz.size == 0
            continue
        assert nz.size == 1 and showers[i, nz[0]] == hits["energy"][i]
        v = int(nz[0])
        k = int(np.searchsorted(starts, v, side="right") - 1)
        assert by_start[k].id == lay.id                           # the hit's own layer
        local = v - starts[k]
        ia, ir = divmod(local, lay.n_r)
        c = int(hits["layer"][i])
        r, alpha = spec_position(hits["eta"][i], hits["phi"][i], extrap["extrap_eta"][i, c],
                                 extrap["extrap_phi"][i, c], extrap["extrap_r"][i, c], extrap["extrap_z"][i, c],
                                 geom.symmetrise_alpha)
        e = lay.r_edges
        tol = 1e-9 * max(1.0, r)
        assert _contains(e[ir], e[ir + 1], r, tol, open_above=(ir == lay.n_r - 1)), (r, ir, e.tolist())
        if lay.n_alpha > 1:
            a = lay.alpha_edges
            assert _contains(a[ia], a[ia + 1], alpha, 1e-9, False), (alpha, ia, a.tolist())
        else:
            assert ia == 0
