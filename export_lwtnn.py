"""export_lwtnn.py -- write a trained generator as the lwtnn graph JSON and the ONNX model C++ FastCaloSim loads.

FastCaloSim reads a FastCaloGAN generator in either format: ``TFCSNetworkFactory`` gives a file ending in
``.onnx`` to ``TFCSONNXHandler`` (ONNX Runtime) and anything else to the lwtnn handlers (a graph JSON ends up
in ``TFCSGANLWTNNHandler``, lwtnn's ``LightweightGraph``); a name ending in ``.*`` takes ``<stem>.onnx`` if it
exists, else ``<stem>.json``. This script walks the Keras functional graph once into a short list of operations
(dense with batch-norm folded in, activations, the concatenation of the two inputs) and both writers read
that list, so the two files hold the same network.

lwtnn's own Keras converters do not read Keras 3 models, so the JSON is written directly in the lwtnn *graph*
format (what ``lwt::parse_json_graph`` reads):

* ``inputs``: ``node_0`` = the noise (``variable_0`` .. ``variable_<latent-1>``) and ``node_1`` = the
  condition (``variable_0`` = the energy label, ``variable_1`` = 0); every variable has ``name``,
  ``offset`` 0 and ``scale`` 1 (lwtnn applies ``(x + offset) * scale``); ``input_sequences`` is ``[]``;
* ``nodes``: ``input`` (sources = [index into inputs], size), ``concatenate`` (sources), ``feed_forward``
  (one source, ``layer_index``);
* ``layers``: ``dense`` (weights row-major n_out x n_in, i.e. the Keras kernel transposed; bias; an
  activation, always) and, on request, ``normalization`` for batch-norm;
* ``outputs``: ``{<name>: {"node_index": i, "labels": ["out_0", ...]}}``, one label per voxel (XML order).

The ONNX model is written with the ``onnx`` package's helpers: opset 13, IR version 7 (loaded by ONNX Runtime
1.6 and every later release), float32 in, out and throughout. Inputs ``Noise`` [1, latent] (noise) and
``mycond`` [1, 2] ([label, 0]) in this order, the names FastCaloSim's ONNX handler looks up (it does not
rename them; its lwtnn handler maps them to ``node_0`` / ``node_1``); output ``out`` [1, n_voxels], which
TFCSONNXHandler reads as one flat vector labelled ``out_0``, ``out_1``, ... (``<output name>_<i>``), the JSON's labels. Fixed shapes,
because the handler takes a symbolic dimension as 1 with a warning; ``--onnx-dynamic-batch`` writes a
symbolic first dimension instead, for Python users who run many rows per ONNX Runtime call. Operators: Gemm
(x W^T + b, W stored n_out x n_in), Relu, LeakyRelu, Elu, Sigmoid, Tanh, Softmax, Mul (swish = x sigmoid(a x);
an unfolded batch-norm = Mul + Add), Concat. The handler fills each input tensor from a name -> value map in
the map's (sorted-name) order, variable_0, variable_1, variable_10, ..., variable_19, variable_2, ...: for
the noise this permutes i.i.d. values, which changes nothing in distribution; the condition's ``variable_0``
(label) sorts before ``variable_1``.

Batch normalisation is folded into the dense layer before it by default (W' = diag(gamma/s) W,
b' = (b - mean) gamma/s + beta, s = sqrt(var + eps)); ``--batchnorm normalization`` writes lwtnn
``normalization`` layers instead (W * (x + b) with W = gamma/s, b = -mean + beta s/gamma; the activation
after it then needs a layer of its own) and ONNX Mul + Add. Activations: linear, rectified, sigmoid, tanh,
softmax, and the parametrised ones only in lwtnn's object form ``{"function": "swish"|"leakyrelu"|"elu",
"alpha": a}`` (the plain strings give NaN in C++). Any layer or activation that the formats cannot reproduce
exactly is an error (exit code 2, one line naming the layer, neither file written): never a silently wrong file.

A generator of CaloShowerGAN's layer representation (train.py's heads on a ``prepare --norm layer`` file) outputs
[voxel fractions, layer fractions, E_tot / E_kin]; FastCaloSim multiplies each output by E_kin and knows nothing of
heads, so the ONNX graph computes voxel / E_kin itself: the heads' Softmax, then Slice, MatMul of the layer
fractions with a fixed layer-to-voxel 0/1 matrix, Mul, Mul (:func:`add_layer_product`). lwtnn's graph format
cannot multiply: ``--format json`` refuses such a generator (exit 2, one line), ``--format both`` writes the ONNX
model alone and says so on stderr. Never a JSON FastCaloSim would read as wrong energies.

Beside the network(s), ``neural_net_<...>.meta.json`` records what a consumer needs to drive them and invert
the voxel normalisation (latent size, noise, label scheme, E_kin range, particle, slice, binning, voxel count;
the ONNX file's input/output names and shapes, opset and IR version).

:func:`evaluate_graph` is an independent numpy evaluator of the JSON with lwtnn's definitions (clipped
sigmoid, swish = x sigmoid(alpha x), ...). ``--check`` compares it, and ONNX Runtime running the ONNX model one
row per call with [1, n] inputs, with Keras on random inputs before anything is written, and exits with 1 if
one differs by more than ``--tolerance``.

Usage
-----
    python export_lwtnn.py --run work/demo/photon_0.20/run --best results/demo/photon_0.20/select/best.json \\
        --out results/demo/photon_0.20/lwtnn --check
    python export_lwtnn.py --run RUN_DIR --iteration 3000 --out DIR       # a given checkpoint
    python export_lwtnn.py --run RUN_DIR --out DIR --format onnx          # the last complete checkpoint, ONNX only
    python export_lwtnn.py --checkpoint RUN_DIR/ckpt_3000 --out DIR       # run dir = the checkpoint's parent

Writes ``DIR/neural_net_<pid>_eta_<min>_<max>_<range>.json`` and ``.onnx`` (|eta| x 100, e.g.
``neural_net_22_eta_20_25_high.json``; ``--format json|onnx|both``, default both) and
``DIR/neural_net_<...>.meta.json``, each atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np

from HighLevelFeatures import read_geometry
from plumbing import (CKPT_RE, LABEL_FORMULAS, HelpFormatter, UserError, apply_activation,  # noqa: F401
                      atomic_output, ensure_dir, evaluate_graph_inputs, list_checkpoints, load_generator_file,
                      read_run_config, representation_spans, run_cli, to_voxels, write_text)

# ----------------------------------------------------------------------------------------------
# configuration: defaults of the command line

DEFAULTS = {
    "batchnorm": "fold",        # fold | normalization
    "check_events": 1000,       # random (noise, label) inputs compared with Keras under --check
    "tolerance": 1e-5,          # max |lwtnn - keras| (relative above |keras| = 1)
    "seed": 1,
}
NOISE_NAME, CONDITION_NAME = "noise", "condition"   # Keras input names (train.py)
LWTNN_INPUTS = ("node_0", "node_1")                  # lwtnn input node names FastCaloSim fills
#: ONNX input names (noise, condition): TFCSONNXHandler looks each model input up by its name in the map
#: TFCSEnergyAndHitGANV2 fills, {"Noise", "mycond"}, without renaming (TFCSGANLWTNNHandler renames them to
#: node_0 / node_1 for lwtnn). The one place the ONNX input names are chosen.
ONNX_INPUTS = ("Noise", "mycond")
CONFIG_REQUIRED = ("particle", "pid", "eta_min", "eta_max", "range", "latent_dim", "n_voxels")

# ----------------------------------------------------------------------------------------------
# lwtnn facts: activations

#: Keras activation name -> (lwtnn function, alpha or None). alpha None = plain string in the JSON.
KERAS_ACTIVATIONS = {
    "linear": ("linear", None),
    "relu": ("rectified", None),
    "sigmoid": ("sigmoid", None),
    "tanh": ("tanh", None),
    "softmax": ("softmax", None),
    "swish": ("swish", 1.0),
    "silu": ("swish", 1.0),
    "elu": ("elu", 1.0),           # keras.activations.elu: alpha = 1
    "leaky_relu": ("leakyrelu", 0.2),  # keras.activations.leaky_relu: negative_slope = 0.2
}
PARAMETRISED = ("swish", "leakyrelu", "elu")


def lwtnn_activation(function, alpha=None):
    """The JSON value of an lwtnn activation: a plain string, or ``{"function", "alpha"}`` if parametrised.

    >>> lwtnn_activation("rectified"), lwtnn_activation("swish", 1.0)
    ('rectified', {'function': 'swish', 'alpha': 1.0})
    """
    if function in PARAMETRISED:
        return {"function": function, "alpha": float(1.0 if alpha is None else alpha)}
    return function


# ----------------------------------------------------------------------------------------------
# the numpy evaluator of an lwtnn graph JSON (independent of Keras; in plumbing.py, shared with
# fastcalosim.py's folder check): apply_activation, evaluate_graph_inputs

def evaluate_graph(graph, noise, condition):
    """Evaluate a calokit generator graph: ``noise`` (N, latent) -> node_0, ``condition`` (N, 2) -> node_1."""
    return evaluate_graph_inputs(graph, {LWTNN_INPUTS[0]: noise, LWTNN_INPUTS[1]: condition})


# ----------------------------------------------------------------------------------------------
# Keras functional graph -> a small list of operations (input, concat, dense, bn, act)

def _tensor_refs(obj):
    """All (layer, node_index, tensor_index) keras_history triples inside a serialised call argument."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            name, node, tensor = obj["config"]["keras_history"]
            return [(name, int(node), int(tensor))]
        return [r for v in obj.values() for r in _tensor_refs(v)]
    if isinstance(obj, (list, tuple)):
        return [r for v in obj for r in _tensor_refs(v)]
    return []


