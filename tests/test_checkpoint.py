"""Checkpoints: round trip (weights, AdamW, scheduler, RNG, rank state), tied weights, crash safety,
keep-last-N, weights_only loading, the final HF directory, and a 2-process DDP/FSDP2 run (slow)."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from selkd.trainer.checkpoint import (
    COMPLETE,
    CheckpointError,
    clean_incomplete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_final,
)
from selkd.trainer.selection import GlobalQueue

VOCAB = 64


def tiny_llama(seed: int, tie: bool = True) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


Run = tuple[LlamaForCausalLM, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]


def make_run(seed: int = 0, tie: bool = True) -> Run:
    model = tiny_llama(seed, tie)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, opt, sched


def train(model: LlamaForCausalLM, opt: torch.optim.Optimizer, sched: object, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        opt.zero_grad()


def save(
    out: Path,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: object,
    keep: int | None = 2,
    **kw: object,
) -> Path:
    return save_checkpoint(
        out,
        step,
        model,
        opt,
        sched,
        {"epoch": 0, "index": step * 2},
        {"lr": 1e-2},
        {"loss": 1.25, "step_time": 0.5},
        keep=keep,
        **kw,
    )  # type: ignore[arg-type]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def optim_sd(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def assert_same_optim(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for name, st in a["state"].items():
        for key, value in st.items():
            assert torch.equal(value, b["state"][name][key]), (name, key)


def test_round_trip(tmp_path: Path) -> None:
    model, opt, sched = make_run(0)
    train(model, opt, sched)
    queue = GlobalQueue(5)
    queue.push(torch.arange(7.0))
    random.seed(3)
    np.random.seed(4)
    path = save(tmp_path, 3, model, opt, sched, rank_state={"queue": queue.state_dict()})
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in path.iterdir()) == [
        COMPLETE,
        "config.json",
        "loader.json",
        "model.safetensors",
        "optimizer.pt",
        "rank-00000.pt",
        "state.json",
    ]
    expected = (torch.rand(4), random.random(), np.random.rand(3))

    model2, opt2, sched2 = make_run(1)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    state = load_checkpoint(path, model2, opt2, sched2)
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])
    assert state.step == 3 and state.rng_restored and state.world_size == 1
    assert state.loader_state == {"epoch": 0, "index": 6}
    assert state.config == {"lr": 1e-2} and state.extra == {"loss": 1.25, "step_time": 0.5}
    queue2 = GlobalQueue(1)
    queue2.load_state_dict(state.rank_state["queue"])
    assert torch.equal(queue2.scores, queue.scores) and queue2.capacity == 5

    assert_same_weights(model, model2)
    assert_same_optim(optim_sd(model, opt), optim_sd(model2, opt2))
    assert opt2.state_dict()["state"][0]["step"].item() == 3
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    # training continues identically
    train(model, opt, sched, 2)
    train(model2, opt2, sched2, 2)
    assert_same_weights(model, model2)


def test_tied_weights_stored_once_and_stay_tied(tmp_path: Path) -> None:
    model, opt, sched = make_run(0, tie=True)
    train(model, opt, sched, 1)
    path = save(tmp_path, 1, model, opt, sched)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert json.loads(meta["selkd.tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    model2, opt2, sched2 = make_run(1, tie=True)
    load_checkpoint(path, model2, opt2, sched2)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)
    # untied models keep both matrices
    untied, uopt, usched = make_run(0, tie=False)
    upath = save(tmp_path / "untied", 1, untied, uopt, usched)
    assert "lm_head.weight" in load_file(str(upath / "model.safetensors"))


def test_without_optimizer_and_scheduler(tmp_path: Path) -> None:
    model, _, _ = make_run(0)
    path = save_checkpoint(tmp_path, 0, model, None, None, {}, {}, None)
    model2, _, _ = make_run(1)
    state = load_checkpoint(path, model2)
    assert state.step == 0
    assert_same_weights(model, model2)
    _, opt3, _ = make_run(2)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, model2, opt3)


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path: Path) -> None:
    model, opt, sched = make_run(0)
    good = save(tmp_path, 5, model, opt, sched)
    root = tmp_path / "checkpoints"
    # a crash while writing step 8 (tmp dir of a dead process) and one that lost its COMPLETE marker
    tmp = root / "step-000008.tmp-999999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    no_marker = root / "step-000009"
    no_marker.mkdir()
    (no_marker / "state.json").write_text('{"step": 9}')
    (root / "step-000010.trash-1-2").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(no_marker, *make_run(1))
    removed = clean_incomplete(tmp_path)
    assert {p.name for p in removed} == {"step-000008.tmp-999999", "step-000009", "step-000010.trash-1-2"}
    assert sorted(p.name for p in root.iterdir()) == ["step-000005"]
    # the next save also cleans up
    (root / "step-000006.tmp-999999").mkdir()
    save(tmp_path, 6, model, opt, sched)
    assert sorted(p.name for p in root.iterdir()) == ["step-000005", "step-000006"]


def test_damaged_file_is_refused(tmp_path: Path) -> None:
    model, opt, sched = make_run(0)
    path = save(tmp_path, 1, model, opt, sched)
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors is missing or has the wrong size"):
        load_checkpoint(path, *make_run(1))


def test_keep_last_n_and_replace_same_step(tmp_path: Path) -> None:
    model, opt, sched = make_run(0)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, sched, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000004"
    save(tmp_path, 4, model, opt, sched, keep=2)  # re-saving a step replaces it
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    for step in (5, 6, 7):
        save(tmp_path, step, model, opt, sched, keep=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 5, 6, 7]
    save(tmp_path, 1_234_567, model, opt, sched, keep=1)  # more digits than the padding still sorts by number
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1_234_567]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1234567"]
    assert latest_checkpoint(tmp_path / "nothing-here") is None


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


class Harmless:
    pass


@pytest.mark.parametrize("payload", [Evil(), Harmless()], ids=["reduce", "object"])
def test_optimizer_file_loaded_weights_only(tmp_path: Path, payload: object) -> None:
    model, opt, sched = make_run(0)
    path = save(tmp_path, 1, model, opt, sched)
    blob = path / "optimizer.pt"
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": payload}, blob)
    complete = json.loads((path / COMPLETE).read_text())
    complete["files"]["optimizer.pt"] = blob.stat().st_size
    (path / COMPLETE).write_text(json.dumps(complete))
    with pytest.raises(CheckpointError, match=r"optimizer.pt: refused or unreadable .*weights_only"):
        load_checkpoint(path, *make_run(1))


def test_save_final_loads_with_auto_model(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, opt, sched = make_run(0)
    train(model, opt, sched, 1)
    final = save_final(tmp_path, model, tiny_tokenizer)
    assert final == tmp_path / "final"
    loaded = AutoModelForCausalLM.from_pretrained(str(final))
    assert_same_weights(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert (final / "tokenizer.json").is_file()
    save_final(tmp_path, model)  # replaces the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# --------------------------------------------------------------------------- 2 processes (torchrun, gloo)

_DIST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    from transformers import LlamaConfig, LlamaForCausalLM

    from selkd.trainer import checkpoint as ckpt
    from selkd.trainer.checkpoint import load_checkpoint, save_checkpoint, save_final
    from selkd.trainer.distributed import all_reduce_mean, barrier, cleanup, init_distributed, wrap_model

    out = Path(sys.argv[1])
    info = init_distributed("cpu")
    assert info.world_size == 2 and info.device.type == "cpu"
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def run(seed):
        torch.manual_seed(seed)
        model = wrap_model(LlamaForCausalLM(config), info, fsdp=mode == "fsdp")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
        return model, opt, sched

    report = {}
    for mode in ("ddp", "fsdp"):
        model, opt, sched = run(0)
        g = torch.Generator().manual_seed(100 + info.rank)  # each rank sees different data
        for _ in range(3):
            ids = torch.randint(0, 64, (2, 12), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        loss = all_reduce_mean(torch.tensor(float(info.rank)))
        torch.manual_seed(50 + info.rank)  # per-rank RNG streams
        path = save_checkpoint(out / mode, 3, model, opt, sched, {"i": 6}, {"mode": mode},
                               {"mean": loss.item()}, rank_state={"rank": torch.tensor(info.rank)})
        msd = get_model_state_dict(model, options=full)
        osd = get_optimizer_state_dict(model, opt, options=full)
        after_save = torch.rand(3)
        if info.is_main:
            save_file({k: v.contiguous() for k, v in msd.items() if k != "lm_head.weight"},
                      str(out / mode / "expected.safetensors"))
            torch.save(osd, out / mode / "expected_optim.pt")
        # reload in the same world: weights, optimizer, per-rank RNG and state come back
        model2, opt2, sched2 = run(5)
        torch.manual_seed(777)
        state = load_checkpoint(path, model2, opt2, sched2)
        ok = torch.equal(torch.rand(3), after_save)
        msd2 = get_model_state_dict(model2, options=full)
        osd2 = get_optimizer_state_dict(model2, opt2, options=full)
        ok = ok and state.step == 3 and int(state.rank_state["rank"]) == info.rank and state.rng_restored
        ok = ok and state.extra == {"mean": 0.5} and sched2.state_dict() == sched.state_dict()
        if info.is_main:
            ok = ok and all(torch.equal(msd[k], msd2[k]) for k in msd)
            ok = ok and all(torch.equal(v, osd2["state"][n][k]) for n, st in osd["state"].items()
                            for k, v in st.items())
        save_final(out / mode, model)
        report[mode] = bool(ok)
        barrier()
    # a rank whose shard cannot be written (a full disk on rank 1): every rank raises, nothing is left
    original = dcp.FileSystemWriter.write_data
    if info.rank == 1:
        def write_data(self, plan, planner):
            raise OSError(28, "No space left on device", str(self.path / "__1_0.distcp"))
        dcp.FileSystemWriter.write_data = write_data
    try:
        save_checkpoint(out / "fsdp", 4, model, opt, sched, {"i": 8}, {"mode": "fsdp"})
        report["failed_save_raised"] = False
    except (ckpt.CheckpointError, OSError) as err:
        report["failed_save_raised"] = "no space left" in str(err).lower()
    dcp.FileSystemWriter.write_data = original
    # peak host memory of a save on each rank (VmHWM reset to VmRSS before it): gathered (as DDP runs save)
    # against sharded, on a model of 5.3M parameters: weights and AdamW moments are 60 MiB in all
    def vm(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024
    del model, model2, opt, opt2, sched, sched2
    big = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = wrap_model(LlamaForCausalLM(big), info, fsdp=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 4096, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    peaks = {}
    for layout in ("gathered", "sharded"):
        ckpt.LAYOUT_BY_PARALLELISM["fsdp2"] = layout
        barrier()
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
        before = vm("VmRSS")
        save_checkpoint(out / f"memory-{layout}", 1, model, opt, None, {}, {})
        peaks[layout] = vm("VmHWM") - before
    (out / f"memory-{info.rank}.json").write_text(json.dumps(peaks))
    if info.is_main:
        (out / "report.json").write_text(json.dumps(report))
    del model, opt  # their DDP/FSDP state holds the process group
    barrier()  # nobody tears the group down while a peer still uses it
    cleanup()
    # what is still running: the group's threads must be gone before the interpreter exits
    threads = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    (out / f"threads-{info.rank}.json").write_text(json.dumps(threads))
    """
)


