"""A fake Hugging Face Hub on 127.0.0.1 for the download tests; no test touches the internet.

It speaks the part of the Hub's HTTP API that huggingface_hub uses to download a model:

    GET  /api/models/{repo}[/revision/{rev}]   repo info: commit sha, siblings with size/blobId/lfs
    HEAD /{repo}/resolve/{rev}/{file}          X-Repo-Commit, ETag (sha256 for LFS), Content-Length
    GET  /{repo}/resolve/{rev}/{file}          the bytes; `Range: bytes=N-` answers 206

and answers errors the way the Hub does (`X-Error-Code`: RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo with 401 without a token and 403 with a token that has no access).
`FakeHub.faults` injects trouble per (repo, file): drop the connection mid-body, answer 503
afterwards, or flip a byte. `FakeHub.requests` logs every request.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TOKEN = "hf_protembed_test_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".h5")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()


@dataclass
class Fault:
    """Trouble for GETs of one file: drop after `drop_after` bytes `drops` times, then `status`."""

    drop_after: int = 0
    drops: int = 0
    status: int | None = None  # answered once the drops are used up (e.g. 503)
    flip: bool = False  # serve the body with one byte changed (same length)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    auth: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    faults: dict[tuple[str, str], Fault] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, repo_id: str) -> list[str]:
        """Files of a repo fetched with GET, in order."""
        prefix = f"/{repo_id}/resolve/"
        return [
            r.path[len(prefix) :].split("/", 1)[1]
            for r in self.requests
            if r.method == "GET" and r.path.startswith(prefix)
        ]


def _checkpoint(name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((FIXTURES / name / "checkpoint").iterdir())}


def _sharded(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same checkpoint as two safetensors shards plus an index, like the 3B and 15B repos."""
    tensors = st_load(files.pop("model.safetensors"))
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for shard, part in zip(names, halves):
        files[shard] = st_save({k: tensors[k] for k in part})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    return files


def default_repos() -> dict[str, Repo]:
    """The fixture checkpoints under their real repo ids, plus repos that exercise each error."""
    extra = {"README.md": b"# model card\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
    esm, amp = _checkpoint("esm2_t3_h64"), _checkpoint("amplify_l3_h64")
    bert_config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64}
    return {
        "facebook/esm2_t6_8M_UR50D": Repo({**esm, **extra, "pytorch_model.bin": b"pickle " * 1000}),
        "chandar-lab/AMPLIFY_120M": Repo(
            {
                **amp,
                **extra,
                "amplify.py": b"raise SystemExit('remote code must never be downloaded')\n",
                "pytorch_model.bin": b"pickle " * 1000,
            }
        ),
        "protembed-test/esm2-gated": Repo(dict(esm), gated=True),
        "protembed-test/esm2-sharded": Repo(_sharded(dict(esm))),
        "protembed-test/bert-tiny": Repo(
            {"config.json": json.dumps(bert_config).encode(), "model.safetensors": b"\0" * 4096}
        ),
        "protembed-test/esm2-truncated": Repo(
            {**esm, "model.safetensors": esm["model.safetensors"][: len(esm["model.safetensors"]) * 3 // 5]}
        ),
    }


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return None

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _reply(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
            payload = json.dumps({"error": message}).encode()
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._reply(status, {**headers, **(extra or {})}, payload, body=self.command == "GET")

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(
                Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
            )
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                self._info("/".join(parts[2:4]), rev)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
            else:
                self._error(404, "RepoNotFound", "Repository not found")

        def _repo(self, repo_id: str, rev: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if rev not in ("main", repo.commit(repo_id)):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo

        def _info(self, repo_id: str, rev: str) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            siblings = []
            for name, data in sorted(repo.files.items()):
                entry: dict = {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}
                if _is_lfs(name):
                    sha = hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
                siblings.append(entry)
            info = {
                "_id": repo.commit(repo_id)[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit(repo_id),
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "lastModified": "2024-01-01T00:00:00.000Z",
                "siblings": siblings,
            }
            self._reply(200, {"Content-Type": "application/json"}, json.dumps(info).encode())

        def _file(self, repo_id: str, rev: str, name: str, body: bool) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            commit = repo.commit(repo_id)
            auth = self.headers.get("Authorization")
            if repo.gated and auth != f"Bearer {TOKEN}":
                no_token, no_access = (401, "You must be authenticated"), (403, "Not in the authorized list")
                status, msg = no_token if auth is None else no_access
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted. {msg}.")
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": commit})
                return
            data = repo.files[name]
            etag = hashlib.sha256(data).hexdigest() if _is_lfs(name) else _git_blob_id(data)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if _is_lfs(name):
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            headers["Content-Type"] = "application/octet-stream"
            if not body:
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return
            fault = hub.faults.get((repo_id, name))
            if fault is not None and fault.flip:
                mid = len(data) // 2
                data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[len("bytes=") : -1])
            if fault is not None and fault.drops == 0 and fault.status is not None:
                self._error(fault.status, "", "Service unavailable")
                return
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            chunk = data[start:]
            if fault is not None and fault.drops > 0:
                fault.drops -= 1
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                self.wfile.write(chunk[: fault.drop_after])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees a short body
                self.close_connection = True
                return
            self._reply(status, headers, chunk)

    return Handler
