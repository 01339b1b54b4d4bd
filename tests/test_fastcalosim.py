"""fastcalosim.py: the folder FastCaloSim's TFCSEnergyAndHitGANV2 loads, and its check.

Generators with random weights (train.build_generator, random batch-norm statistics) of the photon slice
|eta| 0.20-0.25 of binning_fastcalogan.xml (368 voxels) are exported by export_lwtnn.py as FastCaloSim's
UltraLow12 and High12 networks; toy hits at 65 GeV and 1 TeV feed rootFiles/. Every row of FastCaloSim's
reading of a folder is a test that the pre-folder calokit fails: no ganVersion in the XML, a Low12 name or label,
ONNX inputs named node_0/node_1, no rootFiles. The reordered networks are compared exactly with Keras, the ONNX
model run with FastCaloSim's map order with the lwtnn JSON (numpy evaluator and the C++ harness), and the ROOT
files read back with uproot with values computed here from the hits.
"""
import json
import math
import os
import re
import shutil

import h5py
import numpy as np
import pytest

import export_lwtnn as ex
import fastcalosim as fcs
import preprocess
import train
from HighLevelFeatures import read_geometry
from plumbing import condition_label, energy_range, kinetic_energy
from test_export_lwtnn import lwtnn_eval, run_cpp, set_random_bn_statistics  # noqa: F401  (lwtnn_eval: fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XML = os.path.join(ROOT, "binning", "binning_fastcalogan.xml")
N_VOX, LATENT, TOL = 368, 50, 1e-5
RANGES = {"UltraLow12": (6, 12), "High12": (12, 22)}


def _config(name, lo, hi):
    return {"particle": "photon", "pid": 22, "eta_min": 20.0, "eta_max": 25.0, "range": name, "binning": XML,
            "label_scheme": "V2", "max_exp": 22, "p_min": 2.0 ** lo, "p_max": 2.0 ** hi, "ekin_min": 2.0 ** lo,
            "ekin_max": 2.0 ** hi, "latent_dim": LATENT, "n_voxels": N_VOX, "noise": {"mean": 0.5, "std": 0.5}}


def _export(d, name, lo, hi, seed, batchnorm="fold"):
    """A random-weight generator saved as a run and exported; returns (export dir, Keras model)."""
    model = train.build_generator(N_VOX, latent_dim=LATENT, activation="swish", batchnorm=True,
                                  output_activation="swish", output_batchnorm=True)
    set_random_bn_statistics(model, seed)
    run = d / f"run_{name}_{seed}"
    (run / "ckpt_1").mkdir(parents=True)
    model.save(str(run / "ckpt_1" / "generator.keras"))
    (run / "config.json").write_text(json.dumps(_config(name, lo, hi)))
    out = d / f"net_{name}_{seed}"
    assert ex.main(["--run", str(run), "--out", str(out), "--batchnorm", batchnorm]) == 0
    return out, model


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("fcs")
    nets, models = {}, {}
    for seed, (name, (lo, hi)) in enumerate(RANGES.items()):
        nets[name], models[name] = _export(d, name, lo, hi, seed, "fold" if seed == 0 else "normalization")
    assert preprocess.main(["toy", "--particle", "photon", "--eta", "0.20", "--events-per-energy", "25",
                            "--energies", "65536", "1048576", "--seed", "3", "--out", str(d / "hits")]) == 0
    folder = d / "fastcalosim"
    assert fcs.main(["--out", str(folder), "--networks", *map(str, nets.values()), "--hits", str(d / "hits")]) == 0
    return {"d": d, "nets": nets, "models": models, "folder": folder,
            "geom": read_geometry(XML, "photon", 0.225)}


