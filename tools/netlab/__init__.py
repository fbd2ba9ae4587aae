"""A partition lab: every HA node and etcd member in a network namespace of its own.

* :mod:`tools.netlab.net`: namespaces on a bridge; cuts, one-way cuts and isolation as
  nftables rules in the faulted host's namespace; slow links through a delay proxy;
  clean-up by exact name, and :func:`~tools.netlab.net.sweep` for a crashed run's leftovers.
* :mod:`tools.netlab.delay`: that proxy (this kernel has no `tc netem`).
* :mod:`tools.netlab.cluster`: :class:`~tools.netlab.cluster.NetCluster`, HA nodes and a
  1- or 3-member etcd on it, faulted by name.
* :mod:`tools.netlab.load` and :mod:`tools.netlab.scenarios`: writers during a fault, and
  the scenarios that tests/partition checks and benchmarks/partitions.py times.

Needs root, `ip` and `nft` (Debian: iproute2, nftables).
"""
