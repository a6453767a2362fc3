"""Architecture specs, one module per family of transformers MoE blocks (see :mod:`.common`)."""
