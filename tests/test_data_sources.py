"""Real data-set formats, each on a tiny fixture written here in that exact format; bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlm_inspect.data.sources import DataError, few_shot, open_data


def _img(path, colour=(200, 30, 30), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder(tmp_path):
    for c, col in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        for i in range(3):
            _img(tmp_path / "pets" / c / f"{i}.png", col)
    ds = open_data(f"imagefolder:{tmp_path / 'pets'}")
    assert ds.kind == "classification" and ds.classes == ["cat", "dog"]
    assert ds.prompts == ["a photo of a cat", "a photo of a dog"]
    assert len(ds) == 6 and sorted(ds[i]["label"] for i in range(6)) == [0, 0, 0, 1, 1, 1]
    assert ds[0]["image"].mode == "RGB"


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    (root / "wnids.txt").write_text("n01443537\nn01629819\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
                                    "n99999999\tunused\n")
    for w in ("n01443537", "n01629819"):
        for i in range(2):
            _img(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    _img(root / "val" / "images" / "val_0.JPEG")
    _img(root / "val" / "images" / "val_1.JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01629819\t0\t0\t10\t10\n"
                                                      "val_1.JPEG\tn01443537\t1\t1\t9\t9\n")
    train = open_data(f"imagefolder:{root}", "train")
    assert train.classes == ["goldfish", "European fire salamander"] and len(train) == 4
    assert train.prompts[1] == "a photo of a european fire salamander"
    val = open_data(f"imagefolder:{root}", "val")
    assert [val[i]["label"] for i in range(2)] == [1, 0]


def test_coco_captions(tmp_path):
    _img(tmp_path / "imgs" / "000000000009.jpg")
    _img(tmp_path / "imgs" / "000000000025.jpg")
    ann = {"images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
           "annotations": [{"id": 1, "image_id": 9, "caption": "A plate of food."},
                           {"id": 2, "image_id": 9, "caption": "Some food on a plate"},
                           {"id": 3, "image_id": 25, "caption": "A giraffe."}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    ds = open_data(f"coco:{tmp_path / 'imgs'},{tmp_path / 'captions_val2017.json'}")
    assert ds.kind == "captions" and len(ds) == 2
    assert ds[0]["captions"] == ["A plate of food.", "Some food on a plate"] and ds[1]["caption"] == "A giraffe."


def test_flickr8k(tmp_path):
    _img(tmp_path / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg")
    (tmp_path / "Flickr8k.token.txt").write_text(
        "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs .\n"
        "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n")
    ds = open_data(f"flickr8k:{tmp_path / 'Flicker8k_Dataset'},{tmp_path / 'Flickr8k.token.txt'}")
    assert len(ds) == 1 and len(ds[0]["captions"]) == 2 and ds[0]["image"].size == (20, 16)


def test_vqav2(tmp_path):
    _img(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    q = {"questions": [{"image_id": 42, "question": "What color is the plate?", "question_id": 420}]}
    a = {"annotations": [{"question_id": 420, "image_id": 42, "multiple_choice_answer": "white",
                          "answers": [{"answer": "white"}] * 9 + [{"answer": "gray"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    ds = open_data(f"vqav2:{tmp_path / 'val2014'},{tmp_path / 'q.json'},{tmp_path / 'a.json'}")
    assert ds.kind == "vqa" and ds[0]["question"] == "What color is the plate?" and ds[0]["answer"] == "white"
    assert len(ds[0]["answers"]) == 10


def test_few_shot_is_class_balanced_and_deterministic(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(5):
            _img(tmp_path / "f" / c / f"{i}.png")
    ds = open_data(f"imagefolder:{tmp_path / 'f'}", shots=2, seed=1)
    labels = sorted(ds[i]["label"] for i in range(len(ds)))
    assert labels == [0, 0, 1, 1, 2, 2]
    again = open_data(f"imagefolder:{tmp_path / 'f'}", shots=2, seed=1)
    assert ds.indices == again.indices
    shapes = open_data("shapes:shapes-color", "train", shots=3)
    assert len(shapes) == 24 and sorted({shapes[i]["label"] for i in range(24)}) == list(range(8))
    with pytest.raises(DataError, match="shots"):
        few_shot(shapes, 0)


@pytest.mark.parametrize("spec,match", [
    ("nowhere", "format prefix"),
    ("parquet:/x", "unknown data format"),
    ("imagefolder:/definitely/missing", "does not exist"),
    ("coco:/a", "wrong number of parts"),
    ("shapes:shapes-nothing", "shapes-nothing"),
    ("shapes:shapes-heldout", "held out"),
])
def test_bad_specs(spec, match):
    with pytest.raises(DataError, match=match):
        open_data(spec, "train")


def test_bad_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataError, match="empty"):
        open_data(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        open_data(f"imagefolder:{tmp_path / 'flat'}")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "bad.json").write_text("{ nope")
    with pytest.raises(DataError, match="not a valid COCO captions JSON"):
        open_data(f"coco:{tmp_path / 'imgs'},{tmp_path / 'bad.json'}")
    (tmp_path / "other.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(DataError, match="not a COCO captions file"):
        open_data(f"coco:{tmp_path / 'imgs'},{tmp_path / 'other.json'}")
    (tmp_path / "tokens.txt").write_text("this is not flickr\n")
    with pytest.raises(DataError, match="line 1"):
        open_data(f"flickr8k:{tmp_path / 'imgs'},{tmp_path / 'tokens.txt'}")
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "broken.png").write_bytes(b"not an image")
    ds = open_data(f"imagefolder:{tmp_path / 'bad'}")
    with pytest.raises(DataError, match="broken.png"):
        ds[0]


def test_shapes_spec_kinds():
    assert open_data("shapes:shapes-scenes", "train").kind == "scenes"
    ds = open_data("shapes:shapes-combo@noisy", "test", length=5)
    assert ds.style == "noisy" and len(ds) == 5 and ds.kind == "classification"
    assert isinstance(ds[0]["image"], np.ndarray)
