"""Tests of the target-mode codecs (selkd.cache.codecs, selkd.cache.modes) and of the rule that a mode is
declared in one place: every registered mode goes through the real writer, reader, verify and info, a
mode added to the registries alone does too, and no other module compares mode names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selkd.cache import format as fmt
from selkd.cache.classes import TeacherOutputs, teacher_outputs
from selkd.cache.codecs import CODECS, TargetCodec
from selkd.cache.format import ArraySpec
from selkd.cache.info import cache_info
from selkd.cache.modes import MODES, ClassSpec, TargetMode
from selkd.cache.reader import CacheError, CacheReader, open_cache
from selkd.cache.store import Storage
from selkd.cache.targets import SparseTargets
from selkd.cache.verify import verify_cache
from selkd.cache.writer import PartWriter
from selkd.trainer.batch import collate
from selkd.trainer.config import TrainConfig
from selkd.trainer.targets_check import check_targets

REPO = Path(__file__).resolve().parent.parent
VOCAB = 40
LENGTHS = (5, 2, 9, 4, 7, 3)  # tokens per sequence; two batches of three


def spec_of(mode: str) -> ClassSpec:
    m = MODES[mode]
    return ClassSpec(mode, 0 if m.param is None else 5)


def header(spec: ClassSpec) -> dict[str, object]:
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "classes": {"mode": spec.mode, "k": spec.k, "text": str(spec)},
        "vocab_size": VOCAB,
        "max_seq_len": max(LENGTHS),
        "temperature": 1.0,
        "teacher": "synthetic",
        "tokenizer_fingerprint": "synthetic",
        "data": {"n_tokens": sum(LENGTHS), "n_sequences": len(LENGTHS)},
    }


def random_outputs(spec: ClassSpec, n: int, seed: int) -> TeacherOutputs:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, VOCAB, generator=g) * 3
    return teacher_outputs(logits, torch.randint(0, VOCAB, (n,), generator=g), spec, generator=g)


def write_cache(root: Path, spec: ClassSpec, outputs: list[TeacherOutputs] | None = None) -> CacheReader:
    """One part of LENGTHS sequences written in two batches by the real PartWriter (``outputs``: the two
    batches' teacher outputs; random by default)."""
    storage = Storage.open(str(root), mode="w")
    storage.write_json("zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {"selkd": header(spec)}})
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, VOCAB, n).astype(np.int32) for n in LENGTHS]
    writer = PartWriter(storage, fmt.part_name(0), "train", spec.mode, spec.k, VOCAB)
    for b, rows in enumerate((range(0, 3), range(3, 6))):
        n_targets = sum(LENGTHS[i] - 1 for i in rows)
        out = outputs[b] if outputs else random_outputs(spec, n_targets, seed=b)
        starts = [np.eye(1, LENGTHS[i], dtype=bool)[0] for i in rows]
        writer.add(np.array(list(rows)), [seqs[i] for i in rows], starts, out)
    writer.commit()
    return open_cache(str(root), require_complete=False)


def dense(t: SparseTargets) -> torch.Tensor:
    """[T, VOCAB] probabilities of any mode's targets."""
    p = t.probs()
    return p if t.ids is None else torch.zeros(*t.shape, VOCAB).scatter_add_(-1, t.ids, p)


def assert_same(a: SparseTargets, b: SparseTargets) -> None:
    assert (a.mode, a.num_draws) == (b.mode, b.num_draws)
    for x, y in ((a.ids, b.ids), (a.logprobs, b.logprobs), (a.tail_logmass, b.tail_logmass)):
        assert (x is None and y is None) or torch.equal(x, y)  # type: ignore[arg-type]


# --- the registries -------------------------------------------------------------------------------


