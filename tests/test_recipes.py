"""train.py --recipe: named settings, the critic that sees the energies, the decaying learning rate.

Each recipe writes what it is into config.json, a flag beats the recipe, the critic's fixed summary layer
computes (E_layer - mean) / std exactly, the cosine schedule has its analytic values, a killed calokit-recipe
run resumes exactly, and its generator exports to lwtnn JSON and ONNX equal to Keras.
"""
import math
import os
import shutil

import numpy as np
import pytest

import export_lwtnn
import plumbing
import train
from test_train import read_losses, write_training_file

ARGS = ("--batch-size", "16", "--seed", "7")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_training_file(str(tmp_path_factory.mktemp("data") / "train_photon_eta_20_25_all.h5"),
                               n_per_energy=60)


def _train(data, out, iterations, every, *extra):
    return train.main(["--data", data, "--out", str(out), "--iterations", str(iterations),
                       "--checkpoint-every", str(every), *ARGS, *extra])


def test_recipes_are_recorded_and_flags_win(tmp_path, data):
    assert _train(data, tmp_path / "fcg", 2, 2, "--no-jit") == 0
    cfg = plumbing.read_run_config(str(tmp_path / "fcg"))
    assert cfg["recipe"] == "fastcalogan" and cfg["recipe_description"] == train.RECIPES["fastcalogan"]["description"]
    assert (cfg["n_critic"], cfg["lr"], cfg["lr_decay"], cfg["critic"]["summaries"]) == (5, 1e-4, 1.0, None)
    assert (cfg["init"], cfg["generator"]["batchnorm"]) == ("he", True)       # FastCaloGAN's e/gamma network

    assert _train(data, tmp_path / "ck", 2, 2, "--no-jit", "--recipe", "calokit", "--n-critic", "3",
                  "--critic-summaries") == 0
    cfg = plumbing.read_run_config(str(tmp_path / "ck"))
    src = cfg["settings_source"]
    assert cfg["recipe"] == "calokit"
    assert (cfg["n_critic"], src["n_critic"]) == (3, "command line")
    assert (cfg["lr"], src["lr"]) == (2e-4, "recipe calokit")
    assert (cfg["lr_decay"], src["lr_decay"]) == (1.0, "default")
    g = cfg["generator"]
    assert (cfg["init"], src["init"], g["batchnorm"], g["activation"]) == ("glorot", "recipe calokit", True, "swish")
    summ = cfg["critic"]["summaries"]
    assert src["critic_summaries"] == "command line"
    # dataset-1 photons: the total and the 5 voxelised layers (8, 160, 190, 5, 5 voxels)
    assert summ["spans"] == [[0, 8], [8, 168], [168, 358], [358, 363], [363, 368]]
    assert len(summ["mean"]) == len(summ["std"]) == 6


