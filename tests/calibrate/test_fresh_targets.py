"""Surrogate training on fresh Monte Carlo targets: a real base model labels each step's images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rrise.calibrate.mc import sample_counts
from rrise.calibrate.models import build_model
from rrise.calibrate.train import hard_example_weights, mean_kl, train_base, train_surrogate_fresh
from rrise.datasets import load_dataset

SIGMA = 0.25


@pytest.fixture(scope="module")
def setting():
    """A noise-trained base model on digits, its labeller, and 100-draw held-out targets."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    base = build_model("cnn-small", 1, 10, 8, seed=0)
    train_base(
        base, train.images[:400], train.labels[:400], sigma=SIGMA, epochs=2, seed=0, show_progress=False
    )
    calls: list[int] = []

    def label(x: np.ndarray, offset: int) -> np.ndarray:
        calls.append(offset)
        return sample_counts(base, x, 4, SIGMA, batch_size=512, seed=7, index_offset=offset, backend="torch")

    val_counts = sample_counts(base, test.images[:80], 100, SIGMA, seed=8, backend="torch")
    return train.images, test.images[:80], val_counts, label, calls


def _fit(setting, steps: int, checkpoint=None, label=None, model=None, augment="none", weights=None):
    pool, val_x, val_counts, default_label, _ = setting
    model = model or build_model("cnn-small", 1, 10, 8, seed=1)
    return train_surrogate_fresh(
        model,
        pool,
        label or default_label,
        steps=steps,
        draws=4,
        batch_size=64,
        lr=3e-3,
        seed=0,
        val_images=val_x,
        val_counts=val_counts,
        eval_every=10,
        show_progress=False,
        checkpoint=checkpoint,
        augment=augment,
        weights=weights,
    )


def test_fresh_targets_fit_the_smoothed_distribution_and_count_every_draw(setting):
    _, val_x, val_counts, _, calls = setting
    before = mean_kl(build_model("cnn-small", 1, 10, 8, seed=1), val_x, val_counts)
    calls.clear()
    model, history = _fit(setting, 30)
    assert history["base_evaluations"] == 30 * 64 * 4
    assert calls == [s * 64 for s in range(30)]  # each step its own inputs' noise streams
    assert history["eval_steps"] == [10, 20, 30]
    best = history["best_step"]
    assert best == history["eval_steps"][int(np.argmin(history["val_kl"]))]
    after = mean_kl(model, val_x, val_counts)
    assert after == pytest.approx(min(history["val_kl"]), rel=1e-5)
    assert after < 0.5 * before, (before, after)


def test_fresh_training_is_reproducible_and_resumes_to_the_same_weights(setting, tmp_path):
    torch.set_num_threads(1)
    whole, _ = _fit(setting, 20)
    ckpt = tmp_path / "fresh.ckpt"
    label = setting[3]

    def interrupted(x, offset):
        if offset >= 15 * 64:  # after the step-10 checkpoint
            raise KeyboardInterrupt
        return label(x, offset)

    with pytest.raises(KeyboardInterrupt):
        _fit(setting, 20, checkpoint=ckpt, label=interrupted)
    assert ckpt.exists()
    resumed, history = _fit(setting, 20, checkpoint=ckpt)
    assert history["eval_steps"] == [10, 20]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="other settings"):
        _fit(setting, 30, checkpoint=ckpt)


