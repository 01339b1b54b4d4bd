"""scaleout.py -- run the per-slice make chain on a cluster: an HTCondor DAG or a Slurm job array.

calokit has no scheduler of its own. Each node of the DAG (or each array task) runs one `make` target of
this repository's Makefile for one (particle, |eta|) slice, so the commands live in one place (the Makefile)
and a node re-run after a failure does only what is missing. The repository (with its .venv) must sit on a
file system the worker nodes share, as for the original FastCaloGAN HTCondor voxelisation.

Usage (normally through `make condor` / `make slurm`):

    python scaleout.py condor --slices "photon_0.20 photon_0.25" --work work/demo --results results/demo \\
        --out condor/demo -- DATASET=demo ITERATIONS=100000
    condor_submit_dag condor/demo/calokit.dag

    python scaleout.py slurm --slices "photon_0.20 pion_0.20" --work work/demo --results results/demo \\
        --out slurm/demo -- DATASET=demo
    slurm/demo/submit.sh          # the array, then the summary job once every task has ended

DAG per slice: [hits ->] voxels -> train.h5 -> train (GPU) -> select -> export, and select + held-out -> evaluate.
A last node, ``summary``, runs ``make summary-now`` (summary.py over every slice) once every slice's export and
evaluate nodes have succeeded; FastCaloGAN's scale, 3 particles x 26 barrel slices, is ``make condor DEMO=barrel``
(78 chains, 547 nodes). DAGMan does not run a node whose parent failed: after a failure, ``make summary-now``
by hand lists every slice with its state. The Slurm summary job depends on the array with ``afterany``, so it
runs (and lists the failed slices) even when some tasks fail.
"""
import argparse
import os
import shlex
import sys

from plumbing import HelpFormatter, UserError, ensure_dir, run_cli, write_text

REPO = os.path.dirname(os.path.abspath(__file__))

# stage name -> (target template, parent stages, resources). {w} = work dir, {r} = results dir, {s} = slice.
STAGES = {
    "voxels": ("{w}/{s}/voxels.h5", [], "cpu"),
    "heldout": ("{w}/{s}/voxels_heldout.h5", [], "cpu"),
    "prepare": ("{w}/{s}/train.h5", ["voxels"], "cpu"),
    "train": ("{w}/{s}/run/.done", ["prepare"], "gpu"),
    "select": ("{r}/{s}/select/best.json", ["train"], "gpu"),
    "export": ("{r}/{s}/lwtnn/.done", ["select"], "cpu"),
    "evaluate": ("{r}/{s}/eval/metrics.json", ["select", "heldout"], "cpu"),
}
RESOURCES = {  # request_cpus, request_memory (MB), request_gpus
    "cpu": (2, 8000, 0),
    "gpu": (4, 16000, 1),
}


#: stages with one GAN's work each: with several energy ranges per slice (FastCaloGAN's Low12 + High12), their
#: node builds every range's target ({s}/<range>) in turn; select then combines the ranges' generated files
PER_RANGE = ("prepare", "train", "export")


def stage_targets(stage, work, results, s, ranges=()):
    """The make targets of a stage of slice ``s`` (one per energy range for PER_RANGE stages with 2+ ranges)."""
    tmpl = STAGES[stage][0]
    if stage in PER_RANGE and len(ranges) > 1:
        return [tmpl.format(w=work, r=results, s=f"{s}/{g}") for g in ranges]
    return [tmpl.format(w=work, r=results, s=s)]


def node_name(stage, slice_name):
    """DAG node names may not contain '.'; 'photon_0.20' -> 'train_photon_0p20'."""
    return f"{stage}_{slice_name.replace('.', 'p')}"


def make_command(target, make_vars):
    return ["make", "-C", REPO] + ([target] if isinstance(target, str) else list(target)) + list(make_vars)


SUMMARY_NODE = "summary"
SUMMARY_TARGET = "summary-now"      # builds nothing: summarises what the chains left
SUMMARY_PARENTS = ("export", "evaluate")


def condor_files(slices, work, results, make_vars, log_dir, ranges=()):
    """Text of the DAG and of the two submit files (cpu and gpu), as a dict name -> text."""
    subs = {}
    for kind, (cpus, mem, gpus) in RESOURCES.items():
        lines = [
            "# calokit: one make target of the per-slice chain (arguments come from the DAG's VARS)",
            "universe = vanilla",
            "executable = /usr/bin/make",
            'arguments = "$(make_args)"',
            f"initialdir = {REPO}",
            f"request_cpus = {cpus}",
            f"request_memory = {mem}",
            f"output = {log_dir}/$(node).out",
            f"error = {log_dir}/$(node).err",
            f"log = {log_dir}/calokit.log",
            "getenv = True",
        ]
        if gpus:
            lines.append(f"request_gpus = {gpus}")
            lines.append('environment = "KERAS_BACKEND=jax"')
        lines.append("queue")
        subs[f"{kind}.sub"] = "\n".join(lines) + "\n"
    dag = ["# calokit DAG: one node chain per slice; submit with condor_submit_dag"]
    for s in slices:
        for stage, (tmpl, parents, kind) in STAGES.items():
            target = stage_targets(stage, work, results, s, ranges)
            args = " ".join(shlex.quote(a) for a in make_command(target, make_vars)[1:])
            name = node_name(stage, s)
            dag.append(f"JOB {name} {kind}.sub")
            dag.append(f'VARS {name} node="{name}" make_args="{args}"')
            dag.append(f"RETRY {name} 2")
        for stage, (_, parents, _) in STAGES.items():
            for p in parents:
                dag.append(f"PARENT {node_name(p, s)} CHILD {node_name(stage, s)}")
    args = " ".join(shlex.quote(a) for a in make_command(SUMMARY_TARGET, make_vars)[1:])
    dag.append(f"JOB {SUMMARY_NODE} cpu.sub")
    dag.append(f'VARS {SUMMARY_NODE} node="{SUMMARY_NODE}" make_args="{args}"')
    dag.append(f"RETRY {SUMMARY_NODE} 1")
    last = [node_name(st, s) for s in slices for st in SUMMARY_PARENTS]
    dag.append(f"PARENT {' '.join(last)} CHILD {SUMMARY_NODE}")
    return {"calokit.dag": "\n".join(dag) + "\n", **subs}


