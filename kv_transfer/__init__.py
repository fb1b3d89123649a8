"""Moving KV blocks from prefill to decode workers: block byte layout, sender, receiver, transports."""
