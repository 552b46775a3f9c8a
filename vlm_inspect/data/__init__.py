"""Data: the procedural shapes world (``docs/SHAPES_WORLD.md``) and loaders for real dataset formats."""

from .shapes import (
    CANVAS,
    COLOURS,
    COUNTS,
    DATASETS,
    HELD_OUT_PAIRS,
    PAIRS,
    PLURALS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    STYLES,
    TRAIN_PAIRS,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption,
    object_masks,
    parse_spec,
    questions,
    render,
    sample_scene,
)

__all__ = [
    "CANVAS", "COLOURS", "COUNTS", "DATASETS", "HELD_OUT_PAIRS", "PAIRS", "PLURALS", "POSITIONS",
    "SHAPES", "SIZES", "SPLITS", "STYLES", "TRAIN_PAIRS", "Scene", "ShapeObject", "ShapesDataset",
    "caption", "object_masks", "parse_spec", "questions", "render", "sample_scene",
]
