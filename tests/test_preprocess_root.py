"""preprocess.py voxelise on FastCaloSim input ntuples (ROOT, through the optional uproot).

Fixtures are written here with uproot (``mktree`` + ``extend``): the same toy showers as calokit hits HDF5 and as
each ntuple form -- ATLAS ISF_HitAnalysis with SaveAllBranches (flat HitX/HitY/HitZ/HitE/HitSampling/
HitSamplingFraction with raw energies, Truth*, newTTC_*), and the Open Data Detector converter's split
``vector<FCS_hit>`` branch ``hits`` (GeV, no truth). Positions are float32 in the ntuple, so the HDF5 twin holds
eta, phi, r of those float32 positions: then both paths see the same numbers and the voxels must be identical.
"""
import os

import h5py
import numpy as np
import pytest

uproot = pytest.importorskip("uproot")
ak = pytest.importorskip("awkward")

import preprocess  # noqa: E402
import toyshower  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XML = os.path.join(ROOT, "binning", "binning_dataset_1_photons.xml")      # 10 alpha bins over (-pi, pi]
XML_FCG = os.path.join(ROOT, "binning", "binning_fastcalogan.xml")
TREE = "FCS_ParametrizationInput"
#: sampling fractions of the fixture (powers of two, so raw energy <-> scaled energy is exact)
SF = {s: (0.5 if 12 <= s <= 20 else 0.25) for s in range(24)}


def toy_showers(n_events=120, energy=65536.0, seed=3, particle="photon", mirror=False):
    """Toy showers as float32 positions/energies: a dict of per-hit x, y, z, energy, layer, event and per-event
    truth momentum components, PDG id and (n, 24) extrapolation; ``mirror`` flips z (the shower at -eta)."""
    d = toyshower.generate(particle, energy, n_events, (0.20, 0.25), seed)
    h = d["hits"]
    sgn = -1.0 if mirror else 1.0
    x = (h["r"] * np.cos(h["phi"])).astype(np.float32)
    y = (h["r"] * np.sin(h["phi"])).astype(np.float32)
    z = (sgn * h["z"]).astype(np.float32)
    ex = {k: d[k].astype(np.float32) for k in preprocess.EXTRAP_FIELDS}
    ex["extrap_eta"] = (sgn * ex["extrap_eta"]).astype(np.float32)
    ex["extrap_z"] = (sgn * ex["extrap_z"]).astype(np.float32)
    # truth along the layer-2 extrapolation with |p| = energy
    eta0, phi0 = ex["extrap_eta"][:, 2].astype(np.float64), ex["extrap_phi"][:, 2].astype(np.float64)
    pt = energy / np.cosh(eta0)
    truth = [(pt * np.cos(phi0)).astype(np.float32), (pt * np.sin(phi0)).astype(np.float32),
             (pt * np.sinh(eta0)).astype(np.float32)]
    return {"x": x, "y": y, "z": z, "energy": h["energy"].astype(np.float32), "layer": h["layer"].astype(np.int32),
            "event": h["event"], "n": n_events, "truth": truth, "pdg": d["truth_pdg"].astype(np.int32), "extrap": ex,
            "boundary": ex["extrap_eta"][:, 0]}


def write_hdf5(path, s, energy=None, pdg=None, extrap=None):
    """The calokit hits HDF5 twin of ``s``: eta, phi, r of the float32 positions, energies in MeV."""
    x, y, z = (s[k].astype(np.float64) for k in "xyz")
    eta, phi = preprocess.hit_eta_phi(x, y, z)
    px, py, pz = (t.astype(np.float64) for t in s["truth"])
    with h5py.File(path, "w") as f:
        f["event"], f["layer"], f["eta"], f["phi"] = s["event"], s["layer"].astype(np.int16), eta, phi
        f["r"], f["z"] = np.hypot(x, y), z
        f["energy"] = s["energy"].astype(np.float64) if energy is None else energy
        f["truth_p"] = np.sqrt(px * px + py * py + pz * pz)
        f["truth_pdg"] = s["pdg"] if pdg is None else pdg
        for k in preprocess.EXTRAP_FIELDS:
            f[k] = (s["extrap"] if extrap is None else extrap)[k].astype(np.float64)
    return str(path)


