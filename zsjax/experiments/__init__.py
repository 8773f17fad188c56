"""Experiments that measure zsjax against the paper's claims (`python -m zsjax.experiments.claims`)."""