def slurm_script(slices, work, results, make_vars, log_dir, ranges=()):
    """A Slurm job-array script: task i runs the whole chain of slice i with make."""
    targets = " ".join('"' + t + '"' for k in ("export", "evaluate")
                       for t in stage_targets(k, work, results, "$SLICE", ranges))
    cpus, mem, gpus = RESOURCES["gpu"]
    return f"""#!/bin/bash
# calokit: one array task per (particle, |eta|) slice; each runs the slice's make chain.
#SBATCH --job-name=calokit
#SBATCH --array=0-{len(slices) - 1}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}M
#SBATCH --gres=gpu:{gpus}
#SBATCH --time=24:00:00
#SBATCH --output={log_dir}/calokit_%A_%a.out
set -euo pipefail
SLICES=({" ".join(slices)})
SLICE=${{SLICES[$SLURM_ARRAY_TASK_ID]}}
export KERAS_BACKEND=${{KERAS_BACKEND:-jax}}
cd {shlex.quote(REPO)}
exec make {targets} {" ".join(shlex.quote(v) for v in make_vars)}
"""


def slurm_summary_script(make_vars, log_dir):
    """The summary job: `make summary-now` once, after the array (see :func:`slurm_submit_script`)."""
    cpus, mem, _ = RESOURCES["cpu"]
    return f"""#!/bin/bash
# calokit: the summary of every slice, after the array's tasks have ended (submitted by submit.sh)
#SBATCH --job-name=calokit-summary
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}M
#SBATCH --time=02:00:00
#SBATCH --output={log_dir}/calokit_summary_%j.out
set -euo pipefail
cd {shlex.quote(REPO)}
exec make {SUMMARY_TARGET} {" ".join(shlex.quote(v) for v in make_vars)}
"""


def slurm_submit_script(out_dir):
    """submit.sh: the array, then the summary with afterany (it runs even if some tasks failed)."""
    here = shlex.quote(os.path.abspath(out_dir))
    return f"""#!/bin/bash
# calokit: submit the per-slice array and the summary job that waits for all of its tasks
set -euo pipefail
jid=$(sbatch --parsable {here}/calokit_array.sh)
jid=${{jid%%;*}}
sbatch --dependency=afterany:$jid {here}/calokit_summary.sh
echo "calokit: array job $jid, summary after it"
"""


def write_files(out_dir, files):
    ensure_dir(out_dir)
    for name, text in files.items():
        write_text(os.path.join(out_dir, name), text)
        if name.endswith(".sh"):
            os.chmod(os.path.join(out_dir, name), 0o755)


def _main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("engine", choices=["condor", "slurm"])
    ap.add_argument("--slices", required=True, help='space-separated slices, e.g. "photon_0.20 pion_0.20"')
    ap.add_argument("--ranges", default="", help='the energy ranges of each slice (the Makefile\'s RANGES), e.g. '
                                                 '"Low12 High12": one GAN each, built in turn by the slice\'s nodes')
    ap.add_argument("--work", required=True, help="the Makefile's WORK folder")
    ap.add_argument("--results", required=True, help="the Makefile's RESULTS folder")
    ap.add_argument("--out", required=True, help="folder for the DAG/submit files or the Slurm script")
    ap.add_argument("make_vars", nargs="*", help="VAR=value pairs handed to every make call")
    args = ap.parse_intermixed_args(argv)
    slices = args.slices.split()
    if not slices:
        raise UserError("--slices is empty")
    dup = sorted({x for x in slices if slices.count(x) > 1})
    if dup:
        raise UserError(f"--slices names {', '.join(dup)} more than once")
    for v in args.make_vars:
        if "=" not in v:
            raise UserError(f"make variable '{v}' is not of the form VAR=value")
    log_dir = os.path.abspath(os.path.join(args.out, "logs"))
    # the Makefile's recipes read WORK/RESULTS too, so every make call gets them with the targets
    make_vars = [f"WORK={args.work}", f"RESULTS={args.results}"] + [
        v for v in args.make_vars if not v.startswith(("WORK=", "RESULTS="))]
    if args.engine == "condor":
        files = condor_files(slices, args.work, args.results, make_vars, log_dir, args.ranges.split())
    else:
        files = {"calokit_array.sh": slurm_script(slices, args.work, args.results, make_vars, log_dir,
                                                  args.ranges.split()),
                 "calokit_summary.sh": slurm_summary_script(make_vars, log_dir),
                 "submit.sh": slurm_submit_script(args.out)}
    write_files(args.out, files)
    ensure_dir(log_dir)
    print(f"scaleout: wrote {', '.join(sorted(files))} for {len(slices)} slice(s) to {args.out}")
    return 0


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
