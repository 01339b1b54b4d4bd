"""evaluate.py: metrics against analytic answers, CaloChallenge-compatible outputs, reproducibility, bad inputs."""
import json
import math
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

import evaluate as ev
from HighLevelFeatures import dataset_geometry
from plumbing import write_calo_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evalutils  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CLS = ["--cls_n_layer", "1", "--cls_n_hidden", "16", "--cls_n_epochs", "2", "--cls_batch_size", "200"]
SMALL_FPD = ["--fpd_min_samples", "300", "--fpd_max_samples", "1000", "--fpd_num_batches", "3",
             "--fpd_num_points", "3", "--kpd_batch_size", "300", "--kpd_num_batches", "3"]
DS1_PHOTON_NAMES = (["Etot / Einc"] + [f"E layer {i}" for i in (0, 1, 2, 3, 12)]
                    + [f"{k} layer {i}" for k in ("EC Eta", "EC Phi", "Width Eta", "Width Phi") for i in (1, 2)]
                    + [f"Etot / Einc at E = {2.0 ** k}" for k in range(8, 23)] + ["Voxel distribution"])


@pytest.fixture(scope="module")
def ds1(tmp_path_factory):
    """Two 600-event dataset-1 photon files from the same toy distribution (< 1000 events on purpose)."""
    d = tmp_path_factory.mktemp("ds1")
    gen = evalutils.write_synthetic(str(d / "gen.h5"), "1-photons", 600, 1)
    ref = evalutils.write_synthetic(str(d / "ref.h5"), "1-photons", 600, 2)
    return d, gen, ref


def error_lines(err):
    """stderr without the progress lines ("[evaluate] ...", on by default)."""
    return [line for line in err.strip().splitlines() if not line.startswith("[evaluate] ")]


def _run(capsys, *args):
    rc = ev.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- metrics

def test_separation_power_zero_for_identical_one_for_disjoint():
    h = ev.bin_fractions([0.1, 0.2, 0.2, 0.7], np.linspace(0, 1, 6))
    assert ev.separation_power(h, h) == 0.0
    a = ev.bin_fractions([0.1, 0.15, 0.3], np.linspace(0, 1, 11))
    b = ev.bin_fractions([0.55, 0.95], np.linspace(0, 1, 11))
    assert ev.separation_power(a, b) == pytest.approx(1.0, abs=1e-12)
    # fractions of entries inside the binning; empty histograms give finite numbers, never NaN
    empty = ev.bin_fractions([5.0, 7.0], np.linspace(0, 1, 11))
    assert not empty.any()
    assert ev.separation_power(empty, empty) == 0.0
    assert ev.separation_power(empty, a) == 1.0          # nothing in common with a non-empty histogram
    assert ev.separation_power(a, empty) == 1.0


