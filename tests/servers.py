"""Where the tests' server helpers were: the topologies now live in the harness distribution
(``pyfiq_harness.topologies``, ``pyfiq_harness.servers``) and the producer loop in
``tests.support.helpers``; the names stay importable from here."""

from __future__ import annotations

from pyfiq_harness.servers import Node, free_ports, wait_for
from pyfiq_harness.topologies import Cluster, Replicated, Sentinels, TLSFiles
from tests.support.helpers import ProducerLoop

__all__ = ["Cluster", "Node", "ProducerLoop", "Replicated", "Sentinels", "TLSFiles", "free_ports", "wait_for"]
