"""The way back to the official layout: ``save_official_checkpoint`` writes the project's models as the official
I-JEPA / StoP code saves them (checked against checkpoints that code wrote), and
``python -m stop_kernels.training.checkpoint to-official`` converts a training run's sharded checkpoint."""
import os

import pytest
import torch

from stop_kernels import load_official_checkpoint, save_official_checkpoint
from stop_kernels.models import predictor_for, vit_encoder
from stop_kernels.models.official import official_checkpoint, official_state_dict
from stop_kernels.training import checkpoint as C
from stop_kernels.training.config import ConfigError, TrainConfig, config_from_dict

from _train_helpers import TINY, trained_run

CASES = [("official_stop_small.pt", "learned"), ("official_ijepa_small.pt", "none")]


@pytest.mark.parametrize("name, mode", CASES)
def test_round_trip_writes_the_official_checkpoint_back_exactly(official_fixture, tmp_path, name, mode):
    """official file → project models → official file: the same keys, shapes, dtypes and values (bit for
    bit) in each of the three state dicts, and the same epoch."""
    original = official_fixture(name)["checkpoint"]
    m = load_official_checkpoint(original, num_heads=4, noise_mode=mode)
    path = save_official_checkpoint(tmp_path / "back.pth.tar", m.encoder, m.predictor, m.target_encoder, epoch=m.epoch)
    back = torch.load(path, weights_only=True)
    assert set(back) == {"encoder", "predictor", "target_encoder", "epoch"} and back["epoch"] == original["epoch"]
    for key in ("encoder", "predictor", "target_encoder"):
        assert set(back[key]) == set(original[key]), key
        for k, v in original[key].items():
            assert back[key][k].dtype == v.dtype and back[key][k].shape == v.shape, (key, k)
            assert torch.equal(back[key][k], v), (key, k)


