"""summary.py on synthetic result folders (no training): every slice listed, numbers equal direct computations."""
import csv
import json
import math
import os
import shutil

import h5py
import numpy as np
import pytest

import summary
from plumbing import kinetic_energy, write_calo_file

ENERGIES = [256.0, 4096.0, 65536.0]
PID = {"photon": 22, "electron": 11, "pion": 211}


def _showers(rng, einc, particle, scale, n_vox=6):
    """Showers whose total is scale * E_kin * (1 + 0.1 N(0,1)), spread over n_vox voxels."""
    ekin = kinetic_energy(einc, particle)
    tot = scale * ekin * (1.0 + 0.1 * rng.standard_normal(len(einc)))
    w = rng.dirichlet(np.ones(n_vox), len(einc))
    return np.abs(tot)[:, None] * w


def make_slice(results, work, name, seed, n=40, energies=ENERGIES, scale_gen=0.97, skip=()):
    """A slice folder as the chain writes it (minus what ``skip`` names); returns (generated, reference) paths."""
    particle, eta = summary.parse_slice(name)
    rng = np.random.default_rng(seed)
    einc = np.repeat(energies, n)
    folder = os.path.join(results, name)
    for d in ("select", "eval", "lwtnn"):
        os.makedirs(os.path.join(folder, d), exist_ok=True)
    os.makedirs(os.path.join(work, name, "run"), exist_ok=True)
    ref = os.path.join(work, name, "voxels_heldout.h5")
    gen = os.path.join(folder, "select", "generated.h5")
    write_calo_file(ref, einc, _showers(rng, einc, particle, 1.0))
    if "generated" not in skip:
        write_calo_file(gen, einc, _showers(rng, einc, particle, scale_gen))
    with open(os.path.join(work, name, "run", "config.json"), "w") as f:
        json.dump({"particle": particle, "range": "all"}, f)
    if "best" not in skip:
        with open(os.path.join(folder, "select", "best.json"), "w") as f:
            json.dump({"run": os.path.join(work, name, "run"), "best_iteration": 300 + seed, "chi2_ndf": 1.5 + seed,
                       "generated": gen, "reference_for_evaluate": ref}, f)
    if "metrics" not in skip:
        with open(os.path.join(folder, "eval", "metrics.json"), "w") as f:
            json.dump({"separation_power": {"Etot / Einc": 0.01 * seed, "E layer 1": 0.03 * seed},
                       "classifier": {"cls-high": {"auc": 0.6 + 0.01 * seed}}}, f)
    stem = f"neural_net_{PID[particle]}_eta_{round(eta * 100)}_{round(eta * 100) + 5}_all"
    for suffix, text in ((".json", '{"layers": []}'), (".meta.json", "{}"), (".onnx", "x" * 100)):
        with open(os.path.join(folder, "lwtnn", stem + suffix), "w") as f:
            f.write(text)
    return gen, ref


def direct(path, particle):
    """{e_inc: (response, rms, resolution, n)} computed from the whole file at once."""
    import h5py

    with h5py.File(path) as f:
        einc = f["incident_energies"][:].reshape(-1)
        etot = f["showers"][:].astype(np.float64).sum(axis=1)
    out = {}
    for e in np.unique(einc):
        sel = einc == e
        r = etot[sel] / kinetic_energy(e, particle)
        out[float(e)] = (r.mean(), r.std(), etot[sel].std() / etot[sel].mean(), int(sel.sum()))
    return out


@pytest.fixture
def tiny_run(tmp_path):
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    files = {}
    for k, name in enumerate(["photon_0.20", "photon_0.25", "pion_0.20", "pion_0.25"]):
        files[name] = make_slice(results, work, name, seed=k + 1)
    return results, work, files


