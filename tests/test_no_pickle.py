"""No file a user can hand the SDK is unpickled (issue 13, "Found" 3).

A crafted file whose unpickling would create a marker file is handed to every loader of checkpoints,
weights and arrays; each refuses it and the marker never appears. A control first proves the file
is live: plain unpickling does create the marker.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code run by merely loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(folder: Path, marker: Path) -> dict[str, Path]:
    """The crafted files: a torch checkpoint (zip) holding the payload, a bare pickle named like a
    checkpoint, and an .npz whose object array is a pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "surrogate.ckpt"
    torch.save({"format": "rrise-model-v1", "state_dict": {}, "evil": _Payload(marker)}, ckpt)
    bare = folder / "weights.pt"
    with open(bare, "wb") as f:
        pickle.dump({"state_dict": _Payload(marker)}, f)
    npz = folder / "calibration.npz"
    np.savez(npz, images=np.array([_Payload(marker)], dtype=object))
    return {"ckpt": ckpt, "bare": bare, "npz": npz}


@pytest.fixture
def crafted(tmp_path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "PWNED"
    files = _crafted(tmp_path / "work", marker)
    return files, marker


def test_the_crafted_files_do_run_code_when_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    files = _crafted(tmp_path / "work", marker)
    torch.load(files["ckpt"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    with open(files["bare"], "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    np.load(files["npz"], allow_pickle=True)["images"]
    assert marker.exists()


def _resume_training(path: Path) -> None:
    from rrise.calibrate.models import build_model
    from rrise.calibrate.train import train_surrogate

    model = build_model("cnn-small", 1, 3, 8, mean=0.5, std=0.25)
    images = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    counts = np.array([[5, 3, 2]] * 4, dtype=np.int64)
    train_surrogate(model, images, counts, epochs=1, checkpoint=path, show_progress=False)


def _load_surrogate(path: Path) -> None:
    from rrise.calibrate.model_files import load_surrogate

    load_surrogate(path)


def _load_model(path: Path) -> None:
    from rrise.calibrate.model_files import load_model

    load_model(path)


def _user_weights(path: Path) -> None:
    from rrise.calibrate.user_model import load_weights

    load_weights(torch.nn.Linear(2, 2), path)


def _export_checkpoint(path: Path) -> None:
    from rrise.export.from_surrogate import read_surrogate

    path.with_suffix(".onnx").write_bytes(b"")  # read_surrogate wants the ONNX beside the checkpoint
    read_surrogate(path)


LOADERS = [_resume_training, _load_surrogate, _load_model, _user_weights, _export_checkpoint]


@pytest.mark.parametrize("kind", ["ckpt", "bare"])
@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__.strip("_"))
def test_every_checkpoint_loader_refuses_a_crafted_pickle(crafted, loader, kind):
    files, marker = crafted
    with pytest.raises(Exception) as info:  # each loader raises its own type, with its own words
        loader(files[kind])
    assert not marker.exists(), f"{loader.__name__} ran the pickle's code"
    assert not isinstance(info.value, (NameError, AttributeError, ImportError)), info.value


def test_npz_files_are_read_without_unpickling(crafted):
    from rrise.fileio import load_npz

    files, marker = crafted
    with pytest.raises(ValueError, match="needs unpickling"):
        load_npz(files["npz"], ("images",), "calibration file")
    with pytest.raises(ValueError, match="calibration file holds an array that needs unpickling"):
        load_npz(Path(files["npz"]).read_bytes(), ("images",), "calibration file")  # bytes read once
    assert not marker.exists()


def _pt2_with(member_bytes: bytes, tmp_path: Path, which: str) -> Path:
    """A valid ``torch.export`` archive of a tiny CNN whose member ``which`` is replaced."""
    import zipfile

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3))
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(net.eval(), (torch.zeros(2, 1, 8, 8),)), str(good))
    bad = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        names = src.namelist()
        target = next(n for n in names if which in n)
        for name in names:
            dst.writestr(name, member_bytes if name == target else src.read(name))
    return bad


@pytest.mark.parametrize("which", ["sample_inputs/", "_weights_config.json"])
def test_a_crafted_torch_export_archive_is_refused_before_torch_loads_it(tmp_path, which):
    """torch.export.load unpickles sample inputs that fail the safe loader, and payloads marked
    ``use_pickle``, with the full unpickler: the archive is scanned and refused first."""
    import io
    import json

    from rrise.calibrate.user_model import UserModelError, load_user_model

    marker = tmp_path / "PWNED"
    if which == "sample_inputs/":
        buf = io.BytesIO()
        torch.save(_Payload(marker), buf)
        member = buf.getvalue()
    else:  # a weight stored "with pickle", pointing at a pickle that runs code
        member = json.dumps({"config": {"0.weight": {"path_name": "weight_0", "use_pickle": True}}}).encode()
    archive = _pt2_with(member, tmp_path, which)
    if which != "sample_inputs/":  # the weight file the config points at holds the payload
        import zipfile

        buf = io.BytesIO()
        torch.save(_Payload(marker), buf)
        patched = tmp_path / "patched.pt2"
        with zipfile.ZipFile(archive) as src, zipfile.ZipFile(patched, "w") as dst:
            for name in src.namelist():
                data = src.read(name)
                dst.writestr(name, buf.getvalue() if name.endswith("data/weights/weight_0") else data)
        archive = patched
    with pytest.raises(UserModelError, match="refusing to unpickle|unpickling"):
        load_user_model(archive, input_size=(8, 8))
    assert not marker.exists()
    if which == "sample_inputs/":  # control: torch's own loader does run the payload
        with pytest.raises(Exception):  # noqa: B017 - whatever it raises after running the code
            torch.export.load(str(archive))
        assert marker.exists()