def _keras_activation(name, layer_desc):
    """(lwtnn function, alpha) of a Keras activation name; UserError naming the layer if unsupported."""
    if isinstance(name, str) and name in KERAS_ACTIVATIONS:
        return KERAS_ACTIVATIONS[name]
    shown = name if isinstance(name, str) else json.dumps(name)[:80]
    raise UserError(f"{layer_desc}: activation '{shown}' has no exact lwtnn or ONNX equivalent here "
                    f"(supported: {', '.join(sorted(KERAS_ACTIVATIONS))})")


def _numpy(variable):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)


#: layers that are the identity at inference (skipped by the export)
IDENTITY_LAYERS = ("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity", "SpatialDropout1D",
                   "ActivityRegularization")


def _functional_graph(model, where):
    """(layer config by name, the one output's (layer, node, tensor) reference) of a Keras functional model;
    UserError for anything else or for several outputs."""
    config = model.get_config()
    if "layers" not in config or "output_layers" not in config:
        raise UserError(f"{where}not a Keras functional model (class {type(model).__name__})")
    outputs = config["output_layers"]
    if outputs and not isinstance(outputs[0], (list, tuple)):
        outputs = [outputs]
    if len(outputs) != 1:
        raise UserError(f"{where}the generator must have one output, it has {len(outputs)}")
    return {entry["name"]: entry for entry in config["layers"]}, tuple(outputs[0])


def _input_op(name, cfg, desc):
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    if shape is None or len(shape) != 2 or shape[1] is None:
        raise UserError(f"{desc}: input shape {shape} is not (batch, features)")
    return {"kind": "input", "src": [], "size": int(shape[1]), "layer": name}


def _dense_op(layer, cfg, srcs, n_in, desc):
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != n_in:
        raise UserError(f"{desc}: kernel shape {kernel.shape} does not take {n_in} inputs")
    bias = (np.asarray(weights[1], dtype=np.float64) if cfg.get("use_bias", True) and len(weights) > 1
            else np.zeros(kernel.shape[1]))
    act = _keras_activation(cfg.get("activation", "linear"), desc)
    return {"kind": "dense", "src": srcs, "size": kernel.shape[1], "layer": layer.name, "W": kernel.T.copy(),
            "b": bias, "act": act}


def _batchnorm_op(layer, cfg, srcs, n_in, desc):
    if cfg.get("axis", -1) not in (-1, 1, [-1], [1]):
        raise UserError(f"{desc}: only batch normalisation over the feature axis is supported")
    gamma = _numpy(layer.gamma) if getattr(layer, "gamma", None) is not None else np.ones(n_in)
    beta = _numpy(layer.beta) if getattr(layer, "beta", None) is not None else np.zeros(n_in)
    return {"kind": "bn", "src": srcs, "size": n_in, "layer": layer.name, "gamma": gamma, "beta": beta,
            "mean": _numpy(layer.moving_mean), "var": _numpy(layer.moving_variance), "eps": float(cfg["epsilon"])}


def _activation_layer(cls, cfg, desc):
    """The (lwtnn name, parameter) of an activation layer (Activation, ReLU, LeakyReLU, ELU, Softmax)."""
    if cls == "Activation":
        return _keras_activation(cfg.get("activation"), desc)
    if cls == "ReLU":
        if cfg.get("max_value") is not None or float(cfg.get("threshold", 0.0) or 0.0) != 0.0:
            raise UserError(f"{desc}: ReLU with max_value/threshold is not exported (lwtnn has no equivalent)")
        slope = float(cfg.get("negative_slope", 0.0) or 0.0)
        return ("rectified", None) if slope == 0.0 else ("leakyrelu", slope)
    if cls == "LeakyReLU":
        return ("leakyrelu", float(cfg.get("negative_slope", cfg.get("alpha", 0.3))))
    if cls == "ELU":
        return ("elu", float(cfg.get("alpha", 1.0)))
    if cfg.get("axis", -1) not in (-1, 1):
        raise UserError(f"{desc}: softmax over a non-feature axis")
    return ("softmax", None)


