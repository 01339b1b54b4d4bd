"""High-level features (HighLevelFeatures.py): analytic single/two-voxel showers, sparsity, energies, a
cross-check against an independent per-event, per-voxel loop written here from the feature definitions
definitions, streaming over HDF5 in small chunks, the CaloChallenge-style class, plots and the doctests.
"""
import doctest
import math
import os
import sys
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

import HighLevelFeatures as H

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_geometry import CC_LAYERS  # noqa: E402  (CaloChallenge's layer table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITION_FEATURES = ("EC_r", "width_r", "EC_eta", "width_eta", "EC_phi", "width_phi")
ALPHA_FEATURES = ("EC_eta", "width_eta", "EC_phi", "width_phi")


def _xml_path(dataset):
    return os.path.join(ROOT, "binning", H.DATASETS[dataset][0])


def _sparse_showers(n_voxels, n, seed, zero_fraction=0.65):
    """Seeded float32 showers: exponential energies (MeV), ~65% zeros, event 0 empty, some empty layers."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_exponential((n, n_voxels), dtype=np.float32) * np.float32(40.0))
    x[rng.random((n, n_voxels)) < zero_fraction] = 0.0
    x[0] = 0.0
    x[1, : n_voxels // 3] = 0.0
    x[2, rng.integers(0, n_voxels)] = 123.25                 # a single hit voxel: width from rounding only
    x[2, x[2] != 123.25] = 0.0
    return x


# ----------------------------------------------------------------------------------------------
# independent reference: plain loops over events, layers and voxels (the feature definitions + CaloChallenge
# conventions: r centre = mid of its edges, alpha centres = centres of linspace(-pi, pi, n+1), 0 for n = 1)

def _reference_layers(xml_path):
    layers = []
    for layer in ET.parse(xml_path).getroot().iter("Layer"):
        edges = [float(v) for v in layer.get("r_edges").split(",")]
        n_alpha = int(layer.get("n_bin_alpha"))
        if len(edges) < 2:
            continue
        r_centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(edges) - 1)]
        if n_alpha == 1:
            alpha_centres = [0.0]
        else:
            a_edges = np.linspace(-math.pi, math.pi, n_alpha + 1)
            alpha_centres = [(a_edges[j] + a_edges[j + 1]) / 2 for j in range(n_alpha)]
        coords = []                                    # voxel order: r fastest, then alpha
        for a in alpha_centres:
            for r in r_centres:
                coords.append((r, r * math.cos(a), r * math.sin(a)))
        layers.append((int(layer.get("id")), n_alpha, coords))
    return layers


def reference_features(xml_path, showers, threshold=0.0):
    layers = _reference_layers(xml_path)
    n = showers.shape[0]
    out = {k: {lid: np.zeros(n) for lid, na, _ in layers if na > 1 or k not in ALPHA_FEATURES}
           for k in ("E_layer", "sparsity") + POSITION_FEATURES}
    out["Etot"] = np.zeros(n)
    for ev in range(n):
        row = showers[ev]
        offset = 0
        for lid, n_alpha, coords in layers:
            s = 0.0
            sums = {"r": [0.0, 0.0], "eta": [0.0, 0.0], "phi": [0.0, 0.0]}
            hits = 0
            for k, (r, eta, phi) in enumerate(coords):
                e = float(row[offset + k])
                s += e
                hits += e > threshold
                for name, x in (("r", r), ("eta", eta), ("phi", phi)):
                    sums[name][0] += x * e
                    sums[name][1] += x * x * e
            offset += len(coords)
            out["E_layer"][lid][ev] = s
            out["Etot"][ev] += s
            out["sparsity"][lid][ev] = 1.0 - hits / len(coords)
            for name in ("r", "eta", "phi") if n_alpha > 1 else ("r",):
                ec = sums[name][0] / (s + 1e-16)
                out[f"EC_{name}"][lid][ev] = ec
                out[f"width_{name}"][lid][ev] = math.sqrt(max(sums[name][1] / (s + 1e-16) - ec * ec, 0.0))
    return out, {lid: max(abs(c[0]) for c in coords) for lid, _, coords in layers}


def _assert_features_match(got, ref, r_max, what=""):
    np.testing.assert_allclose(got["Etot"], ref["Etot"], rtol=1e-6, atol=1e-9, err_msg=f"{what} Etot")
    for key in ("E_layer", "sparsity") + POSITION_FEATURES:
        assert sorted(got[key]) == sorted(ref[key]), f"{what} {key}: layers differ"
        for lid, expected in ref[key].items():
            # positions near 0 (EC_eta/phi by symmetry, widths of one-voxel layers) compared at 1e-6 of the layer size
            atol = 1e-6 * r_max[lid] if key in POSITION_FEATURES else 1e-9
            np.testing.assert_allclose(got[key][lid], expected, rtol=1e-6, atol=atol, err_msg=f"{what} {key}[{lid}]")


@pytest.mark.parametrize("dataset, n", [("1-photons", 150), ("1-pions", 150), ("2", 12), ("3", 5)])
def test_cross_check_against_plain_loop_reference(dataset, n):
    g = H.dataset_geometry(dataset)
    showers = _sparse_showers(g.n_voxels, n, seed=11 + n)
    assert showers.dtype == np.float32 and 0.6 < np.mean(showers[3:] == 0) < 0.7
    ref, r_max = reference_features(_xml_path(dataset), showers)
    _assert_features_match(H.compute_features(g, showers), ref, r_max, "compute_features")

    hlf = H.HighLevelFeatures(g.particle, filename=_xml_path(dataset))
    # the class sums energies in the input's dtype, as CaloChallenge's does: float64 input for the float64 loop
    hlf.CalculateFeatures(showers.astype(np.float64))
    got = {"Etot": hlf.GetEtot(), "E_layer": hlf.GetElayers(), "sparsity": hlf.GetSparsity(),
           "EC_r": hlf.GetECR(), "width_r": hlf.GetWidthR(), "EC_eta": hlf.GetECEtas(),
           "width_eta": hlf.GetWidthEtas(), "EC_phi": hlf.GetECPhis(), "width_phi": hlf.GetWidthPhis()}
    _assert_features_match(got, ref, r_max, "HighLevelFeatures")
    assert sorted(hlf.GetECEtas()) == hlf.layersBinnedInAlpha and sorted(hlf.GetElayers()) == hlf.relevantLayers


def test_threshold_sparsity_matches_reference():
    g = H.dataset_geometry("1-pions")
    showers = _sparse_showers(g.n_voxels, 40, seed=5)
    ref, r_max = reference_features(_xml_path("1-pions"), showers, threshold=30.0)
    _assert_features_match(H.compute_features(g, showers, threshold=30.0), ref, r_max, "threshold 30")


def test_float64_input_and_small_blocks_give_the_same_features():
    g = H.dataset_geometry("1-photons")
    x32 = _sparse_showers(g.n_voxels, 101, seed=3)
    base = H.compute_features(g, x32)
    for variant in (H.compute_features(g, x32.astype(np.float64)),
                    H.compute_features(g, np.asfortranarray(x32)),
                    H.compute_features(g, x32, plan=H._LayerPlan(g, block_voxels=7 * g.n_voxels)),
                    H.compute_features(g, x32.tolist())):
        np.testing.assert_allclose(variant["Etot"], base["Etot"], rtol=1e-12)
        for key in ("E_layer", "sparsity") + POSITION_FEATURES:
            for lid in base[key]:
                np.testing.assert_allclose(variant[key][lid], base[key][lid], rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# analytic showers

def _expected_coordinates(dataset):
    """(layer id, i_alpha, i_r, r, eta, phi) of every voxel, built from the CaloChallenge table edges."""
    rows = []
    for lid in sorted(CC_LAYERS[dataset]):
        edges, n_alpha = CC_LAYERS[dataset][lid]
        for ia in range(n_alpha):
            a = 0.0 if n_alpha == 1 else -math.pi + (ia + 0.5) * 2 * math.pi / n_alpha
            for ir in range(len(edges) - 1):
                r = 0.5 * (edges[ir] + edges[ir + 1])
                rows.append((lid, ia, ir, r, r * math.cos(a), r * math.sin(a)))
    return rows


@pytest.mark.parametrize("dataset, step", [("1-photons", 1), ("1-pions", 1), ("2", 13)])
def test_single_voxel_showers_give_voxel_centre_and_zero_width(dataset, step):
    """Event k holds energy in one voxel only: EC = that voxel's centre, widths 0, E_layer = E_tot = E."""
    g = H.dataset_geometry(dataset)
    voxels = _expected_coordinates(dataset)[::step]
    n = len(voxels)
    energy = np.float32(8.0)                              # a power of two: the moments are exact
    showers = np.zeros((n, g.n_voxels), np.float32)
    for k, (lid, ia, ir, *_rest) in enumerate(voxels):
        showers[k, g.voxel_index(lid, ia, ir)] = energy
    f = H.compute_features(g, showers)
    np.testing.assert_array_equal(f["Etot"], 8.0)
    for k, (lid, ia, ir, r, eta, phi) in enumerate(voxels):
        for other in g.relevant_layers:
            assert f["E_layer"][other][k] == (8.0 if other == lid else 0.0)
        assert f["EC_r"][lid][k] == pytest.approx(r, rel=1e-12)
        assert f["width_r"][lid][k] == 0.0
        if lid in g.layers_binned_in_alpha:
            assert f["EC_eta"][lid][k] == pytest.approx(eta, rel=1e-12, abs=1e-12)
            assert f["EC_phi"][lid][k] == pytest.approx(phi, rel=1e-12, abs=1e-12)
            assert f["width_eta"][lid][k] == 0.0 and f["width_phi"][lid][k] == 0.0
        else:
            assert lid not in f["EC_eta"] and lid not in f["width_phi"]
        layer = g.layer(lid)
        assert f["sparsity"][lid][k] == pytest.approx(1.0 - 1.0 / layer.n_voxels, rel=1e-15)