def test_every_mode_has_one_codec_with_well_formed_arrays() -> None:
    assert list(CODECS) == list(MODES)
    common = {s.name for s in fmt.COMMON_ARRAYS}
    for name, codec in CODECS.items():
        assert codec.name == name and codec.mode is MODES[name]
        names = [s.name for s in codec.arrays]
        assert len(set(names)) == len(names) and not common & set(names), name
        for s in codec.arrays:
            np.dtype(s.dtype)
            assert s.per in ("seq", "seq+1", "token", "target", "entry") and s.width in (None, "k", "vocab")
        offsets = [s for s in codec.arrays if s.per == "seq+1"]
        entries = [s for s in codec.arrays if s.per == "entry"]
        assert len(offsets) <= 1 and bool(entries) == bool(offsets), f"{name}: one offsets array iff entries"
        spec = spec_of(name)
        assert ClassSpec.parse(str(spec)) == spec and spec.codec is codec


def test_class_spec_parse_messages() -> None:
    assert ClassSpec.parse(" topk:8 ") == ClassSpec("topk", 8) and str(ClassSpec.parse("full")) == "full"
    for text, message in [
        ("top:3", "--classes 'top:3': expected topk:K, sample:N or full"),
        ("full:3", "--classes 'full:3': expected topk:K, sample:N or full"),
        ("topk", "--classes 'topk': expected topk:K, sample:N or full"),
        ("sample:x", "--classes 'sample:x': 'x' is not a whole number"),
        ("sample:256", "--classes 'sample:256': N must be between 1 and 255 (counts are stored as uint8)"),
        ("sample:0", "--classes 'sample:0': N must be between 1 and 255 (counts are stored as uint8)"),
        ("topk:0", "--classes 'topk:0': K must be >= 1"),
    ]:
        with pytest.raises(ValueError) as err:
            ClassSpec.parse(text)
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^--classes topk:9: K is larger than the teacher's vocabulary \(8\)$"):
        ClassSpec("topk", 9).check_vocab(8)
    ClassSpec("sample", 200).check_vocab(8)  # draws, not classes: no bound by the vocabulary


def test_modes_module_is_pure_python() -> None:
    """Option parsing reads MODES and ClassSpec before anything heavy is imported: loading the module on
    its own (outside the package, whose __init__ imports the reader) pulls in no numpy, torch or zarr."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('modes', {str(REPO / 'cache' / 'modes.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['modes'] = m; spec.loader.exec_module(m)\n"
        "assert str(m.ClassSpec.parse('sample:50')) == 'sample:50'\n"
        "heavy = sorted({'numpy', 'torch', 'zarr', 'transformers'} & set(sys.modules))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- every mode through the real writer, reader, verify and info ------------------------------------


@pytest.mark.parametrize("mode", list(CODECS))
def test_every_mode_round_trips_through_writer_reader_verify_and_info(tmp_path: Path, mode: str) -> None:
    spec = spec_of(mode)
    firsts = [
        random_outputs(spec, sum(LENGTHS[i] - 1 for i in rows), seed=b) for b, rows in enumerate(((0, 1, 2), (3, 4, 5)))
    ]
    reader = write_cache(tmp_path / "c", spec, firsts)
    assert reader.codec is CODECS[mode]
    want = SparseTargets.concat([o.targets for o in firsts])
    (part,) = reader.parts
    whole = reader.read_part(part)
    row = 0
    for j, length in enumerate(LENGTHS):
        got = whole.sequence(j).targets
        expected = want.select(slice(row, row + length - 1))
        row += length - 1
        assert got.shape == (length - 1,) and got.mode == mode
        assert torch.allclose(dense(got), dense(expected), atol=2e-3)  # float16 storage
        if expected.tail_logmass is not None:
            assert torch.allclose(got.tail_logmass.exp(), expected.tail_logmass.exp(), atol=2e-3)  # type: ignore[union-attr]
    ranged = reader.read_range(part, 1, 5)  # slices of every array, the offsets rebased
    for j in range(4):
        assert_same(ranged.sequence(j).targets, whole.sequence(j + 1).targets)
        assert_same(reader.get(j + 1).targets, whole.sequence(j + 1).targets)
    batch = collate([whole.sequence(j) for j in range(len(LENGTHS))], pad_id=0)
    assert batch.targets.shape == (len(LENGTHS), max(LENGTHS)) and batch.targets.mode == mode
    assert verify_cache(reader) == []
    info = cache_info(reader)
    assert info.positions_stored == sum(LENGTHS) - len(LENGTHS) and info.classes == str(spec)
    record = part.record
    assert set(record["arrays"]) == {s.name for s in reader.codec.specs}
    assert {"sum_unique_ids", "sum_kept_mass"} <= set(record)


def _broken(mode: str, n: int, how: str) -> TeacherOutputs:
    """Teacher outputs of ``n`` positions that the writer stores as given but that are not a distribution."""
    spec = spec_of(mode)
    out = random_outputs(spec, n, seed=3)
    t = out.targets
    if how == "ids":
        t = SparseTargets(t.mode, t.ids.clone().fill_(VOCAB), t.logprobs, t.tail_logmass, t.num_draws)  # type: ignore[union-attr]
    elif how == "mass":
        tail = None if t.tail_logmass is None else torch.zeros_like(t.tail_logmass)
        t = SparseTargets(t.mode, t.ids, t.logprobs + 1.0 if t.tail_logmass is None else t.logprobs, tail, t.num_draws)
    return TeacherOutputs(t, out.entropy, out.next_logprob, out.padding_mass)


@pytest.mark.parametrize(
    ("mode", "how", "array", "message"),
    [
        ("topk", "ids", "class_ids", f"ids outside [0, {VOCAB})"),
        ("topk", "mass", "tail_logmass", "kept mass + tail mass differs from 1 by more than 0.02 nat"),
        ("sample", "ids", "class_ids", f"ids outside [0, {VOCAB})"),
        ("sample", "mass", "class_counts", "counts do not sum to N=5 at every position"),
        ("full", "mass", "class_logprobs", "log-probs > 0 or NaN"),
    ],
)
def test_verify_names_what_the_mode_stores_wrong(tmp_path: Path, mode: str, how: str, array: str, message: str) -> None:
    """The codec's checks run on intact bytes (the sha256 matches): targets that are not a distribution."""
    spec = spec_of(mode)
    outputs = [_broken(mode, sum(LENGTHS[i] - 1 for i in rows), how) for rows in ((0, 1, 2), (3, 4, 5))]
    problems = [str(p) for p in verify_cache(write_cache(tmp_path / "c", spec, outputs))]
    assert f"part part-00000, array {array}: {message}" in problems, problems


