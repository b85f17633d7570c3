"""Batched tree delete against a real cluster."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.service


def _build(fs, root: str, width: int = 3, depth: int = 3, files: int = 4) -> int:
    n = 0
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            for i in range(files):
                fs.write_bytes(f"{d}/f{i}", b"x" * (i * 1000))
                n += 1
            for j in range(width):
                fs.mkdir(f"{d}/d{j}")
                nxt.append(f"{d}/d{j}")
        level = nxt
    return n


@pytest.mark.parametrize("server", [True, False], ids=["server", "client"])
def test_remove_tree_removes_everything(fs_client, workdir, server):
    from openinfra.fs.clients import remove_tree

    root = f"{workdir}/tree"
    fs_client.mkdir(root)
    nfiles = _build(fs_client, root, width=2, depth=3, files=3)
    fs_client.symlink(f"{root}/link", "/nowhere")
    fs_client.mkdir(f"{workdir}/keep")
    r = remove_tree(fs_client, root, server=server, concurrency=8)
    assert r.files == nfiles + 1 and r.dirs == 1 + 2 + 4 + 8 and not r.pending
    assert not fs_client.exists(root)
    assert fs_client.listdir(workdir) == ["keep"]
    if not server:
        assert fs_client.listdir("/.trash") == []  # emptied after the atomic move


def _meta(fs, method, **args):
    return fs._run(fs.aio._meta(method, args))


def test_server_remove_tree_in_the_background(fs_client, workdir):
    """wait=False: the tree is out of the namespace when the call returns; the meta service
    empties it (here forced by a GC pass) and the file chunks are collected after."""
    from openinfra.fs.clients import remove_tree

    root = f"{workdir}/bg"
    fs_client.mkdir(root)
    nfiles = _build(fs_client, root, width=3, depth=3, files=5)
    assert nfiles > 60
    r = remove_tree(fs_client, root, wait=False)
    assert r.pending and r.files == 0
    assert not fs_client.exists(root) and fs_client.listdir(workdir) == []
    for _ in range(50):  # bounded: the emptier started at the call; a GC pass finishes what is left
        if _meta(fs_client, "trash_pending") == 0:
            break
        _meta(fs_client, "gc")
    assert _meta(fs_client, "trash_pending") == 0
    fs_client.mkdir(root)  # the name is free and a new tree works there
    fs_client.write_bytes(f"{root}/again", b"ok")
    assert fs_client.read_bytes(f"{root}/again") == b"ok"


def test_server_remove_tree_keeps_outside_hard_links_and_rejects_bad_input(fs_client, workdir):
    from openinfra.fs.clients import remove_tree

    root = f"{workdir}/h"
    fs_client.mkdir(f"{root}/sub", parents=True)
    fs_client.write_bytes(f"{root}/sub/data", b"payload")
    fs_client.link(f"{root}/sub/data", f"{workdir}/survivor")
    assert remove_tree(fs_client, root).files == 1
    assert fs_client.read_bytes(f"{workdir}/survivor") == b"payload"  # one link left outside
    with pytest.raises(FileNotFoundError):
        fs_client.remove_tree(f"{workdir}/missing")
    with pytest.raises(ValueError, match="wait"):
        fs_client.remove_tree(workdir, wait="yes")
    with pytest.raises(ValueError, match="server"):
        remove_tree(fs_client, workdir, server=1)


def test_server_remove_tree_checks_every_directory_like_rm_r(cluster, fs_client, workdir):
    """A user who owns the top of a tree but not a directory inside it cannot remove it, and the
    refused request changes nothing (the check runs before the tree is unlinked)."""
    from openinfra.fs import User
    from openinfra.fs.clients import remove_tree

    with cluster.client(user=User(1000, 1000)) as alice:
        alice.mkdir(f"{workdir}/mine")
    fs_client.mkdir(f"{workdir}/mine/roots", mode=0o755)  # root-owned inside alice's directory
    fs_client.write_bytes(f"{workdir}/mine/roots/secret", b"s")
    with cluster.client(user=User(1000, 1000)) as alice:
        with pytest.raises(PermissionError):
            remove_tree(alice, f"{workdir}/mine")
        assert alice.exists(f"{workdir}/mine/roots/secret")
        fs_client.remove(f"{workdir}/mine/roots/secret")
        fs_client.remove(f"{workdir}/mine/roots")
        alice.mkdir(f"{workdir}/mine/own")
        alice.write_bytes(f"{workdir}/mine/own/f", b"a")
        r = remove_tree(alice, f"{workdir}/mine")
        assert (r.files, r.dirs) == (1, 2)
    assert not fs_client.exists(f"{workdir}/mine")


def test_remove_tree_file_missing_and_bad_input(fs_client, workdir):
    from openinfra.fs.clients import remove_tree

    fs_client.write_bytes(f"{workdir}/one", b"1")
    assert remove_tree(fs_client, f"{workdir}/one").files == 1
    with pytest.raises(FileNotFoundError):
        remove_tree(fs_client, f"{workdir}/missing")
    with pytest.raises(ValueError, match="root"):
        remove_tree(fs_client, "/")
    with pytest.raises(ValueError, match="concurrency"):
        remove_tree(fs_client, workdir, concurrency=0)
    with pytest.raises(TypeError, match="fs"):
        remove_tree("not a client", workdir)


def test_remove_tree_without_trash_and_user_permissions(cluster, fs_client, workdir):
    from openinfra.fs import User
    from openinfra.fs.clients import remove_tree

    fs_client.mkdir(f"{workdir}/p/q", parents=True)
    fs_client.write_bytes(f"{workdir}/p/q/f", b"z")
    assert remove_tree(fs_client, f"{workdir}/p", trash=False).dirs == 2
    fs_client.mkdir(f"{workdir}/locked/sub", parents=True, mode=0o755)  # owned by root
    with cluster.client(user=User(1000, 1000)) as alice:
        with pytest.raises(PermissionError):
            remove_tree(alice, f"{workdir}/locked", trash=False)
    assert fs_client.exists(f"{workdir}/locked/sub")
