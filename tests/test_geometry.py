"""Binning XML -> Geometry (HighLevelFeatures.py): the CaloChallenge geometry facts, voxel order,
both XML forms, eta-slice choice, (r, alpha) -> voxel mapping, and clear errors (API and command line).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import HighLevelFeatures as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINNING = os.path.join(ROOT, "binning")
FASTCALOGAN = os.path.join(BINNING, "binning_fastcalogan.xml")

# CaloChallenge's binning table: layer id -> (r_edges, n_alpha) of every voxelised layer
_TILE = [0, 10, 20, 30, 50, 80, 100, 130, 160, 200, 250, 300, 350, 400]
CC_LAYERS = {
    "1-photons": {
        0: ([0, 5, 10, 30, 50, 100, 200, 400, 600], 1),
        1: ([0, 2, 4, 6, 8, 10, 12, 15, 20, 30, 40, 50, 70, 90, 120, 150, 200], 10),
        2: ([0, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 350, 400], 10),
        3: ([0, 50, 100, 200, 400, 600], 1),
        12: ([0, 100, 200, 400, 1000, 2000], 1),
    },
    "1-pions": {
        0: ([0, 5, 10, 30, 50, 100, 200, 400, 600], 1),
        1: ([0, 1, 4, 7, 10, 15, 30, 50, 90, 150, 200], 10),
        2: ([0, 5, 10, 20, 30, 50, 80, 130, 200, 300, 400], 10),
        3: ([0, 50, 100, 200, 400, 600], 1),
        12: (_TILE + [1000, 2000], 10),
        13: (_TILE + [600, 1000, 2000], 10),
        14: ([0, 50, 100, 150, 200, 250, 300, 400, 600, 1000, 2000], 1),
    },
    "2": {lid: ([4.65 * k for k in range(10)], 16) for lid in range(45)},
    "3": {lid: ([2.325 * k for k in range(19)], 50) for lid in range(45)},
}
CC_VOXELS = {"1-photons": 368, "1-pions": 533, "2": 6480, "3": 40500}


def _write(tmp_path, text, name="binning.xml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _calochallenge_xml(layers, particle="photon", pid=22, eta_max=130):
    body = "\n".join(f'    <Layer id="{i}" r_edges="{e}" n_bin_alpha="{a}"/>' for i, (e, a) in enumerate(layers))
    return f'<Bins>\n  <Bin pid="{pid}" etaMin="0" etaMax="{eta_max}" name="{particle}">\n{body}\n  </Bin>\n</Bins>\n'


# ----------------------------------------------------------------------------------------------
# the four CaloChallenge geometries

@pytest.mark.parametrize("dataset", sorted(CC_VOXELS))
def test_voxel_counts_and_r_edges_match_spec(dataset):
    g = H.dataset_geometry(dataset)
    assert g.n_voxels == CC_VOXELS[dataset] == H.DATASETS[dataset][2]
    assert sum(lay.n_voxels for lay in g.layers) == g.n_voxels
    spec = CC_LAYERS[dataset]
    assert g.relevant_layers == sorted(spec)
    assert g.layers_binned_in_alpha == [lid for lid in sorted(spec) if spec[lid][1] > 1]
    for lay in g.layers:
        if lay.id in spec:
            edges, n_alpha = spec[lay.id]
            np.testing.assert_allclose(lay.r_edges, edges, rtol=1e-12, atol=1e-12)
            assert lay.n_alpha == n_alpha
            assert lay.n_voxels == (len(edges) - 1) * n_alpha
        else:
            assert lay.n_voxels == 0 and lay.r_edges.tolist() == [0.0]


@pytest.mark.parametrize("dataset, n_layers, pid", [("1-photons", 24, 22), ("1-pions", 24, 211), ("2", 45, 11),
                                                    ("3", 45, 11)])
def test_layer_ids_and_particle(dataset, n_layers, pid):
    g = H.dataset_geometry(dataset)
    assert g.layer_ids == list(range(n_layers))
    assert g.pid == pid and g.particle == H.DATASETS[dataset][1]
    assert (g.eta_min, g.eta_max) == (0.0, 130.0)


@pytest.mark.parametrize("dataset", ["1-photons", "1-pions", "2"])
def test_voxel_order_r_fastest_then_alpha_then_layer(dataset):
    g = H.dataset_geometry(dataset)
    names = g.voxel_names()
    r, alpha, eta, phi, lid = g.voxel_coordinates()
    assert len(names) == len(r) == len(lid) == g.n_voxels
    k = 0
    for layer_id in g.relevant_layers:
        edges, n_alpha = CC_LAYERS[dataset][layer_id]
        start, stop = g.offsets[layer_id]
        assert start == k and stop == k + (len(edges) - 1) * n_alpha
        for ia in range(n_alpha):
            a_centre = 0.0 if n_alpha == 1 else -math.pi + (ia + 0.5) * 2 * math.pi / n_alpha
            for ir in range(len(edges) - 1):
                assert g.voxel_index(layer_id, ia, ir) == k
                assert names[k] == f"L{layer_id}_a{ia}_r{ir}"
                assert lid[k] == layer_id
                assert r[k] == pytest.approx(0.5 * (edges[ir] + edges[ir + 1]), rel=1e-12)
                assert alpha[k] == pytest.approx(a_centre, abs=1e-12)
                assert eta[k] == pytest.approx(r[k] * math.cos(a_centre), abs=1e-9)
                assert phi[k] == pytest.approx(r[k] * math.sin(a_centre), abs=1e-9)
                k += 1
    assert k == g.n_voxels


def test_layer_geometry_helpers():
    lay = H.Layer(7, [0, 2, 6], 4)
    assert (lay.n_r, lay.n_voxels) == (2, 8)
    np.testing.assert_allclose(lay.r_centres, [1.0, 4.0])
    np.testing.assert_allclose(lay.alpha_edges, [-math.pi, -math.pi / 2, 0, math.pi / 2, math.pi])
    np.testing.assert_allclose(lay.alpha_centres, [-3 * math.pi / 4, -math.pi / 4, math.pi / 4, 3 * math.pi / 4])
    assert H.Layer(0, [0, 1], 1).alpha_centres.tolist() == [0.0]
    empty = H.Layer(3, [0], 1)
    assert (empty.n_r, empty.n_voxels) == (0, 0)


# ----------------------------------------------------------------------------------------------
# both XML forms, slices, symmetrised alpha

def _same_layers(a, b):
    assert a.layer_ids == b.layer_ids
    for la, lb in zip(a.layers, b.layers):
        assert la.r_edges.tolist() == lb.r_edges.tolist() and la.n_alpha == lb.n_alpha
    assert a.offsets == b.offsets and a.n_voxels == b.n_voxels
    assert a.voxel_names() == b.voxel_names()
    for ca, cb in zip(a.voxel_coordinates(), b.voxel_coordinates()):
        np.testing.assert_array_equal(ca, cb)


@pytest.mark.parametrize("dataset", ["1-photons", "1-pions"])
def test_both_xml_forms_give_the_same_geometry(dataset):
    ref = H.dataset_geometry(dataset)
    slices = H.list_slices(FASTCALOGAN, ref.particle)
    assert len(slices) == 26
    assert [s[:2] for s in slices] == [(5.0 * i, 5.0 * (i + 1)) for i in range(26)]
    for lo, hi, _, _ in slices:
        g = H.read_geometry(FASTCALOGAN, ref.particle, eta=(lo + 2.5) / 100)
        assert (g.eta_min, g.eta_max) == (lo, hi) and g.region_id == int(lo // 5)
        assert g.pid == ref.pid and g.latent_dim == 50 and g.symmetrise_alpha is False
        _same_layers(g, ref)


def test_both_forms_written_here_agree(tmp_path):
    layers = [("0,1,3", 1), ("0,2,4,8", 6), ("0", 1)]
    cc = _write(tmp_path, _calochallenge_xml(layers), "cc.xml")
    body = "\n".join(f'<Layer id="{i}" r_edges="{e}" n_bin_alpha="{a}"/>' for i, (e, a) in enumerate(layers))
    fcg = _write(tmp_path, f'<Bins><Particle pid="22" name="photon" latentDim="10" symmetriseAlpha="false">'
                           f'<Bin etaMin="20" etaMax="25" regionId="4">{body}</Bin></Particle></Bins>', "fcg.xml")
    a = H.read_geometry(cc, "photon")
    b = H.read_geometry(fcg, 22, eta=0.21)          # by PDG id
    _same_layers(a, b)
    assert a.n_voxels == 2 + 18 and b.latent_dim == 10 and b.region_id == 4


@pytest.mark.parametrize("eta, expected", [(0.22, (20.0, 25.0)), (-0.22, (20.0, 25.0)), (0.0, (0.0, 5.0)),
                                           (0.05, (5.0, 10.0)), (0.0499, (0.0, 5.0)), (1.2999, (125.0, 130.0))])
def test_slice_selection_by_eta(eta, expected):
    g = H.read_geometry(FASTCALOGAN, "pion", eta=eta)
    assert (g.eta_min, g.eta_max) == expected
    assert g.slice_name() == f"eta_{int(expected[0])}_{int(expected[1])}"
    assert g.particle == "pion" and g.pid == 211


def test_multi_slice_file_needs_eta():
    with pytest.raises(H.GeometryError, match="eta slices"):
        H.read_geometry(FASTCALOGAN, "photon")


def test_symmetrise_alpha_edges_and_binning(tmp_path):
    path = _write(tmp_path, '<Bins><Particle pid="11" name="electron" latentDim="30" symmetriseAlpha="true">'
                            '<Bin etaMin="0" etaMax="5"><Layer id="0" r_edges="0,5,10" n_bin_alpha="4"/>'
                            '<Layer id="1" r_edges="0,5" n_bin_alpha="1"/></Bin></Particle></Bins>')
    g = H.read_geometry(path, "electron", eta=0.01)
    assert g.symmetrise_alpha is True and g.latent_dim == 30
    lay = g.layer(0)
    np.testing.assert_allclose(lay.alpha_edges, np.linspace(0, math.pi, 5))
    np.testing.assert_allclose(lay.alpha_centres, (np.arange(4) + 0.5) * math.pi / 4)
    # |alpha| is binned: -alpha and +alpha land in the same voxel
    alphas = np.array([0.1, 1.0, 2.0, 3.0, math.pi])
    np.testing.assert_array_equal(lay.bin_index(np.full(5, 7.0), alphas), lay.bin_index(np.full(5, 7.0), -alphas))
    assert lay.bin_index(np.array([7.0]), np.array([-3.0])).tolist() == [3 * 2 + 1]


# ----------------------------------------------------------------------------------------------
# (r, alpha) -> voxel index

def test_bin_index_analytic_cases():
    lay = H.Layer(0, [0, 1, 2, 4], 4)                  # 3 r bins, alpha bins (-pi,-pi/2,0,pi/2,pi)
    r = np.array([0.0, 0.999, 1.0, 3.999, 4.0, 1e6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    a = np.array([-math.pi, -math.pi, -1.0, 0.0, 0.0, 3.0, math.pi, -0.001, 0.001, math.pi / 2 + 1e-9,
                  -math.pi / 2 - 1e-9, 1.0])
    ir = [0, 0, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0]
    ia = [0, 0, 1, 2, 2, 3, 3, 1, 2, 3, 0, 2]
    assert lay.bin_index(r, a).tolist() == [i * 3 + j for i, j in zip(ia, ir)]
    # one alpha bin: alpha ignored, r beyond the last edge -> last bin
    one = H.Layer(0, [0, 5, 10, 30], 1)
    assert one.bin_index(np.array([0.0, 4.9, 5.0, 29.9, 30.0, 500.0]), np.array([3.1, -3.1, 0, 1, 2, math.pi])
                         ).tolist() == [0, 0, 1, 2, 2, 2]


def test_bin_index_round_trips_voxel_centres():
    g = H.dataset_geometry("1-pions")
    for lay in g.layers:
        if lay.n_voxels:
            r, alpha, _, _ = lay.voxel_coordinates()
            assert lay.bin_index(r, alpha).tolist() == list(range(lay.n_voxels))


# ----------------------------------------------------------------------------------------------
# errors: GeometryError naming the file and the element

BAD_XML = [
    ("malformed", "<Bins><Bin pid='22' name='photon'><Layer id='0' r_edges='0,1'", "malformed XML", None),
    ("unsorted", _calochallenge_xml([("0,5,3", 1)]), "strictly increasing", '<Layer id="0"'),
    ("negative", _calochallenge_xml([("0,-1,5", 1)]), "strictly increasing", '<Layer id="0"'),
    ("negative first", _calochallenge_xml([("-1,0,5", 1)]), "start at 0", '<Layer id="0"'),
    ("not numbers", _calochallenge_xml([("0,a,5", 1)]), "comma-separated numbers", '<Layer id="0"'),
    ("alpha zero", _calochallenge_xml([("0,5", 0)]), "n_bin_alpha must be >= 1", 'n_bin_alpha="0"'),
    ("alpha text", _calochallenge_xml([("0,5", "x")]), "n_bin_alpha", 'n_bin_alpha="x"'),
    ("missing r_edges", '<Bins><Bin pid="22" name="photon"><Layer id="0" n_bin_alpha="1"/></Bin></Bins>',
     "missing attribute 'r_edges'", "<Layer"),
    ("missing id", '<Bins><Bin pid="22" name="photon"><Layer r_edges="0,1"/></Bin></Bins>',
     "missing attribute 'id'", "<Layer"),
    ("missing etaMin", '<Bins><Particle pid="22" name="photon"><Bin etaMax="5"><Layer id="0" r_edges="0,1"/>'
                       '</Bin></Particle></Bins>', "missing attribute 'etaMin'", '<Bin etaMax="5"'),
    ("repeated id", _calochallenge_xml([("0,1", 1)]).replace("</Bin>", '<Layer id="0" r_edges="0,2"/></Bin>'),
     "negative or repeated", '<Layer id="0"'),
    ("no layers", '<Bins><Bin pid="22" name="photon"></Bin></Bins>', "no <Layer>", "<Bin"),
    ("wrong root", "<Binning/>", "expected <Bins>", "<Binning>"),
    ("bad symmetrise", '<Bins><Particle pid="22" name="photon" symmetriseAlpha="maybe"><Bin etaMin="0" '
                       'etaMax="5"><Layer id="0" r_edges="0,1"/></Bin></Particle></Bins>',
     "symmetriseAlpha", "<Particle"),
]


@pytest.mark.parametrize("case, text, what, element", BAD_XML, ids=[c[0] for c in BAD_XML])
def test_bad_xml_raises_geometry_error_naming_file_and_element(tmp_path, case, text, what, element):
    path = _write(tmp_path, text)
    with pytest.raises(H.GeometryError) as info:
        H.read_geometry(path, "photon", eta=0.01 if "Particle" in text else None)
    msg = str(info.value)
    assert path in msg and what in msg
    if element:
        assert element in msg
    assert "\n" not in msg
    assert isinstance(info.value, H.UserError) and isinstance(info.value, ValueError)


def test_unknown_particle_and_eta_outside_every_slice():
    photons = os.path.join(BINNING, "binning_dataset_1_photons.xml")
    with pytest.raises(H.GeometryError) as info:
        H.read_geometry(photons, "kaon")
    assert photons in str(info.value) and "'kaon'" in str(info.value) and "<Bin>" in str(info.value)
    for eta in (1.30, 2.0, -1.31):
        with pytest.raises(H.GeometryError) as info:
            H.read_geometry(FASTCALOGAN, "photon", eta=eta)
        msg = str(info.value)
        assert FASTCALOGAN in msg and "<Bin>" in msg and "'photon'" in msg and "0.00-1.30" in msg
    with pytest.raises(H.GeometryError, match="not found"):
        H.read_geometry(os.path.join(BINNING, "no_such_file.xml"), "photon")
    with pytest.raises(H.UserError, match="unknown dataset"):
        H.dataset_geometry("4")


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "HighLevelFeatures.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_prints_geometry_summary():
    proc = _cli(FASTCALOGAN, "photon", "0.22")
    assert proc.returncode == 0, proc.stderr
    assert "368 voxels" in proc.stdout and "eta 20.0-25.0" in proc.stdout
    assert "layer  2: 19 r x 10 alpha" in proc.stdout


@pytest.mark.parametrize("case", ["malformed", "unknown particle", "eta outside"])
def test_cli_bad_input_exit_code_2_with_one_line(tmp_path, case):
    if case == "malformed":
        path, particle, eta = _write(tmp_path, "<Bins><Bin"), "photon", "0.2"
    elif case == "unknown particle":
        path, particle, eta = os.path.join(BINNING, "binning_dataset_1_pions.xml"), "kaon", "0.2"
    else:
        path, particle, eta = FASTCALOGAN, "pion", "3.1"
    proc = _cli(path, particle, eta)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