def _layer_op(model, name, cls, cfg, srcs, ops, desc):
    """The op (dict) of one non-input, non-identity layer whose inputs are the ops ``srcs``; UserError for a layer
    neither export supports."""
    layer = model.get_layer(name)
    if cls != "Concatenate" and len(srcs) != 1:
        raise UserError(f"{desc}: expected one input tensor, found {len(srcs)}")
    n_in = ops[srcs[0]]["size"] if srcs else 0
    if cls == "Concatenate":
        if cfg.get("axis", -1) not in (-1, 1):
            raise UserError(f"{desc}: only concatenation along the feature axis is supported")
        return {"kind": "concat", "src": srcs, "size": sum(ops[s]["size"] for s in srcs), "layer": name}
    if cls == "Dense":
        return _dense_op(layer, cfg, srcs, n_in, desc)
    if cls == "BatchNormalization":
        return _batchnorm_op(layer, cfg, srcs, n_in, desc)
    if cls in ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax"):
        return {"kind": "act", "src": srcs, "size": n_in, "layer": name, "act": _activation_layer(cls, cfg, desc)}
    raise UserError(f"{desc} is supported by neither the lwtnn nor the ONNX export (supported: Dense, "
                    "BatchNormalization, Concatenate, Activation, ReLU, LeakyReLU, ELU, Softmax, Dropout)")


def keras_to_ops(model, source=""):
    """Translate a Keras functional generator into a list of operations in dependency order.

    Each op is a dict with ``kind`` (input | concat | dense | bn | act), ``src`` (op indices), ``size``
    (output width), ``layer`` (Keras layer name) and its parameters. Returns (ops, output op index).
    Identity layers at inference (Dropout, GaussianNoise, ...) are skipped; anything else unknown is a
    UserError naming the layer.
    """
    where = f"{source}: " if source else ""
    layer_cfg, output = _functional_graph(model, where)
    ops, done = [], {}

    def resolve(ref, stack=()):
        name, node_index, tensor_index = ref
        if ref in done:
            return done[ref]
        if ref in stack:
            raise UserError(f"{where}cycle in the Keras graph at layer '{name}'")
        entry = layer_cfg[name]
        cls, cfg = entry["class_name"], entry.get("config", {})
        desc = f"{where}layer '{name}' ({cls})"
        if tensor_index != 0:
            raise UserError(f"{desc}: layers with several outputs are not supported by the export")
        if cls == "InputLayer":
            ops.append(_input_op(name, cfg, desc))
        else:
            call = entry["inbound_nodes"][node_index]
            srcs = [resolve(r, stack + (ref,)) for r in _tensor_refs(call.get("args", []))]
            if any(_tensor_refs(call.get("kwargs", {}))):
                raise UserError(f"{desc}: tensor keyword arguments (masks, ...) are not supported")
            if cls in IDENTITY_LAYERS:
                if len(srcs) != 1:
                    raise UserError(f"{desc}: expected one input tensor, found {len(srcs)}")
                done[ref] = srcs[0]                               # identity at inference
                return done[ref]
            ops.append(_layer_op(model, name, cls, cfg, srcs, ops, desc))
        done[ref] = len(ops) - 1
        return done[ref]

    return ops, resolve(output)


# ----------------------------------------------------------------------------------------------
# simplification: fold batch-norm into dense, merge activations into dense, drop identities

def _bn_scale(op):
    return op["gamma"] / np.sqrt(op["var"] + op["eps"])


def simplify_ops(ops, out, fold=True):
    """Fold BN into the dense before it (``fold``), merge activations into a linear dense, drop linear ones.

    Only rewrites a dense whose output feeds nothing else. Returns (new ops, new output index); ops that
    are no longer reachable from the output are dropped later by the emitter.
    """
    ops = [dict(op) for op in ops]
    users = [0] * len(ops)
    for op in ops:
        for s in op["src"]:
            users[s] += 1
    users[out] += 1
    redirect = {}

    def src_of(i):
        while i in redirect:
            i = redirect[i]
        return i

    for i, op in enumerate(ops):
        op["src"] = [src_of(s) for s in op["src"]]
        if op["kind"] == "bn" and fold:
            s = op["src"][0]
            prev = ops[s]
            if prev["kind"] == "dense" and prev["act"][0] == "linear" and users[s] == 1:
                k = _bn_scale(op)
                ops[i] = {"kind": "dense", "src": prev["src"], "size": op["size"],
                          "layer": f"{prev['layer']}+{op['layer']}", "W": prev["W"] * k[:, None],
                          "b": (prev["b"] - op["mean"]) * k + op["beta"], "act": ("linear", None)}
                users[s] = 0
        elif op["kind"] == "act":
            s = op["src"][0]
            prev = ops[s]
            if op["act"][0] == "linear":
                redirect[i] = s
                users[s] += users[i] - 1
            elif prev["kind"] == "dense" and prev["act"][0] == "linear" and users[s] == 1:
                ops[i] = dict(prev, layer=f"{prev['layer']}+{op['layer']}", act=op["act"])
                users[s] = 0
    return ops, src_of(out)


# ----------------------------------------------------------------------------------------------
# emission of the lwtnn graph JSON

def _finite(arr, what):
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{what} has NaN/inf parameters; cannot export")
    return [float(v) for v in np.asarray(arr, dtype=np.float64).ravel()]


def ops_to_graph(ops, out, input_ops, output_name):
    """Build the lwtnn graph dict from simplified ops.

    ``input_ops`` = op indices of (noise, condition) in lwtnn input order. A batch-norm left after
    simplification becomes an lwtnn ``normalization`` layer, or, if a gamma is exactly 0 (which that
    layer cannot hold: b = beta s / gamma), an equivalent diagonal dense layer.
    """
    reach = set(_reachable_in_order(ops, out))
    graph = {"inputs": [], "input_sequences": [], "nodes": [], "layers": [], "outputs": {}}
    node_of = {}
    for k, i in enumerate(input_ops):
        var_names = [f"variable_{j}" for j in range(ops[i]["size"])]
        graph["inputs"].append({"name": LWTNN_INPUTS[k],
                                "variables": [{"name": v, "offset": 0.0, "scale": 1.0} for v in var_names]})
        node_of[i] = len(graph["nodes"])
        graph["nodes"].append({"type": "input", "sources": [k], "size": ops[i]["size"]})

    def feed_forward(src_node, layer):
        graph["layers"].append(layer)
        graph["nodes"].append({"type": "feed_forward", "sources": [src_node], "layer_index": len(graph["layers"]) - 1})
        return len(graph["nodes"]) - 1

    for i, op in enumerate(ops):
        if i not in reach or i in node_of:
            continue
        kind = op["kind"]
        if kind == "input":
            raise UserError(f"Keras input '{op['layer']}' is neither '{NOISE_NAME}' nor '{CONDITION_NAME}'")
        srcs = [node_of[s] for s in op["src"]]
        if kind == "concat":
            graph["nodes"].append({"type": "concatenate", "sources": srcs})
            node_of[i] = len(graph["nodes"]) - 1
        elif kind == "dense":
            node_of[i] = feed_forward(srcs[0], {
                "architecture": "dense", "weights": _finite(op["W"], f"layer '{op['layer']}'"),
                "bias": _finite(op["b"], f"layer '{op['layer']}'"), "activation": lwtnn_activation(*op["act"])})
        elif kind == "bn":
            s = np.sqrt(op["var"] + op["eps"])
            if np.all(op["gamma"] != 0):
                layer = {"architecture": "normalization", "weights": _finite(op["gamma"] / s, f"layer '{op['layer']}'"),
                         "bias": _finite(-op["mean"] + op["beta"] * s / op["gamma"], f"layer '{op['layer']}'")}
            else:
                k = op["gamma"] / s
                layer = {"architecture": "dense", "weights": _finite(np.diag(k), f"layer '{op['layer']}'"),
                         "bias": _finite(op["beta"] - op["mean"] * k, f"layer '{op['layer']}'"),
                         "activation": "linear"}
            node_of[i] = feed_forward(srcs[0], layer)
        elif kind == "act":
            node_of[i] = feed_forward(srcs[0], {"architecture": "dense", "weights": [], "bias": [],
                                                "activation": lwtnn_activation(*op["act"])})
        else:
            raise UserError(f"internal: unknown op kind {kind}")
    graph["outputs"][output_name] = {"node_index": node_of[out],
                                     "labels": [f"out_{j}" for j in range(ops[out]["size"])]}
    return graph


