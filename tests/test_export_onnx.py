"""export_lwtnn.py, ONNX side: the ONNX model run by ONNX Runtime reproduces Keras and the lwtnn JSON.

Every generator variant of test_export_lwtnn.py is exported from the same op list to both formats. ONNX Runtime
runs the ONNX model one row per call with the fixed [1, n] shapes, as FastCaloSim's TFCSONNXHandler feeds it,
on 1,000 seeded inputs: it must equal Keras within 1e-5, and the lwtnn JSON (numpy evaluator) within
JSON_TOL. The ONNX file is float32 throughout while the JSON evaluator (like lwtnn in C++) computes in float64,
so the two differ by float32 rounding: Keras itself, also float32, differs from the evaluator by up to
1.4e-6 on these networks. That the two writers hold the same network is checked exactly: each Gemm's weights
and bias are the JSON layer's numbers rounded to float32, and the activations follow the JSON's one for one.
"""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import export_lwtnn as ex
from test_export_lwtnn import (CONFIG, LATENT, N_INPUTS, N_VOX, STEM, TOL, VARIANTS, _unsupported_model,
                               make_generator, set_random_bn_statistics)

#: ONNX (float32 arithmetic) vs the float64 JSON evaluator, relative where |value| > 1 (the --tolerance
#: convention). Measured on these variants: at most 1.2e-6; float32 resolution at 1-2 is 1.2e-7-2.4e-7.
JSON_TOL = 2e-6

#: lwtnn activation -> the ONNX operators that compute it after a Gemm
ONNX_OPS_OF = {"linear": [], "rectified": ["Relu"], "sigmoid": ["Sigmoid"], "tanh": ["Tanh"],
               "softmax": ["Softmax"], "leakyrelu": ["LeakyRelu"], "elu": ["Elu"], "swish": ["Sigmoid", "Mul"]}


def inputs(n=N_INPUTS, seed=7, latent=LATENT):
    noise, cond = ex.random_inputs(latent, n, seed)
    return noise.astype(np.float32), cond.astype(np.float32)


def assert_interface(model, latent=LATENT, n_out=N_VOX, batch=1):
    """What TFCSONNXHandler relies on: inputs named Noise/mycond (the names it looks up in the map
    TFCSEnergyAndHitGANV2 fills; node_0/node_1 would throw) float32 [1, n] in order, one float32 output 'out'."""
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 7
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    shapes = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        assert t.elem_type == onnx.TensorProto.FLOAT, vi.name
        shapes[vi.name] = [d.dim_param or d.dim_value for d in t.shape.dim]
    assert [vi.name for vi in model.graph.input] == ["Noise", "mycond"] == list(ex.ONNX_INPUTS)
    assert [vi.name for vi in model.graph.output] == ["out"]
    assert shapes == {"Noise": [batch, latent], "mycond": [batch, 2], "out": [batch, n_out]}


