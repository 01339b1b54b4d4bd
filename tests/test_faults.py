"""Reliability (issue 9): bad inputs to every script, and processes killed mid-write.

Bad-input suite: one table of (script, damage) cases. Each case works in a folder of its own holding copies of
the inputs it needs (built once from a tiny real chain: toy hits -> voxelise -> prepare -> train -> select)
and the place its outputs would go. A case passes when the script exits with code 2, prints exactly one line
on stderr (``error: ...`` naming the file or flag, no traceback) and the folder is byte for byte what it was
before: inputs unchanged (sha256 of every file) and nothing written -- no output under its final name, no
temporary left behind, no empty output folder. Most cases run
in-process through ``main(argv)``; a few run as real processes to prove the exit code the shell sees.

Unwritable outputs: permission bits do not stop root (CI runs as root), so as root an output is placed under a
path whose parent is a regular file (which fails for everybody); otherwise under a ``chmod 0o500`` folder.
Read-only input folders must *work* (reading needs no write access) and stay untouched.

Kills: train.py is SIGKILLed at seeded random moments (start-up, mid-training, mid-checkpoint) and resumed;
after every kill each ``ckpt_<N>/`` present is complete and loadable and the resumed run continues from the
newest one. preprocess.py voxelise and evaluate.py are stopped with SIGKILL while an output sits complete but
not yet renamed, while it is half written, and at random moments: no truncated file is ever found under a
final name, and a re-run completes.
"""
import contextlib
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import h5py
import numpy as np
import pytest

import evaluate
import export_lwtnn
import preprocess
import select_epoch
import train
import plumbing
from HighLevelFeatures import read_geometry
from plumbing import atomic_directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XML = os.path.join(ROOT, "binning", "binning_dataset_1_photons.xml")
XML_PION = os.path.join(ROOT, "binning", "binning_dataset_1_pions.xml")
V = 368                                    # voxels of dataset-1 photons
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
TRAIN_FLAGS = ("--batch-size", "16", "--no-jit")
CKPT_DIR = re.compile(r"^ckpt_(\d+)$")          # a finished checkpoint of train.py (its run layout)
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")


# ----------------------------------------------------------------------------------------------
# the kit: a tiny real chain whose files the cases copy and damage

@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("kit")
    assert preprocess.main(["toy", "--particle", "photon", "--eta", "0.20", "--events-per-energy", "30", "--seed", "1",
                            "--energies", "16384", "65536", "--out", str(d / "hits")]) == 0
    hits = sorted(glob.glob(str(d / "hits" / "*.h5")))
    vox, tr, run, sel = (str(d / n) for n in ("vox.h5", "train.h5", "run", "sel"))
    assert preprocess.main(["voxelise", "--binning", XML, "--particle", "photon", "--out", vox, "--jobs", "1",
                            *hits]) == 0
    assert preprocess.main(["prepare", "--binning", XML, "--particle", "photon", "--range", "all", "--out", tr,
                            vox]) == 0
    assert train.main(["--data", tr, "--out", run, "--iterations", "2", "--checkpoint-every", "1", "--seed", "1",
                       *TRAIN_FLAGS]) == 0
    assert select_epoch.main(["--run", run, "--reference", vox, "--events", "50", "--out", sel]) == 0
    return {"hits": hits[0], "hits2": hits[1], "vox": vox, "train": tr, "run": run,
            "gen": os.path.join(sel, "generated.h5"), "best": os.path.join(sel, "best.json"), "dir": str(d)}


def sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def snapshot(folder):
    """{relative path: sha256 | '<dir>'} of everything under ``folder``."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for n in dirs:
            out[os.path.relpath(os.path.join(base, n), folder)] = "<dir>"
        for n in files:
            p = os.path.join(base, n)
            out[os.path.relpath(p, folder)] = sha256(p)
    return out


class Case:
    """The folder of one bad-input case: copies of kit files, damage helpers, an unwritable place."""

    def __init__(self, folder, kit):
        self.dir = str(folder)
        self.kit = kit
        self._locked = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def copy(self, key, name=None):
        src = self.kit[key]
        dst = self.path(name or os.path.basename(src))
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
        return dst

    def unwritable(self):
        """A folder path nobody can write into: chmod 0o500 folder, or (as root) a regular file."""
        p = self.path("locked")
        if IS_ROOT:
            with open(p, "w") as fh:
                fh.write("a regular file standing where a folder should be\n")
        else:
            os.mkdir(p)
            os.chmod(p, 0o500)
            self._locked.append(p)
        return p

    def unlock(self):
        for p in self._locked:
            os.chmod(p, 0o700)


def truncate(path):
    """Cut a file to half its size, as an interrupted copy or transfer leaves it."""
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def h5_edit(path, **changes):
    """Edit a copied HDF5 file: name=array replaces a dataset, name=None deletes it, rename=(old, new),
    set=(name, index, value) overwrites one element, attrs={...} sets (None deletes) attributes."""
    with h5py.File(path, "r+") as f:
        if "rename" in changes:
            old, new = changes.pop("rename")
            f.move(old, new)
        if "set" in changes:
            name, index, value = changes.pop("set")
            a = f[name][...]
            a[index] = value
            f[name][...] = a
        for k, v in changes.pop("attrs", {}).items():
            if v is None:
                del f.attrs[k]
            else:
                f.attrs[k] = v
        for name, value in changes.items():
            del f[name]
            if value is not None:
                f.create_dataset(name, data=value)
    return path


def read_arrays(path, *names):
    with h5py.File(path) as f:
        return [f[n][...] for n in names]


def zero_events(path, names_widths):
    """Replace datasets by empty ones of the same width: {name: trailing shape}."""
    with h5py.File(path, "r+") as f:
        for name, tail in names_widths.items():
            dt = f[name].dtype
            del f[name]
            f.create_dataset(name, shape=(0,) + tail, dtype=dt)
    return path


def write_text(path, text):
    with open(path, "w") as fh:
        fh.write(text)
    return path


def json_edit(path, **changes):
    with open(path) as fh:
        cfg = json.load(fh)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return write_text(path, json.dumps(cfg))


# ----------------------------------------------------------------------------------------------
# the table: case id -> builder(case) -> (script main, argv, substrings the error line must contain)

def _toy(c, *extra, out=None):
    return (preprocess.main, ["toy", "--particle", "photon", "--events-per-energy", "2", "--energies", "1024",
                              "--out", out or c.path("hits_out"), *extra])


def _vox(c, hits, *extra, out=None, xml=XML, particle="photon"):
    return (preprocess.main, ["voxelise", "--binning", xml, "--particle", particle, "--jobs", "1",
                              "--out", out or c.path("out.h5"), *extra, *hits])


def _prep(c, vox, *extra, out=None, xml=XML, particle="photon", rng="all"):
    return (preprocess.main, ["prepare", "--binning", xml, "--particle", particle, "--range", rng,
                              "--out", out or c.path("train_out.h5"), *extra, vox])


def _train(c, data, *extra, out=None):
    return (train.main, ["--data", data, "--out", out or c.path("run_out"), "--iterations", "1",
                         "--checkpoint-every", "1", "--seed", "1", *TRAIN_FLAGS, *extra])


def _select(c, run, ref, *extra, out=None):
    return (select_epoch.main, ["--run", run, "--reference", ref, "--events", "20", "--out",
                                out or c.path("sel_out"), *extra])


def _export(c, *how, out=None):
    return (export_lwtnn.main, [*how, "--out", out or c.path("lwtnn_out")])


def _eval(c, gen, ref, *extra, out=None, d="1-photons"):
    return (evaluate.main, ["-i", gen, "-r", ref, "-m", "hist-chi", "-d", d, "--jobs", "1",
                            "--output_dir", out or c.path("eval_out"), *extra])


def _hits_without(c, name):
    return h5_edit(c.copy("hits"), **{name: None})


def _nan_vox(c, value, where=(3, 5), name="showers"):
    return h5_edit(c.copy("vox"), set=(name, where, value))


def _zero_vox(c):
    return zero_events(c.copy("vox"), {"incident_energies": (1,), "showers": (V,)})


def _narrow_vox(c, key="vox"):
    p = c.copy(key)
    e, s = read_arrays(p, "incident_energies", "showers")
    return h5_edit(p, incident_energies=e, showers=s[:, :V - 1])


def _other_pdg_vox(c):
    """The voxel file without its particle attribute (a plain CaloChallenge file)."""
    return h5_edit(c.copy("vox"), attrs={"particle": None})


def _layers_only_xml(c):
    """A photon XML that lists layers 0-3 only: the toy's Tile hits fall in layers it does not know."""
    return write_text(c.path("em_only.xml"), textwrap.dedent("""\
        <Bins>
          <Bin pid="22" etaMin="0" etaMax="130" name="photon">
            <Layer id="0" r_edges="0,5,10,30,50,100,200,400,600" n_bin_alpha="1"/>
            <Layer id="1" r_edges="0,2,4,6,8,10" n_bin_alpha="4"/>
            <Layer id="2" r_edges="0,5,10,20,40" n_bin_alpha="4"/>
            <Layer id="3" r_edges="0,50,100,200,400,600" n_bin_alpha="1"/>
          </Bin>
        </Bins>
    """))


def _photon_xml_as(c, name, pid):
    """The dataset-1 photon binning relabelled as another particle (same voxels: only the particle differs)."""
    with open(XML) as fh:
        text = fh.read().replace('pid="22"', f'pid="{pid}"').replace('name="photon"', f'name="{name}"')
    assert f'name="{name}"' in text
    return write_text(c.path(f"as_{name}.xml"), text)


def _train_edit(c, **changes):
    return h5_edit(c.copy("train"), **changes)


def _train_zero(c):
    return zero_events(c.copy("train"), {"voxels": (V,), "label": (), "incident_energies": (1,), "e_kin": ()})


def _run_copy(c):
    return c.copy("run")


def _run_with(c, fn):
    run = c.copy("run")
    fn(run)
    return run


def _resume_with_other_seed(c):
    run, data = _run_copy(c), c.copy("train")
    json_edit(os.path.join(run, "config.json"), train_data=data)    # the copy is the run's own training file
    return (train.main, ["--data", data, "--out", run, "--iterations", "3", "--checkpoint-every", "1", "--seed", "9",
                         "--resume", *TRAIN_FLAGS])


def _truncate_generators(run):
    for p in glob.glob(os.path.join(run, "ckpt_*", "generator.keras")):
        truncate(p)


