"""The app served to others, attacked as a remote user would: each test is one hole that was open.

Every server here is launched through ``vlm_inspect.ui.serve.serve``, as ``python app.py`` launches it,
and reached over HTTP on 127.0.0.1 only, through ``gradio_client`` or raw requests.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serve_app
from vlm_inspect.policy import ModelPolicy
from vlm_inspect.service import InspectService

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "assets" / "shapes_plain_3.png"
NOT_OFFERED = "is not offered by this server"
NOT_AN_UPLOAD = "send the image itself as a file upload"


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def call(c, image, **kw):
    from gradio_client import handle_file

    kw.setdefault("steps", 1)
    return c.predict(handle_file(str(image)) if isinstance(image, Path) else image, api_name="/inspect", **kw)


def error_of(fn) -> str:
    with pytest.raises(Exception) as info:
        fn()
    msg = str(info.value)
    assert "Traceback" not in msg and "Internal error" not in msg, msg
    return msg


def raw_call(url: str, image, session: str = "raw", **overrides) -> dict:
    """``/inspect`` over raw HTTP, as an attacker sends it (no client library rewriting the image):
    join the queue, read the event stream to its end; returns the final message."""
    config = httpx.get(url + "config", timeout=30).json()
    fn = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "inspect")
    args = {"attack": "pgd", "eps": 4.0, "steps": 1, "norm": "linf", "step_size": 0.0, "random_start": True,
            "seed": 0, "target": "zero-shot", "classes": "", "template": "", "question": "", "target_text": "",
            "heatmap": "attention", "suite": "embedded", "baseline_clip": "default", "baseline_captioner": "default",
            "baseline_vqa": "default", "defended_clip": "default", "defended_captioner": "default",
            "defended_vqa": "default", "momentum": 0.0, "diversity": 0.0, "crafted_on": "own", "word": "", "text_size": 0.2,
            "colour": "white", "opacity": 1.0, "font": "DejaVuSans-Bold", "position": "auto", "patch_side": 0.2,
            "patch": None, **overrides}
    joined = httpx.post(url + "gradio_api/queue/join", json={"data": [image, *args.values()], "fn_index": fn,
                                                             "session_hash": session, "event_data": None,
                                                             "trigger_id": None}, timeout=30)
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("the event stream ended without an answer")


def upload(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(url + "gradio_api/upload", files=[("files", (name, data))], timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server that allows typed folders in one directory (``allowed``) and any hub name."""
    allowed = tmp_path_factory.mktemp("allowed")
    service = InspectService(model_dirs=[], policy=ModelPolicy.served(model_paths=[allowed], hub=["*"]))
    url, demo = serve_app(service, rate_per_minute=100_000)
    yield url, allowed
    demo.close()


# ---- 1. a server path as the image ----------------------------------------------------------------

