"""export_lwtnn.py: the lwtnn graph JSON reproduces the Keras generator, and is what lwtnn's parser accepts.

Generators are built directly with Keras (functional: noise + condition -> Concatenate -> Dense ->
[BatchNormalization] -> activation ... -> Dense -> output activation), batch-norm layers get random,
non-trivial moving statistics, and the numpy evaluation of the exported JSON (lwtnn's definitions) must equal
Keras' output on 1,000 random (noise, label) inputs within 1e-5. A structural validator written here from
lwtnn's graph parser (parse_json_graph, Graph, Stack) checks every JSON. An independent C++ evaluator
(tests/lwtnn_cpp/lwtnn_eval.cpp) is compiled with g++ and must agree too.
"""
import json
import math
import os
import shutil
import subprocess

import sys
import tempfile

import keras
import numpy as np
import pytest

import export_lwtnn as ex
from HighLevelFeatures import read_geometry

layers = keras.layers

LATENT, N_VOX, N_INPUTS, TOL = 50, 30, 1000, 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# generators built directly with Keras

def _activation_layer(kind):
    if kind == "leaky0":
        return layers.LeakyReLU(negative_slope=0.0)
    if kind == "leaky0.2":
        return layers.LeakyReLU(negative_slope=0.2)
    if kind == "elu0.7":
        return layers.ELU(alpha=0.7)
    return layers.Activation(kind)


def make_generator(hidden_act="relu", batchnorm=False, out_act="relu", n_vox=N_VOX, latent=LATENT,
                   hidden=(50, 100, 200), seed=0):
    """A FastCaloGAN-like generator with random weights and (if batchnorm) random moving statistics.

    ``out_act`` "bn+<act>" puts a batch-norm between the output Dense and its activation (FastCaloGAN's
    swish + BN generator: Dense(N_vox) -> BN -> swish).
    """
    keras.utils.set_random_seed(seed)
    noise = keras.Input((latent,), name="noise")
    cond = keras.Input((2,), name="condition")
    x = layers.Concatenate()([noise, cond])
    for h in hidden:
        x = layers.Dense(h)(x)
        if batchnorm:
            x = layers.BatchNormalization()(x)
        x = _activation_layer(hidden_act)(x)
    x = layers.Dense(n_vox)(x)
    if out_act.startswith("bn+"):
        x = layers.BatchNormalization()(x)
    x = _activation_layer(out_act.removeprefix("bn+"))(x)
    model = keras.Model([noise, cond], x)
    set_random_bn_statistics(model, seed)
    return model


def set_random_bn_statistics(model, seed):
    """gamma, beta, moving mean and variance far from their (1, 0, 0, 1) defaults."""
    rng = np.random.default_rng(seed + 1000)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0.0, 0.3, n),
                               rng.normal(0.0, 0.5, n), rng.uniform(0.3, 2.0, n)])


def keras_and_json(model, graph, n=N_INPUTS, seed=7):
    noise, cond = ex.random_inputs(LATENT if model.inputs[0].shape[1] == LATENT else model.inputs[0].shape[1],
                                   n, seed)
    noise, cond = noise.astype(np.float32), cond.astype(np.float32)
    return ex.keras_predict(model, noise, cond), ex.evaluate_graph(graph, noise, cond), (noise, cond)


# ----------------------------------------------------------------------------------------------
# what lwtnn's graph parser and graph builder demand (written from parse_json.cxx, Graph.tcc, Stack.tcc)

LWTNN_NODE_TYPES = {"input", "input_sequence", "feed_forward", "concatenate", "sequence", "time_distributed",
                    "sum", "add"}
