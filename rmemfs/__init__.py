"""rmemfs: a recoverable memory filesystem.

File data and the namespace live in page-aligned memory regions that an
exporter process registers for (software or verbs) RDMA. Writes are marked in
two dirty page lists kept in exported memory; a flusher publishes incremental
baselines to a shared backend; ``rmemfs-recover`` rebuilds a failed host's
filesystem from the baseline plus the dirty pages read over RDMA.
"""

__version__ = "0.1.0"
PAGE_SIZE = 4096
