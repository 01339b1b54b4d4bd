"""select_epoch.py: the ROOT "WW" chi2, the histogram range, the epoch choice, outputs, bad inputs."""
import csv
import json
import math
import os
import re

import h5py
import numpy as np
import pytest

import select_epoch as se
import train
import plumbing
from plumbing import condition_label, kinetic_energy
from test_train import synthetic_showers, write_training_file

EXCLUDED = 2.0**14
OUT_OF_RANGE = 2.0**5               # below the photon "all" range (2^6 .. 2^22 MeV)
REF_ENERGIES = (OUT_OF_RANGE, 2.0**8, 2.0**11, EXCLUDED, 2.0**17)


# ----------------------------------------------------------------------------------------------
# the chi-square test

def test_chi2_ww_hand_computed():
    # unweighted counts: w = n, s^2 = n. W1 = 35, W2 = 30; bin 2 is empty in both -> skipped, ndf = 3 - 1
    h1 = np.array([10.0, 20.0, 0.0, 5.0])
    h2 = np.array([12.0, 18.0, 0.0, 0.0])
    expected = ((30 * 10 - 35 * 12) ** 2 / (35**2 * 12 + 30**2 * 10)     # 14400 / 23700
                + (30 * 20 - 35 * 18) ** 2 / (35**2 * 18 + 30**2 * 20)   # 900 / 40050
                + (30 * 5 - 35 * 0) ** 2 / (35**2 * 0 + 30**2 * 5))      # 22500 / 4500
    chi2, ndf = se.chi2_ww(h1, h1, h2, h2)
    assert ndf == 2
    assert chi2 == pytest.approx(expected, rel=1e-12)
    assert chi2 == pytest.approx(5.630067, abs=1e-6)
    # unit-normalised histograms (errors scaled alike) give the same statistic: WW is scale invariant
    w1, s1 = se.unit_normalised(h1)
    w2, s2 = se.unit_normalised(h2)
    assert w1.sum() == pytest.approx(1.0) and s1 == pytest.approx(h1 / 35.0**2)
    assert se.chi2_ww(w1, s1, w2, s2) == (pytest.approx(expected, rel=1e-12), 2)
    assert se.chi2_ww(3 * w1, 9 * s1, 0.5 * w2, 0.25 * s2)[0] == pytest.approx(expected, rel=1e-12)


def test_chi2_identical_and_empty():
    h = np.array([0.0, 3.0, 7.0, 0.0, 1.0])
    w, s = se.unit_normalised(h)
    assert se.chi2_ww(w, s, w, s) == (0.0, 2)
    # same shape, different statistics: still exactly 0
    assert se.chi2_ww(*se.unit_normalised(h), *se.unit_normalised(10 * h))[0] == pytest.approx(0.0, abs=1e-12)
    assert se.chi2_ww(w, s, np.zeros(5), np.zeros(5))[0] == math.inf
    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 1, 5000), rng.normal(10, 1, 5000)
    chi2, ndf = se.etot_chi2(a, a.copy(), "photon")
    assert chi2 == 0.0 and ndf == 29
    chi2, ndf = se.etot_chi2(a, b, "photon")                  # two samples of one distribution: chi2/ndf ~ 1
    assert 0.4 < chi2 / ndf < 2.0
    assert se.etot_chi2(a, b + 0.5, "photon")[0] / ndf > 5    # a shifted one is clearly worse


def test_histogram_root_semantics():
    v = np.array([0.0, 0.999, 1.0, 2.5, 3.0, -1.0, 5.0, np.nan])
    np.testing.assert_array_equal(se.histogram(v, 0.0, 3.0, 3), [2, 1, 1])          # [lo, hi): 3.0 is overflow
    np.testing.assert_array_equal(se.histogram(v, 0.0, 3.0, 3, overflow=True), [1, 2, 1, 1, 2])
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    mean, std = 2.5, np.std(ref)
    assert se.histogram_range(ref, "photon") == (pytest.approx(mean - 3 * std), pytest.approx(mean + 3 * std))
    assert se.histogram_range(ref, "pion") == (pytest.approx(mean - 4 * std), pytest.approx(mean + 3.5 * std))
    lo, hi = se.histogram_range(np.full(10, 7.0), "photon")                            # zero RMS: a tiny window
    assert lo < 7.0 < hi