def assert_same_network(model, graph):
    """Each Gemm = the JSON dense layer rounded to float32; the activations follow the JSON's, in order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    dense = [layer for layer in graph["layers"] if layer["architecture"] == "dense" and layer["weights"]]
    assert len(gemms) == len(dense)
    for node, layer in zip(gemms, dense):
        w, b = inits[node.input[1]], inits[node.input[2]]
        assert w.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(w, np.float32(layer["weights"]).reshape(len(layer["bias"]), -1))
        np.testing.assert_array_equal(b, np.float32(layer["bias"]))
    expected = []
    for layer in graph["layers"]:
        if layer["architecture"] == "normalization":
            expected += ["Mul", "Add"]
            continue
        act = layer["activation"]
        fn = act["function"] if isinstance(act, dict) else act
        expected += (["Gemm"] if layer["weights"] else []) + ONNX_OPS_OF[fn]
        if fn == "swish" and act["alpha"] != 1.0:
            expected.insert(len(expected) - 2, "Mul")
    assert [n.op_type for n in model.graph.node] == ["Concat"] + expected


# ----------------------------------------------------------------------------------------------
# every generator variant: ONNX Runtime == Keras (1e-5) and == the lwtnn JSON, row by row with [1, n]

@pytest.mark.parametrize("hidden_act,batchnorm,out_act", VARIANTS)
def test_onnx_reproduces_keras_and_json(hidden_act, batchnorm, out_act):
    model = make_generator(hidden_act, batchnorm, out_act, seed=len(hidden_act) + 3 * batchnorm)
    noise, cond = inputs()
    ref = ex.keras_predict(model, noise, cond)
    assert np.std(ref) > 1e-3                                     # a non-degenerate comparison
    for fold in ((True, False) if batchnorm else (True,)):
        proto = ex.export_onnx(model, fold=fold)
        assert_interface(proto)
        graph = json.loads(ex._format_json(ex.export_model(model, fold=fold)))   # as written to disk
        assert_same_network(proto, graph)
        got = ex.run_onnx_rows(ex.onnx_session(proto.SerializeToString()), noise, cond)
        assert got.shape == (N_INPUTS, N_VOX)
        assert np.max(np.abs(got - ref)) < TOL, (hidden_act, batchnorm, out_act, fold)
        assert ex.max_difference(got, ex.evaluate_graph(graph, noise, cond)) < JSON_TOL


def test_batched_run_with_the_dynamic_batch_flag_equals_the_row_by_row_run():
    model = make_generator("swish", True, "bn+swish", seed=3)
    noise, cond = inputs()
    fixed = ex.run_onnx_rows(ex.onnx_session(ex.export_onnx(model)), noise, cond)
    proto = ex.export_onnx(model, dynamic_batch=True)
    assert_interface(proto, batch="batch")
    session = ex.onnx_session(proto)
    batched = session.run(["out"], {"Noise": noise, "mycond": cond})[0]
    assert batched.dtype == np.float32 and batched.shape == (N_INPUTS, N_VOX)
    np.testing.assert_allclose(batched, fixed, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ex.run_onnx_rows(session, noise[:50], cond[:50]), fixed[:50], rtol=0, atol=1e-7)
    with pytest.raises(Exception, match="invalid dimensions"):     # the default file takes one row only
        ex.onnx_session(ex.export_onnx(model)).run(["out"], {"Noise": noise[:2], "mycond": cond[:2]})


def test_train_generators_export_exactly():
    import train

    noise, cond = inputs(300)
    for activation, batchnorm in (("swish", True), ("relu", False)):
        model = train.build_generator(N_VOX, latent_dim=LATENT, activation=activation, batchnorm=batchnorm)
        set_random_bn_statistics(model, seed=4)
        ref = ex.keras_predict(model, noise, cond)
        proto = ex.export_onnx(model)
        assert_interface(proto)
        got = ex.run_onnx_rows(ex.onnx_session(proto), noise, cond)
        assert np.max(np.abs(got - ref)) < TOL


# ----------------------------------------------------------------------------------------------
# the activations and the batch-norm layer, by hand

def _ops_net(n, *acts, bn=None):
    """Simplified ops by hand: noise (n) and condition (2) -> concat -> [batch-norm] -> the activations."""
    ops = [{"kind": "input", "src": [], "size": n, "layer": "noise"},
           {"kind": "input", "src": [], "size": 2, "layer": "condition"},
           {"kind": "concat", "src": [0, 1], "size": n + 2, "layer": "cat"}]
    if bn is not None:
        ops.append(dict(bn, kind="bn", src=[len(ops) - 1], size=n + 2, layer="bn"))
    for k, act in enumerate(acts):
        ops.append({"kind": "act", "src": [len(ops) - 1], "size": n + 2, "layer": f"a{k}", "act": act})
    return ops, len(ops) - 1, [0, 1]


@pytest.mark.parametrize("act", [("rectified", None), ("sigmoid", None), ("tanh", None), ("softmax", None),
                                 ("leakyrelu", 0.0), ("leakyrelu", 0.1), ("elu", 0.5), ("swish", 1.0),
                                 ("swish", 2.0), ("linear", None)])
def test_each_activation_follows_lwtnn(act):
    x = np.array([[-31.0, -30.0, -2.0, -0.5, 0.0, 0.7, 1.5, 29.0, 31.0, 3.0]], np.float32)
    ops, out, ins = _ops_net(8, act)
    proto = ex.ops_to_onnx(ops, out, ins)
    got = ex.run_onnx_rows(ex.onnx_session(proto), x[:, :8], x[:, 8:])[0]
    want = ex.apply_activation(ex.lwtnn_activation(*act), x.astype(np.float64))[0]
    # float32, and ONNX Runtime's sigmoid/exp are approximations good to ~1e-6 relative; lwtnn clips the
    # sigmoid to exactly 0 below -30 where ONNX Runtime gives 1e-14: both well inside this tolerance
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-11)
    if act[0] == "linear":
        assert [n.op_type for n in proto.graph.node] == ["Concat", "Identity"]


def test_unfolded_batchnorm_is_mul_add_by_the_formula():
    rng = np.random.default_rng(2)
    bn = {"gamma": rng.uniform(0.5, 2, 5), "beta": rng.normal(0, 1, 5), "mean": rng.normal(0, 1, 5),
          "var": rng.uniform(0.2, 3, 5), "eps": 1e-3}
    ops, out, ins = _ops_net(3, bn=bn)
    x = rng.normal(0, 1, (4, 5)).astype(np.float32)
    got = ex.run_onnx_rows(ex.onnx_session(ex.ops_to_onnx(ops, out, ins)), x[:, :3], x[:, 3:])
    want = (x - bn["mean"]) / np.sqrt(bn["var"] + bn["eps"]) * bn["gamma"] + bn["beta"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_non_finite_parameters_are_refused():
    model = make_generator("relu", False, "relu", seed=1)
    dense = next(layer for layer in model.layers if layer.__class__.__name__ == "Dense")
    kernel, bias = dense.get_weights()
    kernel[0, 0] = np.nan
    dense.set_weights([kernel, bias])
    with pytest.raises(ex.UserError, match="NaN"):
        ex.export_onnx(model)


# ----------------------------------------------------------------------------------------------
# the command line: --format, the meta JSON, --check, refusals

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """config.json + ckpt_100 holding a BN + swish generator with BN + swish at the output."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(CONFIG))
    (run / "ckpt_100").mkdir()
    model = make_generator("swish", True, "bn+swish", seed=11)
    model.save(str(run / "ckpt_100" / "generator.keras"))
    return run, model