def _jagged(flat, n, event):
    return ak.unflatten(flat, np.bincount(event, minlength=n))


def _one_each(a):
    return ak.unflatten(np.asarray(a), np.ones(len(a), dtype=np.int64))


def write_atlas_flat(path, s, drop=(), extra=None, types=None):
    """ATLAS ISF_HitAnalysis SaveAllBranches form: raw hit energies (scaled = raw / SF in LAr, raw * SF in Tile)."""
    n, ev = s["n"], s["event"]
    sf = np.array([SF[int(i)] for i in s["layer"]], dtype=np.float32)
    tile = (s["layer"] >= 12) & (s["layer"] <= 20)
    raw = np.where(tile, s["energy"] / sf, s["energy"] * sf).astype(np.float32)
    data = {"HitX": _jagged(s["x"], n, ev), "HitY": _jagged(s["y"], n, ev), "HitZ": _jagged(s["z"], n, ev),
            "HitE": _jagged(raw, n, ev), "HitT": _jagged(np.zeros_like(raw), n, ev),
            "HitSampling": _jagged(s["layer"], n, ev), "HitSamplingFraction": _jagged(sf, n, ev),
            "TruthE": _one_each(np.float32(np.hypot(np.hypot(*s["truth"][:2]), s["truth"][2]))),
            "TruthPx": _one_each(s["truth"][0]), "TruthPy": _one_each(s["truth"][1]),
            "TruthPz": _one_each(s["truth"][2]), "TruthPDG": _one_each(s["pdg"]),
            "newTTC_IDCaloBoundary_eta": _one_each(s["boundary"])}
    for k, b in zip(preprocess.EXTRAP_FIELDS, preprocess.ROOT_MID):   # float[24]: uproot cannot write vector<vector>
        data[b] = s["extrap"][k]
    data.update(extra or {})
    for k in drop:
        data.pop(k)
    _write_tree(path, data, types)
    return str(path)


def write_odd(path, s, placeholder=False, truth=False):
    """Open Data Detector converter form: split vector<FCS_hit> 'hits' (GeV), per-layer vector<float> newTTC_*."""
    n, ev = s["n"], s["event"]
    data = {"hits.hit_x": _jagged(s["x"], n, ev), "hits.hit_y": _jagged(s["y"], n, ev),
            "hits.hit_z": _jagged(s["z"], n, ev),
            "hits.hit_energy": _jagged((s["energy"].astype(np.float64) / 1000.0).astype(np.float32), n, ev),
            "hits.sampling": _jagged(s["layer"], n, ev), "hits.hit_time": _jagged(np.zeros(ev.size, np.float32), n, ev),
            "newTTC_IDCaloBoundary_eta": _one_each(np.full(n, -999.0 if placeholder else 0.0, np.float32)
                                                   if placeholder else s["boundary"])}
    for k, b in zip(preprocess.EXTRAP_FIELDS, preprocess.ROOT_MID):
        a = np.full((n, 24), -999.0, np.float32) if placeholder else s["extrap"][k]
        data[b] = ak.Array([list(r) for r in a])        # [event][layer] as vector<float>
    if truth:
        data.update({"TruthPx": _one_each(s["truth"][0]), "TruthPy": _one_each(s["truth"][1]),
                     "TruthPz": _one_each(s["truth"][2])})
    _write_tree(path, data)
    return str(path)


def _write_tree(path, data, types=None):
    with uproot.recreate(str(path)) as f:
        f.mktree(TREE, types or {k: v.type if isinstance(v, ak.Array) else (v.dtype, v.shape[1:])
                                  for k, v in data.items()} if types else _types(data))
        f[TREE].extend(data)