def test_epoch_choice_never_uses_excluded_energies():
    # per checkpoint {energy: (chi2, ndf)}; 16384 is left out of training
    table = [{256.0: (60.0, 29), 2048.0: (58.0, 29), 16384.0: (29.0, 29)},     # best if 16384 counted
             {256.0: (40.0, 29), 2048.0: (45.0, 29), 16384.0: (400.0, 29)},    # best on the fit energies
             {256.0: (math.inf, 29), 2048.0: (1.0, 29), 16384.0: (1.0, 29)}]
    fit = [256.0, 2048.0]
    totals = [se.total_chi2(t, fit)[2] for t in table]
    assert totals[0] == pytest.approx(118 / 58) and totals[1] == pytest.approx(85 / 58) and totals[2] == math.inf
    assert se.best_index(totals) == 1
    assert se.best_index([se.total_chi2(t, list(t))[2] for t in table]) == 0   # what counting it would pick
    assert se.best_index([math.inf, math.inf]) == 1


def test_energy_points_and_ranges():
    einc = np.array([256.0, 256.0 * (1 + 1e-5), 512.0, 32.0, 2.0**22, 2.0**12])
    points, idx = se.energy_points(einc)
    np.testing.assert_array_equal(points, [32.0, 256.0, 512.0, 2.0**12, 2.0**22])
    np.testing.assert_array_equal(idx, [1, 1, 2, 0, 4, 3])
    cfg = {"particle": "photon", "range": "high", "p_min": 2.0**12, "p_max": 2.0**22}
    np.testing.assert_array_equal(se.run_mask(einc, cfg), [False, False, False, False, True, False])
    cfg = {"excluded_energies": [2048.0]}
    assert se.is_excluded(2048.0 * (1 + 1e-4), cfg) and not se.is_excluded(4096.0, cfg)


# ----------------------------------------------------------------------------------------------
# end to end on a tiny run with an excluded energy and a reference with an out-of-range energy

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    data = write_training_file(str(d / "train.h5"), energies=REF_ENERGIES[1:], n_per_energy=300, seed=2)
    run = str(d / "run")
    assert train.main(["--data", data, "--out", run, "--iterations", "12", "--checkpoint-every", "4", "--seed", "2",
                       "--batch-size", "32", "--no-jit", "--exclude-energy", str(EXCLUDED)]) == 0
    ref = str(d / "reference.h5")
    einc, showers = synthetic_showers(REF_ENERGIES, 200, seed=9)
    order = np.random.default_rng(0).permutation(einc.size)       # energies interleaved, as in real files
    with h5py.File(ref, "w") as f:
        f["incident_energies"] = einc[order].reshape(-1, 1)
        f["showers"] = showers[order]
    return run, ref, d