LWTNN_PLAIN_ACTIVATIONS = {"linear", "sigmoid", "rectified", "softmax", "tanh", "hard_sigmoid", "elu", "abs"}
LWTNN_OBJECT_ACTIVATIONS = LWTNN_PLAIN_ACTIVATIONS | {"leakyrelu", "swish"}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_lwtnn_graph(graph):
    """List of problems lwtnn would have with this graph (empty = accepted and evaluable)."""
    errs = []
    for key in ("inputs", "input_sequences", "nodes", "layers", "outputs"):
        if key not in graph:
            errs.append(f"missing top-level key {key}")
    if errs:
        return errs
    if graph["input_sequences"] != []:
        errs.append("input_sequences must be [] for a feed-forward generator")
    for inp in graph["inputs"]:
        if not isinstance(inp.get("name"), str) or not isinstance(inp.get("variables"), list):
            errs.append(f"input node without name/variables: {inp}")
            continue
        for var in inp["variables"]:
            if not isinstance(var.get("name"), str) or not _is_number(var.get("offset")) \
                    or not _is_number(var.get("scale")):
                errs.append(f"input {inp['name']}: variable needs name, offset, scale: {var}")
        if len({v.get("name") for v in inp["variables"]}) != len(inp["variables"]):
            errs.append(f"input {inp['name']}: duplicate variable names")
    nodes, lays, sizes = graph["nodes"], graph["layers"], []
    for i, node in enumerate(nodes):
        kind, src = node.get("type"), node.get("sources")
        size = None
        if kind not in LWTNN_NODE_TYPES or not isinstance(src, list):
            errs.append(f"node {i}: bad type {kind!r} or no sources list")
        elif any(not isinstance(s, int) or s < 0 for s in src):
            errs.append(f"node {i}: sources must be non-negative integers")
        elif kind == "input":
            if len(src) != 1 or not src[0] < len(graph["inputs"]):
                errs.append(f"node {i}: input node needs one source indexing inputs")
            elif node.get("size") != len(graph["inputs"][src[0]]["variables"]):
                errs.append(f"node {i}: size {node.get('size')} != number of variables")
            else:
                size = node["size"]
        elif any(s >= i for s in src):
            errs.append(f"node {i}: sources {src} not built before it (or out of range)")
        elif kind == "concatenate":
            if not src or any(sizes[s] is None for s in src):
                errs.append(f"node {i}: concatenate needs valid sources")
            else:
                size = sum(sizes[s] for s in src)
        elif kind == "feed_forward":
            li = node.get("layer_index")
            if len(src) != 1 or not isinstance(li, int) or not 0 <= li < len(lays):
                errs.append(f"node {i}: feed_forward needs one source and a layer_index in range")
            elif sizes[src[0]] is not None:
                size = _check_layer(lays[li], sizes[src[0]], f"node {i} layer {li}", errs)
        else:
            errs.append(f"node {i}: type {kind} not expected in a generator graph")
        sizes.append(size)
    if not isinstance(graph["outputs"], dict) or not graph["outputs"]:
        errs.append("outputs must be a non-empty object")
        return errs
    for name, out in graph["outputs"].items():
        idx = out.get("node_index")
        if not isinstance(idx, int) or not 0 <= idx < len(nodes):
            errs.append(f"output {name}: node_index {idx} out of range")
        elif not isinstance(out.get("labels"), list) or len(out["labels"]) != sizes[idx]:
            errs.append(f"output {name}: {len(out.get('labels', []))} labels for node size {sizes[idx]}")
    return errs


def _check_layer(layer, n_in, where, errs):
    arch, w, b = layer.get("architecture"), layer.get("weights"), layer.get("bias")
    if not isinstance(w, list) or not isinstance(b, list) or not all(map(_is_number, w + b)):
        errs.append(f"{where}: weights/bias must be lists of finite numbers")
        return None
    if arch == "normalization":
        if len(w) != n_in or len(b) != n_in:
            errs.append(f"{where}: normalization needs {n_in} weights and biases, has {len(w)}/{len(b)}")
        return n_in
    if arch != "dense":
        errs.append(f"{where}: architecture {arch!r} not expected")
        return None
    act = layer.get("activation")
    if act is None:
        errs.append(f"{where}: dense layer without activation")
    elif isinstance(act, dict):
        if act.get("function") not in LWTNN_OBJECT_ACTIVATIONS or not _is_number(act.get("alpha")):
            errs.append(f"{where}: activation object needs a known function and a numeric alpha: {act}")
    elif act not in LWTNN_PLAIN_ACTIVATIONS:
        errs.append(f"{where}: activation {act!r} unknown or (swish/leakyrelu) without alpha")
    n_out = len(w) // n_in if w else n_in
    if w and len(w) != n_out * n_in:
        errs.append(f"{where}: {len(w)} weights is not n_out x {n_in}")
    if b and len(b) != n_out:
        errs.append(f"{where}: {len(b)} biases for {n_out} outputs")
    if w and not b:
        errs.append(f"{where}: weights without bias")
    return n_out


# ----------------------------------------------------------------------------------------------
# the numpy evaluator follows lwtnn's definitions

def _one_layer_graph(n_in, layer, offsets=None, scales=None):
    var = [{"name": f"variable_{j}", "offset": (offsets or [0.0] * n_in)[j], "scale": (scales or [1.0] * n_in)[j]}
           for j in range(n_in)]
    n_out = len(layer["bias"]) if layer["bias"] else n_in
    return {"inputs": [{"name": "x", "variables": var}], "input_sequences": [],
            "nodes": [{"type": "input", "sources": [0], "size": n_in},
                      {"type": "feed_forward", "sources": [0], "layer_index": 0}],
            "layers": [layer], "outputs": {"y": {"node_index": 1, "labels": [f"out_{j}" for j in range(n_out)]}}}


