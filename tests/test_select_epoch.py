"""select_epoch.py: the ROOT "WW" chi2, the histogram range, the epoch choice, outputs, bad inputs."""
import csv
import json
import math
import os

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
    assert best["best_iteration"] == its[se.best_index(totals)]
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
    chi2, ndf = se.etot_chi2(ref_etot, gen_etot, "photon")
    mine = best["per_energy"]["256"]
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
