"""The toy shower source (toyshower.py, `preprocess.py toy`): format, reproducibility, physics shapes."""
import os

import h5py
import numpy as np
import pytest

import plumbing
import preprocess
import toyshower
import train

PHOTON_XML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "binning",
                          "binning_dataset_1_photons.xml")


def _per_energy(particle, energies, n_events, seed=5):
    """{energy: (per-event hit-energy sums, energy-weighted mean hit radius, per-layer energy sums)}."""
    out = {}
    for e in energies:
        h = toyshower.generate(particle, e, n_events, seed=seed)["hits"]
        per_event = np.bincount(h["event"], weights=h["energy"], minlength=n_events)
        depth = float(np.sum(h["r"] * h["energy"]) / np.sum(h["energy"]))
        layers = {int(lid): float(h["energy"][h["layer"] == lid].sum()) for lid in toyshower.LAYER_IDS}
        out[e] = (per_event, depth, layers)
    return out


@pytest.fixture(scope="module")
def shapes():
    energies = [2.0 ** 8, 2.0 ** 11, 2.0 ** 14, 2.0 ** 17, 2.0 ** 20]
    return energies, {p: _per_energy(p, energies, 400) for p in ("photon", "pion")}


def test_reproducible_from_seed():
    a = toyshower.generate("pion", 4096.0, 40, seed=3)
    b = toyshower.generate("pion", 4096.0, 40, seed=3)
    c = toyshower.generate("pion", 4096.0, 40, seed=4)
    for k in a["hits"]:
        np.testing.assert_array_equal(a["hits"][k], b["hits"][k])
    for k in ("truth_p", "truth_pdg", "extrap_eta", "extrap_phi", "extrap_r", "extrap_z"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["hits"]["energy"].size != c["hits"]["energy"].size or not np.array_equal(a["hits"]["energy"],
                                                                                     c["hits"]["energy"])


def test_cli_files_reproducible_and_in_contract_format(tmp_path):
    args = ["toy", "--particle", "photon", "--eta", "0.22", "--events-per-energy", "30", "--seed", "9",
            "--energies", "1024", "65536"]
    assert preprocess.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert preprocess.main(args + ["--out", str(tmp_path / "b")]) == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["hits_photon_E1024_eta_020_025.h5", "hits_photon_E65536_eta_020_025.h5"]
    for name in names:
        with h5py.File(tmp_path / "a" / name) as fa, h5py.File(tmp_path / "b" / name) as fb:
            assert sorted(fa) == sorted(fb)
            for k in fa:
                np.testing.assert_array_equal(fa[k][()], fb[k][()])
            assert fa["event"].dtype == np.int64 and fa["layer"].dtype == np.int16
            for k in ("eta", "phi", "r", "z", "energy", "truth_p"):
                assert fa[k].dtype == np.float64
            n = fa["truth_p"].shape[0]
            assert n == 30 and fa["extrap_eta"].shape == (n, 24) and fa["truth_pdg"][0] == 22
            assert fa["event"][:].min() == 0 and fa["event"][:].max() == n - 1
            assert fa.attrs["generator"] == "calokit toy (not Geant4)"
            assert (fa.attrs["particle"], fa.attrs["pid"], fa.attrs["seed"]) == ("photon", 22, 9)
            assert (fa.attrs["eta_min"], fa.attrs["eta_max"]) == (20.0, 25.0)
            eta = np.abs(fa["extrap_eta"][:, 2])
            assert np.all((eta >= 0.20) & (eta < 0.25))
            assert np.isnan(fa["extrap_eta"][:, 5]).all()          # layers the toy does not model
            phi = fa["phi"][:]
            assert phi.min() > -np.pi and phi.max() <= np.pi
            np.testing.assert_allclose(fa["z"][:], fa["r"][:] * np.sinh(fa["eta"][:]), rtol=1e-12)


def test_default_energies_and_hit_multiplicity():
    assert toyshower.DEFAULT_ENERGIES == [2.0 ** k for k in range(8, 23)]
    for energy, want in ((2.0 ** 8, 50), (2.0 ** 22, 2000)):
        n = toyshower.generate("photon", energy, 20, seed=1)["hits"]["energy"].size / 20
        assert 0.75 * want < n < 1.35 * want
    small = toyshower.generate("photon", 2.0 ** 22, 10, seed=1, hits_low=10, hits_high=200)["hits"]["energy"].size
    assert small / 10 < 300


def test_mean_depth_grows_with_log_energy(shapes):
    energies, res = shapes
    for particle, margin in (("photon", 20.0), ("pion", 15.0)):
        depth = [res[particle][e][1] for e in energies]
        steps = np.diff(depth)
        assert (steps > margin).all(), (particle, depth)


def test_relative_resolution_falls_with_energy(shapes):
    energies, res = shapes
    for particle in ("photon", "pion"):
        rel = [res[particle][e][0].std() / res[particle][e][0].mean() for e in energies[:4]]
        assert all(b < 0.9 * a for a, b in zip(rel, rel[1:])), (particle, rel)
    # pions fluctuate much more than photons at the same momentum
    for e in energies:
        ph, pi = res["photon"][e][0], res["pion"][e][0]
        assert pi.std() / pi.mean() > 1.5 * ph.std() / ph.mean()


def test_photon_and_pion_layer_patterns(shapes):
    energies, res = shapes
    for e in energies:
        ph, pi = res["photon"][e][2], res["pion"][e][2]
        tot_ph, tot_pi = sum(ph.values()), sum(pi.values())
        assert (ph[1] + ph[2]) / tot_ph > 0.85            # EM: mostly strips + middle
        assert ph[12] / tot_ph < 0.05 and ph[15] == 0.0
        if e >= 2.0 ** 11:
            assert (pi[12] + pi[13] + pi[14]) / tot_pi > 0.35   # hadronic: much energy in the Tile
            assert pi[15] > 0.0                                 # leakage layer: the dropped-hit path
        # pions deposit less of their kinetic energy (h/e < 1, invisible energy) than photons
        assert tot_pi / 400 / toyshower.kinetic_energy(e, "pion") < tot_ph / 400 / e


def test_electrons_shower_earlier_than_photons():
    """Same EM settings, no conversion: more of the electron's energy in the presampler and strips, a shallower
    energy-weighted depth, the same stochastic resolution (within 15 %)."""
    for e in (2.0 ** 10, 2.0 ** 16):
        res = {p: _per_energy(p, [e], 600, seed=7)[e] for p in ("photon", "electron")}
        front = {p: (res[p][2][0] + res[p][2][1]) / sum(res[p][2].values()) for p in res}
        assert front["electron"] > front["photon"] + 0.03, (e, front)
        assert res["electron"][1] < res["photon"][1] - 5.0                       # mm shallower
        rel = {p: res[p][0].std() / res[p][0].mean() for p in res}
        assert rel["electron"] == pytest.approx(rel["photon"], rel=0.15)
    a = toyshower.generate("electron", 4096.0, 50, eta_range=(1.25, 1.30), seed=1)
    eta = np.abs(a["extrap_eta"][:, 2])
    assert np.all((eta >= 1.25) & (eta < 1.30)) and (a["truth_pdg"] == 11).all()


def test_electrons_voxelise_prepare_and_train_like_photons(tmp_path):
    """The chain's first stages on tiny electron and photon samples with the multi-slice XML: same voxels,
    energy kept, labels of each particle's E_kin, a few training iterations with finite losses."""
    xml = os.path.join(os.path.dirname(PHOTON_XML), "binning_fastcalogan.xml")
    energies = (2048.0, 65536.0)
    layers = {}
    for particle in ("photon", "electron"):
        d = tmp_path / particle
        assert preprocess.main(["toy", "--particle", particle, "--eta", "0.20", "--events-per-energy", "60",
                                "--energies", *map(str, energies), "--seed", "1", "--out", str(d / "hits")]) == 0
        files = sorted(str(p) for p in (d / "hits").glob("*.h5"))
        assert [os.path.basename(f) for f in files] == [f"hits_{particle}_E{int(e)}_eta_020_025.h5" for e in energies]
        vox = str(d / "voxels.h5")
        assert preprocess.main(["voxelise", "--binning", xml, "--particle", particle, "--out", vox, *files]) == 0
        deposited = 0.0
        for f in files:
            with h5py.File(f) as h:
                assert h["truth_pdg"][0] == {"photon": 22, "electron": 11}[particle]
                deposited += h["energy"][:][np.isin(h["layer"][:], [0, 1, 2, 3, 12])].sum(dtype=np.float64)
        with h5py.File(vox) as v:
            showers = v["showers"][:]
            assert showers.shape == (120, 368)
            assert showers.sum(dtype=np.float64) == pytest.approx(deposited, rel=1e-6)
            layers[particle] = showers[:, :8].sum() / showers.sum()            # layer 0: the first 8 voxels
        prepared = str(d / "train.h5")
        assert preprocess.main(["prepare", "--binning", xml, "--particle", particle, "--range", "all",
                                "--out", prepared, vox]) == 0
        with h5py.File(prepared) as f:
            ekin = plumbing.kinetic_energy(np.array(energies), particle)
            lo, hi = plumbing.energy_range(particle, "all")[:2]
            want = plumbing.condition_label(ekin, plumbing.kinetic_energy(lo, particle),
                                            plumbing.kinetic_energy(hi, particle))
            np.testing.assert_allclose(np.unique(f["label"][:]), np.sort(want), rtol=1e-6)
            np.testing.assert_allclose(np.unique(f["e_kin"][:]), ekin, rtol=1e-9)
    assert layers["electron"] > 1.5 * layers["photon"]          # the presampler sees the early electron shower
    # training (photons: tests/test_smoke.py runs the same call)
    run = str(tmp_path / "electron" / "run")
    assert train.main(["--data", str(tmp_path / "electron" / "train.h5"), "--out", run, "--iterations", "4",
                       "--checkpoint-every", "2", "--batch-size", "32", "--no-jit", "--seed", "2"]) == 0
    assert [it for it, _ in plumbing.list_checkpoints(run)] == [2, 4]
    rows = np.loadtxt(os.path.join(run, "losses.csv"), delimiter=",", skiprows=1)
    assert rows.shape == (4, 5) and np.isfinite(rows).all()
    assert plumbing.read_run_config(run)["particle"] == "electron"


def test_lateral_profile_photon_narrow_pion_wide():
    """Voxelised radial profile: EM energy within a few tens of mm in layers 1-2; pions much wider."""
    from HighLevelFeatures import compute_features, read_geometry

    xml_pi = PHOTON_XML.replace("photons", "pions")
    out = {}
    for particle, xml in (("photon", PHOTON_XML), ("pion", xml_pi)):
        g = read_geometry(xml, particle)
        d = toyshower.generate(particle, 65536.0, 100, seed=2)
        showers, _ = preprocess.voxelise_arrays(g, d["hits"], d, 100)
        out[particle] = compute_features(g, showers)
    for lid in (1, 2):
        assert 3.0 < np.mean(out["photon"]["EC_r"][lid]) < 40.0
        assert np.mean(out["photon"]["width_r"][lid]) < 40.0
    # pions: a narrow MIP track in the strips, hadronic showers wider than EM ones from the middle layer on
    assert np.mean(out["pion"]["width_r"][1]) < np.mean(out["photon"]["width_r"][1])
    assert np.mean(out["pion"]["width_r"][2]) > 1.1 * np.mean(out["photon"]["width_r"][2])
    assert np.mean(out["pion"]["width_r"][12]) > 100.0


@pytest.mark.parametrize("argv, message", [
    (["--particle", "proton"], "toy source makes"),
    (["--events-per-energy", "0"], "events-per-energy"),
    (["--energies", "-5"], "positive"),
    (["--eta", "1.31"], "barrel"),
])
def test_toy_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    rc = preprocess.main(["toy", "--out", str(tmp_path / "o"), "--events-per-energy", "5", "--energies", "256"] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") or os.listdir(tmp_path / "o") == []