def copy_folder(chain, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(chain["folder"], dst)
    return dst


def check(folder, *extra):
    return fcs.main(["--check-folder", str(folder), "--check-events", "3", *extra])


# ----------------------------------------------------------------------------------------------
# the folder of a tiny run passes the check, and holds what FastCaloSim opens

@pytest.mark.smoke
def test_folder_passes_check(chain, tmp_path, capsys):
    """The real script via main(argv) on tiny data (the fixture assembles, this checks): the smoke test."""
    out = tmp_path / "check.json"
    assert check(chain["folder"], "--json", str(out)) == 0
    assert "loads as FastCaloSim reads it: 1 slice(s), 2 network(s) run at 17 energy points" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    (s,) = rep["slices"]
    assert (s["pid"], s["etaMin"], s["etaMax"], s["voxels"]) == (22, 20, 25, N_VOX)
    assert [e["p_mev"] for e in s["networks"]["UltraLow12"]["energies"]] == [2.0 ** k for k in range(6, 13)]
    assert [e["p_mev"] for e in s["networks"]["High12"]["energies"]] == [2.0 ** k for k in range(13, 23)]
    assert s["networks"]["High12"]["loaded_by_fastcalosim"] == "neural_net_22_eta_20_25_High12.onnx"
    assert all(n["max_diff_onnx_json"] < TOL for n in s["networks"].values())
    assert sorted(s["fit_slopes"]) == ["0", "1", "12", "2", "3"]
    assert [len(v) for k, v in sorted(s["fit_slopes"].items(), key=lambda kv: int(kv[0]))] == [8, 16, 19, 5, 5]
    assert all(0.3 < w < 0.7 for w in s["extrap_weights"].values())     # toy hits: r uniform in each layer


def test_folder_files(chain):
    names = sorted(os.listdir(chain["folder"]))
    assert names == ["binning.xml"] + [f"neural_net_22_eta_20_25_{n}.{f}" for n in ("High12", "UltraLow12")
                                       for f in ("json", "onnx")] + ["rootFiles"]
    assert sorted(os.listdir(chain["folder"] / "rootFiles")) == ["pid22_E1048576_eta_20_25.root",
                                                                "pid22_E65536_eta_20_25_validation.root"]
    xml = (chain["folder"] / "binning.xml").read_text()
    assert '<Particle pid="22" name="photon" latentDim="50" symmetriseAlpha="false">' in xml
    assert '<Bin etaMin="20" etaMax="25" regionId="4" ganVersion="2">' in xml
    assert re.findall(r'Layer id="(\d+)"', xml) == [str(i) for i in range(24)]


# ----------------------------------------------------------------------------------------------
# FastCaloSim's table, row by row: each fails on the folder calokit wrote before

def test_xml_without_ganversion_is_refused(chain, tmp_path, capsys):
    folder = copy_folder(chain, tmp_path)
    xml = folder / "binning.xml"
    xml.write_text(xml.read_text().replace(' ganVersion="2"', ""))
    assert check(folder) == 2
    assert "ganVersion absent (read as 0)" in capsys.readouterr().err


def test_bin_must_contain_etamid_once(chain, tmp_path, capsys):
    folder = copy_folder(chain, tmp_path)
    xml = folder / "binning.xml"
    xml.write_text(xml.read_text().replace('etaMin="20" etaMax="25"', 'etaMin="20" etaMax="22"'))
    assert check(folder) == 2
    assert "0.05 wide" in capsys.readouterr().err


def test_low12_name_is_not_opened(chain, tmp_path, capsys):
    folder = copy_folder(chain, tmp_path)
    for f in ("json", "onnx"):
        os.rename(folder / f"neural_net_22_eta_20_25_UltraLow12.{f}", folder / f"neural_net_22_eta_20_25_Low12.{f}")
    assert check(folder) == 2
    assert "neural_net_22_eta_20_25_UltraLow12.*: missing" in capsys.readouterr().err


@pytest.mark.parametrize("name,lo,hi", [("Low12", 8, 12), ("all", 6, 22)])
def test_low12_label_is_refused(chain, tmp_path, capsys, name, lo, hi):
    """A Low12 network (label over 2^8..2^12) renamed UltraLow12 would get FastCaloSim's 2^6..2^12 label; the
    demo's one photon network over 2^6..2^22 is a network FastCaloSim never loads."""
    net, _ = _export(tmp_path, name, lo, hi, 5)
    assert fcs.main(["--out", str(tmp_path / "f"), "--networks", str(net)]) == 2
    err = capsys.readouterr().err
    assert "FastCaloSim labels pid 22 networks as High12 (2^12..2^22 MeV), UltraLow12 (2^6..2^12 MeV)" in err
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("particle,name,lo,hi", [("photon", "UltraLow12", 6, 12), ("photon", "High12", 12, 22),
                                                 ("electron", "UltraLow12", 6, 12), ("pion", "All", 8, 22),
                                                 ("proton", "High10", 10, 22)])
def test_training_label_is_fastcalosims(particle, name, lo, hi):
    """prepare's label (plumbing) of each range = FastCaloSim's label from the momenta 2^lo, 2^hi and the mass."""
    p = 2.0 ** np.arange(lo, hi + 1)
    p_min, p_max, _ = energy_range(particle, name)
    ekin = kinetic_energy(p, particle)
    ours = condition_label(ekin, kinetic_energy(p_min, particle), kinetic_energy(p_max, particle))
    pid = {"photon": 22, "electron": 11, "pion": 211, "proton": 2212}[particle]
    theirs, e = fcs.fcs_label(pid, p, lo, hi)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(e, ekin)
    assert ours[0] == 0.0 and ours[-1] == pytest.approx(1.0)


def test_onnx_named_node_0_cannot_run(chain, tmp_path, capsys):
    import onnx

    folder = copy_folder(chain, tmp_path)
    path = folder / "neural_net_22_eta_20_25_High12.onnx"
    model = onnx.load(str(path))
    for old, new in zip(ex.ONNX_INPUTS, ("node_0", "node_1")):
        for node in model.graph.node:
            node.input[:] = [new if i == old else i for i in node.input]
        next(i for i in model.graph.input if i.name == old).name = new
    onnx.save(model, str(path))
    assert check(folder) == 2
    assert "ONNX input 'node_0' is not one FastCaloSim fills (Noise, mycond)" in capsys.readouterr().err


@pytest.mark.parametrize("remove", ["pid22_E1048576_eta_20_25.root", "pid22_E65536_eta_20_25_validation.root"])
def test_missing_root_file_is_refused(chain, tmp_path, capsys, remove):
    folder = copy_folder(chain, tmp_path)
    os.remove(folder / "rootFiles" / remove)
    assert check(folder) == 2
    assert f"{remove}: missing (LoadGAN opens it unconditionally)" in capsys.readouterr().err
    assert check(folder, "--networks-only") == 0


def test_missing_histogram_and_branch_are_refused(chain, tmp_path, capsys):
    import uproot

    folder = copy_folder(chain, tmp_path)
    shape = folder / "rootFiles" / "pid22_E1048576_eta_20_25.root"
    with uproot.open(shape) as f:
        keep = {k.split(";")[0]: f[k] for k in f.keys() if not k.startswith("r12")}
    with uproot.recreate(shape) as f:
        for k, h in keep.items():
            f[k] = h
    assert check(folder) == 2
    assert "no histogram r12w" in capsys.readouterr().err
    shutil.copy(chain["folder"] / "rootFiles" / shape.name, shape)
    valid = folder / "rootFiles" / "pid22_E65536_eta_20_25_validation.root"
    with uproot.open(valid) as f:
        arrays = {k: f["rootTree"][k].array(library="np") for k in f["rootTree"].keys() if k != "extrapWeight_3"}
    with uproot.recreate(valid) as f:
        f["rootTree"] = arrays
    assert check(folder) == 2
    assert "rootTree has no branch extrapWeight_3" in capsys.readouterr().err


def test_one_r_bin_layer_is_refused(chain, tmp_path, capsys):
    folder = copy_folder(chain, tmp_path)
    xml = folder / "binning.xml"
    xml.write_text(xml.read_text().replace('<Layer id="4" r_edges="0"', '<Layer id="4" r_edges="0,100"'))
    assert check(folder) == 2
    assert "Layer 4 has one r bin" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the networks: FastCaloSim's voxel order, exactly the Keras generator's voxels

def fastcalosim_order(geom):
    """calokit index of FastCaloSim voxel j, found by binning each voxel's centre (independent of the script)."""
    idx = []
    for lay in sorted(geom.layers, key=lambda lay: lay.id):
        if not lay.n_voxels:
            continue
        width = (math.pi - lay.alpha_lo) / lay.n_alpha
        for ir in range(lay.n_r):                       # r outer, alpha inner: fillEnergy's loops
            for ia in range(lay.n_alpha):
                r = 0.5 * (lay.r_edges[ir] + lay.r_edges[ir + 1])
                a = lay.alpha_lo + (ia + 0.5) * width
                idx.append(geom.offsets[lay.id][0] + int(lay.bin_index(np.array([r]), np.array([a]))[0]))
    return np.array(idx)


def test_voxel_order_is_fastcalosims(chain):
    perm = fastcalosim_order(chain["geom"])
    np.testing.assert_array_equal(perm, fcs.voxel_permutation(chain["geom"]))
    assert sorted(perm.tolist()) == list(range(N_VOX)) and not np.array_equal(perm, np.arange(N_VOX))
    # layer 1 (8 voxels of layer 0 before it, 16 r x 10 alpha): FastCaloSim's voxel 8 + 1 is r bin 0, alpha bin 1
    assert perm[8 + 1] == 8 + 16 and perm[8 + 10] == 8 + 1


@pytest.mark.parametrize("name", list(RANGES))
def test_folder_networks_equal_keras_in_fastcalosim_order(chain, name):
    perm = fastcalosim_order(chain["geom"])
    noise, cond = ex.random_inputs(LATENT, 200, seed=4)
    noise, cond = noise.astype(np.float32), cond.astype(np.float32)
    ref = ex.keras_predict(chain["models"][name], noise, cond)[:, perm]
    stem = chain["folder"] / f"neural_net_22_eta_20_25_{name}"
    graph = json.loads(stem.with_suffix(".json").read_text())
    assert [i["name"] for i in graph["inputs"]] == ["node_0", "node_1"]
    assert ex.max_difference(ex.evaluate_graph(graph, noise, cond), ref) < TOL
    sess = ex.onnx_session(stem.with_suffix(".onnx").read_bytes())
    assert [i.name for i in sess.get_inputs()] == ["Noise", "mycond"]
    assert ex.max_difference(ex.run_onnx_rows(sess, noise, cond), ref) < TOL


def test_onnx_in_map_order_equals_lwtnn(chain, lwtnn_eval, tmp_path):  # noqa: F811  (fixture)
    """FastCaloSim's ONNX run (values in std::map order) = the lwtnn JSON (variables by name): exactly for noise
    whose order does not matter, in distribution otherwise, and exactly once the JSON gets the map's order."""
    stem = chain["folder"] / "neural_net_22_eta_20_25_High12"
    onnx_net, json_net = fcs.OnnxNet(str(stem) + ".onnx"), fcs.LwtnnNet(str(stem) + ".json")
    vec = lambda outputs: np.array([outputs[str(i)] for i in range(N_VOX)])     # noqa: E731
    rng = np.random.default_rng(11)
    order = [int(k.split("_")[1]) for k in sorted(f"variable_{i}" for i in range(LATENT))]
    assert order[:4] == [0, 1, 10, 11] and order != list(range(LATENT))
    rows, onnx_const = [], []
    for c, label in ((0.5, 0.3), (1.2, 0.9), (-0.1, 0.0)):              # constant noise: order irrelevant
        inputs = fcs.fcs_inputs(np.full(LATENT, c), label)
        onnx_const.append(vec(onnx_net.compute(inputs)))
        assert ex.max_difference(onnx_const[-1], vec(json_net.compute(inputs))) < TOL
        rows.append(np.r_[np.full(LATENT, c), label, 0.0])
    rc, out, err = run_cpp(lwtnn_eval, json.loads((stem.with_suffix(".json")).read_text()), np.array(rows), tmp_path)
    assert rc == 0, err
    cpp = np.array([[float(v) for v in line.split()] for line in out.splitlines()])
    assert ex.max_difference(np.array(onnx_const), cpp) < TOL               # ONNX (map order) = lwtnn C++
    sums_onnx, sums_json, exact = [], [], 0.0
    for _ in range(300):
        noise, label = rng.normal(0.5, 0.5, LATENT), rng.uniform()
        a = vec(onnx_net.compute(fcs.fcs_inputs(noise, label)))
        b = vec(json_net.compute(fcs.fcs_inputs(noise, label)))
        exact = max(exact, ex.max_difference(a, vec(json_net.compute(fcs.fcs_inputs(noise[order], label)))))
        sums_onnx.append(a.sum())
        sums_json.append(b.sum())
    assert exact < TOL
    assert not np.allclose(sums_onnx, sums_json)                       # the order does change single showers
    from scipy.stats import ks_2samp
    assert ks_2samp(sums_onnx, sums_json).pvalue > 0.01                # ... not their distribution


# ----------------------------------------------------------------------------------------------
# rootFiles/: what is read back is what the hits give

def _hits(chain, energy):
    path = chain["d"] / "hits" / f"hits_photon_E{energy}_eta_020_025.h5"
    with h5py.File(path) as h:
        return {k: h[k][:] for k in h}


def test_r_histograms_read_back(chain):
    import uproot

    h = _hits(chain, 1048576)
    with uproot.open(chain["folder"] / "rootFiles" / "pid22_E1048576_eta_20_25.root") as f:
        for lay in chain["geom"].layers:
            if not lay.n_r:
                assert f"r{lay.id}w" not in [k.split(";")[0] for k in f.keys()]
                continue
            m = h["layer"] == lay.id
            ev = h["event"][m]
            e_eta, e_phi = h["extrap_eta"][ev, lay.id], h["extrap_phi"][ev, lay.id]
            e_r, e_z = h["extrap_r"][ev, lay.id], h["extrap_z"][ev, lay.id]
            deta_mm = (h["eta"][m] - e_eta) * np.abs(2 * np.exp(-e_eta) / (1 + np.exp(-2 * e_eta))) * np.hypot(e_r, e_z)
            dphi = np.angle(np.exp(1j * (h["phi"][m] - e_phi)))
            dist = np.hypot(deta_mm, dphi * e_r)
            hist = f[f"r{lay.id}w"]
            edges = hist.axis().edges()
            assert edges.size == 10 * lay.n_r + 1 and set(lay.r_edges) <= set(edges.round(9))
            w, _ = np.histogram(dist, edges, weights=h["energy"][m])
            np.testing.assert_allclose(hist.values(), w, rtol=1e-9, atol=1e-12 * w.max())    # summation order
            w2 = np.histogram(dist, edges, weights=h["energy"][m] ** 2)[0]
            np.testing.assert_allclose(hist.variances(), w2, rtol=1e-9, atol=1e-12 * w2.max())
            beyond = h["energy"][m][dist >= edges[-1]].sum()
            assert hist.values(flow=True)[-1] == pytest.approx(beyond, rel=1e-9, abs=1e-9)
            np.testing.assert_array_equal(f[f"r{lay.id}"].values(), np.histogram(dist, edges)[0])


def test_extrapolation_weights_read_back(chain):
    import uproot
    import toyshower

    h = _hits(chain, 65536)
    with uproot.open(chain["folder"] / "rootFiles" / "pid22_E65536_eta_20_25_validation.root") as f:
        tree = f["rootTree"]
        assert sorted(tree.keys()) == sorted(f"extrapWeight_{i}" for i in (0, 1, 2, 3, 12))
        for lid in (0, 1, 2, 3, 12):
            got = tree[f"extrapWeight_{lid}"].array(library="np")
            assert got.dtype == np.float32 and got.size == 25
            r_in, r_out = toyshower.LAYER_RADII[lid]
            for ev in range(25):
                m = (h["layer"] == lid) & (h["event"] == ev)
                if not m.any():
                    assert np.isnan(got[ev])
                    continue
                r_e = np.sum(h["energy"][m] * h["r"][m]) / np.sum(h["energy"][m])
                assert got[ev] == pytest.approx((r_e - r_in) / (r_out - r_in), rel=1e-6)


def test_expo_fit_recovers_a_slope():
    x = np.linspace(0.5, 9.5, 10)
    y = 1e4 * np.exp(-0.37 * x)
    assert fcs.expo_slope(x, y, np.sqrt(y)) == pytest.approx(-0.37, rel=1e-6)
    assert fcs.expo_slope(x, np.zeros(10), np.zeros(10)) == 0.0             # empty: FastCaloSim keeps 0


def test_missing_hits_are_reported_not_made_up(chain, tmp_path, capsys):
    out = tmp_path / "f"
    assert fcs.main(["--out", str(out), "--networks", *map(str, chain["nets"].values())]) == 0
    err = capsys.readouterr().err
    assert "rootFiles/pid22_E1048576_eta_20_25.root: not written: no photon hits at p = 1048576 MeV" in err
    assert "pid22_E65536_eta_20_25_validation.root: not written" in err
    assert os.listdir(out / "rootFiles") == []
    assert check(out, "--networks-only") == 0 and check(out) == 2


# ----------------------------------------------------------------------------------------------
# the real scripts on tiny data, as `make fastcalosim` runs them (toy from 64 MeV, training included: ~25 s)

@pytest.mark.slow
def test_chain_with_training(tmp_path, capsys):
    import select_epoch

    d = tmp_path
    assert preprocess.main(["toy", "--particle", "photon", "--eta", "0.20", "--events-per-energy", "25", "--energies",
                            "64", "128", "4096", "8192", "65536", "1048576", "--seed", "1", "--out", str(d / "hits")]) == 0
    hits = sorted(str(p) for p in (d / "hits").iterdir())
    assert preprocess.main(["voxelise", "--binning", XML, "--particle", "photon", "--out", str(d / "vox.h5"), *hits]) == 0
    nets = []
    for name in RANGES:
        assert preprocess.main(["prepare", "--binning", XML, "--particle", "photon", "--range", name,
                                "--out", str(d / f"train_{name}.h5"), str(d / "vox.h5")]) == 0
        run = str(d / f"run_{name}")
        assert train.main(["--data", str(d / f"train_{name}.h5"), "--out", run, "--iterations", "2",
                           "--checkpoint-every", "1", "--batch-size", "16", "--no-jit", "--seed", "2"]) == 0
        assert select_epoch.main(["--run", run, "--reference", str(d / "vox.h5"), "--events", "20",
                                  "--out", str(d / f"select_{name}"), "--seed", "3"]) == 0
        nets.append(str(d / f"lwtnn_{name}"))
        assert ex.main(["--run", run, "--best", str(d / f"select_{name}" / "best.json"), "--out", nets[-1],
                        "--check", "--check-events", "50"]) == 0
        with h5py.File(d / f"train_{name}.h5") as f:
            lo, hi = RANGES[name]
            p = f["incident_energies"][:, 0]
            assert p.min() == 2.0 ** lo and p.max() == (2.0 ** 20 if hi == 22 else 2.0 ** hi)
    assert fcs.main(["--out", str(d / "fastcalosim"), "--networks", *nets, "--hits", str(d / "hits")]) == 0
    assert "1 slice(s): pid 22 |eta| 0.20; 7 files" in capsys.readouterr().out
    assert check(d / "fastcalosim", "--json", str(d / "check.json")) == 0
    rep = json.loads((d / "check.json").read_text())
    assert rep["ok"] and len(rep["slices"][0]["networks"]) == 2


def test_toy_low_energies_leave_the_other_files_unchanged(tmp_path):
    """The toy seeds every energy on its own: adding 64 and 128 MeV (UltraLow12) leaves the 4096 MeV file as it was,
    so the default demo's files do not change."""
    for name, energies in (("alone", ["4096"]), ("with_low", ["64", "128", "4096"])):
        assert preprocess.main(["toy", "--particle", "photon", "--eta", "0.20", "--events-per-energy", "20",
                                "--energies", *energies, "--seed", "1", "--out", str(tmp_path / name)]) == 0
    f = "hits_photon_E4096_eta_020_025.h5"
    with h5py.File(tmp_path / "alone" / f) as a, h5py.File(tmp_path / "with_low" / f) as b:
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k][:], b[k][:])
    with h5py.File(tmp_path / "with_low" / "hits_photon_E64_eta_020_025.h5") as h:
        assert h["truth_p"].shape == (20,) and (h["truth_p"][:] == 64.0).all() and h["energy"][:].sum() > 0


