"""A local HTTP server for the crawler tests and bench: serves ``tests/crawl_site`` plus dynamic misbehaviour.

Routes besides the static files: ``/redirect`` (301 → /about.html), ``/loop-a`` ⇄ ``/loop-b`` (a redirect loop),
``/error500`` (always 500), ``/slow`` (answers after ``slow_s`` seconds), ``/huge`` (``huge_bytes`` of HTML),
``/huge-stream`` (the same without a Content-Length), ``/photo.png`` (an image), ``/gz`` (gzip-encoded),
``/calendar/YYYY/MM/`` (infinite previous/next month links), ``/trap/a/…`` (links to ever deeper ``a/`` paths),
``/garbage`` (bytes that are not HTTP), ``/truncated`` (closes mid-body), ``/gen/N`` (bench pages, each linking to
``fanout`` others).  Every request is logged with its arrival time.

    with SiteServer() as site:
        site.url("/")  # http://127.0.0.1:PORT/
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SITE = Path(__file__).parent / "crawl_site"
TYPES = {".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8", ".json": "application/json",
         ".xml": "application/xml"}


class SiteServer:
    def __init__(self, robots: str | None = None, slow_s: float = 3.0, huge_bytes: int = 3_000_000,
                 gen_pages: int = 0, fanout: int = 5, robots_status: int = 200, gen_delay_s: float = 0.0) -> None:
        self.robots = robots
        self.robots_status = robots_status
        self.gen_delay_s = gen_delay_s
        self.inflight = 0
        self.max_inflight = 0  # most requests the server was answering at once
        self.slow_s = slow_s
        self.huge_bytes = huge_bytes
        self.gen_pages = gen_pages
        self.fanout = fanout
        self.log: list[tuple[float, str, str]] = []  # (arrival time, path, user agent)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.log.append((time.time(), self.path, self.headers.get("User-Agent", "")))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    server.handle(self)
                finally:
                    with server._lock:
                        server.inflight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # a client that hung up (timeouts): quiet
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def hits(self, path: str) -> int:
        return sum(1 for _, p, _ in self.log if p == path)

    def __enter__(self) -> "SiteServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- responses ----------------------------------------------------------------------------------------------------
    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "text/html; charset=utf-8",
             headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        page = lambda title, body: (f"<html><head><title>{title}</title></head><body><h1>{title}</h1>{body}"  # noqa
                                    f"</body></html>").encode()
        if path == "/robots.txt" and self.robots_status != 200:
            return self.send(h, self.robots_status, b"unavailable", "text/plain")
        if path == "/robots.txt" and self.robots is not None:
            return self.send(h, 200, self.robots.encode(), "text/plain")
        if path == "/redirect":
            return self.send(h, 301, b"", headers={"Location": "/about.html"})
        if path in ("/loop-a", "/loop-b"):
            return self.send(h, 302, b"", headers={"Location": "/loop-b" if path == "/loop-a" else "/loop-a"})
        if path == "/error500":
            return self.send(h, 500, page("Server error", "<p>Something broke.</p>"))
        if path == "/slow":
            time.sleep(self.slow_s)
            return self.send(h, 200, page("Slow", "<p>Finally.</p>"))
        if path == "/huge":
            return self.send(h, 200, page("Huge", "<p>" + "word " * (self.huge_bytes // 5) + "</p>"))
        if path == "/gz":
            import gzip

            return self.send(h, 200, gzip.compress(page("Compressed", "<p>Sent with gzip.</p>")),
                             headers={"Content-Encoding": "gzip"})
        if path == "/huge-stream":  # no Content-Length: the crawler must count while it reads
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            try:
                for _ in range(self.huge_bytes // 65536 + 1):
                    h.wfile.write(b"<p>" + b"x" * 65533)
            except OSError:  # the crawler hung up at its limit
                pass
            return
        if path == "/photo.png":
            return self.send(h, 200, b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png")
        m = re.fullmatch(r"/calendar/(\d+)/(\d+)/", path)
        if m:
            y, mo = int(m.group(1)), int(m.group(2))
            nxt = (y + mo // 12, mo % 12 + 1)
            prv = (y - (mo == 1), 12 if mo == 1 else mo - 1)
            return self.send(h, 200, page(f"Events {y}-{mo:02d}", f'<a href="/calendar/{nxt[0]}/{nxt[1]:02d}/">next</a>'
                                          f' <a href="/calendar/{prv[0]}/{prv[1]:02d}/">previous</a>'))
        if path.startswith("/trap/"):
            return self.send(h, 200, page("Archive", '<a href="a/">older</a> <a href="?page=1&amp;sort=asc&amp;'
                                                     'view=list&amp;x=1&amp;y=2&amp;z=3&amp;w=4&amp;v=5&amp;u=6">'
                                                     'filtered</a>'))
        if path == "/garbage":
            h.wfile.write(b"\x00\xff\xfe garbage that is not HTTP \x00\r\n\r\n")
            h.close_connection = True
            return
        if path == "/truncated":
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", "5000")
            h.end_headers()
            h.wfile.write(b"<html><body><p>The beginning of a page that never")
            h.wfile.flush()
            h.close_connection = True
            return
        m = re.fullmatch(r"/gen/(\d+)", path)
        if m and int(m.group(1)) < self.gen_pages:
            n = int(m.group(1))
            time.sleep(self.gen_delay_s)
            links = " ".join(f'<a href="/gen/{(n * self.fanout + k + 1) % self.gen_pages}">p</a>'
                             for k in range(self.fanout))
            return self.send(h, 200, page(f"Page {n}", f"<p>Bench page number {n}.</p>{links}"))
        f = (SITE / path.lstrip("/")).resolve()
        if f.is_dir():
            f = f / "index.html"
        if SITE.resolve() in f.parents and f.is_file() and f.name != "LICENSE.md":
            body = f.read_bytes()
            if f.suffix in (".txt", ".xml"):
                body = body.replace(b"{BASE}", self.base.encode())
            return self.send(h, 200, body, TYPES.get(f.suffix, "application/octet-stream"))
        return self.send(h, 404, page("Not found", "<p>No such page.</p>"))


def main() -> None:
    """``python tests/crawl_server.py --gen-pages N [--robots TEXT] --log FILE``: serve until killed, printing the
    base URL, appending ``time<TAB>host<TAB>path`` per request to FILE (the bench reads it)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--gen-pages", type=int, default=1000)
    ap.add_argument("--fanout", type=int, default=5)
    ap.add_argument("--robots", default=None)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    server = SiteServer(robots=args.robots, gen_pages=args.gen_pages, fanout=args.fanout)
    out = open(args.log, "a", buffering=1)
    handle = server.handle

    def logged(h: BaseHTTPRequestHandler) -> None:
        out.write(f"{time.time():.6f}\t{h.headers.get('Host', '')}\t{h.path}\n")
        handle(h)

    server.handle = logged  # type: ignore[method-assign]
    print(server.base, flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