CASES = {
    # --- preprocess.py toy (flags only; no input file)
    "toy-unwritable-out": (lambda c: _toy(c, out=os.path.join(c.unwritable(), "hits")), ["output directory"]),
    "toy-zero-events": (lambda c: _toy(c, "--events-per-energy", "0"), ["--events-per-energy"]),
    "toy-negative-energy": (lambda c: _toy(c, "--energies", "-5"), ["--energies"]),
    "toy-nan-energy": (lambda c: _toy(c, "--energies", "nan"), ["--energies"]),
    "toy-eta-outside-barrel": (lambda c: _toy(c, "--eta", "3.0"), ["--eta 3.0"]),
    "toy-unknown-particle": (lambda c: _toy(c, "--particle", "muon"), ["muon"]),
    # --- preprocess.py voxelise
    "vox-truncated": (lambda c: _vox(c, [truncate(c.copy("hits"))]), ["hits_photon_E16384"]),
    "vox-missing-dataset": (lambda c: _vox(c, [_hits_without(c, "energy")]), ["missing dataset 'energy'"]),
    "vox-renamed-dataset": (lambda c: _vox(c, [h5_edit(c.copy("hits"), rename=("truth_p", "p_truth"))]),
                            ["missing dataset 'truth_p'"]),
    "vox-nan-energy": (lambda c: _vox(c, [h5_edit(c.copy("hits"), set=("energy", 11, np.nan))]),
                       ["'energy' has NaN/inf", "hit row 11"]),
    "vox-inf-energy": (lambda c: _vox(c, [h5_edit(c.copy("hits"), set=("energy", 4, np.inf))]),
                       ["'energy' has NaN/inf"]),
    "vox-negative-energy": (lambda c: _vox(c, [h5_edit(c.copy("hits"), set=("energy", 2, -3.0))]),
                            ["'energy' has negative values"]),
    "vox-nan-truth-p": (lambda c: _vox(c, [h5_edit(c.copy("hits"), set=("truth_p", 1, np.nan))]), ["'truth_p'"]),
    "vox-zero-events": (lambda c: _vox(c, [zero_events(c.copy("hits"), {"truth_p": (), "truth_pdg": ()})]),
                        ["empty input"]),
    "vox-zero-hits": (lambda c: _vox(c, [zero_events(c.copy("hits"), {k: () for k in
                                                                        ("event", "layer", "eta", "phi", "r", "z",
                                                                         "energy")})]), ["empty input"]),
    "vox-wrong-extrap-columns": (lambda c: _vox(c, [h5_edit(c.copy("hits"), **{
        k: read_arrays(c.kit["hits"], k)[0][:, :10] for k in preprocess.EXTRAP_FIELDS})]), ["layer columns"]),
    "vox-xml-lacks-layers": (lambda c: _vox(c, [c.copy("hits")], xml=_layers_only_xml(c)),
                             ["does not list", "12"]),
    "vox-xml-other-particle": (lambda c: _vox(c, [c.copy("hits")], xml=os.path.join(ROOT, "binning",
                                                                                      "binning_dataset_2.xml")),
                               ["binning_dataset_2.xml", "photon"]),
    "vox-particle-mismatch": (lambda c: _vox(c, [c.copy("hits")], xml=XML_PION, particle="pion"),
                              ["--particle is pion"]),
    "vox-two-slices": (lambda c: _vox(c, [c.copy("hits"), h5_edit(c.copy("hits2"), extrap_eta=np.where(
        np.isfinite(read_arrays(c.kit["hits2"], "extrap_eta")[0]), 0.62, np.nan))],
        xml=os.path.join(ROOT, "binning", "binning_fastcalogan.xml")), ["one slice at a time"]),
    "vox-unwritable-out": (lambda c: _vox(c, [c.copy("hits")], out=os.path.join(c.unwritable(), "v.h5")),
                           ["output directory"]),
    "vox-unwritable-csv": (lambda c: _vox(c, [c.copy("hits")], "--csv", os.path.join(c.unwritable(), "csv")),
                           ["locked/csv"]),
    "vox-out-is-input": (lambda c: _vox(c, [c.copy("hits")], out=c.path(os.path.basename(c.kit["hits"]))),
                         ["overwrite an input"]),
    "vox-missing-file": (lambda c: _vox(c, [c.path("nope.h5")]), ["nope.h5: file not found"]),
    # --- preprocess.py prepare
    "prep-truncated": (lambda c: _prep(c, truncate(c.copy("vox"))), ["vox.h5"]),
    "prep-renamed-dataset": (lambda c: _prep(c, h5_edit(c.copy("vox"), rename=("showers", "shower"))),
                             ["missing dataset 'showers'"]),
    "prep-wrong-voxel-count": (lambda c: _prep(c, _narrow_vox(c)), ["367 voxels", "368"]),
    "prep-nan-shower": (lambda c: _prep(c, _nan_vox(c, np.nan)), ["'showers' has NaN/inf", "event 3"]),
    "prep-inf-shower": (lambda c: _prep(c, _nan_vox(c, np.inf)), ["'showers' has NaN/inf"]),
    "prep-negative-shower": (lambda c: _prep(c, _nan_vox(c, -1.0)), ["'showers' has negative"]),
    "prep-negative-einc": (lambda c: _prep(c, _nan_vox(c, -16384.0, (4, 0), "incident_energies")),
                           ["'incident_energies'"]),
    "prep-zero-events": (lambda c: _prep(c, _zero_vox(c)), ["zero events"]),
    "prep-mismatched-xml": (lambda c: _prep(c, _other_pdg_vox(c), xml=XML_PION, particle="pion"),
                            ["368 voxels", "533"]),
    "prep-particle-mismatch": (lambda c: _prep(c, c.copy("vox"), xml=_photon_xml_as(c, "pion", 211),
                                               particle="pion"), ["holds photon showers"]),
    "prep-empty-range": (lambda c: _prep(c, c.copy("vox"), rng="low"), ["no events", "'low' range"]),
    "prep-unwritable-out": (lambda c: _prep(c, c.copy("vox"), out=os.path.join(c.unwritable(), "t.h5")),
                            ["output directory"]),
    "prep-out-is-input": (lambda c: _prep(c, c.copy("vox"), out=c.path("vox.h5")), ["overwrite an input"]),
    # --- train.py
    "train-truncated": (lambda c: _train(c, truncate(c.copy("train"))), ["train.h5"]),
    "train-missing-dataset": (lambda c: _train(c, _train_edit(c, voxels=None)), ["missing dataset 'voxels'"]),
    "train-renamed-dataset": (lambda c: _train(c, _train_edit(c, rename=("label", "labels"))),
                              ["missing dataset 'label'"]),
    "train-wrong-voxel-count": (lambda c: _train(c, _train_edit(c, attrs={"n_voxels": 367})), ["n_voxels=367"]),
    "train-label-shape": (lambda c: _train(c, _train_edit(c, label=np.zeros(7, np.float32))), ["'label'"]),
    "train-nan-voxels": (lambda c: _train(c, _train_edit(c, set=("voxels", (5, 9), np.nan))),
                         ["'voxels' has NaN/inf"]),
    "train-inf-label": (lambda c: _train(c, _train_edit(c, set=("label", 3, np.inf))), ["'label' has NaN/inf"]),
    "train-negative-voxels": (lambda c: _train(c, _train_edit(c, set=("voxels", (1, 1), -0.5))),
                              ["'voxels' has negative"]),
    "train-zero-events": (lambda c: _train(c, _train_zero(c)), ["'voxels' has shape (0, 368)"]),
    "train-no-particle": (lambda c: _train(c, _train_edit(c, attrs={"particle": None})), ["'particle'"]),
    "train-excluded-energy-absent": (lambda c: _train(c, c.copy("train"), "--exclude-energy", "1234"),
                                     ["1234 MeV"]),
    "train-unwritable-out": (lambda c: _train(c, c.copy("train"), out=os.path.join(c.unwritable(), "run")),
                             ["run"]),
    "train-used-run-no-resume": (lambda c: _train(c, c.copy("train"), out=_run_copy(c)), ["--resume"]),
    "train-resume-other-seed": (lambda c: _resume_with_other_seed(c), ["--seed 9", "seed 1"]),
    # --- select_epoch.py
    "select-truncated-reference": (lambda c: _select(c, _run_copy(c), truncate(c.copy("vox"))), ["vox.h5"]),
    "select-renamed-dataset": (lambda c: _select(c, _run_copy(c), h5_edit(c.copy("vox"), rename=(
        "incident_energies", "energies"))), ["missing dataset 'incident_energies'"]),
    "select-wrong-voxel-count": (lambda c: _select(c, _run_copy(c), _narrow_vox(c)), ["367 voxels"]),
    "select-nan-reference": (lambda c: _select(c, _run_copy(c), _nan_vox(c, np.nan)), ["NaN/inf"]),
    "select-negative-reference": (lambda c: _select(c, _run_copy(c), _nan_vox(c, -2.0)), ["negative"]),
    "select-zero-events": (lambda c: _select(c, _run_copy(c), _zero_vox(c)), ["zero events"]),
    "select-energies-outside-run": (lambda c: _select(c, _run_copy(c), h5_edit(
        c.copy("vox"), incident_energies=np.full((60, 1), 16.0))), ["no event inside the run's energy range"]),
    "select-no-checkpoint": (lambda c: _select(c, _run_with(c, lambda r: [shutil.rmtree(p) for p in glob.glob(
        os.path.join(r, "ckpt_*"))]), c.copy("vox")), ["no complete checkpoint"]),
    "select-truncated-config": (lambda c: _select(c, _run_with(c, lambda r: truncate(os.path.join(
        r, "config.json"))), c.copy("vox")), ["config.json"]),
    "select-config-missing-key": (lambda c: _select(c, _run_with(c, lambda r: json_edit(os.path.join(
        r, "config.json"), ekin_min=None)), c.copy("vox")), ["ekin_min"]),
    "select-truncated-generator": (lambda c: _select(c, _run_with(c, _truncate_generators), c.copy("vox")),
                                   ["generator.keras", "cannot load"]),
    "select-unwritable-out": (lambda c: _select(c, _run_copy(c), c.copy("vox"),
                                                out=os.path.join(c.unwritable(), "sel")), ["sel"]),
    "select-missing-run": (lambda c: _select(c, c.path("no_run"), c.copy("vox")), ["no_run"]),
    # --- export_lwtnn.py
    "export-truncated-generator": (lambda c: _export(c, "--run", _run_with(c, _truncate_generators)),
                                   ["generator.keras", "cannot load"]),
    "export-truncated-config": (lambda c: _export(c, "--run", _run_with(c, lambda r: truncate(os.path.join(
        r, "config.json")))), ["config.json"]),
    "export-config-missing-key": (lambda c: _export(c, "--run", _run_with(c, lambda r: json_edit(os.path.join(
        r, "config.json"), latent_dim=None))), ["latent_dim"]),
    "export-wrong-voxel-count": (lambda c: _export(c, "--run", _run_with(c, lambda r: json_edit(os.path.join(
        r, "config.json"), n_voxels=V + 1))), ["output size"]),
    "export-truncated-best": (lambda c: _export(c, "--best", truncate(c.copy("best"))), ["best.json"]),
    "export-missing-iteration": (lambda c: _export(c, "--run", _run_copy(c), "--iteration", "7"),
                                 ["ckpt_7"]),
    "export-unwritable-out": (lambda c: _export(c, "--run", _run_copy(c), out=os.path.join(c.unwritable(), "lw")),
                              ["lw"]),
    # --- evaluate.py
    "eval-truncated-input": (lambda c: _eval(c, truncate(c.copy("gen")), c.copy("vox")), ["generated.h5"]),
    "eval-truncated-reference": (lambda c: _eval(c, c.copy("gen"), truncate(c.copy("vox"))), ["vox.h5"]),
    "eval-renamed-dataset": (lambda c: _eval(c, h5_edit(c.copy("gen"), rename=("showers", "data")), c.copy("vox")),
                             ["missing dataset 'showers'"]),
    "eval-wrong-voxel-count": (lambda c: _eval(c, _narrow_vox(c, "gen"), c.copy("vox")), ["367 voxels"]),
    "eval-wrong-dataset": (lambda c: _eval(c, c.copy("gen"), c.copy("vox"), d="1-pions"), ["533"]),
    "eval-mismatched-xml": (lambda c: _eval(c, c.copy("gen"), c.copy("vox"), "--binning", XML_PION),
                            ["binning_dataset_1_pions.xml", "photon"]),
    "eval-event-count": (lambda c: _eval(c, h5_edit(c.copy("gen"), **dict(zip(
        ("incident_energies", "showers"), (a[:50] for a in read_arrays(c.kit["gen"], "incident_energies",
                                                                        "showers"))))), c.copy("vox")),
                         ["50 events"]),
    "eval-nan-input": (lambda c: _eval(c, h5_edit(c.copy("gen"), set=("showers", (7, 3), np.nan)), c.copy("vox")),
                       ["NaN/inf", "event 7"]),
    "eval-inf-reference": (lambda c: _eval(c, c.copy("gen"), _nan_vox(c, np.inf)), ["NaN/inf"]),
    "eval-negative-einc-reference": (lambda c: _eval(c, c.copy("gen"), _nan_vox(c, -16384.0, (4, 0),
                                                                               "incident_energies")),
                                     ["'incident_energies' has non-positive"]),
    "eval-zero-einc": (lambda c: _eval(c, h5_edit(c.copy("gen"), set=("incident_energies", (2, 0), 0.0)),
                                       c.copy("vox")), ["'incident_energies' has non-positive"]),
    "eval-zero-events": (lambda c: _eval(c, zero_events(c.copy("gen"), {"incident_energies": (1,),
                                                                         "showers": (V,)}), c.copy("vox")),
                         ["zero events"]),
    "eval-unwritable-out": (lambda c: _eval(c, c.copy("gen"), c.copy("vox"), out=os.path.join(c.unwritable(), "ev")),
                            ["ev"]),
    "eval-unwritable-cache": (lambda c: _eval(c, c.copy("gen"), c.copy("vox"), "--cache_dir",
                                              os.path.join(c.unwritable(), "cache")), ["reference cache"]),
    "eval-unwritable-json": (lambda c: _eval(c, c.copy("gen"), c.copy("vox"), "--json",
                                             os.path.join(c.unwritable(), "m.json")), ["metrics file"]),
    "eval-missing-file": (lambda c: _eval(c, c.path("nope.h5"), c.copy("vox")), ["nope.h5: file not found"]),
}


