"""`python -m dafast.train [RECIPE.yaml] [key=value ...]`: run a recipe.

With no recipe, the bundled default (dafast/recipes/default.yaml) runs the paper's strategy
matrix on the embedded SmolLM2-135M-Instruct and the bundled biological-materials data, and
writes OUTPUT_DIR/report/report.md. Overrides use dotted keys and YAML values:

    python -m dafast.train output_dir=runs/sweep cpt.epochs=3 pipelines=[cpt-sft] eval=null

Data-parallel: `accelerate launch [--config_file dafast/accelerate/ddp.yaml] -m dafast.train ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dafast.recipe import RecipeError, builtin_recipe, describe, load_recipe


def _help_recipe(argv: list[str]) -> tuple[object, str]:
    """For --help: the recipe the same command line would run, and where its values come from."""
    recipe_path = next((a for a in argv if not a.startswith("-") and "=" not in a), None)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as e:
        return None, f"(schema defaults: the recipe does not load: {e})"
    return recipe, str(recipe_path or builtin_recipe()) + (" with the overrides" if overrides else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    epilog = ""
    if "-h" in argv or "--help" in argv:  # only then: loading a recipe reads its files
        recipe, origin = _help_recipe(argv)
        epilog = (f"recipe fields (key (value this run would use): meaning), settable as "
                  f"key=value; values from {origin}:\n" + "\n".join(describe(values=recipe))
                  + f"\n\nthe default recipe: {builtin_recipe()}")
    parser = argparse.ArgumentParser(
        prog="python -m dafast.train",
        description="Run a dafast recipe: CPT/SFT/DPO/ORPO stages, SLERP merges, the benchmark "
                    "and the report.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("recipe", nargs="?", help="recipe YAML (default: the bundled default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override recipe fields, e.g. cpt.epochs=2 lora.r=8")
    parser.add_argument("--plan", action="store_true",
                        help="print each node and what a run would do with it (cached, resume, "
                             "train, merge, evaluate), and exit")
    args = parser.parse_intermixed_args(argv)  # --plan anywhere among the overrides
    if args.recipe and "=" in args.recipe:  # only overrides were given
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # One line per node and stage on stdout; progress bars and warnings stay on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import datasets
    import transformers

    import dafast
    from dafast import matrix

    from dafast.runlock import RunLocked

    # Loading and writing bars for every model and dataset would bury the training bar.
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    try:
        with dafast.kernels.mode(recipe.kernels):
            nodes = matrix.run(recipe, only_plan=args.plan)
    except (RunLocked, OSError) as e:  # a missing model, a busy or unwritable output_dir
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A node can be done with an error: its judged tasks failed, its benchmark result stands.
    failed = any(n.status in ("failed", "skipped") or n.error for n in nodes.values())
    if not matrix.is_main_process():
        return 1 if failed else 0
    width = max(len(name) for name in nodes)
    for node in nodes.values():
        state = node.action if args.plan else node.status
        line = f"{node.name:<{width}}  {node.kind:<6} {state:<8}"
        if node.summary:
            line += f" accuracy {node.summary['generation']['overall']:.3f}"
        if node.error:
            line += f"  {node.error}"
        print(line)
    if not args.plan and recipe.eval is not None:
        print(f"report: {recipe.output_dir}/report/report.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
