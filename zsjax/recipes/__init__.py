"""End-to-end recipes on real data: `python -m zsjax.recipes.hotpotqa --workdir DIR [--quick]`."""