def _types(data):
    out = {}
    for k, v in data.items():
        if isinstance(v, ak.Array):
            out[k] = "var * " + str(ak.type(ak.flatten(v)).content)
        elif v.ndim == 2:
            out[k] = (v.dtype, v.shape[1:])
        else:
            out[k] = v.dtype
    return out


def assert_same_voxels(got, want):
    """Every hit in the same voxel: the same non-empty voxels and sums equal to float32 rounding (events are
    summed in blocks whose boundaries depend on the reader's chunking, so the last bit may differ)."""
    np.testing.assert_array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)   # (denormal sums of underflowing toy energies)


def voxelise(tmp_path, inputs, *flags, xml=XML, particle="photon", name="vox.h5"):
    out = tmp_path / name
    rc = preprocess.main(["voxelise", "--binning", xml, "--particle", particle, "--jobs", "1", "--out", str(out),
                          *flags, *map(str, inputs)])
    return rc, out


def read(path):
    with h5py.File(path, "r") as f:
        return f["incident_energies"][:, 0], f["showers"][:]


@pytest.fixture(scope="module")
def showers():
    return toy_showers()


def test_atlas_flat_and_odd_match_the_hdf5_hits(tmp_path, showers, capsys):
    s = showers
    rc, ref = voxelise(tmp_path, [write_hdf5(tmp_path / "hits.h5", s)], name="ref.h5")
    assert rc == 0, capsys.readouterr().err
    ref_msg = capsys.readouterr().out
    p_ref, v_ref = read(ref)
    assert v_ref.sum() > 0 and (v_ref[:, 8:168].sum() > 0)          # layer 1 (10 alpha bins) is filled
    for name, path in (("atlas", write_atlas_flat(tmp_path / "atlas.root", s)),
                       ("odd", write_odd(tmp_path / "odd.root", s))):
        flags = ["--energy", "65536"] if name == "odd" else []
        rc, out = voxelise(tmp_path, [path], *flags, name=f"{name}.h5")
        msg = capsys.readouterr()
        assert rc == 0, msg.err
        p, v = read(out)
        assert_same_voxels(v, v_ref)                                  # identical voxels, MeV (ODD: from GeV)
        # the same hit and dropped-hit counters as the HDF5 path (layer 13 has hits but no voxels)
        counters = ref_msg.split(" from ")[1].split(";")[0].replace("1 input files", "")
        assert counters in msg.out
        if name == "atlas":
            np.testing.assert_array_equal(p, p_ref)                  # |p| of the truth four-momentum
            np.testing.assert_allclose(p, 65536.0, rtol=1e-6)
        else:
            assert (p == 65536.0).all()                              # no truth: --energy
    m = int(s["energy"][s["layer"] == 13].size)
    assert m > 0 and f"{m} dropped in non-voxelised layers" in ref_msg


def test_csv_from_root_equals_csv_from_hdf5(tmp_path, showers):
    rc, _ = voxelise(tmp_path, [write_hdf5(tmp_path / "h.h5", showers)], "--csv", str(tmp_path / "c1"),
                     "--csv-layout", "fastcalogan", name="a.h5")
    assert rc == 0
    rc, _ = voxelise(tmp_path, [write_atlas_flat(tmp_path / "a.root", showers)], "--csv", str(tmp_path / "c2"),
                     "--csv-layout", "fastcalogan", name="b.h5")
    assert rc == 0
    rel = "csvFiles/pid22/eta_0_130/pid22_E65536_eta_0_130_voxalisation.csv"
    a, b = (open(tmp_path / d / rel).read() for d in ("c1", "c2"))
    assert a == b and a.count("\n") == showers["n"]


