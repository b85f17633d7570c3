"""mgmtd: the cluster manager (lease-elected primary, heartbeats, chain tables, target states)."""

from openinfra.fs.mgmtd.service import Mgmtd, MgmtdConfig
from openinfra.fs.mgmtd.state import next_chain_targets

__all__ = ["Mgmtd", "MgmtdConfig", "next_chain_targets"]
