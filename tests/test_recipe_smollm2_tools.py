"""recipes/smollm2_tools.yaml (tool-use LoRA SFT of SmolLM2 + merge) plans: every stage config validates, the SFT
reads the bundled tool conversations and the merge folds that SFT's adapter (the full run takes ~an hour on a CPU)."""

from pathlib import Path

from lmforge.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_plans(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smollm2_tools.yaml", workspace=tmp_path)
    assert [(s.name, s.kind) for s in recipe.stages] == [("smollm2", "pretrained"), ("sft", "sft"),
                                                          ("merged", "merge")]
    sft, merge = recipe.stages[1].raw, recipe.stages[2].raw
    assert (ROOT / sft["data"]).exists() and sft["lora_r"] > 0 and sft["val_fraction"] > 0
    assert sft["model"] == "@smollm2" and merge["adapter"] == "@sft"
