"""The prefill role: chunked prefill that streams each finished layer's KV to a decode worker."""
