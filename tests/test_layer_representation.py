"""CaloShowerGAN's layer representation end to end: prepare --norm layer, its exact inverse, the heads generator of
train.py (--recipe caloshowergan), generation through plumbing.generate, the ONNX export that multiplies the heads
inside the graph, lwtnn's refusal, exact resume, the Makefile's RECIPE and a smoke run of the whole chain.
"""
import doctest
import glob
import json
import os
import re
import subprocess

import h5py
import numpy as np
import pytest

import evaluate
import export_lwtnn
import plumbing
import preprocess
import select_epoch
import train
from test_train import read_losses, synthetic_showers, write_voxel_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XML1 = os.path.join(ROOT, "binning", "binning_dataset_1_photons.xml")
XML = os.path.join(ROOT, "binning", "binning_fastcalogan.xml")
SPANS = [(0, 8), (8, 168), (168, 358), (358, 363), (363, 368)]        # dataset 1 photons' five voxelised layers
#: a caloshowergan run small enough for the test suite: the recipe, with a small batch
FAST = ("--recipe", "caloshowergan", "--batch-size", "32", "--seed", "5", "--no-jit")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("layer")
    vox = write_voxel_file(str(d / "voxels.h5"), n_per_energy=60)
    paths = {"voxels": vox}
    for norm in ("ekin", "layer"):
        paths[norm] = str(d / f"train_{norm}.h5")
        assert preprocess.main(["prepare", "--binning", XML1, "--particle", "photon", "--norm", norm,
                                "--out", paths[norm], vox]) == 0
    return paths


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "run")
    assert train.main(["--data", files["layer"], "--out", out, "--iterations", "4", "--checkpoint-every", "2",
                       *FAST]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# the representation

def test_round_trip_within_1e6_with_the_fill_accounted_for():
    einc, showers = synthetic_showers((2.0**8, 2.0**12, 2.0**17), 40, seed=3)
    ekin = plumbing.kinetic_energy(einc, "photon")
    x = showers / ekin[:, None]
    x[0, 0:8] = 0.0                                        # a layer with no energy in an event
    assert (x == 0).mean() > 0.3                           # sparse: the fill matters
    rep = plumbing.to_layer_representation(x, SPANS, ekin)
    assert rep.shape == (x.shape[0], 368 + 5 + 1)
    for a, b in SPANS:                                     # each layer's voxel fractions sum to 1
        np.testing.assert_allclose(rep[:, a:b].sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rep[:, 368:373].sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rep[0, 0:8], 1 / 8)         # the empty layer: 8 x 1e-4 MeV, spread evenly
    filled = np.where(x == 0, 1e-4 / ekin[:, None], x)     # CaloShowerGAN's fill, in voxel / E_kin
    np.testing.assert_allclose(rep[:, -1], filled.sum(axis=1), rtol=1e-12)
    back = plumbing.from_layer_representation(rep, SPANS)
    np.testing.assert_allclose(back, filled, rtol=1e-6, atol=0)
    added = (back - x).sum(axis=1) * ekin                  # MeV the fill added: 1e-4 per zero voxel
    np.testing.assert_allclose(added, (x == 0).sum(axis=1) * 1e-4, rtol=1e-5)
    assert added.max() <= 368 * 1e-4 * (1 + 1e-5)
    with pytest.raises(plumbing.UserError):
        plumbing.check_spans([(0, 8), (9, 368)])           # a gap: not a tiling of the voxels


def test_prepare_writes_the_representation_of_its_voxels(files):
    with h5py.File(files["layer"]) as f:
        assert f.attrs["norm"] == "layer" and f.attrs["n_features"] == 374 and f.attrs["layer_fill_mev"] == 1e-4
        assert [tuple(s) for s in f.attrs["layer_spans"]] == SPANS
        rep, vox, ekin = f["representation"][:], f["voxels"][:], f["e_kin"][:]
    assert rep.dtype == np.float32
    filled = np.where(vox == 0, 1e-4 / ekin[:, None], vox.astype(np.float64))
    np.testing.assert_allclose(plumbing.from_layer_representation(rep.astype(np.float64), SPANS), filled, rtol=1e-6)
    with h5py.File(files["ekin"]) as f:                    # the default is FastCaloGAN's, unchanged
        assert f.attrs["norm"] == "ekin" and "representation" not in f
        np.testing.assert_array_equal(f["voxels"][:], vox)


def test_docstring_examples():
    for fn in (plumbing.to_layer_representation, plumbing.from_layer_representation, plumbing.check_spans,
               select_epoch.serving_range, train.recipe_options, export_lwtnn.layer_voxel_matrix):
        runner = doctest.DocTestRunner()
        for test in doctest.DocTestFinder().find(fn, globs=dict(vars(__import__(fn.__module__)))):
            runner.run(test)
        assert runner.summarize(verbose=False).failed == 0, fn.__name__


# ----------------------------------------------------------------------------------------------
# the recipe and its generator

def test_recipe_settings_depend_on_the_particle_and_say_where_they_came_from(run):
    cfg = plumbing.read_run_config(run)
    assert (cfg["recipe"], cfg["lr"], cfg["beta1"], cfg["latent_dim"]) == ("caloshowergan", 1e-4, 0.5, 50)
    assert (cfg["n_critic"], cfg["lambda_gp"], cfg["batch_size"]) == (8, 3.0, 32)      # photons; batch from the flag
    src = cfg["settings_source"]
    assert src["batch_size"] == "command line" and src["n_critic"].startswith("recipe caloshowergan: CaloShowerGAN")
    assert cfg["generator"]["layout"] == "layer_heads" and cfg["generator"]["spans"] == [list(s) for s in SPANS]
    assert (cfg["generator"]["activation"], cfg["generator"]["batchnorm"]) == ("swish", True)
    assert cfg["n_features"] == 374 and cfg["critic"]["hidden"] == [374] * 3 and cfg["norm"] == "layer"
    pion = train.recipe_options("caloshowergan", "pion")
    assert (pion["n_critic"][0], pion["lambda_gp"][0], pion["batch_size"][0]) == (5, 10.0, 1024)
    assert train.recipe_options("caloshowergan", "electron")["n_critic"][0] == 8


def test_refuses_a_voxel_file_with_one_line(files, tmp_path, capsys):
    assert train.main(["--data", files["ekin"], "--out", str(tmp_path / "r"), "--iterations", "2",
                       "--recipe", "caloshowergan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prepare --norm layer" in err and "--recipe caloshowergan" in err
    assert not os.path.exists(tmp_path / "r")


def test_generated_fractions_sum_to_one_and_generate_gives_voxels(run):
    g = plumbing.load_generator(run)
    assert plumbing.representation_spans(g) == SPANS and plumbing.generator_chain(g) is None
    z = plumbing.draw_noise(np.random.default_rng(3), 300, 50)
    label = np.linspace(0, 1, 300, dtype=np.float32)
    raw = np.asarray(g([z, plumbing.condition_vector(label)], training=False), dtype=np.float64)
    for a, b in SPANS + [(368, 373)]:
        np.testing.assert_allclose(raw[:, a:b].sum(axis=1), 1.0, rtol=0, atol=1e-6)
    assert (raw[:, -1] >= 0).all()
    x = plumbing.generate(g, label, np.random.default_rng(3))          # the same noise
    assert x.shape == (300, 368) and x.dtype == np.float32
    np.testing.assert_allclose(x, plumbing.from_layer_representation(raw, SPANS), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(x.sum(axis=1), raw[:, -1], rtol=1e-5)   # E_tot / E_kin is the last value
    # chunked and padded generation gives the same showers
    np.testing.assert_allclose(plumbing.generate(g, label, 1, batch_size=128), plumbing.generate(g, label, 1),
                               rtol=1e-5, atol=1e-9)


def test_resume_stays_exact(files, run, tmp_path):
    out = str(tmp_path / "cut")
    args = ["--data", files["layer"], "--out", out, "--checkpoint-every", "2", *FAST]
    assert train.main([*args, "--iterations", "2"]) == 0
    assert train.main([*args, "--iterations", "4", "--resume"]) == 0
    np.testing.assert_array_equal(read_losses(out), read_losses(run))
    label = np.linspace(0, 1, 20)
    np.testing.assert_array_equal(plumbing.generate(plumbing.load_generator(out), label, 2),
                                  plumbing.generate(plumbing.load_generator(run), label, 2))


# ----------------------------------------------------------------------------------------------
# export: ONNX multiplies the heads; lwtnn refuses

def test_onnx_equals_the_generation_function_within_1e5(run, tmp_path, capsys):
    out = tmp_path / "both"
    out.mkdir()
    (out / "neural_net_22_eta_0_130_all.json").write_text("{}")      # an earlier recipe's export of this slice
    assert export_lwtnn.main(["--run", run, "--out", str(out), "--format", "both", "--check"]) == 0
    err = capsys.readouterr().err
    assert "writing the ONNX model alone" in err and "removed" in err and err.count("\n") == 2
    assert sorted(os.listdir(out)) == ["neural_net_22_eta_0_130_all.meta.json", "neural_net_22_eta_0_130_all.onnx"]
    meta = json.loads((out / "neural_net_22_eta_0_130_all.meta.json").read_text())
    assert meta["check"]["max_diff_onnx"] <= 1e-5 and "layer_representation" in meta
    assert meta["onnx"]["output"]["shape"] == [1, 368]
    import onnx
    model = onnx.load(str(out / "neural_net_22_eta_0_130_all.onnx"))
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input] == [[1, 50], [1, 2]]
    assert {"Softmax", "MatMul", "Mul", "Slice"} <= {n.op_type for n in model.graph.node}
    # the generation function (plumbing.generate) and ONNX Runtime, one shower per call as FastCaloSim runs it
    g = plumbing.load_generator(run)
    label = np.linspace(0, 1, 64, dtype=np.float32)
    want = plumbing.generate(g, label, np.random.default_rng(9))
    z = plumbing.draw_noise(np.random.default_rng(9), 64, 50)
    got = export_lwtnn.run_onnx_rows(export_lwtnn.onnx_session(model.SerializeToString()), z,
                                     plumbing.condition_vector(label))
    assert got.shape == (64, 368)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_lwtnn_json_is_refused_with_exit_2_and_one_line(run, tmp_path, capsys):
    assert export_lwtnn.main(["--run", run, "--out", str(tmp_path / "json"), "--format", "json"]) == 2
    res = capsys.readouterr()
    assert res.out == "" and res.err.count("\n") == 1, res.err
    assert res.err.startswith("error: ") and "lwtnn" in res.err and ".onnx" in res.err and "FastCaloSim" in res.err
    assert not (tmp_path / "json").exists()
    with pytest.raises(plumbing.UserError, match="cannot compute"):
        export_lwtnn.export_model(plumbing.load_generator(run))


# ----------------------------------------------------------------------------------------------
# the Makefile: RECIPE

def _make_n(tmp_path, *args):
    res = subprocess.run(["make", "-n", "-C", ROOT, "PY_EXE=/bin/true", f"WORK={tmp_path}/w",
                          f"RESULTS={tmp_path}/r", "all", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.replace("\\\n", " ")


def test_make_knows_every_recipe_of_train():
    """`make help` lists, and RECIPE= accepts, exactly train.py's recipes."""
    import train

    res = subprocess.run(["make", "-s", "-C", ROOT, "help"], capture_output=True, text=True, timeout=60)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("recipes (RECIPE=...):")]
    assert line and line[0].split(":", 1)[1].split() == list(train.RECIPES)


def test_make_recipe_plans_prepare_with_the_norm_and_train_with_the_recipe(tmp_path):
    out = _make_n(tmp_path, "RECIPE=caloshowergan")
    assert len(re.findall(r"preprocess\.py prepare .*--norm layer ", out)) == 1
    assert len(re.findall(r"train\.py .*--recipe caloshowergan", out)) == 1
    default = _make_n(tmp_path / "d")
    assert "--norm ekin" in default and "--recipe calokit-etot-leak " in default       # the demo's recipe
    data = tmp_path / "cc"
    data.mkdir()
    for name in ("dataset_1_photons_1.hdf5", "dataset_1_photons_2.hdf5"):
        (data / name).write_text("")
    cc = _make_n(tmp_path / "cc1", "DATASET=1-photons", f"DATA_DIR={data}", "RECIPE=caloshowergan")
    assert re.findall(r"--range (\S+)", cc) == ["Low12", "Mid1218", "High18"]
    assert re.search(r"--combine \S+/Low12/select \S+/Mid1218/select \S+/High18/select", cc)
    fcg = _make_n(tmp_path / "cc2", "DATASET=1-photons", f"DATA_DIR={data}")
    assert re.findall(r"--range (\S+)", fcg) == ["Low12", "High12"] and "--recipe fastcalogan" in fcg
    helptext = subprocess.run(["make", "-C", ROOT, "help", "PY_EXE=/bin/true"], capture_output=True, text=True,
                              timeout=60).stdout
    assert re.search(r"recipes \(RECIPE=\.\.\.\): (.*)", helptext).group(1).split() == list(train.RECIPES)
    bad = subprocess.run(["make", "-n", "-C", ROOT, "PY_EXE=/bin/true", "RECIPE=nope", "all"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "RECIPE must be one of" in bad.stderr


# ----------------------------------------------------------------------------------------------
# the chain on tiny toy data with this recipe (smoke)

@pytest.mark.smoke
def test_chain_with_caloshowergan(tmp_path):
    d = tmp_path
    for name, seed in (("hits", 1), ("held", 2)):
        assert preprocess.main(["toy", "--particle", "photon", "--eta", "0.20", "--events-per-energy", "100",
                                "--energies", "2048", "65536", "--seed", str(seed), "--out", str(d / name)]) == 0
        assert preprocess.main(["voxelise", "--binning", XML, "--particle", "photon", "--out", str(d / f"{name}.h5"),
                                *sorted(glob.glob(str(d / name / "*.h5")))]) == 0
    assert preprocess.main(["prepare", "--binning", XML, "--particle", "photon", "--norm", "layer",
                            "--out", str(d / "train.h5"), str(d / "hits.h5")]) == 0
    assert train.main(["--data", str(d / "train.h5"), "--out", str(d / "run"), "--iterations", "4",
                       "--checkpoint-every", "2", "--recipe", "caloshowergan", "--batch-size", "32", "--no-jit"]) == 0
    assert select_epoch.main(["--run", str(d / "run"), "--reference", str(d / "hits.h5"), "--events", "100",
                              "--generate-like", str(d / "held.h5"), "--out", str(d / "select"), "--seed", "3"]) == 0
    with h5py.File(d / "select" / "generated.h5") as g, h5py.File(d / "held.h5") as h:
        assert g["showers"].shape == h["showers"].shape == (200, 368)
        shower = g["showers"][:]
        assert np.isfinite(shower).all() and (shower >= 0).all()      # softmax and ReLU heads: never negative
    assert export_lwtnn.main(["--run", str(d / "run"), "--best", str(d / "select" / "best.json"),
                              "--out", str(d / "lwtnn"), "--format", "both", "--check"]) == 0
    assert glob.glob(str(d / "lwtnn" / "*.onnx")) and not glob.glob(str(d / "lwtnn" / "neural_net_*_all.json"))
    assert evaluate.main(["-i", str(d / "select" / "generated.h5"), "-r", str(d / "held.h5"), "-m", "hist-chi",
                          "-d", "1-photons", "--output_dir", str(d / "eval"), "--jobs", "1"]) == 0
    seps = evaluate.read_chi2_file(str(d / "eval" / "histogram_chi2_1-photons.txt"))
    assert 0.0 < seps["Etot / Einc"] <= 1.0


def test_critic_etot_sees_the_representations_last_value(files, tmp_path, capsys):
    """--critic-etot with the layer representation: the critic's summary is spread x (E_tot/E_kin - mean) / std
    of the representation's last value; --critic-summaries (sums of voxel / E_kin per layer) is refused."""
    out = str(tmp_path / "et")
    assert train.main(["--data", files["layer"], "--out", out, "--iterations", "1", "--checkpoint-every", "1",
                       *FAST, "--critic-etot", "0.2"]) == 0
    cfg = plumbing.read_run_config(out)
    s = cfg["critic"]["summaries"]
    with h5py.File(files["layer"]) as f:
        rep = f["representation"][:]
    assert (s["spans"], s["total_column"], s["spread"]) == ([], 373, 0.2)
    np.testing.assert_allclose([s["mean"][0], s["std"][0]], [rep[:, -1].mean(), rep[:, -1].std()], rtol=1e-5)
    assert s["penalty"] == "independent"           # an input of the critic's own (see train.independent_summaries)
    _, critic = train.networks_from_config(cfg)
    assert [t.shape[-1] for t in critic.inputs] == [374, 2, 1]
    kernel, bias = train.summary_projection(374, s)
    got = (rep[:50] @ kernel + bias)[:, 0]
    np.testing.assert_allclose(got, 0.2 * (rep[:50, -1] - s["mean"][0]) / s["std"][0], rtol=1e-4, atol=1e-6)
    assert train.main(["--data", files["layer"], "--out", str(tmp_path / "cs"), "--iterations", "1", *FAST,
                       "--critic-summaries"]) == 2
    assert "--critic-summaries" in capsys.readouterr().err


@pytest.mark.slow             # three trainings and selections (~30 s idle); serving_range's doctest is in the default suite
def test_combine_serves_every_momentum_from_one_of_three_ranges(tmp_path):
    """CaloShowerGAN's photon ranges Low12 (p <= 2^12), Mid1218 (2^12..2^18), High18 (>= 2^18), each selected for
    one held-out file: the combined file takes 2^12 from Low12, 2^18 from Mid1218 (the lower range of the two that
    contain it), 2^15 from Mid1218 and 2^20 from High18; every event exactly once, in held-out order."""
    from test_train import write_training_file

    heldout = str(tmp_path / "heldout.h5")
    einc, showers = synthetic_showers((2.0**8, 2.0**12, 2.0**15, 2.0**18, 2.0**20), 10, seed=5)
    plumbing.write_calo_file(heldout, einc, showers)
    ranges = {"Low12": (2.0**8, 2.0**12), "Mid1218": (2.0**12, 2.0**15, 2.0**18), "High18": (2.0**18, 2.0**20)}
    sel = {}
    for name, es in ranges.items():
        data = write_training_file(str(tmp_path / f"train_{name}.h5"), energies=es, n_per_energy=20, seed=3,
                                   rng_name=name)
        run = str(tmp_path / f"run_{name}")
        assert train.main(["--data", data, "--out", run, "--iterations", "1", "--checkpoint-every", "1",
                           "--batch-size", "8", "--no-jit"]) == 0
        sel[name] = str(tmp_path / f"sel_{name}")
        assert select_epoch.main(["--run", run, "--reference", heldout, "--events", "20", "--out", sel[name],
                                  "--generate-like", heldout]) == 0
    out = tmp_path / "combined"
    assert select_epoch.main(["--combine", *sel.values(), "--generate-like", heldout, "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())
    served = {c["range"]: c["energies_served"] for c in best["combined"]}
    assert served == {"Low12": [2.0**8, 2.0**12], "Mid1218": [2.0**15, 2.0**18], "High18": [2.0**20]}
    with h5py.File(out / "generated.h5") as f:
        np.testing.assert_array_equal(f["incident_energies"][:, 0], einc)