def run_inprocess(fn, argv, capsys):
    rc = fn(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_lines(err):
    """stderr lines other than evaluate.py's progress lines ("[evaluate] ...", on by default)."""
    return [line for line in err.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith("[evaluate] ")]


def check_failed_cleanly(name, rc, err, expect, before, after, folder):
    assert rc == 2, (name, rc, err)
    assert "Traceback" not in err, (name, err)
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    for text in expect:
        assert text in lines[0], (name, text, err)
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not added and not changed, (name, "written" if added else "inputs modified", added or changed, folder)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(name, kit, tmp_path, capsys, monkeypatch):
    build, expect = CASES[name]
    c = Case(tmp_path, kit)
    monkeypatch.chdir(tmp_path)               # anything written relative to the working folder would show up
    fn, argv = build(c)
    capsys.readouterr()
    before = snapshot(c.dir)
    try:
        rc, _, err = run_inprocess(fn, argv, capsys)
        after = snapshot(c.dir)
    finally:
        c.unlock()
    check_failed_cleanly(name, rc, err, expect, before, after, c.dir)


# a handful as real processes: the exit code and the stderr the shell sees (none of these load TensorFlow)
SUBPROCESS_CASES = {
    "toy-unwritable-out": "preprocess.py",
    "vox-truncated": "preprocess.py",
    "prep-nan-shower": "preprocess.py",
    "train-missing-dataset": "train.py",
    "select-zero-events": "select_epoch.py",
    "export-truncated-config": "export_lwtnn.py",
    "eval-wrong-voxel-count": "evaluate.py",
    "eval-truncated-reference": "evaluate.py",
}


@pytest.mark.parametrize("name", sorted(SUBPROCESS_CASES))
def test_bad_input_real_exit_code(name, kit, tmp_path):
    build, expect = CASES[name]
    c = Case(tmp_path, kit)
    _, argv = build(c)
    before = snapshot(c.dir)
    try:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, SUBPROCESS_CASES[name]), *argv], cwd=c.dir,
                              env=ENV, capture_output=True, text=True, timeout=120)
        after = snapshot(c.dir)
    finally:
        c.unlock()
    check_failed_cleanly(name, proc.returncode, proc.stderr, expect, before, after, c.dir)


