"""`make smoke`: every script once through main(argv) on tiny toy data (a few hundred showers, a few training
iterations), asserting real values at each step. Part of the default suite too; alone it takes well under a minute.
"""
import glob
import json
import os

import h5py
import numpy as np
import pytest

import HighLevelFeatures as H
import evaluate
import export_lwtnn
import plumbing
import preprocess
import scaleout
import select_epoch
import train

pytestmark = pytest.mark.smoke
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XML = os.path.join(ROOT, "binning", "binning_fastcalogan.xml")
ENERGIES = (2048.0, 65536.0)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


def test_toy_and_voxelise(d):
    for name, seed in (("hits", 1), ("held", 2)):
        assert preprocess.main(["toy", "--particle", "photon", "--eta", "0.20", "--events-per-energy", "150",
                                "--energies", *map(str, ENERGIES), "--seed", str(seed), "--out", str(d / name)]) == 0
        files = sorted(glob.glob(str(d / name / "*.h5")))
        assert len(files) == 2
        out = str(d / f"{name}.h5")
        assert preprocess.main(["voxelise", "--binning", XML, "--particle", "photon", "--out", out, *files]) == 0
        deposited = 0.0
        for f in files:                                    # energy in the five voxelised layers is conserved
            with h5py.File(f) as h:
                deposited += h["energy"][:][np.isin(h["layer"][:], [0, 1, 2, 3, 12])].sum(dtype=np.float64)
        with h5py.File(out) as v:
            assert v["showers"].shape == (300, 368)
            assert v["showers"][:].sum(dtype=np.float64) == pytest.approx(deposited, rel=1e-6)


def test_prepare(d):
    out = str(d / "train.h5")
    assert preprocess.main(["prepare", "--binning", XML, "--particle", "photon", "--range", "all", "--out", out,
                            str(d / "hits.h5")]) == 0
    with h5py.File(out) as f, h5py.File(d / "hits.h5") as v:
        np.testing.assert_allclose(f["voxels"][:] * f["e_kin"][:][:, None], v["showers"][:], rtol=1e-6, atol=1e-4)
        # LogE label over the e/gamma "all" range 2^6..2^22 MeV: 2^11 -> 5/16, 2^16 -> 10/16
        np.testing.assert_allclose(np.unique(f["label"][:]), [5 / 16, 10 / 16], rtol=1e-6)


def test_train(d):
    run = str(d / "run")
    assert train.main(["--data", str(d / "train.h5"), "--out", run, "--iterations", "6", "--checkpoint-every", "3",
                       "--batch-size", "32", "--no-jit", "--seed", "2"]) == 0
    assert [it for it, _ in plumbing.list_checkpoints(run)] == [3, 6]
    rows = np.loadtxt(os.path.join(run, "losses.csv"), delimiter=",", skiprows=1)
    assert rows.shape == (6, 5) and np.isfinite(rows).all()


def test_select(d):
    out = d / "select"
    assert select_epoch.main(["--run", str(d / "run"), "--reference", str(d / "hits.h5"), "--events", "200",
                              "--generate-like", str(d / "held.h5"), "--out", str(out), "--seed", "3"]) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["best_iteration"] in (3, 6) and best["checkpoints"] == 2
    with h5py.File(out / "generated.h5") as g, h5py.File(d / "held.h5") as h:
        np.testing.assert_array_equal(g["incident_energies"][:], h["incident_energies"][:])
        assert g["showers"].shape == h["showers"].shape and (g["showers"][:] >= 0).all()


def test_export(d):
    out = d / "lwtnn"
    assert export_lwtnn.main(["--run", str(d / "run"), "--best", str(d / "select" / "best.json"), "--out", str(out),
                              "--check", "--check-events", "200"]) == 0
    (path,) = glob.glob(str(out / "neural_net_22_eta_20_25_all.json"))
    graph = json.loads(open(path).read())
    gen = plumbing.load_generator(str(d / "run"), json.loads((d / "select" / "best.json").read_text())["best_iteration"])
    z = plumbing.draw_noise(np.random.default_rng(4), 50, 50)
    lab = np.linspace(0, 1, 50)
    want = np.asarray(gen([z, plumbing.condition_vector(lab)], training=False))
    got = export_lwtnn.evaluate_graph(graph, z, plumbing.condition_vector(lab))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_evaluate(d):
    out = d / "eval"
    held, gen = str(d / "held.h5"), str(d / "select" / "generated.h5")
    assert evaluate.main(["-i", held, "-r", held, "-m", "hist-chi", "-d", "1-photons", "--output_dir",
                          str(out / "self"), "--jobs", "1"]) == 0
    same = evaluate.read_chi2_file(str(out / "self" / "histogram_chi2_1-photons.txt"))
    assert len(same) > 20 and all(v == 0.0 for v in same.values())          # a file against itself
    assert evaluate.main(["-i", gen, "-r", held, "-m", "hist-chi", "-d", "1-photons", "--output_dir",
                          str(out / "gen"), "--jobs", "1"]) == 0
    seps = evaluate.read_chi2_file(str(out / "gen" / "histogram_chi2_1-photons.txt"))
    assert 0.0 < seps["Etot / Einc"] <= 1.0                                  # a 6-iteration generator differs


def test_high_level_features_and_scaleout(d):
    hlf = H.HighLevelFeatures("photon", filename=XML.replace("binning_fastcalogan", "binning_dataset_1_photons"))
    with h5py.File(d / "held.h5") as f:
        showers = f["showers"][:]
    hlf.CalculateFeatures(showers)
    np.testing.assert_allclose(sum(hlf.GetElayers().values()), showers.sum(axis=1), rtol=1e-5)
    dag = d / "dag"
    assert scaleout.main(["condor", "--slices", "photon_0.20 pion_0.20", "--work", "w", "--results", "r",
                          "--out", str(dag)]) == 0
    text = (dag / "calokit.dag").read_text()
    assert text.count("\nJOB ") + text.startswith("JOB ") >= 2 * 6
