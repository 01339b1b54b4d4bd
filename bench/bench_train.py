"""bench_train.py -- training iterations/s and generation showers/s of train.py (dataset-1 photon sizes).

Training: one iteration = 5 critic updates + 1 generator update at batch 128 with the FastCaloGAN V2
photon networks (368 voxels, latent 50, swish + batch-norm generator), on whatever backend KERAS_BACKEND
selects; compile time is excluded. Generation: ``plumbing.generate`` at batch 1, 100 and 10,000 (noise drawn,
forward pass, numpy result), showers per second. Prints one JSON object on stdout:

    {"backend": ..., "device": ..., "train_iterations_per_s": ...,
     "generate_showers_per_s": {"1": ..., "100": ..., "10000": ...}}

Usage:
    python bench/bench_train.py [--quick] [--plain]  # --quick: under a minute on a 2-core CPU; --plain: also
                                                     # plain Keras generation (predict_on_batch), same run
    KERAS_BACKEND=jax python bench/bench_train.py    # on a GPU

The printed keys are listed in KEYS (numbers) and OTHER_KEYS below; tests/test_bench.py runs --quick and checks
every one of them is printed.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402
import train  # noqa: E402

N_VOXELS, LATENT = 368, 50


#: the keys of the printed JSON object (dotted = nested), checked by tests/test_bench.py on every --quick run:
#: KEYS hold numbers, OTHER_KEYS anything else (text, true/false, objects)
KEYS = ("train_iterations_per_s", "generate_showers_per_s.1", "generate_showers_per_s.100",
        "generate_showers_per_s.10000")
OTHER_KEYS = ("backend", "device")


def device_name(backend):
    if backend == "jax":
        import jax
        d = jax.devices()[0]
        if d.platform != "cpu":
            return f"{d.platform}: {getattr(d, 'device_kind', d)}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} cores)"


def bench_training(iterations, seed=1):
    cfg = {"n_voxels": N_VOXELS, "latent_dim": LATENT, "batch_size": 128, "n_critic": 5, "lambda_gp": 10.0,
           "lr": 1e-4, "beta1": 0.55, "beta2": 0.999, "noise": {"mean": 0.5, "std": 0.5},
           "generator": {"hidden": [50, 100, 200], "activation": "swish", "batchnorm": True,
                         "output_activation": "relu"},
           "critic": {"hidden": [N_VOXELS] * 3, "activation": "relu"}}
    rng = np.random.default_rng(seed)
    n = 20000
    voxels = (rng.random((n, N_VOXELS), dtype=np.float32) * (rng.random((n, N_VOXELS)) < 0.4)) * 0.01
    label = rng.random(n).astype(np.float32)
    train._keras().utils.set_random_seed(seed)
    if train._backend() == "tensorflow":            # as train.py runs by default
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    gen, critic = train.networks_from_config(cfg)
    step = train.make_train_step(gen, critic, train.make_optimizer(cfg), train.make_optimizer(cfg), cfg,
                                 voxels, train.condition_vector(label), jit=True)
    for _ in range(3):                                  # compile + warm-up
        np.asarray(step(*train.draw_batches(rng, n, cfg)))
    t0 = time.perf_counter()
    out = [step(*train.draw_batches(rng, n, cfg)) for _ in range(iterations)]
    np.asarray(out[-1])
    return iterations / (time.perf_counter() - t0)


def plain_generate(g, labels, rng, batch_size):
    """What a plain Keras user writes: numpy noise and ``predict_on_batch`` (the comparison for plumbing.generate)."""
    z = rng.normal(0.5, 0.5, (labels.shape[0], LATENT)).astype(np.float32)
    return g.predict_on_batch([z, plumbing.condition_vector(labels)])


def bench_generation(batch, seconds, seed=2, fn=plumbing.generate):
    train._keras().utils.set_random_seed(seed)
    g = train.build_generator(N_VOXELS, LATENT, 2, (50, 100, 200), "swish", True, "relu")
    rng = np.random.default_rng(seed)
    labels = rng.random(batch).astype(np.float32)
    for _ in range(3):
        fn(g, labels, rng, batch_size=batch)
    n, t0 = 0, time.perf_counter()
    while True:
        fn(g, labels, rng, batch_size=batch)
        n += 1
        dt = time.perf_counter() - t0
        if dt > seconds and n >= 5:
            return n * batch / dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short measurement (under a minute on 2 CPU cores)")
    p.add_argument("--plain", action="store_true",
                   help="also time plain Keras generation (predict_on_batch) in the same run: plain_generate_showers_per_s")
    args = p.parse_args(argv)
    iterations = 50 if args.quick else 1000          # --quick (the test suite): the same numbers, measured briefly
    seconds = 0.5 if args.quick else 8.0
    backend = train._backend()
    result = {"backend": backend, "device": device_name(backend),
              "train_iterations_per_s": round(bench_training(iterations), 2),
              "generate_showers_per_s": {str(b): round(bench_generation(b, seconds), 1) for b in (1, 100, 10000)}}
    if args.plain:
        result["plain_generate_showers_per_s"] = {str(b): round(bench_generation(b, seconds, fn=plain_generate), 1)
                                                  for b in (1, 100, 10000)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
