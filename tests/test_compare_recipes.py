"""scripts/compare_quickstart_recipes.py: its recipes are what their names say, whatever today's
quickstart recipe is (each states the keys that today's recipe changed)."""

from __future__ import annotations

from conftest import compose, load_script
from hydra.core.override_parser.overrides_parser import OverridesParser


def test_on_replaces_a_key_instead_of_repeating_it():
    script = load_script("compare_quickstart_recipes")
    assert script.on(["a=1", "b=2"], "b=3", "c=4") == ["a=1", "b=3", "c=4"]


def test_the_compared_recipes_compose_to_what_they_were():
    script = load_script("compare_quickstart_recipes")
    parser = OverridesParser.create()
    for name, overrides in script.RECIPES.items():
        keys = [o.split("=", 1)[0] for o in overrides]
        assert len(keys) == len(set(keys)), name  # Hydra refuses a key given twice
        cfg = compose(overrides)  # every key exists (a typo would compare today's recipe with itself)
        for override in overrides:
            key = override.split("=", 1)[0]
            if "." not in key:
                continue  # a config group (model=unet_tiny), not a value
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == parser.parse_override(override).value(), (name, override, node)
    before = compose(script.RECIPES["before issue 28 (300 steps, linear)"])
    assert (before["train"]["max_steps"], before["diffusion"]["schedule"]) == (300, "linear")
    assert before["train"]["lr_decay"] is None and before["train"]["grad_clip"] is None
    previous = compose(script.RECIPES["previous (dd37cb3)"])
    assert previous["model"]["base_channels"] == 32 and previous["model"]["attn_resolutions"] == [8]
    assert (previous["train"]["max_steps"], previous["optim"]["lr"]) == (1500, 1e-3)
    assert previous["diffusion"]["schedule"] == "linear" and previous["train"]["grad_clip"] is None
    # The screen marked as the recipe of 2026-12-05 is that recipe, but for its checkpoint interval;
    # the recipe of 2026-12-06 is that one at 1,000 steps (recipe=digits16); today's is the 8x8 screen
    # at 1,500 steps.
    dec05, screen = compose(script.RECIPES["2026-12-05 (400 steps)"]), compose(script.RECIPES["cosine 400, clip 1"])
    longer = compose(script.RECIPES["2026-12-05, 1000 steps"])
    dec06 = compose(script.RECIPES["2026-12-06 (16x16, 1000 steps)"])
    digits16 = compose(["recipe=digits16"])
    eight, current = compose(script.RECIPES["8x8, 1500 steps"]), compose([])
    for cfg in (dec05, screen, longer, dec06, digits16, eight, current):
        cfg["checkpoint"] = {}
        del cfg["run_dir"]
    assert dec05 == screen and longer == dec06 == digits16 and eight == current
    assert digits16["dataset"]["image_size"] == 16 and current["dataset"]["image_size"] == 8
    assert script.REFERENCE in script.RECIPES  # the recipe the table's quiet wall times are scaled from