def test_single_voxel_any_energy_width_is_zero_up_to_rounding():
    g = H.dataset_geometry("1-photons")
    rng = np.random.default_rng(2)
    showers = np.zeros((200, g.n_voxels), np.float32)
    cols = rng.integers(0, g.n_voxels, 200)
    showers[np.arange(200), cols] = rng.uniform(0.01, 1e6, 200).astype(np.float32)
    f = H.compute_features(g, showers)
    for lid in g.relevant_layers:
        r_max = g.layer(lid).r_edges[-1]
        for key in ("width_r",) + (("width_eta", "width_phi") if lid in g.layers_binned_in_alpha else ()):
            assert np.all(f[key][lid] <= 1e-6 * r_max)


def test_two_voxels_give_the_analytic_width():
    """Two points x1, x2 with energies E1, E2: EC = (E1 x1 + E2 x2)/(E1+E2), width = |x1-x2| sqrt(E1 E2)/(E1+E2)."""
    g = H.dataset_geometry("1-photons")
    lay = g.layer(2)                                       # 19 r bins x 10 alpha bins
    rc, ac = lay.r_centres, (np.arange(10) + 0.5) * 2 * np.pi / 10 - np.pi
    cases = [((0, 1), (0, 7), 3.0, 5.0),                    # same alpha, r bins 1 and 7
             ((2, 4), (7, 4), 1.0, 1.0),                    # same r, alpha bins 2 and 7
             ((0, 18), (9, 0), 2.5, 0.5)]                   # everything different
    showers = np.zeros((len(cases), g.n_voxels), np.float32)
    for k, ((ia1, ir1), (ia2, ir2), e1, e2) in enumerate(cases):
        showers[k, g.voxel_index(2, ia1, ir1)] = e1
        showers[k, g.voxel_index(2, ia2, ir2)] = e2
    f = H.compute_features(g, showers)
    for k, ((ia1, ir1), (ia2, ir2), e1, e2) in enumerate(cases):
        s = e1 + e2
        for key, x1, x2 in (("r", rc[ir1], rc[ir2]),
                            ("eta", rc[ir1] * np.cos(ac[ia1]), rc[ir2] * np.cos(ac[ia2])),
                            ("phi", rc[ir1] * np.sin(ac[ia1]), rc[ir2] * np.sin(ac[ia2]))):
            assert f[f"EC_{key}"][2][k] == pytest.approx((e1 * x1 + e2 * x2) / s, rel=1e-12, abs=1e-12)
            assert f[f"width_{key}"][2][k] == pytest.approx(abs(x1 - x2) * math.sqrt(e1 * e2) / s, rel=1e-9, abs=1e-6)
        assert f["E_layer"][2][k] == s and f["sparsity"][2][k] == pytest.approx(1 - 2 / 190)