def test_evaluator_dense_offsets_and_scales_by_hand():
    # y = W ((x + offset) * scale) + b, W row-major 2 x 3
    layer = {"architecture": "dense", "weights": [1, 2, 3, 4, 5, 6], "bias": [0.5, -1], "activation": "linear"}
    g = _one_layer_graph(3, layer, offsets=[1, 0, -1], scales=[2, 1, 0.5])
    y = ex.evaluate_graph_inputs(g, {"x": np.array([[1.0, 2.0, 3.0]])})
    # scaled input = (4, 2, 1): rows 1*4+2*2+3*1 + 0.5 = 11.5 and 4*4+5*2+6*1 - 1 = 31
    np.testing.assert_array_equal(y, [[11.5, 31.0]])
    assert validate_lwtnn_graph(g) == []


def test_evaluator_activations_match_lwtnn_definitions():
    x = np.array([[-31.0, -30.0, -2.0, 0.0, 1.5, 29.0, 31.0]])

    def act(a):
        layer = {"architecture": "dense", "weights": [], "bias": [], "activation": a}
        return ex.evaluate_graph_inputs(_one_layer_graph(7, layer), {"x": x})[0]

    sig = act("sigmoid")
    assert sig[0] == 0.0 and sig[-1] == 1.0                      # clipped exactly beyond |x| > 30
    assert 0.0 < sig[1] < 1e-13 and sig[5] < 1.0                 # not clipped at |x| <= 30
    assert sig[3] == 0.5
    np.testing.assert_allclose(act({"function": "swish", "alpha": 2.0}),
                               x[0] * np.where(2 * x[0] > 30, 1.0, np.where(2 * x[0] < -30, 0.0,
                                                                            1 / (1 + np.exp(-2 * x[0])))))
    assert act({"function": "swish", "alpha": 1.0})[0] == 0.0   # x * sigmoid(-31) = -31 * 0 exactly
    np.testing.assert_array_equal(act({"function": "leakyrelu", "alpha": 0.1}), np.where(x[0] > 0, x[0], 0.1 * x[0]))
    np.testing.assert_array_equal(act("rectified"), np.maximum(x[0], 0.0))
    np.testing.assert_allclose(act({"function": "elu", "alpha": 0.5}), np.where(x[0] >= 0, x[0], 0.5 * np.expm1(x[0])))
    np.testing.assert_allclose(act("elu"), np.where(x[0] >= 0, x[0], np.expm1(x[0])))   # plain "elu": alpha 1
    sm = act("softmax")
    assert abs(sm.sum() - 1.0) < 1e-12 and np.all(np.diff(sm) > 0)
    assert np.isnan(act("swish")).all()                          # lwtnn: plain-string swish has alpha NaN
    assert np.isnan(act("leakyrelu")[:4]).all()                   # ... and so has leakyrelu for x <= 0
    with pytest.raises(ValueError):
        act("gelu")


def test_evaluator_normalization_layer_by_hand():
    layer = {"architecture": "normalization", "weights": [2.0, 0.5], "bias": [1.0, -4.0]}
    y = ex.evaluate_graph_inputs(_one_layer_graph(2, layer), {"x": np.array([[1.0, 2.0]])})
    np.testing.assert_array_equal(y, [[4.0, -1.0]])              # W * (x + b)


def test_validator_rejects_what_lwtnn_rejects():
    good = _one_layer_graph(2, {"architecture": "dense", "weights": [1, 0, 0, 1], "bias": [0, 0],
                                "activation": {"function": "swish", "alpha": 1.0}})
    assert validate_lwtnn_graph(good) == []
    for mutate in (lambda g: g.pop("input_sequences"),
                   lambda g: g["layers"][0].pop("activation"),
                   lambda g: g["layers"][0].update(activation="swish"),
                   lambda g: g["layers"][0].update(activation={"function": "leakyrelu"}),
                   lambda g: g["layers"][0].update(weights=[1, 0, 0]),
                   lambda g: g["layers"][0].update(bias=[0]),
                   lambda g: g["nodes"][1].update(layer_index=1),
                   lambda g: g["nodes"][1].update(sources=[3]),
                   lambda g: g["inputs"][0]["variables"][0].pop("scale"),
                   lambda g: g["outputs"]["y"].update(node_index=2),
                   lambda g: g["outputs"]["y"].update(labels=["out_0"])):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        assert validate_lwtnn_graph(bad), f"validator accepted a broken graph: {bad}"


# ----------------------------------------------------------------------------------------------
# each generator variant: JSON == Keras within 1e-5 on 1,000 random inputs