def test_select_epoch_outputs(tiny_run):
    run, ref, d = tiny_run
    out = str(d / "select")
    assert se.main(["--run", run, "--reference", ref, "--events", "500", "--out", out, "--seed", "4"]) == 0
    with open(os.path.join(out, "best.json")) as f:
        best = json.load(f)
    with open(os.path.join(out, "chi2.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert os.path.getsize(os.path.join(out, "chi2_vs_iteration.png")) > 1000
    its = [4, 8, 12]
    assert sorted({int(r["iteration"]) for r in rows}) == its
    # the total of each checkpoint sums the fit energies only; the excluded one is never in it
    for it in its:
        fit = [r for r in rows if int(r["iteration"]) == it and r["role"] == "fit"]
        excl = [r for r in rows if int(r["iteration"]) == it and r["role"] == "excluded"]
        total = [r for r in rows if int(r["iteration"]) == it and r["role"] == "total"][0]
        assert sorted(float(r["energy_mev"]) for r in fit) == [2.0**8, 2.0**11, 2.0**17]
        assert [float(r["energy_mev"]) for r in excl] == [EXCLUDED]
        assert int(total["ndf"]) == sum(int(r["ndf"]) for r in fit)
        if math.isfinite(float(total["chi2"])):
            assert float(total["chi2"]) == pytest.approx(sum(float(r["chi2"]) for r in fit), rel=1e-5)
    totals = [float(r["chi2_ndf"]) for r in rows if r["role"] == "total"]
    assert best["best_iteration"] == its[se.best_index(totals, "mode")]
    assert best["histogram"]["window"] == "mode" and best["histogram"]["ties"].startswith("later")
    assert best["checkpoint"] == os.path.abspath(os.path.join(run, f"ckpt_{best['best_iteration']}"))
    assert sorted(float(e) for e in best["per_energy"]) == [2.0**8, 2.0**11, 2.0**17]
    assert list(best["excluded"]) == [f"{EXCLUDED:g}"]
    ex = best["excluded"][f"{EXCLUDED:g}"]
    assert ex["ndf"] > 0 and 0.0 <= ex["etot_einc_separation"] <= 0.5 + 1e-9
    assert best["out_of_range_energies"] == [OUT_OF_RANGE]
    # generated.h5: one shower per in-range reference event, same incident energies in the same order
    with h5py.File(ref) as f:
        einc = f["incident_energies"][:, 0]
    inrange = einc > OUT_OF_RANGE
    with h5py.File(os.path.join(out, "generated.h5")) as f:
        ge, gs = f["incident_energies"][...], f["showers"][...]
    assert ge.shape == (inrange.sum(), 1) and gs.shape == (inrange.sum(), 368) and gs.dtype == np.float32
    np.testing.assert_array_equal(ge[:, 0], einc[inrange])
    assert (gs >= 0).all() and np.isfinite(gs).all() and gs.sum() > 0
    assert best["generated_events"] == inrange.sum()
    assert best["reference_for_evaluate"] == os.path.abspath(os.path.join(out, "reference_inrange.h5"))
    with h5py.File(best["reference_for_evaluate"]) as f:
        np.testing.assert_array_equal(f["incident_energies"][:, 0], einc[inrange])
        assert f["showers"].shape == (inrange.sum(), 368)
    # the chi2 of the best checkpoint at the lowest energy, recomputed from the same seeded noise
    cfg = plumbing.read_run_config(run)
    g = plumbing.load_generator(run, best["best_iteration"])
    e = 2.0**8
    label = condition_label(kinetic_energy(e, "photon"), cfg["ekin_min"], cfg["ekin_max"])
    gen_etot = plumbing.generate(g, np.full(500, label), np.random.default_rng(4)).sum(axis=1, dtype=np.float64) * e
    with h5py.File(ref) as f:
        ref_etot = f["showers"][...].sum(axis=1, dtype=np.float64)[einc == e]
    chi2, ndf = se.etot_chi2(ref_etot, gen_etot, "photon", window="mode", momentum=e)
    mine = best["per_energy"]["256"]
    assert mine["histogram_range"] == pytest.approx(list(se.histogram_range(ref_etot, "photon", "mode", e)))
    assert mine["ndf"] == ndf
    assert (mine["chi2"] is None and chi2 == math.inf) or mine["chi2"] == pytest.approx(chi2, rel=1e-4)


def test_select_epoch_bad_inputs(tiny_run, tmp_path, capsys):
    run, ref, _ = tiny_run
    out = str(tmp_path / "o")
    assert se.main(["--run", str(tmp_path / "nope"), "--reference", ref, "--out", out]) == 2
    assert "config.json: run configuration not found" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with open(run + "/config.json") as f:
        (empty / "config.json").write_text(f.read())
    assert se.main(["--run", str(empty), "--reference", ref, "--out", out]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert se.main(["--run", run, "--reference", str(tmp_path / "missing.h5"), "--out", out]) == 2
    assert "missing.h5: file not found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["incident_energies"] = np.full((5, 1), 256.0)
        f["showers"] = np.ones((5, 533), np.float32)
    assert se.main(["--run", run, "--reference", str(wrong), "--out", out]) == 2
    assert "has 533 voxels per event, expected 368" in capsys.readouterr().err
    with h5py.File(wrong, "w") as f:
        f["energies"] = np.full((5, 1), 256.0)
        f["voxels"] = np.ones((5, 368), np.float32)
    assert se.main(["--run", run, "--reference", str(wrong), "--out", out]) == 2
    assert "missing dataset 'incident_energies'" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_generate_like_heldout(tiny_run):
    run, ref, d = tiny_run
    heldout = str(d / "heldout.h5")
    einc, showers = synthetic_showers(REF_ENERGIES[::-1], 30, seed=12)
    with h5py.File(heldout, "w") as f:
        f["incident_energies"] = einc.reshape(-1, 1)
        f["showers"] = showers
    out = str(d / "select_heldout")
    assert se.main(["--run", run, "--reference", ref, "--events", "200", "--out", out,
                    "--generate-like", heldout]) == 0
    with open(os.path.join(out, "best.json")) as f:
        best = json.load(f)
    inrange = einc > OUT_OF_RANGE
    with h5py.File(os.path.join(out, "generated.h5")) as f:
        np.testing.assert_array_equal(f["incident_energies"][:, 0], einc[inrange])
        assert f["showers"].shape == (inrange.sum(), 368)
    with h5py.File(best["reference_for_evaluate"]) as f:
        np.testing.assert_array_equal(f["showers"][...], showers[inrange])
    assert best["generated_like"] == os.path.abspath(heldout)


# ----------------------------------------------------------------------------------------------
# FastCaloGAN's window (BoloGAN plotting/selectBestEpoch_Energy.py) and the combination of energy ranges

def test_mode_window_on_hand_made_histograms():
    """p = 100 MeV: 100 bins of 2 MeV over [0, 200). Two equal peaks at 50.5 and 150.5 (bins 25 and 75): the first
    wins, mode = its centre 51; RMS of the entries inside [0, 200) only (500 and -1 are outside) = 50; lower edge
    51 - 3 x 50 < 0 -> clipped at 0, upper 51 + 3 x 50 = 201 (photons); pions a, b = 4, 3.5 -> 0, 226."""
    ref = np.array([50.5] * 30 + [150.5] * 30 + [500.0, -1.0])
    assert se.mode_and_rms(ref, 100.0) == (pytest.approx(51.0), pytest.approx(50.0))
    assert se.histogram_range(ref, "photon", "mode", 100.0) == (0.0, pytest.approx(201.0))
    assert se.histogram_range(ref, "pion", "mode", 100.0) == (0.0, pytest.approx(226.0))
    # one narrow peak: 120.3 and 121.1 both in bin 60 (centre 121), RMS 0.4 -> [121 - 1.2, 121 + 1.2]
    narrow = np.array([120.3] * 100 + [121.1] * 100)
    assert se.histogram_range(narrow, "photon", "mode", 100.0) == (pytest.approx(119.8), pytest.approx(122.2))
    # the mean window of the same sample: mean 120.7, SD 0.4
    assert se.histogram_range(narrow, "photon", "mean") == (pytest.approx(119.5), pytest.approx(121.9))
    # ties: BoloGAN compares chi2/ndf at 3 decimals and keeps the later checkpoint; the mean window the earlier
    assert se.best_index([3.0, 1.0, 1.0002, 2.0], "mode") == 2
    assert se.best_index([3.0, 1.0, 1.0002, 2.0], "mean") == 1
    assert se.best_index([3.0, 1.0, 1.002, 2.0], "mode") == 1
    assert se.best_index([math.inf, math.inf], "mode") == 1


def test_smoothed_choice_prefers_a_good_neighbourhood():
    # one lucky checkpoint (1.0 between two 9.0s) against a steady stretch (3, 2, 3): each alone picks the lucky
    # one, the running median of 3 the stretch; the ends use the values they have
    totals = [9.0, 1.0, 9.0, 3.0, 2.0, 3.0]
    assert se.best_index(totals) == 1
    assert se.smoothed(totals, 3).tolist() == [5.0, 9.0, 3.0, 3.0, 3.0, 2.5]
    assert se.best_index(se.smoothed(totals, 3)) == 5
    assert se.smoothed(totals, 5).tolist() == [9.0, 6.0, 3.0, 3.0, 3.0, 3.0]
    assert se.best_index(se.smoothed(totals, 1)) == se.best_index(totals)
    assert se.smoothed([1.0, math.inf, math.inf], 3)[1] == math.inf


def test_identical_checkpoints_tie_to_the_later_one(tiny_run, tmp_path):
    """A run whose last checkpoint is a copy of its first under a later iteration: the mode window picks the
    copy when the first was best, the mean window the first (same noise, equal chi2)."""
    import shutil
    run, ref, _ = tiny_run
    twin = str(tmp_path / "twin")
    os.makedirs(twin)
    shutil.copy(os.path.join(run, "config.json"), twin)
    for it in (4, 8):
        shutil.copytree(os.path.join(run, "ckpt_4"), os.path.join(twin, f"ckpt_{it}"))
    # a reference the checkpoint itself generated (other noise), so that every chi2 is finite
    cfg = plumbing.read_run_config(run)
    g = plumbing.load_generator(run, 4)
    es = np.repeat([2.0**8, 2.0**11, 2.0**17], 300)
    label = condition_label(kinetic_energy(es, "photon"), cfg["ekin_min"], cfg["ekin_max"])
    ref = str(tmp_path / "own.h5")
    plumbing.write_calo_file(ref, es, plumbing.generate(g, label, 11) * es[:, None])
    for window, expected in (("mode", 8), ("mean", 4)):
        out = str(tmp_path / window)
        assert se.main(["--run", twin, "--reference", ref, "--events", "200", "--out", out, "--no-generated",
                        "--window", window]) == 0
        with open(os.path.join(out, "best.json")) as f:
            assert json.load(f)["best_iteration"] == expected


def test_combine_takes_each_energy_from_its_range(tmp_path, capsys):
    """Low12 (2^8..2^12) and High12 (2^12..2^22) runs, each selected for the same held-out file (2^5, 2^8, 2^12,
    2^17): the combined file keeps the held-out order, 2^12 from Low12 (FastCaloSim: p > 2^12 -> High12), 2^17
    from High12, and leaves out 2^5 (in no range), which reference_inrange.h5 leaves out too."""
    heldout = str(tmp_path / "heldout.h5")
    energies = (2.0**5, 2.0**8, 2.0**12, 2.0**17)
    einc, showers = synthetic_showers(energies, 20, seed=5)
    order = np.random.default_rng(1).permutation(einc.size)
    einc, showers = einc[order], showers[order]
    with h5py.File(heldout, "w") as f:
        f["incident_energies"] = einc.reshape(-1, 1)
        f["showers"] = showers
    sel = {}
    for name, es in (("Low12", (2.0**8, 2.0**12)), ("High12", (2.0**12, 2.0**17))):
        data = write_training_file(str(tmp_path / f"train_{name}.h5"), energies=es, n_per_energy=50, seed=3,
                                   rng_name=name)
        run = str(tmp_path / f"run_{name}")
        assert train.main(["--data", data, "--out", run, "--iterations", "2", "--checkpoint-every", "2",
                           "--batch-size", "16", "--no-jit"]) == 0
        sel[name] = str(tmp_path / f"sel_{name}")
        assert se.main(["--run", run, "--reference", heldout,
                        "--events", "50", "--out", sel[name], "--generate-like", heldout]) == 0
    out = str(tmp_path / "combined")
    assert se.main(["--combine", sel["Low12"], sel["High12"], "--generate-like", heldout, "--out", out]) == 0
    with h5py.File(os.path.join(out, "generated.h5")) as f:
        ce, cs = f["incident_energies"][:, 0], f["showers"][...]
    covered = einc > 2.0**5
    np.testing.assert_array_equal(ce, einc[covered])
    parts = {}
    for name in sel:
        with h5py.File(os.path.join(sel[name], "generated.h5")) as f:
            parts[name] = (f["incident_energies"][:, 0], f["showers"][...])
    for e, name in ((2.0**8, "Low12"), (2.0**12, "Low12"), (2.0**17, "High12")):
        pe, ps = parts[name]
        np.testing.assert_array_equal(cs[ce == e], ps[pe == e])
    assert not np.array_equal(cs[ce == 2.0**12], parts["High12"][1][parts["High12"][0] == 2.0**12])
    with open(os.path.join(out, "best.json")) as f:
        best = json.load(f)
    served = {c["range"]: c["energies_served"] for c in best["combined"]}
    assert served == {"Low12": [2.0**8, 2.0**12], "High12": [2.0**17]}
    with h5py.File(best["reference_for_evaluate"]) as f:
        np.testing.assert_array_equal(f["incident_energies"][:, 0], einc[covered])
    # a selection made for another file is refused with one line
    import shutil
    other = str(tmp_path / "other.h5")
    shutil.copy(heldout, other)
    assert se.main(["--combine", sel["Low12"], "--generate-like", other, "--out", str(tmp_path / "bad")]) == 2
    assert "not for" in capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# continuous incident energies (CaloChallenge datasets 2 and 3): log-energy bins of E_tot / E_inc

CONT_VOXELS = 8
CONT_CFG = {"particle": "photon", "n_voxels": CONT_VOXELS, "p_min": 1e3, "p_max": 1e6, "ekin_min": 1e3,
            "ekin_max": 1e6, "label_scheme": "V2", "latent_dim": 50}
RESP, SLOPE, SIGMA = 0.6, 0.3, 0.02     # E_tot / E_kin = 0.6 + 0.3 label + 0.02 N(0, 1): 0.6 at 1 GeV, 0.9 at 1 TeV


def response_generator(factor):
    """A one-layer Keras generator whose voxels sum to factor x (RESP + SLOPE label + SIGMA N(0, 1)) of E_kin
    (noise N(0.5, 0.5): 2 SIGMA (z_0 - 0.5) is SIGMA N(0, 1))."""
    import keras
    noise, cond = keras.Input((50,), name="noise"), keras.Input((2,), name="condition")
    dense = keras.layers.Dense(CONT_VOXELS)
    model = keras.Model([noise, cond], dense(keras.layers.Concatenate()([noise, cond])))
    kernel = np.zeros((52, CONT_VOXELS), np.float32)
    kernel[0], kernel[50] = 2 * SIGMA / CONT_VOXELS, SLOPE / CONT_VOXELS
    dense.set_weights([factor * kernel, np.full(CONT_VOXELS, factor * (RESP - SIGMA) / CONT_VOXELS, np.float32)])
    return model


@pytest.fixture(scope="module")
def continuous_run(tmp_path_factory):
    """A run with three checkpoints, the response 5 % high (iteration 1000), right (2000), 5 % low (3000), and a
    reference of 8000 showers with E_inc log-uniform in 1 GeV..1 TeV from the right response."""
    d = tmp_path_factory.mktemp("cont")
    run = d / "run"
    for it, factor in ((1000, 1.05), (2000, 1.0), (3000, 0.95)):
        (run / f"ckpt_{it}").mkdir(parents=True)
        response_generator(factor).save(run / f"ckpt_{it}" / "generator.keras")
    (run / "config.json").write_text(json.dumps(CONT_CFG))
    rng = np.random.default_rng(21)
    einc = 10.0 ** rng.uniform(3, 6, 8000)
    label = condition_label(einc, 1e3, 1e6)
    etot = einc * (RESP + SLOPE * label + SIGMA * rng.standard_normal(einc.size))
    ref = str(d / "ref.h5")
    plumbing.write_calo_file(ref, einc, np.repeat((etot / CONT_VOXELS)[:, None], CONT_VOXELS, 1).astype(np.float32))
    return str(run), ref, d


def test_grouping_rule_discrete_points_or_log_energy_bins():
    assert se.is_discrete(2.0 ** np.arange(8, 23), 15 * 10000)           # dataset 1 and the demo
    assert se.is_discrete([256.0], 5)
    assert not se.is_discrete(np.geomspace(1e3, 1e6, 2000), 2000)        # datasets 2 and 3
    assert not se.is_discrete(np.geomspace(1e3, 1e6, 20), 30)            # 20 energies, 1.5 events each
    # one bin per factor 2 (dataset 2/3 High12: 4.1 GeV..1 TeV -> 8, Low12: 1..4.1 GeV -> 2), at most 16, >= 500 events
    assert se.auto_bin_count(np.geomspace(4096.0, 1e6, 80000)) == 8
    assert se.auto_bin_count(np.geomspace(1e3, 4096.0, 20000)) == 2
    assert se.auto_bin_count(np.geomspace(1.0, 2.0**30, 10**5)) == se.MAX_ENERGY_BINS
    assert se.auto_bin_count(np.geomspace(1e3, 1e6, 1200)) == 2
    assert se.auto_bin_count(np.geomspace(1e3, 1e6, 100)) == 1
    edges, idx = se.log_energy_bins([1e3, 1e4, 1e5, 1e6, 3e3], 3)
    assert edges == pytest.approx([1e3, 1e4, 1e5, 1e6]) and idx.tolist() == [0, 1, 2, 2, 0]


@pytest.mark.parametrize("bins", ["auto"] + [str(n) for n in range(1, se.MAX_ENERGY_BINS + 1)])
def test_continuous_energies_right_response_beats_5_percent_off(continuous_run, tmp_path, bins):
    """At every bin count allowed (and auto: 8000 events over ~10 factors of 2 -> 10 bins), the checkpoint with
    the right E_tot / E_inc is chosen over the ones 5 % high and 5 % low, with chi2/ndf near 1 in every bin."""
    run, ref, _ = continuous_run
    out = tmp_path / "sel"
    assert se.main(["--run", run, "--reference", ref, "--events", "2000", "--out", str(out), "--no-generated",
                    "--energy-bins", bins]) == 0
    best = json.loads((out / "best.json").read_text())
    n = 10 if bins == "auto" else int(bins)
    grouping = best["energy_grouping"]
    assert grouping["kind"] == "log-energy bins" and grouping["compared"] == "E_tot / E_inc"
    assert grouping["bins"] == n and len(grouping["edges_mev"]) == n + 1 and sum(grouping["reference_events"]) == 8000
    assert grouping["edges_mev"][0] == pytest.approx(1e3, rel=1e-2) and grouping["edges_mev"][-1] == pytest.approx(1e6, rel=1e-2)
    assert best["best_iteration"] == 2000
    assert sorted(best["per_energy"]) == sorted(se.bin_name(lo, hi) for lo, hi in
                                                zip(grouping["edges_mev"][:-1], grouping["edges_mev"][1:]))
    for rep in best["per_energy"].values():
        assert 0.3 < rep["chi2_ndf"] < 3.0
        assert rep["gen_mean_etot_einc"] == pytest.approx(rep["ref_mean_etot_einc"], rel=0.01)
    rows = list(csv.DictReader(open(out / "chi2.csv", newline="")))
    total = {int(r["iteration"]): float(r["chi2_ndf"]) for r in rows if r["role"] == "total"}
    assert total[2000] < 3.0 and min(total[1000], total[3000]) > 5.0      # 1 bin: 1.05 vs 19.7
    assert {r["energy_mev"] for r in rows if r["role"] == "fit"} == set(best["per_energy"])


def test_continuous_energies_outputs_and_refusals(continuous_run, tmp_path, capsys):
    """The auto choice on a continuous reference: bins in best.json and the plot, the generated file for every
    reference event; a run trained with --exclude-energy needs energy points; a bad --energy-bins is one line."""
    run, ref, d = continuous_run
    out = tmp_path / "sel"
    assert se.main(["--run", run, "--reference", ref, "--events", "500", "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["energy_grouping"]["bins"] == 10 and best["best_iteration"] == 2000
    assert re.fullmatch(r"auto: \d+ distinct energies \(within 0.001\) for 8000 events: not 32 points .*",
                        best["energy_grouping"]["rule"])
    assert best["energy_grouping"]["out_of_range_events"] == 0 and best["out_of_range_energies"] == []
    assert os.path.getsize(out / "chi2_vs_iteration.png") > 1000
    with h5py.File(ref) as f, h5py.File(out / "generated.h5") as g:
        np.testing.assert_array_equal(g["incident_energies"][:, 0], f["incident_energies"][:, 0])
        ratio = g["showers"][...].sum(axis=1) / g["incident_energies"][:, 0]
        label = condition_label(f["incident_energies"][:, 0], 1e3, 1e6)
    assert np.mean(ratio - (RESP + SLOPE * label)) == pytest.approx(0.0, abs=0.002)
    assert "log-energy bins of E_tot/E_inc" in capsys.readouterr().out
    # the points would be one shower each: --energy-bins points is still possible, auto never does it
    excl = tmp_path / "excl"
    shutil_copy_run(run, excl, {"excluded_energies": [2e4]})
    assert se.main(["--run", str(excl), "--reference", ref, "--out", str(tmp_path / "x")]) == 2
    assert "needs the reference's discrete energy points" in capsys.readouterr().err
    for bad in ("0", "17", "many"):
        assert se.main(["--run", run, "--reference", ref, "--out", str(tmp_path / "x"), "--energy-bins", bad]) == 2
        assert "--energy-bins must be auto, points or an integer 1..16" in capsys.readouterr().err


def shutil_copy_run(run, dst, extra):
    import shutil
    shutil.copytree(run, dst)
    cfg = json.loads(open(os.path.join(run, "config.json")).read())
    (dst / "config.json").write_text(json.dumps({**cfg, **extra}))


def test_discrete_reference_keeps_points(tiny_run, tmp_path):
    """A dataset-1 style reference (a few energies, 200 events each) keeps the per-energy E_tot test, and says so."""
    run, ref, _ = tiny_run
    out = tmp_path / "sel"
    assert se.main(["--run", run, "--reference", ref, "--events", "200", "--out", str(out), "--no-generated"]) == 0
    g = json.loads((out / "best.json").read_text())["energy_grouping"]
    assert g["kind"] == "points" and g["compared"] == "E_tot" and g["points"] == 4
    assert g["rule"].startswith("auto: 5 distinct energies")


def test_smooth_option_prefers_a_steady_stretch(continuous_run, tmp_path, capsys):
    """Checkpoints with the response 15 % high, right (a lucky one), 15 % high, then 4 %, 1 %, 2 % high and 15 %
    high again: alone, the right one is chosen; --smooth 3 takes the 1 % one, whose neighbourhood is good, and
    best.json's numbers of it equal its rows in chi2.csv (the scan's noise)."""
    _, ref, _ = continuous_run
    run = tmp_path / "run"
    factors = (1.15, 1.0, 1.15, 1.04, 1.01, 1.02, 1.15)
    for k, factor in enumerate(factors):
        (run / f"ckpt_{1000 * (k + 1)}").mkdir(parents=True)
        response_generator(factor).save(run / f"ckpt_{1000 * (k + 1)}" / "generator.keras")
    (run / "config.json").write_text(json.dumps(CONT_CFG))
    common = ["--run", str(run), "--reference", ref, "--events", "2000", "--no-generated", "--energy-bins", "4",
              "--window", "mean", "--overflow"]
    for smooth, expected in ((1, 2000), (3, 5000)):
        out = tmp_path / f"sel{smooth}"
        assert se.main(common + ["--out", str(out), "--smooth", str(smooth)]) == 0
        best = json.loads((out / "best.json").read_text())
        assert best["best_iteration"] == expected and best["smooth"]["checkpoints"] == smooth
    rows = list(csv.DictReader(open(out / "chi2.csv", newline="")))
    totals = [float(r["chi2_ndf"]) for r in rows if r["role"] == "total"]
    assert best["chi2_ndf"] == pytest.approx(totals[4], rel=1e-6)
    assert best["smooth"]["chi2_ndf"] == pytest.approx(totals[5], rel=1e-6)       # median of the 4, 1, 2 % ones
    for r in rows:
        if int(r["iteration"]) == 5000 and r["role"] == "fit":
            assert best["per_energy"][r["energy_mev"]]["chi2"] == pytest.approx(float(r["chi2"]), rel=1e-5)
    for bad in ("2", "0"):
        assert se.main(common + ["--out", str(tmp_path / "bad"), "--smooth", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--smooth" in err[0]
