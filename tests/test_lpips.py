"""LPIPS pieces: 2AFC and JND scoring, the BAPPS loader, the network against the `lpips` package, clamping and
checkpoints. Tiny 16-32 px patches; the trainer end to end is in test_lpips_trainer.py."""

import shutil
from pathlib import Path

import pytest
import torch

from src.data.bapps import JNDDataset, TwoAFCDataset, find_2afc_root, find_jnd_root
from src.data.bapps_synth import generate_bapps
from src.data.image_folder import DatasetError
from src.losses.ranking import RankingHead
from src.models.lpips import (
    LPIPS,
    imagenet_vgg16_path,
    load_lpips_checkpoint,
    lpips_with_official_weights,
    official_to_ours,
    save_lpips_checkpoint,
)
from src.training.lpips_eval import OURS, comparison_metrics, jnd_map, two_afc_scores
from src.training.lpips_train import (
    LPIPSTrainSettings,
    TwoAFCModel,
    build_adam,
    build_lpips,
    build_scheduler,
    train_step,
)


@pytest.fixture(scope="module")
def bapps_root(tmp_path_factory):
    return generate_bapps(tmp_path_factory.mktemp("bapps"), num_train=4, num_val=3, patch_size=16, seed=1)


def test_two_afc_formula_counts_ties_as_half():
    d0 = torch.tensor([1.0, 2.0, 3.0, 3.0, 0.5])
    d1 = torch.tensor([2.0, 1.0, 3.0, 5.0, 0.1])
    judge = torch.tensor([0.2, 0.6, 0.9, 1.0, 0.0])  # fraction of people preferring p1
    # d0<d1: metric picks p0 -> agrees with 1-h; d1<d0: picks p1 -> agrees with h; tie -> 0.5
    assert torch.allclose(two_afc_scores(d0, d1, judge), torch.tensor([0.8, 0.6, 0.5, 0.0, 0.0]))


def test_jnd_map_on_a_hand_made_case():
    # ascending distance: same, different, same, different -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1
    # envelope: precision 1 up to recall 1/2, 2/3 up to recall 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    ap = jnd_map(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert jnd_map(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert jnd_map(torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([1.0, 1.0, 0.0, 0.0])) < 0.6


def test_loader_reads_the_layout_from_root_or_2afc(bapps_root):
    for root in (bapps_root, bapps_root / "2afc"):
        assert find_2afc_root(root) == bapps_root / "2afc"
        assert find_jnd_root(root) == bapps_root / "jnd"
    ds = TwoAFCDataset(bapps_root / "2afc", "train", ["traditional", "cnn", "mix"], 24, "zero_to_one")
    assert len(ds) == 12
    item = ds[0]
    assert item["ref"].shape == item["p0"].shape == item["p1"].shape == (3, 24, 24)  # resized 16 -> 24
    assert 0.0 <= float(item["ref"].min()) and float(item["ref"].max()) <= 1.0
    assert 0.0 <= float(item["judge"]) <= 1.0
    minus = TwoAFCDataset(bapps_root, "train", ["traditional"], 24, "minus_one_to_one")[0]["ref"]
    assert torch.allclose(minus, item["ref"] * 2 - 1, atol=1e-6)
    jnd = JNDDataset(bapps_root / "jnd", ["traditional", "cnn"], 16, "minus_one_to_one")
    assert len(jnd) == 6 and float(jnd[0]["p0"].min()) >= -1.0 and 0.0 <= float(jnd[0]["same"]) <= 1.0


def test_loader_rejects_mismatched_or_missing_folders(bapps_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bapps_root, broken)
    sorted((broken / "2afc/val/cnn/p1").iterdir())[0].unlink()
    with pytest.raises(DatasetError, match="count mismatch.*'p1': 2"):
        TwoAFCDataset(broken, "val", ["cnn"], 16, "minus_one_to_one")
    shutil.rmtree(broken / "2afc/val/color")
    with pytest.raises(DatasetError, match="category folder missing.*color"):
        TwoAFCDataset(broken, "val", ["color"], 16, "minus_one_to_one")
    renamed = broken / "2afc/train/mix/judge"
    first = sorted(renamed.iterdir())[0]
    first.rename(renamed / "zzz.npy")
    with pytest.raises(DatasetError, match="do not match by name"):
        TwoAFCDataset(broken, "train", ["mix"], 16, "minus_one_to_one")


