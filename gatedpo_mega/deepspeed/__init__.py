"""The DeepSpeed adapter: ZeRO holds and shards the optimizer state over the data-parallel group."""
