"""A stand-in for the Hugging Face Hub API on 127.0.0.1, for tests (no network).

It answers the requests that huggingface_hub (2.x, with ``HF_HUB_DISABLE_XET=1``) makes for
``create_repo``, ``upload_folder`` (preupload, the LFS batch API with "basic" transfers, the
ndjson commit) and ``hf_hub_download`` / ``snapshot_download`` (repo info, HEAD and GET of
``/<repo>/resolve/<revision>/<path>``), keeping repositories in memory. Point the library at
it with ``HF_ENDPOINT=http://127.0.0.1:<port>``. Each request is recorded in ``requests`` as
(method, path) and each README.md metadata block it validated, so a test can tell what the client really did; anything else is a 404 that
the test sees as a failure.

    with HubStandIn() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "test-token"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # newest last
    commit_messages: list[str] = field(default_factory=list)


class HubStandIn:
    """In-memory Hub on a free 127.0.0.1 port; a context manager that serves from a thread."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content uploaded by PUT
        self.requests: list[tuple[str, str]] = []
        self.authorization: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet in tests
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_PUT(self) -> None:
                hub._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- dispatch -----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((method, path))
        self.authorization.append(h.headers.get("Authorization"))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        routes = [
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                handler(h, method, body, **{k: v for k, v in match.groupdict().items() if v is not None})
                return
        self._send(h, 404, {"error": f"stand-in has no route for {method} {path}"})

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        status: int,
        obj: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        head_only: bool = False,
    ) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head_only:
            h.wfile.write(data)

    def _repo(self, h: BaseHTTPRequestHandler, repo: str) -> Repo | None:
        if repo not in self.repos:
            self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        return self.repos[repo]

    # ---- endpoints ----------------------------------------------------------------------

    def _create(self, h: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        if repo_id in self.repos:
            self._send(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            return
        self.repos[repo_id] = Repo(
            commits=[hashlib.sha1(repo_id.encode()).hexdigest()], commit_messages=["initial commit"]
        )
        self._send(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, h: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        # The Hub checks a README's metadata block; the stand-in checks that it is YAML.
        content = json.loads(body)["content"]
        block = content.split("---")[1] if content.startswith("---") else ""
        try:
            yaml.safe_load(block)
        except yaml.YAMLError as e:
            self._send(h, 400, {"errors": [{"message": str(e)}]})
            return
        self._send(h, 200, {"errors": [], "warnings": []})

    def _info(self, h: BaseHTTPRequestHandler, method: str, body: bytes, repo: str, rev: str = "main") -> None:
        found = self._repo(h, repo)
        if found is not None:
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(found.files.items())]
            self._send(
                h, 200, {"id": repo, "modelId": repo, "sha": found.commits[-1], "siblings": siblings, "private": False}
            )

    def _preupload(self, h: BaseHTTPRequestHandler, method: str, body: bytes, repo: str, rev: str) -> None:
        if self._repo(h, repo) is not None:
            files = json.loads(body)["files"]
            # The Hub stores binary files (and large ones) with LFS: safetensors goes that way.
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for f in files
            ]
            self._send(h, 200, {"files": modes})

    def _lfs_batch(self, h: BaseHTTPRequestHandler, method: str, body: bytes, repo: str) -> None:
        request = json.loads(body)
        objects = [
            {
                "oid": o["oid"],
                "size": o["size"],
                "authenticated": True,
                "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}},
            }
            for o in request["objects"]
            if o["oid"] not in self.lfs
        ]
        self._send(h, 200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, h: BaseHTTPRequestHandler, method: str, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            self._send(h, 400, {"error": "content does not match its oid"})
            return
        self.lfs[oid] = body
        self._send(h, 200, {})

    def _commit(self, h: BaseHTTPRequestHandler, method: str, body: bytes, repo: str, rev: str) -> None:
        found = self._repo(h, repo)
        if found is None:
            return
        files: dict[str, bytes] = {}
        message = ""
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value.get("summary", "")
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    self._send(h, 400, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                files[value["path"]] = self.lfs[value["oid"]]
            else:
                self._send(h, 400, {"error": f"stand-in does not handle commit operation {item['key']}"})
                return
        found.files.update(files)
        found.commits.append(hashlib.sha1(b"".join([found.commits[-1].encode(), *files.values()])).hexdigest())
        found.commit_messages.append(message)
        self._send(
            h,
            200,
            {
                "commitUrl": f"{self.url}/{repo}/commit/{found.commits[-1]}",
                "commitOid": found.commits[-1],
                "pullRequestUrl": None,
            },
        )

    def _resolve(self, h: BaseHTTPRequestHandler, method: str, body: bytes, repo: str, rev: str, file: str) -> None:
        found = self._repo(h, repo)
        if found is None:
            return
        if file not in found.files:
            self._send(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        data = found.files[file]
        headers = {"X-Repo-Commit": found.commits[-1], "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(h, 200, raw=data, headers=headers, head_only=method == "HEAD")
