"""Configs, the `python -m training` command line and dataset validation."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from training import train_phi, train_stage1, train_stage2
from training.__main__ import COMMANDS
from training.__main__ import main as cli
from training.config import load_config, parse_overrides
from training.data import ManifestDataset
from training.synth_data import SynthConfig


CONFIGS = Path(__file__).parents[1] / "training" / "configs"


@pytest.mark.parametrize(
    "name, cls",
    [
        ("phi", train_phi.TrainConfig),
        ("stage1", train_stage1.TrainConfig),
        ("stage2", train_stage2.TrainConfig),
        ("synth_data", SynthConfig),
    ],
)
def test_shipped_configs_load(name, cls):
    cfg = load_config(cls, CONFIGS / f"{name}.yaml")
    assert cfg.output_dir


def test_paper_table_values():
    s1 = load_config(train_stage1.TrainConfig, CONFIGS / "stage1.yaml")
    s2 = load_config(train_stage2.TrainConfig, CONFIGS / "stage2.yaml")
    phi = load_config(train_phi.TrainConfig, CONFIGS / "phi.yaml")
    assert (s1.max_steps, s2.max_steps, phi.max_steps) == (3000, 9000, 10000)
    assert s1.learning_rate == s2.learning_rate == 8e-6 and phi.learning_rate == 5e-6
    assert s1.batch_size * 4 == 32 and phi.batch_size == 32 and s1.lambda_comp == 0.1
    assert (s1.mixed_precision, phi.mixed_precision, phi.optimizer) == ("bf16", "no", "adamw")


def test_overrides_are_typed_and_unknown_keys_fail(tmp_path):
    over = parse_overrides(
        ["--learning_rate=1e-4", "--resume_from_checkpoint=latest", "--bfs_overrides={content_rank: 8}"]
    )
    cfg = load_config(train_stage1.TrainConfig, CONFIGS / "stage1.yaml", over)
    assert (
        cfg.learning_rate == 1e-4
        and cfg.resume_from_checkpoint == "latest"
        and cfg.bfs_overrides == {"content_rank": 8}
    )
    with pytest.raises(ValueError, match="Unknown config keys"):
        load_config(train_stage1.TrainConfig, None, {"lerning_rate": 1.0})
    with pytest.raises(ValueError, match="max_steps"):
        load_config(train_stage1.TrainConfig, None, parse_overrides(["--max_steps=many"]))


def test_command_names_and_a_missing_dataset_is_named(capsys, tmp_path):
    assert {"phi", "stage1", "stage2", "decompose", "decompose-data", "synth-data"} <= set(COMMANDS)
    missing = tmp_path / "no_such_dataset"
    assert cli(["decompose", "--config", str(CONFIGS / "decompose.yaml"), f"--data_dir={missing}"]) != 0
    assert f"{missing}/manifest.jsonl not found" in capsys.readouterr().err


def test_bad_samples_are_reported_by_name_and_skipped(tmp_path, caplog):
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(tmp_path / "fg.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "bg.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "opaque.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {
            "name": "good",
            "foreground": "fg.png",
            "background": "bg.png",
            "composite": "bg.png",
            "box": [0, 0, 8, 8],
            "caption": "a",
        },
        {
            "name": "missing",
            "foreground": "nope.png",
            "background": "bg.png",
            "composite": "bg.png",
            "box": [0, 0, 8, 8],
            "caption": "a",
        },
        {
            "name": "no_alpha",
            "foreground": "opaque.png",
            "background": "bg.png",
            "composite": "bg.png",
            "box": [0, 0, 8, 8],
            "caption": "a",
        },
        {
            "name": "broken",
            "foreground": "fg.png",
            "background": "broken.png",
            "composite": "bg.png",
            "box": [0, 0, 8, 8],
            "caption": "a",
        },
        {
            "name": "bad_box",
            "foreground": "fg.png",
            "background": "bg.png",
            "composite": "bg.png",
            "box": [0, 0, 80, 8],
            "caption": "a",
        },
        {
            "name": "no_caption",
            "foreground": "fg.png",
            "background": "bg.png",
            "composite": "bg.png",
            "box": [0, 0, 8, 8],
        },
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    dataset = ManifestDataset(tmp_path, "triplet", resolution=64)
    assert [e["name"] for e in dataset.entries] == ["good"]
    assert {n for n, _ in dataset.bad} == {"missing", "no_alpha", "broken", "bad_box", "no_caption", "line 7"}
    item = dataset[0]
    assert item["foreground"].shape == (4, 64, 64) and item["mask"].sum() == 64
    assert "no_alpha" in caplog.text


def _red_square_sample(folder, width, height, box, with_mask):
    """A width × height pair whose composite is grey with a red square exactly at `box`."""
    import numpy as np

    x0, y0, x1, y1 = box
    comp = np.full((height, width, 3), 128, np.uint8)
    comp[y0:y1, x0:x1] = (255, 0, 0)
    Image.fromarray(comp).save(folder / "comp.png")
    Image.new("RGB", (width, height), (128, 128, 128)).save(folder / "bg.png")
    row = {"name": "s", "composite": "comp.png", "background": "bg.png", "caption": "a red square"}
    if with_mask:
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(folder / "mask.png")
        row["mask"] = "mask.png"
    else:
        row["box"] = list(box)
    (folder / "manifest.jsonl").write_text(json.dumps(row) + "\n")


@pytest.mark.parametrize("with_mask", [False, True], ids=["box", "mask"])
@pytest.mark.parametrize("size", [(256, 128), (96, 192)], ids=["wide", "tall"])
def test_non_square_images_keep_their_aspect_and_the_box_its_object(tmp_path, size, with_mask):
    width, height = size
    # A 32 px red square near the far end of the long side: outside the centred square crop.
    box = (width - 40, 40, width - 8, 72) if width > height else (24, height - 40, 56, height - 8)
    _red_square_sample(tmp_path, width, height, box, with_mask)
    item = ManifestDataset(tmp_path, "pair", resolution=64)[0]
    comp, mask = item["composite"], item["mask"][0]
    assert comp.shape == (3, 64, 64) and mask.shape == (64, 64)
    red = (comp[0] > 0.75) & (comp[1] < 0.25)
    ys, xs = red.nonzero(as_tuple=True)
    assert red.sum() > 0, "the object was cropped away"
    side = 32 * 64 / min(width, height)  # the square is scaled by resolution / short side, in both directions
    assert abs((xs.max() - xs.min() + 1) - side) <= 2 and abs((ys.max() - ys.min() + 1) - side) <= 2  # still square
    covered = mask.bool()
    assert covered[red].all()  # the box still covers every object pixel
    assert red[covered].float().mean() > 0.8  # and little else (bicubic edges aside)


def test_yaml_echo_round_trips():
    from training.config import config_summary

    cfg = load_config(train_stage2.TrainConfig, CONFIGS / "stage2.yaml")
    text = config_summary(cfg, {"effective_batch": 32})
    assert yaml.safe_load(text)["max_steps"] == 9000