def export_ops(model, fold=True, source=""):
    """The one walk of a Keras generator (inputs ``noise``, ``condition``) that both writers read.

    Returns (simplified ops, output op index, [noise op, condition op], lwtnn output name); UserError naming the
    layer if the generator holds something neither format can reproduce exactly.
    """
    where = f"{source}: " if source else ""
    ops, out = keras_to_ops(model, source)
    by_name = {op["layer"]: i for i, op in enumerate(ops) if op["kind"] == "input"}
    missing = [n for n in (NOISE_NAME, CONDITION_NAME) if n not in by_name]
    if missing or len(by_name) != 2:
        raise UserError(f"{where}generator inputs are {sorted(by_name)}, expected exactly "
                        f"'{NOISE_NAME}' and '{CONDITION_NAME}'")
    ops, out = simplify_ops(ops, out, fold=fold)
    ops, out = add_layer_product(ops, out, representation_spans(model))
    output_layer = model.get_config()["output_layers"]
    output_layer = output_layer[0] if isinstance(output_layer[0], (list, tuple)) else output_layer
    return ops, out, [by_name[NOISE_NAME], by_name[CONDITION_NAME]], f"{output_layer[0]}_0"


def export_model(model, fold=True, source=""):
    """Keras generator (inputs ``noise``, ``condition``) -> lwtnn graph dict. UserError if not exportable."""
    ops, out, input_ops, output_name = export_ops(model, fold, source)
    refusal = lwtnn_refusal(ops, source)
    if refusal:
        raise UserError(refusal)
    return ops_to_graph(ops, out, input_ops, output_name)


# ----------------------------------------------------------------------------------------------
# CaloShowerGAN's layer representation: voxel / E_kin = (E_tot / E_kin) x layer fraction x voxel fraction, a
# product of the heads, computed inside the ONNX graph (lwtnn's graph format cannot multiply)

def add_layer_product(ops, out, spans):
    """With layer ``spans`` (a generator of the layer representation, plumbing.representation_spans), append the
    op turning its output [voxel fractions, layer fractions, E_tot / E_kin] into voxel / E_kin; returns (ops, new
    output index). Without spans, (ops, out) unchanged."""
    if spans is None:
        return ops, out
    n_vox = int(spans[-1][1])
    if ops[out]["size"] != n_vox + len(spans) + 1:
        raise UserError(f"layer '{ops[out]['layer']}': output of {ops[out]['size']} values, the layer representation "
                        f"of {len(spans)} layers and {n_vox} voxels has {n_vox + len(spans) + 1}")
    ops = ops + [{"kind": "layer_product", "src": [out], "size": n_vox, "layer": "voxels_over_ekin",
                  "spans": [(int(a), int(b)) for a, b in spans]}]
    return ops, len(ops) - 1


def lwtnn_refusal(ops, source=""):
    """The one-line reason the ops cannot be an lwtnn graph JSON (a product of heads), or None."""
    if not any(op["kind"] == "layer_product" for op in ops):
        return None
    where = f"{source}: " if source else ""
    return (f"{where}this generator learns CaloShowerGAN's layer representation (voxel = E_tot/E_kin x layer "
            f"fraction x voxel fraction, a product of its heads), which lwtnn's graph format cannot compute (no "
            f"multiply); use --format onnx: the .onnx file computes voxel / E_kin and serves FastCaloSim")


