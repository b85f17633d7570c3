"""meta: the namespace (inodes, entries, layouts, sessions) on the transactional KV store."""

from openinfra.fs.meta.paths import InvalidPath, split_path
from openinfra.fs.meta.service import MetaConfig, MetaService
from openinfra.fs.meta.store import LayoutPolicy, MetaStore, User

__all__ = ["InvalidPath", "split_path", "MetaConfig", "MetaService", "LayoutPolicy", "MetaStore", "User"]
