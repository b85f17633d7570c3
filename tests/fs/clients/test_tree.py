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


def test_remove_tree_removes_everything(fs_client, workdir):
    from openinfra.fs.clients import remove_tree

    root = f"{workdir}/tree"
    fs_client.mkdir(root)
    nfiles = _build(fs_client, root, width=2, depth=3, files=3)
    fs_client.symlink(f"{root}/link", "/nowhere")
    fs_client.mkdir(f"{workdir}/keep")
    r = remove_tree(fs_client, root, concurrency=8)
    assert r.files == nfiles + 1 and r.dirs == 1 + 2 + 4 + 8
    assert not fs_client.exists(root)
    assert fs_client.listdir(workdir) == ["keep"]
    assert fs_client.listdir("/.trash") == []  # emptied after the atomic move


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