def layer_voxel_matrix(spans):
    """(n_layers, n_voxels) float32 0/1 matrix: row l is 1 on the voxels of layer l.

    >>> layer_voxel_matrix([(0, 2), (2, 3)]).tolist()
    [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    m = np.zeros((len(spans), int(spans[-1][1])), dtype=np.float32)
    for i, (a, b) in enumerate(spans):
        m[i, int(a):int(b)] = 1.0
    return m


def _onnx_int64(g, stem, values):
    """An int64 initialiser (Slice's starts / ends / axes) in the graph ``g``; returns its name."""
    from onnx import numpy_helper

    name = g.name(stem)
    g.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def _onnx_layer_product(g, op, src, out):
    """voxel / E_kin from the layer representation ``src`` [1, V + L + 1]: Slice the voxel fractions [1, V], the
    layer fractions [1, L] and E_tot / E_kin [1, 1]; MatMul the layer fractions with the fixed layer-to-voxel 0/1
    matrix (each voxel gets its layer's fraction); Mul, Mul. The order of the products is
    plumbing.from_layer_representation's."""
    spans = op["spans"]
    n_vox, n_lay = int(spans[-1][1]), len(spans)
    axis = _onnx_int64(g, "axis", [1])

    def part(lo, hi, stem):
        return g.node("Slice", [src, _onnx_int64(g, "start", [lo]), _onnx_int64(g, "end", [hi]), axis], stem)

    voxel_frac = part(0, n_vox, "voxel_fractions")
    layer_frac = part(n_vox, n_vox + n_lay, "layer_fractions")
    etot = part(n_vox + n_lay, n_vox + n_lay + 1, "etot_over_ekin")
    per_voxel = g.node("MatMul", [layer_frac, g.const("layer_to_voxel", layer_voxel_matrix(spans), op["layer"])],
                       "layer_fraction_per_voxel")
    return g.node("Mul", [g.node("Mul", [voxel_frac, per_voxel], "voxel_times_layer"), etot], "voxels", out)


def export_onnx(model, fold=True, source="", dynamic_batch=False):
    """Keras generator -> ONNX ModelProto (the same ops as :func:`export_model`). UserError if not exportable."""
    ops, out, input_ops, _ = export_ops(model, fold, source)
    return ops_to_onnx(ops, out, input_ops, dynamic_batch)


# ----------------------------------------------------------------------------------------------
# emission of the ONNX model (the same simplified ops; FastCaloSim's TFCSONNXHandler runs it with ONNX Runtime)

#: Opset 13 / IR version 7: what ONNX Runtime 1.6 and every later release load (opset 13 has Gemm, Relu,
#: LeakyRelu, Sigmoid, Tanh, Elu, Softmax over one axis, Mul, Add, Concat): new enough for everything written
#: here, old enough for the ONNX Runtime an older ATLAS release embeds.
ONNX_OPSET, ONNX_IR_VERSION = 13, 7
ONNX_OUTPUT = "out"             # the handler labels the flat output "out_0", "out_1", ...: the JSON's labels
ONNX_BATCH_DIM = "batch"        # name of the symbolic first dimension under --onnx-dynamic-batch


class _OnnxGraph:
    """Collects ONNX nodes and float32 initialisers under unique names."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, stem):
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem, values, what):
        from onnx import numpy_helper

        _finite(values, what)
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def node(self, op_type, inputs, stem, out=None, **attrs):
        from onnx import helper

        out = out or self.name(stem)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out


def _onnx_activation(g, act, x, layer, out=None):
    """Append the ONNX nodes of an lwtnn activation ``(function, alpha)`` to ``x``; returns the result's name."""
    fn, alpha = act
    if fn == "linear":
        return g.node("Identity", [x], "linear", out) if out else x
    if fn == "rectified":
        return g.node("Relu", [x], "relu", out)
    if fn == "sigmoid":
        return g.node("Sigmoid", [x], "sigmoid", out)
    if fn == "tanh":
        return g.node("Tanh", [x], "tanh", out)
    if fn == "softmax":
        return g.node("Softmax", [x], "softmax", out, axis=-1)
    if fn == "leakyrelu":
        return g.node("LeakyRelu", [x], "leakyrelu", out, alpha=float(alpha))
    if fn == "elu":
        return g.node("Elu", [x], "elu", out, alpha=float(alpha))
    if fn == "swish":                                   # x * sigmoid(alpha x)
        arg = x if float(alpha) == 1.0 else g.node("Mul", [x, g.const("swish_alpha", [alpha], layer)], "swish_ax")
        return g.node("Mul", [x, g.node("Sigmoid", [arg], "swish_sig")], "swish", out)
    raise UserError(f"{layer}: activation '{fn}' has no ONNX equivalent here")


def _onnx_op(g, op, srcs, out):
    """ONNX nodes of one simplified op (concat | dense | bn | act) on the tensors ``srcs``."""
    where = f"layer '{op['layer']}'"
    kind = op["kind"]
    if kind == "concat":
        return g.node("Concat", srcs, "concat", out, axis=1)
    if kind == "dense":     # Gemm: x W^T + b with W stored n_out x n_in (as in the JSON), transB = 1
        lin_out = out if op["act"][0] == "linear" else None
        y = g.node("Gemm", [srcs[0], g.const("W", op["W"], where), g.const("b", op["b"], where)], "dense",
                   lin_out, transB=1)
        return y if lin_out else _onnx_activation(g, op["act"], y, where, out)
    if kind == "bn":        # k x + (beta - mean k), k = gamma / sqrt(var + eps)
        k = _bn_scale(op)
        y = g.node("Mul", [srcs[0], g.const("bn_scale", k, where)], "bn_mul")
        return g.node("Add", [y, g.const("bn_shift", op["beta"] - op["mean"] * k, where)], "bn", out)
    if kind == "act":
        return _onnx_activation(g, op["act"], srcs[0], where, out)
    if kind == "layer_product":
        return _onnx_layer_product(g, op, srcs[0], out)
    raise UserError(f"internal: unknown op kind {kind}")


def ops_to_onnx(ops, out, input_ops, dynamic_batch=False, doc=""):
    """Build the ONNX ModelProto (float32 in and out) from simplified ops.

    Inputs ``Noise`` and ``mycond`` (``ONNX_INPUTS``: noise, condition) in this order with shapes [1, n] (or [batch, n] with
    ``dynamic_batch``); one output ``out`` of shape [1, n_out]. Opset ``ONNX_OPSET``, IR ``ONNX_IR_VERSION``.
    """
    from onnx import TensorProto, helper

    batch = ONNX_BATCH_DIM if dynamic_batch else 1
    g, name_of, inputs = _OnnxGraph(), {}, []
    for k, i in enumerate(input_ops):
        name_of[i] = ONNX_INPUTS[k]
        inputs.append(helper.make_tensor_value_info(ONNX_INPUTS[k], TensorProto.FLOAT, [batch, ops[i]["size"]]))
    order = _reachable_in_order(ops, out)
    for i in order:
        if i in name_of:
            continue
        if ops[i]["kind"] == "input":
            raise UserError(f"Keras input '{ops[i]['layer']}' is neither '{NOISE_NAME}' nor '{CONDITION_NAME}'")
        name_of[i] = _onnx_op(g, ops[i], [name_of[s] for s in ops[i]["src"]], ONNX_OUTPUT if i == out else None)
    if name_of[out] != ONNX_OUTPUT:                   # the output is an input tensor itself
        g.node("Identity", [name_of[out]], "out", ONNX_OUTPUT)
    output = helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, [batch, ops[out]["size"]])
    graph = helper.make_graph(g.nodes, "calokit_generator", inputs, [output], initializer=g.inits, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="calokit export_lwtnn.py", ir_version=ONNX_IR_VERSION)
    check_onnx(model)
    return model


def _reachable_in_order(ops, out):
    """Indices of the ops the output depends on, in op (dependency) order."""
    reach, todo = set(), [out]
    while todo:
        i = todo.pop()
        if i not in reach:
            reach.add(i)
            todo.extend(ops[i]["src"])
    return sorted(reach)


def check_onnx(model):
    """onnx.checker (full, with shape inference) on ``model``; UserError if it is rejected."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise UserError(f"internal: the ONNX checker rejects the model ({str(err).splitlines()[0][:300]})") from None


def onnx_session(model):
    """An ONNX Runtime CPU session of a ModelProto (or serialised bytes), one thread, quiet."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx_rows(session, noise, condition):
    """The ONNX model on each row alone, with [1, n] inputs as FastCaloSim feeds it; float64 (N, n_out)."""
    noise = np.asarray(noise, np.float32)
    condition = np.asarray(condition, np.float32)
    rows = [session.run([ONNX_OUTPUT], {ONNX_INPUTS[0]: noise[j:j + 1], ONNX_INPUTS[1]: condition[j:j + 1]})[0]
            for j in range(len(noise))]
    return np.concatenate(rows, axis=0).astype(np.float64) if rows else np.zeros((0, 0))


# ----------------------------------------------------------------------------------------------
# comparison with Keras

def keras_predict(model, noise, condition):
    """The Keras generator's showers as voxel / E_kin (float64) for noise and condition, inference mode
    (plumbing.to_voxels: a generator of the layer representation gives the product of its heads)."""
    import keras

    feed = {NOISE_NAME: np.asarray(noise, np.float32), CONDITION_NAME: np.asarray(condition, np.float32)}
    names = [t.name.split(":")[0] for t in model.inputs]
    out = model([feed[n] for n in names], training=False)
    return np.asarray(to_voxels(model, keras.ops.convert_to_numpy(out)), dtype=np.float64)   # voxel / E_kin


