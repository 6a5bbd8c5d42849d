"""Checkpoints a user can trust, in one process: the manifest names a damaged file and ``resume=auto`` falls back,
``resume=PATH`` stops; a crafted ``trainer.pt`` is refused before its code runs; a checkpoint from before manifests
loads with a warning; ``train.save_total_limit`` keeps exactly N; SIGTERM becomes a flag."""
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch

from test_ckpt import _train_one_step, _wrapped
from vr1fast import ckpt
from vr1fast.errors import ConfigError
from vr1fast.model.load import tiny_model


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """``run/checkpoints/step_000002`` and ``step_000004`` of the tiny model (a real optimizer state)."""
    out = tmp_path_factory.mktemp("run")
    model, tokenizer = tiny_model(1)
    policy, info = _wrapped(model)
    for step in (2, 4):
        _train_one_step(policy)
        ckpt.save(ckpt.checkpoint_root(out), step, policy, info=info, processor=tokenizer, source_dir=None,
                  state={"data": {"epoch": 0, "index": step}}, config_text="")
    return out


@pytest.fixture
def run_dir(two_checkpoints, tmp_path) -> Path:
    return Path(shutil.copytree(two_checkpoints, tmp_path / "run"))


def _truncate(file: Path) -> None:
    """To 100 bytes (a full disk, a partial copy), or half a file shorter than that."""
    data = file.read_bytes()
    file.write_bytes(data[:min(100, len(data) // 2)])


def _delete(file: Path) -> None:
    file.unlink()


def _flip_one_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


DAMAGE = {"truncate": (_truncate, "bytes, the manifest"), "delete": (_delete, "is missing"),
          "bit-flip": (_flip_one_bit, "does not match its SHA-256")}


def test_manifest_lists_every_file_with_size_and_sha256(run_dir):
    path = ckpt.checkpoint_root(run_dir) / "step_000004"
    files = ckpt.read_manifest(path)
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(files) == on_disk and "model/model.safetensors" in files and "trainer.pt" in files
    assert all(files[n]["size"] == (path / n).stat().st_size for n in files)
    assert ckpt.verify(path) is None


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", ["model/model.safetensors", "trainer.pt", "state.json"])
def test_damaged_newest_checkpoint_is_named_and_skipped(run_dir, capsys, damage, name):
    root = ckpt.checkpoint_root(run_dir)
    newest, previous = root / "step_000004", root / "step_000002"
    corrupt, says = DAMAGE[damage]
    corrupt(newest / name)
    assert ckpt.resolve("auto", run_dir) == previous
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and str(newest) in err[0] and name in err[0] and says in err[0]
    assert str(previous) in err[1]
    with pytest.raises(ConfigError) as e:
        ckpt.resolve(str(newest), run_dir)
    assert "\n" not in str(e.value) and str(newest) in str(e.value) and name in str(e.value)
    assert ckpt.resolve(str(previous), run_dir) == previous


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(run_dir):
    root = ckpt.checkpoint_root(run_dir)
    _flip_one_bit(root / "step_000004" / "model" / "model.safetensors")
    _truncate(root / "step_000002" / "trainer.pt")
    with pytest.raises(ConfigError, match="all 2 complete checkpoints .* are damaged .*step_000004"):
        ckpt.resolve("auto", run_dir)


def test_checkpoint_without_manifest_loads_with_a_warning(run_dir, capsys):
    """A checkpoint written before manifests (``COMPLETE`` holds the step): same trainer.pt / RNG files, which the
    safe loader reads."""
    path = ckpt.checkpoint_root(run_dir) / "step_000004"
    (path / "COMPLETE").write_text("4\n")
    assert ckpt.resolve("auto", run_dir) == path
    assert "no manifest" in capsys.readouterr().err
    policy, info = _wrapped(tiny_model(1)[0])
    assert ckpt.load(path, policy, info=info)["step"] == 4
    assert policy.scheduler.last_epoch == 2 and len(policy.optimizer.state) > 0


class _Payload:
    """Unpickling this runs ``exec``: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_crafted_trainer_pt_is_refused_and_runs_no_code(run_dir, tmp_path):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"optimizer": _Payload(marker), "scheduler": {}}, crafted)
    torch.load(crafted, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.read_text() == "ran"
    marker.unlink()

    path = ckpt.checkpoint_root(run_dir) / "step_000004"
    shutil.copy(crafted, path / "trainer.pt")
    ckpt.write_manifest(path, 4)  # whoever can swap a file can rewrite the manifest: it detects damage only
    assert ckpt.resolve(str(path), run_dir) == path
    policy, info = _wrapped(tiny_model(1)[0])
    with pytest.raises(ConfigError) as e:
        ckpt.load(path, policy, info=info)
    assert "\n" not in str(e.value) and "trainer.pt" in str(e.value) and "names exec," in str(e.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # torch's own check agrees
        torch.load(path / "trainer.pt", weights_only=True)
    assert not marker.exists()


def test_save_total_limit_keeps_exactly_n_and_never_the_resumed_one(tmp_path):
    model, tokenizer = tiny_model(0)
    policy, info = _wrapped(model)
    root = tmp_path / "checkpoints"
    (root / "step_000009").mkdir(parents=True)  # incomplete: not counted, not deleted

    def save(step, protect=None):
        ckpt.save(root, step, policy, info=info, processor=tokenizer, source_dir=None, state={}, config_text="")
        return ckpt.prune(root, 2, protect=protect, info=info)

    assert [save(s) for s in (1, 2)] == [[], []]
    assert save(3) == [root / "step_000001"]
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000002", "step_000003"]
    resumed = root / "step_000002"
    for step in (4, 5):
        save(step, protect=resumed)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000002", "step_000004", "step_000005"]
    assert (root / "step_000009").is_dir()
    assert ckpt.prune(root, 0, protect=None, info=info) == []  # 0 keeps all


def test_sigterm_sets_the_stop_flag_instead_of_killing():
    previous = signal.getsignal(signal.SIGTERM)
    with ckpt.StopSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_deepspeed_files_are_screened_before_deepspeed_unpickles_them(tmp_path):
    """DeepSpeed's own loader unpickles; the screen lets through only the types its ZeRO states hold."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    folder = tmp_path / "deepspeed" / "state"
    folder.mkdir(parents=True)
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
                                         "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                         "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(4)}}}}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ckpt.screen_deepspeed(tmp_path / "deepspeed")
    marker = tmp_path / "code_ran"
    torch.save({"module": _Payload(marker)}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match="mp_rank_00_model_states.pt: refused to load: it names exec,"):
        ckpt.screen_deepspeed(tmp_path / "deepspeed")
    assert not marker.exists()


def test_training_cli_names_the_damaged_checkpoint_in_one_line(run_dir, tmp_path, capsys):
    from vr1fast.data.synthetic import generate_synthetic
    from vr1fast.train import main
    generate_synthetic(tmp_path / "synthetic", n=8, seed=0)
    newest = ckpt.checkpoint_root(run_dir) / "step_000004"
    _truncate(newest / "model" / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        main([f"--data.synthetic_dir={tmp_path / 'synthetic'}", "--data.synthetic_size=8",
              f"--train.output_dir={run_dir}", f"--train.resume={newest}", "--model.warmstart_steps=0"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"vr1fast.train: error: train.resume: checkpoint {newest} is damaged: model/model.safetensors "
                   f"has 100 bytes, the manifest lists {ckpt.read_manifest(newest)['model/model.safetensors']['size']}"]