def test_photons_and_pions_in_one_folder(chain, tmp_path):
    """A pion All network beside the photon networks: two Particles in binning.xml, the pion layers 13 and 14 in
    rootFiles, both slices pass the check."""
    model = train.build_generator(533, latent_dim=LATENT, activation="relu", batchnorm=False, output_activation="relu")
    run = tmp_path / "run_pion"
    (run / "ckpt_1").mkdir(parents=True)
    model.save(str(run / "ckpt_1" / "generator.keras"))
    m = 139.57
    cfg = dict(_config("All", 8, 22), particle="pion", pid=211, n_voxels=533,
               ekin_min=math.sqrt(2.0 ** 16 + m * m) - m, ekin_max=math.sqrt(2.0 ** 44 + m * m) - m)
    (run / "config.json").write_text(json.dumps(cfg))
    assert ex.main(["--run", str(run), "--out", str(tmp_path / "net_pion")]) == 0
    assert preprocess.main(["toy", "--particle", "pion", "--eta", "0.20", "--events-per-energy", "8",
                            "--energies", "65536", "1048576", "--seed", "4", "--out", str(tmp_path / "hits")]) == 0
    folder = tmp_path / "both"
    assert fcs.main(["--out", str(folder), "--networks", *map(str, chain["nets"].values()), str(tmp_path / "net_pion"),
                     "--hits", str(chain["d"] / "hits"), str(tmp_path / "hits")]) == 0
    xml = (folder / "binning.xml").read_text()
    assert re.findall(r'<Particle pid="(\d+)"', xml) == ["22", "211"]
    assert os.path.isfile(folder / "neural_net_211_eta_20_25_All.onnx")
    out = tmp_path / "check.json"
    assert check(folder, "--json", str(out)) == 0
    rep = {s["pid"]: s for s in json.loads(out.read_text())["slices"]}
    assert sorted(rep) == [22, 211] and rep[211]["voxels"] == 533
    assert sorted(rep[211]["extrap_weights"], key=int) == ["0", "1", "2", "3", "12", "13", "14"]
    assert [e["p_mev"] for e in rep[211]["networks"]["All"]["energies"]] == [2.0 ** k for k in range(8, 23)]


