"""preprocess.py fetch: present files are kept, no network gives one clear line naming files and record, bad MD5 is not kept."""
import hashlib
import io
import json
import urllib.error
import urllib.request

import preprocess


def test_fetch_keeps_present_files(tmp_path, capsys):
    for name in preprocess.ZENODO["2"][1]:
        (tmp_path / name).write_bytes(b"x")
    assert preprocess.main(["fetch", "--dataset", "2", "--dir", str(tmp_path)]) == 0
    assert "already in" in capsys.readouterr().out


def test_fetch_offline_names_files_and_record(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert preprocess.main(["fetch", "--dataset", "1-pions", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "dataset_1_pions_1.hdf5" in err[0] and "dataset_1_pions_2.hdf5" in err[0]
    assert "zenodo.org/records/8099322" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_fetch_verifies_md5(tmp_path, capsys, monkeypatch):
    payload = b"calorimeter" * 1000
    good = hashlib.md5(payload).hexdigest()
    names = preprocess.ZENODO["3"][1]

    def fake(url, timeout=None):
        if "/api/records/" in url:
            files = [{"key": names[0], "checksum": "md5:" + good}, {"key": names[1], "checksum": "md5:" + "0" * 32}]
            return io.BytesIO(json.dumps({"files": files}).encode())
        return io.BytesIO(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    assert preprocess.main(["fetch", "--dataset", "3", "--dir", str(tmp_path)]) == 2
    assert "differs from the record" in capsys.readouterr().err
    assert (tmp_path / names[0]).read_bytes() == payload          # verified file kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[0]]  # the bad one (and its temp) is gone
