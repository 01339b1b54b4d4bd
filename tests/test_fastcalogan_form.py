"""FastCaloGAN's own binning-XML form (optimised alpha bins, merged first r bin, GAN settings on particle /
region / range), voxelisation into per-r-bin alpha bins, its CSV layout, and its labels and normalisation.

The XML below is small enough to count by hand: every expected number in this file is derived in its comment.
"""
import math
import os

import h5py
import numpy as np
import pytest

import HighLevelFeatures as H
import plumbing as P
import preprocess

# root: optimised alpha bins and a merged first r bin. Photons (pid 22, no name attribute: FastCaloGAN's form)
# with alpha over [-pi, pi]; electrons (pid 11) with alpha symmetrised over [0, pi].
XML = """<?xml version="1.0"?>
<Bins optimisedAlphaBins="true" isPolar="true" mergeAlphaBinsInFirstRBin="true">
  <Particle pid="22" symmetriseAlpha="false" latentDim="50" lambda="10" learningRate="1e-4" batchSize="128"
            gdratio="5" beta="0.55" generator="50,100,200" label_definition="LogE" voxel_normalisation="normE">
    <EnergyRanges>
      <Range name="UltraLow12" useBatchNormalisation="True" activationFunction="ReLU" batchSize="512"/>
      <Range name="High12" useBatchNormalisation="True" activationFunction="swish" latentDim="70"/>
    </EnergyRanges>
    <Bin etaMin="0" etaMax="5" regionId="0" latentDim="60" lambda="3">
      <Layer id="0" r_edges="0,5,10" n_bin_alpha="1"/>
      <Layer id="1" nbins="4" r_min="0" r_max="40" n_bin_alpha="8"/>
      <Layer id="2" r_edges="0,1,3,10" n_bin_alpha="4"/>
      <Layer id="3" r_edges="0" n_bin_alpha="1"/>
    </Bin>
    <Bin etaMin="5" etaMax="10" regionId="1">
      <Layer id="0" r_edges="0,5,10" n_bin_alpha="1"/>
    </Bin>
  </Particle>
  <Particle pid="11" symmetriseAlpha="true" latentDim="50">
    <Bin etaMin="0" etaMax="5" regionId="0">
      <Layer id="0" r_edges="0,5,10" n_bin_alpha="1"/>
      <Layer id="1" nbins="4" r_min="0" r_max="40" n_bin_alpha="8"/>
      <Layer id="2" r_edges="0,1,3,10" n_bin_alpha="4"/>
      <Layer id="3" r_edges="0" n_bin_alpha="1"/>
    </Bin>
  </Particle>
</Bins>
"""
# alpha bins per r bin, b = circumference at the centre / width (pi c when symmetrised):
#   layer 1 (edges 0,10,20,30,40; centres 5,15,25,35; width 10): 2 pi c / 10 = 3.1, 9.4, 15.7, 22.0 -> 4, 16, 16, 32
#           symmetrised pi c / 10 = 1.6, 4.7, 7.9, 11.0 -> 4, 8, 8, 16; the first r bin merged -> 1
#   layer 2 (edges 0,1,3,10; centres 0.5, 2, 6.5; widths 1, 2, 7): 2 pi c / w = 3.1, 6.3, 5.8 -> 4, 8, 8
#           symmetrised 1.6, 3.1, 2.9 -> 4, 4, 4; the first merged -> 1
#   layer 0 (n_bin_alpha 1): 2 voxels; layer 3: none
PHOTON_ALPHA = {0: [1, 1], 1: [1, 16, 16, 32], 2: [1, 8, 8]}      # 2 + 65 + 17 = 84 voxels
ELECTRON_ALPHA = {0: [1, 1], 1: [1, 8, 8, 16], 2: [1, 4, 4]}      # 2 + 33 + 9 = 44 voxels


@pytest.fixture()
def xml(tmp_path):
    path = tmp_path / "fastcalogan.xml"
    path.write_text(XML)
    return str(path)