def test_unknown_mode_in_the_header_is_refused(tmp_path: Path) -> None:
    write_cache(tmp_path / "c", spec_of("topk"))
    storage = Storage.open(str(tmp_path / "c"), mode="w")
    root = storage.read_json("zarr.json")
    root["attributes"]["selkd"]["classes"]["mode"] = "topp"
    storage.write_json("zarr.json", root)
    with pytest.raises(
        CacheError, match=r"the build header: unknown target mode 'topp' \(this selkd reads topk, sample, full\)"
    ):
        open_cache(str(tmp_path / "c"), require_complete=False)


# --- a fourth mode is one registration ----------------------------------------------------------------


class ArgmaxCodec(TargetCodec):
    """A toy mode for the test: the teacher's most likely class only (ids [T, 1], probability 1)."""

    name = "argmax"
    arrays = (ArraySpec("class_ids", "int32", "target"),)

    def select(self, x, temperature, k, generator, probs):  # type: ignore[no-untyped-def]
        ids = x.argmax(-1, keepdim=True)
        return SparseTargets(self.name, ids, torch.zeros(ids.shape))

    def encode(self, targets, per_seq):  # type: ignore[no-untyped-def]
        return {"class_ids": targets.ids[:, 0].numpy().astype(np.int32)}

    def targets(self, arrays, decoded, j, rows, k):  # type: ignore[no-untyped-def]
        ids = torch.from_numpy(arrays["class_ids"][rows].astype(np.int64))[:, None]
        return SparseTargets(self.name, ids, torch.zeros(ids.shape))

    def check(self, arrays, decoded, n_targets, vocab, k):  # type: ignore[no-untyped-def]
        if ((arrays["class_ids"] < 0) | (arrays["class_ids"] >= vocab)).any():
            yield "class_ids", f"ids outside [0, {vocab})"


