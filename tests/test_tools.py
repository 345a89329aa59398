"""tools/train_demo_model.py's resume and export, run for real with --tiny on the CPU: a few
optimisation steps of the 0.23M-parameter model on data prepared once for the module."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import train_demo_model as tdm  # noqa: E402

EXPORT = ["checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A work_dir holding the --tiny data cache (corpus, tokenizer, packed rows)."""
    work = tmp_path_factory.mktemp("prepared")
    assert tdm.main(["--tiny", "--work_dir", str(work), "--prepare_only", "--workers", "1"]) == 0
    return work


@pytest.fixture
def work_dir(prepared, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    return work


def train(work_dir, *extra):
    return tdm.main(["--tiny", "--work_dir", str(work_dir), "--workers", "1", "--device", "cpu",
                     "--no-compile", "--max_steps", "3", *extra])


def leftovers(folder: Path):
    """Temporary files or folders that a write left beside its target."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name)


def test_resume_state_is_tensors_and_plain_values(work_dir, capsys):
    assert train(work_dir, "--stop_after_steps", "2") == tdm.EXIT_UNFINISHED
    state = work_dir / "train_state.pt"
    saved = torch.load(state, map_location="cpu", weights_only=True)  # no pickled objects
    assert saved["progress"]["step"] == 2
    assert train(work_dir, "--stop_after_steps", "0") == tdm.EXIT_UNFINISHED
    assert f"resumed from {state} at step 2/3" in capsys.readouterr().out
    assert leftovers(work_dir) == []


class RunsCode:
    """Unpickling this calls Path.touch: stands for any code a foreign state could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_state_that_would_run_code(work_dir, tmp_path):
    marker = tmp_path / "ran"
    state = work_dir / "train_state.pt"
    torch.save({"config": RunsCode(marker)}, state)
    with pytest.raises(SystemExit) as err:
        train(work_dir)
    message = str(err.value)
    assert str(state) in message and "fresh --work_dir" in message
    assert "weights_only" not in message  # PyTorch's advice to load it unsafely
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", [1, 2], dict.fromkeys(tdm.STATE_FIELDS, 1)])
def test_resume_refuses_a_damaged_or_foreign_state(work_dir, content):
    state = work_dir / "train_state.pt"
    if not isinstance(content, bytes):
        torch.save(content, state)
    else:
        state.write_bytes(content)
    with pytest.raises(SystemExit) as err:
        train(work_dir)
    assert str(state) in str(err.value) and "fresh --work_dir" in str(err.value)


def test_out_dir_with_other_files_is_refused_before_training(work_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "consolidated.00.pth").write_bytes(b"my own weights")
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as err:
            train(work_dir, "--out_dir", str(out), *extra)
        assert "notes.txt" in str(err.value) and "--out_dir" in str(err.value)
    assert (out / "consolidated.00.pth").read_bytes() == b"my own weights"
    assert not (work_dir / "train_state.pt").exists()  # refused before any training


def old_export(out: Path, tokenizer: Path) -> dict:
    """A model folder as an earlier export left it; returns its files' bytes."""
    tdm.write_folder(out, {"w": torch.zeros(2)}, tdm.TINY, tokenizer, overwrite=False)
    return {name: (out / name).read_bytes() for name in EXPORT}


def test_model_folder_is_replaced_only_with_overwrite(work_dir, tmp_path):
    out = tmp_path / "model"
    before = old_export(out, next(work_dir.glob("data-*/tokenizer.model")))
    with pytest.raises(SystemExit) as err:
        train(work_dir, "--out_dir", str(out))
    assert "--overwrite" in str(err.value)
    assert {name: (out / name).read_bytes() for name in EXPORT} == before
    assert train(work_dir, "--out_dir", str(out), "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    assert (out / "consolidated.00.pth").read_bytes() != before["consolidated.00.pth"]
    assert leftovers(tmp_path) == [] and leftovers(work_dir) == []


def test_failed_export_keeps_the_previous_folder(work_dir, tmp_path, monkeypatch):
    out = tmp_path / "model"
    tokenizer = next(work_dir.glob("data-*/tokenizer.model"))
    before = old_export(out, tokenizer)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tdm.shutil, "copyfile", disk_full)
    with pytest.raises(OSError):
        tdm.write_folder(out, {"w": torch.ones(2)}, tdm.TINY, tokenizer, overwrite=True)
    assert {name: (out / name).read_bytes() for name in EXPORT} == before
    assert leftovers(tmp_path) == []


def test_stats_json_is_never_half_written(work_dir, tmp_path, monkeypatch):
    stats = tmp_path / "stats.json"
    stats.write_text('{"old": true}')
    real_dumps = json.dumps

    def dumps_that_cannot_be_written(obj, **kwargs):
        # The stats are dumped with indent; a lone surrogate makes the write fail after
        # the file was opened, as a full disk does.
        text = real_dumps(obj, **kwargs)
        return text + "\ud800" if kwargs.get("indent") else text

    monkeypatch.setattr(tdm.json, "dumps", dumps_that_cannot_be_written)
    with pytest.raises(UnicodeEncodeError):
        train(work_dir, "--stop_after_steps", "1", "--stats", str(stats))
    assert json.loads(stats.read_text()) == {"old": True}
    assert leftovers(tmp_path) == []
