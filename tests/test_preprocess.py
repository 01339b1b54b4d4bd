"""preprocess.py voxelise / prepare: exact hit -> voxel mapping, conservation, formats, errors (toy data, small)."""
import glob
import hashlib
import math
import os
import shutil

import h5py
import numpy as np
import pytest

import HighLevelFeatures as H
import preprocess
import plumbing
import toyshower
from HighLevelFeatures import HighLevelFeatures, read_geometry
from plumbing import kinetic_energy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINNING = os.path.join(ROOT, "binning")
XML_PHOTON = os.path.join(BINNING, "binning_dataset_1_photons.xml")
XML_PION = os.path.join(BINNING, "binning_dataset_1_pions.xml")
XML_FCG = os.path.join(BINNING, "binning_fastcalogan.xml")
XML_DS2 = os.path.join(BINNING, "binning_dataset_2.xml")


# ----------------------------------------------------------------------------------------------
# helpers


def write_hits(path, hits, extrap, truth_p, particle="photon", pdg=22):
    """A hits file in the hits layout of docs/formats-and-exports.md from plain arrays."""
    n = len(truth_p)
    with h5py.File(path, "w") as f:
        f.create_dataset("event", data=np.asarray(hits["event"], dtype=np.int64))
        f.create_dataset("layer", data=np.asarray(hits["layer"], dtype=np.int16))
        for k in ("eta", "phi", "r", "z", "energy"):
            f.create_dataset(k, data=np.asarray(hits[k], dtype=np.float64))
        f.create_dataset("truth_p", data=np.asarray(truth_p, dtype=np.float64))
        f.create_dataset("truth_pdg", data=np.full(n, pdg, dtype=np.int32))
        for k in preprocess.EXTRAP_FIELDS:
            f.create_dataset(k, data=np.asarray(extrap[k], dtype=np.float64))
        f.attrs["particle"] = particle


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def read_calo(path):
    with h5py.File(path) as f:
        return f["incident_energies"][:, 0], f["showers"][:], dict(f.attrs)