def test_several_files_a_glob_and_a_directory_chunked_on_two_cores(tmp_path, showers):
    d = tmp_path / "ntuples"
    d.mkdir()
    s2 = toy_showers(n_events=60, energy=1024.0, seed=5)
    write_atlas_flat(d / "pid22_E65536.root", showers)
    write_atlas_flat(d / "pid22_E1024.root.1", s2)
    rc, one = voxelise(tmp_path, [d], "--chunk", "1000", name="dir.h5")       # a few events per chunk
    assert rc == 0
    out = tmp_path / "glob.h5"
    assert preprocess.main(["voxelise", "--binning", XML, "--particle", "photon", "--jobs", "2", "--out", str(out),
                            str(d / "pid22_E*")]) == 0
    p1, v1 = read(one)
    p2, v2 = read(out)
    np.testing.assert_array_equal(v1, v2)
    assert v1.shape[0] == showers["n"] + s2["n"]
    np.testing.assert_allclose(sorted(set(np.rint(p1))), [1024.0, 65536.0])
    # the directory's files come sorted: E1024 first
    rc, ref = voxelise(tmp_path, [write_hdf5(tmp_path / "b.h5", s2), write_hdf5(tmp_path / "a.h5", showers)],
                       name="ref.h5")
    assert_same_voxels(v1, read(ref)[1])


def test_eta_sign_flip_mirrors_showers_at_negative_eta(tmp_path, showers):
    """FastCaloGAN negates deta where eta_mid < 0: the shower mirrored in z voxelises exactly like the original."""
    rc, a = voxelise(tmp_path, [write_atlas_flat(tmp_path / "p.root", showers)], name="p.h5")
    m = toy_showers(mirror=True)
    rc2, b = voxelise(tmp_path, [write_atlas_flat(tmp_path / "m.root", m)], name="m.h5")
    rc3, c = voxelise(tmp_path, [write_hdf5(tmp_path / "hits_m.h5", m)], name="mh.h5")
    assert rc == rc2 == rc3 == 0
    assert (m["extrap"]["extrap_eta"][:, 2] < 0).sum() > 20 and (m["extrap"]["extrap_eta"][:, 2] > 0).sum() > 20
    np.testing.assert_allclose(read(b)[1], read(a)[1], rtol=1e-5, atol=1e-3)
    assert_same_voxels(read(c)[1], read(b)[1])


def test_negative_charge_flips_dphi(tmp_path):
    """pdg -11 (FastCaloGAN's negative charge) mirrors alpha: bin i of 10 over (-pi, pi] becomes bin 9 - i."""
    s = toy_showers(n_events=60, particle="electron")
    xml = tmp_path / "electron.xml"
    xml.write_text(open(XML).read().replace('pid="22"', 'pid="11"').replace('name="photon"', 'name="electron"'))
    rc, a = voxelise(tmp_path, [write_atlas_flat(tmp_path / "em.root", s)], xml=str(xml), particle="electron",
                     name="em.h5")
    assert rc == 0
    s_pos = dict(s, pdg=-s["pdg"])
    rc, b = voxelise(tmp_path, [write_atlas_flat(tmp_path / "ep.root", s_pos)], xml=str(xml), particle="electron",
                     name="ep.h5")
    rc2, c = voxelise(tmp_path, [write_hdf5(tmp_path / "hits_ep.h5", s_pos)], xml=str(xml), particle="electron",
                      name="eph.h5")
    assert rc == rc2 == 0
    va, vb = read(a)[1], read(b)[1]
    assert_same_voxels(read(c)[1], vb)
    assert not np.array_equal(va, vb)
    for off, n_r in ((8, 16), (168, 19)):                              # layers 1 and 2: 10 alpha x n_r
        la = va[:, off:off + 10 * n_r].reshape(-1, 10, n_r)
        lb = vb[:, off:off + 10 * n_r].reshape(-1, 10, n_r)
        np.testing.assert_allclose(lb, la[:, ::-1, :], rtol=1e-5, atol=1e-3)