def test_analytic_voxel_counts_and_order(xml):
    for particle, alpha, total in (("photon", PHOTON_ALPHA, 84), ("electron", ELECTRON_ALPHA, 44)):
        g = H.read_geometry(xml, particle, eta=0.02)
        assert g.n_voxels == total and g.optimised_alpha and g.merge_first_r
        assert {lay.id: lay.alpha_per_r.tolist() for lay in g.layers if lay.n_voxels} == alpha
        assert g.bin_edges == [0, 2, 2 + sum(alpha[1]), total, total]
        # FastCaloGAN's order (r outer, alpha inner) is the layer order of such layers
        np.testing.assert_array_equal(g.fastcalogan_order(), np.arange(total))
    g = H.read_geometry(xml, "photon", eta=0.02)
    lay = g.layer(1)
    np.testing.assert_allclose(lay.r_edges, [0, 10, 20, 30, 40])           # nbins / r_min / r_max
    assert lay.r_centres.tolist() == [0.0, 15.0, 25.0, 35.0]              # the merged disc is centred on the axis
    assert g.layer(0).r_centres.tolist() == [0.0, 7.5]
    assert g.voxel_index(1, 3, 1) == 2 + 1 + 3 and g.voxel_index(2, 7, 2) == 67 + 1 + 8 + 7
    names = g.voxel_names()
    assert names[2:7] == ["L1_a0_r0", "L1_a0_r1", "L1_a1_r1", "L1_a2_r1", "L1_a3_r1"] and len(names) == 84
    # the drop-in class sees the same layers
    hlf = H.HighLevelFeatures("photon", filename=xml, eta=0.02)
    assert hlf.num_voxel == [2, 65, 17] and hlf.relevantLayers == [0, 1, 2] and hlf.layersBinnedInAlpha == [1, 2]
    # without the root attributes the same layers are the fixed binning of the CaloChallenge form
    plain = xml.replace(".xml", "_plain.xml")
    with open(plain, "w") as f:
        f.write(XML.replace('optimisedAlphaBins="true"', 'optimisedAlphaBins="false"')
                .replace('mergeAlphaBinsInFirstRBin="true"', 'mergeAlphaBinsInFirstRBin="false"'))
    fixed = H.read_geometry(plain, "photon", eta=0.02)
    assert fixed.n_voxels == 2 + 4 * 8 + 3 * 4 and all(lay.regular for lay in fixed.layers)
    assert fixed.voxel_index(1, 3, 1) == 2 + 3 * 4 + 1                    # CaloChallenge order kept
    order = fixed.fastcalogan_order()
    assert order[2:2 + 9].tolist() == [2 + ia * 4 + 0 for ia in range(8)] + [2 + 1]


def test_optimised_alpha_bins_rule():
    f = H.optimised_alpha_bins
    # b = 2 pi c / w (width 1 here): just below / at each threshold; symmetrised b = pi c / w, half of it
    for b, want, want_sym in ((3.99, 4, 4), (4.0, 8, 4), (7.99, 8, 4), (8.0, 16, 8), (15.99, 16, 8),
                              (16.0, 32, 16), (31.9, 32, 16), (32.0, 32, 32), (100.0, 32, 32)):
        c = b / (2 * math.pi)
        assert f(c - 0.5, c + 0.5) == want, b
        assert f(c - 0.5, c + 0.5, symmetrise=True) == want_sym, b


def _hits(layer_r_alpha_e, eta0=0.02, phi0=0.3, radius=1500.0, n_layers=4):
    """Hits (one event) at distance r (mm) and angle alpha from the extrapolated point of each layer."""
    extrap = {k: np.zeros((1, n_layers)) for k in preprocess.EXTRAP_FIELDS}
    extrap["extrap_eta"][:] = eta0
    extrap["extrap_phi"][:] = phi0
    extrap["extrap_r"][:] = radius
    extrap["extrap_z"][:] = radius * math.sinh(eta0)
    cols = {k: [] for k in ("event", "layer", "eta", "phi", "energy")}
    for lid, r, alpha, e in layer_r_alpha_e:
        cols["event"].append(0)
        cols["layer"].append(lid)
        cols["eta"].append(eta0 + r * math.cos(alpha) / radius)   # mm per unit eta = r_extrap here (cosh cancels)
        cols["phi"].append(phi0 + r * math.sin(alpha) / radius)
        cols["energy"].append(e)
    return {k: np.array(v) for k, v in cols.items()}, extrap


