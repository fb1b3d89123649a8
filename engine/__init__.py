"""pdserve inference engine: config, model, paged KV cache, block pool, scheduler, sampler."""
