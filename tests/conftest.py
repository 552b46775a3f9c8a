"""Test set-up: offline, deterministic, and no test may reach the network."""
from __future__ import annotations

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

# Randomly initialised big models produce denormal floats whose arithmetic is ~5x slower on CPU.
torch.set_flush_denormal(True)

_real_connect = socket.socket.connect


def _local_only_connect(self, address):  # pragma: no cover - only trips on a bug
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise RuntimeError(f"tests must not use the network (tried to connect to {address!r})")


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    socket.socket.connect = _local_only_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_cache: dict[str, object] = {}


def embedded(name: str):
    """Embedded preset with random weights, built once per session (tests must not depend on training)."""
    from vlm_inspect.models import load

    if name not in _cache:
        _cache[name] = load(name, weights="random")
    return _cache[name]


@pytest.fixture(scope="session")
def shapes_clip():
    return embedded("shapes-clip")


@pytest.fixture(scope="session")
def shapes_captioner():
    return embedded("shapes-captioner")


@pytest.fixture(scope="session")
def shapes_vqa():
    return embedded("shapes-vqa")


@pytest.fixture(scope="session")
def vit_b32():
    """openai/ViT-B-32 architecture with random weights (no network)."""
    from vlm_inspect.models import load

    return load("openai/ViT-B-32", weights="random")


def free_port() -> int:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def serve_app(service=None, **limits):
    """The page, served in this process on a free local port through the same `serve` as `python app.py`
    (a 2 MB upload cap so the over-size upload test stays small); returns (url, demo)."""
    from vlm_inspect.service import InspectService
    from vlm_inspect.ui import build_demo
    from vlm_inspect.ui.serve import serve

    demo = build_demo(service or InspectService(model_dirs=[]))
    port = free_port()
    serve(demo, port=port, max_file_size=limits.pop("max_file_size", "2mb"), block=False, quiet=True, **limits)
    return f"http://127.0.0.1:{port}/", demo


@pytest.fixture(scope="session")
def app_url():
    """The page as `python app.py` serves it, with a rate limit high enough for the many calls of the
    API tests from one address (tests/test_security.py checks the default limits)."""
    url, demo = serve_app(rate_per_minute=100_000, queue_size=64, jobs_per_client=1000)
    yield url
    demo.close()


def tiny_hf_captioner_folder(folder) -> None:
    """A tiny ViT + GPT-2 VisionEncoderDecoder ``save_pretrained`` folder with a byte-level tokenizer:
    the shape of a hub download of nlpconnect/vit-gpt2-image-captioning, small and random."""
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    from vlm_inspect.models.tokenizers import byte_level_gpt2_standin

    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    dec = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=50256, eos_token_id=50256)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = 50256
    VisionEncoderDecoderModel(cfg).save_pretrained(folder)
    byte_level_gpt2_standin().save_pretrained(folder)


def tiny_hf_vqa_folder(folder) -> None:
    """A tiny BlipForQuestionAnswering ``save_pretrained`` folder with a BERT-style tokenizer (the shape
    of Salesforce/blip-vqa-base), small and random."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    from vlm_inspect.models.tokenizers import char_wordpiece_bert_standin

    bcfg = BlipConfig(vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2},
                      text_config={"vocab_size": 30524, "hidden_size": 32, "encoder_hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0})
    BlipForQuestionAnswering(bcfg).save_pretrained(folder)
    char_wordpiece_bert_standin().save_pretrained(folder)


@pytest.fixture(scope="module")
def scene():
    """A single large green square: every embedded model gets it right on the clean image."""
    from vlm_inspect.data.shapes import ShapesDataset

    ds = ShapesDataset("shapes-combo", split="test", length=1000, image_size=128)
    i = next(i for i in range(7, 1000, 48) if ds.scene(i).objects[0].pair == ("green", "square")
             and ds.scene(i).objects[0].size == "large")
    return ds.image(i)