def test_official_state_dict_layout_and_bad_inputs(tmp_path):
    from stop_kernels.models import predictor_for, vit_encoder
    enc = vit_encoder("vit_tiny", img_size=32, patch_size=8)
    pred = predictor_for(enc, img_size=32, patch_size=8, predictor_embed_dim=96, depth=1)
    sd = official_state_dict(pred)
    assert set(sd) == {"module." + k for k in pred.state_dict()}
    assert sd["module.predictor_pos_embed"].shape == (1, 16, 96)  # the official [1, P, D] table
    ck = official_checkpoint(enc, pred.to(torch.float64))
    assert set(ck) == {"encoder", "predictor"}  # no target encoder and no epoch unless given
    w = ck["predictor"]["module.predictor_embed.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, pred.predictor_embed.weight.float())
    enc.blocks[0].attn.qkv.weight.data.add_(1.0)  # the checkpoint is a copy: later training does not reach it
    assert not torch.equal(ck["encoder"]["module.blocks.0.attn.qkv.weight"], enc.blocks[0].attn.qkv.weight)
    with pytest.raises(TypeError, match="^encoder: expected a torch.nn.Module, got OrderedDict"):
        official_checkpoint(enc.state_dict(), pred)
    with pytest.raises(TypeError, match="^target_encoder: expected a torch.nn.Module, got str"):
        official_checkpoint(enc, pred, "enc")
    with pytest.raises(ValueError, match="^epoch: expected an integer >= 0 or None, got -1"):
        official_checkpoint(enc, pred, epoch=-1)
    with pytest.raises(FileNotFoundError, match="^path: no such folder"):
        save_official_checkpoint(tmp_path / "missing" / "x.pth.tar", enc, pred)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous file as it was and no temporary file behind."""
    from stop_kernels.models import predictor_for, vit_encoder
    enc = vit_encoder("vit_tiny", img_size=32, patch_size=8)
    pred = predictor_for(enc, img_size=32, patch_size=8, predictor_embed_dim=96, depth=1)
    path = tmp_path / "model.pth.tar"
    save_official_checkpoint(path, enc, pred, epoch=1)
    before = path.read_bytes()
    real_save = torch.save

    def torn(obj, fh, *a, **kw):
        real_save(obj, fh, *a, **kw)
        fh.truncate(100)
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        save_official_checkpoint(path, enc, pred, epoch=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.pth.tar"]


def test_a_training_checkpoint_converts_to_the_official_layout(tmp_path, cpu_train, capsys):
    """The CLI reads the run's sharded (DCP) checkpoint into models built from the run's own config and writes
    the official file: loaded back, its three models hold exactly the trained weights."""
    run, trained = trained_run(tmp_path)
    out = tmp_path / "official.pth.tar"
    assert C.main(["to-official", run, str(out)]) == 0
    assert "step 2" in capsys.readouterr().out
    m = load_official_checkpoint(str(out), noise_mode="learned")
    assert m.epoch == 0
    for name in ("encoder", "predictor", "target_encoder"):
        got = getattr(m, name).state_dict()
        assert set(got) == set(trained[name])
        for k, v in trained[name].items():
            assert torch.equal(got[k], v), (name, k)
    assert not torch.equal(trained["encoder"]["blocks.0.attn.qkv.weight"],  # the run moved them
                           trained["target_encoder"]["blocks.0.attn.qkv.weight"])


def test_find_checkpoint_takes_a_run_its_checkpoints_or_one_step(tmp_path, cpu_train, capsys):
    run, _ = trained_run(tmp_path, steps=1)
    step = os.path.join(run, "checkpoints", "step_00000001")
    for path in (run, os.path.join(run, "checkpoints"), step):
        assert C.find_checkpoint(path) == step
    assert C.find_checkpoint(run, step=1) == step
    with pytest.raises(ValueError, match=r"^step: no complete checkpoint of step 5 in .* \(found \[1\]\)"):
        C.find_checkpoint(run, step=5)
    with pytest.raises(ValueError, match="^step: .* is not the checkpoint of step 2"):
        C.find_checkpoint(step, step=2)
    with pytest.raises(FileNotFoundError, match="^run: no complete checkpoint in"):
        C.find_checkpoint(str(tmp_path / "nothing"))
    with pytest.raises(SystemExit) as e:  # the CLI says it in one line, exit status 2
        C.main(["to-official", str(tmp_path / "nothing"), str(tmp_path / "x.pth.tar")])
    assert e.value.code == 2 and "error: run: no complete checkpoint" in capsys.readouterr().err



def test_to_official_into_a_folder_is_an_error_naming_it(tmp_path, cpu_train, capsys, monkeypatch):
    """An output path that is a folder: save_official_checkpoint raises a ValueError naming path (os.replace of
    its temporary file onto the folder raised IsADirectoryError), and the CLI says it in one line, status 2, naming
    its argument out, before it loads anything (a missing folder too)."""
    run, _ = trained_run(tmp_path, steps=1)
    folder = tmp_path / "exports"
    folder.mkdir()
    enc = vit_encoder("vit_tiny", img_size=32, patch_size=8)
    pred = predictor_for(enc, img_size=32, patch_size=8, predictor_embed_dim=96, depth=1)
    with pytest.raises(ValueError, match="^path: .*exports is a folder"):
        save_official_checkpoint(folder, enc, pred)
    # the CLI names its own argument, out, and checks it before it reads the run's three models
    loaded = []
    monkeypatch.setattr(C, "load_run_models", lambda *a: loaded.append(a))
    for out in (folder, tmp_path / "no-such-folder" / "off.pth.tar"):
        with pytest.raises(SystemExit) as e:
            C.main(["to-official", run, str(out)])
        assert e.value.code == 2 and "error: out: " in capsys.readouterr().err
    assert loaded == []
    assert os.listdir(folder) == [] and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_config_from_dict_reads_back_a_checkpoints_config():
    import json
    cfg = TrainConfig(**dict(TINY, crop_scale=(0.4, 0.9), grad_accum=2))
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))  # pairs come back as lists
    assert back == cfg
    with pytest.raises(ConfigError, match=r"^config: unknown keys \['nope'\]"):
        config_from_dict({"nope": 1})
    with pytest.raises(ConfigError, match="^grad_accum: expected an integer >= 1"):
        config_from_dict({"grad_accum": 0})


def test_loading_copies_and_reads_both_file_formats(official_fixture, tmp_path):
    """The models own their tensors: training them never writes into the dict given (or a memory-mapped
    file); a legacy (pre-zipfile) torch.save file, which cannot be mapped, loads the same."""
    original = official_fixture("official_stop_small.pt")["checkpoint"]
    before = original["encoder"]["module.blocks.0.attn.qkv.weight"].clone()
    m = load_official_checkpoint(original, num_heads=4)
    with torch.no_grad():
        m.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    assert torch.equal(original["encoder"]["module.blocks.0.attn.qkv.weight"], before)
    for name, kw in (("zip.pth.tar", {}), ("legacy.pth.tar", {"_use_new_zipfile_serialization": False})):
        torch.save(original, tmp_path / name, **kw)
        got = load_official_checkpoint(str(tmp_path / name), num_heads=4)
        assert torch.equal(got.encoder.blocks[0].attn.qkv.weight, before), name
        assert torch.equal(got.target_encoder.pos_embed, m.target_encoder.pos_embed), name


def test_find_checkpoint_takes_the_newest_and_skips_incomplete_ones(tmp_path, cpu_train):
    """Of several complete checkpoints the newest by step (not the first or oldest found) unless ``step`` names
    one; a step folder that is not complete (meta.json without DCP's .metadata, as a kill mid-save leaves it)
    is never taken for a checkpoint, also when named itself."""
    import shutil
    run, _ = trained_run(tmp_path, steps=1)
    ck = os.path.join(run, "checkpoints")
    first = os.path.join(ck, "step_00000001")
    for name in ("step_00000003", "step_00000010"):
        shutil.copytree(first, os.path.join(ck, name))
    assert C.find_checkpoint(run) == os.path.join(ck, "step_00000010")
    assert C.find_checkpoint(run, step=3) == os.path.join(ck, "step_00000003")
    torn = os.path.join(ck, "step_00000020")
    shutil.copytree(first, torn)
    os.unlink(os.path.join(torn, ".metadata"))
    assert C.find_checkpoint(run) == os.path.join(ck, "step_00000010")
    with pytest.raises(FileNotFoundError, match="^run: no complete checkpoint in"):
        C.find_checkpoint(torn)


def test_official_state_dict_refuses_a_sharded_model(tmp_path, cpu_train):
    """A model sharded by FSDP2 (here a one-rank mesh) holds DTensors: written as they are, the file would hold
    DTensors (on several ranks each rank's own shard), not the official layout's plain tensors. Refused, naming
    the module and the converter."""
    from stop_kernels.training import distributed as D
    from stop_kernels.training.loop import Trainer
    cfg = TrainConfig(**dict(TINY, out=str(tmp_path), sharding="full"))
    info = D.init_distributed(cfg)
    try:
        tr = Trainer(cfg, info, None)
        with pytest.raises(ValueError, match=r"^encoder: holds sharded \(FSDP2\) tensors .*to-official"):
            official_state_dict(tr.models.encoder, what="encoder")
    finally:
        D.shutdown(info)


def test_a_compiled_or_checkpoint_wrapped_model_saves_and_loads_under_the_plain_names(tmp_path):
    """--compile wraps each block in torch.compile (and --ac block in a checkpoint wrapper): the state dict names
    ``blocks.0._orig_mod.norm1.weight`` and the like. save_official_checkpoint wrote those keys, which
    load_official_checkpoint refused and the official logistic_eval.py (strict=False) would have skipped,
    evaluating a mostly random encoder. The keys are written and read under the plain module's names."""
    from stop_kernels.models.official import strip_prefix
    from stop_kernels.training.parallelize import apply_ac, apply_compile
    torch.manual_seed(0)
    enc = vit_encoder("vit_tiny", img_size=32, patch_size=16)
    pred = predictor_for(enc, img_size=32, patch_size=16, predictor_embed_dim=48, depth=1)
    plain = {"module." + k for k in enc.state_dict()}
    apply_compile(enc)  # (compiles lazily: nothing runs here)
    apply_ac(pred)
    assert any("_orig_mod." in k for k in enc.state_dict())
    assert any("_checkpoint_wrapped_module." in n for n, _ in pred.named_parameters())  # (its state_dict hides it)
    sd = official_state_dict(enc)
    assert set(sd) == plain
    path = save_official_checkpoint(tmp_path / "c.pth.tar", enc, pred, enc, epoch=1)
    m = load_official_checkpoint(path)
    for k, v in strip_prefix(sd).items():
        want = v[0] if k.endswith("pos_embed") else v
        torch.testing.assert_close(m.encoder.state_dict()[k], want, rtol=0, atol=0)
    assert strip_prefix({"module.blocks.0._orig_mod.norm1.weight": 0}) == {"blocks.0.norm1.weight": 0}