@pytest.mark.slow
def test_ddp_and_fsdp2_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "dist_train.py"
    script.write_text(_DIST_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # a fixed mmap threshold: freed tensors go back to the OS at once, so the peak RSS of a save is its own
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    env.update(MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert json.loads((out / "report.json").read_text()) == {"ddp": True, "fsdp": True, "failed_save_raised": True}
    peaks = [json.loads((out / f"memory-{rank}.json").read_text()) for rank in range(2)]
    print(
        "peak extra host memory during a save, per rank (MiB):", [{k: v / 2**20 for k, v in p.items()} for p in peaks]
    )
    gathered, sharded = max(p["gathered"] for p in peaks), max(p["sharded"] for p in peaks)
    assert gathered > 40 * 2**20  # the gathered save holds the full weights and moments on rank 0 (60 MiB)
    assert sharded < 0.5 * gathered, peaks
    for rank in range(2):  # cleanup() freed the gloo group: none of its threads outlives it into interpreter exit
        threads = json.loads((out / f"threads-{rank}.json").read_text())
        assert not [name for name in threads if "gloo" in name], threads
    for mode in ("ddp", "fsdp"):
        path = latest_checkpoint(out / mode)
        assert path is not None and path.name == "step-000003"  # the failed step 4 left nothing behind
        assert sorted(p.name for p in (out / mode / "checkpoints").iterdir()) == ["step-000003"]
        files = set(json.loads((path / COMPLETE).read_text())["files"])
        if mode == "ddp":  # gathered on rank 0
            assert "model.safetensors" in files and not list(path.glob("*.distcp"))
        else:  # each rank wrote its own shard; COMPLETE lists both; DCP's pickled index is replaced
            assert {"__0_0.distcp", "__1_0.distcp", "dcp-metadata.pt"} <= files
            assert "model.safetensors" not in files and not (path / ".metadata").exists()
        assert [p.name for p in path.glob("rank-*.pt")] and len(list(path.glob("rank-*.pt"))) == 2
        model, opt, sched = make_run(9)
        state = load_checkpoint(path, model, opt, sched)  # one process, plain module
        assert state.world_size == 2 and state.rank_state["rank"].item() == 0
        assert state.config == {"mode": mode}
        expected = load_file(str(out / mode / "expected.safetensors"))
        got = model.state_dict()
        for k, v in expected.items():
            assert torch.equal(got[k], v), (mode, k)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        exp_optim = torch.load(out / mode / "expected_optim.pt", weights_only=True)
        assert_same_optim(exp_optim, optim_sd(model, opt))
        assert sched.last_epoch == 3
        final = AutoModelForCausalLM.from_pretrained(str(out / mode / "final"))
        assert_same_weights(model, final)
    # the sharded index holding anything but DCP's classes is refused (weights_only), and so is a cut shard
    path = out / "fsdp" / "checkpoints" / "step-000003"
    index, complete = path / "dcp-metadata.pt", json.loads((path / COMPLETE).read_text())
    torch.save({"when": datetime.date(2026, 1, 1)}, index)
    complete["files"][index.name] = index.stat().st_size
    (path / COMPLETE).write_text(json.dumps(complete))
    with pytest.raises(CheckpointError, match=r"sharded state unreadable .*dcp-metadata.pt: refused") as err:
        load_checkpoint(path, *make_run(9))
    assert "\n" not in str(err.value)
    shard = path / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="__1_0.distcp is missing or has the wrong size"):
        load_checkpoint(path, *make_run(9))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "error"])
def test_a_stopped_write_leaves_no_half_written_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]
) -> None:
    """Whatever stops a checkpoint's write (Ctrl-C, an error that is not a full disk) goes up unchanged,
    and the half-written ``.tmp-<pid>`` directory is gone at once, not only at the next save."""
    from selkd.trainer import checkpoint as ckpt

    model, opt, sched = make_run(0)
    train(model, opt, sched, 1)
    first = save(tmp_path, 1, model, opt, sched)
    original = ckpt.torch_save

    def torch_save(path: Path, obj: object) -> None:
        original(path, obj)  # the optimizer file is complete, then the write stops
        raise stop("stopped")

    monkeypatch.setattr(ckpt, "torch_save", torch_save)
    with pytest.raises(stop, match="stopped"):
        save(tmp_path, 2, model, opt, sched)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [first.name]
    assert latest_checkpoint(tmp_path) == first
