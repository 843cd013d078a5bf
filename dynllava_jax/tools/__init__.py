"""Analysis and model-surgery commands: Block Influence (`block_influence`), layer pruning (`prune`)."""