def random_inputs(latent_dim, n, seed, noise_mean=0.5, noise_std=0.5):
    """Noise N(mean, std) as in training and conditions [label ~ U(0, 1), 0]."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(noise_mean, noise_std, size=(n, latent_dim))
    label = rng.uniform(0.0, 1.0, size=n)
    return noise, np.stack([label, np.zeros(n)], axis=1)


def max_difference(got, ref):
    """max |got - ref|, relative where |ref| > 1 (the --tolerance convention)."""
    return float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))


def compare_with_keras(graph, model, n=1000, seed=1, noise_mean=0.5, noise_std=0.5):
    """max |lwtnn(JSON) - keras| and max |keras| over ``n`` random inputs (as float64)."""
    diffs, scale = compare_exports(model, len(graph["inputs"][0]["variables"]), graph=graph, n=n, seed=seed,
                                   noise_mean=noise_mean, noise_std=noise_std)
    return diffs["json"], scale


def compare_exports(model, latent, graph=None, onnx_model=None, n=1000, seed=1, noise_mean=0.5, noise_std=0.5):
    """Compare the exported network(s) with Keras on ``n`` seeded random inputs.

    ``graph`` (lwtnn JSON dict) is evaluated by :func:`evaluate_graph`; ``onnx_model`` (ModelProto or bytes) by
    ONNX Runtime one row at a time with [1, n] inputs, as FastCaloSim's handler feeds it. Returns
    ({"json": diff, "onnx": diff} for those given, max |keras|), diffs as in :func:`max_difference`.
    """
    noise, cond = random_inputs(latent, n, seed, noise_mean, noise_std)
    noise, cond = noise.astype(np.float32), cond.astype(np.float32)   # what Keras sees exactly
    ref = keras_predict(model, noise, cond)
    diffs = {}
    if graph is not None:
        diffs["json"] = max_difference(evaluate_graph(graph, noise, cond), ref)
    if onnx_model is not None:
        diffs["onnx"] = max_difference(run_onnx_rows(onnx_session(onnx_model), noise, cond), ref)
    return diffs, float(np.max(np.abs(ref)))


# ----------------------------------------------------------------------------------------------
# run directory: config, checkpoints, best.json

def read_json(path, what):
    """Load a JSON file or raise a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable JSON file ({err})") from None


def export_config(run):
    """config.json of a run directory, checked for the keys the export needs."""
    path = os.path.join(run, "config.json")
    cfg = read_run_config(run)
    for key in CONFIG_REQUIRED:
        if key not in cfg:
            raise UserError(f"{path}: missing key '{key}'")
    return cfg


def _iteration_of(ckpt):
    m = CKPT_RE.match(os.path.basename(os.path.normpath(ckpt)))
    return int(m.group(1)) if m else None


def choose_checkpoint(args):
    """(run dir, checkpoint dir, iteration) from --run / --iteration / --best / --checkpoint."""
    run = args.run
    if args.checkpoint:
        ckpt = args.checkpoint
        run = run or os.path.dirname(os.path.abspath(os.path.normpath(ckpt)))
    elif args.best:
        best = read_json(args.best, "best-epoch file")
        if not isinstance(best, dict):
            raise UserError(f"{args.best}: expected a JSON object")
        run = run or best.get("run")
        if not run:
            raise UserError(f"{args.best}: no 'run' key and no --run given")
        ckpt = best.get("checkpoint")
        if ckpt and not os.path.isdir(ckpt):
            beside = os.path.join(os.path.dirname(os.path.abspath(args.best)), ckpt)
            ckpt = beside if os.path.isdir(beside) else None
        if not ckpt:
            if "best_iteration" not in best:
                raise UserError(f"{args.best}: neither an existing 'checkpoint' nor 'best_iteration'")
            try:
                ckpt = os.path.join(run, f"ckpt_{int(best['best_iteration'])}")
            except (TypeError, ValueError):
                raise UserError(f"{args.best}: 'best_iteration' is not an integer") from None
    elif args.iteration is not None:
        if not run:
            raise UserError("--iteration needs --run RUN_DIR")
        ckpt = os.path.join(run, f"ckpt_{args.iteration}")
    else:
        if not run:
            raise UserError("give --run RUN_DIR (or --checkpoint CKPT_DIR / --best best.json)")
        ckpts = list_checkpoints(run)
        if not ckpts:
            raise UserError(f"{run}: no complete checkpoint (ckpt_<iteration>/generator.keras)")
        ckpt = ckpts[-1][1]
    if not os.path.isfile(os.path.join(ckpt, "generator.keras")):
        raise UserError(f"{os.path.join(ckpt, 'generator.keras')}: checkpoint generator not found")
    return run, ckpt, _iteration_of(ckpt)


# ----------------------------------------------------------------------------------------------
# output names and metadata

def _eta_tag(value, path, key):
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise UserError(f"{path}: '{key}' = {value} is not a |eta| x 100 value")
    return str(int(round(v))) if abs(v - round(v)) < 1e-6 else f"{v:g}".replace(".", "p")


def network_stem(cfg, path="config.json"):
    """neural_net_<pid>_eta_<min>_<max>_<range> from a run configuration."""
    try:
        pid = int(cfg["pid"])
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'pid' = {cfg['pid']!r} is not an integer") from None
    rng = str(cfg["range"])
    if not re.match(r"^[A-Za-z0-9]+$", rng):
        raise UserError(f"{path}: 'range' = {rng!r} is not a plain name")
    return (f"neural_net_{pid}_eta_{_eta_tag(cfg['eta_min'], path, 'eta_min')}_"
            f"{_eta_tag(cfg['eta_max'], path, 'eta_max')}_{rng}")


def onnx_metadata(onnx_name, latent, n_cond, n_out, dynamic_batch):
    """The ONNX file's interface as TFCSONNXHandler sees it (names, shapes, element type, opset, IR version)."""
    batch = ONNX_BATCH_DIM if dynamic_batch else 1
    return {"file": onnx_name, "opset": ONNX_OPSET, "ir_version": ONNX_IR_VERSION, "element_type": "float32",
            "inputs": [{"name": ONNX_INPUTS[0], "shape": [batch, latent], "content": "noise"},
                       {"name": ONNX_INPUTS[1], "shape": [batch, n_cond], "content": "[energy label, 0]"}],
            "output": {"name": ONNX_OUTPUT, "shape": [batch, n_out],
                       "labels": f"{ONNX_OUTPUT}_0..{ONNX_OUTPUT}_{n_out - 1} (flat, '<output name>_<i>')"},
            "batch": ("symbolic first dimension 'batch' (TFCSONNXHandler takes it as 1, with a warning)"
                      if dynamic_batch else "fixed 1 (one shower per call, as TFCSONNXHandler runs it)")}


