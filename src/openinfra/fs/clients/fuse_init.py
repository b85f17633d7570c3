"""Answer the kernel's FUSE INIT with ``FUSE_HANDLE_KILLPRIV_V2`` added (pyfuse3 cannot ask for it).

Why: without it the kernel asks the daemon for ``security.capability`` (a GETXATTR round trip)
before *every* write, to learn whether a file capability must be dropped; the FUSE superblock
lacks ``SB_NOSEC``, so the inode never remembers that it has none. With
``FUSE_HANDLE_KILLPRIV_V2`` the kernel sets ``SB_NOSEC``: after the first write the inode is
marked ``S_NOSEC`` and later writes send no GETXATTR (an attribute reply clears the mark again,
so one GETXATTR per attribute refresh remains). In exchange the daemon promises to clear
set-user-ID / set-group-ID (and file capabilities, which this file system does not store) on
write, truncate and chown itself: the mount does that (``fuse.py``, ``_kill_privs``).

How: pyfuse3 3.5 offers no hook to change ``fuse_conn_info.want``, and the libfuse it links
(3.14) does not know the flag anyway, so after ``pyfuse3.init`` (mounted, INIT queued on
/dev/fuse) and before ``pyfuse3.main`` (no event-loop reader registered yet) this module

1. finds pyfuse3's session pointer (a static of its extension module, from the module's ELF
   symbol table) and checks it against libfuse (``fuse_session_fd`` equals the /dev/fuse fd);
2. reads the INIT request from /dev/fuse itself;
3. points the session's descriptor number at one end of a ``SOCK_SEQPACKET`` pair (``dup2``),
   hands the request to libfuse (``fuse_session_process_buf``: pyfuse3's own init handler runs,
   libfuse records the connection settings) and takes libfuse's reply from the other end;
4. puts /dev/fuse back on that descriptor number and writes the reply to the kernel, with
   ``FUSE_HANDLE_KILLPRIV_V2`` added to its flags when the kernel offered it.

Anything unexpected before step 2 (no symbol table, other libfuse, pointer checks failing) leaves
INIT to pyfuse3 as before: ``negotiate`` returns False and the mount runs as it did (a GETXATTR per
write). From step 2 on the request is libfuse's to answer in any case; only the one flag bit of its
reply may change. ``OI_FUSE_KILLPRIV=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import socket
import struct

__all__ = ["negotiate", "FUSE_HANDLE_KILLPRIV_V2"]

log = logging.getLogger("openinfra.fs.fuse")

FUSE_INIT = 26
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
_IN_HEADER = 40  # struct fuse_in_header
_OUT_HEADER = 16  # struct fuse_out_header


class _FuseBuf(ctypes.Structure):
    """libfuse's ``struct fuse_buf`` (3.x), with room for fields later versions append."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64), ("_reserved", ctypes.c_char * 64)]


def _elf_symbols(path: str, names: set[bytes]) -> dict[bytes, int]:
    """``st_value`` of each of ``names`` in the ELF64 ``.symtab`` of ``path`` (absent ones left out)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out: dict[bytes, int] = {}
    for _n, typ, _fl, _addr, off, size, link, _info, _al, entsize in secs:
        if typ != 2 or not entsize:  # SHT_SYMTAB
            continue
        stroff = secs[link][4]
        for i in range(size // entsize):
            st_name, _inf, _oth, _shndx, value, _sz = struct.unpack_from("<IBBHQQ", data, off + i * entsize)
            end = data.index(b"\0", stroff + st_name)
            name = data[stroff + st_name:end]
            if name in names:
                out[name] = value
    return out


def _mapping_base(path: str) -> int | None:
    """The load address of ``path`` in this process (its first mapping at file offset 0)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    return None


def _loaded(fragment: str) -> str | None:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and fragment in os.path.basename(parts[5].strip()):
                return parts[5].strip()
    return None


