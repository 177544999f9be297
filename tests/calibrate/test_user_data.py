"""The user's images: ImageFolder, .npz and built-in forms, bad data, and the seeded hash split."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rrise.calibrate.profiles import get_profile
from rrise.calibrate.user_data import (
    SPLITS,
    UserDataError,
    desired_sizes,
    load_images,
    minimum_sizes,
    plan_sizes,
    split_images,
)
from rrise.calibration import min_calibration_size
from rrise.runtime.preprocess import preprocess_spec

RGB8 = preprocess_spec("rgb", (8, 8))
GRAY8 = preprocess_spec("gray", (8, 8))


def _folder(root, counts: dict[str, int], size=(10, 12), seed=0):
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / cls / f"img{i:03d}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def test_image_folder_classes_labels_and_identity(tmp_path) -> None:
    root = _folder(tmp_path / "d", {"zebra": 3, "cat": 2, "dog": 4})
    (root / "cat" / "nested").mkdir()
    cv2.imwrite(str(root / "cat" / "nested" / "x.jpg"), np.full((9, 9, 3), 7, np.uint8))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    data = load_images(root, RGB8)
    assert data.classes == ("cat", "dog", "zebra")  # sorted folder names, torchvision's convention
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    assert data.names[:3] == ("cat/img000.png", "cat/img001.png", "cat/nested/x.jpg")
    assert data.images.shape == (10, 3, 8, 8) and data.pixels.dtype == np.uint8
    assert data.ignored == ("cat/notes.txt",) and "ignored 1" in " ".join(data.notes())
    x = np.asarray(data.images)
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    np.testing.assert_array_equal(data.images[[1, 3]], x[[1, 3]])
    assert data.digests.shape == (10, 32) and len({d.tobytes() for d in data.digests}) == 10
    assert load_images(root, RGB8).sha256 == data.sha256
    ds = data.to_dataset("calibration")
    assert ds.images.shape == (10, 3, 8, 8) and ds.classes == ["cat", "dog", "zebra"]


def test_links_out_of_a_class_folder_are_not_followed(tmp_path) -> None:
    root = _folder(tmp_path / "d", {"cat": 2, "dog": 3})
    (root / "cat" / "up").symlink_to("..", target_is_directory=True)
    (root / "cat" / "up2").symlink_to("../..", target_is_directory=True)
    (root / "cat" / "sub").mkdir()
    cv2.imwrite(str(root / "cat" / "sub" / "x.png"), np.full((9, 9, 3), 7, np.uint8))
    (root / "cat" / "sub" / "again").symlink_to("..", target_is_directory=True)  # back to cat: read once
    data = load_images(root, RGB8)
    assert data.names == ("cat/img000.png", "cat/img001.png", "cat/sub/x.png") + tuple(
        f"dog/img{i:03d}.png" for i in range(3)
    )
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
    assert {"cat/up", "cat/up2"} <= set(data.ignored)


def test_bad_folders_are_refused_by_name(tmp_path) -> None:
    one = _folder(tmp_path / "one", {"only": 3})
    with pytest.raises(UserDataError, match=r"1 class folder\(s\) \(only\).*at least 2"):
        load_images(one, RGB8)
    loose = tmp_path / "loose"
    loose.mkdir()
    cv2.imwrite(str(loose / "a.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserDataError, match="lie directly in it"):
        load_images(loose, RGB8)
    empty = _folder(tmp_path / "empty", {"a": 2, "b": 0})
    with pytest.raises(UserDataError, match="class folder 'b' has no images"):
        load_images(empty, RGB8)
    with pytest.raises(UserDataError, match="neither a folder"):
        load_images(tmp_path / "missing", RGB8)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(UserDataError, match="not an .npz"):
        load_images(tmp_path / "x.csv", RGB8)


def test_undecodable_images_are_skipped_and_counted_or_refused(tmp_path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "b" / "empty.jpg").write_bytes(b"")
    data = load_images(root, RGB8)
    assert len(data) == 4
    assert sorted(p for p, _ in data.skipped) == ["a/broken.png", "b/empty.jpg"]
    assert "skipped 2 image file(s) that do not decode" in data.notes()[0]
    with pytest.raises(UserDataError, match=r"image .*broken\.png does not decode"):
        load_images(root, RGB8, bad_images="refuse")
    only_broken = _folder(tmp_path / "e", {"a": 2, "b": 0})
    (only_broken / "b" / "bad.png").write_bytes(b"junk")
    with pytest.raises(UserDataError, match="class 'b' has no usable images"):
        load_images(only_broken, RGB8)


def test_npz_forms_and_their_errors(tmp_path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "g.npz", images=gray, labels=labels, classes=np.array(["x", "y", "z"]))
    data = load_images(tmp_path / "g.npz", GRAY8)
    assert data.classes == ("x", "y", "z") and data.names[0] == "images[0]"
    np.testing.assert_array_equal(data.images[:, 0], gray.astype(np.float32) / np.float32(255))
    assert data.source["sha256"] and data.source["form"] == "[N, H, W] uint8 grey"
    # non-quantized floats stay float (the float frame path)
    f = rng.random((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=f, labels=labels)
    data = load_images(tmp_path / "f.npz", RGB8)
    assert data.pixels.dtype == np.float32 and data.classes == ("0", "1", "2")
    np.testing.assert_array_equal(data.images, f)  # same size, RGB model: nothing changes

    def refused(match: str, **arrays) -> None:
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(UserDataError, match=match):
            load_images(tmp_path / "bad.npz", RGB8)

    refused("lacks labels", images=gray)
    refused(r"shape \[6, 8, 8, 2\]", images=np.zeros((6, 8, 8, 2), np.uint8), labels=labels)
    refused(
        r"images\[2\] has values outside",
        images=np.where(np.arange(6)[:, None, None, None] == 2, 2.0, f),
        labels=labels,
    )
    refused(r"labels has shape \[5\]", images=gray, labels=labels[:5])
    refused(r"labels\[1\] = -1", images=gray, labels=np.array([0, -1, 2, 0, 1, 2]))
    refused("classes has only 2", images=gray, labels=labels, classes=np.array(["a", "b"]))
    refused("must be integers", images=gray, labels=labels + 0.5)
    refused(
        "class 'c' has no usable images", images=gray, labels=labels % 2, classes=np.array(["a", "b", "c"])
    )
    refused(r"has 1 class", images=gray, labels=np.zeros(6, np.int64))
    np.savez(tmp_path / "obj.npz", images=gray, labels=np.array([object()] * 6, dtype=object))
    with pytest.raises(ValueError, match="unpickling"):
        load_images(tmp_path / "obj.npz", RGB8)


def test_builtin_digits_with_split_suffix() -> None:
    test = load_images("digits", GRAY8)
    train = load_images("digits:train", GRAY8, builtin_split="test")
    assert (len(test), len(train)) == (500, 1297) and test.name == "digits:test"
    assert test.pixels.dtype == np.float32  # k/16 values are not uint8: the float frame path
    from rrise.datasets import load_dataset

    np.testing.assert_array_equal(test.images, load_dataset("digits", "test").images)


def _npz_set(tmp_path, n: int, seed: int = 0, name: str = "d.npz", k: int = 3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % k
    np.savez(tmp_path / name, images=images, labels=labels)
    return load_images(tmp_path / name, GRAY8), images, labels


def _ids(splits, split: str) -> set[bytes]:
    return {splits.data.digests[i].tobytes() for i in splits.index[split]}


def test_profile_split_is_disjoint_seeded_and_stable_when_images_are_added(tmp_path) -> None:
    sizes = {"targets": 300, "selection": 50, "calibration": 150, "test": 50}
    small, images, labels = _npz_set(tmp_path, 1500)
    a = split_images(small, sizes, alpha=0.05, seed=1)
    assert a.plan.regime == "profile" and a.sizes() == sizes
    ids = {s: _ids(a, s) for s in SPLITS}
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1 :]:
            assert not ids[s] & ids[t]
    assert (
        split_images(small, sizes, alpha=0.05, seed=1).index["calibration"].tolist()
        == a.index["calibration"].tolist()
    )
    assert (
        split_images(small, sizes, alpha=0.05, seed=2).index["calibration"].tolist()
        != a.index["calibration"].tolist()
    )
    # more images (appended, and the originals shuffled): no original image changes split
    more_images = np.concatenate(
        [images, np.random.default_rng(9).integers(0, 256, (1500, 8, 8), dtype=np.uint8)]
    )
    perm = np.random.default_rng(4).permutation(3000)
    np.savez(tmp_path / "more.npz", images=more_images[perm], labels=(np.arange(3000) % 3)[perm])
    b = split_images(load_images(tmp_path / "more.npz", GRAY8), sizes, alpha=0.05, seed=1)
    bucket_a = _bucket_of(a)
    bucket_b = _bucket_of(b)
    moved = [d for d, s in bucket_a.items() if bucket_b.get(d, s) != s]
    assert not moved
    assert b.sizes() == sizes
    record = a.to_dict()
    assert (
        record["sizes"] == sizes
        and record["plan"]["regime"] == "profile"
        and len(record["split_sha256"]) == 4
    )


def _bucket_of(splits) -> dict[bytes, str]:
    """Every image's hash bucket (used or not), recomputed the way split_images assigns it."""
    from rrise.calibrate.user_data import _hash_keys

    sizes = splits.plan.sizes
    bounds = np.cumsum([sizes[s] for s in SPLITS]) / sum(sizes.values())
    keys = _hash_keys(splits.data.digests, splits.seed).astype(np.float64) / 2.0**64
    which = np.searchsorted(bounds, keys, side="right")
    out = {d.tobytes(): SPLITS[b] for d, b in zip(splits.data.digests, which)}
    for s in SPLITS:  # and the used ones really are in their bucket
        assert all(out[splits.data.digests[i].tobytes()] == s for i in splits.index[s])
    return out


