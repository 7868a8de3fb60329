"""A local stand-in for the HuggingFace hub on 127.0.0.1, answering the way huggingface.co does.

It serves dataset files at named revisions (HEAD and GET on /datasets/<repo>/resolve/<rev>/<path>, with
Range requests), lists a repo's files and folders (/api/datasets/<repo>/tree/<rev>, the top level or, with
?recursive=true, all), refuses with the hub's error codes (401 GatedRepo without the right token, 404
RepoNotFound / RevisionNotFound / EntryNotFound), and answers a renamed repo with a relative 307 to its new
name. Large files go the way the hub sends its LFS files: their resolve URL answers 302 to a signed URL on a
CDN, a second server on another loopback port that wants no token (X-Linked-Size and X-Linked-Etag carry the
file's size and etag). Either server can drop a connection part way through a file (once or every time) or
stall there, and the hub can answer a file with a server error. Every request is recorded with its headers.
tests/published_hub.py holds the benchmark's two repos as published.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from urllib.parse import parse_qs, unquote, urlparse


def signature(blob: str) -> str:
    """The CDN's stand-in for a signed URL's signature: only the hub's redirect knows it."""
    return hashlib.sha1(f"standin-cdn:{blob}".encode()).hexdigest()


class HubStandIn:
    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]], token: str | None = None):
        self.repos = repos  # repo id -> revision -> path -> content
        self.token = token  # if set, every request to the hub must carry it (the CDN never asks for it)
        self.moved: dict[str, str] = {}  # old repo id -> new one: the hub redirects the old name (307)
        self.cdn_min_size: int | None = None  # files of at least this many bytes are served by the CDN
        self.cut = {}  # path -> bytes sent before the connection drops (once)
        self.broken = {}  # path -> bytes sent before the connection drops (every time)
        self.stall = {}  # path -> bytes sent before the transfer hangs (every time, until cleared)
        self.fail = {}  # path -> HTTP status the hub answers for it, HEAD and GET (every time)
        self.requests: list[tuple[str, str, str | None]] = []  # the hub's: (method, path, Range header)
        # Every request to the hub or its CDN: (server url, method, path, headers with lower-case names).
        self.received: list[tuple[str, str, str, dict[str, str]]] = []
        self._blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (path, content) the CDN holds
        self._server, self.url = self._serve()
        self._cdn, self.cdn_url = self._serve()

    def _serve(self) -> tuple[http.server.ThreadingHTTPServer, str]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    def __enter__(self) -> "HubStandIn":
        for server in (self._server, self._cdn):
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
        return self

    def __exit__(self, *exc) -> None:
        self.stall.clear()
        for server in (self._server, self._cdn):
            server.shutdown()
            server.server_close()

    def _stop_at(self, name: str, size: int) -> int:
        """Where a transfer of `name` stops: a stall, a broken file, a one-time cut, else its end."""
        for stops in (self.stall, self.broken):
            if name in stops:
                return stops[name]
        return self.cut.pop(name, size)

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def refuse(self, status: int, code: str | None, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def redirect(self, status: int, location: str, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Location", location)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

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
                server = "http://%s:%d" % self.server.server_address
                hub.received.append((server, self.command, path, {k.lower(): v for k, v in self.headers.items()}))
                if self.server is hub._cdn:
                    return self.blob(path.rsplit("/", 1)[-1], url.query)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                listing = parts[:2] == ["api", "datasets"] and "tree" in parts
                if not listing and not (parts[0] == "datasets" and "resolve" in parts):
                    return self.refuse(404, "NotFound", f"no route {path}")
                at = parts.index("tree" if listing else "resolve")  # the repo id is what comes before
                repo = "/".join(parts[2 if listing else 1 : at])
                if repo in hub.moved:  # the hub keeps a renamed repo's old URLs working, on itself
                    return self.redirect(307, self.path.replace(repo, hub.moved[repo], 1), {})
                if listing:
                    recursive = parse_qs(url.query).get("recursive") in (["True"], ["true"])
                    return self.tree(repo, parts[at + 1], recursive)
                return self.file(repo, parts[at + 1], "/".join(parts[at + 2 :]))

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
                if name in hub.fail:
                    return self.refuse(hub.fail[name], None, "Internal Error - We're working hard to fix this")
                content = files[name]
                commit = {"X-Repo-Commit": hashlib.sha1(revision.encode()).hexdigest()}
                if hub.cdn_min_size is None or len(content) < hub.cdn_min_size:
                    return self.send(name, content, commit)
                blob = hashlib.sha256(content).hexdigest()
                hub._blobs[blob] = (name, content)
                linked = {"X-Linked-Etag": f'"{blob}"', "X-Linked-Size": str(len(content))}
                location = f"{hub.cdn_url}/blobs/{blob}?X-Amz-Signature={signature(blob)}"
                self.redirect(302, location, {**commit, **linked, "ETag": f'"{hashlib.sha1(content).hexdigest()}"'})

            def blob(self, blob, query):
                if parse_qs(query).get("X-Amz-Signature") != [signature(blob)]:
                    return self.refuse(403, None, "AccessDenied: bad or missing signature")
                if blob not in hub._blobs:
                    return self.refuse(404, None, "NoSuchKey")
                self.send(*hub._blobs[blob], {})

            def send(self, name: str, content: bytes, headers: dict[str, str]) -> None:
                """`content` from the Range's start, stopping early where the test asked for it."""
                start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("Content-Length", str(len(content) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                stop = hub._stop_at(name, len(content))
                self.wfile.write(content[start : max(start, stop)])
                self.wfile.flush()
                while name in hub.stall:  # hang mid-file until the test ends
                    time.sleep(0.05)
                if stop < len(content):
                    self.close_connection = True
                    return
                self.wfile.write(content[max(start, stop) :])

        return Handler
