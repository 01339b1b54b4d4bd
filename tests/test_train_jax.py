"""train.py's tests again on Keras' JAX backend (CPU): the JAX training step, resume and generation are exercised in
the default suite, not only on a GPU machine. Keras fixes its backend at import, so the file runs in a subprocess."""
import os
import subprocess
import sys

import jax  # noqa: F401  (pinned in requirements.txt: a missing JAX is a failure here, not a skip)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_tests_pass_on_jax_backend(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                          str(tmp_path / "bt"), os.path.join(ROOT, "tests", "test_train.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail and "skipped" not in tail, tail
