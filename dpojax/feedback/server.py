"""The labeling web page of a round: ``dpojax label ROUND`` serves it on 127.0.0.1.

A person sees the k images of one prompt, marks good and bad ones, and moves between prompts. Every answer is
one request that rewrites the annotator's label file atomically before it is acknowledged, so the page shows
"saved" only for answers that are on disk, and a killed server loses nothing acknowledged; started again it
reads the files back and the page resumes at the first prompt this annotator has not labeled.
"""

from __future__ import annotations

import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dpojax.feedback import labels
from dpojax.feedback.rounds import RoundInfo, round_info

MARKS = (-1, 0, 1)  # bad, unmarked, good
IMAGE_NAME = re.compile(r"(\d{5})\.png")
MAX_BODY = 1 << 16


class LabelStore:
    """The round's label files behind one lock: each update is read, changed and replaced as a whole."""

    def __init__(self, info: RoundInfo):
        self.info = info
        self._lock = threading.Lock()
        labels.read_labels(info.path)  # every existing file must fit the round before anything is served

    def entries(self, annotator: str) -> labels.Entries:
        with self._lock:
            return labels.load_entries(self.info, annotator)

    def set_prompt(self, annotator: str, prompt: int, scores: list) -> labels.Entries:
        k = self.info.images_per_prompt
        if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < len(self.info.prompts):
            raise ValueError(f"prompt index {prompt!r} is not in 0..{len(self.info.prompts) - 1}")
        if (not isinstance(scores, list) or len(scores) != k
                or any(isinstance(s, bool) or s not in MARKS for s in scores)):
            raise ValueError(f"scores must be a list of {k} values from {MARKS}, got {scores!r}")
        with self._lock:
            entries = labels.load_entries(self.info, annotator)
            entries[prompt] = [int(s) for s in scores]
            labels.write_entries(self.info, annotator, entries)
            return entries


class Handler(BaseHTTPRequestHandler):
    """GET /, /api/round, /api/labels/NAME, /images/NNNNN.png; PUT /api/labels/NAME/PROMPT {"scores": [...]}."""

    server: LabelServer
    server_version = "dpojax-label"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name); requests are not worth a line
        pass

    def do_GET(self):
        parts = self._path_parts()
        info = self.server.store.info
        if parts == []:
            self._send(HTTPStatus.OK, page_html().encode(), "text/html; charset=utf-8")
        elif parts == ["favicon.ico"]:
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif parts == ["api", "round"]:
            self._json({"name": info.path.name, "prompts": info.prompts, "images_per_prompt": info.images_per_prompt,
                        "annotator": self.server.annotator, "annotators": list(labels.annotator_files(info))})
        elif len(parts) == 3 and parts[:2] == ["api", "labels"]:
            self._answer(lambda: {"entries": self.server.store.entries(parts[2])})
        elif len(parts) == 2 and parts[0] == "images" and (match := IMAGE_NAME.fullmatch(parts[1])):
            index = int(match.group(1))
            if index >= len(info.prompts) * info.images_per_prompt:
                return self._json({"error": f"no image {parts[1]}"}, HTTPStatus.NOT_FOUND)
            path = info.image_path(*divmod(index, info.images_per_prompt))
            self._send(HTTPStatus.OK, path.read_bytes(), "image/png")
        else:
            self._json({"error": f"no such page {self.path}"}, HTTPStatus.NOT_FOUND)

    def do_PUT(self):
        parts = self._path_parts()
        if len(parts) != 4 or parts[:2] != ["api", "labels"] or not parts[3].isdigit():
            return self._json({"error": f"no such endpoint PUT {self.path}"}, HTTPStatus.NOT_FOUND)
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > MAX_BODY:
            return self._json({"error": f"Content-Length must be at most {MAX_BODY}"}, HTTPStatus.BAD_REQUEST)
        try:
            body = json.loads(self.rfile.read(int(length)) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return self._json({"error": f"body is not JSON: {err}"}, HTTPStatus.BAD_REQUEST)
        if not isinstance(body, dict):
            return self._json({"error": 'body must be {"scores": [...]}'}, HTTPStatus.BAD_REQUEST)

        def save():
            entries = self.server.store.set_prompt(parts[2], int(parts[3]), body.get("scores"))
            return {"saved": True, "labeled": sum(e is not None for e in entries)}

        self._answer(save)

    def _answer(self, fn):
        try:
            result = fn()
        except (ValueError, OSError) as err:
            return self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        self._json(result)

    def _path_parts(self) -> list[str]:
        return [unquote(p) for p in urlsplit(self.path).path.split("/") if p]

    def _json(self, payload, status=HTTPStatus.OK):
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def page_html() -> str:
    return resources.files("dpojax.feedback").joinpath("label_page.html").read_text(encoding="utf-8")


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: LabelStore, annotator: str | None):
        self.store, self.annotator = store, annotator
        super().__init__(address, Handler)


def make_server(round_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                annotator: str | None = None) -> LabelServer:
    """Check the round and its existing labels, then bind; ``port`` 0 picks a free port."""
    info = round_info(round_dir)
    if annotator is not None:
        labels.check_annotator(annotator)
    return LabelServer((host, port), LabelStore(info), annotator)


def serve(round_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, annotator: str | None = None) -> None:
    server = make_server(round_dir, host=host, port=port, annotator=annotator)
    info = server.store.info
    bound_host, bound_port = server.server_address[:2]
    print(f"labeling {info.path} ({len(info.prompts)} prompts x {info.images_per_prompt} images) at "
          f"http://{bound_host}:{bound_port}/  (Ctrl-C to stop; every answer is saved at once)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
