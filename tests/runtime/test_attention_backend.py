"""The one attention-backend rule (runtime.attention.resolve_backend / backend_importable), with
fake flash_attn / transformer_engine packages on sys.path standing in for installed, broken or
working GPU kernels, and the TE module following train()/eval().

Why fakes: the CPU machines have neither package; what matters here is the decision (which
import is tried, what counts as broken, what 'auto' picks, what is said once), which the fakes
exercise through the real import machinery.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron.flexsp.runtime import attention as A

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
_PREFIXES = ("flash_attn", "transformer_engine")


def _ours(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _PREFIXES)


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A directory first on sys.path for fake packages; real ones (if imported) are restored after."""
    saved = {k: v for k, v in sys.modules.items() if _ours(k)}
    for k in saved:
        del sys.modules[k]
    monkeypatch.syspath_prepend(str(tmp_path))
    A._forget_imports()
    yield tmp_path
    for k in [k for k in sys.modules if _ours(k)]:
        del sys.modules[k]
    sys.modules.update(saved)
    A._forget_imports()


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    import importlib

    importlib.invalidate_caches()


BROKEN_FLASH = {
    "flash_attn/__init__.py": """
    raise ImportError("flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDevice")
"""
}
FLASH_NO_CUDA_LIB = {
    "flash_attn/__init__.py": """
    raise OSError("libcudart.so.12: cannot open shared object file: No such file or directory")
"""
}
CORE_ONLY_TE = {"transformer_engine/__init__.py": "KIND = 'core only'\n"}
WORKING_FLASH = {"flash_attn/__init__.py": "def flash_attn_varlen_func(*a, **k):\n    return 'flash kernel'\n"}
WORKING_TE = {
    "transformer_engine/__init__.py": "",
    "transformer_engine/pytorch/__init__.py": "class DotProductAttention:\n    pass\n",
}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == A.__name__ and r.levelno == logging.WARNING]


def test_auto_is_sdpa_on_cpu_or_without_bf16(fake_site, monkeypatch):
    _write(fake_site, {**WORKING_FLASH, **WORKING_TE})  # both would import: the device and dtype decide
    assert A.resolve_backend("auto", CPU, bf16=True) == "sdpa"
    assert A.resolve_backend("auto", CUDA, bf16=False) == "sdpa"
    assert A.resolve_backend("auto", CUDA, bf16=True) == "te"
    assert A.resolve_backend(None) == A.resolve_backend("SDPA") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # device None: this process's default
    assert A.resolve_backend("auto", bf16=True) == "te"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert A.resolve_backend("auto", bf16=True) == "sdpa"


def test_auto_prefers_te_then_flash_then_sdpa(fake_site, caplog):
    _write(fake_site, WORKING_FLASH)
    assert A.backend_importable("flash") and not A.backend_importable("te")
    with caplog.at_level(logging.WARNING):
        assert A.resolve_backend("auto", CUDA, bf16=True) == "flash"
    assert _warnings(caplog) == []  # TE is simply absent: nothing to warn about
    assert A._require("flash")() == "flash kernel"


def test_broken_packages_fall_back_to_sdpa_with_one_warning(fake_site, caplog):
    _write(fake_site, {**BROKEN_FLASH, **CORE_ONLY_TE})
    import importlib.util

    assert importlib.util.find_spec("flash_attn") and importlib.util.find_spec("transformer_engine")  # "installed"
    assert not A.backend_importable("flash") and not A.backend_importable("te")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # per layer and micro-batch in a real run: still one line
            assert A.resolve_backend("auto", CUDA, bf16=True) == "sdpa"
    msgs = _warnings(caplog)
    assert len(msgs) == 1, msgs
    assert "using sdpa" in msgs[0] and "undefined symbol" in msgs[0] and "transformer_engine" in msgs[0]
    # an explicit request names the package and the real import error
    with pytest.raises(ImportError, match="'flash-attn' package(.|\n)*undefined symbol"):
        A.resolve_backend("flash", CUDA, bf16=True)
    with pytest.raises(ImportError, match="'transformer-engine' package(.|\n)*transformer_engine.pytorch"):
        A.resolve_backend("te", CUDA, bf16=True)


def test_missing_shared_library_counts_as_not_importable(fake_site, caplog):
    _write(fake_site, {**FLASH_NO_CUDA_LIB, **WORKING_TE})
    assert not A.backend_importable("flash") and A.backend_importable("te")
    with caplog.at_level(logging.WARNING):
        assert A.resolve_backend("auto", CUDA, bf16=True) == "te"
    assert _warnings(caplog) == []  # flash-attn was never needed, so never tried
    A._forget_imports()
    (fake_site / "transformer_engine/pytorch/__init__.py").unlink()
    for k in [k for k in sys.modules if _ours(k)]:
        del sys.modules[k]
    with caplog.at_level(logging.WARNING):
        assert A.resolve_backend("auto", CUDA, bf16=True) == "sdpa"
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "OSError: libcudart.so.12" in msgs[0], msgs


def test_explicit_kernels_need_bf16(fake_site):
    _write(fake_site, {**WORKING_FLASH, **WORKING_TE})
    for name in ("flash", "te"):
        with pytest.raises(ValueError, match=f"attention backend '{name}' needs bf16"):
            A.resolve_backend(name, CUDA, bf16=False)
        assert A.resolve_backend(name, CUDA, bf16=True) == name
        with pytest.raises(ValueError, match=f"attention backend '{name}' runs on CUDA only"):
            A.resolve_backend(name, CPU, bf16=True)  # e.g. a gloo run on a GPU node
    with pytest.raises(ValueError, match="unknown FlexSP attention backend 'xla'"):
        A.resolve_backend("xla")
    with pytest.raises(ValueError, match="unknown FlexSP attention backend"):
        A.backend_importable("xla")
    assert A.backend_importable("sdpa")


class _StandInTE(torch.nn.Module):
    """Transformer Engine's DotProductAttention as far as mode goes: it reads self.training per call."""

    def __init__(self, **kw):
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, q, k, v, **kw):
        self.modes.append(self.training)
        return q.reshape(q.shape[0], -1)  # [t, h*d]; values do not matter here


class _FakeTE:
    DotProductAttention = _StandInTE


def test_te_module_follows_train_and_eval(monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(A, "_require", lambda b: _FakeTE if b == "te" else None)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        attention_dropout=0.1,
        hidden_dropout=0.0,
        bf16=True,
    )
    q, kv = torch.zeros(6, 1, 4, 8, dtype=torch.bfloat16), torch.zeros(6, 1, 2, 8, dtype=torch.bfloat16)
    parent = torch.nn.Sequential(A.FlexSPCoreAttention(cfg, 1, AttnMaskType.causal, "self", backend="te"))
    attn = parent[0]
    parent.eval()  # before the TE module exists: it must be created in eval mode
    attn(q, kv, kv, None)
    (te,) = attn.__dict__["_te_modules"].values()
    parent.train()
    attn(q, kv, kv, None)
    parent.eval()
    attn(q, kv, kv, None)
    parent.train(True)
    attn(q, kv, kv, None)
    assert te.modes == [False, True, False, True]
    assert len(attn.__dict__["_te_modules"]) == 1 and "te" not in dict(parent.named_modules())  # still outside
    assert not any(k.startswith("0._te") for k in parent.state_dict())
