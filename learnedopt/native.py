"""``impl="native"``: the fused C++ step for float32 CPU tensors, compiled on first use.

The kernel (``learnedopt/csrc/lstm_step.cpp``) updates parameters, LSTM state and moments in
place, a tile of 16 coordinates at a time, so a step allocates nothing proportional to the model.
It needs a C++ compiler (``g++``, or ``$CXX``) the first time; the library is cached under
``$LEARNEDOPT_CACHE_DIR`` (default ``~/.cache/learnedopt``), keyed by the source, the flags and
the compiler, and written atomically. It is called through :mod:`ctypes`, which releases the GIL,
so large tensors are split across ``torch.get_num_threads()`` Python threads.

``LEARNEDOPT_NATIVE=0`` turns it off: ``impl="auto"`` then uses ``"batched"``, and an explicit
``impl="native"`` raises :class:`NativeUnavailable`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import UpdateNetworkConfig
from .functional import tensor_rms

if TYPE_CHECKING:
    from .network import UpdateNetwork

__all__ = [
    "NativeUnavailable", "available", "load_library", "PackedNetwork", "unsupported_reason", "check_supported",
    "eligible", "step_",
    "lstm_pointwise", "pointwise_eligible",
]

SOURCE = Path(__file__).parent / "csrc" / "lstm_step.cpp"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "--param=vect-partial-vector-usage=2")
ABI_VERSION = 7
#: Coordinates in the kernel's tiles, and the smallest register block of gate rows (see lstm_step.cpp).
TILE, ROW_BLOCK = 16, 8
#: Smallest range of coordinates worth a thread of its own.
MIN_COORDS_PER_THREAD = 16384
_FEATURE_CODES = {"grad_logsign": 0, "grad_rms": 1, "momentum_rms": 2, "tensor_rms": 3}


class NativeUnavailable(RuntimeError):
    """The native kernel cannot be used here (no compiler, compile error, or turned off)."""


class _StepArgs(ctypes.Structure):
    _fields_ = [
        ("weights", ctypes.c_void_p),
        ("hidden", ctypes.c_int32),
        ("layers", ctypes.c_int32),
        ("inputs", ctypes.c_int32),
        ("features", ctypes.c_void_p),
        ("num_features", ctypes.c_int32),
        ("betas", ctypes.c_void_p),
        ("num_moments", ctypes.c_int32),
        ("rms_beta", ctypes.c_float),
        ("rms_eps", ctypes.c_float),
        ("feature_clip", ctypes.c_float),
        ("preprocess_p", ctypes.c_float),
        ("output_scale", ctypes.c_float),
        ("update_clip", ctypes.c_float),
        ("row_block", ctypes.c_int32),
        ("feature_means", ctypes.c_int32),
        ("nominal_index", ctypes.c_int32),
        ("nominal_lr", ctypes.c_float),
        ("nominal_c1", ctypes.c_float),
        ("nominal_c2", ctypes.c_float),
        ("nominal_scale", ctypes.c_int32),
        ("nominal_log_lr", ctypes.c_float),
    ]


_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("LEARNEDOPT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "learnedopt"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise NativeUnavailable(
            f"no C++ compiler found (looked for {cxx!r}); install g++ (e.g. `apt install g++`) or set "
            "$CXX, or use impl='batched'"
        )
    return path


def _build() -> Path:
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeUnavailable(f"cannot run the C++ compiler {cxx}: {err}") from None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out_dir = cache_dir() / "native"
    target = out_dir / f"lstm_step-{key}.so"
    if target.is_file():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
        os.close(fd)
    except OSError as err:
        raise NativeUnavailable(f"cannot write the compiled kernel under {out_dir} ({err}); set "
                                "$LEARNEDOPT_CACHE_DIR to a writable folder") from None
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise NativeUnavailable(
                f"compiling {SOURCE.name} with {cxx} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        os.replace(tmp, target)  # atomic: a concurrent build or a crash never leaves half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library() -> ctypes.CDLL:
    """The compiled kernel, built on first use; raises :class:`NativeUnavailable` if it cannot be."""
    global _LIB, _ERROR
    if os.environ.get("LEARNEDOPT_NATIVE", "1") == "0":
        raise NativeUnavailable("the native kernel is turned off by LEARNEDOPT_NATIVE=0")
    with _LOCK:
        if _LIB is not None:
            return _LIB
        if _ERROR is not None:
            raise NativeUnavailable(_ERROR)
        try:
            lib = ctypes.CDLL(str(_build()))
            lib.learnedopt_abi_version.restype = ctypes.c_int32
            if lib.learnedopt_abi_version() != ABI_VERSION:
                raise NativeUnavailable("the cached native kernel has the wrong ABI version; delete "
                                        f"{cache_dir() / 'native'} and retry")
            fn = lib.learnedopt_lstm_step
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.POINTER(_StepArgs), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float, ctypes.c_float,
                           ctypes.c_float]
            vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
            lib.learnedopt_lstm_pointwise_fwd.restype = None
            lib.learnedopt_lstm_pointwise_fwd.argtypes = [vp, vp, i64, i64, i32, vp, vp, vp, vp]
            lib.learnedopt_lstm_pointwise_bwd.restype = None
            lib.learnedopt_lstm_pointwise_bwd.argtypes = [vp, vp, vp, vp, i64, vp, i64, i32, vp, vp]
        except NativeUnavailable as err:
            _ERROR = str(err)
            raise
        except OSError as err:
            _ERROR = f"cannot load the compiled native kernel: {err}"
            raise NativeUnavailable(_ERROR) from None
        _LIB = lib
        return lib


def available() -> bool:
    """Whether the native kernel can be used on this machine (compiles it if needed)."""
    try:
        load_library()
    except NativeUnavailable:
        return False
    return True


def unsupported_reason(config: UpdateNetworkConfig) -> str | None:
    """Why the kernel cannot run this architecture, or ``None`` if it can."""
    if (4 * config.hidden_size) % ROW_BLOCK:
        return f"hidden_size must be even for the native kernel (got {config.hidden_size})"
    if config.num_moments > 64:
        return f"at most 63 running means in the native kernel (got {config.num_moments - 1})"
    return None


def usable_for(config: UpdateNetworkConfig, on_unavailable: Callable[[NativeUnavailable], None] | None = None) -> bool:
    """Whether ``impl="auto"`` takes the kernel for this architecture: supported and buildable.

    An unsupported architecture is a quiet ``False``; a supported one whose kernel cannot be built
    here (no compiler, turned off) calls ``on_unavailable`` with the reason first.
    """
    if unsupported_reason(config):
        return False
    try:
        load_library()
    except NativeUnavailable as err:
        if on_unavailable is not None:
            on_unavailable(err)
        return False
    return True


def check_supported(config: UpdateNetworkConfig) -> None:
    """Raise :class:`NativeUnavailable` with :func:`unsupported_reason` if there is one."""
    reason = unsupported_reason(config)
    if reason:
        raise NativeUnavailable(reason)


def eligible(param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> bool:
    """Whether one tensor can take the native path (float32, CPU, contiguous state)."""
    lstm, moments = state["lstm"], state.get("moments")
    return (
        param.device.type == "cpu" and param.dtype == torch.float32 and grad.dtype == torch.float32
        and param.is_contiguous()
        and lstm.dtype in (torch.float32, torch.bfloat16) and lstm.is_contiguous()
        and (moments is None or (moments.dtype == torch.float32 and moments.is_contiguous()))
    )


class PackedNetwork:
    """One network's weights in the kernel's layout, with the call arguments built once."""

    def __init__(self, net: "UpdateNetwork", config: UpdateNetworkConfig) -> None:
        check_supported(config)
        h = config.hidden_size
        block = 16 if (4 * h) % 16 == 0 else ROW_BLOCK  # more accumulators per weight load when possible
        pieces = []
        with torch.no_grad():
            for weight, bias in net.layer_parameters():
                w = weight.detach().to(torch.float32).clone()
                b = bias.detach().to(torch.float32).clone()
                sig = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h)])
                w[sig] *= 0.5  # sigmoid(x) = 0.5 + 0.5 * tanh(x / 2)
                b[sig] *= 0.5
                g, k = w.shape
                pieces += [w.view(g // block, block, k).transpose(1, 2).reshape(-1), b]
            pieces += [net.head_weight.detach().to(torch.float32).reshape(-1),
                       net.head_bias.detach().to(torch.float32).reshape(1)]
        self.weights = torch.cat(pieces).contiguous()
        self.features = torch.tensor([_FEATURE_CODES[f] for f in config.features], dtype=torch.int32)
        self.betas = torch.tensor(config.moment_betas or [0.0], dtype=torch.float32)
        self.state_size = 2 * config.num_layers * h
        self.num_moments = config.num_moments
        self.config = config
        log_lr = torch.zeros(()) if net.nominal_log_lr is None else net.nominal_log_lr.detach().float()
        self.args = _StepArgs(
            self.weights.data_ptr(), h, config.num_layers, config.input_size,
            self.features.data_ptr(), len(config.features), self.betas.data_ptr(), config.num_moments,
            config.rms_beta, config.rms_eps, config.feature_clip, config.preprocess_p,
            config.output_scale, -1.0 if config.update_clip is None else config.update_clip, block,
            config.feature_means, -1 if config.nominal_index is None else config.nominal_index,
            float(log_lr.exp()),  # float32's exp, as in the PyTorch path
            1.0 - (config.nominal_momentum or 0.0), config.nominal_momentum or 0.0,
            int(config.nominal_correction == "scale"), float(log_lr),
        )


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _ranges(n: int, threads: int, minimum: int) -> list[tuple[int, int]]:
    """``[start, stop)`` pieces of ``n`` rows, one per thread but none under ``minimum`` rows, each
    starting on a tile boundary."""
    per = max(minimum, -(-n // threads))
    per = -(-per // TILE) * TILE
    return [(start, min(n, start + per)) for start in range(0, n, per)]


def _map(fn, items: list, threads: int) -> list:
    """``fn`` over ``items``, on the thread pool when there is more than one (ctypes drops the GIL)."""
    if threads > 1 and len(items) > 1:
        return list(_pool(threads).map(fn, items))
    return [fn(item) for item in items]


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != threads:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL, _POOL_SIZE = ThreadPoolExecutor(threads, thread_name_prefix="learnedopt-native"), threads
    return _POOL


def step_(
    packed: list[PackedNetwork],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    lrs: list[float],
    weight_decays: list[float],
    threads: int | None = None,
) -> int:
    """Update ``params`` and their ``states`` in place; ``packed[i]`` serves ``params[i]``.

    Every tensor must pass :func:`eligible`. Returns the number of coordinates whose gradient was
    not finite (those were not updated, apart from weight decay, and kept their state).
    """
    lib = load_library()
    fn = lib.learnedopt_lstm_step
    threads = threads or torch.get_num_threads()
    calls = []
    for net, p, g, st, lr, wd in zip(packed, params, grads, states, lrs, weight_decays):
        g = g.contiguous()
        lstm, moments = st["lstm"], st.get("moments")
        n = p.numel()
        if lstm.shape != (n, net.state_size) or (net.num_moments and (moments is None or moments.shape != (n, net.num_moments))):
            raise ValueError(
                f"optimizer state of a tensor with {n} elements has the wrong shape (lstm {tuple(lstm.shape)}"
                f"{', moments ' + str(tuple(moments.shape)) if moments is not None else ''}); was it "
                "loaded from a different architecture?"
            )
        bf16 = int(lstm.dtype == torch.bfloat16)
        # read before any call below updates the moments
        scale = float(tensor_rms(st, net.config)) if "tensor_rms" in net.config.features else 1.0
        lstm_row = net.state_size * lstm.element_size()
        mom_row = net.num_moments * 4
        for start, stop in _ranges(n, threads, MIN_COORDS_PER_THREAD):
            count = stop - start
            calls.append((
                ctypes.byref(net.args), p.data_ptr() + 4 * start, g.data_ptr() + 4 * start, count,
                lstm.data_ptr() + lstm_row * start, bf16,
                moments.data_ptr() + mom_row * start if net.num_moments else None,
                float(lr), float(wd), scale, g,  # keep g (maybe a contiguous copy) alive until the call ran
            ))

    def run(call) -> int:
        result = fn(*call[:-1])
        if result < 0:
            raise MemoryError("the native LSTM step could not allocate its scratch memory")
        return result

    return sum(_map(run, calls, threads))


# ---------------------------------------------------------------------------- meta-training
def _run_rows(fn, n: int) -> None:
    """``fn(start, stop)`` over row ranges of ``n`` rows split across the torch threads."""
    threads = torch.get_num_threads()
    _map(lambda r: fn(*r), _ranges(n, threads, MIN_COORDS_PER_THREAD // 4), threads)


def _ptr(t: Tensor | None, row: int, row_floats: int) -> int | None:
    return None if t is None else t.data_ptr() + 4 * row * row_floats


class _LSTMPointwise(torch.autograd.Function):
    """The elementwise half of an LSTM layer, fused forward and backward (float32, CPU)."""

    @staticmethod
    def forward(ctx, gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        lib = load_library()
        n, four_h = gates.shape
        hidden = four_h // 4
        gates = gates.contiguous()
        if c_prev.stride(1) != 1:
            c_prev = c_prev.contiguous()
        ldc = c_prev.stride(0)
        h, c, tc = (gates.new_empty(n, hidden) for _ in range(3))
        act = torch.empty_like(gates)

        def run(start: int, stop: int) -> None:
            lib.learnedopt_lstm_pointwise_fwd(
                _ptr(gates, start, four_h), c_prev.data_ptr() + 4 * start * ldc, ldc, stop - start, hidden,
                _ptr(h, start, hidden), _ptr(c, start, hidden), _ptr(act, start, four_h), _ptr(tc, start, hidden),
            )

        _run_rows(run, n)
        ctx.save_for_backward(act, c_prev, tc)
        return h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor | None, dc: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        lib = load_library()
        act, c_prev, tc = ctx.saved_tensors
        n, four_h = act.shape
        hidden = four_h // 4
        dh = None if dh is None else dh.contiguous()
        dc = None if dc is None else dc.contiguous()
        d_gates = torch.empty_like(act)
        d_c_prev = tc.new_empty(n, hidden)
        ldc = c_prev.stride(0)

        def run(start: int, stop: int) -> None:
            lib.learnedopt_lstm_pointwise_bwd(
                _ptr(dh, start, hidden), _ptr(dc, start, hidden), _ptr(act, start, four_h),
                c_prev.data_ptr() + 4 * start * ldc, ldc, _ptr(tc, start, hidden), stop - start, hidden,
                _ptr(d_gates, start, four_h), _ptr(d_c_prev, start, hidden),
            )

        _run_rows(run, n)
        return d_gates, d_c_prev


def pointwise_eligible(gates: Tensor, c_prev: Tensor) -> bool:
    """Whether :func:`lstm_pointwise` can take these tensors (float32 CPU, kernel available)."""
    if gates.device.type != "cpu" or gates.dtype != torch.float32 or c_prev.dtype != torch.float32:
        return False
    if torch.compiler.is_compiling():
        return False
    return available()


def lstm_pointwise(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    """``(h, c)`` of an LSTM layer from its gate pre-activations ``(N, 4H)`` ([i, f, g, o]) and the
    previous cell state ``(N, H)``; differentiable (fused backward). See :func:`pointwise_eligible`."""
    return _LSTMPointwise.apply(gates, c_prev)
