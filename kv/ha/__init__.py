"""High availability: any node can lead, elected through etcd (`python -m kv.ha`).

* :mod:`kv.ha.lease` and :mod:`kv.ha.decide` are pure: the lease's deadline, and one HA
  cycle's decision over (what etcd says, what this node is), with the sentence it logs.
* :mod:`kv.ha.etcd` talks to etcd's JSON gateway with httpx.
* :mod:`kv.ha.node` runs the cycle and switches this process between leader.py's app and
  follower.py's app, in place, over one store.
"""
