"""train.py: networks and generate(), bad inputs, determinism, kill + resume, --exclude-energy, training helps.

Training files are built here exactly as docs/formats-and-exports.md describes them (the format preprocess.py
prepare writes), from synthetic dataset-1-photon showers with real structure: the visible energy fraction, the
resolution and the longitudinal (layer) split depend on log E, hits are binned into voxels (sparse showers).
"""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

import select_epoch
import train
import plumbing
from HighLevelFeatures import dataset_geometry
from plumbing import condition_label, condition_vector, energy_range, kinetic_energy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENERGIES = (2.0**8, 2.0**11, 2.0**14, 2.0**17)


# ----------------------------------------------------------------------------------------------
# synthetic data (shared with test_select_epoch.py)

def synthetic_showers(energies, n_per_energy, seed=0):
    """(E_inc (N,), showers (N, 368) MeV) shaped like dataset-1 photons.

    E_tot / E_inc grows with log E (0.55 -> 0.9) with a stochastic + constant resolution; the shower
    maximum moves from the strips to the back layer with log E; within a layer hits follow an exponential
    radial profile, uniform in alpha, and are binned (multinomial), so low energies are sparse.
    """
    geom = dataset_geometry("1-photons")
    rng = np.random.default_rng(seed)
    einc = np.repeat(np.asarray(energies, dtype=np.float64), n_per_energy)
    n = einc.size
    x = np.log2(einc / 256.0) / 14.0
    resp = 0.55 + 0.35 * x
    sigma = 0.12 / np.sqrt(einc / 1000.0) + 0.02
    etot = einc * resp * np.clip(1.0 + sigma * rng.standard_normal(n), 0.05, None)
    depth = 1.0 + 1.2 * x
    layers = (0, 1, 2, 3, 12)
    pos = np.arange(len(layers), dtype=np.float64)
    w = np.exp(-0.5 * ((pos[None] - depth[:, None] - 0.3 * rng.standard_normal((n, 1))) / 0.8) ** 2)
    w *= rng.gamma(20.0, 1 / 20.0, size=w.shape)
    frac = w / w.sum(axis=1, keepdims=True)
    n_hits = np.clip((20 + 40 * np.log2(einc / 128.0)).astype(int), 20, 600)
    showers = np.zeros((n, geom.n_voxels), np.float32)
    for k, lid in enumerate(layers):
        lay = geom.layer(lid)
        a, b = geom.offsets[lid]
        scale = {0: 40.0, 1: 8.0, 2: 20.0, 3: 80.0, 12: 300.0}[lid]
        r = lay.r_centres
        prof = np.tile(np.exp(-r / scale) * (1 + r / scale) * np.diff(lay.r_edges), lay.n_alpha)
        prof /= prof.sum()
        for nh in np.unique(n_hits):
            sel = n_hits == nh
            counts = rng.multinomial(nh, prof, size=int(sel.sum()))
            showers[sel, a:b] = (etot[sel] * frac[sel, k])[:, None] * counts / nh
    return einc, showers


def write_training_file(path, energies=ENERGIES, n_per_energy=500, seed=0, particle="photon", rng_name="all"):
    """A training file exactly as docs/formats-and-exports.md specifies (voxels = showers / E_kin, V2 labels, attrs)."""
    geom = dataset_geometry("1-photons")
    einc, showers = synthetic_showers(energies, n_per_energy, seed)
    p_min, p_max, _ = energy_range(particle, rng_name)
    ekin_min, ekin_max = float(kinetic_energy(p_min, particle)), float(kinetic_energy(p_max, particle))
    ekin = kinetic_energy(einc, particle)
    with h5py.File(path, "w") as f:
        f.create_dataset("voxels", data=(showers / ekin[:, None]).astype(np.float32))
        f.create_dataset("label", data=condition_label(ekin, ekin_min, ekin_max).astype(np.float32))
        f.create_dataset("incident_energies", data=einc.reshape(-1, 1))
        f.create_dataset("e_kin", data=ekin)
        f.attrs.update({"particle": particle, "pid": 22, "eta_min": 20.0, "eta_max": 25.0, "range": rng_name,
                        "binning": "binning/binning_dataset_1_photons.xml", "label_scheme": "V2", "max_exp": 22,
                        "p_min": p_min, "p_max": p_max, "ekin_min": ekin_min, "ekin_max": ekin_max,
                        "latent_dim": 50, "n_voxels": geom.n_voxels, "source": "synthetic (tests)"})
    return path


def write_voxel_file(path, energies=ENERGIES, n_per_energy=500, seed=1):
    """A CaloChallenge voxel file (reference) of the same synthetic showers."""
    einc, showers = synthetic_showers(energies, n_per_energy, seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=einc.reshape(-1, 1))
        f.create_dataset("showers", data=showers)
    return path