def _centre(ia, n, lo=-math.pi):
    return lo + (ia + 0.5) * (math.pi - lo) / n


# (layer, r, alpha, energy, expected flat voxel) for photons: offsets 0 / 2 / 67
PHOTON_HITS = [
    (0, 3.0, 1.0, 1.0, 0), (0, 7.0, -2.0, 2.0, 1), (0, 50.0, 0.5, 4.0, 1),          # beyond the last edge: last bin
    (1, 4.0, 2.0, 8.0, 2 + 0),                                                       # merged disc
    (1, 15.0, _centre(3, 16), 16.0, 2 + 1 + 3), (1, 25.0, _centre(15, 16), 32.0, 2 + 1 + 16 + 15),
    (1, 35.0, _centre(0, 32), 64.0, 2 + 1 + 32 + 0), (1, 35.0, _centre(31, 32), 128.0, 2 + 1 + 32 + 31),
    (2, 0.5, -3.0, 256.0, 67), (2, 2.0, _centre(5, 8), 512.0, 67 + 1 + 5), (2, 6.5, _centre(7, 8), 1024.0, 67 + 16),
    (3, 5.0, 0.0, 2048.0, None),                                                     # a layer without voxels
]


def test_hand_placed_hits_land_in_their_bins(xml):
    g = H.read_geometry(xml, "photon", eta=0.02)
    hits, extrap = _hits([h[:4] for h in PHOTON_HITS])
    want = np.zeros((1, 84))
    for *_, e, v in PHOTON_HITS:
        if v is not None:
            want[0, v] += e
    got, acc = preprocess.voxelise_arrays(g, hits, extrap, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert acc.dropped_hits == 1 and acc.dropped_energy == 2048.0
    assert got.sum() == sum(h[3] for h in PHOTON_HITS[:-1])                         # energy conserved
    np.testing.assert_allclose(preprocess.voxelise_python_loop(g, hits, extrap, 1), want, atol=1e-9)
    # Layer.bin_index agrees hit by hit
    for lid, r, alpha, _, v in PHOTON_HITS[:-1]:
        lay = g.layer(lid)
        assert g.offsets[lid][0] + int(lay.bin_index(np.array([r]), np.array([alpha]))[0]) == v
    # symmetrised electrons: |alpha| is binned over [0, pi]; offsets 0 / 2 / 35
    ge = H.read_geometry(xml, "electron", eta=0.02)
    hits, extrap = _hits([(1, 15.0, -_centre(2, 8, 0.0), 1.0), (1, 35.0, _centre(13, 16, 0.0), 2.0),
                          (2, 6.5, -_centre(3, 4, 0.0), 4.0)])
    got, _ = preprocess.voxelise_arrays(ge, hits, extrap, 1)
    assert np.flatnonzero(got[0]).tolist() == [2 + 1 + 2, 2 + 1 + 8 + 8 + 13, 35 + 1 + 4 + 3]
    assert got.sum() == 7.0


def test_features_of_variable_alpha_layers(xml):
    g = H.read_geometry(xml, "photon", eta=0.02)
    x = np.zeros((2, 84))
    a = _centre(3, 16)
    x[0, 2] = 1.0                    # layer 1 merged disc: r = 0
    x[0, 2 + 1 + 3] = 3.0            # layer 1, r bin 1 (centre 15), alpha bin 3 of 16
    x[1, 67 + 1 + 8 + 2] = 2.0       # layer 2, r bin 2 (centre 6.5), alpha bin 2 of 8
    f = H.compute_features(g, x)
    assert f["E_layer"][1].tolist() == [4.0, 0.0] and f["Etot"].tolist() == [4.0, 2.0]
    assert f["EC_r"][1][0] == pytest.approx(3 * 15.0 / 4)
    assert f["width_r"][1][0] == pytest.approx(math.sqrt(3 * 225.0 / 4 - (45.0 / 4) ** 2))
    assert f["EC_eta"][1][0] == pytest.approx(3 * 15.0 * math.cos(a) / 4)
    assert f["EC_phi"][1][0] == pytest.approx(3 * 15.0 * math.sin(a) / 4)
    a2 = _centre(2, 8)
    assert f["EC_eta"][2][1] == pytest.approx(6.5 * math.cos(a2)) and f["width_eta"][2][1] == pytest.approx(0.0, abs=1e-6)
    assert f["sparsity"][1][0] == pytest.approx(1 - 2 / 65) and f["sparsity"][2][1] == pytest.approx(1 - 1 / 17)
    # the drawing handles per-r-bin alpha bins
    H.draw_shower(g, x[0], None)


def test_gan_settings_precedence(xml):
    g = H.read_geometry(xml, "photon", eta=0.02)
    s = g.gan_settings("High12")
    # latentDim: particle 50 < region 60 < range 70; lambda: particle 10 < region 3; batchSize from the particle
    assert (s["latentDim"][0], s["lambda"][0], s["batchSize"][0]) == (70, 3.0, 128)
    assert s["activationFunction"][0] == "swish" and s["useBatchNormalisation"][0] is True
    assert s["generator"][0] == [50, 100, 200] and s["label_definition"][0] == "LogE"
    assert s["latentDim"][1].endswith('<Range name="High12">') and s["lambda"][1].endswith('<Bin etaMin="0" etaMax="5">')
    low = g.gan_settings("low")                                        # calokit's name for UltraLow12
    assert (low["latentDim"][0], low["batchSize"][0], low["activationFunction"][0]) == (60, 512, "ReLU")
    assert g.gan_settings()["latentDim"][0] == 60 and g.latent_dim == 60
    other = H.read_geometry(xml, "photon", eta=0.07)                   # region 1 sets nothing
    assert other.gan_settings("High12")["lambda"][0] == 10.0 and other.gan_settings()["latentDim"][0] == 50


@pytest.mark.parametrize("name,lo,hi", [("All", 8, 22), ("UltraLow12", 6, 12), ("Low12", 8, 12), ("Low10", 8, 10),
                                        ("High12", 12, 22), ("High10", 10, 22), ("High15", 15, 22),
                                        ("High19", 19, 22), ("Mid1218", 12, 18), ("Mid1317", 13, 17)])
def test_fastcalogan_range_names(name, lo, hi):
    assert P.energy_range("photon", name) == (2.0**lo, 2.0**hi, True)
    p = np.array([2.0**(lo - 1), 2.0**lo, 2.0**hi, 2.0**(hi + 1)])
    assert P.in_energy_range(p, "pion", name).tolist() == [False, True, True, False]     # both ends included


# ----------------------------------------------------------------------------------------------
# CSV in FastCaloGAN's layout

def _write_hits_file(path, p, n_events, seed, eta0=0.02, radius=1500.0):
    """A hits file (the voxelise input format) of ``n_events`` events at momentum p: random hits in layers 0-3."""
    rng = np.random.default_rng(seed)
    n = 40 * n_events
    ev = np.repeat(np.arange(n_events), 40)
    layer = rng.integers(0, 4, n)
    r = rng.uniform(0, 45, n)
    alpha = rng.uniform(-math.pi, math.pi, n)
    with h5py.File(path, "w") as f:
        f["event"] = ev
        f["layer"] = layer
        f["eta"] = eta0 + r * np.cos(alpha) / radius
        f["phi"] = 0.3 + r * np.sin(alpha) / radius
        f["energy"] = rng.gamma(2.0, p / 100, n)
        f["truth_p"] = np.full(n_events, p)
        for k, v in (("extrap_eta", eta0), ("extrap_phi", 0.3), ("extrap_r", radius),
                     ("extrap_z", radius * math.sinh(eta0))):
            f[k] = np.full((n_events, 4), v)
    return str(path)


@pytest.mark.parametrize("optimised", [True, False])
def test_fastcalogan_csv_round_trip(tmp_path, xml, optimised):
    if not optimised:     # fixed alpha bins: FastCaloGAN's order differs from the HDF5's (alpha outer there)
        text = XML.replace('optimisedAlphaBins="true"', 'optimisedAlphaBins="false"')
        text = text.replace('mergeAlphaBinsInFirstRBin="true"', 'mergeAlphaBinsInFirstRBin="false"')
        with open(xml, "w") as f:
            f.write(text)
    files = [_write_hits_file(tmp_path / f"hits_{k}.h5", 2.0**k, 6, k) for k in (10, 12)]
    out, csv_root = str(tmp_path / "vox.h5"), str(tmp_path / "vox_dir")
    assert preprocess.main(["voxelise", "--binning", xml, "--particle", "photon", "--out", out, "--csv", csv_root,
                            "--csv-layout", "fastcalogan", *files]) == 0
    g = H.read_geometry(xml, "photon", eta=0.02)
    order = g.fastcalogan_order()
    assert sorted(order.tolist()) == list(range(g.n_voxels))
    assert (order != np.arange(g.n_voxels)).any() != optimised
    with h5py.File(out) as f:
        p, showers = f["incident_energies"][:, 0], f["showers"][...]
    for k in (10, 12):
        path = os.path.join(csv_root, "csvFiles", "pid22", "eta_0_5", f"pid22_E{2**k}_eta_0_5_voxalisation.csv")
        with open(path) as fh:
            first = fh.readline()
        assert all(c in "0123456789.e+-,\n" for c in first)          # no header row: numbers only
        rows = np.loadtxt(path, delimiter=",", ndmin=2)
        sel = showers[p == 2.0**k]
        assert rows.shape == (6, g.n_voxels)
        np.testing.assert_array_equal(rows.astype(np.float32), sel[:, order])       # voxel for voxel, exact
        np.testing.assert_array_equal(rows[:, np.argsort(order)].astype(np.float32), sel)
    # one voxel by hand: layer 1, r bin 1, alpha bin 2 sits at FastCaloGAN column 2 + n_alpha(r0) + 2
    lay = g.layer(1)
    col = 2 + int(lay.alpha_per_r[0]) + 2
    assert order[col] == g.voxel_index(1, 2, 1)


# ----------------------------------------------------------------------------------------------
# labels and normalisation (FastCaloGAN's DataReader: label over the range's E_kin list, voxels / E_kin)

def test_labels_and_normalisation_formulas():
    m = 139.57                                       # pion mass, MeV
    p = 2.0 ** np.arange(8, 23)                      # the "All" range: 2^8..2^22
    ekin = np.sqrt(p * p + m * m) - m
    np.testing.assert_allclose(P.kinetic_energy(p, "pion"), ekin, rtol=1e-15)
    e_min, e_max = ekin[0], ekin[-1]
    np.testing.assert_allclose(P.condition_label(ekin, e_min, e_max, "LogE"), np.log(ekin / e_min) / np.log(e_max / e_min))
    np.testing.assert_array_equal(P.condition_label(ekin, e_min, e_max, "LogE"), P.condition_label(ekin, e_min, e_max))
    assert P.condition_label(ekin, e_min, e_max, "LogE")[[0, -1]].tolist() == [0.0, 1.0]
    np.testing.assert_allclose(P.condition_label(ekin, e_min, e_max, "MaxE"), ekin / e_max)
    np.testing.assert_allclose(P.condition_label(ekin, e_min, e_max, "Exp"), np.log2(ekin))
    # photons: E_kin = p, so Exp is the momentum exponent
    assert P.condition_label(P.kinetic_energy(p, "photon"), 256.0, 2.0**22, "Exp").tolist() == list(range(8, 23))
    for scheme in ("V2", "LogE", "V1", "MaxE", "Exp"):
        lab = P.condition_label(ekin, e_min, e_max, scheme)
        np.testing.assert_allclose(P.label_to_ekin(lab, e_min, e_max, scheme), ekin, rtol=1e-12)
    np.testing.assert_array_equal(P.condition_vector([0.25, 0.5]), np.array([[0.25, 0.0], [0.5, 0.0]], np.float32))
    with pytest.raises(P.UserError, match="unknown label scheme"):
        P.condition_label(ekin, e_min, e_max, "Log")


@pytest.mark.parametrize("flag,scheme", [(None, "LogE"), ("MaxE", "MaxE"), ("Exp", "Exp")])
def test_prepare_labels_from_xml_or_flag(tmp_path, xml, flag, scheme):
    files = [_write_hits_file(tmp_path / f"hits_{k}.h5", 2.0**k, 4, k) for k in (10, 12)]
    vox = str(tmp_path / "vox.h5")
    assert preprocess.main(["voxelise", "--binning", xml, "--particle", "photon", "--out", vox, *files]) == 0
    out = str(tmp_path / "train.h5")
    args = ["prepare", "--binning", xml, "--particle", "photon", "--range", "Low12", "--out", out, vox]
    assert preprocess.main(args + (["--label", flag] if flag else [])) == 0
    with h5py.File(vox) as f:
        showers = f["showers"][...]
    with h5py.File(out) as f:
        assert f.attrs["label_scheme"] == scheme            # no flag: the XML particle's label_definition (LogE)
        assert (f.attrs["p_min"], f.attrs["p_max"]) == (2.0**8, 2.0**12) and f.attrs["ekin_min"] == 256.0
        label, ekin, voxels = f["label"][...], f["e_kin"][...], f["voxels"][...]
    want = {"LogE": np.log(ekin / 256.0) / np.log(4096.0 / 256.0), "MaxE": ekin / 4096.0, "Exp": np.log2(ekin)}[scheme]
    np.testing.assert_allclose(label, want, rtol=1e-6)
    assert sorted(set(label.tolist())) == sorted(set(want.astype(np.float32).tolist()))
    np.testing.assert_allclose(voxels, showers / ekin[:, None], rtol=1e-6)           # normE: voxels / E_kin


def test_low12_and_high12_training_files_have_their_own_logE_labels(tmp_path):
    """A CaloChallenge photon file with momenta 2^6..2^22 MeV: prepare --range Low12 keeps 2^8..2^12 (both ends),
    labelled log(p / 2^8) / log(2^4) = 0, 1/4, ..., 1; High12 keeps 2^12..2^22, labelled log(p / 2^12) / log(2^10)
    = 0, 0.1, ..., 1 (BoloGAN common/DataParameters.py; photons: E_kin = p); 2^12 is in both, at 1 and at 0."""
    exps = np.repeat(np.arange(6, 23), 3)
    einc = 2.0 ** exps
    showers = np.outer(einc, np.full(368, 1.0 / 368)).astype(np.float32)
    src = str(tmp_path / "cc.h5")
    P.write_calo_file(src, einc, showers)
    for name, lo, hi in (("Low12", 8, 12), ("High12", 12, 22)):
        out = str(tmp_path / f"train_{name}.h5")
        assert preprocess.main(["prepare", "--binning", os.path.join(P.__file__.rsplit("/", 1)[0], "binning",
                                "binning_dataset_1_photons.xml"), "--particle", "photon", "--range", name,
                                "--out", out, src]) == 0
        with h5py.File(out) as f:
            p = f["incident_energies"][:, 0]
            label = f["label"][:]
            assert (f.attrs["p_min"], f.attrs["p_max"]) == (2.0**lo, 2.0**hi)
            assert f.attrs["range"] == name
        assert sorted(set(np.log2(p).round().astype(int).tolist())) == list(range(lo, hi + 1))
        np.testing.assert_allclose(label, (np.log2(p) - lo) / (hi - lo), atol=1e-6)
        assert label.min() == pytest.approx(0.0, abs=1e-7) and label.max() == pytest.approx(1.0)