def test_table_covers_every_script_and_damage():
    """The table really spans every script and every kind of damage the issue lists."""
    prefixes = {n.split("-")[0] for n in CASES}
    assert prefixes == {"toy", "vox", "prep", "train", "select", "export", "eval"}
    kinds = {"truncated": 0, "renamed-dataset|missing-dataset": 0, "wrong-voxel-count|wrong-extrap|label-shape": 0,
             "nan|inf": 0, "negative": 0, "zero": 0, "xml|wrong-dataset|particle-mismatch": 0, "unwritable": 0}
    for n in CASES:
        for k in kinds:
            if any(part in n for part in k.split("|")):
                kinds[k] += 1
    assert all(v >= 3 for v in kinds.values()), kinds
    assert len(CASES) >= 70


# ----------------------------------------------------------------------------------------------
# read-only input folders: reading needs no write access; nothing is written beside the inputs

def _lock_read_only(folder):
    for base, dirs, files in os.walk(folder):
        for n in files:
            os.chmod(os.path.join(base, n), 0o444)
        for n in dirs:
            os.chmod(os.path.join(base, n), 0o555)
    os.chmod(folder, 0o555)


def _unlock(folder):
    os.chmod(folder, 0o755)
    for base, dirs, files in os.walk(folder):
        for n in dirs:
            os.chmod(os.path.join(base, n), 0o755)
        for n in files:
            os.chmod(os.path.join(base, n), 0o644)


