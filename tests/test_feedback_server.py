"""The labeling server's JSON API in-process (the page itself is driven by a real browser in
test_label_browser.py): answers land in the annotator's file at once, concurrent answers are all kept, bad
requests and bad files are refused without touching anything."""

import json
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from dpojax.cli import main
from dpojax.feedback.labels import read_labels
from dpojax.feedback.rounds import Round, write_round
from dpojax.feedback.server import make_server

PROMPTS = [f"prompt {i}" for i in range(12)]


@pytest.fixture
def round_dir(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (len(PROMPTS), 3, 8, 8, 3)).astype(np.uint8)
    return write_round(tmp_path / "round", Round(PROMPTS, images, {"x": np.zeros((len(PROMPTS), 2))}))


@pytest.fixture
def url(round_dir):
    server = make_server(round_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _call(url, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if response.headers["Content-Type"] == "application/json"
                                     else raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_answers_are_on_disk_when_acknowledged(url, round_dir):
    status, info = _call(f"{url}/api/round")
    assert status == 200 and info["prompts"] == PROMPTS and info["images_per_prompt"] == 3
    assert _call(f"{url}/api/labels/alice") == (200, {"entries": [None] * 12})
    assert not (round_dir / "labels" / "alice.json").exists()  # looking writes nothing

    assert _call(f"{url}/api/labels/alice/4", "PUT", {"scores": [1, 0, -1]}) == (200, {"saved": True, "labeled": 1})
    on_disk = json.loads((round_dir / "labels" / "alice.json").read_text())
    assert on_disk == [None] * 4 + [[1, 0, -1]] + [None] * 7
    _call(f"{url}/api/labels/alice/4", "PUT", {"scores": [0, 0, 1]})
    assert json.loads((round_dir / "labels" / "alice.json").read_text())[4] == [0, 0, 1]
    assert _call(f"{url}/api/round")[1]["annotators"] == ["alice"]

    status, png = _call(f"{url}/images/00013.png")  # prompt 4, image 1
    assert status == 200 and png == (round_dir / "images" / "00013.png").read_bytes()


def test_concurrent_answers_are_all_kept(url, round_dir):
    """Twelve simultaneous answers to different prompts: the lock keeps every read-modify-write whole."""
    def answer(i):
        _call(f"{url}/api/labels/bob/{i}", "PUT", {"scores": [1 if j == i % 3 else -1 for j in range(3)]})

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = read_labels(round_dir)
    assert labels.labeled.all()
    np.testing.assert_array_equal(labels.scores.argmax(axis=1), np.arange(12) % 3)


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/labels/alice/12", {"scores": [1, 0, 0]}, 400, r"prompt index 12 is not in 0..11"),
    ("/api/labels/alice/0", {"scores": [1, 0]}, 400, r"scores must be a list of 3 values from \(-1, 0, 1\)"),
    ("/api/labels/alice/0", {"scores": [1, 0, 0.5]}, 400, r"scores must be a list of 3 values"),
    ("/api/labels/alice/0", {"scores": [True, 0, 0]}, 400, r"scores must be a list of 3 values"),
    ("/api/labels/.hidden/0", {"scores": [1, 0, 0]}, 400, r"annotator name '.hidden' is not allowed"),
    ("/api/labels/alice/x", {"scores": [1, 0, 0]}, 404, r"no such endpoint"),
])
def test_bad_answers_are_refused(url, round_dir, path, body, status, message):
    got_status, payload = _call(url + path, "PUT", body)
    assert got_status == status
    assert re.search(message, payload["error"])
    assert list((round_dir / "labels").iterdir()) == []


def test_unknown_pages_and_images(url):
    assert _call(f"{url}/images/00036.png")[0] == 404
    assert _call(f"{url}/images/../round.json")[0] == 404
    assert _call(f"{url}/nothing")[0] == 404


def test_cli_refuses_bad_rounds_and_label_files(tmp_path, round_dir, capsys):
    assert main(["label", str(tmp_path / "missing")]) == 2
    assert "dpojax label: error: round folder" in capsys.readouterr().err
    bad = round_dir / "labels" / "carol.json"
    bad.write_text(json.dumps([[1, 0, 0]] * 11))  # one prompt short
    assert main(["label", str(round_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "carol.json has 11 entries, the round has 12 prompts" in err and err.count("\n") == 1
    assert bad.read_text() == json.dumps([[1, 0, 0]] * 11)
    assert main(["label", str(round_dir), "--annotator", "a b"]) == 2
    assert "annotator name 'a b' is not allowed" in capsys.readouterr().err
