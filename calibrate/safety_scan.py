"""The safety scan of a ``torch.export`` archive: refused before it is loaded when loading it would
unpickle anything but plain tensors (a model file never makes the SDK run code)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from .canonical_model import UserModelError


def check_pt2_has_no_code(path: Path, what: str) -> None:
    """Refuse a ``torch.export`` archive whose loading would unpickle anything but plain tensors.

    ``torch.export.load`` reads some members with torch's unrestricted loader (payloads saved with
    pickle, legacy weight files, sample inputs that the restricted loader rejects, custom and opaque
    objects): a crafted archive runs code there. So this scan runs first, and :func:`from_pt2` calls
    ``torch.export.load`` only on an archive that passed it: every such member must load with
    ``torch.load(weights_only=True)``, and custom and opaque objects are refused.
    """
    from torch.export.pt2_archive import constants as k
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(str(path))
        names = list(reader.get_file_names())
    except Exception as exc:  # noqa: BLE001
        raise UserModelError(f"{what} is not a readable torch.export archive: {exc}") from None
    pickled = [n for n in names if n.startswith(k.SAMPLE_INPUTS_DIR)]
    pickled += [n for n in names if n.startswith((k.WEIGHTS_DIR, k.CONSTANTS_DIR)) and n.endswith(".pt")]
    for name in names:
        if not name.startswith((k.WEIGHTS_DIR, k.CONSTANTS_DIR)) or not name.endswith("_config.json"):
            continue
        try:
            entries = json.loads(reader.read_string(name)).get("config", {}).values()
        except (ValueError, AttributeError) as exc:
            raise UserModelError(f"{what}: {name} is not a valid payload config: {exc}") from None
        for entry in entries:
            member = entry.get("path_name", "") if isinstance(entry, dict) else ""
            if member.startswith((k.CUSTOM_OBJ_FILENAME_PREFIX, k.OPAQUE_OBJ_FILENAME_PREFIX)):
                raise UserModelError(
                    f"{what} holds a Python object ({member}) that loads by unpickling, which could run "
                    f"code: export the model with tensors only, or use its ONNX"
                )
            if isinstance(entry, dict) and entry.get("use_pickle"):
                pickled.append(name.rsplit("/", 1)[0] + "/" + member)
    for name in pickled:
        try:
            torch.load(io.BytesIO(reader.read_bytes(name)), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UserModelError(
                f"{what}: {name} does not load as plain tensors (torch.load(weights_only=True): "
                f"{str(exc).splitlines()[0]}); refusing to unpickle it"
            ) from None
