"""Model-loading config shared by the experiment configs (foundation issue).

    from configs import model
    cfg = model.get_config("/path/to/hf_folder")

Holds a model folder, dtype, mesh shape and the logical-axis sharding rules: a stand-alone
model-loading config (the sharding tests use it). The training configs (configs/common.py) do
not embed it; they have their own `policy` and `simulator` keys.
"""

import ml_collections

from zsjax import sharding


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Mesh shape; -1 takes all remaining devices."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.path = arg  # Hugging Face model folder (config.json + *.safetensors)
    config.dtype = "bfloat16"
    config.mesh = mesh_config()
    # Logical axis name -> mesh axes. Change the sharding strategy here, not in model code.
    config.rules = [list(r) for r in sharding.DEFAULT_RULES]
    config.lock()
    return config
