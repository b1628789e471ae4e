"""Everything distributed: process group, topology, sharders, planning and DMP wrapping.

Models never import this package; the trainer builds an unsharded model on the meta device
and hands it to :func:`sharding.parallel.shard_model`.
"""