def test_summary_lists_every_slice_and_its_numbers_equal_direct_ones(tiny_run, tmp_path):
    results, work, files = tiny_run
    out = str(tmp_path / "summary")
    assert summary.main(["--results", results, "--out", out, "--chunk", "7",
                         "--slices", "photon_0.20 photon_0.25 pion_0.20 pion_0.25 pion_0.30"]) == 0
    doc = json.load(open(os.path.join(out, "summary.json")))
    by = {s["slice"]: s for s in doc["slices"]}
    # order: particle then eta; the expected-but-absent slice is there, as missing
    assert list(by) == ["photon_0.20", "photon_0.25", "pion_0.20", "pion_0.25", "pion_0.30"]
    assert by["pion_0.30"]["state"] == "missing" and by["pion_0.30"]["points"] == []
    assert doc["states"] == {"complete": 4, "missing": 1}
    for k, name in enumerate(["photon_0.20", "photon_0.25", "pion_0.20", "pion_0.25"]):
        s, (gen, ref) = by[name], files[name]
        particle = name.split("_")[0]
        assert s["state"] == "complete" and s["missing"] == [] and s["range"] == "all"
        assert s["best_iteration"] == 301 + k and s["select_chi2_ndf"] == pytest.approx(2.5 + k)
        assert s["etot_einc_separation"] == pytest.approx(0.01 * (k + 1))
        assert s["mean_separation"] == pytest.approx(0.02 * (k + 1))
        assert s["cls_high_auc"] == pytest.approx(0.61 + 0.01 * k)
        assert [e["file"] for e in s["exports"]][0].startswith(f"neural_net_{PID[particle]}_eta_")
        d_ref, d_gen = direct(ref, particle), direct(gen, particle)
        assert [p["e_inc"] for p in s["points"]] == ENERGIES
        chi2_sum = 0.0
        for p in s["points"]:
            for tag, d in (("ref", d_ref), ("gen", d_gen)):
                m, rms, res, n = d[p["e_inc"]]
                assert p[f"n_{tag}"] == n == 40
                assert p[f"response_{tag}"] == pytest.approx(m, rel=1e-12)
                assert p[f"rms_{tag}"] == pytest.approx(rms, rel=1e-9)
                assert p[f"resolution_{tag}"] == pytest.approx(res, rel=1e-9)
            (mr, sr, _, n), (mg, sg, _, _) = d_ref[p["e_inc"]], d_gen[p["e_inc"]]
            want = ((mg - mr) ** 2 / (sg ** 2 / n + sr ** 2 / n)
                    + (sg - sr) ** 2 / (sg ** 2 / (2 * (n - 1)) + sr ** 2 / (2 * (n - 1))))
            assert p["chi2"] == pytest.approx(want, rel=1e-9) and p["ndf"] == 2
            chi2_sum += want
            assert p["e_kin"] == pytest.approx(float(kinetic_energy(p["e_inc"], particle)))
        assert s["response_chi2_ndf"] == pytest.approx(chi2_sum / 6, rel=1e-9)
        # generated showers were made 3 % low: the response says so, the reference sits at 1
        assert all(abs(p["response_ref"] - 1.0) < 0.05 for p in s["points"])
        assert np.mean([p["response_gen"] / p["response_ref"] for p in s["points"]]) == pytest.approx(0.97, abs=0.03)
    # versus |eta|: the nearest energy point per slice, one list per particle with both slices
    v = doc["versus_eta"]
    assert sorted(v) == ["1024", "16384", "262144"]
    assert [round(x["eta"], 3) for x in v["16384"]["photon"]] == [0.225, 0.275]
    assert v["1024"]["pion"][0]["e_inc"] == 256.0 and v["262144"]["photon"][1]["e_inc"] == 65536.0
    # the tables: one row per GAN, same numbers
    rows = list(csv.DictReader(open(os.path.join(out, "summary.csv"))))
    assert [r["particle"] + " " + r["slice"] for r in rows] == ["photon 0.20-0.25", "photon 0.25-0.30",
                                                               "pion 0.20-0.25", "pion 0.25-0.30", "pion 0.30-0.35"]
    assert float(rows[2]["response_chi2_ndf"]) == pytest.approx(by["pion_0.20"]["response_chi2_ndf"], rel=1e-3)
    assert rows[4]["state"] == "missing" and "slice folder" in rows[4]["missing"]
    assert "(14 B)" in rows[0]["exports"]                       # '{"layers": []}' is 14 bytes
    assert rows[0]["exports"].count(".onnx (100 B)") == 1 and len(by["photon_0.20"]["exports"]) == 3
    md = open(os.path.join(out, "summary.md")).read().splitlines()
    assert sum(line.startswith("| photon") or line.startswith("| pion") for line in md) == 5
    for png in ("response_resolution.png", "response_resolution_vs_eta.png"):
        assert open(os.path.join(out, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_incomplete_and_unreadable_slices_are_listed(tmp_path):
    results, work = str(tmp_path / "r"), str(tmp_path / "w")
    make_slice(results, work, "electron_0.20", seed=1)
    make_slice(results, work, "electron_0.25", seed=2, skip=("metrics",))       # evaluation still running
    make_slice(results, work, "photon_0.20", seed=3, skip=("best", "generated", "metrics"))   # training
    make_slice(results, work, "photon_0.25", seed=4)
    make_slice(results, work, "pion_0.20", seed=5)
    for f in os.listdir(os.path.join(results, "pion_0.20", "lwtnn")):        # an export with only its meta file left
        if not f.endswith(".meta.json"):
            os.remove(os.path.join(results, "pion_0.20", "lwtnn", f))
    with open(os.path.join(results, "photon_0.25", "select", "generated.h5"), "wb") as f:
        f.write(b"not hdf5")
    assert summary.main(["--results", results]) == 0
    doc = json.load(open(os.path.join(results, "summary", "summary.json")))
    by = {s["slice"]: s for s in doc["slices"]}
    assert list(by) == ["photon_0.20", "photon_0.25", "electron_0.20", "electron_0.25", "pion_0.20"]
    assert by["pion_0.20"]["state"] == "incomplete" and by["pion_0.20"]["missing"] == ["lwtnn/*.json"]
    assert by["electron_0.20"]["state"] == "complete"
    s = by["electron_0.25"]
    assert s["state"] == "incomplete" and s["missing"] == ["eval/metrics.json"]
    assert len(s["points"]) == 3 and s["cls_high_auc"] is None          # response computed, no eval numbers
    s = by["photon_0.20"]
    assert s["state"] == "incomplete" and s["points"] == []
    assert s["missing"] == ["select/best.json", "select/generated.h5", "eval/metrics.json"]
    s = by["photon_0.25"]
    assert s["state"] == "unreadable" and "generated.h5" in s["error"]
    assert doc["states"] == {"incomplete": 3, "unreadable": 1, "complete": 1}


def test_continuous_energies_are_binned_in_log_e(tmp_path):
    results, work = str(tmp_path / "r"), str(tmp_path / "w")
    energies = list(np.geomspace(1000.0, 64000.0, 12))
    gen, ref = make_slice(results, work, "electron_0.20", seed=5, n=5, energies=energies)
    assert summary.main(["--results", results, "--max-points", "4", "--out", str(tmp_path / "s")]) == 0
    s = json.load(open(tmp_path / "s" / "summary.json"))["slices"][0]
    assert len(s["points"]) == 4 and all(p["e_inc"] is None for p in s["points"])
    assert [p["n_ref"] for p in s["points"]] == [15, 15, 15, 15]
    import h5py

    with h5py.File(ref) as f:
        einc = f["incident_energies"][:].reshape(-1)
        r = f["showers"][:].astype(np.float64).sum(axis=1) / kinetic_energy(einc, "electron")
    sel = einc <= energies[2] * 1.0000001              # the first log bin: the first three energies
    assert s["points"][0]["response_ref"] == pytest.approx(r[sel].mean(), rel=1e-12)
    assert s["points"][0]["e_kin"] == pytest.approx(kinetic_energy(einc[sel], "electron").mean(), rel=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--results", "NOPE"], "results folder not found"),
    (["--results", "R", "--slices", "kaon_0.20"], "not a slice name"),
    (["--results", "R"], "no slice folders"),
    (["--results", "R", "--energies", "-1"], "positive"),
])
def test_bad_input_exit_2_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "R").mkdir()
    argv = [str(tmp_path / a) if a in ("NOPE", "R") else a for a in argv]
    assert summary.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "R" / "summary").exists()


