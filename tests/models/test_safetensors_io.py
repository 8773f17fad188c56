"""Our streaming safetensors reader/writer against the reference `safetensors` library."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from zsjax.models import safetensors_io


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_read_matches_reference_writer(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(3, 5, generator=g) * 100).to(dtype),
               "b.c": (torch.randn(7, generator=g) * 100).to(dtype),
               "scalar": torch.tensor(3).to(dtype)}
    save_file(tensors, tmp_path / "x.safetensors")
    with safetensors_io.SafetensorsFile(str(tmp_path / "x.safetensors")) as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, ref in tensors.items():
            ours = f.read(name)
            assert ours.shape == tuple(ref.shape)
            np.testing.assert_array_equal(ours.astype(np.float64), ref.to(torch.float64).numpy())


def test_write_matches_reference_reader(tmp_path):
    import ml_dtypes
    arrays = {"w": np.random.RandomState(0).randn(4, 6).astype(ml_dtypes.bfloat16),
              "v": np.arange(10, dtype=np.float32)}
    path = str(tmp_path / "y.safetensors")
    safetensors_io.write(path, [(k, v.shape, v.dtype) for k, v in arrays.items()],
                         arrays.__getitem__, metadata={"format": "pt"})
    ref = load_file(path)
    assert ref["w"].dtype == torch.bfloat16
    np.testing.assert_array_equal(ref["w"].float().numpy(), arrays["w"].astype(np.float32))
    np.testing.assert_array_equal(ref["v"].numpy(), arrays["v"])
