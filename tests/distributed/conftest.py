"""Fixtures of the distributed tests (helpers live in ``torchrun_helpers``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchrun_helpers import TEXT


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain text, packed into equal 16-token blocks: every rank's micro-batch has the same token count."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": " ".join(TEXT[i : i + 9])} for i in range(0, len(TEXT) - 9, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
