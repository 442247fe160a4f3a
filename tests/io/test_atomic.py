"""``peftkit.io.atomic``: a file is its old content or its whole new content, never a torn mix."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.io.atomic import save_figure


class _TornFigure:
    """Writes half an image, then fails (as a full disk or a kill would)."""

    def savefig(self, path: Path, **kwargs: object) -> None:
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")


def test_a_failed_plot_keeps_the_previous_image_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "loss.png"
    target.write_bytes(b"previous image")
    with pytest.raises(OSError, match="No space left"):
        save_figure(_TornFigure(), target)
    assert target.read_bytes() == b"previous image" and [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_a_plot_is_saved_as_png_although_its_temporary_name_has_another_suffix(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    save_figure(fig, tmp_path / "loss.png")
    plt.close(fig)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
