"""Every bench/bench_*.py runs in its --quick mode and prints every key it promises.

Each bench script lists the keys of its JSON object at module level: KEYS (numbers) and OTHER_KEYS (text,
true/false, objects), dotted for nested objects ("ds1_photons.hist_s" is result["ds1_photons"]["hist_s"]). This
test reads both lists from the script's source (no import: a script's imports run only in its own process), runs
``python bench/<script> --quick``, parses the whole stdout as one JSON object and looks every key up. A script added
later is picked up by the glob; one without KEYS fails here. No timing is asserted (the machine is shared).
"""
import ast
import glob
import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = sorted(glob.glob(os.path.join(ROOT, "bench", "bench_*.py")))


def promised_keys(path):
    """(KEYS, OTHER_KEYS) assigned at the top level of the script ``path`` (literal tuples or lists)."""
    found = {}
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in ("KEYS", "OTHER_KEYS"):
                    found[target.id] = tuple(ast.literal_eval(node.value))
    return found.get("KEYS"), found.get("OTHER_KEYS", ())


def lookup(obj, dotted):
    """obj["a"]["b"] for "a.b"; KeyError naming the dotted key if any part is missing."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def test_bench_scripts_are_found():
    names = {os.path.basename(p) for p in BENCHES}
    assert {"bench_hlf.py", "bench_voxelise.py", "bench_evaluate.py", "bench_train.py", "bench_export.py",
            "bench_bigfile.py", "bench_summary.py"} <= names


def test_promised_keys_are_read_from_the_script(tmp_path):
    script = tmp_path / "bench_x.py"
    script.write_text('"""doc"""\nKEYS = ("a", "b.c")\nOTHER_KEYS = ["d"]\n\ndef main():\n    KEYS = ("no",)\n')
    assert promised_keys(str(script)) == (("a", "b.c"), ("d",))
    assert lookup({"a": 1, "b": {"c": 2.5}}, "b.c") == 2.5
    with pytest.raises(KeyError):
        lookup({"a": 1, "b": {"c": 2.5}}, "b.d")
    with pytest.raises(KeyError):
        lookup({"a": 1}, "a.b")                          # a number has no parts


@pytest.mark.parametrize("path", BENCHES, ids=[os.path.basename(p) for p in BENCHES])
def test_bench_quick_mode_prints_every_promised_key(path):
    keys, other = promised_keys(path)
    assert keys, f"{os.path.basename(path)} defines no module-level KEYS (the numbers its JSON object promises)"
    env = dict(os.environ, MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, path, "--quick"], capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, f"{os.path.basename(path)} --quick exited {res.returncode}: {res.stderr[-2000:]}"
    result = json.loads(res.stdout)             # the whole of stdout: one JSON object, nothing else
    assert isinstance(result, dict)
    for key in keys:
        value = lookup(result, key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)
    for key in other:
        lookup(result, key)
    print(f"{os.path.basename(path)} --quick: {seconds:.1f} s")    # shown with pytest -s (measurements)


DOCTESTED = [p for p in BENCHES if ">>>" in open(p).read()]


@pytest.mark.parametrize("path", DOCTESTED, ids=[os.path.basename(p) for p in DOCTESTED])
def test_bench_docstring_examples(path):
    """Every ``>>>`` example of a bench script runs and prints what it shows (in its own process, as the script
    imports what it needs when it runs)."""
    name = os.path.splitext(os.path.basename(path))[0]
    code = (f"import doctest, sys; sys.path.insert(0, {os.path.dirname(path)!r}); import {name}; "
            f"r = doctest.testmod({name}, optionflags=doctest.ELLIPSIS); print(r); sys.exit(int(r.failed > 0))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "attempted=0" not in res.stdout
