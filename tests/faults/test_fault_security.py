"""Caches, checkpoints and models never run code they carry, and cache metadata never names a path
outside the store.

- the package sources use no pickle (zarr, JSON and safetensors only; ``torch.load`` only with
  ``weights_only=True``), checked on the syntax tree;
- ``trust_remote_code`` stays off unless asked: a model whose config maps to custom code is refused
  by ``selkd-cache build`` and ``selkd-train`` with a message, and its code never runs;
- a commit record or plan naming a part like ``../../etc``, an unknown array name, or an array whose
  zarr metadata uses a codec the format never writes, is refused by the reader and ``verify``.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import zarr
from zarr.codecs.numcodecs import Zlib

from selkd.cache import CacheCorruptError, CacheError, open_cache
from selkd.cache import format as fmt
from selkd.cache.cli import main as cache_main
from selkd.trainer.cli import main as train_main

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cache", "trainer")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Pickle imports, ``torch.load`` without ``weights_only=True``, ``numpy.load(allow_pickle=True)``,
    ``eval`` / ``exec`` in one Python source."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Call):
            func = node.func
            kwargs = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner, attr = func.value.id, func.attr
                if owner == "torch" and attr == "load" and not _is_true(kwargs.get("weights_only")):
                    found.append(f"{where}: torch.load without weights_only=True")
                if owner in ("np", "numpy") and attr == "load" and _is_true(kwargs.get("allow_pickle")):
                    found.append(f"{where}: numpy.load(allow_pickle=True)")
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append(f"{where}: {func.id}()")
    return found


def test_no_pickle_in_package_sources() -> None:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 10
    problems = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not problems, "\n".join(problems)
    # the checker itself finds what it looks for
    bad = "import pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
    assert len(unsafe_loads(bad, "bad.py")) == 4
    assert not unsafe_loads("import torch\ntorch.load(f, map_location='cpu', weights_only=True)\n", "ok.py")


@pytest.fixture
def remote_code_model(tiny_teacher_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny teacher whose config maps to custom code that, if it ever ran, would write
    a marker file. Returns (model dir, marker path)."""
    model = tmp_path / "remote-code-model"
    shutil.copytree(tiny_teacher_dir, model)
    marker = tmp_path / "custom-code-ran"
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "selkd-custom"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return model, marker


def test_remote_code_refused_without_flag(
    remote_code_model: tuple[Path, Path],
    text_corpus_dir: Path,
    tiny_student_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, marker = remote_code_model
    capsys.readouterr()
    code = cache_main(
        ["build", "--teacher", str(model), "--data", str(text_corpus_dir), "--out", str(tmp_path / "c")]
        + ["--limit-tokens", "500", "--max-seq-len", "64", "--device", "cpu", "--progress", "false"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "custom model code" in err and "trust_remote_code" in err, err
    assert not (tmp_path / "c" / "zarr.json").exists()

    code = train_main(
        ["--teacher", str(tiny_student_dir), "--data", str(text_corpus_dir), "--student", str(model)]
        + ["--out", str(tmp_path / "run"), "--limit-tokens", "500", "--max-seq-len", "64", "--device", "cpu"]
        + ["--progress", "false"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "trust_remote_code" in err, err
    assert not marker.exists(), "custom code from the model directory ran"


# --- metadata that names paths outside the store, or code ----------------------------------------------


def _copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    return out


def _edit_json(path: Path, edit: object) -> None:
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


def _refused(out: Path, capsys: pytest.CaptureFixture[str], needle: str) -> None:
    with pytest.raises(CacheError, match=needle):
        open_cache(str(out), require_complete=False)
    for command in ("verify", "info"):
        capsys.readouterr()
        assert cache_main([command, str(out)]) == 1
        err = capsys.readouterr().err
        assert "refused" in err and needle.replace("\\", "") in err, err


@pytest.mark.parametrize("bad", ["../../etc", "part-00001/../../../etc", "/etc/passwd", "part-1"])
def test_commit_record_naming_outside_part_is_refused(
    bad: str, reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(reference_cache, tmp_path)
    _edit_json(out / fmt.COMMITS_PREFIX / "part-00001.json", lambda rec: rec.update(part=bad))
    _refused(out, capsys, "invalid part name")


def test_plan_naming_outside_part_is_refused(
    reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(reference_cache, tmp_path)
    _edit_json(out / fmt.PLAN_KEY, lambda plan: plan["parts"][0].update(name="../../etc"))
    _refused(out, capsys, "invalid part name")


def test_unknown_array_name_is_refused(
    reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(reference_cache, tmp_path)

    def add_array(rec: dict) -> None:
        rec["arrays"]["../../../outside"] = rec["arrays"]["input_ids"]

    _edit_json(out / fmt.COMMITS_PREFIX / "part-00001.json", add_array)
    _refused(out, capsys, "unknown array name")


def test_score_part_name_is_checked(reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(reference_cache, tmp_path)
    _edit_json(out / fmt.SCORE_COMMITS_PREFIX / "score-00000.json", lambda rec: rec.update(part="../../etc"))
    capsys.readouterr()
    assert cache_main(["verify", str(out)]) == 1
    assert "does not name this score part" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3 specification")
def test_array_with_foreign_codec_is_refused_before_decoding(
    reference_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _copy(reference_cache, tmp_path)
    path = f"{fmt.PARTS_GROUP}/part-00001/input_ids"
    values = zarr.open_array(str(out / path), mode="r")[:]
    # Same values (the checksum still matches), stored with a codec the format never writes.
    zarr.create_array(str(out), name=path, data=values, compressors=[Zlib()], overwrite=True)
    decoded = []
    monkeypatch.setattr(Zlib, "_decode_single", lambda *a: decoded.append(a))
    reader = open_cache(str(out))
    with pytest.raises(CacheCorruptError, match="part part-00001, array input_ids: uses codec.*zlib.*refused"):
        reader.read_part("part-00001")
    with pytest.raises(CacheCorruptError, match="input_ids: uses codec"):
        reader.get(0, next(p.split for p in reader.parts if p.name == "part-00001"))
    assert not decoded
    capsys.readouterr()
    assert cache_main(["verify", str(out)]) == 1
    assert "part part-00001, array input_ids: uses codec" in capsys.readouterr().err

    # A codec zarr does not know at all (e.g. a pickle codec) cannot even be opened: refused the same way.
    meta = out / path / "zarr.json"
    _edit_json(meta, lambda m: m.update(codecs=[{"name": "bytes"}, {"name": "numcodecs.pickle"}]))
    with pytest.raises(CacheCorruptError, match="part part-00001, array input_ids: cannot be read"):
        open_cache(str(out)).read_part("part-00001")
