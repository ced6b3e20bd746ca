"""One recipe per training method, all behind the Recipe interface."""

from __future__ import annotations

from importlib import import_module

from shared.schemas import Method
from worker.training.recipes.base import Recipe

# Imported on demand: a recipe may need optional packages (bitsandbytes, deepspeed) the others do not.
_RECIPES: dict[Method, str] = {
    Method.lora: "worker.training.recipes.lora:LoraRecipe",
    Method.dora: "worker.training.recipes.lora:DoraRecipe",
    Method.rslora: "worker.training.recipes.lora:RsLoraRecipe",
    Method.qlora: "worker.training.recipes.qlora:QLoraRecipe",
    Method.dpo: "worker.training.recipes.dpo:DpoRecipe",
    Method.merge: "worker.training.recipes.merge:MergeRecipe",
    Method.fusion: "worker.training.recipes.fusion:FusionRecipe",
    Method.export: "worker.training.recipes.export:ExportRecipe",
}


def recipe_for(method: Method) -> type[Recipe]:
    """Returns the recipe class that trains `method`."""
    if method not in _RECIPES:
        raise KeyError(f"no recipe trains {method.value}")
    module, _, name = _RECIPES[method].partition(":")
    return getattr(import_module(module), name)