def test_scarce_data_is_scaled_and_too_little_is_refused_with_the_minimum(tmp_path) -> None:
    data, _, _ = _npz_set(tmp_path, 400)
    desired = desired_sizes(get_profile("quick"))
    mins = minimum_sizes(0.01, 3)
    assert mins["calibration"] == min_calibration_size(0.01)
    sp = split_images(data, desired, alpha=0.01)
    assert sp.plan.regime == "scaled" and sum(sp.sizes().values()) == 400
    assert all(sp.sizes()[s] >= mins[s] for s in SPLITS)
    assert any("fewer images (400)" in n for n in sp.notes)
    need = sum(mins.values())
    small, _, _ = _npz_set(tmp_path, need - 1, name="s.npz")
    with pytest.raises(
        UserDataError,
        match=rf"holds {need - 1} usable image\(s\); the smallest number that works for α = 0.01 is {need}",
    ):
        split_images(small, desired, alpha=0.01)
    exact, _, _ = _npz_set(tmp_path, need, name="e.npz")
    assert split_images(exact, desired, alpha=0.01).sizes() == mins
    plan = plan_sizes(10_000, desired, minimum_sizes(0.001, 3), alpha=0.001)
    assert plan.sizes["calibration"] == min_calibration_size(0.001)  # a profile below the minimum is raised