def test_slice_selection_by_boundary_eta(tmp_path, showers):
    """FastCaloGAN keeps entries with |newTTC_IDCaloBoundary_eta| x 100 in [etaMin, etaMax]; the rest are skipped."""
    s = dict(showers, boundary=showers["boundary"].copy())
    s["boundary"][:7] = 0.31
    rc, out = voxelise(tmp_path, [write_atlas_flat(tmp_path / "a.root", s)], xml=XML_FCG, name="sel.h5")
    assert rc == 0
    with h5py.File(out) as f:
        assert f["showers"].shape[0] == s["n"] - 7 and f.attrs["eta_min"] == 20


def test_barycentre_centre_for_placeholder_extrapolation(tmp_path, showers, capsys):
    path = write_odd(tmp_path / "pid22_E65536_odd.root", showers, placeholder=True)
    rc, _ = voxelise(tmp_path, [path])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert path in err and "placeholder" in err and "--centre barycentre" in err
    rc, out = voxelise(tmp_path, [path], "--centre", "barycentre")
    assert rc == 0, capsys.readouterr().err
    p, v = read(out)
    assert (p == 65536.0).all()                                        # energy from the file name
    # the reference point: each layer's energy-weighted hit position, computed here independently
    s = showers
    x, y, z, e = (s[k].astype(np.float64) for k in ("x", "y", "z", "energy"))
    e = (s["energy"].astype(np.float64) / 1000.0).astype(np.float32).astype(np.float64) * 1000.0
    idx = s["event"] * 24 + s["layer"]
    w = [np.bincount(idx, weights=e * q, minlength=s["n"] * 24).reshape(-1, 24) for q in (x, y, z, np.ones_like(x))]
    u = [np.bincount(idx, weights=q, minlength=s["n"] * 24).reshape(-1, 24) for q in (x, y, z, np.ones_like(x))]
    w = [np.where(w[3] > 0, a, b) for a, b in zip(w, u)]     # hits without energy: their plain mean position
    with np.errstate(all="ignore"):
        cx, cy, cz = w[0] / w[3], w[1] / w[3], w[2] / w[3]
    rt = np.hypot(cx, cy)
    ex = {"extrap_eta": np.arcsinh(cz / rt), "extrap_phi": np.arctan2(cy, cx), "extrap_r": rt, "extrap_z": cz}
    rc, ref = voxelise(tmp_path, [write_hdf5(tmp_path / "b.h5", s, energy=e, extrap=ex)], name="ref.h5")
    assert rc == 0
    np.testing.assert_allclose(v, read(ref)[1], rtol=1e-6, atol=1e-6)
    # centred: most of layer 2's energy lies in the innermost r bins
    lay2 = v[:, 168:168 + 190].reshape(-1, 10, 19).sum(axis=(0, 1))
    assert lay2[:4].sum() > 0.5 * lay2.sum()


def test_per_layer_extrapolation_accepts_vector_of_vector(showers):
    """vector<vector<float>> [particle][layer] (real ntuples) -> particle 0; empty vectors and -999 -> NaN."""
    class NT:
        path = "x.root"
    arr = ak.Array([[[0.1, 0.2, 0.3], [9.0, 9.0, 9.0]], [[-999.0, 0.5, 0.6]], [[]], []])
    got = preprocess._per_layer(NT, "newTTC_mid_eta", arr)
    want = np.array([[0.1, 0.2, 0.3], [np.nan, 0.5, 0.6], [np.nan] * 3, [np.nan] * 3])
    np.testing.assert_allclose(got, want, rtol=1e-7)
    flat = preprocess._per_layer(NT, "newTTC_mid_eta", ak.Array(np.zeros((2, 24), np.float32)))
    assert flat.shape == (2, 24)


