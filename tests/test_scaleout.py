"""Structural checks of the HTCondor DAG and the Slurm array script written by scaleout.py (no daemons needed)."""
import os
import re
import shlex
import subprocess

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
    assert len(jobs) == len(SLICES) * len(scaleout.STAGES)
    for node, sub in jobs.items():
        assert (out / sub).is_file(), sub
        assert vars_[node]["node"] == node
        args = shlex.split(vars_[node]["make_args"])
        assert args[0] == "-C" and os.path.isfile(os.path.join(args[1], "Makefile"))
        assert args[3:] == ["WORK=w", "RESULTS=r", *VARS]
    for p, c in edges:
        assert p in jobs and c in jobs
    order = topo_order(jobs, edges)
    assert len(order) == len(jobs), "DAG has a cycle"
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
])
def test_scaleout_bad_input(tmp_path, capsys, argv, message):
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    assert scaleout.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
