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


def test_a_save_that_fails_on_its_second_adapter_leaves_every_previous_file(tmp_path, monkeypatch):
    import torch
    from torch import nn

    import peftkit as pk
    from peftkit.io import hf_format

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=2))
    pk.apply(model, pk.LoRA(target_modules=["2"], rank=2), name="other")
    pk.save_adapter(model, tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert Path("other/adapter_model.safetensors") in before
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real, calls = hf_format.save_file, []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(hf_format, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pk.save_adapter(model, tmp_path)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
