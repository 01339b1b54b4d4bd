"""The repository's shape: layering, no import cycles, scripts that run when copied alone, no cited documents,
Make rules that redo exactly what a change touches, and the docstring examples.

Layering rule: a stage script (preprocess, train, select_epoch, export_lwtnn, evaluate, scaleout, summary) imports only the
shared modules (HighLevelFeatures.py, plumbing.py) and the toy source (toyshower.py, itself importing only shared
modules), never another stage.
"""
import ast
import doctest
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("preprocess", "train", "select_epoch", "export_lwtnn", "evaluate", "scaleout", "summary", "fastcalosim")
SHARED = ("HighLevelFeatures", "plumbing")
TOY = "toyshower"
#: what docs/pipeline-and-scripts.md says each script needs beside it when copied alone
COMPANIONS = {
    "HighLevelFeatures.py": [],
    "plumbing.py": ["HighLevelFeatures.py"],
    "toyshower.py": ["HighLevelFeatures.py", "plumbing.py"],
    "preprocess.py": ["HighLevelFeatures.py", "plumbing.py", "toyshower.py"],
    "train.py": ["HighLevelFeatures.py", "plumbing.py"],
    "select_epoch.py": ["HighLevelFeatures.py", "plumbing.py"],
    "export_lwtnn.py": ["HighLevelFeatures.py", "plumbing.py"],
    "evaluate.py": ["HighLevelFeatures.py", "plumbing.py"],
    "scaleout.py": ["HighLevelFeatures.py", "plumbing.py"],
    "summary.py": ["HighLevelFeatures.py", "plumbing.py"],
    "fastcalosim.py": ["HighLevelFeatures.py", "plumbing.py", "toyshower.py"],
}
LOCAL = set(STAGES) | set(SHARED) | {TOY}


def local_imports(module):
    """Repository modules imported anywhere in ``module``.py (top level or inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & LOCAL - {module}


def test_every_script_is_listed():
    assert sorted(COMPANIONS) == sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_only_shared_modules(stage):
    assert local_imports(stage) <= set(SHARED) | {TOY}, local_imports(stage)


def test_shared_modules_point_down_only():
    assert local_imports("HighLevelFeatures") == set()          # a drop-in for CaloChallenge's own file
    assert local_imports("plumbing") == {"HighLevelFeatures"}
    assert local_imports(TOY) <= set(SHARED)


def test_no_import_cycles():
    graph = {m: local_imports(m) for m in LOCAL}

    def visit(m, path):
        assert m not in path, " -> ".join(path + [m])
        for n in graph[m]:
            visit(n, path + [m])

    for m in graph:
        visit(m, [])


def test_companions_match_the_imports():
    """COMPANIONS (as docs/pipeline-and-scripts.md lists them) = the transitive closure of each script's imports."""
    def closure(m):
        out = set()
        for n in local_imports(m):
            out |= {n} | closure(n)
        return out

    for script, companions in COMPANIONS.items():
        assert {c[:-3] for c in companions} == closure(script[:-3]), script
        doc = open(os.path.join(ROOT, "docs", "pipeline-and-scripts.md")).read()
        row = next(line for line in doc.splitlines() if line.startswith("|") and script in line.split("|")[1])
        assert all(c in row.split("|")[2] for c in companions) and (companions or "nothing" in row), (script, row)


#: the team's documents outside the repository, which the product must not cite (spelled in pieces so that this
#: file does not cite them either)
TEAM_DOCUMENTS = ("SP" + "EC", "CONTR" + "ACTS")


def test_no_citation_of_team_documents():
    for path in (glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "docs", "*.md"))
                 + [os.path.join(ROOT, "Makefile"), os.path.join(ROOT, "README.md")]):
        text = open(path).read()
        assert not any(word in text for word in TEAM_DOCUMENTS), path


@pytest.mark.parametrize("module", sorted(LOCAL))
def test_docstring_examples(module, monkeypatch):
    """Every ``>>>`` example in the scripts' docstrings runs and prints what it shows (from the repository root)."""
    monkeypatch.chdir(ROOT)
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


# ----------------------------------------------------------------------------------------------
# copied alone: each script with only its companions in an empty folder answers --help and does one real job

