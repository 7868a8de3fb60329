"""A local stand-in for the Gemini API on 127.0.0.1, answering the way generativelanguage.googleapis.com does.

It serves `POST /v1beta/models/<model>:generateContent` (and /v1/, the SDK's default version) with the API's
JSON (`candidates[0].content.parts[0].text`) and refuses a key it was not given with the API's 400
INVALID_ARGUMENT. Its verdict is deterministic: "1" when the prompt's predicted answer contains the gold answer
(ignoring case), else "0". Per question it can first answer with a scripted list of faults: an HTTP status (429,
500, 503), "garbage" (a verdict that is not 0 or 1), "empty" (no candidates) or "hang" (answer after
`hang_seconds`, past the client's timeout).
"""

from __future__ import annotations

import http.server
import json
import re
import sys
import threading
import time
from urllib.parse import urlparse

STATUS_NAMES = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def field(prompt: str, name: str) -> str:
    """The value of a `<name>: ...` line of the judge prompt."""
    match = re.search(rf"^{name}: (.*)$", prompt, re.MULTILINE)
    return match.group(1) if match else ""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a killed or timed-out client is expected here
            super().handle_error(request, client_address)


class GeminiStandIn:
    def __init__(self, keys: tuple[str, ...] = ("test-key",), delay: float = 0.0, hang_seconds: float = 2.0):
        self.keys = set(keys)
        self.delay = delay  # seconds before every answer (a slow server, for kill tests)
        self.hang_seconds = hang_seconds
        self.faults: dict[str, list] = {}  # question -> faults to answer with first, in order
        self.requests: list[dict] = []  # every request: model, key, question, prediction, temperature, prompt, fault
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "GeminiStandIn":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def questions(self) -> list[str]:
        """The question of every request so far, in arrival order."""
        with self._lock:
            return [r["question"] for r in self.requests]

    def _handler(self):
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout, or it was killed)

            def error(self, status: int, message: str) -> None:
                self.reply(
                    status,
                    {"error": {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}},
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                path = urlparse(self.path).path
                match = re.fullmatch(r"/v1(?:beta)?/models/([^/:]+):generateContent", path)
                if not match:
                    return self.error(404, f"no route {path}")
                prompt = body["contents"][0]["parts"][0]["text"]
                question, gold, prediction = (field(prompt, n) for n in ("Question", "Gold answer", "Predicted answer"))
                key = self.headers.get("x-goog-api-key")
                with standin._lock:
                    faults = standin.faults.get(question, [])
                    fault = faults.pop(0) if faults else None
                    standin.requests.append(
                        {
                            "model": match.group(1),
                            "key": key,
                            "question": question,
                            "prediction": prediction,
                            "fault": fault,
                            "temperature": body.get("generationConfig", {}).get("temperature"),
                            "prompt": prompt,
                        }
                    )
                time.sleep(standin.delay)
                if key not in standin.keys:
                    return self.error(400, "API key not valid. Please pass a valid API key.")
                if isinstance(fault, int):
                    return self.error(fault, f"stand-in fault {fault}")
                if fault == "hang":
                    time.sleep(standin.hang_seconds)
                if fault == "empty":
                    return self.reply(200, {"candidates": [], "modelVersion": match.group(1)})
                verdict = "maybe?" if fault == "garbage" else "1" if gold.lower() in prediction.lower() else "0"
                self.reply(
                    200,
                    {
                        "candidates": [
                            {
                                "content": {"role": "model", "parts": [{"text": verdict}]},
                                "finishReason": "STOP",
                                "index": 0,
                            }
                        ],
                        "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 1},
                        "modelVersion": match.group(1),
                    },
                )

        return Handler