def test_optimised_alpha_binning_is_fastcalosims_or_refused():
    """n_bin_alpha 32 is FastCaloSim's optimised alpha binning (4/8/16/32 by circumference / width): a calokit layer
    with those per-r-bin counts keeps its order (r outer, alpha inner already); a regular 32-bin layer or a merged
    first r bin would be read with other counts and is refused."""
    from HighLevelFeatures import Geometry, Layer, UserError

    edges = [0, 2, 5, 10, 50, 100]
    fcs_bins = fcs.fcs_alpha_bins(edges, 32, False)
    # r centre / width x 2 pi: 1/2 -> 3.1, 3.5/3 -> 7.3, 7.5/5 -> 9.4, 30/40 -> 4.7, 75/50 -> 9.4
    assert fcs_bins == [4, 8, 16, 8, 16] and fcs.fcs_alpha_bins(edges, 10, True) == [10] * 5
    front = Layer(0, [0, 10, 20], 1)
    geom = Geometry([front, Layer(1, edges, 32, alpha_per_r=fcs_bins)], "photon", 22)
    perm = fcs.voxel_permutation(geom)
    np.testing.assert_array_equal(perm, np.arange(2 + sum(fcs_bins)))
    for bad in (Layer(1, edges, 32), Layer(1, edges, 32, alpha_per_r=[1] + fcs_bins[1:], merged_first=True)):
        with pytest.raises(UserError, match="FastCaloSim reads"):
            fcs.voxel_permutation(Geometry([front, bad], "photon", 22))