def test_a_path_on_the_server_is_never_opened_as_the_image(app_url, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "empty.png").write_bytes(b"")
    probes = [str(SCENE), "/etc/hostname", "/no/such/file.png", str(tmp_path), str(tmp_path / "empty.png"),
              str(fifo), "/dev/stdin", "../../../../etc/hostname",
              {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
              {"path": str(SCENE), "orig_name": "x.png", "meta": {"_type": "gradio.FileData"}}]
    messages = set()
    for i, probe in enumerate(probes):  # a FIFO or /dev/stdin must not block the worker: each call returns
        msg = raw_call(app_url, probe, session=f"probe{i}")
        assert msg["success"] is False, (probe, msg)
        text = str(msg["output"].get("error"))
        if isinstance(probe, dict):  # Gradio itself refuses a file object outside its upload folder
            assert "was not uploaded by a user" in text, text
            text = text.replace(str(Path(probe["path"]).resolve()), "PATH")
        else:
            assert NOT_AN_UPLOAD in text and "Traceback" not in text, (probe, text)
        messages.add(text)
    # one sentence for a path, one for a file object, whatever is or is not there: no filesystem oracle
    assert len(messages) == 2, messages
    c = client(app_url)
    assert NOT_AN_UPLOAD in error_of(lambda: call(c, "/etc/hostname"))  # gradio_client with a plain string
    assert call(c, SCENE)["models"]["shapes-clip"]["clean"]["zero_shot"]["labels"]  # still serving
    # the patch image of the patch attack is held to the same rule as the image
    r = upload(app_url, "scene.png", SCENE.read_bytes())
    image = {"path": r.json()[0], "orig_name": "scene.png", "meta": {"_type": "gradio.FileData"}}
    for i, probe in enumerate(["/etc/hostname", str(SCENE.parent / ".." / "README.md")]):
        msg = raw_call(app_url, image, session=f"patch{i}", attack="patch", patch=probe)
        assert msg["success"] is False and NOT_AN_UPLOAD in str(msg["output"].get("error")), msg


# ---- 2. an uploaded file used as a model ----------------------------------------------------------

def test_an_uploaded_config_is_neither_stored_nor_used_as_a_model(app_url):
    from gradio.utils import get_upload_folder

    cfg = json.dumps({"model_cfg": {"embed_dim": 512, "vision_cfg": {"width": 2048, "layers": 24},
                                    "text_cfg": {"hf_model_name": "someone/anything"}}}).encode()
    r = upload(app_url, "open_clip_config.json", cfg)
    assert r.status_code == 415 and "only images can be uploaded" in r.text
    assert not list(Path(get_upload_folder()).rglob("open_clip_config.json"))  # deleted at once
    # an uploaded image's folder named as a model is refused like any unknown name
    r = upload(app_url, "scene.png", SCENE.read_bytes())
    assert r.status_code == 200
    folder = str(Path(r.json()[0]).parent)
    msg = error_of(lambda: call(client(app_url), SCENE, defended_clip=folder))
    assert NOT_OFFERED in msg


def test_an_allowed_folder_is_checked_before_anything_is_built(served):
    url, allowed = served
    big = allowed / "big-clip"
    big.mkdir()
    (big / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 24, "width": 2048, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 2048, "heads": 16, "layers": 24}}}))
    (big / "open_clip_model.safetensors").write_bytes(b"")
    hub = allowed / "hub-clip"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": {"hf_model_name": "x/y"}}}))
    c = client(url)
    assert "M parameters; this server builds at most 500 M" in error_of(lambda: call(c, SCENE, defended_clip=str(big)))
    assert "fetches parts from the hub or another folder (hf_model_name)" in error_of(lambda: call(c, SCENE, defended_clip=str(hub)))
    outside = allowed / "names-another-folder"  # a vlm_inspect config whose architecture reads elsewhere
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"format": "vlm_inspect-checkpoint-v1", "family": "clip",
                                                     "model": {"builder": "open_clip", "architecture": {
                                                         "open_clip_name": "local-dir:/etc"}}}))
    (outside / "model.safetensors").write_bytes(b"")
    assert "another folder (open_clip_name)" in error_of(lambda: call(c, SCENE, defended_clip=str(outside)))
    huge = allowed / "huge-config"
    huge.mkdir()
    (huge / "config.json").write_text(" " * 2_000_000 + "{}")
    (huge / "model.safetensors").write_bytes(b"")
    assert "this server reads configs of at most" in error_of(lambda: call(c, SCENE, defended_clip=str(huge)))


# ---- 3. typed model names read any directory ------------------------------------------------------

def test_typed_names_outside_the_catalog_all_get_the_same_sentence(app_url, tmp_path):
    real = tmp_path / "a-folder"
    real.mkdir()
    (real / "config.json").write_text("{}")
    c = client(app_url)
    names = [str(real), str(tmp_path / "missing"), "/", "/etc", "../../../../etc", "checkpoints/../../etc",
             str(ROOT / "checkpoints"), "runs/anything", "\x00"]
    messages = {error_of(lambda n=n: call(c, SCENE, defended_clip=n)).replace(repr(n), "NAME") for n in names}
    assert len(messages) == 1 and NOT_OFFERED in messages.pop()


def test_a_base_named_in_a_config_is_held_to_the_same_policy(served, tmp_path):
    """A prompt checkpoint inside the allowed directory whose ``base`` points outside it is refused."""
    from vlm_inspect.checkpoints import FORMAT

    url, allowed = served
    outside = tmp_path / "outside"
    outside.mkdir()
    ckpt = allowed / "prompted"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"format": FORMAT, "family": "clip", "model": {},
                                                  "prompts": {"n": 1}, "base": str(outside)}))
    (ckpt / "model.safetensors").write_bytes(b"")
    msg = error_of(lambda: call(client(url), SCENE, defended_clip=str(ckpt)))
    assert NOT_OFFERED in msg and str(outside) in msg


