"""Shared pytest set-up: repository root on sys.path, quiet TensorFlow, Agg plots, and the order that lets
`make test` spread the suite over every core (pytest-xdist, ``-n <cores> --dist loadfile --no-loadscope-reorder``).

On several workers each test file runs whole on one worker, so a module-scoped fixture (test_end_to_end's `make all`
chain, test_train's reference run, ...) is built once, not once per worker. The files that take longest come first
(HEAVY_FIRST), so no long file starts last while the other worker idles; within a file the order is unchanged (a
plain ``pytest`` run gets the same order).

No test shares a file or folder with another outside its own tmp_path (test_properties writes no example
database; pytest gives each worker its own basetemp). The wall-clock checks are watchdogs far above the idle time
(`make condor DEMO=barrel` < 30 s for ~1 s of work; a training's first checkpoint within 120 s; kills that wait for
progress up to 180 s), so a second worker on the same cores cannot trip them.
"""
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

#: the longest modules of the default run, longest first (pytest --durations, 2-core machine); the rest follow
#: in their usual order
HEAVY_FIRST = ("test_end_to_end.py", "test_train.py", "test_train_jax.py", "test_bench.py", "test_evaluate.py",
               "test_layout.py", "test_recipes.py", "test_select_epoch.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    def rank(pair):
        index, item = pair
        name = item.path.name
        return (HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST), index)

    items[:] = [item for _, item in sorted(enumerate(items), key=rank)]