def _expect_one_line(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_bad_files_exit_2_with_one_line(tmp_path, showers, capsys):
    s = showers
    p = write_atlas_flat(tmp_path / "nohite.root", s, drop=("HitE",))
    _expect_one_line(capsys, voxelise(tmp_path, [p])[0], p, "missing hit branches", "HitE")
    p = write_atlas_flat(tmp_path / "nottc.root", s, drop=("newTTC_mid_phi",))
    _expect_one_line(capsys, voxelise(tmp_path, [p])[0], p, "newTTC_mid_phi")
    p = write_atlas_flat(tmp_path / "notruth.root", s, drop=("TruthPx", "TruthPy", "TruthPz", "TruthPDG"))
    _expect_one_line(capsys, voxelise(tmp_path, [p])[0], p, "TruthPx", "--energy")
    assert voxelise(tmp_path, [p], "--energy", "65536", name="ok.h5")[0] == 0
    capsys.readouterr()
    # wrong types: one float per event instead of vector<float>; strings of hits
    p = write_atlas_flat(tmp_path / "type.root", s, extra={"HitX": np.zeros(s["n"], np.float32)})
    _expect_one_line(capsys, voxelise(tmp_path, [p])[0], p, "'HitX'", "vector")
    # hit branches of different lengths
    n = s["n"]
    short = ak.Array([[1.0]] * n)
    p = write_atlas_flat(tmp_path / "len.root", s, extra={"HitY": short})
    _expect_one_line(capsys, voxelise(tmp_path, [p])[0], p, "'HitY'", "number of hits")
    # the wrong particle
    p = write_atlas_flat(tmp_path / "pdg.root", s)
    _expect_one_line(capsys, voxelise(tmp_path, [p], particle="pion")[0], p, "TruthPDG", "211")
    # truncated file
    good = write_atlas_flat(tmp_path / "good.root", s)
    data = open(good, "rb").read()
    for frac in (0.5, 0.9):
        cut = tmp_path / f"cut{frac}.root"
        cut.write_bytes(data[:int(len(data) * frac)])
        _expect_one_line(capsys, voxelise(tmp_path, [cut])[0], str(cut))
    # not a ROOT file, no tree, an RNTuple instead of a TTree
    junk = tmp_path / "junk.root"
    junk.write_bytes(b"not root at all" * 10)
    _expect_one_line(capsys, voxelise(tmp_path, [junk])[0], str(junk), "not a readable ROOT file")
    other = tmp_path / "other.root"
    with uproot.recreate(str(other)) as f:
        f.mktree("T", {"a": np.float32})
        f["T"].extend({"a": np.zeros(3, np.float32)})
    _expect_one_line(capsys, voxelise(tmp_path, [other])[0], str(other), TREE)
    rnt = tmp_path / "rntuple.root"
    with uproot.recreate(str(rnt)) as f:
        f[TREE] = {"HitX": ak.Array([[1.0]])}
    _expect_one_line(capsys, voxelise(tmp_path, [rnt])[0], str(rnt), TREE)
    assert not os.path.exists(tmp_path / "vox.h5")


def test_sampling_branches_only_are_refused_naming_the_flat_branches(tmp_path, showers, capsys):
    n = showers["n"]
    data = {f"Sampling_{i}": np.zeros(n, np.int32) for i in range(25)}
    data["TruthPx"] = _one_each(showers["truth"][0])
    p = tmp_path / "sampling.root"
    _write_tree(p, data)
    _expect_one_line(capsys, voxelise(tmp_path, [p])[0], str(p), "Sampling_0..Sampling_24", "HitX", "SaveAllBranches")


def test_missing_uproot_is_one_line(tmp_path, showers, capsys, monkeypatch):
    p = write_atlas_flat(tmp_path / "a.root", showers)
    monkeypatch.setitem(__import__("sys").modules, "uproot", None)
    _expect_one_line(capsys, voxelise(tmp_path, [p])[0], p, "uproot")


def test_energy_from_file_name():
    assert preprocess.energy_from_name("/d/pid211_E1048576_disj_eta_m5_0_0_5.root") == 1048576.0
    assert preprocess.energy_from_name("/d/ECal_ntuple.root") is None
