"""dataset_tool: convert (class folders → PNG zip), encode (→ latent moments), getstats (docs/method.md §6.2)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tvm.data.dataset_tool import (
    center_crop_dhariwal,
    convert_dataset,
    encode_dataset,
    latent_stats,
    main,
    stats_path_for,
)
from tvm.data.datasets import ImageFolderDataset

REPO = Path(__file__).resolve().parents[2]


def _class_folders(root: Path, res: int = 16, per_class: int = 3) -> dict[str, tuple[np.ndarray, int]]:
    """ImageNet layout: root/<synset>/<file>.png; returns relative name -> (HWC pixels, class)."""
    rng = np.random.default_rng(0)
    out = {}
    for cls, synset in enumerate(["n01440764", "n01443537", "n01484850"]):
        (root / synset).mkdir(parents=True)
        for k in range(per_class):
            arr = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
            PIL.Image.fromarray(arr).save(root / synset / f"{synset}_{k}.png")
            out[f"{synset}/{synset}_{k}.png"] = (arr, cls)
    return out


def test_convert_round_trip_from_class_folders(tmp_path: Path) -> None:
    src = tmp_path / "train"
    images = _class_folders(src)
    dest = tmp_path / "rgb.zip"
    assert (
        main(["convert", "--source", str(src), "--dest", str(dest), "--resolution", "16x16", "--transform", "none"])
        == 0
    )
    with zipfile.ZipFile(dest) as z:
        infos = z.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        names = sorted(i.filename for i in infos)
        labels = json.loads(z.read("dataset.json"))["labels"]
    assert names[:2] == ["00000/img00000000.png", "00000/img00000001.png"] and names[-1] == "dataset.json"
    ds = ImageFolderDataset(dest, resolution=16, channels=3)
    assert len(ds) == 9 and ds.label_dim == 3
    for i, (arr, cls) in enumerate(images[k] for k in sorted(images)):
        x, label = ds[i]
        np.testing.assert_array_equal(x, arr.transpose(2, 0, 1))
        assert int(label.argmax()) == cls and labels[i] == [f"00000/img{i:08d}.png", cls]


def test_convert_zip_source_with_dataset_json_and_crop(tmp_path: Path) -> None:
    src = tmp_path / "src.zip"
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(src, "w") as z:
        for k in range(3):
            img = PIL.Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))  # 70 wide, 40 high
            path = tmp_path / f"{k}.jpg"
            img.save(path)
            z.write(path, f"a/{k}.jpg")
        z.writestr("dataset.json", json.dumps({"labels": [["a/0.jpg", 5], ["a/1.jpg", 2], ["a/2.jpg", 5]]}))
    dest = tmp_path / "out"
    assert convert_dataset(src, dest, 16, "center-crop-dhariwal", max_images=2, progress=False) == 2
    ds = ImageFolderDataset(dest)
    assert len(ds) == 2 and ds.resolution == 16 and ds.label_dim == 6
    assert [int(ds[i][1].argmax()) for i in range(2)] == [5, 2]


def test_center_crop_dhariwal_geometry() -> None:
    # 70x40 -> one BOX halving (40 >= 2*16) -> 35x20 -> BICUBIC to 28x16 -> centre 16x16.
    arr = np.zeros((40, 70, 3), np.uint8)
    arr[:, 35:] = 255  # right half white
    out = np.asarray(center_crop_dhariwal(PIL.Image.fromarray(arr), 16))
    assert out.shape == (16, 16, 3)
    # Centre column 8 of the crop sits at x=14 of the 28-wide image = the edge at 14.
    assert out[:, :6].max() < 10 and out[:, 10:].min() > 245


def test_convert_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        convert_dataset(tmp_path / "missing", tmp_path / "o.zip", 16, progress=False)
    src = tmp_path / "s"
    _class_folders(src)
    with pytest.raises(ValueError, match="power of two"):
        convert_dataset(src, tmp_path / "o.zip", 24, progress=False)
    (src / "n01440764" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ValueError, match=r"broken\.png"):
        convert_dataset(src, tmp_path / "o.zip", 16, "none", progress=False)
    with pytest.raises(SystemExit):
        main(["convert", "--source", str(src), "--dest", "x", "--resolution", "16x32"])


def test_encode_sharded_resumable_with_stats(tmp_path: Path, tiny_vae_dir: Path) -> None:
    from diffusers import AutoencoderKL

    src = tmp_path / "train"
    _class_folders(src)
    rgb = tmp_path / "rgb.zip"
    convert_dataset(src, rgb, 16, "none", progress=False)
    dest = tmp_path / "lat.zip"
    # Two "ranks": rank 1 first (returns without merging), then rank 0 merges.
    assert encode_dataset(rgb, dest, vae=str(tiny_vae_dir), batch_size=2, rank=1, world_size=2, progress=False) is None
    parts = tmp_path / "lat.zip.parts"
    written = sorted(p.name for p in parts.rglob("*.npy"))
    assert written == [f"img-mean-std-{i:08d}.npy" for i in range(1, 9, 2)]
    # Resume: one of rank 0's items already exists (a sentinel value) and must be kept, not redone.
    sentinel = np.full((8, 2, 2), 7.0, np.float32)
    np.save(parts / "00000" / "img-mean-std-00000000.npy", sentinel)
    stats = encode_dataset(rgb, dest, vae=str(tiny_vae_dir), batch_size=2, rank=0, world_size=2, progress=False)
    assert not parts.exists() and dest.is_file()

    lat = ImageFolderDataset(dest, channels=8, resolution=2)
    rgb_ds = ImageFolderDataset(rgb)
    assert len(lat) == 9 and lat.label_dim == 3
    np.testing.assert_array_equal(lat[0][0], sentinel)
    ref = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        px = torch.as_tensor(np.stack([rgb_ds[i][0] for i in range(1, 9)]))
        dist = ref.encode(px.float() / 127.5 - 1).latent_dist
    expected = torch.cat([dist.mean, dist.std], 1).numpy()
    np.testing.assert_allclose(np.stack([lat[i][0] for i in range(1, 9)]), expected, rtol=1e-5, atol=1e-6)
    for i in range(9):
        np.testing.assert_array_equal(lat[i][1], rgb_ds[i][1])

    # Statistics: raw_mean is the mean of the posterior means; raw_std the std of seeded samples.
    saved = json.loads(stats_path_for(dest).read_text())
    assert saved == stats and stats_path_for(dest) == tmp_path / "lat.stats.json"
    moments = np.stack([lat[i][0] for i in range(9)]).astype(np.float64)
    np.testing.assert_allclose(saved["raw_mean"], moments[:, :4].mean(axis=(0, 2, 3)), rtol=1e-10)
    rng = np.random.default_rng(0)
    samples = np.stack([m[:4] + rng.standard_normal(m[:4].shape) * m[4:] for m in moments])
    np.testing.assert_allclose(saved["raw_std"], samples.std(axis=(0, 2, 3)), rtol=1e-9)
    assert latent_stats(dest, seed=1, progress=False)["raw_std"] != saved["raw_std"]


def test_scripts_run_as_cli(tmp_path: Path) -> None:
    src = tmp_path / "train"
    _class_folders(src, per_class=1)
    dest = tmp_path / "rgb"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "dataset_tool.py"),
        "convert",
        "--source",
        str(src),
        "--dest",
        str(dest),
        "--resolution",
        "16",
        "--transform",
        "center-crop",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert len(ImageFolderDataset(dest)) == 3
