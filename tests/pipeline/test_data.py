"""Tests for pipeline.data: the embedded default, .amat and .npz round trips, and every error path."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import NUM_PIXELS, SPLITS, load_binarized_mnist

ROOT = Path(__file__).resolve().parents[2]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "binarized_mnist.npz"
ROWS = {"train": 7, "valid": 3, "test": 4}


@pytest.fixture(scope="module")
def pixels() -> dict[str, np.ndarray]:
    """A few random 0/1 images per split, fixed seed."""
    rng = np.random.default_rng(0)
    return {split: (rng.random((n, NUM_PIXELS)) < 0.3).astype(np.uint8) for split, n in ROWS.items()}


def amat_text(rows: np.ndarray) -> str:
    return "".join(" ".join(str(v) for v in row) + "\n" for row in rows.tolist())


def write_amat_dir(directory: Path, pixels: dict[str, np.ndarray]) -> Path:
    directory.mkdir(exist_ok=True)
    for split, rows in pixels.items():
        (directory / f"binarized_mnist_{split}.amat").write_text(amat_text(rows))
    return directory


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    assert list(loaded) == list(expected)
    for split, rows in expected.items():
        assert loaded[split].dtype == torch.uint8
        np.testing.assert_array_equal(loaded[split].numpy(), rows)


# --- the embedded default ---------------------------------------------------------------------


def test_default_subset_shapes_values_and_density():
    data = load_binarized_mnist()
    assert list(data) == list(SPLITS)
    assert {s: tuple(t.shape) for s, t in data.items()} == {
        "train": (10000, 784),
        "valid": (1000, 784),
        "test": (1000, 784),
    }
    for split, images in data.items():
        assert images.dtype == torch.uint8
        assert set(images.unique().tolist()) == {0, 1}
        # Binarized MNIST has ~13% ink; noise would give ~50%, an all-zero or inverted file far off.
        assert 0.1 < images.float().mean().item() < 0.2, split
    assert not torch.equal(data["valid"], data["test"])


def test_default_subset_selected_splits_only():
    data = load_binarized_mnist(splits=("test",))
    assert list(data) == ["test"] and data["test"].shape == (1000, 784)
    assert list(load_binarized_mnist(None, "valid")) == ["valid"]  # a bare string is one split


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="validation"):
        load_binarized_mnist(splits=("train", "validation"))


# --- round trips ------------------------------------------------------------------------------


def test_amat_directory_round_trips(tmp_path, pixels):
    directory = write_amat_dir(tmp_path / "amat", pixels)
    assert_same(load_binarized_mnist(directory), pixels)
    assert_same(load_binarized_mnist(str(directory), ("valid",)), {"valid": pixels["valid"]})


def test_amat_reads_only_requested_splits(tmp_path, pixels):
    directory = write_amat_dir(tmp_path / "amat", {"test": pixels["test"]})
    assert_same(load_binarized_mnist(directory, ["test"]), {"test": pixels["test"]})


def test_amat_tolerates_crlf_extra_spaces_and_missing_final_newline(tmp_path, pixels):
    directory = write_amat_dir(tmp_path / "amat", pixels)
    lines = amat_text(pixels["train"]).splitlines()
    messy = "\r\n".join("  " + line.replace(" ", "\t ", 5) + " " for line in lines)  # no final newline
    (directory / "binarized_mnist_train.amat").write_text(messy)
    assert_same(load_binarized_mnist(directory, ["train"]), {"train": pixels["train"]})


def test_packed_and_unpacked_npz_round_trip_and_agree(tmp_path, pixels):
    packed_file, unpacked_file = tmp_path / "packed.npz", tmp_path / "unpacked.npz"
    np.savez_compressed(packed_file, **{s: np.packbits(x, axis=1) for s, x in pixels.items()})
    np.savez(unpacked_file, **pixels)
    packed, unpacked = load_binarized_mnist(packed_file), load_binarized_mnist(unpacked_file)
    assert_same(packed, pixels)
    assert_same(unpacked, pixels)
    assert all(torch.equal(packed[s], unpacked[s]) for s in SPLITS)


def test_npz_arrays_stored_column_major_load_row_major(tmp_path, pixels):
    """Batches and shards read rows, so a split comes back row-major whatever order the file keeps
    (the standard file stores its packed arrays column-major, and unpackbits keeps that order)."""
    file = tmp_path / "fortran.npz"
    np.savez(file, **{s: np.asfortranarray(np.packbits(x, axis=1)) for s, x in pixels.items()})
    loaded = load_binarized_mnist(file)
    assert_same(loaded, pixels)
    assert all(images.is_contiguous() for images in loaded.values())


@pytest.mark.parametrize("dtype", [bool, np.int64, np.float32, np.float64])
def test_unpacked_npz_accepts_any_numeric_dtype_of_0_1(tmp_path, pixels, dtype):
    file = tmp_path / "data.npz"
    np.savez(file, **{s: x.astype(dtype) for s, x in pixels.items()}, extra=np.arange(3))
    assert_same(load_binarized_mnist(file), pixels)


def test_make_default_data_script_keeps_first_rows(tmp_path, pixels):
    source, out = tmp_path / "source.npz", tmp_path / "out" / "small.npz"
    np.savez(source, **pixels)
    spec = importlib.util.spec_from_file_location("make_default_data", ROOT / "scripts" / "make_default_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--source", str(source), "--out", str(out), "--train", "5", "--valid", "2", "--test", "4"])
    with np.load(out) as saved:
        assert {s: saved[s].shape for s in SPLITS} == {"train": (5, 98), "valid": (2, 98), "test": (4, 98)}
    assert_same(load_binarized_mnist(out), {"train": pixels["train"][:5], "valid": pixels["valid"][:2], "test": pixels["test"]})
    with pytest.raises(SystemExit, match="--train 8"):
        script.main(["--source", str(source), "--out", str(out), "--train", "8"])


# --- bad inputs: right exception type, message names the file (and key/row) -------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        load_binarized_mnist(missing)
    assert "binarized_mnist_train.amat" in str(error.value)  # says what was expected


def test_missing_npz_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        load_binarized_mnist(tmp_path / "gone.npz")


def test_missing_split_file_lists_expected_files(tmp_path, pixels):
    directory = write_amat_dir(tmp_path / "amat", {"train": pixels["train"]})
    with pytest.raises(FileNotFoundError) as error:
        load_binarized_mnist(directory)
    message = str(error.value)
    assert str(directory) in message
    assert "binarized_mnist_valid.amat" in message and "binarized_mnist_test.amat" in message
    load_binarized_mnist(directory, ["train"])  # the present split alone still loads


def test_npz_without_split_key(tmp_path, pixels):
    file = tmp_path / "two_splits.npz"
    np.savez(file, train=pixels["train"], test=pixels["test"])
    with pytest.raises(KeyError) as error:
        load_binarized_mnist(file)
    message = str(error.value)
    assert "two_splits.npz" in message and "'valid'" in message and "'train'" in message


def test_amat_row_of_783_values(tmp_path, pixels):
    directory = write_amat_dir(tmp_path / "amat", pixels)
    (directory / "binarized_mnist_valid.amat").write_text(amat_text(pixels["valid"][:, :783]))
    with pytest.raises(ValueError, match=r"binarized_mnist_valid\.amat: row 0 \(line 1\) has 783 values, expected 784"):
        load_binarized_mnist(directory)


def test_ragged_amat(tmp_path, pixels):
    directory = write_amat_dir(tmp_path / "amat", pixels)
    lines = amat_text(pixels["train"]).splitlines(keepends=True)
    lines[4] = lines[4][:-3] + "\n"  # drop the last value of row 4
    (directory / "binarized_mnist_train.amat").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"binarized_mnist_train\.amat: row 4 \(line 5\) has 783 values"):
        load_binarized_mnist(directory, ["train"])


@pytest.mark.parametrize("bad", ["2", "0.5", "x"])
def test_amat_value_not_0_or_1(tmp_path, pixels, bad):
    rows = pixels["test"].astype(str)
    rows[2, 10] = bad
    directory = tmp_path / "amat"
    directory.mkdir()
    (directory / "binarized_mnist_test.amat").write_text("".join(" ".join(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"binarized_mnist_test\.amat: row 2 \(line 3\), column 10: value '{bad}'"):
        load_binarized_mnist(directory, ["test"])


def test_unpacked_npz_value_2(tmp_path, pixels):
    file = tmp_path / "twos.npz"
    bad = pixels["valid"].astype(np.int64)
    bad[1, 5] = 2
    np.savez(file, **{**pixels, "valid": bad})
    with pytest.raises(ValueError, match=r"twos\.npz \['valid'\]: row 1, column 5: value 2 is not 0 or 1"):
        load_binarized_mnist(file)


def test_unpacked_npz_float_half(tmp_path, pixels):
    file = tmp_path / "probs.npz"
    np.savez(file, **{**pixels, "train": np.full((3, NUM_PIXELS), 0.5, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"probs\.npz \['train'\]: row 0, column 0: value 0.5"):
        load_binarized_mnist(file)


@pytest.mark.parametrize(
    "array, found",
    [
        (np.zeros((4, 783), np.uint8), r"\(4, 783\)"),
        (np.zeros((4, 28, 28), np.uint8), r"\(4, 28, 28\)"),
        (np.zeros(784, np.uint8), r"\(784,\)"),
        (np.zeros((4, 98), np.int64), r"\(4, 98\) and dtype int64"),
        (np.zeros((0, 784), np.uint8), r"\(0, 784\)"),
    ],
)
def test_npz_wrong_shape(tmp_path, pixels, array, found):
    file = tmp_path / "shaped.npz"
    np.savez(file, **{**pixels, "test": array})
    with pytest.raises(ValueError, match=rf"shaped\.npz \['test'\].*{found}"):
        load_binarized_mnist(file)


def test_unsupported_extension(tmp_path):
    file = tmp_path / "mnist.csv"
    file.write_text("0,1\n")
    with pytest.raises(ValueError, match=r"mnist\.csv: unsupported file type '\.csv'"):
        load_binarized_mnist(file)


def test_empty_amat(tmp_path, pixels):
    directory = write_amat_dir(tmp_path / "amat", pixels)
    (directory / "binarized_mnist_valid.amat").write_text("\n")
    with pytest.raises(ValueError, match=r"binarized_mnist_valid\.amat is empty"):
        load_binarized_mnist(directory)


def test_empty_and_corrupt_npz(tmp_path):
    empty, corrupt, text = tmp_path / "empty.npz", tmp_path / "corrupt.npz", tmp_path / "text.npz"
    empty.touch()
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    text.write_text("0 1 0 1\n")  # numpy would read it as a pickle, and its message says how to allow that
    with pytest.raises(ValueError, match=r"empty\.npz is empty"):
        load_binarized_mnist(empty)
    with pytest.raises(ValueError, match=r"corrupt\.npz is not a readable \.npz file"):
        load_binarized_mnist(corrupt)
    with pytest.raises(ValueError, match=r"text\.npz is not a readable \.npz file") as refused:
        load_binarized_mnist(text)
    assert "allow_pickle" not in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_npz_with_a_damaged_array_names_file_and_array(tmp_path, pixels, compressed):
    """An .npz reads each array when asked for it, so a damaged member failed there with numpy's or
    zlib's traceback (a bad CRC, a broken compressed stream) instead of an error naming the file."""
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, **pixels)
    data = bytearray(path.read_bytes())
    data[300:360] = bytes(60)  # inside the first member's data: the archive still opens
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"d\.npz \['train'\] cannot be read: "):
        load_binarized_mnist(path)


def test_npy_array_named_npz_is_named(tmp_path, pixels):
    path = tmp_path / "one.npz"
    with open(path, "wb") as stream:
        np.save(stream, pixels["train"])
    with pytest.raises(ValueError, match=r"one\.npz holds a single array, not an \.npz archive of arrays 'train'"):
        load_binarized_mnist(path)


# --- the full data set, when this machine has it ----------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.exists(), reason=f"{SHARED_MNIST} not present")
def test_full_binarized_mnist():
    data = load_binarized_mnist(SHARED_MNIST)
    assert {s: tuple(t.shape) for s, t in data.items()} == {
        "train": (50000, 784),
        "valid": (10000, 784),
        "test": (10000, 784),
    }
    # The embedded default must be a prefix of the standard binarization.
    default = load_binarized_mnist()
    for split, images in default.items():
        assert torch.equal(images, data[split][: len(images)]), split
