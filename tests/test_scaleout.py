"""Structural checks of the HTCondor DAG and the Slurm array script written by scaleout.py (no daemons needed)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

import scaleout

SLICES = ["photon_0.20", "pion_0.25"]
VARS = ["DATASET=demo", "ITERATIONS=10"]


def parse_dag(text):
    jobs, vars_, edges = {}, {}, []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "JOB":
            assert words[1] not in jobs, f"duplicate node {words[1]}"
            jobs[words[1]] = words[2]
        elif words[0] == "VARS":
            vars_[words[1]] = dict(re.findall(r'(\w+)="([^"]*)"', line))
        elif words[0] == "PARENT":
            i = words.index("CHILD")
            edges += [(p, c) for p in words[1:i] for c in words[i + 1:]]
        elif words[0] == "RETRY":
            assert int(words[2]) >= 0
        else:
            raise AssertionError(f"unknown DAG keyword in: {line}")
    return jobs, vars_, edges


def topo_order(nodes, edges):
    indeg = {n: 0 for n in nodes}
    for _, c in edges:
        indeg[c] += 1
    ready = sorted(n for n, d in indeg.items() if d == 0)
    order = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for p, c in edges:
            if p == n:
                indeg[c] -= 1
                if indeg[c] == 0:
                    ready.append(c)
    return order


def test_condor_dag_structure(tmp_path):
    out = tmp_path / "condor"
    assert scaleout.main(["condor", "--slices", " ".join(SLICES), "--work", "w", "--results", "r",
                          "--out", str(out), *VARS]) == 0
    text = (out / "calokit.dag").read_text()
    jobs, vars_, edges = parse_dag(text)
    assert len(jobs) == len(SLICES) * len(scaleout.STAGES) + 1
    for node, sub in jobs.items():
        assert (out / sub).is_file(), sub
        assert vars_[node]["node"] == node
        args = shlex.split(vars_[node]["make_args"])
        assert args[0] == "-C" and os.path.isfile(os.path.join(args[1], "Makefile"))
        assert args[3:] == ["WORK=w", "RESULTS=r", *VARS]
    assert shlex.split(vars_["summary"]["make_args"])[2] == "summary-now" and jobs["summary"] == "cpu.sub"
    for p, c in edges:
        assert p in jobs and c in jobs
    order = topo_order(jobs, edges)
    assert len(order) == len(jobs), "DAG has a cycle"
    assert order[-1] == "summary" and [ln for ln in text.splitlines() if ln.startswith("JOB")][-1].split()[1] == "summary"
    assert sorted(p for p, c in edges if c == "summary") == sorted(
        scaleout.node_name(st, s) for s in SLICES for st in ("export", "evaluate"))
    for s in SLICES:
        chain = [scaleout.node_name(st, s) for st in ("voxels", "prepare", "train", "select", "export")]
        pos = [order.index(n) for n in chain]
        assert pos == sorted(pos)
        assert order.index(scaleout.node_name("heldout", s)) < order.index(scaleout.node_name("evaluate", s))
        target = shlex.split(vars_[scaleout.node_name("train", s)]["make_args"])[2]
        assert target == f"w/{s}/run/.done"
        assert jobs[scaleout.node_name("train", s)] == "gpu.sub"
    for sub in ("cpu.sub", "gpu.sub"):
        kv = dict(line.split(" = ", 1) for line in (out / sub).read_text().splitlines()
                  if " = " in line and not line.startswith("#"))
        assert kv["executable"] == "/usr/bin/make" and kv["arguments"] == '"$(make_args)"'
        assert int(kv["request_cpus"]) >= 1 and int(kv["request_memory"]) >= 1000
        assert (out / sub).read_text().rstrip().endswith("queue")
    assert "request_gpus = 1" in (out / "gpu.sub").read_text()
    assert "request_gpus" not in (out / "cpu.sub").read_text()


def test_slurm_array_script(tmp_path):
    out = tmp_path / "slurm"
    assert scaleout.main(["slurm", "--slices", " ".join(SLICES), "--work", "w", "--results", "r",
                          "--out", str(out), *VARS]) == 0
    script = out / "calokit_array.sh"
    text = script.read_text()
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert f"#SBATCH --array=0-{len(SLICES) - 1}" in text
    assert f"SLICES=({' '.join(SLICES)})" in text
    assert '"r/$SLICE/lwtnn/.done"' in text and '"r/$SLICE/eval/metrics.json"' in text
    # the task picks its slice and runs make with the variables: check by running the script's last line
    # through bash with make replaced by echo
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", PATH=f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "make").write_text("#!/bin/sh\necho \"$@\"\n")
    (tmp_path / "make").chmod(0o755)
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["r/pion_0.25/lwtnn/.done", "r/pion_0.25/eval/metrics.json", "WORK=w", "RESULTS=r", *VARS]


@pytest.mark.parametrize("argv, message", [
    (["condor", "--slices", " ", "--work", "w", "--results", "r", "--out", "x"], "--slices is empty"),
    (["slurm", "--slices", "a_0.2", "--work", "w", "--results", "r", "--out", "x", "NOTAVAR"], "not of the form"),
    (["condor", "--slices", "a_0.2 b_0.2 a_0.2", "--work", "w", "--results", "r", "--out", "x"], "more than once"),
])
def test_scaleout_bad_input(tmp_path, capsys, argv, message):
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    assert scaleout.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """The Makefile and the scripts in a scratch folder (scaleout.py writes its paths relative to its own)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo = tmp_path_factory.mktemp("repo")
    for name in os.listdir(root):
        if name.endswith(".py") or name == "Makefile":
            shutil.copy2(os.path.join(root, name), repo / name)
    shutil.copytree(os.path.join(root, "binning"), repo / "binning")
    return repo


