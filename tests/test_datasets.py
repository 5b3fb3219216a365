"""The detection and segmentation data kinds (coco, yolo, masks: compressor/datasets) on tiny generated scenes:
the generator's determinism, the three readers agreeing, resizing and augmentation moving boxes and masks with the
image, batches, and every bad dataset failing up front with a DataError naming the file (and line)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.app.recipe import recipe_from_dict
from compressor.datasets import transforms
from compressor.datasets.coco import CocoImages
from compressor.datasets.images import BoxImages, read_image
from compressor.datasets.masks import MaskImages
from compressor.datasets.scenes import CLASSES, write_scenes
from compressor.datasets.yolo import label_path
from compressor.errors import DataError
from compressor.train.data import build_datasets, make_loader

FMNIST = Path("/usr/share/datasets/fashion-mnist")
SIZE = 64
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="needs the Fashion-MNIST idx files (dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    write_scenes(out, train=6, val=4, size=SIZE, fmnist_root=FMNIST)
    return out


@pytest.fixture
def copy(scenes, tmp_path) -> Path:
    """A private copy of the scenes to break; its data.yaml's path points at the copy."""
    from tests.task_runs import copy_scenes

    return copy_scenes(scenes, tmp_path / "scenes")


def recipe(kind: str, root: Path, *, shape=(3, SIZE, SIZE), num_classes=None, augment=False, **data):
    task = "segmentation" if kind == "masks" else "detection"
    classes = num_classes or (len(CLASSES) + 1 if kind == "masks" else len(CLASSES))
    return recipe_from_dict({"name": "t", "task": task,
                             "model": {"num_classes": classes, "input_shape": list(shape), "in_channels": shape[0]},
                             "data": {"kind": kind, "root": str(root), "augment": augment, **data}})


def build(kind: str, root: Path, **kwargs):
    r = recipe(kind, root, **kwargs)
    return build_datasets(r.data, r.model)


def error(kind: str, root: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        build(kind, root, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- the generator
def test_the_generator_writes_the_same_files_twice(scenes, tmp_path):
    again = tmp_path / "again"
    write_scenes(again, train=6, val=4, size=SIZE, fmnist_root=FMNIST)
    files = sorted(p.relative_to(scenes) for p in scenes.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".png", ".json", ".txt", ".yaml"} and len(files) == 10 * 3 + 2 + 1
    for rel in files:
        a, b = (scenes / rel).read_bytes(), (again / rel).read_bytes()
        if rel.name == "data.yaml":  # names the folder it was written to
            a, b = a.replace(str(scenes.resolve()).encode(), b""), b.replace(str(again.resolve()).encode(), b"")
        assert a == b, rel


# ---------------------------------------------------------------------------------------------- the readers
def test_the_three_readers_agree_on_the_scenes(scenes):
    coco_train, coco_val = build("coco", scenes)
    yolo_train, yolo_val = build("yolo", scenes)
    mask_train, mask_val = build("masks", scenes)
    assert isinstance(coco_train, CocoImages) and isinstance(yolo_train, BoxImages)
    assert isinstance(mask_train, MaskImages)
    assert [len(d) for d in (coco_train, coco_val, yolo_train, yolo_val, mask_train, mask_val)] == [6, 4] * 3
    assert coco_train.category_ids == list(range(1, 11)) and coco_train.classes == list(CLASSES)
    assert yolo_train.classes == list(CLASSES)
    objects = 0
    for coco, yolo, masks in ((coco_train, yolo_train, mask_train), (coco_val, yolo_val, mask_val)):
        for i in range(len(coco)):
            image, target = coco[i]
            yolo_image, yolo_target = yolo[i]
            mask_image, mask = masks[i]
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            assert torch.equal(image, yolo_image) and torch.equal(image, mask_image)
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert torch.equal(target["labels"], yolo_target["labels"])
            assert torch.allclose(target["boxes"], yolo_target["boxes"], rtol=0, atol=0.5)
            assert mask.shape == (SIZE, SIZE) and mask.dtype == torch.int64
            # every object pixel lies inside a box of its class (mask value = class + 1)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            inside = torch.zeros(len(ys), dtype=torch.bool)
            for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1) & (mask[ys, xs] == label + 1)
            assert bool(inside.all())
            objects += len(target["labels"])
    assert objects > 5  # the scenes have objects at all (the agreement is not vacuous)


def test_the_coco_boxes_are_the_json_boxes_as_corners(scenes):
    train, _ = build("coco", scenes)
    coco = json.loads((scenes / "annotations" / "instances_train.json").read_text())
    index = next(i for i, image in enumerate(coco["images"])
                 if any(a["image_id"] == image["id"] for a in coco["annotations"]))
    first = [a for a in coco["annotations"] if a["image_id"] == coco["images"][index]["id"]]
    x, y, w, h = first[0]["bbox"]
    _, target = train[index]
    assert len(target["boxes"]) == len(first)
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert int(target["labels"][0]) == first[0]["category_id"] - 1


def test_images_resize_to_the_input_shape_with_their_boxes_and_masks(scenes):
    (train, _), (small, _) = build("coco", scenes), build("coco", scenes, shape=(3, 32, 48))
    (masks, _), (small_masks, _) = build("masks", scenes), build("masks", scenes, shape=(3, 32, 48))
    for i in range(len(train)):
        _, target = train[i]
        image, resized = small[i]
        assert image.shape == (3, 32, 48)
        expected = target["boxes"] * torch.tensor([48 / SIZE, 32 / SIZE, 48 / SIZE, 32 / SIZE])
        assert torch.allclose(resized["boxes"], expected) and torch.equal(resized["labels"], target["labels"])
        mask_image, mask = small_masks[i]
        assert mask_image.shape == (3, 32, 48) and mask.shape == (32, 48) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= set(masks[i][1].unique().tolist())  # nearest: no new values
    gray, _ = build("yolo", scenes, shape=(1, SIZE, SIZE))
    assert gray[0][0].shape == (1, SIZE, SIZE)


def test_a_greyscale_image_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 251).save(path)
    rgb = read_image(path, 3)
    assert rgb.shape == (3, 48, 64) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert float(rgb[0, 0, 10]) == pytest.approx(10 / 255)


