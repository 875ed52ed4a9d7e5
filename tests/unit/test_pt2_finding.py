"""The finding behind docs/models.md's ``.pt2`` section, kept honest: with the pinned torch, loading a
``torch.export`` program runs pickled code that the file itself asks for, so uploads of ``.pt2`` programs are
not supported (the registry refuses them before parsing).

The program is a real one (``torch.export.save`` of a small module); the test then edits its archive the way
an uploader could: the weights config marks one weight as pickled (``use_pickle``) and that weight's bytes are
a ``torch.save`` of an object whose unpickling writes a file. ``torch.export.load`` writes it. Should a future
torch refuse such a file, this test fails and the docs' finding (and the refusal) must be revisited.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from ensemble_core import registry_io as rio


class _Marker:
    """Unpickling calls ``_write_marker(path)`` (a module-level function, as any pickle payload may name)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_write_marker, (self.path,))


def _write_marker(path: str) -> torch.Tensor:
    Path(path).write_text("code from the .pt2 file ran")
    return torch.zeros(2)


def _program(tmp_path: Path) -> Path:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(Tiny(), (torch.zeros(1, 3),)), str(path))
    return path


def _with_pickled_weight(src: Path, dst: Path, marker: Path) -> None:
    """``src`` with its bias weight replaced by a pickled payload that the weights config declares pickled."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        cfg_name = next(n for n in names if n.endswith("data/weights/model_weights_config.json"))
        cfg = json.loads(zin.read(cfg_name))
        bias = cfg["config"]["lin.bias"]
        bias["use_pickle"] = True
        payload = io.BytesIO()
        torch.save(_Marker(str(marker)), payload)
        weight_name = cfg_name.rsplit("/", 1)[0] + "/" + bias["path_name"]
        for n in names:
            data = zin.read(n)
            if n == cfg_name:
                data = json.dumps(cfg).encode()
            elif n == weight_name:
                data = payload.getvalue()
            zout.writestr(zin.getinfo(n), data)


def test_loading_a_pt2_program_runs_pickled_code_the_file_asks_for(tmp_path: Path) -> None:
    src = _program(tmp_path)
    torch.export.load(str(src))  # an untouched program loads
    marker = tmp_path / "marker.txt"
    crafted = tmp_path / "crafted.pt2"
    _with_pickled_weight(src, crafted, marker)
    assert not marker.exists()  # saving the payload ran nothing
    with contextlib.suppress(Exception):  # whatever happens after the unpickling, the code has run by then
        torch.export.load(str(crafted))
    assert marker.read_text() == "code from the .pt2 file ran"


def test_the_registry_refuses_a_pt2_program_before_parsing_it(tmp_path: Path) -> None:
    data = _program(tmp_path).read_bytes()
    with pytest.raises(rio.UploadError, match="torch.export .pt2 program"):
        rio.parse_safetensors(data, "weights")