def test_train_data_only_feeds_targets_and_duplicates_never_straddle(tmp_path) -> None:
    data, images, labels = _npz_set(tmp_path, 900)
    rng = np.random.default_rng(5)
    train_images = np.concatenate([images[:50], rng.integers(0, 256, (400, 8, 8), dtype=np.uint8)])
    np.savez(tmp_path / "t.npz", images=train_images, labels=np.arange(450) % 3)
    train = load_images(tmp_path / "t.npz", GRAY8, what="TRAIN_DATA")
    sizes = {"targets": 300, "selection": 100, "calibration": 200, "test": 100}
    sp = split_images(data, sizes, alpha=0.05, train=train)
    assert len(sp.train_index) == 300 and len(sp.index["targets"]) == 0  # train fills the targets
    assert any("also in" in n for n in sp.notes)
    train_ids = {d.tobytes() for d in train.digests}
    for s in ("selection", "calibration", "test"):
        assert not _ids(sp, s) & train_ids
    targets = sp.subset("targets")
    assert len(targets) == 300 and targets.images.shape == (300, 1, 8, 8)
    # duplicates within DATA: used once
    dup = np.concatenate([images, images[:10]])
    np.savez(tmp_path / "dup.npz", images=dup, labels=np.arange(910) % 3)
    sp = split_images(load_images(tmp_path / "dup.npz", GRAY8), sizes, alpha=0.05)
    assert any("duplicate" in n for n in sp.notes)
    used = np.concatenate([sp.index[s] for s in SPLITS])
    assert len({sp.data.digests[i].tobytes() for i in used}) == len(used)
    bad = load_images("digits", GRAY8)
    with pytest.raises(UserDataError, match="classes"):
        split_images(data, sizes, alpha=0.05, train=bad)


