"""The command line on the tiny pipeline."""

import pytest
from PIL import Image

from diffdistill.cli import main


def test_sample_writes_a_png(tiny_sd, tmp_path):
    out = tmp_path / "s.png"
    assert main(["sample", tiny_sd, "a digit 1", "--steps", "2", "--num-images", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # a 2x2 grid with 2-pixel padding


def test_bad_arguments(tiny_sd, capsys):
    assert main(["sample", tiny_sd, "x", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