# ---------------------------------------------------------------------------------------------- augmentation
def _square(box=(10, 20, 30, 44), size=(64, 64)):
    """A white rectangle on black, its box and its mask (class 3)."""
    image, mask = torch.zeros(3, *size), torch.zeros(size, dtype=torch.int64)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1], mask[y0:y1, x0:x1] = 1.0, 3
    return image, torch.tensor([box], dtype=torch.float32), torch.tensor([3]), mask


def _extent(values: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(values, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def test_a_flip_mirrors_boxes_and_masks():
    image, boxes, _, mask = _square()
    flipped, moved, flipped_mask = transforms.hflip(image, boxes=boxes, mask=mask)
    assert moved[0].tolist() == [64 - 30, 20, 64 - 10, 44]  # x0' = W - x1
    assert _extent(flipped[0] > 0.5) == moved[0].tolist() == _extent(flipped_mask == 3)


@pytest.mark.parametrize("scale,where", [(1.25, (0.0, 0.0)), (1.25, (1.0, 0.3)), (0.75, (0.0, 0.0)),
                                         (0.75, (1.0, 1.0)), (0.9, (0.5, 0.2))])
def test_a_scale_crop_moves_boxes_and_masks_with_the_pixels(scale, where):
    image, boxes, labels, mask = _square()
    out, moved, kept, out_mask = transforms.scale_crop(image, scale, where, boxes=boxes, labels=labels, mask=mask,
                                                       ignore_index=255)
    assert out.shape == image.shape and out_mask.shape == mask.shape and kept.tolist() == [3]
    assert np.allclose(_extent(out[0] > 0.5), moved[0].tolist(), atol=1.0)
    assert np.allclose(_extent(out_mask == 3), moved[0].tolist(), atol=1.0)
    padded = (out_mask == 255).sum().item()
    if scale < 1:  # zoomed out: the border is padding, in the mask too
        h = round(64 * scale)
        assert padded == 64 * 64 - h * h and float(out[0][out_mask == 255].unique()) == transforms.PAD_VALUE
    else:
        assert padded == 0


def test_a_crop_clips_boxes_and_drops_those_it_cuts_to_slivers():
    image, _, _, _ = _square()
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 50.0, 10.0, 64.0], [63.0, 10.0, 64.0, 40.0],
                          [30.0, 30.0, 40.0, 40.0]])
    out, moved, kept, _ = transforms.scale_crop(image, 1.25, (1.0, 1.0), boxes=boxes,
                                                labels=torch.tensor([1, 2, 4, 5]))
    # zoomed by 1.25 to 80 px and the bottom-right 64 kept: every coordinate * 1.25 - 16, clipped to [0, 64]
    assert kept.tolist() == [1, 5]  # the left-edge box is cut away, the right-edge one to 1.25 px
    assert moved.tolist() == [[0.0, 0.0, 9.0, 9.0], [21.5, 21.5, 34.0, 34.0]]


