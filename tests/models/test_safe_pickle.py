"""Hostile pickles are refused by name, before anything runs; official checkpoints still load.

The hostile files are built without ever unpickling them: by pickling objects whose `__reduce__`
names a dangerous callable (pickling only records the name), or by writing the opcodes by hand.
Every command only touches a sentinel file, and every test asserts that the sentinel never appears.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import pickletools
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS as FIXTURES
from conftest import DATA
from typer.testing import CliRunner

import sslam_core
from sslam_core.models import safe_pickle
from sslam_core.models.checkpoint import CheckpointError
from sslam_core.models.layouts.fairseq import fairseq_container
from sslam_core.models.loading import read_checkpoint

SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


def refusal(path: Path, name: str) -> str:
    return f"{path}: checkpoint references {name}, which no model file needs; refusing to load it"


class Evil:
    """Pickles as a call of `call(*args)`; only unpickling would run it."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a pickled command ran"


def payloads(sentinel: Path) -> dict[str, tuple[Evil, str]]:
    """Harmless stand-ins for an attack (they would only create the sentinel), with their global."""
    return {
        "system": (Evil(os.system, f"touch {sentinel}"), SYSTEM),
        "eval": (Evil(eval, f"open({str(sentinel)!r}, 'w')"), "builtins.eval"),
        "exec": (Evil(exec, f"open({str(sentinel)!r}, 'w')"), "builtins.exec"),
        "popen": (Evil(subprocess.Popen, ["touch", str(sentinel)]), "subprocess.Popen"),
        "import": (Evil(importlib.import_module, "os"), "importlib.import_module"),
    }


def assert_refused(path: Path, name: str) -> None:
    with pytest.raises(CheckpointError) as info:
        sslam_core.load_model(path)
    assert str(info.value) == refusal(path, name)


# ---------------------------------------------------------------------------------------------------------
# Hand-written opcodes