def run_copy(folder, script, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CALOKIT_DEBUG"] = "1"
    res = subprocess.run([sys.executable, script, *args], cwd=folder, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, f"{script} {args}: {res.stdout[-2000:]}{res.stderr[-3000:]}"
    return res.stdout


def copy_alone(tmp_path, script):
    folder = tmp_path / script.replace(".py", "_alone")
    folder.mkdir()
    for name in [script, *COMPANIONS[script]]:
        shutil.copy(os.path.join(ROOT, name), folder / name)
    assert "usage" in run_copy(folder, script, "--help").lower()
    return folder


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """Toy hits -> voxels -> training file -> a 4-iteration run, made by the repository's scripts in-process."""
    import preprocess
    import train
    d = tmp_path_factory.mktemp("chain")
    xml = os.path.join(ROOT, "binning", "binning_fastcalogan.xml")
    assert preprocess.main(["toy", "--particle", "photon", "--eta", "0.20", "--events-per-energy", "40",
                            "--energies", "4096", "65536", "--seed", "1", "--out", str(d / "hits")]) == 0
    hits = sorted(glob.glob(str(d / "hits" / "*.h5")))
    assert preprocess.main(["voxelise", "--binning", xml, "--particle", "photon", "--out", str(d / "vox.h5"),
                            *hits]) == 0
    assert preprocess.main(["prepare", "--binning", xml, "--particle", "photon", "--range", "all",
                            "--out", str(d / "train.h5"), str(d / "vox.h5")]) == 0
    assert train.main(["--data", str(d / "train.h5"), "--out", str(d / "run"), "--iterations", "4",
                       "--checkpoint-every", "2", "--batch-size", "16", "--no-jit"]) == 0
    return {"dir": d, "xml": xml, "hits": hits, "vox": str(d / "vox.h5"), "train": str(d / "train.h5"),
            "run": str(d / "run")}


def test_copied_preprocess_and_toy(tmp_path, tiny_chain):
    folder = copy_alone(tmp_path, "preprocess.py")
    run_copy(folder, "preprocess.py", "toy", "--events-per-energy", "5", "--energies", "1024", "--out", "hits")
    out = run_copy(folder, "preprocess.py", "voxelise", "--binning", tiny_chain["xml"], "--particle", "photon",
                   "--out", "vox.h5", *glob.glob(str(folder / "hits" / "*.h5")))
    assert "vox.h5" in out
    with h5py.File(folder / "vox.h5") as f, h5py.File(glob.glob(str(folder / "hits" / "*.h5"))[0]) as h:
        assert f["showers"].shape == (5, 368)
        # every hit lands in a voxel of the five voxelised layers (the toy deposits nothing elsewhere here)
        kept = np.isin(h["layer"][:], [0, 1, 2, 3, 12])
        assert np.isclose(f["showers"][:].sum(dtype=np.float64), h["energy"][:][kept].sum(dtype=np.float64), rtol=1e-6)


def test_copied_train_select_export(tmp_path, tiny_chain):
    folder = copy_alone(tmp_path, "train.py")
    run_copy(folder, "train.py", "--data", tiny_chain["train"], "--out", "run", "--iterations", "2",
             "--checkpoint-every", "1", "--batch-size", "8", "--no-jit")
    assert sorted(os.listdir(folder / "run")) >= ["ckpt_1", "ckpt_2", "config.json", "losses.csv"]
    folder = copy_alone(tmp_path, "select_epoch.py")
    run_copy(folder, "select_epoch.py", "--run", tiny_chain["run"], "--reference", tiny_chain["vox"],
             "--events", "50", "--out", "sel", "--no-generated")
    best = __import__("json").load(open(folder / "sel" / "best.json"))
    assert best["best_iteration"] in (2, 4) and best["checkpoints"] == 2
    folder = copy_alone(tmp_path, "export_lwtnn.py")
    out = run_copy(folder, "export_lwtnn.py", "--run", tiny_chain["run"], "--out", "net", "--check",
                   "--check-events", "50")
    assert any(name.endswith(".json") and name.startswith("neural_net_22") for name in os.listdir(folder / "net")), out


def test_copied_evaluate_scaleout_hlf(tmp_path, tiny_chain):
    folder = copy_alone(tmp_path, "evaluate.py")
    shutil.copy(os.path.join(ROOT, "binning", "binning_dataset_1_photons.xml"), folder)
    run_copy(folder, "evaluate.py", "-i", tiny_chain["vox"], "-r", tiny_chain["vox"], "-m", "hist-chi",
             "-d", "1-photons", "--binning", "binning_dataset_1_photons.xml", "--output_dir", "out", "--jobs", "1")
    text = open(folder / "out" / "histogram_chi2_1-photons.txt").read()
    assert "Etot / Einc: \n0.0\n" in text                   # a file against itself: separation power 0
    folder = copy_alone(tmp_path, "scaleout.py")
    run_copy(folder, "scaleout.py", "condor", "--slices", "photon_0.20", "--work", "w", "--results", "r",
             "--out", "dag")
    assert "JOB" in open(folder / "dag" / "calokit.dag").read()
    folder = copy_alone(tmp_path, "HighLevelFeatures.py")
    out = run_copy(folder, "HighLevelFeatures.py", tiny_chain["xml"], "photon", "0.22")
    assert "368" in out


def test_copied_summary(tmp_path, tiny_chain):
    """summary.py alone over one slice whose generated file is its reference: response equal, chi2 0."""
    res = tmp_path / "results" / "photon_0.20"
    (res / "select").mkdir(parents=True)
    shutil.copy(tiny_chain["vox"], res / "select" / "generated.h5")
    (res / "select" / "best.json").write_text(__import__("json").dumps(
        {"best_iteration": 4, "chi2_ndf": 1.0, "reference_for_evaluate": tiny_chain["vox"]}))
    folder = copy_alone(tmp_path, "summary.py")
    out = run_copy(folder, "summary.py", "--results", str(tmp_path / "results"), "--out", "s")
    assert "1 incomplete" in out
    doc = __import__("json").load(open(folder / "s" / "summary.json"))
    (s,) = doc["slices"]
    assert s["missing"] == ["eval/metrics.json", "lwtnn/*.json"] and len(s["points"]) == 2
    assert all(p["chi2"] == 0.0 and p["response_gen"] == p["response_ref"] for p in s["points"])


def test_copied_modules_import_alone(tmp_path):
    """plumbing.py and toyshower.py (modules without a command line) import with only their companions."""
    for script in ("plumbing.py", "toyshower.py"):
        folder = tmp_path / script
        folder.mkdir()
        for name in [script, *COMPANIONS[script]]:
            shutil.copy(os.path.join(ROOT, name), folder / name)
        run_copy(folder, "-c", f"import {script[:-3]}")


@pytest.mark.parametrize("command", [["train"], ["select_epoch"], ["export_lwtnn"], ["scaleout"], ["evaluate"],
                                     ["preprocess", "toy"], ["preprocess", "voxelise"], ["preprocess", "prepare"],
                                     ["preprocess", "fetch"], ["HighLevelFeatures"]])
def test_help_text(command, capsys):
    """--help: every option has a help text, no "(default: None)", a default stated at most once per option."""
    mod = importlib.import_module(command[0])
    assert mod.main(command[1:] + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "default: None" not in out and "(default: [])" not in out
    options = [o.split("\n\n")[0] for o in re.split(r"\n  (?=-)", out.split("options:", 1)[1])[1:]]
    assert options, out
    for opt in options:
        name = opt.split()[0]
        assert opt.count("default") <= 1, opt
        if name not in ("-h,", "--help"):
            assert len(opt.replace("\n", " ").split()) > 2 or "|" in name, f"{name} has no help text"


def test_copied_fastcalosim(tmp_path, tiny_chain):
    """fastcalosim.py alone: the tiny run exported as UltraLow12 and High12 becomes a folder; the 65 GeV hits give
    the validation file, the missing 1 TeV hits are reported; the folder's networks pass the check."""
    import json
    import export_lwtnn

    nets = []
    for name, lo, hi in (("UltraLow12", 6, 12), ("High12", 12, 22)):
        run = tmp_path / f"run_{name}"
        shutil.copytree(tiny_chain["run"], run)
        cfg = json.loads((run / "config.json").read_text())
        cfg.update(range=name, p_min=2.0 ** lo, p_max=2.0 ** hi, ekin_min=2.0 ** lo, ekin_max=2.0 ** hi)
        (run / "config.json").write_text(json.dumps(cfg))
        nets.append(str(tmp_path / f"net_{name}"))
        assert export_lwtnn.main(["--run", str(run), "--out", nets[-1], "--binning", tiny_chain["xml"]]) == 0
    folder = copy_alone(tmp_path, "fastcalosim.py")
    out = run_copy(folder, "fastcalosim.py", "--out", "fcs", "--networks", *nets, "--hits",
                   os.path.dirname(tiny_chain["hits"][0]))
    assert "1 missing item(s)" in out
    assert os.listdir(folder / "fcs" / "rootFiles") == ["pid22_E65536_eta_20_25_validation.root"]
    out = run_copy(folder, "fastcalosim.py", "--check-folder", "fcs", "--networks-only", "--check-events", "2")
    assert "2 network(s) run at 17 energy points" in out