def test_the_augmentation_is_seeded_and_only_for_training(scenes):
    train, val = build("coco", scenes, augment=True)
    plain, _ = build("coco", scenes)
    assert train.augment and not val.augment

    def draw(seed):
        torch.manual_seed(seed)
        return [train[i] for i in range(len(train))]

    first, again, other = draw(0), draw(0), draw(1)
    for (a, ta), (b, tb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, other))
    assert any(not torch.equal(a, plain[i][0]) for i, (a, _) in enumerate(first))
    for i in range(len(val)):  # val never augments: the same sample whatever the RNG
        torch.manual_seed(i)
        image, target = val[i]
        torch.manual_seed(100 + i)
        again_image, again_target = val[i]
        assert torch.equal(image, again_image) and torch.equal(target["boxes"], again_target["boxes"])


def test_augmented_masks_keep_class_values_and_pad_with_the_ignore_index(scenes):
    train, val = build("masks", scenes, augment=True)
    plain, _ = build("masks", scenes)
    assert train.augment and not val.augment
    torch.manual_seed(0)
    values = set()
    for i in range(len(train)):
        image, mask = train[i]
        assert image.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE)
        values |= set(mask.unique().tolist())
        assert set(mask.unique().tolist()) <= set(plain[i][1].unique().tolist()) | {255}
    assert values - {255} and values <= set(range(11)) | {255}


# ---------------------------------------------------------------------------------------------- batches
def test_detection_batches_collate_to_box_targets(scenes):
    from compressor.tasks.targets import BoxTargets

    r = recipe("yolo", scenes, train_subset=5)
    train, val = build_datasets(r.data, r.model)
    assert isinstance(train, torch.utils.data.Subset) and len(train) == 5  # the collate is found under a Subset
    images, targets = next(iter(make_loader(train, 3, shuffle=False, workers=0)))
    assert isinstance(targets, BoxTargets) and len(targets) == 3 and targets.size == (SIZE, SIZE)
    assert images.shape == (3, 3, SIZE, SIZE)
    assert [len(b) for b in targets.boxes] == [len(train[i][1]["labels"]) for i in range(3)]
    images, masks = next(iter(make_loader(build("masks", scenes)[1], 4, shuffle=False, workers=0)))
    assert images.shape == (4, 3, SIZE, SIZE) and masks.shape == (4, SIZE, SIZE) and masks.dtype == torch.int64


