"""The seeds grid (bench/grids/seeds.toml): both recipes in both frameworks, on an image
folder laid out as the seeds read it (data/train/<class>/<image>, validation_split 0.2).

Run offline at toy scale: the shipped grid with weights "none" (ImageNet weights need a
download), 32 px, 2 epochs, on 30 generated JPEGs; everything else as shipped.
"""

from __future__ import annotations

import sys
import tomllib

import numpy as np
import pytest

from bench import cli, tracking
from bench.config import grid as gridmod
from bench.paths import grids_dir
from bench.run import runner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLASSES = ("cats", "dogs", "owls")
PER_CLASS = 10


def _image_folder(root) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            base = np.zeros((40, 48, 3)) + 60
            base[..., k] += 150  # a colour per class: learnable in two epochs
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.jpg", quality=90)


def _toy(text: str) -> str:
    for old, new in (('weights = ["imagenet"]', 'weights = ["none"]'),
                     ("image_size = 224", "image_size = 32"), ("epochs = 20", "epochs = 2"),
                     ("batch_size = 32", "batch_size = 8")):
        assert old in text, old
        text = text.replace(old, new)
    return text + '\n[run]\ndevice = "cpu"\n'


def test_the_seed_recipes_run_in_both_frameworks_on_the_seeds_folder(store, capsys):
    shipped = (grids_dir() / "seeds.toml").read_text()
    path = store / "seeds.toml"
    path.write_text(_toy(shipped))
    # no data/train yet: --dry-run lists the cells and says what is missing; a run refuses
    # before anything runs, naming the path and the layout
    assert cli.main(["run", "seeds", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cells" in out and "keras/vgg16/two_stage[depth=1]/seed_data" in out
    assert "not runnable here yet: dataset 'seed_data': image folder 'data/train' does not " \
           "exist" in out
    with pytest.raises(gridmod.GridError, match=r"data/train.*does not exist.*<class>"):
        gridmod.load(path)
    assert cli.main(["run", str(path)]) == 2
    assert "nothing was run" in capsys.readouterr().err

    _image_folder(store / "data" / "train")
    g = gridmod.load(path)
    assert sorted((s.framework, s.backbone) for s in g.specs) == [
        ("keras", "resnet50"), ("keras", "vgg16"), ("torch", "resnet50"), ("torch", "vgg16")]
    result = runner.run_grid(g, path.read_text(), stream=sys.stdout)
    assert [o.status for o in result.outcomes] == ["FINISHED"] * 4, result.outcomes
    runs = {(r.data.params["framework"], r.data.params["backbone"]): r
            for r in tracking.cell_runs(result.experiment_id)}
    for (fw, backbone), r in runs.items():
        m = r.data.metrics
        # validation_split 0.2 of 30 images, 2 a class; the seeds test on that part
        assert (m["n_train"], m["n_val"], m["n_test"]) == (24, 6, 6), (fw, backbone)
        assert m["test_acc"] == pytest.approx(m["val_acc"])
        assert m["epochs_trained"] == 2
    # the same recipe trains the same parameters in both frameworks: VGG16's block5 (3 convs
    # 512->512) and the GAP-1024-512 head; ResNet50's 2048-1024-classes head alone
    block5 = 3 * (512 * 512 * 9 + 512)
    mlp = 512 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 3 + 3
    head1024 = 2048 * 1024 + 1024 + 1024 * 3 + 3
    for fw in ("keras", "torch"):
        assert runs[(fw, "vgg16")].data.metrics["trainable_params"] == block5 + mlp, fw
        assert runs[(fw, "resnet50")].data.metrics["trainable_params"] == head1024, fw
        assert runs[(fw, "vgg16")].data.params["head"] == "mlp"


def test_a_card_without_a_test_split_refuses_selection_on_its_val_part(tmp_path):
    (tmp_path / "a").mkdir()
    text = _toy((grids_dir() / "seeds.toml").read_text()).replace(
        'augmentation = "flip"', 'augmentation = "flip"\nselect = "best_val"')
    with pytest.raises(gridmod.GridError, match=r"select = 'best_val'.*test = \"val\""):
        gridmod.from_dict(tomllib.loads(text), "seeds.toml", check_data=False)
    bad = text.replace('test = "val"', 'test = "val"\ntest_fraction = 0.2')
    with pytest.raises(gridmod.GridError, match=r"test_fraction: not with test = \"val\""):
        gridmod.from_dict(tomllib.loads(bad), "seeds.toml", check_data=False)