BARREL = [f"{p}_{k * 0.05:.2f}" for p in ("photon", "electron", "pion") for k in range(26)]


def test_make_condor_barrel_writes_78_chains_and_a_summary_node_last(repo_copy):
    t0 = time.perf_counter()
    res = subprocess.run(["make", "-C", str(repo_copy), "condor", "DEMO=barrel", f"PY_EXE={sys.executable}"],
                         capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert took < 30, f"make condor took {took:.1f} s"
    out = repo_copy / "condor" / "demo"
    text = (out / "calokit.dag").read_text()
    jobs, vars_, edges = parse_dag(text)
    assert len(jobs) == 78 * len(scaleout.STAGES) + 1 == 547
    slices = sorted({n.split("_", 1)[1] for n in jobs if n != "summary"})
    assert slices == sorted(s.replace(".", "p") for s in BARREL)
    order = topo_order(jobs, edges)
    assert len(order) == len(jobs) and order[-1] == "summary"
    assert text.rstrip().splitlines()[-1].startswith("PARENT ") and text.rstrip().endswith("CHILD summary")
    parents = {p for p, c in edges if c == "summary"}
    assert parents == {scaleout.node_name(st, s) for s in BARREL for st in ("export", "evaluate")}
    # every node descends into the summary: nothing of any chain can still run after it
    children = {}
    for p, c in edges:
        children.setdefault(p, set()).add(c)
    reach = {"summary"}
    for n in reversed(order):
        if children.get(n, set()) & reach:
            reach.add(n)
    assert reach == set(jobs)
    # the summary node's make call, planned by the Makefile, summarises the 78 slices (and builds nothing)
    args = shlex.split(vars_["summary"]["make_args"])
    assert args[:3] == ["-C", str(repo_copy), "summary-now"]
    plan = subprocess.run(["make", "-n", *args, "PY_EXE=fakepy"], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    lines = [ln for ln in plan.stdout.splitlines() if "fakepy" in ln]
    assert len(lines) == 1 and lines[0].startswith("fakepy summary.py --results results/demo --slices")
    assert shlex.split(lines[0])[5].split() == BARREL
    # a chain node's make call keeps the particles and slices too (its settings stamps are per slice)
    train = shlex.split(vars_[scaleout.node_name("train", "electron_1.25")]["make_args"])
    assert train[2] == "work/demo/electron_1.25/run/.done" and "PARTICLES=photon electron pion" in train


def test_make_slurm_barrel_array_and_summary_after_any(repo_copy, tmp_path):
    res = subprocess.run(["make", "-C", str(repo_copy), "slurm", "DEMO=barrel", f"PY_EXE={sys.executable}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = repo_copy / "slurm" / "demo"
    array = (out / "calokit_array.sh").read_text()
    assert "#SBATCH --array=0-77" in array and f"SLICES=({' '.join(BARREL)})" in array
    for name in ("calokit_array.sh", "calokit_summary.sh", "submit.sh"):
        assert os.access(out / name, os.X_OK)
        subprocess.run(["bash", "-n", str(out / name)], check=True)
    # submit.sh with stand-in sbatch/make: the array first, then the summary with afterany on its job id
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {log}\necho 4242\n')
    (bin_dir / "make").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')      # one argument a line
    for f in ("sbatch", "make"):
        (bin_dir / f).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    subprocess.run(["bash", str(out / "submit.sh")], env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    assert calls == [f"--parsable {out}/calokit_array.sh", f"--dependency=afterany:4242 {out}/calokit_summary.sh"]
    res = subprocess.run(["bash", str(out / "calokit_summary.sh")], env=env, check=True, capture_output=True, text=True)
    words = res.stdout.splitlines()
    assert words[0] == "summary-now" and "PARTICLES=photon electron pion" in words
    assert [w for w in words if w.startswith("ETAS=")][0].split("=")[1].split() == [f"{k * 0.05:.2f}" for k in range(26)]
    # a task of the array runs its own slice's chain
    env["SLURM_ARRAY_TASK_ID"] = "77"
    res = subprocess.run(["bash", str(out / "calokit_array.sh")], env=env, check=True, capture_output=True, text=True)
    assert res.stdout.split()[:2] == ["results/demo/pion_1.25/lwtnn/.done", "results/demo/pion_1.25/eval/metrics.json"]


def test_two_ranges_per_slice_build_both_gans_in_the_slice_nodes(tmp_path):
    """--ranges "Low12 High12" (FastCaloGAN's photons): the prepare/train/export nodes of a slice build both
    ranges' targets, select and evaluate stay one per slice (select combines); the Slurm task exports both."""
    out = tmp_path / "condor"
    assert scaleout.main(["condor", "--slices", "photon_0.20", "--ranges", "Low12 High12", "--work", "w",
                          "--results", "r", "--out", str(out)]) == 0
    jobs, vars_, _ = parse_dag((out / "calokit.dag").read_text())
    targets = {st: shlex.split(vars_[scaleout.node_name(st, "photon_0.20")]["make_args"])[2:-2]
               for st in scaleout.STAGES}
    assert targets["train"] == ["w/photon_0.20/Low12/run/.done", "w/photon_0.20/High12/run/.done"]
    assert targets["prepare"] == ["w/photon_0.20/Low12/train.h5", "w/photon_0.20/High12/train.h5"]
    assert targets["export"] == ["r/photon_0.20/Low12/lwtnn/.done", "r/photon_0.20/High12/lwtnn/.done"]
    assert targets["select"] == ["r/photon_0.20/select/best.json"]
    assert targets["evaluate"] == ["r/photon_0.20/eval/metrics.json"]
    slurm = tmp_path / "slurm"
    assert scaleout.main(["slurm", "--slices", "photon_0.20", "--ranges", "Low12 High12", "--work", "w",
                          "--results", "r", "--out", str(slurm)]) == 0
    text = (slurm / "calokit_array.sh").read_text()
    assert '"r/$SLICE/Low12/lwtnn/.done" "r/$SLICE/High12/lwtnn/.done" "r/$SLICE/eval/metrics.json"' in text
