"""Ragged Zarr stores: round trips, resume after an interrupted write, few files per store."""

import numpy as np
import pytest

from unseg import store


def make_features(rng, grids, dim=6, heads=2):
    lengths = grids[:, 0] * grids[:, 1]
    t = int(lengths.sum())
    return {
        "keys": rng.normal(size=(t, dim)).astype(np.float16),
        "cls_logits": rng.normal(size=(t, heads)).astype(np.float32),
        "cls_token": rng.normal(size=(len(grids), dim)).astype(np.float32),
        "grid": grids.astype(np.int32),
        "input_size": (grids * 8).astype(np.int32),
        "image_id": np.arange(len(grids), dtype=np.int64) * 10,
    }


def test_ragged_round_trip_per_image(tmp_path):
    rng = np.random.default_rng(0)
    grids = np.array([[3, 4], [2, 2], [5, 1], [1, 1]])
    data = make_features(rng, grids)
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {"backbone": "x"}, digest="d")
    w.write(0, {k: v for k, v in data.items()})
    w.finalize()
    s = store.RaggedStore(tmp_path / "f.zarr")
    assert len(s) == 4 and s.attrs["backbone"] == "x"
    starts = np.concatenate([[0], np.cumsum(grids[:, 0] * grids[:, 1])])
    for i in range(4):
        np.testing.assert_array_equal(s.rows("keys", i), data["keys"][starts[i] : starts[i + 1]])
        np.testing.assert_array_equal(s.rows("cls_logits", i), data["cls_logits"][starts[i] : starts[i + 1]])
    np.testing.assert_array_equal(s.read("image_id"), data["image_id"])
    np.testing.assert_array_equal(s.span("keys", 1, 3), data["keys"][starts[1] : starts[3]])
    assert not (tmp_path / "f.zarr.partial").exists()


def test_interrupted_writer_resumes_and_equals_one_pass(tmp_path):
    rng = np.random.default_rng(1)
    grids = rng.integers(1, 6, size=(9, 2))
    data = make_features(rng, grids)
    starts = np.concatenate([[0], np.cumsum(grids[:, 0] * grids[:, 1])])

    def part(a, b):
        return {k: (v[starts[a] : starts[b]] if k in ("keys", "cls_logits") else v[a:b]) for k, v in data.items()}

    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="same", flush_every_s=0)
    w.write(0, part(0, 4))  # flush_every_s=0: on disk at once
    del w  # "killed" after four images
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="same")
    assert w.done == 4
    with pytest.raises(ValueError):
        w.write(2, part(2, 4))
    w.write(4, part(4, 9))
    w.finalize()
    s = store.RaggedStore(tmp_path / "f.zarr")
    np.testing.assert_array_equal(s.read("keys"), data["keys"])
    np.testing.assert_array_equal(s.read("cls_token"), data["cls_token"])


def test_the_writer_buffers_to_whole_shards_and_an_interrupt_loses_only_the_buffer(tmp_path, monkeypatch):
    """Zarr rewrites a whole shard for any write into it: rows reach the disk a whole shard at a time (64 key
    rows here), ``images_done`` counts only images complete on disk, and a resumed writer equals one pass."""
    import zarr

    monkeypatch.setattr(store, "CHUNK_BYTES", 64 * 12)  # keys: 6 float16 = 12 bytes a row, 64-row chunks
    monkeypatch.setattr(store, "CHUNKS_PER_SHARD", 1)
    rng = np.random.default_rng(4)
    grids = np.full((9, 2), [5, 6])  # 30 tokens an image
    data = make_features(rng, grids)

    def part(a, b):
        return {k: (v[30 * a : 30 * b] if k in ("keys", "cls_logits") else v[a:b]) for k, v in data.items()}

    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d", flush_every_s=float("inf"))
    w.write(0, part(0, 3))
    w.write(3, part(3, 5))  # 150 key rows written: two whole 64-row shards on disk, 22 rows buffered
    on_disk = zarr.open_group(tmp_path / "f.zarr.partial", mode="r")
    np.testing.assert_array_equal(on_disk["keys"][:128], data["keys"][:128])
    assert not on_disk["keys"][128:150].any()
    assert on_disk.attrs["images_done"] == 0  # the per-image arrays (one 9-row shard) are still buffered
    assert w.done == 5
    w.flush()
    assert zarr.open_group(tmp_path / "f.zarr.partial", mode="r").attrs["images_done"] == 5
    w.write(5, part(5, 7))
    del w  # killed: images 5 and 6 were only buffered
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d", flush_every_s=float("inf"))
    assert w.done == 5
    w.write(5, part(5, 9))
    w.finalize()
    s = store.RaggedStore(tmp_path / "f.zarr")
    for name in data:
        np.testing.assert_array_equal(s.read(name), data[name])


def test_the_writer_buffers_copies_not_views_of_the_callers_arrays(tmp_path):
    """A buffered view would keep its whole base (e.g. a batch's token tensor) alive until the flush, and see
    later changes to it."""
    grids = np.array([[2, 2], [2, 2]])
    data = make_features(np.random.default_rng(6), grids)
    expected = {k: v.copy() for k, v in data.items()}
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d", flush_every_s=float("inf"))
    w.write(0, data)
    for v in data.values():
        v[...] = 0  # the caller reuses its buffers
    w.finalize()
    s = store.RaggedStore(tmp_path / "f.zarr")
    for name, value in expected.items():
        np.testing.assert_array_equal(s.read(name), value)