def test_critic_summary_layer_is_standardised_layer_energies():
    """The critic's summaries equal numpy's (E_layer - mean) / std over the sample."""
    rng = np.random.default_rng(3)
    vox = rng.exponential(0.01, size=(200, 368)).astype(np.float32)
    spans = [[0, 8], [8, 168], [168, 358], [358, 363], [363, 368]]
    summ = train.summary_settings(vox, spans)
    critic = train.build_critic(368, 2, [16, 16, 16], summaries=summ)
    layer = critic.get_layer("summaries")
    assert not layer.trainable and len(critic.trainable_weights) == 8      # 4 Dense layers: kernels + biases
    keras = plumbing.import_keras()
    got = np.asarray(keras.Model(critic.inputs[0], layer.output)(vox))
    sums = np.stack([vox.sum(1)] + [vox[:, a:b].sum(1) for a, b in spans], axis=1).astype(np.float64)
    np.testing.assert_allclose(got, (sums - sums.mean(0)) / sums.std(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got.mean(0), 0, atol=2e-3)


def test_critic_etot_is_the_standardised_total_at_the_spread_asked(tmp_path, data):
    """--critic-etot 0.2: one summary, the sum of the voxels (E_tot / E_kin), (sum - mean) / std x 0.2; the layer
    energies only with --critic-summaries; a negative spread is refused."""
    assert _train(data, tmp_path / "et", 2, 2, "--no-jit", "--recipe", "calokit", "--critic-etot", "0.2") == 0
    summ = plumbing.read_run_config(str(tmp_path / "et"))["critic"]["summaries"]
    assert (summ["spans"], len(summ["mean"]), summ["spread"], summ["penalty"]) == ([], 1, 0.2, "independent")
    rng = np.random.default_rng(5)
    vox = rng.exponential(0.01, size=(300, 368)).astype(np.float32)
    summ = dict(train.summary_settings(vox, [], spread=0.2), penalty="independent")
    kernel, bias = train.summary_projection(368, summ)
    got = vox @ kernel + bias
    etot = vox.astype(np.float64).sum(1)
    np.testing.assert_allclose(got[:, 0], 0.2 * (etot - etot.mean()) / etot.std(), rtol=1e-3, atol=1e-4)
    assert got[:, 0].std() == pytest.approx(0.2, rel=1e-3)
    critic = train.build_critic(368, 2, [8, 8, 8], summaries=summ)     # the summary is an input of its own
    assert [t.shape[-1] for t in critic.inputs] == [368, 2, 1]
    assert critic.get_layer("concat").output.shape[-1] == 371
    assert _train(data, tmp_path / "both", 2, 2, "--no-jit", "--critic-etot", "0.5", "--critic-summaries") == 0
    summ = plumbing.read_run_config(str(tmp_path / "both"))["critic"]["summaries"]
    assert (len(summ["spans"]), summ["spread"]) == (5, 0.5)
    assert _train(data, tmp_path / "bad", 2, 2, "--critic-etot", "-1") == 2


def test_cosine_learning_rate_values():
    sched = train.learning_rate({"lr": 2e-4, "lr_decay": 0.1, "lr_decay_iterations": 1000})
    for step, want in ((0, 2e-4), (500, 2e-4 * (0.1 + 0.9 * 0.5)), (1000, 2e-5), (5000, 2e-5)):
        assert float(sched(step)) == pytest.approx(want, rel=1e-5)
    assert train.learning_rate({"lr": 1e-4, "lr_decay": 1.0, "lr_decay_iterations": 10}) == 1e-4
    assert train.main(["--data", "x.h5", "--out", "y", "--lr-decay", "0"]) == 2


def test_penalty_counts_the_independent_summary_as_a_coordinate():
    """With --critic-etot the gradient penalty is sqrt(|dD/dx|^2 + |dD/ds|^2) with s the summary fed as an input:
    for a critic that is linear in x and s (no hidden layer), the norm is |w_x| and |w_s| combined."""
    import tensorflow as tf

    rng = np.random.default_rng(2)
    vox = rng.exponential(0.01, size=(100, 6)).astype(np.float32)
    summ = dict(train.summary_settings(vox, [], spread=0.5), penalty="independent")
    critic = train.build_critic(6, 2, [], summaries=summ)                  # score = w . [x, c, s] + b
    w = np.asarray(critic.get_layer("score").kernel)[:, 0]
    kernel, bias = train.summary_projection(6, summ)
    x = tf.constant(vox[:4])
    s = tf.matmul(x, kernel) + bias
    with tf.GradientTape() as tape:
        tape.watch([x, s])
        d = critic([x, tf.zeros((4, 2)), s])
    gx, gs = tape.gradient(d, [x, s])
    norm = np.sqrt((np.asarray(gx) ** 2).sum(1) + (np.asarray(gs) ** 2).sum(1))
    np.testing.assert_allclose(norm, np.sqrt((w[:6] ** 2).sum() + w[8] ** 2), rtol=1e-5)


def test_soft_counts_have_their_analytic_values():
    """A voxel at the threshold counts 1/2, an empty one sigmoid(-2), one at 3x the threshold sigmoid(4); each
    layer averages its own voxels; voxel / E_kin is turned back into MeV with each event's E_kin."""
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    sp = {"spans": [[0, 1], [1, 4]], "threshold_mev": 1.0, "width_mev": 0.5}
    vox = np.array([[0.1, 0.0, 0.3, 1.0], [0.0, 0.05, 0.05, 0.05]])    # voxel / E_kin
    got = train.soft_counts(vox, np.array([10.0, 20.0]), sp)           # MeV: [1, 0, 3, 10] and [0, 1, 1, 1]
    want = [[0.5, (sig(-2) + sig(4) + sig(18)) / 3], [sig(-2), 0.5]]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    s = train.sparsity_settings(vox, np.array([10.0, 20.0]), sp["spans"], spread=0.3)
    np.testing.assert_allclose(s["mean"], np.mean(want, 0), rtol=1e-12)
    np.testing.assert_allclose(s["std"], np.std(want, 0), rtol=1e-12)
    assert (s["threshold_mev"], s["width_mev"], s["spread"]) == (1.0, 0.5, 0.3)


def test_critic_sparsity_input_is_the_standardised_soft_count_in_the_backend(tmp_path, data):
    """--critic-sparsity 0.2: config.json keeps one count per voxelised layer with the training sample's mean and
    std; the training step's input (computed by the backend, keras.ops here) is 0.2 x (counts - mean) / std of
    numpy's counts, beside E_tot; the critic takes it as an input of its own; the layer representation and a
    negative spread are refused."""
    keras = plumbing.import_keras()
    assert _train(data, tmp_path / "sp", 2, 2, "--no-jit", "--recipe", "calokit-etot", "--critic-sparsity",
                  "0.2") == 0
    cfg = plumbing.read_run_config(str(tmp_path / "sp"))
    sp = cfg["critic"]["sparsity"]
    assert sp["spans"] == [[0, 8], [8, 168], [168, 358], [358, 363], [363, 368]] and sp["spread"] == 0.2
    assert cfg["settings_source"]["critic_threshold"].startswith("default (1 MeV")
    rng = np.random.default_rng(4)
    vox = (rng.exponential(1e-3, size=(64, 368)) * (rng.random((64, 368)) < 0.4)).astype(np.float32)
    ekin = np.exp(rng.uniform(np.log(300.0), np.log(3e6), size=64))
    extra = train._critic_extra(cfg, keras.ops.matmul, keras.ops.sigmoid, keras.ops.convert_to_tensor)
    got = [np.asarray(t) for t in extra(keras.ops.convert_to_tensor(vox),
                                        keras.ops.convert_to_tensor(ekin[:, None].astype(np.float32)))]
    assert [t.shape for t in got] == [(64, 1), (64, 5)]
    want = 0.2 * (train.soft_counts(vox, ekin, sp) - sp["mean"]) / np.asarray(sp["std"])
    np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=2e-5)
    critic = train.networks_from_config(cfg)[1]
    assert [t.shape[-1] for t in critic.inputs] == [368, 2, 1, 5]
    assert _train(data, tmp_path / "neg", 2, 2, "--critic-sparsity", "-0.1") == 2
    layer_file = with_layer_representation(data, str(tmp_path / "layer.h5"))
    assert _train(layer_file, tmp_path / "lay", 2, 2, "--critic-sparsity", "0.2") == 2


