"""The Makefile redoes exactly what a change touches: a changed setting or an edited script/module replans its stages
and only those (checked with `make -n`), an unchanged rerun plans nothing, and `make clean-slice` removes one slice.

The chain is made once with a stand-in interpreter (PY_EXE) that only creates each stage's outputs, in a copy of the
Makefile and the files its rules name, so nothing here trains or touches the repository.
"""
import os
import re
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_PY = r"""#!/bin/bash
# stand-in for python: create the outputs each stage would write, nothing else
script=$1; shift; out=""; json=""
while [ $# -gt 0 ]; do case "$1" in --out|--output_dir) out=$2; shift;; --json) json=$2; shift;; esac; shift; done
case "$script" in
  preprocess.py) if [[ "$out" == *.h5 ]]; then mkdir -p "$(dirname "$out")"; touch "$out"; else mkdir -p "$out"; fi;;
  train.py) mkdir -p "$out";;
  *) mkdir -p "$out"; [ "$script" = select_epoch.py ] && touch "$out/best.json"; [ -n "$json" ] && touch "$json"
     [ "$script" = summary.py ] && touch "$out/summary.json";;
esac
exit 0
"""
ALL = {"toy", "voxelise", "prepare", "train.py", "select_epoch.py", "export_lwtnn.py", "evaluate.py"}
AFTER_TRAIN = {"train.py", "select_epoch.py", "export_lwtnn.py", "evaluate.py"}
AFTER_SELECT = {"select_epoch.py", "export_lwtnn.py", "evaluate.py"}


