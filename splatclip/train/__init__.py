"""The train job: a splat encoder (or an RGB model) with Ray Train (`job`: the driver; `loop`: what
every worker runs; `state`: the position and checkpoints; `ingest`: batches decoded ahead of the step)."""
