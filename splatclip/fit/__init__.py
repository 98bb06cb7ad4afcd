"""The fit job: image-text shards -> splat shards, with Ray Data (`job`: the driver; `stages`: the CPU
read and decode stages; `actor`: the fitting actor; `parts`: the distributed commit; `report`: each
shard's record and the job's summary)."""