def test_leaky_gradient_relu_values_and_slopes():
    """Its values are the ReLU's; its gradient is 1 above zero and the slope at or below it (backend autodiff)."""
    keras = plumbing.import_keras()
    ops = keras.ops
    x = np.array([-2.0, -0.5, 0.5, 3.0], dtype=np.float32)
    f = lambda v: train.leaky_gradient_relu(v, 0.1, ops.minimum, ops.relu, ops.stop_gradient)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(f(ops.convert_to_tensor(x))), [0.0, 0.0, 0.5, 3.0])
    if train._backend() == "jax":
        import jax
        grad = jax.grad(lambda v: f(v).sum())(x)
    else:
        import tensorflow as tf
        v = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = tf.reduce_sum(f(v))
        grad = tape.gradient(y, v)
    np.testing.assert_allclose(np.asarray(grad), [0.1, 0.1, 1.0, 1.0], rtol=1e-6)


def test_relu_gradient_leak_revives_a_dead_voxel(tmp_path, data):
    """A voxel whose output ReLU is shut for every input (bias -1000) gets no update without the leak and one with
    it; the network, its outputs and config.json's generator block are the plain ReLU's either way; a generator
    without an output ReLU of its own is refused."""
    assert _train(data, tmp_path / "lk", 2, 2, "--no-jit", "--recipe", "calokit-etot", "--relu-gradient-leak",
                  "0.1") == 0
    cfg = plumbing.read_run_config(str(tmp_path / "lk"))
    assert cfg["relu_gradient_leak"] == 0.1 and cfg["generator"]["output_activation"] == "relu"
    keras = plumbing.import_keras()
    d = train.load_training_file(data)
    moved = {}
    for leak in (0.0, 0.1):
        c = dict(cfg, relu_gradient_leak=leak)
        keras.utils.set_random_seed(1)
        gen, critic = train.networks_from_config(c)
        dense = gen.get_layer("dense_out")
        w, b = dense.get_weights()
        b[5] = -1e3
        dense.set_weights([w, b])
        step = train.make_train_step(gen, critic, train.make_optimizer(c), train.make_optimizer(c, c["n_critic"]), c,
                                     d["voxels"], plumbing.condition_vector(d["label"]), jit=False,
                                     ekin=plumbing.kinetic_energy(d["einc"], "photon"))
        rng = np.random.default_rng(0)
        for _ in range(2):
            step(*train.draw_batches(rng, len(d["voxels"]), c))
        step.sync()
        moved[leak] = np.abs(dense.get_weights()[0] - w).max(axis=0)
        z = np.full((4, c["latent_dim"]), 0.5, dtype=np.float32)
        out = np.asarray(gen([z, plumbing.condition_vector(d["label"][:4])]))
        assert (out[:, 5] == 0).all() and (out >= 0).all()
        pre = np.asarray(train.output_preactivation(gen)([z, plumbing.condition_vector(d["label"][:4])]))
        np.testing.assert_array_equal(out, np.maximum(pre, 0))
    assert moved[0.0][5] == 0 and moved[0.1][5] > 0
    assert (moved[0.0][6:] > 0).any()                  # the other voxels learn in both
    assert _train(data, tmp_path / "swish", 2, 2, "--output-activation", "swish", "--relu-gradient-leak", "0.1") == 2