def _session() -> tuple[int, int, ctypes.CDLL] | None:
    """(session pointer, /dev/fuse fd, libfuse) of the pyfuse3 session, checked; None if unsure."""
    import pyfuse3

    so = pyfuse3.__file__
    syms = _elf_symbols(so, {b"__pyx_v_7pyfuse3_session", b"__pyx_v_7pyfuse3_session_fd", b"PyInit_pyfuse3"})
    if len(syms) != 3:
        log.info("killpriv_v2: pyfuse3's symbol table is not readable (stripped?)")
        return None
    base = _mapping_base(so)
    lib = ctypes.PyDLL(so)
    if base is None or ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value - syms[b"PyInit_pyfuse3"] != base:
        log.info("killpriv_v2: pyfuse3's load address does not match its symbol table")
        return None
    se = ctypes.c_void_p.from_address(base + syms[b"__pyx_v_7pyfuse3_session"]).value
    fd = ctypes.c_int.from_address(base + syms[b"__pyx_v_7pyfuse3_session_fd"]).value
    fuse_path = _loaded("libfuse3.so")
    if not se or fd < 0 or fuse_path is None:
        return None
    # PyDLL: the GIL stays held while libfuse runs pyfuse3's init handler (Cython, no GIL acquire).
    fuse = ctypes.PyDLL(fuse_path)
    fuse.fuse_session_fd.argtypes, fuse.fuse_session_fd.restype = [ctypes.c_void_p], ctypes.c_int
    fuse.fuse_session_process_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf)]
    fuse.fuse_session_process_buf.restype = None
    try:
        dev = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if dev != "/dev/fuse" or fuse.fuse_session_fd(se) != fd:
        log.info("killpriv_v2: pyfuse3's session does not match /dev/fuse")
        return None
    return se, fd, fuse


def negotiate(timeout: float = 10.0) -> bool:
    """Answer the pending INIT (see the module doc); True if FUSE_HANDLE_KILLPRIV_V2 was granted.

    Call between ``pyfuse3.init`` and ``pyfuse3.main``. False: INIT was left to pyfuse3 (nothing
    read), or the kernel did not offer the flag, or the reply was an error."""
    if os.environ.get("OI_FUSE_KILLPRIV", "1") != "1":
        return False
    try:
        found = _session()
    except Exception as exc:  # noqa: BLE001 - any doubt: leave INIT to pyfuse3
        log.info("killpriv_v2: not used (%s)", exc)
        return False
    if found is None:
        return False
    se, fd, fuse = found
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        log.info("killpriv_v2: no INIT request within %.0f s; left to pyfuse3", timeout)
        return False
    req = os.read(fd, 2 << 20)  # the kernel wants room for a whole write request
    opcode, = struct.unpack_from("<I", req, 4) if len(req) >= 8 else (None,)
    offered = 0
    if opcode == FUSE_INIT and len(req) >= _IN_HEADER + 16:
        offered = struct.unpack_from("<I", req, _IN_HEADER + 12)[0] & FUSE_HANDLE_KILLPRIV_V2
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    real = os.dup(fd)
    mem = ctypes.create_string_buffer(req, len(req))
    buf = _FuseBuf(size=len(req), flags=0, mem=ctypes.cast(mem, ctypes.c_void_p).value, fd=-1, pos=0)
    try:
        os.dup2(a.fileno(), fd, inheritable=False)
        try:
            fuse.fuse_session_process_buf(se, ctypes.byref(buf))
        finally:
            os.dup2(real, fd, inheritable=False)
        b.setblocking(False)
        try:
            reply = bytearray(b.recv(1 << 20))
        except BlockingIOError:
            raise RuntimeError("libfuse sent no reply to FUSE INIT") from None
        granted = False
        if (offered and opcode == FUSE_INIT and len(reply) >= _OUT_HEADER + 16
                and struct.unpack_from("<i", reply, 4)[0] == 0):
            flags, = struct.unpack_from("<I", reply, _OUT_HEADER + 12)
            struct.pack_into("<I", reply, _OUT_HEADER + 12, flags | FUSE_HANDLE_KILLPRIV_V2)
            granted = True
        os.write(fd, reply)
    finally:
        os.close(real)
        a.close()
        b.close()
    log.info("FUSE INIT answered%s", " with FUSE_HANDLE_KILLPRIV_V2" if granted else "")
    return granted