VARIANTS = [
    # (hidden activation, batchnorm, output activation)
    ("relu", False, "relu"),
    ("leaky0", True, "relu"),          # FastCaloGAN e/gamma: BN + LeakyReLU(0)
    ("leaky0.2", True, "relu"),
    ("swish", True, "relu"),           # BN + swish
    ("swish", False, "sigmoid"),
    ("relu", True, "tanh"),
    ("elu0.7", False, "elu"),
    ("swish", True, "linear"),
    ("relu", False, "softmax"),
    ("swish", True, "bn+swish"),      # FastCaloGAN swish + BN: Dense(N_vox) -> BN -> swish at the output too
]


@pytest.mark.parametrize("hidden_act,batchnorm,out_act", VARIANTS)
def test_json_reproduces_keras(hidden_act, batchnorm, out_act):
    model = make_generator(hidden_act, batchnorm, out_act, seed=len(hidden_act) + 3 * batchnorm)
    modes = (True, False) if batchnorm else (True,)
    for fold in modes:
        graph = ex.export_model(model, fold=fold)
        assert validate_lwtnn_graph(graph) == []
        graph = json.loads(ex._format_json(graph))               # exactly what is written to disk
        ref, got, _ = keras_and_json(model, graph)
        assert ref.shape == got.shape == (N_INPUTS, N_VOX)
        assert np.std(ref) > 1e-3                                 # a non-degenerate comparison
        assert np.max(np.abs(got - ref)) < TOL, (hidden_act, batchnorm, out_act, fold)
        n_norm = sum(layer["architecture"] == "normalization" for layer in graph["layers"])
        assert n_norm == (0 if fold else 3 * batchnorm + out_act.startswith("bn+"))
        # parametrised activations are always written as objects with alpha
        for layer in graph["layers"]:
            act = layer.get("activation")
            if layer["architecture"] == "normalization":
                assert act is None
            elif isinstance(act, dict):
                assert act["function"] in ("swish", "leakyrelu", "elu") and isinstance(act["alpha"], float)
            else:
                assert act in ("linear", "rectified", "sigmoid", "tanh", "softmax")
    if out_act == "bn+swish":
        assert graph["layers"][-1]["activation"] == {"function": "swish", "alpha": 1.0}


def test_graph_structure_of_the_fastcalogan_layout():
    graph = ex.export_model(make_generator("swish", True, "relu"))
    assert [i["name"] for i in graph["inputs"]] == ["node_0", "node_1"]
    assert [v["name"] for v in graph["inputs"][0]["variables"]] == [f"variable_{j}" for j in range(LATENT)]
    assert [v["name"] for v in graph["inputs"][1]["variables"]] == ["variable_0", "variable_1"]
    assert all(v["offset"] == 0 and v["scale"] == 1 for i in graph["inputs"] for v in i["variables"])
    nodes = graph["nodes"]
    assert nodes[0] == {"type": "input", "sources": [0], "size": LATENT}
    assert nodes[1] == {"type": "input", "sources": [1], "size": 2}
    assert nodes[2] == {"type": "concatenate", "sources": [0, 1]}
    assert [n["type"] for n in nodes[3:]] == ["feed_forward"] * 4   # BN and activations folded/merged
    assert [len(layer["bias"]) for layer in graph["layers"]] == [50, 100, 200, N_VOX]
    assert [len(layer["weights"]) for layer in graph["layers"]] == [52 * 50, 50 * 100, 100 * 200, 200 * N_VOX]
    assert [layer["activation"] for layer in graph["layers"]] == [{"function": "swish", "alpha": 1.0}] * 3 + ["rectified"]
    (name, out), = graph["outputs"].items()
    assert out == {"node_index": len(nodes) - 1, "labels": [f"out_{j}" for j in range(N_VOX)]}


def test_leakyrelu_zero_is_an_object_with_alpha_zero():
    graph = ex.export_model(make_generator("leaky0", True, "relu"))
    assert graph["layers"][0]["activation"] == {"function": "leakyrelu", "alpha": 0.0}


# ----------------------------------------------------------------------------------------------
# batch-norm folding against the formulas, with non-trivial moving statistics

def _dense_bn_model(eps=1e-3, seed=3):
    keras.utils.set_random_seed(seed)
    noise = keras.Input((4,), name="noise")
    cond = keras.Input((2,), name="condition")
    x = layers.Concatenate()([noise, cond])
    x = layers.Dense(3, name="d")(x)
    x = layers.BatchNormalization(epsilon=eps, name="bn")(x)
    x = layers.Activation("swish", name="act")(x)
    model = keras.Model([noise, cond], x)
    rng = np.random.default_rng(seed)
    stats = [rng.uniform(0.5, 2.0, 3), rng.normal(0, 1, 3), rng.normal(0, 1, 3), rng.uniform(0.1, 3.0, 3)]
    model.get_layer("bn").set_weights(stats)
    kernel, bias = model.get_layer("d").get_weights()
    model.get_layer("d").set_weights([kernel, rng.normal(0, 1, 3).astype(np.float32)])
    return model, [np.asarray(v, np.float64) for v in model.get_layer("d").get_weights()], \
        [np.asarray(v, np.float64) for v in model.get_layer("bn").get_weights()], eps


