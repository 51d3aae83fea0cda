import io

import numpy as np
import pytest
from PIL import Image

from dml_core.metrics import OpisResult, opis, save_utility_plot, utility_plot_png
from tests.dml_core.metrics.helpers import clustered


def test_png_renders_curves(tmp_path):
    z, y = clustered(12, 20, 8, spread=np.linspace(0.4, 1.4, 12), seed=1)
    res = opis(z, y)
    png = utility_plot_png(res, title="test")
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert img.shape[0] > 300 and img.shape[1] > 500
    # shaded calibration range (orange tint) and dark pooled curve are both present
    orange = (np.abs(img - np.array([255, 235, 219])).sum(axis=-1) < 12)  # tab:orange at alpha 0.15 on white
    black = img.sum(axis=-1) < 60
    assert orange.mean() > 0.02 and black.mean() > 0.002
    url = save_utility_plot(res, str(tmp_path / "u.png"))
    assert open(url, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_needs_curves():
    z, y = clustered(4, 10, 8, seed=2)
    light = OpisResult.from_dict(opis(z, y).to_dict())
    with pytest.raises(ValueError, match="carries no curves"):
        utility_plot_png(light)
