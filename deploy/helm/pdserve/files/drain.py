# preStop: drain the router before Kubernetes sends SIGTERM. argv: port, seconds to wait
# for the pod to leave the Service's endpoints, seconds to wait for requests in flight.
import sys
import time
import urllib.request

port, endpoint_delay, timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
time.sleep(endpoint_delay)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as error:
        print(f"drain: router not answering ({error}); stopping", file=sys.stderr)
        break
    in_flight = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("pdserve_requests_in_flight ")
    ]
    if not in_flight:
        print("drain: no pdserve_requests_in_flight gauge; stopping", file=sys.stderr)
        break
    if in_flight[0] == 0:
        break
    time.sleep(1)