def test_batchnorm_folded_into_dense_by_the_formula():
    model, (kernel, bias), (gamma, beta, mean, var), eps = _dense_bn_model()
    graph = ex.export_model(model, fold=True)
    s = np.sqrt(var + eps)
    (layer,) = graph["layers"]
    w_expect = (kernel.T * (gamma / s)[:, None]).ravel()           # diag(gamma/s) W, W = kernel^T
    b_expect = (bias - mean) * gamma / s + beta
    np.testing.assert_allclose(layer["weights"], w_expect, rtol=1e-12)
    np.testing.assert_allclose(layer["bias"], b_expect, rtol=1e-12, atol=1e-14)
    assert layer["activation"] == {"function": "swish", "alpha": 1.0}
    assert np.max(np.abs(w_expect - kernel.T.ravel())) > 0.05       # the statistics do matter
    ref, got, _ = keras_and_json(model, graph, n=200)
    assert np.max(np.abs(got - ref)) < TOL


def test_batchnorm_as_normalization_layer_by_the_formula():
    model, (kernel, bias), (gamma, beta, mean, var), eps = _dense_bn_model()
    graph = ex.export_model(model, fold=False)
    s = np.sqrt(var + eps)
    dense, norm, act = graph["layers"]
    np.testing.assert_array_equal(dense["weights"], kernel.T.ravel())   # kernel transposed, row-major
    np.testing.assert_array_equal(dense["bias"], bias)
    assert dense["activation"] == "linear"
    assert norm["architecture"] == "normalization" and "activation" not in norm
    np.testing.assert_allclose(norm["weights"], gamma / s, rtol=1e-12)
    np.testing.assert_allclose(norm["bias"], -mean + beta * s / gamma, rtol=1e-12)
    assert act == {"architecture": "dense", "weights": [], "bias": [],
                   "activation": {"function": "swish", "alpha": 1.0}}   # own layer after normalization
    assert validate_lwtnn_graph(graph) == []
    ref, got, _ = keras_and_json(model, graph, n=200)
    assert np.max(np.abs(got - ref)) < TOL


def test_batchnorm_without_scale_and_center_and_with_zero_gamma():
    keras.utils.set_random_seed(5)
    noise = keras.Input((LATENT,), name="noise")
    cond = keras.Input((2,), name="condition")
    x = layers.Concatenate()([noise, cond])
    x = layers.Dense(20, activation="relu")(x)                       # activation inside Dense: BN not foldable
    x = layers.BatchNormalization(center=False, scale=False, name="bn_plain")(x)
    x = layers.Dense(10)(x)
    x = layers.BatchNormalization(name="bn_zero")(x)
    x = layers.Activation("sigmoid")(x)
    model = keras.Model([noise, cond], x)
    rng = np.random.default_rng(5)
    model.get_layer("bn_plain").set_weights([rng.normal(0, 0.5, 20), rng.uniform(0.5, 2, 20)])
    gamma = rng.uniform(0.5, 1.5, 10)
    gamma[3] = 0.0                                                   # a dead channel
    model.get_layer("bn_zero").set_weights([gamma, rng.normal(0, 1, 10), rng.normal(0, 1, 10), rng.uniform(0.5, 2, 10)])
    for fold in (True, False):
        graph = ex.export_model(model, fold=fold)
        assert validate_lwtnn_graph(graph) == []
        ref, got, _ = keras_and_json(model, graph, n=300)
        assert np.max(np.abs(got - ref)) < TOL


# ----------------------------------------------------------------------------------------------
# the command line on a fake run directory

#: a 30-voxel slice (one layer, 5 r x 6 alpha bins) matching the test networks' output, for the meta JSON's layout
BINNING_30 = os.path.join(tempfile.mkdtemp(prefix="calokit-binning-"), "binning_30.xml")
with open(BINNING_30, "w") as _fh:
    _fh.write('<Bins><Bin pid="22" name="photon" etaMin="20" etaMax="25">'
              '<Layer id="0" r_edges="0,5,10,20,50,100" n_bin_alpha="6"/><Layer id="1" r_edges="0"/></Bin></Bins>')