@pytest.fixture()
def tree(tmp_path):
    """A copy of the Makefile's inputs with a finished (stand-in) chain for two slices."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "Makefile":
            shutil.copy2(os.path.join(ROOT, name), repo / name)
    shutil.copytree(os.path.join(ROOT, "binning"), repo / "binning")
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    base = ["make", "-C", str(repo), f"PY_EXE={fake}", "ETAS=0.20 0.25"]
    res = subprocess.run(base + ["all"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return repo, base


def planned(tree, *args):
    """What `make -n all ARGS` would run: the stage names, per slice."""
    repo, base = tree
    res = subprocess.run(base + ["-n", "all", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = {}
    for line in re.sub(r"\\\n\s*", " ", res.stdout).splitlines():      # continued recipe lines joined
        if re.search(r"fakepy summary\.py ", line):      # the summary of every slice
            found.setdefault("summary", set()).add("summary.py")
            continue
        m = re.search(r"fakepy (\S+\.py)( (toy|voxelise|prepare))?.*?(photon_0\.2[05])", line)
        if m:
            stage = m.group(3) if m.group(1) == "preprocess.py" else m.group(1)
            found.setdefault(m.group(4), set()).add(stage)
    return found


def test_unchanged_rerun_plans_nothing(tree):
    assert planned(tree) == {}


@pytest.mark.parametrize("setting, stages", [
    ("ITERATIONS=600", AFTER_TRAIN),
    ("CKPT_EVERY=50", AFTER_TRAIN),
    ("TRAIN_ARGS=--lr 1e-4", AFTER_TRAIN),
    ("RECIPE=fastcalogan", AFTER_TRAIN),               # the demo's default is calokit
    ("RECIPE=caloshowergan", {"prepare"} | AFTER_TRAIN),   # prepare writes the layer representation for it
    ("EVENTS=500", ALL),
    ("SEED=7", ALL),
    ("RANGE=high", {"prepare"} | AFTER_TRAIN),
    ("SELECT_EVENTS=100", AFTER_SELECT),
    ("SELECT_ARGS=", AFTER_SELECT),                    # the demo's default is --overflow --window mean
    ("CLS_EPOCHS=3", {"evaluate.py"}),
    ("EVAL_ARGS=--jobs 1", {"evaluate.py"}),
    ("EXPORT_ARGS=--check-events 10", {"export_lwtnn.py"}),
])
def test_changed_setting_redoes_exactly_its_stages(tree, setting, stages):
    name, value = setting.split("=", 1)
    plan = planned(tree, f"{name}={value}")
    assert plan == {"photon_0.20": stages, "photon_0.25": stages, "summary": {"summary.py"}}
    # after a real run with the new setting, it plans nothing; going back to the default redoes the same stages
    repo, base = tree
    assert subprocess.run(base + ["all", f"{name}={value}"], capture_output=True, timeout=120).returncode == 0
    assert planned(tree, f"{name}={value}") == {}
    assert planned(tree) == plan


@pytest.mark.parametrize("edited, stages", [
    ("toyshower.py", ALL),
    ("HighLevelFeatures.py", ALL),
    ("plumbing.py", ALL),
    ("preprocess.py", ALL),
    ("binning/binning_fastcalogan.xml", ALL - {"toy"}),
    ("train.py", AFTER_TRAIN),
    ("select_epoch.py", AFTER_SELECT),
    ("export_lwtnn.py", {"export_lwtnn.py"}),
    ("evaluate.py", {"evaluate.py"}),
])
def test_edited_file_redoes_exactly_its_stages(tree, edited, stages):
    repo, _ = tree
    path = repo / edited
    later = max(os.stat(p).st_mtime for p in repo.rglob("*") if p.is_file()) + 10
    os.utime(path, (later, later))
    assert planned(tree) == {"photon_0.20": stages, "photon_0.25": stages, "summary": {"summary.py"}}


@pytest.mark.parametrize("args", [["SUMMARY_ARGS=--dpi 50"], ["ETAS=0.20"]])
def test_summary_settings_redo_the_summary_only(tree, args):
    assert planned(tree, *args) == {"summary": {"summary.py"}}


def test_edited_summary_script_redoes_the_summary_only(tree):
    repo, _ = tree
    later = max(os.stat(p).st_mtime for p in repo.rglob("*") if p.is_file()) + 10
    os.utime(repo / "summary.py", (later, later))
    assert planned(tree) == {"summary": {"summary.py"}}


def test_demo_3x2_plans_six_slices_with_electrons_judged_as_photons(tree):
    repo, base = tree
    res = subprocess.run(base + ["-n", "all", "DEMO=3x2", "WORK=w3", "RESULTS=r3"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    evals = re.findall(r"fakepy evaluate\.py -i r3/(\w+_0\.2[05])/select/generated\.h5 .*? -d (\S+)", res.stdout)
    assert sorted(evals) == sorted([(f"{p}_{e}", d) for p, d in (("photon", "1-photons"), ("electron", "1-photons"),
                                                                  ("pion", "1-pions")) for e in ("0.20", "0.25")])
    toys = re.findall(r"fakepy preprocess\.py toy --particle (\w+) --eta (\S+) ", res.stdout)
    assert len(toys) == 12 and ("electron", "0.25") in toys                  # training + held-out per slice
    assert re.search(r'fakepy summary\.py --results r3 --slices "photon_0\.20 photon_0\.25 electron_0\.20 '
                     r'electron_0\.25 pion_0\.20 pion_0\.25" --out r3/summary', res.stdout)
    bad = subprocess.run(base + ["-n", "all", "DEMO=9x9"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DEMO must be" in bad.stderr


def test_clean_slice_removes_one_slice(tree):
    repo, base = tree
    res = subprocess.run(base + ["clean-slice", "SLICE=photon_0.25"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (repo / "work/demo/photon_0.20").is_dir() and not (repo / "work/demo/photon_0.25").exists()
    assert (repo / "results/demo/photon_0.20").is_dir() and not (repo / "results/demo/photon_0.25").exists()
    assert planned(tree) == {"photon_0.25": ALL, "summary": {"summary.py"}}
    res = subprocess.run(base + ["clean-slice"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "SLICE=" in res.stderr


def test_clean_hits_redoes_nothing(tree):
    repo, base = tree
    assert subprocess.run(base + ["clean-hits"], capture_output=True, timeout=60).returncode == 0
    assert not (repo / "work/demo/photon_0.20/hits").exists() and (repo / "work/demo/photon_0.20/voxels.h5").exists()
    assert planned(tree) == {}


def fake_calochallenge_files(data):
    """Empty stand-ins for the dataset-1 files in ``data`` (Make only needs them to exist); returns ``data``."""
    data.mkdir()
    for name in ("dataset_1_photons_1.hdf5", "dataset_1_photons_2.hdf5", "dataset_1_pions_1.hdf5",
                 "dataset_1_pions_2.hdf5"):
        (data / name).write_text("")
    return data


def test_calochallenge_photons_plan_two_gans_per_slice_and_one_evaluation(tree, tmp_path):
    """DATASET=1-photons: per slice a Low12 and a High12 GAN (prepare, train, select, export each, in their own
    folders, with BoloGAN's batches and 10,000 showers per energy in the epoch choice), one combination of the
    two generated files, one evaluate.py of it; after a (stand-in) run nothing is planned; pions stay one All GAN."""
    repo, base = tree
    data = fake_calochallenge_files(tmp_path / "cc")
    cc = base + ["DATASET=1-photons", f"DATA_DIR={data}"]
    res = subprocess.run(cc + ["-n", "all"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = re.sub(r"\\\n\s*", "", res.stdout)      # recipe lines continued with a backslash, joined
    w, r = "work/1-photons/photon_0.20", "results/1-photons/photon_0.20"
    ranges = ("Low12", "High12")
    prepares = re.findall(r"fakepy preprocess\.py prepare .*--range (\S+)\s+(?:\\\s+)?--out (\S+) (\S+)", out)
    assert sorted(prepares) == sorted((g, f"{w}/{g}/train.h5", f"{w}/voxels.h5") for g in ranges)
    trains = re.findall(r"fakepy train\.py --data (\S+) --out (\S+) .*--batches epoch", out)
    assert sorted(trains) == sorted((f"{w}/{g}/train.h5", f"{w}/{g}/run") for g in ranges)
    selects = re.findall(r"fakepy select_epoch\.py --run (\S+) --reference (\S+)\s+(?:\\\s+)?--events (\d+) "
                         r"--generate-like (\S+) .*--out (\S+)", out)
    assert sorted(selects) == sorted((f"{w}/{g}/run", f"{w}/voxels.h5", "10000", f"{w}/voxels_heldout.h5",
                                      f"{r}/{g}/select") for g in ranges)
    assert re.findall(r"fakepy select_epoch\.py --combine (\S+) (\S+)\s+(?:\\\s+)?--generate-like (\S+) --out (\S+)",
                      out) == [(f"{r}/Low12/select", f"{r}/High12/select", f"{w}/voxels_heldout.h5", f"{r}/select")]
    exports = re.findall(r"fakepy export_lwtnn\.py --run (\S+) --best (\S+) --out (\S+)", out)
    assert sorted(exports) == sorted((f"{w}/{g}/run", f"{r}/{g}/select/best.json", f"{r}/{g}/lwtnn") for g in ranges)
    assert re.findall(r"fakepy evaluate\.py -i (\S+) -r (\S+)", out) == [(f"{r}/select/generated.h5",
                                                                          f"{w}/voxels_heldout.h5")]
    assert subprocess.run(cc + ["all"], capture_output=True, timeout=120).returncode == 0
    again = subprocess.run(cc + ["-n", "all"], capture_output=True, text=True, timeout=120)
    assert "fakepy" not in again.stdout, again.stdout
    pions = subprocess.run(base + ["-n", "all", "DATASET=1-pions", f"DATA_DIR={data}"], capture_output=True,
                           text=True, timeout=120)
    assert re.findall(r"--range (\S+)", pions.stdout) == ["All"] and "--combine" not in pions.stdout
    assert "work/1-pions/pion_0.20/run" in pions.stdout


def test_baseline_two_range_dataset_plans_per_range_then_combines(tree, tmp_path):
    """`make baseline DATASET=1-photons`: a 1-iteration run and its selection per range (Low12, High12, in their
    own folders), the two generated files combined as `make all` combines them, one evaluate.py of the combination;
    after a (stand-in) run nothing is planned. A one-range dataset keeps one run, no combination."""
    repo, base = tree
    data = fake_calochallenge_files(tmp_path / "cc")
    cc = base + ["DATASET=1-photons", f"DATA_DIR={data}"]
    res = subprocess.run(cc + ["-n", "baseline"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = re.sub(r"\\\n\s*", "", res.stdout)
    w, r = "work/1-photons/photon_0.20", "results/1-photons/photon_0.20"
    ranges = ("Low12", "High12")
    trains = re.findall(r"fakepy train\.py --data (\S+) --out (\S+) --iterations 1 .*--batches epoch", out)
    assert sorted(trains) == sorted((f"{w}/{g}/train.h5", f"{w}/{g}/run_untrained") for g in ranges)
    selects = re.findall(r"fakepy select_epoch\.py --run (\S+) --reference (\S+)\s*--events (\d+) "
                         r"--generate-like (\S+) .*--out (\S+)", out)
    assert sorted(selects) == sorted((f"{w}/{g}/run_untrained", f"{w}/voxels.h5", "10000", f"{w}/voxels_heldout.h5",
                                      f"{r}/{g}/baseline/select") for g in ranges)
    assert re.findall(r"fakepy select_epoch\.py --combine (\S+) (\S+)\s*--generate-like (\S+) --out (\S+)", out) == [
        (f"{r}/Low12/baseline/select", f"{r}/High12/baseline/select", f"{w}/voxels_heldout.h5", f"{r}/baseline/select")]
    assert re.findall(r"fakepy evaluate\.py -i (\S+) -r (\S+) -m all\s*-d (\S+) --output_dir (\S+)", out) == [
        (f"{r}/baseline/select/generated.h5", f"{w}/voxels_heldout.h5", "1-photons", f"{r}/baseline/eval")]
    assert "export_lwtnn.py" not in out and "one range per slice" not in res.stderr
    assert subprocess.run(cc + ["baseline"], capture_output=True, timeout=120).returncode == 0
    again = subprocess.run(cc + ["-n", "baseline"], capture_output=True, text=True, timeout=120)
    assert "fakepy" not in again.stdout, again.stdout
    demo = subprocess.run(base + ["-n", "baseline", "ETAS=0.20"], capture_output=True, text=True, timeout=120)
    plan = re.sub(r"\\\n\s*", "", demo.stdout)
    assert re.findall(r"fakepy train\.py --data (\S+) --out (\S+) --iterations 1 ", plan) == [
        ("work/demo/photon_0.20/train.h5", "work/demo/photon_0.20/run_untrained")]
    assert "--combine" not in plan and "-i results/demo/photon_0.20/baseline/select/generated.h5" in plan


def test_fastcalosim_plans_the_gans_fastcalosim_loads(tree, tmp_path):
    """`make fastcalosim DEMO=3x2`: e/gamma UltraLow12 + High12 (toy from 64 MeV), pions All, in their own WORK;
    one fastcalosim.py of every export and the hits, then its folder check; a rerun plans nothing; CaloChallenge
    photons get --eta and a networks-only check; datasets 2 and 3 are refused."""
    repo, base = tree
    fcs = base + ["DEMO=3x2"]
    res = subprocess.run(fcs + ["-n", "fastcalosim"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = re.sub(r"\\\n\s*", "", res.stdout)
    w = "work/demo/fastcalosim"
    prepares = re.findall(r"fakepy preprocess\.py prepare .*--particle (\w+) --range (\S+)\s*--out (\S+)", out)
    want = [(p, g) for p in ("photon", "electron") for g in ("UltraLow12", "High12")] + [("pion", "All")]
    assert sorted((p, g) for p, g, _ in prepares) == sorted(want * 2)
    assert all(o.startswith(w + "/") for *_, o in prepares)
    toys = re.findall(r"fakepy preprocess\.py toy --particle (\w+) .*?--out (\S+)( --energies 64 128 [\d ]+4194304)?",
                      out)
    assert len(toys) == 12 and all(o.startswith(w + "/") for _, o, _ in toys)
    assert all(bool(e) == (p != "pion") for p, _, e in toys)
    (folder,) = re.findall(r"fakepy fastcalosim\.py --out results/demo/fastcalosim --networks ([^-]+) --hits (.+)", out)
    assert len(folder[0].split()) == 10 and all(d.startswith(f"{w}/results/") for d in folder[0].split())
    assert len(folder[1].split()) == 6
    assert "fakepy fastcalosim.py --check-folder results/demo/fastcalosim --json results/demo/fastcalosim-check.json" in out
    assert not os.path.exists(repo / "work/demo/photon_0.20/UltraLow12")
    assert subprocess.run(fcs + ["fastcalosim"], capture_output=True, timeout=120).returncode == 0
    again = subprocess.run(fcs + ["-n", "fastcalosim"], capture_output=True, text=True, timeout=120)
    assert "fakepy" not in again.stdout, again.stdout
    data = tmp_path / "cc"
    data.mkdir()
    for name in ("dataset_1_photons_1.hdf5", "dataset_1_photons_2.hdf5"):
        (data / name).write_text("")
    cc = subprocess.run(base + ["-n", "fastcalosim", "DATASET=1-photons", f"DATA_DIR={data}"], capture_output=True,
                        text=True, timeout=120)
    assert cc.returncode == 0, cc.stderr
    assert sorted(re.findall(r"--range (\S+)", cc.stdout)) == ["High12", "UltraLow12"]
    assert re.search(r"fastcalosim\.py --out results/1-photons/fastcalosim --networks .* --eta 0\.20", cc.stdout)
    assert "--check-folder results/1-photons/fastcalosim --json results/1-photons/fastcalosim-check.json " \
           "--networks-only" in cc.stdout
    bad = subprocess.run(base + ["-n", "fastcalosim", "DATASET=2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "datasets 2 and 3" in bad.stderr