class _Recorder(torch.nn.Module):
    """A model that keeps every input it is trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.seen = build_model("cnn-small", 1, 10, 8, seed=1), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().numpy().copy())
        return self.net(x)


def _augmented_run(setting, augment: str):
    """(images labelled, images trained on) over 3 steps of fresh training with ``augment``."""
    labelled = []

    def label(x, offset):
        labelled.append(x.copy())
        return setting[3](x, offset)

    model = _Recorder()
    _fit(setting, 3, label=label, model=model, augment=augment)
    return labelled, model.seen


def test_fresh_targets_are_drawn_on_the_augmented_image_the_surrogate_trains_on(setting):
    pool = setting[0]
    labelled, trained = _augmented_run(setting, "shift+flip")
    assert len(labelled) == len(trained) == 3
    for x, seen in zip(labelled, trained):
        np.testing.assert_array_equal(x, seen)  # the targets are exact for the image trained on
    rows = {pool[i].tobytes() for i in range(len(pool))}
    changed = [sum(img.tobytes() not in rows for img in x) for x in labelled]
    assert min(changed) > 32, changed  # most of each batch of 64 is shifted or flipped
    again, _ = _augmented_run(setting, "shift+flip")
    for a, b in zip(labelled, again):
        np.testing.assert_array_equal(a, b)  # seeded by the step: a resumed run sees the same inputs
    plain, _ = _augmented_run(setting, "none")
    assert all(img.tobytes() in rows for x in plain for img in x)


def test_hard_example_weights_favour_uncertain_images_and_leave_none_out():
    counts = np.array([[16, 0], [8, 8], [12, 4], [16, 0]])
    w = hard_example_weights(counts, 0.6)
    assert w.sum() == pytest.approx(1.0)
    hard = np.array([0.0, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(w, 0.4 / 4 + 0.6 * hard / hard.sum())
    assert w[1] > w[2] > w[0] == w[3] > 0  # a certain image keeps its uniform share
    np.testing.assert_allclose(hard_example_weights(counts, 0.0), 0.25)
    np.testing.assert_allclose(hard_example_weights(counts[[0, 3]], 0.6), 0.5)  # nothing uncertain
    with pytest.raises(ValueError, match="hard_fraction"):
        hard_example_weights(counts, 1.0)


def test_fresh_batches_are_drawn_in_proportion_to_the_weights(setting):
    pool = setting[0]
    weights = np.zeros(len(pool))
    weights[: len(pool) // 4] = 1.0 / (len(pool) // 4)  # only the first quarter may be drawn
    labelled = []

    def label(x, offset):
        labelled.append(x.copy())
        return setting[3](x, offset)

    _fit(setting, 3, label=label, weights=weights)
    allowed = {pool[i].tobytes() for i in range(len(pool) // 4)}
    assert len(labelled) == 3 and all(img.tobytes() in allowed for x in labelled for img in x)
    with pytest.raises(ValueError, match="summing to 1"):
        _fit(setting, 3, weights=weights[:-1] / weights[:-1].sum())
    with pytest.raises(ValueError, match="fewer than one batch"):
        few = np.zeros(len(pool))
        few[:10] = 0.1
        _fit(setting, 3, weights=few)


def test_fresh_training_refuses_bad_settings(setting):
    pool, val_x, val_counts, label, _ = setting
    model = build_model("cnn-small", 1, 10, 8, seed=1)
    kw = dict(val_images=val_x, val_counts=val_counts, show_progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_surrogate_fresh(model, pool, label, steps=0, draws=4, **kw)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_surrogate_fresh(model, pool[:10], label, steps=2, draws=4, batch_size=64, **kw)
    with pytest.raises(ValueError, match="counts of 5 draws"):
        train_surrogate_fresh(model, pool, label, steps=2, draws=5, batch_size=8, **kw)
    with pytest.raises(ValueError, match="augment must be one of"):
        train_surrogate_fresh(model, pool, label, steps=2, draws=4, batch_size=8, augment="rotate", **kw)


def test_fresh_pool_is_every_training_image_outside_selection_and_calibration(tmp_path):
    from rrise.calibrate.fit import fresh_pool
    from rrise.calibrate.workdir import RunConfig, Workdir

    w = Workdir.open(tmp_path / "w", RunConfig(dataset="digits", profile="quick"), show_progress=False)
    sp, pool = w.splits(), fresh_pool(w)
    held_out = np.concatenate([sp["selection"], sp["calibration"]])
    assert not set(pool) & set(held_out)  # the calibration inputs never train the surrogate
    assert set(sp["base"]) <= set(pool)  # the base model's training images, and the rest
    assert len(pool) + len(set(held_out)) == len(w.data("train"))


def test_frozen_norm_layers_keep_their_statistics_while_the_rest_trains(setting):
    from torch import nn

    from rrise.calibrate.train import set_training_mode

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Dropout(0.5), nn.Linear(4 * 8 * 8, 10))  # fmt: skip

    x = torch.randn(16, 1, 8, 8) * 3 + 1
    frozen, live = net(), net()
    set_training_mode(frozen, True)
    set_training_mode(live, False)
    assert not frozen[1].training and frozen[4].training  # batch norm in eval mode, dropout trains
    assert live[1].training
    before = frozen[1].running_mean.clone()
    frozen(x), live(x)
    torch.testing.assert_close(frozen[1].running_mean, before)  # statistics untouched
    assert not torch.allclose(live[1].running_mean, before)
    # the fresh-target loop trains with them frozen: scale and shift move, statistics do not
    pool, val_x, val_counts, label, _ = setting
    model = net()
    model[1].running_mean.fill_(0.3)
    weight = model[1].weight.detach().clone()
    train_surrogate_fresh(
        model, pool, label, steps=3, draws=4, batch_size=64, lr=3e-3, seed=0, val_images=val_x,
        val_counts=val_counts, eval_every=3, show_progress=False, freeze_norm=True,
    )  # fmt: skip
    torch.testing.assert_close(model[1].running_mean, torch.full((4,), 0.3))
    assert not torch.allclose(model[1].weight, weight)
