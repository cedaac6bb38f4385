"""HTTP load for the cluster tests' drivers (they run as `python -c DRIVER` from the repository root and
import this from tests/): clients that send one completion request after another until stopped."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request


def start_clients(port: int, n: int, max_tokens: int, outcome, stop: threading.Event, timeout: float = 120,
                  daemon: bool = False) -> list[threading.Thread]:
    """`n` threads POSTing /v1/completions for model `tiny` on 127.0.0.1:`port` until `stop` is set; each
    request ends in `outcome(code, sent)`: 200 with a completion, an HTTP error status, or the exception's name;
    `sent` is the `time.time()` it was sent at."""
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0}).encode()

    def loop():
        while not stop.is_set():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            sent = time.time()
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    code = r.status
                    assert json.loads(r.read())["choices"][0]["text"] is not None
            except urllib.error.HTTPError as e:
                code = e.code
            except Exception as e:  # noqa: BLE001 - any failure is an outcome the test counts
                code = type(e).__name__
            outcome(code, sent)

    threads = [threading.Thread(target=loop, daemon=daemon) for _ in range(n)]
    for th in threads:
        th.start()
    return threads
