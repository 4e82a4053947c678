"""The Linux TUN adapter's read path: a failing read is counted and logged, never raised."""

import errno
import logging
import os

from mipsec.io.tun import LinuxTun


def _tun_without_device(monkeypatch, outcomes):
    """A LinuxTun whose os.read returns or raises ``outcomes`` in turn (no device needed)."""
    tun = LinuxTun.__new__(LinuxTun)
    tun.name, tun._fd, tun.read_errors, tun.write_errors = "faketun0", -1, 0, 0
    tun._logged_errnos = set()
    script = iter(outcomes)

    def fake_read(fd, size):
        outcome = next(script)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(os, "read", fake_read)
    return tun


def test_read_errors_are_counted_and_logged_once_per_errno(monkeypatch, caplog):
    eio = OSError(errno.EIO, "Input/output error")
    tun = _tun_without_device(monkeypatch, [
        b"\x45" + bytes(19), BlockingIOError(), InterruptedError(), eio, eio,
        OSError(errno.EBADFD, "File descriptor in bad state"), b"\x45" + bytes(27)])
    with caplog.at_level(logging.WARNING, logger="mipsec.io.tun"):
        got = [tun.read() for _ in range(7)]
    assert got == [b"\x45" + bytes(19), None, None, None, None, None, b"\x45" + bytes(27)]
    assert tun.read_errors == 3                      # EIO twice, EBADFD once; EAGAIN/EINTR are not errors
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "Input/output error" in warnings[0] and "bad state" in warnings[1]