def test_separation_power_matches_density_definition():
    """The reference multiplies density histograms by the bin widths; same number."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=500), rng.normal(0.3, 1.2, size=700)
    bins = np.logspace(-1, 0.5, 13) - 1.0
    dx = np.histogram(x, bins, density=True)[0] * np.diff(bins)
    dy = np.histogram(y, bins, density=True)[0] * np.diff(bins)
    expected = 0.5 * np.sum((dx - dy) ** 2 / (dx + dy + 1e-16))
    assert ev.separation_power(ev.bin_fractions(x, bins), ev.bin_fractions(y, bins)) == pytest.approx(expected,
                                                                                                      rel=1e-12)


def test_frechet_distance_of_gaussians_is_analytic():
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.5, -1.0])
    s1, s2 = np.diag([1.0, 4.0, 0.25]), np.diag([2.0, 1.0, 0.25])
    expected = 1.25 + sum(a + b - 2 * np.sqrt(a * b) for a, b in ((1, 2), (4, 1), (0.25, 0.25)))
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fpd_of_shifted_gaussians_matches_analytic_frechet_distance():
    rng = np.random.default_rng(11)
    n, shift, scale = 40000, np.array([1.0, 0.5, 0.0]), np.array([1.0, 2.0, 1.0])
    x = rng.normal(size=(n, 3))
    y = rng.normal(size=(n, 3)) * scale + shift
    analytic = float(shift @ shift + np.sum(1 + scale ** 2 - 2 * scale))      # 1.25 + 1 = 2.25
    val, err = ev.fpd(x, y, min_samples=2000, max_samples=20000, num_batches=5, num_points=5, seed=1,
                      normalise=False)
    assert val == pytest.approx(analytic, rel=0.05)
    assert 0 < err < 0.1 * analytic


def test_fpd_and_kpd_of_a_sample_with_itself_are_zero():
    x = np.random.default_rng(5).normal(size=(4000, 6))
    fv, fe = ev.fpd(x, x.copy(), min_samples=500, max_samples=2000, num_batches=5, num_points=4, seed=2)
    kv, ke = ev.kpd(x, x.copy(), num_batches=5, batch_size=500, seed=2)
    assert 0.0 <= fv < 2e-3 and fe < 2e-3
    assert abs(kv) < 1e-3 and ke < 1e-3
    # and a shifted sample is far from zero on both
    y = x + np.array([0.5, 0, 0, 0, 0, 0])
    assert ev.fpd(x, y, min_samples=500, max_samples=2000, num_batches=5, num_points=4, seed=2)[0] > 20 * fv + 1e-3
    assert ev.kpd(x, y, num_batches=5, batch_size=500, seed=2)[0] > 10 * abs(kv) + 1e-3


def test_blocked_mmd_equals_direct_formula():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(300, 4)), rng.normal(0.2, 1.0, size=(250, 4))

    def k(a, b):
        return (a @ b.T / a.shape[1] + 1.0) ** 4

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (300 * 299) + (kyy.sum() - np.trace(kyy)) / (250 * 249)
              - 2 * kxy.mean())
    assert ev.mmd2_poly_unbiased(x, y) == pytest.approx(direct, rel=1e-9)
    assert ev._kernel_sum(x, x, 4, True, block=7) == pytest.approx(kxx.sum() - np.trace(kxx), rel=1e-12)


def test_classifier_auc_half_for_one_distribution_and_near_one_for_different():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3000, 5)), rng.normal(size=(3000, 5))
    c = rng.normal(size=(3000, 5)) + np.array([4.0, 0, 0, 0, 0])
    kw = dict(n_layer=1, n_hidden=32, batch_size=200, n_epochs=6, lr=1e-3, seed=1)
    same = ev.train_classifier(a, b, (2000, 500, 500), **kw)
    diff = ev.train_classifier(a, c, (2000, 500, 500), **kw)
    assert 0.45 <= same["auc"] <= 0.55
    assert diff["auc"] > 0.95 and diff["jsd"] > 0.5
    assert (same["n_train"], same["n_test"], same["n_val"]) == (2000, 500, 500)


def test_split_sizes_follow_the_reference_and_scale_down():
    assert ev.split_sizes(121000, "1-photons") == (80000, 20000, 21000)
    assert ev.split_sizes(500000, "2") == (60000, 20000, 20000)
    assert ev.split_sizes(1210, "1-photons") == (800, 200, 210)
    assert ev.split_sizes(1000, "3") == (600, 200, 200)
    with pytest.raises(ev.UserError):
        ev.split_sizes(3, "2")


def test_high_level_inputs_columns_follow_the_reference_order():
    geom = dataset_geometry("1-photons")
    rng = np.random.default_rng(1)
    einc = 2.0 ** rng.integers(8, 23, 50)
    sh = evalutils.showers(geom, einc, rng)
    from HighLevelFeatures import compute_features
    f = compute_features(geom, sh)
    x = ev.high_level_inputs(f, einc, geom)
    # log10 Einc, 5 E_layer, 4 x 2 EC/width (eta, phi), log10 Etot, 5 sparsity, 5 EC_r, 5 width_r
    assert x.shape == (50, 1 + 5 + 8 + 1 + 5 + 5 + 5)
    np.testing.assert_allclose(x[:, 0], np.log10(einc))
    np.testing.assert_allclose(x[:, 1], np.log10(f["E_layer"][0] + 1e-8))
    np.testing.assert_allclose(x[:, 6], f["EC_eta"][1] / 100)
    np.testing.assert_allclose(x[:, 14], np.log10(f["Etot"] + 1e-8))
    np.testing.assert_allclose(x[:, -1], f["width_r"][12] / 100)


def test_import_and_help_stay_light():
    code = ("import sys, evaluate; print(any(m in sys.modules for m in ('tensorflow', 'keras', 'matplotlib', "
            "'sklearn')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "False"
    res = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--cls_n_hidden" in res.stdout and "prdc" in res.stdout


# ---------------------------------------------------------------------------------------------- end to end

def test_threshold_is_applied_to_both_files(tmp_path, capsys, ds1):
    """Voxels below 1 MeV (dataset 1) are zeroed first: adding 0.9 MeV to empty voxels changes nothing."""
    _, _, ref = ds1
    with h5py.File(ref, "r") as f:
        einc, sh = f["incident_energies"][:], f["showers"][:]
    noisy = sh.copy()
    noisy[noisy < 1.0] = 0.9                   # everything below threshold becomes 0.9 MeV: still below
    gen = str(tmp_path / "noisy.h5")
    write_calo_file(gen, einc, noisy)
    rc, _, err = _run(capsys, "-i", gen, "-r", ref, "-m", "hist-chi", "-d", "1-photons",
                      "--output_dir", tmp_path / "out")
    assert rc == 0, err
    seps = json.load(open(tmp_path / "out" / "metrics.json"))["separation_power"]
    assert all(v == 0.0 for v in seps.values()), {k: v for k, v in seps.items() if v}
    assert "Sparsity layer 1" in seps and "EC R layer 2" in seps and "Width R layer 12" in seps


def test_chi2_file_has_reference_names_and_is_overwritten(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    out = tmp_path / "out"
    for _ in range(2):
        rc, stdout, err = _run(capsys, "-i", gen, "-r", ref, "-m", "hist-chi", "-d", "1-photons", "--output_dir",
                               out)
        assert rc == 0, err
    text = (out / "histogram_chi2_1-photons.txt").read_text()
    assert text.startswith(ev.CHI2_HEADER) and text.count("List of chi2") == 1
    body = text[len(ev.CHI2_HEADER):]
    blocks = re.findall(r"(.+): \n(.+)\n\n", body)
    assert "".join(f"{n}: \n{v}\n\n" for n, v in blocks) == body        # nothing else in the file
    assert [n for n, _ in blocks] == DS1_PHOTON_NAMES
    parsed = ev.read_chi2_file(str(out / "histogram_chi2_1-photons.txt"))
    metrics = json.loads((out / "metrics.json").read_text())
    for name, value in parsed.items():
        assert metrics["separation_power"][name] == value and 0.0 <= value <= 1.0
    assert "Sparsity layer 0" not in parsed and "Sparsity layer 0" in metrics["separation_power"]
    assert not list(out.glob("*.png"))                                   # hist-chi: numbers only
    assert "reference cache used" in stdout                               # second run


def test_reference_cache_is_keyed_by_content_and_kept_out_of_the_input_folder(tmp_path, capsys, ds1):
    d, gen, _ = ds1
    ref = str(tmp_path / "ref.h5")
    evalutils.write_synthetic(ref, "1-photons", 600, 2)
    before = sorted(os.listdir(tmp_path))
    cache = tmp_path / "cache"
    args = ["-i", gen, "-r", ref, "-m", "hist-chi", "-d", "1-photons", "--cache_dir", cache]
    rc, out1, _ = _run(capsys, *args, "--output_dir", tmp_path / "o1")
    rc2, out2, _ = _run(capsys, *args, "--output_dir", tmp_path / "o2")
    assert rc == rc2 == 0 and "cache written" in out1 and "cache used" in out2
    assert len(list(cache.glob("*.npz"))) == 1
    assert (tmp_path / "o1" / "metrics.json").read_bytes() == (tmp_path / "o2" / "metrics.json").read_bytes()
    # same path, new content: the old entry is not used
    evalutils.write_synthetic(ref, "1-photons", 600, 3, scale=1.1)
    rc3, out3, _ = _run(capsys, *args, "--output_dir", tmp_path / "o3")
    assert rc3 == 0 and "cache written" in out3 and len(list(cache.glob("*.npz"))) == 2
    s1 = json.loads((tmp_path / "o1" / "metrics.json").read_text())["separation_power"]
    s3 = json.loads((tmp_path / "o3" / "metrics.json").read_text())["separation_power"]
    assert s3["Etot / Einc"] > s1["Etot / Einc"] + 0.1
    # nothing written beside the reference file, nothing beside the shared inputs
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["cache", "o1", "o2", "o3"])
    assert sorted(os.listdir(d)) == ["gen.h5", "ref.h5"]


def test_all_mode_small_file_then_same_seed_rerun_is_identical(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    out = tmp_path / "out"
    args = ["-i", gen, "-r", ref, "-m", "all", "-d", "1-photons", "--output_dir", out, "--dpi", "40",
            *SMALL_CLS, *SMALL_FPD]
    rc, stdout, err = _run(capsys, *args)
    assert rc == 0, err
    first = (out / "metrics.json").read_bytes()
    m = json.loads(first)
    assert m["n_events"] == 600
    assert set(m["classifier"]) == {"cls-low", "cls-high"}
    for res in m["classifier"].values():
        assert 0.0 <= res["auc"] <= 1.0 and (res["n_train"], res["n_test"], res["n_val"]) == (396, 99, 104)
        # the settings that made the number travel with it (a demo-sized classifier says so)
        assert (res["n_layer"], res["n_hidden"], res["epochs"], res["lr"]) == (1, 16, 2, 2e-4)
    assert np.isfinite([m["fpd_x1e3"], m["fpd_err_x1e3"], m["kpd_x1e3"], m["kpd_err_x1e3"]]).all()
    assert m["fpd_kpd_settings"] == {"fpd_min_samples": 300, "fpd_max_samples": 1000, "fpd_num_batches": 3,
                                     "fpd_num_points": 3, "kpd_batch_size": 300, "kpd_num_batches": 3}
    names = set(os.listdir(out))
    for expected in ("histogram_chi2_1-photons.txt", "classifier_cls-low_1-photons.txt",
                     "classifier_cls-high_1-photons.txt", "classifier_all_1-photons.txt", "fpd_kpd_1-photons.txt",
                     "Etot_Einc_dataset_1-photons.png", "Etot_Einc_dataset_1-photons_E_i.png",
                     "E_layer_12_dataset_1-photons.png", "ECEta_layer_1_dataset_1-photons.png",
                     "WidthPhi_layer_2_dataset_1-photons.png", "voxel_energy_dataset_1-photons.png",
                     "Average_Layer_0_dataset_1-photons.png", "average_shower_dataset_1-photons.png",
                     "reference_average_shower_dataset_1-photons.png",
                     "average_shower_dataset_1-photons_E_256.0.png",
                     "reference_average_shower_dataset_1-photons_E_4194304.0.png",
                     "separation_power_dataset_1-photons.png"):
        assert expected in names, expected
    assert not [n for n in names if n.startswith(".tmp-")]
    cls = (out / "classifier_cls-high_1-photons.txt").read_text()
    assert re.fullmatch(r"Final result of classifier test \(AUC / JSD\):\n\d\.\d{4} / -?\d\.\d{4}\n\n", cls)
    assert re.fullmatch(r"FPD \(x10\^3\): -?\d+\.\d{4} \u00b1 \d+\.\d{4}\nKPD \(x10\^3\): -?\d+\.\d{4} \u00b1 "
                        r"\d+\.\d{4}", (out / "fpd_kpd_1-photons.txt").read_text())
    # same inputs + same seed (now through the reference cache, into the same folder): same bytes, not appended
    rc, stdout, err = _run(capsys, *args)
    assert rc == 0 and "cache used" in stdout
    assert (out / "metrics.json").read_bytes() == first
    assert (out / "classifier_cls-high_1-photons.txt").read_text() == cls


def test_other_seed_changes_the_classifier(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    res = []
    for seed in (1, 2):
        rc, _, err = _run(capsys, "-i", gen, "-r", ref, "-m", "cls-high", "-d", "1-photons", "--seed", seed,
                          "--output_dir", tmp_path / f"s{seed}", *SMALL_CLS)
        assert rc == 0, err
        res.append(json.loads((tmp_path / f"s{seed}" / "metrics.json").read_text())["classifier"]["cls-high"])
    assert res[0]["auc"] != res[1]["auc"]


def test_dataset2_binnings(tmp_path, capsys):
    gen = evalutils.write_synthetic(str(tmp_path / "g.h5"), "2", 120, 1)
    ref = evalutils.write_synthetic(str(tmp_path / "r.h5"), "2", 120, 2)
    rc, _, err = _run(capsys, "-i", gen, "-r", ref, "-m", "hist-chi", "-d", "2", "--output_dir", tmp_path / "o")
    assert rc == 0, err
    names = list(ev.read_chi2_file(str(tmp_path / "o" / "histogram_chi2_2.txt")))
    assert names[0] == "Etot / Einc" and names[-1] == "Voxel distribution"
    assert len(names) == 2 + 45 * 5 and not any("at E =" in n for n in names)
    specs = {s[0]: s[3] for s in ev.histogram_specs("2", dataset_geometry("2"), {"E_layer": {i: np.ones(3) for i in
                                                                                          range(45)}}, 0.1)}
    assert specs["EC Eta layer 7"][[0, -1]].tolist() == [-30.0, 30.0] and len(specs["EC Eta layer 7"]) == 101
    assert specs["Width Phi layer 0"][[0, -1]].tolist() == [0.0, 30.0]
    assert specs["EC R layer 3"][[0, -1]].tolist() == [0.0, 42.0]


def test_dataset1_pion_binnings():
    geom = dataset_geometry("1-pions")
    specs = {s[0]: s[3] for s in ev.histogram_specs("1-pions", geom, {"E_layer": {i: np.array([5.0e3]) for i in
                                                                                  geom.relevant_layers}}, 1.0)}
    assert specs["EC Eta layer 12"][[0, -1]].tolist() == [-500.0, 500.0]
    assert specs["EC Phi layer 1"][[0, -1]].tolist() == [-100.0, 100.0]
    assert specs["Width Eta layer 13"][[0, -1]].tolist() == [0.0, 400.0]
    assert specs["EC R layer 14"][[0, -1]].tolist() == [0.0, 1500.0]
    assert specs["Width R layer 3"][[0, -1]].tolist() == [0.0, 500.0]
    np.testing.assert_allclose(specs["E layer 2"], np.logspace(0.0, np.log10(5.0e3), 40))
    assert ev.per_energy_bins("1-photons", 4)[[0, -1]].tolist() == [0.9, 1.1]
    assert ev.per_energy_bins("1-pions", 4)[[0, -1]].tolist() == [0.4, 1.4]
    assert ev.per_energy_bins("1-photons", 3)[[0, -1]].tolist() == [0.4, 1.4]


# ---------------------------------------------------------------------------------------------- bad input

def _bad_files(tmp, ds1):
    _, gen, ref = ds1
    geom = dataset_geometry("1-photons")
    rng = np.random.default_rng(0)
    einc = 2.0 ** rng.integers(8, 23, 20)
    wrong_vox = str(tmp / "wrong_voxels.h5")
    write_calo_file(wrong_vox, einc, np.ones((20, 300), np.float32))
    inconsistent = str(tmp / "inconsistent.h5")
    with h5py.File(inconsistent, "w") as f:
        f.create_dataset("incident_energies", data=einc.reshape(-1, 1))
        f.create_dataset("showers", data=np.ones((22, geom.n_voxels), np.float32))
    fewer = str(tmp / "fewer.h5")
    evalutils.write_synthetic(fewer, "1-photons", 500, 4)
    nan = str(tmp / "nan.h5")
    with h5py.File(ref, "r") as f:
        sh = f["showers"][:]
        e = f["incident_energies"][:]
    sh[450, 17] = np.nan
    write_calo_file(nan, e, sh)
    return {
        "missing": (["-i", str(tmp / "nope.h5"), "-r", ref, "-m", "hist", "-d", "1-photons"],
                    "nope.h5: file not found"),
        "voxels": (["-i", wrong_vox, "-r", ref, "-m", "hist", "-d", "1-photons"], "300 voxels per event"),
        "dataset": (["-i", gen, "-r", ref, "-m", "hist", "-d", "2"], "dataset 2"),
        "inside": (["-i", inconsistent, "-r", ref, "-m", "hist", "-d", "1-photons"],
                   "has 20 events but 'showers' has 22"),
        "between": (["-i", fewer, "-r", ref, "-m", "hist", "-d", "1-photons"], "500 events, but the reference"),
        "nan": (["-i", nan, "-r", ref, "-m", "hist", "-d", "1-photons"], "NaN/inf values (first at event 450)"),
        "nan_ref": (["-i", gen, "-r", nan, "-m", "cls-high", "-d", "1-photons"], "NaN/inf"),
        "mode": (["-i", gen, "-r", ref, "-m", "histo", "-d", "1-photons"], "unknown mode 'histo'"),
        "prdc_k": (["-i", gen, "-r", ref, "-m", "prdc", "-d", "1-photons", "--prdc_k", "0"], "--prdc_k must be >= 1"),
        "resnet": (["-i", gen, "-r", ref, "-m", "cls-resnet", "-d", "2", "--cls_resnet_layers", "12"],
                   "--cls_resnet_layers must be one of 10, 18, 34"),
        "flag": (["-i", gen, "-r", ref, "-m", "hist", "-d", "1-photons", "--cls_n_hidden", "x"], "invalid int"),
    }


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, ds1):
    cases = _bad_files(tmp_path, ds1)
    for name, (args, message) in cases.items():
        out = tmp_path / f"out_{name}"
        rc, stdout, err = _run(capsys, *args, "--output_dir", out)
        assert rc == 2, (name, err)
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, err)
        assert "Traceback" not in err and not out.exists(), name


def test_parallel_histogram_plots_equal_serial_ones(tmp_path):
    rng = np.random.default_rng(2)
    jobs = {}
    for mode, workers in (("serial", 1), ("parallel", 2)):
        (tmp_path / mode).mkdir()
        jobs[mode] = [(str(tmp_path / mode / f"h{i}.png"), np.logspace(0, 3, 21), ev.fractions(rng.random(20) + 0.1),
                       ev.fractions(np.ones(20)), f"E layer {i}", "E (MeV)", 0.01 * i, True) for i in range(40)]
        rng = np.random.default_rng(2)
        assert len(ev.draw_histograms(jobs[mode], 40, workers)) == 40
    for i in range(40):
        assert (tmp_path / "serial" / f"h{i}.png").read_bytes() == (tmp_path / "parallel" / f"h{i}.png").read_bytes()


def test_low_level_inputs_follow_the_reference(tmp_path, capsys, ds1):
    geom = dataset_geometry("1-photons")
    rng = np.random.default_rng(4)
    einc = 2.0 ** rng.integers(8, 23, 30)
    sh = evalutils.showers(geom, einc, rng)
    from HighLevelFeatures import compute_features
    e_layer = compute_features(geom, sh)["E_layer"]
    low = ev.low_level_inputs(geom, einc, sh, None, "cls-low")
    assert low.shape == (30, 1 + 368) and low.dtype == np.float32
    np.testing.assert_allclose(low[:, 1:], sh / einc[:, None], rtol=1e-6)
    normed = ev.low_level_inputs(geom, einc, sh, e_layer, "cls-low-normed")
    assert normed.shape == (30, 1 + 368 + 5)
    for k, lid in enumerate(geom.relevant_layers):
        a, b = geom.offsets[lid]
        np.testing.assert_allclose(normed[:, 1 + a:1 + b].sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(normed[:, 1 + 368 + k], np.log10(e_layer[lid] + 1e-8), rtol=1e-6)
    _, gen, ref = ds1
    rc, _, err = _run(capsys, "-i", gen, "-r", ref, "-m", "cls-low-normed", "-d", "1-photons", "--output_dir",
                      tmp_path / "o", *SMALL_CLS)
    assert rc == 0, err
    assert (tmp_path / "o" / "classifier_cls-low-normed_1-photons.txt").read_text().startswith(ev.CLS_HEADER)


def test_input_scanned_in_a_worker_equals_serial_scan(tmp_path, ds1):
    """Subprocesses (no TensorFlow loaded, so evaluate.py may fork): small chunks make the input file 'big', so
    it is streamed in a forked worker while the reference is read; outputs must equal the one-process run."""
    _, gen, ref = ds1
    base = [sys.executable, "evaluate.py", "-r", ref, "-m", "hist", "-d", "1-photons", "--no_cache",
            "--chunk_mb", "0.1"]
    outputs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        res = subprocess.run(base + ["-i", gen, "--output_dir", str(out), "--jobs", jobs], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        outputs[jobs] = ({p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".txt", ".png")},
                         metrics["separation_power"])
    assert outputs["1"] == outputs["2"]                  # same numbers, same text file, byte-identical PNGs
    assert outputs["2"][1]["Voxel distribution"] > 0     # the workers' halves of the voxel histograms took part
    assert "Sparsity_dataset_1-photons.png" in outputs["2"][0]
    bad = str(tmp_path / "nan.h5")                       # an error found in the worker: exit 2, one line
    with h5py.File(gen, "r") as f:
        sh, e = f["showers"][:], f["incident_energies"][:]
    sh[590, 3] = np.inf
    write_calo_file(bad, e, sh)
    res = subprocess.run(base + ["-i", bad, "--output_dir", str(tmp_path / "bad"), "--jobs", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and error_lines(res.stderr) == [
        f"error: {bad}: 'showers' has NaN/inf values (first at event 590)"], res.stderr
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- parity

def _reference_e_layer_seps(ref, gen, geom, thr, old_path=False):
    """E layer separation powers computed the way CaloChallenge's evaluate.py does (numpy sums in the file's
    dtype, np.log10 of the maximum in that dtype, np.histogram densities x bin widths); ``old_path``: how
    calokit computed them before (showers cast to float32, float64 sums and logarithm)."""
    out = {}
    for lid in geom.relevant_layers:
        a, b = geom.offsets[lid]
        sums = []
        for x in (ref, gen):
            x = x.astype(np.float32) if old_path else x
            x = np.where(x < x.dtype.type(thr), 0, x)[:, a:b]
            sums.append(x.astype(np.float64).sum(-1) if old_path else x.sum(-1))
        bins = np.logspace(np.log10(thr), np.log10(sums[0].max()), 40)
        h1, h2 = (np.histogram(s, bins, density=True)[0] * np.diff(bins) for s in sums)
        out[f"E layer {lid}"] = 0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + 1e-16))
    return out


def _quirk_case(geom, dtype, n=200):
    """Seeded showers whose largest reference layer energy has a top edge 10**log10(max) below the maximum in
    the reference's arithmetic, but not in the old float32-cast/float64-sum path (so the two disagree)."""
    t = evalutils.template(geom)
    for seed in range(200):
        rng = np.random.default_rng(seed)
        einc = 2.0 ** rng.integers(8, 23, size=(2, n))
        ref, gen = ((e[:, None] * t * rng.gamma(3.0, 1 / 3.0, size=(n, geom.n_voxels))).astype(dtype) for e in einc)
        new, old = (_reference_e_layer_seps(ref, gen, geom, 1.0, old_path=p) for p in (False, True))
        if max(abs(new[k] - old[k]) for k in new) > 1e-4:
            return einc, ref, gen, new
    raise AssertionError("no seed gives the top-edge case")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_e_layer_separation_powers_equal_the_reference_arithmetic(tmp_path, capsys, dtype):
    """Regression: the E layer blocks differed from CaloChallenge's by up to 0.5/N. Cause: the top edge of the
    log binning, 10**log10(max E_layer), often rounds below the maximum, so the reference drops that event; the
    maximum (and whether it rounds down) depends on the exact bits of E_layer, which the reference sums in the
    file's dtype (float32 sums and a float32 log10 for float32 files) while calokit cast to float32 and summed in
    float64. Now the sums follow the reference, so the blocks agree to rounding."""
    geom = dataset_geometry("1-photons")
    einc, ref, gen, expected = _quirk_case(geom, dtype)
    for name, x, e in (("ref.h5", ref, einc[0]), ("gen.h5", gen, einc[1])):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("incident_energies", data=e.reshape(-1, 1))
            f.create_dataset("showers", data=x)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "-i", tmp_path / "gen.h5", "-r", tmp_path / "ref.h5", "-m", "hist-chi", "-d",
                      "1-photons", "--output_dir", out, "--no_cache", "--jobs", "1", "--chunk_mb", "0.05")
    assert rc == 0, err
    got = ev.read_chi2_file(out / "histogram_chi2_1-photons.txt")
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-15), name