def layer_sums_from_hits(paths, layers):
    """Per (event across files in order, layer id) sums of hit energies, float64."""
    out = {lid: [] for lid in layers}
    for p in paths:
        with h5py.File(p) as f:
            n = f["truth_p"].shape[0]
            ev, lay, e = f["event"][:], f["layer"][:], f["energy"][:]
        for lid in layers:
            m = lay == lid
            out[lid].append(np.bincount(ev[m], weights=e[m], minlength=n))
    return {lid: np.concatenate(v) for lid, v in out.items()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Small toy hits files (photons at 3 energies, pions at 2) and their CLI voxelisation."""
    d = tmp_path_factory.mktemp("toy")
    for particle, energies, n in (("photon", ["256", "4096", "65536"], 60), ("pion", ["1024", "16384"], 40)):
        assert preprocess.main(["toy", "--particle", particle, "--eta", "0.20", "--events-per-energy", str(n),
                                "--seed", "4", "--energies", *energies, "--out", str(d / "hits")]) == 0
    def by_energy(particle):
        paths = glob.glob(str(d / "hits" / f"hits_{particle}_*.h5"))
        return sorted(paths, key=lambda p: int(p.split("_E")[1].split("_")[0]))

    photon_files, pion_files = by_energy("photon"), by_energy("pion")
    vox = str(d / "voxels_photon.h5")
    assert preprocess.main(["voxelise", "--binning", XML_PHOTON, "--particle", "photon", "--out", vox,
                            "--csv", str(d / "csv"), *photon_files]) == 0
    return {"dir": d, "photon_files": photon_files, "pion_files": pion_files, "vox": vox, "csv": str(d / "csv")}


# ----------------------------------------------------------------------------------------------
# the mapping, analytically


def _custom_xml(path, symmetrise):
    body = """      <Layer id="0" r_edges="0,10,20,50" n_bin_alpha="4"/>
      <Layer id="1" r_edges="0,5,100" n_bin_alpha="1"/>
      <Layer id="2" r_edges="0" n_bin_alpha="1"/>"""
    if symmetrise:
        text = (f'<Bins>\n  <Particle pid="22" name="photon" symmetriseAlpha="true">\n'
                f'    <Bin etaMin="25" etaMax="30">\n{body}\n    </Bin>\n'
                f'    <Bin etaMin="30" etaMax="35">\n{body}\n    </Bin>\n  </Particle>\n</Bins>\n')
    else:
        text = f'<Bins>\n  <Bin pid="22" etaMin="0" etaMax="130" name="photon">\n{body}\n  </Bin>\n</Bins>\n'
    with open(path, "w") as fh:
        fh.write(text)
    return str(path)


# (event, layer, x_mm or None, y_mm or None, r_mm, alpha, energy, ia without / with symmetrisation, ir);
# x is eta_hit - eta_x in mm, before the sign flip of events at eta < 0
# layer 0: r edges 0,10,20,50 and 4 alpha bins: (-pi, pi] in pi/2 steps, or [0, pi] in pi/4 steps (symmetrised)
HAND_HITS = [
    (0, 0, None, None, 15.0, math.pi / 8, 1.0, 2, 0, 1),
    (0, 0, None, None, 15.0, -math.pi / 8, 2.0, 1, 0, 1),
    (0, 0, None, None, 5.0, -7 * math.pi / 8, 4.0, 0, 3, 0),
    (0, 0, None, None, 30.0, 5 * math.pi / 8, 8.0, 3, 2, 2),
    (0, 0, None, None, 200.0, -3 * math.pi / 8, 16.0, 1, 1, 2),        # beyond the last edge -> last r bin
    (0, 0, None, None, 25.0, math.pi - 0.02, 32.0, 3, 3, 2),           # just below +pi
    (0, 0, None, None, 25.0, -math.pi + 0.02, 64.0, 0, 3, 2),          # just above -pi: other side of the cut
    (0, 0, -25.0, 0.0, None, math.pi, 128.0, 3, 3, 2),                 # alpha = pi exactly: last bin
    (0, 0, 10.0, 100.0, None, math.atan2(100, 10), 256.0, 2, 1, 2),    # phi of the hit wraps past +pi
    # event 1 is at eta < 0: FastCaloGAN negates deta there, so its alpha is pi - alpha (the bins say so)
    (1, 0, -10.0, -100.0, None, math.atan2(-100, -10), 512.0, 1, 1, 2),  # phi wraps past -pi
    (1, 0, None, None, 15.0, 3 * math.pi / 8, 1024.0, 3, 2, 1),
    (0, 1, 2.0, 2.0, None, math.pi / 4, 2048.0, 0, 0, 0),
    (1, 1, None, None, 50.0, 0.3, 4096.0, 0, 0, 1),
    (1, 1, None, None, 500.0, -2.0, 8192.0, 0, 0, 1),
    (0, 2, None, None, 10.0, 0.5, 16384.0, None, None, None),          # layer without voxels: dropped
]
HAND_ETA = [0.32, -0.32]
HAND_PHI = [3.1, -3.1]          # hits near +-pi cross the phi cut
HAND_R = {0: 1500.0, 1: 1800.0, 2: 2000.0}


def hand_event():
    """Hits placed at known (deta_mm, dphi_mm) around the extrapolation; at the extrapolated point
    |2 e^-eta / (1 + e^-2 eta)| sqrt(r^2 + z^2) = r because z = r sinh(eta), so deta = x / r, dphi = y / r."""
    extrap = {k: np.zeros((2, 3)) for k in preprocess.EXTRAP_FIELDS}
    for ev in range(2):
        for lid, r in HAND_R.items():
            extrap["extrap_eta"][ev, lid] = HAND_ETA[ev]
            extrap["extrap_phi"][ev, lid] = HAND_PHI[ev]
            extrap["extrap_r"][ev, lid] = r
            extrap["extrap_z"][ev, lid] = r * math.sinh(HAND_ETA[ev])
    hits = {k: [] for k in ("event", "layer", "eta", "phi", "r", "z", "energy")}
    for ev, lid, x, y, r, alpha, e, *_ in HAND_HITS:
        if x is None:
            x, y = r * math.cos(alpha), r * math.sin(alpha)
        phi = HAND_PHI[ev] + y / HAND_R[lid]
        phi = phi - 2 * math.pi if phi > math.pi else (phi + 2 * math.pi if phi <= -math.pi else phi)
        eta = HAND_ETA[ev] + x / HAND_R[lid]
        for k, v in (("event", ev), ("layer", lid), ("eta", eta), ("phi", phi), ("r", HAND_R[lid]),
                     ("z", HAND_R[lid] * math.sinh(eta)), ("energy", e)):
            hits[k].append(v)
    return {k: np.array(v) for k, v in hits.items()}, extrap


def hand_expected(symmetrise):
    """Showers (2, 14) from the analytic voxel of every hand-made hit: index = offset + ia * n_r + ir."""
    out = np.zeros((2, 14))
    for ev, lid, x, y, r, alpha, e, ia_ns, ia_s, ir in HAND_HITS:
        if lid == 0:
            out[ev, (ia_s if symmetrise else ia_ns) * 3 + ir] += e
        elif lid == 1:
            out[ev, 12 + ir] += e
    return out


@pytest.mark.parametrize("symmetrise", [False, True])
def test_hand_made_event_lands_in_expected_voxels(tmp_path, capsys, symmetrise):
    xml = _custom_xml(tmp_path / "bins.xml", symmetrise)
    geom = read_geometry(xml, "photon", eta=0.32)
    hits, extrap = hand_event()
    want = hand_expected(symmetrise)
    assert want.sum() == sum(h[6] for h in HAND_HITS[:-1])
    got, acc = preprocess.voxelise_arrays(geom, hits, extrap, 2)
    np.testing.assert_array_equal(got, want)
    assert (acc.dropped_hits, acc.dropped_energy) == (1, 16384.0)
    np.testing.assert_array_equal(preprocess.voxelise_python_loop(geom, hits, extrap, 2), want)
    # the same through the command line and a hits file (the slice comes from the extrapolated |eta| 0.32)
    write_hits(tmp_path / "hits.h5", hits, extrap, [1000.0, 2000.0])
    out = tmp_path / "vox.h5"
    assert preprocess.main(["voxelise", "--binning", xml, "--particle", "photon", "--jobs", "1", "--out", str(out),
                            str(tmp_path / "hits.h5")]) == 0
    assert "1 dropped in non-voxelised layers" in capsys.readouterr().out
    p, showers, attrs = read_calo(out)
    np.testing.assert_array_equal(p, [1000.0, 2000.0])
    np.testing.assert_array_equal(showers, want.astype(np.float32))
    assert (attrs["eta_min"], attrs["eta_max"]) == ((30.0, 35.0) if symmetrise else (0.0, 130.0))


@pytest.mark.parametrize("xml, particle", [(XML_PHOTON, "photon"), (XML_PION, "pion"), (XML_DS2, "electron"),
                                          (os.path.join(BINNING, "binning_dataset_3.xml"), "electron")])
@pytest.mark.parametrize("fallback", [False, True])
def test_r_lookup_equals_layer_bin_index(monkeypatch, xml, particle, fallback):
    """The look-up-table r binning equals HighLevelFeatures' Layer.bin_index, on and next to every edge."""
    if fallback:
        monkeypatch.setattr(preprocess, "LUT_MAX_CELLS", 0)
    geom = read_geometry(xml, particle)
    m = preprocess.VoxelMapper(geom)
    assert (m.table is None) == fallback
    rng = np.random.default_rng(0)
    first = 0
    for k, lay in enumerate(m.layers):
        e = lay.r_edges
        rr = np.concatenate([e, np.nextafter(e, np.inf), np.nextafter(e[1:], 0), rng.uniform(0, 1.2 * e[-1], 500),
                             [0.0, 1e9, np.inf]])
        want = lay.bin_index(rr, np.full(rr.size, -math.pi)) % lay.n_r
        got = m.r_bins(np.full(rr.size, k, dtype=np.int64), rr) - first
        np.testing.assert_array_equal(got, want)
        first += lay.n_r


def _random_hits(geom, n_events, n_hits, seed, spread_mm=80.0):
    """Random hits in every listed layer around random extrapolations (phi near the cut for a third)."""
    rng = np.random.default_rng(seed)
    ids = np.array([lay.id for lay in geom.layers])
    ncol = ids.max() + 1
    eta0 = rng.uniform(-1.2, 1.2, n_events)
    phi0 = np.where(rng.random(n_events) < 0.33, rng.choice([-1, 1], n_events) * rng.uniform(3.0, math.pi, n_events),
                    rng.uniform(-math.pi, math.pi, n_events))
    r0 = rng.uniform(1400, 4000, (n_events, ncol))
    extrap = {"extrap_eta": np.repeat(eta0[:, None], ncol, 1), "extrap_phi": np.repeat(phi0[:, None], ncol, 1),
              "extrap_r": r0, "extrap_z": r0 * np.sinh(eta0)[:, None]}
    ev = np.sort(rng.integers(0, n_events, n_hits))
    lay = rng.choice(ids, n_hits)
    r_l = r0[ev, lay]
    x, y = rng.normal(0, spread_mm, n_hits), rng.normal(0, spread_mm, n_hits)
    eta = eta0[ev] + x / r_l
    phi = H.wrap_phi(phi0[ev] + y / r_l)
    hits = {"event": ev, "layer": lay, "eta": eta, "phi": phi, "r": r_l, "z": r_l * np.sinh(eta),
            "energy": rng.exponential(10.0, n_hits)}
    return hits, extrap


def _symmetrised_fcg(tmp_path):
    path = tmp_path / "fcg_sym.xml"
    with open(XML_FCG) as fh:
        path.write_text(fh.read().replace('symmetriseAlpha="false"', 'symmetriseAlpha="true"'))
    return str(path)


@pytest.mark.parametrize("case", ["photon-toy", "pion-toy", "ds2-random", "sym-random", "fallback-random",
                                  "unordered-random"])
def test_vectorised_equals_python_loop(tmp_path, monkeypatch, case):
    if case.endswith("toy"):
        particle = case.split("-")[0]
        geom = read_geometry(XML_PHOTON if particle == "photon" else XML_PION, particle)
        d = toyshower.generate(particle, 16384.0, 16, seed=11)
        hits, extrap, n_events = d["hits"], d, 16
    else:
        if case == "fallback-random":
            monkeypatch.setattr(preprocess, "LUT_MAX_CELLS", 0)
        geom = (read_geometry(XML_DS2, "electron") if case == "ds2-random"
                else read_geometry(_symmetrised_fcg(tmp_path), "pion", eta=0.6))
        n_events = 40
        if case == "unordered-random":     # events scattered over a block: the compact accumulation path
            geom, n_events = read_geometry(XML_PION, "pion"), 3000
        hits, extrap = _random_hits(geom, n_events, 4000, seed=len(case))
        if case == "unordered-random":
            order = np.random.default_rng(2).permutation(hits["energy"].size)
            hits = {k: v[order] for k, v in hits.items()}
    assert hits["energy"].size >= 2000
    got, _ = preprocess.voxelise_arrays(geom, hits, extrap, n_events)
    want = preprocess.voxelise_python_loop(geom, hits, extrap, n_events)
    assert np.count_nonzero(want) > 100
    assert case != "unordered-random" or (n_events * geom.n_voxels > 4 * hits["energy"].size + 2 ** 16)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(got > 0, want > 0)


# ----------------------------------------------------------------------------------------------
# conservation and the CaloChallenge / CSV outputs


@pytest.mark.parametrize("particle, xml, dropped_layers", [("photon", XML_PHOTON, (13, 14, 15)),
                                                           ("pion", XML_PION, (15,))])
def test_energy_conservation_on_toy_hits(particle, xml, dropped_layers):
    geom = read_geometry(xml, particle)
    for energy in (512.0, 2.0 ** 17):
        d = toyshower.generate(particle, energy, 50, seed=8)
        h = d["hits"]
        showers, acc = preprocess.voxelise_arrays(geom, h, d, 50)
        vox = np.isin(h["layer"], geom.relevant_layers)
        assert abs(showers.sum() - h["energy"][vox].sum()) <= 1e-9 * h["energy"][vox].sum()
        per_event = np.bincount(h["event"][vox], weights=h["energy"][vox], minlength=50)
        np.testing.assert_allclose(showers.sum(axis=1), per_event, rtol=1e-9, atol=0)
        for lid in geom.relevant_layers:
            m = h["layer"] == lid
            a, b = geom.offsets[lid]
            np.testing.assert_allclose(showers[:, a:b].sum(axis=1), np.bincount(h["event"][m], weights=h["energy"][m],
                                                                                minlength=50), rtol=1e-9, atol=1e-12)
        order = np.random.default_rng(1).permutation(h["energy"].size)    # hits in any order: same showers
        shuffled, _ = preprocess.voxelise_arrays(geom, {k: v[order] for k, v in h.items()}, d, 50)
        np.testing.assert_allclose(shuffled, showers, rtol=1e-12, atol=1e-12)
        drop = np.isin(h["layer"], dropped_layers)
        assert acc.dropped_hits == int(drop.sum())
        assert acc.dropped_energy == pytest.approx(float(h["energy"][drop].sum()), rel=1e-12)
        assert acc.hits == h["energy"].size


def test_cli_output_matches_hits_via_high_level_features(toy):
    p, showers, attrs = read_calo(toy["vox"])
    truth = np.concatenate([h5py.File(f)["truth_p"][:] for f in toy["photon_files"]])
    np.testing.assert_array_equal(p, truth)                       # incident_energies = truth_p, file order
    assert showers.dtype == np.float32 and showers.shape == (180, 368)
    assert (attrs["particle"], attrs["pid"], attrs["eta_min"], attrs["eta_max"]) == ("photon", 22, 0.0, 130.0)
    hlf = HighLevelFeatures("photon", filename=XML_PHOTON)
    hlf.CalculateFeatures(showers)
    sums = layer_sums_from_hits(toy["photon_files"], hlf.relevantLayers)
    for lid in hlf.relevantLayers:
        np.testing.assert_allclose(hlf.GetElayers()[lid], sums[lid], rtol=2e-6, atol=1e-3)


def test_csv_and_hdf5_agree(toy):
    p, showers, _ = read_calo(toy["vox"])
    geom = read_geometry(XML_PHOTON, "photon")
    names = sorted(os.listdir(toy["csv"]))
    assert names == sorted(f"pid22_E{e}_eta_0_130.csv" for e in (256, 4096, 65536))
    for energy in (256, 4096, 65536):
        path = os.path.join(toy["csv"], f"pid22_E{energy}_eta_0_130.csv")
        with open(path) as fh:
            header = fh.readline().strip().split(",")
        assert header == geom.voxel_names()
        assert header[0] == "L0_a0_r0" and header[8] == "L1_a0_r0" and header[9] == "L1_a0_r1"   # r fastest
        rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
        np.testing.assert_array_equal(rows, showers[p == energy])


def test_jobs_and_chunks_do_not_change_output(toy, tmp_path):
    files = toy["pion_files"]
    outs = []
    for extra in (["--jobs", "1", "--chunk", "777"], ["--jobs", "2"]):
        out = str(tmp_path / f"v{len(outs)}.h5")
        assert preprocess.main(["voxelise", "--binning", XML_PION, "--particle", "pion", "--out", out,
                                *extra, *files]) == 0
        outs.append(read_calo(out))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_slice_chosen_from_extrapolation(toy, tmp_path, capsys):
    out = str(tmp_path / "v.h5")
    assert preprocess.main(["voxelise", "--binning", XML_FCG, "--particle", "pion", "--out", out,
                            *toy["pion_files"]]) == 0
    _, showers, attrs = read_calo(out)
    assert (attrs["eta_min"], attrs["eta_max"], showers.shape[1]) == (20.0, 25.0, 533)
    assert "|eta| 0.20-0.25" in capsys.readouterr().out
    # a file of another slice next to it: refused, nothing written
    d = tmp_path / "other"
    assert preprocess.main(["toy", "--particle", "pion", "--eta", "0.40", "--events-per-energy", "5",
                            "--energies", "1024", "--out", str(d)]) == 0
    other = str(d / "hits_pion_E1024_eta_040_045.h5")
    out2 = str(tmp_path / "v2.h5")
    assert preprocess.main(["voxelise", "--binning", XML_FCG, "--particle", "pion", "--out", out2,
                            toy["pion_files"][0], other]) == 2
    assert "one slice at a time" in capsys.readouterr().err and not os.path.exists(out2)


# ----------------------------------------------------------------------------------------------
# bad inputs: exit 2, one line naming file and reason, nothing written, inputs unchanged


def _set(f, name, index, value):
    """Overwrite one element of a dataset in place."""
    a = f[name][:]
    a[index] = value
    f[name][...] = a


def _corrupt(f, name):
    """Damage a copy of a good hits file in one way."""
    if name == "nan":
        _set(f, "energy", 7, np.nan)
    elif name == "inf":
        _set(f, "energy", 3, np.inf)
    elif name == "negative":
        _set(f, "energy", 5, -1.0)
    elif name == "layer":
        _set(f, "layer", 9, 30)
    elif name == "event":
        _set(f, "event", -1, f["truth_p"].shape[0])
    elif name == "eta":
        f["extrap_eta"][...] = np.where(np.isfinite(f["extrap_eta"][:]), 2.0, np.nan)
    elif name == "empty":
        for k in preprocess.HIT_FIELDS + ("r", "z"):
            dt = f[k].dtype
            del f[k]
            f.create_dataset(k, shape=(0,), dtype=dt)
    elif name == "missing":
        del f["extrap_phi"]
    elif name == "extrap_nan":
        _set(f, "extrap_r", (2, 1), np.nan)


@pytest.mark.parametrize("case, reason", [
    ("nan", "'energy' has NaN/inf values (first at hit row 7)"),
    ("inf", "'energy' has NaN/inf values (first at hit row 3)"),
    ("negative", "'energy' has negative values (first at hit row 5)"),
    ("layer", "layer id(s) [30] that the binning XML does not list"),
    ("event", "is out of range"),
    ("eta", "outside the XML's slices"),
    ("empty", "empty input"),
    ("missing", "missing dataset 'extrap_phi'"),
    ("extrap_nan", "no finite extrapolated position"),
    ("particle", "but --particle is pion"),
    ("not-hdf5", "not a readable HDF5 file"),
    ("no-file", "file not found"),
])
def test_voxelise_bad_input_exit_2(toy, tmp_path, capsys, case, reason):
    bad = str(tmp_path / "bad_hits.h5")
    good = toy["photon_files"][0]
    if case == "not-hdf5":
        with open(bad, "w") as fh:
            fh.write("event,layer\n1,2\n")
    elif case != "no-file":
        shutil.copy(good, bad)
        if case != "particle":
            with h5py.File(bad, "a") as f:
                _corrupt(f, case)
    before = {p: sha(p) for p in (good, bad) if os.path.exists(p)}
    out = tmp_path / "out" / "vox.h5"
    out.parent.mkdir()
    csv_dir = tmp_path / "csv"
    particle = "pion" if case == "particle" else "photon"
    xml = XML_FCG if case == "eta" else (XML_PION if case == "particle" else XML_PHOTON)
    rc = preprocess.main(["voxelise", "--binning", xml, "--particle", particle, "--out", str(out), "--csv",
                          str(csv_dir), good, bad] if case != "particle" else
                         ["voxelise", "--binning", xml, "--particle", particle, "--out", str(out), bad])
    err = capsys.readouterr().err
    assert rc == 2
    assert reason in err and bad in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert os.listdir(out.parent) == []                             # no output, no temporary left behind
    assert not csv_dir.exists()
    assert before == {p: sha(p) for p in before}                     # inputs untouched


def test_voxelise_refuses_to_overwrite_its_input(toy, capsys):
    f = toy["photon_files"][0]
    before = sha(f)
    assert preprocess.main(["voxelise", "--binning", XML_PHOTON, "--particle", "photon", "--out", f, f]) == 2
    assert "overwrite" in capsys.readouterr().err and sha(f) == before


# ----------------------------------------------------------------------------------------------
# prepare


def test_prepare_normalisation_inverts(toy, tmp_path, capsys):
    p_in, showers_in, _ = read_calo(toy["vox"])
    out_dir = tmp_path / "train"
    out_dir.mkdir()
    assert preprocess.main(["prepare", "--binning", XML_PHOTON, "--particle", "photon", "--range", "high",
                            "--out", str(out_dir), toy["vox"]]) == 0
    assert "prepare: wrote" in capsys.readouterr().out
    path = out_dir / "train_photon_eta_0_130_high.h5"
    with h5py.File(path) as f:
        vox, label, p, ekin = f["voxels"][:], f["label"][:], f["incident_energies"][:, 0], f["e_kin"][:]
        attrs = dict(f.attrs)
        assert f["incident_energies"].shape == (p.size, 1)
    sel = p_in > 4096.0                       # 'high' = p > 2^12
    assert vox.dtype == np.float32 and label.dtype == np.float32 and p.size == int(sel.sum()) == 60
    np.testing.assert_array_equal(p, p_in[sel])
    np.testing.assert_array_equal(ekin, kinetic_energy(p, "photon"))
    # inverse: showers = voxels * e_kin (float32 rounding: 1 ulp), e_kin from the label and the attrs
    np.testing.assert_allclose(vox * ekin[:, None], showers_in[sel], rtol=2.5e-7, atol=1e-30)
    back = plumbing.label_to_ekin(label, attrs["ekin_min"], attrs["ekin_max"], attrs["label_scheme"])
    np.testing.assert_allclose(back, ekin, rtol=1e-6)
    want = {"particle": "photon", "pid": 22, "eta_min": 0.0, "eta_max": 130.0, "range": "high",
            "binning": XML_PHOTON, "label_scheme": "V2", "max_exp": 22, "p_min": 4096.0, "p_max": 2.0 ** 22,
            "ekin_min": 4096.0, "ekin_max": 2.0 ** 22, "latent_dim": 50, "n_voxels": 368, "source": toy["vox"]}
    assert {k: attrs[k] for k in want} == want


def test_prepare_ranges_labels_and_pions(toy, tmp_path):
    out = str(tmp_path / "low.h5")
    assert preprocess.main(["prepare", "--binning", XML_PHOTON, "--particle", "photon", "--range", "low",
                            "--label", "V1", "--out", out, toy["vox"]]) == 0
    with h5py.File(out) as f:
        p, label = f["incident_energies"][:, 0], f["label"][:]
        assert sorted(set(p.tolist())) == [256.0, 4096.0]            # 2^12 belongs to 'low'
        np.testing.assert_allclose(label, p / 2.0 ** 22, rtol=1e-7)
    vox = str(tmp_path / "pions.h5")
    assert preprocess.main(["voxelise", "--binning", XML_FCG, "--particle", "pion", "--out", vox,
                            *toy["pion_files"]]) == 0
    out_dir = str(tmp_path) + os.sep
    assert preprocess.main(["prepare", "--binning", XML_FCG, "--particle", "pion", "--out", out_dir, vox]) == 0
    with h5py.File(os.path.join(out_dir, "train_pion_eta_20_25_all.h5")) as f:
        ekin, label = f["e_kin"][:], f["label"][:]
        p, (vmin, vmax) = f["incident_energies"][:, 0], (f.attrs["ekin_min"], f.attrs["ekin_max"])
        showers_back = f["voxels"][:] * ekin[:, None]
    assert vmin == pytest.approx(kinetic_energy(256.0, "pion"))
    assert vmax == pytest.approx(kinetic_energy(2.0 ** 22, "pion"))
    np.testing.assert_allclose(ekin, np.sqrt(p ** 2 + 139.57 ** 2) - 139.57, rtol=1e-12)
    np.testing.assert_allclose(label, np.log(ekin / vmin) / np.log(vmax / vmin), rtol=1e-6)
    np.testing.assert_allclose(showers_back, read_calo(vox)[1], rtol=2.5e-7, atol=1e-30)


@pytest.mark.parametrize("case, reason", [
    ("voxels", "expected 533"),
    ("range", "not defined for pion"),
    ("empty-range", "no events with p in the 'low' range"),
    ("label", "--label V3: choose from V2, LogE, V1, MaxE, Exp"),
    ("particle", "holds photon showers"),
])
def test_prepare_bad_input_exit_2(toy, tmp_path, capsys, case, reason):
    before = sha(toy["vox"])
    out = tmp_path / "o" / "train.h5"
    out.parent.mkdir()
    args = {"voxels": ["--binning", XML_PION, "--particle", "pion", "--eta", "0.2"],
            "range": ["--binning", XML_PION, "--particle", "pion", "--range", "high"],
            "empty-range": ["--binning", XML_PHOTON, "--particle", "photon", "--range", "low"],
            "label": ["--binning", XML_PHOTON, "--particle", "photon", "--label", "V3"],
            "particle": ["--binning", str(tmp_path / "electron.xml"), "--particle", "electron"]}[case]
    with open(XML_PHOTON) as fh:   # the photon binning under an electron name: only the file's particle differs
        text = fh.read().replace('pid="22"', 'pid="11"').replace('"photon"', '"electron"')
    (tmp_path / "electron.xml").write_text(text)
    src = toy["vox"]
    if case == "empty-range":    # a voxel file with only 65536 MeV events
        src = str(tmp_path / "high_only.h5")
        p, s, _ = read_calo(toy["vox"])
        with h5py.File(src, "w") as f:
            f["incident_energies"] = p[p > 5000][:, None]
            f["showers"] = s[p > 5000]
    rc = preprocess.main(["prepare", *args, "--out", str(out), src])
    err = capsys.readouterr().err
    assert rc == 2 and reason in err, err
    assert os.listdir(out.parent) == [] and sha(toy["vox"]) == before


def test_phi_wrap_is_minus_pi_exclusive_everywhere():
    """dphi is wrapped into (-pi, pi]: -pi becomes +pi. A hit exactly half a turn from the extrapolated phi therefore
    has dphi_mm = +pi r and alpha = +pi/2 (alpha bin 7 of 10 over (-pi, pi]); with a [-pi, pi) wrap it would land at
    alpha = -pi/2 (bin 2). The voxeliser, its per-hit reference and the toy use the one wrap_phi."""
    import toyshower
    assert preprocess.wrap_phi is H.wrap_phi and toyshower.wrap_phi is H.wrap_phi
    x = np.array([math.pi, -math.pi, 3 * math.pi, -3 * math.pi, 0.0, np.nextafter(-math.pi, 0), 2 * math.pi])
    np.testing.assert_allclose(H.wrap_phi(x), [math.pi, math.pi, math.pi, math.pi, 0.0, np.nextafter(-math.pi, 0), 0.0],
                               atol=1e-15)
    y = x.copy()
    assert H.wrap_phi(y, out=y) is y and y[1] == math.pi                    # in place
    rng = np.random.default_rng(5)
    z = rng.uniform(-20, 20, 10000)
    w = H.wrap_phi(z)
    assert (w > -math.pi).all() and (w <= math.pi).all()
    np.testing.assert_allclose(np.cos(w), np.cos(z), atol=1e-12)
    np.testing.assert_allclose(np.sin(w), np.sin(z), atol=1e-12)

    geom = read_geometry(XML_PHOTON, "photon")
    ncol = 13
    phi0 = math.pi / 2
    extrap = {"extrap_eta": np.zeros((1, ncol)), "extrap_phi": np.full((1, ncol), phi0),
              "extrap_r": np.full((1, ncol), 1500.0), "extrap_z": np.zeros((1, ncol))}
    phi_hit = phi0 - math.pi
    assert phi_hit - phi0 == -math.pi                                       # exactly half a turn below
    hits = {"event": np.array([0]), "layer": np.array([1]), "eta": np.array([0.0]), "phi": np.array([phi_hit]),
            "r": np.array([1500.0]), "z": np.array([0.0]), "energy": np.array([5.0])}
    lay1 = geom.offsets[1][0]
    want = np.zeros((1, geom.n_voxels))
    want[0, lay1 + 7 * 16 + 15] = 5.0                                       # alpha bin 7, last r bin (r > 200 mm)
    got, _ = preprocess.voxelise_arrays(geom, hits, extrap, 1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(preprocess.voxelise_python_loop(geom, hits, extrap, 1), want)
