"""detection/io.py: atomic writes, the two digest encodings stored in run keys, flattening."""

from __future__ import annotations

import hashlib
import json

import pytest

from detection.io import digest_files, flatten, replace_atomic, write_json_atomic


def test_digest_encodings_are_the_stored_ones(tmp_path):
    (tmp_path / "a").write_bytes(b"alpha")
    (tmp_path / "b").write_bytes(b"")
    files = [("a", tmp_path / "a"), ("dir/b", tmp_path / "b")]
    hashed = hashlib.sha256(b"a\0" + hashlib.sha256(b"alpha").digest()
                            + b"dir/b\0" + hashlib.sha256(b"").digest()).hexdigest()
    raw = hashlib.sha256(b"a\0alpha" + b"dir/b\0").hexdigest()
    assert digest_files(files) == hashed
    assert digest_files(files, hash_each=False) == raw
    assert digest_files(files[::-1]) != hashed


def test_replace_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"x": 1})

    def fail(tmp):
        tmp.write_text("torn")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_atomic(path, fail)
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_flatten_keeps_values_and_empty_sections():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": {}, "f": None}) == {"a.b": 1, "a.c.d": [2], "e": {},
                                                                             "f": None}
