"""CIFAR-100's 20 superclasses (the archive's coarse labels), for the evaluation only.

They live in their own small file (`data/labels.json`, the `labels` stage), not in the prepared data: the training
stages depend on `data/prepared`, and superclasses change nothing they do. Every fine class belongs to exactly one
superclass, so the file holds the mapping, checked against every test image of the archive."""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vggdepth.download import md5sum
from vggdepth.errors import VggdepthError
from vggdepth.files import write_json
from vggdepth.schemas import LabelsRecord, RecordError, read_record


class LabelsError(VggdepthError):
    """The superclass labels are missing, damaged, or of another archive than the prepared data."""


@dataclass(frozen=True)
class Labels:
    """Fine class names, superclass names, and each fine class's superclass."""

    archive_md5: str
    classes: list[str]
    superclasses: list[str]
    superclass_of: np.ndarray  # (classes,) int

    def to_json(self) -> dict:
        return {
            "archive_md5": self.archive_md5,
            "classes": self.classes,
            "superclasses": self.superclasses,
            "superclass_of": [int(c) for c in self.superclass_of],
        }


def read_labels(archive: str | Path) -> Labels:
    """The class and superclass names of the CIFAR-100 python archive, and the fine-to-superclass mapping that
    every image of its test and training sets follows (an archive where one does not is refused)."""
    wanted = {"meta", "test", "train"}
    found: dict[str, dict] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in wanted and Path(member.name).parent.name == "cifar-100-python":
                    found[name] = pickle.load(tar.extractfile(member), encoding="latin1")  # noqa: S301 (md5-verified)
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise LabelsError(f"cannot read {archive} as the CIFAR-100 python archive (.tar.gz): {exc}") from None
    if missing := sorted(wanted - found.keys()):
        raise LabelsError(f"{archive} has no cifar-100-python/{', cifar-100-python/'.join(missing)}")
    classes = list(found["meta"].get("fine_label_names", []))
    superclasses = list(found["meta"].get("coarse_label_names", []))
    if len(classes) != 100 or len(superclasses) != 20:
        raise LabelsError(
            f"{archive}: meta names {len(classes)} classes and {len(superclasses)} superclasses, expected 100 and 20"
        )
    superclass_of = np.full(len(classes), -1)
    for split in ("train", "test"):
        fine = np.asarray(found[split].get("fine_labels", []))
        coarse = np.asarray(found[split].get("coarse_labels", []))
        if fine.shape != coarse.shape or not len(fine):
            raise LabelsError(f"{archive}: cifar-100-python/{split} needs one fine and one coarse label per image")
        for label in np.unique(fine):
            seen = np.unique(coarse[fine == label])
            if len(seen) != 1 or superclass_of[label] not in (-1, seen[0]):
                raise LabelsError(f"{archive}: class {classes[label]!r} is in more than one superclass")
            superclass_of[label] = seen[0]
    if (superclass_of < 0).any():
        raise LabelsError(f"{archive}: class {classes[int(np.argmin(superclass_of))]!r} has no image")
    return Labels(md5sum(archive), classes, superclasses, superclass_of)


def write_labels(archive: str | Path, out: str | Path) -> Labels:
    labels = read_labels(archive)
    write_json(out, labels.to_json())
    return labels


def load_labels(path: str | Path, stats: dict) -> Labels:
    """`labels.json`, checked against the prepared data's `stats` (same archive, same class names)."""
    path = Path(path)
    remedy = "run `dvc repro labels` to make it again from the archive the data was prepared from"
    try:
        data = read_record(path, LabelsRecord, remedy).model_dump()
    except RecordError as exc:
        raise LabelsError(str(exc)) from None
    if data["archive_md5"] != stats.get("archive_md5"):
        raise LabelsError(
            f"{path} is of the archive with md5 {data['archive_md5']}, the prepared data of "
            f"{stats.get('archive_md5')}; {remedy}"
        )
    superclass_of = np.asarray(data["superclass_of"])
    superclasses = data["superclasses"]
    if data["classes"] != stats.get("classes") or superclass_of.shape != (len(data["classes"]),):
        raise LabelsError(f"{path} does not name the prepared data's classes one superclass each; {remedy}")
    if superclass_of.max() >= len(superclasses):
        raise LabelsError(f"{path}: superclass_of must hold indices into its {len(superclasses)} superclasses")
    return Labels(data["archive_md5"], data["classes"], superclasses, superclass_of)
