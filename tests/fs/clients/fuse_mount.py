"""Mount the cluster with ``openinfra.fs.clients.fuse`` in a child process, for the FUSE tests.

Skips with the reason where /dev/fuse or pyfuse3 is missing or mounting is not permitted here;
always unmounts, stops the process and removes the mount point.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time

import pytest


@contextlib.contextmanager
def fuse_mount(cluster, *args: str, prefix: str = "openinfra-mnt-", mode: int | None = None,
               env: dict | None = None, log: str | None = None):
    """Yield a mount point of ``cluster``: extra mount ``args`` (``{mnt}`` in one stands for the
    mount point), ``mode``: chmod of the mount point, ``env``: extra environment of the mount
    process, ``log``: a file for its stderr (``--debug`` output is more than a pipe holds)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: FUSE mounts are not possible on this machine")
    pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed")
    # Directly under /tmp, not pytest's 0700 tree: permission tests run as another user.
    mountpoint = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    if mode is not None:
        os.chmod(mountpoint, mode)
    errf = open(log, "wb") if log else None
    proc = subprocess.Popen([sys.executable, "-m", "openinfra.fs.clients.fuse", mountpoint, "--mgmtd", cluster.address,
                             "--attr-timeout", "0.2", *(a.format(mnt=mountpoint) for a in args)],
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                            stderr=errf if errf else subprocess.PIPE)
    if errf:
        errf.close()  # the child has its own descriptor
    deadline = time.monotonic() + 30
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            os.rmdir(mountpoint)
            err = open(log, "rb").read() if log else proc.stderr.read()
            pytest.skip(f"mounting is not permitted here: {err.decode(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the FUSE mount did not appear within 30 s")
        time.sleep(0.05)
    try:
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], check=False)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
        os.rmdir(mountpoint)