def test_rule_and_reference_subsets_sample_every_class_in_proportion(tmp_path) -> None:
    """A folder loads class by class: the first n indices of a split are its first classes; the
    subsets `rrise build` takes (rule selection, reference inputs) go by the seeded hash instead."""
    from dataclasses import replace

    from rrise.calibrate.folder_data import combine
    from rrise.calibrate.specs import USER_DATASET

    classes = [f"c{k}" for k in range(10)]
    data = load_images(str(_folder(tmp_path / "f", dict.fromkeys(classes, 60), size=(6, 6))), RGB8)
    sizes = {"targets": 200, "selection": 200, "calibration": 100, "test": 100}
    sp = split_images(data, sizes, alpha=0.1, seed=3)
    prof = replace(get_profile("smoke", USER_DATASET), n_rule=50, n_ref_inputs=50)
    folder = combine(None, sp, prof)
    labels = folder.dataset("test").labels
    in_load_order = np.bincount(labels[sp.index["selection"][:50]], minlength=10)
    assert (in_load_order == 0).sum() >= 5  # the finding: half the classes never seen
    for subset in (folder.splits()["rules"], folder.first_inputs("test", prof.n_ref_inputs)):
        assert len(subset) == 50 and np.all(np.diff(subset) > 0)
        per_class = np.bincount(labels[subset], minlength=10)
        assert per_class.min() >= 1 and per_class.max() <= 12, per_class  # 5 expected each
    assert set(folder.splits()["rules"]) <= set(sp.index["selection"])
    again = combine(None, split_images(data, sizes, alpha=0.1, seed=3), prof)
    assert np.array_equal(again.splits()["rules"], folder.splits()["rules"])  # seeded: the same subset


def test_images_no_split_uses_are_counted_per_split_and_said(tmp_path) -> None:
    from rrise.calibrate.report import _images_lines

    sizes = {"targets": 300, "selection": 50, "calibration": 150, "test": 50}
    small, images, _ = _npz_set(tmp_path, 1500)
    a = split_images(small, sizes, alpha=0.05, seed=1)
    assert a.plan.regime == "profile" and a.used() == 550
    assert set(a.unused) <= set(SPLITS) and sum(a.unused.values()) == 1500 - 550
    share = {s: n / 550 for s, n in sizes.items()}  # each hash bucket holds about its share of 1,500
    for s in SPLITS:
        assert abs(a.unused.get(s, 0) + sizes[s] - 1500 * share[s]) < 0.25 * 1500 * share[s] + 10, a.unused
    assert "550 of 1,500 images of" in a.summary() and f"targets {a.unused['targets']:,}" in a.summary()
    record = a.to_dict()
    assert record["used"] == 550 and record["unused"] == a.unused and record["images"] == 1500
    text = "\n".join(_images_lines(record))
    assert (
        "550 of 1,500 images used." in text and f"{a.unused['test']:,} in the test split's hash share" in text
    )

    # the images no split needs may teach the surrogate (fresh targets), never a held-out split's
    from rrise.calibrate.folder_data import UserFolderData

    held_out = np.concatenate([a.index[s] for s in ("selection", "calibration", "test")])
    assert len(a.spare) == 1500 - 550 and not np.intersect1d(a.spare, held_out).size
    folder = UserFolderData(spec=None, images=small, split=a, joined=None, index=dict(a.index))
    pool = folder.fresh_pool()
    assert len(pool) == 300 + 950 and not np.intersect1d(pool, held_out).size
    assert np.array_equal(pool, np.union1d(a.index["targets"], a.spare))

    # duplicates and scaled sizes: what no split takes is counted as "none"
    doubled = np.concatenate([images[:300], images[:100]])
    np.savez(tmp_path / "dup.npz", images=doubled, labels=np.arange(400) % 3)
    dup = split_images(load_images(tmp_path / "dup.npz", GRAY8), sizes, alpha=0.05, seed=1)
    assert dup.plan.regime == "scaled" and dup.unused.get("none", 0) >= 100
    assert dup.used() + sum(dup.unused.values()) == 400
    assert not np.intersect1d(dup.spare, np.concatenate([dup.index[s] for s in SPLITS])).size
    assert len(np.unique(dup.data.digests[np.union1d(dup.index["targets"], dup.spare)], axis=0)) == len(
        np.union1d(dup.index["targets"], dup.spare)
    )  # no duplicate image twice in the pool