def test_a_mode_added_to_the_registries_alone_is_built_read_verified_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding a mode touches its TargetMode and its codec: nothing in the writer, reader, verify, info,
    the training batches or the options check needs to know it."""
    monkeypatch.setitem(MODES, "argmax", TargetMode("argmax", losses=("fkl",), loss_reason="one class", kl="bound"))
    monkeypatch.setitem(CODECS, "argmax", ArgmaxCodec())
    spec = ClassSpec.parse("argmax")
    reader = write_cache(tmp_path / "c", spec)
    data = reader.read_part(reader.parts[0])
    logits = torch.randn(4, VOCAB)
    assert torch.equal(
        teacher_outputs(logits, torch.zeros(4, dtype=torch.long), spec).targets.ids[:, 0], logits.argmax(-1)
    )  # type: ignore[index]
    assert data.sequence(2).targets.ids.shape == (LENGTHS[2] - 1, 1)  # type: ignore[union-attr]
    assert_same(reader.read_range(reader.parts[0], 2, 3).sequence(0).targets, data.sequence(2).targets)
    assert collate([data.sequence(0), data.sequence(2)], 0).targets.mode == "argmax"
    assert verify_cache(reader) == [] and cache_info(reader).classes == "argmax"
    cfg = TrainConfig(cache="c", student="s", out="o", loss="rkl")
    assert (
        check_targets("argmax", cfg) == "--loss rkl is not defined on argmax targets (the cache holds argmax); use fkl"
    )


# --- one check of targets against options ------------------------------------------------------------


def test_check_targets_messages_online_and_cache() -> None:
    def cfg(**kw: object) -> TrainConfig:
        return TrainConfig(cache="c", student="s", out="o", **kw)  # type: ignore[arg-type]

    rkl, reverse, renorm = cfg(loss="rkl"), cfg(select="reverse-kl:0.2"), cfg(topk_renormalize=True)
    assert check_targets("sample", rkl, "sample:50") == (
        "--loss rkl is not defined on sampled targets (--classes sample:50): only fkl is unbiased; "
        "use --classes topk:K or full"
    )
    assert check_targets("sample", rkl) == (
        "--loss rkl is not defined on sampled targets (the cache holds sample:N); use fkl"
    )
    assert check_targets("sample", reverse, "sample:8") == (
        "--select reverse-kl needs topk or full targets, got --classes sample:8"
    )
    assert (
        check_targets("sample", reverse) == "--select reverse-kl needs topk or full targets; the cache holds sample:N"
    )
    assert check_targets("full", renorm, "full") == "--topk-renormalize needs --classes topk:K, got --classes full"
    assert check_targets("sample", renorm) == "--topk-renormalize needs topk targets; the cache holds sample targets"
    for mode in ("topk", "full"):
        assert check_targets(mode, rkl) is None and check_targets(mode, reverse) is None
    assert check_targets("topk", renorm) is None and check_targets("sample", cfg()) is None


# --- mode names are compared in the codecs and the losses only -----------------------------------------


def _mode_comparisons(path: Path) -> list[str]:
    """``line: source`` of every comparison with a target mode's name (``x == "topk"``, ``m in ("sample",
    ...)``) and every ``case "full":`` in a module."""
    names = set(MODES)
    tree = ast.parse(path.read_text())

    def is_mode(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(is_mode(e) for e in node.elts)

    def compares(node: ast.AST) -> bool:
        if isinstance(node, ast.Compare):
            return any(is_mode(x) for x in [node.left, *node.comparators])
        return isinstance(node, ast.MatchValue) and is_mode(node.value)

    hits = [node for node in ast.walk(tree) if compares(node)]
    return [f"{path.relative_to(REPO)}:{n.lineno}: {ast.unparse(n)}" for n in hits]


def test_no_module_but_the_codecs_and_the_losses_compares_mode_names() -> None:
    allowed = {REPO / "cache" / "codecs.py", REPO / "cache" / "modes.py", REPO / "trainer" / "losses.py"}
    modules = sorted((REPO / "cache").rglob("*.py")) + sorted((REPO / "trainer").rglob("*.py"))
    assert len(modules) > 30
    found = [hit for path in modules if path not in allowed for hit in _mode_comparisons(path)]
    assert found == []
    assert _mode_comparisons(REPO / "trainer" / "losses.py"), "the scan finds the comparisons the losses do make"
