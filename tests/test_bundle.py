"""Model bundles: save/load round trip, manifest, tamper detection, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rewrite_config

from retrieval.artifacts import dir_fingerprint, package_versions
from retrieval.bundle import Bundle, load_bundle, save_bundle
from retrieval.errors import ArtifactError
from retrieval.recommend import interest_vectors
from retrieval.samples import Histories


@pytest.fixture(scope="module")
def bundle(bundle_k4: Path) -> Bundle:
    return load_bundle(bundle_k4)


def users_of(b: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """A few validation and test users with their history ends."""
    users = np.concatenate([b.split.val_users[:5], b.split.test_users[:5]])
    return users, b.split.history_len[users]


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_manifest_fields(bundle: Bundle, bundle_k4: Path):
    m = bundle.manifest
    assert m["kind"] == "mind-bundle"
    assert m["versions"] == package_versions()
    assert m["data_fingerprint"] == bundle.dataset.fingerprint and len(m["data_fingerprint"]) == 64
    assert m["bundle_fingerprint"] == dir_fingerprint(bundle_k4) == bundle.fingerprint
    assert m["split_seed"] == bundle.split.seed == 2026
    assert bundle.path == bundle_k4
    assert not bundle.model.training


def test_round_trip_keeps_vectors(bundle: Bundle, tmp_path: Path):
    extra = {"best_epoch": 1}
    manifest = save_bundle(tmp_path / "copy", bundle.model, bundle.dataset, bundle.split, bundle.config, extra)
    again = load_bundle(tmp_path / "copy")
    assert again.fingerprint == manifest["bundle_fingerprint"] == bundle.fingerprint  # same bytes, same fingerprint
    assert again.manifest["best_epoch"] == 1
    np.testing.assert_array_equal(again.model.item_vectors().detach().numpy(),
                                  bundle.model.item_vectors().detach().numpy())
    users, ends = users_of(bundle)
    first = interest_vectors(bundle.model, bundle.dataset, Histories.of(bundle.dataset, users, ends))
    second = interest_vectors(again.model, again.dataset, Histories.of(again.dataset, users, ends))
    assert first.vectors.shape == (len(users), 4, 16)
    for f in ("vectors", "active", "mass", "weights"):
        np.testing.assert_array_equal(getattr(first, f).numpy(), getattr(second, f).numpy())
    np.testing.assert_array_equal(again.dataset.items, bundle.dataset.items)
    np.testing.assert_array_equal(again.dataset.item_ids, bundle.dataset.item_ids)
    np.testing.assert_array_equal(again.split.test_users, bundle.split.test_users)
    assert again.dataset.item_feature_vocab == bundle.dataset.item_feature_vocab
    assert again.dataset.user_feature_vocab == bundle.dataset.user_feature_vocab


def test_eval_mode_is_deterministic(bundle: Bundle):
    users, ends = users_of(bundle)
    hist = Histories.of(bundle.dataset, users, ends)
    first = interest_vectors(bundle.model, bundle.dataset, hist)
    second = interest_vectors(bundle.model, bundle.dataset, hist)
    for f in ("vectors", "active", "mass", "weights"):
        np.testing.assert_array_equal(getattr(first, f).numpy(), getattr(second, f).numpy())


def test_tampered_file_is_refused(bundle_k4: Path, tmp_path: Path):
    path = copy_of(bundle_k4, tmp_path / "b")
    load_bundle(path)  # the untouched copy loads
    with open(path / "config.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ArtifactError) as err:
        load_bundle(path)
    assert str(err.value) == f"{path}: bundle contents do not match its manifest fingerprint (modified or corrupt)"


def test_extra_file_is_refused(bundle_k4: Path, tmp_path: Path):
    path = copy_of(bundle_k4, tmp_path / "b")
    (path / "notes.txt").write_text("added later")
    with pytest.raises(ArtifactError, match="do not match its manifest fingerprint"):
        load_bundle(path)


def test_missing_manifest(bundle_k4: Path, tmp_path: Path):
    path = copy_of(bundle_k4, tmp_path / "b")
    (path / "manifest.json").unlink()
    with pytest.raises(ArtifactError) as err:
        load_bundle(path)
    assert str(err.value) == f"{path}: not a mind-bundle (no manifest.json)"


def test_not_a_bundle(index_k4: Path):
    with pytest.raises(ArtifactError) as err:
        load_bundle(index_k4)
    assert str(err.value) == f"{index_k4}: expected a mind-bundle, found an index"


def test_incompatible_config_is_an_artifact_error(bundle_k4: Path, tmp_path: Path):
    """A bundle whose config this code cannot build (another version's fields) fails cleanly."""
    path = copy_of(bundle_k4, tmp_path / "b")
    rewrite_config(path, lambda c: c["model"].update(capsule_kind="legacy"))
    with pytest.raises(ArtifactError, match=rf"^{path}: bundle does not fit this version of the model \(.*capsule_kind"):
        load_bundle(path)


def test_the_bundle_names_its_retriever_and_old_bundles_load_as_routing(bundle_k4: Path, tmp_path: Path):
    assert json.loads((bundle_k4 / "config.json").read_text())["retriever"] == "routing"
    path = copy_of(bundle_k4, tmp_path / "old")
    rewrite_config(path, lambda c: c.pop("retriever"))  # written before the name was recorded
    old, new = load_bundle(path), load_bundle(bundle_k4)
    assert type(old.model) is type(new.model)
    np.testing.assert_array_equal(old.model.item_vectors().detach().numpy(), new.model.item_vectors().detach().numpy())
    other = copy_of(bundle_k4, tmp_path / "other")
    rewrite_config(other, lambda c: c.update(retriever="transformer"))
    with pytest.raises(ArtifactError, match=rf"^{other}: bundle does not fit this version of the model \(unknown retriever 'transformer'"):
        load_bundle(other)


def test_weights_of_another_shape_are_an_artifact_error(bundle_k4: Path, tmp_path: Path):
    path = copy_of(bundle_k4, tmp_path / "b")
    rewrite_config(path, lambda c: c["model"].update(dim=8))
    with pytest.raises(ArtifactError, match=rf"^{path}: bundle does not fit this version of the model \(") as err:
        load_bundle(path)
    assert "size mismatch" in str(err.value) and "\n" not in str(err.value)


def _failing_save(*args, **kwargs):
    raise RuntimeError("disk full")


def test_failed_write_leaves_nothing(bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch, "save", _failing_save)
    target = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(target, bundle.model, bundle.dataset, bundle.split, bundle.config)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left beside it


def test_failed_overwrite_keeps_the_old_bundle(bundle: Bundle, bundle_k4: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    target = copy_of(bundle_k4, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(target, bundle.model, bundle.dataset, bundle.split, bundle.config)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert load_bundle(target).fingerprint == bundle.fingerprint
