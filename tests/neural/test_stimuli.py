"""Brain-Score stimulus sets (CSV + folder or zip) and its stimulus pipeline, on files written here."""
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from harmonizer_fast.neural.stimuli import (
    brainscore_load_image,
    brainscore_preprocess,
    load_stimulus_set,
    place_on_screen,
    preprocessing_from_data_config,
)


def _images(rng):
    return {
        "rgb": Image.fromarray(rng.integers(0, 256, size=(30, 41, 3), dtype=np.uint8)),
        "grey": Image.fromarray(rng.integers(0, 256, size=(25, 25), dtype=np.uint8)),
        "rgba": Image.fromarray(rng.integers(0, 256, size=(22, 18, 4), dtype=np.uint8)),
        "palette": Image.fromarray(rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)).convert("P"),
    }


def _write_set(tmp_path, rng, as_zip):
    images = _images(rng)
    lines = ["stimulus_id,object_name,filename,variation"]
    files = {}
    for k, (name, image) in enumerate(images.items()):
        sid = f"{k:02d}{name}"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[f"{sid}.png"] = buffer.getvalue()
        lines.append(f"{sid},obj{k % 2},{sid}.png,3")
    csv = tmp_path / "stimulus_test.csv"
    csv.write_text("\n".join(lines) + "\n")
    if as_zip:
        with zipfile.ZipFile(tmp_path / "stimulus_test.zip", "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        (tmp_path / "stimulus_test").mkdir()
        for name, data in files.items():
            (tmp_path / "stimulus_test" / name).write_bytes(data)
    return csv, images


@pytest.mark.parametrize("as_zip", [False, True])
def test_stimulus_set_from_folder_or_zip(tmp_path, as_zip):
    rng = np.random.default_rng(0)
    csv, images = _write_set(tmp_path, rng, as_zip)
    stimuli = load_stimulus_set(csv)  # finds stimulus_test.zip / stimulus_test/ next to the CSV
    assert len(stimuli) == 4 and stimuli.source.suffix == (".zip" if as_zip else "")
    np.testing.assert_array_equal(stimuli.metadata("object_name", ["02rgba", "00rgb"]), ["obj0", "obj0"])
    for k, (name, image) in enumerate(images.items()):
        opened = stimuli.open(f"{k:02d}{name}")
        assert opened.mode == image.mode and opened.format == "PNG"
        np.testing.assert_array_equal(np.asarray(opened), np.asarray(image))
    with pytest.raises(KeyError, match="not in the stimulus set"):
        stimuli.metadata("object_name", ["nope"])


def test_stimulus_set_errors(tmp_path):
    rng = np.random.default_rng(1)
    csv, _ = _write_set(tmp_path, rng, as_zip=False)
    (tmp_path / "stimulus_test" / "01grey.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 stimulus files .* e.g. \\['01grey.png'\\]"):
        load_stimulus_set(csv)
    bad = tmp_path / "bad.csv"
    bad.write_text("stimulus_id,object_name\na,x\n")
    with pytest.raises(ValueError, match="'filename'"):
        load_stimulus_set(bad, tmp_path)
    dup = tmp_path / "dup.csv"
    dup.write_text("stimulus_id,filename\na,a.png\na,b.png\n")
    with pytest.raises(ValueError, match="more than once: \\['a'\\]"):
        load_stimulus_set(dup, tmp_path)
    lone = tmp_path / "lone.csv"
    lone.write_text("stimulus_id,filename\na,a.png\n")
    with pytest.raises(FileNotFoundError, match="no stimuli next to"):
        load_stimulus_set(lone)
    (tmp_path / "notzip.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="folder or a zip"):
        load_stimulus_set(csv, tmp_path / "notzip.bin")


def _torchvision_brainscore(image, size, mean, std, interpolation=transforms.InterpolationMode.BILINEAR):
    """What Brain-Score's torchvision_preprocess_input does to an RGB PIL image."""
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=interpolation),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])(image)


def test_pipeline_matches_torchvision_resize_totensor_normalize():
    rng = np.random.default_rng(2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for name, image in _images(rng).items():
        rgb = brainscore_load_image(image)
        assert rgb.mode == "RGB" and rgb.size == image.size
        if name == "rgba":  # pasted without its mask: the alpha channel is dropped
            np.testing.assert_array_equal(np.asarray(rgb), np.asarray(image)[..., :3])
        got = brainscore_preprocess([image], image_size=19, mean=mean, std=std)
        torch.testing.assert_close(got[0], _torchvision_brainscore(rgb, 19, mean, std), rtol=0, atol=0)
    config = {"input_size": (3, 21, 21), "mean": mean, "std": std, "interpolation": "bicubic", "crop_pct": 0.875}
    kwargs = preprocessing_from_data_config(config)
    assert kwargs == {"image_size": 21, "mean": mean, "std": std, "interpolation": "bicubic"}
    image = _images(rng)["rgb"]
    expected = _torchvision_brainscore(image, 21, mean, std, transforms.InterpolationMode.BICUBIC)
    torch.testing.assert_close(brainscore_preprocess([image], **kwargs)[0], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="square"):
        preprocessing_from_data_config({**config, "input_size": (3, 21, 30)})


def test_pipeline_places_on_screen_before_resizing(tmp_path):
    rng = np.random.default_rng(3)
    image = _images(rng)["rgb"]  # 41 x 30
    padded = place_on_screen(image, model_degrees=10, stimulus_degrees=8)  # ratio 1.25: 51 x 38 (round half even)
    assert padded.size == (51, 38)
    pixels = np.asarray(padded)
    np.testing.assert_array_equal(pixels[:4], 128)  # grey border above: round((38 - 30) / 2) = 4 rows
    np.testing.assert_array_equal(pixels[4:34, 5:46], np.asarray(image))  # left: round((51 - 41) / 2) = 5
    cropped = place_on_screen(image, model_degrees=4, stimulus_degrees=8)  # 20 x 15 from the centre
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image)[8:23, 10:30])
    assert place_on_screen(image, 8, 8) is image
    # A JPEG stimulus is re-encoded after conversion, as Brain-Score writes it back to a .jpg file.
    image.save(tmp_path / "s.jpg")
    converted = place_on_screen(Image.open(tmp_path / "s.jpg"), 6, 8)
    converted.save(tmp_path / "c.jpg")
    expected = _torchvision_brainscore(Image.open(tmp_path / "c.jpg").convert("RGB"), 16, (0.485, 0.456, 0.406),
                                       (0.229, 0.224, 0.225))
    got = brainscore_preprocess([tmp_path / "s.jpg"], image_size=16, model_degrees=6)
    torch.testing.assert_close(got[0], expected, rtol=0, atol=0)
    for bad in (dict(model_degrees=0), dict(stimulus_degrees=float("nan"))):
        with pytest.raises(ValueError, match="degrees"):
            place_on_screen(image, **{"model_degrees": 8, "stimulus_degrees": 8, **bad})
    with pytest.raises(ValueError, match="image_size"):
        brainscore_preprocess([image], image_size=0)
    with pytest.raises(ValueError, match="interpolation"):
        brainscore_preprocess([image], interpolation="cubic")
    with pytest.raises(ValueError, match="std"):
        brainscore_preprocess([image], std=(0.2, 0.0, 0.2))