# ---------------------------------------------------------------------------------------------- any folder

def test_runs_from_an_analysis_folder_with_the_xml_in_the_working_directory(tmp_path, ds1):
    """Copied into an empty folder beside the CaloChallenge XML (no binning/ folder, no --binning), evaluate.py
    finds the XML in the working directory as the reference does; without it, the error names every place."""
    _, gen, ref = ds1
    work = tmp_path / "analysis"
    work.mkdir()
    for name in ("evaluate.py", "HighLevelFeatures.py", "plumbing.py"):
        if os.path.isfile(os.path.join(ROOT, name)):
            with open(os.path.join(ROOT, name), "rb") as src, open(work / name, "wb") as dst:
                dst.write(src.read())
    cmd = [sys.executable, "evaluate.py", "-i", gen, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--jobs", "1"]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH="")
    missing = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert str(work / "binning_dataset_1_photons.xml") in missing.stderr
    assert str(work / "binning" / "binning_dataset_1_photons.xml") in missing.stderr
    with open(os.path.join(ROOT, "binning", "binning_dataset_1_photons.xml"), "rb") as src:
        (work / "binning_dataset_1_photons.xml").write_bytes(src.read())
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (work / "evaluation_results" / "E_layer_0_dataset_1-photons.png").is_file()
    with open(work / "evaluation_results" / "metrics.json") as fh:
        assert json.load(fh)["binning"] == str(work / "binning_dataset_1_photons.xml")


# ---------------------------------------------------------------------------------------------- prdc

def _prdc_full_matrix(real, fake, k):
    """The definition table, straightforwardly: full float64 distance matrices, sorted rows."""
    x, y = real.astype(np.float64), fake.astype(np.float64)
    dxy = ((x[:, None] - y[None]) ** 2).sum(-1)
    r_x = np.sort(((x[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, k]      # (k+1)-th smallest, self included
    r_y = np.sort(((y[:, None] - y[None]) ** 2).sum(-1), axis=1)[:, k]
    inside = dxy < r_x[:, None]
    return {"precision": float(inside.any(axis=0).mean()), "recall": float((dxy < r_y[None]).any(axis=1).mean()),
            "density": (1.0 / k) * (int(inside.sum()) / len(y)), "coverage": float((dxy.min(axis=1) < r_x).mean())}


@pytest.mark.parametrize("dtype, dim", [(np.float32, 40), (np.float64, 40), (np.float32, 1100)])
def test_prdc_equals_the_full_matrix_definition_exactly(dtype, dim):
    """Blocked float32/float64 products with exact recomputation near the thresholds = the plain definition, to
    the bit, on data with duplicate rows (zero distances, ties at the radius) and many blocks."""
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(300, dim)).astype(dtype)
    fake = (rng.normal(size=(260, dim)) * 1.2 + 0.15).astype(dtype)
    fake[:7] = real[:7]                     # shared rows
    real[20:30] = real[20]                  # ten identical rows: radius 0 for them
    fake[50:53] = fake[50]
    for k in (1, 5):
        got = ev.prdc(real, fake, k, block_mb=0.02)
        assert got == _prdc_full_matrix(real, fake, k), k
    x = real.astype(np.float64)
    expected = np.sort(((x[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, 5]
    assert np.array_equal(ev.knn_radii(real, 5, block_mb=0.02, n_probe=16), expected)


def test_prdc_analytic_cases():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 12))
    same = ev.prdc(x, x.copy(), 5)
    # identical distinct points: everything recalled and covered; each reference radius holds exactly k rows
    # strictly inside (itself and its k - 1 nearest), so density = k N / (k N) = 1
    assert same == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    far = ev.prdc(x, x + 1e3, 5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ev.UserError):
        ev.prdc(x[:5], x[:5], 5)


def test_prdc_mode_writes_text_and_metrics(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "-i", gen, "-r", ref, "-m", "prdc", "-d", "1-photons", "--output_dir", out,
                      "--prdc_max_events", "250", "--prdc_k", "3", "--jobs", "1")
    assert rc == 0, err
    lines = (out / "prdc_1-photons.txt").read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["precision", "recall", "density", "coverage"]
    with open(out / "metrics.json") as fh:
        m = json.load(fh)["prdc"]
    assert m["k"] == 3 and m["n_events"] == 250 and m["subsampled"] and m["max_events"] == 250
    assert [float(ln.split(": ")[1]) for ln in lines] == [m[k] for k in ("precision", "recall", "density",
                                                                           "coverage")]
    assert 0.0 < m["precision"] <= 1.0 and 0.0 < m["coverage"] <= 1.0        # same toy distribution
    # the subsample is seeded: the same rows of both files, recomputed here from the files
    rows = np.sort(np.random.default_rng(ev.DEFAULT_SEED).choice(600, size=250, replace=False))
    feats = []
    for path in (ref, gen):
        with h5py.File(path) as f:
            s = f["showers"][:][rows]
        feats.append(ev.prdc_features(ev.threshold_showers(s, 1.0)))
    expected = ev.prdc(feats[0], feats[1], 3)
    assert all(m[k] == expected[k] for k in expected)


# ---------------------------------------------------------------------------------------------- cls-resnet

def _resnet_parameters(depth, filters=(32, 64, 64, 128), strides=(1, 2, 2, 2)):
    """Trainable parameters of the reference ResNet, counted from its description: stem 7^3 conv (1 -> 32, no
    bias) + batch-norm; basic blocks of two 3^3 convs (no bias) + batch-norms, a 1^3 conv + batch-norm shortcut
    where the shape changes; batch-norm of the energy; dense on 128 + 1 inputs (weights and a bias)."""
    blocks = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    bn = lambda c: 2 * c                                        # gamma and beta
    total = 7 ** 3 * 1 * filters[0] + bn(filters[0])
    c_in = filters[0]
    for c, s, n in zip(filters, strides, blocks):
        for i in range(n):
            total += 27 * c_in * c + bn(c) + 27 * c * c + bn(c)
            if (s if i == 0 else 1) != 1 or c_in != c:
                total += c_in * c + bn(c)
            c_in = c
    return total + bn(1) + (filters[-1] + 1) + 1


def test_resnet_parameter_count_matches_the_architecture():
    keras = ev._keras(0)
    counts = {}
    for depth in (10, 18):
        model = ev.build_resnet(keras, 1 + 6480, (45, 16, 9), depth)
        counts[depth] = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    print(f"cls-resnet trainable parameters: depth 10 {counts[10]}, depth 18 {counts[18]}")
    assert counts[18] == _resnet_parameters(18) == 2516644      # also the reference's PyTorch count
    assert counts[10] == _resnet_parameters(10) == 1133092
    assert ev.resnet_image_shape(dataset_geometry("2")) == (45, 16, 9)
    assert ev.resnet_image_shape(dataset_geometry("3")) == (45, 50, 18)
    assert ev.resnet_image_shape(dataset_geometry("1-pions")) is None


@pytest.fixture(scope="module")
def ds2_small(tmp_path_factory):
    """Dataset-2-shaped files of 500 events: two from one distribution, one clearly different (energies x 3)."""
    d = tmp_path_factory.mktemp("ds2")
    return {name: evalutils.write_synthetic(str(d / f"{name}.h5"), "2", 500, seed, scale=scale)
            for name, seed, scale in (("ref", 1, 1.0), ("same", 2, 1.0), ("other", 3, 3.0))}


def test_cls_resnet_half_for_one_distribution_and_high_for_different(tmp_path, ds2_small):
    """In a fresh process, as from the command line (TensorFlow's Conv3D needs oneDNN, chosen before import).
    Batches of 10: the inputs (voxels / E_inc) are ~1e-4, so the batch-norm moving variances (momentum 0.9, from
    1) need a few hundred steps before inference-mode predictions separate anything, as in the reference."""
    aucs = {}
    for name in ("same", "other"):
        out = tmp_path / name
        cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "-i", ds2_small[name], "-r", ds2_small["ref"],
               "-m", "cls-resnet", "-d", "2", "--cls_resnet_layers", "10", "--cls_n_epochs", "3",
               "--cls_batch_size", "10", "--cls_lr", "1e-3", "--output_dir", str(out)]
        env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        res = subprocess.run(cmd, env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        text = (out / "classifier_cls-resnet_2.txt").read_text()
        assert text.startswith(ev.CLS_HEADER)
        with open(out / "metrics.json") as fh:
            res = json.load(fh)["classifier"]["cls-resnet"]
        assert text.split("\n")[1] == f"{res['auc']:.4f} / {res['jsd']:.4f}"
        assert (res["n_train"], res["n_test"], res["n_val"]) == (300, 100, 100)
        assert res["n_parameters"] == _resnet_parameters(10)
        aucs[name] = res["auc"]
    assert abs(aucs["same"] - 0.5) < 0.15, aucs
    assert aucs["other"] > 0.9, aucs


def test_cls_resnet_refuses_dataset_1(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    rc, _, err = _run(capsys, "-i", gen, "-r", ref, "-m", "cls-resnet", "-d", "1-photons", "--output_dir",
                      tmp_path / "o")
    assert rc == 2 and "datasets 2 and 3" in err


# ---------------------------------------------------------------------------------------------- nothing misleads

def test_classifier_batch_keeps_the_reference_steps_per_epoch():
    assert ev.classifier_batch(1000, 80000, "1-photons") == 1000              # full size: the reference's batch
    assert ev.classifier_batch(1000, 9917, "1-photons") == 124                # 80 steps an epoch on a small file
    assert ev.classifier_batch(1000, 60000, "2") == 1000
    assert ev.classifier_batch(1000, 600, "2") == 32                          # never below MIN_CLS_BATCH
    assert ev.classifier_batch(10, 300, "2") == 10                            # nor above the user's batch
    assert math.ceil(2 * 9917 / ev.classifier_batch(1000, 9917, "1-photons")) == 160      # as 2 x 80000 / 1000


def test_classifier_inputs_are_standardised_on_the_training_split():
    """A shift hidden under a huge common offset and scale: learnable only once the inputs are standardised."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(3000, 3)) * 1e4 + 1e6
    b = rng.normal(size=(3000, 3)) * 1e4 + 1e6 + np.array([1.5e4, 0, 0])
    kw = dict(n_layer=1, n_hidden=32, batch_size=100, n_epochs=4, lr=1e-3, seed=1)
    std = ev.train_classifier(a, b, (2000, 500, 500), **kw)
    assert std["auc"] > 0.8 and std["input_standardisation"] == "mean/std of the training split"
    assert std["optimizer_steps"] == 4 * 40 and std["batch_size"] == 100


def test_chance_classifier_with_clearly_separated_histograms_warns(tmp_path, capsys):
    """Showers 1.3x the reference's: E_tot/E_inc separates them completely; a classifier given almost no budget
    (1 epoch, 4 units, lr 1e-9) stays at chance, and then stderr and metrics.json say so, naming the flag."""
    ref = evalutils.write_synthetic(str(tmp_path / "ref.h5"), "1-photons", 1500, 2)
    gen = evalutils.write_synthetic(str(tmp_path / "gen.h5"), "1-photons", 1500, 3, scale=1.3)
    rc, out, err = _run(capsys, "-i", gen, "-r", ref, "-m", "cls-high", "-d", "1-photons", "--output_dir",
                        tmp_path / "o", "--cls_n_layer", "1", "--cls_n_hidden", "4", "--cls_n_epochs", "1",
                        "--cls_lr", "1e-9")
    assert rc == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    res = metrics["classifier"]["cls-high"]
    assert res["auc"] < ev.CHANCE_AUC
    (warning,) = metrics["warnings"]
    assert "cls-high" in warning and "--cls_n_epochs" in warning and "separation power 1.00" in warning
    assert f"warning: {warning}" in err
    # the budget: a full-size file's epoch is 160 steps (2 x 80000 events in batches of 1000); 2 x 991 training events
    # would need batches of 13 for that, so they get the smallest batch, 32
    assert res["batch_size"] == 32 and res["optimizer_steps"] == math.ceil(2 * res["n_train"] / 32) == 62


def test_gev_file_against_mev_reference_exits_2_with_the_unit_hint(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    import h5py
    gev = tmp_path / "gev.h5"
    with h5py.File(gen) as f, h5py.File(gev, "w") as g:
        g["incident_energies"] = f["incident_energies"][:] / 1000
        g["showers"] = f["showers"][:] / 1000
    rc, out, err = _run(capsys, "-i", gev, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir", tmp_path / "o")
    assert rc == 2 and out == "" and not (tmp_path / "o").exists()
    (line,) = err.strip().splitlines()
    assert "0.001 times the reference's" in line and "GeV vs MeV" in line and "--allow_unit_mismatch" in line
    # energies on other levels than dataset 1's 2^8..2^22 MeV (but the same scale): also refused
    off = tmp_path / "off.h5"
    with h5py.File(gen) as f, h5py.File(off, "w") as g:
        g["incident_energies"] = f["incident_energies"][:] * 1.37
        g["showers"] = f["showers"][:] * 1.37
    rc, _, err = _run(capsys, "-i", off, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir", tmp_path / "o")
    assert rc == 2 and "none of its incident energies" in err
    rc, _, err = _run(capsys, "-i", gev, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir", tmp_path / "o",
                      "--allow_unit_mismatch", "--jobs", "1")
    assert rc == 0


def test_mev_incident_energies_with_near_zero_showers_are_evaluated_with_a_warning(tmp_path, capsys, ds1):
    """An early checkpoint: the incident energies are the reference's (MeV), the showers sum to ~0.0016 x the
    reference's. Not a unit mistake to refuse: evaluated (exit 0), and stderr and metrics.json say both readings."""
    _, gen, ref = ds1
    early = tmp_path / "early.h5"
    with h5py.File(gen) as f, h5py.File(early, "w") as g:
        g["incident_energies"] = f["incident_energies"][:]
        g["showers"] = f["showers"][:] * 0.0016
    rc, out, err = _run(capsys, "-i", early, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir",
                        tmp_path / "o", "--jobs", "1")
    assert rc == 0 and out.startswith("evaluate.py: mode hist-p")
    (line,) = [x for x in error_lines(err) if x.startswith("warning: ")]
    assert "~0.00165 times the reference's (median 52.48 vs 3.186e+04 MeV" in line
    assert "GeV vs MeV" in line and "far from trained" in line           # both readings
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["warnings"] == [line[len("warning: "):]]
    assert metrics["n_events"] == 600 and metrics["separation_power"]["Etot / Einc"] > 0.9   # the metrics show it
    # the same model with showers that agree: no warning at all
    rc, _, err = _run(capsys, "-i", gen, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir",
                      tmp_path / "p", "--jobs", "1")
    assert rc == 0 and not any(x.startswith("warning: ") for x in error_lines(err))
    assert "warnings" not in json.loads((tmp_path / "p" / "metrics.json").read_text())


def test_file_that_states_gev_is_refused(tmp_path, capsys, ds1):
    """A file that says its unit (an attribute) other than MeV is refused, even with MeV-like numbers."""
    _, gen, ref = ds1
    said = tmp_path / "said.h5"
    with h5py.File(gen) as f, h5py.File(said, "w") as g:
        g["incident_energies"] = f["incident_energies"][:]
        g["showers"] = f["showers"][:]
        g["showers"].attrs["unit"] = "GeV"
    rc, out, err = _run(capsys, "-i", said, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir",
                        tmp_path / "o")
    assert rc == 2 and out == "" and not (tmp_path / "o").exists()
    (line,) = err.strip().splitlines()
    assert "showers attribute 'unit' says its energies are in 'GeV'" in line and "--allow_unit_mismatch" in line
    with h5py.File(said, "a") as g:
        g["showers"].attrs["unit"] = "MeV"                             # stating MeV is fine
    rc, _, _ = _run(capsys, "-i", said, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir",
                    tmp_path / "o", "--jobs", "1")
    assert rc == 0


def test_progress_on_stderr_by_default_and_one_line_on_stdout(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    rc, out, err = _run(capsys, "-i", gen, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir",
                        tmp_path / "o", "--jobs", "1")
    assert rc == 0 and len(out.strip().splitlines()) == 1 and out.startswith("evaluate.py: mode hist-p")
    assert any(line.startswith("[evaluate] ") for line in err.splitlines())
    rc, out, err = _run(capsys, "-i", gen, "-r", ref, "-m", "hist-p", "-d", "1-photons", "--output_dir",
                        tmp_path / "q", "--jobs", "1", "-q")
    assert rc == 0 and err == "" and len(out.strip().splitlines()) == 1


def test_metrics_carry_structured_per_energy_numbers_and_the_mean(tmp_path, capsys, ds1):
    _, gen, ref = ds1
    rc, _, _ = _run(capsys, "-i", gen, "-r", ref, "-m", "hist-chi", "-d", "1-photons", "--output_dir", tmp_path / "o",
                    "--jobs", "1", "-q")
    assert rc == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    seps = m["separation_power"]
    per_e = m["etot_einc_per_energy"]
    assert [p["energy_mev"] for p in per_e] == [2.0 ** k for k in range(8, 23)]
    assert all(p["separation_power"] == seps[f"Etot / Einc at E = {p['energy_mev']}"] for p in per_e)
    assert m["separation_power_mean"]["histograms"] == len(seps)
    assert m["separation_power_mean"]["value"] == pytest.approx(np.mean(list(seps.values())))
    assert ev.display_name("Etot / Einc at E = 4194304.0") == "Etot / Einc at E = 4.2 TeV"
    assert ev.occupied_range(np.linspace(0, 100, 101), np.r_[np.zeros(10), np.ones(5), np.zeros(85)]) == (9.0, 16.0)


# ---------------------------------------------------------------------------------------------- negative voxels

def test_negative_voxels_are_thresholded_as_the_reference_does(tmp_path, capsys, ds1):
    """FastCaloGAN's High12 network (BN + swish output) writes negative voxels. CaloChallenge's evaluate.py sets
    every voxel below its threshold (1 MeV for dataset 1) to zero and goes on, so a file with negative voxels
    gives exactly the separation powers of the same file with those voxels at zero (whose parity with the
    reference the tests above show); the count and the most negative value are on stderr and in metrics.json.
    NaN and non-positive incident energies stay errors."""
    _, gen_path, ref_path = ds1
    with h5py.File(gen_path) as f:
        einc, showers = f["incident_energies"][...], f["showers"][...]
    rng = np.random.default_rng(3)
    neg = showers.copy()
    mask = rng.random(neg.shape) < 0.3
    neg[mask] = -rng.uniform(0.01, 50.0, size=int(mask.sum())).astype(np.float32)
    zeroed = np.where(neg < 0, np.float32(0), neg)
    write_calo_file(tmp_path / "neg.h5", einc, neg)
    write_calo_file(tmp_path / "zero.h5", einc, zeroed)
    got = {}
    for name in ("neg", "zero"):
        out = tmp_path / f"out_{name}"
        rc, _, err = _run(capsys, "-i", tmp_path / f"{name}.h5", "-r", ref_path, "-m", "hist-chi", "-d", "1-photons",
                          "--output_dir", out, "--no_cache", "--jobs", "1", "--json", out / "metrics.json")
        assert rc == 0, err
        got[name] = (ev.read_chi2_file(out / "histogram_chi2_1-photons.txt"),
                     json.load(open(out / "metrics.json")), err)
    assert got["neg"][0] == got["zero"][0] and len(got["neg"][0]) > 10
    report = got["neg"][1]["negative_voxels"]
    assert report["generated"]["count"] == int(mask.sum())
    assert report["generated"]["most_negative_mev"] == pytest.approx(float(neg.min()))
    assert report["reference"] == {"count": 0, "fraction": 0.0, "most_negative_mev": None}
    assert got["zero"][1]["negative_voxels"]["generated"]["count"] == 0
    assert f"{int(mask.sum())} negative voxels in the generated file" in got["neg"][2]
    assert "negative voxels" not in got["zero"][2]
    # the E_tot / E_inc separation power recomputed the reference's way: threshold, sum, 50 bins
    with h5py.File(ref_path) as f:
        r_e, r_s = f["incident_energies"][:, 0], f["showers"][...]
    thr = lambda x: np.where(x < 1.0, 0.0, x)                                   # noqa: E731
    ratio_g = thr(neg).sum(axis=1) / einc[:, 0]
    ratio_r = thr(r_s).sum(axis=1) / r_e
    h_g, h_r = (np.histogram(x, np.linspace(0.5, 1.5, 101))[0].astype(np.float64) for x in (ratio_g, ratio_r))
    h_g, h_r = h_g / h_g.sum(), h_r / h_r.sum()
    sep = 0.5 * ((h_g - h_r) ** 2 / (h_g + h_r + 1e-16)).sum()
    assert got["neg"][1]["separation_power"]["Etot / Einc"] == pytest.approx(sep, abs=1e-9)
    assert sep > 0.05       # the zeroed voxels move E_tot: the number is not the untouched file's
    # NaN in a voxel and a zero incident energy are still refused with one line
    bad = neg.copy()
    bad[2, 5] = np.nan
    write_calo_file(tmp_path / "nan.h5", einc, bad)
    rc, _, err = _run(capsys, "-i", tmp_path / "nan.h5", "-r", ref_path, "-m", "hist-chi", "-d", "1-photons",
                      "--output_dir", tmp_path / "o2", "--no_cache", "--jobs", "1")
    assert rc == 2 and "NaN/inf" in err
    e0 = einc.copy()
    e0[1] = 0.0
    write_calo_file(tmp_path / "e0.h5", e0, neg)
    rc, _, err = _run(capsys, "-i", tmp_path / "e0.h5", "-r", ref_path, "-m", "hist-chi", "-d", "1-photons",
                      "--output_dir", tmp_path / "o3", "--no_cache", "--jobs", "1")
    assert rc == 2 and "non-positive" in err


def test_reference_with_negative_voxels_is_thresholded_too(tmp_path, capsys, ds1):
    """CaloChallenge's evaluate.py thresholds the reference file exactly as the generated one, so a reference with
    negative voxels gives the separation powers of the same reference with them at zero, and says how many there
    were (stderr, metrics.json); a cached reference scan says so too. NaN/inf voxels and non-positive incident
    energies in the reference stay errors (test_faults.py)."""
    _, gen_path, ref_path = ds1
    with h5py.File(ref_path) as f:
        einc, showers = f["incident_energies"][...], f["showers"][...]
    rng = np.random.default_rng(8)
    neg = showers.copy()
    mask = rng.random(neg.shape) < 0.2
    neg[mask] = -rng.uniform(0.001, 30.0, size=int(mask.sum())).astype(np.float32)
    write_calo_file(tmp_path / "ref_neg.h5", einc, neg)
    write_calo_file(tmp_path / "ref_zero.h5", einc, np.where(neg < 0, np.float32(0), neg))
    got = {}
    for name, extra in (("neg", ()), ("zero", ("--no_cache",)), ("cached", ())):
        out = tmp_path / f"out_{name}"
        ref = tmp_path / ("ref_zero.h5" if name == "zero" else "ref_neg.h5")
        rc, _, err = _run(capsys, "-i", gen_path, "-r", ref, "-m", "hist-chi", "-d", "1-photons", "--output_dir", out,
                          "--cache_dir", tmp_path / "cache", "--jobs", "1", "--json", out / "metrics.json", *extra)
        assert rc == 0, err
        got[name] = (ev.read_chi2_file(out / "histogram_chi2_1-photons.txt"),
                     json.load(open(out / "metrics.json")), err)
    assert got["neg"][0] == got["zero"][0] == got["cached"][0] and len(got["neg"][0]) > 10
    assert got["neg"][1]["separation_power"] == got["zero"][1]["separation_power"]
    for name in ("neg", "cached"):
        report = got[name][1]["negative_voxels"]["reference"]
        assert report["count"] == int(mask.sum())
        assert report["fraction"] == pytest.approx(mask.mean())
        assert report["most_negative_mev"] == pytest.approx(float(neg.min()))
        assert f"{int(mask.sum())} negative voxels in the reference file" in got[name][2]
    assert got["zero"][1]["negative_voxels"]["reference"]["count"] == 0
    assert "negative voxels" not in got["zero"][2]
    # the zeroed voxels matter: against the untouched reference the E_tot / E_inc separation differs
    out = tmp_path / "out_orig"
    assert _run(capsys, "-i", gen_path, "-r", ref_path, "-m", "hist-chi", "-d", "1-photons", "--output_dir", out,
                "--no_cache", "--jobs", "1")[0] == 0
    assert ev.read_chi2_file(out / "histogram_chi2_1-photons.txt")["Etot / Einc"] != got["neg"][0]["Etot / Einc"]
