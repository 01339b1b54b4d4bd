"""train.py's tests again on Keras' JAX backend (CPU): the JAX training step, resume and generation are exercised in
the default suite, not only on a GPU machine. Keras fixes its backend at import, so the file runs in a subprocess.

The default run takes the tests of test_train.py that exercise what differs between backends (JAX_SUBSET: the
compiled training step, reproducible across processes and resumed exactly after a SIGKILL, generation on the
compiled and the numpy path, batch-norm in both training modes) and of test_recipes.py those of the step's own
critic inputs and its leaking ReLU gradient (JAX_RECIPES), all in one process; ``-m slow`` runs every test of
test_train.py on JAX. The others (bad inputs, settings, schedules, network choice from the XML, training beats untrained) still run on
TensorFlow in the default suite.
"""
import os
import re
import subprocess
import sys

import jax  # noqa: F401  (pinned in requirements.txt: a missing JAX is a failure here, not a skip)
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TESTS = os.path.join(ROOT, "tests", "test_train.py")

#: the backend-specific part of test_train.py (on JAX, 2-core machine under load: 147 s of the whole file's 285 s).
#: test_kill_and_resume also proves two processes with one seed train identically (the resumed run's losses
#: before the kill equal the uninterrupted run's bit for bit), so test_same_seed_same_losses stays in the slow run.
JAX_SUBSET = ("test_runs_on_the_requested_backend", "test_generator_contract_and_generate",
              "test_numpy_generation_path_covers_every_generator_variant", "test_run_directory_layout",
              "test_kill_and_resume", "test_batchnorm_inference_mode_keeps_statistics")
#: test_recipes.py's tests of the JAX step's own critic inputs (E_tot and sparsity counts, computed as numpy
#: computes them, in a run that trains) and of its generator update with the leaking ReLU gradient (exact resume on
#: JAX is test_kill_and_resume's)
RECIPE_TESTS = os.path.join(ROOT, "tests", "test_recipes.py")
JAX_RECIPES = ("test_critic_sparsity_input_is_the_standardised_soft_count_in_the_backend",
               "test_leaky_gradient_relu_values_and_slopes", "test_relu_gradient_leak_revives_a_dead_voxel")


def run_on_jax(tmp_path, *targets):
    """pytest on ``targets`` with KERAS_BACKEND=jax in a fresh process; returns (passed count, output tail)."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "--basetemp", str(tmp_path / "bt"), *targets],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail and "skipped" not in tail, tail
    return int(re.search(r"(\d+) passed", tail).group(1)), tail


def test_backend_specific_train_tests_pass_on_jax_backend(tmp_path):
    """JAX_SUBSET and JAX_RECIPES in one process (one JAX start)."""
    targets = []
    for path, names in ((TRAIN_TESTS, JAX_SUBSET), (RECIPE_TESTS, JAX_RECIPES)):
        with open(path) as f:
            defined = set(re.findall(r"^def (test_\w+)", f.read(), re.M))
        assert set(names) <= defined, set(names) - defined      # a renamed test cannot drop out silently
        targets += [f"{path}::{name}" for name in names]
    passed, tail = run_on_jax(tmp_path, *targets)
    assert passed == len(targets), tail


@pytest.mark.slow
def test_train_tests_pass_on_jax_backend(tmp_path):
    passed, tail = run_on_jax(tmp_path, TRAIN_TESTS)
    assert passed >= 22, tail