def read_losses(run):
    with open(os.path.join(run, "losses.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(train.LOSS_COLUMNS)
    return np.array([[float(v) for v in r] for r in rows[1:]])


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_training_file(str(tmp_path_factory.mktemp("data") / "train_photon_eta_20_25_all.h5"))


def _train(data, out, iterations, every, seed=3, *extra):
    return train.main(["--data", data, "--out", out, "--iterations", str(iterations),
                       "--checkpoint-every", str(every), "--seed", str(seed), *extra])


# ----------------------------------------------------------------------------------------------
# bad inputs: exit code 2, one line, nothing written

def test_bad_inputs_exit_2(tmp_path, train_file, capsys):
    out = str(tmp_path / "run")
    assert _train(str(tmp_path / "missing.h5"), out, 2, 1) == 2
    assert "missing.h5: training file not found" in capsys.readouterr().err
    bad = tmp_path / "wrong.h5"
    with h5py.File(bad, "w") as f:                       # a CaloChallenge voxel file is not a training file
        f["incident_energies"] = np.ones((4, 1))
        f["showers"] = np.ones((4, 368), np.float32)
    assert _train(str(bad), out, 2, 1) == 2
    err = capsys.readouterr().err
    assert "wrong.h5: missing dataset 'voxels'" in err and err.count("\n") == 1
    with h5py.File(bad, "w") as f:
        f["voxels"] = np.ones((4, 368), np.float32)
        f["label"] = np.ones(3, np.float32)
        f["incident_energies"] = np.ones((4, 1))
        f.attrs["particle"] = "photon"
    assert _train(str(bad), out, 2, 1) == 2
    assert "'label' has shape (3,)" in capsys.readouterr().err
    with h5py.File(bad, "w") as f:
        f["voxels"] = -np.ones((4, 368), np.float32)
        f["label"] = np.ones(4, np.float32)
        f["incident_energies"] = np.ones((4, 1))
        f.attrs["particle"] = "photon"
    assert _train(str(bad), out, 2, 1) == 2
    assert "'voxels' has negative values" in capsys.readouterr().err
    assert _train(train_file, out, 2, 1, 3, "--exclude-energy", "1234") == 2
    assert "no events with incident energy 1234 MeV" in capsys.readouterr().err
    assert _train(train_file, out, 0, 1) == 2
    assert not os.path.exists(out)


def test_runs_on_the_requested_backend():
    """test_train_jax.py runs this file with KERAS_BACKEND=jax: make sure that is what the tests then exercise."""
    assert train._backend() == os.environ.get("KERAS_BACKEND", "tensorflow")


# ----------------------------------------------------------------------------------------------
# networks and generate()

def set_batchnorm_statistics(model):
    """Non-trivial moving statistics, scale and shift in every batch-norm layer, so that folding them is tested."""
    keras = train._keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.linspace(-0.2, 0.3, n))
            layer.moving_variance.assign(np.linspace(0.5, 2.0, n))
            layer.gamma.assign(np.linspace(0.8, 1.2, n))
            layer.beta.assign(np.linspace(-0.1, 0.1, n))


def test_generator_contract_and_generate(monkeypatch):
    keras = train._keras()
    keras.utils.set_random_seed(0)
    g = train.build_generator(368, 50, 2, (50, 100, 200), "swish", True, "relu")
    assert [t.name.split(":")[0] for t in g.inputs] == ["noise", "condition"]
    assert tuple(g.inputs[0].shape) == (None, 50) and tuple(g.outputs[0].shape) == (None, 368)
    kinds = [type(layer).__name__ for layer in g.layers]
    assert kinds.count("Dense") == 4 and kinds.count("BatchNormalization") == 3
    set_batchnorm_statistics(g)
    labels = np.linspace(0, 1, 700).astype(np.float32)
    z = plumbing.draw_noise(np.random.default_rng(7), 700, 50)
    ref = np.asarray(g([z, condition_vector(labels)], training=False))
    results = {}
    for path, small in (("keras", 0), ("numpy", 10**9)):
        monkeypatch.setattr(plumbing, "SMALL_BATCH", small)
        x = plumbing.generate(g, labels, 7, batch_size=300, refresh=True)   # chunks of 300, the last one padded
        assert x.shape == (700, 368) and x.dtype == np.float32 and x.flags.writeable
        assert (x >= 0).all() and (x > 0).any()
        # the same showers as the Keras model fed the same noise, whatever the chunking
        np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5 * ref.max())
        np.testing.assert_allclose(plumbing.generate(g, labels, 7, batch_size=1000), x, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(plumbing.generate(g, labels, 7, batch_size=300), x)   # reproducible
        results[path] = x
    monkeypatch.undo()
    # the numpy path really ran (batch-norm folded), and it agrees with the compiled Keras path
    assert plumbing.generator_chain(g) is not None
    np.testing.assert_allclose(results["numpy"], results["keras"], rtol=1e-4, atol=1e-5 * ref.max())
    # default: batch 1 (numpy path) and 400 (Keras path) agree on the same noise
    one = np.concatenate([plumbing.generate(g, labels[i:i + 1], np.random.default_rng(i)) for i in range(3)])
    many = np.concatenate([plumbing.generate(g, np.repeat(labels[i:i + 1], 400), np.random.default_rng(i))[:1]
                           for i in range(3)])
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-6)
    # noise: N(0.5, 0.5) from the numpy Generator, the same stream whether drawn at once or in chunks
    rng = np.random.default_rng(1)
    zz = plumbing.draw_noise(rng, 20000, 50)
    assert abs(zz.mean() - 0.5) < 0.01 and abs(zz.std() - 0.5) < 0.01 and np.isfinite(zz).all()
    chunks = np.random.default_rng(1)
    parts = np.concatenate([plumbing.draw_noise(chunks, 3, 50), plumbing.draw_noise(chunks, 19997, 50)])
    np.testing.assert_array_equal(parts, zz)


