"""Training engine: mesh, sharding, state, loop, checkpoints, data, recipes."""
