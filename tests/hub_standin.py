"""A local stand-in for the HuggingFace hub on 127.0.0.1, answering the way huggingface.co does.

It serves dataset files at named revisions (HEAD and GET on /datasets/<repo>/resolve/<rev>/<path>, with
Range requests), lists a repo's files and folders (/api/datasets/<repo>/tree/<rev>, the top level or, with
?recursive=true, all), refuses with the hub's error codes (401 GatedRepo without the right token, 404
RepoNotFound / RevisionNotFound / EntryNotFound), and can drop a connection part way through a file or
stall there, to interrupt a transfer. tests/published_hub.py holds the benchmark's two repos as published.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from urllib.parse import parse_qs, unquote, urlparse


class HubStandIn:
    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]], token: str | None = None):
        self.repos = repos  # repo id -> revision -> path -> content
        self.token = token  # if set, every request must carry it
        self.cut = {}  # path -> bytes sent before the connection drops (once)
        self.stall = {}  # path -> bytes sent before the transfer hangs (every time, until cleared)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubStandIn":
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
        return self

    def __exit__(self, *exc) -> None:
        self.stall.clear()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def refuse(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def lookup(self, repo: str, revision: str):
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self.refuse(401, "GatedRepo", f"Access to dataset {repo} is restricted.")
                if repo not in hub.repos:
                    return self.refuse(404, "RepoNotFound", f"Repository not found: {repo}")
                if revision not in hub.repos[repo]:
                    return self.refuse(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return hub.repos[repo][revision]

            def do_HEAD(self):
                self.route()

            def do_GET(self):
                self.route()

            def route(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "datasets"] and "tree" in parts:
                    at = parts.index("tree")
                    recursive = parse_qs(url.query).get("recursive") in (["True"], ["true"])
                    return self.tree("/".join(parts[2:at]), parts[at + 1], recursive)
                if parts[0] == "datasets" and "resolve" in parts:
                    at = parts.index("resolve")
                    return self.file("/".join(parts[1:at]), parts[at + 1], "/".join(parts[at + 2 :]))
                self.refuse(404, "NotFound", f"no route {path}")

            def tree(self, repo, revision, recursive):
                files = self.lookup(repo, revision)
                if files is None:
                    return
                # The hub lists folders as entries of their own; without recursive, only the top level.
                folders = {"/".join(p.split("/")[:depth]) for p in files for depth in range(1, p.count("/") + 1)}
                entries = [
                    {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)
                ]
                entries += [
                    {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                    for p, c in sorted(files.items())
                ]
                body = json.dumps([e for e in entries if recursive or "/" not in e["path"]]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def file(self, repo, revision, name):
                files = self.lookup(repo, revision)
                if files is None:
                    return
                if name not in files:
                    return self.refuse(404, "EntryNotFound", f"{name} does not exist on {revision}")
                content = files[name]
                start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hashlib.sha1(revision.encode()).hexdigest())
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("Content-Length", str(len(content) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                stop = hub.stall.get(name, hub.cut.pop(name, len(content)))
                self.wfile.write(content[start : max(start, stop)])
                self.wfile.flush()
                while name in hub.stall:  # hang mid-file until the test ends
                    time.sleep(0.05)
                if stop < len(content):
                    self.close_connection = True
                    return
                self.wfile.write(content[max(start, stop) :])

        return Handler