def test_read_only_input_folder_works_and_stays_untouched(kit, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "inputs"
    ro.mkdir()
    for key in ("hits", "vox", "train", "gen", "run"):
        src = kit[key]
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, ro / os.path.basename(src))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    i = lambda name: str(ro / name)          # noqa: E731
    hits = os.path.basename(kit["hits"])
    steps = [
        (preprocess.main, ["voxelise", "--binning", XML, "--particle", "photon", "--jobs", "1", "--out",
                           str(out / "v.h5"), i(hits)]),
        (preprocess.main, ["prepare", "--binning", XML, "--particle", "photon", "--out", str(out / "t.h5"),
                           i("vox.h5")]),
        (train.main, ["--data", i("train.h5"), "--out", str(out / "run"), "--iterations", "1", "--checkpoint-every",
                      "1", "--seed", "2", *TRAIN_FLAGS]),
        (select_epoch.main, ["--run", i("run"), "--reference", i("vox.h5"), "--events", "20", "--out",
                             str(out / "sel")]),
        (export_lwtnn.main, ["--run", i("run"), "--out", str(out / "lw")]),
        (evaluate.main, ["-i", i("generated.h5"), "-r", i("vox.h5"), "-m", "hist-chi", "-d", "1-photons", "--jobs",
                         "1", "--output_dir", str(out / "ev")]),
    ]
    before = snapshot(str(ro))
    _lock_read_only(str(ro))
    try:
        for fn, argv in steps:
            rc, _, err = run_inprocess(fn, argv, capsys)
            assert rc == 0, (argv[:2], err)
    finally:
        _unlock(str(ro))
    assert snapshot(str(ro)) == before
    for made in ("v.h5", "t.h5", "run/config.json", "sel/best.json", "ev/metrics.json"):
        assert (out / made).is_file(), made
    assert len(glob.glob(str(out / "lw" / "neural_net_*.json"))) == 2
    assert not [p for p in glob.glob(str(out / "**" / ".tmp-*"), recursive=True)]


# ----------------------------------------------------------------------------------------------
# kills: train.py at random moments, then --resume

def _zip_ok(path):
    with zipfile.ZipFile(path) as z:
        return z.testzip() is None


def check_run_after_kill(run):
    """Every ``ckpt_<N>`` present is complete; the newest can be resumed; losses cover it. Returns its N (0 if none)."""
    if not os.path.isdir(run):
        return 0
    names = os.listdir(run)
    for n in names:     # a kill leaves only finished entries and temporaries named .tmp-*
        assert n in ("config.json", "losses.csv") or n.startswith(".tmp-") or CKPT_DIR.match(n), n
    if "config.json" in names:
        with open(os.path.join(run, "config.json")) as fh:
            assert json.load(fh)["seed"] == 5
    iters = sorted(int(CKPT_DIR.match(n).group(1)) for n in names if CKPT_DIR.match(n))
    for it in iters:
        ck = os.path.join(run, f"ckpt_{it}")
        assert _zip_ok(os.path.join(ck, "generator.keras")), ck
        with open(os.path.join(ck, "state.json")) as fh:
            assert json.load(fh)["iteration"] == it
    if not iters:
        return 0
    newest = os.path.join(run, f"ckpt_{iters[-1]}", "resume")
    for f in ("generator.weights.h5", "critic.weights.h5"):
        with h5py.File(os.path.join(newest, f), "r"):
            pass
    with np.load(os.path.join(newest, "optimizers.npz")) as z:
        assert len(z.files) > 0 and all(np.isfinite(z[k]).all() for k in z.files)
    with open(os.path.join(run, "losses.csv"), newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(train.LOSS_COLUMNS)
    its = [int(r[0]) for r in rows[1:] if len(r) == len(train.LOSS_COLUMNS)]
    assert its[:iters[-1]] == list(range(1, iters[-1] + 1))   # the losses of every checkpointed iteration
    return iters[-1]


def _train_cmd(data, run, iterations, every):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--data", data, "--out", run, "--iterations",
            str(iterations), "--checkpoint-every", str(every), "--seed", "5", "--resume", *TRAIN_FLAGS]


def _newest(run):
    if not os.path.isdir(run):
        return 0
    its = [int(m.group(1)) for m in map(CKPT_DIR.match, os.listdir(run)) if m]
    return max(its, default=0)