def test_sparsity_of_a_known_pattern_and_energies():
    g = H.dataset_geometry("1-photons")
    showers = np.zeros((4, g.n_voxels), np.float32)
    a1, b1 = g.offsets[1]                                  # 160 voxels
    showers[0, a1:a1 + 40] = 1.0                           # 40 of 160 hit
    showers[1, a1:b1] = 0.25                               # all hit
    showers[2, a1:b1:2] = 2.0                              # every other voxel
    showers[3, :] = 1.0
    showers[3, g.offsets[12][0]] = 0.0                     # one of 5 voxels in layer 12 empty
    f = H.compute_features(g, showers)
    np.testing.assert_allclose(f["sparsity"][1], [0.75, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(f["sparsity"][12], [1.0, 1.0, 1.0, 0.2])
    np.testing.assert_allclose(f["sparsity"][0], [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(f["E_layer"][1], [40.0, 40.0, 160.0, 160.0])
    np.testing.assert_allclose(f["E_layer"][12], [0.0, 0.0, 0.0, 4.0])
    np.testing.assert_allclose(f["Etot"], [40.0, 40.0, 160.0, 367.0])
    # thresholded sparsity counts E > threshold only
    ft = H.compute_features(g, showers, threshold=1.0)
    np.testing.assert_allclose(ft["sparsity"][1], [1.0, 1.0, 0.5, 1.0])
    # an empty layer has EC 0 and width 0 (s + 1e-16 in the denominator)
    for key in ("EC_r", "width_r", "EC_eta", "width_eta", "EC_phi", "width_phi"):
        assert f[key][2][0] == 0.0


def test_layer_and_total_energies_of_random_showers():
    g = H.dataset_geometry("2")
    x = _sparse_showers(g.n_voxels, 20, seed=9)
    f = H.compute_features(g, x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(f["Etot"], x64.sum(axis=1), rtol=1e-12)
    for lid in g.relevant_layers:
        a, b = g.offsets[lid]
        np.testing.assert_allclose(f["E_layer"][lid], x64[:, a:b].sum(axis=1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(f["sparsity"][lid], 1.0 - (x[:, a:b] > 0).mean(axis=1), rtol=1e-15)


def test_wrong_shape_is_a_user_error():
    g = H.dataset_geometry("1-photons")
    with pytest.raises(H.UserError, match="expected \\(events, 368\\)"):
        H.compute_features(g, np.zeros((3, 367), np.float32))
    with pytest.raises(H.UserError, match="expected \\(events, 368\\)"):
        H.features_streaming(g, np.zeros(368, np.float32))
    hlf = H.HighLevelFeatures("photon", filename=_xml_path("1-photons"))
    with pytest.raises(RuntimeError):
        hlf.GetEtot()
    empty = H.compute_features(g, np.zeros((0, 368), np.float32))
    assert empty["Etot"].shape == (0,) and empty["width_eta"][1].shape == (0,)


# ----------------------------------------------------------------------------------------------
# streaming over HDF5

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_over_hdf5_in_small_chunks_equals_in_memory(tmp_path, dtype):
    g = H.dataset_geometry("1-pions")
    x = _sparse_showers(g.n_voxels, 203, seed=21).astype(dtype)
    path = tmp_path / "showers.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=x, chunks=(16, g.n_voxels))
    whole = H.compute_features(g, x)
    with h5py.File(path, "r") as f:
        streamed = H.features_streaming(g, f["showers"], chunk=7)
        hlf = H.HighLevelFeatures("pion", filename=_xml_path("1-pions"))
        hlf.CalculateFeatures(f["showers"])
    native = H.compute_features(g, x, native_sums=True)              # the class sums energies in the input dtype
    assert np.array_equal(hlf._f["Etot"], native["Etot"])
    assert all(np.array_equal(hlf._f["E_layer"][lid], native["E_layer"][lid]) for lid in native["E_layer"])
    for got, whole in ((streamed, whole), (hlf._f, native)):
        np.testing.assert_allclose(got["Etot"], whole["Etot"], rtol=1e-12)
        for key in ("E_layer", "sparsity") + POSITION_FEATURES:
            assert sorted(got[key]) == sorted(whole[key])
            for lid in whole[key]:
                np.testing.assert_allclose(got[key][lid], whole[key][lid], rtol=1e-12, atol=1e-9)


def test_chunk_sizes():
    assert H.chunk_events(368) == H.DEFAULT_CHUNK_BYTES // (4 * 368)
    assert H.chunk_events(10**12) == 1
    plan = H._LayerPlan(H.dataset_geometry("2"))
    assert plan.block * 6480 <= H.FEATURE_BLOCK_VOXELS and plan.block >= 1 and plan.shared
    assert not H._LayerPlan(H.dataset_geometry("1-photons")).shared


# ----------------------------------------------------------------------------------------------
# class API, plots, doctests

def test_class_attributes_follow_calochallenge():
    hlf = H.HighLevelFeatures("photon", filename=_xml_path("1-photons"))
    assert hlf.relevantLayers == [0, 1, 2, 3, 12]
    assert hlf.layersBinnedInAlpha == [1, 2]
    assert hlf.num_alpha == [1, 10, 10, 1, 1]
    assert hlf.num_voxel == [8, 160, 190, 5, 5]
    assert hlf.r_edges[0] == [0, 5, 10, 30, 50, 100, 200, 400, 600]
    assert hlf.bin_edges[:4] == [0, 8, 168, 358] and hlf.bin_edges[-1] == 368
    assert len(hlf.eta_all_layers) == 24 and len(hlf.eta_all_layers[2]) == 190


def _assert_png(path):
    assert os.path.isfile(path)
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000


def test_draw_average_and_single_showers_write_pngs(tmp_path):
    import matplotlib

    hlf = H.HighLevelFeatures("photon", filename=_xml_path("1-photons"))
    x = _sparse_showers(368, 6, seed=1)
    avg = str(tmp_path / "average.png")
    hlf.DrawAverageShower(x, filename=avg, title="average")
    _assert_png(avg)
    hlf.DrawSingleShower(x[3:5], filename=str(tmp_path / "single.png"))
    _assert_png(str(tmp_path / "single_0.png"))
    _assert_png(str(tmp_path / "single_1.png"))
    assert not matplotlib.rcParams["text.usetex"]
    assert matplotlib.get_backend().lower() == "agg"
    assert sorted(os.listdir(tmp_path)) == ["average.png", "single_0.png", "single_1.png"]   # no temp files left


def test_module_doctests(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = doctest.testmod(H, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8
    assert result.failed == 0


def test_class_sums_energies_in_the_input_dtype_like_calochallenge():
    """CaloChallenge's class sums E_layer/E_tot with numpy in the showers' dtype and divides the energy-weighted
    float64 sums by that E_layer + 1e-16: the class (native sums) reproduces those bits for float32 input."""
    g = H.dataset_geometry("1-pions")
    x = _sparse_showers(g.n_voxels, 60, seed=8)
    hlf = H.HighLevelFeatures(g.particle, filename=_xml_path("1-pions"))
    hlf.CalculateFeatures(x)
    assert np.array_equal(hlf.GetEtot(), x.sum(axis=-1))
    for lid in g.relevant_layers:
        a, b = g.offsets[lid]
        e = x[:, a:b].sum(axis=-1)                                   # float32 pairwise sum, as the reference
        assert np.array_equal(hlf.GetElayers()[lid], e), lid
        r = g.layer(lid).voxel_coordinates()[0]
        ec = (r * x[:, a:b]).sum(axis=-1) / (e + 1e-16)
        np.testing.assert_allclose(hlf.GetECR()[lid], ec, rtol=1e-12, atol=1e-12)
    plain = H.compute_features(g, x)                                 # the float64-sum default differs in the bits
    assert not all(np.array_equal(plain["E_layer"][lid], hlf.GetElayers()[lid]) for lid in g.relevant_layers)