def test_unreadable_patches_skip_their_sample(bapps_root, tmp_path, caplog):
    """A corrupt patch and a decompression bomb (a tiny 1-bit PNG of 2e8 pixels) each cost one sample, not the run."""
    from PIL import Image

    broken = tmp_path / "broken"
    shutil.copytree(bapps_root, broken)
    ds = TwoAFCDataset(broken, "train", ["cnn"], 16, "minus_one_to_one")
    Path(ds.samples[0]["p0"]).write_bytes(b"\x89PNG\r\n not a png")
    Image.new("1", (20000, 10000)).save(ds.samples[1]["ref"])
    assert ds[0] is None and ds[1] is None and ds[2]["ref"].shape == (3, 16, 16)
    assert sum("skipping BAPPS sample" in r.getMessage() for r in caplog.records) == 2


def test_unreadable_npy_files_skip_their_sample_with_a_warning_naming_them(bapps_root, tmp_path, caplog):
    """An empty .npy (np.load raises EOFError) stopped the run; a truncated one was skipped unnamed."""
    broken = tmp_path / "broken"
    shutil.copytree(bapps_root / "jnd", broken / "jnd")
    shutil.copytree(bapps_root / "2afc" / "val" / "cnn", broken / "2afc" / "val" / "cnn")
    ds = TwoAFCDataset(broken, "val", ["cnn"], 16, "minus_one_to_one")
    ds.samples[0]["judge"].write_bytes(b"")
    ds.samples[1]["judge"].write_bytes(ds.samples[1]["judge"].read_bytes()[:-2])
    jnd = JNDDataset(broken / "jnd", ["cnn"], 16, "minus_one_to_one")
    jnd.samples[2]["same"].write_bytes(b"")
    assert ds[0] is None and ds[1] is None and float(ds[2]["judge"]) >= 0 and jnd[2] is None
    messages = [r.getMessage() for r in caplog.records if "skipping BAPPS sample" in r.getMessage()]
    assert len(messages) == 3
    for message, path in zip(messages, (ds.samples[0]["judge"], ds.samples[1]["judge"], jnd.samples[2]["same"])):
        assert str(path) in message


def test_official_linear_weights_reproduce_the_lpips_package():
    import lpips

    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    ours = lpips_with_official_weights(pretrained_trunk=False)
    trunk = {k: v for k, v in official_to_ours(reference.state_dict()).items() if k.startswith("trunk.")}
    ours.load_state_dict({**ours.state_dict(), **trunk})
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (3,)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.all(got > 0)


def test_clamping_keeps_linear_weights_non_negative(bapps_root):
    from accelerate import Accelerator

    torch.manual_seed(0)
    lpips_net = build_lpips(use_dropout=True, pretrained_backbone=False, train_backbone=False)
    model = TwoAFCModel(lpips_net, RankingHead(8))
    optimizer = build_adam(model, lr=1.0)  # huge steps: unclamped, many weights would cross zero
    scheduler = build_scheduler(optimizer, total_steps=2, decay_steps=1)
    batch = {k: torch.stack([TwoAFCDataset(bapps_root, "train", ["mix"], 16, "minus_one_to_one")[i][k]
                             for i in range(4)]) for k in ("ref", "p0", "p1", "judge")}
    accelerator = Accelerator(cpu=True)
    for _ in range(2):
        out = train_step(accelerator, model, batch, optimizer, scheduler, LPIPSTrainSettings(img_range="minus_one_to_one"))
        assert out["finite"]
    weights = torch.cat([lin.weight.detach().flatten() for lin in lpips_net.lins])
    assert float(weights.min()) >= 0.0
    assert int((weights == 0).sum()) > 0  # some weights were pushed below zero and clamped
    assert not any(p.requires_grad for p in lpips_net.trunk.parameters())


