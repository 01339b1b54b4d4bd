"""bench_evaluate.py -- wall time and peak RSS of evaluate.py on synthetic CaloChallenge files.

Prints one JSON object on stdout:
    {"ds1_photons": {"hist_s", "cls_high_s", "peak_rss_mb", ...}, "ds2": {"hist_s", "peak_rss_mb", ...}}
peak_rss_mb is the largest resident set of the evaluate.py processes of that dataset (os.wait4 of each child);
hist_rss_mb / cls_high_rss_mb split it by mode, tensorflow_rss_mb is a process that only runs one Keras layer
(the floor of cls-high), file_float64_mb the size of one input file's showers in float64 (the memory target).

prdc_s / prdc_peak_rss_mb (under ds1_photons): ``-m prdc`` on two dataset-1 photon files of full CaloChallenge
size, 121k events each (every event: the dataset-1 default), separate from peak_rss_mb (hist and cls-high).

Full mode: two 100k-event dataset-1 photon files and two 20k-event dataset-2 files (the issue's sizes), and the
two 121k-event files for prdc. --quick: 3k and 1k events, 2k for prdc. --prdc_only: only the prdc measurement.
Every measurement is a fresh ``python evaluate.py`` subprocess with a fresh output
directory (no reference cache), so the times include reading, features, histograms and all PNG plots.
cls-high runs with a reduced classifier (--cls_n_hidden 256, --cls_n_epochs 5; quick: 64 and 2) because the default
2048-unit, 50-epoch MLP takes hours on a 2-core CPU; the flags are part of the command, see CLS_FLAGS.

    python bench/bench_evaluate.py --quick
    python bench/bench_evaluate.py --keep /tmp/evalbench      # keep the synthetic files for reuse

The printed keys are listed in KEYS (numbers) and OTHER_KEYS below; tests/test_bench.py runs --quick and checks
every one of them is printed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

CLS_FLAGS = {"full": ["--cls_n_hidden", "256", "--cls_n_epochs", "5"],
             "quick": ["--cls_n_hidden", "64", "--cls_n_epochs", "2"]}


#: Linux keeps a process's peak RSS across exec, so a command started straight from this (large) process would
#: report at least this process's size; a small launcher forks the command and reports its child's figures
LAUNCHER = ("import os, sys, time; t = time.perf_counter(); pid = os.fork()\n"
            "if pid == 0: os.execv(sys.argv[1], sys.argv[1:])\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))")


#: the keys of the printed JSON object (dotted = nested), checked by tests/test_bench.py on every --quick run:
#: KEYS hold numbers, OTHER_KEYS anything else (text, true/false, objects)
KEYS = ("ds1_photons.hist_s", "ds1_photons.cls_high_s", "ds1_photons.peak_rss_mb", "ds2.hist_s", "ds2.peak_rss_mb",
        "ds1_photons.prdc_s", "ds1_photons.prdc_peak_rss_mb", "ds1_photons.prdc_events", "ds1_photons.hist_rss_mb",
        "ds1_photons.cls_high_rss_mb", "ds1_photons.tensorflow_rss_mb", "ds1_photons.file_float64_mb",
        "ds2.hist_rss_mb", "ds2.file_float64_mb")
OTHER_KEYS = ()


def run_measured(cmd):
    """Run ``cmd``; return (wall seconds, peak RSS in MB of that process and the children it waited for)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONHASHSEED="0")
    res = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env, text=True)
    lines = res.stderr.strip().splitlines()
    if res.returncode != 0 or not lines:
        print(f"bench_evaluate: {' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}",
              file=sys.stderr)
        sys.exit(1)
    wall, maxrss_kb, _ = lines[-1].split()
    return float(wall), int(maxrss_kb) / 1024.0


#: what Keras on TensorFlow alone occupies (the floor of any cls-high run, whatever the file size)
KERAS_ONLY = (f"import sys; sys.path.insert(0, {ROOT!r}); import plumbing; keras = plumbing.import_keras(); "
              "keras.layers.Dense(1)(keras.ops.ones((1, 1)))")


def n_events(path):
    import h5py

    with h5py.File(path, "r") as f:
        return f["showers"].shape[0]


def evaluate_cmd(gen, ref, mode, dataset, out, extra=()):
    return [sys.executable, os.path.join(ROOT, "evaluate.py"), "-i", gen, "-r", ref, "-m", mode, "-d", dataset,
            "--output_dir", out, *extra]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small files (< 60 s)")
    ap.add_argument("--keep", default=None, help="folder for the synthetic files (reused when present)")
    ap.add_argument("--prdc_only", action="store_true", help="only the prdc measurement")
    args = ap.parse_args(argv)
    import evalutils

    size = "quick" if args.quick else "full"
    work = args.keep or tempfile.mkdtemp(prefix="bench_evaluate_")
    os.makedirs(work, exist_ok=True)
    try:
        result = {} if args.prdc_only else measure_modes(size, work)
        n_prdc = 2000 if args.quick else 121000
        gen = evalutils.ensure_file(os.path.join(work, f"ds1_photons_{n_prdc}_gen.h5"), "1-photons", n_prdc, 1,
                                    scale=1.02)
        ref = evalutils.ensure_file(os.path.join(work, f"ds1_photons_{n_prdc}_ref.h5"), "1-photons", n_prdc, 2)
        out = tempfile.mkdtemp(prefix="out_prdc_", dir=work)
        prdc_s, rss = run_measured(evaluate_cmd(gen, ref, "prdc", "1-photons", out))
        result.setdefault("ds1_photons", {}).update(prdc_s=round(prdc_s, 2), prdc_peak_rss_mb=round(rss, 1),
                                                    prdc_events=n_prdc)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


def measure_modes(size, work):
    """hist (all datasets) and cls-high (dataset 1) wall times and peak RSS."""
    import evalutils

    n1, n2 = (3000, 1000) if size == "quick" else (100000, 20000)
    result = {}
    for tag, dataset, n in (("ds1_photons", "1-photons", n1), ("ds2", "2", n2)):
        gen = evalutils.ensure_file(os.path.join(work, f"{tag}_{n}_gen.h5"), dataset, n, 1, scale=1.02)
        ref = evalutils.ensure_file(os.path.join(work, f"{tag}_{n}_ref.h5"), dataset, n, 2)
        out = tempfile.mkdtemp(prefix=f"out_{tag}_", dir=work)
        hist_s, rss = run_measured(evaluate_cmd(gen, ref, "hist", dataset, os.path.join(out, "hist")))
        result[tag] = {"hist_s": round(hist_s, 2), "hist_rss_mb": round(rss, 1)}
        if tag == "ds1_photons":
            cls_s, rss_cls = run_measured(evaluate_cmd(gen, ref, "cls-high", dataset, os.path.join(out, "cls"),
                                                       CLS_FLAGS[size]))
            result[tag].update(cls_high_s=round(cls_s, 2), cls_high_rss_mb=round(rss_cls, 1),
                               tensorflow_rss_mb=round(run_measured([sys.executable, "-c", KERAS_ONLY])[1], 1))
            rss = max(rss, rss_cls)
        result[tag]["peak_rss_mb"] = round(rss, 1)
        result[tag]["file_float64_mb"] = round(n_events(gen) * evalutils.n_voxels(dataset) * 8 / 2**20, 1)
        shutil.rmtree(out, ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
