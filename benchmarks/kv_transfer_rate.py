"""KV transfer rate between two processes on loopback: gRPC and NIXL against their ceilings.

The decode side runs in a child process (as it would on another worker), with its own KV
cache; the prefill side sends every block of every layer of a real cache (``--total-mb`` of
K/V), layer by layer as a prefill would, and the clock stops when the receiver has verified
and acknowledged the request as complete. The same run, with the same payloads, also times:

- ``tcp``: a raw TCP socket (one ``sendall`` of the packed bytes into ``recv_into``; no pack,
  checksum or framing): the loopback ceiling for gRPC;
- ``grpc_tls``: the gRPC transport over TLS (a self-signed CA made for the run; what
  ``--kv-tls-*`` costs), with the cluster secret set;
- ``grpc_raw``: gRPC alone: the same bytes as pre-encoded ``chunk_bytes`` messages over
  ``--grpc-streams`` calls into a handler that only counts them (what grpcio itself costs);
- ``nixl``: the NIXL transport (one-sided UCX WRITEs cache to cache, per-block CRC-32C
  notifications verified over the landed bytes); the pairing handshake is done before timing;
- ``nixl_contiguous``: NIXL's own WRITE of one contiguous registered buffer of the same size
  (described as one descriptor per layer's worth of bytes), no notification or verification:
  the ceiling for our descriptor lists;
- ``local``: the in-process transport (pack + checksum + scatter, no wire);
- ``memcpy``: one copy of the same number of bytes between two buffers (memory bandwidth);
- ``checksum``: CRC-32C over the cache in place, the integrity cost per side.

Each transfer is checked: the decode cache's CRC must equal the prefill cache's.

    python -m benchmarks.kv_transfer_rate [--total-mb 512] [--out kv_transfer_rate.json]

Default: the KV of a 4k-token prompt in Llama-3-8B's geometry (32 layers, 8 KV heads,
head_dim 128, bf16, block_size 16: 64 KiB per block and layer, 16 MiB per layer, 512 MiB).
NIXL needs ``UCX_TLS`` to include ``tcp`` on a host without RDMA (set here when unset).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import secrets
import socket
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from kv_transfer import KVLayout, KVTransferConfig, TransferTarget, get_transport
from kv_transfer.base import ReceiverInfo
from kv_transfer.layout import block_checksums, cache_layer_shape, gather_blocks, payload_bytes
from kv_transfer.security import write_self_signed_tls

GB = 1e9


def _caches(layout: KVLayout, num_blocks: int, fill: bool) -> list[torch.Tensor]:
    shape = cache_layer_shape(layout, num_blocks)
    make = torch.randn if fill else torch.zeros
    return [make(shape).to(layout.torch_dtype) for _ in range(layout.num_layers)]


def _cache_crc(caches: list[torch.Tensor], block_ids: list[int]) -> int:
    crc, ids = 0, torch.tensor(block_ids)
    for kv_layer in caches:
        crc = zlib.crc32(payload_bytes(gather_blocks(kv_layer, ids)), crc)
    return crc


def _send_json(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _recv_json(conn: Connection) -> dict[str, Any]:
    return json.loads(conn.recv_bytes())


def _receiver_main(
    conn: Connection,
    transport: str,
    layout: dict[str, Any],
    config: dict[str, Any],
    num_blocks: int,
    torch_threads: int,
) -> None:
    """Decode side: a receiver that reserves, waits and reports the CRC it holds."""
    torch.set_num_threads(torch_threads)
    caches = _caches(KVLayout(**layout), num_blocks, fill=False)
    receiver = get_transport(transport).create_receiver(
        caches,
        KVTransferConfig(**config),
        address="127.0.0.1:0" if transport == "grpc" else "",
    )
    info = asdict(receiver.info())
    _send_json(conn, info | {"metadata": info["metadata"].hex()})
    while (message := _recv_json(conn))["op"] != "close":
        request_id = message["request_id"]
        if message["op"] == "expect":
            target = asdict(receiver.expect(request_id, message["block_ids"], lease_s=600.0))
            _send_json(conn, target | {"metadata": target["metadata"].hex()})
        else:  # "verify"
            complete = receiver.wait_complete(request_id, timeout=60.0)
            crc = _cache_crc(caches, message["block_ids"])
            receiver.cancel(request_id)
            _send_json(conn, {"complete": complete, "crc": crc})
    receiver.close()


def _tcp_receiver_main(conn: Connection, nbytes: int, repeats: int) -> None:
    """A plain socket that reads ``nbytes`` into one buffer per repeat and answers one byte."""
    buffer = bytearray(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        _send_json(conn, {"port": server.getsockname()[1]})
        peer, _ = server.accept()
        with peer:
            for _ in range(repeats):
                view, received = memoryview(buffer), 0
                while received < nbytes:
                    received += peer.recv_into(view[received:])
                peer.sendall(b"k")
                _send_json(conn, {"crc": zlib.crc32(buffer)})


def _bench_transport(
    transport: str,
    layout: KVLayout,
    config: KVTransferConfig,
    src: list[torch.Tensor],
    repeats: int,
) -> list[float]:
    num_blocks = int(src[0].shape[1])
    block_ids = list(range(num_blocks))
    dst_ids = block_ids[::-1]  # other block ids on the decode side (no two adjacent alike)
    config = replace(config, transport=transport)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_receiver_main,
        args=(
            child,
            transport,
            asdict(layout),
            asdict(config),
            num_blocks,
            torch.get_num_threads(),
        ),
    )
    process.start()
    info = _recv_json(parent)
    sender = get_transport(transport).create_sender(src, config)
    sender.connect(ReceiverInfo(**info | {"metadata": bytes.fromhex(info["metadata"])}))
    expected_crc = _cache_crc(src, block_ids)
    seconds = []
    try:
        for i in range(repeats + 1):  # the first round warms up the channel
            request_id = f"bench-{i}"
            _send_json(parent, {"op": "expect", "request_id": request_id, "block_ids": dst_ids})
            fields = _recv_json(parent)
            fields |= {"block_ids": tuple(fields["block_ids"])}
            target = TransferTarget(**fields | {"metadata": bytes.fromhex(fields["metadata"])})
            start = time.perf_counter()
            sender.begin(target)
            for layer in range(layout.num_layers):
                sender.send_layer(request_id, layer, block_ids, dst_ids)
            result = sender.flush(request_id).result(timeout=300)
            elapsed = time.perf_counter() - start
            _send_json(parent, {"op": "verify", "request_id": request_id, "block_ids": dst_ids})
            verdict = _recv_json(parent)
            if not (result.complete and verdict["complete"] and verdict["crc"] == expected_crc):
                raise RuntimeError(
                    f"{transport} transfer {i} did not land intact: {result}, {verdict}"
                )
            if i > 0:
                seconds.append(elapsed)
    finally:
        sender.close()
        _send_json(parent, {"op": "close"})
        process.join(30)
    return seconds


def bench_grpc(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    return _bench_transport("grpc", layout, config, src, repeats)


def bench_grpc_tls(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    with tempfile.TemporaryDirectory() as directory:
        tls = write_self_signed_tls(directory, "bench")
        config = replace(config, secret=secrets.token_bytes(32), **tls)
        return _bench_transport("grpc", layout, config, src, repeats)


def _grpc_raw_main(conn: Connection, config: dict[str, Any]) -> None:
    """A bare gRPC server: one client-streaming method that counts the bytes it received."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    limit = KVTransferConfig(**config).max_message_bytes
    options = [("grpc.max_receive_message_length", limit)]

    def count(messages: Any, context: Any) -> bytes:
        return str(sum(len(m) for m in messages)).encode()

    handler = grpc.method_handlers_generic_handler(
        "bench", {"push": grpc.stream_unary_rpc_method_handler(count)}
    )
    server = grpc.server(ThreadPoolExecutor(8), options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _send_json(conn, {"port": port})
    _recv_json(conn)  # close
    server.stop(None)


def bench_grpc_raw(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    """gRPC's own ceiling: the same bytes as ``chunk_bytes`` messages already encoded, over
    ``num_streams`` calls, into a handler that only counts them (no pack, checksum, scatter)."""
    import grpc

    ids = torch.arange(src[0].shape[1])
    payload = b"".join(bytes(payload_bytes(gather_blocks(kv_layer, ids))) for kv_layer in src)
    messages = [
        payload[i : i + config.chunk_bytes] for i in range(0, len(payload), config.chunk_bytes)
    ]
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_grpc_raw_main, args=(child, asdict(config)))
    process.start()
    address = f"127.0.0.1:{_recv_json(parent)['port']}"
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [grpc.insecure_channel(address, options=options) for _ in range(config.num_streams)]
    calls = [channel.stream_unary("/bench/push") for channel in channels]
    seconds = []
    try:
        for i in range(repeats + 1):
            start = time.perf_counter()
            n = len(calls)
            futures = [call.future(iter(messages[k::n])) for k, call in enumerate(calls)]
            received = sum(int(f.result(timeout=300)) for f in futures)
            elapsed = time.perf_counter() - start
            if received != len(payload):
                raise RuntimeError(f"raw gRPC moved {received} of {len(payload)} bytes")
            if i > 0:
                seconds.append(elapsed)
    finally:
        for channel in channels:
            channel.close()
        _send_json(parent, {"op": "close"})
        process.join(30)
    return seconds


def bench_nixl(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    return _bench_transport("nixl", layout, config, src, repeats)


def _nixl_contiguous_main(conn: Connection, nbytes: int, segment: int) -> None:
    """One registered contiguous buffer; reports its CRC after each notified WRITE."""
    from nixl._api import nixl_agent

    agent = nixl_agent("bench-contiguous-target")
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    agent.register_memory([buffer])
    descs = agent.get_serialized_descs(agent.get_xfer_descs(list(buffer.split(segment))))
    _send_json(conn, {"metadata": agent.get_agent_metadata().hex(), "descs": descs.hex()})
    while (message := _recv_json(conn))["op"] != "close":
        tag = message["tag"].encode()
        while not any(tag in msgs for msgs in agent.update_notifs().values()):
            time.sleep(0.0005)
        _send_json(conn, {"crc": zlib.crc32(buffer.numpy())})


def bench_nixl_contiguous(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    from nixl._api import nixl_agent

    ids = torch.arange(src[0].shape[1])
    payload = torch.cat(
        [gather_blocks(kv_layer, ids).view(-1).view(torch.uint8) for kv_layer in src]
    )
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    # The buffer is described in per-layer segments: UCX over TCP moved one 512 MiB
    # descriptor at roughly half the rate of the same bytes in 16 MiB pieces (RESULTS.md).
    segment = payload.numel() // layout.num_layers
    process = context.Process(target=_nixl_contiguous_main, args=(child, payload.numel(), segment))
    process.start()
    fields = _recv_json(parent)
    agent = nixl_agent("bench-contiguous-initiator")
    agent.register_memory([payload])
    remote = agent.add_remote_agent(bytes.fromhex(fields["metadata"]))
    remote_descs = agent.deserialize_descs(bytes.fromhex(fields["descs"]))
    local_descs = agent.get_xfer_descs(list(payload.split(segment)))
    expected = zlib.crc32(payload.numpy())
    seconds = []
    try:
        for i in range(repeats + 1):
            tag = f"round-{i}"
            start = time.perf_counter()
            handle = agent.initialize_xfer("WRITE", local_descs, remote_descs, remote, tag.encode())
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            elapsed = time.perf_counter() - start
            agent.release_xfer_handle(handle)
            if state != "DONE":
                raise RuntimeError(f"contiguous NIXL WRITE failed: {state}")
            _send_json(parent, {"op": "check", "tag": tag})
            if _recv_json(parent)["crc"] != expected:
                raise RuntimeError(f"contiguous NIXL WRITE {i} did not land intact")
            if i > 0:
                seconds.append(elapsed)
    finally:
        _send_json(parent, {"op": "close"})
        process.join(30)
    return seconds


def bench_memcpy(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    nbytes = sum(t.numel() * t.element_size() for t in src)
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    seconds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        b.copy_(a)
        if i > 0:
            seconds.append(time.perf_counter() - start)
    return seconds


def bench_checksum(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    """What integrity costs each side: CRC-32C of every (layer, block), in place."""
    ids = list(range(src[0].shape[1]))
    seconds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        for kv_layer in src:
            block_checksums(kv_layer, ids)
        if i > 0:
            seconds.append(time.perf_counter() - start)
    return seconds


def bench_tcp(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    ids = torch.arange(src[0].shape[1])
    payload = b"".join(bytes(payload_bytes(gather_blocks(kv_layer, ids))) for kv_layer in src)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_tcp_receiver_main, args=(child, len(payload), repeats + 1))
    process.start()
    seconds = []
    with socket.create_connection(("127.0.0.1", _recv_json(parent)["port"])) as peer:
        for i in range(repeats + 1):
            start = time.perf_counter()
            peer.sendall(payload)
            if peer.recv(1) != b"k":
                raise RuntimeError("TCP receiver did not acknowledge")
            elapsed = time.perf_counter() - start
            if _recv_json(parent)["crc"] != zlib.crc32(payload):
                raise RuntimeError(f"TCP transfer {i} did not land intact")
            if i > 0:
                seconds.append(elapsed)
    process.join(30)
    return seconds


def bench_local(
    layout: KVLayout, config: KVTransferConfig, src: list[torch.Tensor], repeats: int
) -> list[float]:
    num_blocks = int(src[0].shape[1])
    block_ids = list(range(num_blocks))
    dst = _caches(layout, num_blocks, fill=False)
    transport = get_transport("local")
    receiver = transport.create_receiver(dst, config)
    sender = transport.create_sender(src, config)
    seconds = []
    try:
        for i in range(repeats + 1):
            request_id = f"bench-{i}"
            start = time.perf_counter()
            sender.begin(receiver.expect(request_id, block_ids[::-1]))
            for layer in range(layout.num_layers):
                sender.send_layer(request_id, layer, block_ids, block_ids[::-1])
            if not sender.flush(request_id).result(timeout=300).complete:
                raise RuntimeError("local transfer did not complete")
            elapsed = time.perf_counter() - start
            receiver.cancel(request_id)
            if i > 0:
                seconds.append(elapsed)
        if _cache_crc(dst, block_ids[::-1]) != _cache_crc(src, block_ids):
            raise RuntimeError("local transfer did not land intact")
    finally:
        sender.close()
        receiver.close()
    return seconds


BENCHES = {
    "tcp": bench_tcp,
    "grpc": bench_grpc,
    "grpc_tls": bench_grpc_tls,
    "grpc_raw": bench_grpc_raw,
    "nixl": bench_nixl,
    "nixl_contiguous": bench_nixl_contiguous,
    "local": bench_local,
    "memcpy": bench_memcpy,
    "checksum": bench_checksum,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total-mb", type=int, default=512, help="K/V bytes per transfer")
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--chunk-kb", type=int, default=1024, help="payload per gRPC message")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument(
        "--grpc-streams",
        type=int,
        default=KVTransferConfig.num_streams,
        help="gRPC calls (connections) per transfer",
    )
    parser.add_argument(
        "--only", nargs="*", choices=list(BENCHES), help="run only these (default: all)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch CPU threads in each process; the copies are memory-bound, and on a busy "
        "host OpenMP barriers slow them down many times",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    layout = KVLayout(
        args.num_layers, args.block_size, args.num_kv_heads, args.head_dim, args.dtype
    )
    os.environ.setdefault("UCX_TLS", "tcp,self,sm")  # inherited by the spawned children
    config = KVTransferConfig(
        num_streams=args.grpc_streams,
        chunk_bytes=args.chunk_kb << 10,
        max_message_bytes=max(
            KVTransferConfig.max_message_bytes, (args.chunk_kb << 10) + (2 << 20)
        ),
    )
    per_layer = args.total_mb * 2**20 // args.num_layers
    num_blocks = max(1, per_layer // layout.block_nbytes)
    nbytes = num_blocks * layout.block_nbytes * layout.num_layers
    src = _caches(layout, num_blocks, fill=True)
    print(
        f"{nbytes / 2**20:.0f} MiB per transfer: {layout.num_layers} layers x {num_blocks} blocks "
        f"x {layout.block_nbytes} B ({layout.signature}); {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    results: dict[str, Any] = {}
    for name, bench in BENCHES.items():
        if args.only and name not in args.only:
            continue
        seconds = bench(layout, config, src, args.repeats)
        best = min(seconds)
        results[name] = {"seconds": seconds, "best_gbs": nbytes / best / GB}
        print(f"  {name:>15}: {nbytes / best / GB:6.2f} GB/s best, {seconds=}")
    ratios = {
        "grpc_over_tcp": ("grpc", "tcp"),
        "grpc_tls_over_grpc": ("grpc_tls", "grpc"),
        "grpc_raw_over_tcp": ("grpc_raw", "tcp"),
        "nixl_over_contiguous": ("nixl", "nixl_contiguous"),
        "nixl_over_tcp": ("nixl", "tcp"),
    }
    ratios = {
        key: results[a]["best_gbs"] / results[b]["best_gbs"]
        for key, (a, b) in ratios.items()
        if a in results and b in results
    }
    for key, value in ratios.items():
        print(f"  {key} = {value:.2f}")

    if args.out:
        report = {
            "bytes_per_transfer": nbytes,
            "layout": asdict(layout),
            "num_blocks_per_layer": num_blocks,
            "chunk_bytes": config.chunk_bytes,
            "grpc_streams": config.num_streams,
            "ucx_tls": os.environ.get("UCX_TLS"),
            "results": results,
            **ratios,
            "host": {
                "cpus": os.cpu_count(),
                "load_average_1m": os.getloadavg()[0],
                "torch_threads": args.torch_threads,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "torch": torch.__version__,
            },
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