def voxel_layout(geom):
    """The voxel layout of the network output, self-contained: per voxelised layer its id, offset in the output,
    r edges (mm), alpha bins and the index formula, so that ``out`` turns into MeV per (layer, alpha, r) cell
    without the binning XML. r runs fastest (CaloChallenge order; FastCaloGAN's CSV files have alpha fastest)."""
    layers = []
    for lay in geom.layers:
        if not lay.n_voxels:
            continue
        start, stop = geom.offsets[lay.id]
        per_r = getattr(lay, "alpha_per_r", None)
        entry = {"id": int(lay.id), "offset": int(start), "n_voxels": int(stop - start),
                 "r_edges_mm": [float(x) for x in lay.r_edges], "n_r": int(lay.n_r), "n_alpha": int(lay.n_alpha),
                 "alpha_edges_rad": [float(x) for x in lay.alpha_edges]}
        if per_r is not None and not getattr(lay, "regular", True):     # FastCaloGAN's optimised alpha bins
            entry["alpha_bins_per_r_bin"] = [int(x) for x in per_r]
            entry["index"] = "offset + sum(alpha_bins_per_r_bin[:i_r]) + i_alpha (r outer, alpha inner)"
        else:
            entry["index"] = "offset + i_alpha * n_r + i_r (r fastest)"
        layers.append(entry)
    return {"order": "layers in this order; inside a layer with the same alpha bins in every r bin r runs fastest, "
                     "then alpha: index = offset + i_alpha * n_r + i_r (FastCaloGAN's CSV files have alpha fastest); "
                     "a layer with per-r-bin alpha bins says its own order in 'index'",
            "alpha": ("|dphi|-folded, bins over [0, pi]" if geom.symmetrise_alpha
                      else "alpha = atan2(dphi_mm, deta_mm), bins over (-pi, pi]"),
            "n_voxels": int(geom.n_voxels), "layers": layers}


def geometry_of(cfg, binning, n_out):
    """The run's slice geometry (from --binning, else the binning file config.json names); UserError if unreadable
    or if its voxel count differs from the network's output."""
    path = binning or cfg.get("binning")
    if not path:
        raise UserError("config.json names no binning file: pass --binning XML")
    eta = 0.5 * (float(cfg["eta_min"]) + float(cfg["eta_max"])) / 100
    geom = read_geometry(path, cfg["particle"], eta)
    if geom.n_voxels != n_out:
        raise UserError(f"{path}: the slice has {geom.n_voxels} voxels but the network outputs {n_out}")
    return geom


def build_metadata(cfg, sizes, files, run, ckpt, iteration, mode, check, onnx_info=None, geom=None):
    """What a consumer needs to drive the network(s) and invert the voxel normalisation.

    ``sizes`` = (latent, condition size, n_out); ``files`` = {"json": name, "onnx": name} for those written.
    """
    latent, _, n_out = sizes
    scheme = cfg.get("label_scheme", "V2")
    from_ekin, inverse = LABEL_FORMULAS.get(scheme, LABEL_FORMULAS["V2"])
    noise = cfg.get("noise", {"mean": 0.5, "std": 0.5})
    keys = ("particle", "pid", "eta_min", "eta_max", "range", "binning", "latent_dim", "n_voxels", "label_scheme",
            "max_exp", "p_min", "p_max", "ekin_min", "ekin_max", "normalisation")
    formats = {"json": "lwtnn graph JSON (lwt::parse_json_graph)",
               "onnx": f"ONNX (opset {ONNX_OPSET}, IR version {ONNX_IR_VERSION}, float32; ONNX Runtime)"}
    meta = {"network": files.get("json", files.get("onnx")), "files": dict(files),
            "format": "; ".join(formats[k] for k in files)}
    meta.update({k: cfg[k] for k in keys if k in cfg})
    meta.update({
        "slice": f"{cfg['particle']} |eta| in [{float(cfg['eta_min']) / 100:.2f}, {float(cfg['eta_max']) / 100:.2f})",
        "inputs": {"node_0": f"noise, {latent} values ~ N({noise.get('mean', 0.5)}, "
                             f"{noise.get('std', 0.5)}), variable_0..variable_{latent - 1}",
                   "node_1": "condition: variable_0 = energy label, variable_1 = 0"},
        "noise": noise,
        "label": {"scheme": scheme, "from_ekin": from_ekin, "inverse": inverse},
        "outputs": {"labels": f"out_0..out_{n_out - 1}",
                    "meaning": "voxel energy / E_kin; voxel i is described by voxel_layout (r fastest)",
                    "inverse": "voxel energy [MeV] = out_i * E_kin [MeV]"},
        "units": {"eta_min": "|eta| x 100 (eta_min 20 = |eta| 0.20)", "eta_max": "|eta| x 100",
                  "p_min": "MeV, momentum", "p_max": "MeV, momentum",
                  "ekin_min": "MeV: E_kin of p_min, the label's lower anchor (the range definition, not the data)",
                  "ekin_max": "MeV: E_kin of p_max, the label's upper anchor",
                  "max_exp": "V1 label only: label = E_kin / 2**max_exp (unused with V2)"},
        "abs_eta_range": [float(cfg["eta_min"]) / 100, float(cfg["eta_max"]) / 100],
        "batchnorm": mode, "run": os.path.abspath(run), "checkpoint": os.path.abspath(ckpt), "iteration": iteration,
    })
    if "data_ekin_range" in cfg:
        meta["trained_ekin_range_mev"] = cfg["data_ekin_range"]
    if geom is not None:
        meta["voxel_layout"] = voxel_layout(geom)
    if onnx_info is not None:
        meta["onnx"] = onnx_info
    if check is not None:
        meta["check"] = check
    return meta


