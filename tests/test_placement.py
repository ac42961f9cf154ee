"""``sinkcache.placement`` and ``--device``/``--dtype`` end to end on CPU: parsing, clear errors,
the run key, and records that read the device and dtype back from the model that ran."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _build

from sinkcache import cli
from sinkcache.compare.cell import run_cell
from sinkcache.compare.plan import Cell, run_key
from sinkcache.placement import placement, rank_device, resolve_device, resolve_dtype

pytestmark = pytest.mark.usefixtures("one_thread")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA errors")


@pytest.fixture(scope="module")
def ckpt(byte_ckpt):
    """The tiny random Llama and the byte tokenizer as a local checkpoint (cells load it by path)."""
    return byte_ckpt


def test_defaults_follow_the_machine():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None) == resolve_device("auto") == want
    assert resolve_dtype(None, "cpu") == "float32" and resolve_dtype(None, "cuda") == "bfloat16"
    assert resolve_dtype("bf16", "cpu") == "bfloat16" and resolve_dtype("FP16", "cpu") == "float16"
    assert resolve_dtype("auto", "cpu") == "auto"  # the checkpoint's own dtype
    assert rank_device("cuda", 3) == "cuda:3" and rank_device("cpu", 3) == "cpu"


@NO_CUDA
@pytest.mark.parametrize("bad", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_an_error_not_a_fallback(bad):
    with pytest.raises(ValueError, match=f"--device {bad}: CUDA is not available"):
        resolve_device(bad)


def test_bad_values_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"--device 'tpu': allowed: auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match=r"--dtype 'int8': allowed: auto, float32"):
        resolve_dtype("int8", "cpu")


@NO_CUDA
def test_cli_reports_a_bad_device_in_one_line(capsys):
    assert cli.main(["compare", "m", "--policies", "full", "--tasks", "sinkcache_passkey", "--device", "cuda", "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda: CUDA is not available" in err[0]


def test_cli_rejects_a_bad_dtype(capsys):
    assert cli.main(["compare", "m", "--dtype", "int8"]) == 2
    assert "unsupported dtype 'int8'" in capsys.readouterr().err


def test_run_key_depends_on_device_and_dtype():
    c = Cell("full", tasks=("sinkcache_passkey",))
    keys = {run_key("m", 1, 0, c, code="x", device=d, dtype=t) for d in ("cpu", "cuda") for t in ("float32", "bfloat16")}
    assert len(keys) == 4


def test_placement_reads_the_model():
    m = _build("llama", vocab_size=64).to(torch.bfloat16)
    p = placement(m)
    assert p["device"] == "cpu" and p["dtype"] == "bfloat16" and p["torch"] == torch.__version__


def test_compare_cell_in_bf16_on_cpu_records_where_it_ran(ckpt):
    rec = run_cell(Cell("sink-quant", bits=4, tasks=("sinkcache_passkey",)), str(ckpt), limit=1, device="cpu", dtype="bfloat16")
    assert rec["placement"]["device"] == "cpu" and rec["placement"]["dtype"] == "bfloat16"
    assert rec["versions"]["torch"] == torch.__version__ and "transformers" in rec["versions"]
    assert rec["n_docs"] == {"sinkcache_passkey": 1}


def test_cli_eval_with_device_and_dtype_on_cpu(ckpt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", str(ckpt), "--tasks", "sinkcache_passkey", "--limit", "1", "--device", "cpu", "--dtype", "bf16", "--output", str(out)])
    assert rc == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["device"] == "cpu" and cfg["dtype"] == "bfloat16"  # read back from the model that ran


def test_lm_eval_model_dtype_default_matches_the_cli():
    # `--model_args pretrained=...` without dtype must load what `sinkcache eval` loads on that device
    from sinkcache.evaluation import _model_dtype

    assert _model_dtype(None, "cpu") == "float32" and _model_dtype(None, "cuda:1") == "bfloat16"
    assert _model_dtype("none", "cuda") == "bfloat16"  # lm-eval's spelling of an unset argument
    assert _model_dtype("bf16", "cpu") == "bfloat16" and _model_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        _model_dtype("int8", "cpu")
