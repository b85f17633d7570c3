"""FUSE_HANDLE_KILLPRIV_V2 (``clients/fuse_init.py``): no GETXATTR per write, and the mount clears
set-user-ID / set-group-ID bits where the kernel did before (write, truncate, open(O_TRUNC) by a
non-root caller; chown). Each case runs against a mount with the flag and one without
(``OI_FUSE_KILLPRIV=0``: the kernel does it, as before); the outcomes must be the same.

Skips with the reason where /dev/fuse is missing or mounting is not permitted here.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time

import pytest

from tests.fs.clients.fuse_mount import fuse_mount

pytestmark = pytest.mark.service


@pytest.fixture(scope="module", params=["killpriv", "kernel"])
def kmount(request, cluster, tmp_path_factory):
    """(mount point, its --debug log, whether the flag is on)."""
    log = str(tmp_path_factory.mktemp("killpriv") / "fuse.log")
    on = request.param == "killpriv"
    with fuse_mount(cluster, "--debug", mode=0o755, env={"OI_FUSE_KILLPRIV": "1" if on else "0"},
                    log=log) as mountpoint:
        yield mountpoint, log, on


def _opcodes(log: str, start: int) -> list[str]:
    with open(log, "rb") as f:
        f.seek(start)
        return re.findall(r"opcode: (\w+)", f.read().decode(errors="replace"))


def test_no_getxattr_per_write(kmount, workdir):
    """With the flag, 200 4 KiB pwrites to one open file send 200 WRITEs and (about) no GETXATTR;
    without it, one GETXATTR(security.capability) rides every write."""
    mnt, log, on = kmount
    path = f"{mnt}{workdir}/w"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
    start = os.path.getsize(log)
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(200):
            os.pwrite(fd, os.urandom(4096), (i * 37 % 256) * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    time.sleep(0.2)  # the log is written by the mount process
    ops = _opcodes(log, start)
    assert ops.count("WRITE") == 200
    if on:
        assert ops.count("GETXATTR") <= 2, ops.count("GETXATTR")  # the first write; an attr refresh
    else:
        assert ops.count("GETXATTR") >= 200
    with open(path, "rb") as f:  # and the data is there
        assert len(f.read()) == 1 << 20


def _as_user(fn) -> int:
    """Run ``fn`` in a forked child as uid/gid 1000; its exit status (0: no exception)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(1000)
            os.setuid(1000)
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("mode", [0o4755, 0o2775, 0o2765, 0o6775, 0o755])
def test_setid_bits_cleared_as_the_kernel_did(kmount, fs_client, workdir, mode):
    """set-user-ID always and set-group-ID with group-execute are cleared by a non-root write,
    truncate and open(O_TRUNC), and by any chown; a root write keeps them; set-group-ID without
    group-execute stays. The mode is right at once through the mount and in meta."""
    mnt, _, _ = kmount
    kill = mode & stat.S_ISUID | (mode & stat.S_ISGID if mode & stat.S_IXGRP else 0)
    cleared = mode & ~kill
    name = f"f{mode:o}"
    path, cpath = f"{mnt}{workdir}/{name}", f"{workdir}/{name}"

    def setup():
        fs_client.chown(cpath, 1000, 1000)
        fs_client.chmod(cpath, mode)
        time.sleep(0.25)  # the mount's attribute cache (0.2 s): its mode is the one just set
        assert stat.S_IMODE(os.stat(path).st_mode) == mode

    def check(what: str, want: int):
        got = stat.S_IMODE(os.stat(path).st_mode)  # no wait: the kernel's cached mode must follow
        assert (what, oct(got)) == (what, oct(want))
        assert (what, oct(stat.S_IMODE(fs_client.stat(cpath).mode))) == (what, oct(want))

    fs_client.write_bytes(cpath, b"x" * 100)

    def user_write():
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"y", 5)
        os.pwrite(fd, b"y", 7)
        os.close(fd)

    setup()
    assert _as_user(user_write) == 0
    check("user write", cleared)
    setup()
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"z", 6)
    os.close(fd)
    check("root write", mode)
    setup()
    assert _as_user(lambda: os.truncate(path, 50)) == 0
    check("user truncate", cleared)
    setup()
    assert _as_user(lambda: os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))) == 0
    check("user open O_TRUNC", cleared)
    setup()
    os.chown(path, 1000, 1000)
    check("root chown", mode & ~(stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)))
    assert fs_client.read_bytes(cpath) == b""  # (truncated above) the data path still right


def test_xattrs_still_served(kmount, fs_client, workdir):
    """The read-only xattrs are unchanged; security.capability is absent; setting is refused."""
    mnt, _, _ = kmount
    path = f"{mnt}{workdir}/x"
    with open(path, "wb") as f:
        f.write(b"abc")
    st = fs_client.stat(f"{workdir}/x")
    assert os.getxattr(path, "user.3fs.inode") == str(st.inode).encode()
    layout = json.loads(os.getxattr(path, "user.3fs.layout"))
    assert layout["chunk_size"] == 1 << 20
    assert set(os.listxattr(path)) == {"user.3fs.inode", "user.3fs.layout"}
    with pytest.raises(OSError) as e:
        os.getxattr(path, "security.capability")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(path, "user.x", b"1")
    assert e.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    fd = os.open(path, os.O_WRONLY)  # writes after the xattr traffic still land
    os.pwrite(fd, b"Z", 1)
    os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"aZc"
