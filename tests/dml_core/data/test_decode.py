import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dml_core.data.decode import SampleDecodeError, decode_image, decode_npy, decode_sample
from tests.dml_core.data._shards import image_pixels, make_sample, png_bytes


def _with_url(sample, url="/data/train-000003.tar"):
    return {**sample, "__url__": url}


def test_png_grayscale_matches_pixels():
    s = _with_url(make_sample(1234, 7, "train", size=8, channels=1))
    d = decode_sample(s)
    assert d.id == 1234 and d.label == 7 and d.meta["class_name"] == "class_7"
    expected = torch.from_numpy(image_pixels(1234, 8, 1)).float().unsqueeze(0) / 255
    assert d.image.dtype == torch.float32 and d.image.shape == (1, 8, 8)
    torch.testing.assert_close(d.image, expected, rtol=0, atol=0)


def test_png_rgb_is_channels_first():
    arr = image_pixels(5, 6, 3)
    t = decode_image(png_bytes(arr))
    torch.testing.assert_close(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255, rtol=0, atol=0)


def test_channel_conversion():
    gray = image_pixels(9, 5, 1)
    t = decode_image(png_bytes(gray), channels=3)
    assert t.shape == (3, 5, 5)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    rgb = image_pixels(9, 5, 3)
    assert decode_image(png_bytes(rgb), channels=1).shape == (1, 5, 5)


def test_image_size_center_crops_the_longer_side():
    arr = np.arange(16 * 8, dtype=np.uint8).reshape(16, 8)  # 16 rows, 8 columns
    t = decode_image(png_bytes(arr), image_size=8)
    torch.testing.assert_close(t[0], torch.from_numpy(arr[4:12]).float() / 255, rtol=0, atol=0)
    assert decode_image(png_bytes(image_pixels(1, 20, 3)), image_size=7).shape == (3, 7, 7)


def test_jpeg_decodes_close_to_source():
    arr = np.full((16, 16, 3), 120, dtype=np.uint8)
    arr[:, 8:] = 200
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    t = decode_image(buf.getvalue())
    assert t.shape == (3, 16, 16)
    assert (t - torch.from_numpy(arr).permute(2, 0, 1).float() / 255).abs().max() < 0.05


def _npy(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_npy_round_trip():
    arr = np.random.default_rng(0).standard_normal((5,)).astype(np.float32)
    s = {"__key__": "000000000042", "__url__": "u", "npy": _npy(arr), "cls": b"3"}
    d = decode_sample(s)
    assert d.id == 42 and d.label == 3
    torch.testing.assert_close(d.image, torch.from_numpy(arr), rtol=0, atol=0)


class _Trap:
    """Unpickling this object would create a file: the test checks that never happens."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_npy_object_array_is_refused_without_unpickling(tmp_path):
    _Trap.path = str(tmp_path / "unpickled")
    arr = np.empty(1, dtype=object)
    arr[0] = _Trap()
    data = _npy(arr, allow_pickle=True)
    with pytest.raises(SampleDecodeError, match="pickle"):
        decode_npy(data)
    assert not os.path.exists(_Trap.path)


def test_npy_nan_is_refused():
    with pytest.raises(SampleDecodeError, match="NaN"):
        decode_npy(_npy(np.array([1.0, np.nan], dtype=np.float32)))


def test_pickle_member_refused_and_unknown_member_policy():
    s = _with_url(make_sample(10, 1, "train"))
    with pytest.raises(SampleDecodeError, match=r"\.pickle.*refused"):
        decode_sample({**s, "pickle": b"\x80\x04K\x01."})
    assert decode_sample({**s, "txt": b"extra"}).id == 10  # unknown, harmless: ignored by default
    with pytest.raises(SampleDecodeError, match=r"unknown member '\.txt'"):
        decode_sample({**s, "txt": b"extra"}, strict=True)


@pytest.mark.parametrize("change, message", [
    ({"cls": b"8"}, "label 8 != json label 1"),
    ({"cls": b"eight"}, "not an ASCII integer"),
    ({"json": b"[1, 2]"}, "must hold an object"),
    ({"json": json.dumps({"id": 11, "label": 1}).encode()}, "does not match the key"),
    ({"png": b"not an image"}, "could not be decoded"),
])
def test_bad_samples_name_shard_and_key(change, message):
    s = _with_url(make_sample(10, 1, "train"), "s3://bucket/ds/train-000007.tar")
    with pytest.raises(SampleDecodeError, match=message) as info:
        decode_sample({**s, **change})
    assert "s3://bucket/ds/train-000007.tar" in str(info.value) and "000000000010" in str(info.value)


def test_missing_members():
    s = _with_url(make_sample(10, 1, "train"))
    with pytest.raises(SampleDecodeError, match="missing '.cls'"):
        decode_sample({k: v for k, v in s.items() if k != "cls"})
    with pytest.raises(SampleDecodeError, match="exactly one of"):
        decode_sample({k: v for k, v in s.items() if k != "png"})