CONFIG = {
    "particle": "photon", "pid": 22, "eta_min": 20.0, "eta_max": 25.0, "range": "high",
    "binning": BINNING_30, "label_scheme": "V2", "max_exp": 22,
    "p_min": 4096.0, "p_max": 4194304.0, "ekin_min": 4096.0, "ekin_max": 4194304.0, "latent_dim": LATENT,
    "n_voxels": N_VOX, "source": "voxels.h5", "train_data": "train.h5", "seed": 1, "iterations": 300,
    "checkpoint_every": 100, "batch_size": 128, "n_critic": 5, "lambda_gp": 10, "lr": 1e-4, "beta1": 0.55,
    "beta2": 0.999, "generator": {"hidden": [50, 100, 200], "activation": "swish", "batchnorm": True,
                                  "output_activation": "relu"},
    "critic": {"hidden": [N_VOX] * 3, "activation": "relu"}, "excluded_energies": [],
    "noise": {"mean": 0.5, "std": 0.5}, "normalisation": "voxels / E_kin", "backend": "tensorflow",
}
STEM = "neural_net_22_eta_20_25_high"


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """config.json + ckpt_100, ckpt_200 (different weights), an incomplete ckpt_300 and a temp dir."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(CONFIG))
    models = {}
    for it, seed in ((100, 11), (200, 12)):
        (run / f"ckpt_{it}").mkdir()
        models[it] = make_generator("swish", True, "relu", seed=seed)
        models[it].save(str(run / f"ckpt_{it}" / "generator.keras"))
    (run / "ckpt_300").mkdir()                                       # no generator.keras: incomplete
    (run / ".tmp-ckpt_400-abc").mkdir()
    return run, models


def _exported(out):
    graph = json.loads((out / f"{STEM}.json").read_text())
    meta = json.loads((out / f"{STEM}.meta.json").read_text())
    return graph, meta


def _same_as(graph, model):
    ref, got, _ = keras_and_json(model, graph, n=200)
    return np.max(np.abs(got - ref)) < TOL


def test_cli_default_is_last_complete_checkpoint(fake_run, tmp_path, capsys):
    run, models = fake_run
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--out", str(out), "--check"]) == 0
    assert STEM in capsys.readouterr().out
    graph, meta = _exported(out)
    assert validate_lwtnn_graph(graph) == []
    assert meta["iteration"] == 200 and _same_as(graph, models[200]) and not _same_as(graph, models[100])
    assert meta["check"]["max_diff"] < TOL and meta["check"]["events"] == 1000
    for key, value in (("latent_dim", LATENT), ("n_voxels", N_VOX), ("label_scheme", "V2"), ("ekin_min", 4096.0),
                       ("ekin_max", 4194304.0), ("particle", "photon"), ("pid", 22), ("range", "high"),
                       ("binning", CONFIG["binning"]), ("normalisation", "voxels / E_kin"), ("network", f"{STEM}.json"),
                       ("batchnorm", "fold")):
        assert meta[key] == value, key
    assert "slice" in meta and "inverse" in meta["label"]
    assert sorted(os.listdir(out)) == [f"{STEM}.json", f"{STEM}.meta.json", f"{STEM}.onnx"]   # no temp files left


def test_cli_iteration_best_and_checkpoint(fake_run, tmp_path):
    run, models = fake_run
    out = tmp_path / "it"
    assert ex.main(["--run", str(run), "--iteration", "100", "--out", str(out)]) == 0
    graph, meta = _exported(out)
    assert meta["iteration"] == 100 and "check" not in meta and _same_as(graph, models[100])

    best = tmp_path / "select" / "best.json"
    best.parent.mkdir()
    best.write_text(json.dumps({"run": str(run), "best_iteration": 100, "checkpoint": str(run / "ckpt_100"),
                                "chi2_ndf": 1.2, "per_energy": {}, "excluded": {}}))
    out = tmp_path / "best"
    assert ex.main(["--run", str(run), "--best", str(best), "--out", str(out), "--batchnorm", "normalization"]) == 0
    graph, meta = _exported(out)
    assert meta["iteration"] == 100 and meta["batchnorm"] == "normalization" and _same_as(graph, models[100])
    assert sum(layer["architecture"] == "normalization" for layer in graph["layers"]) == 3

    best.write_text(json.dumps({"run": str(run), "best_iteration": 200}))    # no checkpoint path: run/ckpt_<it>
    out = tmp_path / "best2"
    assert ex.main(["--best", str(best), "--out", str(out)]) == 0
    assert _exported(out)[1]["iteration"] == 200

    out = tmp_path / "ckpt"
    assert ex.main(["--checkpoint", str(run / "ckpt_100"), "--out", str(out)]) == 0   # run = the parent
    assert _exported(out)[1]["iteration"] == 100


def test_cli_bad_inputs_exit_2_and_write_nothing(fake_run, tmp_path, capsys):
    run, _ = fake_run
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--iteration", "300", "--out", str(out)]) == 2   # incomplete
    assert "generator.keras" in capsys.readouterr().err
    assert ex.main(["--run", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert ex.main(["--run", str(run), "--iteration", "100", "--best", "x.json", "--out", str(out)]) == 2  # argparse
    bad = tmp_path / "badrun"
    shutil.copytree(run / "ckpt_100", bad / "ckpt_100")
    (bad / "config.json").write_text(json.dumps(dict(CONFIG, n_voxels=N_VOX + 1)))
    assert ex.main(["--run", str(bad), "--out", str(out)]) == 2
    assert "output size" in capsys.readouterr().err
    (bad / "config.json").write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "latent_dim"}))
    assert ex.main(["--run", str(bad), "--out", str(out)]) == 2
    assert "latent_dim" in capsys.readouterr().err
    (bad / "ckpt_100" / "generator.keras").write_bytes(b"not a zip")
    (bad / "config.json").write_text(json.dumps(CONFIG))
    assert ex.main(["--run", str(bad), "--out", str(out)]) == 2
    assert not out.exists() or os.listdir(out) == []


def test_cli_check_failure_exits_1_and_writes_nothing(fake_run, tmp_path, capsys):
    run, _ = fake_run
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--out", str(out), "--check", "--tolerance", "1e-15"]) == 1
    assert "differs from Keras" in capsys.readouterr().err
    assert not out.exists() or os.listdir(out) == []


def _unsupported_model(kind):
    noise = keras.Input((LATENT,), name="noise")
    cond = keras.Input((2,), name="condition")
    x = layers.Concatenate()([noise, cond])
    x = layers.Dense(20, activation="gelu" if kind == "activation" else "relu", name="dense_gelu")(x)
    if kind == "layer":
        x = layers.LayerNormalization(name="my_layer_norm")(x)
    if kind == "hard_sigmoid":
        x = layers.Activation("hard_sigmoid", name="hs")(x)       # Keras 3 and lwtnn disagree on it
    x = layers.Dense(N_VOX, activation="relu")(x)
    return keras.Model([noise, cond], x)


@pytest.mark.parametrize("kind,named", [("layer", "my_layer_norm"), ("activation", "dense_gelu"),
                                        ("hard_sigmoid", "hs")])
def test_unsupported_layer_exits_2_naming_it(tmp_path, capsys, kind, named):
    run = tmp_path / "run"
    (run / "ckpt_5").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(CONFIG))
    _unsupported_model(kind).save(str(run / "ckpt_5" / "generator.keras"))
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_help_is_fast_and_keras_free():
    code = "import sys, export_lwtnn; export_lwtnn.build_parser().format_help(); print('keras' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# an independent C++ evaluation of the same JSON (tests/lwtnn_cpp/lwtnn_eval.cpp, compiled with g++)

@pytest.fixture(scope="module")
def lwtnn_eval(tmp_path_factory):
    exe = tmp_path_factory.mktemp("cpp") / "lwtnn_eval"
    src = os.path.join(HERE, "lwtnn_cpp", "lwtnn_eval.cpp")
    res = subprocess.run(["g++", "-O2", "-std=c++17", "-o", str(exe), src], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return str(exe)


def run_cpp(exe, graph, rows, tmp_path):
    gpath, ipath = tmp_path / "graph.json", tmp_path / "inputs.txt"
    gpath.write_text(ex._format_json(graph))
    with open(ipath, "w") as f:
        f.write(f"{len(rows)}\n")
        np.savetxt(f, rows, fmt="%.17g")
    res = subprocess.run([exe, str(gpath), str(ipath)], capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout, res.stderr


@pytest.mark.parametrize("hidden_act,batchnorm,out_act", [("leaky0", True, "relu"), ("swish", True, "sigmoid"),
                                                          ("elu0.7", False, "softmax")])
def test_cpp_evaluation_matches_keras(lwtnn_eval, tmp_path, hidden_act, batchnorm, out_act):
    model = make_generator(hidden_act, batchnorm, out_act, seed=21)
    for fold in (True, False):
        graph = ex.export_model(model, fold=fold)
        ref, got, (noise, cond) = keras_and_json(model, graph, n=N_INPUTS, seed=8)
        rc, out, err = run_cpp(lwtnn_eval, graph, np.hstack([noise, cond]).astype(np.float64), tmp_path)
        assert rc == 0, err
        cpp = np.array([[float(v) for v in line.split()] for line in out.splitlines()])
        assert cpp.shape == (N_INPUTS, N_VOX)
        assert np.max(np.abs(cpp - ref)) < TOL                    # C++ == Keras
        assert np.max(np.abs(cpp - got)) < 1e-12                  # C++ == numpy evaluator


def test_cpp_evaluation_follows_lwtnn_on_bad_activations(lwtnn_eval, tmp_path):
    rows = np.array([[-1.0, 2.0]])
    layer = {"architecture": "dense", "weights": [], "bias": [], "activation": "swish"}
    rc, out, _ = run_cpp(lwtnn_eval, _one_layer_graph(2, layer), rows, tmp_path)
    assert rc == 0 and all(math.isnan(float(v)) for v in out.split())   # plain "swish": alpha NaN
    layer.pop("activation")
    rc, _, err = run_cpp(lwtnn_eval, _one_layer_graph(2, layer), rows, tmp_path)
    assert rc == 1 and "activation" in err


# ----------------------------------------------------------------------------------------------
# the generator train.py builds

# FastCaloGAN's three generators: ReLU + batch-norm (LeakyReLU(0) layers), swish + batch-norm with a
# batch-normalised swish output, ReLU without batch-norm (fused into the Dense layers)
FASTCALOGAN_VARIANTS = [("relu", True, "relu", False), ("swish", True, "swish", True), ("relu", False, "relu", False)]


@pytest.mark.parametrize("activation,batchnorm,out_act,out_bn", FASTCALOGAN_VARIANTS)
def test_train_build_generator_exports_exactly(tmp_path, activation, batchnorm, out_act, out_bn):
    import train

    model = train.build_generator(N_VOX, latent_dim=LATENT, activation=activation, batchnorm=batchnorm,
                                  output_activation=out_act, output_batchnorm=out_bn)
    set_random_bn_statistics(model, seed=4)
    for fold in (True, False):
        graph = ex.export_model(model, fold=fold)
        assert validate_lwtnn_graph(graph) == []
        assert len(graph["layers"]) == (4 if fold or not batchnorm else 10 + 2 * out_bn)
        if out_act == "swish":    # the output layer keeps swish (negative values possible, as FastCaloGAN)
            assert graph["layers"][-1]["activation"] == {"function": "swish", "alpha": 1.0}
        # the ONNX export of the same network, as FastCaloSim's ONNX handler runs it (one row at a time)
        diffs, _ = ex.compare_exports(model, LATENT, onnx_model=ex.export_onnx(model, fold=fold), n=200)
        assert diffs["onnx"] < TOL
        ref, got, _ = keras_and_json(model, graph)
        assert np.max(np.abs(got - ref)) < TOL
    # and through the command line, as saved in a checkpoint
    (tmp_path / "run" / "ckpt_7").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(CONFIG))
    model.save(str(tmp_path / "run" / "ckpt_7" / "generator.keras"))
    assert ex.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--check"]) == 0
    graph, meta = _exported(tmp_path / "out")
    assert meta["iteration"] == 7 and meta["check"]["max_diff"] < TOL and _same_as(graph, model)


def test_meta_json_alone_gives_mev_per_cell(fake_run, tmp_path):
    """The meta JSON is self-contained: with it alone (no XML, no config.json) the network output becomes MeV per
    (layer, alpha, r) cell, equal to the showers the Keras generator gives, arranged by the geometry."""
    run, models = fake_run
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--out", str(out), "--format", "json"]) == 0
    graph, meta = _exported(out)
    ekin = 65536.0
    label = math.log(ekin / meta["ekin_min"]) / math.log(meta["ekin_max"] / meta["ekin_min"])
    noise = np.random.default_rng(3).normal(0.5, 0.5, (4, meta["latent_dim"]))
    net = ex.evaluate_graph(graph, noise, np.tile([label, 0.0], (4, 1)))
    # the consumer's side, from the meta JSON only
    back = meta["ekin_min"] * (meta["ekin_max"] / meta["ekin_min"]) ** label          # label -> E_kin
    assert back == pytest.approx(ekin, rel=1e-12) and "r runs fastest" in meta["voxel_layout"]["order"]
    cells = {}
    for lay in meta["voxel_layout"]["layers"]:
        block = net[:, lay["offset"]:lay["offset"] + lay["n_voxels"]] * back
        cells[lay["id"]] = block.reshape(4, lay["n_alpha"], lay["n_r"])                 # [event, alpha, r]
        assert len(lay["r_edges_mm"]) == lay["n_r"] + 1 and len(lay["alpha_edges_rad"]) == lay["n_alpha"] + 1
    assert meta["abs_eta_range"] == [0.20, 0.25] and "x 100" in meta["units"]["eta_min"]
    assert os.path.isabs(meta["run"]) and os.path.isabs(meta["checkpoint"])
    # the same from Keras and the geometry module
    geom = read_geometry(BINNING_30, "photon")
    keras_mev = np.asarray(models[200]([noise.astype(np.float32), np.tile([label, 0.0], (4, 1)).astype(np.float32)],
                                       training=False)) * ekin
    assert sorted(cells) == [lay.id for lay in geom.layers if lay.n_voxels] == [0]
    lay = geom.layers[0]
    a, b = geom.offsets[0]
    np.testing.assert_allclose(cells[0], keras_mev[:, a:b].reshape(4, lay.n_alpha, lay.n_r), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(meta["voxel_layout"]["layers"][0]["r_edges_mm"], lay.r_edges)
