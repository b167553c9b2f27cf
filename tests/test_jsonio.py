"""JSON files written whole or not at all, and JSONL read past a line cut off by a crash."""

import json
import os

import pytest

from simclr_jax import jsonio


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}\n')
    jsonio.write_json(path, {"b": [1, 2], "a": 0.5})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [1, 2]}
    assert os.listdir(tmp_path) == ["results.json"]
    jsonio.write_bytes(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_written_file_has_the_mode_open_would_give_it(tmp_path, umask):
    path = tmp_path / "results.json"
    old_umask = os.umask(umask)
    try:
        jsonio.write_json(path, {"a": 1})
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "write",
    [
        lambda path: jsonio.write_json(path, {"new": True}),
        lambda path: jsonio.write_bytes(path, b""),
    ],
    ids=["json", "bytes"],
)
def test_a_write_that_fails_names_the_file_and_keeps_its_old_content(tmp_path, monkeypatch, write):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}\n')

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as error:
        write(path)
    assert str(error.value) == f"[Errno 28] No space left on device: '{path}'"
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["results.json"]


def test_read_jsonl_skips_a_torn_last_line_with_one_warning_naming_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.25}]
    jsonio.write_jsonl(path, records)
    with path.open("a") as f:
        f.write('{"step": 6, "loss"')
    assert jsonio.read_jsonl(path) == records
    (warning,) = caplog.records
    assert warning.levelname == "WARNING"
    assert warning.getMessage().startswith(f"{path}: skipped 1 line(s) that are not JSON records")


def test_read_jsonl_of_a_whole_file_warns_nothing(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    jsonio.write_jsonl(path, [{"step": 1}])
    assert jsonio.read_jsonl(path) == [{"step": 1}]
    assert not caplog.records


def test_read_json_round_trips_and_names_a_file_that_is_not_json(tmp_path):
    payload = {"linear_probe_top1": 0.875, "knn_ks": [20, 200], "nested": {"a": None}}
    jsonio.write_json(tmp_path / "results.json", payload)
    assert jsonio.read_json(tmp_path / "results.json") == payload
    (tmp_path / "broken.json").write_text('{"linear_probe_top1": 0.8')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        jsonio.read_json(tmp_path / "broken.json")