def test_a_write_missing_an_array_is_refused(tmp_path):
    grids = np.array([[1, 2]])
    data = make_features(np.random.default_rng(5), grids)
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d")
    with pytest.raises(ValueError, match="every array"):
        w.write(0, {k: v for k, v in data.items() if k != "cls_token"})


def test_a_write_with_rows_of_the_wrong_shape_is_refused_before_anything_is_buffered(tmp_path):
    grids = np.array([[1, 2]])
    data = make_features(np.random.default_rng(5), grids)
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d")
    with pytest.raises(ValueError, match=r"keys: rows of shape \(1,\), expected \(6,\)"):
        w.write(0, {**data, "keys": data["keys"][:, :1]})  # would broadcast into (2, 6) unchecked
    assert w.done == 0 and all(b.rows == 0 for b in w._pending.values())


def test_the_row_buffer_keeps_the_unwritten_rows_in_order_across_growth_and_drops():
    buf = store._RowBuffer((2,), "int64")
    rows = np.arange(40).reshape(20, 2)
    buf.append(rows[:5])
    buf.drop(2)  # rows 2..4 move to the front
    buf.append(rows[5:17])  # grows past twice its size
    np.testing.assert_array_equal(buf.data[: buf.rows], rows[2:17])
    buf.drop(3)  # overlapping move: 12 rows from 3..14 to 0..11
    buf.append(rows[17:])
    np.testing.assert_array_equal(buf.data[: buf.rows], rows[5:])


def test_a_changed_digest_starts_over(tmp_path):
    rng = np.random.default_rng(2)
    grids = np.array([[2, 2], [2, 2]])
    data = make_features(rng, grids)
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="old", flush_every_s=0)
    w.write(0, {k: (v[:4] if k in ("keys", "cls_logits") else v[:1]) for k, v in data.items()})
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="new")
    assert w.done == 0


def test_finalize_refuses_an_incomplete_store(tmp_path):
    grids = np.array([[1, 2], [1, 2]])
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d")
    with pytest.raises(ValueError):
        w.finalize()
    assert not (tmp_path / "f.zarr").exists()


def test_large_store_is_a_handful_of_files(tmp_path):
    rng = np.random.default_rng(3)
    grids = np.full((400, 2), 16)  # 102400 tokens x 192 dims float16 = 39 MB
    lengths = grids[:, 0] * grids[:, 1]
    w = store.feature_writer(tmp_path / "f.zarr", grids, 192, 3, {}, digest="d")
    t = int(lengths.sum())
    w.write(
        0,
        {
            "keys": rng.normal(size=(t, 192)).astype(np.float16),
            "cls_logits": np.zeros((t, 3), np.float32),
            "cls_token": np.zeros((400, 192), np.float32),
            "grid": grids,
            "input_size": grids * 8,
            "image_id": np.arange(400),
        },
    )
    w.finalize()
    files = [p for p in (tmp_path / "f.zarr").rglob("*") if p.is_file()]
    assert len(files) < 30


def test_semantic_store_round_trip(tmp_path):
    labels = [np.arange(12, dtype=np.uint8).reshape(3, 4), np.full((2, 5), 7, np.uint8)]
    store.write_semantic(tmp_path / "s.zarr", np.array([4, 9]), labels, {"kind": "pseudo-gt"})
    s = store.RaggedStore(tmp_path / "s.zarr")
    for i, lab in enumerate(labels):
        np.testing.assert_array_equal(store.read_semantic_map(s, i), lab)
    assert s.read("image_id").tolist() == [4, 9]


def test_missing_store_is_a_user_error(tmp_path):
    from unseg.errors import UserError

    with pytest.raises(UserError):
        store.RaggedStore(tmp_path / "nope.zarr")


def test_a_half_created_partial_is_rebuilt_with_one_line(tmp_path, capsys):
    grids = np.array([[1, 2]])
    (tmp_path / "f.zarr.partial").mkdir()  # killed before any metadata was written
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d")
    assert w.done == 0
    assert f"discarding {tmp_path / 'f.zarr.partial'}" in capsys.readouterr().err


def test_a_real_error_on_a_partial_store_is_not_hidden(tmp_path, monkeypatch):
    """Only "not this job's store" discards a resumable store; a permission error stops with itself."""
    rng = np.random.default_rng(3)
    grids = np.array([[2, 2], [2, 2]])
    data = make_features(rng, grids)
    w = store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d", flush_every_s=0)
    w.write(0, {k: (v[:4] if k in ("keys", "cls_logits") else v[:1]) for k, v in data.items()})

    def denied(*args, **kwargs):
        raise PermissionError("permission denied")

    monkeypatch.setattr(store.zarr, "open_group", denied)
    with pytest.raises(PermissionError):
        store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d")
    monkeypatch.undo()
    assert store.feature_writer(tmp_path / "f.zarr", grids, 6, 2, {}, digest="d").done == 1  # still resumable