@contextlib.contextmanager
def reaped(proc):
    """Kill ``proc`` if it still runs when the block ends (whatever happened in it), reap it, close its stderr."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def kill_train_repeatedly(data, run, n_kills, seed, every=2, timeout=180):
    """SIGKILL ``train.py --resume`` ``n_kills`` times at seeded random moments; returns what each kill saw.

    A moment is drawn per kill: during start-up (a random delay after the launch), or once training is under
    way (after the next new checkpoint appears, a random delay of up to ~3 checkpoint intervals, which lands
    in the middle of writing checkpoints, losses and pruning resume state).
    """
    rng = np.random.default_rng(seed)
    log = []
    for k in range(n_kills):
        start_ckpt = _newest(run)
        early = rng.random() < 0.25
        delay = float(rng.uniform(0.2, 4.0) if early else rng.uniform(0.0, 0.6))
        proc = subprocess.Popen(_train_cmd(data, run, 10**6, every), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with reaped(proc):
            t0 = time.time()
            if not early:
                while _newest(run) <= start_ckpt:
                    assert proc.poll() is None, (k, proc.stderr.read().decode()[-2000:])
                    assert time.time() - t0 < timeout, "no progress"
                    time.sleep(0.005)
            time.sleep(delay)
            assert proc.poll() is None, (k, "stopped on its own", proc.stderr.read().decode()[-2000:])
            proc.send_signal(signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL
        newest = check_run_after_kill(run)
        assert newest >= start_ckpt                       # a kill never loses a finished checkpoint
        log.append({"kill": k, "early": early, "delay_s": round(delay, 3), "resumed_from": start_ckpt,
                    "newest_after": newest})
    return log


def finish_run(data, run, every, capsys):
    """Resume to a target beyond the newest checkpoint; check it restarted there and ended exactly on target."""
    newest = check_run_after_kill(run)
    target = newest + 2 * every
    rc = train.main(["--data", data, "--out", run, "--iterations", str(target), "--checkpoint-every", str(every),
                     "--seed", "5", "--resume", *TRAIN_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"iterations {newest + 1}..{target}" in out, out       # continued from the newest complete checkpoint
    assert check_run_after_kill(run) == target
    with open(os.path.join(run, "losses.csv"), newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert [int(r[0]) for r in rows] == list(range(1, target + 1))   # exactly one row per iteration
    assert all(len(r) == len(train.LOSS_COLUMNS) for r in rows)
    return target


def test_kill_train_twice_then_resume(kit, tmp_path, capsys):
    small_train = kit["train"]
    run = str(tmp_path / "run")
    log = kill_train_repeatedly(small_train, run, n_kills=2, seed=11)
    assert len(log) == 2
    finish_run(small_train, run, 2, capsys)


@pytest.mark.slow
def test_kill_train_twenty_times_then_resume_equals_uninterrupted(kit, tmp_path, capsys):
    small_train = kit["train"]
    run = str(tmp_path / "run")
    log = kill_train_repeatedly(small_train, run, n_kills=20, seed=2024)
    assert len(log) == 20 and sum(not e["early"] for e in log) >= 10
    target = finish_run(small_train, run, 2, capsys)
    ref = str(tmp_path / "uninterrupted")
    assert train.main(["--data", small_train, "--out", ref, "--iterations", str(target), "--checkpoint-every", "2",
                       "--seed", "5", *TRAIN_FLAGS]) == 0
    with open(os.path.join(run, "losses.csv"), newline="") as a, open(os.path.join(ref, "losses.csv"), newline="") as b:
        got = np.array([[float(v) for v in r] for r in list(csv.reader(a))[1:]])
        want = np.array([[float(v) for v in r] for r in list(csv.reader(b))[1:]])
    # every resume restored weights, optimiser state and the batch RNG: the same training as without kills
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# kills: preprocess.py voxelise and evaluate.py mid-write

STALL_WRAPPER = textwrap.dedent("""\
    import contextlib, os, sys, time
    sys.path.insert(0, {root!r})
    import {module} as script
    import plumbing
    FLAG, STALL_AT, WHERE = {flag!r}, {stall_at}, {where!r}
    calls = [0]
    real = plumbing.atomic_output

    def stall(note):
        with open(FLAG + ".tmp", "w") as fh:
            fh.write(note)
        os.replace(FLAG + ".tmp", FLAG)
        time.sleep(600)

    @contextlib.contextmanager
    def watched(path):
        calls[0] += 1
        mine = calls[0]
        with real(path) as tmp:
            yield tmp
            if WHERE == "end" and mine == STALL_AT:
                stall(tmp)            # complete, closed, not yet renamed

    script.atomic_output = watched              # the script's own atomic writes
    plumbing.atomic_output = watched            # and those of the shared helpers (write_text, write_calo_file)
    if WHERE == "mid":                # voxelise: first file's showers written, the output still open
        real_map = script._map_tasks
        def mapped(tasks, jobs):
            for i, res in enumerate(real_map(tasks, jobs)):
                if i == 1:
                    stall(str(sys.argv))
                yield res
        script._map_tasks = mapped
    sys.exit(script.main(sys.argv[1:]))