def test_numpy_generation_path_covers_every_generator_variant():
    """The folded numpy chain reproduces Keras for LeakyReLU(0), swish and batch-norm before an output activation."""
    keras = train._keras()
    keras.utils.set_random_seed(3)
    noise, cond = keras.Input((6,), name="noise"), keras.Input((2,), name="condition")
    h = keras.layers.Concatenate()([noise, cond])
    h = keras.layers.Dense(5)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.LeakyReLU(negative_slope=0.0)(h)
    h = keras.layers.Dense(4)(h)
    h = keras.layers.BatchNormalization()(h)
    out = keras.layers.Activation("swish")(h)
    g = keras.Model([noise, cond], out)
    set_batchnorm_statistics(g)
    chain = plumbing.generator_chain(g)
    assert [(k.shape, act) for k, _, act, _ in chain] == [((8, 5), "leaky_relu"), ((5, 4), "swish")]
    labels = np.linspace(0, 1, 50)
    z = plumbing.draw_noise(np.random.default_rng(2), 50, 6)
    ref = np.asarray(g([z, condition_vector(labels)], training=False))
    np.testing.assert_allclose(plumbing.generate(g, labels, 2), ref, rtol=1e-5, atol=1e-6)
    assert (ref < 0).any()            # swish output: negative values survive, unlike a ReLU output


# ----------------------------------------------------------------------------------------------
# determinism, checkpoints, kill + resume

RUN_ARGS = ("--batch-size", "32")
N_IT, EVERY = 160, 40


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, train_file):
    """An uninterrupted run: the yardstick for determinism and for kill + resume."""
    out = str(tmp_path_factory.mktemp("runs") / "ref")
    assert _train(train_file, out, N_IT, EVERY, 3, *RUN_ARGS) == 0
    return out


def test_same_seed_same_losses(tmp_path, train_file, reference_run):
    out = str(tmp_path / "again")
    assert _train(train_file, out, 20, 10, 3, *RUN_ARGS) == 0
    a, b = read_losses(reference_run)[:20], read_losses(out)
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and np.ptp(a[:, 1]) > 0
    other = str(tmp_path / "other_seed")
    assert _train(train_file, other, 3, 3, 4, *RUN_ARGS, "--no-jit") == 0
    assert not np.allclose(read_losses(other)[:3, 1:], a[:3, 1:])


def test_run_directory_layout(reference_run):
    cfg = plumbing.read_run_config(reference_run)
    for key in ("particle", "pid", "eta_min", "eta_max", "range", "binning", "label_scheme", "p_min", "p_max",
                "ekin_min", "ekin_max", "latent_dim", "n_voxels", "source", "train_data", "seed", "iterations",
                "checkpoint_every", "batch_size", "n_critic", "lambda_gp", "lr", "beta1", "beta2", "generator",
                "critic", "excluded_energies", "noise", "normalisation", "backend"):
        assert key in cfg, key
    assert (cfg["n_critic"], cfg["lambda_gp"], cfg["lr"], cfg["beta1"], cfg["batch_size"]) == (5, 10.0, 1e-4, 0.55, 32)
    # photons, range "all", no XML settings: swish + batch-norm as FastCaloGAN trained it (inference mode),
    # a ReLU output (non-negative showers; the XML's swish range gives FastCaloGAN's swish output)
    assert cfg["generator"] == {"hidden": [50, 100, 200], "activation": "swish", "batchnorm": True,
                                "output_activation": "relu", "output_batchnorm": False,
                                "batchnorm_mode": "inference", "layout": "fastcalogan"}
    assert cfg["settings_source"]["batch_size"] == "command line" and cfg["settings_source"]["lr"] == "default"
    assert cfg["critic"] == {"hidden": [368] * 3, "activation": "relu", "summaries": None}
    assert (cfg["recipe"], cfg["init"], cfg["lr_decay"], cfg["batches"]) == ("fastcalogan", "he", 1.0, "replacement")
    assert cfg["noise"] == {"mean": 0.5, "std": 0.5} and cfg["excluded_energies"] == []
    ckpts = train.list_checkpoints(reference_run)
    assert [it for it, _ in ckpts] == list(range(EVERY, N_IT + 1, EVERY))
    for it, path in ckpts:
        with open(os.path.join(path, "state.json")) as f:
            assert json.load(f)["iteration"] == it
    # resume state only in the newest checkpoint (--keep-resume 1), generator.keras everywhere
    assert [os.path.isdir(os.path.join(p, "resume")) for _, p in ckpts] == [False] * (len(ckpts) - 1) + [True]
    assert read_losses(reference_run)[:, 0].tolist() == list(range(1, N_IT + 1))
    g = plumbing.load_generator(reference_run)
    assert [t.name.split(":")[0] for t in g.inputs] == ["noise", "condition"]
    x = plumbing.generate(g, np.full(3, 0.5), 1)
    assert x.shape == (3, 368) and (x >= 0).all()