# ---- 4. hub downloads --------------------------------------------------------------------------------

def test_hub_names_are_refused_without_the_operators_allow_list(app_url):
    msg = error_of(lambda: call(client(app_url), SCENE, defended_clip="hf-hub:someone/robust-clip"))
    assert NOT_OFFERED in msg  # refused before any connection (the test set-up forbids the network anyway)


def test_an_allowed_hub_name_is_size_checked_before_download(monkeypatch, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoSibling

    from vlm_inspect.policy import ModelRefused

    import huggingface_hub

    class Info:
        siblings = [RepoSibling("open_clip_config.json", size=2_000), RepoSibling("open_clip_model.safetensors",
                                                                                     size=9_000_000_000)]

    small = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    config = tmp_path / "open_clip_config.json"
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo, files_metadata=False: Info())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename: str(config))
    policy = ModelPolicy.served(hub=["chs20/*"])
    with pytest.raises(ModelRefused, match="its weights are 9.0 GB; this server downloads at most 2.0 GB"):
        policy.admit("hf-hub:chs20/fare2-clip", set)
    with pytest.raises(ModelRefused, match=NOT_OFFERED):
        policy.admit("hf-hub:elsewhere/fare2-clip", set)
    with pytest.raises(ModelRefused, match=NOT_OFFERED):
        policy.admit("hf-hub:chs20/fare2-clip\n", set)
    # open_clip would fall back to the pickled file: refused
    Info.siblings = [RepoSibling("open_clip_config.json", size=2_000), RepoSibling("a.safetensors", size=10),
                     RepoSibling("open_clip_pytorch_model.bin", size=100_000_000_000)]
    with pytest.raises(ModelRefused, match="with open_clip_model.safetensors weights"):
        policy.admit("hf-hub:chs20/pickled", set)
    Info.siblings = [RepoSibling("open_clip_config.json", size=2_000),
                     RepoSibling("open_clip_model.safetensors", size=600_000_000)]
    config.write_text(json.dumps({"model_cfg": {**small, "text_cfg": {"hf_model_name": "x/y"}}}))
    with pytest.raises(ModelRefused, match="fetches parts from the hub or another folder"):
        policy.admit("hf-hub:chs20/fetches-more", set)
    big = dict(small, vision_cfg=dict(small["vision_cfg"], width=4096, layers=48, head_width=64))
    config.write_text(json.dumps({"model_cfg": big}))
    with pytest.raises(ModelRefused, match="this server builds at most 500 M"):
        policy.admit("hf-hub:chs20/huge-config", set)
    config.write_text(json.dumps({"model_cfg": small}))
    policy.admit("hf-hub:chs20/fare2-clip", set)  # allowed, small and self-contained


# ---- 5. one client holding the server --------------------------------------------------------------

def test_one_client_is_rate_limited_and_a_full_queue_says_try_again():
    url, demo = serve_app(rate_per_minute=4, queue_size=1)
    try:
        for _ in range(4):
            assert upload(url, "scene.png", SCENE.read_bytes()).status_code == 200
        r = upload(url, "scene.png", SCENE.read_bytes())
        assert r.status_code == 429 and "too many requests from your address (at most 4 a minute)" in r.text
        assert int(r.headers["retry-after"]) >= 1
    finally:
        demo.close()

    from gradio_client import handle_file

    args = dict(api_name="/inspect", steps=100, classes=",".join(f"class {i}" for i in range(1000)))

    def outcomes(url: str, n: int) -> list[str]:
        c = client(url)
        jobs = [c.submit(handle_file(str(SCENE)), **args) for _ in range(n)]
        errors = []
        for j in jobs:
            try:
                j.result(timeout=300)
            except Exception as e:  # noqa: BLE001 - collected
                errors.append(str(e))
        return errors

    url, demo = serve_app(rate_per_minute=1000, queue_size=1, jobs_per_client=100)
    try:  # one runs, one waits, the rest find the queue full
        errors = outcomes(url, 4)
        assert any("queue is full" in e.lower() for e in errors), errors
    finally:
        demo.close()
    url, demo = serve_app(rate_per_minute=1000, queue_size=16, jobs_per_client=2)
    try:  # one address cannot fill the queue: past its share it is told to wait
        errors = outcomes(url, 5)
        assert errors and all("429" in e for e in errors), errors
    finally:
        demo.close()


