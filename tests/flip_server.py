"""A local stand-in for the FLIP FASTA server, for the download tests; no test touches the internet."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers import SHARED

LAYOUT = SHARED / "data" / "flip" / "fasta_layout"


class FlipServer:
    """Serves fasta_layout the way the FLIP server does: `<folder>/<file>.fasta`, uncompressed."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.tamper = False
        self.delay = 0.0  # seconds before the body
        self.cut: int | None = None  # send no Content-Length and drop this many final bytes
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner.requests.append(self.path)
                rel = self.path.removeprefix("/public/FLIP/fasta/")
                gz = LAYOUT / f"{rel}.gz"
                if not rel.endswith(".fasta") or not gz.is_file():
                    self.send_error(404)
                    return
                body = gzip.decompress(gz.read_bytes())
                if owner.tamper:
                    body = body.replace(b"SET=test", b"SET=train", 1)
                self.send_response(200)
                if owner.cut is None:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    body = body[: len(body) - owner.cut]
                self.end_headers()
                time.sleep(owner.delay)
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/public/FLIP/fasta/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
