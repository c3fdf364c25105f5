"""The inference engine: scheduler, MLA block pool, KDA state pool, model runner, sampler, outputs."""