def test_kill_and_resume(tmp_path, train_file, reference_run):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", train_file, "--out", out, "--iterations",
           str(N_IT), "--checkpoint-every", str(EVERY), "--seed", "3", *RUN_ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.isdir(os.path.join(out, f"ckpt_{EVERY}")):
            assert proc.poll() is None and time.time() < deadline, "training stopped before its first checkpoint"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = train.list_checkpoints(out)
    assert done and done[-1][0] < N_IT, "the run finished before it could be killed"
    # debris of a kill: a half-written checkpoint under its temporary name, and an incomplete ckpt dir
    stray = os.path.join(out, f".tmp-ckpt_{N_IT * 10}-x1y2")
    os.makedirs(stray)
    with open(os.path.join(stray, "generator.keras"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    os.makedirs(os.path.join(out, f"ckpt_{N_IT * 20}"))
    assert [it for it, _ in train.list_checkpoints(out)] == [it for it, _ in done]
    last = done[-1][0]

    assert train.main(["--data", train_file, "--out", out, "--iterations", str(N_IT), "--checkpoint-every",
                       str(EVERY), "--seed", "3", "--resume", *RUN_ARGS]) == 0
    ckpts = train.list_checkpoints(out)
    assert ckpts[-1][0] == N_IT
    with open(os.path.join(ckpts[-1][1], "state.json")) as f:
        assert json.load(f)["iteration"] == N_IT
    losses = read_losses(out)
    assert losses[:, 0].tolist() == list(range(1, N_IT + 1))     # exactly one row per iteration
    # the resumed run continued exactly: same losses as the uninterrupted one (optimiser + RNG state restored)
    np.testing.assert_allclose(losses, read_losses(reference_run), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(losses[:last], read_losses(reference_run)[:last])
    x = plumbing.generate(plumbing.load_generator(out), np.full(4, 0.3), 2)
    np.testing.assert_allclose(x, plumbing.generate(plumbing.load_generator(reference_run), np.full(4, 0.3), 2),
                               rtol=1e-4, atol=1e-6)
    # a finished run resumed again does nothing; a new run into a used directory needs --resume
    assert train.main(["--data", train_file, "--out", out, "--iterations", str(N_IT), "--checkpoint-every",
                       str(EVERY), "--seed", "3", "--resume", *RUN_ARGS]) == 0
    assert read_losses(out).shape[0] == N_IT
    assert _train(train_file, out, N_IT, EVERY, 3, *RUN_ARGS) == 2


@pytest.mark.parametrize("flags, key, old, new", [
    (["--lr", "2e-4"], "lr", "0.0001", "0.0002"),
    (["--n-critic", "3"], "n_critic", "5", "3"),
    (["--no-batchnorm"], "generator.batchnorm", "True", "False"),
    (["--activation", "relu"], "generator.activation", "'swish'", "'relu'"),
    (["--critic-width", "64"], "critic.hidden", "[368, 368, 368]", "[64, 64, 64]"),
])
def test_resume_refuses_changed_settings(tmp_path, train_file, reference_run, capsys, flags, key, old, new):
    """A resumed run keeps its hyper-parameters: a different one is refused with both values, nothing is written;
    a longer --iterations is what resuming is for."""
    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    before = sorted(os.listdir(out))
    capsys.readouterr()
    assert _train(train_file, out, N_IT + EVERY, EVERY, 3, "--resume", *RUN_ARGS, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"started with {key} = {old}, this command gives {new}" in err[0], err
    assert sorted(os.listdir(out)) == before


def test_exclude_energy_recorded(tmp_path, train_file):
    out = str(tmp_path / "excl")
    assert _train(train_file, out, 4, 4, 5, "--exclude-energy", str(2.0**14 * (1 + 1e-5)), "--batch-size", "16",
                  "--no-jit") == 0
    cfg = plumbing.read_run_config(out)
    assert cfg["excluded_energies"] == [pytest.approx(2.0**14 * (1 + 1e-5))]
    assert cfg["n_events"] == 2000 and cfg["n_events_used"] == 1500
    assert list(cfg["excluded_events"].values()) == [500]


# ----------------------------------------------------------------------------------------------
# a short training run learns: E_tot chi2/ndf far better than the untrained generator

def test_short_training_beats_untrained(tmp_path, train_file):
    ref = write_voxel_file(str(tmp_path / "ref.h5"), n_per_energy=1000, seed=11)
    out = str(tmp_path / "short")
    # photon defaults (swish + batch-norm run as FastCaloGAN trained it, ReLU output) with the demo's 2 critic
    # steps at lr 2e-4, batch 128. (The demo's --no-batchnorm with He-uniform weights left the 256 MeV mean
    # E_tot 2.6x too high at its best checkpoint of 300 iterations: measured, TensorFlow, seed 3.)
    assert _train(train_file, out, 300, 50, 3, "--n-critic", "2", "--lr", "2e-4") == 0
    sel = str(tmp_path / "select")
    assert select_epoch.main(["--run", out, "--reference", ref, "--events", "1000", "--out", sel,
                              "--no-generated"]) == 0
    with open(os.path.join(sel, "best.json")) as f:
        best = json.load(f)
    trained = plumbing.load_generator(out, best["best_iteration"])
    cfg = plumbing.read_run_config(out)
    keras = train._keras()
    keras.utils.set_random_seed(3)                        # the run's initial weights: iteration 0
    untrained, _ = train.networks_from_config(cfg)
    with h5py.File(ref) as f:
        einc = f["incident_energies"][:, 0]
        etot = f["showers"][...].sum(axis=1, dtype=np.float64)
    for e in ENERGIES:
        r = etot[einc == e]
        label = condition_label(kinetic_energy(e, "photon"), cfg["ekin_min"], cfg["ekin_max"])
        g0 = plumbing.generate(untrained, np.full(1000, label), 1).sum(axis=1) * e
        g1 = plumbing.generate(trained, np.full(1000, label), 1).sum(axis=1) * e
        c0, n0 = select_epoch.etot_chi2(r, g0, "photon")
        c1, n1 = select_epoch.etot_chi2(r, g1, "photon")
        # untrained: every shower far outside the reference's +-3 RMS window (E_tot > 5x the reference)
        assert c0 == np.inf and g0.mean() > 5 * r.mean(), (e, g0.mean(), r.mean())
        # trained: finite, modest chi2/ndf and mean E_tot within a factor 2.5 of the reference
        assert c1 / n1 < 30, (e, c1 / n1)
        assert 0.4 < g1.mean() / r.mean() < 2.5, (e, g1.mean() / r.mean())
        # and a continuous distance that is finite for both: E_tot earth-mover distance shrinks >= 5x
        d0, d1 = wasserstein_distance(r, g0), wasserstein_distance(r, g1)
        assert d1 < 0.2 * d0, (e, d1 / r.mean(), d0 / r.mean())
    assert best["chi2_ndf"] < 20


def test_critic_width_fastcalogan_default_and_cap():
    """Critic layers are N_vox wide (FastCaloGAN) up to CRITIC_WIDTH_CAP; --critic-width overrides both."""
    def critic_hidden(n_vox, *flags):
        args = train.parse_args(["--data", "x.h5", "--out", "run", *flags])
        data = {"attrs": {"particle": "photon", "n_voxels": n_vox, "latent_dim": 50},
                "voxels": np.zeros((4, n_vox), dtype=np.float32)}
        return train.make_config(args, data, {})["critic"]["hidden"]

    assert critic_hidden(368) == [368] * 3                      # dataset 1 photons: FastCaloGAN's width
    assert critic_hidden(6480) == [train.CRITIC_WIDTH_CAP] * 3  # dataset 2 capped
    assert critic_hidden(6480, "--critic-width", "64") == [64] * 3
    cfg = {"n_voxels": 368, "latent_dim": 50, "generator": {"hidden": [50, 100, 200], "activation": "relu",
           "batchnorm": False, "output_activation": "relu"}, "critic": {"hidden": [16] * 3, "activation": "relu"}}
    _, critic = train.networks_from_config(cfg)
    assert [lay.units for lay in critic.layers if lay.name.startswith("dense_")] == [16, 16, 16]
    with pytest.raises(train.UserError, match="critic-width"):
        train.parse_args(["--data", "x.h5", "--out", "run", "--critic-width", "0"])


# ----------------------------------------------------------------------------------------------
# FastCaloGAN's networks and settings from the binning XML

FCG_XML = """<?xml version="1.0"?>
<Bins optimisedAlphaBins="false" isPolar="true" mergeAlphaBinsInFirstRBin="false">
  <Particle pid="22" symmetriseAlpha="true" latentDim="20" lambda="5" generator="50,100,200" batchSize="64">
    <EnergyRanges>
      <Range name="UltraLow12" useBatchNormalisation="True" activationFunction="ReLU"/>
      <Range name="High12" useBatchNormalisation="True" activationFunction="swish" learningRate="5e-5"
             discriminator="64,32,16"/>
    </EnergyRanges>
    <Bin etaMin="0" etaMax="5" regionId="0" latentDim="30" learningRate="2e-4">
      <Layer id="0" r_edges="0,5,10" n_bin_alpha="1"/>
      <Layer id="1" r_edges="0,2,4,8" n_bin_alpha="8"/>
    </Bin>
  </Particle>
  <Particle pid="211" symmetriseAlpha="false" latentDim="50" generator="50,100,200">
    <EnergyRanges><Range name="All" useBatchNormalisation="False" activationFunction="ReLU"/></EnergyRanges>
    <Bin etaMin="0" etaMax="5" regionId="0">
      <Layer id="0" r_edges="0,5,10" n_bin_alpha="1"/>
      <Layer id="1" r_edges="0,2,4,8" n_bin_alpha="8"/>
    </Bin>
  </Particle>
</Bins>
"""


def _config_from_xml(tmp_path, particle, range_name, p_max, *flags):
    xml = tmp_path / "fcg.xml"
    xml.write_text(FCG_XML)
    args = train.parse_args(["--data", "x.h5", "--out", "run", *flags])
    attrs = {"particle": particle, "n_voxels": 26, "latent_dim": 50, "binning": str(xml), "eta_min": 0.0,
             "eta_max": 5.0, "range": range_name, "p_max": p_max}
    return train.make_config(args, {"attrs": attrs, "voxels": np.zeros((4, 26), np.float32)}, {})


def _sequence(model):
    """(class, activation or slope) of every layer after the inputs and the concatenation."""
    out = []
    for layer in model.layers[3:]:
        kind = type(layer).__name__
        if kind == "Dense":
            out.append((kind, layer.units, layer.activation.__name__))
        elif kind == "LeakyReLU":
            out.append((kind, float(layer.negative_slope)))
        elif kind == "Activation":
            out.append((kind, layer.activation.__name__))
        else:
            out.append((kind,))
    return out


def test_networks_and_settings_from_xml_ranges(tmp_path):
    """The three FastCaloGAN generators picked by the XML range; settings particle < region < range < flags."""
    keras = train._keras()
    keras.utils.set_random_seed(0)
    low = _config_from_xml(tmp_path, "photon", "UltraLow12", 2.0**12)
    high = _config_from_xml(tmp_path, "photon", "High12", 2.0**22)
    pion = _config_from_xml(tmp_path, "pion", "All", 2.0**22)
    relu_bn = [("Dense", 50, "linear"), ("BatchNormalization",), ("LeakyReLU", 0.0),
               ("Dense", 100, "linear"), ("BatchNormalization",), ("LeakyReLU", 0.0),
               ("Dense", 200, "linear"), ("BatchNormalization",), ("LeakyReLU", 0.0),
               ("Dense", 26, "linear"), ("LeakyReLU", 0.0)]
    swish = [("Dense", 50, "linear"), ("BatchNormalization",), ("Activation", "silu"),
             ("Dense", 100, "linear"), ("BatchNormalization",), ("Activation", "silu"),
             ("Dense", 200, "linear"), ("BatchNormalization",), ("Activation", "silu"),
             ("Dense", 26, "linear"), ("BatchNormalization",), ("Activation", "silu")]
    relu = [("Dense", 50, "relu"), ("Dense", 100, "relu"), ("Dense", 200, "relu"), ("Dense", 26, "relu")]
    for cfg, expected in ((low, relu_bn), (high, swish), (pion, relu)):
        gen, critic = train.networks_from_config(cfg)
        assert _sequence(gen) == expected
        assert gen.layers[-1].name == "voxels" and cfg["generator"]["batchnorm_mode"] == "inference"
        for model in (gen, critic):   # He-uniform kernels (limit sqrt(6 / fan_in), wider than Glorot's), zero biases
            for layer in model.layers:
                if type(layer).__name__ == "Dense":
                    k, b = layer.get_weights()
                    he, glorot = math.sqrt(6.0 / k.shape[0]), math.sqrt(6.0 / (k.shape[0] + k.shape[1]))
                    assert np.abs(k).max() <= he and (k.size < 500 or np.abs(k).max() > max(glorot, 0.95 * he))
                    if k.size >= 5000:   # uniform: variance limit^2 / 3
                        assert abs(k.var() / (he * he / 3) - 1) < 0.1
                    assert not b.any()
    # critic: the XML's discriminator sizes for High12, [N_vox] x 3 otherwise; ReLU, linear score
    _, critic = train.networks_from_config(high)
    assert _sequence(critic) == [("Dense", 64, "relu"), ("Dense", 32, "relu"), ("Dense", 16, "relu"),
                                 ("Dense", 1, "linear")]
    assert low["critic"]["hidden"] == [26] * 3
    # precedence: particle < region < range; flags above all; the source of each value is recorded
    assert (high["latent_dim"], high["lr"], high["lambda_gp"], high["batch_size"]) == (30, 5e-5, 5.0, 64)
    assert (low["latent_dim"], low["lr"]) == (30, 2e-4)
    assert pion["latent_dim"] == 50 and pion["lr"] == 1e-4 and pion["settings_source"]["lr"] == "default"
    src = high["settings_source"]
    assert src["lr"].endswith('<Range name="High12">') and src["latent_dim"].endswith('<Bin etaMin="0" etaMax="5">')
    assert src["lambda_gp"].endswith('<Particle pid="22">') and src["n_critic"] == "default"
    flagged = _config_from_xml(tmp_path, "photon", "High12", 2.0**22, "--lr", "3e-4", "--no-batchnorm",
                               "--critic-width", "8", "--batchnorm-mode", "batch-stats")
    assert flagged["lr"] == 3e-4 and flagged["settings_source"]["lr"] == "command line"
    assert flagged["generator"]["batchnorm"] is False and flagged["generator"]["output_activation"] == "relu"
    assert high["generator"]["output_activation"] == "swish" and high["generator"]["output_batchnorm"]
    asked = _config_from_xml(tmp_path, "photon", "all", 2.0**22, "--output-activation", "swish")
    assert asked["generator"]["output_batchnorm"] and asked["settings_source"]["output_activation"] == "command line"
    plain = _config_from_xml(tmp_path, "photon", "Low12", 2.0**12)   # no such range in the XML: defaults
    assert plain["generator"]["output_activation"] == "relu" and plain["generator"]["activation"] == "relu"
    assert flagged["critic"]["hidden"] == [8] * 3 and flagged["generator"]["batchnorm_mode"] == "batch-stats"
    # calokit's range names find FastCaloGAN's range in the XML (high -> High12)
    assert _config_from_xml(tmp_path, "photon", "high", 2.0**22)["lr"] == 5e-5


def _bn_layers(model):
    return [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]


def test_batchnorm_inference_mode_keeps_statistics(tmp_path, train_file, monkeypatch):
    """Faithful mode: moving mean 0 / variance 1 through training, generation = the training graph's output.
    (test_train_jax.py runs this file on the JAX backend: both training steps are checked.)"""
    runs = {}
    for mode in ("inference", "batch-stats"):
        out = str(tmp_path / mode)
        assert _train(train_file, out, 3, 3, 2, "--batch-size", "16", "--n-critic", "2",
                      "--batchnorm-mode", mode, "--output-activation", "swish") == 0   # FastCaloGAN's swish network
        runs[mode] = (plumbing.load_generator(out), plumbing.read_run_config(out))
    g, cfg = runs["inference"]
    assert not train.batchnorm_training(cfg) and len(_bn_layers(g)) == 4
    for layer in _bn_layers(g):
        np.testing.assert_array_equal(np.asarray(layer.moving_mean), 0.0)
        np.testing.assert_array_equal(np.asarray(layer.moving_variance), 1.0)
        assert np.abs(np.asarray(layer.gamma) - 1).max() > 1e-5     # the scale did learn
    labels = np.linspace(0, 1, 300).astype(np.float32)
    z = plumbing.draw_noise(np.random.default_rng(5), 300, cfg["latent_dim"])
    graph = np.asarray(g([z, condition_vector(labels)], training=train.batchnorm_training(cfg)))
    assert (graph < 0).any()                                           # swish output: negative voxels exist
    assert plumbing.generator_chain(g) is not None                     # the fast path folds the output batch-norm
    for small in (0, 10**9):                                           # compiled and numpy generation paths
        monkeypatch.setattr(plumbing, "SMALL_BATCH", small)
        got = plumbing.generate(g, labels, 5, refresh=True)
        np.testing.assert_allclose(got, graph, rtol=1e-4, atol=1e-5 * np.abs(graph).max())
    gb, cfg_b = runs["batch-stats"]
    assert train.batchnorm_training(cfg_b)
    assert max(np.abs(np.asarray(layer.moving_mean)).max() for layer in _bn_layers(gb)) > 1e-4
    training = np.asarray(gb([z, condition_vector(labels)], training=True))
    assert np.abs(training - np.asarray(gb([z, condition_vector(labels)], training=False))).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# sequential strategy

def test_sequential_schedule():
    """Middle exponent alone for 50,000 iterations, then one more every 20,000, above first, then below."""
    s = train.sequential_exponents
    assert s(1, 8, 22) == s(50_000, 8, 22) == (15, 15)
    assert s(50_001, 8, 22) == s(70_000, 8, 22) == (15, 16)
    assert s(70_001, 8, 22) == (14, 16) and s(90_001, 8, 22) == (14, 17)
    assert s(50_001 + 13 * 20_000 - 1, 8, 22) == (9, 22) and s(50_001 + 13 * 20_000, 8, 22) == (8, 22)
    assert s(10**7, 8, 22) == (8, 22)
    # FastCaloGAN's mid is int((min + max) / 2): the upper side is never shorter; High15 (15..22) starts at 18
    assert s(1, 15, 22) == (18, 18) and s(50_001 + 6 * 20_000, 15, 22) == (15, 22)
    assert s(50_001 + 4 * 20_000, 15, 22) == (16, 21) and s(50_001 + 5 * 20_000, 15, 22) == (15, 21)
    assert s(10**6, 16, 16) == (16, 16)


def test_sequential_training_draws_from_the_growing_sample(tmp_path, train_file, monkeypatch):
    seen = []
    real = train.draw_batches

    def spy(rng, n_events, cfg, pool=None, sampler=None):
        seen.append(None if pool is None else np.unique(pool).size)
        return real(rng, n_events, cfg, pool, sampler)

    monkeypatch.setattr(train, "draw_batches", spy)
    out = str(tmp_path / "seq")
    # range "all" of photons: 2^6..2^22, middle 2^14; the file has 500 events at each of 2^8, 2^11, 2^14, 2^17
    assert _train(train_file, out, 8, 8, 1, "--batch-size", "8", "--n-critic", "1", "--strategy", "sequential",
                  "--first-sample-iterations", "2", "--add-every", "1") == 0
    # exponents: 14 | 14-15 | 13-15 | 13-16 | 12-16 | 12-17 (+2^17) | 11-17 (+2^11)
    assert seen == [500, 500, 500, 500, 500, 500, 1000, 1500]
    assert plumbing.read_run_config(out)["strategy"] == {"name": "sequential", "first_sample_iterations": 2, "add_every": 1}
    seen.clear()
    assert _train(train_file, str(tmp_path / "all"), 2, 2, 1, "--batch-size", "8", "--n-critic", "1") == 0
    assert seen == [None, None]


# ----------------------------------------------------------------------------------------------
# FastCaloGAN's range names pick its networks; BoloGAN's batches (epochs without replacement)

def test_fastcalogan_range_names_pick_bologans_networks(tmp_path):
    """Without any XML range settings, FastCaloGAN's range name decides as BoloGAN's XML does for its
    CaloChallenge photons: Low12 -> ReLU + batch-norm (LeakyReLU(0) output, no batch-norm on it); High12 ->
    (Dense -> BN -> swish) x 3, Dense -> BN -> swish; calokit's 'high' keeps a ReLU output; pions All -> ReLU."""
    keras = train._keras()
    keras.utils.set_random_seed(0)

    def cfg_of(particle, rng_name, p_max):
        args = train.parse_args(["--data", "x.h5", "--out", "run"])
        attrs = {"particle": particle, "n_voxels": 26, "latent_dim": 50, "eta_min": 0.0, "eta_max": 5.0,
                 "range": rng_name, "p_max": p_max}
        return train.make_config(args, {"attrs": attrs, "voxels": np.zeros((4, 26), np.float32)}, {})

    low, high = cfg_of("photon", "Low12", 2.0**12), cfg_of("photon", "High12", 2.0**22)
    assert _sequence(train.networks_from_config(low)[0]) == [
        ("Dense", 50, "linear"), ("BatchNormalization",), ("LeakyReLU", 0.0),
        ("Dense", 100, "linear"), ("BatchNormalization",), ("LeakyReLU", 0.0),
        ("Dense", 200, "linear"), ("BatchNormalization",), ("LeakyReLU", 0.0),
        ("Dense", 26, "linear"), ("LeakyReLU", 0.0)]
    assert _sequence(train.networks_from_config(high)[0]) == [
        ("Dense", 50, "linear"), ("BatchNormalization",), ("Activation", "silu"),
        ("Dense", 100, "linear"), ("BatchNormalization",), ("Activation", "silu"),
        ("Dense", 200, "linear"), ("BatchNormalization",), ("Activation", "silu"),
        ("Dense", 26, "linear"), ("BatchNormalization",), ("Activation", "silu")]
    assert high["generator"]["output_batchnorm"] and "High12" in high["settings_source"]["output_activation"]
    calokit_high = cfg_of("photon", "high", 2.0**22)["generator"]
    assert (calokit_high["activation"], calokit_high["output_activation"]) == ("swish", "relu")
    pion = cfg_of("pion", "All", 2.0**22)["generator"]
    assert (pion["activation"], pion["batchnorm"], pion["output_activation"]) == ("relu", False, "relu")


def test_high12_training_keeps_batchnorm_statistics_frozen(tmp_path):
    """Two iterations of a High12 run: every batch-norm (hidden and output) still has moving mean 0 and
    variance 1 (inference mode, as BoloGAN trains), only gamma/beta moved; negative voxels are possible."""
    data = write_training_file(str(tmp_path / "train_High12.h5"), energies=(2.0**12, 2.0**16, 2.0**22),
                               n_per_energy=40, rng_name="High12")
    out = str(tmp_path / "run")
    assert _train(data, out, 2, 2, 1, "--batch-size", "16", "--batches", "epoch") == 0
    gen = plumbing.load_generator(out)
    bns = [layer for layer in gen.layers if type(layer).__name__ == "BatchNormalization"]
    assert len(bns) == 4
    moved = 0.0
    for bn in bns:
        gamma, beta, mean, var = bn.get_weights()
        assert not mean.any() and (var == 1).all()
        moved += np.abs(gamma - 1).sum() + np.abs(beta).sum()
    assert moved > 0
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["batches"] == "epoch" and cfg["generator"]["output_activation"] == "swish"
    with open(os.path.join(out, "ckpt_2", "state.json")) as f:
        assert json.load(f)["batches"] == {"size": 120, "epoch": 1, "pos": 40}     # 2 x 5 x 16 = 160 = 120 + 40


def test_epoch_batches_cover_every_event_once_per_epoch():
    """10 events, 2 critic steps x batch 3 = 6 per iteration: iterations 1-5 draw 30 = three whole passes, each a
    permutation of 0..9 and each pass shuffled anew; a sampler rebuilt from its state continues identically;
    a sequential pool draws only its own events, once each per pass."""
    cfg = {"batch_size": 3, "n_critic": 2, "latent_dim": 2, "noise": {"mean": 0.5, "std": 0.5}}
    rng = np.random.default_rng(0)
    s = train.EpochBatches(7)
    drawn = np.concatenate([train.draw_batches(rng, 10, cfg, None, s)[0].ravel() for _ in range(5)])
    passes = drawn.reshape(3, 10)
    for p in passes:
        assert sorted(p.tolist()) == list(range(10))
    assert not (passes[0] == passes[1]).all() and not (passes[1] == passes[2]).all()
    state = s.state()
    assert state == {"size": 10, "epoch": 2, "pos": 10}
    a = [s.take(6, 10).tolist() for _ in range(3)]
    b = [train.EpochBatches(7, json.loads(json.dumps(state))).take(18, 10).tolist()]
    assert sum(a, []) == b[0]
    pool = np.array([3, 5, 8, 9])
    p = train.EpochBatches(1)
    got = p.take(8, 10, pool)
    assert sorted(got[:4].tolist()) == [3, 5, 8, 9] and sorted(got[4:].tolist()) == [3, 5, 8, 9]
    # with replacement (the other option) repeats events within 10 draws of 10 for this seed
    idx = train.draw_batches(np.random.default_rng(0), 10, {**cfg, "n_critic": 1, "batch_size": 10})[0]
    assert len(set(idx.ravel().tolist())) < 10
