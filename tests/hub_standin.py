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

It also takes uploads to model repos the way huggingface_hub 2.4 makes them. POST /api/repos/create (409 for a repo
that exists; a repo is private if asked, else `private_by_default`), GET /api/models/<repo> (its info, private or
not), POST /api/models/<repo>/preupload/<rev> (which files go inline in the commit and which to large-file storage:
*.safetensors and files of at least `lfs_min_size` bytes), then the large files by one of two protocols:
- LFS (huggingface_hub's choice without hf_xet, or with HF_HUB_DISABLE_XET): POST /<repo>.git/info/lfs/objects/batch
  answers, for each object the storage lacks, an upload URL on the second server (standing in for S3 here), signed,
  that wants no token, or one per part when `lfs_part_size` is set, then joined by POST /api/complete_multipart on
  the hub (signed too); PUT to those URLs stores the bytes; POST /<repo>.git/info/lfs/objects/verify checks them.
- Xet (huggingface_hub's choice whenever hf_xet is installed): GET /api/models/<repo>/xet-write-token/<rev> hands
  out `xet_token` and the storage's URL (the second server again, as the CAS), which takes that token only, and
  keeps the xorbs and shards hf_xet sends it (/v1/xorbs/..., /v1/shards; no dedup, no grants, no v2 shards).
Last, POST /api/models/<repo>/commit/<rev> (NDJSON: a header, base64 files, LFS pointers, deletions) records the
commit in `commits`; the files then read back through /<repo>/resolve/<rev>/<path> (those sent with Xet excepted:
the stand-in takes their pointers on trust and cannot decode xorbs). Writes want `token` where it is set (else 401
"Invalid credentials ..."), refuse a token in `readers` (403) and anonymous ones (401).
"""

from __future__ import annotations

import base64
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
        # Model repos, written by uploads: repo id -> revision -> path -> content, and which are private.
        self.models: dict[str, dict[str, dict[str, bytes]]] = {}
        self.private: dict[str, bool] = {}
        self.private_by_default = False  # what a repo created without a visibility is (an organization's policy)
        self.user = "standin-user"  # the namespace of a repo created without one
        self.readers: set[str] = set()  # tokens that may read but not write
        self.lfs_min_size = 1024  # the preupload answer: files this big, or *.safetensors, go to LFS
        self.lfs_part_size: int | None = None  # LFS objects bigger than this go up in parts of this size
        self.storage_refuses: int | None = None  # an HTTP status the storage answers every upload with
        self.stored: dict[str, bytes] = {}  # LFS oid (sha256) -> content the storage holds
        self.verified: set[str] = set()  # LFS oids the hub verified after their upload
        self._parts: dict[str, dict[int, bytes]] = {}  # oid -> part number -> content, until completed
        # Every commit: (repo, summary, path -> sha256 of its new content, None where deleted).
        self.commits: list[tuple[str, str, dict[str, str | None]]] = []
        # Xet: the hub hands out this short-lived token for its storage (the CAS, on the second server), which
        # keeps the xorbs and shards it is sent.
        self.xet_token = "xet_standin_short_lived_token"
        self.xorbs: dict[str, bytes] = {}
        self.shards: list[bytes] = []
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

    def holds(self, oid: str) -> bool:
        """Whether the storage holds the LFS object `oid`, whole (its sha256 is its name)."""
        return oid in self.stored and hashlib.sha256(self.stored[oid]).hexdigest() == oid

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

            def reply(self, body: object, status: int = 200, content_type: str = "application/json") -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def read_body(self) -> bytes:
                """The request's body, sent with a length or in chunks (a streamed file upload)."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()  # the blank line after the last (empty) chunk
                return b"".join(chunks)

            def do_HEAD(self):
                self.route()

            def do_GET(self):
                self.route()

            def do_POST(self):
                self.route()

            def do_PUT(self):
                self.route()

            def route(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                server = "http://%s:%d" % self.server.server_address
                hub.received.append((server, self.command, path, {k.lower(): v for k, v in self.headers.items()}))
                self.body = self.read_body() if self.command in ("POST", "PUT") else b""
                if self.server is hub._cdn:
                    if path.startswith(("/v1/", "/v2/")):
                        return self.cas(path)
                    if self.command == "PUT":
                        return self.store(path, url.query)
                    return self.blob(path.rsplit("/", 1)[-1], url.query)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[0] not in ("datasets", "api") or parts[:2] == ["api", "models"] or self.command == "POST":
                    return self.model_route(path, parts, url.query)
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
                files = self.lookup(repo, parts[at + 1])
                if files is not None:
                    self.file(files, parts[at + 1], "/".join(parts[at + 2 :]))

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

            def file(self, files, revision, name):
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

            # Uploads to model repos, and reading them back.

            def model_route(self, path: str, parts: list[str], query: str):
                if (self.command, path) == ("POST", "/api/repos/create"):
                    return self.create()
                if (self.command, path) == ("POST", "/api/complete_multipart"):
                    return self.complete(query)
                if self.command == "POST" and ".git/info/lfs/objects/" in path:
                    repo, _, action = path.strip("/").partition(".git/info/lfs/objects/")
                    return self.lfs(repo, action)
                if parts[:2] == ["api", "models"] and len(parts) >= 4:  # /api/models/<ns>/<name>[/<action>/<rev>]
                    repo, action = "/".join(parts[2:4]), parts[4:6]
                    if self.command == "GET" and action[:1] in ([], ["revision"]):
                        return self.info(repo, parts[5] if len(parts) > 5 else "main")
                    if self.command == "POST" and len(action) == 2 and action[0] in ("preupload", "commit"):
                        return (self.preupload if action[0] == "preupload" else self.commit)(repo, action[1])
                    if self.command == "GET" and len(action) == 2 and action[0] == "xet-write-token":
                        return self.xet_write_token(repo, action[1])
                if self.command in ("GET", "HEAD") and len(parts) > 4 and parts[2] == "resolve":
                    files = self.model("/".join(parts[:2]), parts[3])
                    return None if files is None else self.file(files, parts[3], "/".join(parts[4:]))
                return self.refuse(404, "NotFound", f"no route {self.command} {path}")

            def bearer(self) -> str | None:
                return self.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None

            def writer(self) -> bool:
                """Whether the request carries a token that may write; else refuse it the way the hub does."""
                given = self.bearer()
                if given is None:
                    self.refuse(401, None, "Invalid username or password.")
                elif given in hub.readers:
                    self.refuse(403, None, "You don't have the rights to write to this repo: your token is read-only")
                elif hub.token and given != hub.token:
                    self.refuse(401, None, "Invalid credentials in Authorization header")
                else:
                    return True
                return False

            def model(self, repo: str, revision: str, write: bool = False):
                """A model repo's files at `revision`, for a reader (or a writer); else a refusal and None."""
                given = self.bearer()
                if write and not self.writer():
                    return None
                if given and hub.token and given not in (hub.token, *hub.readers):
                    return self.refuse(401, None, "Invalid credentials in Authorization header")
                if repo not in hub.models or ((hub.private[repo] or hub.token) and not given):
                    return self.refuse(404 if given else 401, "RepoNotFound", f"Repository not found: {repo}")
                if revision not in hub.models[repo]:
                    return self.refuse(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return hub.models[repo][revision]

            def create(self):
                if not self.writer():
                    return
                asked = json.loads(self.body)
                if asked.get("type", "model") != "model":
                    return self.refuse(400, None, "the stand-in creates model repos only")
                repo = f"{asked.get('organization') or hub.user}/{asked['name']}"
                url = f"{hub.url}/{repo}"
                if repo in hub.models:
                    return self.reply({"error": "You already created this model repo", "url": url}, 409)
                hub.models[repo] = {"main": {}}
                visibility = asked.get("visibility") or {True: "private", False: "public"}.get(asked.get("private"))
                hub.private[repo] = visibility == "private" if visibility else hub.private_by_default
                self.reply({"url": url, "name": repo, "id": hashlib.sha1(repo.encode()).hexdigest()[:24]})

            def info(self, repo: str, revision: str):
                files = self.model(repo, revision)
                if files is not None:
                    siblings = [{"rfilename": path} for path in sorted(files)]
                    self.reply({"id": repo, "private": hub.private[repo], "siblings": siblings})

            def preupload(self, repo: str, revision: str):
                if self.model(repo, revision, write=True) is None:
                    return
                files = json.loads(self.body)["files"]
                lfs = [f["path"].endswith(".safetensors") or f["size"] >= hub.lfs_min_size for f in files]
                answer = [
                    {"path": f["path"], "uploadMode": "lfs" if big else "regular", "shouldIgnore": False}
                    for f, big in zip(files, lfs)
                ]
                self.reply({"files": answer})

            def lfs(self, repo: str, action: str):
                if self.model(repo, "main", write=True) is None:
                    return
                asked = json.loads(self.body)
                if action == "verify":
                    oid, size = asked["oid"], asked["size"]
                    if not hub.holds(oid) or len(hub.stored[oid]) != size:
                        return self.refuse(404, None, f"Object {oid} not found in storage")
                    hub.verified.add(oid)
                    return self.reply({"oid": oid, "size": size})
                if action != "batch" or asked.get("operation") != "upload":
                    return self.refuse(404, "NotFound", f"no LFS action {action}")
                objects = []
                for obj in asked["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if not hub.holds(obj["oid"]):  # the storage lacks it: where to put it, and how to check it
                        verify = {"href": f"{hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}}
                        entry["actions"] = {"upload": self.upload_to(obj["oid"], obj["size"]), "verify": verify}
                    objects.append(entry)
                self.reply({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

            def upload_to(self, oid: str, size: int) -> dict:
                """Signed URLs on the storage server: one, or one per part plus the hub's completion URL."""
                if not hub.lfs_part_size or size <= hub.lfs_part_size:
                    return {"href": f"{hub.cdn_url}/uploads/{oid}?X-Amz-Signature={signature(f'upload/{oid}')}"}
                count = -(-size // hub.lfs_part_size)
                header = {"chunk_size": str(hub.lfs_part_size)}
                for n in range(1, count + 1):
                    header[str(n)] = f"{hub.cdn_url}/uploads/{oid}/{n}?X-Amz-Signature={signature(f'upload/{oid}/{n}')}"
                complete = f"{hub.url}/api/complete_multipart?uploadId={oid}&sig={signature(f'complete/{oid}')}"
                return {"href": complete, "header": header}

            def store(self, path: str, query: str):
                """The storage server takes a PUT to a URL the hub signed (no token): a whole object or one part."""
                key = path.strip("/").split("/")  # uploads/<oid>[/<part>]
                signed = parse_qs(query).get("X-Amz-Signature") == [signature("/".join(["upload", *key[1:]]))]
                if key[0] != "uploads" or not signed:
                    return self.refuse(403, None, "AccessDenied: bad or missing signature")
                if hub.storage_refuses:
                    return self.refuse(hub.storage_refuses, None, "AccessDenied: Request has expired")
                if len(key) == 3:
                    hub._parts.setdefault(key[1], {})[int(key[2])] = self.body
                else:
                    hub.stored[key[1]] = self.body
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.md5(self.body).hexdigest()}"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def complete(self, query: str):
                """The hub joins an object's parts; the URL's signature stands for a token (none is sent)."""
                oid = parse_qs(query).get("uploadId", [""])[0]
                if parse_qs(query).get("sig") != [signature(f"complete/{oid}")]:
                    return self.refuse(403, None, "bad or missing signature")
                parts = hub._parts.pop(oid, {})
                asked = json.loads(self.body)["parts"]
                if [(p["partNumber"], p["etag"].strip('"')) for p in asked] != [
                    (n, hashlib.md5(parts[n]).hexdigest()) for n in sorted(parts)
                ]:
                    return self.refuse(400, None, "the parts do not match what was uploaded")
                hub.stored[oid] = b"".join(parts[n] for n in sorted(parts))
                self.reply({"oid": oid})

            def commit(self, repo: str, revision: str):
                files = self.model(repo, revision, write=True)
                if files is None:
                    return
                files, summary, changes = dict(files), "", {}
                for line in self.body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        summary = value["summary"]
                    elif key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                        changes[value["path"]] = hashlib.sha256(files[value["path"]]).hexdigest()
                    elif key == "lfsFile" and hub.holds(value["oid"]):
                        files[value["path"]] = hub.stored[value["oid"]]
                        changes[value["path"]] = value["oid"]
                    elif key == "lfsFile" and hub.shards:
                        # Uploaded with Xet: the hub would check the pointer against the shard; the stand-in can
                        # read neither shards nor xorbs, so it takes the pointer on trust, and cannot serve the file.
                        files.pop(value["path"], None)
                        changes[value["path"]] = value["oid"]
                    elif key == "lfsFile":
                        return self.refuse(400, None, f"Your push was rejected: LFS object {value['oid']} is missing")
                    elif key == "deletedFile":
                        files.pop(value["path"])
                        changes[value["path"]] = None
                    elif key == "deletedFolder":
                        folder = value["path"].rstrip("/") + "/"
                        changes.update({p: None for p in files if p.startswith(folder)})
                        files = {p: c for p, c in files.items() if not p.startswith(folder)}
                    else:
                        return self.refuse(400, None, f"unknown commit operation {key}")
                listing = sorted((p, hashlib.sha1(c).hexdigest()) for p, c in files.items())
                oid = hashlib.sha1(json.dumps([repo, revision, len(hub.commits), listing]).encode()).hexdigest()
                hub.models[repo][revision] = hub.models[repo][oid] = files
                hub.commits.append((repo, summary, changes))
                self.reply({"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo}/commit/{oid}"})

            def xet_write_token(self, repo: str, revision: str):
                """The hub hands a writer a short-lived token for its Xet storage, and the storage's URL."""
                if self.model(repo, revision, write=True) is None:
                    return
                expires = int(time.time()) + 3600
                data = json.dumps({"accessToken": hub.xet_token, "exp": expires, "casUrl": hub.cdn_url}).encode()
                self.send_response(200)
                self.send_header("X-Xet-Cas-Url", hub.cdn_url)
                self.send_header("X-Xet-Access-Token", hub.xet_token)
                self.send_header("X-Xet-Token-Expiration", str(expires))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def cas(self, path: str):
                """The Xet storage (CAS), the least of it that hf_xet's uploads need: no chunk is known yet (so
                nothing is deduplicated), no upload grants and no v2 shards (so it uses the plain v1 routes)."""
                if self.headers.get("Authorization") != f"Bearer {hub.xet_token}":
                    return self.refuse(401, None, "the Xet storage wants the token the hub handed out")
                if hub.storage_refuses:
                    return self.refuse(hub.storage_refuses, None, "AccessDenied")
                if self.command == "POST" and path.startswith("/v1/xorbs/"):
                    hub.xorbs[path.rsplit("/", 1)[-1]] = self.body
                    return self.reply({"was_inserted": True})
                if self.command == "POST" and path == "/v1/shards":
                    hub.shards.append(self.body)
                    return self.reply({"result": 1})
                if self.command == "POST" and path == "/v1/telemetry":
                    return self.reply({})
                self.refuse(404, None, f"no route {self.command} {path}")  # chunk queries, grants, /v2/shards

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
