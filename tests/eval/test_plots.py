import math

import matplotlib.image
import pytest

from lowbit.eval.plots import plot_bars


def test_plot_bars_writes_png(tmp_path):
    path = plot_bars(
        {"float": 0.41, "PTQ 4w": 0.35, "QAT 4w": 0.39}, "acc", "acc_norm", tmp_path / "a" / "acc.png"
    )
    img = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert img.shape[0] == 360 and img.shape[1] >= 400  # figsize * dpi
    assert img[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize(
    "values, match", [({}, "empty"), ({"a": math.nan}, "non-finite"), ({"a": "x"}, "numeric")]
)
def test_plot_bars_bad_values(tmp_path, values, match):
    with pytest.raises(ValueError, match=match):
        plot_bars(values, "t", "y", tmp_path / "p.png")
