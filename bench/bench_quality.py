"""bench_quality.py -- how well a training recipe learns the showers: several seeds, one budget, JSON + curves.

For each recipe (a ``train.py --recipe`` name, or NAME=ARGS for any set of train.py flags) and each seed, the
demo slice (toy photons, |eta| 0.20-0.25, by default) is trained for the budget, the epoch is chosen as
``make all`` chooses it (select_epoch.py on the training sample, the demo's selection flags), and the chosen
generator is evaluated against held-out toy showers of another seed with one fixed evaluation seed
(evaluate.py: hist-chi, cls-high, fpd). A recipe that learns another representation of the showers (train.py's
RECIPES ``norm``: ``caloshowergan`` learns the layer representation) trains on its own training file, prepared
with ``preprocess.py prepare --norm``; a NAME=ARGS recipe may pick one with ``--norm ekin|layer`` among its ARGS
(a bench option, not passed to train.py). Per recipe and seed it records:

* ``cls_high_auc``, ``etot_einc_separation`` (overall), ``fpd_x1e3``, ``separation_power_mean``;
* per energy: the E_tot/E_inc separation power, the generated / reference resolution RMS(E_tot)/<E_tot>
  (``resolution_ratio``) and response <E_tot> (``response_ratio``); ``worst_resolution_ratio_ge_1gev`` is the
  largest max(ratio, 1/ratio) over the energies >= 1 GeV;
* ``train_iterations_per_s``, ``train_cpu_s`` (process CPU seconds of the training), ``best_iteration``;
* a learning curve: every few checkpoints (``--curve-points``), E_tot/E_inc separation and the resolution ratio of
  that checkpoint (generated like the held-out sample), against the iteration and the training CPU seconds; with
  ``--curve-shapes`` also evaluate.py's mean separation power and FPD there.

and per recipe the mean and the spread (standard deviation, min, max) over seeds. Jobs run in parallel
(``--jobs``, one TensorFlow thread each). The data are made once in ``--work`` (toy hits, voxels, training
file, as ``make all`` makes them) and reused.

Prints one JSON object on stdout (also written to OUT/quality.json); OUT/learning_curves.png shows the curves,
one line per recipe (mean over seeds), the seed spread (min..max) shaded.

Usage:
    python bench/bench_quality.py --quick                       # tiny data and budget, 1 seed, in a temp folder
    python bench/bench_quality.py --recipes "fastcalogan=--recipe fastcalogan --iterations 1500" calokit
    python bench/bench_quality.py --recipes calokit "summaries=--recipe calokit --critic-summaries"
    python bench/bench_quality.py --recipes calokit caloshowergan "heads-calokit=--recipe calokit --norm layer"
    python bench/bench_quality.py --ablation                    # the table of docs/recipes-and-quality.md
"""
import argparse
import contextlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: the keys of the printed JSON object (dotted: nested), numbers in KEYS (those of the default recipes'
#: mean and spread over seeds), the rest in OTHER_KEYS; every recipe has the same under recipes.<name>
KEYS = ('budget.iterations', 'eval_seed', 'recipes.fastcalogan.mean.cls_high_auc',
        'recipes.fastcalogan.mean.etot_einc_separation', 'recipes.fastcalogan.mean.separation_power_mean',
        'recipes.fastcalogan.mean.fpd_x1e3', 'recipes.fastcalogan.mean.worst_resolution_ratio_ge_1gev',
        'recipes.fastcalogan.mean.train_iterations_per_s', 'recipes.fastcalogan.mean.train_cpu_s',
        'recipes.fastcalogan.mean.best_iteration', 'recipes.calokit.mean.cls_high_auc',
        'recipes.calokit.mean.etot_einc_separation', 'recipes.calokit.mean.separation_power_mean',
        'recipes.calokit.mean.fpd_x1e3', 'recipes.calokit.mean.worst_resolution_ratio_ge_1gev',
        'recipes.calokit.mean.train_iterations_per_s', 'recipes.calokit.mean.train_cpu_s',
        'recipes.calokit.mean.best_iteration', 'recipes.fastcalogan.spread.cls_high_auc.std',
        'recipes.fastcalogan.spread.etot_einc_separation.std', 'recipes.calokit.spread.cls_high_auc.std',
        'recipes.calokit.spread.etot_einc_separation.std')
OTHER_KEYS = ("slice", "seeds", "recipes.calokit.seeds", "recipes.calokit.mean.per_energy", "recipes.calokit.train_args")
#: the scalar metrics of each seed, averaged (mean) and spread over seeds per recipe
SCALARS = ("cls_high_auc", "etot_einc_separation", "separation_power_mean", "fpd_x1e3",
           "worst_resolution_ratio_ge_1gev", "train_iterations_per_s", "train_cpu_s", "best_iteration",
           "voxels_ge_1mev_gen", "voxels_ge_1mev_ref", "voxels_ge_1mev_ratio")
#: ``--ablation``: FastCaloGAN's recipe at the same training CPU time (5 critic steps cost about twice as much per
#: iteration as 2), calokit's, and the steps between them one ingredient at a time
ABLATION = {
    "fastcalogan": "--recipe fastcalogan --iterations 1500",
    "2-critic-lr2e-4": "--recipe fastcalogan --n-critic 2 --lr 2e-4",
    "2-critic-lr2e-4+decay": "--recipe fastcalogan --n-critic 2 --lr 2e-4 --lr-decay 0.1",
    "2-critic-lr2e-4+no-bn": "--recipe fastcalogan --n-critic 2 --lr 2e-4 --no-batchnorm",
    "calokit": "--recipe calokit",
    "calokit+no-bn": "--recipe calokit --no-batchnorm",
    "calokit+no-bn+lr4e-4": "--recipe calokit --no-batchnorm --lr 4e-4",
}
DEMO_SELECT_ARGS = "--overflow --window mean"
CLS_ARGS = "--cls_n_hidden 512"
#: FPD with evaluate.py's batch sizes but 4 batches per size (the ranking of recipes, not the published
#: number), KPD (not reported) as small as allowed
FPD_ARGS = "--fpd_num_batches 4 --kpd_num_batches 1 --kpd_batch_size 1000"
QUICK_FPD_ARGS = "--fpd_min_samples 300 --fpd_max_samples 600 --fpd_num_batches 2 --fpd_num_points 3 " \
                 "--kpd_num_batches 1 --kpd_batch_size 300"
CURVE_POINTS = 12


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_quality.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["fastcalogan", "calokit"],
                   help="train.py recipe names, or NAME=ARGS (train.py flags, e.g. 'fast=--recipe calokit --lr 4e-4')")
    p.add_argument("--ablation", action="store_true", help="the recipes " + ", ".join(ABLATION))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds")
    p.add_argument("--iterations", type=int, default=12000, help="training budget in generator iterations, "
                   "make all's (a recipe's ARGS may give its own --iterations)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="make all's checkpoint interval")
    p.add_argument("--particle", default="photon")
    p.add_argument("--eta", type=float, default=0.20)
    p.add_argument("--events", type=int, default=1000, help="toy events per energy (training and held-out)")
    p.add_argument("--select-events", type=int, default=2000, help="select_epoch.py --events")
    p.add_argument("--select-args", default=DEMO_SELECT_ARGS, help="extra select_epoch.py flags (the demo's)")
    p.add_argument("--cls-epochs", type=int, default=10, help="evaluate.py --cls_n_epochs")
    p.add_argument("--eval-seed", type=int, default=1, help="evaluate.py --seed (the same for every run)")
    p.add_argument("--cls-args", default=CLS_ARGS, help="evaluate.py classifier flags (the demo's, as make all)")
    p.add_argument("--fpd-args", default=FPD_ARGS, help="evaluate.py FPD/KPD flags (KPD is not reported here)")
    p.add_argument("--curve-points", type=int, default=CURVE_POINTS, help="checkpoints on each learning curve")
    p.add_argument("--curve-shapes", action="store_true",
                   help="also the shapes on the learning curves: evaluate.py's mean separation power (hist-chi) and "
                        "FPD (--fpd-args) at every curve point (about a minute of CPU per point)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (one TensorFlow thread each)")
    p.add_argument("--work", default=os.path.join(ROOT, "work", "bench_quality"), help="data and runs")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench_quality"), help="JSON and plot")
    p.add_argument("--quick", action="store_true", help="tiny data and budget, 1 seed (for the test suite)")
    p.add_argument("--report", metavar="QUALITY.json",
                   help="print the Markdown tables of an earlier run's quality.json (those of "
                        "docs/recipes-and-quality.md) and stop")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.iterations, args.checkpoint_every = 60, 20, 10
        args.seeds, args.select_events, args.cls_epochs = args.seeds[:1], 200, 1
        args.fpd_args = QUICK_FPD_ARGS
        args.curve_points, args.curve_shapes = 2, True       # the shapes' curve code runs in the suite too
        if args.work == p.get_default("work") and args.out == p.get_default("out"):
            import tempfile                 # the test suite runs this: nothing left in the checkout
            args.work = args.out = tempfile.mkdtemp(prefix="bench_quality_quick_")
    if args.ablation:
        args.recipes = [f"{k}={v}" for k, v in ABLATION.items()]
    return args


def recipe_args(spec):
    """'name' -> (name, ['--recipe', name]); 'name=--flags ...' -> (name, [flags])."""
    if "=" in spec:
        name, flags = spec.split("=", 1)
        return name.strip(), shlex.split(flags)
    return spec, ["--recipe", spec]


def recipe_norm(flags):
    """(training-file representation, train.py flags without ``--norm``): ``--norm X`` among the flags, else the
    norm the flags' ``--recipe`` needs (train.py RECIPES), else ekin (voxels / E_kin).

    >>> recipe_norm(["--recipe", "caloshowergan"]), recipe_norm(["--lr", "1e-4", "--norm", "layer"])
    (('layer', ['--recipe', 'caloshowergan']), ('layer', ['--lr', '1e-4']))
    """
    import train

    flags = list(flags)
    if "--norm" in flags:
        i = flags.index("--norm")
        return flags[i + 1], flags[:i] + flags[i + 2:]
    recipe = flags[flags.index("--recipe") + 1] if "--recipe" in flags else "fastcalogan"
    return train.RECIPES.get(recipe, {}).get("norm", "ekin"), flags


@contextlib.contextmanager
def quiet():
    """Stage scripts print a summary line on stdout: keep stdout for the JSON object."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def call(main, argv):
    with quiet():
        rc = main(argv)
    if rc:
        raise RuntimeError(f"{main.__module__} {' '.join(argv)}: exit {rc}")


# ----------------------------------------------------------------------------------------------
# data (made once, as make all makes it)

def slice_tag(args):
    """The folder name of the benchmark's slice, under WORK/data and WORK/runs (and OUT/runs): runs of two slices
    with the same recipe, seed and budget never share a folder.

    >>> slice_tag(argparse.Namespace(particle="pion", eta=0.2, events=1000))
    'pion_0.20_ev1000'
    """
    return f"{args.particle}_{args.eta:.2f}_ev{args.events}"


def make_data(args, norms=("ekin",)):
    """Toy hits -> voxels (training and held-out) -> one training file per representation in ``norms`` in
    args.work; returns the paths: voxels, voxels_heldout, train (voxels / E_kin) and train_<norm> for each norm."""
    import preprocess

    d = os.path.join(args.work, "data", slice_tag(args))
    paths = {k: os.path.join(d, f"{k}.h5") for k in ("voxels", "voxels_heldout", "train")}
    paths.update({f"train_{n}": paths["train"] if n == "ekin" else os.path.join(d, f"train_{n}.h5")
                  for n in set(norms) | {"ekin"}})
    binning = os.path.join(ROOT, "binning", "binning_fastcalogan.xml")
    for kind, seed in (("voxels", 1), ("voxels_heldout", 1001)):
        if os.path.isfile(paths[kind]):
            continue
        hits = os.path.join(d, f"hits_{kind}")
        call(preprocess.main, ["toy", "--particle", args.particle, "--eta", f"{args.eta:.2f}",
                               "--events-per-energy", str(args.events), "--seed", str(seed), "--out", hits])
        files = sorted(os.path.join(hits, f) for f in os.listdir(hits) if f.endswith(".h5"))
        call(preprocess.main, ["voxelise", "--binning", binning, "--particle", args.particle,
                               "--out", paths[kind], *files])
        for f in files:
            os.remove(f)
    for norm in sorted(set(norms) | {"ekin"}):
        if not os.path.isfile(paths[f"train_{norm}"]):
            call(preprocess.main, ["prepare", "--binning", binning, "--particle", args.particle, "--range", "all",
                                   "--norm", norm, "--out", paths[f"train_{norm}"], paths["voxels"]])
    return paths


# ----------------------------------------------------------------------------------------------
# metrics of a generated file against the held-out one

def etot_by_energy(path):
    """{incident energy (MeV): E_tot array} of a CaloChallenge file (raw voxel sums)."""
    import h5py

    with h5py.File(path, "r") as f:
        einc = f["incident_energies"][:, 0].astype(np.float64)
        etot = f["showers"][...].sum(axis=1, dtype=np.float64)
    return {float(e): etot[np.isclose(einc, e, rtol=1e-3)] for e in np.unique(einc)}, einc, etot


def energy_table(gen_path, ref_path):
    """Per energy: E_tot/E_inc separation (evaluate.py's per-energy binning), resolution and response ratios."""
    from HighLevelFeatures import separation_power

    gen, gen_einc, gen_etot = etot_by_energy(gen_path)
    ref, ref_einc, ref_etot = etot_by_energy(ref_path)
    rows = []
    for e in sorted(ref):
        g, r = gen.get(e), ref[e]
        if g is None or g.size < 2 or r.size < 2:
            continue
        bins = np.linspace(0.9, 1.1, 21) if e >= 2**12 else np.linspace(0.4, 1.4, 21)
        hg = np.histogram(g / e, bins)[0] / g.size
        hr = np.histogram(r / e, bins)[0] / r.size
        res_g, res_r = g.std() / max(g.mean(), 1e-12), r.std() / max(r.mean(), 1e-12)
        rows.append({"energy_mev": e, "etot_einc_separation": float(separation_power(hr, hg)),
                     "resolution_gen": float(res_g), "resolution_ref": float(res_r),
                     "resolution_ratio": float(res_g / res_r), "response_ratio": float(g.mean() / r.mean())})
    bins = np.linspace(0.5, 1.5, 101)
    overall = separation_power(np.histogram(ref_etot / ref_einc, bins)[0] / ref_etot.size,
                               np.histogram(gen_etot / gen_einc, bins)[0] / gen_etot.size)
    return rows, float(overall)


def fraction_above(path, threshold_mev=1.0, chunk=20000):
    """Fraction of a CaloChallenge file's voxels at or above ``threshold_mev`` (read in chunks)."""
    import h5py

    above = total = 0
    with h5py.File(path, "r") as f:
        ds = f["showers"]
        for i in range(0, ds.shape[0], chunk):
            x = ds[i:i + chunk]
            above += int(np.count_nonzero(x >= threshold_mev))
            total += x.size
    return above / max(total, 1)


def voxel_fractions(gen_path, ref_path):
    """The sparsity target's numbers: the fraction of voxels >= 1 MeV (evaluate.py's dataset-1 threshold) in the
    generated and the held-out file, and their ratio (1 = as many lit voxels as the toy).

    >>> import tempfile, plumbing
    >>> d = tempfile.mkdtemp(); a, b = os.path.join(d, "a.h5"), os.path.join(d, "b.h5")
    >>> plumbing.write_calo_file(a, np.ones((2, 1)), np.array([[2.0, 0.5], [1.0, 0.0]], np.float32))
    >>> plumbing.write_calo_file(b, np.ones((2, 1)), np.array([[2.0, 3.0], [0.0, 0.0]], np.float32))
    >>> voxel_fractions(a, b)["voxels_ge_1mev_ratio"]
    1.0
    """
    gen, ref = fraction_above(gen_path), fraction_above(ref_path)
    return {"voxels_ge_1mev_gen": gen, "voxels_ge_1mev_ref": ref,
            "voxels_ge_1mev_ratio": gen / ref if ref > 0 else float("nan")}


def worst_resolution(rows, min_energy=1000.0):
    """max over energies >= min_energy of max(ratio, 1/ratio) of the resolution ratio (1 = perfect)."""
    vals = [max(r["resolution_ratio"], 1 / r["resolution_ratio"]) for r in rows
            if r["energy_mev"] >= min_energy and r["resolution_ratio"] > 0]
    return float(max(vals)) if vals else float("nan")


# ----------------------------------------------------------------------------------------------
# one (recipe, seed): train, select, evaluate, curve (runs in its own process)

def run_job(job):
    import plumbing
    import select_epoch
    import train

    run, out = job["run"], job["out"]
    wall, cpu = train_once(job, train.main)
    cfg = plumbing.read_run_config(run)
    sel = os.path.join(out, "select")
    if not up_to_date(os.path.join(sel, "best.json"), newest_checkpoint(run)):
        call(select_epoch.main, ["--run", run, "--reference", job["voxels"], "--events", str(job["select_events"]),
                                 "--generate-like", job["heldout"], "--seed", str(job["seed"]), "--out", sel,
                                 *shlex.split(job["select_args"])])
    with open(os.path.join(sel, "best.json")) as f:
        best = json.load(f)
    metrics = {}
    for mode in ("hist-chi", "cls-high", "fpd"):
        path = os.path.join(out, f"eval_{mode}.json")
        if not up_to_date(path, os.path.join(sel, "generated.h5")):
            run_evaluate(os.path.join(sel, "generated.h5"), job, cfg, mode, os.path.join(out, f"eval_{mode}"), path)
        with open(path) as f:
            metrics[mode] = json.load(f)
    rows, overall = energy_table(os.path.join(sel, "generated.h5"), job["heldout"])
    iters = (int(cfg["iterations"]) if not os.path.isfile(os.path.join(run, "losses.csv")) else
             sum(1 for _ in open(os.path.join(run, "losses.csv"))) - 1)
    result = {
        "train_args": job["train_args"], "recipe": cfg.get("recipe"), "norm": job.get("norm", "ekin"),
        "best_iteration": int(best["best_iteration"]),
        "select_chi2_ndf": float(best["chi2_ndf"]),
        "cls_high_auc": float(metrics["cls-high"]["classifier"]["cls-high"]["auc"]),
        "etot_einc_separation": float(metrics["hist-chi"]["separation_power"]["Etot / Einc"]),
        "separation_power_mean": float(metrics["hist-chi"]["separation_power_mean"]["value"]),
        "fpd_x1e3": float(metrics["fpd"]["fpd_x1e3"]),
        "per_energy": rows, "etot_einc_separation_raw_sums": overall,
        "worst_resolution_ratio_ge_1gev": worst_resolution(rows),
        **voxel_fractions(os.path.join(sel, "generated.h5"), job["heldout"]),
        "train_iterations_per_s": iters / wall if wall > 0 else float("nan"),
        "train_cpu_s": cpu, "train_cpu_s_per_iteration": cpu / max(iters, 1),
        "curve": learning_curve(run, job, cpu / max(iters, 1)),
    }
    return result


def newest_checkpoint(run):
    """Path of the run's newest complete checkpoint (None without one)."""
    import plumbing

    ckpts = plumbing.list_checkpoints(run) if os.path.isdir(run) else []
    return ckpts[-1][1] if ckpts else None


def up_to_date(path, source):
    """Whether ``path`` exists and is newer than ``source`` (a file or folder; None: no source, not up to date)."""
    return (source is not None and os.path.exists(path) and os.path.exists(source)
            and os.path.getmtime(path) >= os.path.getmtime(source))


def train_once(job, train_main):
    """Train (or resume) the job's run to its budget; (wall s, CPU s) of its training in all.

    The times are kept in OUT/train_time.json, so a benchmark killed after some runs finished reuses them and
    redoes nothing (a run resumed part-way adds the part's times). A finished run without that file (trained by
    an earlier version) reports the wall time between its first and last checkpoint, rescaled to the whole run,
    and NaN CPU seconds.
    """
    import plumbing

    run, path = job["run"], os.path.join(job["out"], "train_time.json")
    done = plumbing.list_checkpoints(run) if os.path.isdir(run) else []
    before = json.load(open(path)) if os.path.isfile(path) else None
    if done and done[-1][0] >= job["iterations"]:
        if before:
            return before["wall_s"], before["cpu_s"]
        (i0, p0), (i1, p1) = done[0], done[-1]
        span = os.path.getmtime(p1) - os.path.getmtime(p0)
        return (span * job["iterations"] / (i1 - i0) if i1 > i0 else float("nan")), float("nan")
    argv = ["--data", job["train"], "--out", run, "--iterations", str(job["iterations"]),
            "--checkpoint-every", str(job["checkpoint_every"]), "--seed", str(job["seed"]), *job["train_args"]]
    if os.path.isdir(run):
        argv.append("--resume")
    t0, c0 = time.perf_counter(), time.process_time()
    call(train_main, argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if done and before:
        wall, cpu = wall + before["wall_s"], cpu + before["cpu_s"]
    os.makedirs(job["out"], exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"wall_s": wall, "cpu_s": cpu}, f)
    os.replace(path + ".tmp", path)
    return wall, cpu


def learning_curve(run, job, cpu_per_it):
    """E_tot/E_inc separation and worst resolution ratio of every few checkpoints, generated like the held-out."""
    import h5py

    import plumbing

    ckpts = plumbing.list_checkpoints(run)
    step = max(1, math.ceil(len(ckpts) / job["curve_points"]))
    chosen = ckpts[step - 1::step]
    if ckpts and chosen[-1] != ckpts[-1]:
        chosen.append(ckpts[-1])
    cfg = plumbing.read_run_config(run)
    with h5py.File(job["heldout"], "r") as f:
        einc = f["incident_energies"][:, 0].astype(np.float64)
    ekin = plumbing.kinetic_energy(einc, cfg["particle"])
    label = plumbing.condition_label(ekin, cfg["ekin_min"], cfg["ekin_max"], cfg.get("label_scheme", "V2"),
                                     cfg.get("max_exp", plumbing.MAX_EXP))
    tmp = os.path.join(job["out"], "curve_generated.h5")
    points = []
    for it, path in chosen:
        g = plumbing.load_generator_file(os.path.join(path, "generator.keras"))
        showers = plumbing.generate(g, label, job["seed"]) * ekin[:, None]
        plumbing.write_calo_file(tmp, einc[:, None], showers.astype(np.float32))
        rows, overall = energy_table(tmp, job["heldout"])
        points.append({"iteration": it, "cpu_s": it * cpu_per_it, "etot_einc_separation": overall,
                       "worst_resolution_ratio_ge_1gev": worst_resolution(rows)})
        if job["curve_shapes"]:
            points[-1].update(curve_shapes(tmp, job, cfg))
    if os.path.exists(tmp):
        os.remove(tmp)
    return points


def eval_dataset(cfg):
    """evaluate.py's -d for a run of config ``cfg``: dataset 1's pion geometry for hadrons, else its photon geometry."""
    return "1-pions" if cfg["particle"] in ("pion", "proton") else "1-photons"


def run_evaluate(generated, job, cfg, mode, output_dir, json_path):
    """evaluate.py ``-m mode`` of ``generated`` against the job's held-out file, with the job's seed and flags."""
    import evaluate

    call(evaluate.main, ["-i", generated, "-r", job["heldout"], "-m", mode, "-d", eval_dataset(cfg),
                         "--output_dir", output_dir, "--seed", str(job["eval_seed"]),
                         "--cls_n_epochs", str(job["cls_epochs"]), "--json", json_path, "-q",
                         *shlex.split(job["fpd_args"] if mode == "fpd" else job["cls_args"])])


def curve_shapes(generated, job, cfg):
    """evaluate.py's mean separation power (hist-chi) and FPD x 1e3 of a learning-curve point's generated file."""
    found = {}
    for mode in ("hist-chi", "fpd"):
        path = os.path.join(job["out"], f"curve_{mode}.json")
        run_evaluate(generated, job, cfg, mode, os.path.join(job["out"], f"curve_{mode}"), path)
        with open(path) as f:
            found[mode] = json.load(f)
        os.remove(path)
    return {"separation_power_mean": float(found["hist-chi"]["separation_power_mean"]["value"]),
            "fpd_x1e3": float(found["fpd"]["fpd_x1e3"])}


def spawn(job, threads):
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_all(jobs, n_parallel):
    """Run the jobs, n_parallel at a time; returns their results in order (RuntimeError naming a failed one)."""
    results, running, queue = [None] * len(jobs), {}, list(enumerate(jobs))
    threads = 1 if n_parallel > 1 else 2
    while queue or running:
        while queue and len(running) < n_parallel:
            i, job = queue.pop(0)
            running[i] = spawn(job, threads)
            print(f"bench_quality: started {job['name']} seed {job['seed']}", file=sys.stderr)
        time.sleep(0.5)
        for i, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[i]
            if proc.returncode:
                raise RuntimeError(f"{jobs[i]['name']} seed {jobs[i]['seed']} failed:\n{err[-3000:]}")
            results[i] = json.loads(out.strip().splitlines()[-1])
            print(f"bench_quality: done {jobs[i]['name']} seed {jobs[i]['seed']}: AUC "
                  f"{results[i]['cls_high_auc']:.4f}, Etot/Einc sep {results[i]['etot_einc_separation']:.3f}",
                  file=sys.stderr)
    return results


# ----------------------------------------------------------------------------------------------
# aggregation and the plot

def spread(values):
    v = np.asarray(values, dtype=np.float64)
    return {"std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()), "max": float(v.max())}


def aggregate(per_seed):
    """Mean and spread over seeds of the scalar metrics and of the per-energy ratios."""
    seeds = list(per_seed.values())
    mean = {k: float(np.mean([s[k] for s in seeds])) for k in SCALARS}
    spr = {k: spread([s[k] for s in seeds]) for k in SCALARS}
    energies = sorted({r["energy_mev"] for s in seeds for r in s["per_energy"]})
    per_energy = []
    for e in energies:
        rows = [r for s in seeds for r in s["per_energy"] if r["energy_mev"] == e]
        per_energy.append({"energy_mev": e, **{k: float(np.mean([r[k] for r in rows])) for k in
                                                ("etot_einc_separation", "resolution_ratio", "response_ratio",
                                                 "resolution_ref")},
                           "resolution_ratio_spread": spread([r["resolution_ratio"] for r in rows])})
    mean["per_energy"] = per_energy
    return mean, spr


def plot_curves(recipes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("etot_einc_separation", "E_tot/E_inc separation power"),
               ("worst_resolution_ratio_ge_1gev", "worst resolution ratio (E >= 1 GeV)")]
    points = [p for rec in recipes.values() for s in rec["seeds"].values() for p in s["curve"]]
    if points and all("fpd_x1e3" in p for p in points):
        metrics += [("separation_power_mean", "mean separation power (hist-chi)"), ("fpd_x1e3", "FPD x 1e3")]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.75 * len(metrics)), constrained_layout=True)
    for col, (xkey, xlabel) in enumerate((("iteration", "generator iteration"),
                                          ("cpu_s", "training CPU seconds"))):
        for row, (key, ylabel) in enumerate(metrics):
            ax = axes[row, col]
            for k, (name, rec) in enumerate(recipes.items()):      # one colour per recipe in every panel
                curves = [s["curve"] for s in rec["seeds"].values() if s["curve"]]
                n = min(len(c) for c in curves) if curves else 0
                if n == 0:
                    continue
                x = np.mean([[p[xkey] for p in c[:n]] for c in curves], axis=0)
                y = np.array([[p[key] for p in c[:n]] for c in curves])
                if not np.isfinite(x).any():        # reused runs whose CPU time was not recorded
                    continue
                ax.plot(x, y.mean(0), marker="o", ms=3, color=f"C{k}", label=f"{name} ({len(curves)} seeds)")
                ax.fill_between(x, y.min(0), y.max(0), color=f"C{k}", alpha=0.2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("learning curves: mean over seeds, min..max shaded")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _pm(spread_or_none, mean, fmt):
    sd = spread_or_none["std"] if spread_or_none else 0.0
    return f"{mean:{fmt}} +- {sd:{fmt}}"


def report_tables(report):
    """The Markdown tables of a quality.json (those of docs/recipes-and-quality.md): per recipe the mean +- SD over
    seeds, then per energy the generated / reference resolution ratio (mean over seeds)."""
    rows = ["| recipe (train.py flags) | iterations | cls-high AUC | E_tot/E_inc sep. | mean sep. | FPD x 1e3 | "
            "worst res. ratio >= 1 GeV | best it. | train it/s | train CPU s |", "|---" * 10 + "|"]
    for name, rec in report["recipes"].items():
        m, sp = rec["mean"], rec["spread"]
        rows.append(f"| {name} (`{' '.join(rec['train_args'])}`) | {rec['iterations']} | "
                    f"{_pm(sp['cls_high_auc'], m['cls_high_auc'], '.4f')} | "
                    f"{_pm(sp['etot_einc_separation'], m['etot_einc_separation'], '.3f')} | "
                    f"{_pm(sp['separation_power_mean'], m['separation_power_mean'], '.3f')} | "
                    f"{_pm(sp['fpd_x1e3'], m['fpd_x1e3'], '.0f')} | "
                    f"{_pm(sp['worst_resolution_ratio_ge_1gev'], m['worst_resolution_ratio_ge_1gev'], '.1f')} | "
                    f"{m['best_iteration']:.0f} | {m['train_iterations_per_s']:.1f} | {m['train_cpu_s']:.0f} |")
    energies = [r["energy_mev"] for r in next(iter(report["recipes"].values()))["mean"]["per_energy"]]
    rows += ["", "| resolution ratio gen/ref per E_inc (MeV) | " + " | ".join(f"{e:.0f}" for e in energies) + " |",
             "|---" * (len(energies) + 1) + "|"]
    for name, rec in report["recipes"].items():
        rows.append(f"| {name} | " + " | ".join(f"{r['resolution_ratio']:.1f}" for r in rec["mean"]["per_energy"])
                    + " |")
    ref = next(iter(report["recipes"].values()))["mean"]["per_energy"]
    rows.append("| reference resolution RMS/<E_tot> | " + " | ".join(f"{r['resolution_ref']:.3f}" for r in ref)
                + " |")
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(report_tables(json.load(f)))
        return 0
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return 0
    specs = [recipe_args(spec) for spec in args.recipes]
    norms = {name: recipe_norm(flags) for name, flags in specs}
    paths = make_data(args, sorted({n for n, _ in norms.values()}))
    jobs = []
    for name, _ in specs:
        norm, flags = norms[name]
        iterations = args.iterations
        if "--iterations" in flags:
            i = flags.index("--iterations")
            iterations = int(flags[i + 1])
            flags = flags[:i] + flags[i + 2:]
        for seed in args.seeds:
            tag = f"{name}_s{seed}_it{iterations}"
            jobs.append({"name": name, "seed": seed, "iterations": iterations, "train_args": flags,
                         "checkpoint_every": args.checkpoint_every, "train": paths[f"train_{norm}"], "norm": norm,
                         "voxels": paths["voxels"], "heldout": paths["voxels_heldout"],
                         "run": os.path.join(args.work, "runs", slice_tag(args), tag),
                         "out": os.path.join(args.out, "runs", slice_tag(args), tag),
                         "select_events": args.select_events, "select_args": args.select_args,
                         "cls_epochs": args.cls_epochs, "eval_seed": args.eval_seed, "fpd_args": args.fpd_args,
                         "cls_args": args.cls_args, "curve_points": args.curve_points,
                         "curve_shapes": args.curve_shapes})
    results = run_all(jobs, max(1, args.jobs))
    recipes = {}
    for job, res in zip(jobs, results):
        rec = recipes.setdefault(job["name"], {"train_args": job["train_args"], "iterations": job["iterations"],
                                               "norm": job["norm"], "seeds": {}})
        rec["seeds"][str(job["seed"])] = res
    for rec in recipes.values():
        rec["mean"], rec["spread"] = aggregate(rec["seeds"])
    report = {"slice": f"{args.particle} |eta| {args.eta:.2f}-{args.eta + 0.05:.2f} (toy, {args.events} events "
                       f"per energy)",
              "budget": {"iterations": args.iterations, "checkpoint_every": args.checkpoint_every},
              "seeds": args.seeds, "eval_seed": args.eval_seed, "select_args": args.select_args,
              "cls_epochs": args.cls_epochs, "fpd_args": args.fpd_args, "cls_args": args.cls_args,
              "recipes": recipes}
    os.makedirs(args.out, exist_ok=True)
    plot_curves(recipes, os.path.join(args.out, "learning_curves.png"))
    tmp = os.path.join(args.out, "quality.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "quality.json"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