def _format_json(obj, indent=0):
    """JSON text with nested structure indented but number arrays kept on one line (compact, readable)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not any(isinstance(v, (dict, list)) for v in obj.values()):
            return json.dumps(obj)
        items = [f"{inner}{json.dumps(k)}: {_format_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(type(v) in (int, float) for v in obj):           # repr = JSON for finite numbers
            return "[" + ",".join(map(repr, obj)) + "]"
        if all(isinstance(v, str) for v in obj):
            return json.dumps(obj)
        return "[\n" + ",\n".join(inner + _format_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_json(path, obj):
    """Write JSON atomically (temp file + rename)."""
    write_text(path, _format_json(obj) + "\n")


# ----------------------------------------------------------------------------------------------
# command line

FORMATS = {"json": ("json",), "onnx": ("onnx",), "both": ("json", "onnx")}


def build_parser():
    p = argparse.ArgumentParser(
        description="Export a calokit generator checkpoint as the lwtnn graph JSON and/or the ONNX model that "
                    "FastCaloSim loads.",
        formatter_class=HelpFormatter)
    p.add_argument("--run", help="run directory of train.py (config.json, ckpt_<iteration>/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, help="checkpoint iteration (default: the last complete one)")
    which.add_argument("--best", help="best.json of select_epoch.py (its checkpoint)")
    which.add_argument("--checkpoint", help="checkpoint directory (holding generator.keras); run = its parent")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=sorted(FORMATS), default="both",
                   help="write the lwtnn graph JSON, the ONNX model, or both (same stem, one meta JSON)")
    p.add_argument("--batchnorm", choices=("fold", "normalization"), default=DEFAULTS["batchnorm"],
                   help="fold batch-norm into the dense layer before it, or keep it as its own layer "
                        "(lwtnn normalization layer; ONNX Mul + Add)")
    p.add_argument("--onnx-dynamic-batch", action="store_true",
                   help="give the ONNX inputs and output a symbolic first (batch) dimension, for Python users who "
                        "run many rows per call; default: fixed [1, n], what FastCaloSim's handler expects")
    p.add_argument("--check", action="store_true",
                   help="before writing, compare each written format with Keras on random inputs (JSON: numpy "
                        "lwtnn evaluator; ONNX: ONNX Runtime, one row per call); exit 1 if one differs")
    p.add_argument("--check-events", type=int, default=DEFAULTS["check_events"], help="random inputs for --check")
    p.add_argument("--tolerance", type=float, default=DEFAULTS["tolerance"],
                   help="--check: max |export - keras| (relative where |keras| > 1)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the --check inputs")
    p.add_argument("--binning", help="binning XML whose slice is embedded in the meta JSON (default: the one "
                                     "config.json names, relative to the working directory)")
    return p


def formats_for(requested, formats, refusal):
    """The formats to write: ``formats`` unless lwtnn cannot hold the network (``refusal``, one line): then
    ``--format json`` is refused (UserError: exit 2) and ``--format both`` writes the ONNX model alone, saying
    so on stderr (make all's export step stays one command for every recipe). Never a JSON FastCaloSim would read
    as wrong energies."""
    if refusal is None or "json" not in formats:
        return formats
    if requested == "json":
        raise UserError(refusal)
    print(f"note: {refusal.replace('; use --format onnx:', ': writing the ONNX model alone;')}", file=sys.stderr)
    return tuple(f for f in formats if f != "json")


def _check_exports(args, cfg, model, model_path, latent, graph, onnx_bytes):
    """--check: the check record for the meta JSON, or None after printing why the export is refused."""
    noise = cfg.get("noise", {})
    diffs, scale = compare_exports(model, latent, graph=graph, onnx_model=onnx_bytes, n=args.check_events,
                                   seed=args.seed, noise_mean=float(noise.get("mean", 0.5)),
                                   noise_std=float(noise.get("std", 0.5)))
    check = {"events": args.check_events, "seed": args.seed, "max_diff": max(diffs.values()),
             "max_abs_keras": scale, "tolerance": args.tolerance}
    check.update({f"max_diff_{k}": v for k, v in diffs.items()})
    for fmt, what in (("json", "lwtnn JSON"), ("onnx", "ONNX model (ONNX Runtime)")):
        if fmt in diffs and not diffs[fmt] <= args.tolerance:
            print(f"error: {model_path}: {what} differs from Keras by {diffs[fmt]:.3g} (> {args.tolerance:g}) "
                  f"on {args.check_events} random inputs; nothing written", file=sys.stderr)
            return None
    return check


def write_bytes(path, data):
    """Write a binary file atomically (temporary file + rename)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return path


def _main(argv):
    args = build_parser().parse_args(argv)
    if args.check_events < 1:
        raise UserError("--check-events must be >= 1")
    formats = FORMATS[args.format]
    run, ckpt, iteration = choose_checkpoint(args)
    cfg = export_config(run)
    cfg_path = os.path.join(run, "config.json")
    stem = network_stem(cfg, cfg_path)
    model_path = os.path.join(ckpt, "generator.keras")
    model = load_generator_file(model_path)
    # one walk of the Keras graph; both writers read the same simplified ops
    ops, out, input_ops, output_name = export_ops(model, fold=args.batchnorm == "fold", source=model_path)
    formats = formats_for(args.format, formats, lwtnn_refusal(ops, model_path))
    sizes = (ops[input_ops[0]]["size"], ops[input_ops[1]]["size"], ops[out]["size"])
    for what, got, want in zip(("noise size", "condition size", "output size"), sizes,
                               (cfg["latent_dim"], 2, cfg["n_voxels"])):
        if int(got) != int(want):
            raise UserError(f"{model_path}: generator {what} is {got} but {cfg_path} says {want}")
    graph = ops_to_graph(ops, out, input_ops, output_name) if "json" in formats else None
    onnx_bytes = None
    if "onnx" in formats:
        doc = (f"calokit generator {stem}: inputs {ONNX_INPUTS[0]} = noise, {ONNX_INPUTS[1]} = [energy label, 0]; "
               "output out = voxels / E_kin")
        onnx_bytes = ops_to_onnx(ops, out, input_ops, args.onnx_dynamic_batch, doc).SerializeToString()

    check = None
    if args.check:
        check = _check_exports(args, cfg, model, model_path, sizes[0], graph, onnx_bytes)
        if check is None:
            return 1

    ensure_dir(args.out)
    files = {fmt: f"{stem}.{fmt}" for fmt in formats}
    if graph is not None:
        write_json(os.path.join(args.out, files["json"]), graph)
    if onnx_bytes is not None:
        write_bytes(os.path.join(args.out, files["onnx"]), onnx_bytes)
    onnx_info = onnx_metadata(files["onnx"], *sizes, args.onnx_dynamic_batch) if onnx_bytes is not None else None
    meta = build_metadata(cfg, sizes, files, run, ckpt, iteration, args.batchnorm, check, onnx_info,
                          geometry_of(cfg, args.binning, sizes[2]))
    if graph is not None:
        meta.update(n_layers=len(graph["layers"]), n_nodes=len(graph["nodes"]))
    if any(op["kind"] == "layer_product" for op in ops):
        meta["layer_representation"] = ("the generator learns CaloShowerGAN's layer representation; the ONNX graph "
                                         "multiplies its heads (Slice, MatMul with a fixed layer-to-voxel 0/1 matrix, "
                                         "Mul), so its output is voxel / E_kin like any other calokit export")
    meta_path = os.path.join(args.out, stem + ".meta.json")
    write_json(meta_path, meta)
    stale = os.path.join(args.out, f"{stem}.json")
    if "json" in FORMATS[args.format] and "json" not in formats and os.path.isfile(stale):
        os.remove(stale)        # an earlier export's JSON beside this ONNX model would be another network
        print(f"note: removed {stale}, an earlier export (another network) that lwtnn would still load", file=sys.stderr)
    checked = f"; check: max diff {check['max_diff']:.2g} on {check['events']} inputs" if check else ""
    written = " and ".join(os.path.join(args.out, files[f]) for f in formats)
    print(f"wrote {written} (iteration {iteration}{checked}) and {meta_path}")
    return 0


def main(argv=None):
    """Run the command; returns the exit code (argparse errors included: 2) instead of exiting."""
    try:
        return run_cli(_main, argv)
    except SystemExit as stop:       # --help (0) or a usage error (2) from argparse
        return stop.code if isinstance(stop.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