def text(value: str) -> bytes:
    """BINUNICODE: a str argument."""
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def global_op(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def stack_global(module: str, name: str) -> bytes:
    return text(module) + text(name) + pickle.STACK_GLOBAL


def hand_written(opcode: str, sentinel: Path) -> tuple[bytes, str]:
    """A pickle that reaches a hostile global through `opcode`, and the name it must be refused as."""
    touch = f"touch {sentinel}"
    mod, name = SYSTEM.split(".")
    if opcode == "REDUCE":  # protocol 0: c<module>\n<name>\n (S'...'\n tR.
        return global_op(
            mod, name
        ) + pickle.MARK + f"S'{touch}'\n".encode() + pickle.TUPLE + pickle.REDUCE, SYSTEM
    if opcode == "INST":  # (S'...'\n i<module>\n<name>\n
        return pickle.MARK + f"S'{touch}'\n".encode() + pickle.INST + f"{mod}\n{name}\n".encode(), SYSTEM
    if opcode == "OBJ":  # ( <class> <args> o
        return pickle.MARK + global_op("subprocess", "Popen") + text(touch) + pickle.OBJ, "subprocess.Popen"
    if opcode == "NEWOBJ":  # protocol 2: cls.__new__(cls, *args)
        body = global_op("subprocess", "Popen") + text(touch) + pickle.TUPLE1 + pickle.NEWOBJ
        return pickle.PROTO + b"\x02" + body, "subprocess.Popen"
    if opcode == "NEWOBJ_EX":  # protocol 4: cls.__new__(cls, *args, **kwargs)
        body = stack_global("subprocess", "Popen") + text(touch) + pickle.TUPLE1 + pickle.EMPTY_DICT
        return pickle.PROTO + b"\x04" + body + pickle.NEWOBJ_EX, "subprocess.Popen"
    if opcode == "STACK_GLOBAL":  # protocol 4 global lookup, then a call
        body = stack_global("builtins", "exec") + text(f"open({str(sentinel)!r}, 'w')") + pickle.TUPLE1
        return pickle.PROTO + b"\x04" + body + pickle.REDUCE, "builtins.exec"
    if opcode == "BUILD":  # an allowed OrderedDict whose BUILD state holds importlib.import_module('os')
        obj = global_op("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
        state = pickle.EMPTY_DICT + text("x") + global_op("importlib", "import_module")
        state += text("os") + pickle.TUPLE1 + pickle.REDUCE + pickle.SETITEM
        return pickle.PROTO + b"\x02" + obj + state + pickle.BUILD, "importlib.import_module"
    raise AssertionError(opcode)


OPCODES = ["REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "STACK_GLOBAL", "BUILD"]


@pytest.mark.parametrize("opcode", OPCODES)
def test_hand_written_opcodes_are_refused_by_name(tmp_path, sentinel, opcode):
    data, name = hand_written(opcode, sentinel)
    data += pickle.STOP
    pickletools.dis(data, out=io.StringIO())  # a well-formed pickle (dis only reads it)
    assert opcode in {op.name for op, _, _ in pickletools.genops(data)}
    with pytest.raises(safe_pickle.RefusedGlobal) as info:
        safe_pickle.loads(data)
    assert info.value.name == name
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    assert_refused(path, name)


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("attack", ["system", "eval", "exec", "popen", "import"])
def test_bare_pickles_of_every_protocol(tmp_path, sentinel, protocol, attack):
    payload, name = payloads(sentinel)[attack]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": payload}}, protocol=protocol))
    assert_refused(path, name)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "where, attack",
    [("cfg", "system"), ("args", "eval"), ("model", "popen"), ("extra_state", "import"), ("nested", "exec")],
)
def test_payloads_anywhere_in_an_official_container(tmp_path, sentinel, legacy, where, attack):
    payload, name = payloads(sentinel)[attack]
    container = fairseq_container(read_checkpoint(FIXTURES / "tiny_finetuned.pt"))
    if where == "cfg":
        container["cfg"]["model"]["prediction_mode"] = payload
    elif where == "args":
        container["args"] = payload
    elif where == "model":
        container["model"]["head.bias"] = payload
    elif where == "extra_state":
        container["extra_state"] = {"metrics": {"train": [payload]}}
    else:
        container["task_state"] = {"labels": [{"x": ({"deep": (payload,)},)}]}
    path = tmp_path / "evil.pt"
    torch.save(container, path, _use_new_zipfile_serialization=not legacy)
    assert zipfile.is_zipfile(path) is not legacy
    assert_refused(path, name)


def test_official_fixtures_name_only_listed_globals():
    """Every global of the official-layout fixtures is resolved or a placeholder, with a reason."""
    for name in ("tiny_pretrain.pt", "tiny_finetuned.pt"):
        with zipfile.ZipFile(FIXTURES / name) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        ops = list(pickletools.genops(data))
        found = {arg.replace(" ", ".") for op, arg, _ in ops if op.name == "GLOBAL"}
        assert "fairseq.logging.meters.AverageMeter" in found
        for key in found:
            module = key.rsplit(".", 1)[0]
            assert key in safe_pickle.RESOLVED or safe_pickle._is_placeholder(module), key
        assert read_checkpoint(FIXTURES / name).config.embed_dim == 64


def test_the_two_lists_are_documented_and_apart():
    assert all(reason for _, reason in safe_pickle.RESOLVED.values())
    assert all(safe_pickle.PLACEHOLDER_MODULES.values())
    assert not [k for k in safe_pickle.RESOLVED if safe_pickle._is_placeholder(k.rsplit(".", 1)[0])]
    for name in (SYSTEM, "builtins.eval", "builtins.exec", "builtins.getattr", "subprocess.Popen",
                 "importlib.import_module", "os.system", "builtins.__import__", "fairseqx.evil"):  # fmt: skip
        assert name not in safe_pickle.RESOLVED
        assert not safe_pickle._is_placeholder(name.rsplit(".", 1)[0])


def test_fairseq_and_omegaconf_objects_stay_inert_placeholders():
    """A meter, a config dataclass and a DictConfig read as data, whatever their constructors say."""
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT
    for key, module, name in (
        ("m", "fairseq.logging.meters", "AverageMeter"),
        ("c", "examples.data2vec.models.data2vec2", "Data2VecMultiConfig"),
        ("d", "omegaconf.dictconfig", "DictConfig"),
        ("t", "typing", "Any"),
    ):
        data += text(key) + global_op(module, name) + pickle.EMPTY_TUPLE + pickle.NEWOBJ
        data += pickle.EMPTY_DICT + text("avg") + pickle.BININT1 + b"\x03" + pickle.SETITEM + pickle.BUILD
        data += pickle.SETITEM
    obj = safe_pickle.loads(data + pickle.STOP)
    assert all(isinstance(v, safe_pickle.Placeholder) and v.state == {"avg": 3} for v in obj.values())
    assert obj["m"].qualname == "fairseq.logging.meters.AverageMeter"


# ---------------------------------------------------------------------------------------------------------
# Every command that reads a checkpoint


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """An official-looking fine-tuned checkpoint with os.system in its extra_state (bracketed name)."""
    folder = tmp_path_factory.mktemp("hostile")
    container = fairseq_container(read_checkpoint(FIXTURES / "tiny_finetuned.pt"))
    container["extra_state"] = {"metrics": Evil(os.system, f"touch {folder / 'pwned'}")}
    path = folder / "evil [v2].pt"
    torch.save(container, path)
    return path


def command_lines(hostile: Path, out: Path) -> dict[str, list[str]]:
    wav, fsdd = str(DATA / "fsdd_mini" / "1_george_0.wav"), str(DATA / "fsdd_mini")
    c = str(hostile)
    return {
        "tag": ["tag", "-c", c, wav],
        "extract": ["extract", wav, "-o", str(out / "x.h5"), "-c", c],
        "eval": ["eval", "-c", c, "-d", fsdd],
        "convert": ["convert", c, str(out / "x.safetensors")],
        "finetune": ["finetune", "--data", fsdd, "--checkpoint", c, "-o", str(out / "ft"), "--device", "cpu"],
        "pretrain": ["pretrain", fsdd, "-o", str(out / "pt"), "--init", c, "--model", "tiny", "--steps", "0"],
    }


@pytest.mark.parametrize("command", ["tag", "extract", "eval", "convert", "finetune", "pretrain"])
def test_every_command_refuses_a_hostile_checkpoint_in_one_line(tmp_path, hostile, command):
    from sslam_cli.main import app

    result = CliRunner().invoke(app, command_lines(hostile, tmp_path)[command])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {refusal(hostile, SYSTEM)}"]
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (hostile.parent / "pwned").exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written