def test_images_without_objects_are_samples_with_no_boxes(copy):
    names = sorted(p.name for p in (copy / "images" / "train").iterdir())
    (copy / "labels" / "train" / names[0]).with_suffix(".txt").write_text("")  # an empty label file
    (copy / "labels" / "train" / names[1]).with_suffix(".txt").unlink()  # no label file at all
    coco_file = copy / "annotations" / "instances_train.json"
    coco = json.loads(coco_file.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    coco_file.write_text(json.dumps(coco))
    (yolo, _), (coco_set, _) = build("yolo", copy), build("coco", copy)
    for dataset, empty in ((yolo, (0, 1)), (coco_set, (0,))):
        for i in empty:
            image, target = dataset[i]
            assert image.shape == (3, SIZE, SIZE) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        _, targets = dataset.collate([dataset[0], dataset[2]])
        assert len(targets) == 2 and targets.boxes[0].shape == (0, 4)


def test_recipes_of_each_kind_build_with_explicit_paths(copy, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(str(copy), str(moved))
    r = recipe("coco", tmp_path / "nowhere", coco={
        "train_images": str(moved / "images/train"),
        "train_annotations": str(moved / "annotations/instances_train.json"),
        "val_images": str(moved / "images/val"), "val_annotations": str(moved / "annotations/instances_val.json")})
    assert [len(d) for d in build_datasets(r.data, r.model)] == [6, 4]
    yaml_file = moved / "custom.yaml"
    yaml_file.write_text("path: .\ntrain: images/train\nval: [images/val]\nnames: [a, b, c, d, e, f, g, h, i, j]\n")
    r = recipe("yolo", tmp_path / "nowhere", yolo=str(yaml_file))
    train, val = build_datasets(r.data, r.model)
    assert [len(train), len(val)] == [6, 4] and train.classes[:2] == ["a", "b"]
    r = recipe("masks", tmp_path / "nowhere", masks={"train_images": str(moved / "images/train"),
                                                     "train_masks": str(moved / "masks/train"),
                                                     "val_images": str(moved / "images/val"),
                                                     "val_masks": str(moved / "masks/val"), "ignore_index": 200})
    train, val = build_datasets(r.data, r.model)
    assert [len(train), len(val)] == [6, 4] and train.ignore_index == 200


def test_the_data_sections_are_strict():
    from compressor.errors import RecipeError

    with pytest.raises(RecipeError, match="train_image"):
        recipe("coco", Path("x"), coco={"train_image": "x"})
    with pytest.raises(RecipeError, match="ignore_index"):
        recipe("masks", Path("x"), masks={"ignore_index": -1})


# ---------------------------------------------------------------------------------------------- bad datasets
def test_missing_folders_and_files_name_what_was_looked_for(tmp_path, copy):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = error("coco", empty)
    assert "images/train" in message and "data.coco.train_images" in message and str(empty) in message
    message = error("yolo", empty)
    assert "data.yaml" in message and "data.yolo" in message and str(empty) in message
    message = error("masks", empty)
    assert "images/train" in message and "data.masks.train_images" in message
    shutil.rmtree(copy / "masks")
    message = error("masks", copy)
    assert "masks/train" in message and "data.masks.train_masks" in message
    message = error("coco", copy, coco={"val_images": str(tmp_path / "gone")})
    assert "data.coco.val_images" in message and "gone" in message and "does not exist" in message
    (copy / "annotations" / "instances_train.json").unlink()
    message = error("coco", copy)
    assert "annotations/instances_train.json" in message and "data.coco.train_annotations" in message


def _coco(root: Path, split="train") -> tuple[Path, dict]:
    path = root / "annotations" / f"instances_{split}.json"
    return path, json.loads(path.read_text())


def test_a_coco_image_that_is_missing(copy):
    path, coco = _coco(copy)
    (copy / "images" / "train" / coco["images"][2]["file_name"]).unlink()
    message = error("coco", copy)
    assert "instances_train.json" in message and coco["images"][2]["file_name"] in message and "missing" in message


@pytest.mark.parametrize("bbox,what", [([50, 10, 20, 10], "outside"), ([10, 10, 0, 5], "non-positive"),
                                       ([-3, 10, 5, 5], "outside"), ([10, 10, 5], "four numbers")])
def test_a_bad_coco_box(copy, bbox, what):
    path, coco = _coco(copy)
    ann = coco["annotations"][0]
    ann["bbox"] = bbox
    path.write_text(json.dumps(coco))
    name = next(i["file_name"] for i in coco["images"] if i["id"] == ann["image_id"])
    message = error("coco", copy)
    assert "instances_train.json" in message and f"annotation {ann['id']}" in message and name in message
    assert what in message


def test_a_coco_box_within_a_pixel_of_the_edge_is_clipped(copy):
    path, coco = _coco(copy)
    ann = coco["annotations"][0]
    ann["bbox"] = [-0.5, 1, SIZE + 0.5, 10]
    path.write_text(json.dumps(coco))
    train, _ = build("coco", copy)
    index = [i["id"] for i in coco["images"]].index(ann["image_id"])
    assert train[index][1]["boxes"][0].tolist() == [0.0, 1.0, SIZE, 11.0]


def test_coco_categories_the_model_cannot_predict(copy):
    path, coco = _coco(copy)
    coco["annotations"][1]["category_id"] = 99
    path.write_text(json.dumps(coco))
    message = error("coco", copy)
    assert "instances_train.json" in message and "category_id 99" in message
    assert f"annotation {coco['annotations'][1]['id']}" in message
    message = error("coco", copy, num_classes=5)
    assert "10 categories" in message and "model.num_classes is 5" in message


def test_coco_json_errors_name_the_line_and_mismatched_categories(copy):
    path, coco = _coco(copy, "val")
    coco["categories"] = coco["categories"][::-1]
    path.write_text(json.dumps(coco))
    assert "differ" in error("coco", copy)
    path.write_text('{\n "images": [\n  {"id": 1,,}\n]}\n')
    message = error("coco", copy)
    assert "instances_val.json line 3" in message


def test_coco_image_sizes_must_match_the_json(copy):
    path, coco = _coco(copy)
    coco["images"][0]["width"] = 100
    path.write_text(json.dumps(coco))
    message = error("coco", copy)
    assert coco["images"][0]["file_name"] in message and "100x64" in message


def _first_labelled(root: Path) -> Path:
    return next(p for p in sorted((root / "labels" / "train").iterdir()) if p.read_text().strip())


@pytest.mark.parametrize("line,what", [("3 0.5 0.5 0.2", "not 5"),
                                       ("1.5 0.5 0.5 0.2 0.2", "not a non-negative integer"),
                                       ("x 0.5 0.5 0.2 0.2", "not five numbers"), ("3 1.2 0.5 0.2 0.2", "[0, 1]"),
                                       ("10 0.5 0.5 0.2 0.2", "class 10"), ("3 0.95 0.5 0.5 0.2", "outside"),
                                       ("3 0.5 0.5 0 0.2", "non-positive"), ("3 0.5 0.5 0.2 0.2 0.1 0.1", "polygon")])
def test_a_bad_yolo_label_line_names_the_file_and_line(copy, line, what):
    labels = _first_labelled(copy)
    kept = labels.read_text().splitlines()[0]
    labels.write_text(f"{kept}\n\n{line}\n")
    message = error("yolo", copy)
    assert f"{labels} line 3" in message and what in message


def test_yolo_labels_without_images_and_class_counts(copy):
    labels = _first_labelled(copy)
    orphan = labels.with_name("lost.txt")
    orphan.write_text("1 0.5 0.5 0.2 0.2\n")
    message = error("yolo", copy)
    assert "lost.txt" in message and "has no image" in message
    orphan.unlink()
    (labels.parent / "classes.txt").write_text("\n".join(CLASSES) + "\n")  # a labelling tool's list is not a label
    assert len(build("yolo", copy)[0]) == 6
    assert "model.num_classes is 5" in error("yolo", copy, num_classes=5)
    assert label_path(Path("/d/images/x/images/train/a.b.png")) == Path("/d/images/x/labels/train/a.b.txt")


def test_a_broken_dataset_yaml(copy):
    yaml_file = copy / "data.yaml"
    yaml_file.write_text("path: .\ntrain: images/train\nval: [images/val\nnames: [a]\n")
    message = error("yolo", copy)
    assert "data.yaml" in message and "line" in message
    yaml_file.write_text("path: .\ntrain: images/nothing\nval: images/val\nnames: [a, b]\n")
    message = error("yolo", copy)
    assert "images/nothing" in message and "train" in message


def _mask(root: Path, split="train") -> Path:
    return sorted((root / "masks" / split).iterdir())[0]


def test_a_mask_with_values_outside_the_classes(copy):
    mask = _mask(copy)
    values = np.asarray(Image.open(mask)).copy()
    values[0, :3], values[1, 0] = 42, 255
    Image.fromarray(values).save(mask)
    message = error("masks", copy)
    assert mask.name in message and "42" in message
    # 255 (the ignore index) is not named as a bad value; the path is left out (/tmp/pytest-of-root/pytest-255/...)
    assert "255" not in message.replace(str(mask), "").split("ignore_index")[0]
    assert "model.num_classes 11" in message
    values[0, :3] = 0
    Image.fromarray(values).save(mask)
    assert len(build("masks", copy)[0]) == 6  # ignore_index pixels are fine
    message = error("masks", copy, masks={"ignore_index": 7})
    assert "ignore_index 7 is a class index" in message


def test_a_mask_of_another_size_or_a_missing_mask(copy):
    mask = _mask(copy, "val")
    Image.fromarray(np.zeros((SIZE, SIZE + 8), dtype=np.uint8)).save(mask)
    message = error("masks", copy)
    assert mask.name in message and f"{SIZE + 8}x{SIZE}" in message
    mask.unlink()
    message = error("masks", copy)
    assert "has no mask" in message and mask.name in message and "data.masks.val_masks" in message
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(mask)
    assert "channels" in error("masks", copy)