def _session_of_file(path):
    return ex.onnx_session(path.read_bytes())


@pytest.mark.parametrize("fmt,files", [("both", ["json", "meta.json", "onnx"]), ("json", ["json", "meta.json"]),
                                       ("onnx", ["meta.json", "onnx"])])
def test_cli_format_selects_the_files(run_dir, tmp_path, fmt, files):
    run, model = run_dir
    out = tmp_path / "out"
    args = ["--run", str(run), "--out", str(out), "--check"] + ([] if fmt == "both" else ["--format", fmt])
    assert ex.main(args) == 0
    assert sorted(os.listdir(out)) == [f"{STEM}.{f}" for f in files]     # no temp files left
    meta = json.loads((out / f"{STEM}.meta.json").read_text())
    assert meta["files"] == {f: f"{STEM}.{f}" for f in ("json", "onnx") if f in files}
    assert meta["network"] == f"{STEM}.{'json' if 'json' in files else 'onnx'}"
    assert meta["check"]["events"] == 1000 and meta["check"]["max_diff"] < TOL
    assert set(k for k in meta["check"] if k.startswith("max_diff_")) == {f"max_diff_{f}" for f in files
                                                                          if f != "meta.json"}
    noise, cond = inputs(200, seed=5)
    ref = ex.keras_predict(model, noise, cond)
    if "onnx" in files:
        assert meta["onnx"] == {
            "file": f"{STEM}.onnx", "opset": 13, "ir_version": 7, "element_type": "float32",
            "inputs": [{"name": "Noise", "shape": [1, LATENT], "content": "noise"},
                       {"name": "mycond", "shape": [1, 2], "content": "[energy label, 0]"}],
            "output": {"name": "out", "shape": [1, N_VOX],
                       "labels": f"out_0..out_{N_VOX - 1} (flat, '<output name>_<i>')"},
            "batch": meta["onnx"]["batch"]}
        assert meta["check"]["max_diff_onnx"] < TOL
        proto = onnx.load(str(out / f"{STEM}.onnx"))
        assert_interface(proto)
        got = ex.run_onnx_rows(_session_of_file(out / f"{STEM}.onnx"), noise, cond)
        assert np.max(np.abs(got - ref)) < TOL
    else:
        assert "onnx" not in meta
    if "json" in files:
        graph = json.loads((out / f"{STEM}.json").read_text())
        assert np.max(np.abs(ex.evaluate_graph(graph, noise, cond) - ref)) < TOL
        if "onnx" in files:
            assert_same_network(proto, graph)


def test_cli_dynamic_batch_flag(run_dir, tmp_path):
    run, model = run_dir
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--out", str(out), "--format", "onnx", "--onnx-dynamic-batch",
                    "--batchnorm", "normalization", "--check"]) == 0
    meta = json.loads((out / f"{STEM}.meta.json").read_text())
    assert meta["onnx"]["inputs"][0]["shape"] == ["batch", LATENT] and meta["onnx"]["output"]["shape"] == ["batch", N_VOX]
    assert meta["batchnorm"] == "normalization" and meta["check"]["max_diff_onnx"] < TOL
    proto = onnx.load(str(out / f"{STEM}.onnx"))
    assert_interface(proto, batch="batch")
    assert sum(n.op_type == "Gemm" for n in proto.graph.node) == 4
    assert sum(n.op_type == "Add" for n in proto.graph.node) == 4                # 4 batch-norms kept as Mul + Add
    noise, cond = inputs(300, seed=9)
    got = _session_of_file(out / f"{STEM}.onnx").run(["out"], {"Noise": noise, "mycond": cond})[0]
    assert np.max(np.abs(got - ex.keras_predict(model, noise, cond))) < TOL


def test_cli_onnx_check_failure_exits_1_and_writes_nothing(run_dir, tmp_path, capsys):
    run, _ = run_dir
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--out", str(out), "--format", "onnx", "--check", "--tolerance", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert "ONNX model (ONNX Runtime) differs from Keras" in err and err.count("\n") == 1
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("fmt", ["onnx", "both"])
@pytest.mark.parametrize("kind,named", [("layer", "my_layer_norm"), ("activation", "dense_gelu")])
def test_unsupported_layer_exits_2_naming_it_and_writes_neither_file(tmp_path, capsys, fmt, kind, named):
    run = tmp_path / "run"
    (run / "ckpt_5").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(CONFIG))
    _unsupported_model(kind).save(str(run / "ckpt_5" / "generator.keras"))
    out = tmp_path / "out"
    assert ex.main(["--run", str(run), "--out", str(out), "--format", fmt, "--check"]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_format_is_a_usage_error(run_dir, tmp_path):
    run, _ = run_dir
    assert ex.main(["--run", str(run), "--out", str(tmp_path / "o"), "--format", "pb"]) == 2
    assert not (tmp_path / "o").exists()