def test_train_backbone_updates_the_trunk_and_frozen_does_not(bapps_root):
    from accelerate import Accelerator

    ds = TwoAFCDataset(bapps_root, "train", ["cnn"], 16, "minus_one_to_one")
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("ref", "p0", "p1", "judge")}
    for train_backbone in (True, False):
        torch.manual_seed(0)
        net = build_lpips(use_dropout=False, pretrained_backbone=False, train_backbone=train_backbone)
        before = net.trunk[0].weight.detach().clone()
        model = TwoAFCModel(net, RankingHead(8))
        optimizer = build_adam(model, lr=1e-3)
        train_step(Accelerator(cpu=True), model, batch, optimizer, build_scheduler(optimizer, 1, 0),
                   LPIPSTrainSettings(img_range="minus_one_to_one"))
        assert torch.equal(net.trunk[0].weight, before) is not train_backbone


def host_reads_during(fn) -> int:
    """How many times fn() copied a tensor's value to the host (.item(), bool(), float(): aten._local_scalar_dense)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.reads


def test_a_training_step_never_reads_the_device_and_a_nan_step_changes_nothing(bapps_root):
    from accelerate import Accelerator

    ds = TwoAFCDataset(bapps_root, "train", ["cnn"], 16, "minus_one_to_one")
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("ref", "p0", "p1", "judge")}
    torch.manual_seed(0)
    net = build_lpips(use_dropout=False, pretrained_backbone=False, train_backbone=False)
    model = TwoAFCModel(net, RankingHead(8))
    optimizer = build_adam(model, lr=1e-2)
    assert optimizer.defaults["fused"]
    scheduler, settings, accelerator = build_scheduler(optimizer, 10, 0), LPIPSTrainSettings(), Accelerator(cpu=True)
    out = {}
    assert host_reads_during(lambda: out.update(train_step(accelerator, model, batch, optimizer, scheduler, settings))) == 0
    assert bool(out["finite"]) and torch.isfinite(out["loss"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in st.items()} for i, st in enumerate(optimizer.state.values())}
    bad = {**batch, "ref": batch["ref"].clone()}
    bad["ref"][0, 0, 0, 0] = float("nan")
    out = train_step(accelerator, model, bad, optimizer, scheduler, settings)
    assert not bool(out["finite"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for i, st in enumerate(optimizer.state.values()):
        assert all(torch.equal(v, moments[i][k]) for k, v in st.items())  # moments and step count untouched
    train_step(accelerator, model, batch, optimizer, scheduler, settings)
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["lpips.pt", "lpips.safetensors"])
def test_checkpoint_is_self_contained_and_frozen(tmp_path, name):
    torch.manual_seed(0)
    model = LPIPS(use_dropout=True).eval()
    model.clamp_weights()
    path = save_lpips_checkpoint(tmp_path / name, model, RankingHead(4), {"img_size": 16})
    if name.endswith(".pt"):
        raw = torch.load(path, weights_only=True)
        assert raw["config"]["img_size"] == 16 and "trunk.0.weight" in raw["lpips"]
    loaded = load_lpips_checkpoint(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x, y), model(x, y))
        assert torch.all(loaded(x, x) == 0)


def test_missing_files_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as err:
        imagenet_vgg16_path()
    assert "vgg16-397923af.pth" in str(err.value) and str(tmp_path / "torch_home" / "hub" / "checkpoints") in str(err.value)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        lpips_with_official_weights(pretrained_trunk=True)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_lpips_checkpoint(tmp_path / "nope.pt")
    from accelerate import Accelerator

    metrics, note = comparison_metrics(LPIPS(), True, Accelerator(cpu=True))  # --eval_lpips_pkg without the file
    assert list(metrics) == [OURS] and note.startswith("skipped") and "vgg16-397923af.pth" in note
