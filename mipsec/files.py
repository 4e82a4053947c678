"""Files that hold keys or configurations: written privately, loaded only when private
(docs/security.md §3.7).

``write_private(path, data)``: a temporary file in the target's directory, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 under a random name (a planted file or symlink
of any name is never written through: with O_EXCL the open fails on anything that exists, and we
try another name), written, fsync-ed, then renamed over the target.  The rename replaces a
symlink at the target instead of following it, and a reader sees the old file or the new one,
never half of one.

``check_private(path, st)``: a key or configuration file must be readable and writable only by
its owner, and that owner must be the user running mipsec (or root).  Refused, not warned
about: a warning in a log nobody reads protects no key.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

PRIVATE_MODE = 0o600
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
    getattr(os, "O_CLOEXEC", 0)
_ATTEMPTS = 16


class NotPrivate(ValueError):
    """A key or configuration file that others can read or change; ``str()`` says how to fix."""


def write_private(path: str | os.PathLike[str], data: bytes | str, *,
                  exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 (see module doc).  With ``exclusive``
    the target must not exist yet (FileExistsError otherwise)."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode()
    directory, name = os.path.split(path)
    for _ in range(_ATTEMPTS):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, _CREATE, PRIVATE_MODE)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", path)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), PRIVATE_MODE)     # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)       # fails if the target exists, never replaces it
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_private(path: str, st: os.stat_result) -> None:
    """Raise NotPrivate when the file ``st`` describes is open to group or others, or owned by
    another user than the one running mipsec (or root)."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise NotPrivate(f"mode {mode:04o} lets group or others read or change it (it holds "
                         f"keys): chmod 600 {path}")
    if st.st_uid not in (os.geteuid(), 0):
        raise NotPrivate(f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) or "
                         f"root: another user could change it: chown {os.geteuid()} {path}")
