"""The cluster manager replaces a worker that dies: a killed decode actor is restarted and
requests are served again (with the same greedy output) without restarting the router."""

from __future__ import annotations

import os
import signal
import time

import openai

from tests.serving.conftest import Offline, complete, serve, words

RECOVERY_TIMEOUT_S = 180.0


def test_a_killed_decode_worker_is_replaced(local_ray: None, offline: Offline) -> None:
    with serve(["--num-prefill", "1", "--num-decode", "1", "--health-interval-s", "1"]) as server:
        (old,) = [info for info in server.worker_infos.values() if info.role == "decode"]
        content = words(900, 40)
        expected = offline.greedy(offline.completion_ids(content), 6)
        os.kill(old.pid, signal.SIGKILL)

        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            assert time.monotonic() < deadline, "the decode worker was not replaced in time"
            try:
                answer = complete(server.client(timeout_s=60), content, 6, stream=False)
                break
            except (openai.APIStatusError, openai.APIConnectionError):
                time.sleep(0.5)
        answer.check(expected, len(offline.completion_ids(content)))

        new = server.run(lambda: server.backend.cluster.decode[0].info())
        assert new.worker_id == old.worker_id and new.pid != old.pid
