"""The lab demo keeps its capture when the lab's state directory is on another filesystem.

On Debian /run (the lab's state) is a tmpfs and /tmp is not, so a plain rename fails with EXDEV;
this machine has both on one filesystem, so the test makes every rename fail that way.
"""

import errno
import os

from mipsec.lab import demo


def test_keep_capture_copies_across_filesystems(tmp_path, monkeypatch):
    state, where = tmp_path / "run-lab", tmp_path / "kept"
    state.mkdir()
    contents = {name: f"{name} bytes".encode() for name in demo.CAPTURE_FILES}
    for name, data in contents.items():
        (state / name).write_bytes(data)

    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link", src, None, dst)

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(os, "replace", cross_device)
    assert demo.keep_capture(str(state), str(where)) == str(where)
    assert {p.name: p.read_bytes() for p in where.iterdir()} == contents
    assert not any(state.iterdir())                # moved, not copied


def test_keep_capture_without_ike_keys(tmp_path):
    state, where = tmp_path / "run-lab", tmp_path / "kept"
    state.mkdir()
    (state / "gw.pcap").write_bytes(b"pcap")
    (state / "gw.pcap.esp_sa").write_bytes(b"keys")   # manual keys: no IKE key file
    demo.keep_capture(str(state), str(where))
    assert sorted(p.name for p in where.iterdir()) == ["gw.pcap", "gw.pcap.esp_sa"]
