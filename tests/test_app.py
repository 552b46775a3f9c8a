"""The page's API through gradio_client against a live server: answers, bad inputs, concurrency."""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from vlm_inspect.data.shapes import ShapesDataset
from vlm_inspect.images import load_image
from vlm_inspect.service import image_digest

ROOT = Path(__file__).resolve().parents[1]


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def call(c, path, **kw):
    from gradio_client import handle_file

    kw.setdefault("steps", 2)
    return c.predict(handle_file(str(path)), api_name="/inspect", **kw)


def test_api_returns_the_report(app_url):
    rep = call(client(app_url), ROOT / "assets" / "shapes_plain_3.png", eps=8.0)
    assert rep["attack"]["eps"] == pytest.approx(8 / 255)
    assert rep["models"]["shapes-clip"]["clean"]["zero_shot"]["labels"][0] == "purple triangle"
    assert rep["models"]["shapes-vqa"]["clean"]["answer"] == "two"
    json.dumps(rep)


def _bad_files(tmp: Path) -> dict[str, Path]:
    good = (ROOT / "assets" / "shapes_plain_3.png").read_bytes()
    files = {"corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "truncated.png": good[: len(good) // 3],
             "empty.png": b"", "notes.txt": b"this is not an image\n"}
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    Image.new("1", (7000, 7000)).save(tmp / "huge.png")  # 49 megapixels in a few kB
    out["huge.png"] = tmp / "huge.png"
    (tmp / "big.bin.png").write_bytes(np.random.default_rng(0).bytes(3 * 1024 * 1024))  # over the upload cap
    out["big.bin.png"] = tmp / "big.bin.png"
    return out


BAD = [  # (file, extra arguments, words the message must contain)
    # not an image by content or by name: refused by the upload route itself (the sentence is in its
    # body, tests/test_security.py); gradio_client shows the status
    ("corrupt.png", {}, "415 Unsupported Media Type"),
    ("truncated.png", {}, "could not read image 'truncated.png'"),
    ("empty.png", {}, "415 Unsupported Media Type"),
    ("notes.txt", {}, "415 Unsupported Media Type"),
    ("huge.png", {}, "megapixels"),
    ("big.bin.png", {}, "size"),
    (None, {"eps": 99.0}, "epsilon (k/255) must be from 0 to 32"),
    (None, {"steps": 0}, "steps must be from 1 to 100"),
    (None, {"classes": "red circle"}, "at least two class names"),
    (None, {"baseline_vqa": "none", "defended_vqa": "none", "question": "what shape is it?"}, "no VQA model is selected"),
    (None, {"baseline_clip": "no-such-model"}, "model 'no-such-model' is not offered by this server"),
    (None, {"attack": "cw"}, "unknown attack 'cw'"),
    (None, {"target": "caption", "baseline_captioner": "none", "defended_captioner": "none"},
     "no captioner model is selected"),
]


def test_bad_inputs_get_a_message_and_the_server_keeps_serving(app_url, tmp_path):
    files = _bad_files(tmp_path)
    c = client(app_url)
    good = ROOT / "assets" / "shapes_plain_11.png"
    for name, extra, words in BAD:
        with pytest.raises(Exception) as info:
            call(c, files[name] if name else good, **extra)
        assert words.lower() in str(info.value).lower(), (name, extra, str(info.value))
        assert "Traceback" not in str(info.value)
        assert "''" not in str(info.value) and "the uploaded file" not in str(info.value)  # the old garbled names
        rep = call(c, good, steps=1)  # still answering
        assert rep["models"]["shapes-clip"]["clean"]["zero_shot"]["labels"]


def test_concurrent_clients_get_their_own_answers(app_url, tmp_path):
    ds = ShapesDataset("shapes-scenes", split="test", length=200, image_size=96)
    paths = []
    for i in range(40):
        p = tmp_path / f"scene_{i}.png"
        Image.fromarray(ds.image(i)).save(p)
        paths.append(p)
    expected = {str(p): image_digest(load_image(p)) for p in paths}
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        c = client(app_url)
        for j in range(5):
            p = paths[k * 5 + j]
            try:
                results[str(p)] = call(c, p, steps=1, eps=float(k))
            except BaseException as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert len(results) == 40
    for path, rep in results.items():
        k = int(Path(path).stem.split("_")[1]) // 5
        assert rep["image"]["sha256_16"] == expected[path]
        assert rep["attack"]["eps_k255"] == k


def test_readme_api_example_runs_against_the_app(app_url):
    import re

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "gradio_client" in b)
    assert "http://127.0.0.1:7860/" in block
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block.replace("http://127.0.0.1:7860/", app_url), "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["report"]["attack"]["eps_k255"] == 8


def test_app_py_launches_on_localhost_only(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200 and "vlm_inspect" in r.read().decode()
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
        else:
            pytest.fail("app.py did not answer within 180 s")
        with socket.socket() as s:  # bound to 127.0.0.1, not to every interface
            s.settimeout(2)
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert s.connect_ex((other, port)) != 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_api_typographic_and_patch_attacks(app_url, tmp_path):
    """The attacks without an epsilon through the API: a word written, an uploaded patch applied, and a
    bad setting refused in one sentence."""
    from gradio_client import handle_file

    c = client(app_url)
    scene = ROOT / "assets" / "shapes_plain_3.png"
    rep = call(c, scene, attack="typographic", word="red star", colour="#ff0000", position="top-left")
    assert rep["attack"]["eps"] is None and rep["attack"]["threat"]["word"] == "red star"
    assert rep["perturbation"]["sides"]["baseline"]["position"] == "top-left"
    patch = tmp_path / "patch.png"
    Image.fromarray(np.full((8, 8, 3), (0, 255, 0), dtype=np.uint8)).save(patch)
    rep = call(c, scene, attack="patch", patch=handle_file(str(patch)), patch_side=0.25, position="centre")
    assert rep["attack"]["threat"]["patch"] == "given" and rep["perturbation"]["sides"]["defended"]["area"] == 0.0625
    with pytest.raises(Exception, match="cannot be found among the fonts"):
        call(c, scene, attack="typographic", word="dog", font="Nope")
