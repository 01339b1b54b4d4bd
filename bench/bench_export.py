"""bench_export.py -- export_lwtnn.py on a dataset-1-photon-sized generator: wall time and file sizes.

Builds train.py's generator for the CaloChallenge dataset-1 photon voxelisation (368 voxels, latent 50, hidden
50-100-200, swish + batch-norm, ReLU output) with random weights and random batch-norm statistics, saves it as a
checkpoint of a scratch run directory, then runs ``python export_lwtnn.py`` as a subprocess (what a user or
``make`` pays, Python start and imports included) once per setting: ``--format both --check`` (the Makefile's
call), ``--format both``, ``--format json``, ``--format onnx``. Reports the wall time of each, the sizes of the
JSON, ONNX and meta files, the --check differences, the in-process time of each writer alone, and ONNX
Runtime's time for 1000 rows one per call (as --check and FastCaloSim run it) and in one call.

Prints one JSON object on stdout:
    {"voxels", "latent", "hidden", "parameters", "runs": {setting: seconds}, "bytes": {json, onnx, meta},
     "check": {...}, "writer_s": {"walk", "json", "onnx", "ort_1000_rows_one_per_call", "ort_1000_rows_one_call",
     "json_evaluator_1000_rows"}}

    python bench/bench_export.py
    python bench/bench_export.py --quick               # only the Makefile's call (--format both --check)

The printed keys are listed in KEYS (numbers) and OTHER_KEYS below; tests/test_bench.py runs --quick and checks
every one of them is printed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

N_VOXELS, LATENT, HIDDEN = 368, 50, (50, 100, 200)
CONFIG = {"particle": "photon", "pid": 22, "eta_min": 20, "eta_max": 25, "range": "all", "latent_dim": LATENT,
          "n_voxels": N_VOXELS, "label_scheme": "V2", "ekin_min": 256.0, "ekin_max": 4194304.0,
          "binning": "binning/binning_dataset_1_photons.xml", "noise": {"mean": 0.5, "std": 0.5}}
SETTINGS = {"both --check": ["--format", "both", "--check"], "both": ["--format", "both"],
            "json": ["--format", "json"], "onnx": ["--format", "onnx"]}


#: the keys of the printed JSON object (dotted = nested), checked by tests/test_bench.py on every --quick run:
#: KEYS hold numbers, OTHER_KEYS anything else (text, true/false, objects)
KEYS = ("voxels", "latent", "parameters", "runs.both --check", "bytes.json", "bytes.onnx", "bytes.meta",
        "check.max_diff", "check.max_diff_json", "check.max_diff_onnx", "check.tolerance", "writer_s.walk",
        "writer_s.json", "writer_s.onnx", "writer_s.ort_1000_rows_one_per_call", "writer_s.ort_1000_rows_one_call",
        "writer_s.json_evaluator_1000_rows")
OTHER_KEYS = ("hidden",)


def make_run(run):
    """config.json + ckpt_1000/generator.keras of a dataset-1-photon-sized generator; returns the model."""
    import train

    train._keras().utils.set_random_seed(1)
    model = train.build_generator(N_VOXELS, LATENT, 2, HIDDEN, "swish", True, "relu")
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), rng.normal(0, 0.5, n),
                               rng.uniform(0.3, 2.0, n)])
    os.makedirs(os.path.join(run, "ckpt_1000"))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    model.save(os.path.join(run, "ckpt_1000", "generator.keras"))
    return model


def writer_times(model):
    """In-process seconds of the Keras walk and of each writer (best of 3)."""
    import export_lwtnn as ex

    def best(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ops, out, ins, name = ex.export_ops(model)
    noise, cond = (a.astype(np.float32) for a in ex.random_inputs(LATENT, 1000, 1))
    rows = ex.onnx_session(ex.ops_to_onnx(ops, out, ins))
    batched = ex.onnx_session(ex.ops_to_onnx(ops, out, ins, dynamic_batch=True))
    return {"walk": best(lambda: ex.export_ops(model)),
            "json": best(lambda: ex._format_json(ex.ops_to_graph(ops, out, ins, name))),
            "onnx": best(lambda: ex.ops_to_onnx(ops, out, ins).SerializeToString()),
            "ort_1000_rows_one_per_call": best(lambda: ex.run_onnx_rows(rows, noise, cond)),
            "ort_1000_rows_one_call": best(lambda: batched.run(["out"], {"Noise": noise, "mycond": cond})),
            "json_evaluator_1000_rows": best(lambda: ex.evaluate_graph(ex.ops_to_graph(ops, out, ins, name),
                                                                       noise, cond))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="run only --format both --check")
    settings = {k: v for k, v in SETTINGS.items() if not p.parse_args().quick or k == "both --check"}
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        model = make_run(run)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        result = {"voxels": N_VOXELS, "latent": LATENT, "hidden": list(HIDDEN),
                  "parameters": int(model.count_params()), "runs": {}}
        for label, flags in settings.items():
            out = os.path.join(tmp, "out_" + label.replace(" ", "_").replace("-", ""))
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, os.path.join(ROOT, "export_lwtnn.py"), "--run", run,
                                  "--out", out, *flags], capture_output=True, text=True, env=env)
            result["runs"][label] = round(time.perf_counter() - t0, 2)
            if res.returncode != 0:
                sys.exit(f"export_lwtnn.py {' '.join(flags)} failed: {res.stderr.strip()}")
            if label == "both --check":
                files = {f.rsplit(".", 1)[-1] if not f.endswith(".meta.json") else "meta": os.path.join(out, f)
                         for f in os.listdir(out)}
                result["bytes"] = {k: os.path.getsize(v) for k, v in sorted(files.items())}
                with open(files["meta"]) as f:
                    result["check"] = json.load(f)["check"]
        result["writer_s"] = {k: round(v, 3) for k, v in writer_times(model).items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
