"""The built-in synthetic demo (`python -m zsjax.demo --workdir DIR`); see zsjax/demo/run.py."""
