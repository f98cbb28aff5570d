"""A Hugging Face Hub stand-in on loopback that records the upload calls (the Hub cannot be reached here).

It speaks the part of the Hub API huggingface_hub's `whoami`, `create_repo` and `upload_folder` use:
whoami-v2, repos/create, validate-yaml (the card's metadata must parse), preupload (files over 1 MiB or *.safetensors go through LFS), the LFS batch
API with basic transfers (PUTs checked against their sha256) and the NDJSON commit. Point
huggingface_hub at it with HF_ENDPOINT and HF_HUB_DISABLE_XET=1 (the Xet protocol needs a CAS server).
Every call is recorded as (method, path); `repos[repo_id]` holds the committed files and settings.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

LFS_THRESHOLD = 1024 * 1024


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)


class HubServer:
    """`with HubServer(token="hf_x") as hub:` then HF_ENDPOINT=hub.url."""

    def __init__(self, token: str, user: str = "dhad-bot") -> None:
        self.token, self.user = token, user
        self.calls: list[tuple[str, str]] = []
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.unauthorized = 0
        self.validated: list[str] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self  # type: ignore[attr-defined]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="hub-test").start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "hub-test/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.owner  # type: ignore[attr-defined]

    def _send(self, status: int, body: Any = None, content_type: str = "application/json") -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.hub.token}":
            return True
        with self.hub._lock:
            self.hub.unauthorized += 1
        self._send(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _record(self) -> None:
        with self.hub._lock:
            self.hub.calls.append((self.command, self.path.split("?")[0]))

    def _repo(self, parts: list[str]) -> str:
        return f"{parts[2]}/{parts[3]}"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._record()
        if self.path.startswith("/api/whoami-v2"):
            if self._authorized():
                self._send(200, {"type": "user", "name": self.hub.user, "auth": {"accessToken": {"role": "write"}}})
            return
        self._send(404, {"error": f"not served: GET {self.path}"})

    def do_PUT(self) -> None:  # noqa: N802
        self._record()
        data = self._body()
        oid = self.path.rsplit("/", 1)[-1]
        if not self.path.startswith("/lfs-upload/") or hashlib.sha256(data).hexdigest() != oid:
            self._send(400, {"error": "sha256 mismatch or unknown upload"})
            return
        with self.hub._lock:
            self.hub.lfs[oid] = data
        self._send(200)

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        raw = self._body()
        if path.endswith(".git/info/lfs/objects/batch"):  # /{org}/{name}.git/info/lfs/objects/batch
            if not self._authorized():
                return
            request = json.loads(raw)
            objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        "actions": {"upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}"}}}
                       for o in request["objects"] if o["oid"] not in self.hub.lfs]
            self._send(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")
            return
        if not self._authorized():
            return
        if path == "/api/validate-yaml":  # the Hub checks a README's metadata before the commit
            content = json.loads(raw)["content"]
            errors = []
            try:
                front = yaml.safe_load(content.split("---", 2)[1]) if content.startswith("---") else {}
                if not isinstance(front, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except (yaml.YAMLError, IndexError) as error:
                errors.append({"message": f"invalid YAML: {error}"})
            with self.hub._lock:
                self.hub.validated.append(content)
            self._send(400 if errors else 200, {"errors": errors, "warnings": []})
            return
        if path == "/api/repos/create":
            body = json.loads(raw)
            repo_id = f"{body.get('organization') or self.hub.user}/{body['name']}"
            with self.hub._lock:
                exists = repo_id in self.hub.repos
                self.hub.repos.setdefault(repo_id, Repo(private=body.get("visibility", "private" if body.get("private") else "public") == "private"))
            self._send(409 if exists else 200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id}
                       if not exists else {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            return
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(raw)["files"]
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["size"] > LFS_THRESHOLD or f["path"].endswith(".safetensors")
                      else "regular", "shouldIgnore": False} for f in files]
            self._send(200, {"files": modes})
            return
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = self.hub.repos.get(self._repo(parts))
            if repo is None:
                self._send(404, {"error": "Repository not found"})
                return
            lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            commit = {"header": None, "files": []}
            for line in lines:
                value = line["value"]
                if line["key"] == "header":
                    commit["header"] = value
                elif line["key"] == "file":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                    commit["files"].append(value["path"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.hub.lfs:
                        self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                        return
                    repo.files[value["path"]] = self.hub.lfs[value["oid"]]
                    commit["files"].append(value["path"])
            repo.commits.append(commit)
            oid = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
            self._send(200, {"commitUrl": f"{self.hub.url}/{self._repo(parts)}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})
            return
        self._send(404, {"error": f"not served: POST {path}"})
