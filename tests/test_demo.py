"""htc.demo: the pictures name what each panel shows."""

import numpy as np

from htc.demo import TITLE_HEIGHT, titled


def test_a_titled_panel_keeps_the_panel_under_a_band_with_its_title():
    panel = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pictures = {title: titled(panel, title) for title in ("image", "prediction: semantic")}
    for picture in pictures.values():
        assert picture.shape == (256 + TITLE_HEIGHT, 256, 3) and picture.dtype == np.uint8
        assert np.array_equal(picture[TITLE_HEIGHT:], panel)
        band = picture[:TITLE_HEIGHT]
        assert (band < 100).any() and (band == 255).mean() > 0.7  # dark text on white
    first, second = (p[:TITLE_HEIGHT] for p in pictures.values())
    assert (first < 100).sum() < (second < 100).sum()  # a longer title, more ink
