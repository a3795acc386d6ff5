"""The built-in compositional shapes world (SPEC.md §5): scenes on a 3×3 grid, their images, exact token and
feature representations, T2I-CompBench-style prompts with atomic constraints and yes/no questions, and the
ground-truth evaluator.

Reached as ``silmm_fast.world``; it needs no model and no download.
"""

from silmm_fast.world.evaluate import audit_pairs, check, evaluate, evaluate_features, evaluate_tokens
from silmm_fast.world.prompts import (
    CATEGORIES,
    HELDOUT_PAIRS,
    KINDS,
    NUMBER_WORDS,
    RELATION_PHRASES,
    RELATIONS,
    SPLITS,
    WORDS,
    Constraint,
    Desc,
    Prompt,
    Question,
    answer,
    canonical_scene,
    corrupt_scene,
    negative_questions,
    parse_prompt,
    positive_questions,
    prompt_split,
    questions_for,
    random_edit,
    sample_prompt,
    scene_for_prompt,
    tokenize_text,
)
from silmm_fast.world.render import render, render_grid, render_tokens, save_png
from silmm_fast.world.scene import COLORS, GRID, MAX_OBJECTS, MIN_OBJECTS, SHAPES, TEXTURES, Obj, Scene, random_scene
from silmm_fast.world.tokenizer import FeatureCodec, ImageTokenizer

__all__ = [
    "CATEGORIES",
    "COLORS",
    "GRID",
    "HELDOUT_PAIRS",
    "KINDS",
    "MAX_OBJECTS",
    "MIN_OBJECTS",
    "NUMBER_WORDS",
    "RELATIONS",
    "RELATION_PHRASES",
    "SHAPES",
    "SPLITS",
    "TEXTURES",
    "WORDS",
    "Constraint",
    "Desc",
    "FeatureCodec",
    "ImageTokenizer",
    "Obj",
    "Prompt",
    "Question",
    "Scene",
    "answer",
    "canonical_scene",
    "check",
    "corrupt_scene",
    "evaluate",
    "audit_pairs",
    "evaluate_features",
    "evaluate_tokens",
    "negative_questions",
    "parse_prompt",
    "positive_questions",
    "prompt_split",
    "questions_for",
    "random_edit",
    "random_scene",
    "render",
    "render_grid",
    "render_tokens",
    "sample_prompt",
    "save_png",
    "scene_for_prompt",
    "tokenize_text",
]
