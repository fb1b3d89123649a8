"""Triton kernels, one per file, each with its torch reference and a checked launcher.

- ``kv_store``: write a step's K/V into the paged cache at ``slot_mapping`` (-1 = skip).
- ``paged_decode_attention``: one query token per sequence, GQA-grouped, split across the
  context (flash-decoding) with a reduce kernel.
- ``paged_prefill_attention``: causal chunks over their cached prefix, read from the cache.
- ``kv_pack``: gather/scatter one layer's blocks of a request to/from a contiguous buffer
  (``[n, 2, block_size, num_kv_heads, head_dim]``) for KV transfer.

``_paged_tile`` holds the online-softmax tile step both attention kernels share, ``_checks``
the launchers' argument checks. On CPU, tests run the kernels through ``TRITON_INTERPRET=1``.
"""