def test_decay_and_summaries_resume_exactly(tmp_path, data):
    """A killed run with the decaying rate (its schedule is in the optimiser state), the critic's summaries
    (layer energies and E_tot, as independent inputs) and its sparsity counts continues exactly."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    flags = ("--recipe", "calokit", "--lr-decay", "0.1", "--critic-summaries", "--critic-etot", "0.2",
             "--critic-sparsity", "0.2", "--keep-resume", "2", "--no-jit")
    assert _train(data, ref, 8, 4, *flags) == 0
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "ckpt_8")          # as if killed after the first checkpoint
    assert _train(data, cut, 8, 4, *flags, "--resume") == 0
    np.testing.assert_array_equal(read_losses(str(cut)), read_losses(str(ref)))


def with_layer_representation(src, dst):
    """A copy of the training file ``src`` with the layer representation added, as prepare --norm layer adds it."""
    import h5py

    shutil.copy(src, dst)
    spans = [(0, 8), (8, 168), (168, 358), (358, 363), (363, 368)]
    with h5py.File(dst, "a") as f:
        rep = plumbing.to_layer_representation(f["voxels"][:], spans, f["e_kin"][:])
        f.create_dataset("representation", data=rep.astype(np.float32))
        f.attrs.update(norm="layer", layer_spans=np.asarray(spans), layer_fill_mev=1e-4, n_features=rep.shape[1])
    return str(dst)


@pytest.mark.parametrize("recipe", sorted(train.RECIPES))
def test_every_recipe_exports_equal_to_keras(tmp_path, data, recipe):
    """Every recipe's generator exports equal to Keras; one that learns the layer representation (whose voxels are
    products of its heads, which lwtnn's JSON cannot compute) as the ONNX model alone."""
    run, out = tmp_path / "run", tmp_path / "lwtnn"
    layer = train.RECIPES[recipe].get("norm") == "layer"
    if layer:
        data = with_layer_representation(data, tmp_path / "train_layer.h5")
    assert _train(data, run, 2, 2, "--no-jit", "--recipe", recipe) == 0
    # --check: the lwtnn JSON (numpy evaluator) and the ONNX model (ONNX Runtime) against Keras, within 1e-5
    assert export_lwtnn.main(["--run", str(run), "--out", str(out), "--format", "both", "--check",
                              "--tolerance", "1e-5"]) == 0
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == [
        f"neural_net_22_eta_20_25_all.{ext}" for ext in (("meta.json", "onnx") if layer else ("json", "meta.json", "onnx"))]


def test_init_glorot_draws_glorot_uniform_kernels():
    """--init glorot: kernels uniform in +-sqrt(6 / (fan_in + fan_out)); FastCaloGAN's he: +-sqrt(6 / fan_in)."""
    for init, limit in (("glorot", math.sqrt(6 / (52 + 50))), ("he", math.sqrt(6 / 52))):
        gen = train.build_generator(368, 50, 2, [50, 100, 200], "relu", False, init=init)
        w = np.asarray(gen.get_layer("dense_0").kernel)
        assert w.shape == (52, 50) and np.abs(w).max() <= limit and np.abs(w).max() > 0.97 * limit