def test_only_the_routes_the_page_needs_take_a_post(app_url):
    """The direct REST routes would skip the queue, its bound and its one worker; recordings and
    component servers would store or hold request bodies without limits."""
    r = upload(app_url, "scene.png", SCENE.read_bytes())
    file = {"path": r.json()[0], "orig_name": "scene.png", "meta": {"_type": "gradio.FileData"}}
    config = httpx.get(app_url + "config", timeout=30).json()
    fn = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "inspect")
    for route in ("gradio_api/api/inspect", "gradio_api/run/inspect", "gradio_api/run/predict"):
        r = httpx.post(app_url + route, json={"data": [file], "fn_index": fn}, timeout=30)
        assert r.status_code >= 400 and "join the queue" in r.text, (route, r.status_code, r.text)
    for route in ("gradio_api/component_server", "gradio_api/vibe-edit", "gradio_api/stream/x", "login"):
        r = httpx.post(app_url + route, json={"data": [file], "fn_index": 0}, timeout=30)
        assert r.status_code == 404 and "does not offer that route" in r.text, (route, r.status_code, r.text)
    r = httpx.post(app_url + "gradio_api/process_recording", files=[("video", ("v.mp4", b"x" * 100_000))])
    assert r.status_code == 404
    r = httpx.post(app_url + "gradio_api/queue/join", content=b"{" + b" " * 2_000_000 + b"}",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "too large" in r.text


def test_an_upload_leaves_nothing_but_its_images(app_url):
    """Parts not named ``files`` and a request Gradio refuses half-way leave nothing in the upload folder."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder())
    before = set(folder.iterdir())
    r = httpx.post(app_url + "gradio_api/upload", files=[("x", ("evil.html", b"<b>" * 9000))], timeout=30)
    assert r.status_code == 200 and r.json() == []
    r = httpx.post(app_url + "gradio_api/upload", files=[("files", ("evil.html", b"<b>" * 9000)),
                                                         ("files", ("..", b"x"))], timeout=30)
    assert r.status_code == 400
    import io

    fresh = io.BytesIO()  # content no earlier test uploaded (Gradio files an upload under its hash)
    Image.fromarray(np.random.default_rng(int(time.time())).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        fresh, format="PNG")
    r = upload(app_url, "fresh.png", fresh.getvalue())
    assert r.status_code == 200
    new = set(folder.iterdir()) - before
    assert new == {Path(r.json()[0]).parent}, new
    many = [("files", (f"s{i}.png", SCENE.read_bytes())) for i in range(5)]
    r = httpx.post(app_url + "gradio_api/upload", files=many, timeout=30)
    assert r.status_code == 413 and "at most 4 files" in r.text
    assert set(folder.iterdir()) - before == new


@pytest.mark.parametrize("field, value, words", [
    ("classes", ",".join(f"c{i}" for i in range(1001)), "at most 1000 classes can be compared at once; got 1001"),
    ("classes", "cat, " + "x" * 101, "a class name has at most 100 characters; one has 101"),
    ("question", "what " * 70, "the question has at most 300 characters"),
    ("target_text", "y" * 301, "the target has at most 300 characters"),
    ("defended_clip", "z" * 10_000, "a model name has at most 300 characters; this one has 10000"),
], ids=["1001-classes", "long-class", "long-question", "long-target", "long-model-name"])
def test_request_sizes_are_capped_with_one_sentence(app_url, field, value, words):
    assert words in error_of(lambda: call(client(app_url), SCENE, **{field: value}))


def test_a_job_whose_client_left_stops_between_attack_steps(caplog):
    """Join the queue over raw HTTP, read until the job starts, hang up: the worker stops within steps."""
    url, demo = serve_app(rate_per_minute=1000)
    try:
        r = upload(url, "scene.png", SCENE.read_bytes())
        file = {"path": r.json()[0], "orig_name": "scene.png", "meta": {"_type": "gradio.FileData"}}
        config = httpx.get(url + "config", timeout=30).json()
        fn = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "inspect")
        classes = ",".join(f"class {i}" for i in range(1000))
        data = [file, "pgd", 8.0, 100, "linf", 0.0, True, 0, "zero-shot", classes, "", "", "", "attention",
                "embedded", "default", "default", "default", "default", "default", "default", 0.0, 0.0, "own",
                "", 0.2, "white", 1.0, "DejaVuSans-Bold", "auto", 0.2, None]
        session = "leaver"
        caplog.set_level(logging.INFO, logger="vlm_inspect.ui.handlers")
        joined = httpx.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                                                 "event_data": None, "trigger_id": None}, timeout=30)
        assert joined.status_code == 200, joined.text
        with httpx.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
            for line in stream.iter_lines():
                if "process_starts" in line:  # the attack is starting: leave
                    break
        deadline = time.time() + 120
        while time.time() < deadline and "stopped after attack step" not in caplog.text:
            time.sleep(0.2)
        stopped = [m for m in caplog.messages if "stopped after attack step" in m]
        assert stopped, caplog.text[-2000:]
        step = int(stopped[0].split("attack step ")[1].split(" of ")[0])
        assert step < 100
        assert call(client(url), SCENE)["models"]  # the worker is free again
    finally:
        demo.close()


# ---- 6. uploads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"this is not an image\n"),
    ("notes.png", b"this is not an image either\n"),       # an image's name, not its content
    ("scene.txt", SCENE.read_bytes()),                     # an image's content, not its name
    ("script.html", b"<script>alert(1)</script>"),
    ("empty.png", b""),
], ids=["text", "text-named-png", "png-named-txt", "html", "empty"])
def test_only_images_are_accepted_as_uploads(app_url, name, data):
    from gradio.utils import get_upload_folder

    r = upload(app_url, name, data)
    assert r.status_code == 415 and "only images can be uploaded (PNG, JPEG, WebP, BMP, GIF or TIFF)" in r.text
    assert repr(name) in r.text
    assert not [p for p in Path(get_upload_folder()).rglob(name) if p.stat().st_mtime > time.time() - 30]


def test_old_uploads_are_deleted_and_a_full_upload_space_says_so(tmp_path):
    from gradio.utils import get_upload_folder

    from vlm_inspect.ui import build_demo
    from vlm_inspect.ui.serve import serve
    from conftest import free_port

    demo = build_demo(InspectService(model_dirs=[]), upload_ttl_s=2)
    port = free_port()
    serve(demo, port=port, block=False, quiet=True, upload_quota=3 * SCENE.stat().st_size + 1000)
    url = f"http://127.0.0.1:{port}/"
    try:
        r = upload(url, "old.png", SCENE.read_bytes())
        stored = Path(r.json()[0])
        assert stored.is_file() and Path(get_upload_folder()) in stored.parents
        deadline = time.time() + 30
        while stored.exists() and time.time() < deadline:  # Gradio's delete_cache, every second here
            time.sleep(0.5)
        assert not stored.exists(), "an old upload was kept"
        big = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
        path = tmp_path / "noise.png"
        Image.fromarray(big).save(path)
        codes = [upload(url, "noise.png", path.read_bytes()).status_code for _ in range(8)]
        assert 507 in codes, codes
        r = upload(url, "noise.png", path.read_bytes())
        assert r.status_code == 507 and "upload space is full" in r.text
    finally:
        demo.close()


def test_the_internal_errors_that_were_are_one_sentence_each(served, tmp_path):
    """A transformers folder without safetensors, a mismatched open_clip config, a hub error: each one
    sentence (the 10,000-character name is in the caps test)."""
    import open_clip
    from safetensors.torch import save_model

    from conftest import tiny_hf_captioner_folder

    url, allowed = served
    no_st = allowed / "hf-no-safetensors"
    tiny_hf_captioner_folder(no_st)
    (no_st / "model.safetensors").rename(no_st / "model.bin")
    mismatched = allowed / "mismatched-clip"
    mismatched.mkdir()
    small = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (mismatched / "open_clip_config.json").write_text(json.dumps({"model_cfg": small}))
    other = dict(small, vision_cfg=dict(small["vision_cfg"], width=64))
    save_model(open_clip.CLIP(**other), str(mismatched / "open_clip_model.safetensors"))
    c = client(url)
    assert NOT_OFFERED in error_of(lambda: call(c, SCENE, defended_captioner=str(no_st)))
    msg = error_of(lambda: call(c, SCENE, defended_clip=str(mismatched)))
    assert "open_clip could not build it" in msg and "\n" not in msg
    msg = error_of(lambda: call(c, SCENE, defended_clip="hf-hub:someone/robust-clip"))
    assert "the hub could not be asked about it" in msg