def test_help_exits_0(capsys):
    assert summary.main(["--help"]) == 0
    assert "--results" in capsys.readouterr().out
    assert math.isfinite(summary.DEFAULT_ENERGIES[0])


def _texts(fig):
    """Every visible, non-empty text of the figure: the title, panel titles, axis labels, tick labels, notes."""
    out = [fig._suptitle]
    for ax in fig.axes:
        out += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels(), *ax.texts]
    return [t for t in out if t is not None and t.get_visible() and t.get_text()]


@pytest.mark.parametrize("n, kind", [(1, "complete"), (1, "incomplete"), (2, "complete"), (78, "mixed")])
def test_grid_title_and_labels_lie_inside_the_figure(tmp_path, n, kind):
    """response_resolution.png at 1 to 78 slices: the title (wrapped where the figure is narrow), every panel title,
    axis label and tick label lie inside the figure, and the title sits above the panels' titles."""
    results, work = str(tmp_path / "r"), str(tmp_path / "w")
    make_slice(results, work, "photon_0.20", seed=1)
    make_slice(results, work, "pion_0.20", seed=2, skip=("best", "generated", "metrics"))
    full, empty = (summary.summarise_slice(results, name, 15) for name in ("photon_0.20", "pion_0.20"))
    assert full["points"] and not empty["points"] and empty["state"] == "incomplete"
    slices = []
    for k in range(n):
        base = {"complete": full, "incomplete": empty, "mixed": empty if k % 5 == 4 else full}[kind]
        eta = 0.05 * (k % 26)
        slices.append(dict(base, particle=summary.PARTICLE_ORDER[k // 26], eta_min=eta, eta_max=eta + 0.05))
    fig = summary.grid_figure(slices)
    try:
        fig.canvas.draw()
        box = fig.bbox
        texts = _texts(fig)
        assert len(texts) > (2 if kind == "incomplete" else 10 * n)
        for t in texts:
            e = t.get_window_extent()
            assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, (t.get_text(), e, box)
        title = fig._suptitle
        lines = title.get_text().split("\n")
        assert " ".join(lines) == " ".join(" ".join(g) for g in summary.GRID_TITLE)    # nothing dropped
        assert len(lines) == (2 if n > 1 else 3)                 # wrapped only on the one-panel figure
        top_of_panels = max(ax.title.get_window_extent().y1 for ax in fig.axes if ax.title.get_text())
        assert title.get_window_extent().y0 >= top_of_panels
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_slice_of_two_range_gans_lists_both_choices_and_exports(tmp_path):
    """A slice trained as Low12 + High12: the combined selection's best.json gives the row's range and both best
    iterations; the exports come from <range>/lwtnn/ (one network per range); a missing range export is named.
    Negative voxels in the generated file (the High12 network's BN + swish output) are summed as they are."""
    results, work = str(tmp_path / "results"), str(tmp_path / "work")
    gen, ref = make_slice(results, work, "photon_0.20", seed=1)
    folder = os.path.join(results, "photon_0.20")
    with h5py.File(gen, "r+") as f:
        s = f["showers"][...]
        s[:, 0] = -1.0
        f["showers"][...] = s
    shutil.rmtree(os.path.join(folder, "lwtnn"))
    for rng, it in (("Low12", 1500), ("High12", 900)):
        d = os.path.join(folder, rng, "lwtnn")
        os.makedirs(d)
        for suffix in (".json", ".onnx"):
            with open(os.path.join(d, f"neural_net_22_eta_20_25_{rng}{suffix}"), "w") as fh:
                fh.write("{}")
    with open(os.path.join(folder, "select", "best.json"), "w") as f:
        json.dump({"combined": [{"range": "Low12", "best_iteration": 1500, "chi2_ndf": 2.0},
                                {"range": "High12", "best_iteration": 900, "chi2_ndf": 3.0}],
                   "best_iteration": {"Low12": 1500, "High12": 900}, "chi2_ndf": None,
                   "generated": gen, "reference_for_evaluate": ref}, f)
    out = str(tmp_path / "summary")
    assert summary.main(["--results", results, "--out", out, "--slices", "photon_0.20"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))["slices"][0]
    assert s["state"] == "complete" and s["range"] == "Low12 + High12"
    assert s["best_iteration"] == "Low12 1500, High12 900"
    assert [e["file"] for e in s["exports"]] == [
        "High12/neural_net_22_eta_20_25_High12.json", "High12/neural_net_22_eta_20_25_High12.onnx",
        "Low12/neural_net_22_eta_20_25_Low12.json", "Low12/neural_net_22_eta_20_25_Low12.onnx"]
    d_gen = direct(gen, "photon")
    assert len(s["points"]) == len(ENERGIES)
    for p in s["points"]:
        assert p["response_gen"] == pytest.approx(d_gen[p["e_inc"]][0], rel=1e-12)
    shutil.rmtree(os.path.join(folder, "High12"))
    assert summary.main(["--results", results, "--out", out, "--slices", "photon_0.20"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))["slices"][0]
    assert s["state"] == "incomplete" and s["missing"] == ["High12/lwtnn/*.json"]
