"""EDM-format datasets (docs/method.md §6.1) and the resumable sampler (§5.5)."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tvm.data.datasets import ImageFolderDataset, InfiniteSampler


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _images(n: int = 6, res: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(n)]


def _write(dest: Path, files: dict[str, bytes], as_zip: bool) -> Path:
    if as_zip:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
    return dest


def _image_dataset(tmp_path: Path, as_zip: bool, labels: object = "auto", n: int = 6) -> tuple[Path, list[np.ndarray]]:
    imgs = _images(n)
    # Names deliberately out of order so that sorting is exercised.
    names = [f"{i % 2:05d}/img{i:08d}.png" for i in range(n)]
    files = {name: _png(img) for name, img in zip(names, imgs)}
    if labels == "auto":
        labels = [[name, i % 3] for i, name in enumerate(names)]
    if labels != "absent":
        files["dataset.json"] = json.dumps({"labels": labels}).encode()
    dest = tmp_path / ("ds.zip" if as_zip else "ds")
    return _write(dest, files, as_zip), imgs


@pytest.mark.parametrize("as_zip", [False, True])
def test_images_and_labels_read_back(tmp_path: Path, as_zip: bool) -> None:
    path, imgs = _image_dataset(tmp_path, as_zip)
    ds = ImageFolderDataset(path, resolution=8, channels=3)
    assert len(ds) == 6 and ds.resolution == 8 and ds.num_channels == 3
    assert ds.label_dim == 3 and ds.has_labels
    # Sorted order: folder 00000 holds even indices, 00001 odd ones.
    order = [0, 2, 4, 1, 3, 5]
    for k, i in enumerate(order):
        x, label = ds[k]
        assert x.dtype == np.uint8 and x.shape == (3, 8, 8)
        np.testing.assert_array_equal(x, imgs[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(3, dtype=np.float32)[i % 3])
        assert label.dtype == np.float32


def test_xflip_max_size_and_no_labels(tmp_path: Path) -> None:
    path, imgs = _image_dataset(tmp_path, as_zip=True, labels=None)
    ds = ImageFolderDataset(path, use_labels=False, xflip=True)
    assert len(ds) == 12 and ds.label_dim == 0 and not ds.has_labels
    np.testing.assert_array_equal(ds[6][0], ds[0][0][:, :, ::-1])
    assert ds[0][1].shape == (0,)
    sub = ImageFolderDataset(path, use_labels=False, max_size=4)
    expected = np.sort(np.random.RandomState(0).permutation(6)[:4])  # EDM subset rule
    assert [sub.file_name(i) for i in range(4)] == [
        ImageFolderDataset(path, use_labels=False).file_name(j) for j in expected
    ]


def test_npy_latents_and_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrs = [rng.standard_normal((8, 4, 4)).astype(np.float32) for _ in range(3)]
    files = {f"00000/img-mean-std-{i:08d}.npy": _npy(a) for i, a in enumerate(arrs)}
    files["dataset.json"] = json.dumps({"labels": [[n, 7] for n in files]}).encode()
    path = _write(tmp_path / "lat.zip", files, as_zip=True)
    ds = ImageFolderDataset(path, cache=True, channels=8, resolution=4, label_dim=10)
    x, label = ds[2]
    assert x.dtype == np.float32 and x.shape == (8, 4, 4) and ds.is_npy
    np.testing.assert_array_equal(x, arrs[2])
    assert label.shape == (10,) and label[7] == 1 and label.sum() == 1
    x[:] = 0  # the cached copy must not alias the returned one
    np.testing.assert_array_equal(ds[2][0], arrs[2])


def test_zip_opened_lazily_and_not_pickled(tmp_path: Path) -> None:
    path, imgs = _image_dataset(tmp_path, as_zip=True)
    ds = ImageFolderDataset(path)
    ds[0]
    assert ds._zip is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zip is None
    np.testing.assert_array_equal(clone[0][0], ds[0][0])
    for context in ("fork", "spawn"):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context=context)
        batches = list(loader)
        assert torch.equal(batches[1][0][2], torch.as_tensor(ds[5][0]))


def test_sampler_drives_a_dataloader(tmp_path: Path) -> None:
    path, _ = _image_dataset(tmp_path, as_zip=True)
    ds = ImageFolderDataset(path)
    sampler = InfiniteSampler(len(ds), rank=1, world_size=2, seed=3)
    loader = iter(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4))
    images = torch.cat([next(loader)[0] for _ in range(3)])
    stream = iter(InfiniteSampler(len(ds), 0, 1, seed=3))
    expected = [next(stream) for _ in range(24)][1::2]  # rank 1 of 2 takes odd global positions
    assert torch.equal(images, torch.stack([torch.as_tensor(ds[i][0]) for i in expected]))


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope")

    path, _ = _image_dataset(tmp_path, as_zip=True)
    truncated = tmp_path / "trunc.zip"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="trunc.zip.*(corrupt|truncated)"):
        ImageFolderDataset(truncated)

    with pytest.raises(ValueError, match="resolution is 8, expected 16"):
        ImageFolderDataset(path, resolution=16)
    with pytest.raises(ValueError, match="3 channels, expected 8"):
        ImageFolderDataset(path, channels=8)


def test_mixed_sizes_rejected(tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    imgs = _images(3)
    files = {f"00000/img{i:08d}.png": _png(a) for i, a in enumerate(imgs)}
    files["00000/img00000002.png"] = _png(np.zeros((16, 16, 3), np.uint8))
    _write(d, files, as_zip=False)
    with pytest.raises(ValueError, match=r"img00000002\.png.*\[3, 16, 16\] differs"):
        ImageFolderDataset(d, use_labels=False)


def test_corrupt_member_rejected(tmp_path: Path) -> None:
    files = {"a.png": _png(_images(1)[0]), "b.png": b"\x89PNG\r\n\x1a\n garbage"}
    path = _write(tmp_path / "bad.zip", files, as_zip=True)
    with pytest.raises(ValueError, match=r"bad\.zip:b\.png"):
        ImageFolderDataset(path, use_labels=False)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("missing-json", "no dataset.json"),
        (None, "'labels' is null"),
        ("drop-one", r"no label for .*img00000005\.png"),
        ("extra", r"ghost\.png.*not a data file"),
        ("negative", "negative class"),
        ("string", "must be an int class"),
    ],
)
def test_bad_labels(tmp_path: Path, labels: object, message: str) -> None:
    names = [f"{i % 2:05d}/img{i:08d}.png" for i in range(6)]
    table = [[n, i % 3] for i, n in enumerate(names)]
    if labels == "missing-json":
        path, _ = _image_dataset(tmp_path, as_zip=False, labels="absent")
    else:
        if labels == "drop-one":
            labels = table[:-1]
        elif labels == "extra":
            labels = [*table, ["ghost.png", 1]]
        elif labels == "negative":
            labels = [*table[:-1], [names[-1], -1]]
        elif labels == "string":
            labels = [*table[:-1], [names[-1], "cat"]]
        path, _ = _image_dataset(tmp_path, as_zip=False, labels=labels)
    with pytest.raises(ValueError, match=message) as info:
        ImageFolderDataset(path, use_labels=True)
    assert "dataset.json" in str(info.value)


def test_sampler_disjoint_deterministic_and_resumable() -> None:
    n, world = 10, 3
    streams = []
    for rank in range(world):
        it = iter(InfiniteSampler(n, rank, world, seed=5))
        streams.append([next(it) for _ in range(20)])
    # Interleaving the ranks reproduces the single-process stream (global positions r + k·W).
    single = iter(InfiniteSampler(n, 0, 1, seed=5))
    merged = [streams[p % world][p // world] for p in range(60)]
    assert merged == [next(single) for _ in range(60)]
    # Each epoch is a permutation derived from (seed, epoch).
    for e in range(6):
        assert sorted(merged[e * n : (e + 1) * n]) == list(range(n))
    np.testing.assert_array_equal(merged[10:20], np.random.default_rng([5, 1]).permutation(n))
    assert merged[:10] != merged[10:20]
    # Disjoint within a global step: 3 ranks x 3 items = positions 0..8 of epoch 0.
    assert len({s for stream in streams for s in stream[:3]}) == 9

    # Resume after 4 steps of per-rank batch 2 on 2 ranks (16 items), continue on 3 ranks: the
    # training loop restarts the sampler at start_index = images consumed.
    resumed = []
    for rank in range(3):
        it = iter(InfiniteSampler(n, rank, 3, seed=5, start_index=16))
        resumed.append([next(it) for _ in range(4)])
    assert [resumed[p % 3][p // 3] for p in range(12)] == merged[16:28]


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(7, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_index"):
        InfiniteSampler(7, start_index=-1)