""")


def run_until_stalled(tmp_path, module, argv, stall_at=1, where="end", timeout=120):
    """Run ``module.main(argv)`` in a process that stops at its ``stall_at``-th output; SIGKILL it there."""
    flag = str(tmp_path / f"stalled_{module}_{stall_at}_{where}")
    code = STALL_WRAPPER.format(root=ROOT, module=module, flag=flag, stall_at=stall_at, where=where)
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=str(tmp_path), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with reaped(proc):
        t0 = time.time()
        while not os.path.exists(flag):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() - t0 < timeout
            time.sleep(0.01)
        with open(flag) as fh:
            note = fh.read()
        if where == "end":
            assert os.path.getsize(note) > 0         # the complete output sits under its temporary name
        proc.send_signal(signal.SIGKILL)
    return note


def _finals(folder):
    """Files under final names (not .tmp-*) in a folder tree."""
    out = []
    for base, _, files in os.walk(folder):
        out += [os.path.join(base, n) for n in files if not n.startswith(".tmp-")]
    return sorted(out)


def _same_voxels(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_array_equal(fa["showers"][...], fb["showers"][...])
        np.testing.assert_array_equal(fa["incident_energies"][...], fb["incident_energies"][...])


@pytest.mark.parametrize("where", ["mid", "end"])
def test_kill_voxelise_mid_write_leaves_no_truncated_output(kit, tmp_path, capsys, where):
    hits = [kit["hits"], kit["hits2"]]
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "vox.h5")
    argv = ["voxelise", "--binning", XML, "--particle", "photon", "--jobs", "1", "--out", target, "--csv",
            str(out / "csv"), *hits]
    before = {p: sha256(p) for p in hits}
    run_until_stalled(tmp_path, "preprocess", argv, 1, where)
    assert not os.path.exists(target)
    if where == "mid":        # killed while the voxel file was half written: nothing under a final name
        assert _finals(str(out)) == [] and not os.path.exists(out / "csv")
    else:                     # the CSVs are renamed before the voxel file: if present, they are whole
        for p in _finals(str(out)):
            assert p.endswith(".csv")
            assert np.loadtxt(p, delimiter=",", skiprows=1).shape == (30, V)
    assert {p: sha256(p) for p in hits} == before
    assert preprocess.main(argv) == 0                               # the re-run completes
    assert "voxelise: wrote" in capsys.readouterr().out
    _same_voxels(target, kit["vox"])
    assert len(glob.glob(str(out / "csv" / "*.csv"))) == 2


def test_kill_voxelise_at_random_moments(kit, tmp_path):
    """Seeded random SIGKILLs of a real voxelise: whatever exists under the final name afterwards is complete."""
    rng = np.random.default_rng(7)
    target = str(tmp_path / "vox.h5")
    argv = [sys.executable, os.path.join(ROOT, "preprocess.py"), "voxelise", "--binning", XML, "--particle", "photon",
            "--jobs", "1", "--out", target, kit["hits"], kit["hits2"]]
    outcomes = []
    for _ in range(3):
        if os.path.exists(target):
            os.remove(target)
        proc = subprocess.Popen(argv, cwd=str(tmp_path), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.2, 1.2)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(target):
            _same_voxels(target, kit["vox"])              # finished before the kill: complete and right
        outcomes.append(os.path.exists(target))
        assert [p for p in os.listdir(tmp_path) if not p.startswith(".tmp-")] in ([], ["vox.h5"])
    assert subprocess.run(argv, cwd=str(tmp_path), env=ENV, capture_output=True).returncode == 0
    _same_voxels(target, kit["vox"])


def _eval_argv(kit, out):
    return ["-i", kit["gen"], "-r", kit["vox"], "-m", "hist-chi", "-d", "1-photons", "--jobs", "1",
            "--output_dir", str(out)]


def _complete_eval_file(path):
    """A finished evaluate.py output parses whole."""
    name = os.path.basename(path)
    if name.endswith(".json"):
        with open(path) as fh:
            assert "separation_power" in json.load(fh)
    elif name.endswith(".npz"):
        with np.load(path) as z:
            assert "key" in z.files and z["f__Etot"].shape == (60,)
    elif name.startswith("histogram_chi2"):
        names = evaluate.read_chi2_file(path)
        assert "Etot / Einc" in names and "Voxel distribution" in names
    else:
        raise AssertionError(f"unexpected output {path}")


@pytest.mark.parametrize("stall_at", [1, 2, 3])
def test_kill_evaluate_mid_write_leaves_no_truncated_output(kit, tmp_path, capsys, stall_at):
    """hist-chi writes histogram_chi2, the reference cache and metrics.json: stop at each, kill, re-run."""
    out = tmp_path / "ev"
    argv = _eval_argv(kit, out)
    before = {p: sha256(p) for p in (kit["gen"], kit["vox"])}
    run_until_stalled(tmp_path, "evaluate", argv, stall_at, "end")
    done = _finals(str(out))
    assert len(done) == stall_at - 1                                 # only the outputs finished before the kill
    for p in done:
        _complete_eval_file(p)
    assert not os.path.exists(out / "metrics.json")
    assert {p: sha256(p) for p in before} == before
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    finals = _finals(str(out))
    assert len(finals) == 3
    for p in finals:
        _complete_eval_file(p)


def test_kill_evaluate_at_random_moments(kit, tmp_path):
    rng = np.random.default_rng(3)
    out = tmp_path / "ev"
    argv = [sys.executable, os.path.join(ROOT, "evaluate.py"), *_eval_argv(kit, out)]
    for _ in range(3):
        proc = subprocess.Popen(argv, cwd=str(tmp_path), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.3, 1.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for p in _finals(str(out)):
            _complete_eval_file(p)
    assert subprocess.run(argv, cwd=str(tmp_path), env=ENV, capture_output=True).returncode == 0
    assert len(_finals(str(out))) == 3


# ----------------------------------------------------------------------------------------------
# the atomic helpers themselves

def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fill(folder, text):
    for name in ("generator.keras", "state.json"):
        write_text(os.path.join(folder, name), text)


def _contents(folder):
    return {n: open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder))}


def test_atomic_directory_mode_replacement_and_failure(tmp_path, monkeypatch):
    final = str(tmp_path / "ckpt_5")
    with atomic_directory(final) as tmp:
        _fill(tmp, "first")
    assert os.stat(final).st_mode & 0o777 == 0o777 & ~_umask()        # not mkdtemp's 0700
    with pytest.raises(RuntimeError):                                  # a failing block: the old one stays
        with atomic_directory(final) as tmp:
            _fill(tmp, "broken")
            raise RuntimeError("stop")
    assert _contents(final) == {"generator.keras": "first", "state.json": "first"}
    assert os.listdir(tmp_path) == ["ckpt_5"]
    # replacing an existing directory: even a death while the old copy is being deleted leaves the complete new
    # one under the final name (the old copy was renamed aside first), never a half-deleted directory
    real_rmtree = shutil.rmtree
    calls = []

    def dies_while_deleting(path, *args, **kwargs):
        calls.append(path)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(plumbing.shutil, "rmtree", dies_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            _fill(tmp, "second")
    monkeypatch.setattr(plumbing.shutil, "rmtree", real_rmtree)
    assert _contents(final) == {"generator.keras": "second", "state.json": "second"}
    assert calls and os.path.basename(calls[0]).startswith(".tmp-")      # only a temporary name was being deleted
    with atomic_directory(final) as tmp:
        _fill(tmp, "third")
    assert _contents(final) == {"generator.keras": "third", "state.json": "third"}


def test_preprocess_main_returns_usage_errors_in_process(capsys):
    assert preprocess.main(["voxelise", "--particle", "photon"]) == 2
    assert "required" in capsys.readouterr().err
    assert preprocess.main(["toy", "--help"]) == 0
    assert "--events-per-energy" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# the voxel file a kill-free run writes is the one the kit's geometry expects (guards the fixtures above)

def test_kit_files_are_what_the_cases_assume(kit):
    g = read_geometry(XML, "photon")
    with h5py.File(kit["vox"]) as f:
        assert f["showers"].shape == (60, g.n_voxels) == (60, V)
    with h5py.File(kit["train"]) as f:
        assert f["voxels"].shape == (60, V)
    assert [it for it, _ in train.list_checkpoints(kit["run"])] == [1, 2]
    for it in (1, 2):    # checkpoint folders get the usual mode, readable by the group like every other output
        assert os.stat(os.path.join(kit["run"], f"ckpt_{it}")).st_mode & 0o777 == 0o777 & ~_umask()
    with h5py.File(kit["hits"]) as f:
        assert f["extrap_eta"].shape[1] == 24 and np.unique(f["layer"][...]).max() >= 12


def test_trim_losses_drops_a_row_cut_by_a_kill(tmp_path):
    """A kill mid-write can leave '10' (a cut '1001,...') as the last line; resuming must not keep it."""
    import train

    p = tmp_path / "losses.csv"
    body = "".join(f"{i},1,2,3,4\n" for i in range(1, 1001))
    p.write_text(",".join(train.LOSS_COLUMNS) + "\n" + body + "10")
    assert train.trim_losses(str(p), 1000) == 1000
    lines = p.read_text().splitlines()
    assert len(lines) == 1001 and lines[-1].startswith("1000,")
